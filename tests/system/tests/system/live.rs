//! On Redis, private messages reach comets on their keys' live channels
//! (push_comet::live): whoever stores a message (web, a comet, the message
//! service) it arrives in mid order on every transport, and losing the
//! subscribing connection loses no acknowledged message.

use pushcluster_client::http::Proto;
use pushcluster_proto::auth::RpcToken;
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_proto::v1::message_client::MessageClient;
use pushcluster_systest::{
    collect, grpc_channel, subscribe, Cluster, Followers, Options, RedisServer, Transport,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_storing_delivers_in_mid_order() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let api = c.client();
    let key = "hot";
    let mut subs = Vec::new();
    for (t, versioned) in [
        (Transport::Ws, true),
        (Transport::Tcp, false),
        (Transport::Sse, true),
    ] {
        subs.push(subscribe(&c, key, t, versioned).await);
    }
    let ws = api.resolve(key, Proto::WebSocket).await.expect("resolve");
    let holder = c
        .comet_addrs
        .iter()
        .position(|a| a.ws == ws)
        .expect("a comet serves the key");
    let token = RpcToken::new(c.opts.rpc_token.as_deref()).expect("token");

    // Web (straight into Redis), the holder comet's Push RPC (a web of the
    // previous release) and the message service (web's store when no comet
    // serves a key), all at once.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                api.push(key, &format!(r#"{{"web":{t},"i":{i}}}"#), Some(60))
                    .await
                    .expect("push through web");
            }
        }));
    }
    let comet = CometClient::new(token.on(grpc_channel(c.comet_addrs[holder].rpc_port)));
    tasks.push(tokio::spawn(async move {
        for i in 0..20 {
            comet
                .clone()
                .push(pb::PushRequest {
                    key: key.into(),
                    payload: format!(r#"{{"comet":{i}}}"#).into_bytes().into(),
                    push_id: format!("comet-{i}"),
                    ..Default::default()
                })
                .await
                .expect("push through the comet");
        }
    }));
    let message = MessageClient::new(token.on(grpc_channel(c.message_rpc_port)));
    tasks.push(tokio::spawn(async move {
        for i in 0..20 {
            message
                .clone()
                .append(pb::AppendRequest {
                    key: key.into(),
                    payload: format!(r#"{{"message":{i}}}"#).into_bytes().into(),
                    push_id: format!("message-{i}"),
                    ..Default::default()
                })
                .await
                .expect("store through the message service");
        }
    }));
    for t in tasks {
        t.await.expect("pusher");
    }
    let want: Vec<i64> = (1..=140).collect();
    let stored: Vec<i64> = api
        .fetch(key, 0, None)
        .await
        .expect("fetch")
        .0
        .iter()
        .map(|m| m.mid)
        .collect();
    assert_eq!(stored, want, "stored");
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = collect(sub, 140, Duration::from_secs(10)).await;
        let mids: Vec<i64> = got.iter().map(|m| m.mid).collect();
        assert_eq!(mids, want, "subscriber {i}: live order");
    }
    let live: f64 = (0..c.comets.len())
        .map(|i| c.comet_metric(i, "pushcluster_comet_live_messages_total"))
        .sum();
    assert_eq!(live, 140.0, "every message came over the live channel once");
}

/// Redis drops the comets' subscribing connections mid-stream (a Redis
/// failover or a network blip does the same): the comets subscribe again
/// and deliver from the store what each key missed meanwhile, on the open
/// connections. Every acknowledged push is received, and no client is
/// made to reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_live_channels_loses_no_acknowledged_message() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let api = c.client();
    let keys: Vec<String> = (0..6).map(|i| format!("live-{i}")).collect();
    let followers = Followers::start(&api, &keys, Proto::WebSocket);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (api, keys, stop) = (api.clone(), keys.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked: BTreeMap<String, Vec<i64>> = BTreeMap::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                for k in &keys {
                    n += 1;
                    let mid = api
                        .push(k, &format!(r#"{{"n":{n}}}"#), Some(600))
                        .await
                        .expect("push");
                    acked.entry(k.clone()).or_default().push(mid);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    for _ in 0..2 {
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "pubsub"])
            .query_async(&mut conn)
            .await
            .expect("CLIENT KILL");
        assert!(killed >= 1, "no subscribing connection to kill");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut acked = pusher.await.expect("pusher");
    // A last message per key: a client learns of anything stored while it
    // was away at the latest when the next message shows it a gap.
    let mut last = BTreeMap::new();
    for k in &keys {
        let mid = api.push(k, r#"{"last":true}"#, Some(600)).await.unwrap();
        acked.entry(k.clone()).or_default().push(mid);
        last.insert(k.clone(), mid);
    }
    let mut reconnects = 0;
    for (k, seen) in followers.finish(&last, &c).await {
        assert!(seen.gaps.is_empty(), "{k}: gaps {:?}", seen.gaps);
        assert_eq!(
            &seen.mids, &acked[&k],
            "{k}: received differs from acknowledged"
        );
        reconnects += seen.connections;
    }
    let losses: f64 = (0..c.comets.len())
        .map(|i| c.comet_metric(i, "pushcluster_comet_live_losses_total"))
        .sum();
    assert!(losses >= 2.0, "comets saw {losses} lost live connections");
    assert_eq!(
        reconnects,
        keys.len(),
        "clients were made to reconnect ({reconnects} connections for {} keys)",
        keys.len()
    );
}

/// Multi-push on Redis: web stores each key itself, and every key's
/// subscriber gets the message from its live channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_push_on_redis_reaches_every_key() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let api = c.client();
    let keys = ["m-0", "m-1", "m-2", "m-3"];
    let mut subs = Vec::new();
    for k in keys {
        subs.push(subscribe(&c, k, Transport::Ws, true).await);
    }
    let failed = api
        .mpush(&keys, r#"{"all":true}"#, None)
        .await
        .expect("mpush");
    assert!(failed.is_empty(), "{failed:?}");
    for (k, sub) in keys.iter().zip(&mut subs) {
        let got = collect(sub, 1, Duration::from_secs(5)).await;
        assert_eq!(got[0].mid, 1, "{k}");
        assert_eq!(got[0].msg, serde_json::json!({"all": true}), "{k}");
    }
}
