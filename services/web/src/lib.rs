//! Web: the HTTP API of a pushcluster.
//!
//! Two listeners, as in gopush-cluster: the public one (resolve a key's comet,
//! offline messages, time) and the admin one (push, multi-push, broadcast,
//! delete), which the public Service never exposes. Web holds no state: it
//! routes keys to comets through [`Membership`] and reads storage through the
//! message service.

pub mod admin;
pub mod public;
pub mod reply;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use pushcluster_core::key::Limits;
use pushcluster_core::membership::{Membership, ShardEndpoint, StaticMembership};
use pushcluster_core::ops::Readiness;
use pushcluster_proto::auth::{AuthChannel, RpcToken};
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_proto::v1::message_client::MessageClient;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// The OpenAPI document describing every endpoint, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Configuration of `push-web` (YAML; flags override).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct Config {
    /// Public listener: `/1/server/get`, `/1/msg/get`, `/1/time/get` and legacy forms.
    pub public_listen: SocketAddr,
    /// Admin listener: `/1/admin/...` and legacy `/admin/...`; keep it private.
    pub admin_listen: SocketAddr,
    /// Ops listener (`/metrics`, `/healthz`, `/readyz`).
    pub ops_listen: SocketAddr,
    /// gRPC URL of the message service.
    pub message_url: String,
    /// When set, admin requests need `Authorization: Bearer <token>`.
    /// Give it through `PUSH_ADMIN_TOKEN` (a Secret), not the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Secret of subscriber tokens: when set, private reads (`/1/msg/get`,
    /// `/1/time/get?k=`, `/msg/get`) need the key's token (`token=`), as the
    /// comets' subscribe does. Give it through `PUSH_SUBSCRIBER_SECRET`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber_secret: Option<String>,
    /// Whether private reads may answer JSONP (`cb`/`callback`) while
    /// subscriber tokens are on: a JSONP reply is readable by any web page
    /// that includes it, so it is off unless a deployment needs it for old
    /// browser clients. Without a subscriber secret JSONP always works.
    pub private_jsonp: bool,
    /// The cluster's internal RPC token, sent on every call to comets and
    /// the message service. Give it through `PUSH_RPC_TOKEN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_token: Option<String>,
    /// Storing private pushes straight into Redis (when the cluster's store
    /// is Redis); unset, they go through the comets. Give a URL with a
    /// password through `PUSH_REDIS_URL` (a Secret), not the config file.
    pub store: pushcluster_store::redis::DirectStore,
    /// Comets by shard (static membership).
    pub comets: Vec<ShardEndpoint>,
    /// Static (the `comets` list) or lease-based (who holds each shard's lease).
    pub membership: pushcluster_lease::MembershipConfig,
    /// Input limits.
    pub limits: Limits,
    /// Caps and header deadline of the public and admin listeners (each
    /// counted on its own).
    pub listener_limits: pushcluster_core::serve::ListenerLimits,
    /// Deadline of one call to a comet or the message service, in ms.
    pub rpc_timeout_ms: u64,
    /// After SIGTERM, how long web keeps serving while it reports unready,
    /// in ms, before its listeners close: load balancers and EndpointSlices
    /// drop a terminating pod asynchronously, and connections they still send
    /// in that time would otherwise be refused.
    pub drain_delay_ms: u64,
    /// Addresses given to clients by `/1/server/get`, as templates where
    /// `{shard}` is the shard id (e.g. `push-{shard}.example.com:443`); unset,
    /// the comet's own address is given.
    pub advertise: ClientAddresses,
}

impl Config {
    /// The gRPC message size allowed on calls to comets and the message
    /// service (see [`pushcluster_proto::max_rpc_bytes`]).
    pub fn max_rpc_bytes(&self) -> usize {
        pushcluster_proto::max_rpc_bytes(self.limits.max_message_bytes)
    }
}

