//! Desired Kubernetes objects of a PushCluster: pure functions of the
//! resource, so most operator behaviour is tested without any API server.
//!
//! Every object carries the cluster's labels and a controller owner reference
//! to the PushCluster, so deleting it deletes everything. Service configs are
//! rendered from the services' own `Config` types; each component's pod
//! template carries the hash of its own config only, so a change rolls only
//! the pods it concerns (and a reshard rolls none).

use crate::crd::{EndpointsStatus, PushCluster, SecretKeyRef};
use crate::{Error, Result};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ApiResource, DynamicObject};
use kube::{Resource, ResourceExt};
use pushcluster_lease::{LeaseTiming, MembershipConfig, MembershipKind};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Field manager of every server-side apply.
pub const MANAGER: &str = "pushcluster-operator";
/// Annotation with the hash of the service configs, on pod templates.
pub const CONFIG_HASH: &str = "pushcluster.io/config-hash";
/// Annotation with the hash of the desired object, for no-op detection.
pub const APPLIED_HASH: &str = "pushcluster.io/applied-hash";
/// Where the ConfigMap is mounted.
const CONFIG_DIR: &str = "/etc/pushcluster";
const MESSAGE_PORT: i32 = 8070;
const MESSAGE_OPS: i32 = 8071;
const WEB_PUBLIC: i32 = 8090;
const WEB_ADMIN: i32 = 8091;
const WEB_OPS: i32 = 8092;
/// Web's lame-duck period after SIGTERM (well inside the 30 s grace period).
const WEB_DRAIN_MS: u64 = 5000;

/// Components of a cluster.
pub const COMPONENTS: [&str; 3] = ["comet", "message", "web"];

/// Key of the generated Secret: web's admin bearer token.
pub const ADMIN_TOKEN: &str = "admin-token";
/// Key of the generated Secret: the HMAC secret of subscriber tokens.
pub const SUBSCRIBER_SECRET: &str = "subscriber-secret";
/// Key of the generated Secret: the internal gRPC token.
pub const RPC_TOKEN: &str = "rpc-token";
/// Every key of the generated Secret.
pub const CREDENTIAL_KEYS: [&str; 3] = [ADMIN_TOKEN, SUBSCRIBER_SECRET, RPC_TOKEN];

/// Name of the generated credentials Secret: `<cluster>-credentials`.
pub fn credentials_name(pc: &PushCluster) -> String {
    name(pc, "credentials")
}

/// Whether the cluster runs with credentials (the default).
pub fn secure(pc: &PushCluster) -> bool {
    !pc.spec.auth.insecure
}

/// What the generated Secret holds, as digests: each component's pod
/// template carries the digests of the keys it reads, so rotating a key
/// (deleting it; the operator generates a new one) rolls exactly the pods
/// that use it. Empty when insecure or not read yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CredentialDigests(pub BTreeMap<String, String>);

impl CredentialDigests {
    /// Digests of the values in `secret`.
    pub fn of(secret: &Secret) -> Self {
        Self(
            secret
                .data
                .iter()
                .flatten()
                .filter(|(k, _)| CREDENTIAL_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), hash_of(&hex::encode(&v.0))))
                .collect(),
        )
    }

    fn pick(&self, keys: &[&str]) -> BTreeMap<String, String> {
        keys.iter()
            .filter_map(|k| self.0.get(*k).map(|d| ((*k).to_owned(), d.clone())))
            .collect()
    }
}

/// The write that makes the credentials Secret complete, or `None` when
/// nothing is to be written (it has every key, or the cluster is insecure).
/// Only missing keys are generated (by `fresh`): an existing value is never
/// replaced, so deleting a key is how it is rotated. The Secret is owned by
/// the PushCluster when the operator creates it.
pub fn credentials_secret(
    pc: &PushCluster,
    live: Option<&Secret>,
    mut fresh: impl FnMut() -> String,
) -> Result<Option<Secret>> {
    if !secure(pc) {
        return Ok(None);
    }
    let have = live.and_then(|s| s.data.as_ref());
    let missing: BTreeMap<String, Value> = CREDENTIAL_KEYS
        .iter()
        .filter(|k| have.is_none_or(|d| d.get(**k).is_none_or(|v| v.0.is_empty())))
        .map(|k| ((*k).to_owned(), Value::String(fresh())))
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    typed(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": metadata(pc, &credentials_name(pc), None),
        "type": "Opaque",
        "stringData": missing,
    }))
    .map(Some)
}

