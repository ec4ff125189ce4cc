//! gRPC definitions between pushcluster services (generated from `proto/pushcluster.proto`).

#![allow(clippy::all, missing_docs)]

/// Version 1 of the internal API.
pub mod v1 {
    tonic::include_proto!("pushcluster.v1");
}
