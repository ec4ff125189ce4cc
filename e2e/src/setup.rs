//! Set-up shared by the scenarios that run whole clusters: the operator
//! installed by Helm, a Redis deployed as an app team would, Secrets, the
//! first push to a fresh cluster, and who holds which shard.

use crate::{
    apply_example, credentials, helm, kubectl, rollout_status, wait_ready, Images, TestNamespace,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use push_operator::crd::PushCluster;
use pushcluster_client::http::Client as HttpApi;
use serde_json::json;
use std::time::{Duration, Instant};

/// Helm installs the operator (chart defaults) into a namespace of its own;
/// uninstalled and deleted on drop of the returned guard.
pub struct ChartOperator {
    release: String,
    ns: Option<TestNamespace>,
}

impl ChartOperator {
    pub async fn install(client: &Client, images: &Images, release: &str) -> anyhow::Result<Self> {
        let ns = TestNamespace::create(client, release).await?;
        let values = json!({"image": {"repository": images.repository, "tag": images.tag}});
        let (r, n) = (release.to_owned(), ns.name.clone());
        let installed = tokio::task::spawn_blocking(move || {
            helm("install", &r, &n, &values, true, Duration::from_secs(120))
        })
        .await?;
        let op = Self {
            release: release.to_owned(),
            ns: Some(ns),
        };
        if let Err(e) = installed {
            // The release exists even when its wait failed: remove it, so
            // its cluster-wide objects do not outlive the test.
            let _ = op.uninstall().await;
            return Err(e);
        }
        Ok(op)
    }

    /// Scales the operator's Deployment to 0 and waits until its pod is
    /// gone: from then on nothing repairs or relabels the clusters.
    pub async fn scale_to_zero(&self, client: &Client) -> anyhow::Result<()> {
        let (n, deployment) = (
            self.namespace().to_owned(),
            format!("deployment/{}-pushcluster-operator", self.release),
        );
        tokio::task::spawn_blocking(move || {
            kubectl(&["scale", "-n", &n, &deployment, "--replicas=0"], None)
        })
        .await??;
        crate::wait("the operator gone", Duration::from_secs(240), || async {
            let pods: Api<k8s_openapi::api::core::v1::Pod> =
                Api::namespaced(client.clone(), self.namespace());
            Ok(pods
                .list(&kube::api::ListParams::default())
                .await?
                .items
                .is_empty())
        })
        .await
    }

    /// The Helm release name.
    pub fn release(&self) -> &str {
        &self.release
    }

    /// The namespace it runs in.
    pub fn namespace(&self) -> &str {
        self.ns.as_ref().map_or("", |n| n.name.as_str())
    }

    pub async fn uninstall(mut self) -> anyhow::Result<()> {
        let Some(ns) = self.ns.take() else {
            return Ok(());
        };
        let (r, n) = (self.release.clone(), ns.name.clone());
        tokio::task::spawn_blocking(move || {
            helm(
                "uninstall",
                &r,
                &n,
                &json!({}),
                true,
                Duration::from_secs(60),
            )
        })
        .await??;
        ns.delete().await
    }
}

/// The first push to a cluster that just turned Ready. On a real cluster a
/// Service name resolves as soon as the Service exists; the process harness
/// writes it into pods' /etc/hosts only once it has a ready endpoint, up to a
/// second or two later, so a back end's first push may meet a 5xx. Retried
/// like a back end would (never an authorisation failure).
pub async fn first_push(api: &HttpApi, key: &str, body: &str) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match api.push(key, body, None).await {
            Ok(m) => return Ok(m),
            Err(pushcluster_client::Error::Api { ret: 65533, msg }) => {
                anyhow::bail!("unauthorized: {msg}")
            }
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Creates Secret `name` in `ns` from string `data`.
pub async fn secret(
    client: &Client,
    ns: &str,
    name: &str,
    data: serde_json::Value,
) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": data,
    }))?;
    api.create(&PostParams::default(), &s).await?;
    Ok(())
}

