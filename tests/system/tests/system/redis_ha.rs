//! Storage that stays up: the real binaries on a real Redis Cluster (three
//! masters, a replica each) and behind real Sentinels (a master, two
//! replicas, three Sentinels), with followers on WebSocket, TCP and SSE and
//! pushes throughout. A master is SIGKILLed, or the busy key's slot moves
//! to another master; every acknowledged push must reach its followers in
//! mid order, and with WAIT durability none may be lost. Without WAIT the
//! number lost is printed (Redis replicates asynchronously: the last
//! writes before a crash may not have reached the replica it promotes).
//! Shard leases live in the same Redis, so they follow the same failover.

use pushcluster_client::http::{Client, Proto};
use pushcluster_redis::Durability;
use pushcluster_store::testing::{RedisClusterServers, RedisSentinels};
use pushcluster_systest::{Cluster, Followers, Options};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The busy key first: the fault is aimed at its slot.
const KEYS: [(&str, Proto); 6] = [
    ("busy", Proto::WebSocket),
    ("ws-1", Proto::WebSocket),
    ("tcp-0", Proto::Tcp),
    ("tcp-1", Proto::Tcp),
    ("sse-0", Proto::Sse),
    ("sse-1", Proto::Sse),
];

const WAIT_ONE: Durability = Durability {
    replicas: 1,
    timeout_ms: 1000,
};

/// A pushcluster on `url` (storage and leases), leases long enough to
/// outlast a Redis failover (a holder that cannot renew for the renew
/// deadline steps down: keep it above the failover time).
fn cluster_on(url: &str, durability: Durability) -> Cluster {
    Cluster::start(Options {
        shards: 2,
        redis_url: Some(url.to_owned()),
        lease_redis: Some(url.to_owned()),
        lease_ms: (8000, 6000, 500),
        redis_durability: durability,
        ..Options::default()
    })
}

/// What the pusher saw.
#[derive(Default)]
struct Pushed {
    /// Per key, (mid, n) of every acknowledged push, in order.
    acked: BTreeMap<String, Vec<(i64, u64)>>,
    sent: u64,
    failed: u64,
    /// The longest one push took to be acknowledged (web retries a
    /// failover's errors under the push's id).
    slowest: Duration,
}

