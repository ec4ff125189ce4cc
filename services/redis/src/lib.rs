//! How pushcluster reaches Redis, whichever way it is deployed.
//!
//! A [`Target`] is parsed from one URL, so every place that took a
//! `redis://` URL before (config files, `PUSH_REDIS_URL`, flags) takes the
//! other modes too:
//!
//! - `redis://[user:password@]host:port[/db]` (or `rediss://`, `unix://`):
//!   one node.
//! - `redis+sentinel://[user:password@]sentinel1:26379,sentinel2:26379/<master>[/db]`:
//!   the master that the Sentinels name. The credentials are the data
//!   nodes' (Sentinels are asked without them). A write that finds a
//!   replica (`READONLY`) or no answer asks the Sentinels again, so a
//!   failover costs the pushes in flight, not a restart.
//! - `redis+cluster://[user:password@]node1:6379,node2:6379`: a Redis
//!   Cluster, reached through any of its seed nodes; the client follows
//!   `MOVED`/`ASK` and failovers.
//!
//! [`Conn`] is one handle over all three that scripts and pipelines run
//! on, and [`Durability`] how long an acknowledged write waits for
//! replicas (`WAIT`).

mod sentinel;
mod subscriber;

pub use subscriber::{Event, Subscriber, SubscriberHandle};

use pushcluster_core::ops::redact_url as redact;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, RedisError, RedisFuture, RedisResult, Value};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How long a connection to one node may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command may take before it counts as failed (a stopped or
/// partitioned node). Generous: a fetch script over a long backlog.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a Redis target or call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis URL {url:?}: {why}")]
    Url { url: String, why: String },
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

/// Where Redis is, parsed from a URL (see the crate docs).
#[derive(Clone)]
pub struct Target {
    kind: Kind,
    /// The URL without its password, for logs.
    redacted: String,
}

#[derive(Clone)]
enum Kind {
    Single(redis::Client),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        node: redis::RedisConnectionInfo,
    },
    Cluster {
        nodes: Vec<String>,
        username: Option<String>,
        password: Option<String>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Target").field(&self.redacted).finish()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

const SENTINEL: &str = "redis+sentinel://";
const CLUSTER: &str = "redis+cluster://";

impl Target {
    /// Parses a URL of any mode.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Url {
            url: redact(url),
            why: why.to_owned(),
        };
        if let Some(rest) = url.strip_prefix(SENTINEL) {
            let parts = Authority::split(rest, 26379).map_err(|w| bad(&w))?;
            let mut path = parts.path.split('/').filter(|p| !p.is_empty());
            let master = path
                .next()
                .ok_or_else(|| bad("name the master after the Sentinel addresses: /<master>"))?;
            let db = match path.next() {
                Some(d) => d
                    .parse()
                    .map_err(|_| bad("the database after the master must be a number"))?,
                None => 0,
            };
            if path.next().is_some() {
                return Err(bad(
                    "expected /<master>[/<db>] after the Sentinel addresses",
                ));
            }
            let mut node = redis::RedisConnectionInfo::default().set_db(db);
            if let Some(u) = &parts.username {
                node = node.set_username(u);
            }
            if let Some(p) = &parts.password {
                node = node.set_password(p);
            }
            Ok(Self {
                kind: Kind::Sentinel {
                    sentinels: parts.hosts,
                    master: master.to_owned(),
                    node,
                },
                redacted: redact(url),
            })
        } else if let Some(rest) = url.strip_prefix(CLUSTER) {
            let parts = Authority::split(rest, 6379).map_err(|w| bad(&w))?;
            if !parts.path.trim_matches('/').is_empty() && parts.path.trim_matches('/') != "0" {
                return Err(bad("a Redis Cluster has only database 0"));
            }
            Ok(Self {
                kind: Kind::Cluster {
                    nodes: parts.hosts,
                    username: parts.username,
                    password: parts.password,
                },
                redacted: redact(url),
            })
        } else {
            let client = redis::Client::open(url).map_err(|e| bad(&e.to_string()))?;
            Ok(Self {
                kind: Kind::Single(client),
                redacted: redact(url),
            })
        }
    }

    /// Which way this Redis is deployed.
    pub fn mode(&self) -> Mode {
        match self.kind {
            Kind::Single(_) => Mode::Single,
            Kind::Sentinel { .. } => Mode::Sentinel,
            Kind::Cluster { .. } => Mode::Cluster,
        }
    }

    /// A connection, opened now (an error if Redis does not answer).
    pub async fn connect(&self) -> Result<Conn, Error> {
        let conn = self.connect_lazy()?;
        conn.open().await?;
        Ok(conn)
    }

    /// A connection that opens on first use and reopens after a failure:
    /// a process that starts while Redis is down comes up, and its calls
    /// fail until Redis answers.
    pub fn connect_lazy(&self) -> Result<Conn, Error> {
        let inner = match &self.kind {
            Kind::Single(client) => Inner::Node(ConnectionManager::new_lazy_with_config(
                client.clone(),
                manager_config(),
            )?),
            Kind::Sentinel {
                sentinels,
                master,
                node,
            } => Inner::Sentinel(Arc::new(sentinel::Follower::new(sentinels, master, node)?)),
            Kind::Cluster { .. } => {
                Inner::Cluster(Arc::new(LazyCluster::new(self.cluster_builder().build()?)))
            }
        };
        Ok(Conn { inner })
    }

    fn cluster_builder(&self) -> ClusterClientBuilder {
        let Kind::Cluster {
            nodes,
            username,
            password,
        } = &self.kind
        else {
            unreachable!("cluster_builder on a cluster target only")
        };
        let mut b = ClusterClientBuilder::new(nodes.iter().map(|n| format!("redis://{n}")))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT);
        if let Some(u) = username {
            b = b.username(u);
        }
        if let Some(p) = password {
            b = b.password(p);
        }
        b
    }

    /// A client of the node that takes writes now: the node itself, or the
    /// master the Sentinels name (asked now). Not for a Redis Cluster.
    pub async fn master_client(&self) -> Result<redis::Client, Error> {
        match &self.kind {
            Kind::Single(c) => Ok(c.clone()),
            Kind::Sentinel {
                sentinels,
                master,
                node,
            } => Ok(sentinel::master_client(sentinels, master, node).await?),
            Kind::Cluster { .. } => Err(Error::Url {
                url: self.redacted.clone(),
                why: "a Redis Cluster has no single master".into(),
            }),
        }
    }
}

