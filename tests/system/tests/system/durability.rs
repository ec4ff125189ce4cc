//! Nothing acknowledged is lost: the message service killed with SIGKILL in
//! the middle of a stream of pushes (embedded store and Redis), comets'
//! connections to Redis cut mid-append, a comet that is down (web stores the
//! push itself), a comet stopped with SIGTERM.

use pushcluster_systest::{collect, metric, subscribe, Cluster, Options, RedisServer, Transport};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An acknowledged push: key, mid, body.
type Acked = (String, i64, String);

/// Pushes from 4 tasks to three keys until stopped.
struct Pushing {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Acked>, u32, u32)>>,
}

impl Pushing {
    fn start(api: &pushcluster_client::http::Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for t in 0..4 {
            let api = api.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let (mut acked, mut failed) = (Vec::new(), 0u32);
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("dur-{}", i % 3);
                    let body = json!({ "t": t, "i": i }).to_string();
                    match api.push(&key, &body, Some(600)).await {
                        Ok(mid) => acked.push((key, mid, body)),
                        Err(_) => failed += 1,
                    }
                    i += 1;
                }
                (acked, failed, i)
            }));
        }
        Self { stop, tasks }
    }

    /// Stops pushing; every acknowledged push as (key, mid, body), and how
    /// many failed and were sent.
    async fn stop(self) -> (Vec<Acked>, u32, u32) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut acked, mut failed, mut sent) = (Vec::new(), 0, 0);
        for t in self.tasks {
            let (a, f, s) = t.await.unwrap();
            acked.extend(a);
            failed += f;
            sent += s;
        }
        assert_eq!(acked.len() as u32 + failed, sent);
        (acked, failed, sent)
    }
}

/// Every acknowledged push is readable under the mid it was acknowledged
/// with, no mid was acknowledged twice, and mids have no gap.
async fn all_stored(api: &pushcluster_client::http::Client, acked: &[Acked]) {
    let mut by_key: BTreeMap<String, BTreeMap<i64, String>> = BTreeMap::new();
    for (k, mid, body) in acked {
        assert!(
            by_key
                .entry(k.clone())
                .or_default()
                .insert(*mid, body.clone())
                .is_none(),
            "mid {mid} acked twice"
        );
    }
    for (k, acks) in &by_key {
        let mut stored = BTreeMap::new();
        let mut after = 0;
        loop {
            let (page, _) = api.fetch(k, after, None).await.unwrap();
            if page.is_empty() {
                break;
            }
            for m in page {
                after = m.mid;
                stored.insert(m.mid, m.msg);
            }
        }
        for (mid, body) in acks {
            let want: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                stored.get(mid),
                Some(&want),
                "{k}: acknowledged mid {mid} lost"
            );
        }
        // mids stay contiguous across the crash.
        let mids: Vec<i64> = stored.keys().copied().collect();
        assert!(
            mids.windows(2).all(|w| w[1] == w[0] + 1),
            "{k}: gap in {mids:?}"
        );
    }
}

/// Streams pushes from 4 tasks while the message service is SIGKILLed and
/// restarted; every acknowledged push must be readable afterwards under the
/// mid it was acknowledged with. Web keeps retrying a store (under the push's
/// id, so never twice) while the message service is unreachable, so no push
/// fails: the ones caught by the restart are answered late.
async fn acknowledged_pushes_survive_sigkill(c: &mut Cluster) {
    let api = c.client();
    let pushing = Pushing::start(&api);
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.message.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.message.start();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (acked, failed, sent) = pushing.stop().await;
    assert_eq!(
        failed, 0,
        "a push failed while the message service restarted"
    );
    let retries =
        pushcluster_systest::metric(c.web.ops_port, "pushcluster_web_store_retries_total");
    assert!(
        retries > 0.0,
        "no store was retried: the kill interrupted nothing"
    );
    all_stored(&api, &acked).await;
    eprintln!(
        "sent {sent}, acknowledged {}, failed {failed}: all acknowledged pushes readable",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_keeps_every_acknowledged_push_across_sigkill() {
    let mut c = Cluster::start(Options::default());
    acknowledged_pushes_survive_sigkill(&mut c).await;
}

/// The message service on Redis killed mid-stream. Comets store in Redis
/// themselves, so here they store through the message service: web's stores
/// for unserved keys and failed comet appends take that path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_keeps_every_acknowledged_push_across_sigkill() {
    let redis = RedisServer::start();
    let mut c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        comets_store_in_redis: false,
        ..Options::default()
    });
    acknowledged_pushes_survive_sigkill(&mut c).await;
}

