//! The holder puts itself behind its shard's Service: it writes its own pod
//! address into the EndpointSlice `<cluster>-comet-<k>` of the selector-less
//! per-shard Service the moment it takes the shard's Lease. Anything that
//! reaches a shard by name (a load balancer or Ingress per shard, which is
//! what advertised addresses point at) so follows the Lease holder with no
//! operator in the loop: relabelling pods took one operator round trip,
//! and none at all while the operator was down.
//!
//! The same goes for the per-shard Services of the PushCluster's listeners
//! (`<listener service>-<k>`, also selector-less): the holder writes each.
//!
//! The operator makes each slice (owned by the PushCluster, with the
//! Service's ports and no endpoints), so a comet needs only get and patch on
//! these names. Every write carries the resourceVersion it read, and only a
//! holder writes: a holder that steps down withdraws its address only while
//! the slice still names it, so it never erases its successor's.

use crate::owner::Ownership;
use crate::Result;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a holder checks that its slice still names it (repairs a
/// slice the operator made again, or one written over by hand).
const RECHECK: Duration = Duration::from_secs(30);

/// Who this comet is, as its shard's slice lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    /// Pod name (the endpoint's targetRef).
    pub pod: String,
    /// Pod IP.
    pub ip: String,
}

/// The `endpoints` of shard slice naming `me`, ready.
pub fn endpoints_of(me: &Me, namespace: &str) -> Value {
    json!([{
        "addresses": [me.ip],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "targetRef": {"kind": "Pod", "namespace": namespace, "name": me.pod},
    }])
}

/// Whether `slice` already lists exactly `me`, ready.
pub fn names_only(slice: &EndpointSlice, me: &Me) -> bool {
    match slice.endpoints.as_slice() {
        [e] => {
            e.addresses == [me.ip.clone()]
                && e.conditions.as_ref().and_then(|c| c.ready) != Some(false)
                && e.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(me.pod.as_str())
        }
        _ => false,
    }
}

/// Whether `slice` lists `me` at all.
pub fn names(slice: &EndpointSlice, me: &Me) -> bool {
    slice.endpoints.iter().any(|e| e.addresses.contains(&me.ip))
}

/// Writes this comet's address into its shard's slice while it holds the
/// shard.
pub struct ShardSlices {
    api: Api<EndpointSlice>,
    namespace: String,
    cluster: String,
    me: Me,
    /// Name prefixes of further per-shard Services (`<prefix>-<k>`).
    services: Vec<String>,
}

impl ShardSlices {
    /// The slices of `cluster` in `namespace`, for the pod `me`.
    pub fn new(api: Api<EndpointSlice>, namespace: &str, cluster: &str, me: Me) -> Self {
        Self {
            api,
            namespace: namespace.to_owned(),
            cluster: cluster.to_owned(),
            me,
            services: Vec::new(),
        }
    }

    /// Also writes the slices `<prefix>-<k>` of `services`.
    pub fn with_services(mut self, services: &[String]) -> Self {
        self.services = services.to_vec();
        self
    }

    /// The slices of `shard`: its own Service's first (what web and the
    /// advertised addresses use), then the listeners'.
    fn names(&self, shard: u32) -> Vec<String> {
        std::iter::once(crate::kubernetes::lease_name(&self.cluster, shard))
            .chain(self.services.iter().map(|p| format!("{p}-{shard}")))
            .collect()
    }

