//! Web's configuration (YAML; the binary's flags override it).

use pushcluster_core::key::Limits;
use pushcluster_core::membership::ShardEndpoint;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Configuration of `push-web` (YAML; flags override).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct Config {
    /// Public listener: `/1/server/get`, `/1/msg/get`, `/1/time/get` and legacy forms.
    pub public_listen: SocketAddr,
    /// The public API behind TLS as well, on its own port, with a
    /// certificate re-read when its files change; unset: no TLS port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_tls: Option<pushcluster_core::tls::TlsListen>,
    /// Admin listener: `/1/admin/...` and legacy `/admin/...`; keep it private.
    pub admin_listen: SocketAddr,
    /// Ops listener (`/metrics`, `/healthz`, `/readyz`).
    pub ops_listen: SocketAddr,
    /// gRPC URL of the message service.
    pub message_url: String,
    /// When set, admin requests need `Authorization: Bearer <token>`.
    /// Give it through `PUSH_ADMIN_TOKEN` (a Secret), not the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Secret of subscriber tokens: when set, private reads (`/1/msg/get`,
    /// `/1/time/get?k=`, `/msg/get`) need the key's token (`token=`), as the
    /// comets' subscribe does. Give it through `PUSH_SUBSCRIBER_SECRET`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber_secret: Option<String>,
    /// How far ahead a subscriber token's expiry may lie (seconds; 0: any),
    /// as on the comets.
    pub subscriber_token_max_seconds: u64,
    /// Whether private reads may answer JSONP (`cb`/`callback`) while
    /// subscriber tokens are on: a JSONP reply is readable by any web page
    /// that includes it, so it is off unless a deployment needs it for old
    /// browser clients. Without a subscriber secret JSONP always works.
    pub private_jsonp: bool,
    /// The cluster's internal RPC token, sent on every call to comets and
    /// the message service. Give it through `PUSH_RPC_TOKEN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_token: Option<String>,
    /// TLS on the internal gRPC ports (certificates from the cluster's
    /// `<name>-rpc-tls` Secret); unset, they are plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_tls: Option<pushcluster_proto::tls::RpcTls>,
    /// The cluster's Redis store, when it has one: web then stores private
    /// pushes in it itself (see [`crate::push::PushPath`]); unset, they go
    /// through the comets. Give a URL with a password through
    /// `PUSH_REDIS_URL` (a Secret), not the config file.
    pub store: pushcluster_store::redis::DirectStore,
    /// Comets by shard (static membership).
    pub comets: Vec<ShardEndpoint>,
    /// Static (the `comets` list) or lease-based (who holds each shard's lease).
    pub membership: pushcluster_lease::MembershipConfig,
    /// Input limits.
    pub limits: Limits,
    /// Caps and header deadline of the public and admin listeners (each
    /// counted on its own).
    pub listener_limits: pushcluster_core::serve::ListenerLimits,
    /// Deadline of one call to a comet or the message service, in ms.
    pub rpc_timeout_ms: u64,
    /// After SIGTERM, how long web keeps serving while it reports unready,
    /// in ms, before its listeners close: load balancers and EndpointSlices
    /// drop a terminating pod asynchronously, and connections they still send
    /// in that time would otherwise be refused.
    pub drain_delay_ms: u64,
    /// Page origins whose scripts may read the public API (CORS; `*`, the
    /// default: any; reads are guarded by tokens, not by origin).
    #[serde(skip_serializing_if = "pushcluster_core::cors::AllowedOrigins::is_default")]
    pub cors_origins: pushcluster_core::cors::AllowedOrigins,
    /// Serve the browser client's demo page at `/demo/` on the public
    /// listener (`make run` does; off by default).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub demo: bool,
    /// Addresses given to clients by `/1/server/get`, as templates where
    /// `{shard}` is the shard id (e.g. `push-{shard}.example.com:443`); unset,
    /// the comet's own address is given.
    pub advertise: ClientAddresses,
}

impl Config {
    /// The gRPC message size allowed on calls to comets and the message
    /// service (see [`pushcluster_proto::max_rpc_bytes`]).
    pub fn max_rpc_bytes(&self) -> usize {
        pushcluster_proto::max_rpc_bytes(self.limits.max_message_bytes)
    }
}

/// Client-facing addresses: per shard where each shard has its own (a
/// node port, a load balancer's address), else a template.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientAddresses {
    /// WebSocket and SSE template.
    pub ws: Option<String>,
    /// TCP template.
    pub tcp: Option<String>,
    /// WebSocket and SSE address of each shard (before the template).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ws_by_shard: std::collections::BTreeMap<u32, String>,
    /// TCP address of each shard (before the template).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tcp_by_shard: std::collections::BTreeMap<u32, String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            public_listen: ([127, 0, 0, 1], 8090).into(),
            public_tls: None,
            admin_listen: ([127, 0, 0, 1], 8091).into(),
            ops_listen: ([127, 0, 0, 1], 8092).into(),
            message_url: "http://127.0.0.1:8070".into(),
            admin_token: None,
            subscriber_secret: None,
            subscriber_token_max_seconds: pushcluster_core::token::DEFAULT_MAX_LIFETIME_SECONDS,
            private_jsonp: false,
            rpc_token: None,
            rpc_tls: None,
            store: Default::default(),
            comets: vec![ShardEndpoint {
                shard: 0,
                rpc: "http://127.0.0.1:6970".into(),
                ws: "127.0.0.1:6968".into(),
                tcp: "127.0.0.1:6969".into(),
            }],
            membership: pushcluster_lease::MembershipConfig::default(),
            limits: Limits::default(),
            listener_limits: pushcluster_core::serve::ListenerLimits::default(),
            rpc_timeout_ms: 5000,
            drain_delay_ms: 0,
            advertise: ClientAddresses::default(),
            cors_origins: Default::default(),
            demo: false,
        }
    }
}
