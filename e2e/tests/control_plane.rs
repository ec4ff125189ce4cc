//! Control-plane e2e (envtest style): a real API server, the operator out of
//! cluster, no pods needed. Works on kind too (pods simply are not awaited).
//! Skips with a message when no cluster answers.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use push_operator::children::{desired, Child, MANAGER};
use push_operator::crd::PushCluster;
use pushcluster_e2e::{
    cluster, example, has_ready_nodes, install_crd, wait, Operator, TestNamespace,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

async fn child_versions(
    client: &Client,
    pc: &PushCluster,
) -> anyhow::Result<BTreeMap<String, String>> {
    let ns = pc.namespace().unwrap_or_default();
    let mut out = BTreeMap::new();
    for c in desired(pc, &Default::default())? {
        // Comets renew their Leases every second: not the operator's writes.
        if matches!(c, Child::Lease(_)) {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &c.resource());
        let o = api.get(&c.name()).await?;
        // Workloads and PDBs get status updates once pods run (each bumps
        // the resourceVersion); their generation moves only with the spec.
        // Shard EndpointSlices: their holders write the endpoints, so only
        // the operator's own entry in managedFields tells its writes.
        let version = if matches!(c, Child::EndpointSlice(_)) {
            let mine = o
                .metadata
                .managed_fields
                .iter()
                .flatten()
                .find(|m| m.manager.as_deref() == Some(MANAGER));
            format!(
                "applied {:?}",
                mine.and_then(|m| m.time.as_ref()).map(|t| t.0)
            )
        } else {
            match o.metadata.generation {
                Some(g) => format!("generation {g}"),
                None => o.resource_version().unwrap_or_default(),
            }
        };
        out.insert(c.describe(), version);
    }
    Ok(out)
}

#[tokio::test]
async fn operator_against_a_real_api_server() -> anyhow::Result<()> {
    let Some(client) = cluster().await else {
        return Ok(());
    };
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "cp").await?;
    let pcs: Api<PushCluster> = Api::namespaced(client.clone(), &ns.name);

    // CEL rules are enforced by the API server itself.
    let bad: PushCluster = serde_json::from_value(example("pushcluster-invalid.yaml")?)?;
    let err = pcs
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("invalid spec accepted");
    let msg = err.to_string();
    assert!(msg.contains("renewDeadlineSeconds must be below"), "{msg}");
    assert!(msg.contains("exactly one of storage.redis.url"), "{msg}");
    println!("ok: invalid PushCluster rejected: {msg}");

    let _operator = Operator::start(&ns.name)?;
    let created = pcs
        .create(
            &PostParams::default(),
            &serde_json::from_value(example("pushcluster-minimal.yaml")?)?,
        )
        .await?;
    let name = created.name_any();

    // Every child the operator describes exists, owned by the PushCluster.
    wait("every child object", LIMIT, || async {
        let pc = pcs.get(&name).await?;
        Ok(child_versions(&client, &pc).await.is_ok())
    })
    .await?;
    let pc = pcs.get(&name).await?;
    for c in desired(&pc, &Default::default())? {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &c.resource());
        let o = api.get(&c.name()).await?;
        let owner = o
            .owner_references()
            .first()
            .cloned()
            .expect("owner reference");
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("PushCluster", pc.uid().unwrap_or_default().as_str())
        );
        println!("  {}", c.describe());
    }

    // Storage cannot switch kind on a live cluster (a CEL transition rule).
    let err = pcs
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"storage": {"redis": {"url": "redis://r:6379"}}}})),
        )
        .await
        .expect_err("switching to Redis accepted");
    assert!(
        err.to_string()
            .contains("storage cannot switch between redis and embedded"),
        "{err}"
    );
    println!("ok: switching storage kind refused: {err}");

    // Status: observedGeneration and the four conditions.
    wait("status with observedGeneration", LIMIT, || async {
        let pc = pcs.get(&name).await?;
        Ok(pc.status.as_ref().is_some_and(|s| {
            s.observed_generation == pc.metadata.generation
                && s.conditions.len() == 4
                && s.shards.len() == 2
        }))
    })
    .await?;

    // A no-op reconcile (triggered by a metadata change) writes nothing.
    let before = child_versions(&client, &pcs.get(&name).await?).await?;
    pcs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"e2e/touch": "1"}}})),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = child_versions(&client, &pcs.get(&name).await?).await?;
    assert_eq!(before, after, "a no-op reconcile changed a child");
    println!(
        "ok: no-op reconcile left {} resourceVersions unchanged",
        after.len()
    );

    // A deleted child comes back; an edited one is repaired.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    services
        .delete(&format!("{name}-comet-0"), &DeleteParams::default())
        .await?;
    wait(
        "the deleted shard Service to be recreated",
        LIMIT,
        || async {
            Ok(services
                .get_opt(&format!("{name}-comet-0"))
                .await?
                .is_some_and(|s| s.metadata.deletion_timestamp.is_none()))
        },
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    deployments
        .patch(
            &format!("{name}-web"),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await?;
    wait(
        "the edited web Deployment to be repaired",
        LIMIT,
        || async {
            Ok(deployments
                .get(&format!("{name}-web"))
                .await?
                .spec
                .and_then(|s| s.replicas)
                == Some(2))
        },
    )
    .await?;

    // Shard count changes add and remove per-shard Services and Leases.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    // Without nodes nobody takes the shard Leases: the test plays the comets.
    // With nodes the real comets hold them.
    let pods_run = has_ready_nodes(&client).await;
    for k in 0..3 {
        if pods_run {
            break;
        }
        // The operator made the Leases of shards 0 and 1 (without a
        // holder); shard 2's comes with the reshard.
        let spec = json!({"holderIdentity": format!("comet-{k}"), "leaseDurationSeconds": 6, "leaseTransitions": 1});
        let lease_name = format!("{name}-comet-{k}");
        if leases.get_opt(&lease_name).await?.is_some() {
            leases
                .patch(
                    &lease_name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": spec})),
                )
                .await?;
        } else {
            let l: Lease = serde_json::from_value(json!({
                "metadata": {"name": lease_name, "labels": {"pushcluster.io/cluster": name, "pushcluster.io/shard": k.to_string()}},
                "spec": spec
            }))?;
            leases.create(&PostParams::default(), &l).await?;
        }
    }
    pcs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"comet": {"shards": 3}}})),
    )
    .await?;
    wait("Service for shard 2", LIMIT, || async {
        Ok(services
            .get_opt(&format!("{name}-comet-2"))
            .await?
            .is_some())
    })
    .await?;
    pcs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"comet": {"shards": 1}}})),
    )
    .await?;
    wait(
        "Services and Leases of shards 1 and 2 to be gone",
        LIMIT,
        || async {
            let mut gone = true;
            for k in 1..3 {
                gone &= services
                    .get_opt(&format!("{name}-comet-{k}"))
                    .await?
                    .is_none();
                gone &= leases
                    .get_opt(&format!("{name}-comet-{k}"))
                    .await?
                    .is_none();
            }
            Ok(gone && leases.get_opt(&format!("{name}-comet-0")).await?.is_some())
        },
    )
    .await?;
    wait("status to show one shard", LIMIT, || async {
        let pc = pcs.get(&name).await?;
        Ok(pc.status.is_some_and(|s| {
            s.shards.len() == 1
                && match s.shards[0].holder.as_deref() {
                    Some(h) if pods_run => !h.is_empty(),
                    h => h == Some("comet-0"),
                }
        }))
    })
    .await?;
    // Secure by default: a generated Secret owned by the PushCluster; a
    // deleted key is generated again (rotation), the others are kept, and
    // the pods that read it roll.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let creds = format!("{name}-credentials");
    let before = secrets.get(&creds).await?;
    let data = before.data.clone().unwrap_or_default();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["admin-token", "rpc-token", "subscriber-secret"]
    );
    assert!(data.values().all(|v| v.0.len() == 64));
    assert_eq!(before.owner_references()[0].kind, "PushCluster");
    let template_hash = |d: Deployment| {
        d.spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("pushcluster.io/config-hash").cloned())
    };
    let web_hash = template_hash(deployments.get(&format!("{name}-web")).await?);
    let comet_hash = template_hash(deployments.get(&format!("{name}-comet")).await?);
    secrets
        .patch(
            &creds,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(
                json!([{"op": "remove", "path": "/data/admin-token"}]),
            )?),
        )
        .await?;
    wait("the admin token to be generated again", LIMIT, || async {
        Ok(secrets
            .get(&creds)
            .await?
            .data
            .is_some_and(|d| d.contains_key("admin-token")))
    })
    .await?;
    let after = secrets.get(&creds).await?.data.unwrap_or_default();
    assert_ne!(after["admin-token"], data["admin-token"], "rotated");
    assert_eq!(after["rpc-token"], data["rpc-token"], "kept");
    assert_eq!(
        after["subscriber-secret"], data["subscriber-secret"],
        "kept"
    );
    wait("web to roll with the new admin token", LIMIT, || async {
        Ok(template_hash(deployments.get(&format!("{name}-web")).await?) != web_hash)
    })
    .await?;
    assert_eq!(
        template_hash(deployments.get(&format!("{name}-comet")).await?),
        comet_hash,
        "comets never read the admin token"
    );
    println!("ok: generated credentials; deleting admin-token rotated it and rolled web only");
    println!("control-plane e2e passed in namespace {}", ns.name);
    ns.delete().await?;
    Ok(())
}
