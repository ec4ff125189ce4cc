//! Message storage: where a pushed message is kept and its mid assigned.
//!
//! One [`Store`] trait, two backends that pass the same behaviour suite
//! (`tests/behaviour.rs`): [`redis::RedisStore`] for production and
//! [`embedded::EmbeddedStore`] (redb on local disk) for one machine.
//!
//! Semantics every backend keeps:
//! - mids are assigned atomically with the write, strictly increasing and
//!   contiguous per channel from 1; the public channel has its own sequence;
//! - an append returns only once the message is durable (redb fsyncs the commit;
//!   Redis durability is the server's own setting);
//! - each message expires on its own; a channel keeps at most `max_backlog`
//!   messages (the oldest go first);
//! - delete removes a key's messages but keeps its sequence, so a client that
//!   remembers mid 10 gets 11 next and never mistakes a new message for an old
//!   one; the sequence itself vanishes after `idle_ttl` without appends.

pub mod embedded;
pub mod redis;
/// A `redis-server` on a free port, for tests; behind the `testing`
/// feature, so it is not part of the library's API.
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Which sequence a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel<'a> {
    /// One key's private messages (gid 0).
    Private(&'a str),
    /// The cluster's public (broadcast) messages (gid 1).
    Public,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its id within its channel.
    pub mid: i64,
    /// The JSON body as pushed.
    pub payload: Bytes,
}

/// A writer's claim to a shard: the shard and its Lease's fencing token
/// (which grows with every change of holder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub shard: u32,
    pub token: u64,
}

/// What an append checks besides storing: deduplication by push id and the
/// writer's fence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendOpts<'a> {
    /// An append repeating this id on the same channel within the dedupe
    /// window stores nothing and returns the first mid: a push retried
    /// after a broken connection is stored exactly once.
    pub push_id: Option<&'a str>,
    /// Refused with [`StoreError::Fenced`] when a newer token of
    /// `fence.shard` was seen, in one atomic step with the write; otherwise
    /// the shard's newest token becomes `fence.token`.
    pub fence: Option<Fence>,
    /// `push_id` was made for this append and is used for the first time:
    /// nothing can be stored under it yet, so the store need not look it up
    /// (it still records it, for a retry, which must not set this). A
    /// store whose client may send a command twice by itself (a Redis
    /// Cluster's) looks it up all the same.
    pub first_use: bool,
}

impl<'a> AppendOpts<'a> {
    /// Deduplicated by `push_id` (none when empty), unfenced.
    pub fn dedupe(push_id: &'a str) -> Self {
        Self {
            push_id: (!push_id.is_empty()).then_some(push_id),
            fence: None,
            first_use: false,
        }
    }

    /// The same, with [`AppendOpts::first_use`] set as given.
    pub fn first_use(self, first_use: bool) -> Self {
        Self { first_use, ..self }
    }

    /// The options a push carries on the wire: an empty push id is none,
    /// and fence token 0 is none (static membership holds no Lease).
    pub fn from_wire(push_id: &'a str, shard: u32, token: u64) -> Self {
        Self {
            fence: (token > 0).then_some(Fence { shard, token }),
            ..Self::dedupe(push_id)
        }
    }
}

/// How long and how much a backend keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct Retention {
    /// Most messages kept per channel; older ones are dropped first.
    pub max_backlog: usize,
    /// A channel's sequence is forgotten after this long without appends, in
    /// seconds. Keep it longer than the longest message expiry.
    pub idle_ttl_seconds: u64,
    /// How long a push id is remembered for deduplication, in seconds: it
    /// must outlast the retries of one push (web retries a store for 15 s),
    /// and each push holds its record that long (on Redis a key of ~145
    /// bytes: 600 s at 5,000 pushes/s was 3M keys, ~435 MB).
    pub dedupe_window_seconds: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_backlog: 1000,
            idle_ttl_seconds: 60 * 24 * 3600,
            dedupe_window_seconds: 60,
        }
    }
}

