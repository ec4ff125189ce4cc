//! The shard-ownership state machine: standby → acquire → renew … → step down
//! or release.
//!
//! Safety: the holder dates each renewal from the moment it *sent* the
//! request, so its own idea of when the lease runs out is never later than the
//! backend's. It steps down when `renew_deadline` has passed since the last
//! renewal it knows landed, which is `duration - renew_deadline` before the
//! lease can expire for anyone else: that margin absorbs clock-rate drift and
//! a slow step-down. It never serves a shard it cannot prove it holds.
//!
//! With a [`Witness`] (the store the holder writes to), a holder that cannot
//! renew keeps serving past its renew deadline for as long as the witness
//! shows no newer fencing token than its own: an API server that stops
//! answering everyone cuts nobody off. A new holder raises the shard's fence
//! in the witness before it serves, so a holder cut off from the API server
//! alone sees the raise at its next check (every retry period) and steps
//! down; its writes carry the old token and the store refuses them from the
//! raise on. A holder that reaches neither steps down at the renew deadline,
//! as without a witness. The README has the timing table.

use crate::{Candidate, Held, LeaseBackend, LeaseTiming};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What this process serves now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// No shard: a standby.
    Standby,
    /// Holds `shard`'s lease under fencing token `token`.
    Serving { shard: u32, token: u64 },
}

impl Ownership {
    /// The shard served, if any.
    pub fn shard(&self) -> Option<u32> {
        match self {
            Ownership::Standby => None,
            Ownership::Serving { shard, .. } => Some(*shard),
        }
    }
}

/// A second witness of shard ownership beside the lease backend: the store
/// holders write to, which keeps the newest fencing token of each shard.
pub trait Witness: Send + Sync + std::fmt::Debug + 'static {
    /// Raises `shard`'s fence to `token` (no change when it is higher) and
    /// returns the fence in force: higher than `token` means a newer holder.
    /// `Ok(None)`: this store keeps no fence to raise (a message service of
    /// the previous release during a rolling upgrade); the owner then
    /// behaves as without a witness.
    fn raise(
        &self,
        shard: u32,
        token: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<u64>, String>> + Send + '_>>;
}

/// What the witness said of a held shard.
enum Vouch {
    /// No newer holder: keep serving.
    Serve,
    /// A newer holder raised the fence.
    Superseded(u64),
    /// The witness did not answer in time.
    Silent(String),
}

/// Runs the ownership loop of one process.
pub struct ShardOwner<B> {
    backend: Arc<B>,
    me: Candidate,
    /// The number of shards now; it may change while the cluster runs
    /// (resharding without restarts).
    shards: watch::Receiver<u32>,
    /// Keeps a fixed count's channel open.
    _fixed: Option<watch::Sender<u32>>,
    preferred: Option<u32>,
    timing: LeaseTiming,
    tx: watch::Sender<Ownership>,
    witness: Option<Arc<dyn Witness>>,
}

impl<B: LeaseBackend> ShardOwner<B> {
    /// A standby for shards `0..shards`; `preferred` is tried first when free.
    pub fn new(
        backend: Arc<B>,
        me: Candidate,
        shards: u32,
        preferred: Option<u32>,
        timing: LeaseTiming,
    ) -> (Self, watch::Receiver<Ownership>) {
        let (fixed, count) = watch::channel(shards);
        let (mut owner, rx) = Self::following(backend, me, count, preferred, timing);
        owner._fixed = Some(fixed);
        (owner, rx)
    }

    /// A standby for shards `0..n`, where `n` follows `shards`: when it
    /// shrinks below the held shard, the lease is released (its keys move),
    /// and when it grows, standbys take the new shards.
    pub fn following(
        backend: Arc<B>,
        me: Candidate,
        shards: watch::Receiver<u32>,
        preferred: Option<u32>,
        timing: LeaseTiming,
    ) -> (Self, watch::Receiver<Ownership>) {
        let (tx, rx) = watch::channel(Ownership::Standby);
        (
            Self {
                backend,
                me,
                shards,
                _fixed: None,
                preferred,
                timing,
                tx,
                witness: None,
            },
            rx,
        )
    }

