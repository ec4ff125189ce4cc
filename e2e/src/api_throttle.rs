//! An HTTPS proxy in front of the API server that can throttle: while on,
//! it answers every new request with what an overloaded API server answers
//! (API Priority and Fairness rejecting it): `429 Too Many Requests`, a
//! `Retry-After` and a `Status` body of reason `TooManyRequests`.
//!
//! A real API server throttles only under load that this one-node control
//! plane cannot make on cue (its priority levels always keep a few seats),
//! so the proxy stands in for it. Pods are pointed at it through their
//! container environment (`KUBERNETES_SERVICE_PORT`), as with
//! [`crate::api_gate::ApiGate`]. Unlike that gate it speaks HTTP, so it
//! terminates TLS with the API server's own serving certificate (the pods
//! trust its CA) and opens its own TLS connections to the real server; each
//! request keeps its bearer token, so the API server authenticates and
//! authorizes the pod as before. Requests already running (watches) go on,
//! as on a throttling API server.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, hyper::Error>;
type Upstream = Client<hyper_rustls::HttpsConnector<HttpConnector>, Incoming>;

/// The proxy; stops when dropped.
pub struct ApiThrottle {
    /// Where pods connect (`127.0.0.1:<port>`).
    pub addr: SocketAddr,
    throttling: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    relayed: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl ApiThrottle {
    /// Starts proxying to the API server at `upstream`, serving TLS with the
    /// certificate and key of the API server in `pki` (the harness's
    /// `$RUN_DIR/pki`: `serving.crt`, `serving.key`, `ca.crt`).
    pub async fn start(upstream: SocketAddr, pki: &Path) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_file_iter(pki.join("serving.crt"))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(pki.join("serving.key"))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));

        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(pki.join("ca.crt"))? {
            roots.add(ca?)?;
        }
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client)
            .https_only()
            .enable_http1()
            .build();
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let gate = Self {
            addr,
            throttling: Arc::default(),
            refused: Arc::default(),
            relayed: Arc::default(),
            cancel: CancellationToken::new(),
        };
        let (throttling, refused, relayed) = (
            gate.throttling.clone(),
            gate.refused.clone(),
            gate.relayed.clone(),
        );
        let cancel = gate.cancel.clone();
        // A runtime of its own: every request it takes is a TLS handshake
        // and another one upstream, work that should not queue on the
        // runtime of the followers whose delivery times the test measures.
        // (It was not the whole story of the occasional p99 spikes of these
        // scenarios: one of 125 ms came before the throttling, with it.)
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("api-throttle")
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                let shared = Shared {
                    upstream: format!("https://{upstream}"),
                    client: Client::builder(TokioExecutor::new()).build(https),
                    throttling,
                    refused,
                    relayed,
                };
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    };
                    let (acceptor, shared, cancel) =
                        (acceptor.clone(), shared.clone(), cancel.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |req| {
                            let shared = shared.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(shared.handle(req).await)
                            }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .with_upgrades();
                        tokio::select! {
                            _ = conn => {}
                            _ = cancel.cancelled() => {}
                        }
                    });
                }
            })
        });
        Ok(gate)
    }

    /// Starts (true) or stops (false) answering every new request with 429.
    pub fn throttle(&self, on: bool) {
        self.throttling.store(on, Ordering::SeqCst);
    }

    /// Requests answered with 429 so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// Requests relayed to the API server so far.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::SeqCst)
    }
}

impl Drop for ApiThrottle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Clone)]
struct Shared {
    upstream: String,
    client: Upstream,
    throttling: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    relayed: Arc<AtomicU64>,
}

impl Shared {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        if self.throttling.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return too_many_requests();
        }
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        match format!("{}{path}", self.upstream).parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "unparsable path"),
        }
        // The client sets it from the upstream address.
        req.headers_mut().remove(hyper::header::HOST);
        self.relayed.fetch_add(1, Ordering::SeqCst);
        match self.client.request(req).await {
            Ok(resp) => resp.map(|b| b.boxed()),
            Err(e) => plain(StatusCode::BAD_GATEWAY, &format!("upstream: {e}")),
        }
    }
}

/// What kube-apiserver's priority and fairness filter answers a request it
/// rejects.
fn too_many_requests() -> Response<Body> {
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Too many requests, please try again later.",
        "reason": "TooManyRequests",
        "details": {"retryAfterSeconds": 1},
        "code": 429
    });
    let mut resp = Response::new(full(status.to_string()));
    *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = resp.headers_mut();
    headers.insert("Retry-After", hyper::header::HeaderValue::from_static("1"));
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn plain(code: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(full(text.to_owned()));
    *resp.status_mut() = code;
    resp
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}
