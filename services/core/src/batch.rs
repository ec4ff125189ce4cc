//! Coalescing concurrent calls into batches, without waiting to fill them.
//!
//! A push crosses RPC hops (web → comet, and comet → message service on the
//! embedded store) and each call costs both sides far more CPU than the
//! message itself; on a busy node that CPU is what pushes latency up. A
//! [`Batcher`] sends a call as soon as fewer than `max_in_flight` batches are
//! outstanding; calls that arrive while the limit is reached queue up and
//! leave together in the next batch. An idle system therefore sends every
//! call alone and at once, and a loaded one sends fewer, larger calls: the
//! batch size follows the load.
//!
//! A call that finds a free slot and nobody queued is sent from the
//! caller's own task: no channel, no task woken in between (each wake-up is
//! a measurable share of a push's CPU, docs/benchmarks.md S3). Queued calls
//! are sent by a task spawned when a slot frees, so a caller that gives up
//! (its future dropped) never strands the calls of others.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Queued calls a batcher holds; further calls are refused until it drains.
const QUEUE: usize = 4096;

/// Why a batched call has no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the batcher's queue is full")]
    Full,
    #[error("the batch returned no result for this call")]
    NoResult,
}

/// Refuses a batch call with more than `max` items; `what` names them.
pub fn check_len(n: usize, max: usize, what: &str) -> Result<(), String> {
    if n > max {
        Err(format!("{n} {what} in one batch, more than {max}"))
    } else {
        Ok(())
    }
}

type Call<T, R> = dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Vec<R>> + Send>> + Send + Sync;

/// Sends items through `call` in batches; see the module docs.
pub struct Batcher<T, R> {
    shared: Arc<Shared<T, R>>,
}

struct Shared<T, R> {
    call: Box<Call<T, R>>,
    max_batch: usize,
    max_in_flight: usize,
    state: Mutex<State<T, R>>,
}

struct State<T, R> {
    in_flight: usize,
    queue: VecDeque<(T, oneshot::Sender<R>)>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// A batcher over `call` (queued calls are sent from tasks, so use it
    /// within a tokio runtime). `call` gets at most `max_batch` items and
    /// returns one result per item, in order.
    pub fn new<F, Fut>(max_batch: usize, max_in_flight: usize, call: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        Self {
            shared: Arc::new(Shared {
                call: Box::new(move |items| Box::pin(call(items))),
                max_batch: max_batch.max(1),
                max_in_flight: max_in_flight.max(1),
                state: Mutex::new(State {
                    in_flight: 0,
                    queue: VecDeque::new(),
                }),
            }),
        }
    }

    /// Sends `item` (alone, or with others queued meanwhile) and waits for its result.
    pub async fn call(&self, item: T) -> Result<R, BatchError> {
        let queued = {
            let mut st = self.shared.lock();
            if st.in_flight < self.shared.max_in_flight && st.queue.is_empty() {
                st.in_flight += 1;
                Err(item)
            } else if st.queue.len() >= QUEUE {
                return Err(BatchError::Full);
            } else {
                let (tx, rx) = oneshot::channel();
                st.queue.push_back((item, tx));
                Ok(rx)
            }
        };
        match queued {
            Ok(rx) => rx.await.map_err(|_| BatchError::NoResult),
            Err(item) => {
                // Ours alone, from this task. The slot goes back, or to the
                // calls queued meanwhile, when this is done or dropped.
                let _slot = Slot(self.shared.clone());
                let results = (self.shared.call)(vec![item]).await;
                results.into_iter().next().ok_or(BatchError::NoResult)
            }
        }
    }
}

/// A batch slot held by a caller sending its own call.
struct Slot<T: Send + 'static, R: Send + 'static>(Arc<Shared<T, R>>);

impl<T: Send + 'static, R: Send + 'static> Drop for Slot<T, R> {
    fn drop(&mut self) {
        let next = self.0.next_or_release();
        if let Some(batch) = next {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(self.0.clone().drive(batch));
                }
                // No runtime left to send them: their callers get NoResult.
                Err(_) => drop(batch),
            }
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Shared<T, R> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T, R>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next batch for a slot that is done, or the slot given back
    /// when nothing is queued.
    fn next_or_release(&self) -> Option<Vec<(T, oneshot::Sender<R>)>> {
        let mut st = self.lock();
        if st.queue.is_empty() {
            st.in_flight -= 1;
            return None;
        }
        let n = st.queue.len().min(self.max_batch);
        Some(st.queue.drain(..n).collect())
    }

    /// Sends queued batches on one slot until the queue is empty.
    async fn drive(self: Arc<Self>, first: Vec<(T, oneshot::Sender<R>)>) {
        let mut batch = Some(first);
        while let Some(b) = batch {
            let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = b.into_iter().unzip();
            let results = (self.call)(items).await;
            for (reply, r) in replies.into_iter().zip(results) {
                // The caller may have given up; nothing to do then.
                let _ = reply.send(r);
            }
            batch = self.next_or_release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[tokio::test]
    async fn alone_when_idle_together_when_busy() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let b = Arc::new(Batcher::new(8, 1, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                items.into_iter().map(|i| i * 10).collect()
            }
        }));
        // Idle: one call goes out alone, at once.
        assert_eq!(b.call(1).await, Ok(10));
        // Busy: 20 concurrent calls, one batch in flight at a time, at most 8
        // per batch; each gets its own result.
        let calls: Vec<_> = (0..20u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.unwrap(), Ok(i as u32 * 10));
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes[0], 1);
        assert_eq!(sizes[1..].iter().sum::<usize>(), 20);
        assert!(sizes[1..].iter().all(|&n| n <= 8), "{sizes:?}");
        // 20 calls in at most 8 per batch take 3 batches; a call or two may
        // still leave alone before the rest are queued.
        assert!(sizes.len() - 1 <= 6, "batches did not coalesce: {sizes:?}");
    }

    #[test]
    fn a_batch_over_the_limit_is_refused_with_its_size() {
        assert_eq!(check_len(256, 256, "pushes"), Ok(()));
        assert_eq!(
            check_len(257, 256, "pushes"),
            Err("257 pushes in one batch, more than 256".to_owned())
        );
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_strands_nobody_queued_behind_it() {
        let b = Arc::new(Batcher::new(8, 1, |items: Vec<u32>| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            items
        }));
        // The first caller sends alone, from its own task, and gives up.
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.call(0).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let queued: Vec<_> = (1..=5u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.unwrap(), Ok(i as u32 + 1));
        }
        // The slot came back: the next call goes alone again.
        assert_eq!(b.call(9).await, Ok(9));
    }

    #[tokio::test]
    async fn a_short_answer_is_an_error_not_a_hang() {
        let b = Batcher::new(4, 1, |_items: Vec<u32>| async { Vec::<u32>::new() });
        assert_eq!(b.call(1).await, Err(BatchError::NoResult));
    }
}
