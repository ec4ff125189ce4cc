//! The comet's push path, chosen once at start-up from the storage kind
//! (`PushPath`): where a push it is sent is stored, and how stored private
//! messages reach its connections.
//!
//! On Redis (`PushPath::LiveFromRedis`), web stores private pushes itself
//! and the comet learns of them on live channels ([`crate::live`]); pushes
//! that still reach a comet over gRPC, from a web of the previous release,
//! are stored here and come back on the live channel.
//!
//! With Redis the comet writes straight into it, with the message service's
//! own append script (`pushcluster_store::redis`): same keys, same fence,
//! same dedupe by push id. A stored push then wakes three processes (web,
//! the comet, Redis) instead of four, and the comet's HTTP/2 client to the
//! message service with its batcher drops out of the path: docs/benchmarks.md
//! (S3) has the profile before and after. The redis connection pipelines
//! concurrent appends on its own, so the pushes of one batch from web leave
//! in one write.
//!
//! Without Redis the embedded store has exactly one writer, the message pod,
//! so appends go through the message service, and the comet queues what it
//! stored on the key's connections (`PushPath::StoreThenQueue`).
//! The message service stays the front for reads, deletes, broadcasts and
//! web's stores for keys no comet serves.

use crate::live::LiveFeed;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::{Config, Error};
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use pushcluster_core::batch::Batcher;
use pushcluster_core::key::Limits;
use pushcluster_core::ops::Readiness;
use pushcluster_core::GID_PRIVATE;
use pushcluster_proto::auth::AuthChannel;
use pushcluster_proto::pipeline::pipelined_batcher;
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::message_client::MessageClient;
use pushcluster_store::redis::RedisStore;
use pushcluster_store::{AppendOpts, Channel, Fence, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a call to the message service may take.
pub(crate) const STORE_DEADLINE: Duration = Duration::from_secs(10);

pub use pushcluster_store::redis::DirectStore;

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Input the store refuses (expiry, push id): the pusher's mistake.
    #[error("{0}")]
    Invalid(String),
    /// Refused by the shard's fence: a newer holder has written, so this
    /// comet lost its Lease (split brain averted).
    #[error(transparent)]
    Fenced(StoreError),
    /// Storage failed or was unreachable: the push may or may not be stored.
    #[error("{0}")]
    Failed(String),
}

/// One push to store: what the comet checked, and its shard's fence.
pub(crate) struct Append<'a> {
    /// The push key (already checked).
    pub key: &'a str,
    /// The JSON message (already checked).
    pub payload: Bytes,
    /// Requested expiry; 0 for the default.
    pub expire_seconds: u64,
    /// The push's id for dedupe; empty for none.
    pub push_id: &'a str,
    /// The shard's Lease token the append must not be outranked by.
    pub fence: Fence,
}

/// The comet's push path; see the module docs.
// One per comet, made once at start-up: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum PushPath {
    /// The embedded store: appends batched onto the message service's
    /// AppendStream; the comet queues what it stored.
    StoreThenQueue(Batcher<pb::AppendRequest, Result<i64, AppendError>>),
    /// Redis: stored messages arrive on `live`; appends go straight into
    /// Redis, `fenced` counting refusals by the fence.
    LiveFromRedis {
        store: RedisStore,
        limits: Limits,
        fenced: Counter,
        live: Arc<LiveFeed>,
    },
}

impl PushPath {
    /// Redis when `cfg.store` names one (its live feed stops on
    /// `live_stop`), else the message service behind `message`.
    pub(crate) fn open(
        cfg: &Config,
        message: MessageClient<AuthChannel>,
        registry: &Arc<Registry>,
        metrics: &Metrics,
        ready: &Readiness,
        live_stop: &CancellationToken,
    ) -> Result<Self, Error> {
        let direct = &cfg.store;
        // Lazily: a comet comes up (and serves subscribers) while Redis is
        // down; its appends fail meanwhile and web stores those pushes
        // through the message service, retrying.
        match direct
            .open(cfg.rpc_token.as_deref())
            .map_err(Error::Store)?
        {
            Some(store) => {
                let live = LiveFeed::start(
                    &direct.redis_namespace,
                    registry.clone(),
                    store.clone(),
                    ready.clone(),
                    metrics.live.clone(),
                    live_stop.clone(),
                );
                tracing::info!(
                    url = %store.target(),
                    "private pushes arrive on redis live channels"
                );
                Ok(Self::LiveFromRedis {
                    store,
                    limits: cfg.limits.clone(),
                    fenced: metrics.fenced.clone(),
                    live,
                })
            }
            None => Ok(Self::StoreThenQueue(appender(message, STORE_DEADLINE))),
        }
    }

