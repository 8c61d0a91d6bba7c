//! What a holder's effects are fenced by: whether its lease on a workspace still holds
//! (`LeaseCheck`), and the error when it does not (`LeaseLost`). A leaf, so that the record
//! store, the thread documents and the publisher can check a lease without knowing how leases
//! are taken and renewed (`lease.rs`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// This worker lost the workspace's lease: another worker may hold it now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the lease of workspace {workspace} (token {token}) was lost; another worker may hold it")]
pub struct LeaseLost {
    pub workspace: String,
    pub token: u64,
}

/// Whether a lease still holds, cheap to clone into whatever must check it before an effect
/// (a push, a publish). It fails once the heartbeat found the lease gone, or once the lease's
/// time (by this worker's monotonic clock, less the clock-skew allowance) ran out without a
/// renewal. The heartbeat also cancels `lost` at that moment, whatever its own write is doing.
#[derive(Clone)]
pub struct LeaseCheck {
    workspace: String,
    token: u64,
    lost: CancellationToken,
    /// Until when the lease surely holds; `None` when alone (always).
    valid_until: Option<Arc<Mutex<Instant>>>,
}

impl LeaseCheck {
    pub(crate) fn check(&self) -> Result<(), LeaseLost> {
        let expired = self
            .valid_until
            .as_ref()
            .is_some_and(|until| Instant::now() >= *until.lock().expect("valid_until"));
        if self.lost.is_cancelled() || expired {
            return Err(LeaseLost {
                workspace: self.workspace.clone(),
                token: self.token,
            });
        }
        Ok(())
    }

    /// Cancelled when the heartbeat finds the lease lost.
    pub(crate) fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// The token of the lease this checks (0 when alone): what fenced writes carry.
    pub(crate) fn token(&self) -> u64 {
        self.token
    }

    /// The check of a lease held with `token` until `valid_until` (by this worker's monotonic
    /// clock; the heartbeat moves it on with each renewal) or until its `lost` is cancelled.
    pub(crate) fn held(
        workspace: String,
        token: u64,
        valid_until: Arc<Mutex<Instant>>,
    ) -> LeaseCheck {
        LeaseCheck {
            workspace,
            token,
            lost: CancellationToken::new(),
            valid_until: Some(valid_until),
        }
    }

    /// The check of a worker that is alone (no lease store): always holds, token 0. For
    /// writes made outside a batch's lease (and tests).
    pub(crate) fn unfenced(workspace: &str) -> LeaseCheck {
        LeaseCheck {
            workspace: workspace.to_owned(),
            token: 0,
            lost: CancellationToken::new(),
            valid_until: None,
        }
    }

    /// A check that holds with `token` until `lost` is cancelled (tests).
    #[cfg(test)]
    pub(crate) fn with_token(token: u64, lost: CancellationToken) -> LeaseCheck {
        LeaseCheck {
            workspace: "test".into(),
            token,
            lost,
            valid_until: None,
        }
    }
}
