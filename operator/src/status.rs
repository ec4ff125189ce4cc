//! The PushCluster's status as a pure function of what was observed:
//! conditions (an enum of types and reasons), rollouts, the shard table.

use crate::children::{self, credentials_name, rpc_tls, secure};
use crate::crd::{ComponentStatus, PushCluster, PushClusterStatus, ShardStatus};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use std::collections::BTreeSet;

/// The condition types a PushCluster reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    /// Every shard held by a current comet, message and web serving.
    Ready,
    /// Something is left to roll out or reshard.
    Progressing,
    /// The last reconcile failed.
    Degraded,
    /// Whether the cluster asks for credentials.
    AuthEnabled,
}

impl ConditionType {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Progressing => "Progressing",
            ConditionType::Degraded => "Degraded",
            ConditionType::AuthEnabled => "AuthEnabled",
        }
    }
}

/// Why a condition has its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    AllShardsServed,
    Waiting,
    Converged,
    RollingOut,
    ReconcileSucceeded,
    CredentialsFailed,
    ApplyFailed,
    CredentialsRequired,
    InsecureBySpec,
    RedisWithoutPassword,
}

impl Reason {
    /// The API's spelling (also the Event reason).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AllShardsServed => "AllShardsServed",
            Reason::Waiting => "Waiting",
            Reason::Converged => "Converged",
            Reason::RollingOut => "RollingOut",
            Reason::ReconcileSucceeded => "ReconcileSucceeded",
            Reason::CredentialsFailed => "CredentialsFailed",
            Reason::ApplyFailed => "ApplyFailed",
            Reason::CredentialsRequired => "CredentialsRequired",
            Reason::InsecureBySpec => "InsecureBySpec",
            Reason::RedisWithoutPassword => "RedisWithoutPassword",
        }
    }
}

/// Whether `s` has condition `type_` with status True.
pub fn is_true(s: &PushClusterStatus, type_: ConditionType) -> bool {
    s.conditions
        .iter()
        .any(|c| c.type_ == type_.as_str() && c.status == "True")
}

/// A condition, keeping the previous transition time when its status holds.
pub fn condition(
    prev: Option<&PushClusterStatus>,
    gen: Option<i64>,
    type_: ConditionType,
    ok: bool,
    reason: Reason,
    message: String,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    let since = prev
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_.as_str()))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.as_str().into(),
        status,
        reason: reason.as_str().into(),
        message,
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
    /// Pods that are ready.
    pub ready: i32,
    /// Pods of the current template.
    pub updated: i32,
    /// Whether the controller has seen the workload's latest spec.
    pub observed: bool,
}

impl Rollout {
    /// The rollout a Deployment reports.
    pub fn of_deployment(d: &Deployment) -> Self {
        let s = d.status.clone().unwrap_or_default();
        Self {
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            replicas: s.replicas.unwrap_or(0),
            ready: s.ready_replicas.unwrap_or(0),
            updated: s.updated_replicas.unwrap_or(0),
            observed: s.observed_generation >= d.metadata.generation,
        }
    }

