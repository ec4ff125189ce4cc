//! The ConfigMap of service configs, rendered from the services' own
//! `Config` types, and the per-component config hashes that roll pods.
//!
//! Each component's pod template carries the hash of its own config only, so
//! a change rolls only the pods it concerns (and a reshard rolls none).

use super::credentials::{CREDENTIAL_KEYS, RPC_TOKEN, SUBSCRIBER_SECRET};
use super::{meta, name, Facts, MESSAGE_OPS, MESSAGE_PORT, WEB_ADMIN, WEB_OPS, WEB_PUBLIC};
use crate::crd::{EndpointsStatus, PushCluster, RedisMode};
use crate::Result;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use pushcluster_core::serve::ListenerLimits;
use pushcluster_lease::{LeaseTiming, MembershipConfig};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Annotation with the hash of the service configs, on pod templates.
pub const CONFIG_HASH: &str = "pushcluster.io/config-hash";
/// Where the ConfigMap is mounted.
pub(crate) const CONFIG_DIR: &str = "/etc/pushcluster";
/// Web's lame-duck period after SIGTERM (well inside the 30 s grace period).
const WEB_DRAIN_MS: u64 = 5000;

/// A listen address on every interface of the pod.
fn on_all_interfaces(port: i32) -> SocketAddr {
    ([0, 0, 0, 0], port as u16).into()
}

fn timing(pc: &PushCluster) -> LeaseTiming {
    let l = &pc.spec.lease;
    LeaseTiming {
        duration_ms: l.duration_seconds.max(1) as u64 * 1000,
        renew_deadline_ms: l.renew_deadline_seconds.max(1) as u64 * 1000,
        retry_period_ms: l.retry_period_seconds.max(1) as u64 * 1000,
    }
}

/// Kubernetes membership: the shard count is not in it (comets and web
/// follow the shard Leases and Services live), so a reshard changes no
/// config and restarts nothing.
fn membership(pc: &PushCluster) -> MembershipConfig {
    MembershipConfig::Kubernetes {
        cluster: pc.name_any(),
        kube_namespace: None,
        cluster_uid: pc.uid(),
        lease: timing(pc),
        shard_services: super::listeners::shard_service_prefixes(pc),
    }
}

/// The prefix the cluster's Redis keys and live channels live under, when
/// it stores in Redis: the spec's; else the one recorded in the status
/// (what the cluster has been storing under); else `pc` for a cluster
/// whose status predates the prefix (a release that always used `pc`: moving
/// it would hide its backlog and restart its mids); else, for a new cluster,
/// `pc:<namespace>:<name>`, unique among the clusters of one Kubernetes
/// cluster, so any number of them can share one Redis.
pub fn redis_key_prefix(pc: &PushCluster) -> Option<String> {
    let redis = pc.spec.storage.redis.as_ref()?;
    if let Some(p) = &redis.key_prefix {
        return Some(p.clone());
    }
    let status = pc.status.as_ref();
    if let Some(s) = status.and_then(|s| s.storage.as_ref()) {
        return Some(s.key_prefix.clone());
    }
    if status.is_some_and(|s| s.observed_generation.is_some()) {
        return Some(LEGACY_KEY_PREFIX.into());
    }
    Some(format!(
        "pc:{}:{}",
        pc.namespace().unwrap_or_default(),
        pc.name_any()
    ))
}

/// The Redis URL the services are configured with, in the form
/// `pushcluster_redis::Target` parses: `url` itself (mode Single; none when
/// the URL is in `secretRef`), `redis+sentinel://<addresses>/<master>/<db>`
/// or `redis+cluster://<nodes>` (`rediss+…` with `tls`). The password,
/// when kept apart, joins it in the pod (`PUSH_REDIS_PASSWORD`).
pub fn redis_url(pc: &PushCluster) -> Option<String> {
    redis_url_qualified(pc, |hostports| hostports.join(","))
}

