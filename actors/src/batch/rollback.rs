//! A rollback message's work, after the workspace is prepared (`execute.rs`): its own short
//! path, with no agent and no build. In order:
//!
//! 1. **resolve** (timed as `prepare`): the deploy its `to` names, from the bucket's deploy
//!    records (`unknown_deploy` when there is none);
//! 2. **commit**: `Rollback to {short}` on the thread's branch, with that deploy's commit's tree
//!    (history kept: the next edit on the thread builds on it);
//! 3. **restore** (timed as `publish`): the bucket made to hold exactly that deploy's files
//!    again, by server-side copies in the publisher's order (`restore.rs`), recorded as a new
//!    deploy;
//! 4. **push**, with the lease's fences, as every push.
//!
//! It runs under the workspace's lease like any job, and a newer message interrupts it as it
//! interrupts any work (the restore itself, like a publish, is not cut short half-way).

use std::time::Instant;

use tracing::field::Empty;
use tracing::{Instrument, info_span};

use crate::batch::job_error::JobError;
use crate::batch::journal::Journal;
use crate::batch::push::push;
use crate::batch::run::BatchRun;
use crate::contract::message::RollbackTarget;
use crate::delivery::job::Job;
use crate::steps::publish::PublishError;
use crate::steps::publish::deploys::{DeployMeta, RolledBackTo};
use crate::steps::{GitMsg, PublisherMsg};

/// Roll `job`'s workspace back to the deploy `target` names. `Ok` when it completed.
pub(crate) async fn rollback(
    run: &BatchRun<'_>,
    job: &Job,
    target: &RollbackTarget,
    journal: &mut Journal,
) -> Result<(), JobError> {
    let BatchRun {
        ctx, steps, scope, ..
    } = *run;
    let request = &job.request;
    let workspace = request.workspace();
    let bucket = ctx.config.bucket_for(&workspace);
    let branch = request.branch();

    // 1. Which deploy.
    let t = Instant::now();
    let span = info_span!("resolve deploy", to = %target, deploy_id = Empty, commit = Empty);
    let resolved = steps
        .publisher
        .ask(|reply| PublisherMsg::Resolve {
            workspace: workspace.clone(),
            bucket: bucket.clone(),
            target: target.clone(),
            reply,
        })
        .instrument(span.clone())
        .await??;
    // The contract's phases: finding the deploy is part of getting ready, the bucket's work
    // is the publish (the spans say `resolve deploy` and `restore deploy`).
    journal.time("prepare", t);
    let goal = resolved.record;
    span.record("deploy_id", goal.deploy_id.as_str());
    span.record("commit", goal.commit.as_str());
    tracing::info!(to = %target, deploy_id = %goal.deploy_id, commit = %goal.commit, live = %resolved.live, "rolling back");
    let rolled_back_to = RolledBackTo {
        deploy_id: goal.deploy_id.clone(),
        commit: goal.commit.clone(),
    };

    // 2. The branch gets the deploy's tree, as a new commit.
    let t = Instant::now();
    let commit = steps
        .git
        .ask(|reply| GitMsg::RollbackTo {
            target: goal.commit.clone(),
            message_id: job.message_id.clone(),
            reply,
        })
        .instrument(info_span!("rollback commit", target = %goal.commit))
        .await??;
    journal.time("commit", t);
    journal.commit = Some(commit.clone());

    // 3. The bucket gets the deploy's files. Like a publish, not cut short by an interrupt.
    scope.check.check()?;
    let t = Instant::now();
    let span = info_span!(
        "restore deploy",
        bucket = %bucket,
        deploy_id = %goal.deploy_id,
        copied = Empty,
        skipped = Empty,
        deleted = Empty,
        error = Empty
    );
    let deploy = DeployMeta {
        commit: commit.clone(),
        thread_id: request.thread_id.clone(),
        message_id: job.message_id.clone(),
        rolled_back_to: Some(rolled_back_to.clone()),
    };
    let restored = steps
        .publisher
        .ask(|reply| PublisherMsg::Restore {
            workspace: workspace.clone(),
            bucket: bucket.clone(),
            target: Box::new(goal),
            fence: scope.bucket_fence.clone(),
            deploy,
            reply,
        })
        .instrument(span.clone())
        .await?;
    journal.time("publish", t);
    let report = match restored {
        Ok(report) => report,
        Err(e) => {
            span.record("error", e.kind());
            if !matches!(e, PublishError::LeaseLost(_) | PublishError::Fenced { .. }) {
                // The rollback commit is on the branch: it reaches the upstream either way.
                push(ctx, steps, &branch, scope, journal).await?;
            }
            return Err(e.into());
        }
    };
    span.record("copied", report.uploaded);
    span.record("skipped", report.skipped);
    span.record("deleted", report.deleted);
    crate::telemetry::metrics::metrics().rollbacks.add(1, &[]);
    // The bucket holds this commit's build now: the next edit's build is compared with it.
    let marker = ctx
        .config
        .workspace_dir(&workspace)
        .join(".git/edit-worker/published");
    if let Err(e) = tokio::fs::write(&marker, format!("{commit} {bucket}")).await {
        tracing::warn!(error = %e, "could not record the published commit");
    }
    if let (Some(invalidator), Some(distribution)) = (
        &ctx.invalidator,
        ctx.config.cloudfront_distributions.get(&request.client_id),
    ) && !report.changed.is_empty()
    {
        let reference = format!("{}-{commit}", job.message_id);
        match invalidator
            .invalidate(distribution, &report.changed, &reference)
            .instrument(info_span!("invalidate cdn", distribution = %distribution))
            .await
        {
            Ok(id) => journal.invalidation_id = Some(id),
            Err(e) => tracing::warn!(%distribution, error = %e, "CloudFront invalidation failed"),
        }
    }
    journal.published = Some(report);
    journal.rolled_back_to = Some(rolled_back_to);

    // 4. Push.
    push(ctx, steps, &branch, scope, journal).await
}
