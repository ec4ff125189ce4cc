//! Desired objects of the example PushClusters: YAML snapshots of every
//! object (`UPDATE_SNAPSHOTS=1 cargo test -p push-operator --test operator children`
//! rewrites them after an intended change) and the properties that matter,
//! asserted on the typed objects.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{EnvVar, PodSpec};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use push_operator::children::{
    self, config, credentials, desired, network, rbac, services, workloads, Child,
    CredentialDigests, Facts, CONFIG_HASH,
};
use push_operator::crd::{ClaimAccessMode, PushCluster};
use std::collections::BTreeMap;
use std::path::Path;

fn example(name: &str) -> PushCluster {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("examples").join(name)).unwrap();
    let mut pc: PushCluster = serde_yaml::from_str(&text).unwrap();
    pc.metadata.namespace = Some("team-a".into());
    pc.metadata.uid = Some("0000-uid".into());
    pc
}

fn snapshot(name: &str, pc: &PushCluster) {
    let text = desired(pc, &Default::default())
        .unwrap()
        .iter()
        .map(|c| serde_yaml::to_string(&c.to_json().unwrap()).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var("UPDATE_SNAPSHOTS").is_ok() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        want == text,
        "{} differs: rerun with UPDATE_SNAPSHOTS=1 after checking the change",
        path.display()
    );
}

/// Whether `v` is a valid label value (the API server's rule: at most 63
/// characters, alphanumerics with `-`, `_`, `.` inside).
fn valid_label_value(v: &str) -> bool {
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    v.is_empty()
        || (v.len() <= 63
            && v.chars().all(inner)
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

#[test]
fn every_label_value_is_one_the_api_server_takes() {
    for file in [
        "pushcluster-minimal.yaml",
        "pushcluster-full.yaml",
        "pushcluster-redis-cluster.yaml",
        "pushcluster-redis-sentinel.yaml",
        "pushcluster-listeners.yaml",
    ] {
        for c in desired(&example(file), &Default::default()).unwrap() {
            for (k, v) in c.meta().labels.iter().flatten() {
                assert!(valid_label_value(v), "{}: label {k}={v:?}", c.describe());
            }
        }
    }
    assert!(!valid_label_value("pushcluster.io/comet"));
}

#[test]
fn snapshots_of_every_object() {
    snapshot("minimal.yaml", &example("pushcluster-minimal.yaml"));
    snapshot("full.yaml", &example("pushcluster-full.yaml"));
    snapshot("listeners.yaml", &example("pushcluster-listeners.yaml"));
}

#[test]
fn the_minimal_example_produces_the_whole_cluster() {
    let pc = example("pushcluster-minimal.yaml");
    let list: Vec<String> = desired(&pc, &Default::default())
        .unwrap()
        .iter()
        .map(Child::describe)
        .collect();
    eprintln!("{}", list.join("\n"));
    assert_eq!(
        list,
        [
            "ConfigMap/push-config",
            "ServiceAccount/push-comet",
            "ServiceAccount/push-message",
            "ServiceAccount/push-web",
            "Role/push-comet",
            "Role/push-web",
            "RoleBinding/push-comet",
            "RoleBinding/push-web",
            "Service/push-comet-0",
            "Service/push-comet-1",
            "EndpointSlice/push-comet-0",
            "EndpointSlice/push-comet-1",
            "Service/push-comets",
            "Service/push-message",
            "Service/push-web",
            "Service/push-web-admin",
            "Lease/push-comet-0",
            "Lease/push-comet-1",
            "NetworkPolicy/push-comet",
            "NetworkPolicy/push-message",
            "NetworkPolicy/push-web",
            "StatefulSet/push-message",
            "Deployment/push-comet",
            "Deployment/push-web",
            "PodDisruptionBudget/push-comet",
            "PodDisruptionBudget/push-message",
            "PodDisruptionBudget/push-web",
        ]
    );
    for c in desired(&pc, &Default::default()).unwrap() {
        let m = c.meta();
        let owner = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("PushCluster", "push", Some(true))
        );
        assert_eq!(m.labels.as_ref().unwrap()["pushcluster.io/cluster"], "push");
        assert_eq!(m.namespace.as_deref(), Some("team-a"));
    }
}

/// The pod spec of a Deployment.
fn pod(d: Deployment) -> PodSpec {
    d.spec.unwrap().template.spec.unwrap()
}

/// The first container's environment by name.
fn env_of(spec: PodSpec) -> BTreeMap<String, EnvVar> {
    spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.clone()))
        .collect()
}

/// `(Secret, key)` a variable is read from, if it is read from one.
fn secret_of(e: &EnvVar) -> Option<(&str, &str)> {
    let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
    Some((r.name.as_str(), r.key.as_str()))
}

