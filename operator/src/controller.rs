//! The control loop: `reconcile` makes the cluster look like its PushCluster.
//!
//! Each child is compared with the live object first: when every field we
//! manage already has the desired value nothing is written; otherwise it is
//! server-side applied with one field manager (drift in managed fields is
//! repaired, fields of other managers are left alone). So a no-op reconcile
//! makes no write request at all. Leases and per-shard Services of shards
//! beyond `spec.comet.shards` are deleted; everything else is garbage
//! collected through owner references when the PushCluster goes.

use crate::builders::{self, Child, MANAGER};
use crate::crd::{ComponentStatus, PushCluster, PushClusterStatus, ShardStatus};
use crate::{Error, Result};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use pushcluster_lease::kubernetes::{CLUSTER_LABEL, SHARD_LABEL};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requeue interval when all is well (status refresh, lease table).
const RESYNC: Duration = Duration::from_secs(30);
/// Requeue interval while the cluster is converging.
const PROGRESS: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    reason: &'static str,
}

/// Metrics of the control loop.
#[derive(Clone)]
pub struct Metrics {
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    applied: Counter,
}

impl Metrics {
    /// Registers the operator's metrics.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            applied: Counter::default(),
        };
        reg.register(
            "pushcluster_operator_reconciles",
            "Reconciliations",
            m.reconciles.clone(),
        );
        reg.register(
            "pushcluster_operator_reconcile_errors",
            "Failed reconciliations by reason",
            m.failures.clone(),
        );
        reg.register(
            "pushcluster_operator_reconcile_duration_seconds",
            "Reconcile duration",
            m.duration.clone(),
        );
        reg.register(
            "pushcluster_operator_applied_objects",
            "Child objects written",
            m.applied.clone(),
        );
        m
    }
}

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

/// Whether every field of `want` has the same value in `have` (extra fields
/// in `have`, set by the server or other managers, are fine).
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| wv.is_null() || h.get(k).is_some_and(|hv| contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| contains(a, b))
        }
        (h, w) => h == w,
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
                .get_or_create(&ErrorLabels {
                    reason: e.metric_label(),
                })
                .inc();
        }
    }
    result
}

async fn reconcile_inner(pc: &PushCluster, ctx: &Context) -> Result<Action> {
    let ns = pc.namespace().ok_or(Error::NoNamespace)?;
    let creds = match ensure_credentials(pc, ctx, &ns).await {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("credentials Secret {}: {e}", builders::credentials_name(pc));
            degrade(pc, ctx, "CredentialsFailed", &msg).await;
            return Err(e);
        }
    };
    let children = builders::desired(pc, &creds)?;
    let mut written = Vec::new();
    for child in &children {
        match apply_if_changed(ctx, &ns, child).await {
            Ok(true) => written.push(format!(
                "{}/{}",
                child.resource.kind,
                child.object.name_any()
            )),
            Ok(false) => {}
            Err(e) => {
                let msg = format!(
                    "applying {} {}: {e}",
                    child.resource.kind,
                    child.object.name_any()
                );
                degrade(pc, ctx, "ApplyFailed", &msg).await;
                return Err(e);
            }
        }
    }
    ctx.metrics.applied.inc_by(written.len() as u64);
    let removed = collect_garbage(pc, ctx, &ns).await?;
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
    let status = observe(pc, ctx, &ns, &creds).await?;
    let converging = !is_true(&status, "Ready");
    if pc.status.as_ref() != Some(&status) {
        let api: Api<PushCluster> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &pc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    }
    Ok(Action::requeue(if converging { PROGRESS } else { RESYNC }))
}

/// Makes the generated credentials Secret complete (creating it, or adding
/// keys that were deleted to rotate them) and returns its digests. Values
/// that exist are never rewritten.
async fn ensure_credentials(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
) -> Result<builders::CredentialDigests> {
    if !builders::secure(pc) {
        return Ok(builders::CredentialDigests::default());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = builders::credentials_name(pc);
    let live = api.get_opt(&name).await?;
    let Some(write) = builders::credentials_secret(pc, live.as_ref(), builders::random_token)?
    else {
        return Ok(live
            .as_ref()
            .map(builders::CredentialDigests::of)
            .unwrap_or_default());
    };
    let keys: Vec<String> = write
        .string_data
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    let written = match live {
        // Create, not apply: a concurrent creator makes this fail (409) and
        // the next reconcile reads what won, so a value is never replaced.
        None => api.create(&PostParams::default(), &write).await?,
        Some(_) => {
            let patch = json!({"stringData": write.string_data});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?
        }
    };
    publish(
        ctx,
        pc,
        EventType::Normal,
        "CredentialsGenerated",
        &format!("generated {} in Secret {name}", keys.join(", ")),
    )
    .await;
    Ok(builders::CredentialDigests::of(&written))
}

/// Applies `child` unless the live object already has every desired field.
async fn apply_if_changed(ctx: &Context, ns: &str, child: &Child) -> Result<bool> {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &child.resource);
    let name = child.object.name_any();
    let want = serde_json::to_value(&child.object).map_err(|e| Error::Render(e.to_string()))?;
    if let Some(live) = api.get_opt(&name).await? {
        let have = serde_json::to_value(&live).map_err(|e| Error::Render(e.to_string()))?;
        if contains(&have, &strip_type(&want)) {
            return Ok(false);
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&child.object),
    )
    .await?;
    Ok(true)
}

