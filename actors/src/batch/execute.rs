//! The work of a batch, as a list of phases read top to bottom (`execute`): work under the
//! lease, take the workspace over (after another worker), check out the thread's branch, sort
//! out messages already applied or superseded, run the agent and commit, then build, publish,
//! push and check in a browser, with the agent asked once to repair what the check found.
//! Each phase is a function below, in that order; building and publishing are
//! `build_publish.rs`'s.

use std::time::Instant;

use tracing::field::Empty;
use tracing::{Instrument, info_span};

use crate::batch::agent_turn::{agent_turn, commit_turn};
use crate::batch::build_publish::{Prefetch, build_and_publish};
use crate::batch::job_error::JobError;
use crate::batch::journal::Journal;
use crate::batch::push::push;
use crate::batch::run::{BatchRun, StartedEvents, batch_prompt};
use crate::delivery::job::Job;
use crate::steps::GitMsg;
use crate::steps::check::{CheckReport, RepairReport};
use crate::steps::git::agent_commit_subject;

/// The batch's work, in order. `Ok` when it completed; on an error, whatever the agent changed
/// is still in the worktree (or committed) for `run_batch` to save.
pub(crate) async fn execute(
    run: &BatchRun<'_>,
    batch: &[Job],
    started: &mut StartedEvents,
    journal: &mut Journal,
) -> Result<(), JobError> {
    let job = &batch[0];
    let t = Instant::now();
    // 1. Every git call of this batch stops when the lease ends, even one already running.
    work_under_lease(run).await?;
    // 2. After another worker: the fence moves to this holder first.
    take_over(run).await?;
    // 3. The thread's branch, with unfinished work of another thread saved (and pushed) first.
    check_out_thread(run, job, journal).await?;
    // 4. Each message: already applied, superseded, or to be run now.
    let sorted = sort_messages(run, batch, journal).await?;
    journal.time("prepare", t);
    started.sent().await;
    if sorted.pending.is_empty() && sorted.applied == 0 {
        // Nothing of this batch is to be applied (a rollback that came too late included):
        // nothing to build or publish.
        return Ok(());
    }
    if let Some(target) = job.request.rollback_target() {
        // A rollback is its own short path, without the agent or a build (`rollback.rs`).
        return crate::batch::rollback::rollback(run, job, target, journal).await;
    }
    let pending = sorted.pending;
    let mut prefetch = (!pending.is_empty()).then(|| start_prefetch(run, job));
    // 5. The agent, then a commit of what it changed.
    if !pending.is_empty() {
        edit(run, &pending, journal).await?;
    }
    // 6 to 9. Build, publish, push, check; a repair of what the check found goes round once.
    publish_push_and_check(run, job, &pending, &mut prefetch, journal).await
}

/// Phase 1: hand the lease's end to the git step, after checking that the lease still holds
/// by this worker's own clock (no git, agent or build under a lease that is over; issue 25).
async fn work_under_lease(run: &BatchRun<'_>) -> Result<(), JobError> {
    run.scope.check.check()?;
    let lost = run.scope.check.lost().clone();
    run.steps
        .git
        .ask(|reply| GitMsg::WorkUnder { lost, reply })
        .await?;
    Ok(())
}

/// Phase 2: the first batch after the workspace changed hands moves the upstream's fence to
/// this holder's token before anything else; the upstream's state is trusted from then on.
async fn take_over(run: &BatchRun<'_>) -> Result<(), JobError> {
    let scope = run.scope;
    if let (true, Some(fence)) = (scope.handover, &scope.fence) {
        run.steps
            .git
            .ask(|reply| GitMsg::TakeOver {
                fence: fence.clone(),
                reply,
            })
            .instrument(info_span!("take over workspace", token = fence.token))
            .await??;
    }
    scope.check.check()?;
    Ok(())
}

