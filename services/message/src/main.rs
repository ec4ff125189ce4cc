//! `push-message`: stores messages and assigns message ids.

use clap::Parser;
use push_message::Config;
use pushcluster_core::cli::{run_service, set, set_some, CommonArgs};
use std::net::SocketAddr;
use std::path::PathBuf;

// The same allocator as the comet: measured on the private-push path (S3 in
// docs/benchmarks.md), glibc's malloc and free were ~6 % of the CPU.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runtime threads unless `--worker-threads` says: one per CPU.
const THREADS: usize = 0;

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
    /// File of the embedded store.
    #[arg(long, env = "PUSH_MESSAGE_DATA")]
    data: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (ca, cert, key) = a.common.redis_tls_files();
    pushcluster_redis::TlsSettings::from_files(ca, cert, key)?.install();
    let common = a.common.clone();
    let configure = |cfg: &mut Config| {
        set(&mut cfg.listen, a.listen);
        set(&mut cfg.ops_listen, a.ops_listen);
        a.common.lay_redis_url(&mut cfg.storage.redis_url);
        set_some(&mut cfg.rpc_token, a.common.rpc_token);
        set(&mut cfg.storage.path, a.data);
    };
    run_service(
        &common,
        THREADS,
        a.config.as_deref(),
        configure,
        push_message::run,
    )?;
    Ok(())
}
