//! A back end that repeats a push (its answer was lost) under the same
//! `Idempotency-Key` gets the first mid back and nothing is stored twice, on
//! either storage; the same key with another body, or no key, is a new push;
//! a bad key is refused with a JSON error before anything is stored.

use pushcluster_systest::{collect, subscribe, Cluster, Options, RedisServer, Transport};
use serde_json::Value;
use std::time::Duration;

/// POSTs `body` to `url` with `idempotency` as the header (when given);
/// returns the status and the JSON answer.
async fn post(url: &str, body: &str, idempotency: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url).body(body.to_owned());
    if let Some(k) = idempotency {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

/// The mid of a successful push's answer.
async fn push(c: &Cluster, key: &str, body: &str, idempotency: Option<&str>) -> i64 {
    let url = format!("{}/1/admin/push/private?key={key}&expire=600", c.admin_url);
    let (status, v) = post(&url, body, idempotency).await;
    assert_eq!(status, 200, "{v}");
    v["data"]["mid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no mid in {v}"))
}

/// The mids stored for `key`.
async fn stored(c: &Cluster, key: &str) -> Vec<i64> {
    let (msgs, _) = c.client().fetch(key, 0, None).await.expect("fetch");
    msgs.iter().map(|m| m.mid).collect()
}

async fn repeated_pushes_are_stored_once(c: &Cluster) {
    let mut sub = subscribe(c, "order", Transport::Ws, true).await;

    let first = push(c, "order", r#"{"paid":1}"#, Some("order-1")).await;
    let again = push(c, "order", r#"{"paid":1}"#, Some("order-1")).await;
    assert_eq!(
        (first, again),
        (1, 1),
        "a repeated request must get its first mid"
    );
    // Another body under the same key is another push, not a dropped one.
    assert_eq!(push(c, "order", r#"{"paid":2}"#, Some("order-1")).await, 2);
    // Another key with the first body: another push.
    assert_eq!(push(c, "order", r#"{"paid":1}"#, Some("order-2")).await, 3);
    // Without a key every request is a push of its own, as before.
    assert_eq!(push(c, "order", r#"{"paid":3}"#, None).await, 4);
    assert_eq!(push(c, "order", r#"{"paid":3}"#, None).await, 5);
    assert_eq!(stored(c, "order").await, vec![1, 2, 3, 4, 5]);

    // The subscriber got every mid, in order; a repeat, if delivered at
    // all, carries the first mid (clients drop it by mid).
    let mut seen: Vec<i64> = Vec::new();
    while seen.last() != Some(&5) {
        let m = collect(&mut sub, 1, Duration::from_secs(5)).await.remove(0);
        assert!(
            seen.last().is_none_or(|&l| m.mid == l + 1 || m.mid <= l),
            "mid {} after {seen:?}",
            m.mid
        );
        if seen.last().is_none_or(|&l| m.mid > l) {
            seen.push(m.mid);
        }
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);

    // Multi-push: each key stores the repeated request once.
    let mpush = format!("{}/1/admin/push/mprivate?expire=600", c.admin_url);
    let body = r#"{"m":{"x":1},"k":"ma,mb"}"#;
    for _ in 0..2 {
        let (status, v) = post(&mpush, body, Some("batch-7")).await;
        assert_eq!(status, 200, "{v}");
        assert!(v.get("data").is_none(), "a key failed: {v}");
    }
    assert_eq!(stored(c, "ma").await, vec![1]);
    assert_eq!(stored(c, "mb").await, vec![1]);

    // Broadcast: the repeat gets the first one's mid; a new one the next.
    let bcast = format!("{}/1/admin/push/broadcast?expire=600", c.admin_url);
    let mut mids = Vec::new();
    for k in ["all-1", "all-1", "all-2"] {
        let (status, v) = post(&bcast, "{}", Some(k)).await;
        assert_eq!(status, 200, "{v}");
        mids.push(
            v["data"]["mid"]
                .as_i64()
                .unwrap_or_else(|| panic!("no mid in {v}")),
        );
    }
    let mut distinct = mids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        mids[0], mids[1],
        "a repeated broadcast got another mid: {mids:?}"
    );
    assert_eq!(distinct.len(), 2, "{mids:?}");
    let (_, public) = c.client().fetch("order", 5, Some(0)).await.expect("fetch");
    assert_eq!(public.len(), 2, "public messages stored: {public:?}");

    // A bad key is refused before anything is stored.
    let url = format!("{}/1/admin/push/private?key=order&expire=600", c.admin_url);
    for bad in ["x".repeat(256), "caf\u{e9}".to_owned()] {
        let (status, v) = post(&url, "{}", Some(&bad)).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["ret"], 65534, "{v}");
        assert!(
            v["msg"]
                .as_str()
                .unwrap_or_default()
                .contains("Idempotency-Key"),
            "{v}"
        );
    }
    let twice = reqwest::Client::new()
        .post(&url)
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(twice.status().as_u16(), 400);
    assert_eq!(stored(c, "order").await, vec![1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_pushes_are_stored_once_on_the_embedded_store() {
    let c = Cluster::start(Options::default());
    repeated_pushes_are_stored_once(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_pushes_are_stored_once_on_redis() {
    let redis = RedisServer::start();
    let c = Cluster::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    repeated_pushes_are_stored_once(&c).await;
}
