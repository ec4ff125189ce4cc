//! Credentials on the real binaries: private reads need the key's subscriber
//! token once tokens are on, and every gRPC call between the services needs
//! the cluster's RPC token.

use pushcluster_proto::auth::RpcToken;
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_proto::v1::message_client::MessageClient;
use pushcluster_systest::{Cluster, Options};
use serde_json::Value;

async fn get(url: String) -> (u16, String) {
    let r = reqwest::get(url).await.expect("request");
    (r.status().as_u16(), r.text().await.expect("body"))
}

fn ret(body: &str) -> i64 {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["ret"].as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_reads_need_the_keys_token_when_subscriber_tokens_are_on() {
    let secret = "read-secret";
    let c = Cluster::start(Options {
        shards: 1,
        subscriber_secret: Some(secret.into()),
        ..Options::default()
    });
    c.client()
        .push("alice", r#"{"n":1}"#, None)
        .await
        .expect("push");
    let now = pushcluster_core::token::unix_now();
    let alice = pushcluster_core::token::mint(secret.as_bytes(), "alice", now + 60);
    let bob = pushcluster_core::token::mint(secret.as_bytes(), "bob", now + 60);
    let expired = pushcluster_core::token::mint(secret.as_bytes(), "alice", now - 1);
    let too_long = pushcluster_core::token::mint(secret.as_bytes(), "alice", now + 30 * 86400);
    let p = &c.public_url;
    for (what, url) in [
        (
            "/1/msg/get without a token",
            format!("{p}/1/msg/get?k=alice&m=0"),
        ),
        (
            "/1/msg/get with bob's token",
            format!("{p}/1/msg/get?k=alice&m=0&token={bob}"),
        ),
        (
            "/1/msg/get with an expired token",
            format!("{p}/1/msg/get?k=alice&m=0&token={expired}"),
        ),
        (
            "/1/msg/get with a token good for 30 days",
            format!("{p}/1/msg/get?k=alice&m=0&token={too_long}"),
        ),
        (
            "/1/time/get?k= without a token",
            format!("{p}/1/time/get?k=alice"),
        ),
        (
            "legacy /msg/get without a token",
            format!("{p}/msg/get?key=alice&mid=0"),
        ),
    ] {
        let (status, body) = get(url).await;
        assert_eq!((status, ret(&body)), (401, 65533), "{what}: {body}");
        assert!(
            !body.contains(r#"\"n\""#) && !body.contains(r#""n""#),
            "{what} leaked: {body}"
        );
    }
    // JSONP of a private read is refused even with the token (any page could
    // include it); the refusal is itself JSONP, so the callback sees it.
    let (status, body) = get(format!("{p}/1/msg/get?k=alice&m=0&token={alice}&cb=f")).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("f(") && body.contains("65533"), "{body}");
    // With the key's token every read answers.
    let (status, body) = get(format!("{p}/1/msg/get?k=alice&m=0&token={alice}")).await;
    assert_eq!((status, ret(&body)), (200, 0), "{body}");
    assert!(body.contains(r#""n":1"#), "{body}");
    let (status, body) = get(format!("{p}/1/time/get?k=alice&token={alice}")).await;
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (status, v["data"]["mid"].as_i64()),
        (200, Some(1)),
        "{body}"
    );
    let (status, body) = get(format!("{p}/msg/get?key=alice&mid=0&token={alice}")).await;
    assert_eq!((status, ret(&body)), (200, 0), "{body}");
    // What is not private needs nothing: the time, and where a key lives.
    assert_eq!(get(format!("{p}/1/time/get")).await.0, 200);
    assert_eq!(get(format!("{p}/1/server/get?k=alice&p=1")).await.0, 200);
    // SSE resume reads stored messages too: the comet checks the token first.
    let ws = &c.comet_addrs[0].ws;
    let (status, _) = get(format!("http://{ws}/sub/sse?key=alice&last_id=0")).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_rpc_needs_the_cluster_token() {
    let c = Cluster::start(Options {
        shards: 1,
        rpc_token: Some("the-cluster-token".into()),
        ..Options::default()
    });
    let channel = |port: u16| {
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("url")
            .connect_lazy()
    };
    let fetch = pb::FetchRequest {
        key: "k".into(),
        after_mid: 0,
        gid: 0,
        limit: 0,
        epoch: 0,
    };
    let push = pb::PushRequest {
        key: "k".into(),
        payload: b"1".to_vec().into(),
        ..Default::default()
    };
    for token in [
        None,
        Some("another-clusters-token"),
        Some("the-cluster-toke"),
    ] {
        let t = RpcToken::new(token).expect("token");
        let mut message = MessageClient::new(t.on(channel(c.message_rpc_port)));
        let e = message
            .fetch(fetch.clone())
            .await
            .expect_err("message without the token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e}");
        let mut comet = CometClient::new(t.on(channel(c.comet_addrs[0].rpc_port)));
        let e = comet
            .push(push.clone())
            .await
            .expect_err("comet without the token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e}");
    }
    // Nothing got in: the key is empty. With the token, calls go through,
    // and web (which has it) pushes end to end.
    let t = RpcToken::new(Some("the-cluster-token")).expect("token");
    let mut message = MessageClient::new(t.on(channel(c.message_rpc_port)));
    assert!(message
        .fetch(fetch.clone())
        .await
        .expect("fetch")
        .into_inner()
        .messages
        .is_empty());
    let mut comet = CometClient::new(t.on(channel(c.comet_addrs[0].rpc_port)));
    let mid = comet
        .push(push)
        .await
        .expect("push with the token")
        .into_inner()
        .mid;
    assert_eq!(mid, 1);
    assert_eq!(c.client().push("k", "2", None).await.expect("web push"), 2);
}
