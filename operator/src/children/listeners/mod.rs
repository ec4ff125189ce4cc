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
use crate::crd::{IssuerKind, ListenerSpec, ListenerType, PushCluster};
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

mod addresses;
pub use addresses::{advertised_listener, client_addresses, listener_endpoints, LiveServices};

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
pub(crate) fn per_shard(template: &str, k: i32) -> String {
    template.replace("{shard}", &k.to_string())
}

pub(crate) fn shards(pc: &PushCluster) -> impl Iterator<Item = i32> {
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
pub(crate) struct Ports {
    pub web: i32,
    pub ws: i32,
    pub tcp: i32,
}

pub(crate) fn service_ports(pc: &PushCluster, l: &ListenerSpec) -> Ports {
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