/// Phase 3: check out the thread's branch. Unfinished work of what was checked out before is
/// committed on its own branch first and pushed (or kept locally when the push fails).
async fn check_out_thread(
    run: &BatchRun<'_>,
    job: &Job,
    journal: &mut Journal,
) -> Result<(), JobError> {
    let BatchRun {
        ctx, steps, scope, ..
    } = *run;
    let branch = job.request.branch();
    let span = info_span!("prepare workspace", branch = %branch, saved_work = Empty);
    let saved = steps
        .git
        .ask(|reply| GitMsg::PrepareThread {
            branch: branch.clone(),
            message_id: job.message_id.clone(),
            trust_upstream: scope.handover && scope.fence.is_some(),
            reply,
        })
        .instrument(span.clone())
        .await??;
    journal.checked_out = true;
    let Some(saved) = saved else {
        return Ok(());
    };
    span.record("saved_work", saved.commit.as_str());
    tracing::warn!(branch = %saved.branch, commit = %saved.commit, "saved unfinished work found in the workspace");
    match push(ctx, steps, &saved.branch, scope, journal).await {
        Err(JobError::Push(e)) => {
            tracing::warn!(error = %e, "saved work could not be pushed yet; it stays committed locally");
            Ok(())
        }
        other => other,
    }
}

/// The batch's messages as phase 4 sorted them.
struct Sorted<'b> {
    /// To be run now, in order.
    pending: Vec<&'b Job>,
    /// Already applied by an earlier delivery (their commits carry their trailers).
    applied: usize,
}

/// Phase 4: each message of the batch, one by one: already applied by an earlier delivery (its
/// commit carries its trailer), superseded (sent before a newer message of the thread that has
/// ended), or to be run now. Reads the thread's document once; the journal keeps it for the
/// batch's one write.
async fn sort_messages<'b>(
    run: &BatchRun<'_>,
    batch: &'b [Job],
    journal: &mut Journal,
) -> Result<Sorted<'b>, JobError> {
    let request = &batch[0].request;
    let branch = request.branch();
    let thread = run
        .ctx
        .delivery
        .records
        .read_thread(
            &request.workspace(),
            &request.thread_id,
            run.scope.check.token(),
        )
        .await?;
    let mark = thread.existed.then_some(thread.doc.newest_sent_ms);
    journal.thread = Some(thread);
    let mut sorted = Sorted {
        pending: Vec::new(),
        applied: 0,
    };
    for job in batch {
        let earlier = run
            .steps
            .git
            .ask(|reply| GitMsg::CommitOfMessage {
                branch: branch.clone(),
                message_id: job.message_id.clone(),
                reply,
            })
            .await??;
        if let Some(commit) = earlier {
            tracing::info!(message_id = %job.message_id, %commit, "message was already applied by an earlier delivery; not running the agent again");
            journal.commit = Some(commit);
            sorted.applied += 1;
        } else if mark.is_some_and(|m| job.sent_at_ms < m) {
            tracing::warn!(message_id = %job.message_id, "a newer message of this thread has already ended; this older one is superseded and not applied");
            journal.superseded.insert(job.message_id.clone());
        } else {
            sorted.pending.push(job);
        }
    }
    Ok(sorted)
}

/// Beside phase 5: the dependencies install while the agent works, outside the build slots:
/// the build then only checks and links them. Not stopped by an interrupt: the newer work
/// needs them too; stopped when the lease ends: the checkout is another worker's then. Then
/// the build's own Node process starts loading Astro (`prepared_build`); dropping the task's
/// result (this job ended early) ends it.
fn start_prefetch(run: &BatchRun<'_>, job: &Job) -> Prefetch {
    let ctx = run.ctx;
    let spec = ctx.build.clone();
    let workspace = job.request.workspace();
    let dir = ctx.config.workspace_dir(&workspace);
    let sandbox = ctx.sandbox.clone();
    let lost = run.scope.check.lost().clone();
    tokio::spawn(
        async move {
            crate::steps::build::prefetch_dependencies(&spec, &sandbox, &workspace, &dir, &lost)
                .await
        }
        .in_current_span(),
    )
}

