//! The objects of `spec.listeners` and the addresses they give: for each
//! listener one object for web and one per shard — Services (ClusterIP,
//! NodePort, LoadBalancer), Ingresses, or Gateway API HTTPRoutes — and,
//! from them and what the API server filled in (node ports, load balancer
//! addresses), where clients reach web and each shard's comet.
//!
//! Service listeners: web's selects web's pods; shard `k`'s has no selector
//! and its EndpointSlice is written by the shard's Lease holder, as for
//! `<cluster>-comet-<k>`, so no failover waits for the operator. Ingresses and
//! routes point at web's public Service and at the shard Services
//! (`<cluster>-comet-<k>`, whose endpoints the holder writes).

use super::services::holder_written;
use super::{labels, meta, name, selector, WEB_PUBLIC};
use crate::crd::{
    IssuerKind, ListenerEndpoints, ListenerSpec, ListenerType, PushCluster, ShardAddresses,
};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, ResourceExt};
use pushcluster_lease::kubernetes::{lease_name, SHARD_LABEL};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Label naming the listener an object belongs to.
pub const LISTENER_LABEL: &str = "pushcluster.io/listener";
/// The comets' WebSocket and SSE port behind TLS (when a Service listener
/// has TLS).
pub const WSS_PORT: i32 = 6972;
/// Web's public API behind TLS (when a Service listener has TLS).
pub const WEB_PUBLIC_TLS: i32 = 8093;
/// Where the pods find the listener certificate.
pub const TLS_DIR: &str = "/etc/pushcluster-tls";
/// Seconds an ingress-nginx proxy keeps a quiet WebSocket or SSE stream:
/// well above any heartbeat a client may ask for.
const STREAM_TIMEOUT_SECONDS: &str = "3600";

/// A Gateway API HTTPRoute (`gateway.networking.k8s.io/v1`), the fields the
/// operator sets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced,
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

/// The Gateway a route attaches to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// One rule: everything to one Service port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    pub backend_refs: Vec<BackendRef>,
}

/// A Service port a route sends to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct BackendRef {
    pub name: String,
    pub port: i32,
}

/// The Secret the pods terminate TLS with: that of the Service listeners
/// with TLS (the schema makes them name one Secret).
pub fn pod_tls_secret(pc: &PushCluster) -> Option<&str> {
    pc.spec
        .listeners
        .iter()
        .filter(|l| l.type_.is_service())
        .find_map(|l| l.tls.as_ref()?.secret_name.as_deref())
}

/// Name of a listener's object for web (`shard` None) or a shard.
pub fn object_name(pc: &PushCluster, l: &ListenerSpec, shard: Option<i32>) -> String {
    match shard {
        None => format!("{}-{}", pc.name_any(), l.name),
        Some(k) => format!("{}-{}-{k}", pc.name_any(), l.name),
    }
}

/// `template` with `{shard}` replaced.
fn per_shard(template: &str, k: i32) -> String {
    template.replace("{shard}", &k.to_string())
}

fn shards(pc: &PushCluster) -> impl Iterator<Item = i32> {
    0..pc.spec.comet.shards.max(1)
}

/// Metadata of a listener's object: the cluster's labels, the listener's
/// (and the shard's), the listener's annotations and `extra`.
fn listener_meta(
    pc: &PushCluster,
    l: &ListenerSpec,
    shard: Option<i32>,
    extra: BTreeMap<String, String>,
) -> ObjectMeta {
    let component = if shard.is_some() { "comet" } else { "web" };
    let mut m = meta(pc, object_name(pc, l, shard), Some(component));
    let mut lb = labels(pc, Some(component));
    lb.insert(LISTENER_LABEL.into(), l.name.clone());
    if let Some(k) = shard {
        lb.insert(SHARD_LABEL.into(), k.to_string());
    }
    m.labels = Some(lb);
    let mut a = l.annotations.clone().unwrap_or_default();
    a.extend(extra);
    m.annotations = (!a.is_empty()).then_some(a);
    m
}

/// The Service ports of a Service listener: web's, and the comets' WebSocket
/// and TCP.
struct Ports {
    web: i32,
    ws: i32,
    tcp: i32,
}

