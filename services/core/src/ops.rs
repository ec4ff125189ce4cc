//! What every service runs besides its own job: logging set-up, shutdown on
//! SIGTERM/SIGINT, and the ops listener with `/metrics`, `/healthz`, `/readyz`.

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Readiness shared between a service and its `/readyz`: the service's
/// own say (up, not draining) and that of a dependency it cannot serve
/// without (a comet's live feed from Redis).
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<ReadyFlags>);

#[derive(Debug)]
struct ReadyFlags {
    ready: AtomicBool,
    dependency_up: AtomicBool,
}

impl Default for ReadyFlags {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            dependency_up: AtomicBool::new(true),
        }
    }
}

impl Readiness {
    /// Marks the service ready (or not) to take traffic.
    pub fn set(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::SeqCst);
    }
    /// Marks the dependency up or down (up unless told).
    pub fn set_dependency(&self, up: bool) {
        self.0.dependency_up.store(up, Ordering::SeqCst);
    }
    /// Whether the service takes traffic.
    pub fn get(&self) -> bool {
        self.0.ready.load(Ordering::SeqCst) && self.0.dependency_up.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Arc<Registry>,
    ready: Readiness,
}

/// The ops routes; services with an HTTP listener of their own may merge them.
pub fn ops_router(registry: Arc<Registry>, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { registry, ready })
}

async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    if s.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds `addr` and serves the ops routes until `cancel` fires, with the
/// same header deadline as every listener and a small connection cap
/// (probes and scrapers need few; refusals are not counted, the registry is
/// already built).
pub async fn serve_ops(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Readiness,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "ops listener (/metrics /healthz /readyz)");
    let limits = crate::serve::ListenerLimits {
        max_connections: 256,
        ..Default::default()
    };
    let caps = crate::serve::ListenerMetrics::default().caps("ops", &limits);
    crate::serve::serve(listener, ops_router(registry, ready), caps, cancel).await;
    Ok(())
}

/// Builds the tokio runtime a service runs on, with `threads` workers, or one
/// per CPU the process may use when 0 (this honours a cgroup CPU limit, so a
/// pod limited to one CPU gets one).
///
/// The runtime keeps a timer armed (see `keep_a_timer_armed`).
///
/// One thread means tokio's current-thread scheduler: no thread hands work to
/// another, which on a one-CPU process saves a context switch per hop. In S3
/// (docs/benchmarks.md) it cut the services' CPU per push by 13 %.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let rt = builder.enable_all().build()?;
    rt.spawn(keep_a_timer_armed());
    Ok(rt)
}

/// How often [`keep_a_timer_armed`] ticks: shorter than any per-call deadline
/// the services set (the Redis client's is 500 ms).
const TIMER_ANCHOR: std::time::Duration = std::time::Duration::from_millis(100);

/// A tick this late means the runtime ran nothing for that long: logged.
const STALL_WARN: std::time::Duration = std::time::Duration::from_millis(100);

/// How late the runtime's anchor timer fired, tick by tick: every request
/// and frame of the process waited as long. Shared by the runtime, built
/// before any registry, and the registry that [`register_runtime_metrics`]
/// gives it to.
static RUNTIME_LAG: std::sync::LazyLock<prometheus_client::metrics::histogram::Histogram> =
    std::sync::LazyLock::new(|| {
        prometheus_client::metrics::histogram::Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ])
    });

/// Registers `pushcluster_runtime_lag_seconds`, how late the runtime ran a
/// timer due every 100 ms: a blocking call on a runtime thread, CPU
/// starvation (a CPU limit, a busy node) or a paused VM all show here, and
/// every connection of the process waited as long.
pub fn register_runtime_metrics(reg: &mut Registry) {
    reg.register(
        "pushcluster_runtime_lag_seconds",
        "How late the async runtime ran a timer due every 100 ms (time nothing ran)",
        RUNTIME_LAG.clone(),
    );
}

