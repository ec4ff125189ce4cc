//! `pushctl`, the real binary: push, sub (offline catch-up then live, in mid
//! order, across a comet restart), resolve, status; a push that can be run
//! again under an idempotency key.

use pushcluster_systest::{bin_dir, Cluster, Options};
use std::process::{Command, Stdio};
use std::time::Duration;

fn pushctl(c: &Cluster, args: &[&str]) -> String {
    let out = Command::new(bin_dir().join("pushctl"))
        .args(["--web", &c.public_url, "--admin", &c.admin_url])
        .args(args)
        .output()
        .expect("run pushctl");
    assert!(
        out.status.success(),
        "pushctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn pushctl_pushes_and_subscribes_across_a_comet_restart() {
    let mut c = Cluster::start(Options {
        shards: 1,
        ..Options::default()
    });
    assert_eq!(pushctl(&c, &["push", "carol", r#"{"n":1}"#]), "1");
    let sub = Command::new(bin_dir().join("pushctl"))
        .args(["--web", &c.public_url, "--admin", &c.admin_url])
        .args(["sub", "carol", "--count", "4", "--heartbeat", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pushctl sub");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pushctl(&c, &["push", "carol", r#"{"n":2}"#]), "2");
    // The comet goes away and comes back: pushctl reconnects and fills the gap.
    c.comets[0].term();
    assert_eq!(pushctl(&c, &["push", "carol", r#"{"n":3}"#]), "3");
    c.comets[0].start();
    assert_eq!(pushctl(&c, &["push", "carol", r#"{"n":4}"#]), "4");
    let out = sub.wait_with_output().expect("pushctl sub");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mids: Vec<i64> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["mid"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        mids,
        vec![1, 2, 3, 4],
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pushctl(&c, &["resolve", "carol"]), c.comet_addrs[0].ws);
    assert!(pushctl(&c, &["status", "--key", "carol"]).contains("last mid 4"));
}

/// `pushctl push --idempotency-key`: run again, it prints the first mid and
/// stores nothing new; another key is another push.
#[test]
fn pushctl_push_with_an_idempotency_key_can_be_run_again() {
    let c = Cluster::start(Options::default());
    let push = |key: &str| {
        pushctl(
            &c,
            &["push", "dave", r#"{"n":1}"#, "--idempotency-key", key],
        )
    };
    assert_eq!(push("job-1"), "1");
    assert_eq!(push("job-1"), "1");
    assert_eq!(push("job-2"), "2");
    assert!(pushctl(&c, &["status", "--key", "dave"]).contains("last mid 2"));
}