/// Where the cluster is reached (in-cluster DNS names) and its credentials.
pub fn endpoints(pc: &PushCluster) -> EndpointsStatus {
    let ns = pc.namespace().unwrap_or_default();
    EndpointsStatus {
        public: format!("{}.{ns}.svc:{WEB_PUBLIC}", name(pc, "web")),
        admin: format!("{}.{ns}.svc:{WEB_ADMIN}", name(pc, "web-admin")),
        credentials_secret: secure(pc).then(|| credentials_name(pc)),
    }
}

/// A fresh credential: 256 random bits, hex.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Labels of every object of `pc` (and `component` when given).
pub fn labels(pc: &PushCluster, component: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "pushcluster".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pc.name_any()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        ),
        (
            pushcluster_lease::kubernetes::CLUSTER_LABEL.to_owned(),
            pc.name_any(),
        ),
    ]);
    if let Some(c) = component {
        l.insert("app.kubernetes.io/component".to_owned(), c.to_owned());
    }
    l
}

/// Pod selector of one component.
pub fn selector(pc: &PushCluster, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), pc.name_any()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
    ])
}

/// Name of a component's objects: `<cluster>-<component>`.
pub fn name(pc: &PushCluster, component: &str) -> String {
    format!("{}-{component}", pc.name_any())
}

fn metadata(pc: &PushCluster, name: &str, component: Option<&str>) -> Value {
    let owner = pc.controller_owner_ref(&()).map(|o| vec![o]);
    json!({
        "name": name,
        "namespace": pc.namespace(),
        "labels": labels(pc, component),
        "ownerReferences": owner,
    })
}

fn timing(pc: &PushCluster) -> LeaseTiming {
    let l = &pc.spec.lease;
    LeaseTiming {
        duration_ms: l.duration_seconds.max(1) as u64 * 1000,
        renew_deadline_ms: l.renew_deadline_seconds.max(1) as u64 * 1000,
        retry_period_ms: l.retry_period_seconds.max(1) as u64 * 1000,
    }
}

fn membership(pc: &PushCluster) -> MembershipConfig {
    MembershipConfig {
        kind: MembershipKind::Kubernetes,
        shards: pc.spec.comet.shards.max(1) as u32,
        lease: timing(pc),
        cluster: pc.name_any(),
        cluster_uid: pc.uid(),
        ..MembershipConfig::default()
    }
}

fn any(port: i32) -> std::net::SocketAddr {
    ([0, 0, 0, 0], port as u16).into()
}

fn yaml<T: Serialize>(v: &T) -> Result<String> {
    serde_yaml::to_string(v).map_err(|e| Error::Render(e.to_string()))
}

/// The three services' configs.
struct ServiceConfigs {
    comet: push_comet::Config,
    message: push_message::Config,
    web: push_web::Config,
}