/// A Redis as an app team would run it: a Deployment with its append-only
/// file on a PersistentVolumeClaim (fsynced on every write), and a Service.
/// A deleted pod comes back with every acknowledged write.
pub async fn deploy_redis(namespace: &str) -> anyhow::Result<()> {
    let claim = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: push-redis-data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---"#;
    let redis = redis_yaml(
        r#"--port, "6379", --save, "", --appendonly, "yes", --appendfsync, always, --dir, /data"#,
        (
            "data",
            "/data",
            "persistentVolumeClaim: {claimName: push-redis-data}",
        ),
    );
    apply_yaml(namespace, format!("{claim}{redis}")).await
}

/// A Deployment `push-redis` (one pod, replaced whole: `Recreate`) running
/// `redis-server` with `args` (a YAML flow list's items) and `volume`
/// (name, mount path, source) mounted, ready once port 6379 takes
/// connections, and its Service.
pub fn redis_yaml(args: &str, (volume, mount, source): (&str, &str, &str)) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: push-redis}}
spec:
  strategy: {{type: Recreate}}
  selector: {{matchLabels: {{app: push-redis}}}}
  template:
    metadata: {{labels: {{app: push-redis}}}}
    spec:
      containers:
        - name: redis
          image: {image}
          command: [redis-server, {args}, --protected-mode, "no"]
          ports: [{{name: redis, containerPort: 6379}}]
          readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
          volumeMounts: [{{name: {volume}, mountPath: {mount}}}]
      volumes:
        - name: {volume}
          {source}
---
apiVersion: v1
kind: Service
metadata: {{name: push-redis}}
spec:
  selector: {{app: push-redis}}
  ports: [{{name: redis, port: 6379, targetPort: 6379}}]
"#,
        image = redis_image()
    )
}

/// The image Redis pods run (`E2E_REDIS_IMAGE`, default `redis:7`; the
/// harness maps it to the machine's redis-server).
pub fn redis_image() -> String {
    std::env::var("E2E_REDIS_IMAGE").unwrap_or_else(|_| "redis:7".into())
}

/// `kubectl apply` of `yaml` in `namespace`.
pub async fn apply_yaml(namespace: &str, yaml: String) -> anyhow::Result<()> {
    let n = namespace.to_owned();
    tokio::task::spawn_blocking(move || kubectl(&["apply", "-n", &n, "-f", "-"], Some(&yaml)))
        .await??;
    Ok(())
}

