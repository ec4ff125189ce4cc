//! Who serves which shard: the seam between routing and the way membership is
//! learned. Web asks it where a key's comet is; a comet asks it which keys it
//! owns. This crate has the static implementation (local mode, from config);
//! the Kubernetes (EndpointSlices + Leases) and Redis lease implementations
//! plug in behind the same trait.

use crate::ring::{Ring, DEFAULT_VNODES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// Where one shard's comet can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEndpoint {
    /// Shard id (0..shards).
    pub shard: u32,
    /// gRPC URL of the comet, e.g. `http://127.0.0.1:6970`.
    pub rpc: String,
    /// WebSocket address given to clients (`host:port`; they connect to `/sub`).
    pub ws: String,
    /// TCP address given to clients (`host:port`).
    pub tcp: String,
}

/// One consistent view of the cluster: the ring and the present shards' endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// Ring over the shards present now.
    pub ring: Ring,
    /// Endpoint of every present shard.
    pub endpoints: BTreeMap<u32, ShardEndpoint>,
}

impl ClusterView {
    /// A view in which exactly the given shards are present.
    pub fn new(endpoints: impl IntoIterator<Item = ShardEndpoint>) -> Self {
        let endpoints: BTreeMap<u32, ShardEndpoint> =
            endpoints.into_iter().map(|e| (e.shard, e)).collect();
        let ring = Ring::new(endpoints.keys().copied(), DEFAULT_VNODES);
        Self { ring, endpoints }
    }

    /// The endpoint of the shard that owns `key` now.
    pub fn endpoint_for(&self, key: &str) -> Option<&ShardEndpoint> {
        self.ring
            .shard_for(key)
            .and_then(|s| self.endpoints.get(&s))
    }
}

/// Source of the current cluster view, with change notification.
pub trait Membership: Send + Sync + 'static {
    /// Watches the view; the current value is always available.
    fn watch(&self) -> watch::Receiver<Arc<ClusterView>>;

    /// The view now.
    fn view(&self) -> Arc<ClusterView> {
        self.watch().borrow().clone()
    }
}

/// A fixed membership from configuration: every configured shard is present.
pub struct StaticMembership {
    tx: watch::Sender<Arc<ClusterView>>,
}

impl StaticMembership {
    /// Membership of exactly these shards, forever.
    pub fn new(endpoints: Vec<ShardEndpoint>) -> Self {
        let (tx, _) = watch::channel(Arc::new(ClusterView::new(endpoints)));
        Self { tx }
    }
}

impl Membership for StaticMembership {
    fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(shard: u32) -> ShardEndpoint {
        ShardEndpoint {
            shard,
            rpc: format!("http://127.0.0.1:{}", 7000 + shard),
            ws: format!("127.0.0.1:{}", 8000 + shard),
            tcp: format!("127.0.0.1:{}", 9000 + shard),
        }
    }

    #[test]
    fn routes_every_key_to_a_present_shard() {
        let m = StaticMembership::new(vec![ep(0), ep(1), ep(2)]);
        let v = m.view();
        for i in 0..1000 {
            let k = format!("k{i}");
            let e = v.endpoint_for(&k).unwrap();
            assert_eq!(Some(e.shard), v.ring.shard_for(&k));
        }
        assert!(ClusterView::new([]).endpoint_for("a").is_none());
    }
}
