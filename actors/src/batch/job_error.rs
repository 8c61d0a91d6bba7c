//! `JobError`: why a job could not finish, its stable `kind` for the status event, and the
//! retry policy: which failures are passing (worth another delivery) and how long the message
//! waits before it.

use std::time::Duration;

use crate::config::WorkerConfig;
use crate::delivery::lease::LeaseError;
use crate::delivery::lease_check::LeaseLost;
use crate::steps::StepCrashed;
use crate::steps::agent::AgentError;
use crate::steps::build::BuildError;
use crate::steps::git::GitError;
use crate::steps::git::subprocess::GitCommandError;
use crate::steps::publish::PublishError;

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
    Records(#[from] crate::delivery::records::RecordError),
    #[error("{0}")]
    Lease(#[from] LeaseError),
    #[error("{0}")]
    LeaseLost(#[from] LeaseLost),
    /// Stopped while waiting for another worker to hand the workspace over.
    #[error("stopped while waiting for the workspace's lease")]
    StoppedWaiting,
    /// The workspace's sandbox could not be set up (its uid, folders or permissions).
    #[error("{0}")]
    Sandbox(#[from] crate::tenant::sandbox::SandboxError),
    /// The work of an interrupted or failed job could not be made durable (pushed on its
    /// branch or kept under a saved ref upstream): its message is not deleted but tried again
    /// (issue 25). `ended_as`: how it would have ended.
    #[error("the {ended_as} job's work could not be saved upstream: {detail}")]
    WorkNotSaved {
        ended_as: &'static str,
        detail: String,
    },
}

impl JobError {
    /// A passing failure, worth another delivery: something we depend on was away (the git
    /// remote, S3, the model's API) or a step crashed. A broken build or an agent that hit its
    /// limits would fail the same way again.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            JobError::Git(
                GitError::NoWorkspace(_) | GitError::Diverged { .. } | GitError::UnknownCommit(_),
            ) => false,
            JobError::Git(_)
            | JobError::Push(_)
            | JobError::StepCrashed(_)
            | JobError::Records(_)
            | JobError::Lease(_)
            | JobError::LeaseLost(_)
            | JobError::StoppedWaiting
            | JobError::Sandbox(_)
            | JobError::WorkNotSaved { .. } => true,
            JobError::Publish(e) => !e.would_repeat(),
            JobError::Build(e) => matches!(e, BuildError::InstallFailed { .. }),
            JobError::Agent(e) => matches!(e.kind(), "agent_api_error" | "agent_no_result"),
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            JobError::Git(GitError::NoWorkspace(_)) => "workspace_missing",
            JobError::Git(GitError::Diverged { .. }) => "thread_diverged",
            // A deploy whose commit the repository no longer has cannot be rolled back to.
            JobError::Git(GitError::UnknownCommit(_)) => "unknown_deploy",
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
            JobError::WorkNotSaved { .. } => "work_not_saved",
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
                | JobError::Git(GitError::Command(GitCommandError::Stopped { .. }))
                | JobError::Push(GitError::Command(GitCommandError::Stopped { .. }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn config() -> WorkerConfig {
        let mut config = WorkerConfig::with_defaults("q");
        config.max_receives = 5;
        config.retry_base_delay = Duration::from_secs(5);
        config
    }

    #[test]
    fn what_would_fail_again_is_not_retried_and_what_was_away_is() {
        let build_failed = BuildError::BuildFailed {
            status: "exit 1".into(),
            log_tail: String::new(),
        };
        let install_failed = BuildError::InstallFailed {
            status: "exit 1".into(),
            log_tail: String::new(),
        };
        let refused = GitError::Command(GitCommandError::PushRefused {
            args: "push".into(),
            refused: Vec::new(),
        });
        let cases: Vec<(JobError, bool, &str)> = vec![
            (
                GitError::NoWorkspace(PathBuf::from("/w")).into(),
                false,
                "workspace_missing",
            ),
            (
                GitError::Diverged {
                    branch: "thread-t".into(),
                    detail: String::new(),
                }
                .into(),
                false,
                "thread_diverged",
            ),
            (build_failed.into(), false, "build_failed"),
            (install_failed.into(), true, "install_failed"),
            (BuildError::Cancelled.into(), false, "interrupted"),
            (StepCrashed("agent").into(), true, "step_crashed"),
            (JobError::Push(refused), true, "push_rejected"),
            (JobError::StoppedWaiting, true, "interrupted"),
        ];
        for (error, retryable, kind) in cases {
            assert_eq!(error.is_retryable(), retryable, "{error:?}");
            assert_eq!(error.kind(), kind, "{error:?}");
        }
    }

    #[test]
    fn a_passing_failure_waits_twice_as_long_each_delivery_up_to_a_limit() {
        let config = config();
        let away = JobError::StoppedWaiting;
        let delays: Vec<Option<u64>> = (1..=5)
            .map(|n| away.retry_delay(n, &config).map(|d| d.as_secs()))
            .collect();
        // The fifth delivery is the last (MAX_RECEIVES): it fails for good.
        assert_eq!(delays, [Some(5), Some(10), Some(20), Some(40), None]);
        let mut patient = config.clone();
        patient.max_receives = 100;
        assert_eq!(
            away.retry_delay(40, &patient),
            Some(Duration::from_secs(900)),
            "capped at 15 minutes"
        );
        let broken = JobError::Build(BuildError::EmptyCommand);
        assert_eq!(broken.retry_delay(1, &config), None);
    }

    #[test]
    fn only_another_holder_makes_a_lost_lease() {
        let fenced = || GitError::Fenced {
            fence_ref: "refs/edit-worker/fence".into(),
            token: 7,
            detail: String::new(),
        };
        assert!(JobError::Git(fenced()).is_lost_lease());
        assert!(JobError::Push(fenced()).is_lost_lease());
        let stopped = || {
            GitError::Command(GitCommandError::Stopped {
                args: "fetch".into(),
            })
        };
        assert!(JobError::Git(stopped()).is_lost_lease());
        assert!(JobError::Push(stopped()).is_lost_lease());
        assert!(!JobError::StoppedWaiting.is_lost_lease());
        assert!(!JobError::Push(GitError::NoWorkspace(PathBuf::new())).is_lost_lease());
    }
}
