//! Services (per shard, the headless comets Service, message and web) and
//! the shard Leases they are named after.

use super::{labels, meta, name, selector, MESSAGE_PORT, WEB_ADMIN, WEB_PUBLIC};
use crate::crd::PushCluster;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use pushcluster_lease::kubernetes::{lease_name, SHARD_LABEL};
use std::collections::BTreeMap;

/// A Service whose ports target the pod's ports of the same names.
fn service(
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    selector: BTreeMap<String, String>,
    ports: &[(&str, i32)],
    type_: &str,
) -> Service {
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            selector: Some(selector),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: Some((*n).to_owned()),
                        port: *p,
                        target_port: Some(IntOrString::String((*n).to_owned())),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
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

/// One Service per shard, `<cluster>-comet-<k>`, selecting the pod labelled
/// `pushcluster.io/shard=k`: a stable name per shard, and the EndpointSlices
/// web routes by.
pub fn shard_services(pc: &PushCluster) -> Vec<Service> {
    let c = &pc.spec.comet;
    (0..c.shards.max(1))
        .map(|k| {
            let mut sel = selector(pc, "comet");
            sel.insert(SHARD_LABEL.to_owned(), k.to_string());
            service(
                shard_meta(pc, k),
                sel,
                &[
                    ("ws", c.ports.ws),
                    ("tcp", c.ports.tcp),
                    ("rpc", c.ports.rpc),
                ],
                "ClusterIP",
            )
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
        selector(pc, "comet"),
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
            selector(pc, component),
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
