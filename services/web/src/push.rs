//! The push path: how a private push is stored, delivered and acknowledged.
//!
//! A push is acknowledged only once stored. Which way it is stored is chosen
//! once, at start-up, from the storage kind ([`PushPath`]):
//!
//! - **Redis** ([`PushPath::StoreInRedis`]): web stores it itself, in one
//!   atomic script that assigns its mid, appends it and publishes it on the
//!   key's live channel, which the comets holding the key's connections
//!   subscribe to (`push_comet::live`).
//! - **Embedded store** ([`PushPath::ThroughComets`]): web sends it to the
//!   comet that owns the key, which stores it through the message service
//!   and queues it on the key's connections. When no comet owns the key or
//!   the owner cannot be reached, web stores it through the message service
//!   itself, so it is delivered on reconnect and never lost. A comet that
//!   answered with an error (storage failed behind it) gets that error
//!   passed on instead.
//!
//! Every push carries a fresh id, passed to storage with the message. When a
//! comet's connection breaks while a push is in flight (the comet crashed),
//! web cannot know whether the comet stored it and stores it itself under the
//! same id: storage recognises the id and returns the first mid, so the
//! message is stored exactly once.

use crate::clients::Clients;
use crate::metrics::Metrics;
use crate::reply::{status_reply, Reply, INTERNAL};
use bytes::Bytes;
use pushcluster_core::batch::Batcher;
use pushcluster_core::key::Limits;
use pushcluster_core::membership::Membership;
use pushcluster_core::{GID_PRIVATE, GID_PUBLIC};
use pushcluster_proto::pipeline::pipelined_batcher;
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_store::redis::RedisStore;
use pushcluster_store::{AppendOpts, Channel, Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Code;

/// How web stores a private push; chosen once, at start-up.
pub enum PushPath {
    /// The cluster stores in Redis: web stores the push itself and the
    /// comets receive it on the key's live channel.
    StoreInRedis(RedisStore),
    /// The embedded store: the owning comet stores and queues the push;
    /// web stores it through the message service when no comet can.
    ThroughComets,
}

/// Everything a push needs: the path, the clients, who owns which key.
pub struct Pushes {
    path: PushPath,
    clients: Arc<Clients>,
    membership: Arc<dyn Membership>,
    /// Private pushes per comet, coalesced into PushBatch calls under load.
    pushers: Mutex<HashMap<String, Arc<Pusher>>>,
    /// Broadcasts from this web are stored and fanned out one at a time, so
    /// comets receive them in mid order.
    broadcast_order: tokio::sync::Mutex<()>,
    limits: Limits,
    metrics: Metrics,
}

/// The push did not get an answer from the comet: it was unreachable or its
/// connection broke. Statuses the comet answers itself carry no source; tonic
/// attaches the transport error as the source of those it makes up.
fn unreached(s: &tonic::Status) -> bool {
    s.code() == Code::Unavailable || std::error::Error::source(s).is_some()
}

impl Pushes {
    /// The push path over `clients` and `membership`.
    pub fn new(
        path: PushPath,
        clients: Arc<Clients>,
        membership: Arc<dyn Membership>,
        limits: Limits,
        metrics: Metrics,
    ) -> Self {
        Self {
            path,
            clients,
            membership,
            pushers: Mutex::new(HashMap::new()),
            broadcast_order: tokio::sync::Mutex::new(()),
            limits,
            metrics,
        }
    }

    /// The push batcher for the comet at `rpc` (made on first use).
    fn pusher(&self, rpc: &str) -> Result<Arc<Pusher>, crate::Error> {
        if let Some(p) = self
            .pushers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(rpc)
        {
            return Ok(p.clone());
        }
        let p = Arc::new(pusher(self.clients.comet(rpc)?, self.clients.deadline()));
        let mut map = self.pushers.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.entry(rpc.to_owned()).or_insert(p).clone())
    }

    /// Stores a message through the message service (the embedded store's
    /// one writer), for a push no comet could take and for broadcasts.
    pub async fn store_via_message_service(
        &self,
        key: &str,
        gid: i32,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Result<i64, Reply> {
        let req = pb::AppendRequest {
            key: key.to_owned(),
            payload,
            expire_seconds: expire,
            gid,
            push_id: push_id.to_owned(),
            // Web holds no shard: its direct stores are not fenced.
            shard: 0,
            fence: 0,
            // Web stores a private push only when its comet failed it, did
            // not answer, or there is none: the comets hear of it through
            // the message service too, in case web cannot reach them.
            announce: gid == GID_PRIVATE,
        };
        // While the message service is unreachable (the embedded store's one
        // pod restarting takes seconds) keep trying, so the push is answered
        // late rather than failed. Only with a push id: storage dedupes by
        // it, so a retry after a lost answer cannot store twice.
        self.retrying(
            || {
                let mut message = self.clients.message.clone();
                let req = req.clone();
                async move { message.append(req).await.map(|r| r.into_inner().mid) }
            },
            |s: &tonic::Status| !push_id.is_empty() && unreached(s),
        )
        .await
        .map_err(status_reply)
    }

    /// Runs `attempt` until it succeeds or fails other than `transient`ly;
    /// a transient failure is retried with backoff for [`STORE_RETRY_FOR`].
    async fn retrying<T, E: std::fmt::Display, F, Fut>(
        &self,
        attempt: F,
        transient: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let deadline = tokio::time::Instant::now() + STORE_RETRY_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            match attempt().await {
                Err(e) if transient(&e) && tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e, "storage unreachable: retrying");
                    self.metrics.store_retries.inc();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                r => return r,
            }
        }
    }

    /// Stores a private message straight in Redis, which publishes it to
    /// the comets holding the key's connections (`push_comet::live`).
    /// While Redis is unreachable it keeps trying for [`STORE_RETRY_FOR`],
    /// under one push id: a retry after a lost answer returns the first mid.
    async fn store_in_redis(
        &self,
        redis: &RedisStore,
        key: &str,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Result<i64, Reply> {
        let ttl = self
            .limits
            .expire(expire)
            .map_err(|e| Reply::param(e.to_string()))?;
        // Its first attempt skips Redis's lookup of an id web just made:
        // one call of the append script fewer per push.
        let first = std::sync::atomic::AtomicBool::new(crate::idempotency::made_here(push_id));
        self.retrying(
            || {
                let opts = AppendOpts::dedupe(push_id)
                    .first_use(first.swap(false, std::sync::atomic::Ordering::Relaxed));
                // Boxed: the store's future is ~2.5 KB, and unboxed it was
                // copied into the future awaiting it (memmove 1.7 % of web's
                // samples in S3 under this call; none after).
                Box::pin(redis.append_with(Channel::Private(key), payload.clone(), ttl, opts))
            },
            StoreError::is_transient,
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "storing in redis failed");
            Reply::err(INTERNAL, format!("storage: {e}"))
        })
    }

    /// Pushes one private message under `push_id` (see [`crate::idempotency::push_id`]);
    /// returns its mid once stored.
    pub async fn push_private(
        &self,
        key: &str,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Result<i64, Reply> {
        if let PushPath::StoreInRedis(redis) = &self.path {
            return self
                .store_in_redis(redis, key, payload, expire, push_id)
                .await;
        }
        let view = self.membership.view();
        if let Some(ep) = view.endpoint_for(key) {
            let req = pb::PushRequest {
                key: key.to_owned(),
                payload: payload.clone(),
                expire_seconds: expire,
                push_id: push_id.to_owned(),
            };
            let pusher = self
                .pusher(&ep.rpc)
                .map_err(|e| Reply::err(INTERNAL, e.to_string()))?;
            match pusher.call(req).await {
                Ok(CometPush::Stored(mid)) => return Ok(mid),
                Ok(CometPush::Unreached(why)) => {
                    tracing::warn!(shard = ep.shard, error = %why, "comet unreachable: storing directly");
                }
                Ok(CometPush::Refused(reply)) => return Err(reply),
                Ok(CometPush::Failed(why)) => {
                    // The comet could not store it (its message service is
                    // down, say): store it here under the same push id, which
                    // returns the first mid if the comet's write did land.
                    tracing::warn!(shard = ep.shard, error = %why, "comet could not store: storing directly");
                }
                Err(e) => return Err(Reply::err(INTERNAL, e.to_string())),
            }
        }
        self.metrics.stored_without_comet.inc();
        let mid = self
            .store_via_message_service(key, GID_PRIVATE, payload.clone(), expire, push_id)
            .await?;
        // The comet that serves the key now: storing may have waited out a
        // failover.
        if let Some(ep) = self.membership.view().endpoint_for(key) {
            self.tell_comet(&ep.rpc, key, mid, payload);
        }
        Ok(mid)
    }

    /// Hands a private message web stored itself (its comet could not, or
    /// did not answer) to that comet, so the key's connected subscribers get
    /// it now rather than at their next reconnect. Best effort, in the
    /// background, for about a second: a comet that stays unreachable has
    /// lost its clients too, and they fetch by mid when they come back.
    fn tell_comet(&self, rpc: &str, key: &str, mid: i64, payload: Bytes) {
        let Ok(client) = self.clients.comet(rpc) else {
            return;
        };
        let req = pb::DeliverRequest {
            message: Some(pb::StoredMessage {
                mid,
                gid: GID_PRIVATE,
                payload,
            }),
            key: key.to_owned(),
        };
        let told = self.metrics.told_comet.clone();
        tokio::spawn(async move {
            for pause in [0, 100, 300, 500] {
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                match client.clone().deliver(req.clone()).await {
                    Ok(_) => {
                        told.inc();
                        return;
                    }
                    // A comet of the previous release delivers only public
                    // messages: nothing to retry.
                    Err(s) if s.code() == Code::InvalidArgument => return,
                    Err(_) => {}
                }
            }
        });
    }

    /// Pushes to many keys, one call per comet (with Redis: one store per
    /// key, pipelined on web's connection), each under `push_id` (see
    /// [`crate::idempotency::push_id`]); returns the keys that failed.
    pub async fn multi_push(
        &self,
        keys: Vec<String>,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Vec<String> {
        if let PushPath::StoreInRedis(_) = &self.path {
            return self.store_each(keys, payload, expire, push_id).await;
        }
        let view = self.membership.view();
        let mut by_comet: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut no_comet = Vec::new();
        for k in keys {
            match view.endpoint_for(&k) {
                Some(ep) => by_comet.entry(ep.rpc.clone()).or_default().push(k),
                None => no_comet.push(k),
            }
        }
        let groups = by_comet.into_iter().map(|(rpc, keys)| {
            let payload = payload.clone();
            async move {
                let req = pb::MultiPushRequest {
                    keys: keys.clone(),
                    payload: payload.clone(),
                    expire_seconds: expire,
                    push_id: push_id.to_owned(),
                };
                let client = self.clients.comet(&rpc);
                let res = match client {
                    Ok(mut c) => c.multi_push(req).await,
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                match res {
                    Ok(r) => {
                        let (unserved, failed): (Vec<_>, Vec<_>) = r
                            .into_inner()
                            .results
                            .into_iter()
                            .filter(|k| !k.error.is_empty())
                            .partition(|k| k.unserved);
                        let mut failed: Vec<String> = failed.into_iter().map(|k| k.key).collect();
                        let unserved = unserved.into_iter().map(|k| k.key).collect();
                        failed.extend(self.store_each(unserved, payload, expire, push_id).await);
                        failed
                    }
                    Err(s) if unreached(&s) => {
                        self.store_each(keys, payload, expire, push_id).await
                    }
                    Err(s) => {
                        tracing::error!(comet = %rpc, error = %s.message(), "multi-push failed");
                        keys
                    }
                }
            }
        });
        let (mut failed, direct) = tokio::join!(
            futures::future::join_all(groups),
            self.store_each(no_comet, payload.clone(), expire, push_id)
        );
        let mut out: Vec<String> = failed.drain(..).flatten().collect();
        out.extend(direct);
        out
    }

    /// Stores `payload` for each of `keys` without a comet (in Redis when
    /// web has it, else through the message service); returns the keys that
    /// failed.
    async fn store_each(
        &self,
        keys: Vec<String>,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Vec<String> {
        if let PushPath::ThroughComets = &self.path {
            self.metrics.stored_without_comet.inc_by(keys.len() as u64);
        }
        let stores = keys.into_iter().map(|k| {
            let payload = payload.clone();
            async move {
                let stored = match &self.path {
                    PushPath::StoreInRedis(redis) => {
                        self.store_in_redis(redis, &k, payload, expire, push_id)
                            .await
                    }
                    PushPath::ThroughComets => {
                        self.store_via_message_service(&k, GID_PRIVATE, payload, expire, push_id)
                            .await
                    }
                };
                match stored {
                    Ok(_) => None,
                    Err(_) => Some(k),
                }
            }
        });
        futures::future::join_all(stores)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Stores a broadcast once on the public sequence (gid 1), then delivers
    /// it to every connection of every comet; returns its mid and how many
    /// connections it reached. Clients that were offline read it from
    /// `/1/msg/get?...&p=LAST_PUBLIC_MID`. Without an idempotency key
    /// (`push_id` empty) it is stored once and never retried; with one, a
    /// repeated broadcast is not stored again and gets the first one's mid,
    /// which connected clients that saw it drop (they dedupe by mid).
    pub async fn broadcast(
        &self,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Result<(i64, u64), Reply> {
        let _order = self.broadcast_order.lock().await;
        let mid = self
            .store_via_message_service("", GID_PUBLIC, payload.clone(), expire, push_id)
            .await?;
        let view = self.membership.view();
        let deliveries = view.endpoints.values().map(|ep| {
            let req = pb::DeliverRequest {
                message: Some(pb::StoredMessage {
                    mid,
                    gid: GID_PUBLIC,
                    payload: payload.clone(),
                }),
                key: String::new(),
            };
            let client = self.clients.comet(&ep.rpc);
            async move {
                let res = match client {
                    Ok(mut c) => c.deliver(req).await.map(|r| r.into_inner().connections),
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                res.unwrap_or_else(|e| {
                    // Stored already: its clients read it on reconnect.
                    tracing::warn!(shard = ep.shard, error = %e.message(), "broadcast delivery failed");
                    0
                })
            }
        });
        let connections: u64 = futures::future::join_all(deliveries)
            .await
            .into_iter()
            .sum();
        Ok((mid, connections))
    }
}

/// What became of a private push sent to a comet.
#[derive(Debug)]
pub(crate) enum CometPush {
    /// Stored with this mid (and queued on the key's connections).
    Stored(i64),
    /// Not stored by the comet (unreachable, or not serving the key now):
    /// web stores it itself, under the same push id.
    Unreached(String),
    /// Refused by the comet (a bad parameter): the caller's answer.
    Refused(Reply),
    /// The comet was reached but could not store it: web stores it itself,
    /// under the same push id (storage dedupes).
    Failed(String),
}

/// Pushes to one comet, coalesced under load (see [`pushcluster_core::batch`]).
pub(crate) type Pusher = Batcher<pb::PushRequest, CometPush>;

/// How long a store waits for an unreachable message service to come back:
/// long enough for the embedded store's one pod to be replaced on a busy
/// node, short of the 30 s a back end's HTTP client typically waits.
const STORE_RETRY_FOR: Duration = Duration::from_secs(15);

/// Pushes in one call at most; the comet takes up to 256.
const PUSH_BATCH: usize = 128;
/// Push calls in flight per comet before further pushes wait and coalesce
/// (one, as for the comet's appends: see APPENDS_IN_FLIGHT there).
const PUSHES_IN_FLIGHT: usize = 1;

/// A [`Pusher`] for the comet behind `client`: batches pipelined on one
/// PushStream (PushBatch calls to a comet without it). `deadline` bounds
/// each batch's wait for its reply.
pub(crate) fn pusher(
    client: CometClient<pushcluster_proto::auth::AuthChannel>,
    deadline: Duration,
) -> Pusher {
    let (open, unary) = pushcluster_proto::calls!(client, push_stream, push_batch);
    pipelined_batcher(
        deadline,
        PUSH_BATCH,
        PUSHES_IN_FLIGHT,
        open,
        unary,
        |pushes| pb::PushBatchRequest { pushes },
        split_pushes,
    )
}

/// One outcome per push of a batch.
fn split_pushes(replied: Result<pb::MultiPushReply, tonic::Status>, n: usize) -> Vec<CometPush> {
    match replied {
        Ok(r) => r
            .results
            .into_iter()
            .map(|k| match k {
                k if k.error.is_empty() => CometPush::Stored(k.mid),
                k if k.unserved => CometPush::Unreached(k.error),
                k if k.invalid => CometPush::Refused(Reply::param(k.error)),
                k => CometPush::Failed(k.error),
            })
            .collect(),
        Err(s) if unreached(&s) => (0..n)
            .map(|_| CometPush::Unreached(s.message().to_owned()))
            .collect(),
        Err(s) if s.code() == Code::InvalidArgument => (0..n)
            .map(|_| CometPush::Refused(Reply::param(s.message().to_owned())))
            .collect(),
        Err(s) => (0..n)
            .map(|_| CometPush::Failed(s.message().to_owned()))
            .collect(),
    }
}
