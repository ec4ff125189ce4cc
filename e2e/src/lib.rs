//! Helpers for the cluster end-to-end tests: find a cluster (or explain why
//! the tests skip), throwaway namespaces, the CRD, the operator process, Helm
//! and kubectl as a user runs them, and waiting for conditions.

pub mod api_gate;
pub mod api_throttle;
pub mod setup;
pub mod traffic;

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use std::collections::BTreeMap;
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
        // `make e2e` builds debug binaries; `make e2e-local` the release ones
        // (its image) and says so through E2E_BIN_DIR.
        let dir = std::env::var("E2E_BIN_DIR").unwrap_or_else(|_| "target/debug".into());
        let bin = root().join(dir).join("push-operator");
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

/// The images the full suite runs: `E2E_IMAGE` (loaded into the cluster, or
/// mapped to `target/release` by the process harness) and a second tag of the
/// same build for the rolling upgrade (`E2E_IMAGE_UPGRADE`, default the same
/// repository with `-next` appended to the tag).
#[derive(Debug, Clone)]
pub struct Images {
    pub repository: String,
    pub tag: String,
    pub upgrade_tag: String,
}

impl Images {
    /// From the environment, or `None` after printing why the suite skips.
    pub fn from_env() -> Option<Self> {
        let Ok(image) = std::env::var("E2E_IMAGE") else {
            println!(
                "SKIP: set E2E_IMAGE to an image of this repository the cluster can run (make e2e-local does)"
            );
            return None;
        };
        let (repository, tag) = image
            .rsplit_once(':')
            .map(|(r, t)| (r.to_owned(), t.to_owned()))
            .unwrap_or((image.clone(), "latest".to_owned()));
        let upgrade_tag = std::env::var("E2E_IMAGE_UPGRADE")
            .ok()
            .and_then(|u| u.rsplit_once(':').map(|(_, t)| t.to_owned()))
            .unwrap_or_else(|| format!("{tag}-next"));
        Some(Self {
            repository,
            tag,
            upgrade_tag,
        })
    }

    /// `repository:tag`.
    pub fn image(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }

    /// `repository:upgrade_tag`.
    pub fn upgrade(&self) -> String {
        format!("{}:{}", self.repository, self.upgrade_tag)
    }
}

/// A client for the full suite: a cluster that runs pods and an image, or
/// `None` after printing why it skips.
pub async fn full_cluster() -> Option<(Client, Images)> {
    let client = cluster().await?;
    let images = Images::from_env()?;
    if !has_ready_nodes(&client).await {
        println!("SKIP: no Ready node (a control-plane-only API server runs no pods)");
        return None;
    }
    Some((client, images))
}

/// Runs Helm's library (helm-sdkpy, as `make chart-lint` does) on the chart.
/// `action` is `install` (with `values`, waiting up to `timeout` when `wait`)
/// or `uninstall`.
pub fn helm(
    action: &str,
    release: &str,
    namespace: &str,
    values: &serde_json::Value,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let chart = root().join("charts/pushcluster-operator");
    let script = r#"
import asyncio, json, sys, helm_sdkpy
action, release, ns, chart, values, wait, timeout = sys.argv[1:8]
cfg = helm_sdkpy.Configuration(namespace=ns)
async def main():
    if action == "install":
        await helm_sdkpy.Install(cfg).run(release, chart, values=json.loads(values), wait=wait == "1", timeout=int(timeout))
    else:
        await helm_sdkpy.Uninstall(cfg).run(release, wait=wait == "1", timeout=int(timeout))
asyncio.run(main())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([
            action,
            release,
            namespace,
            &chart.display().to_string(),
            &values.to_string(),
            if wait { "1" } else { "0" },
            &timeout.as_secs().to_string(),
        ])
        .output()
        .context("running python3 with helm_sdkpy (scripts/ensure-deps.sh installs it)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        bail!("helm {action} {release}: {last}");
    }
    Ok(())
}

