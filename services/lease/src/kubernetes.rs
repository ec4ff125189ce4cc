//! Kubernetes leases: `coordination.k8s.io/v1` Lease `<cluster>-comet-<k>` per
//! shard (created by the operator, so a comet needs only get and update on
//! its cluster's Leases). The holder puts itself behind its shard's Service
//! by writing that Service's EndpointSlice ([`crate::shard_slice`]); the
//! operator labels holder pods `pushcluster.io/shard=<k>` only so rollouts
//! remove standbys first.
//!
//! Writes are optimistic: every update carries the resourceVersion last read,
//! and 409 Conflict means somebody else wrote first (we lost the race).
//! Expiry is judged as client-go's leader election does: by this process's
//! monotonic clock, from the moment it first observed the lease's current
//! holder and renewTime. A standby whose wall clock is off therefore never
//! takes over early; only clock *rate* drift matters, and the margin
//! `duration - renew_deadline` covers it. The holder's addresses ride along
//! as annotations, so comets can build the ring from leases alone.

use crate::{Candidate, Error, Held, LeaseBackend, LeaseRecord, Result};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Label with the PushCluster's name, on Leases, Services and EndpointSlices.
pub const CLUSTER_LABEL: &str = "pushcluster.io/cluster";
/// Label with the shard id, on Leases, per-shard Services and the holder pod.
pub const SHARD_LABEL: &str = "pushcluster.io/shard";
const ANN_RPC: &str = "pushcluster.io/rpc";
const ANN_WS: &str = "pushcluster.io/ws";
const ANN_TCP: &str = "pushcluster.io/tcp";

/// The PushCluster resource's apiVersion. Spelled here because the lease
/// crate sits below the operator (which defines the type); the operator's
/// tests check that the two agree.
pub const OWNER_API_VERSION: &str = "pushcluster.io/v1alpha1";
/// The PushCluster resource's kind; see [`OWNER_API_VERSION`].
pub const OWNER_KIND: &str = "PushCluster";

/// The reference that makes a PushCluster (name, uid) own a shard Lease.
pub fn push_cluster_owner(cluster: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: OWNER_API_VERSION.into(),
        kind: OWNER_KIND.into(),
        name: cluster.into(),
        uid: uid.into(),
        controller: None,
        block_owner_deletion: None,
    }
}

/// The fencing token of a Lease: its transitions count grows with every
/// change of holder, but restarts when the Lease is deleted and made again
/// (shards removed, then added back); its creation time orders those lives.
/// Creation seconds in the high bits, transitions (24 bits) below.
pub fn fencing_token(created_secs: u64, transitions: u64) -> u64 {
    (created_secs << 24) | transitions.min((1 << 24) - 1)
}

/// Name of shard `k`'s Lease (and Service) in cluster `cluster`.
pub fn lease_name(cluster: &str, shard: u32) -> String {
    format!("{cluster}-comet-{shard}")
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(Box::new(e))
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// What a lease says, for expiry by observation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    holder: String,
    renew: Option<String>,
}

fn observe(l: &Lease) -> Observed {
    let spec = l.spec.clone().unwrap_or_default();
    Observed {
        holder: spec.holder_identity.unwrap_or_default(),
        renew: spec.renew_time.map(|t| t.0.to_string()),
    }
}

/// Leases in one namespace.
pub struct KubeLeases {
    api: Api<Lease>,
    cluster: String,
    /// Lease names are `<prefix>-<k>`.
    prefix: String,
    /// Last Lease object seen per shard (for its resourceVersion).
    cache: Mutex<HashMap<u32, Lease>>,
    /// When each lease's current holder/renewTime was first observed here.
    observed: Mutex<HashMap<u32, (Observed, Instant)>>,
    /// The earliest expiry of a lease the last snapshot found held.
    next_expiry: Mutex<Option<Instant>>,
    /// A read failed (or hung) since the last good one: this process could
    /// not observe the leases, so it cannot tell whether they were renewed.
    blind: std::sync::atomic::AtomicBool,
    /// A takeover write of this process was refused (not a conflict) and no
    /// Lease has changed since: the API server is refusing or throttling
    /// writes, so a Lease that is not renewed shows that nobody can write
    /// it, not that its holder died. Takeovers then wait for proof: the
    /// holder's address not answering.
    writes_refused: std::sync::atomic::AtomicBool,
    events: crate::LeaseEvents,
    /// Owner of the Leases this process creates (the PushCluster), so they
    /// are garbage collected with it.
    owner: Option<OwnerReference>,
}

