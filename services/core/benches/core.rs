//! Hot-path pure functions: ring lookup and rebuild, frame encoding, input
//! checks, token verification. `make bench` runs these.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pushcluster_core::frame::{encode_json, encode_resp_bulk, Format};
use pushcluster_core::key::Limits;
use pushcluster_core::ring::{Ring, DEFAULT_VNODES};
use std::hint::black_box;

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    let keys: Vec<String> = (0..1024).map(|i| format!("user-{i}")).collect();
    for shards in [2u32, 16, 256] {
        let r = Ring::with_shard_count(shards);
        g.throughput(Throughput::Elements(keys.len() as u64));
        g.bench_with_input(BenchmarkId::new("lookup_1024_keys", shards), &r, |b, r| {
            b.iter(|| {
                keys.iter()
                    .map(|k| r.shard_for(black_box(k)))
                    .fold(0u64, |a, s| a + s.unwrap_or(0) as u64)
            })
        });
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("rebuild", shards), |b| {
            b.iter(|| Ring::new(0..black_box(shards), DEFAULT_VNODES))
        });
    }
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let payload = br#"{"type":"chat","from":"alice","text":"hello there, this is a 100 byte message body!!"}"#;
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("encode_json_100B", |b| {
        b.iter(|| encode_json(black_box(payload), 123456, 0, Format::Json))
    });
    g.bench_function("encode_legacy_100B", |b| {
        b.iter(|| encode_json(black_box(payload), 123456, 0, Format::Legacy))
    });
    let json = encode_json(payload, 123456, 0, Format::Json);
    g.bench_function("resp_bulk_100B", |b| {
        b.iter(|| encode_resp_bulk(black_box(&json)))
    });
    g.finish();
}

fn checks(c: &mut Criterion) {
    let l = Limits::default();
    let payload = br#"{"type":"chat","from":"alice","text":"hello there, this is a 100 byte message body!!"}"#;
    c.bench_function("check/key", |b| {
        b.iter(|| l.check_key(black_box("user:123456/device-7")))
    });
    c.bench_function("check/message_100B", |b| {
        b.iter(|| l.check_message(black_box(payload)))
    });
    let token = pushcluster_core::token::mint(b"secret", "alice", u64::MAX / 2);
    c.bench_function("token/verify", |b| {
        b.iter(|| {
            pushcluster_core::token::verify(b"secret", black_box("alice"), black_box(&token), 0, 0)
        })
    });
}

criterion_group!(benches, ring, frames, checks);
criterion_main!(benches);
