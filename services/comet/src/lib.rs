//! The comet: holds subscriber connections (WebSocket, TCP, SSE) for the keys
//! of its shard and delivers messages to them in mid order.
//!
//! On Redis, web stores private pushes itself and the comet receives them on
//! its keys' live channels ([`live`]), in mid order. On the embedded store a
//! push arrives over gRPC from web ([`rpc`]); the comet stores it first (a
//! push is acknowledged only once stored) through the message service
//! ([`storage`]), then queues it on the key's connections ([`registry`]).
//! Pushes to one key are serialised from store to enqueue, so every
//! connection sees mids in order.
//!
//! A WebSocket connection is one small hand-polled future ([`ws`]) and one
//! mailbox in the registry; heartbeat deadlines are checked by one sweeper
//! per comet rather than a timer per connection, so an idle subscriber costs
//! about 1.3 KB (docs/benchmarks.md, S1).

pub mod live;
pub mod protocol;
pub mod registry;
pub mod rpc;
pub mod sse;
pub mod storage;
pub mod tcp;
pub mod ws;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as MetricsRegistry;
use protocol::{HeartbeatBounds, Subscribe};
use pushcluster_core::frame;
use pushcluster_core::key::Limits;
use pushcluster_core::membership::{Membership, ShardEndpoint, StaticMembership};
use pushcluster_core::ops::Readiness;
use pushcluster_core::ring::{Ring, DEFAULT_VNODES};
use pushcluster_lease::owner::{Ownership, ShardOwner};
use pushcluster_lease::{Candidate, MembershipConfig, MembershipKind};
use pushcluster_proto::auth::{AuthChannel, RequireToken, RpcToken};
use pushcluster_proto::v1::message_client::MessageClient;
use registry::{RegisterError, Registry, Subscription};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Configuration of `push-comet` (YAML; flags override).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct Config {
    /// The shard this comet serves (static membership); with leases, the
    /// shard it tries first when that one is free.
    pub shard: u32,
    /// Number of shards in the cluster (static and redis membership; with
    /// kubernetes membership the shard Services say, and may change live).
    pub shards: u32,
    /// Static (fixed shard) or lease-based ownership with failover.
    pub membership: MembershipConfig,
    /// Addresses stored with the lease for web and clients; derived from the
    /// listen addresses when unset (fine on one machine, not behind NAT).
    pub advertise: Advertise,
    /// Unique name of this process in leases; default `<hostname>-<pid>`.
    pub holder: Option<String>,
    /// WebSocket (`/sub`) and SSE (`/sub/sse`) listen address.
    pub ws_listen: SocketAddr,
    /// TCP protocol listen address.
    pub tcp_listen: SocketAddr,
    /// gRPC listen address (web pushes here).
    pub rpc_listen: SocketAddr,
    /// Ops listen address (`/metrics`, `/healthz`, `/readyz`).
    pub ops_listen: SocketAddr,
    /// gRPC URL of the message service.
    pub message_url: String,
    /// Storing pushes straight into Redis instead of through the message
    /// service (when the cluster's store is Redis).
    pub store: storage::DirectStore,
    /// Most connections one key may hold on this comet (gopush-cluster: 64).
    pub max_subscribers_per_key: usize,
    /// Messages queued per connection before it counts as a slow consumer.
    pub queue_depth: usize,
    /// Shortest heartbeat interval a client may ask for, in seconds.
    pub min_heartbeat_seconds: u64,
    /// Longest heartbeat interval a client may ask for, in seconds.
    pub max_heartbeat_seconds: u64,
    /// Added to the client's heartbeat to give its read deadline (gopush: 5 s).
    pub heartbeat_grace_seconds: u64,
    /// Seconds between SSE keep-alive comments.
    pub sse_keepalive_seconds: u64,
    /// Caps and deadlines of the client listeners (WebSocket/SSE and TCP,
    /// each counted on its own).
    pub listener_limits: pushcluster_core::serve::ListenerLimits,
    /// Secret for subscriber tokens; when unset, tokens are not checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber_secret: Option<String>,
    /// The cluster's internal RPC token: required on calls to this comet and
    /// sent on calls to the message service; unset, calls are not checked.
    /// Give it through `PUSH_RPC_TOKEN` (a Secret), not the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_token: Option<String>,
    /// Input limits.
    pub limits: Limits,
}

