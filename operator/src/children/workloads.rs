//! The pods: comet and web Deployments, the message service (a StatefulSet
//! on the embedded store, a Deployment on Redis) and their
//! PodDisruptionBudgets. One pod template serves every component.

use super::config::{CONFIG_DIR, CONFIG_HASH};
use super::credentials::{credentials_name, secure, ADMIN_TOKEN, RPC_TOKEN, SUBSCRIBER_SECRET};
use super::{labels, match_labels, meta, name, COMPONENTS, MESSAGE_OPS, MESSAGE_PORT};
use super::{WEB_ADMIN, WEB_OPS, WEB_PUBLIC};
use crate::crd::{ClaimAccessMode, PushCluster, SecretKeyRef};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// The uid and gid the processes run as (distroless `nonroot`).
const NONROOT: i64 = 65532;
/// Seconds a pod has after SIGTERM: release the lease, flush queues, close
/// connections.
const GRACE_SECONDS: i64 = 30;

fn env_value(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    }
}

fn env_from(name: &str, source: EnvVarSource) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(source),
        ..EnvVar::default()
    }
}

fn secret_env(var: &str, r: &SecretKeyRef) -> EnvVar {
    env_from(
        var,
        EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.name.clone(),
                key: r.key.clone(),
                ..SecretKeySelector::default()
            }),
            ..EnvVarSource::default()
        },
    )
}

fn field_env(var: &str, path: &str) -> EnvVar {
    env_from(
        var,
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        },
    )
}

/// A credential's variable: from the Secret the spec names, else from the
/// generated Secret's `key` (nothing when the cluster is insecure).
fn credential_env(
    pc: &PushCluster,
    var: &str,
    key: &str,
    named: &Option<SecretKeyRef>,
) -> Option<EnvVar> {
    match named {
        Some(r) => Some(secret_env(var, r)),
        None if secure(pc) => Some(secret_env(
            var,
            &SecretKeyRef {
                name: credentials_name(pc),
                key: key.to_owned(),
            },
        )),
        None => None,
    }
}

fn rpc_token_env(pc: &PushCluster) -> Option<EnvVar> {
    credential_env(pc, "PUSH_RPC_TOKEN", RPC_TOKEN, &None)
}

fn subscriber_env(pc: &PushCluster) -> Option<EnvVar> {
    credential_env(
        pc,
        "PUSH_SUBSCRIBER_SECRET",
        SUBSCRIBER_SECRET,
        &pc.spec.auth.subscriber_secret,
    )
}

/// The Redis URL and password from the Secrets the spec names, if it
/// names them (the message service, the comets and web all reach Redis).
fn redis_url_env(pc: &PushCluster) -> Vec<EnvVar> {
    let Some(r) = pc.spec.storage.redis.as_ref() else {
        return Vec::new();
    };
    // The password joins whichever URL is in force, in the pod.
    [
        r.secret_ref
            .as_ref()
            .map(|s| secret_env("PUSH_REDIS_URL", s)),
        r.password_secret_ref
            .as_ref()
            .map(|s| secret_env("PUSH_REDIS_PASSWORD", s)),
    ]
    .into_iter()
    .flatten()
    .chain(redis_tls_env(pc))
    .collect()
}

/// Where the Redis CA of `storage.redis.tls.caSecretRef` is mounted.
const REDIS_CA_DIR: &str = "/etc/pushcluster-redis-ca";
/// The CA file in it (`PUSH_REDIS_CA_FILE`).
const REDIS_CA_FILE: &str = "/etc/pushcluster-redis-ca/ca.crt";
/// Where the client certificate of `tls.clientCertSecretRef` is mounted.
const REDIS_CLIENT_DIR: &str = "/etc/pushcluster-redis-client";

/// `storage.redis.tls`, when the spec has it.
fn redis_tls(pc: &PushCluster) -> Option<&crate::crd::RedisTlsSpec> {
    pc.spec.storage.redis.as_ref()?.tls.as_ref()
}

