//! The control loop: `reconcile` makes the cluster look like its PushCluster.
//!
//! One reconcile, in order: complete the credentials Secret
//! ([`credentials`]), settle the embedded store's claim mode ([`storage`]),
//! apply every desired child that differs from its live
//! object ([`apply`]), delete what removed shards left ([`gc`]), read the
//! workloads and Leases ([`observe`]) and write the status computed from
//! them ([`crate::status`]) when it changed.

pub mod apply;
pub mod credentials;
pub mod gc;
pub mod metrics;
pub mod observe;
pub mod rpc_tls;
pub mod storage;

use crate::children::{self, MANAGER};
use crate::crd::{PushCluster, PushClusterStatus};
use crate::status::{self, ConditionType, Reason};
use crate::{Error, Result};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
pub use metrics::Metrics;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requeue interval when all is well (status refresh, lease table).
const RESYNC: Duration = Duration::from_secs(30);
/// Requeue interval while the cluster is converging.
const PROGRESS: Duration = Duration::from_secs(5);

/// What every reconcile needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events about PushClusters.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Consecutive failures per object, for the requeue backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context on `client`.
    pub fn new(client: Client, metrics: Metrics) -> Arc<Self> {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
        })
    }
}

fn object_key(pc: &PushCluster) -> String {
    format!("{}/{}", pc.namespace().unwrap_or_default(), pc.name_any())
}

/// Reconciles one PushCluster.
pub async fn reconcile(pc: Arc<PushCluster>, ctx: Arc<Context>) -> Result<Action> {
    let start = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&pc, &ctx).await;
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    match &result {
        Ok(_) => {
            failures.remove(&object_key(&pc));
        }
        Err(e) => {
            ctx.metrics
                .failures
                .get_or_create(&metrics::ErrorLabels {
                    reason: e.metric_label(),
                })
                .inc();
        }
    }
    result
}

async fn reconcile_inner(pc: &PushCluster, ctx: &Context) -> Result<Action> {
    let ns = pc.namespace().ok_or(Error::NoNamespace)?;
    let creds = match credentials::ensure_credentials(pc, ctx, &ns).await {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("credentials Secret {}: {e}", children::credentials_name(pc));
            degrade(pc, ctx, Reason::CredentialsFailed, &msg).await;
            return Err(e);
        }
    };
    let claim_access = if children::embedded(pc) {
        let support = storage::support(pc, ctx, &ns).await?;
        storage::choose(pc.spec.storage.embedded.access_mode, &support)
    } else {
        Default::default()
    };
    let facts = children::Facts {
        creds,
        claim_access,
        listener_services: observe::listener_services(pc, ctx, &ns).await?,
        gateway_api: observe::gateway_api(pc, ctx).await,
        redis_tls: observe::redis_tls_digests(pc, ctx, &ns).await?,
        rpc_tls: match rpc_tls::ensure_rpc_tls(pc, ctx, &ns).await {
            Ok(d) => d,
            Err(e) => {
                let msg = format!(
                    "RPC TLS Secret {}: {e}",
                    children::rpc_tls::rpc_tls_name(pc)
                );
                degrade(pc, ctx, Reason::CredentialsFailed, &msg).await;
                return Err(e);
            }
        },
    };
    let mut written = Vec::new();
    let desired = children::desired(pc, &facts)?;
    for child in &desired {
        match apply::apply_if_changed(ctx, &ns, child).await {
            Ok(true) => written.push(child.describe()),
            Ok(false) => {}
            Err(e) => {
                let msg = format!("applying {} {}: {e}", child.resource().kind, child.name());
                degrade(pc, ctx, Reason::ApplyFailed, &msg).await;
                return Err(e);
            }
        }
    }
    ctx.metrics.applied.inc_by(written.len() as u64);
    ctx.metrics.set_degraded(&ns, &pc.name_any(), None);
    let removed = gc::collect_garbage(pc, ctx, &ns, &desired, facts.gateway_api).await?;
    if !written.is_empty() || !removed.is_empty() {
        let note = [written.join(", "), removed.join(", ")]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; deleted ");
        publish(
            ctx,
            pc,
            EventType::Normal,
            "Reconciled",
            &format!("applied {note}"),
        )
        .await;
    }
    let observed = observe::observe(pc, ctx, &ns, &facts).await?;
    let status = status::status_of(pc, &observed);
    // Node ports and load balancer addresses arrive after the apply: look
    // again soon, so web's config gets them.
    let converging = !status::is_true(&status, ConditionType::Ready)
        || observed.listeners != facts.listener_endpoints(pc)
        || status.rpc_tls != children::rpc_tls::target(pc);
    let rpc_now = children::rpc_tls::current(pc);
    if status.rpc_tls != rpc_now {
        publish(
            ctx,
            pc,
            EventType::Normal,
            "RpcTlsStep",
            &format!(
                "internal RPC TLS: every pod runs step {}, next {}",
                status::rpc_step_name(rpc_now),
                status::rpc_step_name(status.rpc_tls)
            ),
        )
        .await;
    }
    if pc.status.as_ref() != Some(&status) {
        write_status(pc, ctx, &ns, &status).await?;
    }
    Ok(Action::requeue(if converging { PROGRESS } else { RESYNC }))
}

async fn write_status(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
    status: &PushClusterStatus,
) -> Result<()> {
    let api: Api<PushCluster> = Api::namespaced(ctx.client.clone(), ns);
    api.patch_status(
        &pc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Records a failure in the status (`Degraded`) and as a Warning event.
async fn degrade(pc: &PushCluster, ctx: &Context, reason: Reason, msg: &str) {
    publish(ctx, pc, EventType::Warning, reason.as_str(), msg).await;
    let Some(ns) = pc.namespace() else { return };
    ctx.metrics
        .set_degraded(&ns, &pc.name_any(), Some(reason.as_str()));
    let status = status::degraded(pc, reason, msg);
    if let Err(e) = write_status(pc, ctx, &ns, &status).await {
        tracing::warn!(error = %e, "cannot record Degraded");
    }
}

/// Publishes an Event about `pc`; a failure to publish is only logged.
pub(crate) async fn publish(
    ctx: &Context,
    pc: &PushCluster,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &pc.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot publish event");
    }
}

/// Requeues a failed PushCluster with exponential backoff (5 s … 5 min).
pub fn error_policy(pc: Arc<PushCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = failures.entry(object_key(&pc)).or_insert(0);
    *n = (*n + 1).min(10);
    let delay = backoff(*n);
    tracing::warn!(pushcluster = %object_key(&pc), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The requeue delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs((5u64 << failures.saturating_sub(1).min(6)).min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(10), Duration::from_secs(300));
    }
}
