//! TLS on the internal gRPC ports (web → comets, comets and web → the
//! message service), with a certificate both ends present: servers ask for
//! the client's and clients check the server's against the cluster's own CA.
//!
//! Pods are reached by IP (web routes by EndpointSlices), so the
//! certificate names one fixed `server_name` that clients ask for whatever
//! address they dial, instead of names no pod IP matches.
//!
//! Switching a running cluster on or off goes in steps, each a whole
//! rollout (the operator drives them, see `operator/src/children/rpc_tls.rs`):
//! servers first take TLS beside plaintext (`accept_plaintext`), then
//! clients `connect` with TLS, then servers stop taking plaintext. A
//! connection says which it is by its first byte (a TLS handshake record
//! starts with 0x16, gRPC's plaintext preface with `P`), so one port serves
//! both while a step rolls out and no call between an old and a new pod
//! fails. The token (`crate::auth`) is checked on both.

use futures::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS settings of the internal gRPC ports (`rpc_tls:` in each service's config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RpcTls {
    /// PEM certificate of the CA that signed every pod's certificate.
    pub ca_file: PathBuf,
    /// PEM certificate this pod presents, as server and as client.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// The name in the certificate, which clients ask for whatever address
    /// they dial.
    pub server_name: String,
    /// Clients connect with TLS (else in plaintext, while servers of an
    /// earlier step may not take TLS yet).
    #[serde(default)]
    pub connect: bool,
    /// Servers take plaintext connections beside TLS (while clients of an
    /// earlier step may still connect in plaintext).
    #[serde(default)]
    pub accept_plaintext: bool,
}

/// Why TLS for the internal RPC could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RpcTlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    #[error("{path}: no usable PEM private key in it: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the CA, certificate and key do not make a TLS configuration: {0}")]
    Config(String),
    #[error("{url}: {source}")]
    Endpoint {
        url: String,
        source: tonic::transport::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, RpcTlsError> {
    std::fs::read(path).map_err(|source| RpcTlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, RpcTlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(RpcTlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The server side: what an RPC listener does with a new connection.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    accept_plaintext: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("accept_plaintext", &self.accept_plaintext)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files of `cfg`: the certificate to serve and the CA whose
    /// client certificates are accepted.
    pub fn load(cfg: &RpcTls) -> Result<Self, RpcTlsError> {
        let chain = certificates(&cfg.cert_file, &read(&cfg.cert_file)?)?;
        let key =
            PrivateKeyDer::from_pem_slice(&read(&cfg.key_file)?).map_err(|e| RpcTlsError::Key {
                path: cfg.key_file.clone(),
                reason: e.to_string(),
            })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certificates(&cfg.ca_file, &read(&cfg.ca_file)?)? {
            roots
                .add(ca)
                .map_err(|e| RpcTlsError::Config(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| RpcTlsError::Config(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| RpcTlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| RpcTlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            accept_plaintext: cfg.accept_plaintext,
        })
    }
}

/// The client side: how this pod dials the others.
#[derive(Clone, Debug)]
pub struct ClientTls(ClientTlsConfig);

impl ClientTls {
    /// The client TLS of `cfg`, `None` while clients still connect in
    /// plaintext (`connect: false`).
    pub fn load(cfg: Option<&RpcTls>) -> Result<Option<Self>, RpcTlsError> {
        let Some(cfg) = cfg.filter(|c| c.connect) else {
            return Ok(None);
        };
        let ca = read(&cfg.ca_file)?;
        certificates(&cfg.ca_file, &ca)?;
        let cert = read(&cfg.cert_file)?;
        certificates(&cfg.cert_file, &cert)?;
        let key = read(&cfg.key_file)?;
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| RpcTlsError::Key {
            path: cfg.key_file.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(Self(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key))
                .domain_name(cfg.server_name.clone()),
        )))
    }
}

/// An endpoint for `url` (`http://host:port`), over TLS when `tls` is given.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, RpcTlsError> {
    let err = |source| RpcTlsError::Endpoint {
        url: url.to_owned(),
        source,
    };
    let Some(tls) = tls else {
        return Endpoint::from_shared(url.to_owned()).map_err(err);
    };
    // tonic speaks TLS only to https:// URIs; the address is the same.
    let https = match url.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None => url.to_owned(),
    };
    Endpoint::from_shared(https)
        .and_then(|e| e.tls_config(tls.0.clone()))
        .map_err(err)
}

/// How long a new connection has to send its first byte and finish a TLS
/// handshake before it is closed.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// One accepted connection of an RPC listener.
#[derive(Debug)]
pub enum RpcConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl RpcConn {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0,
        }
    }
}

