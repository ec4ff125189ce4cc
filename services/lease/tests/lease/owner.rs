//! The ownership state machine on the in-memory backend, on tokio's paused
//! clock: every duration below is virtual and exact.

use pushcluster_lease::memory::MemoryLeases;
use pushcluster_lease::owner::{Ownership, ShardOwner, Witness};
use pushcluster_lease::{Candidate, LeaseBackend, LeaseTiming};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const TIMING: LeaseTiming = LeaseTiming {
    duration_ms: 3000,
    renew_deadline_ms: 2000,
    retry_period_ms: 500,
};

fn candidate(name: &str) -> Candidate {
    Candidate {
        holder: name.into(),
        rpc: format!("http://{name}:1"),
        ws: format!("{name}:2"),
        tcp: format!("{name}:3"),
    }
}

/// Every ownership change of every candidate, with its (virtual) time.
type Log = Arc<Mutex<Vec<(Instant, String, Ownership)>>>;

fn start(
    leases: &MemoryLeases,
    name: &str,
    shards: u32,
    log: &Log,
) -> (CancellationToken, watch::Receiver<Ownership>) {
    let (owner, rx) = ShardOwner::new(
        Arc::new(leases.handle_for(name)),
        candidate(name),
        shards,
        None,
        TIMING,
    );
    run_logged(owner, rx, name, log)
}

/// Runs `owner`, logging every ownership change it publishes.
fn run_logged<B: LeaseBackend>(
    owner: ShardOwner<B>,
    rx: watch::Receiver<Ownership>,
    name: &str,
    log: &Log,
) -> (CancellationToken, watch::Receiver<Ownership>) {
    let cancel = CancellationToken::new();
    tokio::spawn(owner.run(cancel.clone()));
    let mut watch = rx.clone();
    let (log, name) = (log.clone(), name.to_owned());
    tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            let o = *watch.borrow_and_update();
            log.lock().unwrap().push((Instant::now(), name.clone(), o));
        }
    });
    (cancel, rx)
}

