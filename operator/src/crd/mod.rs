//! The `PushCluster` resource (`pushcluster.io/v1alpha1`): one object, one
//! running push cluster. Defaults are filled by the schema; CEL rules reject
//! specs that cannot work before the operator ever sees them.

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod listeners;
mod status;
pub use listeners::{
    GatewayRef, IssuerKind, IssuerRef, ListenerPorts, ListenerSpec, ListenerTls, ListenerType,
};
pub use status::{
    ComponentStatus, EndpointsStatus, ListenerEndpoints, PushClusterStatus, RpcTlsStep,
    ShardAddresses, ShardStatus, StorageStatus,
};

/// Desired state of a push cluster.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pushcluster.io",
    version = "v1alpha1",
    kind = "PushCluster",
    plural = "pushclusters",
    singular = "pushcluster",
    shortname = "pushc",
    namespaced,
    status = "PushClusterStatus",
    cel,
    printcolumn = r#"{"name":"Shards","type":"integer","jsonPath":".spec.comet.shards"}"#,
    printcolumn = r#"{"name":"Ready Shards","type":"integer","jsonPath":".status.readyShards"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.storage.redis) || self.message.replicas == 1").message("without storage.redis the embedded store runs in one message pod: set message.replicas to 1"))]
#[x_kube(validation = Rule::new("has(self.storage.redis) == has(oldSelf.storage.redis)").message("storage cannot switch between redis and embedded on a live cluster: the stored messages would not move with it; create a new PushCluster instead"))]
#[x_kube(validation = Rule::new("!has(self.listeners) || self.listeners.all(a, self.listeners.exists_one(b, b.name == a.name))").message("listeners[].name must be unique"))]
#[x_kube(validation = Rule::new("!has(self.listeners) || size(self.listeners.filter(l, has(l.advertise) && l.advertise)) <= 1").message("at most one listener may say advertise: true (web gives clients one address per key)"))]
#[x_kube(validation = Rule::new("!has(self.listeners) || self.listeners.all(a, self.listeners.all(b, !(a.type in ['ClusterIP', 'NodePort', 'LoadBalancer'] && b.type in ['ClusterIP', 'NodePort', 'LoadBalancer'] && has(a.tls) && has(b.tls)) || a.tls.secretName == b.tls.secretName))").message("listeners of Service types terminate TLS in the pods, which serve one certificate: give them all the same tls.secretName"))]
#[x_kube(validation = Rule::new("!has(self.comet.advertise) || !has(self.listeners) || size(self.listeners) == 0").message("comet.advertise and listeners both say what web gives clients: drop comet.advertise (listeners derive the addresses)"))]
#[serde(rename_all = "camelCase")]
pub struct PushClusterSpec {
    /// Container image holding push-comet, push-message and push-web.
    #[serde(default = "default_image")]
    pub image: String,
    /// Comets: connection holders, one shard each.
    #[serde(default)]
    pub comet: CometSpec,
    /// The message service (storage front).
    #[serde(default)]
    pub message: MessageSpec,
    /// The HTTP API.
    #[serde(default)]
    pub web: WebSpec,
    /// Where messages are stored.
    #[serde(default)]
    pub storage: StorageSpec,
    /// Shard lease timing.
    #[serde(default)]
    pub lease: LeaseSpec,
    /// Secrets for admin and subscriber authentication.
    #[serde(default)]
    pub auth: AuthSpec,
    /// Passed to every pod of the cluster.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// Who may connect to which port (NetworkPolicies the operator generates).
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// How clients outside the cluster reach it: Services, Ingresses or
    /// Gateway routes, one per shard, and the addresses web gives clients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub listeners: Vec<ListenerSpec>,
}