/// Phase 5: the agent runs the batch's requests as one turn, then a commit of what it changed.
async fn edit(run: &BatchRun<'_>, pending: &[&Job], journal: &mut Journal) -> Result<(), JobError> {
    journal.cost_payer = Some(pending[0].message_id.clone());
    agent_turn(run, pending, batch_prompt(pending), journal, "request").await?;
    run.scope.check.check()?;
    commit_turn(
        run.steps,
        pending,
        agent_commit_subject(&pending[0].request.command),
        journal,
    )
    .await?;
    Ok(())
}

/// Phases 6 to 9: build (asking the agent to repair a build its edit broke), publish; then the
/// push, and the browser check of what is live now, side by side. When the check finds
/// problems this publish brought, the agent is resumed once with them and its repair goes the
/// same way (build, publish, push, check).
async fn publish_push_and_check(
    run: &BatchRun<'_>,
    job: &Job,
    pending: &[&Job],
    prefetch: &mut Option<Prefetch>,
    journal: &mut Journal,
) -> Result<(), JobError> {
    let BatchRun {
        ctx, steps, scope, ..
    } = *run;
    let ran_agent = !pending.is_empty();
    let branch = job.request.branch();
    let bucket = ctx.config.bucket_for(&job.request.workspace());
    let mut prepared = None;
    let mut repairs = 0;
    let mut check_repair: Option<(Vec<String>, CheckReport)> = None;
    // Pages the check looks at again after a repair, changed by it or not.
    let mut recheck: Vec<String> = Vec::new();
    loop {
        let built = build_and_publish(
            run,
            job,
            ran_agent,
            pending,
            prefetch,
            &mut prepared,
            &mut repairs,
            journal,
        )
        .await?;
        let Some(changed) = built else {
            // Nothing new to publish (a repair that changed nothing): the check before it
            // stands, unrepaired.
            if let Some((found, mut report)) = check_repair {
                report.repair = Some(RepairReport {
                    found,
                    fixed: false,
                });
                journal.check = Some(report);
            }
            // Nothing to build or publish: straight to the push.
            return push(ctx, steps, &branch, scope, journal).await;
        };
        let head = journal.commit.clone().unwrap_or_default();
        let deploy_id = journal
            .published
            .as_ref()
            .and_then(|published| published.deploy_id.clone());
        let (pushed, checked) = tokio::join!(
            push(ctx, steps, &branch, scope, journal),
            crate::batch::check_step::check(
                ctx,
                &bucket,
                &head,
                deploy_id.as_deref(),
                &changed,
                &recheck
            )
        );
        pushed?;
        let Some(outcome) = checked else {
            return Ok(());
        };
        journal.add("check", outcome.report.ms);
        let mut report = outcome.report;
        if let Some((found, _)) = check_repair.take() {
            // The check after the repair: fixed when none of what it was asked to fix is left.
            let left = crate::batch::check_step::still_there(&found, &report);
            report.repair = Some(RepairReport {
                found,
                fixed: !left,
            });
            journal.check = Some(report);
            return Ok(());
        }
        if outcome.new_problems.is_empty() || !ran_agent || !ctx.config.check.repair {
            journal.check = Some(report);
            return Ok(());
        }
        tracing::warn!(
            problems = ?outcome.new_problems,
            "the browser check found problems this publish brought; asking the agent to repair them"
        );
        let prompt = crate::steps::check::repair_prompt(&outcome.new_problems);
        agent_turn(run, pending, prompt, journal, "check repair").await?;
        commit_turn(
            steps,
            pending,
            "Claude: Fix what the browser check found".into(),
            journal,
        )
        .await?;
        recheck = crate::batch::check_step::paths_of(&outcome.new_problems);
        check_repair = Some((outcome.new_problems, report));
    }
}
