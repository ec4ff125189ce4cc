//! `spec.listeners`: the objects each type makes, their TLS settings, and
//! the addresses web gives clients, from the listener example and what an
//! API server fills in (node ports, load balancer addresses).

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, PodSpec, Service, ServiceStatus,
};
use k8s_openapi::api::networking::v1::Ingress;
use kube::ResourceExt;
use push_operator::children::listeners::{
    self, client_addresses, listener_endpoints, HTTPRoute, LiveServices, LISTENER_LABEL,
};
use push_operator::children::{config, desired, Child, Facts};
use push_operator::crd::PushCluster;
use std::collections::BTreeMap;
use std::path::Path;

fn example() -> PushCluster {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("examples/pushcluster-listeners.yaml")).unwrap();
    let mut pc: PushCluster = serde_yaml::from_str(&text).unwrap();
    pc.metadata.namespace = Some("team-a".into());
    pc.metadata.uid = Some("0000-uid".into());
    pc
}

fn facts(live: LiveServices, gateway_api: bool) -> Facts {
    Facts {
        listener_services: live,
        gateway_api,
        ..Facts::default()
    }
}

/// The listener Services as an API server returns them: node ports
/// allocated (30000 + a count) and, for LoadBalancer ones, an address.
fn allocated(pc: &PushCluster) -> LiveServices {
    let mut next = 30000;
    let services = listeners::services(pc)
        .into_iter()
        .map(|mut s| {
            let spec = s.spec.as_mut().unwrap();
            let ty = spec.type_.clone().unwrap();
            if ty != "ClusterIP" {
                for p in spec.ports.iter_mut().flatten() {
                    p.node_port = Some(next);
                    next += 1;
                }
            }
            if ty == "LoadBalancer" {
                let shard = s.labels().get("pushcluster.io/shard").cloned();
                s.status = Some(ServiceStatus {
                    load_balancer: Some(LoadBalancerStatus {
                        ingress: Some(vec![LoadBalancerIngress {
                            ip: Some(format!(
                                "203.0.113.{}",
                                shard.map_or(100, |k| 10 + k.parse::<u8>().unwrap())
                            )),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                });
            }
            s
        })
        .collect();
    LiveServices::of(services)
}

fn listener_children(pc: &PushCluster, f: &Facts) -> Vec<Child> {
    desired(pc, f)
        .unwrap()
        .into_iter()
        .filter(|c| {
            c.meta()
                .labels
                .iter()
                .flatten()
                .any(|(k, _)| k == LISTENER_LABEL)
        })
        .collect()
}

#[test]
fn each_listener_makes_an_object_for_web_and_one_per_shard_all_owned() {
    let pc = example();
    let names: Vec<String> = listener_children(&pc, &facts(LiveServices::default(), true))
        .iter()
        .map(Child::describe)
        .collect();
    let want = [
        "Service/push-inside",
        "Service/push-inside-0",
        "Service/push-inside-1",
        "Service/push-nodes",
        "Service/push-nodes-0",
        "Service/push-nodes-1",
        "Service/push-public",
        "Service/push-public-0",
        "Service/push-public-1",
        "EndpointSlice/push-inside-0",
        "EndpointSlice/push-inside-1",
        "EndpointSlice/push-nodes-0",
        "EndpointSlice/push-nodes-1",
        "EndpointSlice/push-public-0",
        "EndpointSlice/push-public-1",
        "Ingress/push-ingress",
        "Ingress/push-ingress-0",
        "Ingress/push-ingress-1",
        "HTTPRoute/push-gw",
        "HTTPRoute/push-gw-0",
        "HTTPRoute/push-gw-1",
    ];
    assert_eq!(names, want);
    for c in listener_children(&pc, &facts(LiveServices::default(), true)) {
        let m = c.meta();
        let owner = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("PushCluster", "push", Some(true)),
            "{}",
            c.describe()
        );
        assert_eq!(m.namespace.as_deref(), Some("team-a"));
        assert_eq!(m.labels.as_ref().unwrap()["pushcluster.io/cluster"], "push");
    }
    // Without the Gateway API no HTTPRoute is applied (its kind is unknown).
    let without = listener_children(&pc, &facts(LiveServices::default(), false));
    assert_eq!(without.len(), want.len() - 3);
    assert!(!without.iter().any(|c| matches!(c, Child::HttpRoute(_))));
}

fn service<'a>(all: &'a [Service], name: &str) -> &'a Service {
    all.iter().find(|s| s.name_any() == name).unwrap()
}

/// (name, port, target) of a Service's ports.
fn ports(s: &Service) -> Vec<(String, i32, String)> {
    s.spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let target = match p.target_port.clone().unwrap() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
            };
            (p.name.clone().unwrap(), p.port, target)
        })
        .collect()
}

