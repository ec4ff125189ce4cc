//! Membership from EndpointSlices (Kubernetes): ring members are shards; a
//! shard's address is the ready endpoint of its Service `<cluster>-comet-<k>`;
//! when two ready endpoints claim one shard, the Lease holder wins; a shard
//! with no ready endpoint is off the ring until it returns.

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

fn shard_of(cluster: &str, s: &EndpointSlice) -> Option<u32> {
    let labels = s.metadata.labels.as_ref()?;
    labels
        .get(SHARD_LABEL)
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            labels
                .get("kubernetes.io/service-name")?
                .strip_prefix(&format!("{cluster}-comet-"))?
                .parse()
                .ok()
        })
}

fn host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Builds the view from EndpointSlices and the Lease holder (pod name) per shard.
pub fn view_from(
    cluster: &str,
    slices: &[Arc<EndpointSlice>],
    holders: &BTreeMap<u32, String>,
) -> ClusterView {
    // shard -> ready endpoints as (pod, endpoint)
    let mut claims: BTreeMap<u32, Vec<(String, ShardEndpoint)>> = BTreeMap::new();
    for s in slices {
        let Some(shard) = shard_of(cluster, s) else {
            continue;
        };
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
            let Some(ip) = e.addresses.first() else {
                continue;
            };
            if !ready {
                continue;
            }
            let pod = e
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default();
            claims.entry(shard).or_default().push((
                pod,
                ShardEndpoint {
                    shard,
                    rpc: format!("http://{}", host_port(ip, rpc)),
                    ws: host_port(ip, ws),
                    tcp: host_port(ip, tcp),
                },
            ));
        }
    }
    // Routing follows the Lease holder, not readiness alone: a pod that
    // stepped down but could not drop its shard label yet is not routed to.
    // Without any Lease for the shard (none seen yet) the first ready
    // endpoint serves.
    let chosen = claims.into_iter().filter_map(|(shard, mut eps)| {
        eps.sort_by(|a, b| a.0.cmp(&b.0));
        let pick = match holders.get(&shard) {
            None => Some(0),
            Some(holder) => eps.iter().position(|(pod, _)| pod == holder),
        };
        pick.and_then(|i| eps.into_iter().nth(i)).map(|(_, e)| e)
    });
    ClusterView::new(chosen)
}

/// The number of shards: one past the highest shard that has a Service
/// (an EndpointSlice), ready endpoints or not. The operator creates exactly
/// the shard Services of `spec.comet.shards`, so this follows the spec
/// without a restart.
pub fn shard_count(cluster: &str, slices: &[Arc<EndpointSlice>]) -> u32 {
    slices
        .iter()
        .filter_map(|s| shard_of(cluster, s))
        .max()
        .map_or(0, |k| k + 1)
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
                    let now = shard_count(&cluster, &state);
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

    /// The shard count as the shard Services say (0 until they are listed).
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

    fn slice(shard: u32, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("pc-comet-{shard}-abc"), "labels": {
                    "kubernetes.io/service-name": format!("pc-comet-{shard}"),
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

    #[test]
    fn shards_with_ready_endpoints_form_the_ring() {
        let slices = vec![
            slice(0, json!([ep("10.0.0.1", "comet-a", Some(true))])),
            slice(1, json!([ep("10.0.0.2", "comet-b", None)])),
            slice(2, json!([ep("10.0.0.3", "comet-c", Some(false))])),
        ];
        let v = view_from("pc", &slices, &BTreeMap::new());
        assert_eq!(v.endpoints.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(v.endpoints[&0].ws, "10.0.0.1:6968");
        assert_eq!(v.endpoints[&0].rpc, "http://10.0.0.1:6970");
        assert_eq!(v.endpoints[&1].tcp, "10.0.0.2:6969");
        // Shard 2's keys go elsewhere until it is back.
        for i in 0..100 {
            assert_ne!(v.ring.shard_for(&format!("k{i}")), Some(2));
        }
    }

    #[test]
    fn the_lease_holder_wins_when_two_endpoints_claim_a_shard() {
        let slices = vec![slice(
            0,
            json!([
                ep("10.0.0.1", "comet-a", Some(true)),
                ep("10.0.0.9", "comet-z", Some(true))
            ]),
        )];
        let holders = BTreeMap::from([(0, "comet-z".to_owned())]);
        assert_eq!(
            view_from("pc", &slices, &holders).endpoints[&0].ws,
            "10.0.0.9:6968"
        );
        let holders = BTreeMap::from([(0, "comet-a".to_owned())]);
        assert_eq!(
            view_from("pc", &slices, &holders).endpoints[&0].ws,
            "10.0.0.1:6968"
        );
    }

    #[test]
    fn a_ready_endpoint_that_is_not_the_lease_holder_is_not_routed_to() {
        // comet-a stepped down but still carries the shard label; comet-b
        // holds the Lease and is not labelled yet: nobody serves shard 0.
        let slices = vec![slice(0, json!([ep("10.0.0.1", "comet-a", Some(true))]))];
        let holders = BTreeMap::from([(0, "comet-b".to_owned())]);
        assert!(view_from("pc", &slices, &holders).endpoints.is_empty());
        // A released Lease names nobody.
        let released = BTreeMap::from([(0, String::new())]);
        assert!(view_from("pc", &slices, &released).endpoints.is_empty());
    }

    #[test]
    fn the_shard_count_follows_the_shard_services() {
        assert_eq!(shard_count("pc", &[]), 0);
        let slices = vec![
            slice(0, json!([])),
            slice(2, json!([ep("10.0.0.3", "c", Some(false))])),
            slice(1, json!([])),
        ];
        assert_eq!(shard_count("pc", &slices), 3);
        assert_eq!(shard_count("pc", &slices[..1]), 1);
    }

    #[test]
    fn slices_without_the_named_ports_or_of_other_services_are_ignored() {
        let mut s = (*slice(0, json!([ep("10.0.0.1", "a", Some(true))]))).clone();
        s.ports = None;
        let mut other = (*slice(1, json!([ep("10.0.0.2", "b", Some(true))]))).clone();
        other.metadata.labels = Some(BTreeMap::from([(
            "kubernetes.io/service-name".to_owned(),
            "something-else".to_owned(),
        )]));
        let v = view_from("pc", &[Arc::new(s), Arc::new(other)], &BTreeMap::new());
        assert!(v.endpoints.is_empty());
        let v6 = view_from(
            "pc",
            &[slice(3, json!([ep("fd00::1", "a", Some(true))]))],
            &BTreeMap::new(),
        );
        assert_eq!(v6.endpoints[&3].ws, "[fd00::1]:6968");
    }
}
