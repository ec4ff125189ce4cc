//! Who is connected for which key, and delivery to them.
//!
//! A delivered message is encoded at most once per format and shared by every
//! connection that receives it. Each connection has a bounded queue; when it
//! is full the connection is a slow consumer and is closed, so it never slows
//! anyone else (its client reconnects and fetches what it missed by mid).
//!
//! Over 500 lines with its tests (about 500 without): the mailbox, the
//! sharded map and the close rules are one locking discipline, read together.

mod delivery;
mod pacer;

pub use delivery::Delivery;
use pacer::Pacer;
#[cfg(test)]
use pacer::WAKE_SLICE;

use prometheus_client::metrics::counter::Counter;
use pushcluster_store::Seq;
use smallvec::SmallVec;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Why the comet ends a connection, mildest first: a harsher reason
/// replaces a milder one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Close {
    /// Slow consumer, shutdown, or the key moved to another comet: flush
    /// what is queued, tell versioned clients to reconnect, close.
    Reconnect,
    /// No heartbeat within the deadline: close without flushing.
    Timeout,
    /// Closing took longer than [`FLUSH_GRACE`] (the peer stopped reading):
    /// drop the socket now.
    Abort,
}

/// What a connection takes next from its mailbox.
#[derive(Debug)]
pub enum Next {
    /// A message to write.
    Message(Arc<Delivery>),
    /// The connection is to close, for this reason.
    Close(Close),
}

/// How long a closing connection may take to flush before it is dropped.
pub const FLUSH_GRACE: Duration = Duration::from_secs(5);
/// A deadline that never passes (connections without client heartbeats).
const NEVER: u64 = u64::MAX;

/// One connection's queue and close signal, shared by the registry (which
/// offers messages) and the connection (which takes them).
///
/// Hand-written instead of a channel plus a cancellation token: an idle
/// subscriber's memory is mostly per-connection structures, and this one is
/// a single small allocation whose queue is allocated only while messages
/// wait (a bounded tokio channel allocates its first block up front).
#[derive(Debug)]
struct Mailbox {
    inner: Mutex<Inbox>,
    /// Milliseconds on the registry's clock after which the connection is
    /// closed for silence (or, once closing, dropped).
    deadline_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Inbox {
    queue: VecDeque<Arc<Delivery>>,
    close: Option<Close>,
    waker: Option<Waker>,
}

impl Inbox {
    /// The oldest queued message; the buffer is given back once empty, so an
    /// idle connection keeps no queue.
    fn pop(&mut self) -> Option<Arc<Delivery>> {
        let d = self.queue.pop_front();
        if self.queue.is_empty() {
            self.queue = VecDeque::new();
        }
        d
    }
}

enum Offer {
    /// Queued; the connection's waker, if it was waiting, for the caller to wake.
    Queued(Option<Waker>),
    Full,
    Closed,
}

impl Mailbox {
    fn offer(&self, d: &Arc<Delivery>, depth: usize) -> Offer {
        let mut inbox = lock(&self.inner);
        if inbox.close.is_some() {
            return Offer::Closed;
        }
        if inbox.queue.len() >= depth {
            return Offer::Full;
        }
        inbox.queue.push_back(d.clone());
        Offer::Queued(inbox.waker.take())
    }

