//! Message-size safety end to end: a backlog of the largest messages a push
//! may carry is read back in full, through web (paged by count and bytes) and
//! through an SSE resume (paged inside the comet), never as one reply too big
//! for gRPC.

use pushcluster_client::sub::{Params, Subscriber};
use pushcluster_client::Frame;
use pushcluster_systest::{Cluster, Options};
use std::time::{Duration, Instant};

/// A JSON message of exactly `size` bytes carrying `i`.
fn message(i: usize, size: usize) -> String {
    let head = format!(r#"{{"i":{i},"pad":""#);
    let pad = size - head.len() - 2;
    format!("{head}{}\"}}", "x".repeat(pad))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_of_64_kib_are_read_back_through_web_and_sse() {
    const N: usize = 1000;
    const SIZE: usize = 64 * 1024;
    let c = Cluster::start(Options {
        shards: 1,
        max_message_bytes: SIZE,
        ..Options::default()
    });
    let api = c.client();
    let key = "big";
    let started = Instant::now();
    for i in 0..N {
        let body = message(i, SIZE);
        assert_eq!(body.len(), SIZE);
        let mid = api.push(key, &body, None).await.expect("push");
        assert_eq!(mid, i as i64 + 1);
    }
    let pushed = started.elapsed();

    // Web: page after page from the last mid until nothing new.
    let (mut after, mut pages, mut got) = (0, 0, 0usize);
    loop {
        let (page, _) = api.fetch(key, after, None).await.expect("fetch");
        if page.is_empty() {
            break;
        }
        pages += 1;
        for m in &page {
            assert_eq!(m.mid, after + 1, "web pages must be contiguous");
            let want: serde_json::Value = serde_json::from_str(&message(got, SIZE)).expect("JSON");
            assert!(m.msg == want, "message {got} came back altered");
            after = m.mid;
            got += 1;
        }
    }
    assert_eq!(got, N);
    assert!(pages > 1, "64 MiB cannot come in one page");

    // SSE: resume from the start; every stored message arrives, in order.
    let p = Params {
        key: key.into(),
        heartbeat: 30,
        token: None,
        versioned: true,
    };
    let mut sub = Subscriber::sse(&c.comet_addrs[0].ws, &p, Some(0))
        .await
        .expect("SSE subscribe");
    let mut next = 1;
    while next <= N as i64 {
        match sub
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("SSE event")
        {
            Frame::Message(m) => {
                assert_eq!(m.mid, next, "SSE resume out of order");
                next += 1;
            }
            Frame::Heartbeat => {}
            other => panic!("unexpected SSE frame {other:?}"),
        }
    }
    println!(
        "sizes: {N} messages of {SIZE} bytes pushed in {:.1} s; web returned them in {pages} pages; SSE resume delivered all {N} in order",
        pushed.as_secs_f64()
    );
}
