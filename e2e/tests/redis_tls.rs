//! The minimal example on a Redis that takes TLS connections only, with a
//! certificate of a private CA, and asks clients for a certificate of
//! theirs (`tls-auth-clients yes`): `storage.redis.url:
//! rediss://push-redis:6379`, `storage.redis.tls.caSecretRef` naming the
//! CA's Secret and `tls.clientCertSecretRef` the pods' certificate. The
//! operator mounts both into every pod; web, the comets and the message
//! service reach Redis over TLS (there is no plain port to fall back on),
//! and followers on every transport get every push live with none lost,
//! also while a renewed client certificate rolls every pod.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use pushcluster_client::http::Client as HttpApi;
use pushcluster_core::tls::testing::TestCa;
use pushcluster_e2e::setup::{apply_yaml, first_push, redis_yaml, secret, ChartOperator};
use pushcluster_e2e::traffic::{Load, ServiceProxy, Traffic};
use pushcluster_e2e::{
    apply_example_with, credentials, full_cluster, pods_of, rollout_status, wait, wait_ready,
    TestNamespace,
};
use serde_json::json;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);

/// A Redis Deployment listening with TLS only (`--port 0`), its certificate
/// and the CA its clients' certificates must come from in Secret
/// `push-redis-tls`, and its Service.
async fn deploy_tls_redis(namespace: &str) -> anyhow::Result<()> {
    let redis = redis_yaml(
        r#"--port, "0", --tls-port, "6379", --tls-cert-file, /tls/tls.crt, --tls-key-file, /tls/tls.key, --tls-ca-cert-file, /tls/ca.crt, --tls-auth-clients, "yes", --save, "", --appendonly, "no""#,
        ("tls", "/tls", "secret: {secretName: push-redis-tls}"),
    );
    apply_yaml(namespace, redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minimal_example_on_a_tls_redis_with_a_private_ca() -> anyhow::Result<()> {
    let Some((client, images)) = full_cluster().await else {
        return Ok(());
    };
    let op = ChartOperator::install(&client, &images, "pco-tls").await?;
    let ns = TestNamespace::create(&client, "redis-tls").await?;
    let result = async {
        let ca = TestCa::new("e2e Redis CA");
        let n = &ns.name;
        let leaf = ca.leaf(&[
            "push-redis",
            &format!("push-redis.{n}"),
            &format!("push-redis.{n}.svc"),
            &format!("push-redis.{n}.svc.cluster.local"),
        ]);
        secret(
            &client,
            n,
            "push-redis-tls",
            json!({"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": ca.pem}),
        )
        .await?;
        secret(&client, n, "redis-ca", json!({"ca.crt": ca.pem})).await?;
        let pods = ca.leaf(&["pushcluster"]);
        secret(
            &client,
            n,
            "push-redis-client",
            json!({"tls.crt": pods.cert_pem, "tls.key": pods.key_pem}),
        )
        .await?;
        deploy_tls_redis(n).await?;

        let (n2, image) = (n.clone(), images.image());
        let name = tokio::task::spawn_blocking(move || {
            apply_example_with("pushcluster-minimal.yaml", &n2, &image, |pc| {
                pc["spec"]["storage"] = json!({"redis": {
                    "url": "rediss://push-redis:6379",
                    "tls": {
                        "caSecretRef": {"name": "redis-ca", "key": "ca.crt"},
                        "clientCertSecretRef": {"name": "push-redis-client"}
                    }
                }});
                Ok(())
            })
        })
        .await??;
        let t = Instant::now();
        wait_ready(&client, n, &name, 2, LIMIT).await?;
        println!(
            "PASS TLS kubectl apply pushcluster-minimal.yaml on rediss://push-redis:6379 (client certificates required) with storage.redis.tls caSecretRef and clientCertSecretRef: Ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );

        let creds = credentials(&client, n, &name).await?;
        let admin = ServiceProxy::start(&client, n, &format!("{name}-web-admin"), "admin").await?;
        let public = ServiceProxy::start(&client, n, &format!("{name}-web"), "public").await?;
        let api = HttpApi::new(&public.url(), &admin.url(), Some(creds.admin_token.clone()));
        let m1 = first_push(&api, "tls-k", r#"{"n":1}"#).await?;
        let m2 = api.push("tls-k", r#"{"n":2}"#, None).await?;
        anyhow::ensure!(m2 == m1 + 1, "mids {m1}, {m2} are not contiguous");

        let load = Load {
            keys: 12,
            rate: 50,
            prefix: "tls".into(),
            subscriber_secret: Some(creds.subscriber_secret.clone()),
        };
        let traffic = Traffic::start_connected(api.clone(), &load, LIMIT).await?;
        tokio::time::sleep(Duration::from_secs(8)).await;

        // cert-manager renews the pods' certificate: the operator sees the
        // Secret's new digest at its next look and rolls every component
        // (they read the files at start), under traffic.
        let before: Vec<_> = [
            pods_of(&client, n, &name, "web").await?,
            pods_of(&client, n, &name, "comet").await?,
            pods_of(&client, n, &name, "message").await?,
        ]
        .into_iter()
        .flat_map(|p| p.into_keys())
        .collect();
        let renewed = ca.leaf(&["pushcluster"]);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
        let t = Instant::now();
        secrets
            .patch(
                "push-redis-client",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"tls.crt": renewed.cert_pem, "tls.key": renewed.key_pem}})),
            )
            .await?;
        wait("every pod replaced after the renewal", LIMIT, || async {
            for component in ["web", "comet", "message"] {
                let now = pods_of(&client, n, &name, component).await?;
                if now.is_empty() || now.keys().any(|p| before.contains(p)) {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await?;
        let (n2, c2) = (n.clone(), name.clone());
        tokio::task::spawn_blocking(move || rollout_status(&n2, &c2, LIMIT)).await??;
        let rolled = t.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let m3 = api.push("tls-k", r#"{"n":3}"#, None).await?;
        anyhow::ensure!(m3 == m2 + 1, "mid {m3} after {m2} across the renewal");

        let started = traffic.started();
        let outcome = traffic.finish(Duration::from_secs(60)).await;
        let f = outcome.figures(started, Instant::now());
        let problems = outcome.problems();
        anyhow::ensure!(
            f.lost == 0 && f.failed == 0 && f.acked > 0 && f.delivered_live > 0 && problems.is_empty(),
            "traffic over TLS to Redis: {f}; {problems:?}"
        );
        println!(
            "PASS TLS services reach Redis over TLS only (its CA and their certificate mounted from Secrets), and a renewed client certificate rolls every pod ({} replaced, rolled out {:.1} s after the renewal) under traffic: followers on WebSocket, TCP and SSE, acked={} lost={} failed_pushes={} delivered_live={} reconnected={} p99_delivery={:?}",
            before.len(),
            rolled.as_secs_f64(),
            f.acked, f.lost, f.failed, f.delivered_live, f.reconnected, f.p99_delivery
        );
        anyhow::Ok(())
    }
    .await;
    ns.delete().await?;
    op.uninstall().await?;
    result
}
