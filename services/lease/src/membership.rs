//! Membership from leases: a shard is on the ring while somebody holds its
//! lease, at the address stored with it.

use crate::LeaseBackend;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use pushcluster_core::membership::{ClusterView, Membership};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: u32,
}

/// Metrics of lease-based membership.
#[derive(Clone, Default)]
pub struct MembershipMetrics {
    without_holder: Family<ShardLabel, Counter<f64, AtomicU64>>,
    holder_changes: Family<ShardLabel, Counter>,
    held: Family<ShardLabel, Gauge>,
    held_since: Family<ShardLabel, Gauge<f64, AtomicU64>>,
}

impl MembershipMetrics {
    /// Registers the metrics in `reg`.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self::default();
        reg.register(
            "pushcluster_shard_without_holder_seconds",
            "Time each shard spent with no lease holder, as seen by this process",
            m.without_holder.clone(),
        );
        reg.register(
            "pushcluster_shard_holder_changes",
            "Lease holder changes per shard, as seen by this process",
            m.holder_changes.clone(),
        );
        reg.register(
            "pushcluster_shard_held",
            "1 while the shard's lease has a holder, 0 while it has none, as seen by this process",
            m.held.clone(),
        );
        reg.register(
            "pushcluster_shard_holder_since_timestamp_seconds",
            "When this process first saw the shard's current holder (Unix time); the holder's age is time() minus this",
            m.held_since.clone(),
        );
        m
    }

    /// Records the holders seen in one snapshot (`tokens[k]`: shard k's
    /// holder's fencing token, none without a holder) against the last.
    fn observe(&self, before: Option<&[Option<u64>]>, tokens: &[Option<u64>], dt: f64) {
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        for (k, a) in tokens.iter().enumerate() {
            let l = ShardLabel { shard: k as u32 };
            let b = before.and_then(|b| b.get(k)).copied().flatten();
            if let Some(before) = before {
                if before.get(k).copied().flatten().is_none() {
                    self.without_holder.get_or_create(&l).inc_by(dt);
                }
                if b != *a && a.is_some() {
                    self.holder_changes.get_or_create(&l).inc();
                }
            }
            self.held.get_or_create(&l).set(i64::from(a.is_some()));
            if a.is_some() && (before.is_none() || b != *a) {
                self.held_since.get_or_create(&l).set(unix_now);
            }
        }
    }
}

/// Watches leases and publishes the cluster view.
pub struct LeaseMembership {
    rx: watch::Receiver<Arc<ClusterView>>,
}

impl LeaseMembership {
    /// Starts following the leases of shards `0..shards`, re-reading them on
    /// every lease event and at least every `poll`.
    pub fn start<B: LeaseBackend>(
        backend: Arc<B>,
        shards: u32,
        poll: Duration,
        cancel: CancellationToken,
        metrics: MembershipMetrics,
    ) -> Self {
        let (tx, rx) = watch::channel(Arc::new(ClusterView::new([])));
        tokio::spawn(async move {
            let mut prev: Option<(Instant, Vec<Option<u64>>)> = None;
            let mut changes = backend.changes();
            loop {
                // Seen before reading, so an event during the read wakes the wait below.
                changes.borrow_and_update();
                match backend.snapshot(shards).await {
                    Ok(snap) => {
                        let now = Instant::now();
                        let tokens: Vec<Option<u64>> =
                            snap.iter().map(|r| r.as_ref().map(|r| r.token)).collect();
                        let (before, dt) = match &prev {
                            Some((then, before)) => {
                                (Some(before.as_slice()), (now - *then).as_secs_f64())
                            }
                            None => (None, 0.0),
                        };
                        metrics.observe(before, &tokens, dt);
                        prev = Some((now, tokens));
                        let view = ClusterView::new(snap.iter().flatten().map(|r| r.endpoint()));
                        tx.send_if_modified(|cur| {
                            if **cur != view {
                                tracing::info!(shards = ?view.endpoints.keys().collect::<Vec<_>>(), "membership changed");
                                *cur = Arc::new(view);
                                true
                            } else {
                                false
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "reading leases failed"),
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = changes.changed() => if r.is_err() {
                        // The backend is gone: poll only.
                        tokio::time::sleep(poll).await;
                    },
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        });
        Self { rx }
    }
}

impl Membership for LeaseMembership {
    fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.rx.clone()
    }
}