#[test]
fn comets_and_shard_services_follow_the_shard_count() {
    let pc = example("pushcluster-full.yaml");
    let d = workloads::comet_deployment(&pc, "h");
    assert_eq!(
        d.spec.as_ref().unwrap().replicas,
        Some(10),
        "8 shards + 2 standbys"
    );
    let svcs = services::shard_services(&pc);
    let slices = services::shard_endpoint_slices(&pc);
    assert_eq!((svcs.len(), slices.len()), (8, 8));
    for (k, (s, slice)) in svcs.iter().zip(&slices).enumerate() {
        assert_eq!(s.name_any(), format!("push-prod-comet-{k}"));
        // No selector: the holder writes the slice, no relabel needed.
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.selector, None);
        assert_eq!(s.labels()["pushcluster.io/shard"], k.to_string());
        // The slice of the same name belongs to that Service, is left
        // alone by the EndpointSlice controller, and carries its ports.
        assert_eq!(slice.name_any(), s.name_any());
        let l = slice.labels();
        assert_eq!(l["kubernetes.io/service-name"], s.name_any());
        assert_eq!(
            l["endpointslice.kubernetes.io/managed-by"],
            "pushcluster-comet"
        );
        assert_eq!(l["pushcluster.io/shard"], k.to_string());
        let svc_ports: Vec<(Option<String>, i32)> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                assert_eq!(p.target_port, Some(IntOrString::Int(p.port)));
                (p.name.clone(), p.port)
            })
            .collect();
        let slice_ports: Vec<(Option<String>, i32)> = slice
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port.unwrap()))
            .collect();
        assert_eq!(svc_ports, slice_ports);
        // An apply leaves the endpoints to the holder.
        let json = Child::EndpointSlice(slice.clone()).to_json().unwrap();
        assert!(json.get("endpoints").is_none(), "{json}");
        assert_eq!(json["addressType"], "IPv4");
    }
    let env = d.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(
        env.iter().any(|e| e.name == "POD_IP"),
        "a comet must know its address to publish it"
    );
}

/// The Redis prefix of each service's config.
fn prefixes(pc: &PushCluster) -> [String; 3] {
    let cfg = config::configs(pc, &Facts::default()).unwrap();
    let comet: push_comet::Config = serde_yaml::from_str(&cfg["comet.yaml"]).unwrap();
    let web: push_web::Config = serde_yaml::from_str(&cfg["web.yaml"]).unwrap();
    let message: push_message::Config = serde_yaml::from_str(&cfg["message.yaml"]).unwrap();
    [
        comet.store.redis_namespace,
        web.store.redis_namespace,
        message.storage.redis_namespace,
    ]
}

#[test]
fn clusters_sharing_a_redis_share_no_key() {
    let a = example("pushcluster-full.yaml");
    let mut b = a.clone();
    b.metadata.namespace = Some("team-b".into());
    assert_eq!(prefixes(&a), ["pc:team-a:push-prod"; 3].map(String::from));
    assert_eq!(prefixes(&b), ["pc:team-b:push-prod"; 3].map(String::from));

    // The spec's prefix wins.
    let mut own = a.clone();
    own.spec.storage.redis.as_mut().unwrap().key_prefix = Some("tenant7".into());
    assert_eq!(prefixes(&own), ["tenant7"; 3].map(String::from));

    // A cluster made before prefixes existed (a status with no prefix in
    // it) keeps the one it stored under; one with a recorded prefix keeps it.
    let mut old = a.clone();
    old.status = Some(push_operator::crd::PushClusterStatus {
        observed_generation: Some(3),
        ..Default::default()
    });
    assert_eq!(prefixes(&old), ["pc"; 3].map(String::from));
    old.status.as_mut().unwrap().storage = Some(push_operator::crd::StorageStatus {
        key_prefix: "pc:team-a:push-prod".into(),
        ..Default::default()
    });
    assert_eq!(prefixes(&old), ["pc:team-a:push-prod"; 3].map(String::from));

    // The embedded store has no prefix to record.
    assert_eq!(
        config::redis_key_prefix(&example("pushcluster-minimal.yaml")),
        None
    );
}

#[test]
fn configs_are_the_services_own_types_and_their_hash_rolls_pods() {
    let pc = example("pushcluster-full.yaml");
    let cfg = config::configs(&pc, &Facts::default()).unwrap();
    let comet: push_comet::Config = serde_yaml::from_str(&cfg["comet.yaml"]).unwrap();
    assert_eq!(
        comet.membership,
        pushcluster_lease::MembershipConfig::Kubernetes {
            cluster: "push-prod".into(),
            kube_namespace: None,
            cluster_uid: Some("0000-uid".into()),
            lease: pushcluster_lease::LeaseTiming {
                duration_ms: 6000,
                renew_deadline_ms: 4000,
                retry_period_ms: 1000,
            },
            shard_services: vec![],
        },
        "the shard count is not configured: the shard Leases say"
    );
    assert_eq!(comet.message_url, "http://push-prod-message:8070");
    let web: push_web::Config = serde_yaml::from_str(&cfg["web.yaml"]).unwrap();
    assert_eq!(web.membership, comet.membership);
    assert_eq!(
        web.advertise.ws.as_deref(),
        Some("push-{shard}.example.com:443")
    );
    let message: push_message::Config = serde_yaml::from_str(&cfg["message.yaml"]).unwrap();
    assert_eq!(
        message.storage.redis_url, None,
        "the URL comes from the Secret through PUSH_REDIS_URL"
    );

    // Each component's pods carry the hash of their own config only.
    let hashes = |pc: &PushCluster| {
        // Pod templates in workload order: message, comet, web.
        let templates: Vec<_> = desired(pc, &Default::default())
            .unwrap()
            .into_iter()
            .filter_map(|c| match c {
                Child::Deployment(d) => d.spec.map(|s| s.template),
                Child::StatefulSet(s) => s.spec.map(|s| s.template),
                _ => None,
            })
            .collect();
        let hash = |t: &k8s_openapi::api::core::v1::PodTemplateSpec| {
            t.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CONFIG_HASH].clone()
        };
        [
            hash(&templates[1]),
            hash(&templates[0]),
            hash(&templates[2]),
        ]
    };
    let before = hashes(&pc);
    let mut more = pc.clone();
    more.spec.comet.queue_depth = 512;
    let after = hashes(&more);
    assert_ne!(
        after[0], before[0],
        "a comet config change rolls the comets"
    );
    assert_eq!(after[1..], before[1..], "and nothing else");
    let mut same = pc.clone();
    same.spec.web.replicas = 5;
    assert_eq!(hashes(&same), before, "replicas are not config");
    // A reshard restarts nothing: comets and web follow the shard Services.
    let mut reshard = pc.clone();
    reshard.spec.comet.shards = 3;
    assert_eq!(
        hashes(&reshard),
        before,
        "the shard count is not in any hash"
    );
    assert_eq!(
        config::configs(&reshard, &Facts::default()).unwrap(),
        config::configs(&pc, &Facts::default()).unwrap(),
        "nor in any config"
    );
}

