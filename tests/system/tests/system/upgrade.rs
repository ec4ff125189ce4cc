//! Rolling upgrade: a new web or comet whose peer is still the release
//! before the stream methods (PushStream, AppendStream). The pipelines get
//! Unimplemented, take the request back and send it as the unary batch
//! call, so pushes are stored and delivered as before, in order, and the
//! stream is not retried on every push.

use pushcluster_systest::{collect, subscribe, Cluster, Options, Transport};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_an_older_comet_and_message_service_over_unary_calls() {
    let c = Cluster::start(Options {
        older_rpc: true,
        ..Options::default()
    });
    let api = c.client();
    let mut sub = subscribe(&c, "up", Transport::Ws, true).await;
    // Concurrent pushes, so batches form; each acknowledged with its mid.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut mids = Vec::new();
            for i in 0..10 {
                let body = json!({"t": t, "i": i}).to_string();
                mids.push(api.push("up", &body, Some(60)).await.expect("push"));
            }
            mids
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("pusher"));
    }
    acked.sort_unstable();
    assert_eq!(acked, (1..=40).collect::<Vec<i64>>());
    let got: Vec<i64> = collect(&mut sub, 40, WAIT)
        .await
        .iter()
        .map(|m| m.mid)
        .collect();
    assert_eq!(
        got,
        (1..=40).collect::<Vec<i64>>(),
        "delivered in mid order"
    );

    // Multi-push and offline fetch take the same unary paths.
    let failed = api
        .mpush(&["up", "other"], r#"{"all":1}"#, Some(60))
        .await
        .expect("multi-push");
    assert!(failed.is_empty(), "keys not stored: {failed:?}");
    let (msgs, _) = api.fetch("other", 0, None).await.expect("fetch");
    assert_eq!(msgs.iter().map(|m| m.mid).collect::<Vec<_>>(), vec![1]);

    // Web asked the comet serving "up" for its stream once, then sent
    // batches; that comet did the same with the message service. Neither
    // asked again within the retry period.
    let shard = c
        .older_comets
        .iter()
        .position(|p| p.calls.counts().1 > 0)
        .expect("no comet got a PushBatch");
    let (streams, batches) = c.older_comets[shard].calls.counts();
    assert_eq!(streams, 1, "web retried PushStream");
    assert!(batches >= 1);
    let message = c.older_message.as_ref().expect("message proxy");
    let (streams, batches) = message.calls.counts();
    assert!(
        (1..=2).contains(&streams),
        "one AppendStream try per comet that stored, got {streams}"
    );
    assert!(batches >= 1, "no AppendBatch reached the message service");
}
