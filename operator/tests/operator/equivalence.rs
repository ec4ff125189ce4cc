//! Temporary: the typed children equal the JSON builders' objects (minus the
//! applied-hash annotation, which the controller now adds), on many specs.

use push_operator::children;
use push_operator::crd::PushCluster;
use push_operator::legacy_builders;
use serde_json::{json, Value};
use std::path::Path;

fn example(name: &str) -> PushCluster {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("examples").join(name)).unwrap();
    let mut pc: PushCluster = serde_yaml::from_str(&text).unwrap();
    pc.metadata.namespace = Some("team-a".into());
    pc.metadata.uid = Some("0000-uid".into());
    pc
}

fn variants() -> Vec<(String, PushCluster)> {
    let min = example("pushcluster-minimal.yaml");
    let full = example("pushcluster-full.yaml");
    let mut out = vec![
        ("minimal".to_owned(), min.clone()),
        ("full".to_owned(), full.clone()),
    ];
    let patch = |base: &PushCluster, name: &str, spec: Value| {
        let mut v = serde_json::to_value(base).unwrap();
        merge(&mut v["spec"], &spec);
        (
            name.to_owned(),
            serde_json::from_value::<PushCluster>(v).unwrap(),
        )
    };
    out.push(patch(&min, "insecure", json!({"auth": {"insecure": true}})));
    out.push(patch(
        &full,
        "full-insecure",
        json!({"auth": {"insecure": true, "privateJsonp": true}}),
    ));
    out.push(patch(
        &min,
        "np-off",
        json!({"networkPolicy": {"enabled": false}}),
    ));
    out.push(patch(&min, "np-custom", json!({"networkPolicy": {"publicFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "adminFrom": [{"podSelector": {"matchLabels": {"a": "b"}}}]}})));
    out.push(patch(&min, "threads", json!({"comet": {"workerThreads": 0, "resources": {"limits": {"memory": "1Gi"}}}, "web": {"workerThreads": 4, "serviceType": "NodePort", "resources": {"requests": {"cpu": "1"}}}})));
    out.push(patch(&min, "class", json!({"storage": {"embedded": {"size": "5Gi", "storageClassName": "fast"}}, "scheduling": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {"topologyKey": "x"}}]}}}})));
    out.push(patch(
        &full,
        "redis-url",
        json!({"storage": {"redis": {"url": "redis://r:6379", "secretRef": null}}}),
    ));
    out.push(patch(&min, "one-shard", json!({"comet": {"shards": 1, "standbys": 0, "ports": {"ws": 1, "tcp": 2, "rpc": 3, "ops": 4}}})));
    let mut no_ns = min.clone();
    no_ns.metadata.uid = None;
    out.push(("no-uid".into(), no_ns));
    out
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(k);
                } else {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (a, b) => *a = b.clone(),
    }
}

#[test]
fn typed_children_equal_the_json_builders() {
    let creds = push_operator::children::CredentialDigests(
        [("admin-token", "x"), ("rpc-token", "y")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    for (name, pc) in variants() {
        for creds in [Default::default(), creds.clone()] {
            let old: Vec<Value> =
                legacy_builders::desired(&pc, &legacy_builders::CredentialDigests(creds.0.clone()))
                    .unwrap()
                    .into_iter()
                    .map(|c| serde_json::to_value(&c.object).unwrap())
                    .collect();
            let new: Vec<Value> = children::desired(&pc, &creds)
                .unwrap()
                .iter()
                .map(|c| push_operator::controller::apply::apply_body(c).unwrap())
                .collect();
            assert_eq!(old.len(), new.len(), "{name}");
            for (o, n) in old.iter().zip(&new) {
                assert_eq!(o, n, "{name}: {}", o["metadata"]["name"]);
            }
            eprintln!("{name}: {} objects equal", new.len());
        }
    }
}
