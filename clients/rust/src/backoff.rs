//! Pauses between reconnection attempts: doubling from a short first one up
//! to a cap, each a random time between half and all of its step. When a
//! comet or Redis comes back, clients that lost it together then spread
//! their attempts out instead of arriving in the same instant, and a
//! cluster that stays down is asked less and less often.

use std::time::Duration;

/// Exponential backoff with jitter; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Steps from `first`, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            step: first,
        }
    }

    /// The pause before the next attempt (and doubles the step after it).
    pub fn next_pause(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step / 2 + step.mul_f64(rand::random::<f64>() / 2.0)
    }

    /// Back to the first step (an attempt succeeded).
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        for step in [100, 200, 400, 800, 800] {
            let p = b.next_pause();
            let step = Duration::from_millis(step);
            assert!(p >= step / 2 && p <= step, "{p:?} for a step of {step:?}");
        }
        b.reset();
        assert!(b.next_pause() <= Duration::from_millis(100));
        // Jitter: a hundred pauses of one step are not all the same.
        let pauses: std::collections::BTreeSet<Duration> = (0..100)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
                b.next_pause()
            })
            .collect();
        assert!(pauses.len() > 10, "{pauses:?}");
    }
}