    /// Asks the connection to close; a later, harsher reason replaces an
    /// earlier one (Abort over Timeout over Reconnect). True if it changed.
    fn close(&self, why: Close, now_ms: u64) -> bool {
        let waker = {
            let mut inbox = lock(&self.inner);
            if inbox.close >= Some(why) {
                return false;
            }
            if inbox.close.is_none() {
                self.deadline_ms.store(
                    now_ms.saturating_add(FLUSH_GRACE.as_millis() as u64),
                    Ordering::Relaxed,
                );
            }
            inbox.close = Some(why);
            if why != Close::Reconnect {
                // Nothing more will be written.
                inbox.queue = VecDeque::new();
            }
            inbox.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    fn is_closing(&self) -> bool {
        lock(&self.inner).close.is_some()
    }

    /// Reads the mailbox's first and last words without locking it, to
    /// bring it into cache (see [`Registry::broadcast`]).
    fn touch(&self) -> u64 {
        u64::from(self.inner.is_poisoned()) ^ self.deadline_ms.load(Ordering::Relaxed)
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Next> {
        let mut inbox = lock(&self.inner);
        if let Some(d) = inbox.pop() {
            return Poll::Ready(Next::Message(d));
        }
        // The waker is kept even when reporting a close, so a closing
        // connection still hears of a later Abort.
        if !inbox
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            inbox.waker = Some(cx.waker().clone());
        }
        match inbox.close {
            Some(c) => Poll::Ready(Next::Close(c)),
            None => Poll::Pending,
        }
    }
}

/// The registry's handle on one connection (compared by address).
type ConnHandle = Arc<Mailbox>;

/// One key's connections.
struct Entry {
    /// Inline while the key has one connection, as most do: a broadcast or
    /// a push then reaches its mailbox without another cache miss, and an
    /// idle key holds one allocation fewer.
    conns: SmallVec<[ConnHandle; 1]>,
    /// Whether the key's live channel is known to be subscribed (see
    /// [`crate::live`]); unused without one.
    live: bool,
    /// The last mid of the key accounted for on the live path: delivered,
    /// or stored before the key's channel was first subscribed (its clients
    /// fetch those). [`UNKNOWN_MID`] until the first subscription.
    last_mid: i64,
    /// The epoch `last_mid` belongs to (0: not known).
    epoch: u64,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            conns: SmallVec::new(),
            live: false,
            last_mid: UNKNOWN_MID,
            epoch: 0,
        }
    }
}

/// No mid accounted for yet: the key's channel was never subscribed.
const UNKNOWN_MID: i64 = -1;

/// What became of a message that arrived on a key's live channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LiveOffer {
    /// Queued on the key's connections (this many).
    Delivered(u64),
    /// Its mid was already accounted for: dropped.
    Duplicate,
    /// It is not the next mid: the messages after `after` are to be read
    /// from the store (which has every real one; a forged mid has none).
    Gap { after: i64 },
    /// The key has no connections here (any more).
    NoKey,
}

/// What a confirmed (re)subscription of a key's live channel asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resubscribed {
    /// Nothing to make up: first subscription (its clients fetch what came
    /// before), or nothing was stored while the channel was away.
    UpToDate,
    /// Messages after `after` were stored while the channel was away:
    /// read them from the store and deliver them.
    Fill { after: i64 },
    /// The key's sequence went backwards (Redis lost data): its clients
    /// are to reconnect and resync.
    Reset,
    /// The key has no connections here (any more).
    NoKey,
}

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("key already has {0} subscribers")]
    TooManySubscribers(usize),
    #[error("comet is shutting down")]
    ShuttingDown,
}

const SHARDS: usize = 64;

/// Connections by key, sharded to keep lock hold times short.
pub struct Registry {
    shards: Vec<Mutex<HashMap<String, Entry>>>,
    connections: AtomicU64,
    /// Wakes [`Registry::drained`] when the last connection goes.
    empty: tokio::sync::Notify,
    /// Told every key that gains its first connection or loses its last
    /// (set when messages arrive on live channels).
    key_changes: OnceLock<tokio::sync::mpsc::UnboundedSender<Box<str>>>,
    max_per_key: usize,
    queue_depth: usize,
    closing: AtomicBool,
    /// The clock heartbeat deadlines are kept on.
    epoch: Instant,
    /// Connections closed because their queue was full.
    pub slow_consumers: Counter,
    /// Wakes the connections a broadcast reached.
    pacer: Arc<Pacer>,
}

