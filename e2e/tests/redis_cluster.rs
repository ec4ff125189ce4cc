//! The full example (`examples/pushcluster-full.yaml`) with the storage of
//! the Redis Cluster example (`examples/pushcluster-redis-cluster.yaml`) on
//! a Redis Cluster of six pods (three masters, a replica each, a password),
//! formed as `redis-cli --cluster create` would: followers on every
//! transport and pushes throughout, one master's Redis stopped (SIGSTOP)
//! for 6 s, three times the node timeout: a hung node, or one cut off. Its
//! replica takes the slots over, the stopped node resumes as a replica, and
//! with WAIT durability no acknowledged push is lost.
//!
//! Not a SIGKILL: the kubelet restarts a killed container at once, within
//! the node timeout, so no failover happens, and a master that comes back
//! without persistence resumes its slots empty and its replica resyncs from
//! it (the README's Redis Cluster section: run masters with `appendonly
//! yes`). The system tests SIGKILL masters (`redis_ha`).

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::Client;
use pushcluster_client::http::Client as HttpApi;
use pushcluster_e2e::setup::{apply_yaml, first_push, redis_image, secret, ChartOperator};
use pushcluster_e2e::traffic::{Load, ServiceProxy, Traffic};
use pushcluster_e2e::{
    apply_example_with, full_cluster, rollout_status, signal_pod, wait, wait_ready, TestNamespace,
};
use serde_json::json;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);
const PASSWORD: &str = "e2e-redis-cluster-password";
const NODES: usize = 6;
const MASTERS: usize = 3;

/// Six cluster-enabled Redis pods (a StatefulSet, nodes.conf on an
/// emptyDir so a restarted container keeps its identity) and the Service
/// the example names as its seed. Each node announces its pod IP, as Redis
/// Cluster charts do: the address a peer sees a connection come from need
/// not be the one the node listens on.
async fn deploy_redis_cluster(namespace: &str) -> anyhow::Result<()> {
    let redis = format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: push-redis-cluster}}
spec:
  serviceName: push-redis-cluster
  replicas: {NODES}
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app: push-redis-cluster}}}}
  template:
    metadata: {{labels: {{app: push-redis-cluster}}}}
    spec:
      containers:
        - name: redis
          image: {image}
          command: [redis-server, --port, "6379", --cluster-enabled, "yes", --cluster-config-file, /data/nodes.conf,
                    --cluster-node-timeout, "2000", --cluster-require-full-coverage, "no",
                    --cluster-replica-validity-factor, "0", --repl-diskless-sync-delay, "0",
                    --requirepass, {PASSWORD}, --masterauth, {PASSWORD},
                    --save, "", --appendonly, "no", --dir, /data, --protected-mode, "no",
                    --bind, 0.0.0.0, --cluster-announce-ip, "$(POD_IP)"]
          env:
            - name: POD_IP
              valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
          ports: [{{name: redis, containerPort: 6379}}]
          readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
          volumeMounts: [{{name: data, mountPath: /data}}]
      volumes:
        - name: data
          emptyDir: {{}}
---
apiVersion: v1
kind: Service
metadata: {{name: push-redis-cluster}}
spec:
  selector: {{app: push-redis-cluster}}
  ports: [{{name: redis, port: 6379, targetPort: 6379}}]
"#,
        image = redis_image()
    );
    apply_yaml(namespace, redis).await
}

