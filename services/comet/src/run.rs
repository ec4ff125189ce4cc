//! Runs a comet: membership, listeners, the gRPC server, the heartbeat
//! sweeper, and the drain that loses nothing on SIGTERM.

use crate::comet::Comet;
use crate::{rpc, tcp, ws, Config, Error};
use prometheus_client::registry::Registry as MetricsRegistry;
use pushcluster_proto::auth::RequireToken;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs a comet until `cancel` fires, then drains: stops accepting, finishes
/// in-flight pushes, flushes queued messages, closes connections.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), Error> {
    let mut reg = MetricsRegistry::default();
    pushcluster_core::ops::register_runtime_metrics(&mut reg);
    let background = CancellationToken::new();
    let owner_cancel = CancellationToken::new();
    // The store vouches for this comet's shard while the lease backend
    // cannot (crate::witness).
    let mut role = cfg.role();
    if let pushcluster_lease::Role::Comet { witness, .. } = &mut role {
        *witness = Some(crate::witness::StoreWitness::for_config(&cfg)?);
    }
    let started = cfg
        .membership
        .start(role, &background, &owner_cancel, &mut reg)
        .await?;
    let owner_task = started.owner;
    // Keeps a static ownership's channel open while the comet runs.
    let _membership_guard = started.fixed_ownership;
    let comet = Comet::new(cfg.clone(), started.membership, started.ownership, &mut reg)?;
    let ready = comet.ready.clone();

    let ws_listener = tokio::net::TcpListener::bind(cfg.ws_listen).await?;
    let ws_tls = match &cfg.ws_tls {
        Some(t) => Some((
            tokio::net::TcpListener::bind(t.listen).await?,
            pushcluster_core::tls::Certificates::load(t)?,
        )),
        None => None,
    };
    let tcp_listener = tokio::net::TcpListener::bind(cfg.tcp_listen).await?;
    let rpc_listener = tokio::net::TcpListener::bind(cfg.rpc_listen).await?;
    tracing::info!(
        shard = cfg.shard,
        ws = %cfg.ws_listen,
        tcp = %cfg.tcp_listen,
        rpc = %cfg.rpc_listen,
        ws_tls = ?cfg.ws_tls.as_ref().map(|t| t.listen),
        "comet listening"
    );

    // Listeners stop on `stop_accepting`; connections close on `cancel` later.
    let stop_accepting = CancellationToken::new();
    let listener_metrics = pushcluster_core::serve::ListenerMetrics::register(&mut reg);
    let caps = |name| listener_metrics.caps(name, &cfg.listener_limits);
    let (ws_caps, tcp_caps) = (caps("comet_ws"), caps("comet_tcp"));
    let wss_caps = caps("comet_wss");
    let ops = tokio::spawn(pushcluster_core::ops::serve_ops(
        cfg.ops_listen,
        Arc::new(reg),
        ready.clone(),
        cancel.clone(),
    ));
    // Listening and following membership: ready, holder or standby.
    ready.set(true);
    let ws_task = tokio::spawn(pushcluster_core::serve::serve(
        ws_listener,
        ws::router(comet.clone()),
        ws_caps,
        stop_accepting.clone(),
    ));
    let wss_task = ws_tls.map(|(listener, certs)| {
        tokio::spawn(certs.clone().watch(background.clone()));
        tokio::spawn(pushcluster_core::serve::serve_tls(
            listener,
            ws::router(comet.clone()),
            wss_caps,
            stop_accepting.clone(),
            certs,
        ))
    });
    let tcp_conns = tokio_util::task::TaskTracker::new();
    let tcp_task = tokio::spawn(tcp::serve(
        comet.clone(),
        tcp_listener,
        tcp_caps,
        stop_accepting.clone(),
        tcp_conns.clone(),
    ));
    let follow = tokio::spawn(comet.clone().follow_membership(background.clone()));
    let sweeper = tokio::spawn(sweep_silent(comet.clone(), background.clone()));
    // Without Redis, pushes web stored around this comet are announced by
    // the message service (crate::bypassed).
    let bypassed = matches!(comet.path, crate::storage::PushPath::StoreThenQueue(_))
        .then(|| tokio::spawn(crate::bypassed::follow(comet.clone(), background.clone())));
    let require = RequireToken::new(comet.cfg.rpc_token.as_deref()).map_err(Error::RpcToken)?;
    let rpc_tls = comet
        .cfg
        .rpc_tls
        .as_ref()
        .map(pushcluster_proto::tls::ServerTls::load)
        .transpose()?;
    let rpc_task = tokio::spawn({
        let stop = stop_accepting.clone();
        let svc = rpc::CometRpc::new(comet.clone())
            .draining_on(stop.clone())
            .into_server();
        let incoming = pushcluster_proto::tls::incoming(rpc_listener, rpc_tls);
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(require))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
    });

    cancel.cancelled().await;
    tracing::info!("comet draining");
    // Hand the shard over first, so a standby takes it while we drain.
    owner_cancel.cancel();
    if let Some(t) = owner_task {
        let _ = t.await;
    }
    ready.set(false);
    stop_accepting.cancel();
    // In-flight pushes finish (stored and queued) before connections close.
    match rpc_task.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "gRPC task failed"),
    }
    comet.registry.close_all();
    let _ = tcp_task.await;
    tcp_conns.close();
    // Each connection flushes its queue and sends the reconnect frame.
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp_conns.wait()).await;
    // axum's graceful shutdown waits for open SSE responses, which end once
    // their queues are flushed after close_all; WebSocket connections are
    // tracked apart (they left axum at the upgrade).
    let _ = tokio::time::timeout(Duration::from_secs(10), ws_task).await;
    if let Some(t) = wss_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    // Every connection unregisters when it ends; the sweeper aborts those
    // that cannot flush within the grace period.
    let _ = tokio::time::timeout(Duration::from_secs(10), comet.registry.drained()).await;
    background.cancel();
    let _ = follow.await;
    let _ = sweeper.await;
    if let Some(b) = bypassed {
        let _ = b.await;
    }
    let _ = ops.await;
    Ok(())
}

/// How often connections are checked for silence past their deadline.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Closes silent connections (one pass per [`SWEEP_EVERY`]) until `stop`:
/// one sweep over the registry instead of a timer in every connection.
async fn sweep_silent(comet: Arc<Comet>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let n = comet.registry.sweep();
                if n > 0 {
                    tracing::debug!(connections = n, "closed for missing heartbeats");
                }
            }
        }
    }
}