impl KubeLeases {
    /// Leases of `cluster` through `api` (namespaced).
    pub fn new(api: Api<Lease>, cluster: &str) -> Self {
        Self::with_prefix(api, cluster, &format!("{cluster}-comet"))
    }

    /// Leases named `<prefix>-<k>`, labelled with `cluster` (e.g. an
    /// operator's leader election: one lease, `<prefix>-0`).
    pub fn with_prefix(api: Api<Lease>, cluster: &str, prefix: &str) -> Self {
        Self {
            api,
            cluster: cluster.to_owned(),
            prefix: prefix.to_owned(),
            cache: Mutex::new(HashMap::new()),
            observed: Mutex::new(HashMap::new()),
            next_expiry: Mutex::new(None),
            blind: std::sync::atomic::AtomicBool::new(false),
            writes_refused: std::sync::atomic::AtomicBool::new(false),
            events: crate::LeaseEvents::default(),
            owner: None,
        }
    }

    /// Leases created (or taken over without an owner) get `owner`.
    pub fn owned_by(mut self, owner: Option<OwnerReference>) -> Self {
        self.owner = owner;
        self
    }

    /// Watches the cluster's Leases and wakes standbys on every change, so a
    /// released lease is taken at once rather than at the next retry; stops
    /// on `cancel`.
    pub fn spawn_watcher(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let api = self.api.clone();
        let announce = self.events.clone();
        let cfg = kube::runtime::watcher::Config::default()
            .labels(&format!("{CLUSTER_LABEL}={}", self.cluster));
        tokio::spawn(async move {
            let mut events = kube::runtime::watcher(api, cfg).boxed();
            while let Some(ev) = tokio::select! {
                _ = cancel.cancelled() => None,
                ev = events.next() => ev,
            } {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "lease watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                announce.notify();
            }
        })
    }

    /// Whether `l` is held by someone right now, judged by observation.
    fn valid(&self, shard: u32, l: &Lease) -> bool {
        self.expiry(shard, l).is_some()
    }

    /// When `l`'s holder's claim expires, judged by observation; `None`
    /// when it is free or expired already.
    fn expiry(&self, shard: u32, l: &Lease) -> Option<Instant> {
        let now = Instant::now();
        let o = observe(l);
        let mut seen = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        let since = match seen.get(&shard) {
            Some((prev, at)) if *prev == o => *at,
            prev => {
                if prev.is_some()
                    && self
                        .writes_refused
                        .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    // A write got through: writes work again. Every holder
                    // gets a whole lease from now to renew, as after an
                    // outage of reads.
                    tracing::info!(
                        "a Lease changed: writes are accepted again; observing every lease afresh"
                    );
                    seen.clear();
                }
                seen.insert(shard, (o.clone(), now));
                now
            }
        };
        let duration = l
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .unwrap_or(0)
            .max(0) as u64;
        let until = since + Duration::from_secs(duration);
        (!o.holder.is_empty() && now < until).then_some(until)
    }

    /// Takes the result of a read sent at `asked`. After reads failed or
    /// hung (the API server was away), a lease unchanged since before is no
    /// evidence of a dead holder: it could not renew either. Observation
    /// then starts again from now, so a standby does not take the lease of
    /// a holder that rode out the outage.
    fn read<T>(&self, asked: Instant, r: std::result::Result<T, kube::Error>) -> Result<T> {
        use std::sync::atomic::Ordering;
        match r {
            Err(e) => {
                self.blind.store(true, Ordering::SeqCst);
                Err(e.into())
            }
            Ok(v) => {
                if self.blind.swap(false, Ordering::SeqCst) || asked.elapsed() > BLIND_AFTER {
                    tracing::info!("lease reads failed or hung: observing every lease afresh");
                    self.observed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clear();
                }
                Ok(v)
            }
        }
    }

    fn refusing_writes(&self) -> bool {
        self.writes_refused
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn remember(&self, shard: u32, l: &Lease) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard, l.clone());
        self.observed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard, (observe(l), Instant::now()));
    }

    fn cached(&self, shard: u32) -> Option<Lease> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .cloned()
    }

    fn record(shard: u32, l: &Lease) -> LeaseRecord {
        let spec = l.spec.clone().unwrap_or_default();
        let created = l
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second().max(0) as u64);
        let transitions = spec.lease_transitions.unwrap_or(0).max(0) as u64;
        let ann = l.metadata.annotations.clone().unwrap_or_default();
        let get = |k: &str| ann.get(k).cloned().unwrap_or_default();
        LeaseRecord {
            shard,
            token: fencing_token(created, transitions),
            candidate: Candidate {
                holder: spec.holder_identity.unwrap_or_default(),
                rpc: get(ANN_RPC),
                ws: get(ANN_WS),
                tcp: get(ANN_TCP),
            },
        }
    }

    fn claim(&self, shard: u32, base: Option<Lease>, me: &Candidate, ttl: Duration) -> Lease {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let mut l = base.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(format!("{}-{shard}", self.prefix)),
                labels: Some(BTreeMap::from([
                    (CLUSTER_LABEL.to_owned(), self.cluster.clone()),
                    (SHARD_LABEL.to_owned(), shard.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec::default()),
        });
        if let Some(owner) = &self.owner {
            let refs = l.metadata.owner_references.get_or_insert_with(Vec::new);
            if !refs.iter().any(|r| r.uid == owner.uid) {
                refs.push(owner.clone());
            }
        }
        let ann = l.metadata.annotations.get_or_insert_with(BTreeMap::new);
        ann.insert(ANN_RPC.into(), me.rpc.clone());
        ann.insert(ANN_WS.into(), me.ws.clone());
        ann.insert(ANN_TCP.into(), me.tcp.clone());
        let spec = l.spec.get_or_insert_with(LeaseSpec::default);
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.holder_identity = Some(me.holder.clone());
        spec.lease_duration_seconds = Some(ttl.as_secs().max(1) as i32);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        l
    }
}

