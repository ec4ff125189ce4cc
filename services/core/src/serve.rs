//! Serving HTTP (and WebSocket upgrades) with the limits a listener facing
//! hostile clients needs: a deadline for each request's headers (which also
//! ends idle kept-alive connections and half-open WebSocket handshakes), a
//! cap on connections per process and, optionally, per client address.
//! A connection over a cap gets a 503 with a JSON body and is closed; every
//! refusal is counted (`pushcluster_listener_refused_connections`).
//!
//! axum's own `serve` runs hyper without a timer, so it has no header
//! timeout at all: a slowloris client could hold a connection forever.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::tls::Certificates;

/// Largest request head (line and headers) a listener buffers.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Limits of one listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerLimits {
    /// Most open connections; beyond it new ones are refused (503).
    pub max_connections: usize,
    /// Most open connections from one client address (0: no limit). Off by
    /// default: many clients share an address behind NAT or a proxy.
    pub max_connections_per_ip: usize,
    /// Seconds a client has to send a request's headers (and an idle
    /// kept-alive connection to start its next request).
    pub header_timeout_seconds: u64,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            // The process may hold 20,000 files here; leave room for the rest.
            max_connections: 15_000,
            max_connections_per_ip: 0,
            header_timeout_seconds: 10,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// Counts connections refused by a cap.
#[derive(Clone, Default)]
pub struct ListenerMetrics {
    refused: Family<RefusedLabels, Counter>,
}

impl ListenerMetrics {
    /// Registers the counter in `reg`.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self::default();
        reg.register(
            "pushcluster_listener_refused_connections",
            "Connections refused by a listener's caps, by listener and reason",
            m.refused.clone(),
        );
        m
    }

    /// The caps of the listener `name` under `limits`, counted here.
    pub fn caps(&self, name: &'static str, limits: &ListenerLimits) -> Caps {
        Caps::new(name, limits.clone(), self.clone())
    }

    fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }
}

/// Open connections, in all and per address.
#[derive(Default)]
struct Counts {
    all: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; gives its place back when dropped.
pub struct Slot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.all.fetch_sub(1, Ordering::SeqCst);
        let mut m = self.counts.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The caps of one listener, shared by its accept loop.
#[derive(Clone)]
pub struct Caps {
    name: &'static str,
    limits: ListenerLimits,
    counts: Arc<Counts>,
    metrics: ListenerMetrics,
}

impl Caps {
    /// Caps of the listener `name` (its label in metrics).
    pub fn new(name: &'static str, limits: ListenerLimits, metrics: ListenerMetrics) -> Self {
        Self {
            name,
            limits,
            counts: Arc::default(),
            metrics,
        }
    }

    /// A slot for a connection from `ip`, or the cap it hits (counted).
    pub fn admit(&self, ip: IpAddr) -> Result<Slot, &'static str> {
        admit(&self.counts, ip, &self.limits).inspect_err(|reason| {
            self.metrics.refused(self.name, reason);
            tracing::debug!(listener = self.name, %ip, reason, "connection refused");
        })
    }
}

/// Why a connection is refused, if it is.
fn admit(counts: &Arc<Counts>, ip: IpAddr, limits: &ListenerLimits) -> Result<Slot, &'static str> {
    if counts.all.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
        counts.all.fetch_sub(1, Ordering::SeqCst);
        return Err("max_connections");
    }
    let mut m = counts.per_ip.lock().unwrap_or_else(|e| e.into_inner());
    let n = m.entry(ip).or_insert(0);
    if limits.max_connections_per_ip > 0 && *n >= limits.max_connections_per_ip {
        drop(m);
        counts.all.fetch_sub(1, Ordering::SeqCst);
        return Err("max_connections_per_ip");
    }
    *n += 1;
    Ok(Slot {
        counts: counts.clone(),
        ip,
    })
}

/// A socket holding its place under the caps until it is dropped.
struct Counted<IO> {
    io: IO,
    _slot: Slot,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Tells a refused client why, briefly, and closes.
async fn refuse(mut stream: TcpStream, reason: &'static str) {
    let body =
        format!(r#"{{"ret":65535,"msg":"connection refused: {reason} reached; retry later"}}"#);
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Serves `app` on `listener` (named `name` in metrics) until `shutdown`
/// fires, then waits for in-flight requests (upgraded connections live on
/// in their own tasks).
pub async fn serve(listener: TcpListener, app: Router, caps: Caps, shutdown: CancellationToken) {
    serve_with(listener, app, caps, shutdown, None).await
}

/// [`serve`] behind TLS: each connection's handshake uses the certificate of
/// the moment ([`Certificates`], reloaded on its own), within the header
/// deadline.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    caps: Caps,
    shutdown: CancellationToken,
    certs: Arc<Certificates>,
) {
    serve_with(listener, app, caps, shutdown, Some(certs)).await
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    caps: Caps,
    shutdown: CancellationToken,
    tls: Option<Arc<Certificates>>,
) {
    let name = caps.name;
    let head_deadline = Duration::from_secs(caps.limits.header_timeout_seconds.max(1));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_deadline)
        // Request heads above this are refused (431) instead of buffered.
        .max_buf_size(MAX_HEAD_BYTES);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match caps.admit(peer.ip()) {
            Ok(s) => s,
            Err(reason) => {
                tokio::spawn(refuse(stream, reason));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        let Some(certs) = &tls else {
            // The slot rides with the socket: an upgraded WebSocket outlives
            // its HTTP connection and still counts.
            let io = TokioIo::new(Counted {
                io: stream,
                _slot: slot,
            });
            let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
            tokio::spawn(async move {
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
            continue;
        };
        let (acceptor, builder) = (certs.acceptor(), builder.clone());
        tokio::spawn(async move {
            // The handshake counts against the header deadline: a client
            // that opens a socket and says nothing is dropped as over plain
            // HTTP.
            let stream = match tokio::time::timeout(head_deadline, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                    return;
                }
            };
            let io = TokioIo::new(Counted {
                io: stream,
                _slot: slot,
            });
            let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_connections_in_all_and_per_address_and_free_them() {
        let counts = Arc::new(Counts::default());
        let limits = ListenerLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            header_timeout_seconds: 10,
        };
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let a1 = admit(&counts, a, &limits).unwrap();
        let _a2 = admit(&counts, a, &limits).unwrap();
        assert_eq!(
            admit(&counts, a, &limits).err(),
            Some("max_connections_per_ip")
        );
        let _b1 = admit(&counts, b, &limits).unwrap();
        assert_eq!(admit(&counts, b, &limits).err(), Some("max_connections"));
        drop(a1);
        let a3 = admit(&counts, a, &limits).expect("a place was freed");
        assert_eq!(counts.all.load(Ordering::SeqCst), 3);
        drop(a3);
        assert_eq!(counts.all.load(Ordering::SeqCst), 2);
    }
}