/// Client-facing address templates.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientAddresses {
    /// WebSocket and SSE.
    pub ws: Option<String>,
    /// TCP.
    pub tcp: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            public_listen: ([127, 0, 0, 1], 8090).into(),
            admin_listen: ([127, 0, 0, 1], 8091).into(),
            ops_listen: ([127, 0, 0, 1], 8092).into(),
            message_url: "http://127.0.0.1:8070".into(),
            admin_token: None,
            subscriber_secret: None,
            private_jsonp: false,
            rpc_token: None,
            store: Default::default(),
            comets: vec![ShardEndpoint {
                shard: 0,
                rpc: "http://127.0.0.1:6970".into(),
                ws: "127.0.0.1:6968".into(),
                tcp: "127.0.0.1:6969".into(),
            }],
            membership: pushcluster_lease::MembershipConfig::default(),
            limits: Limits::default(),
            listener_limits: pushcluster_core::serve::ListenerLimits::default(),
            rpc_timeout_ms: 5000,
            drain_delay_ms: 0,
            advertise: ClientAddresses::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    ret: u32,
}

/// Metrics of web.
#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    push_latency: Histogram,
    stored_without_comet: Counter,
    store_retries: Counter,
}

impl Metrics {
    fn register(reg: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            stored_without_comet: Counter::default(),
            store_retries: Counter::default(),
        };
        reg.register(
            "pushcluster_web_store_retries",
            "Stores retried because the message service was unreachable",
            m.store_retries.clone(),
        );
        reg.register(
            "pushcluster_web_requests",
            "HTTP requests by route and ret",
            m.requests.clone(),
        );
        reg.register(
            "pushcluster_web_push_latency_seconds",
            "Admin push latency, from request to acknowledgement",
            m.push_latency.clone(),
        );
        reg.register(
            "pushcluster_web_stored_without_comet",
            "Pushes stored directly because no comet could take them",
            m.stored_without_comet.clone(),
        );
        m
    }

    /// Counts a finished request.
    pub fn request(&self, route: &'static str, ret: u32) {
        self.requests
            .get_or_create(&RequestLabels { route, ret })
            .inc();
    }
}

/// Shared state of the web handlers.
pub struct AppState {
    cfg: Config,
    membership: Arc<dyn Membership>,
    message: MessageClient<AuthChannel>,
    /// With Redis: private pushes are stored here, straight (see
    /// [`admin`]'s `push_private`).
    redis: Option<pushcluster_store::redis::RedisStore>,
    comets: Mutex<HashMap<String, CometClient<AuthChannel>>>,
    rpc_token: RpcToken,
    /// Private pushes per comet, coalesced into PushBatch calls under load.
    pushers: Mutex<HashMap<String, Arc<admin::Pusher>>>,
    /// Broadcasts from this web are stored and fanned out one at a time, so
    /// comets receive them in mid order.
    broadcast_order: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

impl AppState {
    /// Builds the state; `membership` tells where each shard's comet is.
    pub fn new(
        cfg: Config,
        membership: Arc<dyn Membership>,
        reg: &mut Registry,
    ) -> Result<Arc<Self>, Error> {
        let rpc_token = RpcToken::new(cfg.rpc_token.as_deref())
            .map_err(|e| Error::Config(format!("rpc_token: {e}")))?;
        let message =
            MessageClient::new(rpc_token.on(channel(&cfg.message_url, cfg.rpc_timeout_ms)?))
                .max_decoding_message_size(cfg.max_rpc_bytes())
                .max_encoding_message_size(cfg.max_rpc_bytes());
        // Lazily: web comes up (and serves reads) while Redis is down.
        let redis = cfg
            .store
            .open()
            .map_err(|e| Error::Config(format!("store: {e}")))?;
        if let Some(url) = cfg.store.url() {
            tracing::info!(url = %pushcluster_core::ops::redact_url(url), "storing private pushes straight into redis");
        }
        Ok(Arc::new(Self {
            message,
            redis,
            rpc_token,
            membership,
            comets: Mutex::new(HashMap::new()),
            pushers: Mutex::new(HashMap::new()),
            broadcast_order: tokio::sync::Mutex::new(()),
            metrics: Metrics::register(reg),
            cfg,
        }))
    }

    /// A client for the comet at `rpc` (connections are made lazily and reused).
    fn comet(&self, rpc: &str) -> Result<CometClient<AuthChannel>, Error> {
        let mut map = self.comets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(rpc) {
            return Ok(c.clone());
        }
        let c = CometClient::new(self.rpc_token.on(channel(rpc, self.cfg.rpc_timeout_ms)?))
            .max_decoding_message_size(self.cfg.max_rpc_bytes())
            .max_encoding_message_size(self.cfg.max_rpc_bytes());
        map.insert(rpc.to_owned(), c.clone());
        Ok(c)
    }
}

impl AppState {
    /// The push batcher for the comet at `rpc` (made on first use).
    fn pusher(&self, rpc: &str) -> Result<Arc<admin::Pusher>, Error> {
        if let Some(p) = self
            .pushers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(rpc)
        {
            return Ok(p.clone());
        }
        let deadline = Duration::from_millis(self.cfg.rpc_timeout_ms.max(1));
        let p = Arc::new(admin::pusher(self.comet(rpc)?, deadline));
        let mut map = self.pushers.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.entry(rpc.to_owned()).or_insert(p).clone())
    }
}