fn service_configs(pc: &PushCluster) -> ServiceConfigs {
    let s = &pc.spec;
    let message_url = format!("http://{}:{MESSAGE_PORT}", name(pc, "message"));
    let comet = push_comet::Config {
        shards: s.comet.shards.max(1) as u32,
        membership: membership(pc),
        ws_listen: any(s.comet.ports.ws),
        tcp_listen: any(s.comet.ports.tcp),
        rpc_listen: any(s.comet.ports.rpc),
        ops_listen: any(s.comet.ports.ops),
        message_url: message_url.clone(),
        // With Redis, comets store pushes straight into it (one process
        // fewer on every push); the embedded store's one writer is the
        // message pod, so without Redis they store through it.
        store: push_comet::storage::DirectStore {
            redis_url: s.storage.redis.as_ref().and_then(|r| r.url.clone()),
            ..Default::default()
        },
        max_subscribers_per_key: s.comet.max_subscribers_per_key.max(1) as usize,
        queue_depth: s.comet.queue_depth.max(1) as usize,
        ..push_comet::Config::default()
    };
    let mut message = push_message::Config {
        listen: any(MESSAGE_PORT),
        ops_listen: any(MESSAGE_OPS),
        ..push_message::Config::default()
    };
    message.storage.path = "/data/messages.redb".into();
    message.storage.redis_url = s.storage.redis.as_ref().and_then(|r| r.url.clone());
    let web = push_web::Config {
        public_listen: any(WEB_PUBLIC),
        admin_listen: any(WEB_ADMIN),
        ops_listen: any(WEB_OPS),
        message_url,
        comets: Vec::new(),
        // Endpoints drop a terminating pod asynchronously: keep serving
        // (unready) meanwhile, so a rollout refuses no request.
        drain_delay_ms: WEB_DRAIN_MS,
        // With Redis, web stores private pushes in it and the comets
        // deliver them from its live channels (push_comet::live).
        store: push_comet::storage::DirectStore {
            redis_url: s.storage.redis.as_ref().and_then(|r| r.url.clone()),
            ..Default::default()
        },
        private_jsonp: s.auth.private_jsonp,
        membership: membership(pc),
        advertise: push_web::ClientAddresses {
            ws: s.comet.advertise.as_ref().and_then(|a| a.ws.clone()),
            tcp: s.comet.advertise.as_ref().and_then(|a| a.tcp.clone()),
        },
        ..push_web::Config::default()
    };
    ServiceConfigs {
        comet,
        message,
        web,
    }
}

/// The three service configs, keyed by file name.
pub fn configs(pc: &PushCluster) -> Result<BTreeMap<String, String>> {
    let c = service_configs(pc);
    Ok(BTreeMap::from([
        ("comet.yaml".to_owned(), yaml(&c.comet)?),
        ("message.yaml".to_owned(), yaml(&c.message)?),
        ("web.yaml".to_owned(), yaml(&c.web)?),
    ]))
}

/// The config hash each component's pods carry: of its own configuration
/// only, so a change restarts only the component it concerns. The shard
/// count is left out: comets and web follow it live from the shard Services,
/// so a reshard restarts nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigHashes {
    pub comet: String,
    pub message: String,
    pub web: String,
}

/// The per-component config hashes of `pc`, with the digests of the
/// credentials each component reads (so rotating one rolls its users).
pub fn config_hashes(pc: &PushCluster, creds: &CredentialDigests) -> Result<ConfigHashes> {
    let mut c = service_configs(pc);
    c.comet.shards = 0;
    c.comet.membership.shards = 0;
    c.web.membership.shards = 0;
    Ok(ConfigHashes {
        comet: hash_of(&(yaml(&c.comet)?, creds.pick(&[SUBSCRIBER_SECRET, RPC_TOKEN]))),
        message: hash_of(&(yaml(&c.message)?, creds.pick(&[RPC_TOKEN]))),
        web: hash_of(&(yaml(&c.web)?, creds.pick(&CREDENTIAL_KEYS))),
    })
}

/// Hex SHA-256 of a value's JSON.
pub fn hash_of<T: Serialize>(v: &T) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    hex::encode(Sha256::digest(bytes))[..16].to_owned()
}

/// The ConfigMap holding the service configs.
pub fn config_map(pc: &PushCluster) -> Result<ConfigMap> {
    typed(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": metadata(pc, &name(pc, "config"), None),
        "data": configs(pc)?,
    }))
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Render(e.to_string()))
}

fn secret_env(var: &str, r: &Option<SecretKeyRef>) -> Option<Value> {
    r.as_ref().map(
        |r| json!({"name": var, "valueFrom": {"secretKeyRef": {"name": r.name, "key": r.key}}}),
    )
}

