//! gRPC definitions between pushcluster services (generated from `proto/pushcluster.proto`).

pub mod auth;
pub mod pipeline;

/// Version 1 of the internal API.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("pushcluster.v1");
}
