//! One shard holder cut off from the API server while everything else
//! reaches it (issue 23): the holder cannot renew its Lease, its standby
//! takes the shard as the Lease expires and raises the shard's fence in the
//! store, and the cut-off holder steps down on that evidence, telling its
//! clients to reconnect. Nothing is lost, no mid reaches one client from two
//! comets, and when the cut ends the old holder comes back as a standby.
//!
//! The process harness shares one network namespace among all pods, so the
//! cut is made by an [`ApiGate`]: the comets reach the API server through
//! it (their `KUBERNETES_SERVICE_PORT` points there), and it silences the
//! connections of the one pod it is told to cut.

use kube::api::Api;
use kube::Client;
use push_operator::crd::PushCluster;
use pushcluster_client::http::Client as HttpApi;
use pushcluster_core::ring::Ring;
use pushcluster_e2e::api_gate::ApiGate;
use pushcluster_e2e::setup::{
    api_server, api_through, deploy_example, first_push, lease_holders, ChartOperator, Deployed,
};
use pushcluster_e2e::traffic::{Load, ServiceProxy, Traffic};
use pushcluster_e2e::{full_cluster, wait, TestNamespace};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);

/// Minimal example: embedded store as the second witness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_cut_off_from_the_api_server() -> anyhow::Result<()> {
    holder_cut_off("pushcluster-minimal.yaml").await
}

/// Full example: Redis as the store and witness, 8 shards, 2 standbys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_cut_off_from_the_api_server_on_redis() -> anyhow::Result<()> {
    holder_cut_off("pushcluster-full.yaml").await
}

/// Points every comet of `name` at `gate` (a rollout) and waits until the
/// new comets hold every shard and have each connected through the gate.
async fn comets_through(
    client: &Client,
    ns: &str,
    name: &str,
    shards: i32,
    gate: &ApiGate,
) -> anyhow::Result<()> {
    api_through(client, ns, name, shards, gate.addr.port(), &["comet"]).await?;
    wait(
        "every shard holder connected through the gate",
        LIMIT,
        || async {
            let held = lease_holders(client, ns, name).await?;
            Ok(held.iter().all(|(_, h, _)| gate.has_seen(h)))
        },
    )
    .await
}

