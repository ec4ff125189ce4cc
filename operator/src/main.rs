//! `push-operator`: runs the PushCluster controller.

use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client};
use push_operator::controller::{error_policy, reconcile, Context, Metrics};
use push_operator::crd::PushCluster;
use pushcluster_core::ops::{cancel_on_signal, init_tracing, serve_ops, Readiness};
use pushcluster_lease::kubernetes::KubeLeases;
use pushcluster_lease::owner::{Ownership, ShardOwner};
use pushcluster_lease::{Candidate, LeaseTiming};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// pushcluster operator: turns each PushCluster resource into a running push
/// cluster (Deployments, Services, RBAC, PDBs) and reports its status.
///
/// Runs in a cluster with its ServiceAccount, or from a laptop against the
/// cluster of $KUBECONFIG (`push-operator run`).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the controller until SIGTERM.
    Run {
        /// Listen address of /metrics, /healthz and /readyz.
        #[arg(long, env = "PUSH_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "PUSH_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
        /// Namespace of the leader-election Lease (default: POD_NAMESPACE, then the client's).
        #[arg(long, env = "POD_NAMESPACE")]
        lease_namespace: Option<String>,
        /// Run without leader election (one replica only).
        #[arg(long)]
        no_leader_election: bool,
        /// Log as JSON lines.
        #[arg(long, env = "PUSH_LOG_JSON")]
        log_json: bool,
    },
    /// Print the CustomResourceDefinition as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Crd => print!("{}", push_operator::crd::crd_yaml()?),
        Cmd::Run {
            listen,
            namespace,
            lease_namespace,
            no_leader_election,
            log_json,
        } => {
            init_tracing(log_json);
            run(listen, namespace, lease_namespace, no_leader_election).await?;
        }
    }
    Ok(())
}

async fn run(
    listen: SocketAddr,
    namespace: Option<String>,
    lease_namespace: Option<String>,
    no_leader_election: bool,
) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let mut reg = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut reg);
    let ready = Readiness::default();
    let ops = tokio::spawn(serve_ops(
        listen,
        Arc::new(reg),
        ready.clone(),
        cancel.clone(),
    ));
    // Ready means healthy and able to lead at once, not "leading": a standby
    // replica is Ready too, so the Deployment becomes Available and `helm
    // install --wait` finishes. Only the leader reconciles.
    ready.set(true);

    // Leader election: one Lease, taken and renewed by the same state machine
    // the comets use. Losing it ends the process; Kubernetes restarts it as a
    // standby, which is simpler and safer than stopping a controller midway.
    let leader_cancel = CancellationToken::new();
    if !no_leader_election {
        let ns = lease_namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        let leases = Arc::new(KubeLeases::with_prefix(
            Api::namespaced(client.clone(), &ns),
            "pushcluster-operator",
            "pushcluster-operator-leader",
        ));
        leases.spawn_watcher(cancel.clone());
        let me = Candidate {
            holder: std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("push-operator-{}", std::process::id())),
            rpc: String::new(),
            ws: String::new(),
            tcp: String::new(),
        };
        let timing = LeaseTiming {
            duration_ms: 15_000,
            renew_deadline_ms: 10_000,
            retry_period_ms: 2_000,
        };
        let (owner, mut rx) = ShardOwner::new(leases, me, 1, None, timing);
        tokio::spawn(owner.run(leader_cancel.clone()));
        tracing::info!(namespace = %ns, "waiting to become the leader");
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = rx.wait_for(|o| *o != Ownership::Standby) => { r?; }
        }
        tracing::info!("leading");
        let lost = cancel.clone();
        tokio::spawn(async move {
            if rx.wait_for(|o| *o == Ownership::Standby).await.is_ok() && !lost.is_cancelled() {
                tracing::error!("lost the leader lease: exiting");
                std::process::exit(1);
            }
        });
    }

    let pcs: Api<PushCluster> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    macro_rules! owned {
        ($k:ty) => {
            match &namespace {
                Some(ns) => Api::<$k>::namespaced(client.clone(), ns),
                None => Api::<$k>::all(client.clone()),
            }
        };
    }
    let holders = tokio::spawn(push_operator::holders::run(
        client.clone(),
        namespace.clone(),
        cancel.clone(),
    ));
    let ctx = Context::new(client.clone(), metrics);
    let gone = ctx.clone();
    let cfg = watcher::Config::default().any_semantic();
    let owned_cfg = watcher::Config::default().labels(&push_operator::children::managed_query());
    let stop = cancel.clone();
    Controller::new(pcs, cfg)
        .owns(owned!(Deployment), owned_cfg.clone())
        .owns(owned!(StatefulSet), owned_cfg.clone())
        .owns(owned!(Service), owned_cfg.clone())
        .owns(owned!(ConfigMap), owned_cfg.clone())
        .owns(owned!(ServiceAccount), owned_cfg.clone())
        .owns(owned!(Role), owned_cfg.clone())
        .owns(owned!(RoleBinding), owned_cfg.clone())
        .owns(owned!(PodDisruptionBudget), owned_cfg.clone())
        .owns(owned!(NetworkPolicy), owned_cfg.clone())
        .owns(owned!(Ingress), owned_cfg)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            // A PushCluster deleted (its children's deletions still ask
            // for it) takes its degraded series with it: no finalizer
            // would tell otherwise, and a stale 1 would keep alerting.
            if let Err(kube::runtime::controller::Error::ObjectNotFound(obj)) = &r {
                gone.metrics.set_degraded(
                    obj.namespace.as_deref().unwrap_or_default(),
                    &obj.name,
                    None,
                );
            }
            async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "reconcile result");
                }
            }
        })
        .await;
    ready.set(false);
    let _ = holders.await;
    leader_cancel.cancel();
    cancel.cancel();
    let _ = ops.await;
    tracing::info!("operator stopped");
    Ok(())
}
