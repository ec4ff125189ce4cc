//! gRPC definitions between pushcluster services (generated from `proto/pushcluster.proto`).

pub mod auth;
pub mod pipeline;
pub mod tls;

/// The gRPC message size every pushcluster server and client allows, from
/// the largest message a push may carry: a batch of 256 such messages plus
/// framing. Set explicitly on both ends (tonic's default decode limit is
/// 4 MiB, which 64 KiB messages exceed in a batch of 64); fetch replies are
/// paged well below it by bytes.
pub fn max_rpc_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes
        .saturating_mul(256)
        .saturating_add(1 << 20)
}

/// Version 1 of the internal API.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("pushcluster.v1");
}