#[test]
fn the_embedded_store_lives_on_a_claim_of_a_one_pod_statefulset() {
    let mut pc = example("pushcluster-minimal.yaml");
    pc.spec.storage.embedded.size = "5Gi".into();
    pc.spec.storage.embedded.storage_class_name = Some("fast".into());
    let sts = workloads::message_statefulset(&pc, "h", ClaimAccessMode::ReadWriteOncePod);
    let spec = sts.spec.unwrap();
    assert_eq!(spec.replicas, Some(1), "never two writers on one store");
    assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
    let claim = &spec.volume_claim_templates.unwrap()[0];
    let cs = claim.spec.as_ref().unwrap();
    assert_eq!(claim.metadata.name.as_deref(), Some("data"));
    assert_eq!(cs.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        cs.access_modes.as_deref(),
        Some(&["ReadWriteOncePod".to_owned()][..]),
        "the mode the controller settled"
    );
    assert_eq!(
        cs.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
        "5Gi"
    );
    let pod = spec.template.spec.unwrap();
    assert!(
        pod.volumes
            .unwrap_or_default()
            .iter()
            .all(|v| v.name != "data"),
        "the data volume comes from the claim, not an emptyDir"
    );
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m.name == "data" && m.mount_path == "/data"));
    assert_eq!(
        spec.persistent_volume_claim_retention_policy
            .unwrap()
            .when_deleted
            .as_deref(),
        Some("Delete"),
        "deleting the PushCluster deletes its store"
    );
    // On Redis the message service stays a Deployment.
    let full = example("pushcluster-full.yaml");
    assert!(!children::embedded(&full));
    assert!(desired(&full, &Default::default())
        .unwrap()
        .iter()
        .any(|c| c.describe() == "Deployment/push-prod-message"));
}

#[test]
fn rbac_is_least_privilege() {
    let pc = example("pushcluster-minimal.yaml");
    for r in rbac::roles(&pc) {
        for rule in r.rules.unwrap() {
            assert!(
                !rule.verbs.iter().any(|v| v == "*" || v == "delete"),
                "{rule:?}"
            );
            assert!(!rule.resources.unwrap_or_default().iter().any(|x| x == "*"));
        }
    }
    // Comets (internet-facing) write only their own cluster's shard Leases
    // and shard EndpointSlices, by name, create nothing and touch no pod.
    let comet = rbac::roles(&pc)
        .into_iter()
        .find(|r| r.name_any() == "push-comet")
        .unwrap();
    let rules = comet.rules.unwrap();
    for rule in &rules {
        let resources = rule.resources.clone().unwrap_or_default();
        assert!(!resources.contains(&"pods".to_owned()), "{rule:?}");
        assert!(!rule.verbs.iter().any(|v| v == "create"), "{rule:?}");
        if rule.verbs.iter().any(|v| v == "update" || v == "patch") {
            let writes: &[&str] = if resources == ["leases"] {
                &["get", "update"]
            } else {
                assert_eq!(resources, ["endpointslices"]);
                &["get", "patch"]
            };
            assert_eq!(rule.verbs, writes);
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&["push-comet-0".to_owned(), "push-comet-1".to_owned()][..])
            );
        }
    }
    // The operator makes those Leases, so comets never need to.
    let leases = services::shard_leases(&pc);
    assert_eq!(
        leases.iter().map(|l| l.name_any()).collect::<Vec<_>>(),
        ["push-comet-0", "push-comet-1"]
    );
    assert!(leases
        .iter()
        .all(|l| l.spec.is_none() && l.owner_references()[0].kind == "PushCluster"));
    assert_eq!(leases[1].labels()["pushcluster.io/shard"], "1");
    // The headless Service that maps comet pods to addresses.
    let s = services::comets_service(&pc);
    assert_eq!(s.name_any(), "push-comets");
    assert_eq!(s.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    let sas = rbac::service_accounts(&pc);
    let message = sas.iter().find(|s| s.name_any() == "push-message").unwrap();
    assert_eq!(message.automount_service_account_token, Some(false));
    let d = workloads::message_statefulset(&pc, "h", Default::default());
    assert_eq!(
        d.spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .automount_service_account_token,
        Some(false)
    );
}

#[test]
fn secrets_and_scheduling_reach_the_pods() {
    let pc = example("pushcluster-full.yaml");
    let web = env_of(pod(workloads::web_deployment(&pc, "h")));
    assert_eq!(
        secret_of(&web["PUSH_ADMIN_TOKEN"]),
        Some(("push-auth", "admin-token"))
    );
    let comet = env_of(pod(workloads::comet_deployment(&pc, "h")));
    assert_eq!(
        secret_of(&comet["PUSH_SUBSCRIBER_SECRET"]),
        Some(("push-auth", "subscriber-secret"))
    );
    // Web stores private pushes in Redis itself, comets store and subscribe.
    for d in [
        workloads::message_deployment(&pc, "h"),
        workloads::web_deployment(&pc, "h"),
        workloads::comet_deployment(&pc, "h"),
    ] {
        assert_eq!(
            secret_of(&env_of(pod(d))["PUSH_REDIS_URL"]),
            Some(("push-redis", "url"))
        );
    }
    let spec = pod(workloads::comet_deployment(&pc, "h"));
    assert_eq!(spec.node_selector.unwrap()["kubernetes.io/os"], "linux");
    assert_eq!(spec.tolerations.unwrap().len(), 1);
    assert_eq!(spec.topology_spread_constraints.unwrap().len(), 1);
    let svc = services::component_services(&pc);
    assert_eq!(
        svc[1].spec.as_ref().unwrap().type_.as_deref(),
        Some("LoadBalancer")
    );
    assert_eq!(
        svc[2].spec.as_ref().unwrap().type_.as_deref(),
        Some("ClusterIP"),
        "admin stays private"
    );
}