/// Replays the log and fails if two candidates ever served one shard at once.
fn assert_never_two_holders(log: &Log) {
    let log = log.lock().unwrap();
    let mut serving: std::collections::HashMap<String, Option<u32>> = Default::default();
    for (t, name, o) in log.iter() {
        serving.insert(name.clone(), o.shard());
        let mut seen = std::collections::HashSet::new();
        for s in serving.values().flatten() {
            assert!(
                seen.insert(*s),
                "two holders of shard {s} at {t:?}: {log:?}"
            );
        }
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn racing_candidates_split_the_shards_one_holder_each() {
    let leases = MemoryLeases::new();
    let log = Log::default();
    let owners: Vec<_> = (0..5)
        .map(|i| start(&leases, &format!("c{i}"), 3, &log))
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut shards: Vec<u32> = owners
        .iter()
        .filter_map(|(_, rx)| rx.borrow().shard())
        .collect();
    shards.sort();
    assert_eq!(shards, vec![0, 1, 2], "each shard held exactly once");
    // Held leases are renewed: nobody changed hands in 5 s.
    for k in 0..3 {
        assert_eq!(leases.transitions(k), 1);
    }
    assert_never_two_holders(&log);
}

#[tokio::test(start_paused = true)]
async fn release_on_shutdown_hands_over_at_once() {
    let leases = MemoryLeases::new();
    let log = Log::default();
    let (a_cancel, a) = start(&leases, "a", 1, &log);
    settle().await;
    assert_eq!(a.borrow().shard(), Some(0));
    let (_b_cancel, b) = start(&leases, "b", 1, &log);
    settle().await;
    assert_eq!(b.borrow().shard(), None, "b is a standby");
    let t0 = Instant::now();
    a_cancel.cancel();
    let mut b2 = b.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        b2.wait_for(|o| o.shard() == Some(0)),
    )
    .await
    .expect("standby took over")
    .unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(50), "takeover took {took:?}");
    assert_eq!(*a.borrow(), Ownership::Standby);
    assert_never_two_holders(&log);
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_holder_steps_down_before_anyone_else_can_take_over() {
    let leases = MemoryLeases::new();
    let log = Log::default();
    let (_a_cancel, a) = start(&leases, "a", 1, &log);
    settle().await;
    let (_b_cancel, b) = start(&leases, "b", 1, &log);
    settle().await;
    let last_renew = Instant::now();
    leases.partition("a", true);
    let mut a2 = a.clone();
    a2.wait_for(|o| *o == Ownership::Standby).await.unwrap();
    let stepped_down = Instant::now();
    let mut b2 = b.clone();
    b2.wait_for(|o| o.shard() == Some(0)).await.unwrap();
    let taken = Instant::now();
    // a stepped down within its renew deadline; b only after the lease expired.
    assert!(stepped_down - last_renew <= Duration::from_millis(TIMING.renew_deadline_ms));
    assert!(
        taken > stepped_down + Duration::from_millis(500),
        "margin {:?}",
        taken - stepped_down
    );
    assert!(
        taken - last_renew
            <= Duration::from_millis(TIMING.duration_ms + TIMING.retry_period_ms + 10)
    );
    // Healed, a stays a standby: the shard is b's.
    leases.partition("a", false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(*a.borrow(), Ownership::Standby);
    assert_eq!(b.borrow().shard(), Some(0));
    assert_never_two_holders(&log);
}

/// A holder that dies (never renews again): the standby takes the shard
/// when the lease expires, not up to a retry period later.
#[tokio::test(start_paused = true)]
async fn a_standby_takes_a_dead_holders_shard_as_its_lease_expires() {
    let leases = MemoryLeases::new();
    let log = Log::default();
    let (_a_cancel, _a) = start(&leases, "a", 1, &log);
    settle().await;
    // The standby's retry ticks fall half a period after the holder's
    // renewals, so waiting for the next tick would show.
    tokio::time::sleep(Duration::from_millis(TIMING.retry_period_ms / 2)).await;
    let (_b_cancel, b) = start(&leases, "b", 1, &log);
    settle().await;
    tokio::time::sleep(Duration::from_millis(123)).await;
    leases.partition("a", true);
    // It renews no more: its lease ends here.
    let expiry = leases.next_expiry().expect("a's lease is held");
    let mut b2 = b.clone();
    b2.wait_for(|o| o.shard() == Some(0)).await.unwrap();
    let late = Instant::now().saturating_duration_since(expiry);
    assert!(
        Instant::now() >= expiry && late <= Duration::from_millis(10),
        "taken {late:?} after the lease expired (a retry period is {} ms)",
        TIMING.retry_period_ms
    );
    assert_never_two_holders(&log);
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_lost_its_lease_steps_down() {
    let leases = MemoryLeases::new();
    let log = Log::default();
    let (_a_cancel, a) = start(&leases, "a", 1, &log);
    settle().await;
    // Somebody else's release-and-acquire (e.g. an operator) takes the lease.
    let snap = leases.snapshot(1).await.unwrap();
    let token = snap[0].as_ref().unwrap().token;
    let held = pushcluster_lease::Held {
        raw: token.to_string(),
        record: snap[0].clone().unwrap(),
    };
    leases.release(&held).await.unwrap();
    let intruder = leases
        .try_acquire(0, &candidate("x"), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(intruder.is_some());
    let mut a2 = a.clone();
    tokio::time::timeout(
        Duration::from_millis(TIMING.retry_period_ms + 50),
        a2.wait_for(|o| *o == Ownership::Standby),
    )
    .await
    .expect("a noticed at its next renewal")
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_a_free_shard_when_one_appears() {
    let leases = MemoryLeases::new();
    let log = Log::default();
    let (c0, _) = start(&leases, "h0", 2, &log);
    let (_c1, _) = start(&leases, "h1", 2, &log);
    settle().await;
    let (_s, standby) = start(&leases, "standby", 2, &log);
    settle().await;
    assert_eq!(*standby.borrow(), Ownership::Standby);
    c0.cancel();
    let mut s2 = standby.clone();
    tokio::time::timeout(
        Duration::from_millis(50),
        s2.wait_for(|o| o.shard().is_some()),
    )
    .await
    .expect("standby serves the freed shard")
    .unwrap();
    assert_never_two_holders(&log);
}

#[test]
fn timing_must_leave_a_margin() {
    assert!(TIMING.validate().is_ok());
    let bad = LeaseTiming {
        duration_ms: 1000,
        renew_deadline_ms: 1000,
        retry_period_ms: 100,
    };
    assert!(bad.validate().is_err());
    let bad = LeaseTiming {
        duration_ms: 3000,
        renew_deadline_ms: 1000,
        retry_period_ms: 1000,
    };
    assert!(bad.validate().is_err());
}

#[tokio::test]
async fn a_release_between_reading_and_waiting_is_not_missed() {
    // A standby marks lease events seen, reads the leases (all held), and
    // only then waits. A release that lands in between must still wake it:
    // with a plain notification it was lost, and graceful takeovers waited a
    // whole retry period (seen in the S5 benchmark).
    let leases = MemoryLeases::new();
    let holder = leases.handle_for("a");
    let held = holder
        .try_acquire(0, &candidate("a"), Duration::from_secs(30))
        .await
        .unwrap()
        .expect("free lease");
    let standby = leases.handle_for("b");
    let mut changes = standby.changes();
    changes.borrow_and_update();
    assert!(standby.snapshot(1).await.unwrap()[0].is_some());
    holder.release(&held).await.unwrap();
    tokio::time::timeout(Duration::from_millis(100), changes.changed())
        .await
        .expect("the release before the wait is seen")
        .expect("backend alive");
    assert!(standby.snapshot(1).await.unwrap()[0].is_none());
}

/// Resharding without restarts: when the shard count grows, a standby takes
/// the new shard at once; when it shrinks, the holder of a removed shard
/// releases it and becomes a standby, and holders of the remaining shards
/// keep theirs.
#[tokio::test(start_paused = true)]
async fn the_shard_count_can_change_while_running() {
    let leases = MemoryLeases::new();
    let log = Log::default();
    let (count, shards) = watch::channel(2u32);
    let mut rxs = Vec::new();
    let mut cancels = Vec::new();
    for name in ["a", "b", "c"] {
        let (owner, rx) = ShardOwner::following(
            Arc::new(leases.handle_for(name)),
            candidate(name),
            shards.clone(),
            None,
            TIMING,
        );
        let (cancel, rx) = run_logged(owner, rx, name, &log);
        rxs.push(rx);
        cancels.push(cancel);
        settle().await;
    }
    let held = |rxs: &[watch::Receiver<Ownership>]| -> Vec<Option<u32>> {
        rxs.iter().map(|r| r.borrow().shard()).collect()
    };
    assert_eq!(held(&rxs), vec![Some(0), Some(1), None]);

    // 2 -> 3: the standby takes shard 2 without waiting a retry period.
    count.send_replace(3);
    settle().await;
    assert_eq!(held(&rxs), vec![Some(0), Some(1), Some(2)]);

    // 3 -> 2: shard 2's holder lets go; the others keep serving throughout.
    let transitions_before = log.lock().unwrap().len();
    count.send_replace(2);
    settle().await;
    assert_eq!(held(&rxs), vec![Some(0), Some(1), None]);
    let changes: Vec<String> = log.lock().unwrap()[transitions_before..]
        .iter()
        .map(|(_, n, o)| format!("{n}:{:?}", o.shard()))
        .collect();
    assert_eq!(
        changes,
        vec!["c:None"],
        "only the removed shard's holder changed"
    );
    // The released lease is free for anyone once the count grows again.
    count.send_replace(3);
    settle().await;
    assert_eq!(held(&rxs)[2], Some(2));
    assert_never_two_holders(&log);
    for c in cancels {
        c.cancel();
    }
}

/// The store as a second witness: one fence per shard, shared by every
/// candidate; a candidate in `cut` cannot reach it.
#[derive(Clone, Default, Debug)]
struct StoreWitness {
    fences: Arc<Mutex<std::collections::HashMap<u32, u64>>>,
    cut: Arc<Mutex<std::collections::HashSet<String>>>,
    who: String,
}

impl StoreWitness {
    fn for_(&self, who: &str) -> Arc<dyn Witness> {
        Arc::new(Self {
            who: who.into(),
            ..self.clone()
        })
    }
    fn cut(&self, who: &str, cut: bool) {
        let mut c = self.cut.lock().unwrap();
        if cut {
            c.insert(who.into());
        } else {
            c.remove(who);
        }
    }
}

impl Witness for StoreWitness {
    fn raise(
        &self,
        shard: u32,
        token: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<u64>, String>> + Send + '_>>
    {
        Box::pin(async move {
            if self.cut.lock().unwrap().contains(&self.who) {
                return Err(format!("{} cannot reach the store", self.who));
            }
            let mut f = self.fences.lock().unwrap();
            let fence = f.entry(shard).or_default();
            *fence = (*fence).max(token);
            Ok(Some(*fence))
        })
    }
}

fn start_witnessed(
    leases: &MemoryLeases,
    store: &StoreWitness,
    name: &str,
    log: &Log,
) -> (CancellationToken, watch::Receiver<Ownership>) {
    let (owner, rx) = ShardOwner::new(
        Arc::new(leases.handle_for(name)),
        candidate(name),
        1,
        None,
        TIMING,
    );
    run_logged(owner.with_witness(Some(store.for_(name))), rx, name, log)
}

/// The lease backend (the API server) stops answering everyone for 20 s,
/// far past the lease: the store knows no newer holder, so the holder keeps
/// serving and the standby, which cannot write a lease either, never does.
#[tokio::test(start_paused = true)]
async fn a_lease_backend_outage_for_everyone_cuts_no_holder_off() {
    let (leases, store, log) = (MemoryLeases::new(), StoreWitness::default(), Log::default());
    let (_a_cancel, a) = start_witnessed(&leases, &store, "a", &log);
    settle().await;
    let (_b_cancel, b) = start_witnessed(&leases, &store, "b", &log);
    settle().await;
    assert_eq!(a.borrow().shard(), Some(0));
    leases.partition("a", true);
    leases.partition("b", true);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(a.borrow().shard(), Some(0), "the holder stepped down");
        assert_eq!(b.borrow().shard(), None, "the standby served");
    }
    assert_never_two_holders(&log);
}

/// Only the holder is cut off from the lease backend: the standby takes the
/// lease once it expires and raises the fence before serving; the holder
/// sees the raise at its next check and steps down, within a retry period.
#[tokio::test(start_paused = true)]
async fn a_holder_cut_off_alone_steps_down_once_its_successor_raises_the_fence() {
    let (leases, store, log) = (MemoryLeases::new(), StoreWitness::default(), Log::default());
    let (_a_cancel, a) = start_witnessed(&leases, &store, "a", &log);
    settle().await;
    let (_b_cancel, b) = start_witnessed(&leases, &store, "b", &log);
    settle().await;
    let cut = Instant::now();
    leases.partition("a", true);
    let mut b2 = b.clone();
    b2.wait_for(|o| o.shard() == Some(0)).await.unwrap();
    let taken = Instant::now();
    let mut a2 = a.clone();
    a2.wait_for(|o| *o == Ownership::Standby).await.unwrap();
    let stepped_down = Instant::now();
    assert!(
        taken - cut <= Duration::from_millis(TIMING.duration_ms + TIMING.retry_period_ms + 10),
        "successor after {:?}",
        taken - cut
    );
    assert!(
        stepped_down.saturating_duration_since(taken)
            <= Duration::from_millis(TIMING.retry_period_ms + 10),
        "old holder stepped down {:?} after its successor served",
        stepped_down.saturating_duration_since(taken)
    );
    assert_eq!(
        store.fences.lock().unwrap()[&0],
        2,
        "the successor's token is in force"
    );
}

/// Cut off from the lease backend and the store: the holder steps down at
/// its renew deadline, before anyone else can take the lease, as without a
/// witness.
#[tokio::test(start_paused = true)]
async fn a_holder_cut_off_from_both_steps_down_at_the_renew_deadline() {
    let (leases, store, log) = (MemoryLeases::new(), StoreWitness::default(), Log::default());
    let (_a_cancel, a) = start_witnessed(&leases, &store, "a", &log);
    settle().await;
    let (_b_cancel, b) = start_witnessed(&leases, &store, "b", &log);
    settle().await;
    let cut = Instant::now();
    leases.partition("a", true);
    store.cut("a", true);
    let mut a2 = a.clone();
    a2.wait_for(|o| *o == Ownership::Standby).await.unwrap();
    let stepped_down = Instant::now();
    let mut b2 = b.clone();
    b2.wait_for(|o| o.shard() == Some(0)).await.unwrap();
    let taken = Instant::now();
    assert!(
        stepped_down - cut
            <= Duration::from_millis(TIMING.renew_deadline_ms + TIMING.retry_period_ms + 10),
        "stepped down after {:?}",
        stepped_down - cut
    );
    assert!(taken > stepped_down, "the successor served first");
    assert_never_two_holders(&log);
}
