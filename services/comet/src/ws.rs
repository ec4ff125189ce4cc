//! WebSocket transport, gopush-cluster compatible: `GET /sub?key=&heartbeat=&token=&ver=`.
//! (Just over 500 lines, kept whole: the handshake, the hand-polled
//! connection future and its states are one protocol read top to bottom.)
//!
//! After the upgrade the comet sends `+h\r\n` (or an error frame `-p`/`-a`/`-c`
//! and closes), answers each text frame `h` with `+h\r\n`, and sends each
//! message as one text frame. The connection closes when no heartbeat arrives
//! within the client's heartbeat plus the grace period.
//!
//! The handshake is checked here and the framing is the comet's own
//! ([`pushcluster_core::websocket`]), driven by a hand-written future
//! (`Conn`): an idle subscriber is then its socket, its mailbox and this
//! small struct, with no read or write buffer until bytes actually wait.
//! A general WebSocket library kept ~2 KB of buffers and codec state per
//! connection (see docs/benchmarks.md, S1).

use crate::protocol::subscribe_params;
use crate::registry::{Close, Next, Subscription};
use crate::Comet;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use pushcluster_core::frame::{self, Format};
use pushcluster_core::websocket::{self as wsf, close_code, Opcode};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The transport label of this module's connections.
const GAUGE: &str = "websocket";
/// Largest message a subscriber may send; they only ever send `h`.
const MAX_CLIENT_MESSAGE: usize = 1024;
/// Bytes read from the socket per call; a larger frame is read in passes.
const READ_CHUNK: usize = 512;
/// Stop taking queued messages once this much waits to be written; the
/// mailbox (bounded by the queue depth) holds the rest.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// A written-out buffer up to this size is kept for the next write; a larger
/// one is freed, so a connection that once had a burst does not keep it.
const KEEP_BUFFER: usize = 256;

/// Routes of the comet's HTTP listener: WebSocket and SSE (readable by
/// the pages of `cors_origins`).
pub fn router(comet: Arc<Comet>) -> Router {
    let origins = Arc::new(comet.cfg.cors_origins.clone());
    Router::new()
        .route("/sub", get(upgrade))
        .route("/sub/sse", get(crate::sse::subscribe))
        .layer(axum::middleware::from_fn_with_state(
            origins,
            pushcluster_core::cors::cors,
        ))
        .with_state(comet)
}

/// The subprotocol a client offers to say it speaks this protocol and may
/// carry its token in the handshake: `Sec-WebSocket-Protocol: pushcluster,
/// token.<token>` (browsers cannot set an `Authorization` header on a
/// WebSocket; a subprotocol keeps the token out of URLs and proxy logs).
const SUBPROTOCOL: &str = "pushcluster";

/// The offered subprotocols: whether `pushcluster` is among them, and the
/// token one carries.
fn offered(headers: &HeaderMap) -> (bool, Option<String>) {
    let mut ours = false;
    let mut token = None;
    for p in headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        if p == SUBPROTOCOL {
            ours = true;
        } else if let Some(t) = p.strip_prefix("token.") {
            token = Some(t.to_owned());
        }
    }
    (ours, token)
}

