//! How pushcluster reaches Redis, whichever way it is deployed.
//!
//! A [`Target`] is parsed from one URL, so every place that took a
//! `redis://` URL before (config files, `PUSH_REDIS_URL`, flags) takes the
//! other modes too:
//!
//! - `redis://[user:password@]host:port[/db]` (or `unix://`): one node.
//! - `redis+sentinel://[user:password@]sentinel1:26379,sentinel2:26379/<master>[/db]`:
//!   the master that the Sentinels name. The credentials are the data
//!   nodes' (Sentinels are asked without them). A write that finds a
//!   replica (`READONLY`) or no answer asks the Sentinels again, so a
//!   failover costs the pushes in flight, not a restart; and the
//!   Sentinels' `+switch-master` moves writes and subscriptions to the new
//!   master at once, even off an old master that is still up.
//! - `redis+cluster://[user:password@]node1:6379,node2:6379`: a Redis
//!   Cluster, reached through any of its seed nodes; the client follows
//!   `MOVED`/`ASK` and failovers.
//!
//! Each scheme with `rediss` in place of `redis` (`rediss://`,
//! `rediss+sentinel://`, `rediss+cluster://`) connects over TLS, to
//! Sentinels and data nodes alike, verifying each server's certificate and
//! name against the system's roots or the CAs of [`TlsSettings`], showing
//! its client certificate to a Redis that asks for one.
//!
//! [`Conn`] is one handle over all three that scripts and pipelines run
//! on, and [`Durability`] how long an acknowledged write waits for
//! replicas (`WAIT`).

mod cluster;
mod sentinel;
mod subscriber;
mod target;
mod tls;

pub use subscriber::{Event, Subscriber, SubscriberHandle};
pub use target::{Target, Topology};
pub use tls::TlsSettings;

use cluster::LazyCluster;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, RedisError, RedisFuture, RedisResult, Value};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How long a connection to one node may take to open.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command may take before it counts as failed (a stopped or
/// partitioned node). Generous: a fetch script over a long backlog.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a Redis target or call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("Redis TLS file {path}: {why}")]
    TlsFile { path: String, why: String },
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("stored on the master, but its replication could not be confirmed: {0}")]
    Unconfirmed(#[source] RedisError),
    #[error("stored on the master, but only {confirmed} of {wanted} replicas confirmed it within {timeout:?}")]
    NotReplicated {
        wanted: u32,
        confirmed: i64,
        timeout: Duration,
    },
}

/// Which way Redis is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One node (perhaps with replicas that nobody promotes).
    Single,
    /// A master and replicas watched by Sentinels, which promote a replica
    /// when the master fails.
    Sentinel,
    /// A Redis Cluster: slots spread over masters, each with replicas.
    Cluster,
}

pub(crate) fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// What an acknowledged write waits for before it is acknowledged.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct Durability {
    /// Replicas that must confirm a write (`WAIT`) before it counts as
    /// stored; 0: the master's answer is enough (a failover may lose the
    /// writes of the last moments before it).
    pub replicas: u32,
    /// How long to wait for them; a write they do not all confirm in time
    /// fails (it is on the master, and a retry with its push id is not
    /// stored twice).
    pub timeout_ms: u64,
}

impl Durability {
    /// Whether these are the default settings (configs leave them out).
    pub fn is_master_only(&self) -> bool {
        *self == Self::default()
    }

    /// Whether writes wait for replicas (`WAIT`) before they count.
    pub fn waits(&self) -> bool {
        self.replicas > 0
    }
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            replicas: 0,
            timeout_ms: 1000,
        }
    }
}

/// A handle on Redis in any mode; clones share the connections.
#[derive(Clone)]
pub struct Conn {
    pub(crate) inner: Inner,
}

#[derive(Clone)]
pub(crate) enum Inner {
    Node(ConnectionManager),
    Sentinel(Arc<sentinel::Follower>),
    Cluster(Arc<LazyCluster>),
}

impl Conn {
    async fn open(&self) -> RedisResult<()> {
        match &self.inner {
            Inner::Node(c) => {
                let mut c = c.clone();
                redis::cmd("PING").query_async::<()>(&mut c).await
            }
            Inner::Sentinel(f) => f.conn().await.map(|_| ()),
            Inner::Cluster(c) => c.get().await.map(|_| ()),
        }
    }

    /// Which way the Redis behind it is deployed.
    pub fn mode(&self) -> Mode {
        match self.inner {
            Inner::Node(_) => Mode::Single,
            Inner::Sentinel(_) => Mode::Sentinel,
            Inner::Cluster(_) => Mode::Cluster,
        }
    }

    /// The master the Sentinels named last (`host:port`); `None` in other
    /// modes or before the first call.
    pub fn sentinel_master(&self) -> Option<String> {
        match &self.inner {
            Inner::Sentinel(f) => f.master(),
            _ => None,
        }
    }