/// Sentinel and Cluster modes reach every service as one URL, the
/// password from its Secret, durability in each config; egress opens the
/// Sentinels', seeds' and data nodes' ports.
#[test]
fn sentinel_and_cluster_modes_reach_every_service() {
    let mut pc = example("pushcluster-full.yaml");
    let redis = |v: serde_json::Value| -> push_operator::crd::RedisSpec {
        serde_json::from_value(v).expect("redis spec")
    };
    pc.spec.storage.redis = Some(redis(serde_json::json!({
        "mode": "Sentinel",
        "sentinel": {"masterName": "mymaster", "addresses": ["s-0.redis:26379", "s-1.redis:26379"], "db": 2},
        "passwordSecretRef": {"name": "redis-auth", "key": "password"},
        "durability": {"replicas": 1, "timeoutMilliseconds": 500}
    })));
    let cfg = config::configs(&pc, &Facts::default()).unwrap();
    let comet: push_comet::Config = serde_yaml::from_str(&cfg["comet.yaml"]).unwrap();
    let web: push_web::Config = serde_yaml::from_str(&cfg["web.yaml"]).unwrap();
    let message: push_message::Config = serde_yaml::from_str(&cfg["message.yaml"]).unwrap();
    let url = "redis+sentinel://s-0.redis:26379,s-1.redis:26379/mymaster/2";
    assert_eq!(comet.store.redis_url.as_deref(), Some(url));
    assert_eq!(web.store.redis_url.as_deref(), Some(url));
    assert_eq!(message.storage.redis_url.as_deref(), Some(url));
    let wait = pushcluster_redis::Durability {
        replicas: 1,
        timeout_ms: 500,
    };
    assert_eq!(
        [
            comet.store.redis_durability,
            web.store.redis_durability,
            message.storage.redis_durability
        ],
        [wait; 3]
    );
    for d in [
        workloads::message_deployment(&pc, "h"),
        workloads::web_deployment(&pc, "h"),
        workloads::comet_deployment(&pc, "h"),
    ] {
        let env = env_of(pod(d));
        assert_eq!(
            secret_of(&env["PUSH_REDIS_PASSWORD"]),
            Some(("redis-auth", "password"))
        );
        assert!(
            !env.contains_key("PUSH_REDIS_URL"),
            "the URL is in the config"
        );
    }
    pc.spec.storage.redis = Some(redis(serde_json::json!({
        "mode": "Cluster",
        "cluster": {"nodes": ["rc-0.redis:7000", "rc-1.redis:7000"]}
    })));
    let cfg = config::configs(&pc, &Facts::default()).unwrap();
    let web: push_web::Config = serde_yaml::from_str(&cfg["web.yaml"]).unwrap();
    assert_eq!(
        web.store.redis_url.as_deref(),
        Some("redis+cluster://rc-0.redis:7000,rc-1.redis:7000")
    );
    assert!(web.store.redis_durability.is_master_only());
    pushcluster_redis::Target::parse(web.store.redis_url.as_deref().unwrap())
        .expect("the services parse the URL the operator writes");
    // The operator, in another namespace, names a short host by its namespace.
    assert_eq!(
        config::redis_url_from(&pc, "team-a").as_deref(),
        Some("redis+cluster://rc-0.redis:7000,rc-1.redis:7000")
    );
    pc.spec.storage.redis = Some(redis(serde_json::json!({
        "mode": "Sentinel",
        "sentinel": {"masterName": "m", "addresses": ["push-redis:26379", "s.other:26379"]}
    })));
    assert_eq!(
        config::redis_url_from(&pc, "team-a").as_deref(),
        Some("redis+sentinel://push-redis.team-a:26379,s.other:26379/m/0")
    );
}

