//! Asking running work to stop, out of band, and why: the one signal a session, a lost lease
//! and a shutdown share with the agent, the build and the slots a job waits for. A leaf: it
//! knows nothing of jobs or sessions.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// Why running work was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A newer message arrived for the same workspace.
    Interrupted,
    /// The worker is shutting down: save the work and release the message.
    Shutdown,
    /// The workspace's lease was lost (another worker may hold it): stop, touch nothing the
    /// next holder owns (no push, no publish), release the message for the next holder.
    LeaseLost,
}

impl StopReason {
    /// Its name in metrics (`edit_worker.interrupt.latency`'s `reason`): stable, lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Interrupted => "interrupted",
            StopReason::Shutdown => "shutdown",
            StopReason::LeaseLost => "lease_lost",
        }
    }
}

/// Asks running work to stop, out of band: the job checks the token while it runs, so a stop
/// never waits behind a mailbox. The first reason given wins.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
    /// When the first stop was asked for (interrupt latency is measured from here).
    requested_at: Arc<OnceLock<Instant>>,
}

impl StopSignal {
    pub fn request(&self, reason: StopReason) {
        let _ = self.requested_at.set(Instant::now());
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn requested_at(&self) -> Option<Instant> {
        self.requested_at.get().copied()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stop_reason_wins_and_its_time_is_kept() {
        let stop = StopSignal::default();
        assert!(!stop.token().is_cancelled());
        assert_eq!((stop.reason(), stop.requested_at()), (None, None));
        // The session holds one clone, the running job another.
        let running = stop.clone();
        stop.request(StopReason::Interrupted);
        let first = running.requested_at().expect("when it was asked");
        stop.request(StopReason::Shutdown);
        assert!(running.token().is_cancelled());
        assert_eq!(running.reason(), Some(StopReason::Interrupted));
        assert_eq!(running.requested_at(), Some(first));
    }
}
