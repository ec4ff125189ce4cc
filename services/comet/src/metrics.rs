//! The metrics a push operator watches on a comet.

use crate::live;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as MetricsRegistry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

/// Metrics a push operator watches on a comet.
#[derive(Clone)]
pub struct Metrics {
    connections: Family<TransportLabel, Gauge>,
    pub(crate) pushes: Counter,
    pub(crate) push_errors: Counter,
    pub(crate) fenced: Counter,
    pub(crate) deliveries: Counter,
    pub(crate) push_latency: Histogram,
    pub(crate) delivery_latency: Histogram,
    pub(crate) token_refusals: Counter,
    pub(crate) slow_consumers: Counter,
    pub(crate) reconnects_sent: Counter,
    pub(crate) lease_transitions: Counter,
    pub(crate) serving: Gauge,
    pub(crate) live: live::LiveMetrics,
}

impl Metrics {
    /// Registers a comet's metrics in `reg`; `live`: those of the Redis
    /// live feed too.
    pub(crate) fn register(reg: &mut MetricsRegistry, slow_consumers: Counter, live: bool) -> Self {
        let m = Self {
            connections: Family::default(),
            pushes: Counter::default(),
            push_errors: Counter::default(),
            fenced: Counter::default(),
            deliveries: Counter::default(),
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            delivery_latency: Histogram::new(exponential_buckets(0.00005, 2.0, 18)),
            token_refusals: Counter::default(),
            slow_consumers,
            reconnects_sent: Counter::default(),
            lease_transitions: Counter::default(),
            serving: Gauge::default(),
            live: live::LiveMetrics::default(),
        };
        // Only on Redis: an embedded-store comet has no live feed, and a
        // `live_up` stuck at 0 there would read as a feed lost.
        if live {
            m.register_live(reg);
        }
        reg.register(
            "pushcluster_comet_delivery_latency_seconds",
            "From a private message reaching the comet (stored by it, or from Redis's live feed right after the store script) to its frame being handed to a subscriber connection's writer; per connection",
            m.delivery_latency.clone(),
        );
        reg.register(
            "pushcluster_comet_token_refusals",
            "Subscriptions refused because their subscriber token was missing, expired or wrong",
            m.token_refusals.clone(),
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

    /// Records a private message handed to a connection's writer.
    pub(crate) fn delivered(&self, d: &crate::registry::Delivery) {
        if d.gid == pushcluster_core::GID_PRIVATE {
            self.delivery_latency.observe(d.at.elapsed().as_secs_f64());
        }
    }

    /// Counts a connection dropped for not taking what it was sent.
    pub(crate) fn slow_consumer(&self) {
        self.slow_consumers.inc();
    }

    pub(crate) fn conn_gauge(&self, transport: &'static str) -> Gauge {
        self.connections
            .get_or_create(&TransportLabel { transport })
            .clone()
    }
}

impl Metrics {
    fn register_live(&self, reg: &mut MetricsRegistry) {
        reg.register(
            "pushcluster_comet_live_messages",
            "Stored private messages that arrived on the live channels of this comet's keys (Redis)",
            self.live.messages.clone(),
        );
        reg.register(
            "pushcluster_comet_live_losses",
            "Times the connection subscribed to live channels was lost (closed, failed, or no answer to PING); open client connections stay",
            self.live.losses.clone(),
        );
        reg.register(
            "pushcluster_comet_live_up",
            "1 while the connection subscribed to live channels is up and answers PING (Redis); the comet is unready while it is 0",
            self.live.up.clone(),
        );
        reg.register(
            "pushcluster_comet_live_filled",
            "Messages read from the store and delivered to fill a gap in a key's live stream (after the live connection was lost, or a message skipped ahead)",
            self.live.filled.clone(),
        );
        reg.register(
            "pushcluster_comet_live_dropped",
            "Messages from live channels not delivered as they came: already delivered, unreadable, or skipping ahead (then read from the store instead)",
            self.live.dropped.clone(),
        );
        reg.register(
            "pushcluster_comet_live_resets",
            "Keys whose stored sequence was found to have gone backwards (Redis lost data)",
            self.live.resets.clone(),
        );
        reg.register(
            "pushcluster_comet_live_unverified",
            "Live messages whose signature was missing or did not hold (forged, or from a writer that does not sign): the key was read from the store instead",
            self.live.unverified.clone(),
        );
        reg.register(
            "pushcluster_comet_live_lag_seconds",
            "PING round trips on the live feed's connection: how far behind Redis the feed runs (over 3 s the connection is dropped and keys are filled from the store)",
            self.live.lag.clone(),
        );
        reg.register(
            "pushcluster_comet_live_refused",
            "Connections refused because their key's live channel was not subscribed in time",
            self.live.refused.clone(),
        );
    }
}
