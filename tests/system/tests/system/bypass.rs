//! Pushes that bypass their comet still reach its connected subscribers: when
//! a comet cannot store a push (its message service unreachable), web stores
//! it itself and hands it to the comet, so nobody connected waits for a
//! reconnect that may be hours away to see it.

use pushcluster_client::http::Proto;
use pushcluster_systest::{collect, subscribe, Cluster, Options, Transport};
use std::time::{Duration, Instant};

/// The comets' connections to the message service are cut for 3 s (web's
/// are not) with subscribers on every transport and pushes running: every
/// acknowledged push arrives live, within a second of its acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_web_stored_itself_reaches_connected_subscribers_live() {
    let c = Cluster::start(Options {
        comet_message_proxy: true,
        ..Options::default()
    });
    let api = c.client();
    let key = "bypassed";
    let mut subs = Vec::new();
    for t in [Transport::Ws, Transport::Tcp, Transport::Sse] {
        subs.push(subscribe(&c, key, t, true).await);
    }
    api.resolve(key, Proto::WebSocket).await.expect("resolve");
    let first = api.push(key, r#"{"n":0}"#, Some(600)).await.expect("push");
    for sub in &mut subs {
        assert_eq!(collect(sub, 1, Duration::from_secs(5)).await[0].mid, first);
    }

    let proxy = c.comet_message_proxy.as_ref().expect("proxy");
    proxy.cut();
    let cut_at = Instant::now();
    let (mut pushed, mut slowest) = (0, Duration::ZERO);
    while cut_at.elapsed() < Duration::from_secs(3) {
        pushed += 1;
        let mid = api
            .push(key, &format!(r#"{{"n":{pushed}}}"#), Some(600))
            .await
            .expect("push while the comets cannot store");
        let acked = Instant::now();
        // Each acknowledged push on every subscriber within a second.
        for (i, sub) in subs.iter_mut().enumerate() {
            let got = collect(sub, 1, Duration::from_secs(1)).await;
            assert_eq!(got[0].mid, mid, "subscriber {i}");
        }
        slowest = slowest.max(acked.elapsed());
    }
    proxy.thaw();
    let metric = |name| pushcluster_systest::metric(c.web.ops_port, name);
    let stored_by_web = metric("pushcluster_web_stored_without_comet_total");
    let told = metric("pushcluster_web_told_comet_total");
    eprintln!(
        "comets cut from the message service for 3 s: {pushed} pushes acknowledged, \
         {stored_by_web} stored by web, {told} handed to the comet, \
         every one on every subscriber, the slowest {slowest:?} after its acknowledgement"
    );
    assert!(stored_by_web >= 1.0, "web never stored a push itself");
    assert!(told >= 1.0, "web never handed a push to the comet");
}