/// A credential's variable: from the Secret the spec names, else from the
/// generated Secret's `key` (nothing when the cluster is insecure).
fn credential_env(
    pc: &PushCluster,
    var: &str,
    key: &str,
    named: &Option<SecretKeyRef>,
) -> Option<Value> {
    match named {
        Some(_) => secret_env(var, named),
        None if secure(pc) => secret_env(
            var,
            &Some(SecretKeyRef {
                name: credentials_name(pc),
                key: key.to_owned(),
            }),
        ),
        None => None,
    }
}

fn rpc_token_env(pc: &PushCluster) -> Option<Value> {
    credential_env(pc, "PUSH_RPC_TOKEN", RPC_TOKEN, &None)
}

fn subscriber_env(pc: &PushCluster) -> Option<Value> {
    credential_env(
        pc,
        "PUSH_SUBSCRIBER_SECRET",
        SUBSCRIBER_SECRET,
        &pc.spec.auth.subscriber_secret,
    )
}

/// `PUSH_WORKER_THREADS` when the spec sets it (the binaries' default otherwise).
fn worker_threads_env(threads: Option<i32>) -> Option<Value> {
    threads.map(|n| json!({"name": "PUSH_WORKER_THREADS", "value": n.to_string()}))
}

fn pod_env() -> Vec<Value> {
    vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "PUSH_LOG_JSON", "value": "true"}),
    ]
}

struct PodParts<'a> {
    component: &'a str,
    binary: &'a str,
    ports: Vec<(&'a str, i32)>,
    ops_port: i32,
    env: Vec<Value>,
    resources: Option<&'a k8s_openapi::api::core::v1::ResourceRequirements>,
    volumes: Vec<Value>,
    mounts: Vec<Value>,
    api_access: bool,
    grace_seconds: i64,
}

/// The pod template shared by every component.
fn pod_template(pc: &PushCluster, hash: &str, p: PodParts<'_>) -> Value {
    let sched = &pc.spec.scheduling;
    let mut volumes = vec![json!({"name": "config", "configMap": {"name": name(pc, "config")}})];
    volumes.extend(p.volumes);
    let mut mounts = vec![json!({"name": "config", "mountPath": CONFIG_DIR, "readOnly": true})];
    mounts.extend(p.mounts);
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": "ops"}, "periodSeconds": 2, "failureThreshold": 3});
    let mut ports: Vec<Value> = p
        .ports
        .iter()
        .map(|(n, port)| json!({"name": n, "containerPort": port, "protocol": "TCP"}))
        .collect();
    ports.push(json!({"name": "ops", "containerPort": p.ops_port, "protocol": "TCP"}));
    json!({
        "metadata": {
            "labels": labels(pc, Some(p.component)),
            "annotations": {CONFIG_HASH: hash},
        },
        "spec": {
            "serviceAccountName": name(pc, p.component),
            "automountServiceAccountToken": p.api_access,
            "terminationGracePeriodSeconds": p.grace_seconds,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "nodeSelector": sched.node_selector,
            "tolerations": sched.tolerations,
            "affinity": sched.affinity,
            "topologySpreadConstraints": sched.topology_spread_constraints,
            "volumes": volumes,
            "containers": [{
                "name": p.component,
                "image": pc.spec.image,
                "command": [p.binary, "--config", format!("{CONFIG_DIR}/{}.yaml", p.component)],
                "env": p.env,
                "ports": ports,
                "readinessProbe": probe("/readyz"),
                "livenessProbe": probe("/healthz"),
                "resources": p.resources,
                "volumeMounts": mounts,
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    })
}

fn deployment(pc: &PushCluster, hash: &str, replicas: i32, p: PodParts<'_>) -> Result<Deployment> {
    let component = p.component;
    typed(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(pc, &name(pc, component), Some(component)),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(pc, component)},
            // A new pod (a Ready standby, for comets) comes up before an old
            // one goes, so capacity never drops during a rollout.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": pod_template(pc, hash, p),
        },
    }))
}

