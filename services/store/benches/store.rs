//! Store append and read on both backends: embedded (redb, fsync per commit,
//! grouped across concurrent appends) and Redis (a real redis-server on a
//! free port). `make bench` runs these.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pushcluster_store::embedded::EmbeddedStore;
use pushcluster_store::redis::RedisStore;
use pushcluster_store::testing::RedisServer;
use pushcluster_store::{Channel, Retention, Store};
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

fn payload() -> Bytes {
    Bytes::from_static(br#"{"type":"chat","from":"alice","text":"hello there, this is a 100 byte message body!!"}"#)
}

fn suite<S: Store>(c: &mut Criterion, name: &str, rt: &tokio::runtime::Runtime, store: Arc<S>) {
    let mut g = c.benchmark_group(format!("store/{name}"));
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    g.bench_function("append_one_by_one", |b| {
        b.to_async(rt).iter(|| {
            let s = store.clone();
            async move {
                s.append(Channel::Private("bench-seq"), payload(), HOUR)
                    .await
                    .unwrap()
            }
        })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("append_64_concurrent", |b| {
        b.to_async(rt).iter(|| {
            let s = store.clone();
            async move {
                let tasks: Vec<_> = (0..64)
                    .map(|i| {
                        let s = s.clone();
                        tokio::spawn(async move {
                            s.append(Channel::Private(&format!("bench-{i}")), payload(), HOUR)
                                .await
                                .unwrap()
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            }
        })
    });
    rt.block_on(async {
        for _ in 0..200 {
            store
                .append(Channel::Private("bench-read"), payload(), HOUR)
                .await
                .unwrap();
        }
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("fetch_100", |b| {
        b.to_async(rt).iter(|| {
            let s = store.clone();
            async move {
                assert_eq!(
                    s.fetch(Channel::Private("bench-read"), 100, 100)
                        .await
                        .unwrap()
                        .len(),
                    100
                )
            }
        })
    });
    g.finish();
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded = rt.block_on(async {
        EmbeddedStore::open(&dir.path().join("bench.redb"), Retention::default()).unwrap()
    });
    suite(c, "embedded", &rt, Arc::new(embedded));
    let server = RedisServer::start();
    let redis = rt
        .block_on(RedisStore::connect(
            &server.url(),
            "bench",
            Retention::default(),
        ))
        .unwrap();
    suite(c, "redis", &rt, Arc::new(redis));
}

criterion_group!(benches, stores);
criterion_main!(benches);
