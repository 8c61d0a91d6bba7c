//! Restart policy for supervisors (ractor leaves it to us): exponential backoff, and at most
//! `max_restarts` within `window`; past that the failure moves up one level.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;

#[derive(Debug, Clone)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    pub window: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Failures inside the current window, oldest first.
    recent: VecDeque<Instant>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy::new(5, Duration::from_secs(60))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("gave up after {failures} failures within {window:?}")]
pub struct GiveUp {
    pub failures: usize,
    pub window: Duration,
}

impl RestartPolicy {
    pub fn new(max_restarts: usize, window: Duration) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            window,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            recent: VecDeque::new(),
        }
    }

    /// Record a failure; the delay before the restart, or `GiveUp` past the limit.
    pub fn record_failure(&mut self) -> Result<Duration, GiveUp> {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let failures = self.recent.len();
        if failures > self.max_restarts {
            return Err(GiveUp {
                failures,
                window: self.window,
            });
        }
        Ok(Backoff::after(
            self.base_backoff,
            self.max_backoff,
            failures,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_gives_up() {
        let mut p = RestartPolicy::new(3, Duration::from_secs(60));
        assert_eq!(p.record_failure(), Ok(Duration::from_millis(100)));
        assert_eq!(p.record_failure(), Ok(Duration::from_millis(200)));
        assert_eq!(p.record_failure(), Ok(Duration::from_millis(400)));
        assert!(p.record_failure().is_err());
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut p = RestartPolicy::new(1, Duration::from_millis(10));
        p.record_failure().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(p.record_failure().is_ok());
    }
}
