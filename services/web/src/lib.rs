//! Web: the HTTP API of a pushcluster.
//!
//! Two listeners, as in gopush-cluster: the public one ([`public`]: resolve a
//! key's comet, offline messages, time) and the admin one ([`admin`]: push,
//! multi-push, broadcast, delete), which the public Service never exposes.
//! Web holds no state of its own: it routes keys to comets through
//! [`Membership`](pushcluster_core::membership::Membership), stores pushes
//! along the one [`push::PushPath`] its storage kind chose, and reads storage
//! through the message service ([`clients`]).
//!
//! Modules depend one way: `config`, `reply`, `request`, `metrics` →
//! `clients` → `push` → `state` → `admin`, `public` → [`run`].

pub mod admin;
pub mod clients;
mod config;
pub mod idempotency;
pub mod metrics;
pub mod public;
pub mod push;
pub mod reply;
mod request;
pub mod state;

pub use config::{ClientAddresses, Config};
pub use state::AppState;

use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;
use pushcluster_core::ops::Readiness;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The OpenAPI document describing every endpoint, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Serves the OpenAPI document.
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Errors that stop web.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("membership: {0}")]
    Membership(#[from] pushcluster_lease::Error),
    #[error("rpc_token: {0}")]
    RpcToken(#[source] pushcluster_proto::auth::InvalidToken),
    #[error("internal RPC: {0}")]
    Rpc(#[from] pushcluster_proto::tls::RpcTlsError),
    #[error("store: {0}")]
    Store(#[source] pushcluster_store::StoreError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("public_tls: {0}")]
    Tls(#[from] pushcluster_core::tls::TlsError),
}

/// Headers of every response. `X-Content-Type-Options: nosniff`: a browser
/// must take JSON (and JSONP's JavaScript) as what it is declared, never
/// sniff a message a back end pushed into HTML. Once `draining` fires,
/// `Connection: close`, so clients stop reusing kept-alive connections to
/// this process during its lame-duck period and open new ones, which the
/// load balancer sends to another pod; when the listeners close, no idle
/// connection is left to race a request against.
async fn every_response(
    axum::extract::State(draining): axum::extract::State<CancellationToken>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut res = next.run(req).await;
    res.headers_mut().insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    if draining.is_cancelled() {
        res.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    res
}

/// Runs web until `cancel` fires; in-flight requests finish first.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), Error> {
    let mut reg = Registry::default();
    pushcluster_core::ops::register_runtime_metrics(&mut reg);
    let role = pushcluster_lease::Role::Router {
        comets: cfg.comets.clone(),
    };
    // Web holds no lease: nothing to release first, so one token stops all.
    let started = cfg
        .membership
        .start(role, &cancel, &cancel, &mut reg)
        .await?;
    let state = AppState::new(cfg.clone(), started.membership, cancel.clone(), &mut reg)?;
    let ready = Readiness::default();
    let public = tokio::net::TcpListener::bind(cfg.public_listen).await?;
    let admin = tokio::net::TcpListener::bind(cfg.admin_listen).await?;
    let public_tls = match &cfg.public_tls {
        Some(t) => Some((
            tokio::net::TcpListener::bind(t.listen).await?,
            pushcluster_core::tls::Certificates::load(t)?,
        )),
        None => None,
    };
    let listener_metrics = pushcluster_core::serve::ListenerMetrics::register(&mut reg);
    let caps = |name| listener_metrics.caps(name, &cfg.listener_limits);
    tracing::info!(
        public = %cfg.public_listen,
        public_tls = ?cfg.public_tls.as_ref().map(|t| t.listen),
        admin = %cfg.admin_listen,
        "web listening"
    );
    // Lame duck: on `cancel`, report unready at once, keep serving for
    // `drain_delay_ms`, then stop accepting and finish in-flight requests.
    let stop = CancellationToken::new();
    tokio::spawn({
        let (ready, stop, cancel) = (ready.clone(), stop.clone(), cancel.clone());
        let delay = Duration::from_millis(cfg.drain_delay_ms);
        async move {
            cancel.cancelled().await;
            ready.set(false);
            if !delay.is_zero() {
                tracing::info!(?delay, "draining: unready, still serving");
                tokio::time::sleep(delay).await;
            }
            stop.cancel();
        }
    });
    let ops = tokio::spawn(pushcluster_core::ops::serve_ops(
        cfg.ops_listen,
        Arc::new(reg),
        ready.clone(),
        stop.clone(),
    ));
    let closing = || axum::middleware::from_fn_with_state(cancel.clone(), every_response);
    let public_app = public::router(state.clone()).layer(closing());
    let admin_app = admin::router(state).layer(closing());
    let tls = public_tls.map(|(listener, certs)| {
        tokio::spawn(certs.clone().watch(stop.clone()));
        pushcluster_core::serve::serve_tls(
            listener,
            public_app.clone(),
            caps("web_public_tls"),
            stop.clone(),
            certs,
        )
    });
    let p = pushcluster_core::serve::serve(public, public_app, caps("web_public"), stop.clone());
    let a = pushcluster_core::serve::serve(admin, admin_app, caps("web_admin"), stop.clone());
    ready.set(true);
    match tls {
        Some(t) => {
            tokio::join!(p, a, t);
        }
        None => {
            tokio::join!(p, a);
        }
    }
    ready.set(false);
    let _ = ops.await;
    Ok(())
}
