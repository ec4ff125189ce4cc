//! Wakes the connections a broadcast reached a slice at a time, so frames
//! of consecutive broadcasts coalesce on a single-threaded runtime.

use super::lock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;

/// Connections woken per slice of a broadcast: about the runtime's
/// `event_interval` (61 tasks between polls of its sockets), so a broadcast
/// read meanwhile waits at most one slice for its turn.
pub(super) const WAKE_SLICE: usize = 128;

/// Wakes the connections broadcasts reached, a slice at a time, yielding to
/// the runtime between slices.
///
/// Why not wake them all at once: on a runtime with one thread, the 10,000
/// connections a broadcast wakes would all run (each writing one frame)
/// before the task that reads the next broadcast; frames would never queue
/// up and leave in one write (docs/benchmarks.md, S2: 117k deliveries per
/// CPU-s on one thread against 1.1M on two). Between slices the runtime
/// polls its sockets, the next broadcast is read and queued behind the
/// first on every connection not yet woken, and each of them then writes
/// both in one go: the batch size follows the load, as on several threads.
/// A private push wakes its key's connections at once.
#[derive(Debug, Default)]
pub(super) struct Pacer {
    waiting: Mutex<VecDeque<Waker>>,
    running: AtomicBool,
}

impl Pacer {
    /// Wakes `wakers`, in slices on a single-threaded runtime. Elsewhere at
    /// once: there another thread reads the next broadcast while these write
    /// (pacing there halved S2's deliveries per CPU-s).
    pub(super) fn wake(self: &Arc<Self>, wakers: Vec<Waker>) {
        if wakers.is_empty() {
            return;
        }
        let rt = match tokio::runtime::Handle::try_current() {
            Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => rt,
            _ => {
                wakers.into_iter().for_each(Waker::wake);
                return;
            }
        };
        lock(&self.waiting).extend(wakers);
        if !self.running.swap(true, Ordering::SeqCst) {
            let pacer = self.clone();
            rt.spawn(async move { pacer.run().await });
        }
    }

    async fn run(&self) {
        loop {
            let slice: Vec<Waker> = {
                let mut waiting = lock(&self.waiting);
                let n = waiting.len().min(WAKE_SLICE);
                waiting.drain(..n).collect()
            };
            if slice.is_empty() {
                self.running.store(false, Ordering::SeqCst);
                // Wakers queued between the drain and the store saw `running`
                // set and started no task: take them on, unless one just did.
                if lock(&self.waiting).is_empty() || self.running.swap(true, Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            slice.into_iter().for_each(Waker::wake);
            tokio::task::yield_now().await;
        }
    }
}
