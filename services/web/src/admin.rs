//! The admin listener: push, multi-push, broadcast, delete. Never exposed by
//! the public Service; when `admin_token` is configured every request needs
//! `Authorization: Bearer <token>`. How a push is stored and delivered is
//! [`crate::push`]'s business; this module reads and checks requests.

use crate::idempotency::{push_id, IdempotencyKey};
use crate::reply::{status_reply, Reply, UNAUTHORIZED};
use crate::request::{param, read_body, url_form, Params};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use pushcluster_proto::auth::constant_time_eq;
use pushcluster_proto::v1 as pb;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

/// Routes of the admin listener.
pub fn router(state: Arc<AppState>) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/1/admin/push/private", post(push_private))
        .route("/1/admin/push/mprivate", post(push_multi))
        .route("/1/admin/push/broadcast", post(broadcast))
        .route("/1/admin/msg/del", post(delete))
        // Legacy unversioned forms, as gopush-cluster served them.
        .route("/admin/push", post(push_private))
        .route("/admin/msg/clean", post(delete))
        .route("/openapi.json", axum::routing::get(crate::openapi))
        .fallback(crate::reply::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(
            metrics,
            crate::metrics::count_requests,
        ))
        .with_state(state)
}

async fn authorize(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(token) = s.cfg.admin_token.as_deref().filter(|t| !t.is_empty()) {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Reply::err(
                UNAUTHORIZED,
                "missing or wrong admin token (Authorization: Bearer …)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// `POST /1/admin/push/private?key=KEY&expire=SECONDS`, body = the JSON
/// message (also the legacy `POST /admin/push?key=&expire=`).
async fn push_private(
    State(s): State<Arc<AppState>>,
    Query(q): Params,
    IdempotencyKey(idempotency): IdempotencyKey,
    body: Body,
) -> Result<Reply, Reply> {
    let start = Instant::now();
    let pushed = async {
        let key = s.check_key(param(&q, "key"))?;
        let expire = s.expire(&q)?;
        let body = read_body(body, s.cfg.limits.max_message_bytes).await?;
        s.check_message(&body)?;
        let push_id = push_id(idempotency.as_deref(), &body);
        let mid = s.pushes.push_private(key, body, expire, &push_id).await?;
        Ok(Reply::ok(Some(json!({ "mid": mid }))))
    }
    .await;
    s.metrics
        .push_latency
        .observe(start.elapsed().as_secs_f64());
    pushed
}

/// Parses `{"m": <message as a JSON string, or the JSON itself>, "k": "a,b,c"}`.
fn parse_multi(body: &[u8]) -> Result<(Bytes, Vec<String>), Reply> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Reply::param(format!("body must be {{\"m\":…,\"k\":\"a,b\"}}: {e}")))?;
    let m = match v.get("m") {
        Some(Value::String(s)) => Bytes::from(s.clone().into_bytes()),
        Some(Value::Null) | None => return Err(Reply::param("m (the message) is required")),
        Some(other) => Bytes::from(other.to_string().into_bytes()),
    };
    let k = v
        .get("k")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Reply::param("k (comma-separated keys) is required"))?;
    let mut seen = HashSet::new();
    let keys = k
        .split(',')
        .filter(|key| seen.insert(*key))
        .map(str::to_owned)
        .collect();
    Ok((m, keys))
}

/// `POST /1/admin/push/mprivate?expire=SECONDS`, body `{"m":…,"k":"a,b,c"}`.
/// Every key is checked before anything is stored; keys that could not be
/// stored come back in `data.fk`.
async fn push_multi(
    State(s): State<Arc<AppState>>,
    Query(q): Params,
    IdempotencyKey(idempotency): IdempotencyKey,
    body: Body,
) -> Result<Reply, Reply> {
    let expire = s.expire(&q)?;
    let l = &s.cfg.limits;
    let limit = l.max_message_bytes * 2 + l.max_keys_per_multipush * (l.max_key_bytes + 1) + 64;
    let body = read_body(body, limit).await?;
    let (payload, keys) = parse_multi(&body)?;
    s.check_message(&payload)?;
    if keys.len() > l.max_keys_per_multipush {
        return Err(Reply::param(format!(
            "{} keys, more than the limit of {}",
            keys.len(),
            l.max_keys_per_multipush
        )));
    }
    for k in &keys {
        s.check_key(Some(k))?;
    }
    let push_id = push_id(idempotency.as_deref(), &body);
    let failed = s.pushes.multi_push(keys, payload, expire, &push_id).await;
    Ok(if failed.is_empty() {
        Reply::ok(None)
    } else {
        Reply::ok(Some(json!({ "fk": failed })))
    })
}

/// `POST /1/admin/push/broadcast?expire=SECONDS`, body = the JSON message,
/// delivered to every connection (see [`crate::push::Pushes::broadcast`]).
async fn broadcast(
    State(s): State<Arc<AppState>>,
    Query(q): Params,
    IdempotencyKey(idempotency): IdempotencyKey,
    body: Body,
) -> Result<Reply, Reply> {
    let expire = s.expire(&q)?;
    let body = read_body(body, s.cfg.limits.max_message_bytes).await?;
    s.check_message(&body)?;
    let push_id = idempotency.map_or(String::new(), |k| push_id(Some(&k), &body));
    let (mid, connections) = s.pushes.broadcast(body, expire, &push_id).await?;
    Ok(Reply::ok(Some(
        json!({ "mid": mid, "connections": connections }),
    )))
}

/// `POST /1/admin/msg/del?key=KEY` (or form body `key=KEY`; also the legacy
/// `POST /admin/msg/clean`): removes the key's stored messages. Its mid
/// sequence continues, so clients never mistake a new message for one they
/// have seen.
async fn delete(
    State(s): State<Arc<AppState>>,
    Query(q): Params,
    body: Body,
) -> Result<Reply, Reply> {
    // gopush-cluster sent `key` in a form body; the query works too.
    let body = read_body(body, 4096).await?;
    let form = url_form(&body);
    let key = s.check_key(param(&q, "key").or_else(|| param(&form, "key")))?;
    s.clients
        .message
        .clone()
        .delete(pb::DeleteRequest {
            key: key.to_owned(),
        })
        .await
        .map_err(status_reply)?;
    Ok(Reply::ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_push_bodies() {
        let (m, k) = parse_multi(br#"{"m":"{\"a\":1}","k":"x,y,x"}"#).unwrap();
        assert_eq!(m.as_ref(), br#"{"a":1}"#);
        assert_eq!(k, vec!["x", "y"]);
        let (m, _) = parse_multi(br#"{"m":{"a":1},"k":"x"}"#).unwrap();
        assert_eq!(m.as_ref(), br#"{"a":1}"#);
        assert!(parse_multi(br#"{"k":"x"}"#).is_err());
        assert!(parse_multi(br#"{"m":"1"}"#).is_err());
        assert!(parse_multi(br#"{"m":"1","k":""}"#).is_err());
        assert!(parse_multi(b"nope").is_err());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
