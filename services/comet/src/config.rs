//! The comet's configuration (YAML; the binary's flags override it).

use crate::storage;
use pushcluster_core::key::Limits;
use pushcluster_lease::{Candidate, MembershipConfig, Role};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Configuration of `push-comet` (YAML; flags override).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct Config {
    /// The shard this comet serves (static membership); with Redis leases,
    /// the shard it tries first when that one is free.
    pub shard: u32,
    /// Static (fixed shard) or lease-based ownership with failover; holds
    /// the shard count.
    pub membership: MembershipConfig,
    /// Addresses stored with the lease for web and clients; derived from the
    /// listen addresses when unset (fine on one machine, not behind NAT).
    pub advertise: Advertise,
    /// Unique name of this process in leases; default `<hostname>-<pid>`.
    pub holder: Option<String>,
    /// WebSocket (`/sub`) and SSE (`/sub/sse`) listen address.
    pub ws_listen: SocketAddr,
    /// WebSocket and SSE behind TLS (the same routes as `ws_listen`), on
    /// its own port, with a certificate re-read when its files change;
    /// unset: no TLS port. For a comet that is the edge (a LoadBalancer or
    /// NodePort straight to the pod); behind an Ingress the plain port is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_tls: Option<pushcluster_core::tls::TlsListen>,
    /// TCP protocol listen address.
    pub tcp_listen: SocketAddr,
    /// gRPC listen address (web pushes here).
    pub rpc_listen: SocketAddr,
    /// Ops listen address (`/metrics`, `/healthz`, `/readyz`).
    pub ops_listen: SocketAddr,
    /// gRPC URL of the message service.
    pub message_url: String,
    /// The cluster's Redis store, when it has one: private pushes then
    /// arrive on its live channels (web stores them), and the gRPC pushes
    /// of a web of the previous release are stored straight into it. Unset:
    /// the embedded store, reached through the message service.
    pub store: storage::DirectStore,
    /// Most connections one key may hold on this comet (gopush-cluster: 64).
    pub max_subscribers_per_key: usize,
    /// Messages queued per connection before it counts as a slow consumer.
    pub queue_depth: usize,
    /// Shortest heartbeat interval a client may ask for, in seconds.
    pub min_heartbeat_seconds: u64,
    /// Longest heartbeat interval a client may ask for, in seconds.
    pub max_heartbeat_seconds: u64,
    /// Added to the client's heartbeat to give its read deadline (gopush: 5 s).
    pub heartbeat_grace_seconds: u64,
    /// Seconds between SSE keep-alive comments.
    pub sse_keepalive_seconds: u64,
    /// Page origins whose scripts may read SSE (CORS; `*`, the default:
    /// any; subscriptions are guarded by tokens, not by origin).
    #[serde(skip_serializing_if = "pushcluster_core::cors::AllowedOrigins::is_default")]
    pub cors_origins: pushcluster_core::cors::AllowedOrigins,
    /// Caps and deadlines of the client listeners (WebSocket/SSE and TCP,
    /// each counted on its own).
    pub listener_limits: pushcluster_core::serve::ListenerLimits,
    /// Secret for subscriber tokens; when unset, tokens are not checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber_secret: Option<String>,
    /// How far ahead a subscriber token's expiry may lie (seconds; 0: any):
    /// a token minted for longer is refused, so a leaked one is good for a
    /// bounded time.
    pub subscriber_token_max_seconds: u64,
    /// The cluster's internal RPC token: required on calls to this comet and
    /// sent on calls to the message service; unset, calls are not checked.
    /// Give it through `PUSH_RPC_TOKEN` (a Secret), not the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_token: Option<String>,
    /// TLS on the internal gRPC ports (certificates from the cluster's
    /// `<name>-rpc-tls` Secret); unset, they are plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_tls: Option<pushcluster_proto::tls::RpcTls>,
    /// Input limits.
    pub limits: Limits,
}

/// Addresses a comet advertises.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Advertise {
    /// gRPC URL, e.g. `http://10.0.0.5:6970`.
    pub rpc: Option<String>,
    /// WebSocket/SSE `host:port`.
    pub ws: Option<String>,
    /// TCP `host:port`.
    pub tcp: Option<String>,
}

impl Config {
    /// Who this comet is in leases, and where it is reached.
    pub fn candidate(&self) -> Candidate {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "comet".into());
        Candidate {
            holder: self
                .holder
                .clone()
                .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
            rpc: self
                .advertise
                .rpc
                .clone()
                .unwrap_or_else(|| format!("http://{}", self.rpc_listen)),
            ws: self
                .advertise
                .ws
                .clone()
                .unwrap_or_else(|| self.ws_listen.to_string()),
            tcp: self
                .advertise
                .tcp
                .clone()
                .unwrap_or_else(|| self.tcp_listen.to_string()),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            shard: 0,
            membership: MembershipConfig::default(),
            advertise: Advertise::default(),
            holder: None,
            ws_listen: ([127, 0, 0, 1], 6968).into(),
            ws_tls: None,
            tcp_listen: ([127, 0, 0, 1], 6969).into(),
            rpc_listen: ([127, 0, 0, 1], 6970).into(),
            ops_listen: ([127, 0, 0, 1], 6971).into(),
            message_url: "http://127.0.0.1:8070".into(),
            store: storage::DirectStore::default(),
            max_subscribers_per_key: 64,
            queue_depth: 256,
            min_heartbeat_seconds: 1,
            max_heartbeat_seconds: 3600,
            heartbeat_grace_seconds: 5,
            sse_keepalive_seconds: 15,
            listener_limits: pushcluster_core::serve::ListenerLimits::default(),
            cors_origins: Default::default(),
            subscriber_secret: None,
            subscriber_token_max_seconds: pushcluster_core::token::DEFAULT_MAX_LIFETIME_SECONDS,
            rpc_token: None,
            rpc_tls: None,
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// What this comet is to membership: its shard and its lease identity,
    /// with no witness (see [`crate::witness`]).
    pub fn role(&self) -> Role {
        Role::Comet {
            shard: self.shard,
            me: self.candidate(),
            witness: None,
        }
    }
}