    /// Runs each part's commands (all on keys of the part's `key`'s slot)
    /// and returns every command's reply in order: one pipeline on a node,
    /// one per slot on a Redis Cluster (where a pipeline cannot cross
    /// slots), all in flight at once.
    pub async fn query_parts<T: redis::FromRedisValue>(
        &self,
        parts: &[(String, Vec<Cmd>)],
    ) -> RedisResult<Vec<T>> {
        let groups: Vec<Vec<usize>> = if self.mode() == Mode::Cluster {
            by_slot(0..parts.len(), |&i| slot(parts[i].0.as_bytes()))
        } else {
            vec![(0..parts.len()).collect()]
        };
        let calls = groups.iter().map(|group| {
            let mut pipe = redis::pipe();
            for &i in group {
                for c in &parts[i].1 {
                    pipe.add_command(c.clone());
                }
            }
            let mut conn = self.clone();
            async move { pipe.query_async::<Vec<T>>(&mut conn).await }
        });
        let replies = futures::future::try_join_all(calls).await?;
        let mut slots: Vec<Option<Vec<T>>> = parts.iter().map(|_| None).collect();
        for (group, replies) in groups.iter().zip(replies) {
            let mut replies = replies.into_iter();
            for &i in group {
                slots[i] = Some(replies.by_ref().take(parts[i].1.len()).collect());
            }
        }
        Ok(slots.into_iter().flatten().flatten().collect())
    }

    /// Runs `write` (commands on `key`'s slot) and, when `durability`
    /// waits, `WAIT` right after it in the same pipeline; returns `write`'s
    /// replies once `durability.replicas` replicas confirmed it.
    ///
    /// One pipeline, because `WAIT` counts only the writes of the
    /// connection it is sent on: a separate call may go out on another
    /// connection (a reconnect, a slot-map refresh) where it has nothing to
    /// wait for and confirms at once what no replica has.
    pub async fn write_confirmed(
        &self,
        key: &str,
        write: Vec<Cmd>,
        durability: &Durability,
    ) -> Result<Vec<Value>, Error> {
        let mut pipe = redis::pipe();
        for c in write {
            pipe.add_command(c);
        }
        let waits = durability.waits();
        if waits {
            pipe.cmd("WAIT")
                .arg(durability.replicas)
                .arg(durability.timeout_ms);
        }
        let count = pipe.len();
        let mut replies: Vec<Value> = match &self.inner {
            Inner::Cluster(c) => {
                let (generation, mut conn) = c.current().await?;
                let at =
                    SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
                match conn.route_pipeline(pipe, 0, count, at).await {
                    Ok(v) => {
                        let moved = v.iter().any(|r| {
                            matches!(r, Value::ServerError(e) if matches!(e.code(), "MOVED" | "ASK"))
                        });
                        if moved {
                            c.stale(generation).await;
                        }
                        v
                    }
                    Err(e) => {
                        if matches!(e.code(), Some("MOVED" | "ASK")) {
                            c.stale(generation).await;
                        } else {
                            c.failed(generation, &e).await;
                        }
                        return Err(e.into());
                    }
                }
            }
            _ => {
                let mut conn = self.clone();
                conn.req_packed_commands(&pipe, 0, count).await?
            }
        };
        let asked = if waits { replies.pop() } else { None };
        // The write's own error says more than WAIT's.
        for r in &replies {
            if let Value::ServerError(e) = r {
                return Err(RedisError::from(e.clone()).into());
            }
        }
        if waits {
            // Whatever went wrong (the node failed over under the write,
            // say), the write is not known to be replicated: not
            // acknowledged, and retried under its push id.
            let confirmed: i64 = match asked.map(Value::extract_error) {
                Some(Ok(v)) => redis::from_redis_value(v)
                    .map_err(|e| Error::Unconfirmed(RedisError::from(e)))?,
                Some(Err(e)) => return Err(Error::Unconfirmed(e)),
                None => {
                    return Err(Error::Unconfirmed(RedisError::from((
                        redis::ErrorKind::Client,
                        "no reply to WAIT",
                    ))))
                }
            };
            if confirmed < i64::from(durability.replicas) {
                return Err(Error::NotReplicated {
                    wanted: durability.replicas,
                    confirmed,
                    timeout: Duration::from_millis(durability.timeout_ms),
                });
            }
        }
        Ok(replies)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.inner {
            Inner::Node(c) => c.req_packed_command(cmd),
            Inner::Sentinel(f) => {
                let f = f.clone();
                Box::pin(async move { f.command(cmd).await })
            }
            Inner::Cluster(c) => {
                let c = c.clone();
                Box::pin(async move { c.command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.inner {
            Inner::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Sentinel(f) => {
                let f = f.clone();
                Box::pin(async move { f.commands(pipeline, offset, count).await })
            }
            Inner::Cluster(c) => {
                let c = c.clone();
                Box::pin(async move { c.commands(pipeline, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Node(c) => c.get_db(),
            Inner::Sentinel(f) => f.db(),
            Inner::Cluster(_) => 0,
        }
    }
}

/// `items` grouped by their hash slot (`slot_of`), in slot order: one
/// pipeline, or one `SSUBSCRIBE`, may reach one slot only.
pub(crate) fn by_slot<T>(
    items: impl IntoIterator<Item = T>,
    slot_of: impl Fn(&T) -> u16,
) -> Vec<Vec<T>> {
    let mut groups: std::collections::BTreeMap<u16, Vec<T>> = Default::default();
    for item in items {
        groups.entry(slot_of(&item)).or_default().push(item);
    }
    groups.into_values().collect()
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag
/// (the part between the first `{` and the next `}`, when not empty) or
/// of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Whether `e` says the node a connection reaches no longer takes writes
/// or answers: the moment to ask the Sentinels again.
pub(crate) fn lost_master(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        // CRC16/XMODEM check value.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"pc:k:{alice}:lv"), slot(b"alice"));
    }
}
