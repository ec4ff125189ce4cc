//! Bad input gets a clear error (HTTP status with a JSON body, or a protocol
//! error frame) and limits hold: key length, message size, expiry, keys per
//! multi-push, subscribers per key, tokens, heartbeats, slow consumers.

use futures::{SinkExt, StreamExt};
use pushcluster_systest::{collect, subscribe, Cluster, Options, Transport};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as Ws;

async fn call(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_json_with_gopush_codes() {
    let c = Cluster::start(Options::default());
    let h = reqwest::Client::new();
    let (p, a) = (&c.public_url, &c.admin_url);
    let long_key = "k".repeat(65);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, i64)> = vec![
        (
            "resolve without key",
            h.get(format!("{p}/1/server/get")),
            400,
            65534,
        ),
        (
            "unknown protocol",
            h.get(format!("{p}/1/server/get?k=a&p=9")),
            400,
            65534,
        ),
        (
            "key too long",
            h.get(format!("{p}/1/server/get?k={long_key}")),
            400,
            65534,
        ),
        (
            "key with space",
            h.get(format!("{p}/1/server/get?k=a%20b")),
            400,
            65534,
        ),
        (
            "msg/get without m",
            h.get(format!("{p}/1/msg/get?k=a")),
            400,
            65534,
        ),
        (
            "msg/get bad m",
            h.get(format!("{p}/1/msg/get?k=a&m=x")),
            400,
            65534,
        ),
        (
            "legacy msg/get bad pmid",
            h.get(format!("{p}/msg/get?key=a&mid=0&pmid=z")),
            400,
            65534,
        ),
        ("unknown path", h.get(format!("{p}/nope")), 404, 65534),
        (
            "admin not on public",
            h.post(format!("{p}/1/admin/push/private?key=a")).body("1"),
            404,
            65534,
        ),
        (
            "push without key",
            h.post(format!("{a}/1/admin/push/private")).body("1"),
            400,
            65534,
        ),
        (
            "push bad json",
            h.post(format!("{a}/1/admin/push/private?key=a")).body("{x"),
            400,
            65534,
        ),
        (
            "push empty",
            h.post(format!("{a}/1/admin/push/private?key=a")),
            400,
            65534,
        ),
        (
            "push bad expire",
            h.post(format!("{a}/1/admin/push/private?key=a&expire=x"))
                .body("1"),
            400,
            65534,
        ),
        (
            "push expire too long",
            h.post(format!("{a}/1/admin/push/private?key=a&expire=99999999999"))
                .body("1"),
            400,
            65534,
        ),
        (
            "push too large",
            h.post(format!("{a}/1/admin/push/private?key=a"))
                .body(format!("\"{}\"", "x".repeat(70_000))),
            413,
            65534,
        ),
        (
            "mpush not json",
            h.post(format!("{a}/1/admin/push/mprivate")).body("k=a"),
            400,
            65534,
        ),
        (
            "mpush no keys",
            h.post(format!("{a}/1/admin/push/mprivate"))
                .body(r#"{"m":"1"}"#),
            400,
            65534,
        ),
        (
            "mpush too many keys",
            h.post(format!("{a}/1/admin/push/mprivate")).body(format!(
                r#"{{"m":"1","k":"{}"}}"#,
                (0..51)
                    .map(|i| format!("k{i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            400,
            65534,
        ),
        (
            "broadcast bad json",
            h.post(format!("{a}/1/admin/push/broadcast")).body("nope"),
            400,
            65534,
        ),
        (
            "delete without key",
            h.post(format!("{a}/1/admin/msg/del")),
            400,
            65534,
        ),
    ];
    for (what, req, status, ret) in cases {
        let (s, v) = call(req).await;
        assert_eq!((s, v["ret"].as_i64()), (status, Some(ret)), "{what}: {v}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no message"
        );
    }
    // Nothing was stored by the refused pushes.
    assert_eq!(c.client().last_mids("a").await.unwrap().0, 0);
    // JSONP: valid callbacks wrap the reply (HTTP 200 even on errors); others are refused.
    let body = h
        .get(format!("{p}/1/server/get?k=a&p=1&cb=cb_1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.starts_with("cb_1({") && body.ends_with(')'), "{body}");
    let r = h
        .get(format!("{p}/1/server/get?p=1&cb=cb"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("65534"));
    let (s, v) = call(h.get(format!("{p}/1/server/get?k=a&cb=alert(1)"))).await;
    assert_eq!((s, v["ret"].as_i64()), (400, Some(65534)));
    // Legacy replies carry "msg":"ok".
    let (_, v) = call(h.get(format!("{p}/time/get"))).await;
    assert_eq!(
        (v["ret"].as_i64(), v["msg"].as_str()),
        (Some(0), Some("ok"))
    );
    assert!(v["data"]["timeid"].as_i64().unwrap() > 0);
    // No response of either listener is sniffed into another type.
    for url in [
        format!("{p}/1/time/get"),
        format!("{p}/1/server/get"),
        format!("{p}/1/server/get?k=a&cb=cb"),
        format!("{a}/nope"),
    ] {
        let r = h.get(&url).send().await.expect("request");
        assert_eq!(
            r.headers()
                .get("x-content-type-options")
                .and_then(|v| v.to_str().ok()),
            Some("nosniff"),
            "{url}"
        );
    }
    // The OpenAPI document lists every route.
    let (_, spec) = call(h.get(format!("{p}/openapi.json"))).await;
    for path in [
        "/1/server/get",
        "/1/msg/get",
        "/1/time/get",
        "/server/get",
        "/msg/get",
        "/time/get",
        "/1/admin/push/private",
        "/1/admin/push/mprivate",
        "/1/admin/push/broadcast",
        "/1/admin/msg/del",
        "/admin/push",
        "/admin/msg/clean",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from openapi.json"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_when_configured() {
    let c = Cluster::start(Options {
        admin_token: Some("s3cret".into()),
        ..Options::default()
    });
    let h = reqwest::Client::new();
    let url = format!("{}/1/admin/push/private?key=a", c.admin_url);
    let (s, v) = call(h.post(&url).body("1")).await;
    assert_eq!((s, v["ret"].as_i64()), (401, Some(65533)));
    let (s, _) = call(h.post(&url).bearer_auth("wrong").body("1")).await;
    assert_eq!(s, 401);
    let (s, v) = call(h.post(&url).bearer_auth("s3cret").body("1")).await;
    assert_eq!((s, v["data"]["mid"].as_i64()), (200, Some(1)));
    // The public listener needs no token.
    let (s, _) = call(h.get(format!("{}/1/msg/get?k=a&m=0", c.public_url))).await;
    assert_eq!(s, 200);
}

async fn ws_first_frame(addr: &str, query: &str) -> String {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/sub?{query}"))
        .await
        .expect("upgrade");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("frame")
        {
            Some(Ok(Ws::Text(t))) => return t.to_string(),
            Some(Ok(Ws::Close(_))) | None => return "closed".into(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return format!("error {e}"),
        }
    }
}

async fn tcp_reply(addr: &str, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_error_frames() {
    let c = Cluster::start(Options {
        shards: 2,
        max_subscribers_per_key: 2,
        ..Options::default()
    });
    let view = c.client();
    // A key of each shard, so the wrong comet can be asked too.
    let (mut k0, mut k1) = (None, None);
    for i in 0..100 {
        let k = format!("key{i}");
        let addr = view
            .resolve(&k, pushcluster_client::http::Proto::WebSocket)
            .await
            .unwrap();
        if addr == c.comet_addrs[0].ws {
            k0.get_or_insert(k)
        } else {
            k1.get_or_insert(k)
        };
    }
    let (k0, k1) = (k0.unwrap(), k1.unwrap());
    let ws0 = &c.comet_addrs[0].ws;
    assert_eq!(
        ws_first_frame(ws0, &format!("key={k0}")).await,
        "-p\r\n",
        "no heartbeat"
    );
    assert_eq!(
        ws_first_frame(ws0, &format!("key={k0}&heartbeat=x")).await,
        "-p\r\n"
    );
    assert_eq!(
        ws_first_frame(ws0, "heartbeat=30").await,
        "-p\r\n",
        "no key"
    );
    assert_eq!(
        ws_first_frame(ws0, &format!("key={}&heartbeat=30", "k".repeat(65))).await,
        "-p\r\n"
    );
    assert_eq!(
        ws_first_frame(ws0, &format!("key={k1}&heartbeat=30")).await,
        "-c\r\n",
        "wrong comet"
    );
    assert_eq!(
        ws_first_frame(ws0, &format!("key={k0}&heartbeat=30")).await,
        "+h\r\n"
    );

    let tcp0 = &c.comet_addrs[0].tcp;
    assert_eq!(tcp_reply(tcp0, b"GET / HTTP/1.1\r\n\r\n").await, "-p\r\n");
    assert_eq!(tcp_reply(tcp0, b"*1\r\n$4\r\nping\r\n").await, "-p\r\n");
    assert_eq!(
        tcp_reply(tcp0, b"*2\r\n$3\r\nsub\r\n$2\r\nk0\r\n").await,
        "-p\r\n",
        "no heartbeat"
    );
    let sub = |k: &str| format!("*3\r\n$3\r\nsub\r\n${}\r\n{k}\r\n$2\r\n30\r\n", k.len());
    assert_eq!(
        tcp_reply(tcp0, sub(&k1).as_bytes()).await,
        "-c\r\n",
        "wrong comet"
    );

    // The subscriber limit per key (2 here): the third connection gets -c.
    let _a = subscribe(&c, &k0, Transport::Tcp, true).await;
    let _b = subscribe(&c, &k0, Transport::Ws, true).await;
    assert_eq!(tcp_reply(tcp0, sub(&k0).as_bytes()).await, "-c\r\n");
    assert_eq!(
        ws_first_frame(ws0, &format!("key={k0}&heartbeat=30")).await,
        "-c\r\n"
    );
    drop(_a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tcp_reply(tcp0, sub(&k0).as_bytes())
        .await
        .starts_with("+h\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_tokens_are_verified() {
    let secret = "tok-secret";
    let c = Cluster::start(Options {
        shards: 1,
        subscriber_secret: Some(secret.into()),
        ..Options::default()
    });
    let ws = &c.comet_addrs[0].ws;
    let now = pushcluster_core::token::unix_now();
    let good = pushcluster_core::token::mint(secret.as_bytes(), "alice", now + 60);
    let for_bob = pushcluster_core::token::mint(secret.as_bytes(), "bob", now + 60);
    let expired = pushcluster_core::token::mint(secret.as_bytes(), "alice", now - 1);
    // Signed, but good for a year: beyond the default bound of a week.
    let too_long = pushcluster_core::token::mint(secret.as_bytes(), "alice", now + 365 * 86400);
    assert_eq!(ws_first_frame(ws, "key=alice&heartbeat=30").await, "-a\r\n");
    assert_eq!(
        ws_first_frame(ws, &format!("key=alice&heartbeat=30&token={too_long}")).await,
        "-a\r\n"
    );
    assert_eq!(
        ws_first_frame(ws, &format!("key=alice&heartbeat=30&token={for_bob}")).await,
        "-a\r\n"
    );
    assert_eq!(
        ws_first_frame(ws, &format!("key=alice&heartbeat=30&token={expired}")).await,
        "-a\r\n"
    );
    assert_eq!(
        ws_first_frame(ws, &format!("key=alice&heartbeat=30&token={good}")).await,
        "+h\r\n"
    );
    let tcp = format!(
        "*4\r\n$3\r\nsub\r\n$5\r\nalice\r\n$2\r\n30\r\n${}\r\n{good}\r\n",
        good.len()
    );
    assert!(tcp_reply(&c.comet_addrs[0].tcp, tcp.as_bytes())
        .await
        .starts_with("+h\r\n"));
    let r = reqwest::get(format!("http://{ws}/sub/sse?key=alice&token=bad"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Four WebSocket refusals and one SSE: each counted, the good ones not.
    assert_eq!(
        c.comet_metric(0, "pushcluster_comet_token_refusals_total"),
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_connection_and_silence_closes_it() {
    let c = Cluster::start(Options {
        shards: 1,
        heartbeat_grace_seconds: 1,
        ..Options::default()
    });
    let ws = &c.comet_addrs[0].ws;
    // A client that beats every 300 ms stays, and each beat is answered.
    let (mut alive, _) =
        tokio_tungstenite::connect_async(format!("ws://{ws}/sub?key=beat&heartbeat=1&ver=1"))
            .await
            .unwrap();
    let (mut silent, _) =
        tokio_tungstenite::connect_async(format!("ws://{ws}/sub?key=quiet&heartbeat=1"))
            .await
            .unwrap();
    let started = Instant::now();
    let mut replies = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        alive.send(Ws::Text("h".into())).await.unwrap();
        if let Ok(Some(Ok(Ws::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(300), alive.next()).await
        {
            assert_eq!(t.as_str(), "+h\r\n");
            replies += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(replies >= 5, "only {replies} heartbeat replies");
    // The silent one (heartbeat 1 s + grace 1 s) was closed after its +h.
    let mut frames = Vec::new();
    while let Ok(Some(Ok(f))) = tokio::time::timeout(Duration::from_secs(1), silent.next()).await {
        frames.push(f);
    }
    assert_eq!(frames.first(), Some(&Ws::Text("+h\r\n".into())));
    assert!(
        silent.send(Ws::Text("h".into())).await.is_err()
            || frames.iter().any(|f| matches!(f, Ws::Close(_))),
        "silent connection still open: {frames:?}"
    );
    // A TCP client that beats is answered too.
    let mut tcp = tokio::net::TcpStream::connect(&c.comet_addrs[0].tcp)
        .await
        .unwrap();
    tcp.write_all(b"*3\r\n$3\r\nsub\r\n$4\r\nbeat\r\n$1\r\n1\r\nh")
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"+h\r\n+h\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_dropped_without_slowing_the_others() {
    let c = Cluster::start(Options {
        shards: 1,
        queue_depth: 4,
        ..Options::default()
    });
    let api = c.client();
    // Subscribes over TCP and then never reads.
    let mut stalled = tokio::net::TcpStream::connect(&c.comet_addrs[0].tcp)
        .await
        .unwrap();
    stalled
        .write_all(b"*4\r\n$3\r\nsub\r\n$4\r\nslow\r\n$3\r\n600\r\n$0\r\n\r\n")
        .await
        .unwrap();
    let mut reader = subscribe(&c, "slow", Transport::Ws, true).await;
    let big = format!("\"{}\"", "x".repeat(60_000));
    let mut pushed = 0;
    while c.comet_metric(0, "pushcluster_comet_slow_consumers_dropped_total") < 1.0 {
        assert!(
            pushed < 2000,
            "no slow consumer detected after {pushed} pushes"
        );
        api.push("slow", &big, Some(60)).await.unwrap();
        pushed += 1;
        let got = collect(&mut reader, 1, Duration::from_secs(5)).await;
        assert_eq!(got[0].mid, pushed, "the reading subscriber fell behind");
    }
    eprintln!("slow consumer dropped after {pushed} pushes of 60 KB");
    // The stalled connection was closed by the comet: reading it ends in EOF.
    let mut sink = vec![0u8; 1 << 20];
    let eof = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert_eq!(eof, Ok(true), "stalled connection was not closed");
    // And the healthy subscriber keeps receiving.
    let mid = api.push("slow", "1", None).await.unwrap();
    assert_eq!(
        collect(&mut reader, 1, Duration::from_secs(5)).await[0].mid,
        mid
    );
}

/// Reads one server frame: (first byte, payload). Server frames are unmasked
/// and these are short.
async fn server_frame(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .expect("frame header");
    assert!(head[1] < 126, "short frame expected, got {head:?}");
    let mut payload = vec![0u8; head[1] as usize];
    s.read_exact(&mut payload).await.expect("frame payload");
    (head[0], payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshake_and_framing_are_checked() {
    use pushcluster_core::websocket::{accept_key, client_frame, Opcode};
    let c = Cluster::start(Options {
        shards: 1,
        ..Options::default()
    });
    let ws = &c.comet_addrs[0].ws;
    let h = reqwest::Client::new();
    // A plain GET is not an upgrade: 400 with a JSON body.
    let (status, body) = call(h.get(format!("http://{ws}/sub?key=a&heartbeat=30"))).await;
    assert_eq!((status, body["ret"].as_i64()), (400, Some(65534)), "{body}");
    // An unsupported WebSocket version: 426 naming the supported one.
    let r = h
        .get(format!("http://{ws}/sub?key=a&heartbeat=30"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 426);
    assert_eq!(r.headers()["sec-websocket-version"], "13");

    // A raw handshake, so the frames below are exactly what is on the wire.
    let mut s = tokio::net::TcpStream::connect(ws).await.unwrap();
    let key = "x3JJHMbDL1EzLkh9GBhXDw==";
    s.write_all(
        format!(
            "GET /sub?key=raw&heartbeat=30&ver=1 HTTP/1.1\r\nHost: {ws}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("handshake reply");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}",
            accept_key(key).to_ascii_lowercase()
        )),
        "{head}"
    );
    assert_eq!(server_frame(&mut s).await, (0x81, b"+h\r\n".to_vec()));
    // A ping is answered with a pong carrying the same payload.
    s.write_all(&client_frame(Opcode::Ping, b"p1", [1, 2, 3, 4]))
        .await
        .unwrap();
    assert_eq!(server_frame(&mut s).await, (0x8A, b"p1".to_vec()));
    // A heartbeat split over two fragments is one heartbeat.
    let mut first = client_frame(Opcode::Text, b"", [5, 6, 7, 8]);
    first[0] &= 0x7F;
    let rest = client_frame(Opcode::Continuation, b"h", [9, 9, 9, 9]);
    s.write_all(&[first, rest].concat()).await.unwrap();
    assert_eq!(server_frame(&mut s).await, (0x81, b"+h\r\n".to_vec()));
    // An unmasked client frame breaks the protocol: close 1002, then EOF.
    s.write_all(&[0x81, 1, b'h']).await.unwrap();
    let (op, payload) = server_frame(&mut s).await;
    assert_eq!((op, &payload[..2]), (0x88, &1002u16.to_be_bytes()[..]));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "bytes after close: {rest:?}");
}
