//! The comet's gRPC service, the edge where web's calls arrive: pushes
//! (handed to [`crate::push`]), broadcast deliveries and stats. Push
//! failures become gRPC statuses here and nowhere else.

use crate::push::{PushError, MAX_PUSH_BATCH};
use crate::registry::Delivery;
use crate::Comet;
use pushcluster_core::{GID_PRIVATE, GID_PUBLIC};
use pushcluster_proto::pipeline::{answer_in_order, Replies};
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::comet_server::{Comet as CometService, CometServer};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Batches of one PushStream pushed at once; further ones wait their turn.
const STREAM_BATCHES: usize = 16;

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

/// One key's outcome in a multi-push or push batch.
pub(crate) fn key_result(key: String, pushed: Result<i64, PushError>) -> pb::KeyResult {
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
            error: e.to_string(),
            unserved: matches!(e, PushError::NotServing(_)),
            invalid: matches!(e, PushError::Invalid(_)),
        },
    }
}

/// The gRPC status of a failed push: Unavailable is kept for "this comet
/// did not take it" (web then stores the push itself); a storage failure
/// behind a reached comet must not look like that, or a retry could store
/// twice, so it is Internal.
impl From<PushError> for Status {
    fn from(e: PushError) -> Self {
        match e {
            PushError::Invalid(m) => Status::invalid_argument(m),
            PushError::NotServing(m) => Status::unavailable(m),
            e @ PushError::Storage(_) => Status::internal(e.to_string()),
        }
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
                    Err(e) => Err(PushError::Invalid(e.to_string())),
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
        let r = req.into_inner();
        let m = r
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        let n = match m.gid {
            GID_PUBLIC => self
                .comet
                .registry
                .broadcast(&Delivery::new(m.mid, m.gid, m.payload)),
            // Web stored it because this comet could not: queued unless
            // the key's connections already had it.
            GID_PRIVATE => self
                .comet
                .deliver_private(&r.key, m)
                .map_err(Status::invalid_argument)?,
            gid => return Err(Status::invalid_argument(format!("unknown gid {gid}"))),
        };
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
