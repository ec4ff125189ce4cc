//! TLS on the internal gRPC ports, switched on a running cluster under
//! traffic and back: the minimal example applied with
//! `auth.plaintextRpc: true` runs plaintext; once the spec drops it, the
//! operator walks `status.rpcTls` through Accepting, Connecting and
//! Required, one complete rollout each, while followers on every transport
//! get every push with none failed or lost. Then the comets' and the message
//! service's gRPC ports, reached through their Services, refuse a plaintext
//! call and answer one made with the certificate of the cluster's
//! `<name>-rpc-tls` Secret. Asking for plaintext again walks the steps back,
//! as losslessly.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use push_operator::crd::PushCluster;
use pushcluster_client::http::Client as HttpApi;
use pushcluster_e2e::setup::{first_push, ChartOperator};
use pushcluster_e2e::traffic::{Load, ServiceProxy, Traffic};
use pushcluster_e2e::{
    apply_example_with, credentials, full_cluster, rpc_tls_files, wait_ready, TestNamespace,
};
use pushcluster_proto::tls::{endpoint, ClientTls, RpcTls};
use serde_json::json;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);

/// The step `status.rpcTls` names (`Plaintext` when absent) and, while the
/// cluster says it is still progressing, what it says is left.
async fn step(client: &Client, ns: &str, name: &str) -> anyhow::Result<(String, Option<String>)> {
    let pc = Api::<PushCluster>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let status = pc.status.unwrap_or_default();
    let progressing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing" && c.status == "True")
        .map(|c| c.message.clone());
    Ok((
        push_operator::status::rpc_step_name(status.rpc_tls).to_owned(),
        progressing,
    ))
}