/// What a Redis deployment looks like now, as its own nodes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One node, answering.
    Single,
    /// The master the Sentinels name (`host:port`), checked with `ROLE`.
    Sentinel { master: String },
    /// Masters serving slots, and how many of them answer (not flagged
    /// failing by the node asked).
    Cluster { masters: u32, answering: u32 },
}

impl Target {
    /// Asks Redis what it looks like now, within `limit`: the status's
    /// view of a Sentinel group or a Cluster.
    pub async fn topology(&self, limit: Duration) -> Result<Topology, Error> {
        let ask = async {
            match &self.kind {
                Kind::Single(c) => {
                    let mut conn = c.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<()>(&mut conn).await?;
                    Ok(Topology::Single)
                }
                Kind::Sentinel { .. } => {
                    let client = self.master_client().await?;
                    Ok(Topology::Sentinel {
                        master: client.get_connection_info().addr().to_string(),
                    })
                }
                Kind::Cluster { .. } => {
                    let conn = self.connect_lazy()?;
                    let Inner::Cluster(c) = &conn.inner else {
                        unreachable!("a cluster target connects to a cluster")
                    };
                    let mut cluster = c.get().await?;
                    let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                    let nodes = cluster
                        .route_command(redis::cmd("CLUSTER").arg("NODES").to_owned(), any)
                        .await?
                        .extract_error()?;
                    let text: String = redis::from_redis_value(nodes).map_err(RedisError::from)?;
                    Ok(cluster_masters(&text))
                }
            }
        };
        tokio::time::timeout(limit, ask)
            .await
            .map_err(|_| Error::Url {
                url: self.redacted.clone(),
                why: format!("no answer within {limit:?}"),
            })?
    }
}