/// The variables naming the Redis TLS files [`redis_tls_volumes`] mounts.
fn redis_tls_env(pc: &PushCluster) -> Vec<EnvVar> {
    let Some(tls) = redis_tls(pc) else {
        return Vec::new();
    };
    let mut env = Vec::new();
    if tls.ca_secret_ref.is_some() {
        env.push(env_value("PUSH_REDIS_CA_FILE", REDIS_CA_FILE.into()));
    }
    if tls.client_cert_secret_ref.is_some() {
        for (var, file) in [
            ("PUSH_REDIS_CLIENT_CERT_FILE", "tls.crt"),
            ("PUSH_REDIS_CLIENT_KEY_FILE", "tls.key"),
        ] {
            env.push(env_value(var, format!("{REDIS_CLIENT_DIR}/{file}")));
        }
    }
    env
}

/// The volumes and mounts of Redis's CA (its one key as `ca.crt`) and of
/// the client certificate, as the spec names them: every component
/// reaches Redis.
fn redis_tls_volumes(pc: &PushCluster) -> Vec<(Volume, VolumeMount)> {
    let Some(tls) = redis_tls(pc) else {
        return Vec::new();
    };
    let secret = |volume: &str, name: &str, items: Option<Vec<KeyToPath>>, dir: &str| {
        (
            Volume {
                name: volume.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(name.to_owned()),
                    items,
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
            VolumeMount {
                name: volume.into(),
                mount_path: dir.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        )
    };
    let only = |key: &str, path: &str| {
        Some(vec![KeyToPath {
            key: key.to_owned(),
            path: path.to_owned(),
            ..KeyToPath::default()
        }])
    };
    let mut out = Vec::new();
    if let Some(ca) = &tls.ca_secret_ref {
        out.push(secret(
            "redis-ca",
            &ca.name,
            only(&ca.key, "ca.crt"),
            REDIS_CA_DIR,
        ));
    }
    if let Some(c) = &tls.client_cert_secret_ref {
        out.push(secret("redis-client", &c.name, None, REDIS_CLIENT_DIR));
    }
    out
}

/// `PUSH_WORKER_THREADS` when the spec sets it (the binaries' default otherwise).
fn worker_threads_env(threads: Option<i32>) -> Option<EnvVar> {
    threads.map(|n| env_value("PUSH_WORKER_THREADS", n.to_string()))
}

/// What every pod is told about itself.
fn pod_env() -> Vec<EnvVar> {
    vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        env_value("PUSH_LOG_JSON", "true".into()),
        // This operator may be newer than the image the spec names: a
        // setting it renders that the image does not know is dropped with
        // a warning rather than stopping the pod (a rolling update
        // included). See `pushcluster_core::config_file`.
        env_value(
            pushcluster_core::config_file::UNKNOWN_SETTINGS_ENV,
            "warn".into(),
        ),
    ]
}

/// A component's resources when its spec gives none: requests that keep
/// the pod out of the BestEffort class (first to be evicted) and a memory
/// limit, from the figures in docs/benchmarks.md (about 4 MiB per idle
/// process and 1.8–2.0 KiB per subscriber connection; about 75 µs of web
/// CPU, 35 µs of comet CPU per stored push). Sized for a comet of 25,000
/// connections at its request and 250,000 at its limit, and web and the
/// message service at about 1,000 pushes/s per 100m; docs/operations.md
/// ("Sizing") says how to scale them.
pub fn default_resources(component: &str) -> ResourceRequirements {
    let (cpu, memory, limit) = match component {
        "comet" => ("100m", "64Mi", "512Mi"),
        "message" => ("100m", "64Mi", "512Mi"),
        _ => ("100m", "32Mi", "256Mi"),
    };
    let q = |v: &str| Quantity(v.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q(cpu)),
            ("memory".to_owned(), q(memory)),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), q(limit))])),
        ..ResourceRequirements::default()
    }
}

