//! The product as a user runs it, on a cluster that runs pods (the process
//! harness of `make e2e-local`, kind, a real one): Helm installs the operator
//! with the chart's defaults and waits; the minimal example is applied with
//! kubectl; clients outside the cluster (behind a load balancer in front of
//! web) follow their keys over WebSocket, TCP and SSE while a back end pushes
//! at a steady rate; then, one at a time, the events a cluster lives through:
//! a graceful delete and a crash of shard holders, shards 2 → 3 → 2, a rolling
//! upgrade to a new image tag, a change of the message service's settings and
//! the loss of the message pod. Every event is judged by what users see:
//! time without a comet, failed pushes, lost messages (must be 0), whether
//! each key's mid sequence continued (must), whether every rollout completed,
//! and which pods had to restart. Last, deleting the PushCluster removes
//! everything it owned and `helm uninstall` everything Helm installed.
//!
//! Prints one line per scenario with its figures, then fails if any failed.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use push_operator::crd::PushCluster;
use pushcluster_client::http::Client as HttpApi;
use pushcluster_core::ring::Ring;
use pushcluster_e2e::traffic::{Figures, Load, Outcome, ServiceProxy, Traffic};
use pushcluster_e2e::{
    apply_example, credentials, full_cluster, helm, kill9, kubectl, pods_of, rollout_status, wait,
    wait_ready, TestNamespace,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const READY_LIMIT: Duration = Duration::from_secs(180);
const ROLLOUT_LIMIT: Duration = Duration::from_secs(180);
const RELEASE: &str = "pushcluster-operator";

/// Runs blocking work (kubectl, Helm) off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// Scenario lines, printed together at the end.
#[derive(Default)]
struct Report {
    lines: Vec<(String, Result<String, String>)>,
}

impl Report {
    fn add(&mut self, name: &str, r: Result<String, String>) {
        match &r {
            Ok(f) => println!("   pass {name}: {f}"),
            Err(e) => println!("   fail {name}: {e}"),
        }
        self.lines.push((name.to_owned(), r));
    }

    fn print(&self) -> usize {
        println!("\n==== e2e scenarios ====");
        let mut failed = 0;
        for (name, r) in &self.lines {
            match r {
                Ok(f) => println!("PASS  {name}: {f}"),
                Err(e) => {
                    failed += 1;
                    println!("FAIL  {name}: {e}");
                }
            }
        }
        println!(
            "scenarios: {} passed, {failed} failed",
            self.lines.len() - failed
        );
        failed
    }
}

/// One event under traffic: when it ran and what it changed besides.
struct Event {
    name: String,
    from: Instant,
    to: Instant,
    /// Problems seen while it ran (a rollout that did not finish, …).
    problems: Vec<String>,
    /// Components that must not restart in it, with the pods that did.
    restarted: BTreeMap<&'static str, usize>,
    must_not_restart: Vec<&'static str>,
    notes: Vec<String>,
    /// Keys whose shard the event moves (a reshard): at most these reconnect.
    moves: Option<usize>,
}

struct Cluster {
    client: Client,
    ns: String,
    name: String,
}

impl Cluster {
    fn pcs(&self) -> Api<PushCluster> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn patch(&self, spec: serde_json::Value) -> anyhow::Result<()> {
        self.pcs()
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await?;
        Ok(())
    }

    async fn pods(&self) -> anyhow::Result<BTreeMap<&'static str, BTreeMap<String, String>>> {
        let mut out = BTreeMap::new();
        for c in ["comet", "message", "web"] {
            out.insert(c, pods_of(&self.client, &self.ns, &self.name, c).await?);
        }
        Ok(out)
    }

    /// Lease transitions per shard, from the Leases.
    async fn transitions(&self) -> BTreeMap<String, i32> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!("pushcluster.io/cluster={}", self.name));
        leases
            .list(&lp)
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .map(|l| {
                        let t = l.spec.and_then(|s| s.lease_transitions).unwrap_or(0);
                        (l.metadata.name.unwrap_or_default(), t)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The shard's Lease: holder and transitions.
    async fn lease(&self, shard: u32) -> anyhow::Result<(String, i32)> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.ns);
        let l = leases.get(&format!("{}-comet-{shard}", self.name)).await?;
        let spec = l.spec.unwrap_or_default();
        Ok((
            spec.holder_identity.unwrap_or_default(),
            spec.lease_transitions.unwrap_or(0),
        ))
    }

    /// Waits until the shard's Lease was taken again after `before`
    /// (transitions grew and someone holds it). After a crash the kubelet
    /// restarts the container in the same pod, so the new holder may carry
    /// the old name.
    async fn taken_again(&self, shard: u32, before: i32) -> anyhow::Result<String> {
        wait(
            &format!("shard {shard}'s Lease to be taken again"),
            Duration::from_secs(60),
            || async {
                Ok(self
                    .lease(shard)
                    .await
                    .is_ok_and(|(h, t)| t > before && !h.is_empty()))
            },
        )
        .await?;
        Ok(self.lease(shard).await?.0)
    }

    /// Every rollout finished, Ready for the current generation, every client back.
    async fn settle(&self, shards: i32, traffic: &Traffic, ev: &mut Event) {
        let (ns, name) = (self.ns.clone(), self.name.clone());
        if let Err(e) = blocking(move || rollout_status(&ns, &name, ROLLOUT_LIMIT)).await {
            ev.problems.push(format!("rollout did not complete: {e}"));
        }
        if let Err(e) = wait_ready(&self.client, &self.ns, &self.name, shards, READY_LIMIT).await {
            ev.problems.push(format!("not Ready: {e}"));
        }
        if !traffic.all_connected(Duration::from_secs(60)).await {
            ev.problems
                .push("clients still without a comet after 60 s".to_owned());
        }
        // Pushes after the event, so its effect on sequences shows.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

async fn event<F, Fut>(
    c: &Cluster,
    traffic: &Traffic,
    name: &str,
    shards_after: i32,
    must_not_restart: &[&'static str],
    action: F,
) -> Event
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<String>>>,
{
    println!("-- {name}");
    let before = c.pods().await.unwrap_or_default();
    let transitions = c.transitions().await;
    let mut ev = Event {
        name: name.to_owned(),
        from: Instant::now(),
        to: Instant::now(),
        problems: Vec::new(),
        restarted: BTreeMap::new(),
        must_not_restart: must_not_restart.to_vec(),
        notes: Vec::new(),
        moves: None,
    };
    match action().await {
        Ok(notes) => ev.notes = notes,
        Err(e) => ev.problems.push(format!("action failed: {e}")),
    }
    c.settle(shards_after, traffic, &mut ev).await;
    let after = c.pods().await.unwrap_or_default();
    // Times a shard that exists after the event changed hands during it.
    let handovers: i32 = c
        .transitions()
        .await
        .iter()
        .map(|(l, t)| (t - transitions.get(l).copied().unwrap_or(0)).max(0))
        .sum();
    ev.notes.push(format!("lease_handovers={handovers}"));
    for (component, pods) in &before {
        let gone = pods
            .values()
            .filter(|uid| {
                !after
                    .get(component)
                    .is_some_and(|a| a.values().any(|u| u == *uid))
            })
            .count();
        ev.restarted.insert(component, gone);
    }
    ev.to = Instant::now();
    ev
}

fn judge(ev: &Event, outcome: &Outcome, keys: usize) -> Result<String, String> {
    let f: Figures = outcome.figures(ev.from, ev.to);
    let restarts: Vec<String> = ev
        .restarted
        .iter()
        .map(|(c, n)| format!("{c}:{n}"))
        .collect();
    let mut line = format!(
        "{f} clients_reconnected={}/{keys} pods_replaced=[{}]",
        f.reconnected,
        restarts.join(" ")
    );
    for n in &ev.notes {
        line.push_str(&format!(" {n}"));
    }
    let mut problems = ev.problems.clone();
    if f.lost > 0 {
        problems.push(format!("{} acknowledged messages lost", f.lost));
    }
    if f.restarted_keys > 0 {
        problems.push(format!(
            "the mid sequence of {} keys restarted (stored messages gone)",
            f.restarted_keys
        ));
    }
    if let Some(moved) = ev.moves {
        line.push_str(&format!(" keys_moved_by_the_ring={moved}/{keys}"));
        if f.reconnected > moved {
            problems.push(format!(
                "{} clients reconnected but the ring moved only {moved} keys",
                f.reconnected
            ));
        }
    }
    for c in &ev.must_not_restart {
        if ev.restarted.get(c).copied().unwrap_or(0) > 0 {
            problems.push(format!("{c} pods were restarted"));
        }
    }
    if problems.is_empty() {
        Ok(line)
    } else {
        Err(format!("{}; {line}", problems.join("; ")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_through_its_lifecycle() -> anyhow::Result<()> {
    let Some((client, images)) = full_cluster().await else {
        return Ok(());
    };
    let system = TestNamespace::create(&client, "system").await?;
    let mut report = Report::default();

    // S1: the chart with its default values, as the README says, and --wait.
    let values = json!({"image": {"repository": images.repository, "tag": images.tag}});
    let t = Instant::now();
    let sys = system.name.clone();
    let installed = blocking(move || {
        helm(
            "install",
            RELEASE,
            &sys,
            &values,
            true,
            Duration::from_secs(120),
        )
    })
    .await;
    report.add(
        "S1 helm install --wait (chart defaults)",
        installed
            .map(|()| format!("succeeded in {:.1} s", t.elapsed().as_secs_f64()))
            .map_err(|e| e.to_string()),
    );

    let result = story(&client, &images, &mut report).await;
    if let Err(e) = &result {
        report.add("story", Err(format!("stopped early: {e:#}")));
    }

    // S1: helm uninstall removes everything it installed.
    let sys = system.name.clone();
    let uninstalled = blocking(move || {
        helm("uninstall", RELEASE, &sys, &json!({}), true, Duration::from_secs(60))?;
        let sel = format!("app.kubernetes.io/instance={RELEASE}");
        let left = kubectl(
            &["get", "deployments,services,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings", "-A", "-l", &sel, "-o", "name"],
            None,
        )?;
        anyhow::ensure!(left.trim().is_empty(), "left behind: {}", left.trim().replace('\n', ", "));
        Ok(())
    })
    .await;
    report.add(
        "S1 helm uninstall removes what it installed",
        uninstalled
            .map(|()| "nothing left".to_owned())
            .map_err(|e| e.to_string()),
    );
    system.delete().await?;
    let failed = report.print();
    anyhow::ensure!(failed == 0, "{failed} e2e scenarios failed");
    Ok(())
}

async fn story(
    client: &Client,
    images: &pushcluster_e2e::Images,
    report: &mut Report,
) -> anyhow::Result<()> {
    // S2: the minimal example, applied with kubectl.
    let app = TestNamespace::create(client, "app").await?;
    let (ns, image) = (app.name.clone(), images.image());
    let name = blocking(move || apply_example("pushcluster-minimal.yaml", &ns, &image)).await?;
    let c = Cluster {
        client: client.clone(),
        ns: app.name.clone(),
        name,
    };
    let t = Instant::now();
    let ready = wait_ready(client, &c.ns, &c.name, 2, READY_LIMIT).await;
    let (ns, name) = (c.ns.clone(), c.name.clone());
    let rolled = blocking(move || rollout_status(&ns, &name, ROLLOUT_LIMIT)).await;
    report.add(
        "S2 kubectl apply pushcluster-minimal.yaml: Ready, rollout status",
        match (ready, rolled) {
            (Ok(()), Ok(())) => Ok(format!(
                "Ready and every rollout complete in {:.1} s",
                t.elapsed().as_secs_f64()
            )),
            (r, o) => Err(format!(
                "ready: {}; rollout status: {}",
                r.err().map_or("ok".into(), |e| e.to_string()),
                o.err().map_or("ok".into(), |e| e.to_string())
            )),
        },
    );

    // S3: clients outside the cluster, behind a load balancer in front of web.
    let public = ServiceProxy::start(client, &c.ns, &format!("{}-web", c.name), "public").await?;
    let admin =
        ServiceProxy::start(client, &c.ns, &format!("{}-web-admin", c.name), "admin").await?;
    // Secure by default: the app team reads the generated credentials.
    let creds = credentials(client, &c.ns, &c.name).await?;
    let api = HttpApi::new(&public.url(), &admin.url(), Some(creds.admin_token.clone()))
        .with_subscriber_secret(Some(creds.subscriber_secret.clone()));
    let load = Load {
        // Enough keys that the share a reshard moves is near the ring's 1/3.
        keys: 60,
        rate: 48,
        prefix: "e2e".into(),
        subscriber_secret: Some(creds.subscriber_secret.clone()),
    };
    let moved = |from: u32, to: u32| {
        let (a, b) = (Ring::with_shard_count(from), Ring::with_shard_count(to));
        (0..load.keys)
            .map(|i| format!("{}-{i}", load.prefix))
            .filter(|k| a.shard_for(k) != b.shard_for(k))
            .count()
    };
    let traffic = Traffic::start(api, &load).await;
    if !traffic.all_connected(Duration::from_secs(60)).await {
        report.add(
            "S3 subscribers connect",
            Err("not every subscriber reached a comet within 60 s".into()),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // S4: one event at a time, under traffic.
    let mut events = Vec::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &c.ns);
    events.push(
        event(
            &c,
            &traffic,
            "S4a graceful delete of shard 0's holder",
            2,
            &["message", "web"],
            || async {
                let (holder, t) = c.lease(0).await?;
                pods.delete(&holder, &DeleteParams::default()).await?;
                let start = Instant::now();
                let heir = c.taken_again(0, t).await?;
                Ok(vec![format!(
                    "takeover={:.2}s heir_is_another_pod={}",
                    start.elapsed().as_secs_f64(),
                    heir != holder
                )])
            },
        )
        .await,
    );
    events.push(
        event(
            &c,
            &traffic,
            "S4b SIGKILL of shard 1's holder",
            2,
            &["message", "web"],
            || async {
                let (holder, t) = c.lease(1).await?;
                kill9(client, &c.ns, &holder).await?;
                let start = Instant::now();
                let heir = c.taken_again(1, t).await?;
                Ok(vec![format!(
                    "takeover={:.2}s heir_is_another_pod={}",
                    start.elapsed().as_secs_f64(),
                    heir != holder
                )])
            },
        )
        .await,
    );
    // Resharding: only the keys the ring moves may reconnect.
    for (name, from, to) in [("S4c shards 2 -> 3", 2, 3), ("S4d shards 3 -> 2", 3, 2)] {
        let c = &c;
        let mut ev = event(c, &traffic, name, to, &["message", "web"], || async move {
            c.patch(json!({"comet": {"shards": to}})).await?;
            Ok(vec![])
        })
        .await;
        ev.moves = Some(moved(from as u32, to as u32));
        events.push(ev);
    }
    events.push(
        event(
            &c,
            &traffic,
            "S4e rolling upgrade to a new image tag",
            2,
            &[],
            || async {
                c.patch(json!({"image": images.upgrade()})).await?;
                Ok(vec![format!("image={}", images.upgrade())])
            },
        )
        .await,
    );
    events.push(
        event(
            &c,
            &traffic,
            "S4f change of the message service's settings",
            2,
            &["comet", "web"],
            || async {
                c.patch(json!({"message": {"resources": {"requests": {"cpu": "150m"}}}}))
                    .await?;
                Ok(vec![])
            },
        )
        .await,
    );
    events.push(
        event(
            &c,
            &traffic,
            "S4g message pod deleted and recreated",
            2,
            &["comet", "web"],
            || async {
                for p in pods_of(client, &c.ns, &c.name, "message").await?.keys() {
                    pods.delete(p, &DeleteParams::default()).await?;
                }
                Ok(vec![])
            },
        )
        .await,
    );

    let outcome = traffic.finish(Duration::from_secs(90)).await;
    let keys = outcome.keys.len();
    let first = events.first().map(|e| e.from).unwrap_or_else(Instant::now);
    let whole = outcome.figures(
        outcome.attempts.first().map_or(first, |a| a.at),
        Instant::now(),
    );
    let problems = outcome.problems();
    report.add(
        "S3 traffic over the whole run (WebSocket, TCP, SSE followers)",
        if whole.lost == 0 && problems.is_empty() {
            Ok(format!(
                "{whole} duplicates_dropped={}",
                outcome.duplicates()
            ))
        } else {
            Err(format!("{whole}; {}", problems.join("; ")))
        },
    );
    for ev in &events {
        report.add(&ev.name, judge(ev, &outcome, keys));
    }

    // S6: deleting the PushCluster removes everything it owned.
    c.pcs().delete(&c.name, &DeleteParams::default()).await?;
    let t = Instant::now();
    let (ns, name) = (c.ns.clone(), c.name.clone());
    let gone = wait(
        "every object of the PushCluster to be gone",
        Duration::from_secs(120),
        || {
            let (ns, name) = (ns.clone(), name.clone());
            async move {
                let left = blocking(move || owned_objects(&ns, &name)).await?;
                Ok(left.is_empty())
            }
        },
    )
    .await;
    let (ns, name) = (c.ns.clone(), c.name.clone());
    report.add(
        "S6 delete the PushCluster: everything it owned is gone",
        match gone {
            Ok(()) => Ok(format!("in {:.1} s", t.elapsed().as_secs_f64())),
            Err(_) => Err(format!(
                "left behind: {}",
                blocking(move || owned_objects(&ns, &name))
                    .await
                    .unwrap_or_default()
                    .join(", ")
            )),
        },
    );
    let _ = pods.list(&ListParams::default()).await;
    app.delete().await?;
    Ok(())
}

/// Objects in `ns` labelled as belonging to PushCluster `name`.
fn owned_objects(ns: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for sel in [
        format!("app.kubernetes.io/instance={name}"),
        format!("pushcluster.io/cluster={name}"),
    ] {
        let text = kubectl(
            &[
                "get",
                "deployments,statefulsets,services,configmaps,serviceaccounts,roles,rolebindings,poddisruptionbudgets,leases,persistentvolumeclaims,secrets,networkpolicies,pods",
                "-n",
                ns,
                "-l",
                &sel,
                "-o",
                "name",
            ],
            None,
        )?;
        out.extend(text.lines().map(str::to_owned));
    }
    out.sort();
    out.dedup();
    Ok(out)
}
