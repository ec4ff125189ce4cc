//! The CRD: checked-in copy up to date, examples valid against its schema,
//! CEL rules accept good specs and reject bad ones (evaluated locally with
//! kube's CEL interpreter, the same rules the API server runs).

use kube::CustomResourceExt;
use push_operator::crd::PushCluster;
use serde_json::{json, Value};

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(name: &str) -> Value {
    let text = std::fs::read_to_string(root().join("examples").join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn shard_leases_name_this_crd_as_their_owner() {
    use kube::Resource;
    let owner = pushcluster_lease::kubernetes::push_cluster_owner("c", "u");
    assert_eq!(owner.api_version, PushCluster::api_version(&()));
    assert_eq!(owner.kind, PushCluster::kind(&()));
}

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let generated = serde_yaml::to_string(&PushCluster::crd()).unwrap();
    let file = root().join("crds/pushcluster.io_pushclusters.yaml");
    let checked_in = std::fs::read_to_string(&file).unwrap();
    assert!(
        generated == checked_in,
        "{} is stale: run `cargo run -p push-operator --bin crdgen > {}`",
        file.display(),
        file.display()
    );
}

fn spec_schema() -> Value {
    let crd = serde_json::to_value(PushCluster::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn examples_match_the_schema() {
    let validator = jsonschema::validator_for(&spec_schema()).unwrap();
    for name in [
        "pushcluster-minimal.yaml",
        "pushcluster-full.yaml",
        "pushcluster-redis-cluster.yaml",
        "pushcluster-redis-sentinel.yaml",
        "pushcluster-listeners.yaml",
        "pushcluster-invalid.yaml",
    ] {
        let v = example(name);
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
    // The schema itself rejects wrong types and unknown enum values.
    let mut bad = example("pushcluster-minimal.yaml");
    bad["spec"] = json!({"comet": {"shards": "two"}, "web": {"serviceType": "Ingress"}});
    assert!(validator.iter_errors(&bad).count() >= 2);
    // Redis address lists are bounded by the schema (a CEL rule over every
    // item of a list costs more than the API server allows a CRD).
    for (redis, what) in [
        (
            json!({"mode": "Cluster", "cluster": {"nodes": ["n"]}}),
            "host:port",
        ),
        (
            json!({"mode": "Cluster", "cluster": {"nodes": []}}),
            "an empty list",
        ),
        (
            json!({"mode": "Sentinel", "sentinel": {"masterName": "m", "addresses": []}}),
            "no Sentinel",
        ),
        (
            json!({"mode": "Sentinel", "sentinel": {"masterName": "a b", "addresses": ["s:26379"]}}),
            "a master name with a space",
        ),
    ] {
        let mut bad = example("pushcluster-minimal.yaml");
        bad["spec"] = json!({"storage": {"redis": redis}});
        assert!(validator.iter_errors(&bad).count() >= 1, "{what} accepted");
    }
}

fn cel_errors(v: &Value) -> Vec<String> {
    let pc: PushCluster = serde_json::from_value(v.clone()).unwrap();
    match pc.validate_cel() {
        Ok(()) => Vec::new(),
        Err(e) => vec![e.to_string()],
    }
}

#[test]
fn cel_accepts_the_good_examples() {
    for name in [
        "pushcluster-minimal.yaml",
        "pushcluster-full.yaml",
        "pushcluster-redis-cluster.yaml",
        "pushcluster-redis-sentinel.yaml",
        "pushcluster-listeners.yaml",
    ] {
        assert_eq!(cel_errors(&example(name)), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn cel_rejects_bad_specs_with_clear_messages() {
    let invalid = cel_errors(&example("pushcluster-invalid.yaml")).join("\n");
    assert!(
        invalid.contains("renewDeadlineSeconds must be below"),
        "{invalid}"
    );
    assert!(
        invalid.contains("exactly one of storage.redis.url"),
        "{invalid}"
    );
    let base = example("pushcluster-minimal.yaml");
    let cases = [
        (
            json!({"comet": {"shards": 0}}),
            "shards must be between 1 and 256",
        ),
        (
            json!({"comet": {"shards": 1000}}),
            "shards must be between 1 and 256",
        ),
        (
            json!({"comet": {"standbys": -1}}),
            "standbys must be between 0 and 64",
        ),
        (
            json!({"auth": {"subscriberTokenMaxLifetimeSeconds": -1}}),
            "subscriberTokenMaxLifetimeSeconds must be at least 0",
        ),
        (
            json!({"comet": {"workerThreads": -1}}),
            "workerThreads must be between 0 and 64",
        ),
        (
            json!({"web": {"workerThreads": 65}}),
            "workerThreads must be between 0 and 64",
        ),
        (
            json!({"lease": {"durationSeconds": 6, "renewDeadlineSeconds": 4, "retryPeriodSeconds": 4}}),
            "retryPeriodSeconds must be below",
        ),
        (
            json!({"message": {"replicas": 3}}),
            "embedded store runs in one message pod",
        ),
        (
            json!({"storage": {"redis": {}}}),
            "exactly one of storage.redis.url",
        ),
        (
            json!({"storage": {"embedded": {"size": "lots"}}}),
            "must be a quantity such as 1Gi",
        ),
        (
            json!({"storage": {"redis": {"url": "redis://:hunter2@redis:6379/0"}}, "message": {"replicas": 1}}),
            "must not carry credentials",
        ),
        (
            json!({"storage": {"redis": {"url": "redis://r:6379", "keyPrefix": "a{b}"}}}),
            "keyPrefix must be 1 to 100 letters",
        ),
        (
            json!({"auth": {"insecure": true, "adminTokenSecret": {"name": "s", "key": "k"}}}),
            "auth.insecure turns every credential off",
        ),
        (
            json!({"storage": {"redis": {"mode": "Sentinel"}}}),
            "storage.redis.sentinel (masterName and addresses) goes with mode Sentinel",
        ),
        (
            json!({"storage": {"redis": {"url": "redis://r:6379", "cluster": {"nodes": ["n:6379"]}}}}),
            "storage.redis.cluster (seed nodes) goes with mode Cluster",
        ),
        (
            json!({"storage": {"redis": {"mode": "Cluster", "url": "redis://r:6379", "cluster": {"nodes": ["n:6379"]}}}}),
            "name one node",
        ),
        (
            json!({"storage": {"redis": {"url": "redis://r:6379", "durability": {"replicas": 9}}}}),
            "durability.replicas must be between 0 and 5",
        ),
        (
            json!({"storage": {"redis": {"secretRef": {"name": "s", "key": "url"}, "passwordSecretRef": {"name": "s", "key": "pw"}}}}),
            "holds a whole URL with its password",
        ),
        (
            json!({"storage": {"redis": {"url": "redis://r:6379", "tls": {}}}}),
            "storage.redis.tls needs a TLS URL",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "Ingress", "host": "p.example.com"}]}),
            "give host (web) and shardHost",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "Ingress", "host": "p.example.com", "shardHost": "p.example.com"}]}),
            "shardHost must contain {shard}",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "NodePort"}]}),
            "NodePort listener needs host",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "ClusterIP", "gateway": {"name": "g"}}]}),
            "goes with type Gateway, and only with it",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "Gateway", "host": "p.example.com", "shardHost": "p-{shard}.example.com"}]}),
            "goes with type Gateway, and only with it",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "LoadBalancer", "ingressClassName": "nginx"}]}),
            "ingressClassName goes with type Ingress only",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "LoadBalancer", "tls": {"issuer": {"name": "le", "kind": "ClusterIssuer"}}}]}),
            "tls.issuer (cert-manager) goes with type Ingress only",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "ClusterIP", "tls": {}}]}),
            "tls needs secretName",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "Gateway", "host": "p.example.com", "shardHost": "p-{shard}.example.com", "gateway": {"name": "g"}, "tls": {"secretName": "s"}}]}),
            "certificate is on the Gateway",
        ),
        (
            json!({"listeners": [{"name": "web", "type": "ClusterIP"}]}),
            "must not be comet, comets, config, message, web or web-admin",
        ),
        (
            json!({"listeners": [{"name": "a-0", "type": "ClusterIP"}]}),
            "nor end in -<number>",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "ClusterIP"}, {"name": "a", "type": "NodePort", "host": "n"}]}),
            "listeners[].name must be unique",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "ClusterIP", "advertise": true}, {"name": "b", "type": "NodePort", "host": "n", "advertise": true}]}),
            "at most one listener may say advertise: true",
        ),
        (
            json!({"listeners": [{"name": "a", "type": "ClusterIP", "tls": {"secretName": "one"}}, {"name": "b", "type": "LoadBalancer", "tls": {"secretName": "two"}}]}),
            "give them all the same tls.secretName",
        ),
        (
            json!({"comet": {"advertise": {"ws": "p-{shard}:443"}}, "listeners": [{"name": "a", "type": "ClusterIP"}]}),
            "drop comet.advertise",
        ),
    ];
    for (spec, want) in cases {
        let mut v = base.clone();
        v["spec"] = spec.clone();
        let errs = cel_errors(&v).join("\n");
        assert!(
            errs.contains(want),
            "{spec}: expected {want:?}, got {errs:?}"
        );
    }
    // Redis lifts the one-message-pod rule.
    let mut ok = base.clone();
    ok["spec"] =
        json!({"message": {"replicas": 3}, "storage": {"redis": {"url": "redis://r:6379"}}});
    assert_eq!(cel_errors(&ok), Vec::<String>::new());
    for redis in [
        json!({"mode": "Sentinel", "sentinel": {"masterName": "mymaster", "addresses": ["redis-sentinel.redis:26379"]}, "passwordSecretRef": {"name": "redis", "key": "password"}, "durability": {"replicas": 1}}),
        json!({"mode": "Cluster", "cluster": {"nodes": ["redis-cluster-0.redis:6379", "redis-cluster-1.redis:6379"]}}),
        json!({"mode": "Single", "url": "redis://r:6379", "passwordSecretRef": {"name": "redis", "key": "password"}}),
        json!({"url": "rediss://r:6380", "tls": {"caSecretRef": {"name": "redis-ca", "key": "ca.crt"}}}),
        json!({"mode": "Cluster", "cluster": {"nodes": ["redis-cluster-0.redis:6379"]}, "tls": {}}),
    ] {
        let mut ok = base.clone();
        ok["spec"] = json!({"message": {"replicas": 2}, "storage": {"redis": redis.clone()}});
        assert_eq!(cel_errors(&ok), Vec::<String>::new(), "{redis}");
    }
}