/// Masters with slots in a `CLUSTER NODES` reply, and those not failing.
fn cluster_masters(nodes: &str) -> Topology {
    let (mut masters, mut answering) = (0, 0);
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(link)) = (fields.get(2), fields.get(7)) else {
            continue;
        };
        if !flags.split(',').any(|f| f == "master") || fields.len() < 9 {
            continue;
        }
        masters += 1;
        let failing = flags.split(',').any(|f| f == "fail" || f == "fail?");
        if !failing && *link == "connected" {
            answering += 1;
        }
    }
    Topology::Cluster { masters, answering }
}

/// A URL's authority split into credentials and `host:port` addresses.
struct Authority {
    username: Option<String>,
    password: Option<String>,
    hosts: Vec<String>,
    path: String,
}

impl Authority {
    fn split(rest: &str, default_port: u16) -> Result<Self, String> {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, String::new()),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user)?;
                let pass = percent_decode(pass)?;
                (
                    Some(user).filter(|u| !u.is_empty()),
                    Some(pass).filter(|p| !p.is_empty()),
                )
            }
        };
        let hosts = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| host_port(h, default_port))
            .collect::<Result<Vec<_>, _>>()?;
        if hosts.is_empty() {
            return Err("give at least one host:port".into());
        }
        Ok(Self {
            username,
            password,
            hosts,
            path,
        })
    }
}

/// `host:port` with the default port added when absent; `[v6]:port` kept.
fn host_port(h: &str, default_port: u16) -> Result<String, String> {
    let (host, port) = if let Some(v6) = h.strip_prefix('[') {
        let end = v6.find(']').ok_or_else(|| format!("{h:?}: unclosed ["))?;
        let port = v6[end + 1..].strip_prefix(':');
        (&h[..end + 2], port)
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{h:?}: no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("{h:?}: the port must be a number up to 65535"))?,
        None => default_port,
    };
    Ok(format!("{host}:{port}"))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a % in the credentials must start an escape like %40")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the credentials are not UTF-8".to_owned())
}

