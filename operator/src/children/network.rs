//! NetworkPolicies: each port open only to whom it serves (see
//! [`crate::crd::NetworkPolicySpec`]).

use super::{match_labels, meta, name, MESSAGE_OPS, MESSAGE_PORT, WEB_ADMIN, WEB_OPS, WEB_PUBLIC};
use crate::crd::PushCluster;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// An ingress rule: `ports` (TCP) from `from`; `None` = from anyone.
fn rule(ports: &[i32], from: Option<Vec<NetworkPolicyPeer>>) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule {
        ports: Some(
            ports
                .iter()
                .map(|p| NetworkPolicyPort {
                    protocol: Some("TCP".into()),
                    port: Some(IntOrString::Int(*p)),
                    ..NetworkPolicyPort::default()
                })
                .collect(),
        ),
        from,
    }
}

/// The cluster's NetworkPolicies, one per component; none when disabled.
pub fn network_policies(pc: &PushCluster) -> Vec<NetworkPolicy> {
    let np = &pc.spec.network_policy;
    if !np.enabled {
        return Vec::new();
    }
    // `podSelector: {}` alone = every pod of the policy's namespace.
    let own_namespace = || {
        vec![NetworkPolicyPeer {
            pod_selector: Some(LabelSelector::default()),
            ..NetworkPolicyPeer::default()
        }]
    };
    let or_own = |p: &Vec<NetworkPolicyPeer>| {
        if p.is_empty() {
            own_namespace()
        } else {
            p.clone()
        }
    };
    let pods_of = |components: &[&str]| {
        components
            .iter()
            .map(|c| NetworkPolicyPeer {
                pod_selector: Some(match_labels(pc, c)),
                ..NetworkPolicyPeer::default()
            })
            .collect()
    };
    let public = (!np.public_from.is_empty()).then(|| np.public_from.clone());
    let monitoring = or_own(&np.monitoring_from);
    let c = &pc.spec.comet.ports;
    let policy = |component: &str, ingress: Vec<NetworkPolicyIngressRule>| NetworkPolicy {
        metadata: meta(pc, name(pc, component), Some(component)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(pc, component)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    };
    vec![
        policy(
            "comet",
            vec![
                rule(&[c.ws, c.tcp], public.clone()),
                rule(&[c.rpc], Some(pods_of(&["web"]))),
                rule(&[c.ops], Some(monitoring.clone())),
            ],
        ),
        policy(
            "message",
            vec![
                rule(&[MESSAGE_PORT], Some(pods_of(&["comet", "web"]))),
                rule(&[MESSAGE_OPS], Some(monitoring.clone())),
            ],
        ),
        policy(
            "web",
            vec![
                rule(&[WEB_PUBLIC], public),
                rule(&[WEB_ADMIN], Some(or_own(&np.admin_from))),
                rule(&[WEB_OPS], Some(monitoring)),
            ],
        ),
    ]
}
