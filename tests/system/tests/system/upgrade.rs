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

/// A config written by a newer operator, with settings this binary does
/// not know (top level and nested): refused by default, naming the
/// setting; started, with a warning naming each, under
/// `PUSH_UNKNOWN_SETTINGS=warn`, which the operator sets on every pod.
#[test]
fn settings_of_a_newer_operator_are_refused_unless_told_to_warn() {
    use pushcluster_systest::{bin_dir, free_port, http_status};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("temp dir");
    let ops = free_port();
    let config = dir.path().join("message.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{}\nops_listen: 127.0.0.1:{ops}\nstorage: {{ path: {}, redis_durability: {{ replicas: 0, timeout_ms: 1000 }} }}\nretention: {{ max_backlog: 10, newer_retention: 5 }}\nnewer_setting: true\n",
            free_port(),
            dir.path().join("m.redb").display(),
        ),
    )
    .expect("write config");
    let binary = bin_dir().join("push-message");
    assert!(
        binary.exists(),
        "build the binaries first (`cargo build --workspace --bins`)"
    );

    let refused = Command::new(&binary)
        .arg("--config")
        .arg(&config)
        .env_remove("PUSH_UNKNOWN_SETTINGS")
        .output()
        .expect("run push-message");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "started with unknown settings: {stderr}"
    );
    assert!(
        stderr.contains("unknown field `newer_setting`")
            || stderr.contains("unknown field `newer_retention`"),
        "the refusal names a setting: {stderr}"
    );

    let log = dir.path().join("warn.log");
    let mut child = Command::new(&binary)
        .arg("--config")
        .arg(&config)
        .env("PUSH_UNKNOWN_SETTINGS", "warn")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start push-message");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let up = http_status(ops, "/readyz") == Some(200);
        if up || std::time::Instant::now() > deadline {
            break up;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ready, "not ready with PUSH_UNKNOWN_SETTINGS=warn: {text}");
    for setting in ["newer_setting", "retention.newer_retention"] {
        assert!(
            text.contains(setting) && text.contains("does not know"),
            "no warning naming {setting}: {text}"
        );
    }
}
