//! The state of one comet: its connections, where it stores and receives
//! pushes, which keys it owns (the ring over its membership), and admission
//! of subscribers.

use crate::metrics::Metrics;
use crate::protocol::{HeartbeatBounds, Subscribe};
use crate::registry::{Delivery, LiveOffer, RegisterError, Registry, Subscription};
use crate::storage::{PushPath, STORE_DEADLINE};
use crate::{Config, Error};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry as MetricsRegistry;
use pushcluster_core::frame;
use pushcluster_core::membership::Membership;
use pushcluster_core::ops::Readiness;
use pushcluster_core::ring::{Ring, DEFAULT_VNODES};
use pushcluster_lease::owner::Ownership;
use pushcluster_proto::auth::AuthChannel;
use pushcluster_proto::auth::RpcToken;
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::message_client::MessageClient;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Number of locks pushes to keys are serialised on; keys that share one only
/// wait for each other's store round trip.
const PUSH_STRIPES: usize = 4096;

/// Shared state of one comet.
pub struct Comet {
    pub(crate) cfg: Config,
    pub(crate) registry: Arc<Registry>,
    /// The message service: SSE resumes read from it.
    pub(crate) message: MessageClient<AuthChannel>,
    /// Where pushes are stored and how stored messages reach connections,
    /// chosen once from the storage kind.
    pub(crate) path: PushPath,
    /// Stops the live feed (Redis) when the comet goes.
    pub(crate) live_stop: CancellationToken,
    pub(crate) membership: Arc<dyn Membership>,
    /// The shard served now (static: fixed; leases: follows the owner).
    pub(crate) ownership: watch::Receiver<Ownership>,
    /// The ring over present shards plus our own, which our membership view
    /// may not show yet right after we acquire it.
    pub(crate) ring: RwLock<Arc<Ring>>,
    pub(crate) ready: Readiness,
    pub(crate) stripes: Vec<tokio::sync::Mutex<()>>,
    pub(crate) metrics: Metrics,
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

/// A lazily connected, authenticated client of the message service.
pub(crate) fn message_client(cfg: &Config) -> Result<MessageClient<AuthChannel>, Error> {
    let token = RpcToken::new(cfg.rpc_token.as_deref()).map_err(Error::RpcToken)?;
    let tls = pushcluster_proto::tls::ClientTls::load(cfg.rpc_tls.as_ref())?;
    let channel = pushcluster_proto::tls::endpoint(&cfg.message_url, tls.as_ref())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(STORE_DEADLINE)
        .tcp_nodelay(true)
        .connect_lazy();
    let max = pushcluster_proto::max_rpc_bytes(cfg.limits.max_message_bytes);
    Ok(MessageClient::new(token.on(channel))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
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
        let message = message_client(&cfg)?;
        let metrics = Metrics::register(reg, slow, cfg.store.url().is_some());
        let live_stop = CancellationToken::new();
        let ready = Readiness::default();
        let path = PushPath::open(
            &cfg,
            message.clone(),
            &registry,
            &metrics,
            &ready,
            &live_stop,
        )?;
        let comet = Arc::new(Self {
            registry,
            message,
            path,
            live_stop,
            membership,
            ownership,
            ring: RwLock::new(Arc::new(Ring::new([], DEFAULT_VNODES))),
            ready,
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
    pub(crate) fn refresh(&self) {
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
            if let Err(e) = pushcluster_core::token::verify(
                secret.as_bytes(),
                &sub.key,
                &sub.token,
                now,
                self.cfg.subscriber_token_max_seconds,
            ) {
                tracing::debug!(key = %sub.key, error = %e, "subscriber token refused");
                self.metrics.token_refusals.inc();
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
        if let Some(live) = self.path.live() {
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
        self.path.live().is_some()
    }

    /// The registry of connections.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Queues a private message stored by someone else (web's store around
    /// this comet) on `key`'s connections, unless they already had it;
    /// returns how many took it.
    pub(crate) fn deliver_private(&self, key: &str, m: pb::StoredMessage) -> Result<u64, String> {
        self.cfg.limits.check_key(key).map_err(|e| e.to_string())?;
        let d = Delivery::new(m.mid, m.gid, m.payload);
        let n = match self.registry.offer_live(key, &d, true) {
            LiveOffer::Delivered(n) => n,
            _ => 0,
        };
        Ok(n)
    }

    /// Counts a reconnect frame sent.
    pub fn reconnect_sent(&self) {
        self.metrics.reconnects_sent.inc();
    }

    /// Whenever membership or ownership changes: recompute the ring and
    /// readiness, and close (with a reconnect frame) the connections of keys
    /// this comet no longer owns.
    pub(crate) async fn follow_membership(self: Arc<Self>, cancel: CancellationToken) {
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
            let n = self.registry.reconnect_unless(|k| self.owns(k));
            if n > 0 {
                tracing::info!(
                    connections = n,
                    "keys moved away: asked clients to reconnect"
                );
            }
        }
    }
}
