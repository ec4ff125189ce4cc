//! The pushcluster operator: reconciles `PushCluster` resources into running
//! clusters (controller-rs shape: [`controller::reconcile`] is a function of
//! the resource; the desired objects come from the pure [`builders`]).

pub mod builders;
pub mod controller;
pub mod crd;
pub mod holders;

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("rendering config: {0}")]
    Render(String),
    #[error("the PushCluster has no namespace")]
    NoNamespace,
}

impl Error {
    /// Short name for metrics labels.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Render(_) => "render",
            Error::NoNamespace => "no_namespace",
        }
    }
}

/// Result of operator operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