/// Comets storing straight into Redis, web pushing through them (as web of
/// the previous release does): Redis drops every client connection again
/// and again while pushes stream in. An append cut off mid-flight may or may
/// not have landed; the comet reports it failed, web stores the push under
/// the same push id (so it lands once) and the pusher never sees an error.
/// Nothing acknowledged is lost, duplicated or out of sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comets_storing_in_redis_lose_nothing_when_its_connections_drop() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        web_stores_in_redis: false,
        ..Options::default()
    });
    let interrupted = |c: &Cluster| {
        (0..c.comets.len())
            .map(|i| c.comet_metric(i, "pushcluster_comet_push_errors_total"))
            .sum::<f64>()
    };
    pushes_survive_dropped_redis_connections(&redis, &c, "comet appends", interrupted).await;
}

/// The same with web storing straight into Redis (the default): a store cut
/// off mid-flight is retried under its push id, so it lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_storing_in_redis_loses_nothing_when_its_connections_drop() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let interrupted = |c: &Cluster| metric(c.web.ops_port, "pushcluster_web_store_retries_total");
    pushes_survive_dropped_redis_connections(&redis, &c, "web stores", interrupted).await;
}

/// Pushes stream in while Redis drops every client connection, until at
/// least five cuts and one store `interrupted` says was cut off; then every
/// acknowledged push is stored once and in sequence.
async fn pushes_survive_dropped_redis_connections(
    redis: &RedisServer,
    c: &Cluster,
    what: &str,
    interrupted: impl Fn(&Cluster) -> f64,
) {
    let api = c.client();
    let pushing = Pushing::start(&api);
    let admin = redis::Client::open(redis.url()).expect("redis url");
    let mut admin = admin
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cuts = 0;
    while cuts < 5 || interrupted(c) == 0.0 {
        assert!(cuts < 200, "no {what} were ever cut off\n{}", c.logs());
        // Every client but the one asking: web's, comets' and the message service's.
        let _: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query_async(&mut admin)
            .await
            .expect("CLIENT KILL");
        cuts += 1;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (acked, failed, sent) = pushing.stop().await;
    assert_eq!(failed, 0, "a push failed while Redis dropped connections");
    all_stored(&api, &acked).await;
    eprintln!(
        "{cuts} cuts, {} {what} cut off; sent {sent}, acknowledged {}: all readable, once, without gaps",
        interrupted(c),
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_for_a_dead_comet_are_stored_and_delivered_on_reconnect() {
    let mut c = Cluster::start(Options {
        shards: 1,
        ..Options::default()
    });
    let api = c.client();
    assert_eq!(api.push("orphan", r#"{"n":1}"#, None).await.unwrap(), 1);
    c.comets[0].kill9();
    // No comet: web stores it through the message service and acknowledges.
    assert_eq!(api.push("orphan", r#"{"n":2}"#, None).await.unwrap(), 2);
    let failed = api
        .mpush(&["orphan", "other"], r#"{"n":3}"#, None)
        .await
        .unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    c.comets[0].start();
    let mut sub = subscribe(&c, "orphan", Transport::Ws, true).await;
    let (stored, _) = api.fetch("orphan", 0, None).await.unwrap();
    assert_eq!(
        stored.iter().map(|m| m.mid).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(api.push("orphan", r#"{"n":4}"#, None).await.unwrap(), 4);
    // Web hands mids 2 and 3 to the comet in the background (retrying for
    // about a second), so one of them may reach this connection although it
    // was stored before the connection came: a duplicate of what the client
    // fetched, which clients drop by mid (DESIGN: subscribe, fetch, dedupe).
    // What must hold: increasing mids, none unstored, and 4 arrives.
    let mut live = Vec::new();
    while live.last() != Some(&4) {
        let m = collect(&mut sub, 1, Duration::from_secs(5)).await[0].mid;
        assert!(
            live.last().is_none_or(|&l| m > l) && (2..=4).contains(&m),
            "live mids {live:?} then {m}"
        );
        live.push(m);
    }
    assert!(
        pushcluster_systest::metric(c.web.ops_port, "pushcluster_web_stored_without_comet_total")
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_queued_messages_and_asks_clients_to_reconnect() {
    let mut c = Cluster::start(Options {
        shards: 1,
        ..Options::default()
    });
    let api = c.client();
    let mut versioned = subscribe(&c, "bye", Transport::Tcp, true).await;
    let mut legacy = subscribe(&c, "bye", Transport::Ws, false).await;
    for _ in 0..20 {
        api.push("bye", "{}", None).await.unwrap();
    }
    let took = c.comets[0].term();
    eprintln!("comet stopped {took:?} after SIGTERM");
    // Everything pushed before the stop arrives, then the reconnect frame.
    assert_eq!(
        collect(&mut versioned, 20, Duration::from_secs(5))
            .await
            .len(),
        20
    );
    assert_eq!(
        versioned
            .next_timeout(Duration::from_secs(5))
            .await
            .unwrap(),
        pushcluster_client::Frame::Reconnect
    );
    // Legacy clients get everything and then a plain close (they reconnect on close).
    assert_eq!(
        collect(&mut legacy, 20, Duration::from_secs(5)).await.len(),
        20
    );
    assert!(legacy.next_timeout(Duration::from_secs(5)).await.is_err());
}

/// A service whose stderr reader went away (a dead log shipper) still stops
/// on SIGTERM: a failed log write must not stand in the way of shutdown.
#[test]
fn sigterm_stops_a_service_whose_stderr_is_a_broken_pipe() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (port, ops) = (
        pushcluster_systest::free_port(),
        pushcluster_systest::free_port(),
    );
    let mut child = Command::new(pushcluster_systest::bin_dir().join("push-message"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--ops-listen",
            &format!("127.0.0.1:{ops}"),
        ])
        .arg("--data")
        .arg(dir.path().join("m.redb"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pushcluster_systest::http_status(ops, "/readyz") != Some(200) {
        assert!(std::time::Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child.stderr.take());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("push-message ignored SIGTERM with a broken stderr");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A web told to stop reports unready at once but keeps answering for its
/// lame-duck period (while load balancers drop it), then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_keeps_serving_while_it_drains() {
    let mut c = Cluster::start(Options {
        web_drain_delay_ms: 1500,
        ..Options::default()
    });
    let api = c.client();
    let start = std::time::Instant::now();
    c.web.send_term();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ne!(
        pushcluster_systest::http_status(c.web.ops_port, "/readyz"),
        Some(200),
        "still ready after SIGTERM"
    );
    let mid = api
        .push("drain", r#"{"n":1}"#, None)
        .await
        .expect("a push during the lame-duck period");
    assert_eq!(mid, 1);
    // Responses now close their connection: clients reconnect elsewhere.
    let host = c.public_url.trim_start_matches("http://").to_owned();
    let head = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&host).expect("connect");
        write!(s, "GET /1/time/get HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).to_lowercase()
    })
    .await
    .unwrap();
    assert!(head.contains("connection: close"), "{head}");
    c.web.reap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "web stopped after {took:?}, before its drain delay"
    );
    eprintln!("web drained and stopped {took:?} after SIGTERM");
}
