//! `JobError`: why a job could not finish, its stable `kind` for the status event, and the
//! retry policy: which failures are passing (worth another delivery) and how long the message
//! waits before it.

use std::time::Duration;

use crate::agent::AgentError;
use crate::build::BuildError;
use crate::config::WorkerConfig;
use crate::git::GitError;
use crate::git::subprocess::GitCommandError;
use crate::lease::{LeaseError, LeaseLost};
use crate::publish::PublishError;
use crate::steps::StepCrashed;

/// Why a job could not finish.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    #[error("{0}")]
    Git(#[from] GitError),
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("{0}")]
    Publish(#[from] PublishError),
    #[error("{0}")]
    StepCrashed(#[from] StepCrashed),
    #[error("push failed: {0}")]
    Push(GitError),
    #[error("{0}")]
    Records(#[from] crate::records::RecordError),
    #[error("{0}")]
    Lease(#[from] LeaseError),
    #[error("{0}")]
    LeaseLost(#[from] LeaseLost),
    /// Stopped while waiting for another worker to hand the workspace over.
    #[error("stopped while waiting for the workspace's lease")]
    StoppedWaiting,
    /// The workspace's sandbox could not be set up (its uid, folders or permissions).
    #[error("{0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

impl JobError {
    /// A passing failure, worth another delivery: something we depend on was away (the git
    /// remote, S3, the model's API) or a step crashed. A broken build or an agent that hit its
    /// limits would fail the same way again.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            JobError::Git(GitError::NoWorkspace(_) | GitError::Diverged { .. }) => false,
            JobError::Git(_)
            | JobError::Push(_)
            | JobError::StepCrashed(_)
            | JobError::Records(_)
            | JobError::Lease(_)
            | JobError::LeaseLost(_)
            | JobError::StoppedWaiting
            | JobError::Sandbox(_) => true,
            JobError::Publish(e) => !e.would_repeat(),
            JobError::Build(e) => matches!(e, BuildError::InstallFailed { .. }),
            JobError::Agent(e) => matches!(e.kind(), "agent_api_error" | "agent_no_result"),
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            JobError::Git(GitError::NoWorkspace(_)) => "workspace_missing",
            JobError::Git(GitError::Diverged { .. }) => "thread_diverged",
            JobError::Git(_) => "git_failed",
            JobError::Agent(e) => e.kind(),
            JobError::Build(e) => e.kind(),
            JobError::Publish(e) => e.kind(),
            JobError::StepCrashed(_) => "step_crashed",
            JobError::Push(GitError::Command(GitCommandError::PushRefused { .. })) => {
                "push_rejected"
            }
            JobError::Push(_) => "push_failed",
            JobError::Records(_) => "record_store_failed",
            JobError::Lease(_) => "lease_store_failed",
            JobError::LeaseLost(_) => "lease_lost",
            JobError::StoppedWaiting => "interrupted",
            JobError::Sandbox(_) => "sandbox_failed",
        }
    }

    /// The workspace has another holder now: nothing of this job may be pushed or published,
    /// and its messages go back to the queue for the holder.
    pub(crate) fn is_lost_lease(&self) -> bool {
        matches!(
            self,
            JobError::LeaseLost(_)
                | JobError::Git(GitError::Fenced { .. })
                | JobError::Push(GitError::Fenced { .. })
                | JobError::Publish(PublishError::LeaseLost(_) | PublishError::Fenced { .. })
        )
    }

    /// The retry policy: a passing failure goes back to the queue, to be delivered again after
    /// a delay that doubles with each delivery (`RETRY_BASE_SECONDS`, at most 15 minutes), until
    /// the message has been delivered `MAX_RECEIVES` times. `None`: it fails now, for good.
    pub(crate) fn retry_delay(
        &self,
        receive_count: u32,
        config: &WorkerConfig,
    ) -> Option<Duration> {
        if !self.is_retryable() || receive_count >= config.max_receives {
            return None;
        }
        let factor = 1u32 << receive_count.saturating_sub(1).min(10);
        Some((config.retry_base_delay * factor).min(Duration::from_secs(900)))
    }
}