fn bad_request(status: StatusCode, msg: &str) -> Response {
    (status, Json(serde_json::json!({"ret": 65534, "msg": msg}))).into_response()
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

async fn upgrade(
    State(comet): State<Arc<Comet>>,
    Query(q): Query<HashMap<String, String>>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return bad_request(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade (Connection: upgrade, Upgrade: websocket) is required",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = bad_request(
            StatusCode::UPGRADE_REQUIRED,
            "Sec-WebSocket-Version 13 is required",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let Some(accept) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(wsf::accept_key)
    else {
        return bad_request(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing");
    };
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return bad_request(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is invalid");
    };
    let (ours, offered_token) = offered(headers);
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return bad_request(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded",
        );
    };
    // Parameters are checked and the connection registered before the
    // upgrade, so the connection's task keeps only what it needs; a refusal
    // is sent after it, as gopush-cluster clients expect.
    let get = |k: &str| q.get(k).map(String::as_str);
    let admitted = match subscribe_params(
        get("key"),
        get("heartbeat"),
        get("token").or(offered_token.as_deref()),
        get("ver"),
        comet.heartbeat_bounds(),
    ) {
        None => Err(frame::ERR_PARAM),
        Some(sub) => {
            let silence = comet.read_deadline(sub.heartbeat);
            comet
                .admit(&sub, Some(silence))
                .await
                .map(|s| (s, sub.format, silence))
                .map_err(|refusal| refusal.frame())
        }
    };
    drop(q);
    // The connection's task is the Conn itself, which also waits for the
    // upgrade: an async block around it would keep its own copy of the
    // arguments beside the Conn, in every idle connection. (Shutdown waits
    // for connections through the registry, not a task tracker.)
    match admitted {
        Ok((sub, format, silence)) => {
            tokio::spawn(Conn::new(on_upgrade, sub, comet, format, silence));
        }
        Err(refusal) => {
            tokio::spawn(refuse(on_upgrade, refusal));
        }
    }
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    // A browser fails a handshake that offered subprotocols and got none.
    if ours {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    r
}

/// Sends a refused subscriber its error frame after the upgrade, and closes.
async fn refuse(on_upgrade: OnUpgrade, refusal: &'static [u8]) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let mut io = TokioIo::new(upgraded);
    let mut out = Vec::with_capacity(16);
    wsf::put_frame(&mut out, Opcode::Text, refusal);
    wsf::put_close(&mut out, close_code::NORMAL, "");
    // Bounded: a client that reads nothing cannot hold the task.
    let _ = tokio::time::timeout(CLOSE_LIMIT, async {
        tokio::io::AsyncWriteExt::write_all(&mut io, &out).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut io).await
    })
    .await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading frames and writing messages.
    Open,
    /// A close frame is queued: write what is left, then end (after the
    /// client's close, when the server spoke first).
    Closing,
}

/// One subscriber connection, polled by hand: the upgrade, then its reads,
/// its writes and its mailbox are the wake-up sources of one small future,
/// which is the connection's whole task.
struct Conn {
    io: Socket,
    sub: Subscription,
    /// For its metrics (one field for two: an idle connection is this struct).
    comet: Arc<Comet>,
    format: Format,
    state: Phase,
    /// Closing: whether the server sent the first close and waits for the
    /// client's (RFC 6455 §7.1.1: the server closes TCP once both are sent).
    awaiting_close: bool,
    /// Seconds the client may stay silent (heartbeat plus grace).
    silence_s: u32,
    /// Encoded frames waiting to be written; `written` of them already are.
    out: Vec<u8>,
    written: u32,
    /// What is kept of the client's bytes between reads (an unfinished
    /// frame or message); allocated only while there is any.
    reader: Option<Box<wsf::Reader>>,
    /// Armed while the client does not take what is written (the buffer at
    /// its high-water mark) and while closing: when it fires, the connection
    /// is dropped, so no write waits forever.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A connection's socket: hyper's promise of it until the 101 is out and
/// hyper hands it over, then the socket. One field for both keeps [`Conn`]
/// within 152 bytes, so its task fits tokio's 256-byte cell (at 160 it took
/// a 384-byte one: 128 bytes more per idle subscriber).
enum Socket {
    Upgrading(OnUpgrade),
    Open(TokioIo<Upgraded>),
}

/// How long a client may leave a full write buffer unread before it is
/// dropped as a slow consumer.
const STALL_LIMIT: Duration = Duration::from_secs(10);
/// How long closing may take: writing what is left and, when the server
/// closed first, waiting for the client's close frame.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

impl Drop for Conn {
    fn drop(&mut self) {
        self.comet.metrics.conn_gauge(GAUGE).dec();
    }
}

impl Conn {
    fn new(
        upgrade: OnUpgrade,
        sub: Subscription,
        comet: Arc<Comet>,
        format: Format,
        silence: Duration,
    ) -> Self {
        let mut out = Vec::with_capacity(8);
        wsf::put_frame(&mut out, Opcode::Text, frame::HEARTBEAT_REPLY);
        comet.metrics.conn_gauge(GAUGE).inc();
        Self {
            io: Socket::Upgrading(upgrade),
            sub,
            comet,
            format,
            state: Phase::Open,
            awaiting_close: false,
            silence_s: u32::try_from(silence.as_secs()).unwrap_or(u32::MAX),
            out,
            written: 0,
            reader: None,
            deadline: None,
        }
    }

    /// Queues a close frame (`None`: an empty one) and starts closing;
    /// `first`: the server speaks first and waits for the client's answer.
    fn close_with(&mut self, code: Option<u16>, reason: &str, first: bool) {
        if self.state == Phase::Open {
            match code {
                Some(c) => wsf::put_close(&mut self.out, c, reason),
                None => wsf::put_frame(&mut self.out, Opcode::Close, b""),
            }
            self.state = Phase::Closing;
            self.awaiting_close = first;
            self.deadline = Some(Box::pin(tokio::time::sleep(CLOSE_LIMIT)));
        }
    }

    /// Reads until the socket has nothing more; Ready(false) ends the
    /// connection. While closing, it only looks for the client's close.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            let Socket::Open(io) = &mut self.io else {
                return Poll::Ready(false);
            };
            match Pin::new(io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Ready(Ok(())) => {}
            }
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(false);
            }
            let mut reader = self.reader.take().unwrap_or_default();
            let closing = self.state == Phase::Closing;
            let Self {
                out,
                sub,
                silence_s,
                ..
            } = self;
            let mut unknown = false;
            let r = reader.feed(&mut chunk[..n], MAX_CLIENT_MESSAGE, |u| {
                if closing {
                    return;
                }
                match u {
                    wsf::Inbound::Ping(p) => wsf::put_frame(out, Opcode::Pong, &p),
                    wsf::Inbound::Message {
                        text: true,
                        payload,
                    } if payload == b"h" => {
                        wsf::put_frame(out, Opcode::Text, frame::HEARTBEAT_REPLY);
                        sub.heartbeat(Duration::from_secs(u64::from(*silence_s)));
                    }
                    wsf::Inbound::Message { .. } => unknown = true,
                    wsf::Inbound::Pong | wsf::Inbound::Close(_) => {}
                }
            });
            if !reader.is_idle() {
                self.reader = Some(reader);
            }
            if closing {
                // The client's close (or anything broken) ends the wait.
                if r != Ok(wsf::Fed::More) {
                    return Poll::Ready(false);
                }
                continue;
            }
            match r {
                Ok(wsf::Fed::More) if unknown => {
                    tracing::debug!("unknown message from subscriber, closing");
                    wsf::put_frame(&mut self.out, Opcode::Text, frame::ERR_PARAM);
                    self.close_with(Some(close_code::NORMAL), "", true);
                    return Poll::Ready(true);
                }
                Ok(wsf::Fed::More) => {}
                // The client closed: echo its code, then end (no wait).
                Ok(wsf::Fed::Closed(code)) => {
                    self.close_with(code, "", false);
                    return Poll::Ready(true);
                }
                // Failing the connection (RFC 6455 §7.1.7): the close goes
                // out, then TCP ends without waiting for an answer.
                Err(e) => {
                    tracing::debug!(error = %e, "bad frame from subscriber, closing");
                    self.close_with(Some(e.code()), "bad frame", false);
                    return Poll::Ready(true);
                }
            }
        }
    }

    /// Moves queued messages into the write buffer. Ready(true): stopped at
    /// the high-water mark, call again once written; Ready(false): end now.
    fn poll_mailbox(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        while self.out.len() < WRITE_HIGH_WATER {
            match ready!(self.sub.poll_next(cx)) {
                Next::Message(d) => {
                    if self.state == Phase::Open {
                        self.comet.metrics.delivered(&d);
                        wsf::put_frame(
                            &mut self.out,
                            Opcode::Text,
                            d.json(self.format).as_str().as_bytes(),
                        );
                    }
                }
                Next::Close(Close::Abort) => return Poll::Ready(false),
                Next::Close(_) if self.state == Phase::Closing => return Poll::Pending,
                Next::Close(Close::Reconnect) => {
                    // Legacy clients reconnect on close; versioned ones are told.
                    if self.format == Format::Json {
                        wsf::put_frame(&mut self.out, Opcode::Text, frame::RECONNECT);
                        self.comet.reconnect_sent();
                    }
                    self.close_with(Some(close_code::GOING_AWAY), "reconnect", true);
                    // Pending with the waker kept: only an Abort can follow.
                    return Poll::Pending;
                }
                Next::Close(Close::Timeout) => {
                    tracing::debug!("heartbeat timeout, closing");
                    self.close_with(Some(close_code::NORMAL), "heartbeat timeout", true);
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(true)
    }

    /// Returns Pending with the deadline (if any) registered too: one armed
    /// in this very poll has not been polled yet, and an unpolled timer
    /// would never wake the connection.
    fn park(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    }

    /// Writes the buffer; Ready(Ok) once it is all written.
    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Socket::Open(io) = &mut self.io else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let mut written = self.written as usize;
        while written < self.out.len() {
            let n = match Pin::new(&mut *io).poll_write(cx, &self.out[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // The buffer stays under WRITE_HIGH_WATER plus what one
                    // read (READ_CHUNK) or one message can add, far below
                    // 4 GiB: input stops at the mark, the mailbox too.
                    self.written = written as u32;
                    return Poll::Pending;
                }
            };
            written += n;
        }
        if self.out.capacity() > KEEP_BUFFER {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl Future for Conn {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Socket::Upgrading(upgrade) = &mut this.io {
            match ready!(Pin::new(upgrade).poll(cx)) {
                Ok(upgraded) => this.io = Socket::Open(TokioIo::new(upgraded)),
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return Poll::Ready(());
                }
            }
        }
        loop {
            if let Some(d) = this.deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    if this.state == Phase::Open {
                        tracing::debug!("subscriber left its writes unread, dropping it");
                        this.comet.metrics.slow_consumer();
                    }
                    return Poll::Ready(());
                }
            }
            // A client that does not read gets nothing more read from it
            // either: what it sends (pings, heartbeats) cannot grow the
            // buffer past the mark.
            if this.state == Phase::Open
                && this.out.len() < WRITE_HIGH_WATER
                && this.poll_input(cx) == Poll::Ready(false)
            {
                return Poll::Ready(());
            }
            let more = match this.poll_mailbox(cx) {
                Poll::Ready(false) => return Poll::Ready(()),
                Poll::Ready(true) => true,
                Poll::Pending => false,
            };
            match this.poll_output(cx) {
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {
                    if this.state == Phase::Open {
                        if this.out.len() >= WRITE_HIGH_WATER && this.deadline.is_none() {
                            this.deadline = Some(Box::pin(tokio::time::sleep(STALL_LIMIT)));
                            continue;
                        }
                        if this.out.len() < WRITE_HIGH_WATER {
                            this.deadline = None;
                        }
                    }
                    return this.park(cx);
                }
                Poll::Ready(Ok(())) => {
                    if this.state == Phase::Open {
                        this.deadline = None;
                    }
                }
            }
            if this.state == Phase::Closing {
                // Our close is out. When we spoke first, wait (bounded by
                // the deadline) for the client's close before ending TCP.
                if this.awaiting_close {
                    match this.poll_input(cx) {
                        Poll::Pending => return this.park(cx),
                        Poll::Ready(_) => this.awaiting_close = false,
                    }
                }
                if let Socket::Open(io) = &mut this.io {
                    let _ = ready!(Pin::new(io).poll_shutdown(cx));
                }
                return Poll::Ready(());
            }
            // Everything is written and both sources are pending (each
            // registered our waker), unless the mailbox stopped at the
            // high-water mark.
            if !more {
                return this.park(cx);
            }
        }
    }
}
