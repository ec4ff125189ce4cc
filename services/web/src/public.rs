//! The public listener: resolve a key's comet, read offline messages, time.
//! Versioned (`/1/...`, params `k`, `p`, `m`, `cb`) and legacy unversioned
//! (`/server/get`, `/msg/get`, `/time/get`, params `key`, `proto`, `mid`,
//! `pmid`, `callback`) forms, as gopush-cluster served them.

use crate::reply::{status_reply, Reply, INTERNAL, NO_NODE, UNAUTHORIZED};
use crate::request::{param, Params};
use crate::AppState;
use axum::extract::{Query, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use pushcluster_core::frame::{encode_json, Format};
use pushcluster_core::membership::{ClusterView, ShardEndpoint};
use pushcluster_core::token;
use pushcluster_core::{GID_PRIVATE, GID_PUBLIC};
use pushcluster_proto::v1 as pb;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Routes of the public listener.
pub fn router(state: Arc<AppState>) -> Router {
    let metrics = state.metrics.clone();
    let origins = Arc::new(state.cfg.cors_origins.clone());
    let mut r = Router::new()
        .route("/1/server/get", get(server_get))
        .route("/1/msg/get", get(msg_get))
        .route("/1/time/get", get(time_get))
        .route("/server/get", get(legacy_server_get))
        .route("/msg/get", get(legacy_msg_get))
        .route("/time/get", get(legacy_time_get))
        .route("/openapi.json", get(crate::openapi));
    if state.cfg.demo {
        r = r
            .route("/demo", get(|| async { Redirect::permanent("/demo/") }))
            .route("/demo/", get(demo_page))
            .route("/demo/src/index.js", get(demo_client));
    }
    r.fallback(crate::reply::not_found)
        .layer(axum::middleware::from_fn(bearer_as_token))
        .layer(axum::middleware::from_fn_with_state(
            origins,
            pushcluster_core::cors::cors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            crate::metrics::count_requests,
        ))
        .with_state(state)
}

/// The browser client's demo page (`clients/js/demo.html`).
async fn demo_page() -> impl IntoResponse {
    static PAGE: &str = include_str!("../../../clients/js/demo.html");
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

/// The browser client itself, as the demo page imports it.
async fn demo_client() -> impl IntoResponse {
    static CLIENT: &str = include_str!("../../../clients/js/src/index.js");
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CLIENT,
    )
}

/// A subscriber token sent as `Authorization: Bearer` (kept out of URLs,
/// so out of proxy logs) counts as the `token` parameter, which it is
/// added as when the query has none: every read checks one place.
async fn bearer_as_token(mut req: Request, next: Next) -> Response {
    let token = pushcluster_core::cors::bearer(req.headers()).map(str::to_owned);
    if let Some(t) = token {
        let query = req.uri().query().unwrap_or_default();
        let has = form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "token");
        if !has {
            let mut q = form_urlencoded::Serializer::new(query.to_owned());
            q.append_pair("token", &t);
            let path = format!("{}?{}", req.uri().path(), q.finish());
            if let Ok(pq) = path.parse::<axum::http::uri::PathAndQuery>() {
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = Some(pq);
                if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
    next.run(req).await
}

fn parse_mid(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, Reply> {
    match param(q, name) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .map(Some)
            .map_err(|_| Reply::param(format!("{name} must be an integer message id"))),
    }
}

/// Resolves the comet address for `key` and protocol `proto` (1 ws, 2 tcp, 3 sse).
fn resolve(s: &AppState, key: Option<&str>, proto: Option<&str>) -> Result<Value, Reply> {
    let key = s.check_key(key)?;
    let view = s.membership.view();
    address(s, view.endpoint_for(key), proto).map(|addr| json!({ "server": addr }))
}

/// [`resolve`], except that while the answer would be `lost` from the
/// holder that served it when asked, it waits for another holder (see
/// [`server_get`]).
async fn resolve_after_losing(
    s: &AppState,
    key: Option<&str>,
    proto: Option<&str>,
    lost: &str,
) -> Result<Value, Reply> {
    let key = s.check_key(key)?;
    let mut views = s.membership.watch();
    let first = views.borrow_and_update().endpoint_for(key).cloned();
    // A comet web can still reach is not gone: the client lost it for
    // some other reason (an idle timeout on the way, its own network) and
    // is better served by an answer now than by a wait for a handover that
    // is not coming.
    let waits = match (&first, s.handover_within) {
        (Some(ep), Some(_)) => {
            address(s, Some(ep), proto)? == lost && !s.clients.comet_answers(&ep.rpc).await
        }
        (None, Some(_)) => true,
        (_, None) => false,
    };
    if waits {
        let deadline = tokio::time::sleep(s.handover_within.unwrap_or_default());
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                changed = views.changed() => {
                    if changed.is_err() || handed_over(first.as_ref(), &views.borrow_and_update(), key) {
                        break;
                    }
                }
                _ = &mut deadline => break,
                _ = s.draining.cancelled() => break,
            }
        }
    }
    let view = views.borrow().clone();
    address(s, view.endpoint_for(key), proto).map(|addr| json!({ "server": addr }))
}

/// Whether `key`, served by `first` when the client asked, has a new
/// comet in `view`: its shard has another holder, or the key moved to
/// another shard that remains (a reshard). A shard that merely left the
/// ring (its holder died and is not ready) does not count: its keys would
/// land on a neighbour that refuses them, while the standby takes the
/// shard moments later.
fn handed_over(first: Option<&ShardEndpoint>, view: &ClusterView, key: &str) -> bool {
    let Some(first) = first else {
        return view.endpoint_for(key).is_some();
    };
    match view.endpoints.get(&first.shard) {
        None => false,
        Some(now) if now != first => true,
        Some(_) => view.endpoint_for(key).map(|e| e.shard) != Some(first.shard),
    }
}

/// The address a client is given for `ep` and `proto`: its shard's
/// advertised address, else the advertised template, else the comet's own.
fn address(s: &AppState, ep: Option<&ShardEndpoint>, proto: Option<&str>) -> Result<String, Reply> {
    let ep = ep.ok_or_else(|| Reply::err(NO_NODE, "no comet serves this key right now"))?;
    let a = &s.cfg.advertise;
    let (own, template, by_shard) = match proto.unwrap_or("1") {
        "1" | "3" => (&ep.ws, &a.ws, &a.ws_by_shard),
        "2" => (&ep.tcp, &a.tcp, &a.tcp_by_shard),
        other => {
            return Err(Reply::param(format!(
                "unknown protocol {other:?}: 1 websocket, 2 tcp, 3 sse"
            )))
        }
    };
    let addr = match (by_shard.get(&ep.shard), template) {
        (Some(a), _) => a.clone(),
        (None, Some(t)) => t.replace("{shard}", &ep.shard.to_string()),
        (None, None) => own.clone(),
    };
    if addr.is_empty() {
        return Err(Reply::err(
            NO_NODE,
            "the comet has no address for this protocol",
        ));
    }
    Ok(addr)
}

/// One read of a channel through the message service.
struct Read {
    /// Stored messages after the mid asked for, oldest first.
    msgs: Vec<pb::StoredMessage>,
    /// The channel's sequence started again: `msgs` are from its start.
    reset: bool,
    /// The sequence's epoch (0: none).
    epoch: u64,
}

/// Stored messages of a channel after `after`, seen under `epoch` (0: not
/// known).
async fn fetch(s: &AppState, key: &str, gid: i32, after: i64, epoch: u64) -> Result<Read, Reply> {
    let req = pb::FetchRequest {
        key: key.to_owned(),
        after_mid: after,
        gid,
        limit: 0,
        epoch,
    };
    s.clients
        .message
        .clone()
        .fetch(req)
        .await
        .map(|r| {
            let r = r.into_inner();
            Read {
                msgs: r.messages,
                reset: r.reset,
                epoch: r.epoch,
            }
        })
        .map_err(status_reply)
}

fn parse_epoch(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, Reply> {
    match param(q, name) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            Reply::param(format!(
                "{name} must be an epoch as data.epoch gave it (a non-negative integer)"
            ))
        }),
    }
}