#[test]
fn service_listeners_reach_web_or_the_shards_holder_on_plain_or_tls_ports() {
    let pc = example();
    let all = listeners::services(&pc);
    let s = |n| service(&all, n).spec.clone().unwrap();
    // Web's Service selects web; a shard's has no selector: its holder
    // writes itself into the slice (below), as into <cluster>-comet-<k>.
    assert_eq!(s("push-public-1").selector, None);
    assert_eq!(
        s("push-public").selector.unwrap()["app.kubernetes.io/component"],
        "web"
    );
    assert_eq!(s("push-nodes-0").type_.as_deref(), Some("NodePort"));
    assert_eq!(s("push-inside-0").type_.as_deref(), Some("ClusterIP"));
    assert_eq!(s("push-public-0").type_.as_deref(), Some("LoadBalancer"));
    let own = |n: &str, p: i32, t: &str| (n.to_owned(), p, t.to_owned());
    // TLS listeners reach the pods' TLS ports; a load balancer listens on
    // 443; without TLS, the plain ports.
    let want = [
        (
            "push-public-0",
            vec![own("wss", 443, "6972"), own("tcp", 6969, "6969")],
        ),
        ("push-public", vec![own("https", 443, "public-tls")]),
        ("push-inside", vec![own("https", 8093, "public-tls")]),
        (
            "push-inside-1",
            vec![own("wss", 6972, "6972"), own("tcp", 6969, "6969")],
        ),
        ("push-nodes", vec![own("http", 8090, "public")]),
        (
            "push-nodes-0",
            vec![own("ws", 6968, "6968"), own("tcp", 6969, "6969")],
        ),
    ];
    for (name, ports_wanted) in want {
        assert_eq!(ports(service(&all, name)), ports_wanted, "{name}");
    }
}

#[test]
fn the_shards_holder_writes_the_listener_slices_and_may_only_write_those() {
    let pc = example();
    let slices = listeners::endpoint_slices(&pc);
    let names: Vec<String> = slices.iter().map(|s| s.name_any()).collect();
    assert_eq!(
        names,
        [
            "push-inside-0",
            "push-inside-1",
            "push-nodes-0",
            "push-nodes-1",
            "push-public-0",
            "push-public-1"
        ]
    );
    let s = &slices[5];
    let l = s.labels();
    assert_eq!(l["kubernetes.io/service-name"], "push-public-1");
    // Not the EndpointSlice controller's: it leaves them alone.
    assert_eq!(
        l["endpointslice.kubernetes.io/managed-by"],
        "pushcluster-comet"
    );
    let ports: Vec<(Option<String>, Option<i32>)> = s
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.port))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("wss".into()), Some(6972)),
            (Some("tcp".into()), Some(6969))
        ]
    );
    // Applied without endpoints: those are the holder's.
    let json = Child::EndpointSlice(s.clone()).to_json().unwrap();
    assert!(json.get("endpoints").is_none(), "{json}");
    // The comets know the prefixes and may patch exactly these names.
    let cfg = config::configs(&pc, &Facts::default()).unwrap();
    let comet: push_comet::Config = serde_yaml::from_str(&cfg["comet.yaml"]).unwrap();
    let pushcluster_lease::MembershipConfig::Kubernetes { shard_services, .. } = comet.membership
    else {
        panic!("not Kubernetes membership");
    };
    assert_eq!(shard_services, ["push-inside", "push-nodes", "push-public"]);
    let role = push_operator::children::rbac::roles(&pc)
        .into_iter()
        .find(|r| r.name_any() == "push-comet")
        .unwrap();
    let patchable: Vec<String> = role
        .rules
        .unwrap()
        .into_iter()
        .filter(|r| {
            r.resources.as_deref() == Some(&["endpointslices".to_owned()][..])
                && r.verbs.contains(&"patch".to_owned())
        })
        .flat_map(|r| r.resource_names.unwrap_or_default())
        .collect();
    assert_eq!(
        patchable,
        [
            "push-comet-0",
            "push-comet-1",
            "push-inside-0",
            "push-inside-1",
            "push-nodes-0",
            "push-nodes-1",
            "push-public-0",
            "push-public-1"
        ]
    );
}

fn pod_of(pc: &PushCluster, name: &str) -> PodSpec {
    desired(pc, &Facts::default())
        .unwrap()
        .into_iter()
        .find_map(|c| match c {
            Child::Deployment(d) if d.name_any() == name => d.spec?.template.spec,
            _ => None,
        })
        .unwrap()
}

