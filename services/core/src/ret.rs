//! The `ret` codes of JSON replies, the same on every transport: web's HTTP
//! API (gopush-cluster's codes) and the comet's SSE refusals.

/// Success.
pub const OK: u32 = 0;
/// No comet serves the key.
pub const NO_NODE: u32 = 1001;
/// The key cannot take this subscription here (subscriber limit, wrong
/// comet, shutting down): the SSE twin of the `-c` error frame.
pub const CHANNEL: u32 = 1002;
/// Missing or wrong credentials (admin token, subscriber token).
pub const UNAUTHORIZED: u32 = 65533;
/// A parameter is missing or wrong.
pub const PARAM: u32 = 65534;
/// Something failed inside the cluster.
pub const INTERNAL: u32 = 65535;
