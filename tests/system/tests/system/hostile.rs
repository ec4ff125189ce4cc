//! Hostile WebSocket clients against the real comet: broken framing gets the
//! RFC's close code, the close handshake is honoured both ways, and a client
//! that floods pings without reading holds a bounded buffer and is dropped,
//! while a normal subscriber on the same comet keeps receiving.

use pushcluster_core::websocket::{client_frame, Opcode};
use pushcluster_systest::{metric, subscribe, Cluster, Options, Transport};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw WebSocket subscribed to `key`, its `+h` frame read.
async fn raw_ws(addr: &str, key: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "GET /sub?key={key}&heartbeat=30&ver=1 HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("handshake");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("handshake reply");
        head.push(b[0]);
    }
    assert_eq!(frame(&mut s).await, (0x81, b"+h\r\n".to_vec()));
    s
}

/// One short server frame: (first byte, payload).
async fn frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .expect("frame header");
    let mut payload = vec![0u8; (head[1] & 0x7F) as usize];
    s.read_exact(&mut payload).await.expect("payload");
    (head[0], payload)
}

/// Reads until the connection ends (EOF, or a reset when the server closed
/// with our bytes unread); how long it took.
async fn eof(s: &mut TcpStream) -> Duration {
    let t = Instant::now();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the connection ends in time");
    assert!(
        end.is_ok()
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    t.elapsed()
}

fn mask() -> [u8; 4] {
    [0x11, 0x22, 0x33, 0x44]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_framing_gets_the_rfc_close_code_and_closes_are_answered() {
    let c = Cluster::start(Options {
        shards: 1,
        ..Options::default()
    });
    let ws = c.comet_addrs[0].ws.clone();
    let close_code = |p: &[u8]| u16::from_be_bytes([p[0], p[1]]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a whole text frame inside a fragmented message",
            [
                {
                    let mut f = client_frame(Opcode::Text, b"a", mask());
                    f[0] &= 0x7F;
                    f
                },
                client_frame(Opcode::Text, b"h", mask()),
            ]
            .concat(),
            1002,
        ),
        (
            "a continuation with nothing to continue",
            client_frame(Opcode::Continuation, b"h", mask()),
            1002,
        ),
        (
            "text that is not UTF-8",
            client_frame(Opcode::Text, &[0xC3, 0x28], mask()),
            1007,
        ),
        (
            "a close with a 1-byte body",
            client_frame(Opcode::Close, &[3], mask()),
            1002,
        ),
        (
            "a frame above the limit",
            client_frame(Opcode::Binary, &[0; 2000], mask()),
            1009,
        ),
    ];
    for (what, bytes, want) in cases {
        let mut s = raw_ws(&ws, "hostile").await;
        s.write_all(&bytes).await.expect("write");
        let (op, payload) = frame(&mut s).await;
        assert_eq!((op, close_code(&payload)), (0x88, want), "{what}");
        // Failing the connection: TCP ends at once, no answer awaited.
        let took = eof(&mut s).await;
        assert!(took < Duration::from_secs(1), "{what}: EOF after {took:?}");
    }
    // A clean close from the server (an unknown message gets `-p`): it
    // waits for our close, then ends TCP.
    let mut s = raw_ws(&ws, "answering").await;
    s.write_all(&client_frame(Opcode::Text, b"what", mask()))
        .await
        .expect("write");
    assert_eq!(frame(&mut s).await, (0x81, b"-p\r\n".to_vec()));
    let (op, payload) = frame(&mut s).await;
    assert_eq!((op, close_code(&payload)), (0x88, 1000));
    s.write_all(&client_frame(Opcode::Close, &1000u16.to_be_bytes(), mask()))
        .await
        .expect("our close");
    let took = eof(&mut s).await;
    assert!(
        took < Duration::from_secs(1),
        "EOF {took:?} after our close"
    );
    // The client closes first: its code is echoed and TCP ends at once.
    let mut s = raw_ws(&ws, "polite").await;
    s.write_all(&client_frame(
        Opcode::Close,
        &[0x03, 0xE9, b'b', b'y', b'e'],
        mask(),
    ))
    .await
    .expect("close");
    let (op, payload) = frame(&mut s).await;
    assert_eq!((op, close_code(&payload)), (0x88, 1001));
    assert!(eof(&mut s).await < Duration::from_secs(1));
    // A client that never answers the server's close is cut off after the
    // close limit.
    let mut s = raw_ws(&ws, "mute").await;
    s.write_all(&client_frame(Opcode::Text, b"what", mask()))
        .await
        .expect("write");
    assert_eq!(frame(&mut s).await.0, 0x81);
    assert_eq!(frame(&mut s).await.0, 0x88);
    let waited = eof(&mut s).await;
    assert!(
        waited > Duration::from_millis(1500) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_floods_pings_and_never_reads_is_bounded_and_dropped() {
    let c = Cluster::start(Options {
        shards: 1,
        ..Options::default()
    });
    let ws = c.comet_addrs[0].ws.clone();
    let api = c.client();
    let mut normal = subscribe(&c, "normal", Transport::Ws, true).await;
    let before = c.comets[0].rss_kib();

    // 64 MiB of pings with 120-byte payloads, never reading a pong.
    let mut flood = raw_ws(&ws, "flood").await;
    let ping = client_frame(Opcode::Ping, &[b'p'; 120], mask());
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 4096)
        .collect();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < 64 << 20 {
            match tokio::time::timeout(Duration::from_secs(3), flood.write_all(&burst)).await {
                Ok(Ok(())) => sent += burst.len(),
                // The comet stopped reading us (or dropped us): we block.
                _ => break,
            }
        }
        (sent, flood)
    });
    // The normal subscriber keeps receiving meanwhile.
    let mut delivered = 0;
    for i in 0..20 {
        let mid = api
            .push("normal", &format!(r#"{{"i":{i}}}"#), None)
            .await
            .expect("push");
        let got = pushcluster_systest::collect(&mut normal, 1, Duration::from_secs(5)).await;
        assert_eq!(got.iter().map(|m| m.mid).collect::<Vec<_>>(), vec![mid]);
        delivered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, mut flood) = writer.await.expect("writer");
    let during = c.comets[0].rss_kib();
    assert!(
        sent < 64 << 20,
        "the comet read all 64 MiB of pings without our reading a pong"
    );
    // It is dropped as a slow consumer once its buffer stayed full (we do
    // not read: reading would make it a client that keeps up).
    let t = Instant::now();
    let slow = || {
        metric(
            c.comets[0].ops_port,
            "pushcluster_comet_slow_consumers_dropped_total",
        )
    };
    while slow() < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the flooding client was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dropped = slow();
    // When it finally reads: the end (a reset, as the comet dropped the
    // socket with our unread pings in it).
    eof(&mut flood).await;
    let after = c.comets[0].rss_kib();
    println!(
        "hostile ping flood: the flooder wrote {} KiB of pings (kernel buffers included) before the comet stopped reading; RSS before {before} KiB, \
         during {during} KiB, after {after} KiB; dropped after {:.1} s more (slow consumers {dropped}); \
         the normal subscriber received {delivered}/20 pushes",
        sent / 1024,
        t.elapsed().as_secs_f64()
    );
    assert!(dropped >= 1.0);
    assert!(
        during < before + 32 * 1024,
        "RSS grew from {before} to {during} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_open_handshakes_do_not_starve_normal_subscribers() {
    let c = Cluster::start(Options {
        shards: 1,
        listener_limits: pushcluster_core::serve::ListenerLimits {
            header_timeout_seconds: 2,
            ..Default::default()
        },
        ..Options::default()
    });
    let ws = c.comet_addrs[0].ws.clone();
    let api = c.client();
    let mut normal = Vec::new();
    for i in 0..100 {
        normal.push(subscribe(&c, &format!("n-{i}"), Transport::Ws, true).await);
    }
    let before = c.comets[0].rss_kib();
    // Slowloris: a handshake's first line and one header, then silence.
    let mut lorises = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(&ws).await.expect("connect");
        s.write_all(format!("GET /sub?key=l-{i}&heartbeat=30 HTTP/1.1\r\nHost: x\r\n").as_bytes())
            .await
            .expect("partial handshake");
        lorises.push(s);
    }
    let during = c.comets[0].rss_kib();
    // Every normal subscriber keeps receiving meanwhile; latency per push,
    // from the push to its arrival.
    let mut waits = Vec::new();
    for round in 0..3 {
        for (i, sub) in normal.iter_mut().enumerate() {
            let t = Instant::now();
            let mid = api
                .push(&format!("n-{i}"), &format!(r#"{{"r":{round}}}"#), None)
                .await
                .expect("push");
            let got = pushcluster_systest::collect(sub, 1, Duration::from_secs(5)).await;
            assert_eq!(got[0].mid, mid);
            waits.push(t.elapsed());
        }
    }
    waits.sort();
    let p99 = waits[waits.len() * 99 / 100];
    // The header deadline (2 s) ends every half-open handshake.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut closed = 0;
    for s in &mut lorises {
        let mut b = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            // hyper may answer 408 first, then close.
            Ok(Ok(_)) => {
                if matches!(
                    tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                ) {
                    closed += 1;
                }
            }
            Err(_) => {}
        }
    }
    let after = c.comets[0].rss_kib();
    println!(
        "slowloris: 1000 half-open handshakes held; 100 normal subscribers received 300/300 pushes, p99 push-to-delivery {:.1} ms; \
         {closed}/1000 half-open connections closed by the 2 s header deadline; comet RSS before {before} KiB, during {during} KiB, after {after} KiB",
        p99.as_secs_f64() * 1000.0
    );
    assert_eq!(
        closed, 1000,
        "half-open handshakes outlived the header deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_a_clear_refusal() {
    let c = Cluster::start(Options {
        shards: 1,
        listener_limits: pushcluster_core::serve::ListenerLimits {
            max_connections: 20,
            max_connections_per_ip: 0,
            header_timeout_seconds: 10,
        },
        ..Options::default()
    });
    let ws = c.comet_addrs[0].ws.clone();
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(raw_ws(&ws, &format!("cap-{i}")).await);
    }
    // The 21st WebSocket: 503 with a JSON body, then closed.
    let mut s = TcpStream::connect(&ws).await.expect("connect");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
        .await
        .expect("a refusal in time")
        .expect("read");
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 503") && reply.contains("max_connections"),
        "{reply}"
    );
    // TCP subscribers: the channel error frame.
    let tcp = c.comet_addrs[0].tcp.clone();
    let mut t = Vec::new();
    for _ in 0..20 {
        t.push(TcpStream::connect(&tcp).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = TcpStream::connect(&tcp).await.expect("connect");
    let mut b = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut b))
        .await
        .expect("a refusal in time")
        .expect("read");
    assert_eq!(b, b"-c\r\n");
    let refused = metric(
        c.comets[0].ops_port,
        "pushcluster_listener_refused_connections_total",
    );
    assert!(refused >= 2.0, "refusals counted: {refused}");
    // A place freed is a place taken again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _again = raw_ws(&ws, "cap-again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_and_clients_that_never_read_tcp_or_sse_are_dropped() {
    let c = Cluster::start(Options {
        shards: 1,
        queue_depth: 100_000,
        ..Options::default()
    });
    let ws = c.comet_addrs[0].ws.clone();
    let api = c.client();
    let mut normal = subscribe(&c, "normal", Transport::Ws, true).await;
    let before = c.comets[0].rss_kib();
    // 200 KiB of headers: refused with 431 instead of buffered.
    let mut s = TcpStream::connect(&ws).await.expect("connect");
    let big = format!(
        "GET /sub?key=big&heartbeat=30 HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 431"),
        "oversized headers got: {reply:.80}"
    );
    // Web's listeners too.
    let public = c.public_url.trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(&public).await.expect("connect");
    let _ = s
        .write_all(
            big.replace("/sub?key=big&heartbeat=30", "/1/time/get")
                .as_bytes(),
        )
        .await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 431"));

    // A TCP and an SSE subscriber that never read, under a stream of large
    // pushes: both are dropped as slow consumers, the normal one is served.
    let tcp = c.comet_addrs[0].tcp.clone();
    let mut t = TcpStream::connect(&tcp).await.expect("connect");
    t.write_all(b"*3\r\n$3\r\nsub\r\n$4\r\nmute\r\n$2\r\n30\r\n")
        .await
        .expect("sub");
    let mut sse = TcpStream::connect(&ws).await.expect("connect");
    sse.write_all(b"GET /sub/sse?key=mute HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("sse");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = format!(r#"{{"pad":"{}"}}"#, "p".repeat(60_000));
    let slow = || {
        metric(
            c.comets[0].ops_port,
            "pushcluster_comet_slow_consumers_dropped_total",
        )
    };
    let t0 = Instant::now();
    let mut pushed = 0;
    while slow() < 2.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "never-reading TCP/SSE subscribers were not dropped"
        );
        api.push("mute", &body, None).await.expect("push");
        let mid = api.push("normal", "1", None).await.expect("push");
        let got = pushcluster_systest::collect(&mut normal, 1, Duration::from_secs(5)).await;
        assert_eq!(got[0].mid, mid);
        pushed += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = c.comets[0].rss_kib();
    println!(
        "oversized headers: 431 from comet and web; never-reading TCP and SSE subscribers dropped after {:.1} s \
         ({pushed} pushes of 60 KB to them), the normal subscriber got all {pushed}; RSS before {before} KiB, after {after} KiB",
        t0.elapsed().as_secs_f64()
    );
    drop((t, sse));
}
