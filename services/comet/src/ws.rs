//! WebSocket transport, gopush-cluster compatible: `GET /sub?key=&heartbeat=&token=&ver=`.
//!
//! After the upgrade the comet sends `+h\r\n` (or an error frame `-p`/`-a`/`-c`
//! and closes), answers each text frame `h` with `+h\r\n`, and sends each
//! message as one text frame. The connection closes when no heartbeat arrives
//! within the client's heartbeat plus the grace period.

use crate::protocol::subscribe_params;
use crate::registry::Subscription;
use crate::Comet;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures::SinkExt;
use pushcluster_core::frame::{self, Format};
use std::collections::HashMap;
use std::sync::Arc;

/// Largest frame a subscriber may send; they only ever send `h`.
const MAX_CLIENT_FRAME: usize = 1024;
/// Read buffer per connection: subscribers send only `h` and close frames,
/// and a larger frame is read in several passes.
const READ_BUFFER: usize = 256;
/// Bytes gathered before a write; `flush` sends whatever is gathered.
const WRITE_BUFFER: usize = 16 * 1024;

/// Routes of the comet's HTTP listener: WebSocket and SSE.
pub fn router(comet: Arc<Comet>) -> Router {
    Router::new()
        .route("/sub", get(upgrade))
        .route("/sub/sse", get(crate::sse::subscribe))
        .with_state(comet)
}

fn text(b: &'static [u8]) -> Message {
    // The protocol frames are ASCII.
    Message::Text(Utf8Bytes::from_static(
        std::str::from_utf8(b).unwrap_or_default(),
    ))
}

async fn upgrade(
    State(comet): State<Arc<Comet>>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    // Parameters are checked and the connection registered before the
    // upgrade, so the connection's task keeps only what it needs (an idle
    // subscriber's memory is mostly that task); a refusal is sent after it.
    let get = |k: &str| q.get(k).map(String::as_str);
    let admitted = match subscribe_params(
        get("key"),
        get("heartbeat"),
        get("token"),
        get("ver"),
        comet.heartbeat_bounds(),
    ) {
        None => Err(frame::ERR_PARAM),
        Some(sub) => comet
            .admit(&sub)
            .map(|s| (s, sub.format, comet.read_deadline(sub.heartbeat)))
            .map_err(|refusal| refusal.frame()),
    };
    drop(q);
    // tungstenite's defaults (128 KiB read and write buffers per connection)
    // dominated an idle subscriber's memory; clients only ever send `h`, and
    // queued messages are flushed as soon as they are written.
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |socket| serve(comet, socket, admitted))
}

/// A registered subscription with its format and heartbeat deadline, or the
/// error frame to send instead.
type Admitted = Result<(Subscription, Format, std::time::Duration), &'static [u8]>;

async fn serve(comet: Arc<Comet>, mut socket: WebSocket, admitted: Admitted) {
    let (subscription, format, deadline) = match admitted {
        Ok(a) => a,
        Err(refusal) => {
            let _ = socket.send(text(refusal)).await;
            let _ = SinkExt::close(&mut socket).await;
            return;
        }
    };
    let gauge = comet.metrics.conn_gauge("websocket");
    gauge.inc();
    drive(&comet, socket, subscription, format, deadline).await;
    gauge.dec();
}

/// One connection's loop. The socket is not split: a split puts it behind
/// a lock in its own allocation, and every branch below runs only after the
/// others' futures are dropped, so one owner is enough.
async fn drive(
    comet: &Comet,
    mut socket: WebSocket,
    mut s: Subscription,
    format: Format,
    deadline: std::time::Duration,
) {
    if socket.send(text(frame::HEARTBEAT_REPLY)).await.is_err() {
        return;
    }
    let timer = tokio::time::sleep(deadline);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            _ = s.close.cancelled() => {
                // Flush what is already queued, then tell versioned clients to
                // reconnect; legacy clients reconnect on close.
                while let Ok(d) = s.rx.try_recv() {
                    if socket.feed(Message::Text(d.json(format).clone())).await.is_err() {
                        return;
                    }
                }
                if format == Format::Json {
                    let _ = socket.feed(text(frame::RECONNECT)).await;
                    comet.reconnect_sent();
                }
                let _ = socket.flush().await;
                let _ = SinkExt::close(&mut socket).await;
                return;
            }
            d = s.rx.recv() => {
                let Some(d) = d else { return };
                if socket.feed(Message::Text(d.json(format).clone())).await.is_err() {
                    return;
                }
                // Everything already queued goes out with one flush.
                while let Ok(d) = s.rx.try_recv() {
                    if socket.feed(Message::Text(d.json(format).clone())).await.is_err() {
                        return;
                    }
                }
                if socket.flush().await.is_err() {
                    return;
                }
            }
            m = socket.recv() => match m {
                Some(Ok(Message::Text(t))) if t.as_str() == "h" => {
                    if socket.send(text(frame::HEARTBEAT_REPLY)).await.is_err() {
                        return;
                    }
                    timer.as_mut().reset(tokio::time::Instant::now() + deadline);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    tracing::debug!("unknown frame from subscriber, closing");
                    let _ = socket.send(text(frame::ERR_PARAM)).await;
                    return;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            },
            _ = &mut timer => {
                tracing::debug!("heartbeat timeout, closing");
                let _ = SinkExt::close(&mut socket).await;
                return;
            }
        }
    }
}
