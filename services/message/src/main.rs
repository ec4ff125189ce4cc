//! `push-message`: stores messages and assigns message ids.

use clap::Parser;
use push_message::Config;
use std::net::SocketAddr;
use std::path::PathBuf;

// The same allocator as the comet: measured on the private-push path (S3 in
// docs/benchmarks.md), glibc's malloc and free were ~6 % of the CPU.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// pushcluster message service: stores pushed messages, assigns per-key message
/// ids, serves offline reads to web and comets over gRPC.
///
/// Storage is Redis when a Redis URL is configured, else an embedded on-disk
/// store (redb) that survives restarts. Settings come from the YAML file given
/// with --config; flags and environment variables override it.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// YAML config file (see config/message.yaml for every setting).
    #[arg(short, long, env = "PUSH_MESSAGE_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "PUSH_MESSAGE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Listen address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PUSH_MESSAGE_OPS_LISTEN")]
    ops_listen: Option<SocketAddr>,
    /// Redis URL (redis://host:port/db); without it the embedded store is used.
    #[arg(long, env = "PUSH_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// The cluster's internal RPC token, required on every call; unset =
    /// calls are not checked.
    #[arg(long, env = "PUSH_RPC_TOKEN", hide_env_values = true)]
    rpc_token: Option<String>,
    /// File of the embedded store.
    #[arg(long, env = "PUSH_MESSAGE_DATA")]
    data: Option<PathBuf>,
    /// Runtime threads: 0 = one per CPU this process may use (a cgroup CPU
    /// limit counts); 1 = a single-threaded runtime, the cheapest on one CPU.
    #[arg(long, env = "PUSH_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Log as JSON lines.
    #[arg(long, env = "PUSH_LOG_JSON")]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pushcluster_core::ops::runtime(args.worker_threads)?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    pushcluster_core::ops::init_tracing(args.log_json);
    let mut cfg: Config = pushcluster_core::ops::load_yaml(args.config.as_deref())?;
    if let Some(a) = args.listen {
        cfg.listen = a;
    }
    if let Some(a) = args.ops_listen {
        cfg.ops_listen = a;
    }
    if let Some(u) = args.redis_url {
        cfg.storage.redis_url = Some(u);
    }
    if args.rpc_token.is_some() {
        cfg.rpc_token = args.rpc_token;
    }
    if let Some(p) = args.data {
        cfg.storage.path = p;
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    pushcluster_core::ops::cancel_on_signal(cancel.clone());
    push_message::run(cfg, cancel).await?;
    tracing::info!("message service stopped");
    Ok(())
}