fn channel(url: &str, timeout_ms: u64) -> Result<Channel, Error> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::Config(format!("{url}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_millis(timeout_ms.max(1)))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Errors that stop web.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Once `draining` fires, every response says `Connection: close`, so
/// clients stop reusing kept-alive connections to this process during its
/// lame-duck period and open new ones, which the load balancer sends to
/// another pod; when the listeners close, no idle connection is left to
/// race a request against.
async fn close_when_draining(
    axum::extract::State(draining): axum::extract::State<CancellationToken>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut res = next.run(req).await;
    if draining.is_cancelled() {
        res.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    res
}

/// Runs web until `cancel` fires; in-flight requests finish first.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), Error> {
    let mut reg = Registry::default();
    let membership: Arc<dyn Membership> = match cfg.membership.kind {
        pushcluster_lease::MembershipKind::Static => {
            Arc::new(StaticMembership::new(cfg.comets.clone()))
        }
        pushcluster_lease::MembershipKind::Redis => {
            let backend = cfg
                .membership
                .redis_backend()
                .await
                .map_err(|e| Error::Config(format!("membership: {e}")))?;
            Arc::new(pushcluster_lease::membership::LeaseMembership::start(
                Arc::new(backend),
                cfg.membership.shards,
                cfg.membership.lease.retry_period(),
                cancel.clone(),
                pushcluster_lease::membership::MembershipMetrics::register(&mut reg),
            ))
        }
        pushcluster_lease::MembershipKind::Kubernetes => {
            let (client, ns) = cfg
                .membership
                .kube_client()
                .await
                .map_err(|e| Error::Config(format!("membership: {e}")))?;
            Arc::new(
                pushcluster_lease::endpoints::EndpointSliceMembership::start(
                    client,
                    &ns,
                    &cfg.membership.cluster,
                    cancel.clone(),
                ),
            )
        }
    };
    let state = AppState::new(cfg.clone(), membership, &mut reg)?;
    let ready = Readiness::default();
    let public = tokio::net::TcpListener::bind(cfg.public_listen).await?;
    let admin = tokio::net::TcpListener::bind(cfg.admin_listen).await?;
    let listener_metrics = pushcluster_core::serve::ListenerMetrics::register(&mut reg);
    let caps = |name| listener_metrics.caps(name, &cfg.listener_limits);
    tracing::info!(public = %cfg.public_listen, admin = %cfg.admin_listen, "web listening");
    // Lame duck: on `cancel`, report unready at once, keep serving for
    // `drain_delay_ms`, then stop accepting and finish in-flight requests.
    let stop = CancellationToken::new();
    tokio::spawn({
        let (ready, stop, cancel) = (ready.clone(), stop.clone(), cancel.clone());
        let delay = Duration::from_millis(cfg.drain_delay_ms);
        async move {
            cancel.cancelled().await;
            ready.set(false);
            if !delay.is_zero() {
                tracing::info!(?delay, "draining: unready, still serving");
                tokio::time::sleep(delay).await;
            }
            stop.cancel();
        }
    });
    let ops = tokio::spawn(pushcluster_core::ops::serve_ops(
        cfg.ops_listen,
        Arc::new(reg),
        ready.clone(),
        stop.clone(),
    ));
    let closing = || axum::middleware::from_fn_with_state(cancel.clone(), close_when_draining);
    let public_app = public::router(state.clone()).layer(closing());
    let admin_app = admin::router(state).layer(closing());
    let p = pushcluster_core::serve::serve(public, public_app, caps("web_public"), stop.clone());
    let a = pushcluster_core::serve::serve(admin, admin_app, caps("web_admin"), stop.clone());
    ready.set(true);
    tokio::join!(p, a);
    ready.set(false);
    let _ = ops.await;
    Ok(())
}
