//! Shard ownership through leases: this replaces gopush-cluster's ZooKeeper.
//!
//! Each shard has one lease. A comet holds at most one; a comet without one is
//! a standby that takes any free or expired lease as soon as it sees one
//! ([`owner::ShardOwner`]). The holder renews every retry period and steps
//! down at once when it cannot renew before its renew deadline, which is
//! shorter than the lease duration: it stops serving before anyone else can
//! see the lease expire, so two comets never serve one shard.
//!
//! Backends implement [`LeaseBackend`]: [`redis::RedisLeases`] (a cluster of
//! plain processes; `SET NX PX` plus a fencing token, the holder's addresses
//! stored with the lease) and [`memory::MemoryLeases`] (unit tests, on tokio's
//! clock, which tests pause and advance). [`membership::LeaseMembership`]
//! turns the leases into the [`pushcluster_core::membership::Membership`]
//! that web and comets route by.

pub mod config;
pub mod endpoints;
pub mod kubernetes;
pub mod membership;
pub mod memory;
pub mod owner;
pub mod redis;
pub mod shard_slice;

pub use config::{MembershipConfig, Role, Started};
use pushcluster_core::membership::ShardEndpoint;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;

/// Timing of leases; `renew_deadline < duration` and `retry_period < renew_deadline`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct LeaseTiming {
    /// How long a lease lasts without renewal, in ms.
    pub duration_ms: u64,
    /// A holder that has not renewed for this long steps down, in ms.
    pub renew_deadline_ms: u64,
    /// How often a holder renews and a standby looks for free leases, in ms.
    pub retry_period_ms: u64,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration_ms: 6000,
            renew_deadline_ms: 4000,
            retry_period_ms: 1000,
        }
    }
}

impl LeaseTiming {
    /// Checks the ordering the safety argument needs.
    pub fn validate(&self) -> Result<(), Error> {
        if self.retry_period_ms == 0
            || self.retry_period_ms >= self.renew_deadline_ms
            || self.renew_deadline_ms >= self.duration_ms
        {
            return Err(Error::Timing(*self));
        }
        Ok(())
    }
    /// Lease duration.
    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.duration_ms)
    }
    /// Renew deadline.
    pub fn renew_deadline(&self) -> Duration {
        Duration::from_millis(self.renew_deadline_ms)
    }
    /// Retry period.
    pub fn retry_period(&self) -> Duration {
        Duration::from_millis(self.retry_period_ms)
    }
}

/// Who is asking for a lease, and where it can be reached once it holds one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Unique name of the process (pod name, or host-pid).
    pub holder: String,
    /// gRPC URL of the comet.
    pub rpc: String,
    /// WebSocket/SSE address for clients.
    pub ws: String,
    /// TCP address for clients.
    pub tcp: String,
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The shard.
    pub shard: u32,
    /// Fencing token: grows with every acquisition of this shard.
    pub token: u64,
    /// The holder and its addresses.
    pub candidate: Candidate,
}

impl LeaseRecord {
    /// The shard's endpoint for routing.
    pub fn endpoint(&self) -> ShardEndpoint {
        ShardEndpoint {
            shard: self.shard,
            rpc: self.candidate.rpc.clone(),
            ws: self.candidate.ws.clone(),
            tcp: self.candidate.tcp.clone(),
        }
    }
}

/// A lease this process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The record as acquired.
    pub record: LeaseRecord,
    /// The backend's stored form, compared on renew and release.
    pub raw: String,
}

/// Lease failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("redis: {0}")]
    RedisTarget(#[from] pushcluster_redis::Error),
    #[error("kubernetes: {0}")]
    Kube(#[source] Box<kube::Error>),
    #[error("lease record is corrupt: {0}")]
    Corrupt(String),
    #[error("lease timing must satisfy retry_period < renew_deadline < duration: {0:?}")]
    Timing(LeaseTiming),
    #[error("shard {shard} is not below shards {shards}")]
    ShardOutOfRange { shard: u32, shards: u32 },
}

/// Result of lease operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Storage of shard leases.
pub trait LeaseBackend: Send + Sync + 'static {
    /// Takes `shard`'s lease for `ttl` if nobody holds it; `None` if somebody does.
    fn try_acquire(
        &self,
        shard: u32,
        me: &Candidate,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Held>>> + Send;
    /// Extends a held lease by `ttl`; `false` when it is no longer ours.
    fn renew(&self, held: &Held, ttl: Duration) -> impl Future<Output = Result<bool>> + Send;
    /// Gives a held lease up at once.
    fn release(&self, held: &Held) -> impl Future<Output = Result<()>> + Send;
    /// The current holder of each shard `0..shards` (`None`: free).
    fn snapshot(
        &self,
        shards: u32,
    ) -> impl Future<Output = Result<Vec<Option<LeaseRecord>>>> + Send;
    /// A counter bumped whenever leases may have changed (released, taken;
    /// may be spurious). Mark it seen before reading leases, then wait for
    /// its change: an event between the read and the wait is not missed
    /// (it was, with a plain notification: graceful takeovers then waited a
    /// whole retry period).
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// When the first lease seen held in the last [`LeaseBackend::snapshot`]
    /// expires, as this process judges it; `None` when no lease is held or
    /// the backend cannot tell. A standby tries then, not at its next retry
    /// period: a crashed holder's shard is taken as soon as it may be.
    fn next_expiry(&self) -> Option<tokio::time::Instant> {
        None
    }
}

/// Where a backend announces lease events (see [`LeaseBackend::changes`]).
#[derive(Debug, Clone)]
pub struct LeaseEvents(std::sync::Arc<tokio::sync::watch::Sender<u64>>);

impl Default for LeaseEvents {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl LeaseEvents {
    /// Announces that leases may have changed.
    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
    /// A receiver of the announcements.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}
