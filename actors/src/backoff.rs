//! One exponential backoff for every retry loop: the first delay, doubled after each failure up
//! to a ceiling, back to the first after a success.

use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    /// Failures since the last success: the delay follows from it (`after`).
    failures: usize,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            failures: 0,
        }
    }

    /// The delay to wait after this failure; the next one waits twice as long (up to `max`).
    pub(crate) fn failed(&mut self) -> Duration {
        self.failures += 1;
        Backoff::after(self.first, self.max, self.failures)
    }

    /// A success: the next failure waits the first delay again.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// The delay after the `failures`-th failure in a row (1 is the first), without state:
    /// for callers that count failures themselves (a restart limit's window).
    pub(crate) fn after(first: Duration, max: Duration, failures: usize) -> Duration {
        let doublings = failures.saturating_sub(1).min(30) as u32;
        first.saturating_mul(1u32 << doublings).min(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_ceiling_and_starts_over_after_a_success() {
        let mut b = Backoff::new(100 * MS, 350 * MS);
        assert_eq!(b.failed(), 100 * MS);
        assert_eq!(b.failed(), 200 * MS);
        assert_eq!(b.failed(), 350 * MS);
        assert_eq!(b.failed(), 350 * MS);
        b.succeeded();
        assert_eq!(b.failed(), 100 * MS);
    }

    #[test]
    fn after_counted_failures_matches_the_stateful_form() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS);
        for failures in 1..=12 {
            assert_eq!(Backoff::after(100 * MS, 10_000 * MS, failures), b.failed());
        }
        // Far past any shift width: still the ceiling, no overflow.
        assert_eq!(Backoff::after(100 * MS, 10_000 * MS, 1_000), 10_000 * MS);
    }
}
