//! Chaos tests of shard failover with the real binaries, a real redis-server
//! (storage and leases) and clients that follow their key across comets:
//! SIGKILL a shard holder mid-stream, then SIGTERM one, and check that every
//! acknowledged message reached its client exactly once (after dedupe by mid)
//! with no gap. Prints the measured takeover times.

use pushcluster_client::http::Proto;
use pushcluster_systest::{Cluster, Followers, Options, RedisServer};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEYS: usize = 6;

/// Index of the comet serving `key` now, per web.
async fn holder_of(c: &Cluster, key: &str) -> Option<usize> {
    let addr = c.client().resolve(key, Proto::WebSocket).await.ok()?;
    c.comet_addrs.iter().position(|a| a.ws == addr)
}

/// The one comet that holds no shard now.
fn standby(c: &Cluster) -> usize {
    let idle: Vec<usize> = (0..c.comets.len())
        .filter(|&i| !c.comets[i].is_serving())
        .collect();
    assert_eq!(
        idle.len(),
        1,
        "expected exactly one standby, found {idle:?}"
    );
    idle[0]
}

/// Waits until the standby `heir` holds the shard (it is serving) and web routes
/// `key` to it. While the shard has no holder its keys go to the next shard on
/// the ring, so "some other comet serves the key" would end the wait too early.
async fn wait_takeover(c: &Cluster, key: &str, heir: usize, limit: Duration) -> usize {
    let start = Instant::now();
    loop {
        if c.comets[heir].is_serving() && holder_of(c, key).await == Some(heir) {
            return heir;
        }
        assert!(
            start.elapsed() < limit,
            "no takeover of {key}'s shard within {limit:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Two shards and a standby comet, storage and 2 s leases in `redis`.
fn failover_cluster(redis: &RedisServer) -> (Cluster, Duration) {
    let opts = Options {
        shards: 2,
        standbys: 1,
        redis_url: Some(redis.url()),
        lease_redis: Some(redis.url()),
        lease_ms: (2000, 1400, 300),
        ..Options::default()
    };
    let lease_duration = Duration::from_millis(opts.lease_ms.0);
    (Cluster::start(opts), lease_duration)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_loses_no_acknowledged_message() {
    let redis = RedisServer::start();
    let (mut c, lease_duration) = failover_cluster(&redis);
    let api = c.client();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("user-{i}")).collect();
    // Clients as the docs tell them to behave (pushcluster_client::follow).
    let followers = Followers::start(&api, &keys, Proto::WebSocket);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (api, keys, stop) = (api.clone(), keys.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked: BTreeMap<String, Vec<i64>> = BTreeMap::new();
            let (mut sent, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                for k in &keys {
                    sent += 1;
                    match api.push(k, &format!(r#"{{"n":{sent}}}"#), Some(600)).await {
                        Ok(mid) => acked.entry(k.clone()).or_default().push(mid),
                        Err(e) => {
                            failed += 1;
                            eprintln!("push failed: {e}");
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (acked, sent, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Crash: SIGKILL the holder of user-0's shard.
    let victim = holder_of(&c, &keys[0]).await.expect("user-0 is served");
    let heir = standby(&c);
    let t0 = Instant::now();
    c.comets[victim].kill9();
    wait_takeover(&c, &keys[0], heir, lease_duration + Duration::from_secs(1)).await;
    let crash = t0.elapsed();
    eprintln!("crash takeover: comet-{victim} SIGKILLed, comet-{heir} serving after {crash:?}");
    assert!(crash <= lease_duration + Duration::from_secs(1));

    // The killed comet comes back as a standby.
    c.comets[victim].start();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Graceful: SIGTERM the holder of user-1's shard.
    let victim2 = holder_of(&c, &keys[1]).await.expect("user-1 is served");
    let heir2 = standby(&c);
    let t1 = Instant::now();
    c.comets[victim2].send_term();
    wait_takeover(&c, &keys[1], heir2, Duration::from_secs(5)).await;
    let graceful = t1.elapsed();
    eprintln!(
        "graceful takeover: comet-{victim2} SIGTERMed, comet-{heir2} serving after {graceful:?}"
    );
    c.comets[victim2].reap();
    assert!(
        graceful < Duration::from_secs(1),
        "graceful takeover took {graceful:?}"
    );
    c.comets[victim2].start();
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::SeqCst);
    let (mut acked, sent, failed) = pusher.await.unwrap();
    // A last message per key: a client learns of anything stored while it was
    // away at the latest when the next message shows it a gap.
    let mut last_mid = BTreeMap::new();
    for k in &keys {
        let mid = api.push(k, r#"{"last":true}"#, Some(600)).await.unwrap();
        acked.entry(k.clone()).or_default().push(mid);
        last_mid.insert(k.clone(), mid);
    }
    let mut received = 0usize;
    let mut dupes = 0usize;
    let mut connections = 0usize;
    for (k, seen) in followers.finish(&last_mid, &c).await {
        let want = &acked[&k];
        assert!(seen.gaps.is_empty(), "{k}: gaps {:?}", seen.gaps);
        assert_eq!(&seen.mids, want, "{k}: received differs from acknowledged");
        received += seen.mids.len();
        dupes += seen.duplicates_dropped;
        connections += seen.connections;
    }
    let acked_total: usize = acked.values().map(Vec::len).sum();
    eprintln!(
        "sent {} acknowledged {acked_total} received {received} (failed {failed}, duplicates dropped by mid {dupes}, client connections {connections})",
        sent + KEYS as u64
    );
    let changes =
        pushcluster_systest::metric(c.web.ops_port, "pushcluster_shard_holder_changes_total");
    eprintln!("web saw {changes} shard holder changes");
    assert!(changes >= 2.0, "web saw {changes} holder changes");
    assert_eq!(failed, 0);
    assert_eq!(acked_total as u64, sent + KEYS as u64);
    assert_eq!(received, acked_total);
}

/// S5 of the benchmarks (`bench/compare/run`, not in `make test`): crash and
/// graceful takeover times over `TAKEOVER_REPS` repetitions (default 20),
/// 2 s leases in Redis. Prints one `scenario=takeover` line per kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by bench/compare/run"]
async fn takeover_series() {
    let reps: usize = std::env::var("TAKEOVER_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let redis = RedisServer::start();
    let (mut c, lease_duration) = failover_cluster(&redis);
    let key = "user-0";
    let (mut crash, mut graceful) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let victim = holder_of(&c, key).await.expect("user-0 is served");
        let heir = standby(&c);
        let t = Instant::now();
        c.comets[victim].kill9();
        wait_takeover(&c, key, heir, lease_duration + Duration::from_secs(2)).await;
        crash.push(t.elapsed());
        c.comets[victim].start();
        tokio::time::sleep(Duration::from_millis(500)).await;

        let victim = holder_of(&c, key).await.expect("user-0 is served");
        let heir = standby(&c);
        let t = Instant::now();
        c.comets[victim].send_term();
        wait_takeover(&c, key, heir, Duration::from_secs(5)).await;
        graceful.push(t.elapsed());
        c.comets[victim].reap();
        c.comets[victim].start();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (kind, mut times) in [("crash", crash), ("graceful", graceful)] {
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let at = |q: f64| ms(times[((times.len() - 1) as f64 * q).round() as usize]);
        println!(
            "scenario=takeover kind={kind} reps={reps} lease_ms={} min_ms={:.0} p50_ms={:.0} p90_ms={:.0} max_ms={:.0}",
            lease_duration.as_millis(),
            ms(times[0]),
            at(0.5),
            at(0.9),
            ms(times[times.len() - 1])
        );
    }
}

/// Issue 23's crash bound, with no control plane: followers on every
/// transport lose their comet to a SIGKILL and are on its standby within a
/// lease duration plus 0.5 s, because web holds their resolve
/// (`/1/server/get?w=`) until the standby took the shard instead of letting
/// their backoff decide when they look again. A client that names a comet
/// which still answers gets its answer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_are_back_within_a_lease_and_a_half_second_of_a_crash() {
    let redis = RedisServer::start();
    let (mut c, lease_duration) = failover_cluster(&redis);
    let api = c.client();
    let keys: Vec<String> = (0..6).map(|i| format!("user-{i}")).collect();
    let victim = holder_of(&c, &keys[0]).await.expect("user-0 is served");

    // A comet that answers is not waited past.
    let live = api.resolve(&keys[0], Proto::WebSocket).await.unwrap();
    let asked = Instant::now();
    let again = api
        .resolve_after_losing(&keys[0], Proto::WebSocket, &live)
        .await
        .unwrap();
    let answered = asked.elapsed();
    assert_eq!(again, live);
    assert!(
        answered < lease_duration / 2,
        "web waited {answered:?} past a comet that answers"
    );

    let mut followers = Vec::new();
    for proto in [Proto::WebSocket, Proto::Tcp, Proto::Sse] {
        followers.push((proto, Followers::start(&api, &keys, proto)));
    }
    let all = keys.len() * followers.len();
    let connected = || {
        followers
            .iter()
            .map(|(_, f)| f.control.connected())
            .sum::<usize>()
            == all
    };
    let up = pushcluster_systest::until(Duration::from_secs(10), connected).await;
    assert!(up.is_some(), "followers did not connect\n{}", c.logs());
    // Older than web's probe answers: the live comet's answer above is no
    // evidence about the comet after the kill below.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let heir = standby(&c);
    let t0 = Instant::now();
    c.comets[victim].kill9();
    wait_takeover(&c, &keys[0], heir, lease_duration + Duration::from_secs(1)).await;
    let takeover = t0.elapsed();
    let back = pushcluster_systest::until(lease_duration + Duration::from_secs(3), connected).await;
    assert!(back.is_some(), "followers did not come back\n{}", c.logs());

    let mut last = BTreeMap::new();
    for k in &keys {
        last.insert(
            k.clone(),
            api.push(k, r#"{"last":true}"#, Some(600)).await.unwrap(),
        );
    }
    let bound = lease_duration + Duration::from_millis(500);
    let mut cut = 0;
    let mut longest = Duration::ZERO;
    for (proto, f) in followers {
        for (k, seen) in f.finish(&last, &c).await {
            for o in seen.outages.iter().filter(|o| o.from >= t0) {
                cut += 1;
                longest = longest.max(o.length());
                assert!(
                    o.length() <= bound,
                    "{proto:?} follower of {k} was without a comet for {:?} (takeover {takeover:?})\n{}",
                    o.length(),
                    c.logs()
                );
            }
            assert!(seen.gaps.is_empty(), "{k}: gaps {:?}", seen.gaps);
        }
    }
    eprintln!(
        "crash: standby serving after {takeover:?}; {cut} followers cut off, the longest for {longest:?} (bound {bound:?})"
    );
    assert!(cut > 0, "the SIGKILL cut no follower off");
}