/// A storage failure; the caller must not acknowledge the message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("redis: {0}")]
    RedisTarget(#[source] pushcluster_redis::Error),
    #[error("embedded store: {0}")]
    Embedded(#[from] redb::Error),
    #[error("embedded store writer has stopped")]
    WriterGone,
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("fenced: shard {shard} has a newer holder (token {current} > {token}); this writer lost its lease")]
    Fenced {
        shard: u32,
        token: u64,
        current: u64,
    },
}

impl StoreError {
    /// Whether trying again soon may succeed: Redis unreachable or slow, a
    /// Sentinel or Cluster failover under way (the old master answers
    /// `READONLY`, a slot `CLUSTERDOWN`/`TRYAGAIN`), or replicas that did
    /// not confirm in time. A retry under the same push id is never stored
    /// twice.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || matches!(
                        e.code(),
                        Some(
                            "READONLY" | "MASTERDOWN" | "LOADING" | "CLUSTERDOWN" | "TRYAGAIN"
                                | "MOVED" | "ASK"
                        )
                    )
                    // The Sentinels name no master the client can reach
                    // yet: a failover under way.
                    || e.kind() == ::redis::ErrorKind::MasterNameNotFoundBySentinel
            }
            Self::RedisTarget(
                pushcluster_redis::Error::NotReplicated { .. }
                | pushcluster_redis::Error::Unconfirmed(_),
            ) => true,
            _ => false,
        }
    }
}

impl From<pushcluster_redis::Error> for StoreError {
    fn from(e: pushcluster_redis::Error) -> Self {
        match e {
            pushcluster_redis::Error::Redis(e) => Self::Redis(e),
            other => Self::RedisTarget(other),
        }
    }
}

/// How much one read returns at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Messages.
    pub messages: usize,
    /// Payload bytes, counted whole: a page holds at least one message, and
    /// otherwise none that would take it past this.
    pub bytes: usize,
}

/// Where a channel's sequence stands.
///
/// A sequence that storage lost (Redis restarted without persistence, a key
/// idle past `idle_ttl_seconds`) starts again at mid 1 with a new epoch: a
/// reader that remembers the epoch it read mids under learns of the restart
/// even after the new sequence passed the mid it remembers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seq {
    /// The last mid assigned (0 when none).
    pub last: i64,
    /// When the sequence started, in ms since the Unix epoch; 0 when there
    /// is none, or it predates epochs and has not been appended to since.
    pub epoch: u64,
}

impl Seq {
    /// Whether a reader that saw mids up to `after` under `epoch` (0: not
    /// known) must forget them: its sequence was lost and started again.
    pub fn restarted_since(&self, after: i64, epoch: u64) -> bool {
        after > 0 && (self.last < after || (epoch != 0 && self.epoch != 0 && epoch != self.epoch))
    }
}

/// One page of a read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    pub messages: Vec<Stored>,
    /// The page was full (by count or bytes): more may follow the last one.
    pub more: bool,
    /// The channel's sequence, read with the page.
    pub seq: Seq,
}

