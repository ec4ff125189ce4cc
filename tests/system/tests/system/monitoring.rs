//! The chart's alerts and dashboard against a real Prometheus (Debian's
//! package) scraping a running cluster: every dashboard panel's query
//! returns data, and the shard-without-holder alert goes pending, then
//! firing, and resolves once a standby takes the shard over.

use pushcluster_systest::{free_port, subscribe, Cluster, Options, RedisServer, Transport};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// A Prometheus server, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `targets` (ops port, component, pod) every second under the
    /// labels the chart's PodMonitor gives, and evaluates the chart's rules
    /// every second.
    fn start(dir: &Path, targets: &[(u16, &str, String)]) -> Self {
        let mut scrape = String::new();
        for (port, component, pod) in targets {
            scrape.push_str(&format!(
                "      - targets: ['127.0.0.1:{port}']\n        labels: {{namespace: systest, pushcluster: sys, component: {component}, pod: {pod}}}\n"
            ));
        }
        let rules = repo_file("charts/pushcluster-operator/files/prometheus-rules.yaml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: pushcluster\n    static_configs:\n{scrape}",
            rules.display()
        );
        let cfg_path = dir.join("prometheus.yml");
        std::fs::write(&cfg_path, config).expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    async fn wait_ready(&self) {
        let start = Instant::now();
        while reqwest::get(format!("{}/-/ready", self.url))
            .await
            .map_or(true, |r| !r.status().is_success())
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "Prometheus did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The state (`pending`, `firing`) of `alert` for shard `shard`, if active.
    async fn alert_state(&self, alert: &str, shard: &str) -> Option<String> {
        let v = self.get("/api/v1/alerts", &[]).await?;
        v["data"]["alerts"].as_array()?.iter().find_map(|a| {
            (a["labels"]["alertname"] == alert && a["labels"]["shard"] == shard)
                .then(|| a["state"].as_str().unwrap_or_default().to_owned())
        })
    }

    /// Every active alert: state, name and labels.
    async fn active_alerts(&self) -> Vec<String> {
        let v = self.get("/api/v1/alerts", &[]).await.unwrap_or_default();
        v["data"]["alerts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|a| {
                        format!(
                            "{} {} {}",
                            a["state"], a["labels"]["alertname"], a["labels"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many series `expr` returns now.
    async fn series(&self, expr: &str) -> usize {
        let v = self
            .get("/api/v1/query", &[("query", expr)])
            .await
            .unwrap_or_default();
        assert_eq!(v["status"], "success", "query {expr}: {v}");
        v["data"]["result"].as_array().map_or(0, Vec::len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_has_data_and_a_shard_without_holder_alerts_until_a_standby_takes_over() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: no `prometheus` on PATH (Debian: apt-get install prometheus; make test installs it)");
        return;
    }
    // The embedded store, as `make run`, with shard leases in Redis so a
    // standby can take a shard over.
    let redis = RedisServer::start();
    let mut c = Cluster::start(Options {
        shards: 2,
        standbys: 1,
        lease_redis: Some(redis.url()),
        lease_ms: (2000, 1400, 300),
        ..Options::default()
    });
    let standby = (0..c.comets.len())
        .find(|&i| !c.comets[i].is_serving())
        .expect("a standby");
    // Held back, so the shard stays without a holder long enough to fire.
    c.comets[standby].kill9();

    let mut targets = vec![
        (c.web.ops_port, "web", "sys-web-0".to_owned()),
        (c.message.ops_port, "message", "sys-message-0".to_owned()),
    ];
    for (i, p) in c.comets.iter().enumerate() {
        targets.push((p.ops_port, "comet", format!("sys-comet-{i}")));
    }
    let prom = Prometheus::start(c.dir.path(), &targets);
    prom.wait_ready().await;

    let api = c.client();
    let mut subs = Vec::new();
    for (i, t) in [Transport::Ws, Transport::Tcp, Transport::Sse]
        .into_iter()
        .enumerate()
    {
        subs.push(subscribe(&c, &format!("watched-{i}"), t, true).await);
    }
    for round in 0..40 {
        for i in 0..3 {
            api.push(
                &format!("watched-{i}"),
                &format!(r#"{{"n":{round}}}"#),
                Some(600),
            )
            .await
            .expect("push");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A holder dies; no standby runs. Prometheus says which shard it held.
    let victim = (0..c.comets.len())
        .find(|&i| i != standby && c.comets[i].is_serving())
        .expect("a holder");
    c.comets[victim].kill9();
    let killed = Instant::now();
    let shard = loop {
        let v = prom
            .get(
                "/api/v1/query",
                &[("query", "max by (shard) (pushcluster_shard_held) == 0")],
            )
            .await
            .unwrap_or_default();
        if let Some(s) = v["data"]["result"][0]["metric"]["shard"].as_str() {
            break s.to_owned();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no shard seen without a holder\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let alert = "PushClusterShardWithoutHolder";
    let mut pending_at = None;
    let firing_at = loop {
        match prom.alert_state(alert, &shard).await.as_deref() {
            Some("pending") => {
                pending_at.get_or_insert(killed.elapsed());
            }
            Some("firing") => break killed.elapsed(),
            _ => {}
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "{alert} did not fire for shard {shard}: {:?}",
            prom.active_alerts().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let pending_at = pending_at.expect("the alert fired without going pending first");
    assert!(
        firing_at - pending_at >= Duration::from_secs(29),
        "firing {firing_at:?} only {:?} after pending: the rule waits 30 s",
        firing_at - pending_at
    );

    // The standby comes and takes the shard over: the alert resolves.
    c.comets[standby].start();
    let back = Instant::now();
    while prom.alert_state(alert, &shard).await.is_some() {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "{alert} did not resolve after the standby took over\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resolved_at = killed.elapsed();
    assert!(c.comets[standby].is_serving(), "the standby does not serve");
    // Some traffic after the takeover, and a scrape or two of it.
    for round in 0..20 {
        api.push("watched-0", &format!(r#"{{"after":{round}}}"#), Some(600))
            .await
            .expect("push");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every dashboard panel has data, but for those that do not apply here.
    let not_here = [
        // The embedded store: no live feed (that is Redis's).
        "Live feed (Redis)",
        // No operator in a cluster of processes.
        "Operator reconciles",
    ];
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file(
            "charts/pushcluster-operator/files/grafana-dashboard.json",
        ))
        .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut empty = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        let mut found = 0;
        for t in panel["targets"].as_array().expect("targets") {
            let expr = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$namespace", ".*")
                .replace("$pushcluster", ".*");
            found += prom.series(&expr).await;
        }
        if found == 0 {
            empty.push(title.to_owned());
        }
    }
    assert_eq!(empty, not_here, "panels without data");
    let others: Vec<String> = prom
        .active_alerts()
        .await
        .into_iter()
        .filter(|a| !a.contains(alert) && a.starts_with("\"firing\""))
        .collect();
    // Firing only: a pending PushClusterStoreVolumeFilling is the truth
    // about a test host whose disk is over 80% full.
    assert!(others.is_empty(), "other alerts firing: {others:?}");
    eprintln!(
        "shard {shard} without holder: alert pending {pending_at:?}, firing {firing_at:?}, \
         resolved {resolved_at:?} after the SIGKILL; {} of {} dashboard panels with data",
        panels.len() - empty.len(),
        panels.len()
    );
    drop(subs);
}