/// `storage.redis.tls` turns the Sentinel and Cluster URLs into their
/// `rediss` forms; its CA Secret key and client certificate Secret reach
/// every pod as files that `PUSH_REDIS_CA_FILE` and
/// `PUSH_REDIS_CLIENT_CERT_FILE`/`_KEY_FILE` name; without them, no volume
/// and no variable.
#[test]
fn redis_tls_reaches_every_service_with_its_ca() {
    let mut pc = example("pushcluster-full.yaml");
    let redis = |v: serde_json::Value| -> push_operator::crd::RedisSpec {
        serde_json::from_value(v).expect("redis spec")
    };
    pc.spec.storage.redis = Some(redis(serde_json::json!({
        "mode": "Cluster",
        "cluster": {"nodes": ["rc-0.redis:6380"]},
        "tls": {"caSecretRef": {"name": "redis-ca", "key": "ca.crt"}, "clientCertSecretRef": {"name": "push-redis-client"}}
    })));
    let cfg = config::configs(&pc, &Facts::default()).unwrap();
    let web: push_web::Config = serde_yaml::from_str(&cfg["web.yaml"]).unwrap();
    let url = web.store.redis_url.as_deref().unwrap();
    assert_eq!(url, "rediss+cluster://rc-0.redis:6380");
    pushcluster_redis::Target::parse(url).expect("the services parse it");
    for d in [
        workloads::message_deployment(&pc, "h"),
        workloads::web_deployment(&pc, "h"),
        workloads::comet_deployment(&pc, "h"),
    ] {
        let spec = pod(d);
        let env = env_of(spec.clone());
        let file = env["PUSH_REDIS_CA_FILE"].value.clone().unwrap();
        let mount = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "redis-ca")
            .expect("the CA is mounted");
        assert_eq!(format!("{}/ca.crt", mount.mount_path), file);
        assert_eq!(mount.read_only, Some(true));
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "redis-ca")
            .and_then(|v| v.secret.clone())
            .expect("a Secret volume");
        assert_eq!(volume.secret_name.as_deref(), Some("redis-ca"));
        let items = volume.items.unwrap();
        assert_eq!(
            (items[0].key.as_str(), items[0].path.as_str()),
            ("ca.crt", "ca.crt")
        );
        // The client certificate: the whole kubernetes.io/tls Secret.
        let mount = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "redis-client")
            .expect("the client certificate is mounted");
        for (var, file) in [
            ("PUSH_REDIS_CLIENT_CERT_FILE", "tls.crt"),
            ("PUSH_REDIS_CLIENT_KEY_FILE", "tls.key"),
        ] {
            assert_eq!(
                env[var].value.as_deref(),
                Some(format!("{}/{file}", mount.mount_path).as_str())
            );
        }
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "redis-client")
            .and_then(|v| v.secret.clone())
            .expect("a Secret volume");
        assert_eq!(volume.secret_name.as_deref(), Some("push-redis-client"));
    }
    pc.spec.storage.redis = Some(redis(serde_json::json!({
        "mode": "Sentinel",
        "sentinel": {"masterName": "m", "addresses": ["s:26379"]},
        "tls": {}
    })));
    assert_eq!(
        config::redis_url_from(&pc, "team-a").as_deref(),
        Some("rediss+sentinel://s.team-a:26379/m/0")
    );
    let spec = pod(workloads::web_deployment(&pc, "h"));
    let env = env_of(spec.clone());
    assert!(!env.contains_key("PUSH_REDIS_CA_FILE"));
    assert!(!env.contains_key("PUSH_REDIS_CLIENT_CERT_FILE"));
    assert!(!spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name.starts_with("redis-")));
}

#[test]
fn worker_threads_reach_comets_and_web_only_when_set() {
    let mut pc = example("pushcluster-minimal.yaml");
    let threads = |d: Deployment| {
        env_of(pod(d))
            .get("PUSH_WORKER_THREADS")
            .and_then(|e| e.value.clone())
    };
    // Unset: the binaries' defaults apply (comet one thread, web one per CPU).
    assert_eq!(threads(workloads::comet_deployment(&pc, "h")), None);
    assert_eq!(threads(workloads::web_deployment(&pc, "h")), None);
    pc.spec.comet.worker_threads = Some(0);
    pc.spec.web.worker_threads = Some(4);
    assert_eq!(
        threads(workloads::comet_deployment(&pc, "h")).as_deref(),
        Some("0")
    );
    assert_eq!(
        threads(workloads::web_deployment(&pc, "h")).as_deref(),
        Some("4")
    );
}

fn secret_with(keys: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "push-credentials"},
        "data": keys.iter().map(|(k, v)| (k.to_string(), serde_json::json!(base64_of(v)))).collect::<serde_json::Map<_, _>>(),
    }))
    .unwrap()
}

fn base64_of(v: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(v)
}

#[test]
fn credentials_are_generated_once_and_only_missing_keys_are_added() {
    let pc = example("pushcluster-minimal.yaml");
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        format!("value-{n}")
    };
    // None yet: every key, owned by the PushCluster.
    let s = credentials::credentials_secret(&pc, None, &mut fresh).unwrap();
    assert_eq!(s.metadata.name.as_deref(), Some("push-credentials"));
    assert_eq!(
        s.metadata.owner_references.as_ref().unwrap()[0].kind,
        "PushCluster"
    );
    let data = s.string_data.unwrap();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["admin-token", "rpc-token", "subscriber-secret"]
    );
    // Complete: nothing to write, whatever the values.
    let full = secret_with(&[
        ("admin-token", "a"),
        ("rpc-token", "r"),
        ("subscriber-secret", "s"),
    ]);
    assert!(credentials::credentials_secret(&pc, Some(&full), &mut fresh).is_none());
    // A deleted key (rotation) is generated again; the others are not touched.
    let rotated = secret_with(&[("admin-token", "a"), ("subscriber-secret", "s")]);
    let w = credentials::credentials_secret(&pc, Some(&rotated), &mut fresh).unwrap();
    assert_eq!(
        w.string_data.unwrap().keys().collect::<Vec<_>>(),
        ["rpc-token"]
    );
    // Insecure: no Secret at all, no credential in any pod.
    let mut insecure = pc.clone();
    insecure.spec.auth.insecure = true;
    assert!(credentials::credentials_secret(&insecure, None, &mut fresh).is_none());
    for d in [
        workloads::web_deployment(&insecure, "h"),
        workloads::comet_deployment(&insecure, "h"),
    ] {
        assert!(env_of(pod(d)).values().all(|e| secret_of(e).is_none()));
    }
    // Tokens are 256 random bits.
    let (a, b) = (credentials::random_token(), credentials::random_token());
    assert_eq!(a.len(), 64);
    assert_ne!(a, b);
}