/// The shard Leases' holders and transitions, for "nothing changed hands".
pub async fn lease_holders(
    client: &Client,
    ns: &str,
    cluster: &str,
) -> anyhow::Result<Vec<(String, String, i32)>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let mut out: Vec<(String, String, i32)> = leases
        .list(
            &kube::api::ListParams::default().labels(&format!("pushcluster.io/cluster={cluster}")),
        )
        .await?
        .items
        .into_iter()
        .map(|l| {
            let spec = l.spec.unwrap_or_default();
            (
                l.metadata.name.unwrap_or_default(),
                spec.holder_identity.unwrap_or_default(),
                spec.lease_transitions.unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// A PushCluster example as [`deploy_example`] left it.
pub struct Deployed {
    /// The PushCluster's name.
    pub name: String,
    /// Its shard count.
    pub shards: i32,
    /// The admin token pushes carry.
    pub admin_token: String,
    /// The secret followers' tokens are minted from.
    pub subscriber_secret: String,
}

/// Applies `example` (`pushcluster-minimal.yaml` or `pushcluster-full.yaml`)
/// in `ns` and waits until it is Ready. The full example gets the Redis and
/// Secrets it names, and loses its public `advertise` names, so that
/// clients here reach the comets at their pod addresses.
pub async fn deploy_example(
    client: &Client,
    images: &Images,
    ns: &str,
    example: &str,
    limit: Duration,
) -> anyhow::Result<Deployed> {
    let full = example == "pushcluster-full.yaml";
    if full {
        deploy_redis(ns).await?;
        secret(
            client,
            ns,
            "push-redis",
            json!({"url": "redis://push-redis:6379"}),
        )
        .await?;
        secret(
            client,
            ns,
            "push-auth",
            json!({"admin-token": "full-admin-token", "subscriber-secret": "full-subscriber-secret"}),
        )
        .await?;
    }
    let (n, image, file) = (ns.to_owned(), images.image(), example.to_owned());
    let name = tokio::task::spawn_blocking(move || apply_example(&file, &n, &image)).await??;
    let shards = if full { 8 } else { 2 };
    wait_ready(client, ns, &name, shards, limit).await?;
    let (admin_token, subscriber_secret) = if full {
        without_advertise(client, ns, &name, shards, limit).await?;
        (
            "full-admin-token".to_owned(),
            "full-subscriber-secret".to_owned(),
        )
    } else {
        let creds = credentials(client, ns, &name).await?;
        (creds.admin_token, creds.subscriber_secret)
    };
    Ok(Deployed {
        name,
        shards,
        admin_token,
        subscriber_secret,
    })
}

/// Drops `cluster`'s `advertise` addresses (the full example's public DNS
/// names, which nothing here resolves), so clients reach the comets at
/// their pod addresses, and waits for the rollout and Ready.
pub async fn without_advertise(
    client: &Client,
    ns: &str,
    cluster: &str,
    shards: i32,
    limit: Duration,
) -> anyhow::Result<()> {
    let clusters: Api<PushCluster> = Api::namespaced(client.clone(), ns);
    clusters
        .patch(
            cluster,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"comet": {"advertise": null}}})),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (n, c) = (ns.to_owned(), cluster.to_owned());
    tokio::task::spawn_blocking(move || rollout_status(&n, &c, limit)).await??;
    wait_ready(client, ns, cluster, shards, limit).await
}

/// The API server's address, as this test's kubeconfig names it.
pub async fn api_server() -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let cfg = kube::Config::infer().await?;
    let host = cfg.cluster_url.host().unwrap_or("127.0.0.1").to_owned();
    let port = cfg.cluster_url.port_u16().unwrap_or(443);
    (host.as_str(), port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host}:{port} resolves to nothing"))
}

/// Points the pods of `components` (`comet`, `web`) of cluster `name` at an
/// API-server stand-in on 127.0.0.1:`port` (a rollout), and waits until
/// every rollout is done and comets of the new ReplicaSet hold all `shards`.
pub async fn api_through(
    client: &Client,
    ns: &str,
    name: &str,
    shards: i32,
    port: u16,
    components: &[&str],
) -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    let port = port.to_string();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    // A field manager of its own: the operator's server-side applies own
    // the rest of the env and leave these two entries alone.
    let env = json!([
        {"name": "KUBERNETES_SERVICE_PORT", "value": port},
        {"name": "KUBERNETES_SERVICE_PORT_HTTPS", "value": port},
    ]);
    for c in components {
        deployments
            .patch(
                &format!("{name}-{c}"),
                &PatchParams {
                    field_manager: Some("e2e-api-gate".into()),
                    ..PatchParams::default()
                },
                &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": c, "env": env}]}}}})),
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (n, c) = (ns.to_owned(), name.to_owned());
    tokio::task::spawn_blocking(move || rollout_status(&n, &c, Duration::from_secs(240))).await??;
    crate::wait(
        "every shard held by a comet of the new ReplicaSet",
        Duration::from_secs(240),
        || async {
            let comets = crate::pods_of(client, ns, name, "comet").await?;
            let held = lease_holders(client, ns, name).await?;
            Ok(
                held.len() == shards as usize
                    && held.iter().all(|(_, h, _)| comets.contains_key(h)),
            )
        },
    )
    .await
}
