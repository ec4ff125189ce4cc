//! The comet: holds subscriber connections (WebSocket, TCP, SSE) for the keys
//! of its shard and delivers messages to them in mid order.
//!
//! On Redis, web stores private pushes itself and the comet receives them on
//! its keys' live channels ([`live`]), in mid order. On the embedded store a
//! push arrives over gRPC from web ([`rpc`]); the comet stores it first (a
//! push is acknowledged only once stored) through the message service
//! ([`storage`]), then queues it on the key's connections ([`registry`]).
//! Pushes to one key are serialised from store to enqueue, so every
//! connection sees mids in order.
//!
//! A WebSocket connection is one small hand-polled future ([`ws`]) and one
//! mailbox in the registry; heartbeat deadlines are checked by one sweeper
//! per comet rather than a timer per connection, so an idle subscriber costs
//! about 1.3 KB (docs/benchmarks.md, S1).
//!
//! Where things are: [`Config`] (`config.rs`), the comet's state and
//! admission of subscribers ([`Comet`], `comet.rs`), its metrics
//! (`metrics.rs`), and [`run`] (`run.rs`): membership from
//! [`pushcluster_lease::MembershipConfig::start`], the listeners, and the
//! drain on SIGTERM, which awaits every task it started.

mod bypassed;
mod comet;
mod config;
pub mod live;
mod metrics;
pub mod protocol;
pub mod push;
pub mod registry;
pub mod rpc;
mod run;
pub mod sse;
pub mod storage;
pub mod tcp;
pub mod witness;
pub mod ws;

pub use comet::{Comet, Refusal};
pub use config::{Advertise, Config};
pub use metrics::Metrics;
pub use push::PushError;
pub use run::run;

/// Errors that stop a comet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("membership: {0}")]
    Membership(#[from] pushcluster_lease::Error),
    #[error("rpc_token: {0}")]
    RpcToken(#[source] pushcluster_proto::auth::InvalidToken),
    #[error("internal RPC: {0}")]
    Rpc(#[from] pushcluster_proto::tls::RpcTlsError),
    #[error("store: {0}")]
    Store(#[source] pushcluster_store::StoreError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("ws_tls: {0}")]
    Tls(#[from] pushcluster_core::tls::TlsError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}
