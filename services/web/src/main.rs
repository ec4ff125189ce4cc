//! `push-web`: the HTTP API of a pushcluster.

use clap::Parser;
use push_web::Config;
use std::net::SocketAddr;
use std::path::PathBuf;

// The same allocator as the comet: measured on the private-push path (S3 in
// docs/benchmarks.md), glibc's malloc and free were ~6 % of the CPU.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// pushcluster web: the gopush-cluster compatible HTTP API.
///
/// Public listener: /1/server/get, /1/msg/get, /1/time/get (and the legacy
/// /server/get, /msg/get, /time/get). Admin listener (keep it private):
/// /1/admin/push/private, /1/admin/push/mprivate, /1/admin/push/broadcast,
/// /1/admin/msg/del (and legacy /admin/push, /admin/msg/clean). Both serve
/// /openapi.json. Settings come from the YAML file given with --config; flags
/// and environment variables override it.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// YAML config file (see config/web.yaml for every setting).
    #[arg(short, long, env = "PUSH_WEB_CONFIG")]
    config: Option<PathBuf>,
    /// Public listen address.
    #[arg(long, env = "PUSH_WEB_PUBLIC_LISTEN")]
    public_listen: Option<SocketAddr>,
    /// Admin listen address.
    #[arg(long, env = "PUSH_WEB_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Listen address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PUSH_WEB_OPS_LISTEN")]
    ops_listen: Option<SocketAddr>,
    /// gRPC URL of the message service.
    #[arg(long, env = "PUSH_MESSAGE_URL")]
    message_url: Option<String>,
    /// Bearer token required on the admin listener.
    #[arg(long, env = "PUSH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Secret of subscriber tokens: private reads then need the key's token.
    #[arg(long, env = "PUSH_SUBSCRIBER_SECRET", hide_env_values = true)]
    subscriber_secret: Option<String>,
    /// The cluster's internal RPC token, sent on calls to comets and the
    /// message service.
    #[arg(long, env = "PUSH_RPC_TOKEN", hide_env_values = true)]
    rpc_token: Option<String>,
    /// Redis URL of the message store: web then stores private pushes in it
    /// itself (comets deliver them from Redis). Prefer this variable (from a
    /// Secret) to the config file for a URL with a password.
    #[arg(long, env = "PUSH_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Runtime threads: 0 (the default) = one per CPU this process may use
    /// (a cgroup CPU limit counts); 1 = a single-threaded runtime. Web
    /// stores each push in Redis and answers it; with two threads one keeps
    /// answering while the host holds the other's CPU, which halved S3's p99
    /// for ~8 µs more CPU per push (docs/benchmarks.md).
    #[arg(long, env = "PUSH_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Log as JSON lines.
    #[arg(long, env = "PUSH_LOG_JSON")]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    pushcluster_core::ops::runtime(a.worker_threads)?.block_on(serve(a))
}

async fn serve(a: Args) -> anyhow::Result<()> {
    pushcluster_core::ops::init_tracing(a.log_json);
    let mut cfg: Config = pushcluster_core::ops::load_yaml(a.config.as_deref())?;
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* };
    }
    set!(public_listen, admin_listen, ops_listen, message_url);
    if a.admin_token.is_some() {
        cfg.admin_token = a.admin_token;
    }
    if a.subscriber_secret.is_some() {
        cfg.subscriber_secret = a.subscriber_secret;
    }
    if a.rpc_token.is_some() {
        cfg.rpc_token = a.rpc_token;
    }
    if a.redis_url.is_some() {
        cfg.store.redis_url = a.redis_url;
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    pushcluster_core::ops::cancel_on_signal(cancel.clone());
    push_web::run(cfg, cancel).await?;
    tracing::info!("web stopped");
    Ok(())
}
