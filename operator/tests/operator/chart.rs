//! The Helm chart: its CRD is the generated one (Helm installs `crds/`
//! verbatim), and its ClusterRole grants no wildcard. `make test` also lints
//! it with Helm's own library (scripts/helm-lint.py).

use std::path::Path;

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_chart_ships_the_generated_crd() {
    let chart = std::fs::read_to_string(
        root().join("charts/pushcluster-operator/crds/pushcluster.io_pushclusters.yaml"),
    )
    .unwrap();
    let crds =
        std::fs::read_to_string(root().join("crds/pushcluster.io_pushclusters.yaml")).unwrap();
    assert!(chart == crds, "the chart's CRD is stale: run `make crds`");
}

#[test]
fn the_operator_cluster_role_has_no_wildcards() {
    let text =
        std::fs::read_to_string(root().join("charts/pushcluster-operator/templates/rbac.yaml"))
            .unwrap();
    // The rules are plain YAML in one template, used by the ClusterRole and
    // by the per-namespace Role alike.
    let start = text.find(r#"define "pco.rules""#).unwrap();
    let block = &text[start..];
    let block = &block[..block.find("{{- end }}").unwrap()];
    let rules = &block[block.find("rules:").unwrap()..];
    let parsed: serde_yaml::Value = serde_yaml::from_str(rules).unwrap();
    let rules = parsed["rules"].as_sequence().unwrap();
    assert!(rules.len() >= 8);
    for r in rules {
        for field in ["apiGroups", "resources", "verbs"] {
            for v in r[field].as_sequence().unwrap() {
                assert_ne!(v.as_str(), Some("*"), "wildcard in {field}: {r:?}");
            }
        }
        let verbs: Vec<&str> = r["verbs"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            !verbs.contains(&"escalate")
                && !verbs.contains(&"bind")
                && !verbs.contains(&"impersonate")
        );
    }
}
