//! Coalescing concurrent calls into batches, without waiting to fill them.
//!
//! A push crosses RPC hops (web → comet, and comet → message service on the
//! embedded store) and each call costs both sides far more CPU than the
//! message itself; on a busy node that CPU is what pushes latency up. A
//! [`Batcher`] sends a call as
//! soon as fewer than `max_in_flight` batches are outstanding; calls that
//! arrive while the limit is reached queue up and leave together in the next
//! batch. An idle system therefore sends every call alone and at once, and a
//! loaded one sends fewer, larger calls: the batch size follows the load.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Queued calls a batcher holds before callers wait for room.
const QUEUE: usize = 4096;

/// Why a batched call has no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the batcher is shut down")]
    Closed,
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

/// Sends items through `call` in batches; see the module docs.
pub struct Batcher<T, R> {
    tx: mpsc::Sender<(T, oneshot::Sender<R>)>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the batcher's task (call within a tokio runtime). `call` gets
    /// at most `max_batch` items and returns one result per item, in order.
    pub fn new<F, Fut>(max_batch: usize, max_in_flight: usize, call: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, max_batch.max(1), max_in_flight.max(1), call));
        Self { tx }
    }

    /// Queues `item` and waits for its result.
    pub async fn call(&self, item: T) -> Result<R, BatchError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((item, tx))
            .await
            .map_err(|_| BatchError::Closed)?;
        rx.await.map_err(|_| BatchError::NoResult)
    }
}

async fn run<T, R, F, Fut>(
    mut rx: mpsc::Receiver<(T, oneshot::Sender<R>)>,
    max_batch: usize,
    max_in_flight: usize,
    call: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_in_flight));
    loop {
        // A slot first, then the queue: while every slot is taken, calls
        // gather in the queue and leave together.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut items = vec![first];
        while items.len() < max_batch {
            match rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let (batch, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = items.into_iter().unzip();
        let sent = call(batch);
        tokio::spawn(async move {
            let results = sent.await;
            for (reply, r) in replies.into_iter().zip(results) {
                // The caller may have given up; nothing to do then.
                let _ = reply.send(r);
            }
            drop(slot);
        });
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
    async fn a_short_answer_is_an_error_not_a_hang() {
        let b = Batcher::new(4, 1, |_items: Vec<u32>| async { Vec::<u32>::new() });
        assert_eq!(b.call(1).await, Err(BatchError::NoResult));
    }
}
