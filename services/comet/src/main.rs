//! `push-comet`: holds subscriber connections and delivers messages.

use clap::Parser;
use push_comet::Config;
use std::net::SocketAddr;
use std::path::PathBuf;

// jemalloc keeps long-lived per-connection objects and the short-lived
// buffers of HTTP handshakes in separate size-class pages and returns freed
// pages to the OS, so a reconnect storm does not leave the heap fragmented:
// 50k idle WebSocket subscribers measured 2,043 B each with glibc's malloc
// and 1,271 B with jemalloc (docs/benchmarks.md, S1).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// pushcluster comet: holds WebSocket (/sub), SSE (/sub/sse) and TCP subscriber
/// connections for the keys of its shard and delivers pushed messages in order.
///
/// Settings come from the YAML file given with --config; flags and environment
/// variables override it.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// YAML config file (see config/comet-0.yaml for every setting).
    #[arg(short, long, env = "PUSH_COMET_CONFIG")]
    config: Option<PathBuf>,
    /// The shard this comet serves.
    #[arg(long, env = "PUSH_COMET_SHARD")]
    shard: Option<u32>,
    /// Number of shards in the cluster (static and Redis membership; on
    /// Kubernetes the shard Leases say).
    #[arg(long, env = "PUSH_COMET_SHARDS")]
    shards: Option<u32>,
    /// WebSocket and SSE listen address.
    #[arg(long, env = "PUSH_COMET_WS_LISTEN")]
    ws_listen: Option<SocketAddr>,
    /// TCP protocol listen address.
    #[arg(long, env = "PUSH_COMET_TCP_LISTEN")]
    tcp_listen: Option<SocketAddr>,
    /// gRPC listen address.
    #[arg(long, env = "PUSH_COMET_RPC_LISTEN")]
    rpc_listen: Option<SocketAddr>,
    /// Listen address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PUSH_COMET_OPS_LISTEN")]
    ops_listen: Option<SocketAddr>,
    /// gRPC URL of the message service.
    #[arg(long, env = "PUSH_MESSAGE_URL")]
    message_url: Option<String>,
    /// Redis of the message store (`redis://host:port/db`): pushes are
    /// stored straight into it instead of through the message service.
    #[arg(long, env = "PUSH_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Secret for subscriber tokens (HMAC-SHA256); unset = no token check.
    #[arg(long, env = "PUSH_SUBSCRIBER_SECRET", hide_env_values = true)]
    subscriber_secret: Option<String>,
    /// The cluster's internal RPC token (required on calls to this comet,
    /// sent to the message service); unset = calls are not checked.
    #[arg(long, env = "PUSH_RPC_TOKEN", hide_env_values = true)]
    rpc_token: Option<String>,
    /// Runtime threads: 1 (the default) = a single-threaded runtime, which
    /// costs a fifth less CPU per push than two threads waking each other and
    /// fans out as well (docs/benchmarks.md, S2 and S3); comets scale by
    /// shards. 0 = one per CPU this process may use (a cgroup CPU limit counts).
    #[arg(long, env = "PUSH_WORKER_THREADS", default_value_t = 1)]
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
    set!(
        shard,
        ws_listen,
        tcp_listen,
        rpc_listen,
        ops_listen,
        message_url
    );
    if let Some(n) = a.shards {
        cfg.membership.set_shards(n);
    }
    if a.redis_url.is_some() {
        cfg.store.redis_url = a.redis_url;
    }
    if a.subscriber_secret.is_some() {
        cfg.subscriber_secret = a.subscriber_secret;
    }
    if a.rpc_token.is_some() {
        cfg.rpc_token = a.rpc_token;
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    pushcluster_core::ops::cancel_on_signal(cancel.clone());
    push_comet::run(cfg, cancel).await?;
    tracing::info!("comet stopped");
    Ok(())
}
