//! Pushing the thread's branch (under the lease, with its fence), and saving unfinished work:
//! whatever the worktree holds is committed as `Interrupted - saving work` and pushed, so that
//! an interrupted, failed or shut-down job never throws work away.

use std::time::Instant;

use tracing::{Instrument, info_span};

use crate::batch::context::WorkerContext;
use crate::batch::job_error::JobError;
use crate::batch::journal::Journal;
use crate::batch::lease_scope::LeaseScope;
use crate::batch::run::{batch_ids, batch_prompt};
use crate::delivery::job::Job;
use crate::steps::git::SAVE_MESSAGE;
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
/// must still reach the upstream. When the branch cannot be pushed, the saved commit is kept on
/// the upstream under a ref of its own (`refs/edit-worker/saved/{branch}/{messageId}`, named in
/// the terminal events as `savedRef`). `Ok`: the work is durable (or there was none);
/// `Err(why)`: it is only in this checkout, and its messages must not be deleted (issue 25).
pub(crate) async fn save_work(
    ctx: &WorkerContext,
    steps: &Steps,
    working: &[&Job],
    scope: &LeaseScope,
    journal: &mut Journal,
) -> Result<(), String> {
    let Some(lead) = working.first() else {
        return Ok(());
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
    let commit = match saved {
        Ok(Ok(commit)) => commit,
        Ok(Err(e)) => return Err(format!("could not commit the unfinished work: {e}")),
        Err(e) => return Err(format!("could not commit the unfinished work: {e}")),
    };
    if commit.is_some() {
        journal.commit = commit;
    }
    let branch = lead.request.branch();
    let pushed = match push(ctx, steps, &branch, scope, journal).await {
        Ok(()) => return Ok(()),
        // Not under a lease that is over: the upstream is the next holder's now.
        Err(e) if e.is_lost_lease() => return Err(e.to_string()),
        Err(e) => e,
    };
    tracing::warn!(error = %pushed, "saved work not pushed on its branch; keeping it under a saved ref");
    scope.check.check().map_err(|e| e.to_string())?;
    let kept = steps
        .git
        .ask(|reply| GitMsg::PushSaved {
            branch: branch.clone(),
            message_id: lead.message_id.clone(),
            reply,
        })
        .await;
    match kept {
        Ok(Ok(saved_ref)) => {
            tracing::info!(%saved_ref, "saved work kept upstream under a ref of its own");
            journal.saved_ref = Some(saved_ref);
            Ok(())
        }
        Ok(Err(e)) => Err(format!("{pushed}; and under a saved ref: {e}")),
        Err(e) => Err(format!("{pushed}; and under a saved ref: {e}")),
    }
}
