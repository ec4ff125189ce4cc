//! NetworkPolicies: each port open only to whom it serves, and each pod
//! allowed out only to what it uses: DNS, the API server (comets and web),
//! Redis (on Redis) and the cluster's own components (see
//! [`crate::crd::NetworkPolicySpec`]).

use super::{match_labels, meta, name, MESSAGE_OPS, MESSAGE_PORT, WEB_ADMIN, WEB_OPS, WEB_PUBLIC};
use crate::crd::PushCluster;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// An ingress rule: `ports` (TCP) from `from`; `None` = from anyone.
fn rule(ports: &[i32], from: Option<Vec<NetworkPolicyPeer>>) -> NetworkPolicyIngressRule {
    let tcp: Vec<(i32, &str)> = ports.iter().map(|p| (*p, "TCP")).collect();
    NetworkPolicyIngressRule {
        ports: ports_of(&tcp),
        from,
    }
}

fn ports_of(ports: &[(i32, &str)]) -> Option<Vec<NetworkPolicyPort>> {
    Some(
        ports
            .iter()
            .map(|(p, proto)| NetworkPolicyPort {
                protocol: Some((*proto).into()),
                port: Some(IntOrString::Int(*p)),
                ..NetworkPolicyPort::default()
            })
            .collect(),
    )
}

/// An egress rule: `ports` to `to`; `None` = to anywhere.
fn out(ports: &[(i32, &str)], to: Option<Vec<NetworkPolicyPeer>>) -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        ports: ports_of(ports),
        to,
    }
}

/// The port of `redis://host:port/db` (6379 when it has none or is unknown).
pub fn redis_port(url: Option<&str>) -> i32 {
    url.and_then(|u| u.split_once("://"))
        .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or_default())
        .map(|hostport| hostport.rsplit_once('@').map_or(hostport, |(_, h)| h))
        .and_then(|h| h.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(6379)
}

/// Every port the services reach Redis on: the node's (mode Single), the
/// Sentinels' and the Cluster seeds', plus 6379 in those two modes, where
/// the data nodes' addresses come from Redis itself and are not in the spec
/// (data nodes on other ports need them allowed by hand).
pub fn redis_ports(r: &crate::crd::RedisSpec) -> Vec<i32> {
    use crate::crd::RedisMode;
    let of = |hostports: &[String]| -> Vec<i32> {
        hostports
            .iter()
            .filter_map(|h| h.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
            .chain([6379])
            .collect()
    };
    let mut ports = match r.mode.unwrap_or_default() {
        RedisMode::Single => vec![redis_port(r.url.as_deref())],
        RedisMode::Sentinel => r.sentinel.as_ref().map_or(vec![6379], |s| of(&s.addresses)),
        RedisMode::Cluster => r.cluster.as_ref().map_or(vec![6379], |c| of(&c.nodes)),
    };
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The cluster's NetworkPolicies, one per component; none when disabled.
pub fn network_policies(pc: &PushCluster) -> Vec<NetworkPolicy> {
    let tls = super::listeners::pod_tls_secret(pc).is_some();
    let tls_ports = |p: i32| if tls { vec![p] } else { vec![] };
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
    let nonempty = |p: &Vec<NetworkPolicyPeer>| (!p.is_empty()).then(|| p.clone());
    let dns = out(&[(53, "UDP"), (53, "TCP")], None);
    let api_server = out(&[(443, "TCP"), (6443, "TCP")], nonempty(&np.api_server_to));
    let redis = pc.spec.storage.redis.as_ref().map(|r| {
        let ports: Vec<(i32, &str)> = redis_ports(r).into_iter().map(|p| (p, "TCP")).collect();
        out(&ports, nonempty(&np.redis_to))
    });
    let to_message = out(&[(MESSAGE_PORT, "TCP")], Some(pods_of(&["message"])));
    let policy = |component: &str,
                  ingress: Vec<NetworkPolicyIngressRule>,
                  egress: Vec<NetworkPolicyEgressRule>| NetworkPolicy {
        metadata: meta(pc, name(pc, component), Some(component)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(pc, component)),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    };
    vec![
        policy(
            "comet",
            vec![
                rule(
                    &[&[c.ws, c.tcp][..], &tls_ports(super::listeners::WSS_PORT)].concat(),
                    public.clone(),
                ),
                rule(&[c.rpc], Some(pods_of(&["web"]))),
                rule(&[c.ops], Some(monitoring.clone())),
            ],
            [dns.clone(), api_server.clone(), to_message.clone()]
                .into_iter()
                .chain(redis.clone())
                .collect(),
        ),
        policy(
            "message",
            vec![
                rule(&[MESSAGE_PORT], Some(pods_of(&["comet", "web"]))),
                rule(&[MESSAGE_OPS], Some(monitoring.clone())),
            ],
            [dns.clone()].into_iter().chain(redis.clone()).collect(),
        ),
        policy(
            "web",
            vec![
                rule(
                    &[
                        &[WEB_PUBLIC][..],
                        &tls_ports(super::listeners::WEB_PUBLIC_TLS),
                    ]
                    .concat(),
                    public,
                ),
                rule(&[WEB_ADMIN], Some(or_own(&np.admin_from))),
                rule(&[WEB_OPS], Some(monitoring)),
            ],
            [
                dns,
                api_server,
                to_message,
                out(&[(c.rpc, "TCP")], Some(pods_of(&["comet"]))),
            ]
            .into_iter()
            .chain(redis)
            .collect(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_ports_follow_the_mode() {
        let spec = |v: serde_json::Value| -> crate::crd::RedisSpec {
            serde_json::from_value(v).expect("redis spec")
        };
        assert_eq!(
            super::redis_ports(&spec(serde_json::json!({"url": "redis://r:6380/0"}))),
            vec![6380]
        );
        assert_eq!(
            super::redis_ports(&spec(serde_json::json!({
                "mode": "Sentinel",
                "sentinel": {"masterName": "m", "addresses": ["s1:26379", "s2:26379"]}
            }))),
            vec![6379, 26379]
        );
        assert_eq!(
            super::redis_ports(&spec(serde_json::json!({
                "mode": "Cluster",
                "cluster": {"nodes": ["n1:7000", "n2:7001"]}
            }))),
            vec![6379, 7000, 7001]
        );
    }

    #[test]
    fn redis_ports_come_from_the_url() {
        assert_eq!(super::redis_port(Some("redis://redis.team-a:6380/0")), 6380);
        assert_eq!(super::redis_port(Some("redis://u:p@r:7000")), 7000);
        assert_eq!(super::redis_port(Some("rediss://[::1]:6390/1?x=1")), 6390);
        assert_eq!(super::redis_port(Some("redis://redis")), 6379);
        assert_eq!(super::redis_port(None), 6379);
    }
}
