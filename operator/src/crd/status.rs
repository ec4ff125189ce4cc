//! The PushCluster's status subresource: conditions, replicas per component,
//! the shard table and where to reach the cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Observed state.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PushClusterStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Shards whose holder is ready.
    #[serde(default)]
    pub ready_shards: i32,
    /// Ready replicas per component.
    #[serde(default)]
    pub comet: ComponentStatus,
    #[serde(default)]
    pub message: ComponentStatus,
    #[serde(default)]
    pub web: ComponentStatus,
    /// Who holds each shard's lease.
    #[serde(default)]
    pub shards: Vec<ShardStatus>,
    /// Where to reach the cluster and its credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<EndpointsStatus>,
    /// What the cluster keeps in Redis (absent on the embedded store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageStatus>,
    /// Where the internal gRPC ports are on the way to TLS (absent:
    /// plaintext). The pods run the step named here; the next one is taken
    /// once every rollout of it completed.
    // Written as null when plaintext, not left out: the status is written
    // with a merge patch, which keeps a field it does not name.
    #[serde(default)]
    pub rpc_tls: Option<RpcTlsStep>,
}

/// A step of switching the internal gRPC ports to TLS, in order; switching
/// back to plaintext takes them in reverse.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum RpcTlsStep {
    /// Servers take TLS beside plaintext; clients still dial in plaintext.
    Accepting,
    /// Clients dial with TLS; servers still take plaintext from pods of the
    /// step before.
    Connecting,
    /// TLS only: servers refuse plaintext.
    Required,
}

/// Where in Redis the cluster's data lives.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatus {
    /// The prefix of every key and live channel in use: recorded so that
    /// a later default never moves a running cluster's data.
    pub key_prefix: String,
    /// Mode Sentinel: the master the Sentinels name (`host:port`), as last
    /// asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// Mode Cluster: masters that serve slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masters: Option<u32>,
    /// Mode Cluster: of those, how many answer (not flagged failing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masters_answering: Option<u32>,
    /// Why the last look at Redis failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Addresses of the cluster's Services and the name of its credentials.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsStatus {
    /// Web's public API (`/1/server/get`, `/1/msg/get`), `host:port`.
    pub public: String,
    /// Web's admin API (push, delete), `host:port`; in-cluster only.
    pub admin: String,
    /// The Secret holding the generated credentials (absent when insecure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Where each listener of `spec.listeners` reaches web and the comets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerEndpoints>,
}

/// The addresses one listener gives.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListenerEndpoints {
    /// The listener's name.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub type_: String,
    /// Web's public API through it (`https://push.example.com`), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<String>,
    /// Each shard's comet through it.
    #[serde(default)]
    pub shards: Vec<ShardAddresses>,
    /// Whether web gives clients these addresses (`/1/server/get`).
    #[serde(default)]
    pub advertised: bool,
    /// What it still waits for (a load balancer's address, the Gateway API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

/// One shard's comet through a listener, `host:port`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShardAddresses {
    pub shard: i32,
    /// WebSocket and SSE (`wss://` when the listener has TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws: Option<String>,
    /// The TCP protocol (Service types only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
}

/// Replicas of one component.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    pub replicas: i32,
    pub ready_replicas: i32,
}

/// One row of the shard table.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    pub shard: i32,
    /// Pod holding the shard's lease, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// When the holder acquired it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Times the lease changed hands.
    pub transitions: i32,
}
