//! `push-web`: the HTTP API of a pushcluster.

use clap::Parser;
use push_web::Config;
use pushcluster_core::cli::{run_service, set, set_some, CommonArgs};
use std::net::SocketAddr;
use std::path::PathBuf;

// The same allocator as the comet: measured on the private-push path (S3 in
// docs/benchmarks.md), glibc's malloc and free were ~6 % of the CPU.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runtime threads unless `--worker-threads` says: one. On two threads web
/// made 6.6 system calls and 2.1 context switches per stored push against
/// 2.4 and 0.45 on one (`perf stat`, S3), the threads waking each other, and
/// spent a fifth more CPU per push (117 against 95 µs); S3's p99 did not
/// follow the thread count across alternating runs (docs/benchmarks.md).
/// Web holds no state: it scales by replicas, or by `--worker-threads 0`
/// (one per CPU) in a big pod.
const THREADS: usize = 1;

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
    // With a Redis URL (`--redis-url`), web stores private pushes in it
    // itself and the comets deliver them from Redis.
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (ca, cert, key) = a.common.redis_tls_files();
    pushcluster_redis::TlsSettings::from_files(ca, cert, key)?.install();
    let common = a.common.clone();
    let configure = |cfg: &mut Config| {
        set(&mut cfg.public_listen, a.public_listen);
        set(&mut cfg.admin_listen, a.admin_listen);
        set(&mut cfg.ops_listen, a.ops_listen);
        set(&mut cfg.message_url, a.message_url);
        set_some(&mut cfg.admin_token, a.admin_token);
        set_some(&mut cfg.subscriber_secret, a.subscriber_secret);
        a.common.lay_redis_url(&mut cfg.store.redis_url);
        set_some(&mut cfg.rpc_token, a.common.rpc_token);
    };
    run_service(
        &common,
        THREADS,
        a.config.as_deref(),
        configure,
        push_web::run,
    )?;
    Ok(())
}
