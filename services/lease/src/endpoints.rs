//! Membership from Leases and EndpointSlices (Kubernetes): ring members are
//! the shards whose Leases exist; a shard's address is its Lease holder's
//! ready endpoint in the headless Service over all comets (`<cluster>-comets`);
//! a shard without a ready holder is off the ring until it returns.

use crate::kubernetes::{CLUSTER_LABEL, SHARD_LABEL};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use pushcluster_core::membership::{ClusterView, Membership, ShardEndpoint};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Port names on per-shard Services.
pub const PORT_WS: &str = "ws";
/// TCP subscriber port name.
pub const PORT_TCP: &str = "tcp";
/// gRPC port name.
pub const PORT_RPC: &str = "rpc";

/// Name of the headless Service over every comet of `cluster`: its
/// EndpointSlices map comet pods to addresses and readiness.
pub fn comets_service(cluster: &str) -> String {
    format!("{cluster}-comets")
}

fn host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Ready comet pods of `cluster` and their endpoints (shard not yet set).
fn ready_comets(cluster: &str, slices: &[Arc<EndpointSlice>]) -> BTreeMap<String, ShardEndpoint> {
    let service = comets_service(cluster);
    let mut out = BTreeMap::new();
    for s in slices {
        let of_service = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .is_some_and(|n| *n == service);
        if !of_service {
            continue;
        }
        let port = |name: &str| {
            s.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| p.port)
        };
        let (Some(ws), Some(tcp), Some(rpc)) = (port(PORT_WS), port(PORT_TCP), port(PORT_RPC))
        else {
            continue;
        };
        for e in &s.endpoints {
            // An unset `ready` means ready (EndpointSlice API semantics).
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let (Some(ip), Some(pod)) = (
                e.addresses.first(),
                e.target_ref.as_ref().and_then(|r| r.name.clone()),
            ) else {
                continue;
            };
            if ready {
                out.insert(
                    pod,
                    ShardEndpoint {
                        shard: 0,
                        rpc: format!("http://{}", host_port(ip, rpc)),
                        ws: host_port(ip, ws),
                        tcp: host_port(ip, tcp),
                    },
                );
            }
        }
    }
    out
}

/// Builds the view from the comets Service's EndpointSlices and the Lease
/// holder (pod name) per shard: a shard is served by its holder's address
/// while the holder is a ready endpoint. No pod label is involved, so comets
/// need no right to patch pods: the Lease says who, the EndpointSlice where.
/// A released Lease (no holder) or a holder that is not ready puts the shard
/// off the ring until it is served again.
pub fn view_from(
    cluster: &str,
    slices: &[Arc<EndpointSlice>],
    holders: &BTreeMap<u32, String>,
) -> ClusterView {
    let ready = ready_comets(cluster, slices);
    ClusterView::new(holders.iter().filter_map(|(shard, holder)| {
        ready.get(holder).map(|e| ShardEndpoint {
            shard: *shard,
            ..e.clone()
        })
    }))
}

/// The number of shards: one past the highest shard Lease. The operator
/// creates exactly the Leases of `spec.comet.shards` (and deletes the rest),
/// so this follows the spec without a restart.
pub fn shard_count(shard_leases: &BTreeMap<u32, String>) -> u32 {
    shard_leases.keys().next_back().map_or(0, |k| k + 1)
}

/// Follows EndpointSlices and Leases of one cluster.
pub struct EndpointSliceMembership {
    rx: watch::Receiver<Arc<ClusterView>>,
    shards: watch::Receiver<u32>,
}

impl EndpointSliceMembership {
    /// Starts watching in `namespace` for `cluster`.
    pub fn start(
        client: Client,
        namespace: &str,
        cluster: &str,
        cancel: CancellationToken,
    ) -> Self {
        let (tx, rx) = watch::channel(Arc::new(ClusterView::new([])));
        let (count_tx, shards) = watch::channel(0u32);
        let selector = format!("{CLUSTER_LABEL}={cluster}");
        let slices_api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
        let leases_api: Api<Lease> = Api::namespaced(client, namespace);
        let (slices, slices_w) = reflector::store();
        let (leases, leases_w) = reflector::store();
        let cfg = watcher::Config::default().labels(&selector);
        let slice_events = reflector(slices_w, watcher(slices_api, cfg.clone()))
            .default_backoff()
            .map(|_| ())
            .boxed();
        let lease_events = reflector(leases_w, watcher(leases_api, cfg))
            .default_backoff()
            .map(|_| ())
            .boxed();
        let cluster = cluster.to_owned();
        tokio::spawn(async move {
            let mut events = futures::stream::select(slice_events, lease_events);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    ev = events.next() => if ev.is_none() { return },
                }
                let holders: BTreeMap<u32, String> = leases
                    .state()
                    .iter()
                    .filter_map(|l: &Arc<Lease>| {
                        let shard = l.metadata.labels.as_ref()?.get(SHARD_LABEL)?.parse().ok()?;
                        // A released Lease names nobody: "" routes nowhere.
                        let holder = l.spec.as_ref()?.holder_identity.clone().unwrap_or_default();
                        Some((shard, holder))
                    })
                    .collect();
                let state = slices.state();
                count_tx.send_if_modified(|n| {
                    let now = shard_count(&holders);
                    std::mem::replace(n, now) != now
                });
                let view = view_from(&cluster, &state, &holders);
                tx.send_if_modified(|cur| {
                    if **cur != view {
                        *cur = Arc::new(view);
                        true
                    } else {
                        false
                    }
                });
            }
        });
        Self { rx, shards }
    }

    /// The shard count as the shard Leases say (0 until they are listed).
    pub fn shard_count(&self) -> watch::Receiver<u32> {
        self.shards.clone()
    }
}

