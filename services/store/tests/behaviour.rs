//! One behaviour suite, run on every backend: Redis against a real
//! `redis-server` on a free port, embedded against a redb file in a temp dir.

use bytes::Bytes;
use pushcluster_store::embedded::EmbeddedStore;
use pushcluster_store::redis::RedisStore;
use pushcluster_store::testing::RedisServer;
use pushcluster_store::{AppendOpts, Channel, Fence, Page, Retention, Seq, Store, StoreError};

/// Deduplicated by `push_id` (none when empty) and fenced by `fence`.
fn fenced(push_id: &str, fence: Fence) -> AppendOpts<'_> {
    AppendOpts {
        fence: Some(fence),
        ..AppendOpts::dedupe(push_id)
    }
}
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn retention(max_backlog: usize) -> Retention {
    Retention {
        max_backlog,
        ..Retention::default()
    }
}

fn mids(v: &[pushcluster_store::Stored]) -> Vec<i64> {
    v.iter().map(|m| m.mid).collect()
}

async fn mids_are_contiguous_per_key_from_one<S: Store>(s: &S) {
    for i in 1..=5 {
        assert_eq!(
            s.append(Channel::Private("a"), b("{}"), HOUR)
                .await
                .unwrap(),
            i
        );
    }
    assert_eq!(
        s.append(Channel::Private("b"), b("{}"), HOUR)
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.sequence(Channel::Private("a")).await.unwrap().last, 5);
    assert_eq!(
        s.sequence(Channel::Private("nobody")).await.unwrap().last,
        0
    );
}

async fn public_channel_has_its_own_sequence<S: Store>(s: &S) {
    s.append(Channel::Private("p1"), b("1"), HOUR)
        .await
        .unwrap();
    s.append(Channel::Private("p1"), b("2"), HOUR)
        .await
        .unwrap();
    assert_eq!(
        s.append(Channel::Public, b("\"all\""), HOUR).await.unwrap(),
        1
    );
    let got = s.fetch(Channel::Public, 0, 100).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b("\"all\""));
    // A private key named like the public channel stays separate.
    assert_eq!(
        s.append(Channel::Private("all"), b("1"), HOUR)
            .await
            .unwrap(),
        1
    );
}

