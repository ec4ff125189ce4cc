//! Desired Kubernetes objects of a PushCluster: pure functions of the
//! resource, one module per kind of object, so most operator behaviour is
//! tested without any API server.
//!
//! Every object is a k8s-openapi struct built with `..Default::default()`;
//! every one carries the cluster's labels and a controller owner reference to
//! the PushCluster (`meta`), so deleting it deletes everything. The order of
//! [`desired`] is the apply order: config and RBAC before the pods that use
//! them, policies before the pods they protect.

pub mod config;
pub mod credentials;
pub mod listeners;
pub mod network;
pub mod rbac;
pub mod rpc_tls;
pub mod services;
pub mod workloads;

use crate::crd::{ClaimAccessMode, PushCluster};
use crate::Result;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::ApiResource;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

pub use config::{config_hashes, configs, ConfigHashes, CONFIG_HASH};
pub use credentials::{credentials_name, secure, CredentialDigests};

/// Field manager of every server-side apply.
pub const MANAGER: &str = "pushcluster-operator";
/// Components of a cluster.
pub const COMPONENTS: [&str; 3] = ["comet", "message", "web"];

/// The message service's gRPC port.
pub(crate) const MESSAGE_PORT: i32 = 8070;
/// The message service's ops port (metrics, probes).
pub(crate) const MESSAGE_OPS: i32 = 8071;
/// Web's public API.
pub(crate) const WEB_PUBLIC: i32 = 8090;
/// Web's admin API (never exposed outside the cluster).
pub(crate) const WEB_ADMIN: i32 = 8091;
/// Web's ops port.
pub(crate) const WEB_OPS: i32 = 8092;

/// Labels of every object of `pc` (and `component` when given).
pub fn labels(pc: &PushCluster, component: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "pushcluster".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pc.name_any()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        ),
        (
            pushcluster_lease::kubernetes::CLUSTER_LABEL.to_owned(),
            pc.name_any(),
        ),
    ]);
    if let Some(c) = component {
        l.insert("app.kubernetes.io/component".to_owned(), c.to_owned());
    }
    l
}

/// Pod selector of one component.
pub fn selector(pc: &PushCluster, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), pc.name_any()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
    ])
}

/// The label selector string of one component's pods, for list calls.
pub fn selector_query(pc: &PushCluster, component: &str) -> String {
    join_labels(&selector(pc, component))
}

/// The label selector of every object any PushCluster owns, for watches.
pub fn managed_query() -> String {
    format!("app.kubernetes.io/managed-by={MANAGER}")
}

/// The label selector of every comet pod of any PushCluster, for list calls.
pub fn comets_query() -> String {
    "app.kubernetes.io/component=comet".to_owned()
}

/// The label selector string of every object of `pc`, for list calls.
pub fn cluster_query(pc: &PushCluster) -> String {
    format!(
        "{}={}",
        pushcluster_lease::kubernetes::CLUSTER_LABEL,
        pc.name_any()
    )
}

fn join_labels(l: &BTreeMap<String, String>) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `matchLabels` of one component's pods.
pub(crate) fn match_labels(pc: &PushCluster, component: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector(pc, component)),
        ..LabelSelector::default()
    }
}

/// Name of a component's objects: `<cluster>-<component>`.
pub fn name(pc: &PushCluster, component: &str) -> String {
    format!("{}-{component}", pc.name_any())
}

/// Metadata of a child: name, namespace, labels and the owner reference.
pub(crate) fn meta(pc: &PushCluster, name: String, component: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pc.namespace(),
        labels: Some(labels(pc, component)),
        owner_references: pc.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Whether the message service runs on the embedded store (a StatefulSet).
pub fn embedded(pc: &PushCluster) -> bool {
    pc.spec.storage.redis.is_none()
}

/// One desired child object, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Child {
    ConfigMap(ConfigMap),
    ServiceAccount(ServiceAccount),
    Role(Role),
    RoleBinding(RoleBinding),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Lease(Lease),
    NetworkPolicy(NetworkPolicy),
    Ingress(Ingress),
    HttpRoute(listeners::HTTPRoute),
    StatefulSet(StatefulSet),
    Deployment(Deployment),
    PodDisruptionBudget(PodDisruptionBudget),
}

/// Calls `$f` with the typed object inside a [`Child`], whatever its kind.
macro_rules! each_kind {
    ($child:expr, $o:ident => $body:expr) => {
        match $child {
            Child::ConfigMap($o) => $body,
            Child::ServiceAccount($o) => $body,
            Child::Role($o) => $body,
            Child::RoleBinding($o) => $body,
            Child::Service($o) => $body,
            Child::EndpointSlice($o) => $body,
            Child::Lease($o) => $body,
            Child::NetworkPolicy($o) => $body,
            Child::Ingress($o) => $body,
            Child::HttpRoute($o) => $body,
            Child::StatefulSet($o) => $body,
            Child::Deployment($o) => $body,
            Child::PodDisruptionBudget($o) => $body,
        }
    };
}