/// Comets: `shards + standbys` pods. Every comet is Ready once it listens
/// (a standby can take over at once); routing follows the Lease holders.
pub fn comet_deployment(pc: &PushCluster, hash: &str) -> Result<Deployment> {
    let c = &pc.spec.comet;
    let mut env = pod_env();
    env.extend(subscriber_env(pc));
    env.extend(rpc_token_env(pc));
    env.extend(redis_url_env(pc));
    env.extend(worker_threads_env(c.worker_threads));
    deployment(
        pc,
        hash,
        c.shards + c.standbys,
        PodParts {
            component: "comet",
            binary: "push-comet",
            ports: vec![
                ("ws", c.ports.ws),
                ("tcp", c.ports.tcp),
                ("rpc", c.ports.rpc),
            ],
            ops_port: c.ports.ops,
            env,
            resources: c.resources.as_ref(),
            volumes: vec![],
            mounts: vec![],
            api_access: true,
            // Release the lease, flush queues, close connections.
            grace_seconds: 30,
        },
    )
}

/// The Redis URL from the Secret the spec names, if it names one (the
/// message service, the comets and web all write to Redis).
fn redis_url_env(pc: &PushCluster) -> Option<Value> {
    pc.spec
        .storage
        .redis
        .as_ref()
        .and_then(|r| secret_env("PUSH_REDIS_URL", &r.secret_ref))
}

fn message_parts(pc: &PushCluster, volumes: Vec<Value>) -> PodParts<'_> {
    let mut env = pod_env();
    env.extend(rpc_token_env(pc));
    env.extend(redis_url_env(pc));
    PodParts {
        component: "message",
        binary: "push-message",
        ports: vec![("grpc", MESSAGE_PORT)],
        ops_port: MESSAGE_OPS,
        env,
        resources: pc.spec.message.resources.as_ref(),
        volumes,
        mounts: vec![json!({"name": "data", "mountPath": "/data"})],
        api_access: false,
        grace_seconds: 30,
    }
}

/// The message service on Redis: stateless, a Deployment.
pub fn message_deployment(pc: &PushCluster, hash: &str) -> Result<Deployment> {
    let parts = message_parts(pc, vec![json!({"name": "data", "emptyDir": {}})]);
    deployment(pc, hash, pc.spec.message.replicas, parts)
}

/// The message service on the embedded store: a StatefulSet of one pod whose
/// store lives on a PersistentVolumeClaim, so messages and mid sequences
/// outlive pods, rollouts and reschedules. A StatefulSet replaces its pod
/// only after the old one is gone: never two writers on one store. Deleting
/// the PushCluster deletes the claim too (retention policy `Delete`).
pub fn message_statefulset(pc: &PushCluster, hash: &str) -> Result<StatefulSet> {
    let e = &pc.spec.storage.embedded;
    let parts = message_parts(pc, vec![]);
    typed(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": metadata(pc, &name(pc, "message"), Some("message")),
        "spec": {
            "replicas": 1,
            "serviceName": name(pc, "message"),
            "selector": {"matchLabels": selector(pc, "message")},
            "podManagementPolicy": "OrderedReady",
            "updateStrategy": {"type": "RollingUpdate"},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
            "template": pod_template(pc, hash, parts),
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels(pc, Some("message"))},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": e.storage_class_name,
                    "resources": {"requests": {"storage": e.size}},
                },
            }],
        },
    }))
}

/// Whether the message service runs on the embedded store (a StatefulSet).
pub fn embedded(pc: &PushCluster) -> bool {
    pc.spec.storage.redis.is_none()
}

