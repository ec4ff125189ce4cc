//! Reads what the status is computed from: workloads, shard Leases and the
//! comet pods of the current generation.

use super::gc::shard_of;
use super::Context;
use crate::children::{self, cluster_query, selector_query, CredentialDigests, CONFIG_HASH};
use crate::crd::{PushCluster, ShardStatus};
use crate::status::{Observed, Rollout};
use crate::Result;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};
use kube::ResourceExt;

/// Reads the workloads, Leases and comet pods of `pc`.
pub async fn observe(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
    creds: &CredentialDigests,
) -> Result<Observed> {
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let rollout =
        |d: Option<Deployment>| d.as_ref().map(Rollout::of_deployment).unwrap_or_default();
    let comet = rollout(deps.get_opt(&children::name(pc, "comet")).await?);
    let web = rollout(deps.get_opt(&children::name(pc, "web")).await?);
    let message = if children::embedded(pc) {
        let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
        sts.get_opt(&children::name(pc, "message"))
            .await?
            .as_ref()
            .map(Rollout::of_statefulset)
            .unwrap_or_default()
    } else {
        rollout(deps.get_opt(&children::name(pc, "message")).await?)
    };
    let shards = shard_table(pc, ctx, ns).await?;
    let hash = children::config_hashes(pc, creds)?.comet;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let comet_pods = ListParams::default().labels(&selector_query(pc, "comet"));
    let current_comets = pods
        .list(&comet_pods)
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.annotations().get(CONFIG_HASH) == Some(&hash)
                && p.spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.as_deref())
                    == Some(pc.spec.image.as_str())
        })
        .map(|p| p.name_any())
        .collect();
    Ok(Observed {
        comet,
        message,
        web,
        shards,
        current_comets,
    })
}

/// One row per shard `0..spec.comet.shards`: its Lease's holder, since when,
/// and how often it changed hands.
async fn shard_table(pc: &PushCluster, ctx: &Context, ns: &str) -> Result<Vec<ShardStatus>> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&cluster_query(pc));
    let want = 0..pc.spec.comet.shards;
    let mut shards: Vec<ShardStatus> = want
        .clone()
        .map(|k| ShardStatus {
            shard: k,
            ..ShardStatus::default()
        })
        .collect();
    for l in leases.list(&lp).await?.items {
        let Some(k) = shard_of(l.labels()).filter(|k| want.contains(k)) else {
            continue;
        };
        let spec = l.spec.unwrap_or_default();
        let row = &mut shards[k as usize];
        row.holder = spec.holder_identity.filter(|h| !h.is_empty());
        row.since = row
            .holder
            .as_ref()
            .and(spec.acquire_time.map(|t| Time(t.0)));
        row.transitions = spec.lease_transitions.unwrap_or(0);
    }
    Ok(shards)
}
