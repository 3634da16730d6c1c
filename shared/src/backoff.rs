//! Waits between attempts to reach a dependency that is away (a broker or a store restarting):
//! doubling from a floor to a ceiling, each wait drawn at random below its bound ("full
//! jitter"), so that a fleet reconnecting at once does not hit the dependency in step.

use std::time::{Duration, SystemTime};

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    floor: Duration,
    ceiling: Duration,
    bound: Duration,
}

impl Backoff {
    /// Waits of at most `floor` at first, doubling up to `ceiling`.
    pub fn new(floor: Duration, ceiling: Duration) -> Self {
        Self {
            floor,
            ceiling: ceiling.max(floor),
            bound: floor,
        }
    }

    /// For reconnecting to the broker or the store: 100 ms at first, at most 5 s.
    pub fn reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The next wait; the one after may be twice as long.
    pub fn next_wait(&mut self) -> Duration {
        let bound = self.bound;
        self.bound = (self.bound * 2).min(self.ceiling);
        // Jitter from the clock's nanoseconds: no need for a random generator here.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let fraction = f64::from(nanos % 1_000_000) / 1_000_000.0;
        (bound.mul_f64(fraction)).max(self.floor / 10)
    }

    /// Back to the shortest waits, after a success.
    pub fn reset(&mut self) {
        self.bound = self.floor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_ceiling_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<_> = (0..8).map(|_| backoff.next_wait()).collect();
        let bounds = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (wait, bound) in waits.iter().zip(bounds) {
            assert!(*wait <= Duration::from_millis(bound), "{waits:?}");
            assert!(*wait >= Duration::from_millis(10), "{waits:?}");
        }
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(100));
    }
}
