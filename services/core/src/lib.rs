//! Shared building blocks of pushcluster: keys and limits, message frames,
//! the consistent-hash ring over shards, subscriber tokens and the ops
//! endpoints (`/metrics`, `/healthz`, `/readyz`) every service serves.

pub mod batch;
pub mod cli;
pub mod config_file;
pub mod cors;
pub mod frame;
/// Helpers for tests (a seeded generator for property tests); behind the
/// `testing` feature, so they are not part of the library's API.
#[cfg(any(test, feature = "testing"))]
pub mod fuzz;
pub mod key;
pub mod membership;
pub mod ops;
pub mod ret;
pub mod ring;
pub mod serve;
pub mod tls;
pub mod token;
pub mod websocket;

/// Message group of a private message (one key).
pub const GID_PRIVATE: i32 = 0;
/// Message group of a public (broadcast) message.
pub const GID_PUBLIC: i32 = 1;
