//! Lease-based membership follows acquisitions and releases.

use pushcluster_core::membership::Membership;
use pushcluster_lease::membership::{LeaseMembership, MembershipMetrics};
use pushcluster_lease::memory::MemoryLeases;
use pushcluster_lease::{Candidate, LeaseBackend};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn c(n: &str) -> Candidate {
    Candidate {
        holder: n.into(),
        rpc: format!("http://{n}"),
        ws: format!("{n}:1"),
        tcp: format!("{n}:2"),
    }
}

#[tokio::test]
async fn the_view_has_exactly_the_held_shards_at_their_holders_addresses() {
    let leases = Arc::new(MemoryLeases::new());
    let m = LeaseMembership::start(
        leases.clone(),
        3,
        Duration::from_secs(60),
        CancellationToken::new(),
        MembershipMetrics::default(),
    );
    let mut rx = m.watch();
    let ttl = Duration::from_secs(60);
    let h0 = leases.try_acquire(0, &c("a"), ttl).await.unwrap().unwrap();
    leases.try_acquire(2, &c("b"), ttl).await.unwrap().unwrap();
    let v = tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|v| v.endpoints.len() == 2),
    )
    .await
    .expect("view follows acquisitions (60 s poll: the change event drove it)")
    .unwrap()
    .clone();
    assert_eq!(v.endpoints[&0].ws, "a:1");
    assert_eq!(v.endpoints[&2].rpc, "http://b");
    assert!((0..200).all(|i| v.ring.shard_for(&format!("k{i}")) != Some(1)));
    leases.release(&h0).await.unwrap();
    let v = tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|v| v.endpoints.len() == 1),
    )
    .await
    .expect("view follows releases")
    .unwrap()
    .clone();
    assert!(v.endpoints.contains_key(&2));
}

/// The per-shard metrics say which shards have a holder and since when.
#[tokio::test]
async fn metrics_say_which_shards_are_held_and_since_when() {
    let leases = Arc::new(MemoryLeases::new());
    let mut reg = prometheus_client::registry::Registry::default();
    let m = LeaseMembership::start(
        leases.clone(),
        2,
        Duration::from_secs(60),
        CancellationToken::new(),
        MembershipMetrics::register(&mut reg),
    );
    let mut rx = m.watch();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    leases
        .try_acquire(1, &c("a"), Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|v| v.endpoints.len() == 1),
    )
    .await
    .expect("view follows the acquisition")
    .unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .map(|v| v.trim().parse::<f64>().unwrap())
            })
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(value("pushcluster_shard_held{shard=\"0\"}"), 0.0);
    assert_eq!(value("pushcluster_shard_held{shard=\"1\"}"), 1.0);
    let since = value("pushcluster_shard_holder_since_timestamp_seconds{shard=\"1\"}");
    assert!(
        since >= before.floor() && since < before + 5.0,
        "since {since}, test began {before}"
    );
    assert!(!text.contains("pushcluster_shard_holder_since_timestamp_seconds{shard=\"0\"}"));
}