/// Whether a private read of `key` may be answered: with subscriber
/// tokens on, only with the key's valid `token`, and as JSONP only when
/// `private_jsonp` allows it. Without a subscriber secret anything goes,
/// as gopush-cluster's clients expect.
fn authorize_read(
    s: &AppState,
    key: &str,
    q: &HashMap<String, String>,
    callback: Option<&str>,
) -> Result<(), Reply> {
    let Some(secret) = s.cfg.subscriber_secret.as_deref().filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    if callback.is_some() && !s.cfg.private_jsonp {
        return Err(Reply::err(
            UNAUTHORIZED,
            "JSONP is off for private reads while subscriber tokens are on (web.privateJsonp)",
        ));
    }
    let token = param(q, "token").unwrap_or_default();
    let max = s.cfg.subscriber_token_max_seconds;
    token::verify(secret.as_bytes(), key, token, token::unix_now(), max).map_err(|e| {
        Reply::err(
            UNAUTHORIZED,
            format!("private read of {key:?} needs the key's subscriber token (token= or Authorization: Bearer): {e}"),
        )
    })
}

/// The JSON object clients receive, as a `serde_json::Value`.
fn message_value(m: &pb::StoredMessage) -> Value {
    let msg: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
    json!({ "msg": msg, "mid": m.mid, "gid": m.gid })
}