/// The NetworkPolicies of a cluster: public ports open to `publicFrom`
/// (default anyone), web's admin port to `adminFrom` (default the cluster's
/// own namespace), gRPC ports only to the cluster's own pods, ops/metrics
/// ports to `monitoringFrom` (default the cluster's own namespace). Egress is
/// left open (comets reach the API server and Redis; web, the message service
/// and comets reach Redis).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Generate the policies (a CNI that enforces them is needed for effect).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Who may reach the public ports (web public, comet WebSocket/SSE and
    /// TCP); empty: anyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_from: Vec<NetworkPolicyPeer>,
    /// Who may reach web's admin port; empty: pods of the cluster's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_from: Vec<NetworkPolicyPeer>,
    /// Who may reach the ops ports (`/metrics`); empty: pods of the
    /// cluster's namespace. Name the monitoring namespace here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitoring_from: Vec<NetworkPolicyPeer>,
    /// Where the API server is, for egress from comets and web (leases,
    /// EndpointSlices) on ports 443 and 6443; empty: any address. Name its
    /// address (`ipBlock`) to narrow it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_server_to: Vec<NetworkPolicyPeer>,
    /// Where Redis is, for egress on its port (from `storage.redis.url`,
    /// else 6379); empty: any address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redis_to: Vec<NetworkPolicyPeer>,
}

fn yes() -> bool {
    true
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            public_from: Vec::new(),
            admin_from: Vec::new(),
            monitoring_from: Vec::new(),
            api_server_to: Vec::new(),
            redis_to: Vec::new(),
        }
    }
}

fn default_image() -> String {
    "ghcr.io/pushcluster/pushcluster:0.1.0".into()
}

/// Comet settings.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CometSpec {
    /// Shards of the key space; each is served by one comet at a time.
    #[serde(default = "default_shards")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 256").message("shards must be between 1 and 256"))]
    pub shards: i32,
    /// Extra comets that take over a shard when its holder fails.
    #[serde(default = "default_standbys")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 64").message("standbys must be between 0 and 64"))]
    pub standbys: i32,
    /// Most connections per key on one comet.
    #[serde(default = "default_max_subscribers")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxSubscribersPerKey must be at least 1"))]
    pub max_subscribers_per_key: i32,
    /// Messages queued per connection before it counts as a slow consumer.
    #[serde(default = "default_queue_depth")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65536").message("queueDepth must be between 1 and 65536"))]
    pub queue_depth: i32,
    /// Addresses web gives clients for shard `{shard}` (e.g.
    /// `push-{shard}.example.com:443`); unset, the pod address is given,
    /// which only clients inside the cluster can reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<AdvertiseSpec>,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Runtime threads per pod: unset or 1 runs a single-threaded runtime,
    /// the cheapest per push (docs/benchmarks.md, S3); 0 runs one per CPU
    /// the pod may use (its CPU limit counts); n runs n. Scale out first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 64").message("workerThreads must be between 0 and 64"))]
    pub worker_threads: Option<i32>,
    /// Most open client connections per pod and listener; beyond it new
    /// ones are refused (HTTP 503 or a close) and counted in
    /// `pushcluster_listener_refused_connections_total`. Unset: 15,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxConnections must be at least 1"))]
    pub max_connections: Option<i32>,
    /// Most open connections from one client address per pod and listener;
    /// unset or 0: no limit (clients behind one NAT or proxy share an address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("maxConnectionsPerIp must be at least 0"))]
    pub max_connections_per_ip: Option<i32>,
    /// Container ports.
    #[serde(default)]
    pub ports: CometPorts,
}

fn default_shards() -> i32 {
    2
}
fn default_standbys() -> i32 {
    1
}
fn default_max_subscribers() -> i32 {
    64
}
fn default_queue_depth() -> i32 {
    256
}

impl Default for CometSpec {
    fn default() -> Self {
        Self {
            shards: default_shards(),
            standbys: default_standbys(),
            max_subscribers_per_key: default_max_subscribers(),
            queue_depth: default_queue_depth(),
            advertise: None,
            resources: None,
            worker_threads: None,
            max_connections: None,
            max_connections_per_ip: None,
            ports: CometPorts::default(),
        }
    }
}

