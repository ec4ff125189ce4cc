//! Pushes reach subscribers on every transport, in mid order; offline
//! messages come back after reconnect with no gap and no duplicate;
//! multi-push, broadcast, delete and expiry behave as documented.

use pushcluster_systest::{collect, subscribe, Cluster, Options, Transport};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_arrive_in_mid_order_over_websocket_tcp_and_sse() {
    let c = Cluster::start(Options::default());
    let api = c.client();
    let cases = [
        ("ws-json", Transport::Ws, true),
        ("ws-legacy", Transport::Ws, false),
        ("tcp-json", Transport::Tcp, true),
        ("tcp-legacy", Transport::Tcp, false),
        ("sse", Transport::Sse, true),
    ];
    for (key, transport, versioned) in cases {
        let mut sub = subscribe(&c, key, transport, versioned).await;
        // Four concurrent pushers: the comet must still deliver in mid order.
        let mut tasks = Vec::new();
        for t in 0..4 {
            let api = api.clone();
            let key = key.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..10 {
                    let body = json!({"t": t, "i": i, "text": "héllo \"quoted\""}).to_string();
                    let mid = api.push(&key, &body, Some(60)).await.expect("push");
                    acked.push((mid, body));
                }
                acked
            }));
        }
        let mut acked = BTreeMap::new();
        for t in tasks {
            for (mid, body) in t.await.unwrap() {
                acked.insert(
                    mid,
                    serde_json::from_str::<serde_json::Value>(&body).unwrap(),
                );
            }
        }
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            (1..=40).collect::<Vec<_>>()
        );
        let got = collect(&mut sub, 40, WAIT).await;
        let mids: Vec<i64> = got.iter().map(|m| m.mid).collect();
        assert_eq!(mids, (1..=40).collect::<Vec<_>>(), "{key}: order");
        for m in &got {
            assert_eq!(m.gid, 0);
            assert_eq!(&m.msg, &acked[&m.mid], "{key}: body of mid {}", m.mid);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_client_misses_nothing_and_sees_nothing_twice() {
    let c = Cluster::start(Options::default());
    let api = c.client();
    let key = "roamer";
    let total = 120;
    let pusher = {
        let api = api.clone();
        tokio::spawn(async move {
            for i in 1..=total {
                let mid = api
                    .push(key, &json!({ "n": i }).to_string(), None)
                    .await
                    .unwrap();
                assert_eq!(mid, i);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let mut seen: Vec<i64> = Vec::new();
    let mut last = 0;
    // Three sessions: connect, take some messages live, drop the connection.
    for round in 0..3 {
        let mut sub = subscribe(&c, key, Transport::Ws, true).await;
        // Subscribed first, fetched second.
        let (stored, _) = api.fetch(key, last, None).await.unwrap();
        for m in stored {
            seen.push(m.mid);
            last = last.max(m.mid);
        }
        let live = if round < 2 { 10 } else { 0 };
        for m in collect(&mut sub, live, WAIT).await {
            seen.push(m.mid);
            last = last.max(m.mid);
        }
        drop(sub);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    pusher.await.unwrap();
    let (rest, _) = api.fetch(key, last, None).await.unwrap();
    seen.extend(rest.iter().map(|m| m.mid));
    // Dedupe by mid as a client does; then the set must be complete.
    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique, (1..=total).collect::<BTreeSet<_>>(), "a gap");
    let live_dupes = seen.len() - unique.len();
    eprintln!(
        "received {} frames, {} unique, {live_dupes} overlaps removed by mid",
        seen.len(),
        unique.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_push_reaches_every_key_and_reports_nothing_failed() {
    let c = Cluster::start(Options::default());
    let api = c.client();
    let keys = ["m-a", "m-b", "m-c", "m-d", "m-e"];
    let mut subs = Vec::new();
    for k in &keys[..4] {
        subs.push(subscribe(&c, k, Transport::Tcp, true).await);
    }
    api.push("m-a", "1", None).await.unwrap();
    let failed = api.mpush(&keys, r#"{"to":"all"}"#, Some(60)).await.unwrap();
    assert!(failed.is_empty(), "failed keys {failed:?}");
    let first = collect(&mut subs[0], 2, WAIT).await;
    assert_eq!(first.iter().map(|m| m.mid).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(first[1].msg, json!({"to": "all"}));
    for s in &mut subs[1..] {
        let m = collect(s, 1, WAIT).await;
        assert_eq!((m[0].mid, &m[0].msg), (1, &json!({"to": "all"})));
    }
    // The offline key has it stored.
    let (stored, _) = api.fetch("m-e", 0, None).await.unwrap();
    assert_eq!(stored.len(), 1);
    // One bad key refuses the whole request before anything is stored.
    let err = api.mpush(&["m-a", "bad key"], "2", None).await.unwrap_err();
    assert!(err.to_string().contains("65534"), "{err}");
    assert_eq!(api.last_mids("m-a").await.unwrap().0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_connection_and_is_stored_on_its_own_sequence() {
    let c = Cluster::start(Options::default());
    let api = c.client();
    let mut subs = Vec::new();
    for (i, t) in [Transport::Ws, Transport::Tcp, Transport::Sse, Transport::Ws]
        .iter()
        .enumerate()
    {
        subs.push(subscribe(&c, &format!("b-{i}"), *t, true).await);
    }
    api.push("b-0", r#"{"private":true}"#, None).await.unwrap();
    assert_eq!(api.broadcast(r#"{"all":1}"#, Some(60)).await.unwrap(), 1);
    assert_eq!(api.broadcast(r#"{"all":2}"#, Some(60)).await.unwrap(), 2);
    let first = collect(&mut subs[0], 3, WAIT).await;
    assert_eq!(
        first.iter().map(|m| (m.gid, m.mid)).collect::<Vec<_>>(),
        vec![(0, 1), (1, 1), (1, 2)]
    );
    for s in &mut subs[1..] {
        let got = collect(s, 2, WAIT).await;
        assert_eq!(
            got.iter().map(|m| (m.gid, m.mid)).collect::<Vec<_>>(),
            vec![(1, 1), (1, 2)]
        );
        assert_eq!(got[1].msg, json!({"all": 2}));
    }
    let (_, public) = api.fetch("anyone", 0, Some(0)).await.unwrap();
    assert_eq!(public.iter().map(|m| m.mid).collect::<Vec<_>>(), vec![1, 2]);
    let (_, public) = api.fetch("anyone", 0, Some(1)).await.unwrap();
    assert_eq!(public.len(), 1);
    assert_eq!(api.last_mids("anyone").await.unwrap(), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_stored_messages_and_mids_continue() {
    let c = Cluster::start(Options::default());
    let api = c.client();
    for _ in 0..3 {
        api.push("del", "{}", None).await.unwrap();
    }
    api.push("keep", "{}", None).await.unwrap();
    api.delete("del").await.unwrap();
    assert!(api.fetch("del", 0, None).await.unwrap().0.is_empty());
    assert_eq!(api.fetch("keep", 0, None).await.unwrap().0.len(), 1);
    assert_eq!(api.push("del", "{}", None).await.unwrap(), 4);
    // The legacy endpoint takes the key in a form body, as gopush-cluster did.
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/admin/msg/clean", c.admin_url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("key=del")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["ret"], 0);
    assert!(api.fetch("del", 0, None).await.unwrap().0.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_expire_on_their_own_schedule() {
    let c = Cluster::start(Options::default());
    let api = c.client();
    api.push("exp", r#"{"short":1}"#, Some(1)).await.unwrap();
    api.push("exp", r#"{"long":1}"#, Some(600)).await.unwrap();
    assert_eq!(api.fetch("exp", 0, None).await.unwrap().0.len(), 2);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (left, _) = api.fetch("exp", 0, None).await.unwrap();
    assert_eq!(left.iter().map(|m| m.mid).collect::<Vec<_>>(), vec![2]);
    assert_eq!(api.last_mids("exp").await.unwrap().0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_after_last_event_id_without_duplicates() {
    let c = Cluster::start(Options::default());
    let api = c.client();
    for i in 1..=5 {
        api.push("sse-resume", &json!({ "n": i }).to_string(), None)
            .await
            .unwrap();
    }
    let addr = api
        .resolve("sse-resume", pushcluster_client::http::Proto::Sse)
        .await
        .unwrap();
    let p = pushcluster_client::sub::Params {
        key: "sse-resume".into(),
        heartbeat: 30,
        token: None,
        versioned: true,
    };
    let mut sub = pushcluster_client::sub::Subscriber::sse(&addr, &p, Some(2))
        .await
        .unwrap();
    api.push("sse-resume", r#"{"n":6}"#, None).await.unwrap();
    let got = collect(&mut sub, 4, WAIT).await;
    assert_eq!(
        got.iter().map(|m| m.mid).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    assert_eq!(got[3].msg, json!({"n": 6}));
    // Nothing else follows (no duplicate of the live message).
    assert!(sub.next_timeout(Duration::from_millis(300)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_concurrent_pushes_is_batched_and_loses_nothing() {
    // 300 pushes at once over 30 keys: web coalesces them into PushBatch
    // calls per comet, and each comet its appends into AppendBatch calls.
    // Every push is acknowledged with its own mid, every subscriber gets its
    // key's messages in mid order.
    let c = Cluster::start(Options::default());
    let api = c.client();
    let keys: Vec<String> = (0..30).map(|i| format!("burst-{i}")).collect();
    let mut subs = Vec::new();
    for k in &keys {
        subs.push(subscribe(&c, k, Transport::Ws, true).await);
    }
    let pushes = futures::future::join_all((0..300).map(|i| {
        let (api, key) = (api.clone(), keys[i % keys.len()].clone());
        async move {
            let mid = api
                .push(&key, &json!({ "i": i }).to_string(), Some(60))
                .await
                .expect("push");
            (key, mid)
        }
    }))
    .await;
    for k in &keys {
        let mut mids: Vec<i64> = pushes
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, m)| *m)
            .collect();
        mids.sort_unstable();
        assert_eq!(mids, (1..=10).collect::<Vec<_>>(), "{k}: acknowledged mids");
    }
    for (k, sub) in keys.iter().zip(subs.iter_mut()) {
        let got: Vec<i64> = collect(sub, 10, WAIT).await.iter().map(|m| m.mid).collect();
        assert_eq!(got, (1..=10).collect::<Vec<_>>(), "{k}: delivered");
    }
}