impl Connected for RpcConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.tcp().local_addr().ok(),
            remote_addr: self.tcp().peer_addr().ok(),
        }
    }
}

impl AsyncRead for RpcConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RpcConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, for tonic's `serve_with_incoming`:
/// in plaintext without `tls`; with it, TLS handshakes done (each on a
/// task of its own, so a slow one holds up no other) and plaintext ones
/// passed on only while `accept_plaintext`. Accepting stops when the
/// stream is dropped (the server shut down).
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
) -> impl Stream<Item = io::Result<RpcConn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<RpcConn>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "RPC listener could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Ok(RpcConn::Plain(stream))).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let (tls, tx) = (tls.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Some(conn) = classify(stream, &tls).await {
                            let _ = tx.send(Ok(conn)).await;
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Reads a connection's first byte without taking it, then makes it a TLS
/// or a plaintext connection, or closes it (`None`).
async fn classify(stream: TcpStream, tls: &ServerTls) -> Option<RpcConn> {
    let peer = stream.peer_addr().ok();
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return None,
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        return match tokio::time::timeout(HANDSHAKE, tls.acceptor.accept(stream)).await {
            Ok(Ok(s)) => Some(RpcConn::Tls(Box::new(s))),
            Ok(Err(e)) => {
                tracing::warn!(?peer, error = %e, "RPC connection refused: TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::warn!(?peer, "RPC connection closed: TLS handshake took too long");
                None
            }
        };
    }
    if tls.accept_plaintext {
        return Some(RpcConn::Plain(stream));
    }
    tracing::warn!(
        ?peer,
        "RPC connection refused: plaintext, and this cluster's internal RPC takes TLS only"
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use pushcluster_core::tls::testing::{Leaf, TestCa};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const NAME: &str = "rpc.pushcluster.internal";

    fn files(dir: &Path, ca: &TestCa, leaf: &Leaf, accept_plaintext: bool) -> RpcTls {
        std::fs::write(dir.join("ca.crt"), &ca.pem).unwrap();
        leaf.write_to(dir);
        RpcTls {
            ca_file: dir.join("ca.crt"),
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            server_name: NAME.into(),
            connect: true,
            accept_plaintext,
        }
    }

    /// A rustls client presenting `leaf` (when given) and trusting `ca`.
    fn connector(ca: &TestCa, leaf: Option<&Leaf>) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match leaf {
            Some(l) => b
                .with_client_auth_cert(
                    vec![CertificateDer::from(l.der.clone())],
                    PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    async fn listen(
        tls: Option<ServerTls>,
    ) -> (
        std::net::SocketAddr,
        impl Stream<Item = io::Result<RpcConn>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (addr, Box::pin(incoming(l, tls)))
    }

    /// Whether a TLS client presenting `leaf` gets through to the server
    /// side and exchanges bytes there.
    async fn tls_exchange(
        addr: std::net::SocketAddr,
        conns: &mut (impl Stream<Item = io::Result<RpcConn>> + Unpin),
        ca: &TestCa,
        leaf: Option<&Leaf>,
    ) -> bool {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(NAME).unwrap();
        let client = tokio::spawn({
            let c = connector(ca, leaf);
            async move {
                let mut s = c.connect(name, tcp).await.ok()?;
                s.write_all(b"ping").await.ok()?;
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await.ok()?;
                Some(b)
            }
        });
        let served = tokio::time::timeout(Duration::from_secs(1), conns.next()).await;
        let Ok(Some(Ok(mut conn))) = served else {
            client.abort();
            return false;
        };
        assert!(conn.is_tls());
        let mut b = [0u8; 4];
        conn.read_exact(&mut b).await.unwrap();
        conn.write_all(b"pong").await.unwrap();
        assert_eq!(&b, b"ping");
        client.await.unwrap() == Some(*b"pong")
    }

    async fn plaintext_passes(
        addr: std::net::SocketAddr,
        conns: &mut (impl Stream<Item = io::Result<RpcConn>> + Unpin),
    ) -> bool {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0").await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), conns.next()).await {
            Ok(Some(Ok(mut conn))) => {
                assert!(!conn.is_tls());
                let mut b = [0u8; 3];
                conn.read_exact(&mut b).await.unwrap();
                assert_eq!(&b, b"PRI", "the peeked byte is still there");
                true
            }
            _ => {
                let mut b = [0u8; 1];
                let closed = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut b)).await;
                assert!(
                    matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
                    "a refused plaintext connection is closed"
                );
                false
            }
        }
    }

    #[tokio::test]
    async fn one_port_takes_tls_and_plaintext_while_a_switch_rolls_out() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("cluster CA");
        let leaf = ca.leaf(&[NAME]);
        let cfg = files(dir.path(), &ca, &leaf, true);
        let (addr, mut conns) = listen(Some(ServerTls::load(&cfg).unwrap())).await;
        assert!(tls_exchange(addr, &mut conns, &ca, Some(&leaf)).await);
        assert!(plaintext_passes(addr, &mut conns).await);
    }

    #[tokio::test]
    async fn once_tls_is_required_plaintext_and_strangers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("cluster CA");
        let leaf = ca.leaf(&[NAME]);
        let cfg = files(dir.path(), &ca, &leaf, false);
        let (addr, mut conns) = listen(Some(ServerTls::load(&cfg).unwrap())).await;
        assert!(!plaintext_passes(addr, &mut conns).await);
        assert!(
            !tls_exchange(addr, &mut conns, &ca, None).await,
            "a client without a certificate"
        );
        let other = TestCa::new("another cluster's CA");
        assert!(
            !tls_exchange(addr, &mut conns, &ca, Some(&other.leaf(&[NAME]))).await,
            "a client certificate of another CA"
        );
        assert!(tls_exchange(addr, &mut conns, &ca, Some(&leaf)).await);
    }

    #[tokio::test]
    async fn without_tls_every_connection_is_plaintext() {
        let (addr, mut conns) = listen(None).await;
        assert!(plaintext_passes(addr, &mut conns).await);
    }

    #[test]
    fn clients_dial_https_only_once_they_connect_with_tls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("cluster CA");
        let mut cfg = files(dir.path(), &ca, &ca.leaf(&[NAME]), true);
        cfg.connect = false;
        assert!(ClientTls::load(Some(&cfg)).unwrap().is_none());
        let plain = endpoint("http://10.0.0.1:8070", None).unwrap();
        assert_eq!(plain.uri().scheme_str(), Some("http"));
        cfg.connect = true;
        let tls = ClientTls::load(Some(&cfg)).unwrap().unwrap();
        let e = endpoint("http://10.0.0.1:8070", Some(&tls)).unwrap();
        assert_eq!(e.uri().scheme_str(), Some("https"));
        assert_eq!(e.uri().authority().unwrap().as_str(), "10.0.0.1:8070");
        std::fs::write(dir.path().join("tls.key"), b"").unwrap();
        let err = ClientTls::load(Some(&cfg)).unwrap_err();
        assert!(err.to_string().contains("tls.key"), "{err}");
    }
}