/// The legacy element: the old-format message object serialised as a string.
fn legacy_message_string(m: &pb::StoredMessage) -> Value {
    Value::String(
        String::from_utf8_lossy(&encode_json(&m.payload, m.mid, m.gid, Format::Legacy))
            .into_owned(),
    )
}

fn timeid() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_nanos() / 100) as i64)
        .unwrap_or(0)
}

/// The reply, success or error, as JSONP when `callback` names one.
fn answer(r: Result<Reply, Reply>, callback: Option<&str>) -> Reply {
    r.unwrap_or_else(|e| e).jsonp(callback)
}

/// `/1/server/get?k=KEY&p=PROTO[&w=ADDRESS]`. `w` names the address a
/// client just lost (its connection broke, or nothing answered there):
/// while web would give that same address from the same holder, it waits
/// for the shard's holder to change, at most a lease duration plus a retry
/// period, and answers then. A client that lost a crashed comet so
/// reconnects the moment its standby takes the shard, instead of whenever
/// its backoff next wakes it; a client whose comet is fine gets its answer
/// at once.
async fn server_get(State(s): State<Arc<AppState>>, Query(q): Params) -> Reply {
    let r = match param(&q, "w") {
        Some(lost) => resolve_after_losing(&s, param(&q, "k"), param(&q, "p"), lost).await,
        None => resolve(&s, param(&q, "k"), param(&q, "p")),
    };
    answer(r.map(|d| Reply::ok(Some(d))), param(&q, "cb"))
}

async fn legacy_server_get(State(s): State<Arc<AppState>>, Query(q): Params) -> Reply {
    let r = resolve(&s, param(&q, "key"), param(&q, "proto")).map(|d| Reply::ok(Some(d)));
    answer(r, param(&q, "callback"))
}

/// `/1/msg/get?k=KEY&m=MID[&p=PUBLIC_MID][&e=EPOCH][&pe=PUBLIC_EPOCH]`:
/// private messages after `m` (`data.msgs`) and, when `p` is given, public
/// messages after `p` (`data.pmsgs`). At most the message service's fetch
/// limit (messages and bytes) per call: call again from the last mid for
/// more. `data` is left out when nothing is new, unless `e` is given.
/// `data.reset` (`data.preset` for public messages) is true when `m` (`p`)
/// is beyond the last stored mid, or was seen under another epoch than `e`
/// (`pe`): the sequence started again (storage lost its data), the
/// messages are from its start, and the client forgets the mids it has
/// instead of dropping the new ones as already seen. With `e`, `data.epoch`
/// (and with `pe`, `data.pepoch`) says the epoch the mids belong to: pass
/// it back as `e` (`pe`) next time. gopush-cluster's clients, which send
/// neither, get the replies they know.
async fn msg_get(State(s): State<Arc<AppState>>, Query(q): Params) -> Reply {
    let names = Names {
        key: "k",
        mid: "m",
        pmid: "p",
        callback: "cb",
        epochs: Some(("e", "pe")),
    };
    let r = msg_get_inner(&s, &q, &names, message_value).await;
    answer(r, param(&q, "cb"))
}

/// `/msg/get?key=&mid=&pmid=`: the same, each element a JSON string of the
/// old-format message.
async fn legacy_msg_get(State(s): State<Arc<AppState>>, Query(q): Params) -> Reply {
    let names = Names {
        key: "key",
        mid: "mid",
        pmid: "pmid",
        callback: "callback",
        epochs: None,
    };
    let r = msg_get_inner(&s, &q, &names, legacy_message_string).await;
    answer(r, param(&q, "callback"))
}

/// The query parameters of one flavour of `msg/get`.
struct Names {
    key: &'static str,
    mid: &'static str,
    pmid: &'static str,
    callback: &'static str,
    /// Private and public epoch; none in the legacy API.
    epochs: Option<(&'static str, &'static str)>,
}