/// A registered connection: its queue and close signal; unregisters on drop.
pub struct Subscription {
    mailbox: Arc<Mailbox>,
    key: Box<str>,
    registry: Arc<Registry>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.unregister(&self.key, &self.mailbox);
    }
}

impl Subscription {
    /// The next message, or why to close once nothing is left to flush.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Next> {
        self.mailbox.poll_next(cx)
    }

    /// [`Self::poll_next`] as a future.
    pub async fn next(&self) -> Next {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// A message that is already queued, if any.
    pub fn try_message(&self) -> Option<Arc<Delivery>> {
        lock(&self.mailbox.inner).pop()
    }

    /// The client proved it is alive: it may stay silent for `for_` more.
    pub fn heartbeat(&self, for_: Duration) {
        if !self.mailbox.is_closing() {
            let at = self
                .registry
                .now_ms()
                .saturating_add(for_.as_millis() as u64);
            self.mailbox.deadline_ms.store(at, Ordering::Relaxed);
        }
    }

    /// Whether the comet asked this connection to close.
    pub fn is_closing(&self) -> bool {
        self.mailbox.is_closing()
    }
}

impl Registry {
    /// An empty registry with the per-key and per-connection limits.
    pub fn new(max_per_key: usize, queue_depth: usize, slow_consumers: Counter) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            connections: AtomicU64::new(0),
            empty: tokio::sync::Notify::new(),
            key_changes: OnceLock::new(),
            max_per_key: max_per_key.max(1),
            queue_depth: queue_depth.max(1),
            closing: AtomicBool::new(false),
            epoch: Instant::now(),
            slow_consumers,
            pacer: Arc::default(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Entry>> {
        let h = pushcluster_core::ring::key_hash(key) as usize;
        &self.shards[h % SHARDS]
    }

    /// Adds a connection for `key`, within the per-key limit. `silence` is how
    /// long the client may send nothing before it is closed (None: never).
    pub fn register(
        self: &Arc<Self>,
        key: &str,
        silence: Option<Duration>,
    ) -> Result<Subscription, RegisterError> {
        let deadline = silence.map_or(NEVER, |d| {
            self.now_ms().saturating_add(d.as_millis() as u64)
        });
        let mailbox = Arc::new(Mailbox {
            inner: Mutex::new(Inbox::default()),
            deadline_ms: AtomicU64::new(deadline),
        });
        let first = {
            let mut map = lock(self.shard(key));
            // Checked under the shard lock: close_all sets the flag before it
            // walks the shards, so a registration either sees the flag or is
            // in the map when close_all gets to its shard.
            if self.closing.load(Ordering::SeqCst) {
                return Err(RegisterError::ShuttingDown);
            }
            let entry = map.entry(key.to_owned()).or_default();
            if entry.conns.len() >= self.max_per_key {
                return Err(RegisterError::TooManySubscribers(entry.conns.len()));
            }
            entry.conns.push(mailbox.clone());
            entry.conns.len() == 1
        };
        if first {
            self.key_changed(key);
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            mailbox,
            key: key.into(),
            registry: self.clone(),
        })
    }