/// apiVersion/kind are not echoed by every decoder; compare the rest.
fn strip_type(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("apiVersion");
        o.remove("kind");
    }
    v
}

fn shard_of(labels: &std::collections::BTreeMap<String, String>) -> Option<i32> {
    labels.get(SHARD_LABEL).and_then(|s| s.parse().ok())
}

/// Deletes Leases and per-shard Services of shards that no longer exist.
async fn collect_garbage(pc: &PushCluster, ctx: &Context, ns: &str) -> Result<Vec<String>> {
    let shards = pc.spec.comet.shards;
    let lp = ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", pc.name_any()));
    let mut removed = Vec::new();
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), ns);
    for l in leases.list(&lp).await?.items {
        if shard_of(l.labels()).is_some_and(|k| k >= shards) {
            leases
                .delete(&l.name_any(), &DeleteParams::default())
                .await?;
            removed.push(format!("Lease/{}", l.name_any()));
        }
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    for s in services.list(&lp).await?.items {
        if shard_of(s.labels()).is_some_and(|k| k >= shards) {
            services
                .delete(&s.name_any(), &DeleteParams::default())
                .await?;
            removed.push(format!("Service/{}", s.name_any()));
        }
    }
    if !pc.spec.network_policy.enabled {
        // Turned off after they were made: owner references only act when
        // the PushCluster goes, so remove them here.
        let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
        for p in policies.list(&lp).await?.items {
            policies
                .delete(&p.name_any(), &DeleteParams::default())
                .await?;
            removed.push(format!("NetworkPolicy/{}", p.name_any()));
        }
    }
    Ok(removed)
}

fn is_true(s: &PushClusterStatus, kind: &str) -> bool {
    s.conditions
        .iter()
        .any(|c| c.type_ == kind && c.status == "True")
}

/// A condition, keeping the previous transition time when its status holds.
fn condition(
    prev: Option<&PushClusterStatus>,
    gen: Option<i64>,
    kind: &str,
    ok: bool,
    reason: &str,
    msg: String,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    let since = prev
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == kind))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: kind.into(),
        status,
        reason: reason.into(),
        message: msg,
        observed_generation: gen,
        last_transition_time: since,
    }
}

/// What a workload (Deployment or StatefulSet) reports about its rollout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollout {
    /// Replicas the spec asks for.
    pub desired: i32,
    /// Pods that exist.
    pub replicas: i32,
    pub ready: i32,
    /// Pods of the current template.
    pub updated: i32,
    /// Whether the controller has seen the workload's latest spec.
    pub observed: bool,
}

impl Rollout {
    fn of_deployment(d: &Deployment) -> Self {
        let s = d.status.clone().unwrap_or_default();
        Self {
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            replicas: s.replicas.unwrap_or(0),
            ready: s.ready_replicas.unwrap_or(0),
            updated: s.updated_replicas.unwrap_or(0),
            observed: s.observed_generation >= d.metadata.generation,
        }
    }

    fn of_statefulset(d: &StatefulSet) -> Self {
        let s = d.status.clone().unwrap_or_default();
        let current = s.update_revision.is_some() && s.update_revision == s.current_revision;
        Self {
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            replicas: s.replicas,
            ready: s.ready_replicas.unwrap_or(0),
            // During a rolling update `updated_replicas` counts new pods;
            // once it completes the revisions match.
            updated: if current {
                s.replicas
            } else {
                s.updated_replicas.unwrap_or(0)
            },
            observed: s.observed_generation >= d.metadata.generation,
        }
    }

    /// Every pod of the current template exists and is ready, no old one left.
    pub fn complete(&self) -> bool {
        self.observed
            && self.updated == self.desired
            && self.replicas == self.desired
            && self.ready == self.desired
    }

    fn status(&self) -> ComponentStatus {
        ComponentStatus {
            replicas: self.replicas,
            ready_replicas: self.ready,
        }
    }

    fn left(&self, component: &str) -> Option<String> {
        (!self.complete()).then(|| {
            format!(
                "{component} {}/{} updated, {}/{} ready",
                self.updated, self.desired, self.ready, self.desired
            )
        })
    }
}

