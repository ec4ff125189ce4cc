//! The Redis lease backend against a real `redis-server` on a free port.

use pushcluster_lease::redis::RedisLeases;
use pushcluster_lease::{Candidate, LeaseBackend};
use pushcluster_store::testing::RedisServer;
use std::time::Duration;

fn c(name: &str) -> Candidate {
    Candidate {
        holder: name.into(),
        rpc: format!("http://{name}:1"),
        ws: format!("{name}:2"),
        tcp: format!("{name}:3"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_exclusive_fenced_and_expire() {
    let server = RedisServer::start();
    exclusive_fenced_and_expiring(&server.url()).await;
}

/// The same on a Redis Cluster: each lease's keys share a slot, the
/// snapshot reads one pipeline per slot, events reach every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_on_a_redis_cluster_are_exclusive_fenced_and_expire() {
    let cluster = pushcluster_store::testing::RedisClusterServers::start(3);
    exclusive_fenced_and_expiring(&cluster.url()).await;
}

/// The same behind Sentinels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_behind_sentinels_are_exclusive_fenced_and_expire() {
    let group = pushcluster_store::testing::RedisSentinels::start(1);
    exclusive_fenced_and_expiring(&group.url()).await;
}

async fn exclusive_fenced_and_expiring(url: &str) {
    let a = RedisLeases::connect(url, "t").await.unwrap();
    let b = RedisLeases::connect(url, "t").await.unwrap();
    let ttl = Duration::from_millis(400);

    let held = a
        .try_acquire(0, &c("a"), ttl)
        .await
        .unwrap()
        .expect("free lease");
    assert_eq!(held.record.token, 1);
    assert!(
        b.try_acquire(0, &c("b"), ttl).await.unwrap().is_none(),
        "held by a"
    );
    let other = b
        .try_acquire(1, &c("b"), ttl)
        .await
        .unwrap()
        .expect("shard 1 is free");

    let snap = b.snapshot(3).await.unwrap();
    assert_eq!(snap[0].as_ref().unwrap().candidate, c("a"));
    assert_eq!(snap[1].as_ref().unwrap().candidate.ws, "b:2");
    assert!(snap[2].is_none());

    // Renewing keeps it past its first expiry.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(a.renew(&held, ttl).await.unwrap());
    }
    // b cannot renew or release what a holds.
    let forged = pushcluster_lease::Held {
        record: held.record.clone(),
        raw: other.raw.clone(),
    };
    assert!(!b.renew(&forged, ttl).await.unwrap());
    b.release(&forged).await.unwrap();
    assert!(b.snapshot(1).await.unwrap()[0].is_some());

    // Expired, it goes to the next candidate with a larger fencing token,
    // and the old holder's renew fails.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = b
        .try_acquire(0, &c("b"), ttl)
        .await
        .unwrap()
        .expect("expired lease");
    assert_eq!(taken.record.token, 2);
    assert!(!a.renew(&held, ttl).await.unwrap());

    // Release frees it at once and wakes whoever waits for a change.
    let mut changes = a.changes();
    changes.borrow_and_update();
    // A notice of b's acquire above may still be on its way: wake on each
    // change until one shows the lease free.
    let waiter = tokio::spawn(async move {
        loop {
            changes.changed().await.expect("backend alive");
            if a.snapshot(1).await.unwrap()[0].is_none() {
                return true;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.release(&taken).await.unwrap();
    let freed = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("woken")
        .unwrap();
    assert!(freed);
}

/// A standby learns from each snapshot when the first held lease ends, so
/// it can try to take it then rather than at its next retry tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_tells_when_the_first_held_lease_ends() {
    let server = RedisServer::start();
    let a = RedisLeases::connect(&server.url(), "x").await.unwrap();
    let b = RedisLeases::connect(&server.url(), "x").await.unwrap();
    b.snapshot(2).await.unwrap();
    assert_eq!(b.next_expiry(), None, "nothing held");
    a.try_acquire(0, &c("a"), Duration::from_millis(5000))
        .await
        .unwrap()
        .expect("free");
    a.try_acquire(1, &c("a"), Duration::from_millis(800))
        .await
        .unwrap()
        .expect("free");
    let asked = tokio::time::Instant::now();
    b.snapshot(2).await.unwrap();
    let ends = b.next_expiry().expect("two leases held");
    // Shard 1's, the sooner one.
    assert!(ends > asked && ends <= tokio::time::Instant::now() + Duration::from_millis(800));
    assert!(
        ends > asked + Duration::from_millis(600),
        "{:?}",
        ends - asked
    );
    tokio::time::sleep_until(ends + Duration::from_millis(5)).await;
    assert!(
        b.try_acquire(1, &c("b"), Duration::from_millis(800))
            .await
            .unwrap()
            .is_some(),
        "free at the expiry the snapshot gave"
    );
}
