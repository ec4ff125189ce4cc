//! The admin listener: push, multi-push, broadcast, delete. Never exposed by
//! the public Service; when `admin_token` is configured every request needs
//! `Authorization: Bearer <token>`.
//!
//! A push is acknowledged only once stored. It goes to the comet that owns the
//! key (which stores, then delivers); when no comet owns the key or the owner
//! cannot be reached, web stores it through the message service itself, so it
//! is delivered on reconnect and never lost. A comet that answered with an
//! error (storage failed behind it) gets that error passed on instead.
//!
//! Every push carries a fresh id, passed to storage with the message. When a
//! comet's connection breaks while a push is in flight (the comet crashed),
//! web cannot know whether the comet stored it and stores it itself under the
//! same id: storage recognises the id and returns the first mid, so the
//! message is stored exactly once.

use crate::reply::{Reply, INTERNAL, UNAUTHORIZED};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use pushcluster_core::batch::Batcher;
use pushcluster_core::{GID_PRIVATE, GID_PUBLIC};
use pushcluster_proto::pipeline::Pipeline;
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_store::redis::RedisStore;
use pushcluster_store::{Channel, Store, StoreError};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

type Params = Query<HashMap<String, String>>;

/// Routes of the admin listener.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/1/admin/push/private", post(push_private))
        .route("/1/admin/push/mprivate", post(push_multi))
        .route("/1/admin/push/broadcast", post(broadcast))
        .route("/1/admin/msg/del", post(delete))
        .route("/admin/push", post(legacy_push))
        .route("/admin/msg/clean", post(legacy_delete))
        .route("/openapi.json", axum::routing::get(crate::public::openapi))
        .fallback(crate::public::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
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
            s.metrics.request("admin_unauthorized", UNAUTHORIZED);
            return Reply::err(
                UNAUTHORIZED,
                "missing or wrong admin token (Authorization: Bearer …)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

use pushcluster_proto::auth::constant_time_eq;

/// Maps an RPC failure to a reply.
pub(crate) fn status_reply(s: tonic::Status) -> Reply {
    match s.code() {
        Code::InvalidArgument => Reply::param(s.message().to_owned()),
        Code::DeadlineExceeded => Reply::err(
            INTERNAL,
            "timed out: the message may or may not be stored; retry and dedupe by content",
        ),
        _ => Reply::err(INTERNAL, s.message().to_owned()),
    }
}

/// The push did not get an answer from the comet: it was unreachable or its
/// connection broke. Statuses the comet answers itself carry no source; tonic
/// attaches the transport error as the source of those it makes up.
fn unreached(s: &tonic::Status) -> bool {
    s.code() == Code::Unavailable || std::error::Error::source(s).is_some()
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Reply> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        Reply::param(format!("request body is larger than {limit} bytes"))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    })
}

fn param<'a>(q: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    q.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