/// Keeps one timer at most [`TIMER_ANCHOR`] away registered for the
/// runtime's whole life, and measures how late it fires.
///
/// tokio wakes its I/O driver through an eventfd whenever a timer is
/// registered that expires before the driver's next planned wake-up. On an
/// otherwise idle timer wheel each RPC's deadline is such a timer, so every
/// call paid a write(2) and a spurious epoll wake-up (measured in S3, see
/// docs/benchmarks.md). With an earlier timer always armed, a deadline
/// seconds away is never the earliest and costs nothing. The tick it
/// already takes measures the runtime's lag for free.
async fn keep_a_timer_armed() {
    let mut tick = tokio::time::interval(TIMER_ANCHOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = tick.tick().await;
        let late = due.elapsed();
        RUNTIME_LAG.observe(late.as_secs_f64());
        if late >= STALL_WARN {
            tracing::warn!(
                late_ms = late.as_millis() as u64,
                "the runtime ran nothing for a while (a blocking call, CPU starvation or a paused host): every connection waited as long"
            );
        }
    }
}

/// Turns Nagle's algorithm off on an accepted connection (for axum's
/// `ListenerExt::tap_io`): a reply or frame must not wait for the ACK of the
/// one before it.
pub fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
}

/// Cancels `cancel` on the first SIGTERM or SIGINT.
pub fn cancel_on_signal(cancel: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        // Cancel before logging: if the log cannot be written (stderr is a
        // closed pipe), nothing may stand between the signal and the shutdown.
        cancel.cancel();
        tracing::info!("shutdown requested");
    });
}

/// Sets up `tracing` from `RUST_LOG` (default `info`), as JSON lines when `json`.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Its default reports a failed write with eprintln!, which panics when
        // stderr itself is the broken pipe; a lost log line must not kill a task.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `url` with its credentials (`user:password@`) masked, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// `url` with `password` set in it (percent-encoded): how a password kept
/// apart from the URL (`PUSH_REDIS_PASSWORD`, from a Secret) joins it.
pub fn with_password(url: &str, password: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (user, hosts) = match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            (
                userinfo.split_once(':').map_or(userinfo, |(u, _)| u),
                &rest[at + 1..],
            )
        }
        None => ("", rest),
    };
    let mut encoded = String::with_capacity(password.len());
    for b in password.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{}{user}:{encoded}@{hosts}", &url[..scheme_end + 3])
}

#[cfg(test)]
mod tests {

    #[test]
    fn credentials_in_urls_are_masked() {
        assert_eq!(
            super::redact_url("redis://:hunter2@redis:6379/0"),
            "redis://***@redis:6379/0"
        );
        assert_eq!(
            super::redact_url("rediss://user:p@ss@host/1"),
            "rediss://***@host/1"
        );
        assert_eq!(
            super::redact_url("redis://redis:6379/0"),
            "redis://redis:6379/0"
        );
        assert_eq!(super::redact_url("redis://h/0?x=a@b"), "redis://h/0?x=a@b");
    }
    use super::*;
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_thread_is_the_current_thread_scheduler_more_are_workers() {
        let one = runtime(1).unwrap();
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let three = runtime(3).unwrap();
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
        let auto = runtime(0).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(auto.metrics().num_workers(), cpus);
    }

    /// The sum of the lag histogram as `/metrics` shows it.
    fn lag_sum() -> f64 {
        let mut reg = Registry::default();
        register_runtime_metrics(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("pushcluster_runtime_lag_seconds_sum "))
            .and_then(|v| v.parse().ok())
            .expect("the lag sum is exported")
    }

    #[test]
    fn a_runtime_that_blocks_shows_its_lag() {
        let rt = runtime(1).unwrap();
        let before = lag_sum();
        rt.block_on(async {
            // Let the anchor timer start, block the only thread past its
            // next tick, then give it a tick to notice.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            std::thread::sleep(std::time::Duration::from_millis(400));
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        });
        let lag = lag_sum() - before;
        assert!(lag >= 0.25, "lag counted: {lag} s");
    }
}
