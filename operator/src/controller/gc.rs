//! Deletes what owner references cannot: Leases, per-shard Services and
//! their EndpointSlices of shards beyond `spec.comet.shards`, the
//! EndpointSlice controller's leftovers of per-shard Services, the objects
//! of listeners removed or changed (Services, Ingresses, HTTPRoutes), and
//! NetworkPolicies once turned off.
//! Everything else is garbage collected through owner references when the
//! PushCluster goes.

use super::Context;
use crate::children::listeners::{HTTPRoute, LISTENER_LABEL};
use crate::children::services::SLICE_MANAGER;
use crate::children::{cluster_query, Child};
use crate::crd::PushCluster;
use crate::Result;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Resource, ResourceExt};
use pushcluster_lease::kubernetes::SHARD_LABEL;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;

/// Label naming who manages an EndpointSlice.
const SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// The shard an object is labelled with.
pub fn shard_of(labels: &BTreeMap<String, String>) -> Option<i32> {
    labels.get(SHARD_LABEL).and_then(|s| s.parse().ok())
}

/// Deletes the objects of kind `K` of `pc` that `doomed` picks; returns
/// `Kind/name` of each.
async fn delete_where<K>(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
    doomed: impl Fn(&K) -> bool,
) -> Result<Vec<String>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&cluster_query(pc));
    let mut removed = Vec::new();
    for o in api.list(&lp).await?.items.iter().filter(|o| doomed(o)) {
        api.delete(&o.name_any(), &DeleteParams::default()).await?;
        removed.push(format!("{}/{}", K::kind(&()), o.name_any()));
    }
    Ok(removed)
}

/// Deletes what is left of removed shards, removed listeners and disabled
/// policies. `desired` names the children this reconcile applied.
pub async fn collect_garbage(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
    desired: &[Child],
    gateway_api: bool,
) -> Result<Vec<String>> {
    let shards = pc.spec.comet.shards;
    let beyond = |labels: &BTreeMap<String, String>| shard_of(labels).is_some_and(|k| k >= shards);
    // A listener's object that no desired child of its kind names: its
    // listener went, changed type, or its shard did.
    let unwanted = |kind: &str, o: &ObjectMeta| {
        o.labels
            .as_ref()
            .is_some_and(|l| l.contains_key(LISTENER_LABEL))
            && !desired
                .iter()
                .any(|c| c.resource().kind == kind && Some(c.name()) == o.name)
    };
    let mut removed = delete_where::<Lease>(pc, ctx, ns, |l| beyond(l.labels())).await?;
    removed.extend(
        delete_where::<Service>(pc, ctx, ns, |s| {
            beyond(s.labels()) || unwanted("Service", &s.metadata)
        })
        .await?,
    );
    // Clusters that never had listeners are spared the list calls.
    let had_listeners = !pc.spec.listeners.is_empty()
        || pc
            .status
            .as_ref()
            .and_then(|s| s.endpoints.as_ref())
            .is_some_and(|e| !e.listeners.is_empty());
    if had_listeners {
        removed.extend(
            delete_where::<Ingress>(pc, ctx, ns, |i| unwanted("Ingress", &i.metadata)).await?,
        );
    }
    if gateway_api {
        removed.extend(
            delete_where::<HTTPRoute>(pc, ctx, ns, |r| unwanted("HTTPRoute", &r.metadata)).await?,
        );
    }
    // Shard slices of removed shards, and the EndpointSlice controller's
    // slices left from when per-shard Services had a selector (it stops
    // managing a Service whose selector goes, but does not delete them).
    removed.extend(
        delete_where::<EndpointSlice>(pc, ctx, ns, |s| {
            let l = s.labels();
            let ours = l.get(SLICE_MANAGED_BY).map(String::as_str) == Some(SLICE_MANAGER);
            // A listener web Service's slices are the EndpointSlice
            // controller's to keep (they carry the Service's labels); its
            // per-shard slices are ours, and go with their listener.
            beyond(l)
                || (shard_of(l).is_some() && !l.contains_key(LISTENER_LABEL) && !ours)
                || (ours && unwanted("EndpointSlice", &s.metadata))
        })
        .await?,
    );
    if !pc.spec.network_policy.enabled {
        // Turned off after they were made: owner references only act when
        // the PushCluster goes, so remove them here.
        removed.extend(delete_where::<NetworkPolicy>(pc, ctx, ns, |_| true).await?);
    }
    Ok(removed)
}
