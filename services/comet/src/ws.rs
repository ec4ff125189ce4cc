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
use futures::{SinkExt, StreamExt};
use pushcluster_core::frame::{self, Format};
use std::collections::HashMap;
use std::sync::Arc;

/// Largest frame a subscriber may send; they only ever send `h`.
const MAX_CLIENT_FRAME: usize = 1024;
/// Read buffer per connection.
const READ_BUFFER: usize = 1024;
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
    // tungstenite's defaults (128 KiB read and write buffers per connection)
    // dominated an idle subscriber's memory; clients only ever send `h`, and
    // queued messages are flushed as soon as they are written.
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |socket| serve(comet, socket, q))
}

async fn serve(comet: Arc<Comet>, mut socket: WebSocket, q: HashMap<String, String>) {
    let get = |k: &str| q.get(k).map(String::as_str);
    let sub = subscribe_params(
        get("key"),
        get("heartbeat"),
        get("token"),
        get("ver"),
        comet.heartbeat_bounds(),
    );
    let Some(sub) = sub else {
        let _ = socket.send(text(frame::ERR_PARAM)).await;
        let _ = socket.close().await;
        return;
    };
    let subscription = match comet.admit(&sub) {
        Ok(s) => s,
        Err(refusal) => {
            let _ = socket.send(text(refusal.frame())).await;
            let _ = socket.close().await;
            return;
        }
    };
    let gauge = comet.metrics.conn_gauge("websocket");
    gauge.inc();
    drive(
        &comet,
        socket,
        subscription,
        sub.format,
        comet.read_deadline(sub.heartbeat),
    )
    .await;
    gauge.dec();
}

async fn drive(
    comet: &Comet,
    socket: WebSocket,
    mut s: Subscription,
    format: Format,
    deadline: std::time::Duration,
) {
    let (mut tx, mut rx) = socket.split();
    if tx.send(text(frame::HEARTBEAT_REPLY)).await.is_err() {
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
                    if tx.feed(Message::Text(d.json(format).clone())).await.is_err() {
                        return;
                    }
                }
                if format == Format::Json {
                    let _ = tx.feed(text(frame::RECONNECT)).await;
                    comet.reconnect_sent();
                }
                let _ = tx.flush().await;
                let _ = tx.close().await;
                return;
            }
            d = s.rx.recv() => {
                let Some(d) = d else { return };
                if tx.feed(Message::Text(d.json(format).clone())).await.is_err() {
                    return;
                }
                // Everything already queued goes out with one flush.
                while let Ok(d) = s.rx.try_recv() {
                    if tx.feed(Message::Text(d.json(format).clone())).await.is_err() {
                        return;
                    }
                }
                if tx.flush().await.is_err() {
                    return;
                }
            }
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) if t.as_str() == "h" => {
                    if tx.send(text(frame::HEARTBEAT_REPLY)).await.is_err() {
                        return;
                    }
                    timer.as_mut().reset(tokio::time::Instant::now() + deadline);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    tracing::debug!("unknown frame from subscriber, closing");
                    let _ = tx.send(text(frame::ERR_PARAM)).await;
                    return;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            },
            _ = &mut timer => {
                tracing::debug!("heartbeat timeout, closing");
                let _ = tx.close().await;
                return;
            }
        }
    }
}