/// Addresses a comet advertises.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Advertise {
    /// gRPC URL, e.g. `http://10.0.0.5:6970`.
    pub rpc: Option<String>,
    /// WebSocket/SSE `host:port`.
    pub ws: Option<String>,
    /// TCP `host:port`.
    pub tcp: Option<String>,
}

impl Config {
    /// Who this comet is in leases, and where it is reached.
    pub fn candidate(&self) -> Candidate {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "comet".into());
        Candidate {
            holder: self
                .holder
                .clone()
                .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
            rpc: self
                .advertise
                .rpc
                .clone()
                .unwrap_or_else(|| format!("http://{}", self.rpc_listen)),
            ws: self
                .advertise
                .ws
                .clone()
                .unwrap_or_else(|| self.ws_listen.to_string()),
            tcp: self
                .advertise
                .tcp
                .clone()
                .unwrap_or_else(|| self.tcp_listen.to_string()),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            shard: 0,
            shards: 1,
            membership: MembershipConfig::default(),
            advertise: Advertise::default(),
            holder: None,
            ws_listen: ([127, 0, 0, 1], 6968).into(),
            tcp_listen: ([127, 0, 0, 1], 6969).into(),
            rpc_listen: ([127, 0, 0, 1], 6970).into(),
            ops_listen: ([127, 0, 0, 1], 6971).into(),
            message_url: "http://127.0.0.1:8070".into(),
            store: storage::DirectStore::default(),
            max_subscribers_per_key: 64,
            queue_depth: 256,
            min_heartbeat_seconds: 1,
            max_heartbeat_seconds: 3600,
            heartbeat_grace_seconds: 5,
            sse_keepalive_seconds: 15,
            listener_limits: pushcluster_core::serve::ListenerLimits::default(),
            subscriber_secret: None,
            rpc_token: None,
            limits: Limits::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

/// Metrics a push operator watches on a comet.
#[derive(Clone)]
pub struct Metrics {
    connections: Family<TransportLabel, Gauge>,
    pushes: Counter,
    push_errors: Counter,
    fenced: Counter,
    deliveries: Counter,
    push_latency: Histogram,
    slow_consumers: Counter,
    reconnects_sent: Counter,
    lease_transitions: Counter,
    serving: Gauge,
    live: live::LiveMetrics,
}

impl Metrics {
    fn register(reg: &mut MetricsRegistry, slow_consumers: Counter) -> Self {
        let m = Self {
            connections: Family::default(),
            pushes: Counter::default(),
            push_errors: Counter::default(),
            fenced: Counter::default(),
            deliveries: Counter::default(),
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            slow_consumers,
            reconnects_sent: Counter::default(),
            lease_transitions: Counter::default(),
            serving: Gauge::default(),
            live: live::LiveMetrics::default(),
        };
        reg.register(
            "pushcluster_comet_live_messages",
            "Stored private messages that arrived on the live channels of this comet's keys (Redis)",
            m.live.messages.clone(),
        );
        reg.register(
            "pushcluster_comet_live_losses",
            "Times the connection subscribed to live channels was lost; each closes every client connection",
            m.live.losses.clone(),
        );
        reg.register(
            "pushcluster_comet_live_refused",
            "Connections refused because their key's live channel was not subscribed in time",
            m.live.refused.clone(),
        );
        reg.register(
            "pushcluster_comet_serving",
            "1 while this comet holds a shard, 0 while it is a standby",
            m.serving.clone(),
        );
        reg.register(
            "pushcluster_comet_lease_transitions",
            "Times this comet started or stopped serving a shard",
            m.lease_transitions.clone(),
        );
        reg.register(
            "pushcluster_comet_connections",
            "Open subscriber connections",
            m.connections.clone(),
        );
        reg.register(
            "pushcluster_comet_pushes",
            "Pushes stored and delivered",
            m.pushes.clone(),
        );
        reg.register(
            "pushcluster_comet_push_errors",
            "Pushes that failed",
            m.push_errors.clone(),
        );
        reg.register(
            "pushcluster_comet_fenced_appends",
            "Appends straight to Redis refused because a newer holder of the shard wrote (split brain averted)",
            m.fenced.clone(),
        );
        reg.register(
            "pushcluster_comet_deliveries",
            "Messages queued on connections",
            m.deliveries.clone(),
        );
        reg.register(
            "pushcluster_comet_push_latency_seconds",
            "Time from push received to queued on connections (includes storing)",
            m.push_latency.clone(),
        );
        reg.register(
            "pushcluster_comet_slow_consumers_dropped",
            "Connections closed because their queue was full",
            m.slow_consumers.clone(),
        );
        reg.register(
            "pushcluster_comet_reconnect_frames",
            "Reconnect frames sent to clients",
            m.reconnects_sent.clone(),
        );
        m
    }

    /// Counts a connection dropped for not taking what it was sent.
    pub(crate) fn slow_consumer(&self) {
        self.slow_consumers.inc();
    }

    fn conn_gauge(&self, transport: &'static str) -> Gauge {
        self.connections
            .get_or_create(&TransportLabel { transport })
            .clone()
    }
}

/// How long a call to the message service may take.
const STORE_DEADLINE: Duration = Duration::from_secs(10);

/// Number of locks pushes to keys are serialised on; keys that share one only
/// wait for each other's store round trip.
const PUSH_STRIPES: usize = 4096;

/// Shared state of one comet.
pub struct Comet {
    cfg: Config,
    registry: Arc<Registry>,
    /// The message service: SSE resumes read from it.
    message: MessageClient<AuthChannel>,
    /// Where pushes are stored: Redis directly, or the message service.
    storage: storage::Storage,
    /// With Redis: the live channels private messages arrive on.
    live: Option<Arc<live::LiveFeed>>,
    /// Stops the live feed when the comet goes.
    live_stop: CancellationToken,
    membership: Arc<dyn Membership>,
    /// The shard served now (static: fixed; leases: follows the owner).
    ownership: watch::Receiver<Ownership>,
    /// The ring over present shards plus our own, which our membership view
    /// may not show yet right after we acquire it.
    ring: RwLock<Arc<Ring>>,
    ready: Readiness,
    stripes: Vec<tokio::sync::Mutex<()>>,
    metrics: Metrics,
}

impl Drop for Comet {
    fn drop(&mut self) {
        self.live_stop.cancel();
    }
}

/// A refusal at subscribe time, sent as a protocol error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `-p`: a parameter is wrong.
    Param,
    /// `-a`: the token does not authorise this key.
    Auth,
    /// `-c`: the key cannot take this connection here.
    Channel,
}

impl Refusal {
    /// The error frame for this refusal.
    pub fn frame(self) -> &'static [u8] {
        match self {
            Refusal::Param => frame::ERR_PARAM,
            Refusal::Auth => frame::ERR_AUTH,
            Refusal::Channel => frame::ERR_CHANNEL,
        }
    }
}

