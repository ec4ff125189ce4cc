//! The pushcluster operator: reconciles `PushCluster` resources into running
//! clusters (controller-rs shape). [`crd`] is the resource, [`children`] the
//! desired objects as pure functions of it (one module per kind),
//! [`controller`] the reconcile loop split by job, [`status`] the status as a
//! pure function of what was observed, [`holders`] the shard-holder labels.

pub mod children;
pub mod controller;
pub mod crd;
pub mod holders;
pub mod status;

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("rendering a service config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("encoding an object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the PushCluster has no namespace")]
    NoNamespace,
    #[error("internal RPC TLS: {0}")]
    RpcTls(#[from] crate::children::rpc_tls::MintError),
}

impl Error {
    /// Short name for metrics labels.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Yaml(_) | Error::Json(_) => "render",
            Error::NoNamespace => "no_namespace",
            Error::RpcTls(_) => "rpc_tls",
        }
    }
}

/// Result of operator operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