/// Client-facing address templates; `{shard}` is replaced by the shard id.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AdvertiseSpec {
    /// WebSocket and SSE address template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws: Option<String>,
    /// TCP address template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
}

/// Comet container ports.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CometPorts {
    /// WebSocket and SSE.
    #[serde(default = "p_ws")]
    pub ws: i32,
    /// gopush-cluster TCP protocol.
    #[serde(default = "p_tcp")]
    pub tcp: i32,
    /// gRPC from web.
    #[serde(default = "p_rpc")]
    pub rpc: i32,
    /// Metrics and probes.
    #[serde(default = "p_ops")]
    pub ops: i32,
}

fn p_ws() -> i32 {
    6968
}
fn p_tcp() -> i32 {
    6969
}
fn p_rpc() -> i32 {
    6970
}
fn p_ops() -> i32 {
    6971
}

impl Default for CometPorts {
    fn default() -> Self {
        Self {
            ws: p_ws(),
            tcp: p_tcp(),
            rpc: p_rpc(),
            ops: p_ops(),
        }
    }
}

/// Message service settings.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageSpec {
    /// Replicas (stateless with Redis; 1 with the embedded store).
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("message.replicas must be between 1 and 64"))]
    pub replicas: i32,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn one() -> i32 {
    1
}
fn two() -> i32 {
    2
}

impl Default for MessageSpec {
    fn default() -> Self {
        Self {
            replicas: one(),
            resources: None,
        }
    }
}

/// Web settings.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebSpec {
    /// Replicas (stateless).
    #[serde(default = "two")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("web.replicas must be between 1 and 64"))]
    pub replicas: i32,
    /// Type of the public Service (`ClusterIP`, `NodePort`, `LoadBalancer`).
    #[serde(default)]
    pub service_type: ServiceType,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Runtime threads per pod: unset or 1 runs a single-threaded runtime,
    /// a fifth cheaper per push than two threads waking each other
    /// (docs/benchmarks.md, S3); 0 runs one per CPU the pod may use (its CPU
    /// limit counts); n runs n. Scale out (`replicas`) first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 64").message("workerThreads must be between 0 and 64"))]
    pub worker_threads: Option<i32>,
    /// Most open client connections per pod and listener; beyond it new
    /// ones are refused (HTTP 503 or a close) and counted in
    /// `pushcluster_listener_refused_connections_total`. Unset: 15,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxConnections must be at least 1"))]
    pub max_connections: Option<i32>,
    /// Most open connections from one client address per pod and listener;
    /// unset or 0: no limit (clients behind one NAT or proxy share an address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("maxConnectionsPerIp must be at least 0"))]
    pub max_connections_per_ip: Option<i32>,
}

impl Default for WebSpec {
    fn default() -> Self {
        Self {
            replicas: two(),
            service_type: ServiceType::default(),
            resources: None,
            worker_threads: None,
            max_connections: None,
            max_connections_per_ip: None,
        }
    }
}

/// Kubernetes Service type of web's public Service.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    /// The Service API's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Storage settings.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Redis; without it the message pod uses its embedded store. With it
    /// web stores private pushes straight into Redis, comets receive them on
    /// its live channels, and the message pods serve reads, deletes and
    /// broadcasts from it: all three must reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    /// The embedded store's volume (used without redis): a PersistentVolumeClaim
    /// of the message StatefulSet, kept across restarts and rollouts.
    #[serde(default)]
    pub embedded: EmbeddedSpec,
}

