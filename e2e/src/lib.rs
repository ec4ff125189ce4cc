//! Helpers for the cluster end-to-end tests: find a cluster (or explain why
//! the tests skip), throwaway namespaces, the CRD, the operator process, and
//! waiting for conditions.

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A client for the cluster of `$KUBECONFIG` (or in-cluster), or `None` after
/// printing why the tests skip.
pub async fn cluster() -> Option<Client> {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            println!(
                "SKIP: no Kubernetes cluster configured ({e}); set KUBECONFIG to run the e2e tests"
            );
            return None;
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(v)) => {
            println!(
                "cluster: Kubernetes {}.{} ({})",
                v.major, v.minor, v.git_version
            );
            Some(client)
        }
        Ok(Err(e)) => {
            println!("SKIP: the API server of $KUBECONFIG does not answer ({e})");
            None
        }
        Err(_) => {
            println!("SKIP: the API server of $KUBECONFIG did not answer within 10 s");
            None
        }
    }
}

/// Whether pods can run (some node is Ready); without, control-plane mode.
pub async fn has_ready_nodes(client: &Client) -> bool {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes
        .list(&Default::default())
        .await
        .map(|l| {
            l.items.iter().any(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        })
        .unwrap_or(false)
}

/// A namespace deleted when dropped.
pub struct TestNamespace {
    client: Client,
    pub name: String,
}

impl TestNamespace {
    /// Creates `pushcluster-e2e-<suffix>-<pid>`.
    pub async fn create(client: &Client, suffix: &str) -> anyhow::Result<Self> {
        let name = format!("pushcluster-e2e-{suffix}-{}", std::process::id());
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        api.create(&PostParams::default(), &ns).await?;
        Ok(Self {
            client: client.clone(),
            name,
        })
    }
}

impl TestNamespace {
    /// Deletes the namespace (and everything in it) now.
    pub async fn delete(self) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.delete(&self.name, &DeleteParams::background()).await?;
        Ok(())
    }
}

/// Leftover namespaces of a failed run are kept for inspection unless the
/// runtime can still delete them.
impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let name = self.name.clone();
        // Best effort; the test runtime may already be shutting down.
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            });
        }
    }
}

/// Server-side applies the CRD from `crds/` and waits until it is Established.
pub async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(root().join("crds/pushcluster.io_pushclusters.yaml"))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        "pushclusters.pushcluster.io",
        &PatchParams::apply("pushcluster-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    wait(
        "the CRD to be Established",
        Duration::from_secs(30),
        || async {
            let c = api.get("pushclusters.pushcluster.io").await?;
            Ok(c.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            }))
        },
    )
    .await
}

/// The operator running out of cluster against `$KUBECONFIG`; killed on drop.
pub struct Operator(Child);

impl Operator {
    /// Starts `push-operator run` watching `namespace` (no leader election).
    pub fn start(namespace: &str) -> anyhow::Result<Self> {
        let bin = root().join("target/debug/push-operator");
        if !bin.exists() {
            bail!(
                "{} is missing: run `cargo build --workspace --bins` (make e2e does)",
                bin.display()
            );
        }
        let child = Command::new(bin)
            .args([
                "run",
                "--no-leader-election",
                "--listen",
                "127.0.0.1:0",
                "--namespace",
                namespace,
            ])
            .spawn()
            .context("starting push-operator")?;
        Ok(Self(child))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 500 ms until it returns true; fails after `limit`.
pub async fn wait<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    let mut last_err = String::new();
    loop {
        match check().await {
            Ok(true) => {
                println!("ok: {what} ({:.1} s)", start.elapsed().as_secs_f64());
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => last_err = e.to_string(),
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what} {last_err}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads an example PushCluster from `examples/`.
pub fn example(name: &str) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(root().join("examples").join(name))?;
    Ok(serde_yaml::from_str(&text)?)
}