impl Comet {
    /// Builds the comet state; `membership` says which keys this comet owns.
    pub fn new(
        cfg: Config,
        membership: Arc<dyn Membership>,
        ownership: watch::Receiver<Ownership>,
        reg: &mut MetricsRegistry,
    ) -> Result<Arc<Self>, Error> {
        let slow = Counter::default();
        let registry = Registry::new(cfg.max_subscribers_per_key, cfg.queue_depth, slow.clone());
        let token = RpcToken::new(cfg.rpc_token.as_deref())
            .map_err(|e| Error::Config(format!("rpc_token: {e}")))?;
        let channel = tonic::transport::Endpoint::from_shared(cfg.message_url.clone())
            .map_err(|e| Error::Config(format!("message_url: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(STORE_DEADLINE)
            .tcp_nodelay(true)
            .connect_lazy();
        let channel = token.on(channel);
        let max = pushcluster_proto::max_rpc_bytes(cfg.limits.max_message_bytes);
        let message = MessageClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let metrics = Metrics::register(reg, slow);
        let storage = storage::Storage::open(
            &cfg.store,
            &cfg.limits,
            message.clone(),
            STORE_DEADLINE,
            metrics.fenced.clone(),
        )
        .map_err(|e| Error::Config(format!("store: {e}")))?;
        let live_stop = CancellationToken::new();
        let live = match cfg.store.url() {
            Some(url) => Some(
                live::LiveFeed::start(
                    url,
                    &cfg.store.redis_namespace,
                    registry.clone(),
                    metrics.live.clone(),
                    live_stop.clone(),
                )
                .map_err(|e| Error::Config(format!("store: {e}")))?,
            ),
            None => None,
        };
        let comet = Arc::new(Self {
            registry,
            message,
            storage,
            live,
            live_stop,
            membership,
            ownership,
            ring: RwLock::new(Arc::new(Ring::new([], DEFAULT_VNODES))),
            ready: Readiness::default(),
            stripes: (0..PUSH_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            metrics,
            cfg,
        });
        comet.refresh();
        Ok(comet)
    }

    /// Recomputes the ring from membership and ownership. Readiness does not
    /// follow ownership: a standby is Ready (healthy, able to take a shard at
    /// once), and routing follows the Lease holders instead, so a comet
    /// Deployment becomes Available and its rollouts finish.
    fn refresh(&self) {
        let mine = self.ownership.borrow().shard();
        let view = self.membership.view();
        let ring = Ring::new(
            view.endpoints
                .keys()
                .copied()
                .chain(mine)
                .collect::<std::collections::BTreeSet<_>>(),
            DEFAULT_VNODES,
        );
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        self.metrics.serving.set(i64::from(mine.is_some()));
    }

    /// Whether this comet serves `key` now.
    pub fn owns(&self, key: &str) -> bool {
        let Some(mine) = self.ownership.borrow().shard() else {
            return false;
        };
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner()).clone();
        ring.shard_for(key) == Some(mine)
    }

    /// Heartbeat bounds clients must respect.
    pub fn heartbeat_bounds(&self) -> HeartbeatBounds {
        HeartbeatBounds {
            min: self.cfg.min_heartbeat_seconds,
            max: self.cfg.max_heartbeat_seconds,
        }
    }

    /// A client's read deadline: its heartbeat plus the grace period.
    pub fn read_deadline(&self, heartbeat: u64) -> Duration {
        Duration::from_secs(heartbeat + self.cfg.heartbeat_grace_seconds)
    }

    /// Checks a subscribe request and registers the connection; `silence` is
    /// how long the client may send nothing (None: the server keeps it alive).
    /// With Redis, returns once the key's live channel is subscribed, so
    /// the client's fetch that follows misses nothing.
    pub async fn admit(
        &self,
        sub: &Subscribe,
        silence: Option<Duration>,
    ) -> Result<Subscription, Refusal> {
        if self.cfg.limits.check_key(&sub.key).is_err() {
            return Err(Refusal::Param);
        }
        if let Some(secret) = &self.cfg.subscriber_secret {
            let now = pushcluster_core::token::unix_now();
            if let Err(e) =
                pushcluster_core::token::verify(secret.as_bytes(), &sub.key, &sub.token, now)
            {
                tracing::debug!(key = %sub.key, error = %e, "subscriber token refused");
                return Err(Refusal::Auth);
            }
        }
        if !self.owns(&sub.key) {
            tracing::debug!(key = %sub.key, "key is not owned by this comet");
            return Err(Refusal::Channel);
        }
        let s = self.registry.register(&sub.key, silence).map_err(|e| {
            tracing::debug!(key = %sub.key, error = %e, "subscribe refused");
            match e {
                RegisterError::TooManySubscribers(_) | RegisterError::ShuttingDown => {
                    Refusal::Channel
                }
            }
        })?;
        if let Some(live) = &self.live {
            if !live.ready(&sub.key).await {
                tracing::warn!(key = %sub.key, "live channel not subscribed in time: refusing");
                return Err(Refusal::Channel);
            }
        }
        Ok(s)
    }

    /// Whether stored private messages reach connections through live
    /// channels (Redis) rather than from the comet that stored them.
    pub(crate) fn delivers_live(&self) -> bool {
        self.live.is_some()
    }

    /// The registry of connections.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counts a reconnect frame sent.
    pub fn reconnect_sent(&self) {
        self.metrics.reconnects_sent.inc();
    }

    /// Whenever membership or ownership changes: recompute the ring and
    /// readiness, and close (with a reconnect frame) the connections of keys
    /// this comet no longer owns.
    async fn follow_membership(self: Arc<Self>, cancel: CancellationToken) {
        let mut view = self.membership.watch();
        let mut owner = self.ownership.clone();
        let mut serving = owner.borrow().shard();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = view.changed() => if r.is_err() { return },
                r = owner.changed() => if r.is_err() { return },
            }
            let now = owner.borrow_and_update().shard();
            view.borrow_and_update();
            if now != serving {
                tracing::info!(from = ?serving, to = ?now, "shard ownership changed");
                self.metrics.lease_transitions.inc();
                serving = now;
            }
            self.refresh();
            let n = self.registry.close_where(|k| self.owns(k));
            if n > 0 {
                tracing::info!(
                    connections = n,
                    "keys moved away: asked clients to reconnect"
                );
            }
        }
    }
}

/// Errors that stop a comet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Membership for local mode: shards `0..shards` all present.
pub fn static_membership(cfg: &Config) -> StaticMembership {
    StaticMembership::new(
        (0..cfg.shards.max(1))
            .map(|shard| ShardEndpoint {
                shard,
                rpc: String::new(),
                ws: String::new(),
                tcp: String::new(),
            })
            .collect(),
    )
}

/// Runs a comet until `cancel` fires, then drains: stops accepting, finishes
/// in-flight pushes, flushes queued messages, closes connections.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), Error> {
    if cfg.shard >= cfg.shards.max(1) {
        return Err(Error::Config(format!(
            "shard {} is not below shards {}",
            cfg.shard, cfg.shards
        )));
    }
    let mut reg = MetricsRegistry::default();
    let background = CancellationToken::new();
    let owner_cancel = CancellationToken::new();
    let (membership, ownership, owner_task, _static_owner): (Arc<dyn Membership>, _, _, _) =
        match cfg.membership.kind {
            MembershipKind::Static => {
                let (tx, rx) = watch::channel(Ownership::Serving {
                    shard: cfg.shard,
                    token: 0,
                });
                (Arc::new(static_membership(&cfg)), rx, None, Some(tx))
            }
            MembershipKind::Redis => {
                let backend = Arc::new(
                    cfg.membership
                        .redis_backend()
                        .await
                        .map_err(|e| Error::Config(format!("membership: {e}")))?,
                );
                let membership = pushcluster_lease::membership::LeaseMembership::start(
                    backend.clone(),
                    cfg.shards,
                    cfg.membership.lease.retry_period(),
                    background.clone(),
                    pushcluster_lease::membership::MembershipMetrics::register(&mut reg),
                );
                let candidate = cfg.candidate();
                tracing::info!(holder = %candidate.holder, "standby: waiting for a shard lease");
                let (owner, rx) = ShardOwner::new(
                    backend,
                    candidate,
                    cfg.shards,
                    Some(cfg.shard),
                    cfg.membership.lease,
                );
                let task = tokio::spawn(owner.run(owner_cancel.clone()));
                (Arc::new(membership), rx, Some(task), None)
            }
            MembershipKind::Kubernetes => {
                use pushcluster_lease::kubernetes::KubeLeases;
                let (client, ns) = cfg
                    .membership
                    .kube_client()
                    .await
                    .map_err(|e| Error::Config(format!("membership: {e}")))?;
                let cluster = &cfg.membership.cluster;
                let leases = Arc::new(
                    KubeLeases::new(kube::Api::namespaced(client.clone(), &ns), cluster).owned_by(
                        cfg.membership.cluster_uid.as_deref().map(|uid| {
                            pushcluster_lease::kubernetes::push_cluster_owner(cluster, uid)
                        }),
                    ),
                );
                let _watch = leases.spawn_watcher();
                // Same ring as web: Lease holders at their addresses in the
                // comets Service's EndpointSlices. This pod patches no pod:
                // the Lease (which it may update) is all it writes.
                let membership = pushcluster_lease::endpoints::EndpointSliceMembership::start(
                    client.clone(),
                    &ns,
                    cluster,
                    background.clone(),
                );
                // The shard count follows the shard Leases the operator
                // keeps, so a reshard needs no restart (config `shards` is
                // not used here).
                let shard_count = membership.shard_count();
                let mut candidate = cfg.candidate();
                if let Ok(pod) = std::env::var("POD_NAME") {
                    // The lease holder is the pod: EndpointSlices name it.
                    candidate.holder = pod;
                } else {
                    tracing::warn!(
                        "POD_NAME is not set: web cannot find this comet's address from its Lease"
                    );
                }
                tracing::info!(holder = %candidate.holder, namespace = %ns, "standby: waiting for a shard Lease");
                let (owner, rx) = ShardOwner::following(
                    leases,
                    candidate,
                    shard_count,
                    None,
                    cfg.membership.lease,
                );
                let task = tokio::spawn(owner.run(owner_cancel.clone()));
                (Arc::new(membership), rx, Some(task), None)
            }
        };
    let comet = Comet::new(cfg.clone(), membership, ownership, &mut reg)?;
    let ready = comet.ready.clone();