/// Web.
pub fn web_deployment(pc: &PushCluster, hash: &str) -> Result<Deployment> {
    let mut env = pod_env();
    env.extend(credential_env(
        pc,
        "PUSH_ADMIN_TOKEN",
        ADMIN_TOKEN,
        &pc.spec.auth.admin_token_secret,
    ));
    env.extend(subscriber_env(pc));
    env.extend(rpc_token_env(pc));
    env.extend(redis_url_env(pc));
    env.extend(worker_threads_env(pc.spec.web.worker_threads));
    deployment(
        pc,
        hash,
        pc.spec.web.replicas,
        PodParts {
            component: "web",
            binary: "push-web",
            ports: vec![("public", WEB_PUBLIC), ("admin", WEB_ADMIN)],
            ops_port: WEB_OPS,
            env,
            resources: pc.spec.web.resources.as_ref(),
            volumes: vec![],
            mounts: vec![],
            api_access: true,
            grace_seconds: 30,
        },
    )
}

fn service(
    pc: &PushCluster,
    name: &str,
    component: Option<&str>,
    extra: BTreeMap<String, String>,
    sel: BTreeMap<String, String>,
    ports: &[(&str, i32)],
    kind: &str,
) -> Result<Service> {
    let mut meta = metadata(pc, name, component);
    if let Some(l) = meta["labels"].as_object_mut() {
        for (k, v) in extra {
            l.insert(k, v.into());
        }
    }
    typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": kind,
            "selector": sel,
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "targetPort": n, "protocol": "TCP"})).collect::<Vec<_>>(),
        },
    }))
}

/// One Service per shard, `<cluster>-comet-<k>`, selecting the pod labelled
/// `pushcluster.io/shard=k`: a stable name per shard, and the EndpointSlices
/// web routes by.
pub fn shard_services(pc: &PushCluster) -> Result<Vec<Service>> {
    let c = &pc.spec.comet;
    (0..c.shards.max(1))
        .map(|k| {
            let shard = (
                pushcluster_lease::kubernetes::SHARD_LABEL.to_owned(),
                k.to_string(),
            );
            let mut sel = selector(pc, "comet");
            sel.insert(shard.0.clone(), shard.1.clone());
            service(
                pc,
                &pushcluster_lease::kubernetes::lease_name(&pc.name_any(), k as u32),
                Some("comet"),
                BTreeMap::from([shard]),
                sel,
                &[
                    ("ws", c.ports.ws),
                    ("tcp", c.ports.tcp),
                    ("rpc", c.ports.rpc),
                ],
                "ClusterIP",
            )
        })
        .collect()
}

/// The headless Service over every comet, `<cluster>-comets`: its
/// EndpointSlices tell web and the comets each comet pod's address and
/// readiness; the shard Leases tell which pod serves which shard.
pub fn comets_service(pc: &PushCluster) -> Result<Service> {
    let c = &pc.spec.comet.ports;
    let mut s = service(
        pc,
        &pushcluster_lease::endpoints::comets_service(&pc.name_any()),
        Some("comet"),
        BTreeMap::new(),
        selector(pc, "comet"),
        &[("ws", c.ws), ("tcp", c.tcp), ("rpc", c.rpc)],
        "ClusterIP",
    )?;
    if let Some(spec) = s.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
    }
    Ok(s)
}

/// The shard Leases `<cluster>-comet-<k>`, made by the operator (without a
/// holder) so comets need no right to create Leases: they may only get and
/// update these names. Only metadata is applied; the comets own the spec.
pub fn shard_leases(pc: &PushCluster) -> Result<Vec<Lease>> {
    (0..pc.spec.comet.shards.max(1))
        .map(|k| {
            let mut meta = metadata(
                pc,
                &pushcluster_lease::kubernetes::lease_name(&pc.name_any(), k as u32),
                Some("comet"),
            );
            meta["labels"][pushcluster_lease::kubernetes::SHARD_LABEL] = k.to_string().into();
            typed(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": meta,
            }))
        })
        .collect()
}