/// [`redis_url`] for a client outside the cluster's namespace (the
/// operator): a host without a dot is a Service of the PushCluster's own
/// namespace, which only that namespace's pods find by its short name, so it
/// gets `.<namespace>` (the same name through the cluster's DNS search).
pub fn redis_url_from(pc: &PushCluster, namespace: &str) -> Option<String> {
    redis_url_qualified(pc, |hostports| {
        hostports
            .iter()
            .map(|h| match h.rsplit_once(':') {
                Some((host, port)) if !host.contains('.') && !host.starts_with('[') => {
                    format!("{host}.{namespace}:{port}")
                }
                _ => h.clone(),
            })
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// The URL of the spec's Redis, its Sentinels' or seed nodes' addresses
/// written by `hosts`.
fn redis_url_qualified(pc: &PushCluster, hosts: impl Fn(&[String]) -> String) -> Option<String> {
    let r = pc.spec.storage.redis.as_ref()?;
    let scheme = if r.tls.is_some() { "rediss" } else { "redis" };
    match r.mode.unwrap_or_default() {
        RedisMode::Single => r.url.clone(),
        RedisMode::Sentinel => r.sentinel.as_ref().map(|s| {
            format!(
                "{scheme}+sentinel://{}/{}/{}",
                hosts(&s.addresses),
                s.master_name,
                s.db
            )
        }),
        RedisMode::Cluster => r
            .cluster
            .as_ref()
            .map(|c| format!("{scheme}+cluster://{}", hosts(&c.nodes))),
    }
}

/// When a push counts as stored, for the services' configs.
fn redis_durability(pc: &PushCluster) -> pushcluster_redis::Durability {
    let d = pc
        .spec
        .storage
        .redis
        .as_ref()
        .and_then(|r| r.durability.as_ref());
    match d {
        Some(d) => pushcluster_redis::Durability {
            replicas: d.replicas.max(0) as u32,
            timeout_ms: d.timeout_milliseconds.max(1) as u64,
        },
        None => pushcluster_redis::Durability::default(),
    }
}

/// The longest subscriber token lifetime comets and web accept (0: any).
fn subscriber_token_max_seconds(pc: &PushCluster) -> u64 {
    match pc.spec.auth.subscriber_token_max_lifetime_seconds {
        Some(s) => s.max(0) as u64,
        None => pushcluster_core::token::DEFAULT_MAX_LIFETIME_SECONDS,
    }
}

/// The one prefix every cluster used before prefixes were per cluster.
pub const LEGACY_KEY_PREFIX: &str = "pc";

/// The three services' configs.
struct ServiceConfigs {
    comet: push_comet::Config,
    message: push_message::Config,
    web: push_web::Config,
}

/// A TLS listener of the pods on `port`, with the listener certificate.
fn pod_tls(port: i32) -> pushcluster_core::tls::TlsListen {
    let dir = std::path::Path::new(super::listeners::TLS_DIR);
    pushcluster_core::tls::TlsListen {
        listen: on_all_interfaces(port),
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        reload_seconds: 5,
    }
}

fn service_configs(pc: &PushCluster, facts: &Facts) -> ServiceConfigs {
    let s = &pc.spec;
    let pod_tls_on = super::listeners::pod_tls_secret(pc).is_some();
    let message_url = format!("http://{}:{MESSAGE_PORT}", name(pc, "message"));
    let redis_url = redis_url(pc);
    let durability = redis_durability(pc);
    let key_prefix = redis_key_prefix(pc).unwrap_or_else(|| LEGACY_KEY_PREFIX.into());
    let token_max = subscriber_token_max_seconds(pc);
    let rpc_tls = super::rpc_tls::config(pc, super::rpc_tls::current(pc));
    let comet = push_comet::Config {
        membership: membership(pc),
        ws_listen: on_all_interfaces(s.comet.ports.ws),
        ws_tls: pod_tls_on.then(|| pod_tls(super::listeners::WSS_PORT)),
        tcp_listen: on_all_interfaces(s.comet.ports.tcp),
        rpc_listen: on_all_interfaces(s.comet.ports.rpc),
        ops_listen: on_all_interfaces(s.comet.ports.ops),
        message_url: message_url.clone(),
        // With Redis, comets receive pushes on its live channels (and store
        // only what a web of the previous release still sends them); the
        // embedded store's one writer is the message pod, so without Redis
        // they store through it.
        store: push_comet::storage::DirectStore {
            redis_url: redis_url.clone(),
            redis_namespace: key_prefix.clone(),
            redis_durability: durability,
            ..Default::default()
        },
        subscriber_token_max_seconds: token_max,
        max_subscribers_per_key: s.comet.max_subscribers_per_key.max(1) as usize,
        queue_depth: s.comet.queue_depth.max(1) as usize,
        listener_limits: listener_limits(s.comet.max_connections, s.comet.max_connections_per_ip),
        rpc_tls: rpc_tls.clone(),
        ..push_comet::Config::default()
    };
    let mut message = push_message::Config {
        listen: on_all_interfaces(MESSAGE_PORT),
        ops_listen: on_all_interfaces(MESSAGE_OPS),
        rpc_tls: rpc_tls.clone(),
        ..push_message::Config::default()
    };
    message.storage.path = "/data/messages.redb".into();
    message.storage.redis_url = redis_url.clone();
    message.storage.redis_namespace = key_prefix.clone();
    message.storage.redis_durability = durability;
    let web = push_web::Config {
        public_listen: on_all_interfaces(WEB_PUBLIC),
        public_tls: pod_tls_on.then(|| pod_tls(super::listeners::WEB_PUBLIC_TLS)),
        admin_listen: on_all_interfaces(WEB_ADMIN),
        ops_listen: on_all_interfaces(WEB_OPS),
        message_url,
        comets: Vec::new(),
        // Endpoints drop a terminating pod asynchronously: keep serving
        // (unready) meanwhile, so a rollout refuses no request.
        drain_delay_ms: WEB_DRAIN_MS,
        // With Redis, web stores private pushes in it and the comets
        // deliver them from its live channels (push_comet::live).
        store: push_comet::storage::DirectStore {
            redis_url,
            redis_namespace: key_prefix,
            redis_durability: durability,
            ..Default::default()
        },
        private_jsonp: s.auth.private_jsonp,
        subscriber_token_max_seconds: token_max,
        listener_limits: listener_limits(s.web.max_connections, s.web.max_connections_per_ip),
        membership: membership(pc),
        advertise: super::listeners::client_addresses(pc, &facts.listener_endpoints(pc)),
        rpc_tls,
        ..push_web::Config::default()
    };
    ServiceConfigs {
        comet,
        message,
        web,
    }
}

/// The three service configs, keyed by file name.
pub fn configs(pc: &PushCluster, facts: &Facts) -> Result<BTreeMap<String, String>> {
    let c = service_configs(pc, facts);
    Ok(BTreeMap::from([
        ("comet.yaml".to_owned(), serde_yaml::to_string(&c.comet)?),
        (
            "message.yaml".to_owned(),
            serde_yaml::to_string(&c.message)?,
        ),
        ("web.yaml".to_owned(), serde_yaml::to_string(&c.web)?),
    ]))
}

/// The ConfigMap holding the service configs.
pub fn config_map(pc: &PushCluster, facts: &Facts) -> Result<ConfigMap> {
    Ok(ConfigMap {
        metadata: meta(pc, name(pc, "config"), None),
        data: Some(configs(pc, facts)?),
        ..ConfigMap::default()
    })
}

/// The config hash each component's pods carry: of its own configuration
/// only, so a change restarts only the component it concerns. The shard
/// count is in no config (see `membership`), so a reshard restarts nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigHashes {
    pub comet: String,
    pub message: String,
    pub web: String,
}

/// The per-component config hashes of `pc`, with the digests of the
/// credentials each component reads (so rotating one rolls its users).
pub fn config_hashes(pc: &PushCluster, facts: &Facts) -> Result<ConfigHashes> {
    let c = service_configs(pc, facts);
    let creds = &facts.creds;
    // Every component reaches Redis. Without Redis TLS files the hashes
    // stay what they were before they counted, so an operator upgrade
    // rolls no cluster that has none.
    let tls = &facts.redis_tls;
    let with_redis_tls = |h: String| {
        if tls.is_empty() {
            h
        } else {
            hash_of(&(h, tls))
        }
    };
    // Likewise every component mounts the RPC certificate, once it has one.
    let with_tls = |h: String| match &facts.rpc_tls {
        None => with_redis_tls(h),
        Some(d) => hash_of(&(with_redis_tls(h), d)),
    };
    Ok(ConfigHashes {
        comet: with_tls(hash_of(&(
            serde_yaml::to_string(&c.comet)?,
            creds.pick(&[SUBSCRIBER_SECRET, RPC_TOKEN]),
        ))),
        message: with_tls(hash_of(&(
            serde_yaml::to_string(&c.message)?,
            creds.pick(&[RPC_TOKEN]),
        ))),
        web: with_tls(hash_of(&(
            serde_yaml::to_string(&c.web)?,
            creds.pick(&CREDENTIAL_KEYS),
        ))),
    })
}

/// Hex SHA-256 (first 16 digits) of a value's JSON.
pub fn hash_of<T: Serialize>(v: &T) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    hex::encode(Sha256::digest(bytes))[..16].to_owned()
}

/// Where the cluster is reached (in-cluster DNS names) and its credentials;
/// the listeners' addresses are added from what was observed.
pub fn endpoints(pc: &PushCluster) -> EndpointsStatus {
    let ns = pc.namespace().unwrap_or_default();
    EndpointsStatus {
        public: format!("{}.{ns}.svc:{WEB_PUBLIC}", name(pc, "web")),
        admin: format!("{}.{ns}.svc:{WEB_ADMIN}", name(pc, "web-admin")),
        credentials_secret: super::secure(pc).then(|| super::credentials_name(pc)),
        listeners: Vec::new(),
    }
}

/// A component's listener caps: the spec's where it sets them, else the
/// services' defaults.
fn listener_limits(max: Option<i32>, per_ip: Option<i32>) -> ListenerLimits {
    let d = ListenerLimits::default();
    ListenerLimits {
        max_connections: max.map_or(d.max_connections, |m| m.max(1) as usize),
        max_connections_per_ip: per_ip.map_or(d.max_connections_per_ip, |m| m.max(0) as usize),
        ..d
    }
}