impl Child {
    /// The API resource it is applied through.
    pub fn resource(&self) -> ApiResource {
        fn of<K: Resource<DynamicType = ()>>(_: &K) -> ApiResource {
            ApiResource::erase::<K>(&())
        }
        each_kind!(self, o => of(o))
    }

    /// Its metadata.
    pub fn meta(&self) -> &ObjectMeta {
        each_kind!(self, o => o.meta())
    }

    /// Its name.
    pub fn name(&self) -> String {
        self.meta().name.clone().unwrap_or_default()
    }

    /// `Kind/name`, for events and logs.
    pub fn describe(&self) -> String {
        format!("{}/{}", self.resource().kind, self.name())
    }

    /// The object as JSON, with apiVersion and kind (what an apply sends).
    /// A shard EndpointSlice goes without `endpoints`: its holder owns them.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let mut v = each_kind!(self, o => serde_json::to_value(o))?;
        if let (Child::EndpointSlice(_), Some(o)) = (self, v.as_object_mut()) {
            o.remove("endpoints");
        }
        Ok(v)
    }
}

/// What the children depend on besides the PushCluster: facts the controller
/// read from the cluster before building them.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Digests of the generated credentials (they roll the pods that read them).
    pub creds: CredentialDigests,
    /// Access mode of the embedded store's claim (see
    /// [`crate::controller::storage`]).
    pub claim_access: ClaimAccessMode,
    /// The listener Services as the API server has them (node ports, load
    /// balancer addresses).
    pub listener_services: listeners::LiveServices,
    /// Whether the Gateway API's HTTPRoute is installed.
    pub gateway_api: bool,
    /// Digests of the Redis TLS files the pods mount from Secrets
    /// (`storage.redis.tls`), by `<secret>/<key>`: a renewed CA or client
    /// certificate rolls the pods, which read them at start.
    pub redis_tls: BTreeMap<String, String>,
    /// Digest of what the pods mount of the RPC TLS Secret, while the
    /// internal RPC runs TLS at all: a renewed certificate rolls them.
    pub rpc_tls: Option<String>,
}

impl Facts {
    /// Where each listener reaches web and the comets.
    pub fn listener_endpoints(&self, pc: &PushCluster) -> Vec<crate::crd::ListenerEndpoints> {
        listeners::listener_endpoints(pc, &self.listener_services, self.gateway_api)
    }
}

/// Every child of `pc`, in apply order.
pub fn desired(pc: &PushCluster, facts: &Facts) -> Result<Vec<Child>> {
    let hash = config_hashes(pc, facts)?;
    let mut out = vec![Child::ConfigMap(config::config_map(pc, facts)?)];
    out.extend(
        rbac::service_accounts(pc)
            .into_iter()
            .map(Child::ServiceAccount),
    );
    out.extend(rbac::roles(pc).into_iter().map(Child::Role));
    out.extend(rbac::role_bindings(pc).into_iter().map(Child::RoleBinding));
    out.extend(services::shard_services(pc).into_iter().map(Child::Service));
    out.extend(
        services::shard_endpoint_slices(pc)
            .into_iter()
            .map(Child::EndpointSlice),
    );
    out.push(Child::Service(services::comets_service(pc)));
    out.extend(
        services::component_services(pc)
            .into_iter()
            .map(Child::Service),
    );
    out.extend(services::shard_leases(pc).into_iter().map(Child::Lease));
    out.extend(listeners::services(pc).into_iter().map(Child::Service));
    out.extend(
        listeners::endpoint_slices(pc)
            .into_iter()
            .map(Child::EndpointSlice),
    );
    out.extend(listeners::ingresses(pc).into_iter().map(Child::Ingress));
    if facts.gateway_api {
        out.extend(listeners::http_routes(pc).into_iter().map(Child::HttpRoute));
    }
    out.extend(
        network::network_policies(pc)
            .into_iter()
            .map(Child::NetworkPolicy),
    );
    out.push(if embedded(pc) {
        Child::StatefulSet(workloads::message_statefulset(
            pc,
            &hash.message,
            facts.claim_access,
        ))
    } else {
        Child::Deployment(workloads::message_deployment(pc, &hash.message))
    });
    out.push(Child::Deployment(workloads::comet_deployment(
        pc,
        &hash.comet,
    )));
    out.push(Child::Deployment(workloads::web_deployment(pc, &hash.web)));
    out.extend(
        workloads::pdbs(pc)
            .into_iter()
            .map(Child::PodDisruptionBudget),
    );
    Ok(out)
}