#[test]
fn pods_terminate_tls_with_the_listener_secret_and_re_read_it() {
    let pc = example();
    for (deploy, port) in [
        ("push-comet", ("wss", 6972)),
        ("push-web", ("public-tls", 8093)),
    ] {
        let pod = pod_of(&pc, deploy);
        let vol = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "listener-tls")
            .unwrap_or_else(|| panic!("{deploy}: no listener-tls volume"));
        assert_eq!(
            vol.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("push-tls")
        );
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "listener-tls")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/etc/pushcluster-tls", Some(true))
        );
        // Mounted whole (no subPath), so the kubelet's refresh reaches it.
        assert_eq!(mount.sub_path, None);
        assert!(
            c.ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some(port.0) && p.container_port == port.1),
            "{deploy}: no port {port:?}"
        );
    }
    let cfg = config::configs(&pc, &Facts::default()).unwrap();
    let comet: push_comet::Config = serde_yaml::from_str(&cfg["comet.yaml"]).unwrap();
    let tls = comet.ws_tls.expect("comet ws_tls");
    assert_eq!(tls.listen.port(), 6972);
    assert_eq!(tls.cert_file, Path::new("/etc/pushcluster-tls/tls.crt"));
    assert_eq!(tls.key_file, Path::new("/etc/pushcluster-tls/tls.key"));
    assert!(tls.reload_seconds > 0 && tls.reload_seconds <= 10);
    let web: push_web::Config = serde_yaml::from_str(&cfg["web.yaml"]).unwrap();
    assert_eq!(web.public_tls.expect("web public_tls").listen.port(), 8093);
    // A cluster without Service listeners with TLS serves no TLS port.
    let mut plain = example();
    plain.spec.listeners.retain(|l| l.tls.is_none());
    let cfg = config::configs(&plain, &Facts::default()).unwrap();
    let comet: push_comet::Config = serde_yaml::from_str(&cfg["comet.yaml"]).unwrap();
    assert!(comet.ws_tls.is_none());
    assert!(pod_of(&plain, "push-comet")
        .volumes
        .iter()
        .flatten()
        .all(|v| v.name != "listener-tls"));
}

fn ingress<'a>(all: &'a [Ingress], name: &str) -> &'a Ingress {
    all.iter().find(|i| i.name_any() == name).unwrap()
}

#[test]
fn ingresses_route_by_host_with_stream_timeouts_and_cert_manager() {
    let pc = example();
    let all = listeners::ingresses(&pc);
    let shard = ingress(&all, "push-ingress-1");
    let a = shard.annotations();
    assert_eq!(a["nginx.ingress.kubernetes.io/proxy-read-timeout"], "3600");
    assert_eq!(a["nginx.ingress.kubernetes.io/proxy-send-timeout"], "3600");
    assert_eq!(a["nginx.ingress.kubernetes.io/proxy-buffering"], "off");
    assert_eq!(a["cert-manager.io/cluster-issuer"], "letsencrypt");
    let spec = shard.spec.as_ref().unwrap();
    assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
    let rule = &spec.rules.as_ref().unwrap()[0];
    assert_eq!(rule.host.as_deref(), Some("push-1.push.example.com"));
    // A shard's Ingress goes to its Service, whose endpoints its holder writes.
    let backend = rule.http.as_ref().unwrap().paths[0]
        .backend
        .service
        .clone()
        .unwrap();
    assert_eq!(backend.name, "push-comet-1");
    assert_eq!(backend.port.unwrap().number, Some(6968));
    let tls = &spec.tls.as_ref().unwrap()[0];
    assert_eq!(
        tls.hosts.as_deref(),
        Some(&["push-1.push.example.com".to_owned()][..])
    );
    // cert-manager writes the certificate into a Secret named per object.
    assert_eq!(tls.secret_name.as_deref(), Some("push-ingress-1-tls"));
    let web = ingress(&all, "push-ingress");
    let rule = &web.spec.as_ref().unwrap().rules.as_ref().unwrap()[0];
    assert_eq!(rule.host.as_deref(), Some("push.example.com"));
    let backend = rule.http.as_ref().unwrap().paths[0]
        .backend
        .service
        .clone()
        .unwrap();
    assert_eq!(
        (backend.name.as_str(), backend.port.unwrap().number),
        ("push-web", Some(8090))
    );
    // A Secret template names one Secret per shard.
    let mut given = example();
    let l = given
        .spec
        .listeners
        .iter_mut()
        .find(|l| l.name == "ingress")
        .unwrap();
    let t = l.tls.as_mut().unwrap();
    t.issuer = None;
    t.secret_name = Some("push-{shard}-cert".into());
    let all = listeners::ingresses(&given);
    let secret = |n| {
        ingress(&all, n)
            .spec
            .as_ref()
            .unwrap()
            .tls
            .as_ref()
            .unwrap()[0]
            .secret_name
            .clone()
    };
    assert_eq!(secret("push-ingress-0").as_deref(), Some("push-0-cert"));
    assert_eq!(secret("push-ingress").as_deref(), Some("push-web-cert"));
    assert!(!ingress(&all, "push-ingress-0")
        .annotations()
        .keys()
        .any(|k| k.starts_with("cert-manager.io/")));
}