/// What `observe` read from the cluster, so the status is a pure function of it.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub comet: Rollout,
    pub message: Rollout,
    pub web: Rollout,
    /// Holder pod per shard row (shards `0..spec.comet.shards`).
    pub shards: Vec<ShardStatus>,
    /// Comet pods of the current generation (config hash and image).
    pub current_comets: std::collections::BTreeSet<String>,
}

/// The status of `pc` given what was observed: `Ready` only when every shard
/// is held by a comet of the current generation and message and web serve;
/// `Progressing` while anything is left to roll or reshard, saying what.
pub fn status_of(pc: &PushCluster, o: &Observed) -> PushClusterStatus {
    let want = pc.spec.comet.shards;
    let held = o.shards.iter().filter(|s| s.holder.is_some()).count() as i32;
    let stale: Vec<String> = o
        .shards
        .iter()
        .filter(|s| {
            s.holder
                .as_ref()
                .is_some_and(|h| !o.current_comets.contains(h))
        })
        .map(|s| s.shard.to_string())
        .collect();
    let free: Vec<String> = o
        .shards
        .iter()
        .filter(|s| s.holder.is_none())
        .map(|s| s.shard.to_string())
        .collect();
    let serving = held == want && stale.is_empty();
    let up = o.message.ready >= 1 && o.web.ready >= 1;
    let mut left: Vec<String> = [
        o.comet.left("comet"),
        o.message.left("message"),
        o.web.left("web"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !free.is_empty() {
        left.push(format!("shards {} not held", free.join(",")));
    }
    if !stale.is_empty() {
        left.push(format!(
            "shards {} held by comets of an older generation",
            stale.join(",")
        ));
    }
    let gen = pc.metadata.generation;
    let prev = pc.status.as_ref();
    let ready = serving && up;
    let ready_msg = format!(
        "{held}/{want} shards held ({} by current comets); ready comet {}/{}, message {}/{}, web {}/{}",
        held - stale.len() as i32,
        o.comet.ready,
        o.comet.desired,
        o.message.ready,
        o.message.desired,
        o.web.ready,
        o.web.desired
    );
    let conditions = vec![
        condition(
            prev,
            gen,
            "Ready",
            ready,
            if ready { "AllShardsServed" } else { "Waiting" },
            ready_msg,
        ),
        condition(
            prev,
            gen,
            "Progressing",
            !left.is_empty(),
            if left.is_empty() {
                "Converged"
            } else {
                "RollingOut"
            },
            if left.is_empty() {
                "every workload rolled out, every shard held by a current comet".into()
            } else {
                format!("left: {}", left.join("; "))
            },
        ),
        condition(
            prev,
            gen,
            "Degraded",
            false,
            "ReconcileSucceeded",
            "every object applied".into(),
        ),
        auth_condition(pc, prev, gen),
    ];
    PushClusterStatus {
        observed_generation: gen,
        conditions,
        ready_shards: held,
        comet: o.comet.status(),
        message: o.message.status(),
        web: o.web.status(),
        shards: o.shards.clone(),
        endpoints: Some(builders::endpoints(pc)),
    }
}

/// `AuthEnabled`: whether the cluster asks for credentials, and where they are.
fn auth_condition(
    pc: &PushCluster,
    prev: Option<&PushClusterStatus>,
    gen: Option<i64>,
) -> Condition {
    if builders::secure(pc) {
        condition(
            prev,
            gen,
            "AuthEnabled",
            true,
            "CredentialsRequired",
            format!(
                "the admin API, private reads and internal gRPC need the credentials in Secret {}",
                builders::credentials_name(pc)
            ),
        )
    } else {
        condition(
            prev,
            gen,
            "AuthEnabled",
            false,
            "InsecureBySpec",
            "spec.auth.insecure: the admin API, private reads and internal gRPC answer anyone who reaches them".into(),
        )
    }
}

/// Reads workloads, Leases and comet pods into the status.
async fn observe(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
    creds: &builders::CredentialDigests,
) -> Result<PushClusterStatus> {
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let rollout =
        |d: Option<Deployment>| d.as_ref().map(Rollout::of_deployment).unwrap_or_default();
    let comet = rollout(deps.get_opt(&builders::name(pc, "comet")).await?);
    let web = rollout(deps.get_opt(&builders::name(pc, "web")).await?);
    let message = if builders::embedded(pc) {
        let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
        sts.get_opt(&builders::name(pc, "message"))
            .await?
            .as_ref()
            .map(Rollout::of_statefulset)
            .unwrap_or_default()
    } else {
        rollout(deps.get_opt(&builders::name(pc, "message")).await?)
    };
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", pc.name_any()));
    let mut shards: Vec<ShardStatus> = (0..pc.spec.comet.shards)
        .map(|k| ShardStatus {
            shard: k,
            ..ShardStatus::default()
        })
        .collect();
    for l in leases.list(&lp).await?.items {
        let Some(k) = shard_of(l.labels()).filter(|k| (0..pc.spec.comet.shards).contains(k)) else {
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
    let hash = builders::config_hashes(pc, creds)?.comet;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let comet_pods = ListParams::default().labels(&format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/component=comet",
        pc.name_any()
    ));
    let current_comets = pods
        .list(&comet_pods)
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.annotations().get(builders::CONFIG_HASH) == Some(&hash)
                && p.spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.as_deref())
                    == Some(pc.spec.image.as_str())
        })
        .map(|p| p.name_any())
        .collect();
    Ok(status_of(
        pc,
        &Observed {
            comet,
            message,
            web,
            shards,
            current_comets,
        },
    ))
}