impl LeaseBackend for KubeLeases {
    async fn try_acquire(&self, shard: u32, me: &Candidate, ttl: Duration) -> Result<Option<Held>> {
        let name = format!("{}-{shard}", self.prefix);
        let asked = Instant::now();
        let current = self.api.get_opt(&name).await;
        let current = self.read(asked, current)?;
        if let Some(l) = &current {
            if self.valid(shard, l) {
                return Ok(None);
            }
        }
        // A released lease names nobody: free to take whatever the writes did.
        let named = |l: &&Lease| {
            l.spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                .is_some_and(|h| !h.is_empty())
        };
        if let Some(l) = current
            .as_ref()
            .filter(named)
            .filter(|_| self.refusing_writes())
        {
            if holder_answers(l).await {
                tracing::info!(shard, holder = ?l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()), "writes were refused and the holder still answers: not taking its lapsed lease");
                return Ok(None);
            }
        }
        let existed = current.is_some();
        let want = self.claim(shard, current, me, ttl);
        let written = if existed {
            // Carries the resourceVersion we read: a concurrent writer makes this 409.
            self.api.replace(&name, &PostParams::default(), &want).await
        } else {
            self.api.create(&PostParams::default(), &want).await
        };
        match written {
            Ok(l) => {
                self.remember(shard, &l);
                self.events.notify();
                Ok(Some(Held {
                    record: Self::record(shard, &l),
                    raw: me.holder.clone(),
                }))
            }
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => {
                if !self
                    .writes_refused
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    tracing::warn!(error = %e, "a takeover write was refused: until a Lease changes, only a holder that does not answer is replaced");
                }
                Err(e.into())
            }
        }
    }

    async fn renew(&self, held: &Held, ttl: Duration) -> Result<bool> {
        let shard = held.record.shard;
        let Some(mut l) = self.cached(shard) else {
            return Ok(false);
        };
        let name = format!("{}-{shard}", self.prefix);
        // A renewal whose answer never came (the API server stalled and
        // applied it later) changed the resourceVersion under us: on a
        // conflict the Lease is read again, and renewed once more if it is
        // still this holder's, same acquisition.
        for _ in 0..2 {
            let same_acquisition = Self::record(shard, &l).token == held.record.token;
            let spec = l.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(held.raw.as_str()) || !same_acquisition {
                return Ok(false);
            }
            spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
            spec.lease_duration_seconds = Some(ttl.as_secs().max(1) as i32);
            match self.api.replace(&name, &PostParams::default(), &l).await {
                Ok(l) => {
                    self.remember(shard, &l);
                    return Ok(true);
                }
                Err(e) if is_conflict(&e) => match self.api.get_opt(&name).await? {
                    Some(current) => l = current,
                    None => return Ok(false),
                },
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    async fn release(&self, held: &Held) -> Result<()> {
        let shard = held.record.shard;
        let Some(mut l) = self.cached(shard) else {
            return Ok(());
        };
        let spec = l.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(held.raw.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        let name = format!("{}-{shard}", self.prefix);
        match self.api.replace(&name, &PostParams::default(), &l).await {
            Ok(l) => {
                self.remember(shard, &l);
                self.events.notify();
                Ok(())
            }
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn snapshot(&self, shards: u32) -> Result<Vec<Option<LeaseRecord>>> {
        let lp = ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", self.cluster));
        let asked = Instant::now();
        let list = self.api.list(&lp).await;
        let list = self.read(asked, list)?;
        let mut out = vec![None; shards as usize];
        let mut first_expiry: Option<Instant> = None;
        for l in &list.items {
            let Some(shard) = l
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix(&format!("{}-", self.prefix)))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if shard >= shards {
                continue;
            }
            if let Some(until) = self.expiry(shard, l) {
                out[shard as usize] = Some(Self::record(shard, l));
                first_expiry = Some(first_expiry.map_or(until, |f| f.min(until)));
            }
        }
        *self.next_expiry.lock().unwrap_or_else(|e| e.into_inner()) = first_expiry;
        Ok(out)
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }

    fn next_expiry(&self) -> Option<Instant> {
        *self.next_expiry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long a lapsed holder's gRPC address has to accept a connection to
/// count as alive.
const HOLDER_PROBE: Duration = Duration::from_millis(300);

/// Whether the holder named by `l` accepts a connection at the gRPC address
/// it announced: a process that died refuses (or its address is gone); one
/// that only cannot write its Lease accepts.
async fn holder_answers(l: &Lease) -> bool {
    let addr = l
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_RPC))
        .map(|u| {
            u.trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_owned()
        });
    let Some(addr) = addr.filter(|a| !a.is_empty()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(HOLDER_PROBE, tokio::net::TcpStream::connect(addr.as_str())).await,
        Ok(Ok(_))
    )
}

/// A lease list slower than this means the API server was not answering:
/// what was observed before it proves nothing about renewals.
const BLIND_AFTER: Duration = Duration::from_secs(2);

/// The ReplicaSet controller's hint of which pods to remove first.
const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Deletion cost of a shard holder (standbys have the default, 0).
const HOLDER_DELETION_COST: &str = "1000";

/// Labels a comet pod with the shard it holds (and removes the label when
/// it holds none), with a deletion cost that makes rollouts remove standbys
/// first. The operator does this for the comets: they patch no pods.
pub struct PodLabeler {
    api: Api<Pod>,
    pod: String,
}

impl PodLabeler {
    /// The pod `pod` (from the downward API) through `api`.
    pub fn new(api: Api<Pod>, pod: &str) -> Self {
        Self {
            api,
            pod: pod.to_owned(),
        }
    }

    /// Sets `pushcluster.io/shard` to `shard`, or removes it for `None`.
    /// A holder also gets a high pod-deletion cost, so a ReplicaSet scaling
    /// down (the end of each rollout step) removes standbys before holders.
    pub async fn set_shard(&self, shard: Option<u32>) -> Result<()> {
        let patch = serde_json::json!({
            "metadata": {
                "labels": { SHARD_LABEL: shard.map(|s| s.to_string()) },
                "annotations": { DELETION_COST: shard.map(|_| HOLDER_DELETION_COST) },
            }
        });
        self.api
            .patch(&self.pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::fencing_token;

    #[test]
    fn fencing_tokens_grow_across_handovers_and_across_a_recreated_lease() {
        // Handovers of one Lease.
        assert!(fencing_token(1_700_000_000, 2) > fencing_token(1_700_000_000, 1));
        // The Lease deleted (shards removed) and made again later: its
        // transitions restart, its tokens still exceed every earlier one.
        assert!(fencing_token(1_700_000_100, 1) > fencing_token(1_700_000_000, 500_000));
        // Beyond 2^24 transitions the count saturates instead of wrapping.
        assert_eq!(fencing_token(1, 1 << 30), fencing_token(1, (1 << 24) - 1));
    }

    fn lease_at(rpc: Option<&str>) -> super::Lease {
        let mut l = super::Lease::default();
        if let Some(rpc) = rpc {
            l.metadata.annotations = Some([(super::ANN_RPC.to_owned(), rpc.to_owned())].into());
        }
        l
    }

    #[tokio::test]
    async fn a_holder_answers_while_its_grpc_port_accepts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(super::holder_answers(&lease_at(Some(&format!("http://{addr}")))).await);
        drop(listener);
        assert!(!super::holder_answers(&lease_at(Some(&format!("http://{addr}")))).await);
        assert!(!super::holder_answers(&lease_at(None)).await);
    }
}