/// The embedded store's PersistentVolumeClaim.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("storage.embedded cannot change once created (a StatefulSet's volume claim template is immutable); resize the PersistentVolumeClaim itself"))]
pub struct EmbeddedSpec {
    /// Requested size, e.g. `1Gi`.
    #[serde(default = "d_size")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$')").message("storage.embedded.size must be a quantity such as 1Gi"))]
    pub size: String,
    /// StorageClass of the claim; the cluster's default class when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// The claim's access mode. Absent: `ReadWriteOncePod` where the cluster
    /// supports it (API server 1.27 or later and the class's provisioner a
    /// registered CSI driver, which only the operator's ClusterRole can
    /// read), else `ReadWriteOnce`. Chosen once, when the StatefulSet is
    /// created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<ClaimAccessMode>,
}

/// Access mode of the embedded store's claim.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ClaimAccessMode {
    /// One node may mount it (every volume plugin).
    #[default]
    ReadWriteOnce,
    /// One pod may mount it: a second message pod cannot open the store even
    /// on the same node (CSI drivers only).
    ReadWriteOncePod,
}

impl ClaimAccessMode {
    /// The PersistentVolumeClaim API's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClaimAccessMode::ReadWriteOnce => "ReadWriteOnce",
            ClaimAccessMode::ReadWriteOncePod => "ReadWriteOncePod",
        }
    }
}

fn d_size() -> String {
    "1Gi".into()
}

impl Default for EmbeddedSpec {
    fn default() -> Self {
        Self {
            size: d_size(),
            storage_class_name: None,
            access_mode: None,
        }
    }
}

/// How to reach Redis: one node (a URL, or a Secret holding it), a master
/// watched by Sentinels, or a Redis Cluster. Every key of one push key
/// shares a hash tag, so a Redis Cluster keeps a push's sequence, list,
/// dedupe ids, fence and live channel in one slot.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.mode) && self.mode != 'Single') || has(self.url) != has(self.secretRef)").message("give exactly one of storage.redis.url and storage.redis.secretRef"))]
#[x_kube(validation = Rule::new("!has(self.mode) || self.mode == 'Single' || (!has(self.url) && !has(self.secretRef))").message("storage.redis.url and storage.redis.secretRef name one node: with mode Sentinel give storage.redis.sentinel, with mode Cluster storage.redis.cluster (and the password in storage.redis.passwordSecretRef)"))]
#[x_kube(validation = Rule::new("(has(self.mode) && self.mode == 'Sentinel') == has(self.sentinel)").message("storage.redis.sentinel (masterName and addresses) goes with mode Sentinel, and only with it"))]
#[x_kube(validation = Rule::new("(has(self.mode) && self.mode == 'Cluster') == has(self.cluster)").message("storage.redis.cluster (seed nodes) goes with mode Cluster, and only with it"))]
#[x_kube(validation = Rule::new("!has(self.tls) || !has(self.url) || self.url.startsWith('rediss://')").message("storage.redis.tls needs a TLS URL: write storage.redis.url as rediss://host:port"))]
#[x_kube(validation = Rule::new("!has(self.passwordSecretRef) || !has(self.secretRef)").message("storage.redis.secretRef holds a whole URL with its password: drop passwordSecretRef, or give the URL in storage.redis.url"))]
#[x_kube(validation = Rule::new("has(self.keyPrefix) == has(oldSelf.keyPrefix) && (!has(self.keyPrefix) || self.keyPrefix == oldSelf.keyPrefix)").message("storage.redis.keyPrefix cannot change on a live cluster: the stored messages and sequences would stay under the old prefix; create a new PushCluster instead"))]
pub struct RedisSpec {
    /// Prefix of every Redis key and live channel of this cluster. Default:
    /// `pc:<namespace>:<name>`, so clusters sharing one Redis share nothing
    /// (a cluster made by a release before the prefix existed keeps `pc`,
    /// the prefix it has stored under; `status.storage.keyPrefix` says
    /// which is in use). Fixed once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9._:/-]{1,100}$')").message("storage.redis.keyPrefix must be 1 to 100 letters, digits and . _ : / - (no braces: they are Redis Cluster hash tags)"))]
    pub key_prefix: Option<String>,
    /// How Redis is deployed. Default `Single`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RedisMode>,
    /// `redis://host:port/db` of one node (mode Single), without a
    /// password: the URL lands in a ConfigMap, so a URL with credentials
    /// goes in `secretRef`, or the password in `passwordSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.matches('^[A-Za-z0-9+.-]+://[^/@]*@')").message("storage.redis.url must not carry credentials (user:password@): it is stored in a ConfigMap; put the URL in a Secret and name it in storage.redis.secretRef"))]
    pub url: Option<String>,
    /// A Secret key holding the URL (when it carries a password; mode Single).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// The master Sentinels watch (mode Sentinel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<RedisSentinelSpec>,
    /// The Redis Cluster (mode Cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<RedisClusterSpec>,
    /// A Secret key holding Redis's password (AUTH): with `url`, Sentinel
    /// or Cluster. Sentinels themselves are asked without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// When a push counts as stored. Default: once the master has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<RedisDurabilitySpec>,
    /// Reach Redis over TLS: data nodes and Sentinels alike, each server's
    /// certificate and name verified. Mode Single then needs a `rediss://`
    /// URL (a URL in `secretRef` is used as it is: `rediss://` there
    /// turns TLS on with the system's roots without this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTlsSpec>,
}

