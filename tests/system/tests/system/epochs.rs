//! Sequences that Redis lost and started again, seen by clients that come
//! back only after the new sequence passed the mid they remember: the
//! epoch tells them (on `/1/msg/get`, SSE and at the comets), where mids
//! alone cannot.

use pushcluster_client::http::{Position, Proto};
use pushcluster_client::sub::{Params, Subscriber};
use pushcluster_client::Frame;
use pushcluster_systest::proxy::FreezableProxy;
use pushcluster_systest::{comets_metric, until, Cluster, Followers, Options, RedisServer};
use std::collections::BTreeMap;
use std::time::Duration;

async fn flushall(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .expect("FLUSHALL");
}

async fn push_n(api: &pushcluster_client::http::Client, key: &str, n: usize) -> Vec<i64> {
    let mut mids = Vec::new();
    for i in 0..n {
        mids.push(
            api.push(key, &format!(r#"{{"i":{i}}}"#), Some(600))
                .await
                .expect("push"),
        );
    }
    mids
}

/// A reader that remembers mid 5 of a sequence Redis lost comes back after
/// the new sequence reached 8. With its epoch, `/1/msg/get` and SSE say
/// `reset` and give the new sequence from 1; without one (gopush-cluster's
/// clients), mids alone cannot tell, and it gets 6 to 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_with_an_epoch_learns_of_a_restart_its_mid_cannot_show() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let api = c.client();
    let key = "gone";
    push_n(&api, key, 5).await;
    let at = |after, epoch| Position {
        after,
        epoch,
        ..Position::default()
    };
    let first = api
        .fetch_page_with_token(key, None, at(0, Some(0)))
        .await
        .expect("fetch");
    assert_eq!(first.msgs.len(), 5);
    let old = first.epoch.expect("data.epoch when asked for");
    assert!(old > 0);
    let quiet = api
        .fetch_page_with_token(key, None, at(5, Some(old)))
        .await
        .expect("fetch");
    assert!(quiet.msgs.is_empty() && !quiet.reset);
    assert_eq!(
        quiet.epoch,
        Some(old),
        "data.epoch even when nothing is new"
    );

    flushall(&redis).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(push_n(&api, key, 8).await, (1..=8).collect::<Vec<_>>());

    let told = api
        .fetch_page_with_token(key, None, at(5, Some(old)))
        .await
        .expect("fetch");
    assert!(told.reset, "not told of the restart: {told:?}");
    let new = told.epoch.expect("epoch");
    assert_ne!(new, old);
    let mids: Vec<i64> = told.msgs.iter().map(|m| m.mid).collect();
    assert_eq!(mids, (1..=8).collect::<Vec<_>>());
    let current = api
        .fetch_page_with_token(key, None, at(8, Some(new)))
        .await
        .expect("fetch");
    assert!(!current.reset && current.msgs.is_empty());

    let legacy = api
        .fetch_page_with_token(key, None, at(5, None))
        .await
        .expect("fetch");
    let mids: Vec<i64> = legacy.msgs.iter().map(|m| m.mid).collect();
    assert_eq!(mids, [6, 7, 8], "without an epoch the reply is as before");
    assert!(!legacy.reset && legacy.epoch.is_none());

    let bad = reqwest::get(format!(
        "{}/1/msg/get?k={key}&m=5&e=yesterday",
        c.public_url
    ))
    .await
    .expect("web");
    let body: serde_json::Value = bad.json().await.expect("JSON error body");
    assert_ne!(body["ret"], 0, "a malformed epoch was taken: {body}");
    let time: serde_json::Value = reqwest::get(format!("{}/1/time/get?k={key}", c.public_url))
        .await
        .expect("web")
        .json()
        .await
        .expect("JSON");
    assert_eq!(time["data"]["epoch"], new, "{time}");
    assert_eq!(time["data"]["mid"], 8, "{time}");

    // SSE, resuming from Last-Event-ID 5 under the old epoch.
    let addr = api.resolve(key, Proto::Sse).await.expect("resolve");
    let p = Params {
        key: key.into(),
        heartbeat: 30,
        token: None,
        versioned: true,
    };
    let mut sub = Subscriber::sse_from(&addr, &p, Some(5), Some(old))
        .await
        .expect("SSE");
    let mut frames = Vec::new();
    while frames.len() < 10 {
        match sub
            .next_timeout(Duration::from_secs(5))
            .await
            .expect("frame")
        {
            Frame::Heartbeat => {}
            Frame::Message(m) => frames.push(format!("m{}", m.mid)),
            Frame::Epoch(e) => frames.push(if e == new {
                "epoch".into()
            } else {
                format!("epoch {e}?")
            }),
            other => frames.push(format!("{other:?}")),
        }
    }
    assert_eq!(
        frames,
        ["Reset", "epoch", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"]
    );
}

/// The comets' live feed is cut while Redis loses its data and the keys'
/// new sequences pass the mids their followers have. When the feed comes
/// back, the stored mids alone look like messages to fill; the epochs show
/// a restart, so each key's followers (WebSocket, TCP, SSE) are told and
/// take the new sequence from 1, instead of missing its first mids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comets_tell_followers_of_a_restart_their_mids_passed() {
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        comet_redis_url: Some(proxy.redis_url()),
        ..Options::default()
    });
    let api = c.client();
    let keys: Vec<String> = ["ws", "tcp", "sse"]
        .iter()
        .map(|t| format!("passed-{t}"))
        .collect();
    let followers: Vec<Followers> = keys
        .iter()
        .zip([Proto::WebSocket, Proto::Tcp, Proto::Sse])
        .map(|(k, p)| Followers::start(&api, std::slice::from_ref(k), p))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut acked: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for k in &keys {
        acked.insert(k.clone(), push_n(&api, k, 20).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let live_up = |want: f64| {
        comets_metric(&c, "pushcluster_comet_live_up")
            .iter()
            .all(|v| *v == want)
    };
    proxy.freeze();
    until(Duration::from_secs(8), || live_up(0.0))
        .await
        .unwrap_or_else(|| panic!("the cut went unnoticed\n{}", c.logs()));
    flushall(&redis).await;
    for k in &keys {
        let mids = push_n(&api, k, 30).await;
        assert_eq!(mids.first(), Some(&1), "{k}: the sequence did not restart");
        acked.get_mut(k).expect("key").extend(mids);
    }
    proxy.thaw();
    until(Duration::from_secs(15), || live_up(1.0))
        .await
        .unwrap_or_else(|| panic!("the feed did not come back\n{}", c.logs()));
    let mut last = BTreeMap::new();
    for k in &keys {
        let mid = push_n(&api, k, 1).await[0];
        acked.get_mut(k).expect("key").push(mid);
        last.insert(k.clone(), mid);
    }
    for f in followers {
        for (k, seen) in f.finish(&last, &c).await {
            eprintln!(
                "{k}: {} resets, {} connections, {} messages",
                seen.resets,
                seen.connections,
                seen.mids.len()
            );
            assert!(seen.resets >= 1, "{k}: not told of the restart");
            assert!(seen.gaps.is_empty(), "{k}: gaps {:?}", seen.gaps);
            assert_eq!(
                seen.mids, acked[&k],
                "{k}: received differs from acknowledged"
            );
        }
    }
    let resets: f64 = comets_metric(&c, "pushcluster_comet_live_resets_total")
        .iter()
        .sum();
    assert!(resets >= 3.0, "comets reset {resets} keys, not each of 3");
}