/// Services of message (gRPC), web's public listener and web's admin listener
/// (never exposed outside the cluster).
pub fn component_services(pc: &PushCluster) -> Result<Vec<Service>> {
    Ok(vec![
        service(
            pc,
            &name(pc, "message"),
            Some("message"),
            BTreeMap::new(),
            selector(pc, "message"),
            &[("grpc", MESSAGE_PORT)],
            "ClusterIP",
        )?,
        service(
            pc,
            &name(pc, "web"),
            Some("web"),
            BTreeMap::new(),
            selector(pc, "web"),
            &[("public", WEB_PUBLIC)],
            pc.spec.web.service_type.as_str(),
        )?,
        service(
            pc,
            &name(pc, "web-admin"),
            Some("web"),
            BTreeMap::new(),
            selector(pc, "web"),
            &[("admin", WEB_ADMIN)],
            "ClusterIP",
        )?,
    ])
}

/// A ServiceAccount per component.
pub fn service_accounts(pc: &PushCluster) -> Result<Vec<ServiceAccount>> {
    COMPONENTS
        .iter()
        .map(|c| {
            typed(json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": metadata(pc, &name(pc, c), Some(c)),
                "automountServiceAccountToken": *c != "message",
            }))
        })
        .collect()
}

/// Least-privilege Roles: comets read Leases and EndpointSlices and may
/// write (get, update) only their own cluster's shard Leases, by name; they
/// create nothing and patch no pod. Web only reads Leases and EndpointSlices;
/// the message service needs no API access at all.
pub fn roles(pc: &PushCluster) -> Result<Vec<Role>> {
    let slices = json!({"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]});
    let own_leases: Vec<String> = (0..pc.spec.comet.shards.max(1))
        .map(|k| pushcluster_lease::kubernetes::lease_name(&pc.name_any(), k as u32))
        .collect();
    Ok(vec![
        typed(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": metadata(pc, &name(pc, "comet"), Some("comet")),
            "rules": [
                // Listing and watching cannot be limited by name; Leases hold
                // no secrets. Writes are limited to this cluster's shards.
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["list", "watch"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": own_leases, "verbs": ["get", "update"]},
                slices,
            ],
        }))?,
        typed(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": metadata(pc, &name(pc, "web"), Some("web")),
            "rules": [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch"]},
                slices,
            ],
        }))?,
    ])
}

/// RoleBindings of the comet and web Roles to their ServiceAccounts.
pub fn role_bindings(pc: &PushCluster) -> Result<Vec<RoleBinding>> {
    ["comet", "web"]
        .iter()
        .map(|c| {
            typed(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": metadata(pc, &name(pc, c), Some(c)),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name(pc, c)},
                "subjects": [{"kind": "ServiceAccount", "name": name(pc, c), "namespace": pc.namespace()}],
            }))
        })
        .collect()
}

/// The cluster's NetworkPolicies, one per component (see
/// [`crate::crd::NetworkPolicySpec`]); none when disabled.
pub fn network_policies(pc: &PushCluster) -> Result<Vec<NetworkPolicy>> {
    let np = &pc.spec.network_policy;
    if !np.enabled {
        return Ok(Vec::new());
    }
    let peers = |p: &Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>| -> Result<Value> {
        serde_json::to_value(p).map_err(|e| Error::Render(e.to_string()))
    };
    // `from` absent = anyone; `podSelector: {}` alone = the policy's namespace.
    let own_namespace = json!([{"podSelector": {}}]);
    let or_own = |p: &Vec<_>| -> Result<Value> {
        if p.is_empty() {
            Ok(own_namespace.clone())
        } else {
            peers(p)
        }
    };
    let pods_of = |components: &[&str]| -> Value {
        components
            .iter()
            .map(|c| json!({"podSelector": {"matchLabels": selector(pc, c)}}))
            .collect()
    };
    let rule = |ports: &[i32], from: Option<Value>| {
        let mut r = json!({"ports": ports.iter().map(|p| json!({"protocol": "TCP", "port": p})).collect::<Vec<_>>()});
        if let Some(f) = from {
            r["from"] = f;
        }
        r
    };
    let public = if np.public_from.is_empty() {
        None
    } else {
        Some(peers(&np.public_from)?)
    };
    let monitoring = or_own(&np.monitoring_from)?;
    let c = &pc.spec.comet.ports;
    let policy = |component: &str, ingress: Vec<Value>| -> Result<NetworkPolicy> {
        typed(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": metadata(pc, &name(pc, component), Some(component)),
            "spec": {
                "podSelector": {"matchLabels": selector(pc, component)},
                "policyTypes": ["Ingress"],
                "ingress": ingress,
            },
        }))
    };
    Ok(vec![
        policy(
            "comet",
            vec![
                rule(&[c.ws, c.tcp], public.clone()),
                rule(&[c.rpc], Some(pods_of(&["web"]))),
                rule(&[c.ops], Some(monitoring.clone())),
            ],
        )?,
        policy(
            "message",
            vec![
                rule(&[MESSAGE_PORT], Some(pods_of(&["comet", "web"]))),
                rule(&[MESSAGE_OPS], Some(monitoring.clone())),
            ],
        )?,
        policy(
            "web",
            vec![
                rule(&[WEB_PUBLIC], public),
                rule(&[WEB_ADMIN], Some(or_own(&np.admin_from)?)),
                rule(&[WEB_OPS], Some(monitoring)),
            ],
        )?,
    ])
}

