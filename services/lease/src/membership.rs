//! Membership from leases: a shard is on the ring while somebody holds its
//! lease, at the address stored with it.

use crate::LeaseBackend;
use pushcluster_core::membership::{ClusterView, Membership};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    ) -> Self {
        let (tx, rx) = watch::channel(Arc::new(ClusterView::new([])));
        tokio::spawn(async move {
            loop {
                match backend.snapshot(shards).await {
                    Ok(snap) => {
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
                    _ = backend.changed() => {}
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
