//! The waits between tries of something that failed and is tried again: doubling from a first wait up to a
//! longest one. One helper for every retry loop of the server (the store writer, a key's in-flight slot, a final
//! status, shutdown), so that each says only what it retries and how long it may wait.

use std::time::Duration;

/// Exponential backoff without jitter (the loops that use it retry one local resource, never a crowd of clients
/// against one server: the upstream's and webhooks' retries add jitter of their own).
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, failures: 0 }
    }

    /// The wait after `failures` failures in a row (the first failure waits `first`), without changing anything.
    pub fn after(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        self.first.saturating_mul(1 << (failures - 1).min(20)).min(self.max)
    }

    /// Counts one more failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.after(self.failures)
    }

    /// How many failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A try succeeded: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_first_wait_up_to_the_longest() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let waits: Vec<_> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.failures(), 9);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
        assert_eq!(b.after(0), Duration::ZERO);
        assert_eq!(b.after(u32::MAX), Duration::from_secs(5));
    }
}
