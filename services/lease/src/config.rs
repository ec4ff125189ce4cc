//! The membership setting shared by comets and web, and the one constructor
//! that turns it into what they route by (and, for a comet, the shard it
//! serves).
//!
//! The setting is a tagged enum: each kind carries exactly what it needs, so
//! the shard count is written once and a missing setting is a parse error.

use crate::kubernetes::{push_cluster_owner, KubeLeases};
use crate::membership::{LeaseMembership, MembershipMetrics};
use crate::owner::{Ownership, ShardOwner};
use crate::{Candidate, Error, LeaseTiming, Result};
use prometheus_client::registry::Registry;
use pushcluster_core::membership::{Membership, ShardEndpoint, StaticMembership};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How a service learns who serves which shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MembershipConfig {
    /// Fixed by configuration, no failover: each comet serves its `shard`,
    /// web routes by its `comets` list.
    Static {
        /// Number of shards (comets; web counts its `comets` list).
        #[serde(default = "one")]
        shards: u32,
    },
    /// Shard leases in Redis: failover for a cluster of plain processes.
    Redis {
        /// Redis holding the leases.
        redis_url: String,
        /// Prefix of the lease keys, so clusters can share one Redis.
        #[serde(default = "default_prefix")]
        namespace: String,
        /// Number of shards.
        shards: u32,
        /// Lease timing.
        #[serde(default)]
        lease: LeaseTiming,
    },
    /// Kubernetes Leases `<cluster>-comet-<k>` and EndpointSlices; the shard
    /// count follows the shard Leases the operator keeps, so a reshard
    /// restarts nothing.
    Kubernetes {
        /// Name of the PushCluster.
        cluster: String,
        /// Namespace; default `POD_NAMESPACE`, then the client's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kube_namespace: Option<String>,
        /// UID of the PushCluster: shard Leases a comet creates are owned
        /// by it, so they go when it is deleted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster_uid: Option<String>,
        /// Lease timing.
        #[serde(default)]
        lease: LeaseTiming,
        /// Further per-shard Services (the PushCluster's listeners): the
        /// holder of shard k also writes its address into the EndpointSlice
        /// `<name>-<k>` of each, so they follow it with no operator running.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        shard_services: Vec<String>,
    },
}

fn one() -> u32 {
    1
}

fn default_prefix() -> String {
    "pc".into()
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig::Static { shards: 1 }
    }
}

/// Who starts the membership.
#[derive(Debug, Clone)]
pub enum Role {
    /// Web: follows who serves which shard; `comets` is the static list.
    Router { comets: Vec<ShardEndpoint> },
    /// A comet: also holds a shard. `shard` is the one it serves (static)
    /// or tries first (Redis leases); `me` is stored with its lease;
    /// `witness` is the store it writes to ([`crate::owner::Witness`]).
    Comet {
        shard: u32,
        me: Candidate,
        witness: Option<Arc<dyn crate::owner::Witness>>,
    },
}

/// What a started membership gives its service.
pub struct Started {
    /// Who serves which shard, for the ring.
    pub membership: Arc<dyn Membership>,
    /// The shard this process serves (always `Standby` for a router).
    pub ownership: watch::Receiver<Ownership>,
    /// The task holding the shard lease; it releases the lease when the
    /// `owner_cancel` given to [`MembershipConfig::start`] fires. None
    /// without leases.
    pub owner: Option<JoinHandle<()>>,
    /// The sender of a fixed ownership (static, or a router's standby):
    /// keep it while the service runs, since dropping it ends every watch
    /// of `ownership`.
    pub fixed_ownership: Option<watch::Sender<Ownership>>,
}

impl MembershipConfig {
    /// Sets the shard count (static and Redis; on Kubernetes the shard
    /// Leases say, so it is ignored there).
    pub fn set_shards(&mut self, n: u32) {
        if let MembershipConfig::Static { shards } | MembershipConfig::Redis { shards, .. } = self {
            *shards = n;
        }
    }

    /// The configured shard count (none on Kubernetes: the Leases say).
    pub fn shards(&self) -> Option<u32> {
        match self {
            MembershipConfig::Static { shards } | MembershipConfig::Redis { shards, .. } => {
                Some(*shards)
            }
            MembershipConfig::Kubernetes { .. } => None,
        }
    }