#[test]
fn every_component_reads_its_credentials_from_the_generated_secret() {
    let pc = example("pushcluster-minimal.yaml");
    let generated = |key| Some(("push-credentials", key));
    let web = env_of(pod(workloads::web_deployment(&pc, "h")));
    for (var, key) in [
        ("PUSH_ADMIN_TOKEN", "admin-token"),
        ("PUSH_SUBSCRIBER_SECRET", "subscriber-secret"),
        ("PUSH_RPC_TOKEN", "rpc-token"),
    ] {
        assert_eq!(secret_of(&web[var]), generated(key), "web {var}");
    }
    let comet = env_of(pod(workloads::comet_deployment(&pc, "h")));
    let keys = |env: &BTreeMap<String, EnvVar>| -> Vec<String> {
        env.values()
            .filter_map(secret_of)
            .map(|(_, k)| k.to_owned())
            .collect()
    };
    assert_eq!(
        keys(&comet),
        ["rpc-token", "subscriber-secret"],
        "comets never see the admin token"
    );
    let message = env_of(
        workloads::message_statefulset(&pc, "h", Default::default())
            .spec
            .unwrap()
            .template
            .spec
            .unwrap(),
    );
    assert_eq!(keys(&message), ["rpc-token"]);
    // No credential is ever rendered into the ConfigMap.
    let cm = serde_json::to_string(&config::config_map(&pc, &Facts::default()).unwrap()).unwrap();
    for word in ["admin_token", "subscriber_secret", "rpc_token"] {
        assert!(!cm.contains(word), "{word} in the ConfigMap");
    }
    // The status names where to reach the cluster and its Secret.
    let e = config::endpoints(&pc);
    assert_eq!(e.admin, "push-web-admin.team-a.svc:8091");
    assert_eq!(e.credentials_secret.as_deref(), Some("push-credentials"));
}

/// A renewed Redis CA or client certificate (a new digest of its Secret
/// key) rolls every component, all of which reach Redis; a cluster without
/// Redis TLS keeps the hashes it had before they counted.
#[test]
fn a_renewed_redis_certificate_rolls_every_component() {
    let mut pc = example("pushcluster-full.yaml");
    let plain = children::config_hashes(&pc, &Facts::default()).unwrap();
    pc.spec.storage.redis.as_mut().unwrap().tls = Some(
        serde_json::from_value(serde_json::json!({"clientCertSecretRef": {"name": "c"}})).unwrap(),
    );
    let no_tls_facts = children::config_hashes(&pc, &Facts::default()).unwrap();
    let digests = |cert: &str| Facts {
        redis_tls: [("c/tls.crt", cert), ("c/tls.key", "k")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..Facts::default()
    };
    let first = children::config_hashes(&pc, &digests("one")).unwrap();
    let renewed = children::config_hashes(&pc, &digests("two")).unwrap();
    for (a, b) in [
        (&first.comet, &renewed.comet),
        (&first.message, &renewed.message),
        (&first.web, &renewed.web),
        (&no_tls_facts.web, &first.web),
    ] {
        assert_ne!(a, b);
    }
    assert_eq!(
        children::config_hashes(&pc, &digests("two")).unwrap(),
        renewed
    );
    // The tls field itself is in no config: without digests, as before.
    assert_eq!(plain, no_tls_facts);
}

#[test]
fn rotating_a_credential_rolls_exactly_the_pods_that_read_it() {
    let pc = example("pushcluster-minimal.yaml");
    let keys = [
        ("admin-token", "a"),
        ("rpc-token", "r"),
        ("subscriber-secret", "s"),
    ];
    let before = children::config_hashes(
        &pc,
        &Facts {
            creds: CredentialDigests::of(&secret_with(&keys)),
            ..Facts::default()
        },
    )
    .unwrap();
    let rotate = |key: &str| {
        let changed: Vec<(&str, &str)> = keys
            .iter()
            .map(|(k, v)| (*k, if *k == key { "new" } else { *v }))
            .collect();
        children::config_hashes(
            &pc,
            &Facts {
                creds: CredentialDigests::of(&secret_with(&changed)),
                ..Facts::default()
            },
        )
        .unwrap()
    };
    let admin = rotate("admin-token");
    assert_eq!(
        (
            admin.comet == before.comet,
            admin.message == before.message,
            admin.web == before.web
        ),
        (true, true, false)
    );
    let sub = rotate("subscriber-secret");
    assert_eq!(
        (
            sub.comet == before.comet,
            sub.message == before.message,
            sub.web == before.web
        ),
        (false, true, false)
    );
    let rpc = rotate("rpc-token");
    assert_eq!(
        (
            rpc.comet == before.comet,
            rpc.message == before.message,
            rpc.web == before.web
        ),
        (false, false, false)
    );
}

/// The ingress rules of one policy as (ports, from) pairs; `None` = anyone.
fn ingress_of(p: &NetworkPolicy) -> Vec<(Vec<i32>, Option<Vec<NetworkPolicyPeer>>)> {
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned(), "Egress".to_owned()][..])
    );
    spec.ingress
        .iter()
        .flatten()
        .map(|r| {
            let ports = r
                .ports
                .iter()
                .flatten()
                .map(|p| match p.port {
                    Some(IntOrString::Int(n)) => n,
                    ref other => panic!("named port {other:?}"),
                })
                .collect();
            (ports, r.from.clone())
        })
        .collect()
}

