//! More clusters as users apply them, on a cluster that runs pods: the full
//! example on a Redis the test deploys (a plain Deployment + Service), and two
//! tenants in two namespaces served by one operator, neither of which can see
//! or use the other's keys, messages or credentials.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::Client;
use pushcluster_client::http::{Client as HttpApi, Proto};
use pushcluster_e2e::traffic::ServiceProxy;
use pushcluster_e2e::{
    apply_example, full_cluster, helm, kubectl, rollout_status, wait_ready, Images, TestNamespace,
};
use serde_json::json;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);

/// Helm installs the operator (chart defaults) into a namespace of its own;
/// uninstalled and deleted on drop of the returned guard.
struct Operator {
    release: String,
    ns: Option<TestNamespace>,
}

impl Operator {
    async fn install(client: &Client, images: &Images, release: &str) -> anyhow::Result<Self> {
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

    async fn uninstall(mut self) -> anyhow::Result<()> {
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
async fn first_push(api: &HttpApi, key: &str, body: &str) -> anyhow::Result<i64> {
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

async fn secret(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_example_on_redis() -> anyhow::Result<()> {
    let Some((client, images)) = full_cluster().await else {
        return Ok(());
    };
    let op = Operator::install(&client, &images, "pco-full").await?;
    let ns = TestNamespace::create(&client, "full").await?;
    let result = async {
        // A Redis as an app team would run it for a test: Deployment + Service.
        let redis = format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: push-redis}}
spec:
  selector: {{matchLabels: {{app: push-redis}}}}
  template:
    metadata: {{labels: {{app: push-redis}}}}
    spec:
      containers:
        - name: redis
          image: {image}
          command: [redis-server, --port, "6379", --save, "", --appendonly, "no", --protected-mode, "no"]
          ports: [{{name: redis, containerPort: 6379}}]
          readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: push-redis}}
spec:
  selector: {{app: push-redis}}
  ports: [{{name: redis, port: 6379, targetPort: 6379}}]
"#,
            image = std::env::var("E2E_REDIS_IMAGE").unwrap_or_else(|_| "redis:7".into())
        );
        let n = ns.name.clone();
        tokio::task::spawn_blocking(move || kubectl(&["apply", "-n", &n, "-f", "-"], Some(&redis)))
            .await??;
        secret(&client, &ns.name, "push-redis", json!({"url": "redis://push-redis:6379"})).await?;
        secret(
            &client,
            &ns.name,
            "push-auth",
            json!({"admin-token": "full-admin-token", "subscriber-secret": "full-subscriber-secret"}),
        )
        .await?;
        let (n, image) = (ns.name.clone(), images.image());
        let name =
            tokio::task::spawn_blocking(move || apply_example("pushcluster-full.yaml", &n, &image))
                .await??;
        let t = Instant::now();
        wait_ready(&client, &ns.name, &name, 8, LIMIT).await?;
        let (n, c) = (ns.name.clone(), name.clone());
        tokio::task::spawn_blocking(move || rollout_status(&n, &c, LIMIT)).await??;
        println!(
            "PASS S2 kubectl apply pushcluster-full.yaml (Redis, 8 shards + 2 standbys, 3 message, 3 web): Ready and every rollout complete in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // The admin token from the Secret is required, and works.
        let admin = ServiceProxy::start(&client, &ns.name, &format!("{name}-web-admin"), "admin").await?;
        let public = ServiceProxy::start(&client, &ns.name, &format!("{name}-web"), "public").await?;
        let anonymous = HttpApi::new(&public.url(), &admin.url(), None);
        let authorised = HttpApi::new(&public.url(), &admin.url(), Some("full-admin-token".into()));
        let refused = anonymous.push("k", "{}", None).await;
        anyhow::ensure!(
            matches!(refused, Err(pushcluster_client::Error::Api { ret: 65533, .. })),
            "a push without the admin token was not refused as unauthorized: {refused:?}"
        );
        let m1 = first_push(&authorised, "k", r#"{"n":1}"#).await?;
        let m2 = authorised.push("k", r#"{"n":2}"#, None).await?;
        anyhow::ensure!(m2 == m1 + 1, "mids {m1}, {m2} are not contiguous");
        println!("PASS S2 full example serves: pushes with the admin token stored as mids {m1}, {m2}; without it refused");
        anyhow::Ok(())
    }
    .await;
    ns.delete().await?;
    op.uninstall().await?;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_one_operator() -> anyhow::Result<()> {
    let Some((client, images)) = full_cluster().await else {
        return Ok(());
    };
    let op = Operator::install(&client, &images, "pco-tenants").await?;
    let a = TestNamespace::create(&client, "tenant-a").await?;
    let b = TestNamespace::create(&client, "tenant-b").await?;
    let result = async {
        let mut apis = Vec::new();
        for (ns, token) in [(&a, "token-of-a"), (&b, "token-of-b")] {
            secret(&client, &ns.name, "push-auth", json!({"admin-token": token})).await?;
            // Same PushCluster name in both: only the namespace tells them apart.
            let pc = json!({
                "apiVersion": "pushcluster.io/v1alpha1", "kind": "PushCluster",
                "metadata": {"name": "push"},
                "spec": {"image": images.image(), "web": {"replicas": 1}, "comet": {"shards": 2, "standbys": 0},
                         "auth": {"adminTokenSecret": {"name": "push-auth", "key": "admin-token"}}}
            });
            let n = ns.name.clone();
            tokio::task::spawn_blocking(move || {
                kubectl(&["apply", "-n", &n, "-f", "-"], Some(&pc.to_string()))
            })
            .await??;
        }
        for ns in [&a, &b] {
            wait_ready(&client, &ns.name, "push", 2, LIMIT).await?;
        }
        for (ns, token) in [(&a, "token-of-a"), (&b, "token-of-b")] {
            let public = ServiceProxy::start(&client, &ns.name, "push-web", "public").await?;
            let admin = ServiceProxy::start(&client, &ns.name, "push-web-admin", "admin").await?;
            apis.push((public, admin, token));
        }
        let api = |i: usize, token: &str| {
            HttpApi::new(&apis[i].0.url(), &apis[i].1.url(), Some(token.to_owned()))
        };
        // Until the harness lists each message Service in the web pods'
        // /etc/hosts, reads fail with a 5xx; wait for both to answer.
        for (i, token) in [(0, "token-of-a"), (1, "token-of-b")] {
            let deadline = Instant::now() + Duration::from_secs(20);
            while let Err(e) = api(i, token).fetch("warm-up", 0, None).await {
                anyhow::ensure!(Instant::now() < deadline, "tenant {i} never answered: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        // Each tenant's token works on its own cluster only.
        let ma = first_push(&api(0, "token-of-a"), "shared-key", r#"{"from":"a"}"#).await?;
        let unauthorized = |r: Result<i64, pushcluster_client::Error>| {
            matches!(r, Err(pushcluster_client::Error::Api { ret: 65533, .. }))
        };
        anyhow::ensure!(
            unauthorized(api(1, "token-of-a").push("shared-key", r#"{"from":"a"}"#, None).await),
            "tenant b did not refuse tenant a's admin token as unauthorized"
        );
        anyhow::ensure!(
            unauthorized(api(0, "token-of-b").push("shared-key", "{}", None).await),
            "tenant a did not refuse tenant b's admin token as unauthorized"
        );
        // The same key name holds different messages in each.
        let (in_b, _) = api(1, "token-of-b").fetch("shared-key", 0, None).await?;
        anyhow::ensure!(in_b.is_empty(), "tenant a's message is visible in tenant b: {in_b:?}");
        let mb = first_push(&api(1, "token-of-b"), "shared-key", r#"{"from":"b"}"#).await?;
        let (in_a, _) = api(0, "token-of-a").fetch("shared-key", 0, None).await?;
        anyhow::ensure!(
            in_a.len() == 1 && in_a[0].msg["from"] == "a",
            "tenant a sees {in_a:?}"
        );
        // Resolution stays inside each tenant: their comets are different pods.
        let ra = api(0, "token-of-a").resolve("shared-key", Proto::WebSocket).await?;
        let rb = api(1, "token-of-b").resolve("shared-key", Proto::WebSocket).await?;
        anyhow::ensure!(ra != rb, "both tenants resolve the key to {ra}");
        println!(
            "PASS S5 two tenants, one operator: both Ready; mids a={ma} b={mb} for one key name; each token refused by the other; comets {ra} / {rb}"
        );
        anyhow::Ok(())
    }
    .await;
    a.delete().await?;
    b.delete().await?;
    op.uninstall().await?;
    result
}
