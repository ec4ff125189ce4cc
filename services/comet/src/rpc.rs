//! The comet's gRPC service: web pushes here.

use crate::registry::Delivery;
use crate::storage::Append;
use crate::Comet;
use bytes::Bytes;
use pushcluster_core::batch::Batcher;
use pushcluster_core::{GID_PRIVATE, GID_PUBLIC};
use pushcluster_lease::owner::Ownership;
use pushcluster_proto::auth::AuthChannel;
use pushcluster_proto::pipeline::{answer_in_order, Pipeline, Replies};
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::comet_server::{Comet as CometService, CometServer};
use pushcluster_proto::v1::message_client::MessageClient;
use pushcluster_store::Fence;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// gRPC front of a [`Comet`].
pub struct CometRpc {
    comet: Arc<Comet>,
    drain: CancellationToken,
}

impl CometRpc {
    /// Wraps a comet.
    pub fn new(comet: Arc<Comet>) -> Self {
        Self {
            comet,
            drain: CancellationToken::new(),
        }
    }
    /// Ends open PushStreams (after the pushes they carry) once `drain` fires.
    pub fn draining_on(self, drain: CancellationToken) -> Self {
        Self { drain, ..self }
    }
    /// The tonic server for it, with explicit message size limits.
    pub fn into_server(self) -> CometServer<Self> {
        let max = pushcluster_proto::max_rpc_bytes(self.comet.cfg.limits.max_message_bytes);
        CometServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
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
pub(crate) fn appender(
    client: MessageClient<AuthChannel>,
    deadline: Duration,
) -> Batcher<pb::AppendRequest, Result<i64, Status>> {
    let stream = {
        let client = client.clone();
        Arc::new(Pipeline::new(deadline, move |calls| {
            let mut client = client.clone();
            Box::pin(async move { client.append_stream(calls).await.map(Response::into_inner) })
        }))
    };
    Batcher::new(APPEND_BATCH, APPENDS_IN_FLIGHT, move |appends| {
        let (stream, mut client) = (stream.clone(), client.clone());
        async move {
            let n = appends.len();
            let replied = stream
                .call_or(pb::AppendBatchRequest { appends }, |req| async move {
                    client.append_batch(req).await.map(Response::into_inner)
                })
                .await;
            match replied {
                Ok(r) => r
                    .results
                    .into_iter()
                    .map(|a| match (a.error.is_empty(), a.invalid) {
                        (true, _) => Ok(a.mid),
                        (false, true) => Err(Status::invalid_argument(a.error)),
                        (false, false) => Err(Status::unavailable(a.error)),
                    })
                    .collect(),
                Err(e) => (0..n)
                    .map(|_| Err(Status::new(e.code(), e.message().to_owned())))
                    .collect(),
            }
        }
    })
}

impl Comet {
    /// Stores a private message (in Redis, or through the message service), then queues it on
    /// the key's connections. Pushes to one key are serialised from store to
    /// enqueue, so connections receive mids in order.
    pub async fn push(
        &self,
        key: &str,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Result<i64, Status> {
        let start = Instant::now();
        let stripe = pushcluster_core::ring::key_hash(key) as usize % self.stripes.len();
        let _order = self.stripes[stripe].lock().await;
        // The Lease's fencing token rides with the append: should another
        // comet have taken our shard meanwhile (we were paused or cut off),
        // the store refuses the write instead of interleaving two holders.
        let (shard, fence) = match *self.ownership.borrow() {
            Ownership::Serving { shard, token } => (shard, token),
            // Stepped down while this push waited for its key's turn: an
            // unfenced write from here would dodge the fence.
            Ownership::Standby => {
                return Err(Status::unavailable(
                    "this comet stopped serving the key's shard",
                ))
            }
        };
        let stored = self
            .storage
            .append(Append {
                key,
                payload: payload.clone(),
                expire_seconds: expire,
                push_id,
                fence: Fence {
                    shard,
                    token: fence,
                },
            })
            .await;
        let mid = match stored {
            Ok(mid) => mid,
            Err(e) => {
                self.metrics.push_errors.inc();
                // Unavailable is kept for "this comet was not reached": web then
                // stores the push itself. A storage failure behind a reached
                // comet must not look like that, or a retry could store twice.
                return Err(match e.code() {
                    tonic::Code::InvalidArgument => e,
                    _ => Status::internal(format!("store: {}", e.message())),
                });
            }
        };
        // On Redis the message comes back on its key's live channel, in mid
        // order with what others stored (crate::live).
        if !self.delivers_live() {
            let n = self
                .registry
                .deliver(key, &Delivery::new(mid, GID_PRIVATE, payload));
            self.metrics.deliveries.inc_by(n);
        }
        self.metrics.pushes.inc();
        self.metrics
            .push_latency
            .observe(start.elapsed().as_secs_f64());
        Ok(mid)
    }

    fn check(&self, key: &str, payload: &[u8]) -> Result<(), Status> {
        let l = &self.cfg.limits;
        l.check_key(key)
            .and_then(|()| l.check_message(payload))
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Checks a push (limits, then that this comet serves its key) and pushes it.
    async fn push_checked(&self, r: pb::PushRequest) -> Result<i64, Status> {
        self.check(&r.key, &r.payload)?;
        self.check_owner(&r.key)?;
        self.push(&r.key, r.payload, r.expire_seconds, &r.push_id)
            .await
    }

    /// Unavailable (so web stores the push itself) unless this comet serves `key`.
    fn check_owner(&self, key: &str) -> Result<(), Status> {
        if self.owns(key) {
            Ok(())
        } else {
            Err(Status::unavailable(
                "this comet does not serve the key's shard now",
            ))
        }
    }
}

/// Most pushes one PushBatch call may carry.
pub const MAX_PUSH_BATCH: usize = 256;
/// Batches of one PushStream pushed at once; further ones wait their turn.
const STREAM_BATCHES: usize = 16;

impl Comet {
    /// Pushes each of a batch as Push would, concurrently: one result per
    /// push, in order. A batch over the limit has every push refused.
    async fn push_batch(&self, pushes: Vec<pb::PushRequest>) -> pb::MultiPushReply {
        let results =
            match pushcluster_core::batch::check_len(pushes.len(), MAX_PUSH_BATCH, "pushes") {
                Err(e) => pushes
                    .into_iter()
                    .map(|r| key_result(r.key, Err(Status::invalid_argument(e.clone()))))
                    .collect(),
                Ok(()) => {
                    futures::future::join_all(pushes.into_iter().map(|r| async move {
                        let key = r.key.clone();
                        key_result(key, self.push_checked(r).await)
                    }))
                    .await
                }
            };
        pb::MultiPushReply { results }
    }
}

/// One key's outcome in a multi-push or push batch.
fn key_result(key: String, pushed: Result<i64, Status>) -> pb::KeyResult {
    match pushed {
        Ok(mid) => pb::KeyResult {
            key,
            mid,
            error: String::new(),
            unserved: false,
            invalid: false,
        },
        Err(e) => pb::KeyResult {
            key,
            mid: 0,
            error: e.message().to_owned(),
            unserved: e.code() == tonic::Code::Unavailable,
            invalid: e.code() == tonic::Code::InvalidArgument,
        },
    }
}

#[tonic::async_trait]
impl CometService for CometRpc {
    async fn push(&self, req: Request<pb::PushRequest>) -> Result<Response<pb::PushReply>, Status> {
        let mid = self.comet.push_checked(req.into_inner()).await?;
        Ok(Response::new(pb::PushReply { mid }))
    }

    async fn push_batch(
        &self,
        req: Request<pb::PushBatchRequest>,
    ) -> Result<Response<pb::MultiPushReply>, Status> {
        let pushes = req.into_inner().pushes;
        pushcluster_core::batch::check_len(pushes.len(), MAX_PUSH_BATCH, "pushes")
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(self.comet.push_batch(pushes).await))
    }

    type PushStreamStream = Replies<pb::MultiPushReply>;

    async fn push_stream(
        &self,
        req: Request<Streaming<pb::PushBatchRequest>>,
    ) -> Result<Response<Self::PushStreamStream>, Status> {
        let comet = self.comet.clone();
        let drain = self.drain.clone();
        let replies = answer_in_order(req.into_inner(), STREAM_BATCHES, drain, move |b| {
            let comet = comet.clone();
            async move { comet.push_batch(b.pushes).await }
        });
        Ok(Response::new(replies))
    }

    async fn multi_push(
        &self,
        req: Request<pb::MultiPushRequest>,
    ) -> Result<Response<pb::MultiPushReply>, Status> {
        let r = req.into_inner();
        let limits = &self.comet.cfg.limits;
        limits
            .check_message(&r.payload)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.keys.len() > limits.max_keys_per_multipush {
            return Err(Status::invalid_argument(format!(
                "{} keys, more than {}",
                r.keys.len(),
                limits.max_keys_per_multipush
            )));
        }
        let (push_id, expire) = (r.push_id.as_str(), r.expire_seconds);
        let pushes = r.keys.iter().map(|key| {
            let payload = r.payload.clone();
            async move {
                let res = match limits.check_key(key) {
                    Err(e) => Err(Status::invalid_argument(e.to_string())),
                    Ok(()) => match self.comet.check_owner(key) {
                        Err(e) => Err(e),
                        Ok(()) => self.comet.push(key, payload, expire, push_id).await,
                    },
                };
                key_result(key.clone(), res)
            }
        });
        let results = futures::future::join_all(pushes).await;
        Ok(Response::new(pb::MultiPushReply { results }))
    }

    async fn deliver(
        &self,
        req: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverReply>, Status> {
        let m = req
            .into_inner()
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        if m.gid != GID_PUBLIC {
            return Err(Status::invalid_argument(
                "only public messages are delivered to everyone",
            ));
        }
        let n = self
            .comet
            .registry
            .broadcast(&Delivery::new(m.mid, m.gid, m.payload));
        self.comet.metrics.deliveries.inc_by(n);
        Ok(Response::new(pb::DeliverReply { connections: n }))
    }

    async fn stats(
        &self,
        _req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsReply>, Status> {
        Ok(Response::new(pb::StatsReply {
            shard: self.comet.cfg.shard,
            connections: self.comet.registry.connections(),
            keys: self.comet.registry.keys(),
        }))
    }
}