fn peer(pod_labels: Option<&[(&str, &str)]>, namespace: Option<&str>) -> NetworkPolicyPeer {
    let sel = |l: &[(&str, &str)]| LabelSelector {
        match_labels: Some(
            l.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..LabelSelector::default()
    };
    NetworkPolicyPeer {
        pod_selector: pod_labels.map(sel),
        namespace_selector: namespace.map(|n| sel(&[("kubernetes.io/metadata.name", n)])),
        ..NetworkPolicyPeer::default()
    }
}

#[test]
fn network_policies_open_each_port_only_to_whom_it_serves() {
    let pc = example("pushcluster-minimal.yaml");
    let policies = network::network_policies(&pc);
    let by_name: BTreeMap<String, _> = policies.iter().map(|p| (p.name_any(), p)).collect();
    assert_eq!(
        by_name.keys().collect::<Vec<_>>(),
        ["push-comet", "push-message", "push-web"]
    );
    let pods = |components: &[&str]| {
        Some(
            components
                .iter()
                .map(|c| {
                    peer(
                        Some(&[
                            ("app.kubernetes.io/instance", "push"),
                            ("app.kubernetes.io/component", c),
                        ]),
                        None,
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    let own_namespace = Some(vec![NetworkPolicyPeer {
        pod_selector: Some(LabelSelector::default()),
        ..NetworkPolicyPeer::default()
    }]);
    // `podSelector: {}` alone: every pod of the policy's namespace.
    assert_eq!(
        serde_json::to_value(&own_namespace).unwrap(),
        serde_json::json!([{"podSelector": {}}])
    );
    // Comets: clients from anywhere; gRPC only from this cluster's web.
    assert_eq!(
        ingress_of(by_name["push-comet"]),
        vec![
            (vec![6968, 6969], None),
            (vec![6970], pods(&["web"])),
            (vec![6971], own_namespace.clone()),
        ]
    );
    // The message service: only this cluster's comets and web.
    assert_eq!(
        ingress_of(by_name["push-message"]),
        vec![
            (vec![8070], pods(&["comet", "web"])),
            (vec![8071], own_namespace.clone()),
        ]
    );
    // Web: public API from anywhere, admin from the cluster's own namespace.
    assert_eq!(
        ingress_of(by_name["push-web"]),
        vec![
            (vec![8090], None),
            (vec![8091], own_namespace.clone()),
            (vec![8092], own_namespace.clone()),
        ]
    );
    for p in &policies {
        let sel = p.spec.as_ref().unwrap().pod_selector.as_ref().unwrap();
        assert_eq!(
            sel.match_labels.as_ref().unwrap()["app.kubernetes.io/instance"],
            "push"
        );
    }

    // What the spec lists replaces the defaults.
    let mut custom = pc.clone();
    custom.spec.network_policy = serde_json::from_value(serde_json::json!({
        "publicFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "adminFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}}}],
        "monitoringFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    }))
    .unwrap();
    let web = network::network_policies(&custom)
        .into_iter()
        .find(|p| p.name_any() == "push-web")
        .unwrap();
    let rules = ingress_of(&web);
    let block = rules[0].1.as_ref().unwrap()[0].ip_block.as_ref().unwrap();
    assert_eq!(block.cidr, "10.0.0.0/8");
    assert_eq!(rules[1].1, Some(vec![peer(None, Some("backend"))]));
    assert_eq!(rules[2].1, Some(vec![peer(None, Some("monitoring"))]));
    // Turned off: none.
    custom.spec.network_policy.enabled = false;
    assert!(network::network_policies(&custom).is_empty());
    // They are part of what the operator applies.
    let policies = desired(&pc, &Default::default())
        .unwrap()
        .into_iter()
        .filter(|c| matches!(c, Child::NetworkPolicy(_)))
        .count();
    assert_eq!(policies, 3);
}

/// Egress as (ports with protocol, to) per rule.
type Egress = Vec<(Vec<String>, Option<Vec<NetworkPolicyPeer>>)>;

fn egress_of(p: &NetworkPolicy) -> Egress {
    p.spec
        .as_ref()
        .unwrap()
        .egress
        .iter()
        .flatten()
        .map(|r| {
            let ports = r
                .ports
                .iter()
                .flatten()
                .map(|p| match p.port {
                    Some(IntOrString::Int(n)) => {
                        format!("{n}/{}", p.protocol.as_deref().unwrap_or("TCP"))
                    }
                    ref other => panic!("named port {other:?}"),
                })
                .collect();
            (ports, r.to.clone())
        })
        .collect()
}

#[test]
fn network_policies_let_each_pod_out_only_to_what_it_uses() {
    let component = |c: &str| {
        Some(vec![peer(
            Some(&[
                ("app.kubernetes.io/instance", "push"),
                ("app.kubernetes.io/component", c),
            ]),
            None,
        )])
    };
    let dns = (vec!["53/UDP".to_owned(), "53/TCP".to_owned()], None);
    let api = (vec!["443/TCP".to_owned(), "6443/TCP".to_owned()], None);
    let message = (vec!["8070/TCP".to_owned()], component("message"));
    let comet_rpc = (vec!["6970/TCP".to_owned()], component("comet"));
    let by_name = |pc: &PushCluster| -> BTreeMap<String, Egress> {
        network::network_policies(pc)
            .iter()
            .map(|p| (p.name_any(), egress_of(p)))
            .collect()
    };

    // Embedded: the message service talks to nobody; comets and web to
    // the API server and the message service, web to the comets too.
    let minimal = by_name(&example("pushcluster-minimal.yaml"));
    assert_eq!(minimal["push-message"], vec![dns.clone()]);
    assert_eq!(
        minimal["push-comet"],
        vec![dns.clone(), api.clone(), message.clone()]
    );
    assert_eq!(
        minimal["push-web"],
        vec![dns.clone(), api.clone(), message.clone(), comet_rpc.clone()]
    );

    // On Redis every component reaches Redis, on the URL's port; named
    // destinations replace "anywhere".
    let mut pc = example("pushcluster-minimal.yaml");
    pc.spec.message.replicas = 1;
    pc.spec.storage.redis = Some(
        serde_json::from_value(serde_json::json!({"url": "redis://redis.shared:6380/2"})).unwrap(),
    );
    pc.spec.network_policy = serde_json::from_value(serde_json::json!({
        "apiServerTo": [{"ipBlock": {"cidr": "10.96.0.1/32"}}],
        "redisTo": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shared"}}}],
    }))
    .unwrap();
    let redis = (
        vec!["6380/TCP".to_owned()],
        Some(vec![peer(None, Some("shared"))]),
    );
    let on_redis = by_name(&pc);
    assert_eq!(on_redis["push-message"], vec![dns.clone(), redis.clone()]);
    let comet = &on_redis["push-comet"];
    assert_eq!(comet.len(), 4);
    assert_eq!(comet[3], redis);
    let api_to = comet[1].1.as_ref().unwrap()[0].ip_block.as_ref().unwrap();
    assert_eq!(api_to.cidr, "10.96.0.1/32");
    assert_eq!(on_redis["push-web"].last(), Some(&redis));
}

#[test]
fn every_pod_has_requests_and_a_memory_limit_unless_its_spec_sets_them() {
    use k8s_openapi::api::core::v1::ResourceRequirements;
    let pc = example("pushcluster-minimal.yaml");
    let containers: Vec<(String, ResourceRequirements)> = desired(&pc, &Default::default())
        .unwrap()
        .iter()
        .filter_map(|c| {
            let v = c.to_json().unwrap();
            let kind = v["kind"].as_str()?.to_owned();
            if kind != "Deployment" && kind != "StatefulSet" {
                return None;
            }
            let r = v["spec"]["template"]["spec"]["containers"][0]["resources"].clone();
            Some((c.name().to_owned(), serde_json::from_value(r).unwrap()))
        })
        .collect();
    assert_eq!(containers.len(), 3, "{containers:?}");
    for (name, r) in &containers {
        let requests = r
            .requests
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no requests"));
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{name}: {r:?}"
        );
        assert!(
            r.limits.as_ref().is_some_and(|l| l.contains_key("memory")),
            "{name}: {r:?}"
        );
    }
    // A spec's own resources replace the defaults whole.
    let mut custom = pc.clone();
    custom.spec.web.resources =
        Some(serde_json::from_value(serde_json::json!({"requests": {"cpu": "2"}})).unwrap());
    let web = workloads::web_deployment(&custom, "h");
    let r = web.spec.unwrap().template.spec.unwrap().containers[0]
        .resources
        .clone()
        .unwrap();
    assert_eq!(r.requests.unwrap()["cpu"].0, "2");
    assert!(r.limits.is_none());
}

#[test]
fn a_drain_does_not_take_the_embedded_stores_only_pod() {
    let max_unavailable = |pc: &PushCluster| -> BTreeMap<String, i32> {
        workloads::pdbs(pc)
            .into_iter()
            .map(|p| {
                let n = match p.spec.unwrap().max_unavailable {
                    Some(IntOrString::Int(n)) => n,
                    other => panic!("{other:?}"),
                };
                (p.metadata.name.unwrap(), n)
            })
            .collect()
    };
    let embedded = max_unavailable(&example("pushcluster-minimal.yaml"));
    assert_eq!(embedded["push-message"], 0);
    assert_eq!(embedded["push-comet"], 1);
    assert_eq!(embedded["push-web"], 1);
    let on_redis = max_unavailable(&example("pushcluster-full.yaml"));
    assert!(on_redis.values().all(|n| *n == 1), "{on_redis:?}");
}

#[test]
fn connection_caps_from_the_spec_reach_the_listeners() {
    let caps = |pc: &PushCluster| {
        let cfg = config::configs(pc, &Facts::default()).unwrap();
        let comet: push_comet::Config = serde_yaml::from_str(&cfg["comet.yaml"]).unwrap();
        let web: push_web::Config = serde_yaml::from_str(&cfg["web.yaml"]).unwrap();
        (comet.listener_limits, web.listener_limits)
    };
    let mut pc = example("pushcluster-minimal.yaml");
    let (comet, web) = caps(&pc);
    let defaults = pushcluster_core::serve::ListenerLimits::default();
    assert_eq!((comet, web), (defaults.clone(), defaults.clone()));
    pc.spec.comet.max_connections = Some(50_000);
    pc.spec.comet.max_connections_per_ip = Some(100);
    pc.spec.web.max_connections = Some(2_000);
    let (comet, web) = caps(&pc);
    assert_eq!(
        (comet.max_connections, comet.max_connections_per_ip),
        (50_000, 100)
    );
    assert_eq!(
        (web.max_connections, web.max_connections_per_ip),
        (2_000, 0)
    );
    assert_eq!(
        comet.header_timeout_seconds,
        defaults.header_timeout_seconds
    );
}

#[test]
fn the_subscriber_token_lifetime_bound_reaches_comets_and_web() {
    let bounds = |pc: &PushCluster| {
        let cfg = config::configs(pc, &Facts::default()).unwrap();
        let comet: push_comet::Config = serde_yaml::from_str(&cfg["comet.yaml"]).unwrap();
        let web: push_web::Config = serde_yaml::from_str(&cfg["web.yaml"]).unwrap();
        (
            comet.subscriber_token_max_seconds,
            web.subscriber_token_max_seconds,
        )
    };
    let mut pc = example("pushcluster-minimal.yaml");
    let week = pushcluster_core::token::DEFAULT_MAX_LIFETIME_SECONDS;
    assert_eq!(bounds(&pc), (week, week));
    pc.spec.auth.subscriber_token_max_lifetime_seconds = Some(3600);
    assert_eq!(bounds(&pc), (3600, 3600));
    pc.spec.auth.subscriber_token_max_lifetime_seconds = Some(0);
    assert_eq!(bounds(&pc), (0, 0), "0 lifts the bound");
}