    let ws_listener = tokio::net::TcpListener::bind(cfg.ws_listen).await?;
    let tcp_listener = tokio::net::TcpListener::bind(cfg.tcp_listen).await?;
    let rpc_listener = tokio::net::TcpListener::bind(cfg.rpc_listen).await?;
    tracing::info!(
        shard = cfg.shard,
        ws = %cfg.ws_listen,
        tcp = %cfg.tcp_listen,
        rpc = %cfg.rpc_listen,
        "comet listening"
    );

    // Listeners stop on `stop_accepting`; connections close on `cancel` later.
    let stop_accepting = CancellationToken::new();
    let listener_metrics = pushcluster_core::serve::ListenerMetrics::register(&mut reg);
    let caps = |name| listener_metrics.caps(name, &cfg.listener_limits);
    let (ws_caps, tcp_caps) = (caps("comet_ws"), caps("comet_tcp"));
    let ops = tokio::spawn(pushcluster_core::ops::serve_ops(
        cfg.ops_listen,
        Arc::new(reg),
        ready.clone(),
        cancel.clone(),
    ));
    // Listening and following membership: ready, holder or standby.
    ready.set(true);
    let ws_task = tokio::spawn(pushcluster_core::serve::serve(
        ws_listener,
        ws::router(comet.clone()),
        ws_caps,
        stop_accepting.clone(),
    ));
    let tcp_conns = tokio_util::task::TaskTracker::new();
    let tcp_task = tokio::spawn(tcp::serve(
        comet.clone(),
        tcp_listener,
        tcp_caps,
        stop_accepting.clone(),
        tcp_conns.clone(),
    ));
    let follow = tokio::spawn(comet.clone().follow_membership(background.clone()));
    let sweeper = tokio::spawn(sweep_silent(comet.clone(), background.clone()));
    let require = RequireToken::new(comet.cfg.rpc_token.as_deref())
        .map_err(|e| Error::Config(format!("rpc_token: {e}")))?;
    let rpc_task = tokio::spawn({
        let stop = stop_accepting.clone();
        let svc = rpc::CometRpc::new(comet.clone())
            .draining_on(stop.clone())
            .into_server();
        let incoming =
            tonic::transport::server::TcpIncoming::from(rpc_listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(require))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
    });