impl AppState {
    fn expire(&self, q: &HashMap<String, String>) -> Result<u64, Reply> {
        let secs = match param(q, "expire") {
            None => 0,
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| Reply::param("expire must be a whole number of seconds"))?,
        };
        self.cfg
            .limits
            .expire(secs)
            .map(|d| d.as_secs())
            .map_err(|e| Reply::param(e.to_string()))
    }

    fn check_message(&self, body: &[u8]) -> Result<(), Reply> {
        self.cfg
            .limits
            .check_message(body)
            .map_err(|e| Reply::param(e.to_string()))
    }

    async fn store_direct(
        &self,
        key: &str,
        gid: i32,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Result<i64, Reply> {
        let req = pb::AppendRequest {
            key: key.to_owned(),
            payload,
            expire_seconds: expire,
            gid,
            push_id: push_id.to_owned(),
            // Web holds no shard: its direct stores are not fenced.
            shard: 0,
            fence: 0,
        };
        // While the message service is unreachable (the embedded store's one
        // pod restarting takes seconds) keep trying, so the push is answered
        // late rather than failed. Only with a push id: storage dedupes by
        // it, so a retry after a lost answer cannot store twice.
        self.retrying(
            || {
                let mut message = self.message.clone();
                let req = req.clone();
                async move { message.append(req).await.map(|r| r.into_inner().mid) }
            },
            |s: &tonic::Status| !push_id.is_empty() && unreached(s),
        )
        .await
        .map_err(status_reply)
    }

    /// Runs `attempt` until it succeeds or fails other than `transient`ly;
    /// a transient failure is retried with backoff for [`STORE_RETRY_FOR`].
    async fn retrying<T, E: std::fmt::Display, F, Fut>(
        &self,
        attempt: F,
        transient: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let deadline = tokio::time::Instant::now() + STORE_RETRY_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            match attempt().await {
                Err(e) if transient(&e) && tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e, "storage unreachable: retrying");
                    self.metrics.store_retries.inc();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                r => return r,
            }
        }
    }

    /// Stores a private message straight in Redis, which publishes it to
    /// the comets holding the key's connections (`push_comet::live`).
    /// While Redis is unreachable it keeps trying for [`STORE_RETRY_FOR`],
    /// under one push id: a retry after a lost answer returns the first mid.
    async fn store_in_redis(
        &self,
        redis: &RedisStore,
        key: &str,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Result<i64, Reply> {
        let ttl = self
            .cfg
            .limits
            .expire(expire)
            .map_err(|e| Reply::param(e.to_string()))?;
        self.retrying(
            || redis.append_idempotent(Channel::Private(key), push_id, payload.clone(), ttl),
            |e: &StoreError| {
                matches!(e, StoreError::Redis(e) if e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_timeout())
            },
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "storing in redis failed");
            Reply::err(INTERNAL, format!("storage: {e}"))
        })
    }

    /// Pushes one private message; returns its mid once stored.
    pub async fn push_private(&self, key: &str, payload: Bytes, expire: u64) -> Result<i64, Reply> {
        let push_id = new_push_id();
        if let Some(redis) = &self.redis {
            return self
                .store_in_redis(redis, key, payload, expire, &push_id)
                .await;
        }
        let view = self.membership.view();
        if let Some(ep) = view.endpoint_for(key) {
            let req = pb::PushRequest {
                key: key.to_owned(),
                payload: payload.clone(),
                expire_seconds: expire,
                push_id: push_id.clone(),
            };
            let pusher = self
                .pusher(&ep.rpc)
                .map_err(|e| Reply::err(INTERNAL, e.to_string()))?;
            match pusher.call(req).await {
                Ok(CometPush::Stored(mid)) => return Ok(mid),
                Ok(CometPush::Unreached(why)) => {
                    tracing::warn!(shard = ep.shard, error = %why, "comet unreachable: storing directly");
                }
                Ok(CometPush::Refused(reply)) => return Err(reply),
                Ok(CometPush::Failed(why)) => {
                    // The comet could not store it (its message service is
                    // down, say): store it here under the same push id, which
                    // returns the first mid if the comet's write did land.
                    tracing::warn!(shard = ep.shard, error = %why, "comet could not store: storing directly");
                }
                Err(e) => return Err(Reply::err(INTERNAL, e.to_string())),
            }
        }
        self.metrics.stored_without_comet.inc();
        self.store_direct(key, GID_PRIVATE, payload, expire, &push_id)
            .await
    }
}

/// What became of a private push sent to a comet.
#[derive(Debug)]
pub(crate) enum CometPush {
    /// Stored with this mid (and queued on the key's connections).
    Stored(i64),
    /// Not stored by the comet (unreachable, or not serving the key now):
    /// web stores it itself, under the same push id.
    Unreached(String),
    /// Refused by the comet (a bad parameter): the caller's answer.
    Refused(Reply),
    /// The comet was reached but could not store it: web stores it itself,
    /// under the same push id (storage dedupes).
    Failed(String),
}

