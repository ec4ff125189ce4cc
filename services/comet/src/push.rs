//! The comet's push path, for pushes that reach it over gRPC (the embedded
//! store, and a web of the previous release on Redis): check, store with the
//! shard's fence, then queue on the key's connections. On Redis the stored
//! message comes back on its key's live channel instead ([`crate::live`]).
//!
//! Failures are a [`PushError`]; [`crate::rpc`] turns them into gRPC
//! statuses and per-key results at its edge.

use crate::comet::Comet;
use crate::registry::Delivery;
use crate::rpc::key_result;
use crate::storage::{Append, AppendError};
use bytes::Bytes;
use pushcluster_core::GID_PRIVATE;
use pushcluster_lease::owner::Ownership;
use pushcluster_proto::v1 as pb;
use pushcluster_store::Fence;
use std::time::Instant;

/// Why a push was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The push itself is wrong (key, message, expiry): the pusher's mistake.
    #[error("{0}")]
    Invalid(String),
    /// This comet does not serve the key now: web stores the push itself.
    #[error("{0}")]
    NotServing(&'static str),
    /// The comet was reached but could not store it; it may or may not be
    /// stored, so web stores it again under the same push id.
    #[error("store: {0}")]
    Storage(#[source] AppendError),
}

impl Comet {
    /// Stores a private message under the shard's fence. On the embedded
    /// store (through the message service) it then queues it on the key's
    /// connections, pushes to one key serialised from store to enqueue so
    /// connections receive mids in order; on Redis the message reaches them
    /// from its live channel instead, in the order Redis stored it.
    pub async fn push(
        &self,
        key: &str,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Result<i64, PushError> {
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
                return Err(PushError::NotServing(
                    "this comet stopped serving the key's shard",
                ))
            }
        };
        let stored = self
            .path
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
            Err(AppendError::Invalid(e)) => {
                self.metrics.push_errors.inc();
                return Err(PushError::Invalid(e));
            }
            Err(e) => {
                self.metrics.push_errors.inc();
                return Err(PushError::Storage(e));
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

    fn check(&self, key: &str, payload: &[u8]) -> Result<(), PushError> {
        let l = &self.cfg.limits;
        l.check_key(key)
            .and_then(|()| l.check_message(payload))
            .map_err(|e| PushError::Invalid(e.to_string()))
    }

    /// Checks a push (limits, then that this comet serves its key) and pushes it.
    pub(crate) async fn push_checked(&self, r: pb::PushRequest) -> Result<i64, PushError> {
        self.check(&r.key, &r.payload)?;
        self.check_owner(&r.key)?;
        self.push(&r.key, r.payload, r.expire_seconds, &r.push_id)
            .await
    }

    /// Refused as not served (so web stores the push itself) unless this
    /// comet serves `key`.
    pub(crate) fn check_owner(&self, key: &str) -> Result<(), PushError> {
        if self.owns(key) {
            Ok(())
        } else {
            Err(PushError::NotServing(
                "this comet does not serve the key's shard now",
            ))
        }
    }
}

/// Most pushes one PushBatch call may carry.
pub const MAX_PUSH_BATCH: usize = 256;

impl Comet {
    /// Pushes each of a batch as Push would, concurrently: one result per
    /// push, in order. A batch over the limit has every push refused.
    pub(crate) async fn push_batch(&self, pushes: Vec<pb::PushRequest>) -> pb::MultiPushReply {
        let results =
            match pushcluster_core::batch::check_len(pushes.len(), MAX_PUSH_BATCH, "pushes") {
                Err(e) => pushes
                    .into_iter()
                    .map(|r| key_result(r.key, Err(PushError::Invalid(e.clone()))))
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