impl Page {
    /// Takes `m` into a page that holds `taken` messages of `bytes` so far:
    /// whether it fits (the first always does).
    pub fn fits(&self, taken: usize, bytes: usize, m: usize) -> bool {
        taken == 0 || (taken < self.messages && bytes.saturating_add(m) <= self.bytes)
    }
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The operations the message service needs from storage.
pub trait Store: Send + Sync + 'static {
    /// Stores `payload` on `ch` for `ttl`, as `opts` say, and returns its
    /// mid once durable.
    fn append_with(
        &self,
        ch: Channel<'_>,
        payload: Bytes,
        ttl: Duration,
        opts: AppendOpts<'_>,
    ) -> impl Future<Output = Result<i64>> + Send;
    /// [`Store::append_with`] without dedupe or fence.
    fn append(
        &self,
        ch: Channel<'_>,
        payload: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<i64>> + Send {
        self.append_with(ch, payload, ttl, AppendOpts::default())
    }
    /// Messages of `ch` with mid > `after`, oldest first, unexpired, within
    /// `page`: the backend stops reading there, so a backlog of any size is
    /// read one bounded page at a time.
    fn fetch_page(
        &self,
        ch: Channel<'_>,
        after: i64,
        page: Page,
    ) -> impl Future<Output = Result<Fetched>> + Send;
    /// [`Store::fetch_page`] bounded by count only.
    fn fetch(
        &self,
        ch: Channel<'_>,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Stored>>> + Send {
        async move {
            let page = Page {
                messages: limit,
                bytes: usize::MAX,
            };
            Ok(self.fetch_page(ch, after, page).await?.messages)
        }
    }
    /// Raises `fence.shard`'s fence to `fence.token` (no change when it is
    /// higher) and returns the fence in force: what a new shard holder does
    /// before it serves, and how a holder that cannot renew its lease learns
    /// whether a newer one exists.
    fn raise_fence(&self, fence: Fence) -> impl Future<Output = Result<u64>> + Send;
    /// Removes every message of `key` (its sequence stays).
    fn delete(&self, key: &str) -> impl Future<Output = Result<()>> + Send;
    /// Where `ch`'s sequence stands.
    fn sequence(&self, ch: Channel<'_>) -> impl Future<Output = Result<Seq>> + Send;
}

/// The backend chosen by configuration.
pub enum Backend {
    /// Redis: one node, Sentinel-watched or a Redis Cluster.
    Redis(redis::RedisStore),
    /// redb on local disk.
    Embedded(embedded::EmbeddedStore),
}

impl Store for Backend {
    async fn append_with(
        &self,
        ch: Channel<'_>,
        payload: Bytes,
        ttl: Duration,
        opts: AppendOpts<'_>,
    ) -> Result<i64> {
        match self {
            Backend::Redis(s) => s.append_with(ch, payload, ttl, opts).await,
            Backend::Embedded(s) => s.append_with(ch, payload, ttl, opts).await,
        }
    }
    async fn fetch_page(&self, ch: Channel<'_>, after: i64, page: Page) -> Result<Fetched> {
        match self {
            Backend::Redis(s) => s.fetch_page(ch, after, page).await,
            Backend::Embedded(s) => s.fetch_page(ch, after, page).await,
        }
    }
    async fn raise_fence(&self, fence: Fence) -> Result<u64> {
        match self {
            Backend::Redis(s) => s.raise_fence(fence).await,
            Backend::Embedded(s) => s.raise_fence(fence).await,
        }
    }
    async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Backend::Redis(s) => s.delete(key).await,
            Backend::Embedded(s) => s.delete(key).await,
        }
    }
    async fn sequence(&self, ch: Channel<'_>) -> Result<Seq> {
        match self {
            Backend::Redis(s) => s.sequence(ch).await,
            Backend::Embedded(s) => s.sequence(ch).await,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::Seq;

    #[test]
    fn a_reader_learns_of_a_restart_by_mid_or_epoch() {
        let s = Seq { last: 10, epoch: 7 };
        assert!(!s.restarted_since(0, 0), "nothing seen, nothing to forget");
        assert!(!s.restarted_since(0, 3));
        assert!(!s.restarted_since(10, 7));
        assert!(!s.restarted_since(4, 0), "no epoch known: mids decide");
        assert!(s.restarted_since(11, 0), "beyond the last mid");
        assert!(s.restarted_since(11, 7));
        assert!(s.restarted_since(4, 3), "another epoch");
        let legacy = Seq { last: 10, epoch: 0 };
        assert!(
            !legacy.restarted_since(4, 3),
            "no epoch stored: mids decide"
        );
        assert!(Seq::default().restarted_since(1, 0), "the sequence is gone");
    }
}