/// Pushes to one comet, coalesced under load (see [`pushcluster_core::batch`]).
pub(crate) type Pusher = Batcher<pb::PushRequest, CometPush>;

/// How long a store waits for an unreachable message service to come back:
/// long enough for the embedded store's one pod to be replaced on a busy
/// node, short of the 30 s a back end's HTTP client typically waits.
const STORE_RETRY_FOR: Duration = Duration::from_secs(15);

/// Pushes in one call at most; the comet takes up to 256.
const PUSH_BATCH: usize = 128;
/// Push calls in flight per comet before further pushes wait and coalesce
/// (one, as for the comet's appends: see APPENDS_IN_FLIGHT there).
const PUSHES_IN_FLIGHT: usize = 1;

/// A [`Pusher`] for the comet behind `client`: batches pipelined on one
/// PushStream (PushBatch calls to a comet without it). `deadline` bounds
/// each batch's wait for its reply.
pub(crate) fn pusher(
    client: CometClient<pushcluster_proto::auth::AuthChannel>,
    deadline: Duration,
) -> Pusher {
    let stream = {
        let client = client.clone();
        Arc::new(Pipeline::new(deadline, move |calls| {
            let mut client = client.clone();
            Box::pin(async move {
                client
                    .push_stream(calls)
                    .await
                    .map(tonic::Response::into_inner)
            })
        }))
    };
    Batcher::new(PUSH_BATCH, PUSHES_IN_FLIGHT, move |pushes| {
        let (stream, mut client) = (stream.clone(), client.clone());
        async move {
            let n = pushes.len();
            let replied = stream
                .call_or(pb::PushBatchRequest { pushes }, |req| async move {
                    client
                        .push_batch(req)
                        .await
                        .map(tonic::Response::into_inner)
                })
                .await;
            match replied {
                Ok(r) => r
                    .results
                    .into_iter()
                    .map(|k| match k {
                        k if k.error.is_empty() => CometPush::Stored(k.mid),
                        k if k.unserved => CometPush::Unreached(k.error),
                        k if k.invalid => CometPush::Refused(Reply::param(k.error)),
                        k => CometPush::Failed(k.error),
                    })
                    .collect(),
                Err(s) if unreached(&s) => (0..n)
                    .map(|_| CometPush::Unreached(s.message().to_owned()))
                    .collect(),
                Err(s) if s.code() == Code::InvalidArgument => (0..n)
                    .map(|_| CometPush::Refused(Reply::param(s.message().to_owned())))
                    .collect(),
                Err(s) => (0..n)
                    .map(|_| CometPush::Failed(s.message().to_owned()))
                    .collect(),
            }
        }
    })
}

/// A fresh push id: 128 random bits, hex.
fn new_push_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

async fn push_private_inner(s: &AppState, q: &HashMap<String, String>, body: Body) -> Reply {
    let start = Instant::now();
    let run = async {
        let key = s.check_key(param(q, "key"))?;
        let expire = s.expire(q)?;
        let body = read_body(body, s.cfg.limits.max_message_bytes).await?;
        s.check_message(&body)?;
        let mid = s.push_private(key, body, expire).await?;
        Ok::<_, Reply>(Reply::ok(Some(json!({ "mid": mid }))))
    };
    let r = run.await.unwrap_or_else(|e| e);
    s.metrics
        .push_latency
        .observe(start.elapsed().as_secs_f64());
    r
}

/// `POST /1/admin/push/private?key=KEY&expire=SECONDS`, body = the JSON message.
async fn push_private(State(s): State<Arc<AppState>>, Query(q): Params, body: Body) -> Reply {
    let r = push_private_inner(&s, &q, body).await;
    s.metrics.request("push_private", r.ret());
    r
}

