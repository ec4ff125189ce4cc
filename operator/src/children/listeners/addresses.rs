//! The addresses a PushCluster's listeners give: from the listener objects
//! and what the API server and the cloud filled in on them (node ports, load
//! balancer addresses), for `status.endpoints.listeners` and for the client
//! addresses web gives out.

use super::{object_name, per_shard, service_ports, shards, LISTENER_LABEL};
use crate::crd::{ListenerEndpoints, ListenerSpec, ListenerType, PushCluster, ShardAddresses};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// What the API server filled in on the listener Services, by name: the
/// node ports and load balancer addresses the addresses come from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveServices(pub BTreeMap<String, Service>);

impl LiveServices {
    /// The live Services of `pc`'s listeners, from a list of its Services.
    pub fn of(services: Vec<Service>) -> Self {
        Self(
            services
                .into_iter()
                .filter(|s| s.labels().contains_key(LISTENER_LABEL))
                .map(|s| (s.name_any(), s))
                .collect(),
        )
    }

    /// The node port of `svc`'s port `port_name`.
    fn node_port(&self, svc: &str, port_name: &str) -> Option<i32> {
        self.0
            .get(svc)?
            .spec
            .as_ref()?
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(port_name))?
            .node_port
    }

    /// The first address of `svc`'s load balancer.
    fn load_balancer(&self, svc: &str) -> Option<String> {
        let ingress = self
            .0
            .get(svc)?
            .status
            .as_ref()?
            .load_balancer
            .as_ref()?
            .ingress
            .as_ref()?
            .first()?
            .clone();
        ingress.hostname.or(ingress.ip)
    }
}

/// Where each listener reaches web and the comets, given what the API
/// server filled in; `gateway_api` says whether HTTPRoutes can exist.
pub fn listener_endpoints(
    pc: &PushCluster,
    live: &LiveServices,
    gateway_api: bool,
) -> Vec<ListenerEndpoints> {
    let ns = pc.namespace().unwrap_or_default();
    let advertised = advertised_listener(pc);
    pc.spec
        .listeners
        .iter()
        .map(|l| {
            let tls = l.tls.is_some();
            let scheme = if tls { "https" } else { "http" };
            let mut pending = None;
            let mut e = ListenerEndpoints {
                name: l.name.clone(),
                type_: l.type_.as_str().into(),
                advertised: advertised.map(|a| a.name == l.name).unwrap_or(false),
                ..ListenerEndpoints::default()
            };
            let p = service_ports(pc, l);
            let (ws_name, web_name) = if tls {
                ("wss", "https")
            } else {
                ("ws", "http")
            };
            match l.type_ {
                ListenerType::ClusterIP => {
                    let dns = |svc: String| format!("{svc}.{ns}.svc");
                    e.web = Some(format!(
                        "{scheme}://{}:{}",
                        dns(object_name(pc, l, None)),
                        p.web
                    ));
                    e.shards = shards(pc)
                        .map(|k| ShardAddresses {
                            shard: k,
                            ws: Some(format!("{}:{}", dns(object_name(pc, l, Some(k))), p.ws)),
                            tcp: Some(format!("{}:{}", dns(object_name(pc, l, Some(k))), p.tcp)),
                        })
                        .collect();
                }
                ListenerType::NodePort => {
                    let host = l.host.clone().unwrap_or_default();
                    let at = |svc: String, port: &str| {
                        live.node_port(&svc, port).map(|n| format!("{host}:{n}"))
                    };
                    e.web = at(object_name(pc, l, None), web_name).map(|a| format!("{scheme}://{a}"));
                    e.shards = shards(pc)
                        .map(|k| ShardAddresses {
                            shard: k,
                            ws: at(object_name(pc, l, Some(k)), ws_name),
                            tcp: at(object_name(pc, l, Some(k)), "tcp"),
                        })
                        .collect();
                    if e.web.is_none() || e.shards.iter().any(|s| s.ws.is_none()) {
                        pending = Some("node ports not allocated yet".to_owned());
                    }
                }
                ListenerType::LoadBalancer => {
                    let host_of = |template: Option<&String>, svc: String| {
                        template.cloned().or_else(|| live.load_balancer(&svc))
                    };
                    e.web = host_of(l.host.as_ref(), object_name(pc, l, None))
                        .map(|h| format!("{scheme}://{h}:{}", p.web));
                    e.shards = shards(pc)
                        .map(|k| {
                            let template = l.shard_host.as_ref().map(|t| per_shard(t, k));
                            let h = host_of(template.as_ref(), object_name(pc, l, Some(k)));
                            ShardAddresses {
                                shard: k,
                                ws: h.as_ref().map(|h| format!("{h}:{}", p.ws)),
                                tcp: h.as_ref().map(|h| format!("{h}:{}", p.tcp)),
                            }
                        })
                        .collect();
                    if e.web.is_none() || e.shards.iter().any(|s| s.ws.is_none()) {
                        pending = Some("load balancers without an address yet".to_owned());
                    }
                }
                ListenerType::Ingress | ListenerType::Gateway => {
                    let port = if tls { 443 } else { 80 };
                    e.web = l.host.as_ref().map(|h| format!("{scheme}://{h}"));
                    e.shards = shards(pc)
                        .map(|k| ShardAddresses {
                            shard: k,
                            ws: l
                                .shard_host
                                .as_ref()
                                .map(|t| format!("{}:{port}", per_shard(t, k))),
                            tcp: None,
                        })
                        .collect();
                    if l.type_ == ListenerType::Gateway && !gateway_api {
                        pending = Some(
                            "the Gateway API (gateway.networking.k8s.io/v1 HTTPRoute) is not installed"
                                .to_owned(),
                        );
                    }
                }
            }
            e.pending = pending;
            e
        })
        .collect()
}

/// The listener web advertises: the one that says so, else the first.
pub fn advertised_listener(pc: &PushCluster) -> Option<&ListenerSpec> {
    let l = &pc.spec.listeners;
    l.iter()
        .find(|l| l.advertise == Some(true))
        .or_else(|| l.first())
}

/// What web gives clients: the advertised listener's addresses where it
/// has them (a shard without one yet keeps its comet's own address), or
/// the hand-set templates of `comet.advertise`.
pub fn client_addresses(
    pc: &PushCluster,
    endpoints: &[ListenerEndpoints],
) -> push_web::ClientAddresses {
    let mut out = push_web::ClientAddresses {
        ws: pc.spec.comet.advertise.as_ref().and_then(|a| a.ws.clone()),
        tcp: pc.spec.comet.advertise.as_ref().and_then(|a| a.tcp.clone()),
        ..Default::default()
    };
    if let Some(e) = endpoints.iter().find(|e| e.advertised) {
        for s in &e.shards {
            let k = s.shard as u32;
            if let Some(ws) = &s.ws {
                out.ws_by_shard.insert(k, ws.clone());
            }
            if let Some(tcp) = &s.tcp {
                out.tcp_by_shard.insert(k, tcp.clone());
            }
        }
    }
    out
}
