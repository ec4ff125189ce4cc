//! TLS where the pod is the edge: comets serve WebSocket behind TLS and web
//! its public API, from certificate files re-read while they run. A rotated
//! certificate reaches new handshakes; connections already open keep
//! receiving; a broken file keeps the certificate in use.

use pushcluster_client::sub::{Params, Subscriber};
use pushcluster_core::tls::testing::{Leaf, TestCa};
use pushcluster_systest::{collect, Cluster, Options};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The certificate a fresh TLS handshake with `localhost:port` is shown.
async fn served_certificate(port: u16, tls: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    s.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

/// Waits until new handshakes on `port` see `leaf`.
async fn until_served(port: u16, tls: &Arc<rustls::ClientConfig>, leaf: &Leaf) {
    for _ in 0..150 {
        if served_certificate(port, tls.clone()).await == leaf.der {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("port {port} still serves the old certificate after 15 s");
}

/// A GET on web's public TLS port: status line and body.
async fn get_tls(port: u16, tls: Arc<rustls::ClientConfig>, path: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_connections_and_keeps_open_ones() {
    let certs = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("pushcluster test CA");
    let first = ca.leaf(&["localhost"]);
    first.write_to(certs.path());
    let c = Cluster::start(Options {
        shards: 1,
        tls_dir: Some(certs.path().to_owned()),
        ..Options::default()
    });
    let trust = ca.client_config();
    let wss = c.comet_addrs[0].wss.clone().expect("a TLS port");
    let wss_port: u16 = wss.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap();
    let web_port = c.public_tls_port.expect("web's TLS port");

    // Web's public API answers behind TLS.
    let r = get_tls(web_port, trust.clone(), "/1/server/get?k=tls-a&p=1").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains(r#""ret":0"#), "{r}");

    let p = |key: &str| Params {
        key: key.to_owned(),
        heartbeat: 30,
        token: None,
        versioned: true,
    };
    let mut old = Subscriber::websocket_tls(&wss, &p("tls-a"), Some(trust.clone()))
        .await
        .expect("wss subscribe");
    assert_eq!(old.peer_certificate(), Some(first.der.clone()));
    // A client that trusts nothing of ours is refused at the handshake.
    let strangers = TestCa::new("someone else").client_config();
    assert!(
        Subscriber::websocket_tls(&wss, &p("tls-a"), Some(strangers))
            .await
            .is_err(),
        "a certificate the client does not trust must fail the handshake"
    );
    let api = c.client();
    // The first frame is the heartbeat: the comet has registered us.
    assert_eq!(
        old.next_timeout(Duration::from_secs(5)).await.expect("+h"),
        pushcluster_client::Frame::Heartbeat
    );
    api.push("tls-a", r#"{"n": 1}"#, Some(600))
        .await
        .expect("push 1");
    let got = collect(&mut old, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].msg, serde_json::json!({"n": 1}));

    // Rotation, as a renewed Secret lands in the pod.
    let second = ca.leaf(&["localhost"]);
    second.write_to(certs.path());
    until_served(wss_port, &trust, &second).await;
    until_served(web_port, &trust, &second).await;

    let mut new = Subscriber::websocket_tls(&wss, &p("tls-a"), Some(trust.clone()))
        .await
        .expect("wss subscribe after the rotation");
    assert_eq!(new.peer_certificate(), Some(second.der.clone()));
    assert_eq!(
        new.next_timeout(Duration::from_secs(5)).await.expect("+h"),
        pushcluster_client::Frame::Heartbeat
    );
    api.push("tls-a", r#"{"n": 2}"#, Some(600))
        .await
        .expect("push 2");
    // The connection opened under the first certificate is still the same
    // one, and still receives.
    let got = collect(&mut old, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].msg, serde_json::json!({"n": 2}));
    assert_eq!(old.peer_certificate(), Some(first.der.clone()));
    let got = collect(&mut new, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].msg, serde_json::json!({"n": 2}));

    // A broken file is not taken: the second certificate stays in use.
    std::fs::write(
        certs.path().join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nbroken\n",
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        served_certificate(wss_port, trust.clone()).await,
        second.der
    );
    assert!(
        c.logs().contains("TLS certificate not reloaded"),
        "the refusal is logged"
    );
    api.push("tls-a", r#"{"n": 3}"#, Some(600))
        .await
        .expect("push 3");
    assert_eq!(
        collect(&mut old, 1, Duration::from_secs(5)).await[0].msg["n"],
        3
    );
}

/// Redis that takes TLS connections only and asks clients for a
/// certificate: every service reaches it over `rediss://`, trusting the CA
/// in `PUSH_REDIS_CA_FILE` and showing the certificate of
/// `PUSH_REDIS_CLIENT_CERT_FILE`, and pushes are stored, delivered live
/// (web's script publishes, the comet's subscription hears it) and fetched
/// as on plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_a_tls_redis_that_asks_for_their_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("redis test CA");
    ca.leaf(&["127.0.0.1", "localhost"]).write_to(dir.path());
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).expect("write CA");
    let redis = pushcluster_systest::RedisServer::start_tls(
        &dir.path().join("tls.crt"),
        &dir.path().join("tls.key"),
        Some(&ca_file),
    );
    let client = ca.leaf(&["pushcluster"]);
    let (cert, key) = (dir.path().join("client.crt"), dir.path().join("client.key"));
    std::fs::write(&cert, &client.cert_pem).expect("write client certificate");
    std::fs::write(&key, &client.key_pem).expect("write client key");
    let c = Cluster::start(Options {
        redis_url: Some(redis.tls_url()),
        redis_ca_file: Some(ca_file),
        redis_client_cert: Some((cert, key)),
        ..Options::default()
    });
    let mut sub =
        pushcluster_systest::subscribe(&c, "tls-redis", pushcluster_systest::Transport::Ws, true)
            .await;
    let api = c.client();
    for n in 1..=3 {
        let mid = api
            .push("tls-redis", &format!(r#"{{"n": {n}}}"#), Some(600))
            .await
            .expect("push");
        assert_eq!(mid, n);
    }
    let got = collect(&mut sub, 3, Duration::from_secs(5)).await;
    let mids: Vec<i64> = got.iter().map(|m| m.mid).collect();
    assert_eq!(mids, [1, 2, 3]);
    let (stored, _) = api.fetch("tls-redis", 0, None).await.expect("fetch");
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[2].msg, serde_json::json!({"n": 3}));
}

/// A call to the comet's gRPC port with `tls` (plaintext when `None`) and
/// the cluster's token: whether it was answered.
async fn comet_answers(
    c: &Cluster,
    tls: Option<&pushcluster_proto::tls::RpcTls>,
) -> Result<(), String> {
    use pushcluster_proto::tls::{endpoint, ClientTls};
    let url = format!("http://127.0.0.1:{}", c.comet_addrs[0].rpc_port);
    let tls = ClientTls::load(tls).map_err(|e| e.to_string())?;
    let channel = endpoint(&url, tls.as_ref())
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let token = pushcluster_proto::auth::RpcToken::new(c.opts.rpc_token.as_deref())
        .map_err(|e| e.to_string())?;
    pushcluster_proto::v1::comet_client::CometClient::new(token.on(channel))
        .stats(pushcluster_proto::v1::StatsRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e}"))
}

/// The internal RPC over TLS as a cluster runs it once the operator's
/// switch completed: web reaches the comets and the comets the message
/// service only with the cluster CA's certificate, both ends checked. Pushes
/// are stored and delivered; a plaintext call, one without a client
/// certificate and one with another CA's are refused on the same port.
#[tokio::test]
async fn the_internal_rpc_runs_over_tls_and_refuses_plaintext_and_strangers() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("cluster RPC CA");
    let name = "rpc.test.pushcluster.internal";
    ca.leaf(&[name]).write_to(dir.path());
    std::fs::write(dir.path().join("ca.crt"), &ca.pem).expect("write CA");
    let tls = pushcluster_proto::tls::RpcTls {
        ca_file: dir.path().join("ca.crt"),
        cert_file: dir.path().join("tls.crt"),
        key_file: dir.path().join("tls.key"),
        server_name: name.into(),
        connect: true,
        accept_plaintext: false,
    };
    let c = Cluster::start(Options {
        rpc_tls: Some(tls.clone()),
        ..Options::default()
    });
    let mut sub =
        pushcluster_systest::subscribe(&c, "rpc-tls", pushcluster_systest::Transport::Ws, true)
            .await;
    let api = c.client();
    for n in 1..=3 {
        let mid = api
            .push("rpc-tls", &format!(r#"{{"n": {n}}}"#), Some(600))
            .await
            .unwrap_or_else(|e| panic!("push {n}: {e}\n{}", c.logs()));
        assert_eq!(mid, n);
    }
    let got = collect(&mut sub, 3, Duration::from_secs(5)).await;
    let mids: Vec<i64> = got.iter().map(|m| m.mid).collect();
    assert_eq!(mids, [1, 2, 3]);
    let (stored, _) = api.fetch("rpc-tls", 0, None).await.expect("fetch");
    assert_eq!(
        stored.len(),
        3,
        "stored through the message service over TLS"
    );

    comet_answers(&c, Some(&tls))
        .await
        .expect("the cluster's certificate is answered");
    let plain = comet_answers(&c, None).await;
    assert!(plain.is_err(), "a plaintext call was answered");
    let stranger_dir = tempfile::tempdir().expect("dir");
    let other = TestCa::new("another cluster's CA");
    other.leaf(&[name]).write_to(stranger_dir.path());
    let stranger = pushcluster_proto::tls::RpcTls {
        cert_file: stranger_dir.path().join("tls.crt"),
        key_file: stranger_dir.path().join("tls.key"),
        ..tls.clone()
    };
    let refused = comet_answers(&c, Some(&stranger)).await;
    assert!(refused.is_err(), "another CA's certificate was answered");
    assert!(
        c.logs()
            .contains("plaintext, and this cluster's internal RPC takes TLS only"),
        "the comet says why it closed the plaintext connection"
    );
}
