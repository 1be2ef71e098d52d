//! The breaker of one upstream: after `failures` attempts in a row failed (a connect error, a timeout before the
//! headers, a 429 or a 5xx that is retried), the upstream is skipped for `cool_down`; then one call is let through
//! (a trial): if it is answered the breaker closes, if it fails the upstream is skipped for another cool-down. A
//! trial that never reports (its request was cancelled) frees its place after a cool-down.
//!
//! The state is this process's own: each node of a cluster finds out for itself.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// When an upstream is skipped, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failed attempts in a row that open the breaker (at least 1).
    pub failures: u32,
    pub cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self { failures: 5, cool_down: Duration::from_secs(30) }
    }
}

#[derive(Debug)]
enum State {
    Closed {
        failed: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is out since then.
    Trial {
        since: Instant,
    },
}

#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Self { policy, state: Mutex::new(State::Closed { failed: 0 }) }
    }

    /// Whether a call may go now; a call let through after the cool-down is the trial (the next ones wait for
    /// its outcome).
    pub fn allows(&self) -> bool {
        self.allows_at(Instant::now())
    }

    fn allows_at(&self, now: Instant) -> bool {
        let mut state = self.state.lock();
        let Some(due) = self.trial_due(&state) else { return true };
        if now < due {
            return false;
        }
        *state = State::Trial { since: now };
        true
    }

    /// When the next trial is due (`None`: the breaker is closed).
    fn trial_due(&self, state: &State) -> Option<Instant> {
        match *state {
            State::Closed { .. } => None,
            State::Open { until } => Some(until),
            State::Trial { since } => Some(since + self.policy.cool_down),
        }
    }

    /// Whether [`Self::allows`] would let a call through now (without taking the trial).
    pub fn would_allow(&self) -> bool {
        self.trial_due(&self.state.lock()).is_none_or(|due| Instant::now() >= due)
    }

    /// Whether calls are being skipped (for the metrics).
    pub fn is_open(&self) -> bool {
        !matches!(*self.state.lock(), State::Closed { .. })
    }

    /// An attempt was answered (whatever its status, unless it is one that is retried): the breaker closes.
    pub fn answered(&self) {
        *self.state.lock() = State::Closed { failed: 0 };
    }

    /// An attempt failed; `true` if this opened the breaker.
    pub fn failed(&self) -> bool {
        self.failed_at(Instant::now())
    }

    fn failed_at(&self, now: Instant) -> bool {
        let mut state = self.state.lock();
        let open = match *state {
            State::Closed { failed } if failed + 1 < self.policy.failures.max(1) => {
                *state = State::Closed { failed: failed + 1 };
                false
            }
            // An upstream already skipped stays so; its cool-down starts again.
            _ => true,
        };
        if open {
            *state = State::Open { until: now + self.policy.cool_down };
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerPolicy { failures: 2, cool_down: Duration::from_secs(30) })
    }

    #[test]
    fn opens_after_failures_in_a_row_and_lets_one_trial_through_after_the_cool_down() {
        let b = breaker();
        let now = Instant::now();
        assert!(b.allows_at(now));
        assert!(!b.failed_at(now));
        assert!(b.failed_at(now), "the second failure in a row opens it");
        assert!(!b.allows_at(now + Duration::from_secs(29)));
        assert!(b.allows_at(now + Duration::from_secs(31)), "the trial");
        assert!(!b.allows_at(now + Duration::from_secs(32)), "one trial at a time");
        b.answered();
        assert!(b.allows_at(now + Duration::from_secs(32)) && !b.is_open());
    }

    #[test]
    fn an_answer_resets_the_count_and_a_failed_trial_opens_it_again() {
        let b = breaker();
        let now = Instant::now();
        b.failed_at(now);
        b.answered();
        assert!(!b.failed_at(now), "not in a row");
        b.failed_at(now);
        assert!(b.allows_at(now + Duration::from_secs(31)));
        assert!(b.failed_at(now + Duration::from_secs(31)));
        assert!(!b.allows_at(now + Duration::from_secs(60)), "a new cool-down from the failed trial");
        assert!(b.allows_at(now + Duration::from_secs(62)));
    }

    #[test]
    fn a_trial_that_never_reports_frees_its_place_after_a_cool_down() {
        let b = breaker();
        let now = Instant::now();
        b.failed_at(now);
        b.failed_at(now);
        assert!(b.allows_at(now + Duration::from_secs(31)));
        assert!(!b.allows_at(now + Duration::from_secs(40)));
        assert!(b.allows_at(now + Duration::from_secs(62)));
    }
}
