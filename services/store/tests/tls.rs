//! Redis over TLS: a real `redis-server` that takes TLS connections only,
//! with a certificate of a test CA. The store appends, fetches and hears
//! its live channel through `rediss://` when it trusts that CA, and a
//! client that does not (another CA, or plain TCP) gets no data through.

use bytes::Bytes;
use futures::StreamExt;
use pushcluster_core::tls::testing::TestCa;
use pushcluster_redis::{Event, Subscriber, Target, TlsSettings};
use pushcluster_store::redis::{live, RedisStore};
use pushcluster_store::testing::RedisServer;
use pushcluster_store::{Channel, Retention, Store};
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

/// A TLS-only Redis with a certificate for 127.0.0.1 from `ca`.
fn tls_server(ca: &TestCa, dir: &std::path::Path) -> RedisServer {
    let leaf = ca.leaf(&["127.0.0.1", "localhost"]);
    leaf.write_to(dir);
    RedisServer::start_tls(&dir.join("tls.crt"), &dir.join("tls.key"), None)
}

/// A test CA, and in a temporary directory a server certificate of it for
/// 127.0.0.1 and localhost: certificate, key and the CA's certificate.
fn server_files() -> (tempfile::TempDir, TestCa, [std::path::PathBuf; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("redis test CA");
    ca.leaf(&["127.0.0.1", "localhost"]).write_to(dir.path());
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let files = [
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        ca_file,
    ];
    (dir, ca, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_works_over_tls_with_the_servers_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("redis test CA");
    let server = tls_server(&ca, dir.path());
    let target = Target::parse_with(
        &server.tls_url(),
        Some(TlsSettings::trusting(ca.pem.clone().into_bytes())),
    )
    .expect("a rediss URL with a CA");

    let (mut sub, mut events) = Subscriber::connect(&target, false)
        .await
        .expect("a subscription over TLS");
    sub.subscribe(vec![live::channel("tls", "k")])
        .await
        .unwrap();

    let store = RedisStore::connect_to(target, "tls", Retention::default())
        .await
        .expect("connected over TLS");
    for (i, p) in ["{\"n\":1}", "{\"n\":2}"].into_iter().enumerate() {
        let mid = store
            .append(Channel::Private("k"), Bytes::from(p), HOUR)
            .await
            .unwrap();
        assert_eq!(mid, i as i64 + 1);
    }
    let got = store.fetch(Channel::Private("k"), 0, 10).await.unwrap();
    let mids: Vec<i64> = got.iter().map(|m| m.mid).collect();
    assert_eq!(mids, [1, 2]);
    assert_eq!(got[1].payload, Bytes::from("{\"n\":2}"));

    let mut live_mids = Vec::new();
    while live_mids.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("a live message within 5 s")
            .expect("the subscription is open");
        if let Event::Message(m) = event {
            live_mids.push(
                live::decode(m.get_payload_bytes())
                    .expect("a live message")
                    .mid,
            );
        }
    }
    assert_eq!(live_mids, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_server_gets_nothing_through() {
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(&TestCa::new("redis test CA"), dir.path());

    // Both at once: the connection manager retries a refused handshake for
    // about ten seconds before it gives up.
    let other = TestCa::new("another CA");
    let target = Target::parse_with(
        &server.tls_url(),
        Some(TlsSettings::trusting(other.pem.into_bytes())),
    )
    .unwrap();
    let untrusted = RedisStore::connect_to(target, "tls", Retention::default());
    // Plain TCP to the TLS port: the server never answers in RESP.
    let plain = format!("redis://127.0.0.1:{}/", server.port());
    let plain = tokio::time::timeout(
        Duration::from_secs(3),
        RedisStore::connect(&plain, "tls", Retention::default()),
    );
    let (untrusted, plain) = tokio::join!(untrusted, plain);
    let e = untrusted
        .err()
        .expect("a certificate of an unknown CA is refused")
        .to_string();
    assert!(e.contains("invalid peer certificate"), "{e}");
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "a plain connection to a TLS port must not work"
    );
}

/// A Redis Cluster whose nodes talk TLS to clients, to each other and to
/// their replicas: the store reaches every slot over `rediss+cluster://`
/// (the client follows the nodes' TLS ports), with the append waiting for
/// a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_works_on_a_redis_cluster_over_tls() {
    let (_dir, ca, files) = server_files();
    let cluster = pushcluster_store::testing::RedisClusterServers::start_tls(
        3,
        files.each_ref().map(|f| f.as_path()),
    );
    let target = Target::parse_with(
        &cluster.tls_url(),
        Some(TlsSettings::trusting(ca.pem.into_bytes())),
    )
    .unwrap();
    let store = RedisStore::connect_to(target, "tlsc", Retention::default())
        .await
        .expect("connected over TLS")
        .durability(pushcluster_redis::Durability {
            replicas: 1,
            timeout_ms: 2000,
        });
    // Keys spread over the three masters' slots.
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    for k in &keys {
        for n in 1..=2 {
            let mid = store
                .append(Channel::Private(k), Bytes::from(format!("{n}")), HOUR)
                .await
                .unwrap_or_else(|e| panic!("append to {k}: {e}"));
            assert_eq!(mid, n);
        }
    }
    for k in &keys {
        let got = store.fetch(Channel::Private(k), 0, 10).await.unwrap();
        assert_eq!(got.iter().map(|m| m.mid).collect::<Vec<_>>(), [1, 2], "{k}");
    }
}

/// A master and replicas behind Sentinels, all over TLS: the store asks
/// the Sentinels over `rediss+sentinel://` and writes to the master they
/// name over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_works_behind_sentinels_over_tls() {
    let (_dir, ca, files) = server_files();
    let group = pushcluster_store::testing::RedisSentinels::start_tls(
        1,
        files.each_ref().map(|f| f.as_path()),
    );
    let target = Target::parse_with(
        &group.tls_url(),
        Some(TlsSettings::trusting(ca.pem.into_bytes())),
    )
    .unwrap();
    let store = RedisStore::connect_to(target, "tlss", Retention::default())
        .await
        .expect("connected over TLS");
    for n in 1..=3 {
        let mid = store
            .append(Channel::Private("k"), Bytes::from(format!("{n}")), HOUR)
            .await
            .unwrap();
        assert_eq!(mid, n);
    }
    let got = store.fetch(Channel::Private("k"), 0, 10).await.unwrap();
    assert_eq!(got.iter().map(|m| m.mid).collect::<Vec<_>>(), [1, 2, 3]);
}