/// What differs between the components' pods.
struct PodParts<'a> {
    component: &'a str,
    binary: &'a str,
    ports: Vec<(&'a str, i32)>,
    ops_port: i32,
    env: Vec<EnvVar>,
    resources: Option<&'a ResourceRequirements>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
    api_access: bool,
}

fn probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("ops".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

/// The pod template shared by every component: non-root, read-only root
/// filesystem, the ConfigMap at [`CONFIG_DIR`], probes on the ops port.
fn pod_template(pc: &PushCluster, hash: &str, p: PodParts<'_>) -> PodTemplateSpec {
    let sched = &pc.spec.scheduling;
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: name(pc, "config"),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    volumes.extend(p.volumes);
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    mounts.extend(p.mounts);
    for (volume, mount) in redis_tls_volumes(pc) {
        volumes.push(volume);
        mounts.push(mount);
    }
    if let Some((volume, mount)) = super::rpc_tls::volume(pc, super::rpc_tls::current(pc)) {
        volumes.push(volume);
        mounts.push(mount);
    }
    let mut ports: Vec<ContainerPort> = p
        .ports
        .iter()
        .map(|(n, port)| container_port(n, *port))
        .collect();
    ports.push(container_port("ops", p.ops_port));
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(pc, Some(p.component))),
            annotations: Some(BTreeMap::from([(CONFIG_HASH.to_owned(), hash.to_owned())])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(name(pc, p.component)),
            automount_service_account_token: Some(p.api_access),
            termination_grace_period_seconds: Some(GRACE_SECONDS),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(NONROOT),
                fs_group: Some(NONROOT),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            node_selector: sched.node_selector.clone(),
            tolerations: sched.tolerations.clone(),
            affinity: sched.affinity.clone(),
            topology_spread_constraints: sched.topology_spread_constraints.clone(),
            volumes: Some(volumes),
            containers: vec![Container {
                name: p.component.to_owned(),
                image: Some(pc.spec.image.clone()),
                command: Some(vec![
                    p.binary.to_owned(),
                    "--config".into(),
                    format!("{CONFIG_DIR}/{}.yaml", p.component),
                ]),
                env: Some(p.env),
                ports: Some(ports),
                readiness_probe: Some(probe("/readyz")),
                liveness_probe: Some(probe("/healthz")),
                resources: Some(
                    p.resources
                        .cloned()
                        .unwrap_or_else(|| default_resources(p.component)),
                ),
                volume_mounts: Some(mounts),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        ..Capabilities::default()
                    }),
                    ..SecurityContext::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
    }
}