fn manager_config() -> ConnectionManagerConfig {
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
    /// Whether the master's answer is enough (the default).
    pub fn is_master_only(&self) -> bool {
        *self == Self::default()
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
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Node(ConnectionManager),
    Sentinel(Arc<sentinel::Follower>),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use (a failed attempt is retried
/// by the next call) and made again after a call times out or loses its
/// connection: the client learns a new slot map only from a redirection or
/// a refused connection, so a master that stops answering (hung, cut off)
/// would otherwise keep its slots in the client's eyes after a replica took
/// them over. A fresh connection asks the seeds.
struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<(u64, ClusterConnection)>>,
    generation: std::sync::atomic::AtomicU64,
}

impl LazyCluster {
    fn new(client: redis::cluster::ClusterClient) -> Self {
        Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            generation: Default::default(),
        }
    }

    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.current().await.map(|(_, c)| c)
    }

    async fn current(&self) -> RedisResult<(u64, ClusterConnection)> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let made = self.client.get_async_connection().await?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *conn = Some((generation, made.clone()));
        Ok((generation, made))
    }

    /// Drops connection `generation` after `e`, if `e` says a node stopped
    /// answering, so the next call starts from the seeds.
    async fn failed(&self, generation: u64, e: &RedisError) {
        if !(e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()) {
            return;
        }
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(error = %e, "redis cluster: a node stopped answering; reconnecting through the seeds");
            *conn = None;
        }
    }

    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.current().await?;
        let r = conn.req_packed_command(cmd).await;
        if let Err(e) = &r {
            self.failed(generation, e).await;
        }
        r
    }

    async fn commands(
        &self,
        pipeline: &redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.current().await?;
        let r = conn.req_packed_commands(pipeline, offset, count).await;
        if let Err(e) = &r {
            self.failed(generation, e).await;
        }
        r
    }
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
            let mut by_slot: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
            for (i, (key, _)) in parts.iter().enumerate() {
                by_slot.entry(slot(key.as_bytes())).or_default().push(i);
            }
            by_slot.into_values().collect()
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

    /// Waits until `durability.replicas` replicas have every write made so
    /// far on this connection (`WAIT`), on the node that holds `key`.
    pub async fn wait_for_replicas(&self, key: &str, durability: &Durability) -> Result<(), Error> {
        if durability.replicas == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(durability.replicas).arg(durability.timeout_ms);
        let asked: RedisResult<i64> = match &self.inner {
            Inner::Cluster(c) => {
                async {
                    let (generation, mut conn) = c.current().await?;
                    let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::with_key(key, SlotAddr::Master),
                    ));
                    let v = match conn.route_command(wait, at).await {
                        Ok(v) => v,
                        Err(e) => {
                            c.failed(generation, &e).await;
                            return Err(e);
                        }
                    };
                    redis::from_redis_value(v.extract_error()?).map_err(RedisError::from)
                }
                .await
            }
            _ => {
                let mut conn = self.clone();
                wait.query_async(&mut conn).await
            }
        };
        // Whatever went wrong (the node failed over between the write and
        // the WAIT, say), the write is not known to be replicated: not
        // acknowledged, and retried under its push id.
        let confirmed = asked.map_err(Error::Unconfirmed)?;
        if confirmed < i64::from(durability.replicas) {
            return Err(Error::NotReplicated {
                wanted: durability.replicas,
                confirmed,
                timeout: Duration::from_millis(durability.timeout_ms),
            });
        }
        Ok(())
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
    fn modes_parse() {
        let t = Target::parse("redis://127.0.0.1:6379/2").unwrap();
        assert_eq!(t.mode(), Mode::Single);
        let t = Target::parse("redis+sentinel://a:26379,b,[::1]:26380/mymaster/3").unwrap();
        assert_eq!(t.mode(), Mode::Sentinel);
        let Kind::Sentinel {
            sentinels,
            master,
            node,
        } = &t.kind
        else {
            panic!("sentinel")
        };
        assert_eq!(sentinels, &["a:26379", "b:26379", "[::1]:26380"]);
        assert_eq!(master, "mymaster");
        assert_eq!(node.db(), 3);
        let t = Target::parse("redis+cluster://u:p%40ss@n1:7000,n2").unwrap();
        let Kind::Cluster {
            nodes,
            username,
            password,
        } = &t.kind
        else {
            panic!("cluster")
        };
        assert_eq!(nodes, &["n1:7000", "n2:6379"]);
        assert_eq!(username.as_deref(), Some("u"));
        assert_eq!(password.as_deref(), Some("p@ss"));
        assert_eq!(t.to_string(), "redis+cluster://***@n1:7000,n2");
    }

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

    #[test]
    fn cluster_nodes_count_masters_with_slots_and_those_answering() {
        let nodes = "\
a 10.0.0.1:6379@16379 myself,master - 0 0 1 connected 0-5460
b 10.0.0.2:6379@16379 master,fail - 0 0 2 disconnected 5461-10922
c 10.0.0.3:6379@16379 master - 0 0 3 connected 10923-16383
d 10.0.0.4:6379@16379 slave a 0 0 1 connected
e 10.0.0.5:6379@16379 master - 0 0 0 connected
";
        assert_eq!(
            cluster_masters(nodes),
            Topology::Cluster {
                masters: 3,
                answering: 2
            }
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("redis+sentinel://a:26379", "name the master"),
            ("redis+sentinel://a:26379/m/x", "must be a number"),
            ("redis+cluster://", "at least one host"),
            ("redis+cluster://a:99999", "port"),
            ("redis+cluster://a/3", "only database 0"),
            ("redis+cluster://:%zz@a", "escape"),
            ("nope://x", "redis URL"),
        ] {
            let e = Target::parse(url).expect_err(url).to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn passwords_join_and_leave_urls() {
        let url = pushcluster_core::ops::with_password("redis+sentinel://s1,s2/m", "p@ss:/w");
        assert_eq!(url, "redis+sentinel://:p%40ss%3A%2Fw@s1,s2/m");
        assert_eq!(redact(&url), "redis+sentinel://***@s1,s2/m");
        let Kind::Sentinel { node, .. } = Target::parse(&url).unwrap().kind else {
            panic!("sentinel")
        };
        assert_eq!(node.password(), Some("p@ss:/w"));
        assert_eq!(
            pushcluster_core::ops::with_password("redis://admin:old@h:1/0", "new"),
            "redis://admin:new@h:1/0"
        );
    }
}