/// `POST /admin/push?key=&expire=` (legacy), same as `/1/admin/push/private`.
async fn legacy_push(State(s): State<Arc<AppState>>, Query(q): Params, body: Body) -> Reply {
    let r = push_private_inner(&s, &q, body).await;
    s.metrics.request("legacy_push", r.ret());
    r
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
async fn push_multi(State(s): State<Arc<AppState>>, Query(q): Params, body: Body) -> Reply {
    let run = async {
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
        let failed = s.multi_push(keys, payload, expire).await;
        Ok(if failed.is_empty() {
            Reply::ok(None)
        } else {
            Reply::ok(Some(json!({ "fk": failed })))
        })
    };
    let r = run.await.unwrap_or_else(|e| e);
    s.metrics.request("push_mprivate", r.ret());
    r
}

impl AppState {
    /// Pushes to many keys, one call per comet (with Redis: one store per
    /// key, pipelined on web's connection); returns the keys that failed.
    async fn multi_push(&self, keys: Vec<String>, payload: Bytes, expire: u64) -> Vec<String> {
        let push_id = new_push_id();
        let push_id = push_id.as_str();
        if self.redis.is_some() {
            return self.store_each(keys, payload, expire, push_id).await;
        }
        let view = self.membership.view();
        let mut by_comet: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut no_comet = Vec::new();
        for k in keys {
            match view.endpoint_for(&k) {
                Some(ep) => by_comet.entry(ep.rpc.clone()).or_default().push(k),
                None => no_comet.push(k),
            }
        }
        let groups = by_comet.into_iter().map(|(rpc, keys)| {
            let payload = payload.clone();
            async move {
                let req = pb::MultiPushRequest {
                    keys: keys.clone(),
                    payload: payload.clone(),
                    expire_seconds: expire,
                    push_id: push_id.to_owned(),
                };
                let client = self.comet(&rpc);
                let res = match client {
                    Ok(mut c) => c.multi_push(req).await,
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                match res {
                    Ok(r) => {
                        let (unserved, failed): (Vec<_>, Vec<_>) = r
                            .into_inner()
                            .results
                            .into_iter()
                            .filter(|k| !k.error.is_empty())
                            .partition(|k| k.unserved);
                        let mut failed: Vec<String> = failed.into_iter().map(|k| k.key).collect();
                        let unserved = unserved.into_iter().map(|k| k.key).collect();
                        failed.extend(self.store_each(unserved, payload, expire, push_id).await);
                        failed
                    }
                    Err(s) if unreached(&s) => {
                        self.store_each(keys, payload, expire, push_id).await
                    }
                    Err(s) => {
                        tracing::error!(comet = %rpc, error = %s.message(), "multi-push failed");
                        keys
                    }
                }
            }
        });
        let (mut failed, direct) = tokio::join!(
            futures::future::join_all(groups),
            self.store_each(no_comet, payload.clone(), expire, push_id)
        );
        let mut out: Vec<String> = failed.drain(..).flatten().collect();
        out.extend(direct);
        out
    }

    /// Stores `payload` for each of `keys` without a comet (in Redis when
    /// web has it, else through the message service); returns the keys that
    /// failed.
    async fn store_each(
        &self,
        keys: Vec<String>,
        payload: Bytes,
        expire: u64,
        push_id: &str,
    ) -> Vec<String> {
        if self.redis.is_none() && !keys.is_empty() {
            self.metrics.stored_without_comet.inc_by(keys.len() as u64);
        }
        let stores = keys.into_iter().map(|k| {
            let payload = payload.clone();
            async move {
                let stored = match &self.redis {
                    Some(redis) => {
                        self.store_in_redis(redis, &k, payload, expire, push_id)
                            .await
                    }
                    None => {
                        self.store_direct(&k, GID_PRIVATE, payload, expire, push_id)
                            .await
                    }
                };
                match stored {
                    Ok(_) => None,
                    Err(_) => Some(k),
                }
            }
        });
        futures::future::join_all(stores)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// `POST /1/admin/push/broadcast?expire=SECONDS`, body = the JSON message:
/// stored once on the public sequence (gid 1), then delivered to every
/// connection of every comet. Clients that were offline read it from
/// `/1/msg/get?...&p=LAST_PUBLIC_MID`.
async fn broadcast(State(s): State<Arc<AppState>>, Query(q): Params, body: Body) -> Reply {
    let run = async {
        let expire = s.expire(&q)?;
        let body = read_body(body, s.cfg.limits.max_message_bytes).await?;
        s.check_message(&body)?;
        let _order = s.broadcast_order.lock().await;
        // Stored once by web itself, never retried: no push id needed.
        let mid = s
            .store_direct("", GID_PUBLIC, body.clone(), expire, "")
            .await?;
        let view = s.membership.view();
        let deliveries = view.endpoints.values().map(|ep| {
            let req = pb::DeliverRequest {
                message: Some(pb::StoredMessage {
                    mid,
                    gid: GID_PUBLIC,
                    payload: body.clone(),
                }),
            };
            let client = s.comet(&ep.rpc);
            async move {
                let res = match client {
                    Ok(mut c) => c.deliver(req).await.map(|r| r.into_inner().connections),
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                res.unwrap_or_else(|e| {
                    // Stored already: its clients read it on reconnect.
                    tracing::warn!(shard = ep.shard, error = %e.message(), "broadcast delivery failed");
                    0
                })
            }
        });
        let connections: u64 = futures::future::join_all(deliveries)
            .await
            .into_iter()
            .sum();
        Ok::<_, Reply>(Reply::ok(Some(
            json!({ "mid": mid, "connections": connections }),
        )))
    };
    let r = run.await.unwrap_or_else(|e| e);
    s.metrics.request("push_broadcast", r.ret());
    r
}

async fn delete_inner(s: &AppState, q: &HashMap<String, String>, body: Body) -> Reply {
    let run = async {
        // gopush-cluster sent `key` in a form body; the query works too.
        let body = read_body(body, 4096).await?;
        let form: HashMap<String, String> = url_form(&body);
        let key = param(q, "key").or_else(|| param(&form, "key"));
        let key = s.check_key(key)?;
        s.message
            .clone()
            .delete(pb::DeleteRequest {
                key: key.to_owned(),
            })
            .await
            .map_err(status_reply)?;
        Ok::<_, Reply>(Reply::ok(None))
    };
    run.await.unwrap_or_else(|e| e)
}

/// Parses an `application/x-www-form-urlencoded` body with axum's query parser.
fn url_form(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    let uri = format!("/?{}", text.trim());
    uri.parse::<axum::http::Uri>()
        .ok()
        .and_then(|u| Query::<HashMap<String, String>>::try_from_uri(&u).ok())
        .map(|Query(m)| m)
        .unwrap_or_default()
}

/// `POST /1/admin/msg/del?key=KEY` (or form body `key=KEY`): removes the key's
/// stored messages. Its mid sequence continues, so clients never mistake a new
/// message for one they have seen.
async fn delete(State(s): State<Arc<AppState>>, Query(q): Params, body: Body) -> Reply {
    let r = delete_inner(&s, &q, body).await;
    s.metrics.request("msg_del", r.ret());
    r
}

/// `POST /admin/msg/clean` (legacy), same as `/1/admin/msg/del`.
async fn legacy_delete(State(s): State<Arc<AppState>>, Query(q): Params, body: Body) -> Reply {
    let r = delete_inner(&s, &q, body).await;
    s.metrics.request("legacy_msg_clean", r.ret());
    r
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
    fn form_bodies() {
        assert_eq!(
            url_form(b"key=a%2Cb&x=1").get("key").map(String::as_str),
            Some("a,b")
        );
        assert!(url_form(b"").is_empty());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