/// Runs `kubectl ARGS` (with `stdin` when given) and returns its output.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut cmd = Command::new("kubectl");
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("running kubectl")?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.unwrap_or_default().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Deployments and StatefulSets of PushCluster `cluster`, as `kind/name`.
pub fn workloads(namespace: &str, cluster: &str) -> anyhow::Result<Vec<String>> {
    let out = kubectl(
        &[
            "get",
            "deployments,statefulsets",
            "-n",
            namespace,
            "-l",
            &format!("app.kubernetes.io/instance={cluster}"),
            "-o",
            "name",
        ],
        None,
    )?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// `kubectl rollout status` of every workload of `cluster`; the first failure.
pub fn rollout_status(namespace: &str, cluster: &str, timeout: Duration) -> anyhow::Result<()> {
    let t = format!("--timeout={}s", timeout.as_secs());
    for w in workloads(namespace, cluster)? {
        kubectl(&["rollout", "status", &w, "-n", namespace, &t], None)?;
    }
    Ok(())
}

/// Names and uids of the running pods of one component of `cluster`.
pub async fn pods_of(
    client: &Client,
    namespace: &str,
    cluster: &str,
    component: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!(
        "app.kubernetes.io/instance={cluster},app.kubernetes.io/component={component}"
    ));
    Ok(pods
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect())
}

/// SIGKILLs the main process of `pod`'s first container: a crash. Works where
/// the test can see the container's process (the process harness reports
/// `proc://<pid>` container ids); elsewhere it says so.
pub async fn kill9(client: &Client, namespace: &str, pod: &str) -> anyhow::Result<()> {
    signal_pod(client, namespace, pod, "KILL").await
}

/// Sends `sig` (`KILL`, `STOP`, `CONT`) to the main process of `pod`'s first
/// container; see [`kill9`] for where that works.
pub async fn signal_pod(
    client: &Client,
    namespace: &str,
    pod: &str,
    sig: &str,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let p = pods.get(pod).await?;
    let id = p
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.container_id)
        .unwrap_or_default();
    let Some(pid) = id.strip_prefix("proc://") else {
        bail!("cannot signal {pod}: its container {id:?} is not a local process (needs the process harness)");
    };
    let status = Command::new("kill")
        .args([&format!("-{sig}"), pid])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
    Ok(())
}

/// Applies a PushCluster example from `examples/` into `namespace` with
/// `kubectl apply`, its image set to `image`; returns its name.
pub fn apply_example(file: &str, namespace: &str, image: &str) -> anyhow::Result<String> {
    apply_example_with(file, namespace, image, |_| Ok(()))
}

/// [`apply_example`], after `edit` changed the example (the full example
/// with another storage, say).
pub fn apply_example_with(
    file: &str,
    namespace: &str,
    image: &str,
    edit: impl FnOnce(&mut serde_json::Value) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let mut pc = example(file)?;
    edit(&mut pc)?;
    pc["spec"]["image"] = image.into();
    let name = pc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    kubectl(
        &["apply", "-n", namespace, "-f", "-"],
        Some(&serde_json::to_string(&pc)?),
    )?;
    Ok(name)
}

/// Waits until `cluster`'s status says Ready with `shards` ready shards for
/// its current generation.
pub async fn wait_ready(
    client: &Client,
    namespace: &str,
    cluster: &str,
    shards: i32,
    limit: Duration,
) -> anyhow::Result<()> {
    let pcs: Api<push_operator::crd::PushCluster> = Api::namespaced(client.clone(), namespace);
    wait(
        &format!("{namespace}/{cluster} Ready with {shards} shards"),
        limit,
        || async {
            let pc = pcs.get(cluster).await?;
            let generation = pc.metadata.generation;
            Ok(pc.status.is_some_and(|s| {
                s.observed_generation == generation
                    && s.ready_shards == shards
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            }))
        },
    )
    .await
}