/// How Redis's certificates are verified.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RedisTlsSpec {
    /// A Secret key holding the certificate authorities (PEM) the servers'
    /// certificates chain to, for a Redis with a private CA (cert-manager's
    /// `ca.crt`, say). Default: the image's system roots, which managed
    /// Redis services' certificates chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) whose
    /// certificate the pods show a Redis that asks clients for one
    /// (`tls-auth-clients yes`, redis-server's default with TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

/// A Secret in the PushCluster's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// How Redis is deployed.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum RedisMode {
    /// One node (`url` or `secretRef`).
    #[default]
    Single,
    /// A master and replicas that Sentinels watch and fail over; clients
    /// ask the Sentinels which node is master.
    Sentinel,
    /// A Redis Cluster: slots spread over masters, each with replicas;
    /// clients follow slot moves and failovers.
    Cluster,
}

/// A master watched by Redis Sentinels.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
// Lists and their items are bounded by the schema (maxItems, maxLength,
// pattern) rather than by CEL: a rule over every item of an unbounded list
// costs more than the API server's budget for a CRD.
pub struct RedisSentinelSpec {
    /// The name the Sentinels know the master by (`sentinel monitor <name>`).
    #[schemars(length(min = 1, max = 100), pattern(r"^[A-Za-z0-9._-]+$"))]
    pub master_name: String,
    /// Sentinels, `host:port` (1 to 16); one is enough to find the others'
    /// answer, more survive losing one.
    #[schemars(
        length(min = 1, max = 16),
        inner(length(max = 260), pattern(r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$"))
    )]
    pub addresses: Vec<String>,
    /// Database number on the master.
    #[serde(default)]
    pub db: u8,
}

/// A Redis Cluster.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RedisClusterSpec {
    /// Seed nodes, `host:port` (1 to 64): any that answers tells the
    /// client the rest.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(max = 260), pattern(r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$"))
    )]
    pub nodes: Vec<String>,
}

/// When a push counts as stored.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RedisDurabilitySpec {
    /// Replicas that must confirm each push (`WAIT`) before it is
    /// acknowledged. 0: the master's answer is enough, and a failover can
    /// lose the pushes of the moment before it. N: a push is lost only if
    /// the master and N replicas all lose it; while fewer than N replicas
    /// are in sync, pushes are retried and then fail rather than being
    /// acknowledged (run N+1 replicas to ride out losing one).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 5").message("storage.redis.durability.replicas must be between 0 and 5"))]
    pub replicas: i32,
    /// How long a push waits for them, in milliseconds.
    #[serde(default = "d_wait_ms")]
    #[x_kube(validation = Rule::new("self >= 10 && self <= 10000").message("storage.redis.durability.timeoutMilliseconds must be between 10 and 10000"))]
    pub timeout_milliseconds: i32,
}