    /// The live feed stored messages arrive on (Redis only).
    pub(crate) fn live(&self) -> Option<&Arc<LiveFeed>> {
        match self {
            PushPath::LiveFromRedis { live, .. } => Some(live),
            PushPath::StoreThenQueue(_) => None,
        }
    }

    /// Stores one private message; its mid once stored.
    pub(crate) async fn append(&self, a: Append<'_>) -> Result<i64, AppendError> {
        match self {
            PushPath::StoreThenQueue(batcher) => {
                let req = pb::AppendRequest {
                    key: a.key.to_owned(),
                    payload: a.payload,
                    expire_seconds: a.expire_seconds,
                    gid: GID_PRIVATE,
                    push_id: a.push_id.to_owned(),
                    shard: a.fence.shard,
                    fence: a.fence.token,
                    // The key's own comet stores it and delivers it itself.
                    announce: false,
                };
                batcher
                    .call(req)
                    .await
                    .unwrap_or_else(|e| Err(AppendError::Failed(e.to_string())))
            }
            PushPath::LiveFromRedis {
                store,
                limits,
                fenced,
                ..
            } => {
                // The checks the message service makes on every append.
                let invalid =
                    |e: pushcluster_core::key::InputError| AppendError::Invalid(e.to_string());
                let ttl = limits.expire(a.expire_seconds).map_err(invalid)?;
                pushcluster_core::key::check_push_id(a.push_id).map_err(invalid)?;
                let opts = AppendOpts::from_wire(a.push_id, a.fence.shard, a.fence.token);
                match store
                    .append_with(Channel::Private(a.key), a.payload, ttl, opts)
                    .await
                {
                    Ok(mid) => Ok(mid),
                    Err(e @ StoreError::Fenced { .. }) => {
                        fenced.inc();
                        tracing::warn!(error = %e, "append refused by its fence");
                        Err(AppendError::Fenced(e))
                    }
                    Err(e) => Err(AppendError::Failed(format!("storage: {e}"))),
                }
            }
        }
    }
}

/// Appends in one call at most; the message service takes up to 256.
const APPEND_BATCH: usize = 128;
/// Append calls in flight at once before further appends wait and coalesce.
/// One, like a pipelined Redis client: on S3 (docs/benchmarks.md) two in
/// flight formed fewer batches and cost 13 % more CPU for the same p99.
const APPENDS_IN_FLIGHT: usize = 1;

/// The comet's path to storage: appends coalesced into batches when they
/// arrive faster than the message service answers (a lone append goes out
/// alone), the batches pipelined on one AppendStream. A message service
/// without AppendStream gets AppendBatch calls.
fn appender(
    client: MessageClient<AuthChannel>,
    deadline: Duration,
) -> Batcher<pb::AppendRequest, Result<i64, AppendError>> {
    let (open, unary) = pushcluster_proto::calls!(client, append_stream, append_batch);
    pipelined_batcher(
        deadline,
        APPEND_BATCH,
        APPENDS_IN_FLIGHT,
        open,
        unary,
        |appends| pb::AppendBatchRequest { appends },
        split_appends,
    )
}

/// One outcome per append of a batch.
fn split_appends(
    replied: Result<pb::AppendBatchReply, tonic::Status>,
    n: usize,
) -> Vec<Result<i64, AppendError>> {
    match replied {
        Ok(r) => r
            .results
            .into_iter()
            .map(|a| match (a.error.is_empty(), a.invalid) {
                (true, _) => Ok(a.mid),
                (false, true) => Err(AppendError::Invalid(a.error)),
                (false, false) => Err(AppendError::Failed(a.error)),
            })
            .collect(),
        Err(e) if e.code() == tonic::Code::InvalidArgument => (0..n)
            .map(|_| Err(AppendError::Invalid(e.message().to_owned())))
            .collect(),
        Err(e) => (0..n)
            .map(|_| Err(AppendError::Failed(e.message().to_owned())))
            .collect(),
    }
}