/// Records a failure in the status (`Degraded`) and as a Warning event.
async fn degrade(pc: &PushCluster, ctx: &Context, reason: &str, msg: &str) {
    publish(ctx, pc, EventType::Warning, reason, msg).await;
    let Some(ns) = pc.namespace() else { return };
    let mut status = pc.status.clone().unwrap_or_default();
    status.conditions.retain(|c| c.type_ != "Degraded");
    status.conditions.push(condition(
        pc.status.as_ref(),
        pc.metadata.generation,
        "Degraded",
        true,
        reason,
        msg.into(),
    ));
    let api: Api<PushCluster> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = api
        .patch_status(
            &pc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
    {
        tracing::warn!(error = %e, "cannot record Degraded");
    }
}

async fn publish(ctx: &Context, pc: &PushCluster, type_: EventType, reason: &str, note: &str) {
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
    fn containment_ignores_what_the_server_adds() {
        let have = json!({"metadata": {"name": "a", "uid": "x", "labels": {"k": "v", "other": "1"}}, "spec": {"ports": [{"port": 1, "protocol": "TCP"}]}});
        assert!(contains(
            &have,
            &json!({"metadata": {"name": "a", "labels": {"k": "v"}}})
        ));
        assert!(contains(&have, &json!({"spec": {"ports": [{"port": 1}]}})));
        assert!(!contains(&have, &json!({"spec": {"ports": [{"port": 2}]}})));
        assert!(!contains(
            &have,
            &json!({"spec": {"ports": [{"port": 1}, {"port": 2}]}})
        ));
        assert!(!contains(
            &have,
            &json!({"metadata": {"labels": {"k": "changed"}}})
        ));
        assert!(contains(&have, &json!({"spec": {"missing": null}})));
    }

    fn done(n: i32) -> Rollout {
        Rollout {
            desired: n,
            replicas: n,
            ready: n,
            updated: n,
            observed: true,
        }
    }

    fn observed(holders: &[Option<&str>], current: &[&str]) -> Observed {
        Observed {
            comet: done(3),
            message: done(1),
            web: done(2),
            shards: holders
                .iter()
                .enumerate()
                .map(|(k, h)| ShardStatus {
                    shard: k as i32,
                    holder: h.map(str::to_owned),
                    ..ShardStatus::default()
                })
                .collect(),
            current_comets: current.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn cond<'a>(s: &'a PushClusterStatus, kind: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == kind).unwrap()
    }

    #[test]
    fn ready_only_when_current_comets_hold_every_shard() {
        let pc: PushCluster = serde_json::from_value(
            json!({"metadata": {"name": "push", "generation": 4}, "spec": {}}),
        )
        .unwrap();
        let s = status_of(&pc, &observed(&[Some("a"), Some("b")], &["a", "b", "c"]));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!((s.ready_shards, s.observed_generation), (2, Some(4)));

        // Mid-rollout: shard 1 still held by a comet of the old template.
        let s = status_of(&pc, &observed(&[Some("a"), Some("old")], &["a", "c"]));
        assert_eq!(cond(&s, "Ready").status, "False");
        let p = cond(&s, "Progressing");
        assert_eq!(p.status, "True");
        assert!(
            p.message
                .contains("shards 1 held by comets of an older generation"),
            "{}",
            p.message
        );

        // A new shard not taken yet, and a workload still rolling.
        let mut o = observed(&[Some("a"), None], &["a"]);
        o.comet.updated = 1;
        let s = status_of(&pc, &o);
        assert_eq!(cond(&s, "Ready").status, "False");
        let p = &cond(&s, "Progressing").message;
        assert!(
            p.contains("shards 1 not held") && p.contains("comet 1/3 updated"),
            "{p}"
        );
    }

    #[test]
    fn backoff_grows_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(10), Duration::from_secs(300));
    }
}
