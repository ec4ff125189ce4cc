//! The message service: the gRPC front of storage. Comets store through it
//! before they deliver; web reads offline messages and deletes through it.

pub mod volume;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use pushcluster_core::key::Limits;
use pushcluster_core::{GID_PRIVATE, GID_PUBLIC};
use pushcluster_proto::pipeline::{answer_in_order, Replies};
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::message_server::{Message, MessageServer};
use pushcluster_store::{AppendOpts, Backend, Channel, Page, Retention, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Configuration of `push-message` (YAML; flags override).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Ops listen address (`/metrics`, `/healthz`, `/readyz`).
    pub ops_listen: SocketAddr,
    /// Where messages are kept.
    pub storage: StorageConfig,
    /// How long and how much is kept.
    pub retention: Retention,
    /// Input limits (checked again here, whoever the caller is).
    pub limits: Limits,
    /// Most messages one fetch returns.
    pub fetch_limit: u32,
    /// Most payload bytes one fetch returns (at least one message is): a
    /// reader pages through a backlog of large messages instead of asking
    /// for one reply too big to send.
    pub fetch_max_bytes: usize,
    /// The cluster's internal RPC token, required on every call; unset, calls
    /// are not checked. Give it through `PUSH_RPC_TOKEN` (a Secret), not the
    /// config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_token: Option<String>,
    /// TLS on the internal gRPC ports (certificates from the cluster's
    /// `<name>-rpc-tls` Secret); unset, they are plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_tls: Option<pushcluster_proto::tls::RpcTls>,
}

/// Storage backend selection: Redis when `redis_url` is set, else embedded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct StorageConfig {
    /// `redis://host:port/db`, `redis+sentinel://…` or `redis+cluster://…`
    /// (see `pushcluster_redis`); empty for the embedded store.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so clusters can share one Redis.
    pub redis_namespace: String,
    /// Replicas that must confirm a write before it is acknowledged.
    // Left out when default, so configs (and their hashes: pods roll on a
    // change) of clusters that do not set it stay as they were.
    #[serde(skip_serializing_if = "pushcluster_redis::Durability::is_master_only")]
    pub redis_durability: pushcluster_redis::Durability,
    /// File of the embedded store.
    pub path: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_namespace: "pc".into(),
            redis_durability: Default::default(),
            path: PathBuf::from("data/messages.redb"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8070).into(),
            ops_listen: ([127, 0, 0, 1], 8071).into(),
            storage: StorageConfig::default(),
            retention: Retention::default(),
            limits: Limits::default(),
            fetch_limit: 1000,
            fetch_max_bytes: 2 << 20,
            rpc_token: None,
            rpc_tls: None,
        }
    }
}