fn d_wait_ms() -> i32 {
    1000
}

/// A key of a Secret in the PushCluster's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// Shard lease timing, in seconds.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.renewDeadlineSeconds < self.durationSeconds").message("lease.renewDeadlineSeconds must be below lease.durationSeconds"))]
#[x_kube(validation = Rule::new("self.retryPeriodSeconds < self.renewDeadlineSeconds").message("lease.retryPeriodSeconds must be below lease.renewDeadlineSeconds"))]
pub struct LeaseSpec {
    /// How long a lease lasts without renewal.
    #[serde(default = "d_duration")]
    #[x_kube(validation = Rule::new("self >= 2 && self <= 300").message("lease.durationSeconds must be between 2 and 300"))]
    pub duration_seconds: i32,
    /// A holder that could not renew for this long stops serving.
    #[serde(default = "d_renew")]
    pub renew_deadline_seconds: i32,
    /// How often holders renew and standbys look.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1").message("lease.retryPeriodSeconds must be at least 1"))]
    pub retry_period_seconds: i32,
}

fn d_duration() -> i32 {
    6
}
fn d_renew() -> i32 {
    4
}

impl Default for LeaseSpec {
    fn default() -> Self {
        Self {
            duration_seconds: d_duration(),
            renew_deadline_seconds: d_renew(),
            retry_period_seconds: one(),
        }
    }
}

/// Authentication. Secure by default: the operator generates the Secret
/// `<name>-credentials` (keys `admin-token`, `subscriber-secret`,
/// `rpc-token`) unless `insecure` is set, and never overwrites it; deleting
/// one of its keys rotates it (a new value is generated and the pods that use
/// it roll). A Secret named here replaces the generated key for its use.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.insecure) && self.insecure) || (!has(self.adminTokenSecret) && !has(self.subscriberSecret))").message("auth.insecure turns every credential off: drop it or the named secrets"))]
pub struct AuthSpec {
    /// Bearer token required on web's admin listener (default: the generated
    /// `admin-token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_secret: Option<SecretKeyRef>,
    /// HMAC secret of subscriber tokens, checked by comets on subscribe and by
    /// web on private reads (default: the generated `subscriber-secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_secret: Option<SecretKeyRef>,
    /// No credentials at all: the admin API, private reads and the internal
    /// gRPC ports answer anyone who reaches them. For local experiments only;
    /// the status says so in its `AuthEnabled` condition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Let private reads answer JSONP (`cb=`/`callback=`) although subscriber
    /// tokens are on, for old browser clients: any page can include a JSONP
    /// reply, so only the token then protects it. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private_jsonp: bool,
    /// The internal gRPC ports (web → comets, comets and web → the message
    /// service) in plaintext, for a mesh or CNI that encrypts pod traffic
    /// already. Off by default: they run TLS with a certificate of the
    /// cluster's own CA on both ends (Secret `<name>-rpc-tls`); switching
    /// either way rolls the pods three times, so no call between an old and
    /// a new pod fails (`status.rpcTls` says where it is). `insecure`
    /// implies it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plaintext_rpc: bool,
    /// How far ahead a subscriber token's expiry may lie, in seconds: comets
    /// and web refuse a token minted for longer, so a leaked one is good for
    /// a bounded time (default 604800, a week; 0 accepts any expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("auth.subscriberTokenMaxLifetimeSeconds must be at least 0 (0: no bound)"))]
    pub subscriber_token_max_lifetime_seconds: Option<i64>,
}

/// Scheduling passed to every pod of the cluster.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
}

/// The CustomResourceDefinition as YAML (what `crds/` holds).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&PushCluster::crd())
}