/// Sets `auth.plaintextRpc` and follows `status.rpcTls` until it reads
/// `last` and nothing is left to roll: each step seen, with when.
async fn switch(
    client: &Client,
    ns: &str,
    name: &str,
    plaintext: bool,
    last: &str,
) -> anyhow::Result<Vec<(String, f64)>> {
    let api = Api::<PushCluster>::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"auth": {"plaintextRpc": plaintext}}})),
    )
    .await?;
    let t = Instant::now();
    let mut seen: Vec<(String, f64)> = Vec::new();
    loop {
        let (now, progressing) = step(client, ns, name).await?;
        if seen.last().map(|(s, _)| s) != Some(&now) {
            seen.push((now.clone(), t.elapsed().as_secs_f64()));
        }
        if now == last && progressing.is_none() {
            return Ok(seen);
        }
        anyhow::ensure!(
            t.elapsed() < LIMIT,
            "still at {now} after {LIMIT:?} (progressing: {progressing:?}); seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `Stats` call to a comet's gRPC port through `proxy` with `tls`
/// (plaintext when `None`): whether it was answered, or why not.
async fn comet_answers(
    proxy: &ServiceProxy,
    token: &str,
    tls: Option<&RpcTls>,
) -> Result<(), String> {
    let tls = ClientTls::load(tls).map_err(|e| e.to_string())?;
    let channel = endpoint(&proxy.url(), tls.as_ref())
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let token = pushcluster_proto::auth::RpcToken::new(Some(token)).map_err(|e| e.to_string())?;
    pushcluster_proto::v1::comet_client::CometClient::new(token.on(channel))
        .stats(pushcluster_proto::v1::StatsRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e}"))
}

/// Whether a TLS handshake with the message service's port through `proxy`
/// completes with `tls` and the server name, and a plaintext preface is
/// closed unanswered.
async fn message_port(proxy: &ServiceProxy, tls: &RpcTls) -> anyhow::Result<(bool, bool)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(proxy.addr).await?;
    plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let mut b = [0u8; 64];
    let plain_refused = matches!(
        tokio::time::timeout(Duration::from_secs(5), plain.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    );
    let answered = {
        let tls = ClientTls::load(Some(tls))?;
        let channel = endpoint(&proxy.url(), tls.as_ref())?
            .timeout(Duration::from_secs(5))
            .connect()
            .await;
        channel.is_ok()
    };
    Ok((plain_refused, answered))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_rpc_switches_to_tls_and_back_under_traffic() -> anyhow::Result<()> {
    let Some((client, images)) = full_cluster().await else {
        return Ok(());
    };
    let op = ChartOperator::install(&client, &images, "pco-rpc").await?;
    let ns = TestNamespace::create(&client, "rpc-tls").await?;
    let result = async {
        let n = &ns.name;
        let (n2, image) = (n.clone(), images.image());
        let name = tokio::task::spawn_blocking(move || {
            apply_example_with("pushcluster-minimal.yaml", &n2, &image, |pc| {
                pc["spec"]["auth"] = json!({"plaintextRpc": true});
                Ok(())
            })
        })
        .await??;
        wait_ready(&client, n, &name, 2, LIMIT).await?;
        let (at, _) = step(&client, n, &name).await?;
        anyhow::ensure!(at == "Plaintext", "applied with plaintextRpc, status.rpcTls says {at}");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
        anyhow::ensure!(
            secrets.get_opt(&format!("{name}-rpc-tls")).await?.is_none(),
            "a plaintext cluster got an RPC TLS Secret"
        );

        let creds = credentials(&client, n, &name).await?;
        let admin = ServiceProxy::start(&client, n, &format!("{name}-web-admin"), "admin").await?;
        let public = ServiceProxy::start(&client, n, &format!("{name}-web"), "public").await?;
        let api = HttpApi::new(&public.url(), &admin.url(), Some(creds.admin_token.clone()));
        first_push(&api, "rpc-k", r#"{"n":1}"#).await?;
        let load = Load {
            keys: 12,
            rate: 50,
            prefix: "rpc".into(),
            subscriber_secret: Some(creds.subscriber_secret.clone()),
        };
        let traffic = Traffic::start_connected(api.clone(), &load, LIMIT).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;

        let on = switch(&client, n, &name, false, "Required").await?;
        let order: Vec<&str> = on.iter().map(|(s, _)| s.as_str()).collect();
        anyhow::ensure!(
            order == ["Plaintext", "Accepting", "Connecting", "Required"],
            "steps on the way to TLS: {on:?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;

        // The ports now take TLS only, with the cluster's certificate.
        let dir = std::env::temp_dir().join(format!("pushcluster-e2e-rpc-{}", std::process::id()));
        let tls = rpc_tls_files(&client, n, &name, &dir).await?;
        let comets = ServiceProxy::start(&client, n, &format!("{name}-comets"), "rpc").await?;
        comet_answers(&comets, &creds.rpc_token, Some(&tls))
            .await
            .map_err(|e| anyhow::anyhow!("a call with the cluster's certificate: {e}"))?;
        let plain = comet_answers(&comets, &creds.rpc_token, None).await;
        anyhow::ensure!(plain.is_err(), "a comet answered a plaintext call");
        let message = ServiceProxy::start(&client, n, &format!("{name}-message"), "grpc").await?;
        let (plain_refused, answered) = message_port(&message, &tls).await?;
        anyhow::ensure!(
            plain_refused && answered,
            "message service: plaintext refused {plain_refused}, TLS answered {answered}"
        );
        println!(
            "PASS RPC switched to TLS under traffic (pushcluster-minimal.yaml, followers on WebSocket, TCP and SSE, 50 pushes/s): steps {}; then the comets' and the message service's gRPC ports refused plaintext and answered the cluster's certificate ({})",
            on.iter()
                .map(|(s, t)| format!("{s} at {t:.1} s"))
                .collect::<Vec<_>>()
                .join(", "),
            plain.err().unwrap_or_default()
        );

        let off = switch(&client, n, &name, true, "Plaintext").await?;
        let order: Vec<&str> = off.iter().map(|(s, _)| s.as_str()).collect();
        anyhow::ensure!(
            order == ["Required", "Connecting", "Accepting", "Plaintext"],
            "steps back to plaintext: {off:?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        comet_answers(&comets, &creds.rpc_token, None)
            .await
            .map_err(|e| anyhow::anyhow!("a plaintext call after switching back: {e}"))?;

        let started = traffic.started();
        let outcome = traffic.finish(Duration::from_secs(60)).await;
        let f = outcome.figures(started, Instant::now());
        let problems = outcome.problems();
        anyhow::ensure!(
            f.lost == 0 && f.failed == 0 && f.acked > 0 && f.delivered_live > 0 && problems.is_empty(),
            "traffic across both switches: {f}; {problems:?}"
        );
        println!(
            "PASS RPC switched back to plaintext under the same traffic: steps {}; over both switches (six rollouts) acked={} failed_pushes={} lost={} delivered_live={} reconnected={} p99_delivery={:?}",
            off.iter()
                .map(|(s, t)| format!("{s} at {t:.1} s"))
                .collect::<Vec<_>>()
                .join(", "),
            f.acked, f.failed, f.lost, f.delivered_live, f.reconnected, f.p99_delivery
        );
        let _ = std::fs::remove_dir_all(&dir);
        anyhow::Ok(())
    }
    .await;
    ns.delete().await?;
    op.uninstall().await?;
    result
}
