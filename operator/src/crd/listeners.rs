//! `spec.listeners`: how clients outside the cluster reach web's public API
//! and each shard's comet, the way Strimzi exposes Kafka brokers. Every
//! listener makes one object for web and one per shard (each shard's holder
//! must be reachable by its own name or port); the addresses web gives
//! clients come from those objects.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One way in from outside.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.name in ['comet', 'comets', 'config', 'message', 'web', 'web-admin']) && !self.name.matches('-[0-9]+$')").message("listeners[].name must not be comet, comets, config, message, web or web-admin, nor end in -<number>: the cluster's own objects and other listeners' per-shard objects have those names"))]
#[x_kube(validation = Rule::new("!(self.type in ['Ingress', 'Gateway']) || (has(self.host) && has(self.shardHost))").message("listeners of type Ingress and Gateway route by host name: give host (web) and shardHost (the comets, with {shard})"))]
#[x_kube(validation = Rule::new("!has(self.shardHost) || self.shardHost.contains('{shard}')").message("listeners[].shardHost must contain {shard}: each shard needs a name of its own"))]
#[x_kube(validation = Rule::new("self.type != 'NodePort' || has(self.host)").message("a NodePort listener needs host: the address of the nodes clients connect to"))]
#[x_kube(validation = Rule::new("(self.type == 'Gateway') == has(self.gateway)").message("listeners[].gateway (the Gateway the routes attach to) goes with type Gateway, and only with it"))]
#[x_kube(validation = Rule::new("!has(self.ingressClassName) || self.type == 'Ingress'").message("listeners[].ingressClassName goes with type Ingress only"))]
#[x_kube(validation = Rule::new("!has(self.tls) || !has(self.tls.issuer) || self.type == 'Ingress'").message("listeners[].tls.issuer (cert-manager) goes with type Ingress only: for TLS in the pods, make the Certificate yourself and name its Secret in tls.secretName"))]
#[x_kube(validation = Rule::new("!has(self.tls) || self.type == 'Gateway' || has(self.tls.secretName) || has(self.tls.issuer)").message("listeners[].tls needs secretName (or, on an Ingress, issuer)"))]
#[x_kube(validation = Rule::new("!has(self.tls) || self.type != 'Gateway' || (!has(self.tls.secretName) && !has(self.tls.issuer))").message("a Gateway listener's certificate is on the Gateway: give tls: {} to say it serves TLS"))]
pub struct ListenerSpec {
    /// Name: part of the objects' names (`<cluster>-<name>`,
    /// `<cluster>-<name>-<shard>`), unique among the listeners.
    #[schemars(length(min = 1, max = 15), pattern(r"^[a-z]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// How it is exposed.
    #[serde(rename = "type")]
    pub type_: ListenerType,
    /// The name clients reach web by (Ingress, Gateway: the routed host;
    /// NodePort: any node's address; LoadBalancer: a DNS name of the load
    /// balancer, else its address once it has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(r"^[A-Za-z0-9.-]+$"))]
    pub host: Option<String>,
    /// The name of shard `{shard}`'s comet, e.g. `push-{shard}.example.com`
    /// (Ingress, Gateway: the routed host; LoadBalancer: a DNS name of each
    /// shard's load balancer, else its address once it has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(r"^[A-Za-z0-9.{}-]+$"))]
    pub shard_host: Option<String>,
    /// TLS: on an Ingress, its `tls` section (or a cert-manager issuer);
    /// on Service types, the pods terminate it with the named Secret on
    /// ports of their own (re-read when the Secret changes, no restart); on
    /// a Gateway, `{}` says the Gateway's listener serves TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// IngressClass of the Ingresses (type Ingress); unset: the cluster's
    /// default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_class_name: Option<String>,
    /// The Gateway the HTTPRoutes attach to (type Gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayRef>,
    /// Service ports (Service types): unset, 443 with TLS and 80 without
    /// on a LoadBalancer, the container ports otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<ListenerPorts>,
    /// Annotations on every object of this listener (a cloud's load
    /// balancer settings, an ingress controller's own), beside those the
    /// operator sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Whether web gives clients this listener's comet addresses
    /// (`/1/server/get`). At most one listener says so; when none does,
    /// the first one is advertised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<bool>,
}

/// How a listener is exposed.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ListenerType {
    /// A Service per shard with a stable in-cluster name.
    #[default]
    ClusterIP,
    /// A Service per shard on a port of every node.
    NodePort,
    /// A Service per shard with a load balancer of its own.
    LoadBalancer,
    /// An Ingress per shard (networking.k8s.io/v1), routed by host name;
    /// WebSocket and SSE only (the TCP protocol is not HTTP).
    Ingress,
    /// An HTTPRoute per shard (gateway.networking.k8s.io/v1) on a Gateway,
    /// when the Gateway API is installed; WebSocket and SSE only.
    Gateway,
}

impl ListenerType {
    /// The spelling in the spec (and a Service's `type`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::Ingress => "Ingress",
            Self::Gateway => "Gateway",
        }
    }

    /// Whether it is made of Services (and the pods terminate its TLS).
    pub fn is_service(&self) -> bool {
        matches!(self, Self::ClusterIP | Self::NodePort | Self::LoadBalancer)
    }
}

/// A listener's TLS.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// A Secret of type `kubernetes.io/tls` (`tls.crt`, `tls.key`). On an
    /// Ingress `{shard}` is replaced per shard (unset with an issuer:
    /// `<cluster>-<listener>-tls` and `<cluster>-<listener>-<shard>-tls`,
    /// which cert-manager fills). Service types: one Secret for the
    /// cluster, mounted into comets and web, its names in the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(r"^[a-z0-9.{}-]+$"))]
    pub secret_name: Option<String>,
    /// A cert-manager issuer that makes the certificates (type Ingress):
    /// the Ingresses carry its annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<IssuerRef>,
}

/// A cert-manager Issuer or ClusterIssuer.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `ClusterIssuer` (default) or `Issuer` (in the cluster's namespace).
    #[serde(default)]
    pub kind: IssuerKind,
}

/// Kind of a cert-manager issuer.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum IssuerKind {
    #[default]
    ClusterIssuer,
    Issuer,
}

/// A Gateway (gateway.networking.k8s.io) to attach routes to.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRef {
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its namespace; unset: the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// One of its listeners; unset: all that allow the routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Service ports of a listener.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListenerPorts {
    /// Web's public API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("listeners[].ports must be between 1 and 65535"))]
    pub web: Option<i32>,
    /// The comets' WebSocket and SSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("listeners[].ports must be between 1 and 65535"))]
    pub ws: Option<i32>,
    /// The comets' TCP protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("listeners[].ports must be between 1 and 65535"))]
    pub tcp: Option<i32>,
}
