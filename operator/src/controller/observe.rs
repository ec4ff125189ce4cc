//! Reads what the status is computed from: workloads, shard Leases and the
//! comet pods of the current generation.

use super::gc::shard_of;
use super::Context;
use crate::children::{self, cluster_query, Facts, CONFIG_HASH};
use crate::crd::{PushCluster, ShardStatus};
use crate::status::{Observed, Rollout};
use crate::Result;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Reads the workloads, Leases and comet pods of `pc`.
pub async fn observe(pc: &PushCluster, ctx: &Context, ns: &str, facts: &Facts) -> Result<Observed> {
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
    let hash = children::config_hashes(pc, facts)?.comet;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let cluster_pods = pods
        .list(&ListParams::default().labels(&cluster_query(pc)))
        .await?
        .items;
    let terminating = cluster_pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .count();
    let comet_labels = children::selector(pc, "comet");
    let current_comets = cluster_pods
        .into_iter()
        .filter(|p| {
            comet_labels
                .iter()
                .all(|(k, v)| p.labels().get(k) == Some(v))
                && p.annotations().get(CONFIG_HASH) == Some(&hash)
                && p.spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.as_deref())
                    == Some(pc.spec.image.as_str())
        })
        .map(|p| p.name_any())
        .collect();
    let redis = redis_topology(pc, ctx, ns).await;
    // Node ports and load balancer addresses are filled in by the API
    // server and the cloud after creation: read again while some are
    // missing (what was read before the apply is complete otherwise).
    let mut listeners = facts.listener_endpoints(pc);
    if listeners.iter().any(|l| l.pending.is_some()) {
        let live = Facts {
            listener_services: listener_services(pc, ctx, ns).await?,
            ..facts.clone()
        };
        listeners = live.listener_endpoints(pc);
    }
    Ok(Observed {
        listeners,
        comet,
        message,
        web,
        shards,
        current_comets,
        redis,
        terminating,
    })
}

/// The listener Services of `pc` as the API server has them.
pub async fn listener_services(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
) -> Result<children::listeners::LiveServices> {
    if pc.spec.listeners.is_empty() {
        return Ok(Default::default());
    }
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&format!(
        "{},{}",
        cluster_query(pc),
        children::listeners::LISTENER_LABEL
    ));
    Ok(children::listeners::LiveServices::of(
        api.list(&lp).await?.items,
    ))
}

/// Whether the Gateway API's HTTPRoute can be made here. Asked only when
/// the cluster has, or had, a Gateway listener.
pub async fn gateway_api(pc: &PushCluster, ctx: &Context) -> bool {
    let gateway = crate::crd::ListenerType::Gateway;
    let wanted = pc.spec.listeners.iter().any(|l| l.type_ == gateway)
        || pc
            .status
            .as_ref()
            .and_then(|s| s.endpoints.as_ref())
            .is_some_and(|e| e.listeners.iter().any(|l| l.type_ == gateway.as_str()));
    if !wanted {
        return false;
    }
    match ctx
        .client
        .list_api_group_resources("gateway.networking.k8s.io/v1")
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.name == "httproutes"),
        Err(e) => {
            tracing::debug!(error = %e, "no Gateway API");
            false
        }
    }
}

/// How long the status's look at Redis may take.
const REDIS_LOOK: std::time::Duration = std::time::Duration::from_secs(2);

/// Sentinel and Cluster modes: asks Redis which node is master, or how many
/// masters answer, for the status (`status.storage`). The password comes
/// from `passwordSecretRef`. A failure is reported, never fatal: the
/// cluster's own pods reach Redis on their own.
async fn redis_topology(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
) -> Option<std::result::Result<pushcluster_redis::Topology, String>> {
    let r = pc.spec.storage.redis.as_ref()?;
    if r.mode.unwrap_or_default() == crate::crd::RedisMode::Single {
        return None;
    }
    let mut url = children::config::redis_url_from(pc, ns)?;
    if let Some(s) = &r.password_secret_ref {
        match secret_value(ctx, ns, s).await {
            Ok(p) => {
                let p = String::from_utf8_lossy(&p);
                url = pushcluster_core::ops::with_password(&url, &p);
            }
            Err(e) => return Some(Err(e)),
        }
    }
    let tls = match redis_tls(r, ctx, ns).await {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    let target = match pushcluster_redis::Target::parse_with(&url, tls) {
        Ok(t) => t,
        Err(e) => return Some(Err(e.to_string())),
    };
    Some(target.topology(REDIS_LOOK).await.map_err(|e| e.to_string()))
}

/// The CA and client certificate `storage.redis.tls` names, read from
/// their Secrets (none without `tls`).
async fn redis_tls(
    r: &crate::crd::RedisSpec,
    ctx: &Context,
    ns: &str,
) -> std::result::Result<Option<pushcluster_redis::TlsSettings>, String> {
    let Some(tls) = &r.tls else {
        return Ok(None);
    };
    let mut settings = pushcluster_redis::TlsSettings::default();
    if let Some(ca) = &tls.ca_secret_ref {
        settings = pushcluster_redis::TlsSettings::trusting(secret_value(ctx, ns, ca).await?);
    }
    if let Some(c) = &tls.client_cert_secret_ref {
        let key = |k: &str| crate::crd::SecretKeyRef {
            name: c.name.clone(),
            key: k.into(),
        };
        let cert = secret_value(ctx, ns, &key("tls.crt")).await?;
        let private = secret_value(ctx, ns, &key("tls.key")).await?;
        settings = settings.showing(cert, private);
    }
    Ok(Some(settings))
}

/// Digests of the Secret keys `storage.redis.tls` mounts into the pods,
/// by `<secret>/<key>` (`absent` for a key not there yet: the pods wait
/// for it, and its arrival rolls nothing that ran without it).
pub(crate) async fn redis_tls_digests(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
) -> Result<BTreeMap<String, String>> {
    let Some(tls) = pc.spec.storage.redis.as_ref().and_then(|r| r.tls.as_ref()) else {
        return Ok(BTreeMap::new());
    };
    let mut wanted: Vec<(String, String)> = Vec::new();
    if let Some(ca) = &tls.ca_secret_ref {
        wanted.push((ca.name.clone(), ca.key.clone()));
    }
    if let Some(c) = &tls.client_cert_secret_ref {
        for key in ["tls.crt", "tls.key"] {
            wanted.push((c.name.clone(), key.into()));
        }
    }
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut out = BTreeMap::new();
    for (name, key) in wanted {
        let value = secrets
            .get_opt(&name)
            .await?
            .and_then(|s| s.data)
            .and_then(|d| d.get(&key).cloned());
        let digest = value.map_or_else(
            || "absent".to_owned(),
            |v| children::config::hash_of(&hex::encode(&v.0)),
        );
        out.insert(format!("{name}/{key}"), digest);
    }
    Ok(out)
}

/// The value of a Secret's key, or why it cannot be read.
async fn secret_value(
    ctx: &Context,
    ns: &str,
    s: &crate::crd::SecretKeyRef,
) -> std::result::Result<Vec<u8>, String> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), ns);
    match secrets.get_opt(&s.name).await {
        Ok(found) => found
            .and_then(|sec| sec.data)
            .and_then(|d| d.get(&s.key).cloned())
            .map(|v| v.0)
            .ok_or_else(|| format!("Secret {} has no key {}", s.name, s.key)),
        Err(e) => Err(format!("reading Secret {}: {e}", s.name)),
    }
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