    /// Lease timing (the default for static membership).
    pub fn lease(&self) -> LeaseTiming {
        match self {
            MembershipConfig::Static { .. } => LeaseTiming::default(),
            MembershipConfig::Redis { lease, .. } | MembershipConfig::Kubernetes { lease, .. } => {
                *lease
            }
        }
    }

    /// How long a shard whose holder vanished can stay without a new one:
    /// a lease duration (the standby takes it as it expires) plus a retry
    /// period to see it. `None` with static membership, where no holder is
    /// ever replaced.
    pub fn handover_within(&self) -> Option<std::time::Duration> {
        match self {
            MembershipConfig::Static { .. } => None,
            MembershipConfig::Redis { lease, .. } | MembershipConfig::Kubernetes { lease, .. } => {
                Some(lease.duration() + lease.retry_period())
            }
        }
    }

    /// Checks what parsing cannot: the lease timing's order and a comet's
    /// shard below the shard count.
    pub fn validate(&self, role: &Role) -> Result<()> {
        if !matches!(self, MembershipConfig::Static { .. }) {
            self.lease().validate()?;
        }
        if let (Some(shards), Role::Comet { shard, .. }) = (self.shards(), role) {
            if *shard >= shards.max(1) {
                return Err(Error::ShardOutOfRange {
                    shard: *shard,
                    shards,
                });
            }
        }
        Ok(())
    }

    /// Starts following membership (and, for a comet, competing for a shard
    /// lease). Watches stop on `background`; the lease is released on
    /// `owner_cancel`, which a draining comet fires first.
    pub async fn start(
        &self,
        role: Role,
        background: &CancellationToken,
        owner_cancel: &CancellationToken,
        reg: &mut Registry,
    ) -> Result<Started> {
        self.validate(&role)?;
        match self {
            MembershipConfig::Static { shards } => Ok(start_static(*shards, role)),
            MembershipConfig::Redis {
                redis_url,
                namespace,
                shards,
                lease,
            } => {
                let backend =
                    Arc::new(crate::redis::RedisLeases::connect(redis_url, namespace).await?);
                let membership = LeaseMembership::start(
                    backend.clone(),
                    *shards,
                    lease.retry_period(),
                    background.clone(),
                    MembershipMetrics::register(reg),
                );
                let started = match role {
                    Role::Router { .. } => router(Arc::new(membership)),
                    Role::Comet { shard, me, witness } => {
                        tracing::info!(holder = %me.holder, "standby: waiting for a shard lease");
                        let (owner, rx) =
                            ShardOwner::new(backend, me, *shards, Some(shard), *lease);
                        let owner = owner.with_witness(witness);
                        Started {
                            membership: Arc::new(membership),
                            ownership: rx,
                            owner: Some(tokio::spawn(owner.run(owner_cancel.clone()))),
                            fixed_ownership: None,
                        }
                    }
                };
                Ok(started)
            }
            MembershipConfig::Kubernetes {
                cluster,
                kube_namespace,
                cluster_uid,
                lease,
                shard_services,
            } => {
                let client = kube::Client::try_default().await?;
                let ns = kube_namespace
                    .clone()
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| client.default_namespace().to_owned());
                // Same ring in web and comets: Lease holders at their
                // addresses in the comets Service's EndpointSlices.
                let membership = crate::endpoints::EndpointSliceMembership::start(
                    client.clone(),
                    &ns,
                    cluster,
                    background.clone(),
                );
                let Role::Comet {
                    mut me, witness, ..
                } = role
                else {
                    return Ok(router(Arc::new(membership)));
                };
                let leases = Arc::new(
                    KubeLeases::new(kube::Api::namespaced(client.clone(), &ns), cluster).owned_by(
                        cluster_uid
                            .as_deref()
                            .map(|uid| push_cluster_owner(cluster, uid)),
                    ),
                );
                leases.spawn_watcher(background.clone());
                if let Ok(pod) = std::env::var("POD_NAME") {
                    // The lease holder is the pod: EndpointSlices name it.
                    me.holder = pod;
                } else {
                    tracing::warn!(
                        "POD_NAME is not set: web cannot find this comet's address from its Lease"
                    );
                }
                tracing::info!(holder = %me.holder, namespace = %ns, "standby: waiting for a shard Lease");
                // This pod patches no pod: its shard's Lease and, once it
                // holds that, the shard's EndpointSlice are all it writes.
                let pod = me.holder.clone();
                let (owner, rx) =
                    ShardOwner::following(leases, me, membership.shard_count(), None, *lease);
                let owner = owner.with_witness(witness);
                match std::env::var("POD_IP") {
                    Ok(ip) if !ip.is_empty() => {
                        let slices = crate::shard_slice::ShardSlices::new(
                            kube::Api::namespaced(client.clone(), &ns),
                            &ns,
                            cluster,
                            crate::shard_slice::Me { pod, ip },
                        )
                        .with_services(shard_services);
                        tokio::spawn(slices.run(
                            rx.clone(),
                            lease.retry_period(),
                            background.clone(),
                        ));
                    }
                    _ => tracing::warn!(
                        "POD_IP is not set: the shard's Service will not follow this comet"
                    ),
                }
                Ok(Started {
                    membership: Arc::new(membership),
                    ownership: rx,
                    owner: Some(tokio::spawn(owner.run(owner_cancel.clone()))),
                    fixed_ownership: None,
                })
            }
        }
    }
}

