//! Marks each shard's Lease holder: the operator labels the holder pod
//! `pushcluster.io/shard=<k>` (with a high pod-deletion cost, so a rollout
//! removes standbys first) and unlabels pods that hold nothing. Routing does
//! not wait for it: web routes by Lease holder, and the per-shard Services
//! follow the EndpointSlice each holder writes itself (see the lease crate's
//! `shard_slice`), so a failover needs no running operator. Comets, which
//! face the internet, may patch no pod at all. Only holder changes act:
//! renewals, which rewrite the Lease every second, cost a comparison.

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use pushcluster_lease::kubernetes::{PodLabeler, SHARD_LABEL};
use std::collections::{BTreeMap, BTreeSet};
use tokio_util::sync::CancellationToken;

/// The label changes that make `have` (every comet pod and its shard label)
/// match `want` (holder pod to shard): `None` removes the label. Pods not in
/// `have` (gone) are skipped.
pub fn label_changes(
    want: &BTreeMap<String, u32>,
    have: &BTreeMap<String, Option<u32>>,
) -> Vec<(String, Option<u32>)> {
    have.iter()
        .filter_map(|(pod, label)| {
            let should = want.get(pod).copied();
            (should != *label).then(|| (pod.clone(), should))
        })
        .collect()
}

/// A shard Lease of a PushCluster: (shard, holder pod or "").
fn shard_lease(l: &Lease) -> Option<(u32, String)> {
    let owned = l.owner_references().iter().any(|o| o.kind == "PushCluster");
    let shard = l.labels().get(SHARD_LABEL)?.parse().ok()?;
    owned.then(|| {
        let holder = l
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        (shard, holder)
    })
}

type LeaseKey = (String, String);

/// Follows shard Leases (in `namespace`, or all) until `cancel`.
pub async fn run(client: Client, namespace: Option<String>, cancel: CancellationToken) {
    let leases: Api<Lease> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let cfg = watcher::Config::default().labels(SHARD_LABEL);
    let mut events = watcher::watcher(leases, cfg).boxed();
    // (namespace, lease) -> (shard, holder)
    let mut held: BTreeMap<LeaseKey, (u32, String)> = BTreeMap::new();
    let mut initial: BTreeMap<LeaseKey, (u32, String)> = BTreeMap::new();
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = events.next() => match ev {
                Some(ev) => ev,
                None => return,
            },
        };
        let mut dirty = BTreeSet::new();
        match ev {
            Err(e) => {
                tracing::warn!(error = %e, "shard lease watch failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Ok(Event::Init) => initial.clear(),
            Ok(Event::InitApply(l)) => {
                if let Some(v) = shard_lease(&l) {
                    initial.insert((l.namespace().unwrap_or_default(), l.name_any()), v);
                }
            }
            Ok(Event::InitDone) => {
                held = std::mem::take(&mut initial);
                dirty.extend(held.keys().map(|(ns, _)| ns.clone()));
            }
            Ok(Event::Apply(l)) => {
                let key = (l.namespace().unwrap_or_default(), l.name_any());
                if let Some(v) = shard_lease(&l) {
                    if held.get(&key) != Some(&v) {
                        dirty.insert(key.0.clone());
                        held.insert(key, v);
                    }
                }
            }
            Ok(Event::Delete(l)) => {
                let key = (l.namespace().unwrap_or_default(), l.name_any());
                if held.remove(&key).is_some() {
                    dirty.insert(key.0);
                }
            }
        }
        for ns in dirty {
            if let Err(e) = relabel(&client, &ns, &held).await {
                tracing::warn!(namespace = %ns, error = %e, "cannot label shard holders");
            }
        }
    }
}

/// Makes the comet pods' shard labels in `ns` match the Lease holders.
async fn relabel(
    client: &Client,
    ns: &str,
    held: &BTreeMap<LeaseKey, (u32, String)>,
) -> Result<(), pushcluster_lease::Error> {
    let want: BTreeMap<String, u32> = held
        .iter()
        .filter(|((n, _), (_, holder))| n == ns && !holder.is_empty())
        .map(|(_, (shard, holder))| (holder.clone(), *shard))
        .collect();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let comets = ListParams::default().labels(&crate::children::comets_query());
    let have: BTreeMap<String, Option<u32>> = pods
        .list(&comets)
        .await?
        .items
        .iter()
        .map(|p| {
            let label = p.labels().get(SHARD_LABEL).and_then(|v| v.parse().ok());
            (p.name_any(), label)
        })
        .collect();
    for (pod, shard) in label_changes(&want, &have) {
        tracing::info!(namespace = %ns, %pod, ?shard, "labelling shard holder");
        if let Err(e) = PodLabeler::new(pods.clone(), &pod).set_shard(shard).await {
            tracing::warn!(%pod, error = %e, "cannot label pod");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_get_their_shard_and_everyone_else_loses_it() {
        let want = BTreeMap::from([("a".to_owned(), 0), ("b".to_owned(), 1)]);
        let have = BTreeMap::from([
            ("a".to_owned(), Some(0)), // right already
            ("b".to_owned(), None),    // new holder
            ("c".to_owned(), Some(1)), // stepped down
            ("d".to_owned(), None),    // standby
        ]);
        assert_eq!(
            label_changes(&want, &have),
            vec![("b".to_owned(), Some(1)), ("c".to_owned(), None)]
        );
        // A holder whose pod is gone is skipped; nothing held: all unlabelled.
        let gone = BTreeMap::from([("z".to_owned(), 0)]);
        assert_eq!(label_changes(&gone, &BTreeMap::new()), vec![]);
        let none = BTreeMap::new();
        assert_eq!(
            label_changes(&none, &BTreeMap::from([("a".to_owned(), Some(3))])),
            vec![("a".to_owned(), None)]
        );
    }
}