async fn holder_cut_off(example: &str) -> anyhow::Result<()> {
    let Some((client, images)) = full_cluster().await else {
        return Ok(());
    };
    let full = example == "pushcluster-full.yaml";
    let (release, suffix) = if full {
        ("pco-cut-redis", "cut-redis")
    } else {
        ("pco-cut", "cut")
    };
    let op = ChartOperator::install(&client, &images, release).await?;
    let ns = TestNamespace::create(&client, suffix).await?;
    let result = async {
        let Deployed { name, shards, admin_token, subscriber_secret } =
            deploy_example(&client, &images, &ns.name, example, LIMIT).await?;
        let gate = ApiGate::start(api_server().await?).await?;
        comets_through(&client, &ns.name, &name, shards, &gate).await?;
        let lease_s = {
            let pcs: Api<PushCluster> = Api::namespaced(client.clone(), &ns.name);
            pcs.get(&name).await?.spec.lease.duration_seconds
        };
        let lease = Duration::from_secs(lease_s as u64);
        let public = ServiceProxy::start(&client, &ns.name, &format!("{name}-web"), "public").await?;
        let admin = ServiceProxy::start(&client, &ns.name, &format!("{name}-web-admin"), "admin").await?;
        let api = HttpApi::new(&public.url(), &admin.url(), Some(admin_token))
            .with_subscriber_secret(Some(subscriber_secret.clone()));
        first_push(&api, "warm-up", "{}").await?;
        let load = Load { keys: 24, rate: 50, prefix: "cut".into(), subscriber_secret: Some(subscriber_secret) };
        let traffic = Traffic::start(api.clone(), &load).await;
        anyhow::ensure!(traffic.all_connected(LIMIT).await, "followers did not all reach a comet");
        tokio::time::sleep(Duration::from_secs(3)).await;

        let before = lease_holders(&client, &ns.name, &name).await?;
        let (lease_name, victim, transitions) = before[0].clone();
        let ring = Ring::with_shard_count(shards as u32);
        let cut_keys: Vec<String> = (0..load.keys)
            .map(|i| format!("{}-{i}", load.prefix))
            .filter(|k| ring.shard_for(k) == Some(0))
            .collect();
        anyhow::ensure!(!cut_keys.is_empty(), "no follower's key is on shard 0");

        let cut_at = Instant::now();
        gate.cut(&victim);
        let mut heir = String::new();
        let taken = loop {
            let now = lease_holders(&client, &ns.name, &name).await?;
            if now[0].1 != victim && !now[0].1.is_empty() {
                heir = now[0].1.clone();
                break cut_at.elapsed();
            }
            if cut_at.elapsed() > lease * 3 {
                break cut_at.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Past the standby's takeover and the cut holder's step-down.
        tokio::time::sleep(lease + Duration::from_secs(4)).await;
        gate.restore(&victim);
        let restored = Instant::now();
        // Long enough for the old holder to come back and find its place taken.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let after = lease_holders(&client, &ns.name, &name).await?;
        let outcome = traffic.finish(Duration::from_secs(60)).await;
        let end = Instant::now();
        let mut problems = outcome.problems();
        let cut = outcome.figures_for(&cut_keys, cut_at, restored);
        let whole = outcome.figures(cut_at, end);
        println!(
            "INFO {lease_name}'s holder {victim} cut off from the API server ({example}): {heir} held the shard {:.2} s later (lease {lease_s} s); followers of shard 0 ({}): {cut}; everyone from the cut to the end: {whole}; leases before {before:?} after {after:?}",
            taken.as_secs_f64(),
            cut_keys.len(),
        );
        if heir.is_empty() {
            problems.push(format!("no other comet took {lease_name} within {:.0} s", (lease * 3).as_secs_f64()));
        }
        if taken > lease + Duration::from_secs(1) {
            problems.push(format!("the standby took the shard {:.2} s after the cut, over a lease plus 1 s", taken.as_secs_f64()));
        }
        if cut.told_to_reconnect < cut_keys.len() {
            problems.push(format!("{} reconnect frames reached the {} followers of the cut-off holder", cut.told_to_reconnect, cut_keys.len()));
        }
        if whole.lost > 0 || whole.still_down > 0 || whole.restarted_keys > 0 {
            problems.push(format!("the cut cost clients: {whole}"));
        }
        let others_unchanged = before[1..] == after[1..];
        if !others_unchanged {
            problems.push(format!("shards other than 0 changed hands: {before:?} -> {after:?}"));
        }
        if after[0].1 != heir || after[0].2 != transitions + 1 {
            problems.push(format!("shard 0 changed hands again after the cut ended: {:?} -> {:?} (heir {heir})", before[0], after[0]));
        }
        anyhow::ensure!(problems.is_empty(), "one holder cut off from the API server: {problems:?}");
        println!(
            "PASS one holder cut off from the API server under traffic ({example}, followers on WebSocket, TCP and SSE, 50 pushes/s): standby held the shard after {:.2} s (limit {:.0} s, a lease plus 1 s); the cut-off holder's {} followers got {} reconnect frames and were back within {:.2} s each; lost={}, failed pushes={}, mids delivered by two comets=0; the old holder came back as a standby",
            taken.as_secs_f64(),
            (lease + Duration::from_secs(1)).as_secs_f64(),
            cut_keys.len(),
            cut.told_to_reconnect,
            cut.longest_outage.as_secs_f64(),
            whole.lost,
            whole.failed,
        );
        anyhow::Ok(())
    }
    .await;
    ns.delete().await?;
    op.uninstall().await?;
    result
}
