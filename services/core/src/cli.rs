//! What the three service binaries (`push-comet`, `push-message`,
//! `push-web`) share on their command lines, and the one way they start:
//! a runtime, tracing, the YAML config with flags laid over it, SIGTERM.

use crate::config_file::{load_yaml, ConfigError, UnknownSettings};
use crate::ops::{cancel_on_signal, init_tracing, runtime};
use std::future::Future;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// Flags every service binary takes (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Runtime threads: 0 = one per CPU this process may use (a cgroup CPU
    /// limit counts), 1 = a single-threaded runtime. Default: 1 for comets,
    /// which scale by shards; one per CPU for web and the message service
    /// (docs/benchmarks.md, S2 and S3, measured both).
    #[arg(long, env = "PUSH_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Log as JSON lines.
    #[arg(long, env = "PUSH_LOG_JSON")]
    pub log_json: bool,
    /// The cluster's internal RPC token: required on calls to this service
    /// and sent on the calls it makes; unset, calls are not checked. Prefer
    /// the variable (from a Secret) to the flag.
    #[arg(long, env = "PUSH_RPC_TOKEN", hide_env_values = true)]
    pub rpc_token: Option<String>,
    /// Redis URL of the message store (`redis://host:port/db`); without it
    /// the cluster runs on the embedded store. Prefer the variable (from a
    /// Secret) for a URL with a password.
    #[arg(long, env = "PUSH_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Password of Redis, joined to its URL (any mode: `redis://`,
    /// `redis+sentinel://`, `redis+cluster://`), so the URL itself can sit
    /// in a config file while the password comes from a Secret. Prefer the
    /// variable.
    #[arg(long, env = "PUSH_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// PEM file of the certificate authorities a Redis reached over TLS
    /// (`rediss://`, `rediss+sentinel://`, `rediss+cluster://`) must chain
    /// to; unset, the system's roots. Every Redis connection of the process
    /// trusts it. Ignored, with a warning, for a plain `redis://` URL.
    #[arg(long, env = "PUSH_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// PEM certificate shown to a Redis that asks TLS clients for one
    /// (`tls-auth-clients yes`, redis-server's default), with its key.
    #[arg(
        long,
        env = "PUSH_REDIS_CLIENT_CERT_FILE",
        requires = "redis_client_key_file"
    )]
    pub redis_client_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `--redis-client-cert-file`.
    #[arg(
        long,
        env = "PUSH_REDIS_CLIENT_KEY_FILE",
        requires = "redis_client_cert_file"
    )]
    pub redis_client_key_file: Option<std::path::PathBuf>,
    /// What to do with a setting in the config file that this version does
    /// not know: refuse to start (a typo), or warn and go on without it
    /// (what the operator sets: it may be newer than the image).
    #[arg(long, env = crate::config_file::UNKNOWN_SETTINGS_ENV, value_enum, default_value = "refuse")]
    pub unknown_settings: UnknownSettings,
}

impl CommonArgs {
    /// The Redis TLS files the flags name: CAs, client certificate, key.
    pub fn redis_tls_files(&self) -> (Option<&Path>, Option<&Path>, Option<&Path>) {
        (
            self.redis_ca_file.as_deref(),
            self.redis_client_cert_file.as_deref(),
            self.redis_client_key_file.as_deref(),
        )
    }

    /// Lays `--redis-url` over the config's Redis URL `field`, then joins
    /// `--redis-password` to whichever URL is in force.
    pub fn lay_redis_url(&self, field: &mut Option<String>) {
        set_some(field, self.redis_url.clone());
        if let (Some(url), Some(password)) = (field.as_mut(), &self.redis_password) {
            *url = crate::ops::with_password(url, password);
        }
    }
}

/// Lays a flag over a config field: `field` becomes the flag's value when
/// the flag was given.
pub fn set<T>(field: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *field = v;
    }
}

/// Like [`set`], for an optional field.
pub fn set_some<T>(field: &mut Option<T>, flag: Option<T>) {
    if flag.is_some() {
        *field = flag;
    }
}

/// Why a service binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError<E: std::error::Error + 'static> {
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Config(ConfigError),
    #[error(transparent)]
    Service(E),
}

/// Runs a service binary: a runtime of `--worker-threads` threads (else
/// `default_threads`; 0: one per CPU), tracing, the config from `path`
/// (defaults without one) handed to `configure` for the flags, then `run`
/// until SIGTERM or Ctrl-C cancels the token it gets.
pub fn run_service<C, E, F, Fut>(
    common: &CommonArgs,
    default_threads: usize,
    path: Option<&Path>,
    configure: impl FnOnce(&mut C),
    run: F,
) -> Result<(), StartError<E>>
where
    C: serde::de::DeserializeOwned + Default,
    E: std::error::Error + 'static,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let threads = common.worker_threads.unwrap_or(default_threads);
    let log_json = common.log_json;
    let rt = runtime(threads).map_err(StartError::Runtime)?;
    rt.block_on(async move {
        init_tracing(log_json);
        let mut cfg: C = load_yaml(path, common.unknown_settings).map_err(StartError::Config)?;
        configure(&mut cfg);
        let cancel = CancellationToken::new();
        cancel_on_signal(cancel.clone());
        run(cfg, cancel).await.map_err(StartError::Service)?;
        tracing::info!("stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_replace_only_what_they_give() {
        let (mut a, mut b) = (1, Some("file"));
        set(&mut a, None);
        set_some(&mut b, None);
        assert_eq!((a, b), (1, Some("file")));
        set(&mut a, Some(2));
        set_some(&mut b, Some("flag"));
        assert_eq!((a, b), (2, Some("flag")));
    }
}