/// What a PushCluster's generated credentials Secret holds.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub admin_token: String,
    pub subscriber_secret: String,
    pub rpc_token: String,
}

/// Reads `<cluster>-credentials` from `namespace` (as an app team would
/// with `kubectl get secret`), waiting until the operator made it.
pub async fn credentials(
    client: &Client,
    namespace: &str,
    cluster: &str,
) -> anyhow::Result<Credentials> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), namespace);
    let name = format!("{cluster}-credentials");
    wait(
        &format!("Secret {namespace}/{name}"),
        Duration::from_secs(60),
        || async { Ok(secrets.get_opt(&name).await?.is_some()) },
    )
    .await?;
    let s = secrets.get(&name).await?;
    let data = s.data.unwrap_or_default();
    let get = |k: &str| -> anyhow::Result<String> {
        let v = data.get(k).with_context(|| format!("{name} has no {k}"))?;
        Ok(String::from_utf8(v.0.clone())?)
    };
    Ok(Credentials {
        admin_token: get("admin-token")?,
        subscriber_secret: get("subscriber-secret")?,
        rpc_token: get("rpc-token")?,
    })
}

/// The internal RPC's TLS material of `cluster` (its `<cluster>-rpc-tls`
/// Secret, what its pods mount) written to files under `dir`, as a client
/// of its gRPC ports would use it.
pub async fn rpc_tls_files(
    client: &Client,
    namespace: &str,
    cluster: &str,
    dir: &std::path::Path,
) -> anyhow::Result<pushcluster_proto::tls::RpcTls> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), namespace);
    let name = format!("{cluster}-rpc-tls");
    let data = secrets.get(&name).await?.data.unwrap_or_default();
    std::fs::create_dir_all(dir)?;
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        let v = data
            .get(key)
            .with_context(|| format!("{name} has no {key}"))?;
        std::fs::write(dir.join(key), &v.0)?;
    }
    Ok(pushcluster_proto::tls::RpcTls {
        ca_file: dir.join("ca.crt"),
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        server_name: format!("rpc.{cluster}.{namespace}.pushcluster.internal"),
        connect: true,
        accept_plaintext: false,
    })
}

/// Observations of histogram `metric` (those whose labels contain `label`)
/// summed over the ops endpoints of `component`'s pods of `cluster`: all of
/// them, and those over `over` seconds (by the widest bucket not above it).
/// For telling where a slow push spent its time.
pub async fn histogram_tail(
    client: &Client,
    namespace: &str,
    cluster: &str,
    component: &str,
    metric: &str,
    label: &str,
    over: f64,
) -> anyhow::Result<(u64, u64)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!(
        "app.kubernetes.io/instance={cluster},app.kubernetes.io/component={component}"
    ));
    let (mut all, mut within) = (0u64, 0u64);
    for p in pods.list(&lp).await?.items {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
        let port = p
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|c| c.name.as_deref() == Some("ops"))
            .map(|c| c.container_port);
        let (Some(ip), Some(port)) = (ip, port) else {
            continue;
        };
        let mut conn = tokio::net::TcpStream::connect((ip.as_str(), port as u16)).await?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: ops\r\n\r\n")
            .await?;
        let mut text = String::new();
        conn.read_to_string(&mut text).await?;
        let mut best: Option<(f64, u64)> = None;
        for line in text.lines().filter(|l| l.contains(label)) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if name.starts_with(&format!("{metric}_count")) {
                all += value as u64;
            } else if name.starts_with(&format!("{metric}_bucket")) {
                let le = name
                    .split("le=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .and_then(|v| v.parse::<f64>().ok());
                if let Some(le) = le.filter(|le| *le <= over) {
                    if best.is_none_or(|(b, _)| le > b) {
                        best = Some((le, value as u64));
                    }
                }
            }
        }
        within += best.map_or(0, |(_, n)| n);
    }
    Ok((all, all.saturating_sub(within)))
}
