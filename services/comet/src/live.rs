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
//! Why nothing is missed, and nothing unstored is delivered:
//! - A connection is admitted (its client gets `+h` and then fetches what
//!   it missed) only once its key's channel is subscribed. A message stored
//!   before the subscription is in that fetch; one stored after it is
//!   published to this comet. Clients dedupe by mid.
//! - Once a subscription is confirmed the comet reads the key's last stored
//!   mid, and from then on delivers a key's messages only in mid order, one
//!   after another (`Registry::offer_live`). A message that skips ahead
//!   (a gap) is not delivered as it came: the messages after the last one
//!   delivered are read from the store instead, which has every real one.
//!   A forged PUBLISH with an invented mid is thus never delivered.
//! - Writers sign what they publish with a key derived from the cluster's
//!   RPC token ([`live::LiveKey`]); a comet given the token delivers only
//!   messages whose signature holds for their key and mid, and reads the
//!   store for any other. So not even a forged PUBLISH with exactly the
//!   key's next mid is delivered; a writer of an older release that does
//!   not sign costs a store read per message, not a lost one.
//! - Redis runs scripts one at a time and sends a subscriber messages in the
//!   order they were published, so each key's messages arrive in mid order,
//!   whichever web or comet stored them. Writers that wait for replicas
//!   (`durability`) publish after the wait instead, so two writers' messages
//!   of one key may arrive out of order: the later mid is a gap, filled from
//!   the store up to that mid, and the earlier one is dropped as delivered.
//! - The subscribing connection is checked with a PING every second; one
//!   unanswered for `PING_DEADLINE` (a half-open connection: Redis lost, a
//!   partition) counts as lost, as does a closed one. While it is lost the
//!   comet reports unready and new connections wait, but open ones stay:
//!   once subscribed again, each key's messages stored meanwhile are read
//!   from the store and delivered (`Resubscribed::Fill`). A Redis restart
//!   costs clients a pause, not a reconnect.
//! - A key whose sequence went backwards, or started again under a new
//!   epoch (Redis lost its data), has its clients reconnect: their fetch
//!   from their last mid answers with the restarted sequence and `reset`,
//!   so they forget the old mids instead of dropping the new messages as
//!   seen. The epoch catches a restart even after the new sequence passed
//!   the mids delivered before it.

use crate::registry::{Delivery, LiveOffer, Registry, Resubscribed};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use pushcluster_core::ops::Readiness;
use pushcluster_core::GID_PRIVATE;
use pushcluster_redis::{Event, Subscriber, SubscriberHandle, Target};
use pushcluster_store::redis::{live, RedisStore};
use pushcluster_store::{Channel, Page, Seq, Store};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How long a new connection waits for its key's channel before it is
/// refused (its client retries): Redis is down or far behind.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// Pause between attempts to connect to Redis, doubled up to the maximum,
/// each with up to half again of random jitter.
const RETRY: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How often the subscribing connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A PING unanswered this long means the connection is lost: with
/// [`PING_EVERY`], a dead or half-open connection is noticed within 4 s.
/// It also bounds the feed's lag: a comet this far behind drops its backlog
/// with the connection and reads what each key missed from the store.
pub(crate) const PING_DEADLINE: Duration = Duration::from_secs(3);
/// Longest wait for a connection to Redis to open.
const CONNECT_DEADLINE: Duration = Duration::from_secs(3);

/// Most messages one gap fill delivers from the store (two pages); a key
/// that missed more has its connections reconnect and fetch for themselves.
const FILL_PAGE: Page = Page {
    messages: 256,
    bytes: 1 << 20,
};
const FILL_PAGES: usize = 2;

/// Most channels in one SUBSCRIBE or UNSUBSCRIBE: a reconnect storm of
/// 50,000 keys goes out in a few dozen commands, none of them huge.
const BATCH: usize = 2048;

/// A batch of (un)subscriptions in flight: the keys it subscribes, once
/// Redis has confirmed it.
type Update = BoxFuture<'static, (Vec<Box<str>>, redis::RedisResult<()>)>;

/// Epochs of sequences that began (mid 1 delivered) being read: the keys,
/// then their sequences.
type EpochRead = BoxFuture<
    'static,
    (
        Vec<Box<str>>,
        Result<Vec<Seq>, pushcluster_store::StoreError>,
    ),
>;

