//! How long appends wait while the embedded store sweeps: fills a store
//! with N messages (each with a push id, as web's pushes carry), then
//! appends one message every 2 ms to another key while a sweep pass runs,
//! and prints the pass's length and the slowest append during it against
//! the slowest in the second before it (fsync alone).
//!
//! `cargo bench -p pushcluster-store --bench sweep -- 100000` (N defaults
//! to 100,000); `make bench` runs it.

use bytes::Bytes;
use pushcluster_store::embedded::EmbeddedStore;
use pushcluster_store::{AppendOpts, Channel, Retention, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let retention = Retention {
        dedupe_window_seconds: 600,
        ..Retention::default()
    };
    let s = Arc::new(EmbeddedStore::open(&dir.path().join("db.redb"), retention).expect("open"));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let s = s.clone();
        set.spawn(async move {
            let id = format!("push-{i:016x}");
            let opts = AppendOpts {
                push_id: Some(&id),
                ..AppendOpts::default()
            };
            let body = Bytes::from_static(br#"{"n":1,"text":"a message of some size"}"#);
            s.append_with(
                Channel::Private(&format!("key-{}", i % 2000)),
                body,
                HOUR,
                opts,
            )
            .await
            .expect("append")
        });
        if set.len() >= 256 {
            set.join_next().await;
        }
    }
    while set.join_next().await.is_some() {}
    println!("filled {n} messages in {:.1} s", t.elapsed().as_secs_f64());

    let probe = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut took = Vec::new();
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                let t = Instant::now();
                s.append(Channel::Private("probe"), Bytes::from_static(b"{}"), HOUR)
                    .await
                    .expect("probe append");
                took.push((t, t.elapsed()));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            took
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    s.sweep().await.expect("sweep");
    let end = Instant::now();
    let took = probe.await.expect("probe");
    let slowest = |during: bool| {
        took.iter()
            .filter(|(t, d)| (*t + *d > start && *t < end) == during && *t < end)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "sweep pass over {n} messages: {:.1} ms; slowest append during it {:.1} ms, in the second before {:.1} ms",
        ms(end - start),
        ms(slowest(true)),
        ms(slowest(false))
    );
}
