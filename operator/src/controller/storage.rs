//! Settles the access mode of the embedded store's claim.
//!
//! `ReadWriteOncePod` is the safer claim: the volume is mounted by one pod,
//! so even a second message pod on the same node (a hand-made one, or a
//! forced delete racing its replacement) cannot open the store. But only CSI
//! drivers support it (a claim of another provisioner stays Pending) and only
//! API servers from 1.27 on have it on by default. So without an explicit
//! `storage.embedded.accessMode` the operator picks it only where it can see
//! both: the server's version, and a CSIDriver object named like the claim's
//! StorageClass provisioner. Reading StorageClasses and CSIDrivers takes
//! cluster-wide rights, which an operator watching one namespace does not
//! have: it then picks `ReadWriteOnce`, which works everywhere.
//!
//! A StatefulSet's claim templates are immutable, so the mode is decided
//! once: a live StatefulSet keeps whatever mode it was created with, even if
//! the cluster's support changes later.

use super::Context;
use crate::children;
use crate::crd::{ClaimAccessMode, PushCluster};
use crate::Result;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use kube::api::{Api, ListParams};

/// Annotation that marks a cluster's default StorageClass.
const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";

/// What the choice depends on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Support {
    /// The live StatefulSet's claim access mode, when it exists.
    pub existing: Option<String>,
    /// The API server's `(major, minor)`, when it said.
    pub server: Option<(u32, u32)>,
    /// Whether the claim's StorageClass provisioner is a registered CSI
    /// driver (`None`: could not tell).
    pub csi: Option<bool>,
}

/// The claim's access mode: the live one, else the spec's, else
/// `ReadWriteOncePod` where supported.
/// The first Kubernetes release with `ReadWriteOncePod` on by default (GA).
const ONCE_POD_SINCE: (u32, u32) = (1, 27);

pub fn choose(spec: Option<ClaimAccessMode>, support: &Support) -> ClaimAccessMode {
    match support.existing.as_deref() {
        Some("ReadWriteOncePod") => return ClaimAccessMode::ReadWriteOncePod,
        Some(_) => return ClaimAccessMode::ReadWriteOnce,
        None => {}
    }
    if let Some(mode) = spec {
        return mode;
    }
    let new_enough = support.server.is_some_and(|v| v >= ONCE_POD_SINCE);
    if new_enough && support.csi == Some(true) {
        ClaimAccessMode::ReadWriteOncePod
    } else {
        ClaimAccessMode::ReadWriteOnce
    }
}

/// `"1"`, `"28+"` → `(1, 28)`: managed clusters append `+` to the minor.
/// A server built from source without version stamps says neither (its
/// gitVersion is `v0.0.0-master+<commit>`): that is the newest code there
/// is, so it counts as newer than any release.
pub fn parse_version(major: &str, minor: &str, git_version: &str) -> Option<(u32, u32)> {
    let num = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
    };
    if major.is_empty() && minor.is_empty() && git_version.starts_with("v0.0.0-") {
        return Some((u32::MAX, 0));
    }
    Some((num(major)?, num(minor)?))
}

/// Reads what [`choose`] needs, asking only what the answer depends on.
pub async fn support(pc: &PushCluster, ctx: &Context, ns: &str) -> Result<Support> {
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let existing = sts
        .get_opt(&children::name(pc, "message"))
        .await?
        .and_then(|s| s.spec)
        .and_then(|s| s.volume_claim_templates)
        .and_then(|t| t.into_iter().next())
        .and_then(|c| c.spec)
        .and_then(|s| s.access_modes)
        .and_then(|m| m.into_iter().next());
    let mut out = Support {
        existing,
        ..Support::default()
    };
    if out.existing.is_some() || pc.spec.storage.embedded.access_mode.is_some() {
        return Ok(out);
    }
    out.server = match ctx.client.apiserver_version().await {
        Ok(info) => parse_version(&info.major, &info.minor, &info.git_version),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the API server's version");
            None
        }
    };
    if out.server.is_some_and(|v| v >= ONCE_POD_SINCE) {
        out.csi = csi_backed(pc, ctx).await;
    }
    Ok(out)
}

/// Whether the claim's StorageClass (named, or the cluster's default) is
/// provisioned by a registered CSI driver; `None` when that cannot be read.
async fn csi_backed(pc: &PushCluster, ctx: &Context) -> Option<bool> {
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    let class = match &pc.spec.storage.embedded.storage_class_name {
        Some(name) => classes.get_opt(name).await.ok()?,
        None => classes
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|c| {
                c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS))
                    .is_some_and(|v| v == "true")
            }),
    };
    let Some(class) = class else {
        return Some(false);
    };
    let drivers: Api<CSIDriver> = Api::all(ctx.client.clone());
    match drivers.get_opt(&class.provisioner).await {
        Ok(d) => Some(d.is_some()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read CSIDrivers");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClaimAccessMode::{ReadWriteOnce as Rwo, ReadWriteOncePod as Rwop};

    fn support(existing: Option<&str>, server: Option<(u32, u32)>, csi: Option<bool>) -> Support {
        Support {
            existing: existing.map(str::to_owned),
            server,
            csi,
        }
    }

    #[test]
    fn a_live_claim_keeps_its_mode() {
        let s = support(Some("ReadWriteOnce"), Some((1, 30)), Some(true));
        assert_eq!(choose(None, &s), Rwo);
        assert_eq!(choose(Some(Rwop), &s), Rwo);
        let s = support(Some("ReadWriteOncePod"), None, None);
        assert_eq!(choose(Some(Rwo), &s), Rwop);
    }

    #[test]
    fn the_spec_decides_a_new_claim() {
        assert_eq!(choose(Some(Rwop), &Support::default()), Rwop);
        let s = support(None, Some((1, 30)), Some(true));
        assert_eq!(choose(Some(Rwo), &s), Rwo);
    }

    #[test]
    fn once_pod_only_where_server_and_driver_support_it() {
        assert_eq!(
            choose(None, &support(None, Some(ONCE_POD_SINCE), Some(true))),
            Rwop
        );
        assert_eq!(choose(None, &support(None, Some((2, 0)), Some(true))), Rwop);
        assert_eq!(choose(None, &support(None, Some((1, 26)), Some(true))), Rwo);
        assert_eq!(
            choose(None, &support(None, Some((1, 30)), Some(false))),
            Rwo
        );
        assert_eq!(choose(None, &support(None, Some((1, 30)), None)), Rwo);
        assert_eq!(choose(None, &support(None, None, Some(true))), Rwo);
    }

    #[test]
    fn versions_as_servers_spell_them() {
        assert_eq!(parse_version("1", "28", "v1.28.7"), Some((1, 28)));
        assert_eq!(parse_version("1", "29+", "v1.29.3-eks-1"), Some((1, 29)));
        assert_eq!(parse_version("1", "x", "v1.x"), None);
        assert_eq!(parse_version("", "", "weird"), None);
        // An unstamped build from source is newer than every release.
        let dev = parse_version("", "", "v0.0.0-master+c8dcb00be996");
        assert!(dev.is_some_and(|v| v >= ONCE_POD_SINCE));
    }
}
