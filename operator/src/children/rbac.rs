//! ServiceAccounts, Roles and RoleBindings: least privilege per component.

use super::{meta, name, COMPONENTS};
use crate::crd::PushCluster;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;

/// A ServiceAccount per component; the message service's mounts no token.
pub fn service_accounts(pc: &PushCluster) -> Vec<ServiceAccount> {
    COMPONENTS
        .iter()
        .map(|c| ServiceAccount {
            metadata: meta(pc, name(pc, c), Some(c)),
            automount_service_account_token: Some(*c != "message"),
            ..ServiceAccount::default()
        })
        .collect()
}

fn rule(group: &str, resource: &str, verbs: &[&str], names: Option<Vec<String>>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        resource_names: names,
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// Least-privilege Roles: comets read Leases and EndpointSlices and may
/// write (get, update) only their own cluster's shard Leases, by name; they
/// create nothing and patch no pod. Web only reads Leases and EndpointSlices;
/// the message service needs no API access at all.
pub fn roles(pc: &PushCluster) -> Vec<Role> {
    let read = ["get", "list", "watch"];
    let slices = rule("discovery.k8s.io", "endpointslices", &read, None);
    let own_leases: Vec<String> = (0..pc.spec.comet.shards.max(1))
        .map(|k| pushcluster_lease::kubernetes::lease_name(&pc.name_any(), k as u32))
        .collect();
    let shard_slices: Vec<String> = own_leases
        .iter()
        .cloned()
        .chain(
            super::listeners::endpoint_slices(pc)
                .iter()
                .map(|s| s.name_any()),
        )
        .collect();
    let leases = "coordination.k8s.io";
    vec![
        Role {
            metadata: meta(pc, name(pc, "comet"), Some("comet")),
            rules: Some(vec![
                // Listing and watching cannot be limited by name; Leases hold
                // no secrets. Writes are limited to this cluster's shards.
                rule(leases, "leases", &["list", "watch"], None),
                rule(
                    leases,
                    "leases",
                    &["get", "update"],
                    Some(own_leases.clone()),
                ),
                slices.clone(),
                // The shard slices share the Leases' names: a holder writes
                // its address into its own shard's, and into its shard's
                // slice of each Service listener (see shard_slice in the
                // lease crate); the operator makes them.
                rule(
                    "discovery.k8s.io",
                    "endpointslices",
                    &["get", "patch"],
                    Some(shard_slices),
                ),
            ]),
        },
        Role {
            metadata: meta(pc, name(pc, "web"), Some("web")),
            rules: Some(vec![rule(leases, "leases", &read, None), slices]),
        },
    ]
}

/// RoleBindings of the comet and web Roles to their ServiceAccounts.
pub fn role_bindings(pc: &PushCluster) -> Vec<RoleBinding> {
    ["comet", "web"]
        .iter()
        .map(|c| RoleBinding {
            metadata: meta(pc, name(pc, c), Some(c)),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name(pc, c),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name(pc, c),
                namespace: pc.namespace(),
                ..Subject::default()
            }]),
        })
        .collect()
}
