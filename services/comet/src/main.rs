//! `push-comet`: holds subscriber connections and delivers messages.

use clap::Parser;
use push_comet::Config;
use pushcluster_core::cli::{run_service, set, set_some, CommonArgs};
use std::net::SocketAddr;
use std::path::PathBuf;

// jemalloc keeps long-lived per-connection objects and the short-lived
// buffers of HTTP handshakes in separate size-class pages and returns freed
// pages to the OS, so a reconnect storm does not leave the heap fragmented:
// 50k idle WebSocket subscribers measured 2,043 B each with glibc's malloc
// and 1,271 B with jemalloc (docs/benchmarks.md, S1).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runtime threads unless `--worker-threads` says: one. A single-threaded
/// runtime costs a fifth less CPU per push than two threads waking each other
/// and fans out as well (docs/benchmarks.md, S2 and S3); comets scale by shards.
const THREADS: usize = 1;

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
    /// Secret for subscriber tokens (HMAC-SHA256); unset = no token check.
    #[arg(long, env = "PUSH_SUBSCRIBER_SECRET", hide_env_values = true)]
    subscriber_secret: Option<String>,
    // With a Redis URL (`--redis-url`), private pushes arrive on its live
    // channels.
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (ca, cert, key) = a.common.redis_tls_files();
    pushcluster_redis::TlsSettings::from_files(ca, cert, key)?.install();
    let common = a.common.clone();
    let configure = |cfg: &mut Config| {
        set(&mut cfg.shard, a.shard);
        if let Some(n) = a.shards {
            cfg.membership.set_shards(n);
        }
        set(&mut cfg.ws_listen, a.ws_listen);
        set(&mut cfg.tcp_listen, a.tcp_listen);
        set(&mut cfg.rpc_listen, a.rpc_listen);
        set(&mut cfg.ops_listen, a.ops_listen);
        set(&mut cfg.message_url, a.message_url);
        a.common.lay_redis_url(&mut cfg.store.redis_url);
        set_some(&mut cfg.subscriber_secret, a.subscriber_secret);
        set_some(&mut cfg.rpc_token, a.common.rpc_token);
    };
    run_service(
        &common,
        THREADS,
        a.config.as_deref(),
        configure,
        push_comet::run,
    )?;
    Ok(())
}