fn service_ports(pc: &PushCluster, l: &ListenerSpec) -> Ports {
    let tls = l.tls.is_some();
    let given = l.ports.clone().unwrap_or_default();
    let (web, ws) = match (l.type_, tls) {
        (ListenerType::LoadBalancer, true) => (443, 443),
        (ListenerType::LoadBalancer, false) => (80, 80),
        (_, true) => (WEB_PUBLIC_TLS, WSS_PORT),
        (_, false) => (WEB_PUBLIC, pc.spec.comet.ports.ws),
    };
    Ports {
        web: given.web.unwrap_or(web),
        ws: given.ws.unwrap_or(ws),
        tcp: given.tcp.unwrap_or(pc.spec.comet.ports.tcp),
    }
}

fn port(name: &str, port: i32, target: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(target.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// A port of a selector-less Service: its target is the container port,
/// which the EndpointSlice names.
fn slice_port(name: &str, port: i32, container: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(container)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// Name prefixes of the Service listeners' per-shard Services
/// (`<cluster>-<listener>`): the holder of shard k writes `<prefix>-<k>`.
pub fn shard_service_prefixes(pc: &PushCluster) -> Vec<String> {
    pc.spec
        .listeners
        .iter()
        .filter(|l| l.type_.is_service())
        .map(|l| format!("{}-{}", pc.name_any(), l.name))
        .collect()
}

/// The EndpointSlices of the Service listeners' per-shard Services, made
/// empty by the operator (ports and labels); the shard's holder writes the
/// endpoints, which `Child::to_json` leaves out of every apply.
pub fn endpoint_slices(pc: &PushCluster) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for l in pc.spec.listeners.iter().filter(|l| l.type_.is_service()) {
        let (ws_name, ws_port) = if l.tls.is_some() {
            ("wss", WSS_PORT)
        } else {
            ("ws", pc.spec.comet.ports.ws)
        };
        for k in shards(pc) {
            let mut metadata = listener_meta(pc, l, Some(k), BTreeMap::new());
            holder_written(&mut metadata);
            let port = |name: &str, port: i32| EndpointPort {
                name: Some(name.into()),
                port: Some(port),
                protocol: Some("TCP".into()),
                app_protocol: None,
            };
            out.push(EndpointSlice {
                metadata,
                address_type: "IPv4".into(),
                endpoints: Vec::new(),
                ports: Some(vec![
                    port(ws_name, ws_port),
                    port("tcp", pc.spec.comet.ports.tcp),
                ]),
            });
        }
    }
    out
}

/// Services of the Service listeners: web's and one per shard.
pub fn services(pc: &PushCluster) -> Vec<Service> {
    let mut out = Vec::new();
    for l in pc.spec.listeners.iter().filter(|l| l.type_.is_service()) {
        let p = service_ports(pc, l);
        let tls = l.tls.is_some();
        let svc = |metadata, selector, ports| Service {
            metadata,
            spec: Some(ServiceSpec {
                type_: Some(l.type_.as_str().into()),
                selector: Some(selector),
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let web_port = if tls {
            port("https", p.web, "public-tls")
        } else {
            port("http", p.web, "public")
        };
        out.push(svc(
            listener_meta(pc, l, None, BTreeMap::new()),
            selector(pc, "web"),
            vec![web_port],
        ));
        for k in shards(pc) {
            // No selector: the shard's Lease holder writes its own address
            // into the Service's EndpointSlice ([`endpoint_slices`]), so
            // the Service follows a failover with no operator running.
            let ws = if tls {
                slice_port("wss", p.ws, WSS_PORT)
            } else {
                slice_port("ws", p.ws, pc.spec.comet.ports.ws)
            };
            let mut s = svc(
                listener_meta(pc, l, Some(k), BTreeMap::new()),
                BTreeMap::new(),
                vec![ws, slice_port("tcp", p.tcp, pc.spec.comet.ports.tcp)],
            );
            if let Some(spec) = s.spec.as_mut() {
                spec.selector = None;
            }
            out.push(s);
        }
    }
    out
}

/// What a host-routed listener (Ingress, Gateway) routes: web's host to
/// web's public Service, and each shard's host to the shard's Service
/// (whose endpoints its holder writes): `(shard, host, Service, port)`.
fn routed(
    pc: &PushCluster,
    host: &str,
    shard_host: &str,
) -> Vec<(Option<i32>, String, String, i32)> {
    std::iter::once((None, host.to_owned(), name(pc, "web"), WEB_PUBLIC))
        .chain(shards(pc).map(|k| {
            (
                Some(k),
                per_shard(shard_host, k),
                lease_name(&pc.name_any(), k as u32),
                pc.spec.comet.ports.ws,
            )
        }))
        .collect()
}

/// What an Ingress of `l` is annotated with: long stream timeouts and no
/// buffering for ingress-nginx (other controllers ignore them; see the
/// README for theirs), and the cert-manager issuer.
fn ingress_annotations(l: &ListenerSpec) -> BTreeMap<String, String> {
    let nginx = |k: &str| format!("nginx.ingress.kubernetes.io/{k}");
    let mut a = BTreeMap::from([
        (nginx("proxy-read-timeout"), STREAM_TIMEOUT_SECONDS.into()),
        (nginx("proxy-send-timeout"), STREAM_TIMEOUT_SECONDS.into()),
        // SSE events must reach the client as they are written.
        (nginx("proxy-buffering"), "off".into()),
    ]);
    if let Some(issuer) = l.tls.as_ref().and_then(|t| t.issuer.as_ref()) {
        let key = match issuer.kind {
            IssuerKind::ClusterIssuer => "cert-manager.io/cluster-issuer",
            IssuerKind::Issuer => "cert-manager.io/issuer",
        };
        a.insert(key.into(), issuer.name.clone());
    }
    a
}

/// The TLS Secret of an Ingress of `l` (web's: `shard` None).
pub fn ingress_secret(pc: &PushCluster, l: &ListenerSpec, shard: Option<i32>) -> Option<String> {
    let tls = l.tls.as_ref()?;
    Some(match (&tls.secret_name, shard) {
        (Some(s), Some(k)) => per_shard(s, k),
        (Some(s), None) => s.replace("{shard}", "web"),
        (None, _) => format!("{}-tls", object_name(pc, l, shard)),
    })
}

/// Ingresses of the Ingress listeners: web's and one per shard.
pub fn ingresses(pc: &PushCluster) -> Vec<Ingress> {
    let mut out = Vec::new();
    for l in pc
        .spec
        .listeners
        .iter()
        .filter(|l| l.type_ == ListenerType::Ingress)
    {
        let (Some(host), Some(shard_host)) = (&l.host, &l.shard_host) else {
            continue;
        };
        let ingress = |shard: Option<i32>, host: String, service: String, port: i32| Ingress {
            metadata: listener_meta(pc, l, shard, ingress_annotations(l)),
            spec: Some(IngressSpec {
                ingress_class_name: l.ingress_class_name.clone(),
                rules: Some(vec![IngressRule {
                    host: Some(host.clone()),
                    http: Some(HTTPIngressRuleValue {
                        paths: vec![HTTPIngressPath {
                            path: Some("/".into()),
                            path_type: "Prefix".into(),
                            backend: IngressBackend {
                                service: Some(IngressServiceBackend {
                                    name: service,
                                    port: Some(ServiceBackendPort {
                                        number: Some(port),
                                        ..ServiceBackendPort::default()
                                    }),
                                }),
                                ..IngressBackend::default()
                            },
                        }],
                    }),
                }]),
                tls: ingress_secret(pc, l, shard).map(|secret| {
                    vec![IngressTLS {
                        hosts: Some(vec![host]),
                        secret_name: Some(secret),
                    }]
                }),
                ..IngressSpec::default()
            }),
            ..Ingress::default()
        };
        for (shard, host, service, port) in routed(pc, host, shard_host) {
            out.push(ingress(shard, host, service, port));
        }
    }
    out
}

/// HTTPRoutes of the Gateway listeners: web's and one per shard.
pub fn http_routes(pc: &PushCluster) -> Vec<HTTPRoute> {
    let mut out = Vec::new();
    for l in pc.spec.listeners.iter() {
        let (Some(gw), Some(host), Some(shard_host)) = (&l.gateway, &l.host, &l.shard_host) else {
            continue;
        };
        let route = |shard: Option<i32>, host: String, service: String, port: i32| HTTPRoute {
            metadata: listener_meta(pc, l, shard, BTreeMap::new()),
            spec: HTTPRouteSpec {
                parent_refs: vec![ParentRef {
                    name: gw.name.clone(),
                    namespace: gw.namespace.clone(),
                    section_name: gw.section_name.clone(),
                }],
                hostnames: vec![host],
                rules: vec![RouteRule {
                    backend_refs: vec![BackendRef {
                        name: service,
                        port,
                    }],
                }],
            },
        };
        for (shard, host, service, port) in routed(pc, host, shard_host) {
            out.push(route(shard, host, service, port));
        }
    }
    out
}

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