/// Opens the configured backend.
pub async fn open_store(cfg: &Config) -> Result<Backend, StoreError> {
    match &cfg.storage.redis_url {
        Some(url) if !url.is_empty() => {
            let s = pushcluster_store::redis::RedisStore::connect(
                url,
                &cfg.storage.redis_namespace,
                cfg.retention.clone(),
            )
            .await?
            .signing(
                cfg.rpc_token
                    .as_deref()
                    .map(pushcluster_store::redis::live::LiveKey::derive),
            )
            .durability(cfg.storage.redis_durability);
            tracing::info!(url = %pushcluster_core::ops::redact_url(url), "storage: redis");
            Ok(Backend::Redis(s))
        }
        _ => {
            let s = pushcluster_store::embedded::EmbeddedStore::open(
                &cfg.storage.path,
                cfg.retention.clone(),
            )?;
            tracing::info!(path = %cfg.storage.path.display(), "storage: embedded");
            Ok(Backend::Embedded(s))
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

/// Metrics of the message service.
#[derive(Clone)]
struct Metrics {
    fenced: Counter,
    ops: Family<OpLabels, Counter>,
    errors: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram>,
}

impl Metrics {
    fn register(reg: &mut Registry) -> Self {
        let m = Self {
            fenced: Counter::default(),
            ops: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
        };
        reg.register("pushcluster_store_ops", "Store operations", m.ops.clone());
        reg.register(
            "pushcluster_message_fenced_appends",
            "Appends refused because a newer holder of their shard wrote (split brain averted)",
            m.fenced.clone(),
        );
        reg.register(
            "pushcluster_store_errors",
            "Store operations that failed",
            m.errors.clone(),
        );
        reg.register(
            "pushcluster_store_latency_seconds",
            "Store operation latency",
            m.latency.clone(),
        );
        m
    }

    fn record<T>(&self, op: &'static str, start: Instant, r: &Result<T, StoreError>) {
        let l = OpLabels { op };
        self.ops.get_or_create(&l).inc();
        self.latency
            .get_or_create(&l)
            .observe(start.elapsed().as_secs_f64());
        if let Err(e) = r {
            self.errors.get_or_create(&l).inc();
            tracing::error!(op, error = %e, "store operation failed");
        }
    }
}

/// The gRPC message service over a store.
pub struct MessageService<S> {
    store: Arc<S>,
    limits: Limits,
    fetch_limit: u32,
    fetch_max_bytes: usize,
    metrics: Metrics,
    drain: CancellationToken,
    /// Private messages appended with `announce`, for Bypassed followers.
    bypassed: tokio::sync::broadcast::Sender<pb::DeliverRequest>,
}

/// Announced messages buffered per Bypassed follower; one that falls
/// further behind is told it lost some (they are rare: pushes whose comet
/// failed them).
const BYPASSED_BUFFER: usize = 4096;

// By hand: a derive would ask for `S: Clone`, and only the Arc is cloned.
impl<S> Clone for MessageService<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            limits: self.limits.clone(),
            fetch_limit: self.fetch_limit,
            fetch_max_bytes: self.fetch_max_bytes,
            metrics: self.metrics.clone(),
            drain: self.drain.clone(),
            bypassed: self.bypassed.clone(),
        }
    }
}

impl<S: Store> MessageService<S> {
    /// A page after `after`; when `after` is beyond the channel's last
    /// stored mid, or was seen under another `epoch` (0: not known), the
    /// sequence started again (Redis lost its data, or the key expired):
    /// the page from its start, and true.
    async fn fetch_or_reset(
        &self,
        ch: Channel<'_>,
        after: i64,
        epoch: u64,
        page: Page,
    ) -> Result<(pushcluster_store::Fetched, bool), StoreError> {
        // The page carries its sequence: telling a reset costs no extra read.
        let fetched = self.store.fetch_page(ch, after, page).await?;
        if !fetched.seq.restarted_since(after, epoch) {
            return Ok((fetched, false));
        }
        Ok((self.store.fetch_page(ch, 0, page).await?, true))
    }

    /// Wraps `store`, registering metrics in `reg`.
    pub fn new(store: Arc<S>, cfg: &Config, reg: &mut Registry) -> Self {
        Self {
            store,
            limits: cfg.limits.clone(),
            fetch_limit: cfg.fetch_limit.max(1),
            fetch_max_bytes: cfg.fetch_max_bytes.max(1),
            metrics: Metrics::register(reg),
            drain: CancellationToken::new(),
            bypassed: tokio::sync::broadcast::channel(BYPASSED_BUFFER).0,
        }
    }

    /// Ends open AppendStreams (after the appends they carry) once `drain` fires.
    pub fn draining_on(self, drain: CancellationToken) -> Self {
        Self { drain, ..self }
    }

    fn channel<'a>(&self, key: &'a str, gid: i32) -> Result<Channel<'a>, Status> {
        match gid {
            GID_PUBLIC => Ok(Channel::Public),
            GID_PRIVATE => {
                self.limits
                    .check_key(key)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                Ok(Channel::Private(key))
            }
            other => Err(Status::invalid_argument(format!("unknown gid {other}"))),
        }
    }
}

/// Most appends one AppendBatch call may carry.
pub const MAX_BATCH: usize = 256;