    /// The rollout a StatefulSet reports.
    pub fn of_statefulset(d: &StatefulSet) -> Self {
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

/// What the controller read from the cluster, so the status is a pure
/// function of it.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub comet: Rollout,
    pub message: Rollout,
    pub web: Rollout,
    /// Holder pod per shard row (shards `0..spec.comet.shards`).
    pub shards: Vec<ShardStatus>,
    /// Comet pods of the current generation (config hash and image).
    pub current_comets: BTreeSet<String>,
    /// What Redis said it looks like (Sentinel and Cluster modes), or why
    /// it could not be asked.
    pub redis: Option<Result<pushcluster_redis::Topology, String>>,
    /// Where each listener reaches web and the comets.
    pub listeners: Vec<crate::crd::ListenerEndpoints>,
    /// Pods of the cluster being deleted (still serving or calling others
    /// with the template they started from).
    pub terminating: usize,
}

/// The status of `pc` given what was observed: `Ready` only when every shard
/// is held by a comet of the current generation and message and web serve;
/// `Progressing` while anything is left to roll or reshard, saying what.
pub fn status_of(pc: &PushCluster, o: &Observed) -> PushClusterStatus {
    let want = pc.spec.comet.shards;
    let held = o.shards.iter().filter(|s| s.holder.is_some()).count() as i32;
    let shards_where = |f: &dyn Fn(&ShardStatus) -> bool| -> Vec<String> {
        o.shards
            .iter()
            .filter(|s| f(s))
            .map(|s| s.shard.to_string())
            .collect()
    };
    let stale = shards_where(&|s| {
        s.holder
            .as_ref()
            .is_some_and(|h| !o.current_comets.contains(h))
    });
    let free = shards_where(&|s| s.holder.is_none());
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
    // The internal RPC's next TLS step once every pod runs this one.
    let (rpc_now, rpc_target) = (rpc_tls::current(pc), rpc_tls::target(pc));
    let settled =
        o.comet.complete() && o.message.complete() && o.web.complete() && o.terminating == 0;
    let rpc_next = rpc_tls::step_toward(rpc_now, rpc_target, settled);
    if rpc_now != rpc_target {
        left.push(format!(
            "internal RPC TLS at step {}, on the way to {}",
            rpc_step_name(rpc_now),
            rpc_step_name(rpc_target)
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
    let (progress_reason, progress_msg) = if left.is_empty() {
        (
            Reason::Converged,
            "every workload rolled out, every shard held by a current comet".to_owned(),
        )
    } else {
        (Reason::RollingOut, format!("left: {}", left.join("; ")))
    };
    let conditions = vec![
        condition(
            prev,
            gen,
            ConditionType::Ready,
            ready,
            if ready {
                Reason::AllShardsServed
            } else {
                Reason::Waiting
            },
            ready_msg,
        ),
        condition(
            prev,
            gen,
            ConditionType::Progressing,
            !left.is_empty(),
            progress_reason,
            progress_msg,
        ),
        condition(
            prev,
            gen,
            ConditionType::Degraded,
            false,
            Reason::ReconcileSucceeded,
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
        endpoints: Some(crate::crd::EndpointsStatus {
            listeners: o.listeners.clone(),
            ..children::config::endpoints(pc)
        }),
        storage: children::config::redis_key_prefix(pc).map(|key_prefix| {
            let mut s = crate::crd::StorageStatus {
                key_prefix,
                ..Default::default()
            };
            match &o.redis {
                Some(Ok(pushcluster_redis::Topology::Sentinel { master })) => {
                    s.master = Some(master.clone());
                }
                Some(Ok(pushcluster_redis::Topology::Cluster { masters, answering })) => {
                    s.masters = Some(*masters);
                    s.masters_answering = Some(*answering);
                }
                Some(Err(why)) => s.problem = Some(why.clone()),
                Some(Ok(pushcluster_redis::Topology::Single)) | None => {}
            }
            s
        }),
        rpc_tls: rpc_next,
    }
}

/// A step's name as the status shows it (`Plaintext` when none).
pub fn rpc_step_name(step: Option<crate::crd::RpcTlsStep>) -> &'static str {
    use crate::crd::RpcTlsStep::*;
    match step {
        None => "Plaintext",
        Some(Accepting) => "Accepting",
        Some(Connecting) => "Connecting",
        Some(Required) => "Required",
    }
}

/// `status` with `Degraded` set to True for `reason`.
pub fn degraded(pc: &PushCluster, reason: Reason, message: &str) -> PushClusterStatus {
    let mut status = pc.status.clone().unwrap_or_default();
    status
        .conditions
        .retain(|c| c.type_ != ConditionType::Degraded.as_str());
    status.conditions.push(condition(
        pc.status.as_ref(),
        pc.metadata.generation,
        ConditionType::Degraded,
        true,
        reason,
        message.into(),
    ));
    status
}

/// `AuthEnabled`: whether the cluster asks for credentials, and where they are.
fn auth_condition(
    pc: &PushCluster,
    prev: Option<&PushClusterStatus>,
    gen: Option<i64>,
) -> Condition {
    // A Secret with the URL, or one with the password, is how a password
    // reaches Redis; without either, Redis asks for none.
    let redis_by_url = pc
        .spec
        .storage
        .redis
        .as_ref()
        .is_some_and(|r| r.secret_ref.is_none() && r.password_secret_ref.is_none());
    if secure(pc) && redis_by_url {
        // CEL keeps credentials out of `url` (it lands in a ConfigMap), so
        // a Redis given by URL is one that asks for no password: whoever
        // reaches it can read and write every stored message.
        condition(
            prev,
            gen,
            ConditionType::AuthEnabled,
            false,
            Reason::RedisWithoutPassword,
            format!(
                "storage.redis has no password: anyone who reaches Redis reads and writes the stored messages; name a Secret holding the password in storage.redis.passwordSecretRef (or, for one node, a URL with credentials in storage.redis.secretRef) (the admin API, private reads and internal gRPC need the credentials in Secret {})",
                credentials_name(pc)
            ),
        )
    } else if secure(pc) {
        condition(
            prev,
            gen,
            ConditionType::AuthEnabled,
            true,
            Reason::CredentialsRequired,
            format!(
                "the admin API, private reads and internal gRPC need the credentials in Secret {}",
                credentials_name(pc)
            ),
        )
    } else {
        condition(
            prev,
            gen,
            ConditionType::AuthEnabled,
            false,
            Reason::InsecureBySpec,
            "spec.auth.insecure: the admin API, private reads and internal gRPC answer anyone who reaches them".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            redis: None,
            listeners: Vec::new(),
            terminating: 0,
        }
    }

    #[test]
    fn the_storage_status_says_what_redis_looks_like() {
        let pc = |redis: serde_json::Value| -> PushCluster {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "pushcluster.io/v1alpha1",
                "kind": "PushCluster",
                "metadata": {"name": "c", "namespace": "n"},
                "spec": {"storage": {"redis": redis}}
            }))
            .expect("pushcluster")
        };
        let cluster = pc(serde_json::json!({"mode": "Cluster", "cluster": {"nodes": ["r:6379"]}}));
        let mut o = observed(&[Some("a")], &["a"]);
        o.redis = Some(Ok(pushcluster_redis::Topology::Cluster {
            masters: 3,
            answering: 2,
        }));
        let s = status_of(&cluster, &o).storage.expect("storage status");
        assert_eq!(
            (s.masters, s.masters_answering, s.master),
            (Some(3), Some(2), None)
        );
        let sentinel = pc(
            serde_json::json!({"mode": "Sentinel", "sentinel": {"masterName": "m", "addresses": ["s:26379"]}}),
        );
        o.redis = Some(Ok(pushcluster_redis::Topology::Sentinel {
            master: "10.0.0.7:6379".into(),
        }));
        let s = status_of(&sentinel, &o).storage.expect("storage status");
        assert_eq!(s.master.as_deref(), Some("10.0.0.7:6379"));
        o.redis = Some(Err("no answer within 2s".into()));
        let s = status_of(&sentinel, &o).storage.expect("storage status");
        assert_eq!(
            (s.master, s.problem.as_deref()),
            (None, Some("no answer within 2s"))
        );
    }

    #[test]
    fn the_rpc_tls_steps_advance_only_when_every_pod_runs_the_last_one() {
        use crate::crd::RpcTlsStep::{Accepting, Connecting, Required};
        let mut pc: PushCluster = serde_json::from_value(
            json!({"metadata": {"name": "push", "generation": 4}, "spec": {}}),
        )
        .unwrap();
        let settled = observed(&[Some("a")], &["a"]);
        assert_eq!(
            status_of(&pc, &settled).rpc_tls,
            Some(Required),
            "a new cluster"
        );
        // A cluster from before TLS: plaintext, then one step per settled look.
        pc.status = Some(PushClusterStatus {
            observed_generation: Some(3),
            ..Default::default()
        });
        let s = status_of(&pc, &settled);
        assert_eq!(s.rpc_tls, Some(Accepting));
        let p = cond(&s, ConditionType::Progressing);
        assert_eq!(p.status, "True");
        assert!(
            p.message
                .contains("internal RPC TLS at step Plaintext, on the way to Required"),
            "{}",
            p.message
        );
        pc.status = Some(s);
        let mut rolling = settled.clone();
        rolling.web.updated = 1;
        assert_eq!(
            status_of(&pc, &rolling).rpc_tls,
            Some(Accepting),
            "web still rolling"
        );
        let mut draining = settled.clone();
        draining.terminating = 1;
        assert_eq!(
            status_of(&pc, &draining).rpc_tls,
            Some(Accepting),
            "an old pod still terminating"
        );
        let s = status_of(&pc, &settled);
        assert_eq!(s.rpc_tls, Some(Connecting));
        pc.status = Some(s);
        let s = status_of(&pc, &settled);
        assert_eq!(s.rpc_tls, Some(Required));
        pc.status = Some(s);
        let s = status_of(&pc, &settled);
        assert_eq!(s.rpc_tls, Some(Required));
        assert_eq!(cond(&s, ConditionType::Progressing).status, "False");
        // Asked for plaintext: the same steps back, the last one written
        // as null (a merge patch that left it out would keep the old step).
        pc.spec.auth.plaintext_rpc = true;
        for want in [Some(Connecting), Some(Accepting), None] {
            let s = status_of(&pc, &settled);
            assert_eq!(s.rpc_tls, want);
            pc.status = Some(s);
        }
        let written = serde_json::to_value(pc.status.as_ref().unwrap()).unwrap();
        assert_eq!(written["rpcTls"], serde_json::Value::Null);
        assert!(written.as_object().unwrap().contains_key("rpcTls"));
    }

    fn cond(s: &PushClusterStatus, type_: ConditionType) -> &Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_.as_str())
            .unwrap()
    }

    #[test]
    fn ready_only_when_current_comets_hold_every_shard() {
        use ConditionType::{Progressing, Ready};
        let pc: PushCluster = serde_json::from_value(
            json!({"metadata": {"name": "push", "generation": 4}, "spec": {}}),
        )
        .unwrap();
        let s = status_of(&pc, &observed(&[Some("a"), Some("b")], &["a", "b", "c"]));
        assert_eq!(cond(&s, Ready).status, "True");
        assert_eq!(cond(&s, Progressing).status, "False");
        assert_eq!((s.ready_shards, s.observed_generation), (2, Some(4)));

        // Mid-rollout: shard 1 still held by a comet of the old template.
        let s = status_of(&pc, &observed(&[Some("a"), Some("old")], &["a", "c"]));
        assert_eq!(cond(&s, Ready).status, "False");
        let p = cond(&s, Progressing);
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
        assert_eq!(cond(&s, Ready).status, "False");
        let p = &cond(&s, Progressing).message;
        assert!(
            p.contains("shards 1 not held") && p.contains("comet 1/3 updated"),
            "{p}"
        );
    }

    #[test]
    fn degraded_replaces_only_its_own_condition() {
        let mut pc: PushCluster = serde_json::from_value(
            json!({"metadata": {"name": "push", "generation": 2}, "spec": {}}),
        )
        .unwrap();
        pc.status = Some(status_of(&pc, &observed(&[Some("a")], &["a"])));
        let s = degraded(&pc, Reason::ApplyFailed, "applying x: refused");
        let d = cond(&s, ConditionType::Degraded);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "ApplyFailed")
        );
        assert_eq!(s.conditions.len(), 4, "{:?}", s.conditions);
        assert!(is_true(&s, ConditionType::AuthEnabled));
    }

    #[test]
    fn a_redis_without_password_is_not_called_secure() {
        let with = |redis: serde_json::Value| -> PushCluster {
            serde_json::from_value(json!({
                "metadata": {"name": "push", "namespace": "team-a", "generation": 1},
                "spec": {"storage": {"redis": redis}}
            }))
            .unwrap()
        };
        let by_url = with(json!({"url": "redis://redis:6379/0"}));
        let s = status_of(&by_url, &observed(&[Some("a")], &["a"]));
        let a = cond(&s, ConditionType::AuthEnabled);
        assert_eq!(
            (a.status.as_str(), a.reason.as_str()),
            ("False", "RedisWithoutPassword")
        );
        assert!(a.message.contains("secretRef"), "{}", a.message);
        let by_secret = with(json!({"secretRef": {"name": "r", "key": "url"}}));
        let s = status_of(&by_secret, &observed(&[Some("a")], &["a"]));
        assert!(is_true(&s, ConditionType::AuthEnabled));
        assert_eq!(
            s.storage.map(|st| st.key_prefix).as_deref(),
            Some("pc:team-a:push"),
            "the prefix in use is recorded"
        );
    }
}