fn deployment(pc: &PushCluster, hash: &str, replicas: i32, p: PodParts<'_>) -> Deployment {
    let component = p.component;
    Deployment {
        metadata: meta(pc, name(pc, component), Some(component)),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: match_labels(pc, component),
            // A new pod (a Ready standby, for comets) comes up before an old
            // one goes, so capacity never drops during a rollout.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: pod_template(pc, hash, p),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Comets: `shards + standbys` pods. Every comet is Ready once it listens
/// (a standby can take over at once); routing follows the Lease holders.
pub fn comet_deployment(pc: &PushCluster, hash: &str) -> Deployment {
    let c = &pc.spec.comet;
    let mut env = pod_env();
    // The holder writes its address into its shard's EndpointSlice.
    env.push(field_env("POD_IP", "status.podIP"));
    env.extend(subscriber_env(pc));
    env.extend(rpc_token_env(pc));
    env.extend(redis_url_env(pc));
    env.extend(worker_threads_env(c.worker_threads));
    let (volumes, mounts) = listener_tls(pc);
    let mut ports = vec![
        ("ws", c.ports.ws),
        ("tcp", c.ports.tcp),
        ("rpc", c.ports.rpc),
    ];
    if !volumes.is_empty() {
        ports.push(("wss", super::listeners::WSS_PORT));
    }
    let parts = PodParts {
        component: "comet",
        binary: "push-comet",
        ports,
        ops_port: c.ports.ops,
        env,
        resources: c.resources.as_ref(),
        volumes,
        mounts,
        api_access: true,
    };
    deployment(pc, hash, c.shards + c.standbys, parts)
}

/// The listener certificate's volume and mount, when Service listeners
/// have the pods terminate TLS. Mounted by Secret name, so a renewed
/// certificate reaches the running pods (they re-read it) without a roll.
fn listener_tls(pc: &PushCluster) -> (Vec<Volume>, Vec<VolumeMount>) {
    let Some(secret) = super::listeners::pod_tls_secret(pc) else {
        return (vec![], vec![]);
    };
    (
        vec![Volume {
            name: "listener-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.to_owned()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }],
        vec![VolumeMount {
            name: "listener-tls".into(),
            mount_path: super::listeners::TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }],
    )
}

/// Web.
pub fn web_deployment(pc: &PushCluster, hash: &str) -> Deployment {
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
    let (volumes, mounts) = listener_tls(pc);
    let mut ports = vec![("public", WEB_PUBLIC), ("admin", WEB_ADMIN)];
    if !volumes.is_empty() {
        ports.push(("public-tls", super::listeners::WEB_PUBLIC_TLS));
    }
    let parts = PodParts {
        component: "web",
        binary: "push-web",
        ports,
        ops_port: WEB_OPS,
        env,
        resources: pc.spec.web.resources.as_ref(),
        volumes,
        mounts,
        api_access: true,
    };
    deployment(pc, hash, pc.spec.web.replicas, parts)
}

/// The message service's pod; `volumes` holds its `data` volume unless a
/// claim template provides it.
fn message_parts(pc: &PushCluster, volumes: Vec<Volume>) -> PodParts<'_> {
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
        mounts: vec![VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..VolumeMount::default()
        }],
        api_access: false,
    }
}

/// The message service on Redis: stateless, a Deployment.
pub fn message_deployment(pc: &PushCluster, hash: &str) -> Deployment {
    let scratch = Volume {
        name: "data".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let parts = message_parts(pc, vec![scratch]);
    deployment(pc, hash, pc.spec.message.replicas, parts)
}

/// The message service on the embedded store: a StatefulSet of one pod whose
/// store lives on a PersistentVolumeClaim, so messages and mid sequences
/// outlive pods, rollouts and reschedules. A StatefulSet replaces its pod
/// only after the old one is gone: never two writers on one store. Deleting
/// the PushCluster deletes the claim too (retention policy `Delete`).
/// `access` is the claim's access mode, settled by the controller.
pub fn message_statefulset(pc: &PushCluster, hash: &str, access: ClaimAccessMode) -> StatefulSet {
    let e = &pc.spec.storage.embedded;
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(labels(pc, Some("message"))),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![access.as_str().into()]),
            storage_class_name: e.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(e.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    StatefulSet {
        metadata: meta(pc, name(pc, "message"), Some("message")),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(name(pc, "message")),
            selector: match_labels(pc, "message"),
            pod_management_policy: Some("OrderedReady".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            template: pod_template(pc, hash, message_parts(pc, vec![])),
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// PodDisruptionBudgets: voluntary evictions take one pod of a component at a
/// time (a comet holder hands its shard over on eviction like on SIGTERM).
/// The embedded store's single message pod takes none: a node drain stops
/// at it instead of taking the cluster's storage away without warning
/// (docs/operations.md, "Maintenance", says how to move it).
pub fn pdbs(pc: &PushCluster) -> Vec<PodDisruptionBudget> {
    COMPONENTS
        .iter()
        .map(|c| PodDisruptionBudget {
            metadata: meta(pc, name(pc, c), Some(c)),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(
                    if *c == "message" && super::embedded(pc) {
                        0
                    } else {
                        1
                    },
                )),
                selector: Some(match_labels(pc, c)),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        })
        .collect()
}