impl Membership for EndpointSliceMembership {
    fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(service: &str, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{service}-abc"), "labels": {
                    "kubernetes.io/service-name": service,
                    "pushcluster.io/cluster": "pc"}},
                "addressType": "IPv4",
                "ports": [{"name": "ws", "port": 6968}, {"name": "tcp", "port": 6969}, {"name": "rpc", "port": 6970}],
                "endpoints": endpoints
            }))
            .unwrap(),
        )
    }

    fn ep(ip: &str, pod: &str, ready: Option<bool>) -> serde_json::Value {
        json!({"addresses": [ip], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": pod}})
    }

    fn holders(h: &[(u32, &str)]) -> BTreeMap<u32, String> {
        h.iter().map(|(k, p)| (*k, (*p).to_owned())).collect()
    }

    #[test]
    fn each_shard_is_served_by_its_ready_lease_holder() {
        let slices = vec![slice(
            "pc-comets",
            json!([
                ep("10.0.0.1", "comet-a", Some(true)),
                ep("10.0.0.2", "comet-b", None),
                ep("10.0.0.3", "comet-c", Some(false)),
                ep("10.0.0.4", "standby", Some(true))
            ]),
        )];
        let v = view_from(
            "pc",
            &slices,
            &holders(&[(0, "comet-a"), (1, "comet-b"), (2, "comet-c")]),
        );
        assert_eq!(v.endpoints.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(v.endpoints[&0].ws, "10.0.0.1:6968");
        assert_eq!(v.endpoints[&0].rpc, "http://10.0.0.1:6970");
        assert_eq!(v.endpoints[&1].tcp, "10.0.0.2:6969");
        assert_eq!(v.endpoints[&1].shard, 1);
        // Shard 2's holder is not ready: its keys go elsewhere until it is.
        for i in 0..100 {
            assert_ne!(v.ring.shard_for(&format!("k{i}")), Some(2));
        }
        // The Lease decides: the same pods, shard 0 handed to the standby.
        let v = view_from("pc", &slices, &holders(&[(0, "standby"), (1, "comet-b")]));
        assert_eq!(v.endpoints[&0].ws, "10.0.0.4:6968");
    }

    #[test]
    fn a_released_lease_or_an_unknown_holder_is_not_routed_to() {
        let slices = vec![slice(
            "pc-comets",
            json!([ep("10.0.0.1", "comet-a", Some(true))]),
        )];
        assert!(view_from("pc", &slices, &holders(&[(0, "")]))
            .endpoints
            .is_empty());
        assert!(view_from("pc", &slices, &holders(&[(0, "comet-gone")]))
            .endpoints
            .is_empty());
    }

    #[test]
    fn the_shard_count_follows_the_shard_leases() {
        assert_eq!(shard_count(&BTreeMap::new()), 0);
        assert_eq!(shard_count(&holders(&[(0, ""), (2, "x"), (1, "")])), 3);
        assert_eq!(shard_count(&holders(&[(0, "")])), 1);
    }

    #[test]
    fn slices_without_the_named_ports_or_of_other_services_are_ignored() {
        let mut s = (*slice("pc-comets", json!([ep("10.0.0.1", "a", Some(true))]))).clone();
        s.ports = None;
        let other = slice("something-else", json!([ep("10.0.0.2", "b", Some(true))]));
        let v = view_from("pc", &[Arc::new(s), other], &holders(&[(0, "a"), (1, "b")]));
        assert!(v.endpoints.is_empty());
        let v6 = view_from(
            "pc",
            &[slice("pc-comets", json!([ep("fd00::1", "a", Some(true))]))],
            &holders(&[(3, "a")]),
        );
        assert_eq!(v6.endpoints[&3].ws, "[fd00::1]:6968");
    }
}