/// PodDisruptionBudgets: voluntary evictions take one pod of a component at a
/// time (a comet holder hands its shard over on eviction like on SIGTERM).
pub fn pdbs(pc: &PushCluster) -> Result<Vec<PodDisruptionBudget>> {
    COMPONENTS
        .iter()
        .map(|c| {
            typed(json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": metadata(pc, &name(pc, c), Some(c)),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(pc, c)}},
            }))
        })
        .collect()
}

fn dynamic<K: Resource<DynamicType = ()> + Serialize>(obj: &K) -> Result<DynamicObject> {
    let ar = ApiResource::erase::<K>(&());
    let mut v = serde_json::to_value(obj).map_err(|e| Error::Render(e.to_string()))?;
    v["apiVersion"] = ar.api_version.clone().into();
    v["kind"] = ar.kind.clone().into();
    let hash = hash_of(&v);
    v["metadata"]["annotations"][APPLIED_HASH] = hash.into();
    serde_json::from_value(v).map_err(|e| Error::Render(e.to_string()))
}

/// One desired child object, with the API resource it is applied through.
#[derive(Debug, Clone)]
pub struct Child {
    pub resource: ApiResource,
    pub object: DynamicObject,
}

fn child<K: Resource<DynamicType = ()> + Serialize>(obj: &K) -> Result<Child> {
    Ok(Child {
        resource: ApiResource::erase::<K>(&()),
        object: dynamic(obj)?,
    })
}

/// Every child of `pc`, in apply order (config and RBAC before the pods
/// that use them); `creds` are the digests of the generated credentials.
pub fn desired(pc: &PushCluster, creds: &CredentialDigests) -> Result<Vec<Child>> {
    let cm = config_map(pc)?;
    let hash = config_hashes(pc, creds)?;
    let mut out = vec![child(&cm)?];
    for sa in service_accounts(pc)? {
        out.push(child(&sa)?);
    }
    for r in roles(pc)? {
        out.push(child(&r)?);
    }
    for rb in role_bindings(pc)? {
        out.push(child(&rb)?);
    }
    for s in shard_services(pc)?
        .iter()
        .chain(std::iter::once(&comets_service(pc)?))
        .chain(component_services(pc)?.iter())
    {
        out.push(child(s)?);
    }
    for l in shard_leases(pc)? {
        out.push(child(&l)?);
    }
    // Policies before the pods they protect.
    for p in network_policies(pc)? {
        out.push(child(&p)?);
    }
    if embedded(pc) {
        out.push(child(&message_statefulset(pc, &hash.message)?)?);
    } else {
        out.push(child(&message_deployment(pc, &hash.message)?)?);
    }
    out.push(child(&comet_deployment(pc, &hash.comet)?)?);
    out.push(child(&web_deployment(pc, &hash.web)?)?);
    for p in pdbs(pc)? {
        out.push(child(&p)?);
    }
    Ok(out)
}