    /// Consults `witness` when the lease cannot be renewed (see the module
    /// docs), and raises the fence in it before serving a shard.
    pub fn with_witness(mut self, witness: Option<Arc<dyn Witness>>) -> Self {
        self.witness = witness;
        self
    }

    /// Asks the witness about `h` (None: there is none), waiting at most a
    /// retry period.
    async fn vouch(&self, h: &Held) -> Option<Vouch> {
        let w = self.witness.as_ref()?;
        let asked = w.raise(h.record.shard, h.record.token);
        match tokio::time::timeout(self.timing.retry_period(), asked).await {
            Ok(Ok(None)) => None,
            Ok(Ok(Some(fence))) if fence > h.record.token => Some(Vouch::Superseded(fence)),
            Ok(Ok(Some(_))) => Some(Vouch::Serve),
            Ok(Err(e)) => Some(Vouch::Silent(e)),
            Err(_) => Some(Vouch::Silent("no answer within a retry period".into())),
        }
    }

    /// Free shards below `shards` in the order to try them.
    async fn free_shards(&self, shards: u32) -> crate::Result<Vec<u32>> {
        if shards == 0 {
            return Ok(Vec::new());
        }
        let snap = self.backend.snapshot(shards).await?;
        let mut free: Vec<u32> = snap
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_none())
            .map(|(k, _)| k as u32)
            .collect();
        if let Some(p) = self.preferred {
            if let Some(i) = free.iter().position(|&k| k == p) {
                free.remove(i);
                free.insert(0, p);
            }
        }
        Ok(free)
    }

    async fn try_take(&self, shards: u32) -> crate::Result<Option<(Held, Instant)>> {
        for shard in self.free_shards(shards).await? {
            let sent = Instant::now();
            if let Some(h) = self
                .backend
                .try_acquire(shard, &self.me, self.timing.duration())
                .await?
            {
                return Ok(Some((h, sent)));
            }
        }
        Ok(None)
    }

    /// When a standby looks for a free lease again: after a retry period,
    /// or just after the first held lease expires if that is sooner (the
    /// margin covers the backend's clock granularity).
    fn next_look(&self) -> Instant {
        let period = Instant::now() + self.timing.retry_period();
        match self.backend.next_expiry() {
            Some(e) => period.min(e + Duration::from_millis(5)),
            None => period,
        }
    }

    fn publish(&self, o: Ownership) {
        self.tx.send_replace(o);
    }

    /// Runs until `cancel` fires; then releases the held lease, if any, first.
    pub async fn run(self, cancel: CancellationToken) {
        let mut held: Option<(Held, Instant)> = None;
        // Until when the witness has vouched for the held lease past its
        // renew deadline.
        let mut vouched = Instant::now();
        let mut next_try = Instant::now();
        let mut changes = self.backend.changes();
        let mut count = self.shards.clone();
        // A fixed count never changes; a closed channel stops being watched.
        let mut count_open = self._fixed.is_none();
        loop {
            let Some((h, last_ok)) = held.clone() else {
                // Standby: take any free or expired lease. Events are marked
                // seen first, so a release during the attempt wakes the wait.
                changes.borrow_and_update();
                let shards = *count.borrow_and_update();
                match self.try_take(shards).await {
                    Ok(Some((h, sent))) => {
                        // The fence goes up before this comet serves: a holder
                        // that lost the lease without noticing sees it.
                        match self.vouch(&h).await {
                            None | Some(Vouch::Serve) => {}
                            Some(Vouch::Superseded(fence)) => {
                                tracing::error!(
                                    shard = h.record.shard,
                                    token = h.record.token,
                                    fence,
                                    "the store knows a newer holder than this lease: not serving"
                                );
                                let _ = self.backend.release(&h).await;
                                tokio::time::sleep(self.timing.retry_period()).await;
                                continue;
                            }
                            Some(Vouch::Silent(e)) => {
                                tracing::warn!(shard = h.record.shard, error = %e, "cannot raise the shard's fence in the store: not serving");
                                let _ = self.backend.release(&h).await;
                                tokio::time::sleep(self.timing.retry_period()).await;
                                continue;
                            }
                        }
                        tracing::info!(shard = h.record.shard, token = h.record.token, holder = %self.me.holder, "acquired shard lease");
                        self.publish(Ownership::Serving {
                            shard: h.record.shard,
                            token: h.record.token,
                        });
                        next_try = sent + self.timing.retry_period();
                        held = Some((h, sent));
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "looking for a free shard lease failed"),
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = changes.changed() => if r.is_err() {
                        tokio::time::sleep(self.timing.retry_period()).await;
                    },
                    r = count.changed() => if r.is_err() {
                        tokio::time::sleep(self.timing.retry_period()).await;
                    },
                    _ = tokio::time::sleep_until(self.next_look()) => {}
                }
                continue;
            };
            if h.record.shard >= *count.borrow_and_update() {
                // The shard is gone (fewer shards now): hand it back so its
                // keys move to the shards that remain.
                self.publish(Ownership::Standby);
                tracing::info!(shard = h.record.shard, "shard removed: releasing its lease");
                if let Err(e) = self.backend.release(&h).await {
                    tracing::warn!(error = %e, "releasing a removed shard's lease failed; it will expire");
                }
                held = None;
                continue;
            }
            let deadline = (last_ok + self.timing.renew_deadline()).max(vouched);
            tokio::select! {
                _ = cancel.cancelled() => {
                    // Stop serving first, then hand the lease over at once.
                    self.publish(Ownership::Standby);
                    match tokio::time::timeout(Duration::from_secs(1), self.backend.release(&h)).await {
                        Ok(Ok(())) => tracing::info!(shard = h.record.shard, "released shard lease"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "releasing the lease failed; it will expire"),
                        Err(_) => tracing::warn!("releasing the lease timed out; it will expire"),
                    }
                    return;
                }
                _ = tokio::time::sleep_until(next_try.min(deadline)) => {}
                r = count.changed(), if count_open => {
                    if r.is_ok() {
                        continue;
                    }
                    count_open = false;
                }
            }
            if Instant::now() >= deadline {
                match self.vouch(&h).await {
                    Some(Vouch::Serve) => {
                        if vouched <= last_ok + self.timing.renew_deadline() {
                            tracing::warn!(shard = h.record.shard, "cannot renew the lease, but the store knows no newer holder: still serving");
                        }
                        vouched = Instant::now() + self.timing.retry_period();
                        next_try = Instant::now();
                    }
                    Some(Vouch::Superseded(fence)) => {
                        tracing::warn!(
                            shard = h.record.shard,
                            fence,
                            "a newer holder raised the shard's fence"
                        );
                        self.step_down(&h, "a newer holder raised the fence");
                        held = None;
                        continue;
                    }
                    Some(Vouch::Silent(e)) => {
                        tracing::warn!(shard = h.record.shard, error = %e, "the store cannot vouch for the lease either");
                        self.step_down(&h, "renew deadline passed");
                        held = None;
                        continue;
                    }
                    None => {
                        self.step_down(&h, "renew deadline passed");
                        held = None;
                        continue;
                    }
                }
            }
            let deadline = (last_ok + self.timing.renew_deadline()).max(vouched);
            let sent = Instant::now();
            match tokio::time::timeout_at(deadline, self.backend.renew(&h, self.timing.duration()))
                .await
            {
                Ok(Ok(true)) => {
                    held = Some((h, sent));
                    next_try = sent + self.timing.retry_period();
                }
                Ok(Ok(false)) => {
                    self.step_down(&h, "lease was lost");
                    held = None;
                }
                Ok(Err(e)) => {
                    tracing::warn!(shard = h.record.shard, error = %e, "renewing the lease failed; retrying");
                    next_try = Instant::now() + self.timing.retry_period() / 4;
                }
                // No answer by the deadline: the witness is asked at the
                // top of the loop.
                Err(_) => {}
            }
        }
    }

    fn step_down(&self, h: &Held, why: &str) {
        tracing::warn!(shard = h.record.shard, reason = why, "stepping down");
        self.publish(Ownership::Standby);
    }
}