/// The Redis pods' names and IPs, in ordinal order, once all are ready.
async fn redis_pods(client: &Client, ns: &str) -> anyhow::Result<Vec<(String, String)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + LIMIT;
    let mut found: Vec<(String, String)> = loop {
        let list = pods
            .list(&ListParams::default().labels("app=push-redis-cluster"))
            .await?;
        let ready: Vec<(String, String)> = list
            .items
            .into_iter()
            .filter_map(|p| {
                let status = p.status.as_ref()?;
                let ready = status
                    .conditions
                    .as_ref()?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let ip = status.pod_ip.clone()?;
                ready.then(|| (p.metadata.name.clone().unwrap_or_default(), ip))
            })
            .collect();
        if ready.len() == NODES {
            break ready;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the Redis Cluster pods were not ready within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    found.sort_by_key(|(name, _)| {
        name.rsplit('-')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    });
    Ok(found)
}

fn url(ip: &str) -> String {
    format!("redis://:{PASSWORD}@{ip}:6379/")
}

/// (role line of `CLUSTER NODES`) per pod IP, asked of `ip`.
fn masters_seen_by(ip: &str) -> anyhow::Result<Vec<String>> {
    let mut c = redis::Client::open(url(ip))?.get_connection()?;
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c)?;
    Ok(nodes
        .lines()
        .filter(|l| l.contains("master") && !l.contains("fail"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|addr| addr.split(':').next().unwrap_or_default().to_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_example_on_a_redis_cluster_rides_out_a_master_failover() -> anyhow::Result<()> {
    let Some((client, images)) = full_cluster().await else {
        return Ok(());
    };
    let op = ChartOperator::install(&client, &images, "pco-rc").await?;
    let ns = TestNamespace::create(&client, "rc").await?;
    let result = async {
        let t = Instant::now();
        deploy_redis_cluster(&ns.name).await?;
        let pods = redis_pods(&client, &ns.name).await?;
        let urls: Vec<String> = pods.iter().map(|(_, ip)| url(ip)).collect();
        let meet: Vec<(String, u16, u16)> =
            pods.iter().map(|(_, ip)| (ip.clone(), 6379, 16379)).collect();
        tokio::task::spawn_blocking(move || {
            pushcluster_store::testing::form_cluster(&urls, &meet, MASTERS)
        })
        .await?;
        let first_ip = pods[0].1.clone();
        wait("the Redis Cluster to be ok with its replicas", LIMIT, || {
            let ip = first_ip.clone();
            async move {
                let mut c = redis::Client::open(url(&ip))?.get_connection()?;
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c)?;
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c)?;
                Ok(info.contains("cluster_state:ok")
                    && nodes.lines().filter(|l| l.contains("slave")).count() == NODES - MASTERS)
            }
        })
        .await?;
        println!(
            "PASS RC Redis Cluster of {NODES} pods ({MASTERS} masters, a replica each, a password) formed in {:.1} s",
            t.elapsed().as_secs_f64()
        );

        secret(&client, &ns.name, "push-redis-cluster", json!({"password": PASSWORD})).await?;
        secret(
            &client,
            &ns.name,
            "push-auth",
            json!({"admin-token": "rc-admin-token", "subscriber-secret": "rc-subscriber-secret"}),
        )
        .await?;
        // The full example (8 shards, 2 standbys, 3 web, 3 message, network
        // policies, scheduling) with the Redis Cluster storage of
        // pushcluster-redis-cluster.yaml (mode Cluster, password, WAIT 1).
        let (n, image) = (ns.name.clone(), images.image());
        let name = tokio::task::spawn_blocking(move || {
            let storage = pushcluster_e2e::example("pushcluster-redis-cluster.yaml")?["spec"]["storage"].clone();
            anyhow::ensure!(storage["redis"]["mode"] == "Cluster", "the Redis Cluster example's storage: {storage}");
            apply_example_with("pushcluster-full.yaml", &n, &image, |pc| {
                pc["spec"]["storage"] = storage;
                // Its advertised hosts (push-{shard}.example.com) do not
                // resolve here: clients get the comets' own addresses.
                if let Some(comet) = pc["spec"]["comet"].as_object_mut() {
                    comet.remove("advertise");
                }
                Ok(())
            })
        })
        .await??;
        let t = Instant::now();
        let shards = 8;
        wait_ready(&client, &ns.name, &name, shards, LIMIT).await?;
        let (n, c) = (ns.name.clone(), name.clone());
        tokio::task::spawn_blocking(move || rollout_status(&n, &c, LIMIT)).await??;
        println!(
            "PASS RC kubectl apply pushcluster-full.yaml with the storage of pushcluster-redis-cluster.yaml (mode Cluster, WAIT 1 replica; 8 shards, 2 standbys, 3 web, 3 message): Ready and rolled out in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let pcs: Api<push_operator::crd::PushCluster> = Api::namespaced(client.clone(), &ns.name);
        wait("status.storage to count 3 masters answering", LIMIT, || async {
            let st = pcs.get(&name).await?.status.and_then(|s| s.storage);
            Ok(st.is_some_and(|s| s.masters == Some(3) && s.masters_answering == Some(3)))
        })
        .await?;
        println!("PASS RC status.storage: masters=3 mastersAnswering=3 (the operator asked the Redis Cluster, with the password from its Secret)");

        let admin =
            ServiceProxy::start(&client, &ns.name, &format!("{name}-web-admin"), "admin").await?;
        let public = ServiceProxy::start(&client, &ns.name, &format!("{name}-web"), "public").await?;
        let api = HttpApi::new(&public.url(), &admin.url(), Some("rc-admin-token".into()));
        let m1 = first_push(&api, "k", r#"{"n":1}"#).await?;
        let m2 = api.push("k", r#"{"n":2}"#, None).await?;
        anyhow::ensure!(m2 == m1 + 1, "mids {m1}, {m2} are not contiguous");

        let load = Load {
            keys: 24,
            rate: 100,
            prefix: "rc".into(),
            subscriber_secret: Some("rc-subscriber-secret".into()),
        };
        let traffic = Traffic::start(api.clone(), &load).await;
        anyhow::ensure!(
            traffic.all_connected(LIMIT).await,
            "followers did not all reach a comet"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        let before = Instant::now();

        // Stop a master's Redis for three node timeouts, then let it go on.
        let masters = {
            let ip = pods[NODES - 1].1.clone();
            tokio::task::spawn_blocking(move || masters_seen_by(&ip)).await??
        };
        let (victim, victim_ip) = pods
            .iter()
            .find(|(_, ip)| masters.contains(ip))
            .cloned()
            .context("no master among the pods")?;
        let killed = Instant::now();
        signal_pod(&client, &ns.name, &victim, "STOP").await?;
        let resume = {
            let (client, ns, victim) = (client.clone(), ns.name.clone(), victim.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(6)).await;
                signal_pod(&client, &ns, &victim, "CONT").await
            })
        };
        let observer = pods
            .iter()
            .find(|(n, _)| *n != victim)
            .map(|(_, ip)| ip.clone())
            .context("another pod")?;
        let (mut promoted, mut rejoined) = (None, None);
        let deadline = Instant::now() + LIMIT;
        while promoted.is_none() || rejoined.is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no replica took the slots over, or the stopped node did not rejoin, within {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            let o = observer.clone();
            let seen = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let masters = masters_seen_by(&o)?;
                let mut c = redis::Client::open(url(&o))?.get_connection()?;
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c)?;
                Ok((masters, nodes))
            })
            .await?;
            let Ok((masters, nodes)) = seen else {
                continue;
            };
            if promoted.is_none() && masters.len() == MASTERS && !masters.contains(&victim_ip) {
                promoted = Some(killed.elapsed());
            }
            let back = nodes.lines().any(|l| {
                l.contains(&format!("{victim_ip}:6379")) && l.contains("slave") && !l.contains("fail")
            });
            if promoted.is_some() && back {
                rejoined = Some(killed.elapsed());
            }
        }
        resume.await??;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let started = traffic.started();
        let outcome = traffic.finish(Duration::from_secs(60)).await;
        let end = Instant::now();
        let f = outcome.figures(started, end);
        let during = outcome.figures(before, end);
        println!(
            "INFO RC master {victim} stopped for 6 s: replica promoted after {:.1} s, stopped node back as a replica after {:.1} s; whole run {f}; from the stop on {during}",
            promoted.unwrap_or_default().as_secs_f64(),
            rejoined.unwrap_or_default().as_secs_f64()
        );
        anyhow::ensure!(
            f.lost == 0 && f.failed == 0 && f.restarted_keys == 0 && f.acked > 0,
            "traffic across a Redis Cluster master failover: {f}"
        );
        println!(
            "PASS RC Redis Cluster master stopped 6 s under traffic (WAIT 1): lost={} failed_pushes={} acked={} reconnected={} p99_delivery={:?}, promoted in {:.1} s",
            f.lost,
            f.failed,
            f.acked,
            during.reconnected,
            during.p99_delivery,
            promoted.unwrap_or_default().as_secs_f64()
        );
        anyhow::Ok(())
    }
    .await;
    ns.delete().await?;
    op.uninstall().await?;
    result
}
