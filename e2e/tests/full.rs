//! Full e2e on a cluster that runs pods (kind, k3d, a real one), with the
//! pushcluster image loaded into it and named by `E2E_IMAGE` (e.g. `kind load
//! docker-image ghcr.io/pushcluster/pushcluster:dev` after `make image
//! IMAGE=...`): install the chart, apply a PushCluster, wait for Ready, push
//! and subscribe with pushctl pods inside the cluster, delete a shard holder
//! pod and check nothing was lost, change the shard count, delete the
//! PushCluster and check nothing is left. Skips without a cluster or image.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use push_operator::crd::PushCluster;
use pushcluster_core::ring::Ring;
use pushcluster_e2e::{cluster, has_ready_nodes, root, wait, TestNamespace};
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);
const KEY: &str = "e2e-user";

fn helm(action: &str, ns: &str, image: &str) -> anyhow::Result<()> {
    let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
    let chart = root().join("charts/pushcluster-operator");
    let script = format!(
        r#"
import asyncio, helm_sdkpy
cfg = helm_sdkpy.Configuration(namespace={ns:?})
async def main():
    if {action:?} == "install":
        await helm_sdkpy.Install(cfg).run("e2e", {chart:?}, values={{"image": {{"repository": {repo:?}, "tag": {tag:?}, "pullPolicy": "IfNotPresent"}}, "replicas": 1}}, wait=True, timeout=180)
    else:
        await helm_sdkpy.Uninstall(cfg).run("e2e", wait=True, timeout=120)
asyncio.run(main())
"#,
        chart = chart.display().to_string()
    );
    let out = Command::new("python3").arg("-c").arg(script).output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("ok: helm {action}");
    Ok(())
}

/// Runs `pushctl <args>` in a pod and returns its name.
async fn pushctl_pod(
    pods: &Api<Pod>,
    name: &str,
    image: &str,
    cluster: &str,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut cmd = vec![
        "pushctl".to_owned(),
        "--web".to_owned(),
        format!("http://{cluster}-web:8090"),
        "--admin".to_owned(),
        format!("http://{cluster}-web-admin:8091"),
    ];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "pushctl", "image": image, "imagePullPolicy": "IfNotPresent", "command": cmd}]}
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    Ok(name.to_owned())
}

async fn phase(pods: &Api<Pod>, name: &str) -> anyhow::Result<String> {
    Ok(pods
        .get(name)
        .await?
        .status
        .and_then(|s| s.phase)
        .unwrap_or_default())
}

async fn push(pods: &Api<Pod>, image: &str, cluster: &str, n: i32) -> anyhow::Result<()> {
    let name = format!("push-{n}");
    pushctl_pod(
        pods,
        &name,
        image,
        cluster,
        &["push", KEY, &format!(r#"{{"n":{n}}}"#)],
    )
    .await?;
    wait(&format!("push {n} to be acknowledged"), LIMIT, || async {
        Ok(phase(pods, &name).await? == "Succeeded")
    })
    .await
}

async fn ready(pcs: &Api<PushCluster>, name: &str, shards: i32) -> anyhow::Result<()> {
    wait(
        &format!("PushCluster Ready with {shards} shards"),
        LIMIT,
        || async {
            let pc = pcs.get(name).await?;
            Ok(pc.status.is_some_and(|s| {
                s.ready_shards == shards
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            }))
        },
    )
    .await
}

#[tokio::test]
async fn a_pushcluster_serves_fails_over_resizes_and_goes_away() -> anyhow::Result<()> {
    let Some(client) = cluster().await else {
        return Ok(());
    };
    let Ok(image) = std::env::var("E2E_IMAGE") else {
        println!(
            "SKIP full e2e: set E2E_IMAGE to an image of this repository loaded into the cluster"
        );
        return Ok(());
    };
    if !has_ready_nodes(&client).await {
        println!("SKIP full e2e: no Ready node (control-plane-only API server)");
        return Ok(());
    }
    let system = TestNamespace::create(&client, "system").await?;
    helm("install", &system.name, &image)?;
    let result = story(&client, &image).await;
    let _ = helm("uninstall", &system.name, &image);
    system.delete().await?;
    result
}

async fn story(client: &Client, image: &str) -> anyhow::Result<()> {
    let ns = TestNamespace::create(client, "full").await?;
    let pcs: Api<PushCluster> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let name = "push";
    let pc: PushCluster = serde_json::from_value(json!({
        "apiVersion": "pushcluster.io/v1alpha1", "kind": "PushCluster",
        "metadata": {"name": name},
        "spec": {"image": image, "comet": {"shards": 2, "standbys": 1}, "web": {"replicas": 1}}
    }))?;
    pcs.create(&PostParams::default(), &pc).await?;
    ready(&pcs, name, 2).await?;

    // A subscriber that stays through a failover: it must print mids 1..6.
    let sub = pushctl_pod(
        &pods,
        "sub",
        image,
        name,
        &["sub", KEY, "--count", "6", "--heartbeat", "5"],
    )
    .await?;
    wait("the subscriber to run", LIMIT, || async {
        Ok(phase(&pods, &sub).await? == "Running")
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in 1..=3 {
        push(&pods, image, name, n).await?;
    }
    // Delete the pod holding the key's shard, without grace: a crash.
    let shard = Ring::with_shard_count(2).shard_for(KEY).unwrap_or(0) as usize;
    let holder = pcs
        .get(name)
        .await?
        .status
        .and_then(|s| s.shards.get(shard).and_then(|r| r.holder.clone()));
    let holder = holder.ok_or_else(|| anyhow::anyhow!("no holder for shard {shard}"))?;
    pods.delete(
        &holder,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    println!("deleted shard {shard} holder {holder}");
    for n in 4..=6 {
        push(&pods, image, name, n).await?;
    }
    wait("the subscriber to receive all six", LIMIT, || async {
        Ok(phase(&pods, &sub).await? == "Succeeded")
    })
    .await?;
    let logs = pods.logs(&sub, &LogParams::default()).await?;
    let mids: Vec<i64> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["mid"].as_i64())
        .collect();
    assert_eq!(mids, vec![1, 2, 3, 4, 5, 6], "subscriber output:\n{logs}");
    ready(&pcs, name, 2).await?;

    // More shards: the cluster converges.
    pcs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"comet": {"shards": 3}}})),
    )
    .await?;
    ready(&pcs, name, 3).await?;

    // Deleted, it leaves nothing behind.
    pcs.delete(name, &DeleteParams::default()).await?;
    let lp = ListParams::default().labels(&format!("pushcluster.io/cluster={name}"));
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    wait("every child to be garbage collected", LIMIT, || async {
        Ok(deps.list(&lp).await?.items.is_empty() && svcs.list(&lp).await?.items.is_empty())
    })
    .await?;
    let left: Vec<String> = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    println!("full e2e passed (pods still terminating: {left:?})");
    ns.delete().await?;
    Ok(())
}
