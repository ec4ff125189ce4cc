//! The store as the second witness of shard ownership
//! ([`pushcluster_lease::owner::Witness`]): a new holder raises its shard's
//! fence in the store before it serves, and a holder that cannot renew its
//! Lease (the API server is away) keeps serving while the store knows no
//! newer token. The store is the one every append of this comet goes to,
//! under the same fence: Redis directly, or the message service in front
//! of the embedded store.

use crate::{Config, Error};
use pushcluster_lease::owner::Witness;
use pushcluster_proto::auth::AuthChannel;
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::message_client::MessageClient;
use pushcluster_store::redis::RedisStore;
use pushcluster_store::{Fence, Store};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Where this comet's shard fence lives.
pub enum StoreWitness {
    /// Redis, where web and comets append.
    Redis(RedisStore),
    /// The message service, the embedded store's one writer.
    Message(MessageClient<AuthChannel>),
}

impl std::fmt::Debug for StoreWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreWitness::Redis(_) => "StoreWitness::Redis",
            StoreWitness::Message(_) => "StoreWitness::Message",
        })
    }
}

impl StoreWitness {
    /// The witness for `cfg`'s storage.
    pub fn for_config(cfg: &Config) -> Result<Arc<dyn Witness>, Error> {
        let w = match cfg.store.open(None).map_err(Error::Store)? {
            Some(redis) => StoreWitness::Redis(redis),
            None => StoreWitness::Message(crate::comet::message_client(cfg)?),
        };
        Ok(Arc::new(w))
    }
}

impl Witness for StoreWitness {
    fn raise(
        &self,
        shard: u32,
        token: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Option<u64>, String>> + Send + '_>> {
        Box::pin(async move {
            match self {
                StoreWitness::Redis(r) => r
                    .raise_fence(Fence { shard, token })
                    .await
                    .map(Some)
                    .map_err(|e| e.to_string()),
                StoreWitness::Message(m) => {
                    match m
                        .clone()
                        .raise_fence(pb::RaiseFenceRequest { shard, token })
                        .await
                    {
                        Ok(r) => Ok(Some(r.into_inner().fence)),
                        // A message service of the previous release.
                        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
                        Err(s) => Err(s.message().to_owned()),
                    }
                }
            }
        })
    }
}
