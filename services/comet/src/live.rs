//! Live channels: how a comet on Redis learns of stored private messages.
//!
//! Whoever stores a private message in Redis (web, a comet, the message
//! service) runs one script that assigns its mid, appends it and publishes
//! it on the key's live channel (`pushcluster_store::redis::live`). A comet
//! subscribes to the live channel of every key it holds connections for,
//! on one Redis connection, and queues what arrives on those connections.
//! So a push is one round trip from web to Redis and one message from Redis
//! to the comet, with no reply back: docs/benchmarks.md (S3) has the CPU
//! this saves. Without Redis, the comet delivers what it stores itself.
//!
//! Why nothing is missed:
//! - A connection is admitted (its client gets `+h` and then fetches what
//!   it missed) only once its key's channel is subscribed. A message stored
//!   before the subscription is in that fetch; one stored after it is
//!   published to this comet. Clients dedupe by mid.
//! - Redis runs scripts one at a time and sends a subscriber messages in the
//!   order they were published, so each key's messages arrive in mid order,
//!   whichever web or comet stored them, and whoever the web's membership
//!   view thought owned the key.
//! - Redis forgets a connection's subscriptions with the connection. When it
//!   is lost, every connection is closed with a reconnect frame (clients
//!   come back and fetch what they missed by mid), and new connections wait
//!   for the new subscription as at any other time.

use crate::registry::{Delivery, Registry};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use pushcluster_core::GID_PRIVATE;
use pushcluster_store::redis::live;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How long a new connection waits for its key's channel before it is
/// refused (its client retries): Redis is down or far behind.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// Pause between attempts to connect to Redis, doubled up to the maximum.
const RETRY: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Most channels in one SUBSCRIBE or UNSUBSCRIBE: a reconnect storm of
/// 50,000 keys goes out in a few dozen commands, none of them huge.
const BATCH: usize = 2048;

/// A batch of (un)subscriptions in flight: the keys it subscribes, once
/// Redis has confirmed it.
type Update = BoxFuture<'static, (Vec<Box<str>>, redis::RedisResult<()>)>;

/// A comet's subscriptions to live channels; see the module docs.
pub struct LiveFeed {
    ns: String,
    registry: Arc<Registry>,
    /// Bumped whenever keys become live, so waiting connections look again.
    changed: watch::Sender<u64>,
    metrics: LiveMetrics,
}

/// Counters of the live feed.
#[derive(Clone, Default)]
pub(crate) struct LiveMetrics {
    /// Messages that arrived on live channels.
    pub messages: Counter,
    /// Times the subscribing connection was lost (or could not be made).
    pub losses: Counter,
    /// Connections refused because their key's channel was not subscribed in time.
    pub refused: Counter,
}

/// Why the live feed's subscribing connection stopped serving.
#[derive(Debug, thiserror::Error)]
enum Stopped {
    #[error("shutting down")]
    ShuttingDown,
    #[error("the connection closed")]
    Closed,
    #[error("subscribing failed: {0}")]
    Failed(#[source] redis::RedisError),
    #[error("the registry is gone")]
    RegistryGone,
}

impl LiveFeed {
    /// Starts subscribing for `registry`'s keys on the Redis at `url`, with
    /// keys under namespace `ns`; runs until `cancel`.
    pub(crate) fn start(
        url: &str,
        ns: &str,
        registry: Arc<Registry>,
        metrics: LiveMetrics,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let (tx, rx) = mpsc::unbounded_channel();
        registry.report_key_changes(tx);
        let feed = Arc::new(Self {
            ns: ns.to_owned(),
            registry,
            changed: watch::Sender::new(0),
            metrics,
        });
        tokio::spawn(feed.clone().run(client, rx, cancel));
        Ok(feed)
    }

    /// Waits until `key` (which has just been registered) is subscribed;
    /// false when it was not in time.
    pub(crate) async fn ready(&self, key: &str) -> bool {
        let mut changed = self.changed.subscribe();
        let wait = async {
            loop {
                if self.registry.is_live(key) {
                    return true;
                }
                if changed.changed().await.is_err() {
                    return false;
                }
            }
        };
        let ok = tokio::time::timeout(SUBSCRIBE_WAIT, wait)
            .await
            .unwrap_or(false);
        if !ok {
            self.metrics.refused.inc();
        }
        ok
    }

