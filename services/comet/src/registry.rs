//! Who is connected for which key, and delivery to them.
//!
//! A delivered message is encoded at most once per format and shared by every
//! connection that receives it. Each connection has a bounded queue; when it
//! is full the connection is a slow consumer and is closed, so it never slows
//! anyone else (its client reconnects and fetches what it missed by mid).

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use pushcluster_core::frame::{encode_json, encode_resp_bulk, Format};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A stored message on its way to connections, encoded lazily per format.
#[derive(Debug)]
pub struct Delivery {
    pub mid: i64,
    pub gid: i32,
    payload: Bytes,
    json: [OnceLock<Utf8Bytes>; 2],
    resp: [OnceLock<Bytes>; 2],
}

fn idx(f: Format) -> usize {
    match f {
        Format::Legacy => 0,
        Format::Json => 1,
    }
}

impl Delivery {
    /// A message with its mid and gid.
    pub fn new(mid: i64, gid: i32, payload: Bytes) -> Arc<Self> {
        Arc::new(Self {
            mid,
            gid,
            payload,
            json: Default::default(),
            resp: Default::default(),
        })
    }
    /// The `{"msg":…,"mid":…,"gid":…}` frame in `format` (WebSocket, SSE).
    pub fn json(&self, format: Format) -> &Utf8Bytes {
        self.json[idx(format)].get_or_init(|| {
            let json = encode_json(&self.payload, self.mid, self.gid, format);
            // Stored payloads were checked to be UTF-8 JSON when pushed; a lossy
            // conversion keeps a corrupt record from taking the comet down.
            String::from_utf8(json)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
                .into()
        })
    }
    /// The same as a RESP bulk string (TCP).
    pub fn resp(&self, format: Format) -> &Bytes {
        self.resp[idx(format)]
            .get_or_init(|| encode_resp_bulk(self.json(format).as_str().as_bytes()).into())
    }
}

/// The registry's handle on one connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    id: u64,
    tx: mpsc::Sender<Arc<Delivery>>,
    /// Fired to close the connection (slow consumer, shutdown, key moved).
    pub close: CancellationToken,
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
    shards: Vec<Mutex<HashMap<String, Vec<ConnHandle>>>>,
    next_id: AtomicU64,
    connections: AtomicU64,
    max_per_key: usize,
    queue_depth: usize,
    closing: CancellationToken,
    /// Connections closed because their queue was full.
    pub slow_consumers: Counter,
}

/// A registered connection: its queue and its id; unregisters on drop.
pub struct Subscription {
    pub rx: mpsc::Receiver<Arc<Delivery>>,
    pub close: CancellationToken,
    key: String,
    id: u64,
    registry: Arc<Registry>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.unregister(&self.key, self.id);
    }
}

