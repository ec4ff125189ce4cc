//! Redis faults as a platform team sees them, on real `redis-server`
//! processes: a restart, a half-open connection (a proxy the test freezes),
//! a forged PUBLISH, a large backlog. Followers on WebSocket, TCP and SSE
//! and pushes at 50/s throughout; each test prints its figures.

use pushcluster_client::http::{Client, Proto};
use pushcluster_client::{Frame, Message};
use pushcluster_store::redis::live::LiveKey;
use pushcluster_systest::proxy::FreezableProxy;
use pushcluster_systest::{
    collect, comets_metric, free_port, subscribe, until, Cluster, Followers, Options, RedisServer,
    Transport,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PROTOS: [Proto; 3] = [Proto::WebSocket, Proto::Tcp, Proto::Sse];

/// Followers on every transport, two keys each, and a pusher at ~50/s
/// over all keys that keeps what was acknowledged (and counts refusals).
struct Traffic {
    keys: Vec<String>,
    followers: Vec<Followers>,
    stop: Arc<AtomicBool>,
    pusher: tokio::task::JoinHandle<(BTreeMap<String, Vec<i64>>, usize)>,
}

impl Traffic {
    async fn start(api: &Client, prefix: &str) -> Self {
        let mut keys = Vec::new();
        let mut followers = Vec::new();
        for p in PROTOS {
            let ks: Vec<String> = (0..2).map(|i| format!("{prefix}-{p:?}-{i}")).collect();
            followers.push(Followers::start(api, &ks, p));
            keys.extend(ks);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let pusher = {
            let (api, keys, stop) = (api.clone(), keys.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked: BTreeMap<String, Vec<i64>> = BTreeMap::new();
                let mut refused = 0;
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    for k in &keys {
                        n += 1;
                        match api.push(k, &format!(r#"{{"n":{n}}}"#), Some(600)).await {
                            Ok(mid) => acked.entry(k.clone()).or_default().push(mid),
                            Err(_) => refused += 1,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (acked, refused)
            })
        };
        Self {
            keys,
            followers,
            stop,
            pusher,
        }
    }

    /// Stops pushing; checks that every follower received exactly what was
    /// acknowledged, in order, without gaps; says what it cost.
    async fn finish(self, api: &Client, c: &Cluster) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let (mut acked, refused) = self.pusher.await.expect("pusher");
        let mut last = BTreeMap::new();
        for k in &self.keys {
            let mid = api
                .push(k, r#"{"last":true}"#, Some(600))
                .await
                .expect("last push");
            acked.entry(k.clone()).or_default().push(mid);
            last.insert(k.clone(), mid);
        }
        let mut out = Outcome {
            refused,
            ..Outcome::default()
        };
        for f in self.followers {
            for (k, seen) in f.finish(&last, c).await {
                assert!(seen.gaps.is_empty(), "{k}: gaps {:?}", seen.gaps);
                assert_eq!(
                    seen.mids, acked[&k],
                    "{k}: received differs from acknowledged"
                );
                out.reconnects += seen.connections.saturating_sub(1);
                out.resets.push(seen.resets);
            }
        }
        out
    }
}

/// What a fault cost the followers.
#[derive(Debug, Default)]
struct Outcome {
    /// Follower connections beyond one per key.
    reconnects: usize,
    /// Pushes refused (not acknowledged).
    refused: usize,
    /// Per follower, the times it was told its key's sequence started again.
    resets: Vec<usize>,
}

/// A subscriber that records when each message arrives.
fn watch(mut sub: pushcluster_client::sub::Subscriber) -> Arc<Mutex<Vec<(i64, Instant)>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok(f) = sub.next_timeout(Duration::from_secs(120)).await {
            if let Frame::Message(m) = f {
                g.lock().unwrap().push((m.mid, Instant::now()));
            }
        }
    });
    got
}

/// The comets' Redis traffic goes through a proxy that stops moving bytes
/// (no FIN, no RST: a lost node or a partition). The comets notice within
/// 5 s (PING), say so (metric, readiness), keep their clients, and once the
/// cut heals they resubscribe and deliver from the store what each key
/// missed: followers receive again within 10 s, nothing lost, no reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_redis_connection_is_noticed_and_healed_without_reconnects() {
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        comet_redis_url: Some(proxy.redis_url()),
        ..Options::default()
    });
    let api = c.client();
    let traffic = Traffic::start(&api, "cut").await;
    let watched = watch(subscribe(&c, "cut-watch", Transport::Ws, true).await);
    let watch_pusher = {
        let api = api.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                let _ = api
                    .push("cut-watch", &format!(r#"{{"w":{i}}}"#), Some(600))
                    .await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    proxy.freeze();
    let detected = until(Duration::from_secs(8), || {
        comets_metric(&c, "pushcluster_comet_live_up")
            .iter()
            .all(|v| *v == 0.0)
    })
    .await
    .unwrap_or_else(|| panic!("a frozen live connection went unnoticed\n{}", c.logs()));
    assert!(
        c.comets.iter().all(|p| !p.is_ready()),
        "comets stayed ready without Redis"
    );
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(detected)).await;

    proxy.thaw();
    let healed = Instant::now();
    let receiving = until(Duration::from_secs(15), || {
        watched.lock().unwrap().iter().any(|(_, at)| *at > healed)
    })
    .await
    .unwrap_or_else(|| panic!("no delivery after the cut healed\n{}", c.logs()));
    until(Duration::from_secs(10), || {
        c.comets.iter().all(|p| p.is_ready())
    })
    .await;
    watch_pusher.abort();
    let Outcome {
        reconnects,
        refused,
        ..
    } = traffic.finish(&api, &c).await;
    let filled: f64 = comets_metric(&c, "pushcluster_comet_live_filled_total")
        .iter()
        .sum();
    eprintln!(
        "half-open Redis: detected in {detected:?}, receiving {receiving:?} after the cut healed, \
         {filled} messages filled from the store, {reconnects} follower reconnects, {refused} pushes refused"
    );
    assert!(
        detected <= Duration::from_secs(5),
        "detected after {detected:?}"
    );
    assert!(
        receiving <= Duration::from_secs(10),
        "receiving after {receiving:?}"
    );
    assert_eq!(reconnects, 0, "followers were made to reconnect");
    assert!(filled > 0.0, "nothing was filled from the store");
}

/// Redis restarted (`SHUTDOWN NOSAVE`) with an append-only file fsynced on
/// every write: every acknowledged push is kept, so clients see a pause
/// (pushes refused while Redis is down) and no reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_costs_a_pause_not_a_reconnect() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut redis = Some(RedisServer::start_durable_on(port, dir.path()));
    let c = Cluster::start(Options {
        redis_url: Some(format!("redis://127.0.0.1:{port}/")),
        ..Options::default()
    });
    let api = c.client();
    let traffic = Traffic::start(&api, "restart").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown_nosave(port).await;
    drop(redis.take());
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis = Some(RedisServer::start_durable_on(port, dir.path()));
    let back = until(Duration::from_secs(15), || {
        comets_metric(&c, "pushcluster_comet_live_up")
            .iter()
            .all(|v| *v == 1.0)
    })
    .await
    .unwrap_or_else(|| panic!("comets did not resubscribe\n{}", c.logs()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let Outcome {
        reconnects,
        refused,
        ..
    } = traffic.finish(&api, &c).await;
    let resets: f64 = comets_metric(&c, "pushcluster_comet_live_resets_total")
        .iter()
        .sum();
    eprintln!(
        "Redis restart (AOF): live again {back:?} after the restart, {refused} pushes refused while down, \
         {reconnects} follower reconnects, {resets} sequence resets"
    );
    assert_eq!(reconnects, 0, "followers were made to reconnect");
    assert_eq!(resets, 0.0, "a durable Redis lost a sequence");
    drop(redis);
}

/// Redis restarted without persistence (`SHUTDOWN NOSAVE`, no AOF): every
/// sequence starts again at 1. The comets notice each followed key going
/// backwards and have its clients reconnect; their fetch says `reset`, so
/// they take the new sequence instead of dropping it as already seen: every
/// message acknowledged after the restart is received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_resets_its_clients_instead_of_starving_them() {
    let port = free_port();
    let redis = RedisServer::start_on(port);
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let api = c.client();
    let traffic = Traffic::start(&api, "lost").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    shutdown_nosave(port).await;
    drop(redis);
    let _redis = RedisServer::start_on(port);
    let back = until(Duration::from_secs(15), || {
        comets_metric(&c, "pushcluster_comet_live_up")
            .iter()
            .all(|v| *v == 1.0)
    })
    .await
    .unwrap_or_else(|| panic!("comets did not resubscribe\n{}", c.logs()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = traffic.finish(&api, &c).await;
    let resets: f64 = comets_metric(&c, "pushcluster_comet_live_resets_total")
        .iter()
        .sum();
    eprintln!(
        "Redis restart losing its data: live again {back:?} after, {} follower reconnects, \
         {resets} keys reset at the comets, followers told {:?}, {} pushes refused",
        out.reconnects, out.resets, out.refused
    );
    assert!(
        out.resets.iter().all(|r| *r >= 1),
        "a follower was not told of the reset: {:?}",
        out.resets
    );
    assert!(resets >= 1.0, "the comets did not notice");
}

/// Anyone who can reach Redis can PUBLISH on a key's live channel. A
/// message with a mid the store never assigned (far ahead, or one already
/// delivered), or with exactly the key's next mid but no valid signature,
/// is not delivered; real pushes around it are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_publish_is_not_delivered() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let api = c.client();
    let mut subs = Vec::new();
    for t in [Transport::Ws, Transport::Tcp, Transport::Sse] {
        subs.push(subscribe(&c, "victim", t, true).await);
    }
    api.push("victim", r#"{"real":1}"#, Some(600))
        .await
        .expect("push");
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let channel = pushcluster_store::redis::live::channel("pc", "victim");
    let mut received = 0;
    let guessed = LiveKey::derive("a guess");
    let wrong_key = format!(
        "2 s{} {{\"forged\":\"wrong key\"}}",
        String::from_utf8_lossy(&guessed.sign(&channel, 2, b"{\"forged\":\"wrong key\"}"))
    );
    for (channel, forged) in [
        (&channel, "9000000000000000 {\"forged\":\"far\"}"),
        (&channel, "1 {\"forged\":\"replay\"}"),
        // Exactly the key's next mid: only the signature tells it apart.
        (&channel, "2 {\"forged\":\"next\"}"),
        (&channel, &wrong_key),
    ] {
        let n: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(forged)
            .query_async(&mut conn)
            .await
            .expect("PUBLISH");
        assert!(n >= 1, "no comet subscribed to {channel}");
        received += n;
    }
    // The comets have judged every forgery before the real next push is
    // stored: otherwise a forgery's read-back could already find (and
    // deliver) mid 2.
    let judged = pushcluster_systest::until(Duration::from_secs(5), || {
        comets_metric(&c, "pushcluster_comet_live_unverified_total")
            .iter()
            .sum::<f64>()
            >= received as f64
    })
    .await;
    assert!(
        judged.is_some(),
        "the comets did not judge every forgery within 5 s"
    );
    api.push("victim", r#"{"real":2}"#, Some(600))
        .await
        .expect("push");
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = collect(sub, 2, Duration::from_secs(5)).await;
        let texts: Vec<String> = got.iter().map(|m| m.msg.to_string()).collect();
        assert_eq!(mids(&got), [1, 2], "subscriber {i}: {texts:?}");
        assert!(
            texts.iter().all(|t| t.contains("real")),
            "subscriber {i}: {texts:?}"
        );
        let quiet_until = Instant::now() + Duration::from_millis(300);
        while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
            match sub.next_timeout(left).await {
                Ok(Frame::Message(m)) => {
                    panic!("subscriber {i}: more than the real messages: {m:?}")
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    // Each forgery failed its signature at each comet it reached; no real
    // push did (they are signed), so none was read back from the store.
    let unverified: f64 = comets_metric(&c, "pushcluster_comet_live_unverified_total")
        .iter()
        .sum();
    assert_eq!(unverified, received as f64, "forgeries counted");
}

/// With writers that wait for a replica, each publishes after its wait, so
/// a key's messages can come out of mid order. Here mids 2, 3 and 4 are
/// stored while the replica is stopped (their writers fail their wait and
/// publish nothing); then 3 is published first. The comets deliver 2 and 3
/// (read from the store up to the mid that showed the gap) but not 4,
/// stored yet unconfirmed as far as they know, until 4 is published; and
/// pushes go on in order after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_out_of_order_are_delivered_in_mid_order() {
    use pushcluster_store::redis::{live, RedisStore};
    use pushcluster_store::{AppendOpts, Channel, Store};
    let master = RedisServer::start();
    let replica = RedisServer::spawn_with(
        free_port(),
        vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port().to_string(),
        ],
    );
    let wait = pushcluster_redis::Durability {
        replicas: 1,
        timeout_ms: 300,
    };
    let c = Cluster::start(Options {
        redis_url: Some(master.url()),
        redis_durability: wait,
        ..Options::default()
    });
    let api = c.client();
    let mut subs = Vec::new();
    for t in [Transport::Ws, Transport::Tcp, Transport::Sse] {
        subs.push(subscribe(&c, "ooo", t, true).await);
    }
    // Web retries under the push's id until the replica has synced.
    let first = api.push("ooo", r#"{"n":1}"#, Some(600)).await;
    assert_eq!(first.expect("the first push"), 1);
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = collect(sub, 1, Duration::from_secs(5)).await;
        assert_eq!(mids(&got), [1], "subscriber {i}");
    }

    let writer = RedisStore::connect(&master.url(), "pc", Default::default())
        .await
        .expect("redis")
        .durability(wait);
    replica.signal("STOP");
    for n in 2..=4 {
        let id = format!("ooo-{n}");
        let stored = writer
            .append_with(
                Channel::Private("ooo"),
                format!(r#"{{"n":{n}}}"#).into(),
                Duration::from_secs(600),
                AppendOpts::dedupe(&id),
            )
            .await;
        assert!(stored.is_err(), "confirmed without the replica: {stored:?}");
    }
    replica.signal("CONT");

    let key = LiveKey::derive("systest-rpc-token");
    let channel = live::channel("pc", "ooo");
    let client = redis::Client::open(master.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let publish = |mid: i64| {
        let message = live::encode(
            Some(&key),
            &channel,
            mid,
            format!(r#"{{"n":{mid}}}"#).as_bytes(),
        );
        redis::cmd("PUBLISH").arg(&channel).arg(message).to_owned()
    };
    let n: i64 = publish(3).query_async(&mut conn).await.expect("PUBLISH");
    assert!(n >= 1, "no comet subscribed");
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = collect(sub, 2, Duration::from_secs(5)).await;
        assert_eq!(mids(&got), [2, 3], "subscriber {i}");
        assert_eq!(
            got[0].msg["n"], 2,
            "subscriber {i}: mid 2 is the stored one"
        );
        if let Ok(Frame::Message(m)) = sub.next_timeout(Duration::from_millis(300)).await {
            panic!("subscriber {i}: delivered before published: {m:?}");
        }
    }
    let _: i64 = publish(4).query_async(&mut conn).await.expect("PUBLISH");
    let five = api
        .push("ooo", r#"{"n":5}"#, Some(600))
        .await
        .expect("push");
    assert_eq!(five, 5);
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = collect(sub, 2, Duration::from_secs(5)).await;
        assert_eq!(mids(&got), [4, 5], "subscriber {i}");
    }
}

/// 1,000 messages of 60 KiB on one key, read back through web page by page:
/// every page arrives, each well within a second, none is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_is_fetched_page_by_page() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let api = c.client();
    let payload = format!(r#"{{"blob":"{}"}}"#, "x".repeat(60 << 10));
    for _ in 0..1000 {
        api.push("backlog", &payload, Some(600))
            .await
            .expect("push");
    }
    let (mut after, mut pages, mut slowest) = (0, 0, Duration::ZERO);
    while after < 1000 {
        let started = Instant::now();
        let (page, _) = api.fetch("backlog", after, None).await.expect("a page");
        slowest = slowest.max(started.elapsed());
        pages += 1;
        assert_eq!(
            page.first().map(|m| m.mid),
            Some(after + 1),
            "page after {after}"
        );
        after = page.last().expect("a page").mid;
    }
    eprintln!("1000 x 60 KiB through web: {pages} pages, slowest {slowest:?}");
    assert!(pages > 1, "one page of 60 MB");
    assert!(slowest < Duration::from_secs(1), "slowest page {slowest:?}");
}

fn mids(m: &[Message]) -> Vec<i64> {
    m.iter().map(|m| m.mid).collect()
}

async fn shutdown_nosave(port: u16) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    // The server closes the connection instead of answering.
    let _ = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async::<()>(&mut conn)
        .await;
}

/// A key's sequence goes back while the comets' live feed stays up: what
/// a Sentinel failover without WAIT does to a key whose last writes the
/// promoted replica never had. The next pushes take mids the followers
/// already saw; the comet, offered a mid at or below the last it
/// delivered, reads the stored sequence, finds it behind and has the
/// key's followers resync (told of the reset) instead of dropping the new
/// messages as seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_that_went_back_under_a_live_feed_resets_its_followers() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let api = c.client();
    let mut followers = Vec::new();
    let mut keys = Vec::new();
    for p in PROTOS {
        let k = format!("back-{p:?}");
        followers.push(Followers::start(&api, std::slice::from_ref(&k), p));
        keys.push(k);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 1..=10 {
        for k in &keys {
            api.push(k, &format!(r#"{{"n":{n}}}"#), Some(600))
                .await
                .expect("push");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    for k in &keys {
        // As a replica that had only the first 5 would have it.
        redis::pipe()
            .cmd("SET")
            .arg(format!("pc:k:{{{k}}}:s"))
            .arg(5)
            .ignore()
            .cmd("LTRIM")
            .arg(format!("pc:k:{{{k}}}:m"))
            .arg(0)
            .arg(4)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .expect("set the sequence back");
    }
    let mut last = BTreeMap::new();
    for k in &keys {
        let mid = api
            .push(k, r#"{"after":true}"#, Some(600))
            .await
            .expect("push");
        assert_eq!(mid, 6, "{k}: the sequence did not go back");
        last.insert(k.clone(), mid);
    }
    for f in followers {
        for (k, seen) in f.finish(&last, &c).await {
            assert_eq!(seen.resets, 1, "{k}: not told of the reset: {seen:?}");
            assert_eq!(
                seen.mids[seen.epoch_start..],
                [1, 2, 3, 4, 5, 6],
                "{k}: the resynced sequence"
            );
        }
    }
    let resets: f64 = comets_metric(&c, "pushcluster_comet_live_resets_total")
        .iter()
        .sum();
    assert!(resets >= 3.0, "the comets counted {resets} resets");
}