    async fn run(
        self: Arc<Self>,
        client: redis::Client,
        mut changes: mpsc::UnboundedReceiver<Box<str>>,
        cancel: CancellationToken,
    ) {
        let mut pause = RETRY;
        loop {
            let connected = tokio::select! {
                _ = cancel.cancelled() => return,
                c = client.get_async_pubsub() => c,
            };
            match connected {
                Ok(pubsub) => {
                    pause = RETRY;
                    tracing::info!("subscribing to live channels");
                    let why = self.serve(pubsub, &mut changes, &cancel).await;
                    if cancel.is_cancelled() {
                        return;
                    }
                    tracing::warn!(error = %why, "live channels lost: reconnecting clients");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to live channels"),
            }
            self.metrics.losses.inc();
            // Whatever was published meanwhile reached no one here: the
            // clients reconnect and fetch it.
            self.registry.unset_live();
            self.registry.reconnect_all();
            self.changed.send_modify(|n| *n += 1);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    /// Subscribes and delivers on one connection until it fails; says why.
    async fn serve(
        &self,
        pubsub: redis::aio::PubSub,
        changes: &mut mpsc::UnboundedReceiver<Box<str>>,
        cancel: &CancellationToken,
    ) -> Stopped {
        let (sink, mut stream) = pubsub.split();
        // Every key with connections now, then every key that changes.
        let mut pending: HashSet<Box<str>> = self.registry.unset_live().into_iter().collect();
        let mut in_flight: Option<Update> = None;
        loop {
            if in_flight.is_none() && !pending.is_empty() {
                in_flight = Some(self.update(&sink, &mut pending));
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Stopped::ShuttingDown,
                msg = stream.next() => match msg {
                    Some(m) => self.deliver(&m),
                    None => return Stopped::Closed,
                },
                done = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    let (subscribed, result) = done;
                    if let Err(e) = result {
                        return Stopped::Failed(e);
                    }
                    for key in &subscribed {
                        self.registry.set_live(key);
                    }
                    self.changed.send_modify(|n| *n += 1);
                }
                key = changes.recv() => match key {
                    Some(k) => { pending.insert(k); }
                    None => return Stopped::RegistryGone,
                },
            }
        }
    }

    /// Brings the subscriptions of a batch of `pending` keys in line with
    /// the registry: keys with connections subscribed, others unsubscribed.
    /// Resolves to the keys subscribed once Redis has confirmed them.
    fn update(&self, sink: &redis::aio::PubSubSink, pending: &mut HashSet<Box<str>>) -> Update {
        let batch: Vec<Box<str>> = pending.iter().take(BATCH).cloned().collect();
        for k in &batch {
            pending.remove(k);
        }
        let (subscribe, unsubscribe): (Vec<Box<str>>, Vec<Box<str>>) =
            batch.into_iter().partition(|k| self.registry.has_key(k));
        let names = |keys: &[Box<str>]| -> Vec<String> {
            keys.iter().map(|k| live::channel(&self.ns, k)).collect()
        };
        let (sub_names, unsub_names) = (names(&subscribe), names(&unsubscribe));
        let (mut sub_sink, mut unsub_sink) = (sink.clone(), sink.clone());
        async move {
            // The sink sends commands in the order they are first polled:
            // unsubscribing first, so a key that left and came back ends up
            // subscribed (it is in `subscribe` only if it is back).
            let unsub = async {
                if unsub_names.is_empty() {
                    Ok(())
                } else {
                    unsub_sink.unsubscribe(unsub_names).await
                }
            };
            let sub = async {
                if sub_names.is_empty() {
                    Ok(())
                } else {
                    sub_sink.subscribe(sub_names).await
                }
            };
            let (u, s) = tokio::join!(unsub, sub);
            (subscribe, u.and(s))
        }
        .boxed()
    }

    fn deliver(&self, m: &redis::Msg) {
        let Some(key) = live::key_of(&self.ns, m.get_channel_name()) else {
            return;
        };
        let Some((mid, payload)) = live::decode(m.get_payload_bytes()) else {
            tracing::warn!(key, "unreadable message on a live channel");
            return;
        };
        self.metrics.messages.inc();
        self.registry
            .deliver(key, &Delivery::new(mid, GID_PRIVATE, payload));
    }
}