/// A Redis that asks clients for a certificate (`tls-auth-clients yes`,
/// redis-server's default): a client showing one its CA issued gets in,
/// one showing none is turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_asks_for_client_certificates_takes_ours() {
    let (_dir, ca, files) = server_files();
    let [cert, key, ca_file] = &files;
    let server = RedisServer::start_tls(cert, key, Some(ca_file));
    let client = ca.leaf(&["pushcluster"]);
    let mine = TlsSettings::trusting(ca.pem.clone().into_bytes())
        .showing(client.cert_pem.into_bytes(), client.key_pem.into_bytes());
    let target = Target::parse_with(&server.tls_url(), Some(mine)).unwrap();
    let store = RedisStore::connect_to(target, "mtls", Retention::default())
        .await
        .expect("connected with a client certificate");
    let mid = store
        .append(Channel::Private("k"), Bytes::from("1"), HOUR)
        .await
        .unwrap();
    assert_eq!(mid, 1);

    let without = Target::parse_with(
        &server.tls_url(),
        Some(TlsSettings::trusting(ca.pem.into_bytes())),
    )
    .unwrap();
    assert!(
        RedisStore::connect_to(without, "mtls", Retention::default())
            .await
            .is_err(),
        "a client without a certificate must be turned away"
    );
}
