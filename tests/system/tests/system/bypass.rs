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
/// Web stores each push itself and hands it to the comet (`Deliver`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_web_stored_itself_reaches_connected_subscribers_live() {
    let c = Cluster::start(Options {
        comet_message_proxy: true,
        ..Options::default()
    });
    let proxy = c.comet_message_proxy.as_ref().expect("proxy");
    let (pushed, slowest) =
        every_push_live_while(&c, "bypassed", || proxy.cut(), || proxy.thaw()).await;
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

/// Web cannot reach the comets for 3 s while their clients can: web stores
/// every push itself, cannot hand it over, and the message service
/// announces it to the comets instead (`Bypassed`), so every acknowledged
/// push still arrives live within a second of its acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_web_could_not_hand_over_reaches_connected_subscribers_live() {
    let c = Cluster::start(Options {
        web_comet_proxy: true,
        ..Options::default()
    });
    let cut = || c.web_comet_proxies.iter().for_each(|p| p.cut());
    let heal = || c.web_comet_proxies.iter().for_each(|p| p.thaw());
    let (pushed, slowest) = every_push_live_while(&c, "unreachable", cut, heal).await;
    let web = |name| pushcluster_systest::metric(c.web.ops_port, name);
    let stored_by_web = web("pushcluster_web_stored_without_comet_total");
    eprintln!(
        "web cut from the comets for 3 s: {pushed} pushes acknowledged, {stored_by_web} stored by \
         web and announced, every one on every subscriber, the slowest {slowest:?} after its \
         acknowledgement"
    );
    assert!(
        stored_by_web >= pushed as f64,
        "web stored {stored_by_web} of {pushed} itself"
    );
}

/// Subscribes to `key` on every transport, breaks something with `fault`
/// for 3 s of pushes, then `heal`s it: every acknowledged push must reach
/// every subscriber within a second. How many were pushed, and the slowest
/// arrival after its acknowledgement.
async fn every_push_live_while(
    c: &Cluster,
    key: &str,
    fault: impl Fn(),
    heal: impl Fn(),
) -> (usize, Duration) {
    let api = c.client();
    let mut subs = Vec::new();
    for t in [Transport::Ws, Transport::Tcp, Transport::Sse] {
        subs.push(subscribe(c, key, t, true).await);
    }
    api.resolve(key, Proto::WebSocket).await.expect("resolve");
    let first = api.push(key, r#"{"n":0}"#, Some(600)).await.expect("push");
    for sub in &mut subs {
        assert_eq!(collect(sub, 1, Duration::from_secs(5)).await[0].mid, first);
    }
    fault();
    let cut_at = Instant::now();
    let (mut pushed, mut slowest) = (0, Duration::ZERO);
    while cut_at.elapsed() < Duration::from_secs(3) {
        pushed += 1;
        let mid = api
            .push(key, &format!(r#"{{"n":{pushed}}}"#), Some(600))
            .await
            .expect("push during the fault");
        let acked = Instant::now();
        for (i, sub) in subs.iter_mut().enumerate() {
            let got = collect(sub, 1, Duration::from_secs(1)).await;
            assert_eq!(got[0].mid, mid, "subscriber {i}\n{}", c.logs());
        }
        slowest = slowest.max(acked.elapsed());
    }
    heal();
    (pushed, slowest)
}