async fn fetch_returns_what_follows_a_mid_in_order<S: Store>(s: &S) {
    for i in 1..=10 {
        let body = format!(r#"{{"n":{i}, "s":"a b"}}"#);
        s.append(Channel::Private("f"), b(&body), HOUR)
            .await
            .unwrap();
    }
    let all = s.fetch(Channel::Private("f"), 0, 100).await.unwrap();
    assert_eq!(mids(&all), (1..=10).collect::<Vec<_>>());
    assert_eq!(all[2].payload, b(r#"{"n":3, "s":"a b"}"#));
    let tail = s.fetch(Channel::Private("f"), 7, 100).await.unwrap();
    assert_eq!(mids(&tail), vec![8, 9, 10]);
    let page = s.fetch(Channel::Private("f"), 2, 3).await.unwrap();
    assert_eq!(mids(&page), vec![3, 4, 5]);
    assert!(s
        .fetch(Channel::Private("f"), 10, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .fetch(Channel::Private("f"), 99, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .fetch(Channel::Private("none"), 0, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.fetch(Channel::Private("f"), -5, 100).await.unwrap().len(),
        10
    );
}

async fn messages_expire_one_by_one<S: Store>(s: &S) {
    let short = Duration::from_millis(300);
    s.append(Channel::Private("e"), b("1"), short)
        .await
        .unwrap();
    s.append(Channel::Private("e"), b("2"), HOUR).await.unwrap();
    s.append(Channel::Private("e"), b("3"), short)
        .await
        .unwrap();
    assert_eq!(
        s.fetch(Channel::Private("e"), 0, 100).await.unwrap().len(),
        3
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = s.fetch(Channel::Private("e"), 0, 100).await.unwrap();
    assert_eq!(mids(&left), vec![2]);
    // Expiry never reuses an id.
    assert_eq!(
        s.append(Channel::Private("e"), b("4"), HOUR).await.unwrap(),
        4
    );
}

async fn backlog_is_bounded_oldest_first<S: Store>(s: &S) {
    // The store was opened with max_backlog = 50.
    for _ in 0..60 {
        s.append(Channel::Private("big"), b("{}"), HOUR)
            .await
            .unwrap();
    }
    let got = s.fetch(Channel::Private("big"), 0, 1000).await.unwrap();
    assert_eq!(got.len(), 50);
    assert_eq!(got[0].mid, 11);
    assert_eq!(got[49].mid, 60);
    let tail = s.fetch(Channel::Private("big"), 55, 1000).await.unwrap();
    assert_eq!(mids(&tail), vec![56, 57, 58, 59, 60]);
}

async fn pages_are_bounded_by_bytes_and_say_whether_more_follow<S: Store>(s: &S) {
    for i in 1..=5 {
        let payload = Bytes::from(vec![b'a' + i as u8; 10]);
        s.append(Channel::Private("pg"), payload, HOUR)
            .await
            .unwrap();
    }
    let page = |messages, bytes| Page { messages, bytes };
    let got = s
        .fetch_page(Channel::Private("pg"), 0, page(100, 25))
        .await
        .unwrap();
    assert_eq!((mids(&got.messages), got.more), (vec![1, 2], true));
    let got = s
        .fetch_page(Channel::Private("pg"), 2, page(2, 1000))
        .await
        .unwrap();
    assert_eq!((mids(&got.messages), got.more), (vec![3, 4], true));
    let got = s
        .fetch_page(Channel::Private("pg"), 3, page(100, 20))
        .await
        .unwrap();
    assert_eq!((mids(&got.messages), got.more), (vec![4, 5], false));
    // One message over the budget still comes, alone.
    let got = s
        .fetch_page(Channel::Private("pg"), 0, page(100, 3))
        .await
        .unwrap();
    assert_eq!((mids(&got.messages), got.more), (vec![1], true));
    assert_eq!(got.messages[0].payload.as_ref(), &[b'b'; 10]);
}

/// How a backend fences: one fence per shard, or (a Redis Cluster, where
/// a script reaches one slot) a copy per key that each holder's appends
/// raise, so an older holder is refused on the keys its successor wrote.
#[derive(Clone, Copy, PartialEq)]
enum Fences {
    PerShard,
    PerKey,
}

async fn a_raised_fence_only_goes_up_and_refuses_older_writers<S: Store>(s: &S, fences: Fences) {
    let f = |token| Fence { shard: 3, token };
    assert_eq!(s.raise_fence(f(5)).await.unwrap(), 5);
    assert_eq!(
        s.raise_fence(f(4)).await.unwrap(),
        5,
        "a lower token is no raise"
    );
    if fences == Fences::PerKey {
        // The successor's first append raises the key's copy.
        let opts = AppendOpts {
            fence: Some(f(5)),
            ..AppendOpts::default()
        };
        s.append_with(Channel::Private("fenced"), b("new"), HOUR, opts)
            .await
            .unwrap();
        // A key moved to another shard by a reshard answers to that shard.
        let moved = AppendOpts {
            fence: Some(Fence { shard: 9, token: 1 }),
            ..AppendOpts::default()
        };
        s.append_with(Channel::Private("fenced"), b("moved"), HOUR, moved)
            .await
            .unwrap();
        let back = AppendOpts {
            fence: Some(f(5)),
            ..AppendOpts::default()
        };
        s.append_with(Channel::Private("fenced"), b("back"), HOUR, back)
            .await
            .unwrap();
    }
    let older = s
        .append_with(
            Channel::Private("fenced"),
            b("x"),
            HOUR,
            AppendOpts {
                fence: Some(f(4)),
                ..AppendOpts::default()
            },
        )
        .await;
    assert!(
        matches!(older, Err(StoreError::Fenced { current: 5, .. })),
        "{older:?}"
    );
    assert_eq!(s.raise_fence(f(6)).await.unwrap(), 6);
    assert_eq!(
        s.raise_fence(Fence { shard: 4, token: 1 }).await.unwrap(),
        1,
        "per shard"
    );
}

async fn delete_removes_messages_and_keeps_the_sequence<S: Store>(s: &S) {
    s.append(Channel::Private("d"), b("1"), HOUR).await.unwrap();
    s.append(Channel::Private("d"), b("2"), HOUR).await.unwrap();
    s.append(Channel::Private("other"), b("1"), HOUR)
        .await
        .unwrap();
    s.delete("d").await.unwrap();
    assert!(s
        .fetch(Channel::Private("d"), 0, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.fetch(Channel::Private("other"), 0, 100)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.append(Channel::Private("d"), b("3"), HOUR).await.unwrap(),
        3
    );
    s.delete("never-written").await.unwrap();
}

async fn concurrent_appends_get_unique_contiguous_mids<S: Store>(s: Arc<S>) {
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..25 {
                let body = format!("[{t},{i}]");
                got.push(
                    s.append(Channel::Private("race"), b(&body), HOUR)
                        .await
                        .unwrap(),
                );
            }
            got
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        for m in t.await.unwrap() {
            assert!(all.insert(m), "mid {m} given twice");
        }
    }
    assert_eq!(all, (1..=200).collect::<BTreeSet<i64>>());
    let stored = s.fetch(Channel::Private("race"), 0, 1000).await.unwrap();
    assert_eq!(stored.len(), 200);
    assert!(stored.windows(2).all(|w| w[1].mid == w[0].mid + 1));
}

async fn idempotent_appends_store_once<S: Store>(s: &S) {
    // The first attempt skips the lookup of its new id but records it.
    let first = s
        .append_with(
            Channel::Private("i"),
            b("1"),
            HOUR,
            AppendOpts::dedupe("push-1").first_use(true),
        )
        .await
        .unwrap();
    // The same push retried (after a broken connection) stores nothing new.
    let again = s
        .append_with(
            Channel::Private("i"),
            b("1"),
            HOUR,
            AppendOpts::dedupe("push-1"),
        )
        .await
        .unwrap();
    assert_eq!((first, again), (1, 1));
    assert_eq!(
        s.append_with(
            Channel::Private("i"),
            b("2"),
            HOUR,
            AppendOpts::dedupe("push-2")
        )
        .await
        .unwrap(),
        2
    );
    // Ids are per channel: a multi-push uses one id for many keys.
    assert_eq!(
        s.append_with(
            Channel::Private("j"),
            b("1"),
            HOUR,
            AppendOpts::dedupe("push-1")
        )
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        s.append(Channel::Private("i"), b("3"), HOUR).await.unwrap(),
        3
    );
    let stored = s.fetch(Channel::Private("i"), 0, 10).await.unwrap();
    assert_eq!(mids(&stored), vec![1, 2, 3]);
    // Concurrent retries of one push: one message.
    let (a, b2) = tokio::join!(
        s.append_with(
            Channel::Private("k"),
            b("x"),
            HOUR,
            AppendOpts::dedupe("dup")
        ),
        s.append_with(
            Channel::Private("k"),
            b("x"),
            HOUR,
            AppendOpts::dedupe("dup")
        )
    );
    assert_eq!(a.unwrap(), b2.unwrap());
    assert_eq!(s.sequence(Channel::Private("k")).await.unwrap().last, 1);
}

async fn an_older_fence_is_refused_and_stores_nothing<S: Store>(s: &S) {
    let f = |shard, token| Fence { shard, token };
    let ch = Channel::Private("fenced");
    // Holder with token 5 writes; its successor (token 6) takes over.
    assert_eq!(
        s.append_with(ch, b("a"), HOUR, fenced("", f(0, 5)))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.append_with(ch, b("b"), HOUR, fenced("", f(0, 6)))
            .await
            .unwrap(),
        2
    );
    // The old holder wakes: refused, with the token in force.
    match s
        .append_with(ch, b("stale"), HOUR, fenced("p-old", f(0, 5)))
        .await
    {
        Err(StoreError::Fenced {
            shard: 0,
            token: 5,
            current: 6,
        }) => {}
        other => panic!("stale append not fenced: {other:?}"),
    }
    // Its refused push id was not recorded: the retry through the successor
    // (or web) stores it once.
    assert_eq!(
        s.append_with(ch, b("stale"), HOUR, fenced("p-old", f(0, 6)))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        s.append_with(ch, b("stale"), HOUR, fenced("p-old", f(0, 6)))
            .await
            .unwrap(),
        3
    );
    // Fences are per shard; unfenced appends (web's direct stores) pass.
    assert_eq!(
        s.append_with(Channel::Private("other"), b("x"), HOUR, fenced("", f(1, 1)))
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.append(ch, b("direct"), HOUR).await.unwrap(), 4);
    // Tokens beyond 2^53 compare exactly (Redis compares them as strings).
    let big = (1u64 << 60) + 1;
    assert_eq!(
        s.append_with(ch, b("c"), HOUR, fenced("", f(2, big)))
            .await
            .unwrap(),
        5
    );
    assert!(matches!(
        s.append_with(ch, b("d"), HOUR, fenced("", f(2, big - 1)))
            .await,
        Err(StoreError::Fenced { .. })
    ));
    let stored = s.fetch(ch, 0, 10).await.unwrap();
    assert_eq!(mids(&stored), vec![1, 2, 3, 4, 5]);
    assert!(!stored.iter().any(|m| m.payload.as_ref() == b"d"));
}

/// Runs every case, each on a fresh store from `make(max_backlog)`.
async fn run_suite<S: Store, F: std::future::Future<Output = S>>(
    fences: Fences,
    make: impl Fn(usize) -> F,
) {
    mids_are_contiguous_per_key_from_one(&make(1000).await).await;
    public_channel_has_its_own_sequence(&make(1000).await).await;
    fetch_returns_what_follows_a_mid_in_order(&make(1000).await).await;
    messages_expire_one_by_one(&make(1000).await).await;
    backlog_is_bounded_oldest_first(&make(50).await).await;
    pages_are_bounded_by_bytes_and_say_whether_more_follow(&make(50).await).await;
    a_raised_fence_only_goes_up_and_refuses_older_writers(&make(50).await, fences).await;
    delete_removes_messages_and_keeps_the_sequence(&make(1000).await).await;
    concurrent_appends_get_unique_contiguous_mids(Arc::new(make(1000).await)).await;
    idempotent_appends_store_once(&make(1000).await).await;
    an_older_fence_is_refused_and_stores_nothing(&make(1000).await).await;
    a_sequence_keeps_its_epoch_and_pages_carry_it(&make(1000).await).await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn a_sequence_keeps_its_epoch_and_pages_carry_it<S: Store>(s: &S) {
    let ch = Channel::Private("e");
    assert_eq!(s.sequence(ch).await.unwrap(), Seq::default());
    let before = now_ms();
    s.append(ch, b("1"), HOUR).await.unwrap();
    let after = now_ms();
    let first = s.sequence(ch).await.unwrap();
    assert_eq!(first.last, 1);
    assert!(
        (before..=after).contains(&first.epoch),
        "epoch {} is not when the sequence started ({before}..={after})",
        first.epoch
    );
    tokio::time::sleep(Duration::from_millis(3)).await;
    s.append(ch, b("2"), HOUR).await.unwrap();
    s.append(ch, b("3"), HOUR).await.unwrap();
    s.delete("e").await.unwrap();
    let now = s.sequence(ch).await.unwrap();
    assert_eq!(
        now,
        Seq { last: 3, ..first },
        "appends and delete keep the epoch"
    );
    let page = Page {
        messages: 1,
        bytes: 1 << 20,
    };
    assert_eq!(s.fetch_page(ch, 0, page).await.unwrap().seq, now);
    assert_eq!(s.fetch_page(ch, 9, page).await.unwrap().seq, now);
    assert_eq!(
        s.fetch_page(Channel::Private("none"), 0, page)
            .await
            .unwrap()
            .seq,
        Seq::default()
    );
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn next_id() -> usize {
    NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    run_suite(Fences::PerShard, |backlog| {
        let path = root.join(format!("db{}.redb", next_id()));
        async move { EmbeddedStore::open(&path, retention(backlog)).unwrap() }
    })
    .await;
}

/// The suite on the Redis at `url`, each case under its own key
/// namespace, appends waiting for `durability`.
async fn redis_suite(url: String, fences: Fences, durability: pushcluster_redis::Durability) {
    run_suite(fences, |backlog| {
        let url = url.clone();
        async move {
            let ns = format!("t{}", next_id());
            RedisStore::connect(&url, &ns, retention(backlog))
                .await
                .unwrap()
                .durability(durability)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_passes_the_suite() {
    let server = RedisServer::start();
    redis_suite(server.url(), Fences::PerShard, Default::default()).await;
}

/// The same suite on a Redis Cluster (3 masters, a replica each), every
/// append waiting for its replica: scripts stay in one slot, reads across
/// slots go one pipeline per slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_backend_passes_the_suite() {
    let cluster = pushcluster_store::testing::RedisClusterServers::start(3);
    let wait = pushcluster_redis::Durability {
        replicas: 1,
        timeout_ms: 2000,
    };
    redis_suite(cluster.url(), Fences::PerKey, wait).await;
}

/// The same suite on a master with two replicas behind three Sentinels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_backend_passes_the_suite() {
    let group = pushcluster_store::testing::RedisSentinels::start(2);
    redis_suite(group.url(), Fences::PerShard, Default::default()).await;
}

/// A Redis, a store on it under `ns`, and a plain connection to look at
/// its keys with.
async fn store_and_raw_conn(ns: &str) -> (RedisServer, RedisStore, redis::Connection) {
    let server = RedisServer::start();
    let s = RedisStore::connect(&server.url(), ns, retention(100))
        .await
        .unwrap();
    let raw = server.conn();
    (server, s, raw)
}

/// A key's remaining life in ms (-2: no such key, -1: no expiry).
fn pttl_of(raw: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(raw).unwrap()
}

/// A key's message list lives as long as its newest message and at most a
/// quarter of that longer (an hour at most), so that the pushes to a busy
/// key in that time leave its expiry alone: a message of 60 s gives the
/// list 75 s; later ones within the quarter do not extend it, a longer one
/// does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_list_outlives_its_newest_message_by_at_most_a_quarter() {
    let (_server, s, mut raw) = store_and_raw_conn("life").await;
    let pttl = |raw: &mut redis::Connection| pttl_of(raw, "life:k:{k}:m");
    let minute = Duration::from_secs(60);
    s.append(Channel::Private("k"), b("1"), minute)
        .await
        .unwrap();
    let first = pttl(&mut raw);
    assert!((70_000..=75_000).contains(&first), "list lives {first} ms");
    s.append(Channel::Private("k"), b("2"), minute)
        .await
        .unwrap();
    assert!(
        pttl(&mut raw) <= first,
        "a second minute-long message moved the expiry"
    );
    s.append(Channel::Private("k"), b("3"), HOUR).await.unwrap();
    let long = pttl(&mut raw);
    assert!(
        (4_400_000..=4_500_000).contains(&long),
        "an hour-long message: the list lives {long} ms"
    );
    assert_eq!(
        s.fetch(Channel::Private("k"), 0, 10).await.unwrap().len(),
        3
    );
}

/// A key's sequence and its epoch live `idle_ttl` and up to a quarter more
/// after an append, renewed together (once per eighth of `idle_ttl`), not
/// on every append; a sequence an older release wrote (its expiry exactly
/// `idle_ttl`, and from before epochs, none) is renewed and gets its epoch
/// at its next append here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_and_its_epoch_are_renewed_together_not_on_every_append() {
    let (_server, s, mut raw) = store_and_raw_conn("idle").await;
    let (seq, epoch) = ("idle:k:{k}:s", "idle:k:{k}:e");
    let idle = Retention::default().idle_ttl_seconds as i64 * 1000;
    let renewed = idle + idle / 4;
    let close = |got: i64| (renewed - 10_000..=renewed).contains(&got);
    assert_eq!(
        s.append(Channel::Private("k"), b("1"), HOUR).await.unwrap(),
        1
    );
    let first = pttl_of(&mut raw, seq);
    assert!(close(first), "a new sequence lives {first} ms");
    assert!(close(pttl_of(&mut raw, epoch)), "its epoch lives as long");
    assert_eq!(
        s.append(Channel::Private("k"), b("2"), HOUR).await.unwrap(),
        2
    );
    assert!(
        pttl_of(&mut raw, seq) <= first,
        "renewed on the second append"
    );

    // As a writer of an earlier release left it: idle_ttl, and no epoch.
    let _: () = redis::pipe()
        .cmd("PEXPIRE")
        .arg(seq)
        .arg(idle)
        .cmd("DEL")
        .arg(epoch)
        .query(&mut raw)
        .unwrap();
    assert_eq!(
        s.append(Channel::Private("k"), b("3"), HOUR).await.unwrap(),
        3
    );
    assert!(
        close(pttl_of(&mut raw, seq)),
        "renewed after an older writer"
    );
    assert!(
        close(pttl_of(&mut raw, epoch)),
        "the older sequence got its epoch"
    );
}

/// A lazily connected store is made while Redis is down; its appends fail
/// (nothing hangs) until Redis is up, then succeed on the same store.
/// 1,000 messages of 60 KiB on one key (60 MB of backlog) read in 2 MiB
/// pages: every page arrives, none of them takes the store near the
/// connection's 500 ms command timeout, and no message is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_is_read_page_by_page() {
    let server = RedisServer::start();
    let s = RedisStore::connect(&server.url(), "big", retention(1000))
        .await
        .unwrap();
    let payload = Bytes::from(vec![b'x'; 60 << 10]);
    for _ in 0..1000 {
        s.append(Channel::Private("k"), payload.clone(), HOUR)
            .await
            .unwrap();
    }
    let (mut after, mut pages, mut slowest) = (0, 0, Duration::ZERO);
    loop {
        let started = std::time::Instant::now();
        let got = s
            .fetch_page(
                Channel::Private("k"),
                after,
                Page {
                    messages: 1000,
                    bytes: 2 << 20,
                },
            )
            .await
            .expect("a page of a large backlog");
        slowest = slowest.max(started.elapsed());
        pages += 1;
        assert!(
            got.messages.len() <= 34,
            "{} in one page",
            got.messages.len()
        );
        assert_eq!(got.messages.first().map(|m| m.mid), Some(after + 1));
        after = got.messages.last().unwrap().mid;
        if !got.more {
            break;
        }
    }
    assert_eq!(after, 1000);
    eprintln!("1000 x 60 KiB: {pages} pages, slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "slowest page {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_redis_store_works_once_redis_comes_up() {
    let port = pushcluster_store::testing::free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let s = RedisStore::connect_lazy(&url, "lazy", Retention::default()).expect("lazy store");
    let down = tokio::time::timeout(
        Duration::from_secs(30),
        s.append(Channel::Private("k"), b("1"), HOUR),
    )
    .await
    .expect("an append to a Redis that is down hung");
    assert!(down.is_err(), "stored without a Redis: {down:?}");
    let _server = RedisServer::start_on(port);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mid = loop {
        match s.append(Channel::Private("k"), b("1"), HOUR).await {
            Ok(mid) => break mid,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no append once Redis was up: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(mid, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    {
        let s = EmbeddedStore::open(&path, Retention::default()).unwrap();
        s.append(Channel::Private("k"), b("1"), HOUR).await.unwrap();
        s.append(Channel::Private("k"), b("2"), HOUR).await.unwrap();
        s.append(Channel::Public, b("3"), HOUR).await.unwrap();
    }
    // The writer thread lets go of the file once its queue closes.
    let mut tries = 0;
    let s = loop {
        match EmbeddedStore::open(&path, Retention::default()) {
            Ok(s) => break s,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot reopen: {e}"),
        }
    };
    assert_eq!(
        s.fetch(Channel::Private("k"), 0, 10).await.unwrap().len(),
        2
    );
    assert_eq!(
        s.append(Channel::Private("k"), b("4"), HOUR).await.unwrap(),
        3
    );
    assert_eq!(s.sequence(Channel::Public).await.unwrap().last, 1);
}

/// A sweep pass forgets a sequence left idle past `idle_ttl` (its next
/// append starts again at 1 under a new epoch) and leaves one still in use;
/// a pass over more entries than one step looks at goes step by step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_sweep_forgets_idle_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        idle_ttl_seconds: 1,
        ..Retention::default()
    };
    let s = Arc::new(EmbeddedStore::open(&dir.path().join("db.redb"), retention).unwrap());
    for _ in 0..2 {
        s.append(Channel::Private("idle"), b("{}"), HOUR)
            .await
            .unwrap();
    }
    let epoch = s.sequence(Channel::Private("idle")).await.unwrap().epoch;
    // Concurrent, so the writer groups them: one fsync per batch.
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..3000 {
        let s = s.clone();
        appends.spawn(async move {
            s.append(
                Channel::Private(&format!("k{i}")),
                b("{}"),
                Duration::from_millis(1),
            )
            .await
        });
    }
    while let Some(r) = appends.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 1);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.append(Channel::Private("busy"), b("{}"), HOUR)
        .await
        .unwrap();
    s.sweep().await.unwrap();
    assert_eq!(s.sequence(Channel::Private("idle")).await.unwrap().last, 0);
    assert_eq!(s.sequence(Channel::Private("k2999")).await.unwrap().last, 0);
    assert_eq!(s.sequence(Channel::Private("busy")).await.unwrap().last, 1);
    assert_eq!(
        s.append(Channel::Private("idle"), b("{}"), HOUR)
            .await
            .unwrap(),
        1
    );
    assert!(s.sequence(Channel::Private("idle")).await.unwrap().epoch > epoch);
    assert_eq!(
        s.append(Channel::Private("busy"), b("{}"), HOUR)
            .await
            .unwrap(),
        2
    );
}

/// A newly stored private message is published on its key's live channel,
/// in mid order; a retried push id, a fenced-off append and a broadcast are
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_private_messages_are_published_on_their_live_channel() {
    use futures::StreamExt;
    use pushcluster_store::redis::live;
    let server = RedisServer::start();
    let s = RedisStore::connect(&server.url(), "pub", Retention::default())
        .await
        .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let (mut sink, mut stream) = client.get_async_pubsub().await.unwrap().split();
    sink.subscribe(live::channel("pub", "k")).await.unwrap();
    // The unsigned twin's channel of releases before 2026-12-06: no more.
    sink.subscribe("pub:k:{k}:live").await.unwrap();

    assert_eq!(
        s.append(Channel::Private("k"), b("{\"n\":1}"), HOUR)
            .await
            .unwrap(),
        1
    );
    let id = "retried";
    assert_eq!(
        s.append_with(Channel::Private("k"), b("2"), HOUR, AppendOpts::dedupe(id))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        s.append_with(Channel::Private("k"), b("2"), HOUR, AppendOpts::dedupe(id))
            .await
            .unwrap(),
        2
    );
    let fence = pushcluster_store::Fence { shard: 0, token: 5 };
    s.append_with(Channel::Private("k"), b("3"), HOUR, fenced("", fence))
        .await
        .unwrap();
    let stale = pushcluster_store::Fence { shard: 0, token: 4 };
    assert!(s
        .append_with(Channel::Private("k"), b("x"), HOUR, fenced("", stale))
        .await
        .is_err());
    s.append(Channel::Public, b("public"), HOUR).await.unwrap();
    s.append(Channel::Private("other"), b("other"), HOUR)
        .await
        .unwrap();
    s.append(Channel::Private("k"), b("4"), HOUR).await.unwrap();

    let mut got = Vec::new();
    while got.len() < 4 {
        let m = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a published message")
            .expect("the subscription is open");
        assert_eq!(live::key_of("pub", m.get_channel_name()), Some("k"));
        let m = live::decode(m.get_payload_bytes()).expect("mid and payload");
        assert_eq!(m.signature, None, "signed without a key");
        got.push((m.mid, String::from_utf8(m.payload.to_vec()).unwrap()));
    }
    let want: Vec<(i64, String)> = [(1, "{\"n\":1}"), (2, "2"), (3, "3"), (4, "4")]
        .into_iter()
        .map(|(m, p)| (m, p.to_owned()))
        .collect();
    assert_eq!(got, want);
    let extra = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(extra.is_err(), "published more than once: {extra:?}");
}

/// A store given a live key signs what it publishes as the comets check it:
/// the signature the script computes verifies, for its channel and mid only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_are_signed_as_comets_verify_them() {
    use futures::StreamExt;
    use pushcluster_store::redis::live::{self, LiveKey};
    let server = RedisServer::start();
    let key = LiveKey::derive("the cluster's secret");
    let s = RedisStore::connect(&server.url(), "sig", Retention::default())
        .await
        .unwrap()
        .signing(Some(key.clone()));
    let client = redis::Client::open(server.url()).unwrap();
    let (mut sink, mut stream) = client.get_async_pubsub().await.unwrap().split();
    let channel = live::channel("sig", "k");
    sink.subscribe(&channel).await.unwrap();
    // The unsigned twin's channel of releases before 2026-12-06: no more.
    sink.subscribe("sig:k:{k}:live").await.unwrap();
    for payload in ["{\"n\":1}", "\"s 2\"", "[3, \"ü\"]"] {
        s.append(Channel::Private("k"), b(payload), HOUR)
            .await
            .unwrap();
    }
    for want in 1..=3 {
        let raw = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a published message")
            .expect("the subscription is open");
        let m = live::decode(raw.get_payload_bytes()).expect("decodes");
        assert_eq!(m.mid, want);
        assert!(m.signature.is_some(), "unsigned: {m:?}");
        assert!(
            key.verify(&channel, &m),
            "the script's signature fails: {m:?}"
        );
        assert!(
            !key.verify(&live::channel("sig", "other"), &m),
            "holds on another key"
        );
        let moved = live::Live {
            mid: m.mid + 1,
            ..m.clone()
        };
        assert!(!key.verify(&channel, &moved), "holds for another mid");
        let changed = live::Live {
            payload: bytes::Bytes::from_static(b"{\"forged\":1}"),
            ..m.clone()
        };
        assert!(!key.verify(&channel, &changed), "holds for another payload");
        assert!(
            !LiveKey::derive("a guess").verify(&channel, &m),
            "holds for another secret"
        );
    }
    let extra = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(extra.is_err(), "published more than once: {extra:?}");
}

/// A store that waits for a replica publishes a message only once the
/// replica confirmed it: an append the replica does not confirm (stopped)
/// fails and publishes nothing; its retry under the same push id, once the
/// replica is back, publishes what was stored, signed as the script signs,
/// and nothing else; a later push follows as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_replicas_publishes_only_what_they_confirmed() {
    use futures::StreamExt;
    use pushcluster_store::redis::live::{self, LiveKey};
    const WAIT_ONE: pushcluster_redis::Durability = pushcluster_redis::Durability {
        replicas: 1,
        timeout_ms: 300,
    };
    let master = RedisServer::start();
    let port = pushcluster_store::testing::free_port();
    let replica = RedisServer::spawn_with(
        port,
        vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port().to_string(),
        ],
    );
    let key = LiveKey::derive("secret");
    let s = RedisStore::connect(&master.url(), "late", Retention::default())
        .await
        .unwrap()
        .signing(Some(key.clone()))
        .durability(WAIT_ONE);
    // The replica has synced once a write reaches it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s
        .append(Channel::Private("warm"), b("0"), HOUR)
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = redis::Client::open(master.url()).unwrap();
    let (mut sink, mut stream) = client.get_async_pubsub().await.unwrap().split();
    let channel = live::channel("late", "k");
    sink.subscribe(&channel).await.unwrap();
    // The unsigned twin's channel of releases before 2026-12-06: no more.
    sink.subscribe("late:k:{k}:live").await.unwrap();

    replica.signal("STOP");
    let unconfirmed = s
        .append_with(
            Channel::Private("k"),
            b("{\"n\":1}"),
            HOUR,
            AppendOpts::dedupe("p1"),
        )
        .await;
    // The retry may come on another connection (another web, a reconnect),
    // where a bare WAIT would have nothing to wait for and confirm at once.
    let elsewhere = RedisStore::connect(&master.url(), "late", Retention::default())
        .await
        .unwrap()
        .durability(WAIT_ONE)
        .append_with(
            Channel::Private("k"),
            b("{\"n\":1}"),
            HOUR,
            AppendOpts::dedupe("p1"),
        )
        .await;
    let quiet = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    replica.signal("CONT");
    assert!(
        elsewhere.is_err(),
        "a retry on another connection was confirmed without the replica: {elsewhere:?}"
    );
    let e = unconfirmed.expect_err("acknowledged without its replica");
    assert!(e.is_transient(), "a retry would not follow: {e}");
    assert!(
        quiet.is_err(),
        "published before the replica had it: {quiet:?}"
    );

    let retried = s
        .append_with(
            Channel::Private("k"),
            b("{\"n\":1}"),
            HOUR,
            AppendOpts::dedupe("p1"),
        )
        .await
        .expect("the retry, once the replica is back");
    assert_eq!(retried, 1);
    s.append(Channel::Private("k"), b("{\"n\":2}"), HOUR)
        .await
        .unwrap();
    for want in [1, 2] {
        let raw = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a published message")
            .expect("the subscription is open");
        assert_eq!(live::key_of("late", raw.get_channel_name()), Some("k"));
        let signed = live::decode(raw.get_payload_bytes()).expect("decodes");
        assert_eq!(signed.mid, want);
        assert_eq!(&signed.payload[..], format!("{{\"n\":{want}}}").as_bytes());
        assert!(key.verify(&channel, &signed), "signature fails: {signed:?}");
    }
    let extra = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(extra.is_err(), "published more than once: {extra:?}");
}

/// Redis lost a sequence (a restart without persistence, here FLUSHALL):
/// it starts again at 1 under a new epoch. A sequence written before epochs
/// existed has none until its next append, which gives it one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_sequence_starts_again_under_a_new_epoch() {
    let server = RedisServer::start();
    let s = RedisStore::connect(&server.url(), "ep", Retention::default())
        .await
        .unwrap();
    let ch = Channel::Private("k");
    for _ in 0..5 {
        s.append(ch, b("{}"), HOUR).await.unwrap();
    }
    let old = s.sequence(ch).await.unwrap();
    assert_eq!(old.last, 5);
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    for _ in 0..7 {
        s.append(ch, b("{}"), HOUR).await.unwrap();
    }
    let new = s.sequence(ch).await.unwrap();
    assert_eq!(new.last, 7);
    assert_ne!(new.epoch, old.epoch, "a restarted sequence kept its epoch");
    assert!(new.restarted_since(5, old.epoch), "mid 5 of the old epoch");
    assert!(!new.restarted_since(5, new.epoch));
    assert!(
        !new.restarted_since(5, 0),
        "without an epoch, mid 5 looks current"
    );
    assert_eq!(
        s.sequences(&["k", "none"]).await.unwrap(),
        [new, Seq::default()]
    );

    // As an older release left it: a sequence without an epoch.
    redis::cmd("SET")
        .arg("ep:k:{legacy}:s")
        .arg(4)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let legacy = Channel::Private("legacy");
    assert_eq!(s.sequence(legacy).await.unwrap(), Seq { last: 4, epoch: 0 });
    assert_eq!(s.append(legacy, b("{}"), HOUR).await.unwrap(), 5);
    let got = s.sequence(legacy).await.unwrap();
    assert_eq!(got.last, 5);
    assert!(got.epoch > 0, "no epoch after an append: {got:?}");
}