    cancel.cancelled().await;
    tracing::info!("comet draining");
    // Hand the shard over first, so a standby takes it while we drain.
    owner_cancel.cancel();
    if let Some(t) = owner_task {
        let _ = t.await;
    }
    ready.set(false);
    stop_accepting.cancel();
    // In-flight pushes finish (stored and queued) before connections close.
    match rpc_task.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "gRPC task failed"),
    }
    comet.registry.close_all();
    let _ = tcp_task.await;
    tcp_conns.close();
    // Each connection flushes its queue and sends the reconnect frame.
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp_conns.wait()).await;
    // axum's graceful shutdown waits for open SSE responses, which end once
    // their queues are flushed after close_all; WebSocket connections are
    // tracked apart (they left axum at the upgrade).
    let _ = tokio::time::timeout(Duration::from_secs(10), ws_task).await;
    // Every connection unregisters when it ends; the sweeper aborts those
    // that cannot flush within the grace period.
    let drained = async {
        while comet.registry.connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), drained).await;
    background.cancel();
    let _ = follow.await;
    let _ = sweeper.await;
    let _ = ops.await;
    Ok(())
}

/// How often connections are checked for silence past their deadline.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Closes silent connections (one pass per [`SWEEP_EVERY`]) until `stop`:
/// one sweep over the registry instead of a timer in every connection.
async fn sweep_silent(comet: Arc<Comet>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let n = comet.registry.sweep();
                if n > 0 {
                    tracing::debug!(connections = n, "closed for missing heartbeats");
                }
            }
        }
    }
}