/// A comet's subscriptions to live channels; see the module docs.
pub struct LiveFeed {
    ns: String,
    registry: Arc<Registry>,
    /// Where missed messages are read from.
    store: RedisStore,
    /// The comet's readiness: down while the feed is.
    ready: Readiness,
    /// Bumped whenever keys become live, so waiting connections look again.
    changed: watch::Sender<u64>,
    metrics: LiveMetrics,
}

/// Counters of the live feed.
#[derive(Clone)]
pub(crate) struct LiveMetrics {
    /// Messages that arrived on live channels.
    pub messages: Counter,
    /// Times the subscribing connection was lost (or could not be made).
    pub losses: Counter,
    /// Connections refused because their key's channel was not subscribed in time.
    pub refused: Counter,
    /// 1 while the subscribing connection is up and answering.
    pub up: Gauge,
    /// Messages read from the store and delivered to fill a gap (after a
    /// lost connection, or a message that skipped ahead).
    pub filled: Counter,
    /// Messages dropped from a live channel: already delivered, or with a
    /// mid the store did not have (forged).
    pub dropped: Counter,
    /// Live messages whose signature was missing or did not hold (forged,
    /// or stored by a writer that does not sign yet): the key's messages
    /// were read from the store instead.
    pub unverified: Counter,
    /// Keys whose sequence was found to have gone backwards (Redis lost data).
    pub resets: Counter,
    /// PING round trips on the subscribing connection. A PING's answer comes
    /// after every message published before it, through Redis's output
    /// buffer and this comet's backlog: the live feed's lag.
    pub lag: Histogram,
}

