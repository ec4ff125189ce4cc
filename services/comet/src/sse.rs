//! Server-sent events: `GET /sub/sse?key=&token=`, for browsers and tools that
//! cannot hold a WebSocket.
//!
//! Each private message is an event whose id is its mid; a client that
//! reconnects with `Last-Event-ID` (or `last_id=`) first gets what it missed,
//! fetched from the message service, then live messages, with no duplicate.
//! Public (broadcast) messages are events of type `public` without an id, so
//! they do not disturb the resume point. Refusals are HTTP errors with a JSON
//! body (`ret` from [`pushcluster_core::ret`], as on web: 65534 parameter,
//! 65533 auth, 1002 channel, 65535 storage).

use crate::protocol::Subscribe;
use crate::registry::{Close, Delivery, Next};
use crate::Comet;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushcluster_core::frame::Format;
use pushcluster_core::ret;
use pushcluster_core::GID_PRIVATE;
use pushcluster_proto::v1 as pb;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a client may leave its event stream unread before it is dropped
/// as a slow consumer: the stream's task never waits forever.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// Hands `ev` to the response stream: at once when there is room, else
/// within STALL_LIMIT. False: the client is gone or stalled; stop.
async fn send_bounded(
    comet: &Comet,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
    ev: Event,
) -> bool {
    match tx.try_send(Ok(ev)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(ev)) => {
            match tokio::time::timeout(STALL_LIMIT, tx.send(ev)).await {
                Ok(r) => r.is_ok(),
                Err(_) => {
                    tracing::debug!("SSE subscriber left its stream unread, dropping it");
                    comet.metrics.slow_consumer();
                    false
                }
            }
        }
    }
}

fn refuse(status: StatusCode, ret: u32, msg: &str) -> Response {
    (status, Json(serde_json::json!({"ret": ret, "msg": msg}))).into_response()
}

fn event(d: &Delivery) -> Event {
    let e = Event::default().data(d.json(Format::Json).as_str());
    if d.gid == GID_PRIVATE {
        e.id(d.mid.to_string())
    } else {
        e.event("public")
    }
}

/// One page of `key`'s private messages after `after`, seen under `epoch`
/// (0: not known).
async fn fetch_page(
    comet: &Comet,
    key: &str,
    after: i64,
    epoch: u64,
) -> Result<pb::FetchReply, tonic::Status> {
    let req = pb::FetchRequest {
        key: key.to_owned(),
        after_mid: after,
        gid: GID_PRIVATE,
        limit: 0,
        epoch,
    };
    comet
        .message
        .clone()
        .fetch(req)
        .await
        .map(|r| r.into_inner())
}

/// Handles `GET /sub/sse`.
pub async fn subscribe(
    State(comet): State<Arc<Comet>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let header = headers.get("last-event-id").map(|v| v.as_bytes());
    let req = match crate::protocol::parse_sse(q.as_deref().unwrap_or_default(), header) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, ret::PARAM, &e.to_string()),
    };
    let (key, last, epoch) = (req.key, req.last.unwrap_or(-1), req.epoch);
    // A token in `Authorization: Bearer` (a fetch-based SSE client) stays
    // out of URLs and proxy logs; the parameter still works for EventSource.
    let token = match pushcluster_core::cors::bearer(&headers) {
        Some(t) if req.token.is_empty() => t.to_owned(),
        _ => req.token,
    };
    let sub = Subscribe {
        key: key.clone(),
        heartbeat: comet.cfg.sse_keepalive_seconds,
        token,
        format: Format::Json,
    };
    // No client heartbeats here: the comet sends keep-alives, and a gone
    // client shows as a closed response stream.
    let s = match comet.admit(&sub, None).await {
        Ok(s) => s,
        Err(crate::Refusal::Param) => {
            return refuse(StatusCode::BAD_REQUEST, ret::PARAM, "invalid key")
        }
        Err(crate::Refusal::Auth) => {
            return refuse(StatusCode::UNAUTHORIZED, ret::UNAUTHORIZED, "token refused")
        }
        Err(crate::Refusal::Channel) => {
            return refuse(
                StatusCode::CONFLICT,
                ret::CHANNEL,
                "key cannot subscribe here (subscriber limit, wrong comet or shutting down)",
            )
        }
    };
    // Subscribed first, fetched second: nothing falls in between. The first
    // page decides the answer (storage down: 503); the rest is paged in the
    // stream, so a long backlog of large messages never sits in memory whole.
    let first = if last >= 0 {
        match fetch_page(&comet, &key, last, epoch.unwrap_or(0)).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "SSE resume fetch failed");
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ret::INTERNAL,
                    "storage unavailable",
                );
            }
        }
    } else {
        None
    };

    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(16);
    let gauge = comet.metrics.conn_gauge("sse");
    gauge.inc();
    let comet2 = comet.clone();
    tokio::spawn(async move {
        let mut sent = last;
        let mut page = first;
        if page.as_ref().is_some_and(|p| p.reset) {
            // The key's sequence started again: the client forgets the mids
            // it has (`event: reset`), and what follows is from the start.
            sent = 0;
            let reset = Event::default().event("reset").data(r#"{"mid":0}"#);
            if !send_bounded(&comet2, &tx, reset).await {
                gauge.dec();
                return;
            }
        }
        // Asked for: the epoch the mids that follow belong to.
        let epoch = match (epoch, &page) {
            (Some(_), Some(p)) => {
                let e = Event::default()
                    .event("epoch")
                    .data(format!(r#"{{"epoch":{}}}"#, p.epoch));
                if !send_bounded(&comet2, &tx, e).await {
                    gauge.dec();
                    return;
                }
                p.epoch
            }
            _ => 0,
        };
        while let Some(p) = page.take() {
            for m in p.messages {
                sent = sent.max(m.mid);
                let d = Delivery::new(m.mid, GID_PRIVATE, m.payload);
                if !send_bounded(&comet2, &tx, event(&d)).await {
                    gauge.dec();
                    return;
                }
            }
            if p.more {
                match fetch_page(&comet2, &key, sent, epoch).await {
                    Ok(next) if !next.messages.is_empty() => page = Some(next),
                    Ok(_) => {}
                    Err(e) => {
                        // The client reconnects with Last-Event-ID and resumes.
                        tracing::warn!(key = %key, error = %e, "SSE resume fetch failed");
                        gauge.dec();
                        return;
                    }
                }
            }
        }
        loop {
            tokio::select! {
                biased;
                next = s.next() => match next {
                    Next::Message(d) => {
                        // Live messages already sent from the fetch are skipped.
                        if d.gid == GID_PRIVATE && d.mid <= sent {
                            continue;
                        }
                        comet2.metrics.delivered(&d);
                        if !send_bounded(&comet2, &tx, event(&d)).await {
                            break;
                        }
                    }
                    // The queue is flushed already (messages come first).
                    Next::Close(Close::Reconnect) => {
                        let _ = send_bounded(&comet2, &tx, Event::default().event("reconnect").data("reconnect")).await;
                        comet2.reconnect_sent();
                        break;
                    }
                    Next::Close(Close::Timeout | Close::Abort) => break,
                },
                _ = tx.closed() => break,
            }
        }
        gauge.dec();
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(comet.cfg.sse_keepalive_seconds.max(1)))
                .text("h"),
        )
        .into_response()
}