    fn unregister(&self, key: &str, mailbox: &Arc<Mailbox>) {
        let mut map = lock(self.shard(key));
        let mut gone = false;
        if let Some(entry) = map.get_mut(key) {
            let before = entry.conns.len();
            entry.conns.retain(|c| !Arc::ptr_eq(c, mailbox));
            if entry.conns.len() < before && self.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.empty.notify_waiters();
            }
            if entry.conns.is_empty() {
                map.remove(key);
                gone = true;
            }
        }
        drop(map);
        if gone {
            self.key_changed(key);
        }
    }

    fn key_changed(&self, key: &str) {
        if let Some(tx) = self.key_changes.get() {
            let _ = tx.send(key.into());
        }
    }

    /// Has every key that gains its first connection or loses its last sent
    /// to `tx` (once; later calls are ignored).
    pub(crate) fn report_key_changes(&self, tx: tokio::sync::mpsc::UnboundedSender<Box<str>>) {
        let _ = self.key_changes.set(tx);
    }

    /// Whether `key` has connections.
    pub(crate) fn has_key(&self, key: &str) -> bool {
        lock(self.shard(key)).contains_key(key)
    }

    /// Whether `key` has connections and its live channel is subscribed.
    pub(crate) fn is_live(&self, key: &str) -> bool {
        lock(self.shard(key)).get(key).is_some_and(|e| e.live)
    }

    /// Marks `key`'s live channel subscribed, if it still has connections;
    /// `stored` is the key's sequence, read after the subscription was
    /// confirmed. Says what was missed while it was not subscribed.
    pub(crate) fn set_live(&self, key: &str, stored: Seq) -> Resubscribed {
        let mut map = lock(self.shard(key));
        let Some(e) = map.get_mut(key) else {
            return Resubscribed::NoKey;
        };
        e.live = true;
        let last = e.last_mid;
        let known = last != UNKNOWN_MID;
        let epoch = std::mem::replace(&mut e.epoch, stored.epoch);
        if known && stored.restarted_since(last, epoch) {
            e.last_mid = 0;
            Resubscribed::Reset
        } else if !known || stored.last == last {
            e.last_mid = stored.last;
            Resubscribed::UpToDate
        } else {
            Resubscribed::Fill { after: last }
        }
    }

    /// Offers a message of `key` that arrived on its live channel (or, with
    /// `from_store`, one read from the store to fill a gap): delivered only
    /// when it is the next mid, so each connection gets a key's messages
    /// once and in order, and a mid never stored is never delivered.
    pub(crate) fn offer_live(&self, key: &str, d: &Arc<Delivery>, from_store: bool) -> LiveOffer {
        let mut map = lock(self.shard(key));
        let Some(e) = map.get_mut(key) else {
            return LiveOffer::NoKey;
        };
        let last = e.last_mid;
        let next = d.mid == last + 1 || last == UNKNOWN_MID;
        if !next && d.mid <= last {
            return LiveOffer::Duplicate;
        }
        if !next && !from_store {
            return LiveOffer::Gap { after: last };
        }
        e.last_mid = d.mid;
        LiveOffer::Delivered(self.queue_on(&e.conns, d))
    }

    /// Records the epoch of `key`'s sequence when not known yet: read right
    /// after the sequence's first mid was delivered, so the mids delivered
    /// since belong to it.
    pub(crate) fn learn_epoch(&self, key: &str, epoch: u64) {
        if let Some(e) = lock(self.shard(key)).get_mut(key) {
            if e.epoch == 0 {
                e.epoch = epoch;
            }
        }
    }

    /// Asks `key`'s connections to reconnect (they fetch what they missed).
    pub(crate) fn reconnect_key(&self, key: &str) -> u64 {
        let now = self.now_ms();
        let map = lock(self.shard(key));
        let conns = map.get(key).map_or(&[][..], |e| &e.conns[..]);
        for c in conns {
            c.close(Close::Reconnect, now);
        }
        conns.len() as u64
    }

    /// Marks every live channel unsubscribed (their connection was lost);
    /// returns the keys that have connections.
    pub(crate) fn unset_live(&self) -> Vec<Box<str>> {
        let mut keys = Vec::new();
        for shard in &self.shards {
            for (k, e) in lock(shard).iter_mut() {
                e.live = false;
                keys.push(k.as_str().into());
            }
        }
        keys
    }

    /// Queues `d`, just stored, on every connection of `key`; returns how
    /// many took it. Its mid becomes the key's last delivered one.
    pub fn deliver(&self, key: &str, d: &Arc<Delivery>) -> u64 {
        let mut map = lock(self.shard(key));
        let Some(e) = map.get_mut(key) else {
            return 0;
        };
        e.last_mid = d.mid;
        self.queue_on(&e.conns, d)
    }

    /// Queues `d` on each of `conns`, waking those that wait; returns how
    /// many took it.
    fn queue_on(&self, conns: &[ConnHandle], d: &Arc<Delivery>) -> u64 {
        let mut n = 0;
        for c in conns {
            if let Some(waker) = self.offer(c, d) {
                n += 1;
                if let Some(w) = waker {
                    w.wake();
                }
            }
        }
        n
    }

    /// Queues `d` on every connection; returns how many took it. The
    /// connections are woken by the `Pacer`, a slice at a time.
    pub fn broadcast(&self, d: &Arc<Delivery>) -> u64 {
        let mut n = 0;
        let mut wakers = Vec::new();
        let mut touched = 0;
        for shard in &self.shards {
            let map = lock(shard);
            // Every mailbox is an allocation of its own, not in cache when a
            // broadcast comes. Offering locks it, and a locked instruction
            // lets no later load start before it: offered one by one, each
            // mailbox's cache miss was waited for in turn (78 % of `offer`'s
            // samples on its lock in S2's profile, a fifth of the comet's
            // CPU). Plain loads of every mailbox of the shard first overlap
            // those misses; the offers then find them in cache.
            let conns: Vec<&ConnHandle> = map.values().flat_map(|e| &e.conns).collect();
            for c in &conns {
                touched ^= c.touch();
            }
            for c in conns {
                if let Some(waker) = self.offer(c, d) {
                    n += 1;
                    wakers.extend(waker);
                }
            }
        }
        std::hint::black_box(touched);
        self.pacer.wake(wakers);
        n
    }

    /// Queues `d` on `c`: Some (with its waker, if it waits) when queued.
    fn offer(&self, c: &ConnHandle, d: &Arc<Delivery>) -> Option<Option<Waker>> {
        match c.offer(d, self.queue_depth) {
            Offer::Queued(waker) => Some(waker),
            Offer::Full => {
                if c.close(Close::Reconnect, self.now_ms()) {
                    self.slow_consumers.inc();
                    tracing::warn!("slow consumer: queue full, closing");
                }
                None
            }
            Offer::Closed => None,
        }
    }

    /// Asks every connection whose key `keep` rejects (keys that moved away)
    /// to reconnect; returns how many.
    pub fn reconnect_unless(&self, keep: impl Fn(&str) -> bool) -> u64 {
        let now = self.now_ms();
        let mut n = 0;
        for shard in &self.shards {
            for (k, entry) in lock(shard).iter() {
                if !keep(k) {
                    for c in &entry.conns {
                        c.close(Close::Reconnect, now);
                        n += 1;
                    }
                }
            }
        }
        n
    }

    /// Asks every open connection to reconnect (they fetch what they missed
    /// by mid); new connections are still taken.
    pub fn reconnect_all(&self) -> u64 {
        self.reconnect_unless(|_| false)
    }

    /// Refuses new connections and closes every open one.
    pub fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.reconnect_all();
    }

    /// Closes connections whose client went silent past its deadline, and
    /// drops closing connections that could not flush within [`FLUSH_GRACE`].
    /// Returns how many were closed for silence.
    pub fn sweep(&self) -> u64 {
        let now = self.now_ms();
        let mut silent = 0;
        for shard in &self.shards {
            for c in lock(shard).values().flat_map(|e| &e.conns) {
                if c.deadline_ms.load(Ordering::Relaxed) > now {
                    continue;
                }
                if !c.is_closing() {
                    c.close(Close::Timeout, now);
                    silent += 1;
                } else {
                    c.close(Close::Abort, now);
                }
            }
        }
        silent
    }

    /// Returns once no connection is left (at once when none is open).
    pub async fn drained(&self) {
        loop {
            let empty = self.empty.notified();
            tokio::pin!(empty);
            // Registered before the check, so a last unregister between the
            // check and the wait still wakes it.
            empty.as_mut().enable();
            if self.connections() == 0 {
                return;
            }
            empty.await;
        }
    }

    /// Open connections.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Keys with at least one connection.
    pub fn keys(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).len() as u64).sum()
    }
}