/// Pushes `{"n":…}` to every key in turn until `stop`.
fn pusher(api: Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Pushed> {
    tokio::spawn(async move {
        let mut p = Pushed::default();
        while !stop.load(Ordering::SeqCst) {
            for (k, _) in KEYS {
                p.sent += 1;
                let n = p.sent;
                let t = Instant::now();
                match api.push(k, &format!(r#"{{"n":{n}}}"#), Some(600)).await {
                    Ok(mid) => p.acked.entry(k.to_owned()).or_default().push((mid, n)),
                    Err(e) => {
                        p.failed += 1;
                        eprintln!("push {n} to {k} failed after {:?}: {e}", t.elapsed());
                    }
                }
                p.slowest = p.slowest.max(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        p
    })
}

/// Acknowledged pushes that storage no longer has as acknowledged (mid
/// missing, or holding another push): lost in a failover.
async fn lost(api: &Client, pushed: &Pushed) -> usize {
    let mut lost = 0;
    for (k, acked) in &pushed.acked {
        let mut stored: BTreeMap<i64, u64> = BTreeMap::new();
        let mut after = 0;
        loop {
            let (msgs, _) = api.fetch(k, after, None).await.expect("fetch");
            let Some(last) = msgs.last().map(|m| m.mid) else {
                break;
            };
            for m in msgs {
                if let Some(n) = m.msg.get("n").and_then(|n| n.as_u64()) {
                    stored.insert(m.mid, n);
                }
            }
            after = last;
        }
        lost += acked
            .iter()
            .filter(|(mid, n)| stored.get(mid) != Some(n))
            .count();
    }
    lost
}

/// Runs traffic with followers on every transport, applies `fault` a
/// second in, keeps pushing for `after` more, then checks delivery.
/// Returns what was pushed and how many acknowledged pushes were lost.
async fn under_traffic(
    c: &Cluster,
    after: Duration,
    must_deliver_all: bool,
    fault: impl FnOnce(),
) -> (Pushed, usize) {
    let api = c.client();
    let followers: Vec<(Followers, Vec<String>)> = [Proto::WebSocket, Proto::Tcp, Proto::Sse]
        .into_iter()
        .map(|proto| {
            let keys: Vec<String> = KEYS
                .iter()
                .filter(|(_, p)| *p == proto)
                .map(|(k, _)| (*k).to_owned())
                .collect();
            (Followers::start(&api, &keys, proto), keys)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let task = pusher(api.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(fault);
    tokio::time::sleep(after).await;
    stop.store(true, Ordering::SeqCst);
    let mut pushed = task.await.expect("pusher");
    let mut last = BTreeMap::new();
    for (k, _) in KEYS {
        let mid = api
            .push(k, r#"{"last":true}"#, Some(600))
            .await
            .expect("last push");
        last.insert(k.to_owned(), mid);
    }
    let lost = lost(&api, &pushed).await;
    for (k, _) in KEYS {
        pushed
            .acked
            .entry(k.to_owned())
            .or_default()
            .push((last[k], 0));
    }
    let (mut received, mut connections, mut dupes) = (0, 0, 0);
    for (f, _) in followers {
        for (k, seen) in f.finish(&last, c).await {
            let want: Vec<i64> = pushed.acked[&k].iter().map(|(m, _)| *m).collect();
            connections += seen.connections;
            dupes += seen.duplicates_dropped;
            received += seen.mids.len();
            if must_deliver_all {
                assert!(seen.gaps.is_empty(), "{k}: gaps {:?}", seen.gaps);
                assert_eq!(
                    seen.mids, want,
                    "{k}: delivered differs from acknowledged (sent {}, failed {}, slowest {:?})",
                    pushed.sent, pushed.failed, pushed.slowest
                );
            } else {
                assert_eq!(seen.last(), last[&k], "{k}: the last push did not arrive");
            }
        }
    }
    let acked: usize = pushed.acked.values().map(Vec::len).sum();
    eprintln!(
        "sent {} acknowledged {acked} failed {} lost {lost} delivered {received} (client connections {connections}, duplicates dropped by mid {dupes}); slowest push {:?}",
        pushed.sent + KEYS.len() as u64,
        pushed.failed,
        pushed.slowest
    );
    (pushed, lost)
}

/// SIGKILLs the master of the busy key's slot and waits for its replica
/// to take the slot over; prints how long that took. With `restart`, the
/// killed node then comes back (as Kubernetes restarts a pod) and rejoins
/// as the new master's replica, which WAIT durability needs to go on.
fn kill_busy_master(redis: &mut RedisClusterServers, restart: bool) -> usize {
    let victim = redis.master_of("busy", 0);
    let ask = (victim + 1) % redis.nodes.len();
    let t = Instant::now();
    redis.nodes[victim].kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = redis.master_of("busy", ask);
        if now != victim {
            eprintln!(
                "redis cluster: master {victim} SIGKILLed, node {now} took its slots after {:?}",
                t.elapsed()
            );
            if restart {
                redis.nodes[victim].restart();
                redis.wait_healthy();
                eprintln!(
                    "redis cluster: node {victim} back as a replica after {:?}",
                    t.elapsed()
                );
            }
            return now;
        }
        assert!(Instant::now() < deadline, "no replica took over");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_master_killed_under_traffic_loses_nothing_acknowledged_with_wait() {
    let mut redis = RedisClusterServers::start(3);
    let c = cluster_on(&redis.url(), WAIT_ONE);
    let (pushed, lost) = under_traffic(&c, Duration::from_secs(3), true, || {
        kill_busy_master(&mut redis, true);
    })
    .await;
    assert_eq!(lost, 0, "WAIT durability lost acknowledged pushes");
    assert_eq!(pushed.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_master_killed_without_wait_reports_what_it_lost() {
    let mut redis = RedisClusterServers::start(3);
    let c = cluster_on(&redis.url(), Durability::default());
    let (pushed, lost) = under_traffic(&c, Duration::from_secs(3), false, || {
        kill_busy_master(&mut redis, false);
    })
    .await;
    eprintln!("without WAIT: {lost} acknowledged pushes lost in the failover");
    assert_eq!(pushed.failed, 0);
}

/// A master that stops answering (SIGSTOP, a hung or cut-off node) for 7 s,
/// longer than a command may take (5 s): its replica takes over after about
/// two node timeouts; the clients, which learn a new slot map only from a
/// redirection or a refused connection, must not keep sending its slots'
/// pushes to the silent node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_master_that_stops_answering_is_failed_over_without_a_failed_push() {
    let mut redis = RedisClusterServers::start(3);
    let c = cluster_on(&redis.url(), WAIT_ONE);
    let (pushed, lost) = under_traffic(&c, Duration::from_secs(3), true, || {
        let victim = redis.master_of("busy", 0);
        let t = Instant::now();
        redis.nodes[victim].signal("STOP");
        std::thread::sleep(Duration::from_secs(7));
        redis.nodes[victim].signal("CONT");
        redis.wait_healthy();
        eprintln!(
            "redis cluster: master {victim} stopped 7 s, healthy again {:?} after the stop",
            t.elapsed()
        );
    })
    .await;
    assert_eq!(lost, 0);
    assert_eq!(pushed.failed, 0);
    let _ = &mut redis;
}

/// Moves `slot` from its master to another master as `redis-cli --cluster
/// reshard` does: IMPORTING/MIGRATING, MIGRATE the keys in batches, then
/// SETSLOT NODE on every master. Prints how long it took.
fn migrate_busy_slot(redis: &RedisClusterServers) {
    let slot = pushcluster_redis::slot(b"busy");
    let src = redis.master_of("busy", 0);
    let masters = redis.nodes.len() / 2;
    let dst = (0..masters).find(|&m| m != src).expect("another master");
    let (src_id, dst_id) = (&redis.ids[src], &redis.ids[dst]);
    let t = Instant::now();
    let setslot = |node: usize, how: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(how)
            .arg(id)
            .exec(&mut redis.nodes[node].conn())
            .expect("CLUSTER SETSLOT");
    };
    setslot(dst, "IMPORTING", src_id);
    setslot(src, "MIGRATING", dst_id);
    let mut moved = 0;
    loop {
        let mut conn = redis.nodes[src].conn();
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut conn)
            .expect("GETKEYSINSLOT");
        if keys.is_empty() {
            break;
        }
        moved += keys.len();
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(redis.nodes[dst].port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .exec(&mut conn)
            .expect("MIGRATE");
    }
    setslot(dst, "NODE", dst_id);
    setslot(src, "NODE", dst_id);
    for m in (0..masters).filter(|&m| m != src && m != dst) {
        setslot(m, "NODE", dst_id);
    }
    eprintln!(
        "redis cluster: slot {slot} ({moved} keys) moved from master {src} to master {dst} in {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_under_traffic_loses_nothing_and_keeps_mid_order() {
    let redis = RedisClusterServers::start(3);
    let c = cluster_on(&redis.url(), WAIT_ONE);
    let (pushed, lost) = under_traffic(&c, Duration::from_secs(2), true, || {
        migrate_busy_slot(&redis);
    })
    .await;
    assert_eq!(lost, 0);
    assert_eq!(pushed.failed, 0);
}

/// SIGKILLs the master and waits for the Sentinels to name another.
fn kill_sentinel_master(group: &mut RedisSentinels) {
    let victim = group.master_index().expect("a master");
    let t = Instant::now();
    group.nodes[victim].kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(now) = group.master_index().filter(|&m| m != victim) {
            eprintln!(
                "sentinel: master {victim} SIGKILLed, node {now} promoted after {:?}",
                t.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the sentinels promoted no replica"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_traffic_loses_nothing_acknowledged_with_wait() {
    let mut group = RedisSentinels::start(2);
    let c = cluster_on(&group.url(), WAIT_ONE);
    let (pushed, lost) = under_traffic(&c, Duration::from_secs(4), true, || {
        kill_sentinel_master(&mut group);
    })
    .await;
    assert_eq!(lost, 0, "WAIT durability lost acknowledged pushes");
    assert_eq!(pushed.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_without_wait_reports_what_it_lost() {
    let mut group = RedisSentinels::start(2);
    let c = cluster_on(&group.url(), Durability::default());
    let (pushed, lost) = under_traffic(&c, Duration::from_secs(4), false, || {
        kill_sentinel_master(&mut group);
    })
    .await;
    eprintln!("without WAIT: {lost} acknowledged pushes lost in the failover");
    assert_eq!(pushed.failed, 0);
}

/// Stops the master (SIGSTOP: a stalled process, a paused VM), waits for
/// the Sentinels to promote a replica and lets the old master go on: it
/// comes back still a master, with its clients' connections open, until
/// the Sentinels next look at it and make it a replica.
fn stall_sentinel_master(group: &mut RedisSentinels) {
    let victim = group.master_index().expect("a master");
    let t = Instant::now();
    group.nodes[victim].signal("STOP");
    let deadline = Instant::now() + Duration::from_secs(20);
    let now = loop {
        if let Some(now) = group.master_index().filter(|&m| m != victim) {
            break now;
        }
        if Instant::now() > deadline {
            group.nodes[victim].signal("CONT");
            panic!("the sentinels promoted no replica");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    group.nodes[victim].signal("CONT");
    eprintln!(
        "sentinel: master {victim} stopped, node {now} promoted after {:?}; the old master goes on",
        t.elapsed()
    );
}

/// With the old master back and still taking writes, a writer that stayed
/// on it would have its pushes acknowledged there and lost when it becomes
/// a replica, and comets subscribed to it would hear nothing of the new
/// master. Everyone follows the Sentinels' announcement instead: with WAIT
/// (the old master has no replica left to confirm) nothing acknowledged
/// is lost and nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sentinel_master_that_comes_back_is_left_at_once() {
    let mut group = RedisSentinels::start(2);
    let c = cluster_on(&group.url(), WAIT_ONE);
    let (pushed, lost) = under_traffic(&c, Duration::from_secs(3), true, || {
        stall_sentinel_master(&mut group);
    })
    .await;
    eprintln!(
        "web retried {} store calls (answers from the old master after the promotion among them)",
        pushcluster_systest::metric(c.web.ops_port, "pushcluster_web_store_retries_total")
    );
    assert_eq!(lost, 0, "WAIT durability lost acknowledged pushes");
    assert_eq!(pushed.failed, 0);
}

/// The same without WAIT: the pushes the old master took while stalled are
/// lost (reported), and the ones after the promotion reach the new master
/// and every follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sentinel_master_without_wait_reports_what_it_lost() {
    let mut group = RedisSentinels::start(2);
    let c = cluster_on(&group.url(), Durability::default());
    let (pushed, lost) = under_traffic(&c, Duration::from_secs(3), false, || {
        stall_sentinel_master(&mut group);
    })
    .await;
    eprintln!("stalled master without WAIT: {lost} acknowledged pushes lost");
    assert_eq!(pushed.failed, 0);
}