async fn msg_get_inner(
    s: &AppState,
    q: &HashMap<String, String>,
    n: &Names,
    render: fn(&pb::StoredMessage) -> Value,
) -> Result<Reply, Reply> {
    let key = s.check_key(param(q, n.key))?;
    authorize_read(s, key, q, param(q, n.callback))?;
    let mid = parse_mid(q, n.mid)?.ok_or_else(|| Reply::param(format!("{} is required", n.mid)))?;
    let pmid = parse_mid(q, n.pmid)?;
    let (epoch, pepoch) = match n.epochs {
        Some((e, pe)) => (parse_epoch(q, e)?, parse_epoch(q, pe)?),
        None => (None, None),
    };
    let private = fetch(s, key, GID_PRIVATE, mid, epoch.unwrap_or(0)).await?;
    let public = match pmid {
        Some(p) => Some(fetch(s, "", GID_PUBLIC, p, pepoch.unwrap_or(0)).await?),
        None => None,
    };
    let quiet = private.msgs.is_empty()
        && !private.reset
        && public
            .as_ref()
            .is_none_or(|p| p.msgs.is_empty() && !p.reset);
    if quiet && epoch.is_none() {
        return Ok(Reply::ok(None));
    }
    let mut data = json!({ "msgs": private.msgs.iter().map(render).collect::<Vec<_>>() });
    // Only when true, or asked for: gopush-cluster's clients see the reply
    // they know.
    if private.reset {
        data["reset"] = true.into();
    }
    if epoch.is_some() {
        data["epoch"] = private.epoch.into();
    }
    if let Some(p) = public {
        data["pmsgs"] = p.msgs.iter().map(render).collect::<Vec<_>>().into();
        if p.reset {
            data["preset"] = true.into();
        }
        if pepoch.is_some() {
            data["pepoch"] = p.epoch.into();
        }
    }
    Ok(Reply::ok(Some(data)))
}

/// `/1/time/get`: `data.timeid` (Unix time in 100 ns units, as gopush-cluster).
/// With `k=KEY` it adds `data.mid`, the key's last mid, and `data.pmid`, the
/// last public mid, with their epochs `data.epoch` and `data.pepoch`: a
/// client compares them with what it has seen to know whether to fetch,
/// and detects a sequence that was reset (idle expiry, lost data).
async fn time_get(State(s): State<Arc<AppState>>, Query(q): Params) -> Reply {
    let r = time_inner(&s, &q, param(&q, "k")).await;
    answer(r, param(&q, "cb"))
}

async fn legacy_time_get(State(s): State<Arc<AppState>>, Query(q): Params) -> Reply {
    let r = time_inner(&s, &q, None).await;
    answer(r, param(&q, "callback"))
}

async fn time_inner(
    s: &AppState,
    q: &HashMap<String, String>,
    key: Option<&str>,
) -> Result<Reply, Reply> {
    let mut data = json!({ "timeid": timeid() });
    if let Some(k) = key {
        let k = s.check_key(Some(k))?;
        authorize_read(s, k, q, param(q, "cb"))?;
        let last = |key: &str, gid: i32| {
            let req = pb::LastMidRequest {
                key: key.to_owned(),
                gid,
            };
            let mut c = s.clients.message.clone();
            async move { c.last_mid(req).await.map(|r| r.into_inner()) }
        };
        let (private, public) = tokio::try_join!(last(k, GID_PRIVATE), last("", GID_PUBLIC))
            .map_err(|e| Reply::err(INTERNAL, format!("storage: {}", e.message())))?;
        data["mid"] = private.mid.into();
        data["pmid"] = public.mid.into();
        data["epoch"] = private.epoch.into();
        data["pepoch"] = public.epoch.into();
    }
    Ok(Reply::ok(Some(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(shard: u32, host: &str) -> ShardEndpoint {
        ShardEndpoint {
            shard,
            rpc: format!("http://{host}:1"),
            ws: format!("{host}:2"),
            tcp: format!("{host}:3"),
        }
    }

    #[test]
    fn a_resolve_waits_for_a_new_holder_not_for_a_neighbour() {
        let both = ClusterView::new([ep(0, "a"), ep(1, "b")]);
        let key = (0..100)
            .map(|i| format!("k{i}"))
            .find(|k| both.endpoint_for(k).map(|e| e.shard) == Some(0))
            .expect("some key on shard 0");
        let first = both.endpoint_for(&key).cloned();
        // Nothing changed.
        assert!(!handed_over(first.as_ref(), &both, &key));
        // The holder died: its shard left the ring and the key would land
        // on shard 1, which is not its comet.
        let gone = ClusterView::new([ep(1, "b")]);
        assert!(!handed_over(first.as_ref(), &gone, &key));
        // The standby took the shard.
        let taken = ClusterView::new([ep(0, "c"), ep(1, "b")]);
        assert!(handed_over(first.as_ref(), &taken, &key));
        // Nobody served the key when asked: any comet will do.
        assert!(handed_over(None, &gone, &key));
        assert!(!handed_over(None, &ClusterView::new([]), &key));
        // A reshard moved the key while its old shard stays.
        let moved = (2..50)
            .map(|n| ClusterView::new((0..n).map(|k| ep(k, if k == 0 { "a" } else { "x" }))))
            .find(|v| v.endpoint_for(&key).map(|e| e.shard) != Some(0))
            .expect("some shard count moves the key");
        assert!(handed_over(first.as_ref(), &moved, &key));
    }
}
