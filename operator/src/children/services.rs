//! Services (per shard, the headless comets Service, message and web) and
//! the shard Leases they are named after.

use super::{labels, meta, name, selector, MESSAGE_PORT, WEB_ADMIN, WEB_PUBLIC};
use crate::crd::PushCluster;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use pushcluster_lease::kubernetes::{lease_name, SHARD_LABEL};
use std::collections::BTreeMap;

/// A Service whose ports target the selected pods' ports of the same names;
/// without a selector, its EndpointSlices' port numbers (the same as its own).
fn service(
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    selector: Option<BTreeMap<String, String>>,
    ports: &[(&str, i32)],
    type_: &str,
) -> Service {
    let target = |n: &str, p: i32| match selector {
        Some(_) => IntOrString::String(n.to_owned()),
        None => IntOrString::Int(p),
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: Some((*n).to_owned()),
                        port: *p,
                        target_port: Some(target(n, *p)),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            selector,
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Metadata of shard `k`'s objects: `<cluster>-comet-<k>`, labelled with it.
fn shard_meta(
    pc: &PushCluster,
    k: i32,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    let mut m = meta(pc, lease_name(&pc.name_any(), k as u32), Some("comet"));
    m.labels = Some({
        let mut l = labels(pc, Some("comet"));
        l.insert(SHARD_LABEL.to_owned(), k.to_string());
        l
    });
    m
}

/// The ports a shard is reached on: name and port (the container's).
fn shard_ports(pc: &PushCluster) -> [(&'static str, i32); 3] {
    let p = &pc.spec.comet.ports;
    [("ws", p.ws), ("tcp", p.tcp), ("rpc", p.rpc)]
}

/// One Service per shard, `<cluster>-comet-<k>`, without a selector: its
/// EndpointSlice of the same name is written by the shard's Lease holder
/// ([`shard_endpoint_slices`]), so what reaches a shard by name (a load
/// balancer or Ingress per shard, the target of advertised addresses)
/// follows the holder without waiting for the operator.
pub fn shard_services(pc: &PushCluster) -> Vec<Service> {
    (0..pc.spec.comet.shards.max(1))
        .map(|k| service(shard_meta(pc, k), None, &shard_ports(pc), "ClusterIP"))
        .collect()
}

/// Value of `endpointslice.kubernetes.io/managed-by` on the shard slices:
/// not the EndpointSlice controller's, so it leaves them alone.
pub const SLICE_MANAGER: &str = "pushcluster-comet";

/// Labels `metadata` (named as its Service) as the EndpointSlice of that
/// Service which a shard's holder writes, not the EndpointSlice controller.
pub(crate) fn holder_written(
    metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) {
    let svc = metadata.name.clone().unwrap_or_default();
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert("kubernetes.io/service-name".into(), svc);
    labels.insert(
        "endpointslice.kubernetes.io/managed-by".into(),
        SLICE_MANAGER.into(),
    );
}

/// The EndpointSlice `<cluster>-comet-<k>` of each shard Service, with the
/// Service's ports and labels. The operator makes them and owns everything
/// but `endpoints`, which only the shard's holder writes (its pod address,
/// when it takes the Lease): `Child::to_json` leaves that field out.
pub fn shard_endpoint_slices(pc: &PushCluster) -> Vec<EndpointSlice> {
    (0..pc.spec.comet.shards.max(1))
        .map(|k| {
            let mut metadata = shard_meta(pc, k);
            holder_written(&mut metadata);
            EndpointSlice {
                metadata,
                address_type: "IPv4".into(),
                endpoints: Vec::new(),
                ports: Some(
                    shard_ports(pc)
                        .iter()
                        .map(|(n, p)| EndpointPort {
                            name: Some((*n).into()),
                            port: Some(*p),
                            protocol: Some("TCP".into()),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            }
        })
        .collect()
}

/// The headless Service over every comet, `<cluster>-comets`: its
/// EndpointSlices tell web and the comets each comet pod's address and
/// readiness; the shard Leases tell which pod serves which shard.
pub fn comets_service(pc: &PushCluster) -> Service {
    let c = &pc.spec.comet.ports;
    let mut s = service(
        meta(
            pc,
            pushcluster_lease::endpoints::comets_service(&pc.name_any()),
            Some("comet"),
        ),
        Some(selector(pc, "comet")),
        &[("ws", c.ws), ("tcp", c.tcp), ("rpc", c.rpc)],
        "ClusterIP",
    );
    if let Some(spec) = s.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
    }
    s
}

/// The shard Leases `<cluster>-comet-<k>`, made by the operator (without a
/// holder) so comets need no right to create Leases: they may only get and
/// update these names. Only metadata is applied; the comets own the spec.
pub fn shard_leases(pc: &PushCluster) -> Vec<Lease> {
    (0..pc.spec.comet.shards.max(1))
        .map(|k| Lease {
            metadata: shard_meta(pc, k),
            spec: None,
        })
        .collect()
}

/// Services of message (gRPC), web's public listener and web's admin listener
/// (never exposed outside the cluster).
pub fn component_services(pc: &PushCluster) -> Vec<Service> {
    let of = |object: &str, component: &str, port: (&str, i32), type_: &str| {
        service(
            meta(pc, name(pc, object), Some(component)),
            Some(selector(pc, component)),
            &[port],
            type_,
        )
    };
    vec![
        of("message", "message", ("grpc", MESSAGE_PORT), "ClusterIP"),
        of(
            "web",
            "web",
            ("public", WEB_PUBLIC),
            pc.spec.web.service_type.as_str(),
        ),
        of("web-admin", "web", ("admin", WEB_ADMIN), "ClusterIP"),
    ]
}
