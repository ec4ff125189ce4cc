//! A gopush-cluster client written from its protocol documents only
//! (`clients/examples/gopush_client.py`) works against pushcluster unchanged.

use pushcluster_systest::{Cluster, Options};
use std::process::Command;

#[test]
fn a_client_written_from_gopush_documents_works_unchanged() {
    let c = Cluster::start(Options::default());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../clients/examples/gopush_client.py"
    );
    let out = Command::new("python3")
        .args([script, &c.public_url, &c.admin_url, "gopush-user", "25"])
        .output()
        .expect("python3 is needed for this test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    for check in ["subscribed", "received", "heartbeat", "offline"] {
        assert!(
            stdout.contains(&format!("\"check\": \"{check}\"")),
            "{check} missing:\n{stdout}"
        );
    }
}
