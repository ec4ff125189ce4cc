//! In-memory leases for unit tests. Expiry follows tokio's clock, so a test
//! that pauses time (`start_paused`) controls it exactly.

use crate::{Candidate, Held, LeaseBackend, LeaseRecord, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Default)]
struct State {
    leases: HashMap<u32, (LeaseRecord, Instant)>,
    fences: HashMap<u32, u64>,
    /// While set, every call fails: a holder cut off from the backend.
    partitioned: std::collections::HashSet<String>,
}

/// Shared in-memory lease table; clone it to give every candidate a handle.
#[derive(Clone, Default)]
pub struct MemoryLeases {
    state: Arc<Mutex<State>>,
    events: crate::LeaseEvents,
    /// The holder this handle speaks for (for partition tests).
    me: Option<String>,
}

impl MemoryLeases {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }
    /// A handle whose calls fail while `holder` is partitioned.
    pub fn handle_for(&self, holder: &str) -> Self {
        Self {
            me: Some(holder.to_owned()),
            ..self.clone()
        }
    }
    /// Cuts `holder` off from (or back onto) the lease table.
    pub fn partition(&self, holder: &str, cut: bool) {
        let mut s = self.lock();
        if cut {
            s.partitioned.insert(holder.to_owned());
        } else {
            s.partitioned.remove(holder);
        }
    }
    /// Acquisitions of `shard` so far.
    pub fn transitions(&self, shard: u32) -> u64 {
        self.lock().fences.get(&shard).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, s: &State) -> Result<()> {
        match &self.me {
            Some(me) if s.partitioned.contains(me) => {
                Err(crate::Error::Corrupt(format!("{me} is partitioned")))
            }
            _ => Ok(()),
        }
    }
}

impl LeaseBackend for MemoryLeases {
    async fn try_acquire(&self, shard: u32, me: &Candidate, ttl: Duration) -> Result<Option<Held>> {
        let now = Instant::now();
        let held = {
            let mut s = self.lock();
            self.check(&s)?;
            if matches!(s.leases.get(&shard), Some((_, exp)) if *exp > now) {
                return Ok(None);
            }
            let fence = s.fences.entry(shard).or_default();
            *fence += 1;
            let record = LeaseRecord {
                shard,
                token: *fence,
                candidate: me.clone(),
            };
            s.leases.insert(shard, (record.clone(), now + ttl));
            Held {
                raw: record.token.to_string(),
                record,
            }
        };
        self.events.notify();
        Ok(Some(held))
    }

    async fn renew(&self, held: &Held, ttl: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut s = self.lock();
        self.check(&s)?;
        match s.leases.get_mut(&held.record.shard) {
            Some((rec, exp)) if rec.token == held.record.token && *exp > now => {
                *exp = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, held: &Held) -> Result<()> {
        {
            let mut s = self.lock();
            self.check(&s)?;
            if matches!(s.leases.get(&held.record.shard), Some((rec, _)) if rec.token == held.record.token)
            {
                s.leases.remove(&held.record.shard);
            }
        }
        self.events.notify();
        Ok(())
    }

    async fn snapshot(&self, shards: u32) -> Result<Vec<Option<LeaseRecord>>> {
        let now = Instant::now();
        let s = self.lock();
        self.check(&s)?;
        Ok((0..shards)
            .map(|k| match s.leases.get(&k) {
                Some((rec, exp)) if *exp > now => Some(rec.clone()),
                _ => None,
            })
            .collect())
    }

    fn next_expiry(&self) -> Option<Instant> {
        let now = Instant::now();
        self.lock()
            .leases
            .values()
            .map(|(_, exp)| *exp)
            .filter(|exp| *exp > now)
            .min()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }
}