#[test]
fn http_routes_attach_to_the_gateway_by_host() {
    let pc = example();
    let routes: Vec<HTTPRoute> = listeners::http_routes(&pc);
    let r = routes.iter().find(|r| r.name_any() == "push-gw-0").unwrap();
    assert_eq!(r.spec.parent_refs[0].name, "public");
    assert_eq!(r.spec.parent_refs[0].namespace.as_deref(), Some("gateways"));
    assert_eq!(r.spec.hostnames, ["gw-0.push.example.com"]);
    assert_eq!(r.spec.rules[0].backend_refs[0].name, "push-comet-0");
    assert_eq!(r.spec.rules[0].backend_refs[0].port, 6968);
    let json = Child::HttpRoute(r.clone()).to_json().unwrap();
    assert_eq!(json["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(json["kind"], "HTTPRoute");
}

#[test]
fn addresses_come_from_what_the_api_server_allocated() {
    let pc = example();
    // Before allocation: node ports and load balancers are pending, and web
    // keeps giving the comets' own addresses for the advertised listener.
    let before = listener_endpoints(&pc, &LiveServices::default(), false);
    let by_name = |e: &[push_operator::crd::ListenerEndpoints], n: &str| {
        e.iter().find(|e| e.name == n).unwrap().clone()
    };
    assert!(by_name(&before, "nodes").pending.is_some());
    assert!(by_name(&before, "public").pending.is_some());
    assert!(by_name(&before, "gw")
        .pending
        .unwrap()
        .contains("Gateway API"));
    assert_eq!(by_name(&before, "inside").pending, None);
    let early = client_addresses(&pc, &before);
    assert!(early.ws_by_shard.is_empty() && early.tcp_by_shard.is_empty());

    let live = allocated(&pc);
    let after = listener_endpoints(&pc, &live, true);
    let inside = by_name(&after, "inside");
    assert_eq!(
        inside.web.as_deref(),
        Some("https://push-inside.team-a.svc:8093")
    );
    assert_eq!(
        inside.shards[1].ws.as_deref(),
        Some("push-inside-1.team-a.svc:6972")
    );
    let nodes = by_name(&after, "nodes");
    assert_eq!(nodes.pending, None);
    let port_of = |svc: &str, port: &str| {
        live.0[svc]
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some(port))
            .unwrap()
            .node_port
            .unwrap()
    };
    assert_eq!(
        nodes.shards[0].ws,
        Some(format!(
            "nodes.push.example.com:{}",
            port_of("push-nodes-0", "ws")
        ))
    );
    assert_eq!(
        nodes.web,
        Some(format!(
            "http://nodes.push.example.com:{}",
            port_of("push-nodes", "http")
        ))
    );
    let public = by_name(&after, "public");
    assert!(public.advertised);
    assert_eq!(public.pending, None);
    assert_eq!(public.web.as_deref(), Some("https://203.0.113.100:443"));
    assert_eq!(public.shards[1].ws.as_deref(), Some("203.0.113.11:443"));
    assert_eq!(public.shards[1].tcp.as_deref(), Some("203.0.113.11:6969"));
    let ing = by_name(&after, "ingress");
    assert_eq!(ing.web.as_deref(), Some("https://push.example.com"));
    assert_eq!(
        ing.shards[0].ws.as_deref(),
        Some("push-0.push.example.com:443")
    );
    assert_eq!(ing.shards[0].tcp, None);
    assert_eq!(by_name(&after, "gw").pending, None);
    // Web gives clients the advertised listener's addresses, per shard.
    let c = client_addresses(&pc, &after);
    assert_eq!(
        c.ws_by_shard,
        BTreeMap::from([
            (0, "203.0.113.10:443".into()),
            (1, "203.0.113.11:443".into())
        ])
    );
    assert_eq!(c.tcp_by_shard[&0], "203.0.113.10:6969");
    // ... and the web config carries them, so it rolls once they are known.
    let f = facts(live, true);
    let web: push_web::Config =
        serde_yaml::from_str(&config::configs(&pc, &f).unwrap()["web.yaml"]).unwrap();
    assert_eq!(web.advertise, c);
    let before_hash = config::config_hashes(&pc, &Facts::default()).unwrap();
    let after_hash = config::config_hashes(&pc, &f).unwrap();
    assert_ne!(before_hash.web, after_hash.web);
    assert_eq!(before_hash.comet, after_hash.comet);
}

#[test]
fn without_listeners_nothing_changes() {
    let mut pc = example();
    pc.spec.listeners.clear();
    assert!(listener_children(&pc, &facts(LiveServices::default(), true)).is_empty());
    let c = client_addresses(
        &pc,
        &listener_endpoints(&pc, &LiveServices::default(), true),
    );
    assert_eq!(c, push_web::ClientAddresses::default());
}