fn router(membership: Arc<dyn Membership>) -> Started {
    let (fixed, ownership) = watch::channel(Ownership::Standby);
    Started {
        membership,
        ownership,
        owner: None,
        fixed_ownership: Some(fixed),
    }
}

/// Static membership: web's list of comets, or shards `0..shards` all
/// present for a comet, which serves its own shard for good.
fn start_static(shards: u32, role: Role) -> Started {
    match role {
        Role::Router { comets } => router(Arc::new(StaticMembership::new(comets))),
        Role::Comet { shard, .. } => {
            let all = (0..shards.max(1))
                .map(|shard| ShardEndpoint {
                    shard,
                    rpc: String::new(),
                    ws: String::new(),
                    tcp: String::new(),
                })
                .collect();
            let (fixed, ownership) = watch::channel(Ownership::Serving { shard, token: 0 });
            Started {
                membership: Arc::new(StaticMembership::new(all)),
                ownership,
                owner: None,
                fixed_ownership: Some(fixed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<MembershipConfig, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn each_kind_names_what_it_needs() {
        assert_eq!(
            parse("kind: static").unwrap(),
            MembershipConfig::Static { shards: 1 }
        );
        let r = parse("{kind: redis, redis_url: 'redis://h', shards: 4}").unwrap();
        assert_eq!(r.shards(), Some(4));
        assert_eq!(r.lease(), LeaseTiming::default());
        let k = parse("{kind: kubernetes, cluster: push}").unwrap();
        assert_eq!(k.shards(), None, "the shard Leases say");
        // A missing setting or a misspelled one is a parse error.
        let e = parse("{kind: redis, shards: 4}").unwrap_err().to_string();
        assert!(e.contains("redis_url"), "{e}");
        let e = parse("{kind: redis, redis_url: x}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shards"), "{e}");
        assert!(parse("{kind: static, shard: 2}").is_err());
        assert!(parse("{kind: zookeeper}").is_err());
    }

    #[test]
    fn a_comet_shard_must_exist() {
        let me = Candidate {
            holder: "c".into(),
            rpc: String::new(),
            ws: String::new(),
            tcp: String::new(),
        };
        let cfg = MembershipConfig::Static { shards: 2 };
        assert!(cfg
            .validate(&Role::Comet {
                shard: 1,
                me: me.clone(),
                witness: None,
            })
            .is_ok());
        assert!(matches!(
            cfg.validate(&Role::Comet {
                shard: 2,
                me,
                witness: None
            }),
            Err(Error::ShardOutOfRange {
                shard: 2,
                shards: 2
            })
        ));
        let bad = MembershipConfig::Redis {
            redis_url: "redis://h".into(),
            namespace: "pc".into(),
            shards: 1,
            lease: LeaseTiming {
                duration_ms: 1000,
                renew_deadline_ms: 2000,
                retry_period_ms: 100,
            },
        };
        assert!(matches!(
            bad.validate(&Role::Router { comets: vec![] }),
            Err(Error::Timing(_))
        ));
    }
}