/// Locks a shard; a panic elsewhere while holding it leaves plain data behind,
/// so a poisoned lock is still safe to use.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use pushcluster_core::frame::Format;

    fn d(mid: i64) -> Arc<Delivery> {
        Delivery::new(mid, 0, Bytes::from_static(b"{\"a\":1}"))
    }

    #[test]
    fn delivers_in_order_to_every_connection_of_a_key() {
        let r = Registry::new(4, 16, Counter::default());
        let mut a = r.register("k", None).unwrap();
        let mut b = r.register("k", None).unwrap();
        let other = r.register("x", None).unwrap();
        for mid in 1..=3 {
            assert_eq!(r.deliver("k", &d(mid)), 2);
        }
        for sub in [&mut a, &mut b] {
            let got: Vec<i64> = (0..3).map(|_| sub.try_message().unwrap().mid).collect();
            assert_eq!(got, vec![1, 2, 3]);
        }
        assert!(other.try_message().is_none());
        assert_eq!(r.connections(), 3);
        assert_eq!(r.keys(), 2);
    }

    #[tokio::test]
    async fn drained_returns_when_the_last_connection_goes() {
        let r = Registry::new(4, 16, Counter::default());
        r.drained().await; // none open: at once
        let a = r.register("k", None).unwrap();
        let b = r.register("x", None).unwrap();
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.drained().await }
        });
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one connection is still open");
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the last unregister")
            .unwrap();
    }

    #[test]
    fn per_key_limit() {
        let r = Registry::new(2, 16, Counter::default());
        let _a = r.register("k", None).unwrap();
        let b = r.register("k", None).unwrap();
        assert_eq!(
            r.register("k", None).err(),
            Some(RegisterError::TooManySubscribers(2))
        );
        drop(b);
        assert!(r.register("k", None).is_ok());
    }

    #[test]
    fn dropping_a_subscription_unregisters_it() {
        let r = Registry::new(2, 16, Counter::default());
        let a = r.register("k", None).unwrap();
        drop(a);
        assert_eq!(r.connections(), 0);
        assert_eq!(r.keys(), 0);
        assert_eq!(r.deliver("k", &d(1)), 0);
    }

    #[test]
    fn a_full_queue_closes_only_that_connection() {
        let r = Registry::new(4, 2, Counter::default());
        let slow = r.register("k", None).unwrap();
        let fast = r.register("k", None).unwrap();
        for mid in 1..=3 {
            r.deliver("k", &d(mid));
            let _ = fast.try_message();
        }
        assert!(slow.is_closing());
        assert!(!fast.is_closing());
        assert_eq!(r.slow_consumers.get(), 1);
    }

    #[test]
    fn broadcast_reaches_everyone_and_close_all_closes() {
        let r = Registry::new(4, 4, Counter::default());
        let mut subs: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|k| r.register(k, None).unwrap())
            .collect();
        assert_eq!(
            r.broadcast(&Delivery::new(1, 1, Bytes::from_static(b"1"))),
            3
        );
        for s in &mut subs {
            assert_eq!(s.try_message().unwrap().gid, 1);
        }
        r.close_all();
        assert!(subs.iter().all(|s| s.is_closing()));
        assert_eq!(
            r.register("d", None).err(),
            Some(RegisterError::ShuttingDown)
        );
    }

    fn next_now(s: &Subscription) -> Poll<Next> {
        s.poll_next(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_reconnect_close_flushes_the_queue_first() {
        let r = Registry::new(4, 4, Counter::default());
        let s = r.register("k", None).unwrap();
        assert!(next_now(&s).is_pending());
        r.deliver("k", &d(1));
        r.reconnect_unless(|_| false);
        assert!(matches!(next_now(&s), Poll::Ready(Next::Message(m)) if m.mid == 1));
        assert!(matches!(
            next_now(&s),
            Poll::Ready(Next::Close(Close::Reconnect))
        ));
        // Nothing is queued on a closing connection.
        assert_eq!(r.deliver("k", &d(2)), 0);
    }

    #[test]
    fn silence_past_the_deadline_closes_and_a_stuck_close_is_aborted() {
        let r = Registry::new(4, 4, Counter::default());
        let quiet = r.register("quiet", Some(Duration::ZERO)).unwrap();
        let beating = r.register("beating", Some(Duration::ZERO)).unwrap();
        let sse = r.register("sse", None).unwrap();
        beating.heartbeat(Duration::from_secs(60));
        r.deliver("quiet", &d(1));
        assert_eq!(r.sweep(), 1);
        // A silent client's queue is dropped: it is not read anyway.
        assert!(matches!(
            next_now(&quiet),
            Poll::Ready(Next::Close(Close::Timeout))
        ));
        assert!(!beating.is_closing() && !sse.is_closing());
        // Heartbeats no longer extend a closing connection's deadline.
        quiet.heartbeat(Duration::from_secs(60));
        assert_eq!(r.sweep(), 0);
        assert!(matches!(
            next_now(&quiet),
            Poll::Ready(Next::Close(Close::Timeout))
        ));
        // Once the flush grace has passed, the connection is dropped.
        quiet.mailbox.deadline_ms.store(0, Ordering::Relaxed);
        r.sweep();
        assert!(matches!(
            next_now(&quiet),
            Poll::Ready(Next::Close(Close::Abort))
        ));
    }

    #[test]
    fn a_queued_message_wakes_the_connection() {
        let r = Registry::new(4, 4, Counter::default());
        let s = r.register("k", None).unwrap();
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        assert!(s.poll_next(&mut Context::from_waker(&waker)).is_pending());
        r.deliver("k", &d(1));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_broadcast_wakes_every_connection_a_slice_at_a_time() {
        let r = Registry::new(4, 4, Counter::default());
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let n = 3 * WAKE_SLICE + 5;
        let subs: Vec<_> = (0..n)
            .map(|i| r.register(&format!("k{i}"), None).unwrap())
            .collect();
        for s in &subs {
            assert!(s.poll_next(&mut Context::from_waker(&waker)).is_pending());
        }
        assert_eq!(r.broadcast(&d(1)) as usize, n);
        // Nobody is woken before the runtime gets its turn.
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        tokio::task::yield_now().await;
        let first = count.0.load(Ordering::SeqCst);
        assert!((1..n).contains(&first), "woken after one turn: {first}");
        // A second broadcast while the first is being woken: the connections
        // not yet woken have both queued, and are woken once.
        assert_eq!(r.broadcast(&d(2)) as usize, n);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(count.0.load(Ordering::SeqCst), n);
        for s in &subs {
            let mids: Vec<i64> = std::iter::from_fn(|| s.try_message().map(|m| m.mid)).collect();
            assert_eq!(mids, vec![1, 2]);
        }
        // Once idle, the next broadcast starts the pacer again.
        for s in &subs {
            assert!(s.poll_next(&mut Context::from_waker(&waker)).is_pending());
        }
        r.broadcast(&d(3));
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 2 * n);
    }

    #[test]
    fn frames_are_encoded_once_per_format() {
        let m = Delivery::new(5, 0, Bytes::from_static(br#"{"x":"y"}"#));
        assert_eq!(
            m.json(Format::Json).as_str(),
            r#"{"msg":{"x":"y"},"mid":5,"gid":0}"#
        );
        assert!(std::ptr::eq(m.json(Format::Json), m.json(Format::Json)));
        assert!(m.resp(Format::Legacy).starts_with(b"$"));
    }
}