impl<S: Store> MessageService<S> {
    /// Checks and stores one message; the reply's mid once it is durable.
    async fn append_one(&self, r: pb::AppendRequest) -> Result<i64, Status> {
        let ch = self.channel(&r.key, r.gid)?;
        self.limits
            .check_message(&r.payload)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ttl = self
            .limits
            .expire(r.expire_seconds)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        pushcluster_core::key::check_push_id(&r.push_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let start = Instant::now();
        let opts = AppendOpts::from_wire(&r.push_id, r.shard, r.fence);
        let announced = (r.announce && r.gid == GID_PRIVATE).then(|| r.payload.clone());
        let res = self.store.append_with(ch, r.payload, ttl, opts).await;
        if let (Ok(mid), Some(payload)) = (&res, announced) {
            // No follower is no error: the comet may not be up yet, and web
            // also hands the message to the comet itself.
            let _ = self.bypassed.send(pb::DeliverRequest {
                key: r.key.clone(),
                message: Some(pb::StoredMessage {
                    mid: *mid,
                    gid: GID_PRIVATE,
                    payload,
                }),
            });
        }
        if let Err(e @ StoreError::Fenced { .. }) = &res {
            // Not a storage failure: a comet that lost its Lease tried to write.
            self.metrics.fenced.inc();
            tracing::warn!(error = %e, "append refused by its fence");
            return Err(Status::failed_precondition(e.to_string()));
        }
        self.metrics.record("append", start, &res);
        res.map_err(internal)
    }
}

/// Batches of one AppendStream stored at once; further ones wait their turn.
const STREAM_BATCHES: usize = 16;

impl<S: Store> MessageService<S> {
    /// Appends each of a batch as Append would: one result per append, in
    /// order. A batch over the limit has every append refused.
    async fn append_batch(&self, appends: Vec<pb::AppendRequest>) -> pb::AppendBatchReply {
        let refused = |error: String| pb::AppendResult {
            mid: 0,
            error,
            invalid: true,
        };
        if let Err(e) = pushcluster_core::batch::check_len(appends.len(), MAX_BATCH, "appends") {
            let results = appends.iter().map(|_| refused(e.clone())).collect();
            return pb::AppendBatchReply { results };
        }
        // Concurrent: on Redis they share one connection and go out
        // pipelined, one round trip for the batch.
        let results = futures::future::join_all(appends.into_iter().map(|a| async move {
            match self.append_one(a).await {
                Ok(mid) => pb::AppendResult {
                    mid,
                    error: String::new(),
                    invalid: false,
                },
                Err(e) => pb::AppendResult {
                    invalid: e.code() == tonic::Code::InvalidArgument,
                    ..refused(e.message().to_owned())
                },
            }
        }))
        .await;
        pb::AppendBatchReply { results }
    }
}

fn internal(e: StoreError) -> Status {
    Status::unavailable(format!("storage: {e}"))
}

#[tonic::async_trait]
impl<S: Store> Message for MessageService<S> {
    async fn append(
        &self,
        req: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        let mid = self.append_one(req.into_inner()).await?;
        Ok(Response::new(pb::AppendReply { mid }))
    }

    async fn append_batch(
        &self,
        req: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchReply>, Status> {
        let appends = req.into_inner().appends;
        pushcluster_core::batch::check_len(appends.len(), MAX_BATCH, "appends")
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(self.append_batch(appends).await))
    }

    type AppendStreamStream = Replies<pb::AppendBatchReply>;

    async fn append_stream(
        &self,
        req: Request<Streaming<pb::AppendBatchRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let svc = self.clone();
        let drain = self.drain.clone();
        let replies = answer_in_order(req.into_inner(), STREAM_BATCHES, drain, move |b| {
            let svc = svc.clone();
            async move { svc.append_batch(b.appends).await }
        });
        Ok(Response::new(replies))
    }

    type BypassedStream = Replies<pb::DeliverRequest>;