impl Registry {
    /// An empty registry with the per-key and per-connection limits.
    pub fn new(max_per_key: usize, queue_depth: usize, slow_consumers: Counter) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            max_per_key: max_per_key.max(1),
            queue_depth: queue_depth.max(1),
            closing: CancellationToken::new(),
            slow_consumers,
        })
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Vec<ConnHandle>>> {
        let h = pushcluster_core::ring::key_hash(key) as usize;
        &self.shards[h % SHARDS]
    }

    /// Adds a connection for `key`, within the per-key limit.
    pub fn register(self: &Arc<Self>, key: &str) -> Result<Subscription, RegisterError> {
        if self.closing.is_cancelled() {
            return Err(RegisterError::ShuttingDown);
        }
        let (tx, rx) = mpsc::channel(self.queue_depth);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = self.closing.child_token();
        {
            let mut map = lock(self.shard(key));
            let conns = map.entry(key.to_owned()).or_default();
            if conns.len() >= self.max_per_key {
                return Err(RegisterError::TooManySubscribers(conns.len()));
            }
            conns.push(ConnHandle {
                id,
                tx,
                close: close.clone(),
            });
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            rx,
            close,
            key: key.to_owned(),
            id,
            registry: self.clone(),
        })
    }

    fn unregister(&self, key: &str, id: u64) {
        let mut map = lock(self.shard(key));
        if let Some(conns) = map.get_mut(key) {
            let before = conns.len();
            conns.retain(|c| c.id != id);
            if conns.len() < before {
                self.connections.fetch_sub(1, Ordering::Relaxed);
            }
            if conns.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Queues `d` on every connection of `key`; returns how many took it.
    pub fn deliver(&self, key: &str, d: &Arc<Delivery>) -> u64 {
        let map = lock(self.shard(key));
        match map.get(key) {
            Some(conns) => conns.iter().filter(|c| self.offer(c, d)).count() as u64,
            None => 0,
        }
    }

    /// Queues `d` on every connection; returns how many took it.
    pub fn broadcast(&self, d: &Arc<Delivery>) -> u64 {
        let mut n = 0;
        for shard in &self.shards {
            let map = lock(shard);
            for c in map.values().flatten() {
                if self.offer(c, d) {
                    n += 1;
                }
            }
        }
        n
    }

    fn offer(&self, c: &ConnHandle, d: &Arc<Delivery>) -> bool {
        match c.tx.try_send(d.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !c.close.is_cancelled() {
                    self.slow_consumers.inc();
                    tracing::warn!(conn = c.id, "slow consumer: queue full, closing");
                    c.close.cancel();
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Closes every connection whose key `keep` rejects (keys that moved away).
    pub fn close_where(&self, keep: impl Fn(&str) -> bool) -> u64 {
        let mut n = 0;
        for shard in &self.shards {
            for (k, conns) in lock(shard).iter() {
                if !keep(k) {
                    for c in conns {
                        c.close.cancel();
                        n += 1;
                    }
                }
            }
        }
        n
    }

    /// Refuses new connections and closes every open one.
    pub fn close_all(&self) {
        self.closing.cancel();
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
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(mid: i64) -> Arc<Delivery> {
        Delivery::new(mid, 0, Bytes::from_static(b"{\"a\":1}"))
    }

    #[test]
    fn delivers_in_order_to_every_connection_of_a_key() {
        let r = Registry::new(4, 16, Counter::default());
        let mut a = r.register("k").unwrap();
        let mut b = r.register("k").unwrap();
        let mut other = r.register("x").unwrap();
        for mid in 1..=3 {
            assert_eq!(r.deliver("k", &d(mid)), 2);
        }
        for sub in [&mut a, &mut b] {
            let got: Vec<i64> = (0..3).map(|_| sub.rx.try_recv().unwrap().mid).collect();
            assert_eq!(got, vec![1, 2, 3]);
        }
        assert!(other.rx.try_recv().is_err());
        assert_eq!(r.connections(), 3);
        assert_eq!(r.keys(), 2);
    }

    #[test]
    fn per_key_limit() {
        let r = Registry::new(2, 16, Counter::default());
        let _a = r.register("k").unwrap();
        let b = r.register("k").unwrap();
        assert_eq!(
            r.register("k").err(),
            Some(RegisterError::TooManySubscribers(2))
        );
        drop(b);
        assert!(r.register("k").is_ok());
    }

    #[test]
    fn dropping_a_subscription_unregisters_it() {
        let r = Registry::new(2, 16, Counter::default());
        let a = r.register("k").unwrap();
        drop(a);
        assert_eq!(r.connections(), 0);
        assert_eq!(r.keys(), 0);
        assert_eq!(r.deliver("k", &d(1)), 0);
    }

    #[test]
    fn a_full_queue_closes_only_that_connection() {
        let r = Registry::new(4, 2, Counter::default());
        let slow = r.register("k").unwrap();
        let mut fast = r.register("k").unwrap();
        for mid in 1..=3 {
            r.deliver("k", &d(mid));
            let _ = fast.rx.try_recv();
        }
        assert!(slow.close.is_cancelled());
        assert!(!fast.close.is_cancelled());
        assert_eq!(r.slow_consumers.get(), 1);
    }

    #[test]
    fn broadcast_reaches_everyone_and_close_all_closes() {
        let r = Registry::new(4, 4, Counter::default());
        let mut subs: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|k| r.register(k).unwrap())
            .collect();
        assert_eq!(
            r.broadcast(&Delivery::new(1, 1, Bytes::from_static(b"1"))),
            3
        );
        for s in &mut subs {
            assert_eq!(s.rx.try_recv().unwrap().gid, 1);
        }
        r.close_all();
        assert!(subs.iter().all(|s| s.close.is_cancelled()));
        assert_eq!(r.register("d").err(), Some(RegisterError::ShuttingDown));
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
