//! Pushing the thread's branch (under the lease, with its fence), and saving unfinished work:
//! whatever the worktree holds is committed as `Interrupted - saving work` and pushed, so that
//! an interrupted, failed or shut-down job never throws work away.

use std::time::Instant;

use tracing::{Instrument, info_span};

use crate::batch::{batch_ids, batch_prompt};
use crate::batch_lease::LeaseScope;
use crate::context::WorkerContext;
use crate::git::SAVE_MESSAGE;
use crate::job::Job;
use crate::job_error::JobError;
use crate::journal::Journal;
use crate::steps::{GitMsg, Steps};

/// Push `branch` to the upstream, while the lease still holds.
pub(crate) async fn push(
    ctx: &WorkerContext,
    steps: &Steps,
    branch: &str,
    scope: &LeaseScope,
    journal: &mut Journal,
) -> Result<(), JobError> {
    scope.check.check()?;
    let t = Instant::now();
    let pushed = steps
        .git
        .ask(|reply| GitMsg::Push {
            branch: branch.to_owned(),
            attempts: ctx.config.push_attempts,
            fence: scope.fence.clone(),
            reply,
        })
        .instrument(info_span!("push", branch))
        .await?;
    journal.time("push", t);
    pushed.map_err(JobError::Push)
}

/// Commit whatever the worktree holds as saved work and push it. The push runs even when
/// there was nothing new to commit: work stopped during the build was committed already, and
/// must still reach the upstream. Failures here are logged: the work then stays committed (or
/// in the worktree) locally and is saved by the next job.
pub(crate) async fn save_work(
    ctx: &WorkerContext,
    steps: &Steps,
    working: &[&Job],
    scope: &LeaseScope,
    journal: &mut Journal,
) {
    let Some(lead) = working.first() else {
        return;
    };
    let body = format!("Saved while working on:\n\n{}", batch_prompt(working));
    let t = Instant::now();
    let saved = steps
        .git
        .ask(|reply| GitMsg::CommitAll {
            subject: SAVE_MESSAGE.into(),
            body,
            message_ids: batch_ids(working),
            finished: false,
            reply,
        })
        .await;
    journal.time("commit", t);
    match saved {
        Ok(Ok(commit)) => {
            if commit.is_some() {
                journal.commit = commit;
            }
            if let Err(e) = push(ctx, steps, &lead.request.branch(), scope, journal).await {
                tracing::warn!(error = %e, "saved work not pushed");
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "could not save unfinished work"),
        Err(e) => tracing::error!(error = %e, "could not save unfinished work"),
    }
}