    async fn bypassed(
        &self,
        _req: Request<pb::BypassedRequest>,
    ) -> Result<Response<Self::BypassedStream>, Status> {
        use futures::StreamExt;
        use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};
        let drain = self.drain.clone();
        let notices = BroadcastStream::new(self.bypassed.subscribe())
            .map(|n| {
                n.map_err(|BroadcastStreamRecvError::Lagged(missed)| {
                    Status::data_loss(format!(
                        "missed {missed} announced messages: the follower fell behind"
                    ))
                })
            })
            // The first loss ends the stream; draining ends it too.
            .scan(false, |lost, n| {
                let stop = *lost;
                *lost = n.is_err();
                futures::future::ready((!stop).then_some(n))
            })
            .take_until(async move { drain.cancelled().await });
        Ok(Response::new(Box::pin(notices)))
    }

    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchReply>, Status> {
        let r = req.into_inner();
        let ch = self.channel(&r.key, r.gid)?;
        let limit = match r.limit {
            0 => self.fetch_limit,
            n => n.min(self.fetch_limit),
        };
        let start = Instant::now();
        let page = Page {
            messages: limit as usize,
            bytes: self.fetch_max_bytes,
        };
        let res = self.fetch_or_reset(ch, r.after_mid, r.epoch, page).await;
        self.metrics.record("fetch", start, &res);
        let (fetched, reset) = res.map_err(internal)?;
        let messages = fetched
            .messages
            .into_iter()
            .map(|m| pb::StoredMessage {
                mid: m.mid,
                gid: r.gid,
                payload: m.payload,
            })
            .collect();
        Ok(Response::new(pb::FetchReply {
            messages,
            more: fetched.more,
            reset,
            epoch: fetched.seq.epoch,
            last_mid: fetched.seq.last,
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let r = req.into_inner();
        self.channel(&r.key, GID_PRIVATE)?;
        let start = Instant::now();
        let res = self.store.delete(&r.key).await;
        self.metrics.record("delete", start, &res);
        res.map_err(internal)?;
        Ok(Response::new(pb::DeleteReply {}))
    }

    async fn raise_fence(
        &self,
        req: Request<pb::RaiseFenceRequest>,
    ) -> Result<Response<pb::RaiseFenceReply>, Status> {
        let r = req.into_inner();
        let start = Instant::now();
        let res = self
            .store
            .raise_fence(pushcluster_store::Fence {
                shard: r.shard,
                token: r.token,
            })
            .await;
        self.metrics.record("raise_fence", start, &res);
        Ok(Response::new(pb::RaiseFenceReply {
            fence: res.map_err(internal)?,
        }))
    }

    async fn last_mid(
        &self,
        req: Request<pb::LastMidRequest>,
    ) -> Result<Response<pb::LastMidReply>, Status> {
        let r = req.into_inner();
        let ch = self.channel(&r.key, r.gid)?;
        let start = Instant::now();
        let res = self.store.sequence(ch).await;
        self.metrics.record("last_mid", start, &res);
        let seq = res.map_err(internal)?;
        Ok(Response::new(pb::LastMidReply {
            mid: seq.last,
            epoch: seq.epoch,
        }))
    }
}

/// Errors that stop the message service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("ops listener: {0}")]
    Ops(#[from] std::io::Error),
}

/// Runs the service until `cancel` fires; in-flight requests finish first.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), Error> {
    let mut registry = Registry::default();
    pushcluster_core::ops::register_runtime_metrics(&mut registry);
    let require = pushcluster_proto::auth::RequireToken::new(cfg.rpc_token.as_deref())
        .map_err(|e| Error::Config(format!("rpc_token: {e}")))?;
    let store = Arc::new(open_store(&cfg).await?);
    if let Backend::Embedded(_) = store.as_ref() {
        volume::watch(cfg.storage.path.clone(), &mut registry, cancel.clone());
    }
    let svc = MessageService::new(store, &cfg, &mut registry).draining_on(cancel.clone());
    let ready = pushcluster_core::ops::Readiness::default();
    let ops = tokio::spawn(pushcluster_core::ops::serve_ops(
        cfg.ops_listen,
        Arc::new(registry),
        ready.clone(),
        cancel.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    tracing::info!(addr = %cfg.listen, "message gRPC listening");
    ready.set(true);
    let tls = cfg
        .rpc_tls
        .as_ref()
        .map(pushcluster_proto::tls::ServerTls::load)
        .transpose()
        .map_err(|e| Error::Config(format!("rpc_tls: {e}")))?;
    let incoming = pushcluster_proto::tls::incoming(listener, tls);
    let shutdown = cancel.clone();
    let max = pushcluster_proto::max_rpc_bytes(cfg.limits.max_message_bytes);
    tonic::transport::Server::builder()
        .layer(tonic::service::InterceptorLayer::new(require))
        .add_service(
            MessageServer::new(svc)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.cancelled().await;
            ready.set(false);
        })
        .await?;
    cancel.cancel();
    ops.await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    Ok(())
}