    /// Replaces the slice's endpoints with `endpoints`, on the version read.
    async fn write(&self, name: &str, version: Option<String>, endpoints: Value) -> Result<()> {
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "endpoints": endpoints,
        });
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Makes the slices of `shard` name this comet alone; says whether it
    /// wrote any. Every slice is tried; the first error is returned.
    pub async fn publish(&self, shard: u32) -> Result<bool> {
        let mut results = Vec::new();
        for name in self.names(shard) {
            results.push(self.publish_one(&name).await);
        }
        combine(results)
    }

    async fn publish_one(&self, name: &str) -> Result<bool> {
        let slice = self.api.get(name).await?;
        if names_only(&slice, &self.me) {
            return Ok(false);
        }
        let endpoints = endpoints_of(&self.me, &self.namespace);
        self.write(name, slice.metadata.resource_version, endpoints)
            .await?;
        Ok(true)
    }

    /// Empties the slices of `shard` that still name this comet (a
    /// successor may have written one already: then it is left alone).
    pub async fn withdraw(&self, shard: u32) -> Result<bool> {
        let mut results = Vec::new();
        for name in self.names(shard) {
            results.push(self.withdraw_one(&name).await);
        }
        combine(results)
    }

    async fn withdraw_one(&self, name: &str) -> Result<bool> {
        let slice = self.api.get(name).await?;
        if !names(&slice, &self.me) {
            return Ok(false);
        }
        self.write(name, slice.metadata.resource_version, json!([]))
            .await?;
        Ok(true)
    }

    /// Follows `ownership` until `cancel`: publishes on taking a shard
    /// (retrying every `retry` until it lands), rechecks while holding,
    /// withdraws on stepping down.
    pub async fn run(
        self,
        mut ownership: watch::Receiver<Ownership>,
        retry: Duration,
        cancel: CancellationToken,
    ) {
        let mut current: Option<u32> = None;
        let mut next = tokio::time::Instant::now();
        loop {
            let want = ownership.borrow_and_update().shard();
            if want != current {
                if let Some(old) = current {
                    match self.withdraw(old).await {
                        Ok(true) => {
                            tracing::info!(shard = old, "withdrew from the shard's EndpointSlice")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(shard = old, error = %e, "cannot withdraw from the shard's EndpointSlice")
                        }
                    }
                }
                current = want;
                next = tokio::time::Instant::now();
            }
            if let Some(k) = current {
                if tokio::time::Instant::now() >= next {
                    next = match self.publish(k).await {
                        Ok(wrote) => {
                            if wrote {
                                tracing::info!(shard = k, ip = %self.me.ip, "in the shard's EndpointSlice");
                            }
                            tokio::time::Instant::now() + RECHECK
                        }
                        Err(e) => {
                            tracing::warn!(shard = k, error = %e, "cannot write the shard's EndpointSlice");
                            tokio::time::Instant::now() + retry
                        }
                    };
                }
            }
            tokio::select! {
                r = ownership.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(next), if current.is_some() => {}
                _ = cancel.cancelled() => break,
            }
        }
    }
}

/// Whether any write happened, or the first error of `results`.
fn combine(results: Vec<Result<bool>>) -> Result<bool> {
    let mut wrote = false;
    for r in results {
        wrote |= r?;
    }
    Ok(wrote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(pod: &str, ip: &str) -> Me {
        Me {
            pod: pod.into(),
            ip: ip.into(),
        }
    }

    fn slice(endpoints: Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "push-comet-0", "resourceVersion": "7"},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn a_slice_names_its_holder_alone_and_ready() {
        let a = me("comet-a", "10.0.0.1");
        let mine = slice(endpoints_of(&a, "ns"));
        assert!(names_only(&mine, &a));
        assert!(names(&mine, &a));
        let b = me("comet-b", "10.0.0.2");
        assert!(!names_only(&mine, &b) && !names(&mine, &b));
        assert!(!names_only(&slice(json!([])), &a));
        let unready = slice(
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "comet-a"}}]),
        );
        assert!(!names_only(&unready, &a) && names(&unready, &a));
        let both = slice(json!([
            {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "comet-a"}},
            {"addresses": ["10.0.0.2"], "targetRef": {"kind": "Pod", "name": "comet-b"}}
        ]));
        assert!(!names_only(&both, &a) && names(&both, &b));
        // The same address under another pod's name: a replaced pod that
        // reused the IP is not this one.
        let reused = slice(endpoints_of(&me("comet-old", "10.0.0.1"), "ns"));
        assert!(!names_only(&reused, &a));
    }
}