impl Default for LiveMetrics {
    fn default() -> Self {
        Self {
            messages: Counter::default(),
            losses: Counter::default(),
            refused: Counter::default(),
            up: Gauge::default(),
            filled: Counter::default(),
            dropped: Counter::default(),
            resets: Counter::default(),
            unverified: Counter::default(),
            lag: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
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
    #[error("no answer to PING within {0:?}")]
    Unresponsive(Duration),
    #[error("reading the store: {0}")]
    Store(#[source] pushcluster_store::StoreError),
}

impl LiveFeed {
    /// Starts subscribing for `registry`'s keys on the Redis `store` writes
    /// to, with keys under namespace `ns`, reading missed messages from
    /// `store` and marking `ready` down while it is; runs until `cancel`.
    pub(crate) fn start(
        ns: &str,
        registry: Arc<Registry>,
        store: RedisStore,
        ready: Readiness,
        metrics: LiveMetrics,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let target = store.target().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        registry.report_key_changes(tx);
        let feed = Arc::new(Self {
            ns: ns.to_owned(),
            registry,
            store,
            ready,
            changed: watch::Sender::new(0),
            metrics,
        });
        tokio::spawn(feed.clone().run(target, rx, cancel));
        feed
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
        target: Target,
        mut changes: mpsc::UnboundedReceiver<Box<str>>,
        cancel: CancellationToken,
    ) {
        let mut pause = RETRY;
        loop {
            let connected = tokio::select! {
                _ = cancel.cancelled() => return,
                c = tokio::time::timeout(CONNECT_DEADLINE, Subscriber::connect(&target, true)) => c,
            };
            match connected {
                Ok(Ok((handle, stream))) => {
                    pause = RETRY;
                    tracing::info!("subscribing to live channels");
                    self.set_up(true);
                    let why = self.serve(handle, stream, &mut changes, &cancel).await;
                    if cancel.is_cancelled() {
                        return;
                    }
                    tracing::warn!(error = %why, "live channels lost: resubscribing; open connections stay");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot subscribe to live channels"),
                Err(_) => tracing::warn!(
                    "cannot subscribe to live channels: no connection within {CONNECT_DEADLINE:?}"
                ),
            }
            self.metrics.losses.inc();
            self.set_up(false);
            // New connections wait for the new subscription; open ones
            // stay, and what is published meanwhile is read from the store
            // once their key is subscribed again.
            self.registry.unset_live();
            self.changed.send_modify(|n| *n += 1);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(jittered(pause)) => {}
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    fn set_up(&self, up: bool) {
        self.metrics.up.set(i64::from(up));
        self.ready.set_dependency(up);
    }

    /// Subscribes and delivers on one connection until it fails; says why.
    async fn serve(
        &self,
        sink: SubscriberHandle,
        mut stream: futures::stream::BoxStream<'static, Event>,
        changes: &mut mpsc::UnboundedReceiver<Box<str>>,
        cancel: &CancellationToken,
    ) -> Stopped {
        // Every key with connections now, then every key that changes.
        let mut pending: HashSet<Box<str>> = self.registry.unset_live().into_iter().collect();
        let mut in_flight: Option<Update> = None;
        // Keys whose sequence began, for their epochs: read in batches, one
        // at a time, beside the feed rather than in its way (each read inline
        // held every other key's messages for a Redis round trip).
        let mut began: Vec<Box<str>> = Vec::new();
        let mut epochs: Option<EpochRead> = None;
        let mut ping: Option<(Instant, BoxFuture<'static, redis::RedisResult<()>>)> = None;
        let mut tick = tokio::time::interval(PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if in_flight.is_none() && !pending.is_empty() {
                in_flight = Some(self.update(&sink, &mut pending));
            }
            if epochs.is_none() && !began.is_empty() {
                let keys = std::mem::take(&mut began);
                let store = self.store.clone();
                epochs = Some(
                    async move {
                        let read = store.sequences(&keys).await;
                        (keys, read)
                    }
                    .boxed(),
                );
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Stopped::ShuttingDown,
                msg = stream.next() => match msg {
                    Some(Event::Message(m)) => {
                        match self.deliver(&m).await {
                            Ok(Some(key)) => began.push(key.into()),
                            Ok(None) => {}
                            Err(e) => return e,
                        }
                    }
                    Some(Event::Dropped(channel)) => {
                        // Its slot moved: subscribing again reaches the new
                        // owner, and the catch-up after it delivers what
                        // was published in between.
                        if let Some(key) = live::key_of(&self.ns, &channel) {
                            tracing::info!(key, "live channel moved with its slot: subscribing again");
                            pending.insert(key.into());
                        }
                    }
                    None => return Stopped::Closed,
                },
                done = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    let (subscribed, result) = done;
                    if let Err(e) = result {
                        return Stopped::Failed(e);
                    }
                    if let Err(e) = self.subscribed(&subscribed).await {
                        return e;
                    }
                    self.changed.send_modify(|n| *n += 1);
                }
                read = async { epochs.as_mut().expect("guarded").await }, if epochs.is_some() => {
                    epochs = None;
                    let (keys, read) = read;
                    match read {
                        Ok(seqs) => {
                            for (key, s) in keys.iter().zip(seqs) {
                                self.registry.learn_epoch(key, s.epoch);
                            }
                        }
                        Err(e) => return Stopped::Store(e),
                    }
                }
                key = changes.recv() => match key {
                    Some(k) => { pending.insert(k); }
                    None => return Stopped::RegistryGone,
                },
                answered = async { ping.as_mut().expect("guarded").1.as_mut().await }, if ping.is_some() => {
                    if let Some((sent, _)) = ping.take() {
                        self.metrics.lag.observe(sent.elapsed().as_secs_f64());
                    }
                    if let Err(e) = answered {
                        return Stopped::Failed(e);
                    }
                }
                _ = tick.tick() => {
                    match &ping {
                        Some((sent, _)) if sent.elapsed() >= PING_DEADLINE => {
                            return Stopped::Unresponsive(PING_DEADLINE);
                        }
                        Some(_) => {}
                        None => {
                            let mut sink = sink.clone();
                            let call = async move { sink.ping().await }.boxed();
                            ping = Some((Instant::now(), call));
                        }
                    }
                }
            }
        }
    }

    /// A batch of keys was confirmed subscribed: reads their last stored
    /// mids, marks them live, and delivers what each missed while its
    /// channel was away.
    async fn subscribed(&self, keys: &[Box<str>]) -> Result<(), Stopped> {
        if keys.is_empty() {
            return Ok(());
        }
        let stored = self.store.sequences(keys).await.map_err(Stopped::Store)?;
        for (key, stored) in keys.iter().zip(stored) {
            self.catch_up(key, stored).await?;
        }
        Ok(())
    }

    /// Brings `key` up to `stored`, its sequence in the store: delivers what
    /// it missed, or has its clients resync when the sequence started again.
    async fn catch_up(&self, key: &str, stored: Seq) -> Result<(), Stopped> {
        match self.registry.set_live(key, stored) {
            Resubscribed::UpToDate | Resubscribed::NoKey => Ok(()),
            Resubscribed::Fill { after } => self.fill(key, after, i64::MAX).await,
            Resubscribed::Reset => {
                // Clients dedupe by mid and would drop the restarted
                // sequence's messages: they reconnect, and their fetch from
                // their last mid tells them of the reset (`data.reset`).
                let n = self.registry.reconnect_key(key);
                tracing::warn!(
                    key,
                    connections = n,
                    "the key's sequence went backwards (Redis lost data, or it expired): clients reconnect and resync"
                );
                self.metrics.resets.inc();
                Ok(())
            }
        }
    }

    /// Brings `key` up to its last stored mid, read now.
    async fn recheck(&self, key: &str) -> Result<(), Stopped> {
        let stored = self.store.sequences(&[key]).await.map_err(Stopped::Store)?;
        match stored.first() {
            Some(&stored) => self.catch_up(key, stored).await,
            None => Ok(()),
        }
    }

    /// Delivers `key`'s stored messages after `after`, up to `until`, in
    /// order; a key that missed more than a fill carries has its
    /// connections reconnect.
    ///
    /// A gap is filled only up to the mid that revealed it: with writers
    /// that wait for replicas, a published mid is confirmed and so is every
    /// mid before it (replication is one ordered stream), but a later one
    /// in the store may not be yet; it comes on its own when it is.
    async fn fill(&self, key: &str, mut after: i64, until: i64) -> Result<(), Stopped> {
        for _ in 0..FILL_PAGES {
            let page = self
                .store
                .fetch_page(Channel::Private(key), after, FILL_PAGE)
                .await
                .map_err(Stopped::Store)?;
            for m in page.messages {
                if m.mid > until {
                    return Ok(());
                }
                after = m.mid;
                let d = Delivery::new(m.mid, GID_PRIVATE, m.payload);
                if let LiveOffer::Delivered(_) = self.registry.offer_live(key, &d, true) {
                    self.metrics.filled.inc();
                }
            }
            if !page.more {
                return Ok(());
            }
        }
        let n = self.registry.reconnect_key(key);
        tracing::info!(
            key,
            connections = n,
            "too much missed to fill: reconnecting"
        );
        Ok(())
    }

    /// Brings the subscriptions of a batch of `pending` keys in line with
    /// the registry: keys with connections subscribed, others unsubscribed.
    /// Resolves to the keys subscribed once Redis has confirmed them.
    fn update(&self, sink: &SubscriberHandle, pending: &mut HashSet<Box<str>>) -> Update {
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

    /// Delivers a message from a live channel; returns its key when it
    /// began the key's sequence (mid 1), whose epoch the caller reads: it
    /// tells a later restart apart from messages missed (see
    /// `Registry::set_live`), and the mids delivered until it is read
    /// belong to it too.
    async fn deliver<'m>(&self, m: &'m redis::Msg) -> Result<Option<&'m str>, Stopped> {
        let Some(key) = live::key_of(&self.ns, m.get_channel_name()) else {
            return Ok(None);
        };
        let Some(live) = live::decode(m.get_payload_bytes()) else {
            tracing::warn!(key, "unreadable message on a live channel");
            self.metrics.dropped.inc();
            return Ok(None);
        };
        self.metrics.messages.inc();
        if let Some(k) = self.store.live_key() {
            if !k.verify(m.get_channel_name(), &live) {
                // Forged, or from a writer without the cluster's secret:
                // only the store can say what was stored.
                self.metrics.unverified.inc();
                return self.recheck(key).await.map(|()| None);
            }
        }
        let d = Delivery::new(live.mid, GID_PRIVATE, live.payload);
        match self.registry.offer_live(key, &d, false) {
            LiveOffer::Delivered(_) if d.mid == 1 => Ok(Some(key)),
            LiveOffer::Delivered(_) | LiveOffer::NoKey => Ok(None),
            LiveOffer::Duplicate => {
                // Right after a subscription, or forged; or the key's
                // sequence started again (its keys expired, Redis lost
                // them): the store's last mid says which.
                self.metrics.dropped.inc();
                self.recheck(key).await.map(|()| None)
            }
            LiveOffer::Gap { after } => {
                // Either messages were missed, or the mid was never stored:
                // the store says which.
                self.metrics.dropped.inc();
                self.fill(key, after, d.mid).await.map(|()| None)
            }
        }
    }
}

/// `d` plus up to half of it again, at random: comets that lost Redis
/// together do not all come back in the same instant.
fn jittered(d: Duration) -> Duration {
    d + d.mul_f64(rand::random::<f64>() / 2.0)
}
