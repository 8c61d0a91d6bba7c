//! The work of a batch, step after step: take the workspace over (after another worker),
//! prepare the thread's branch, sort out messages already applied or superseded, run the agent
//! and commit, build (asking the agent to repair a build its edit broke), publish, invalidate
//! the CDN, push.

use std::time::Instant;

use tracing::field::Empty;
use tracing::{Instrument, info_span};

use crate::batch::agent_turn::{agent_turn, commit_turn};
use crate::batch::job_error::JobError;
use crate::batch::journal::Journal;
use crate::batch::push::push;
use crate::batch::run::{BatchRun, StartedEvents, batch_prompt};
use crate::delivery::job::Job;
use crate::steps::build::BuildError;
use crate::steps::git::agent_commit_subject;
use crate::steps::publish::PublishError;
use crate::steps::{BuildMsg, GitMsg, PublisherMsg};

/// The batch's work, in order. `Ok` when it completed; on an error, whatever the agent changed
/// is still in the worktree (or committed) for `run_batch` to save.
pub(crate) async fn execute(
    run: &BatchRun<'_>,
    batch: &[Job],
    started: &mut StartedEvents,
    journal: &mut Journal,
) -> Result<(), JobError> {
    let BatchRun {
        ctx,
        steps,
        stop: _,
        scope,
    } = *run;
    let job = &batch[0];
    let request = &job.request;
    let branch = request.branch();
    let config = &ctx.config;
    let workspace_dir = config.workspace_dir(&request.workspace());
    let bucket = config.bucket_for(&request.workspace());

    // 1. The thread's branch, with unfinished work of another thread saved first; after a
    // takeover, the fence moved to this holder first and the upstream's state trusted.
    let t = Instant::now();
    // Before each step that touches the checkout: no git, agent or build under a lease this
    // worker's own clock says is over (issue 25).
    scope.check.check()?;
    // Every git call of this batch stops when the lease ends, even one already running.
    let lost = scope.check.lost().clone();
    steps
        .git
        .ask(|reply| GitMsg::WorkUnder { lost, reply })
        .await?;
    if let (true, Some(fence)) = (scope.handover, &scope.fence) {
        steps
            .git
            .ask(|reply| GitMsg::TakeOver {
                fence: fence.clone(),
                reply,
            })
            .instrument(info_span!("take over workspace", token = fence.token))
            .await??;
    }
    scope.check.check()?;
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
    if let Some(saved) = &saved {
        span.record("saved_work", saved.commit.as_str());
    }
    if let Some(saved) = saved {
        tracing::warn!(branch = %saved.branch, commit = %saved.commit, "saved unfinished work found in the workspace");
        match push(ctx, steps, &saved.branch, scope, journal).await {
            Err(JobError::Push(e)) => {
                tracing::warn!(error = %e, "saved work could not be pushed yet; it stays committed locally");
            }
            other => other?,
        }
    }
    // Each message of the batch, one by one: already applied by an earlier delivery (its
    // commit carries its trailer), superseded (sent before a newer message of the thread that
    // has ended), or to be run now.
    let thread = ctx
        .delivery
        .records
        .read_thread(
            &request.workspace(),
            &request.thread_id,
            scope.check.token(),
        )
        .await?;
    let mark = thread.existed.then_some(thread.doc.newest_sent_ms);
    journal.thread = Some(thread);
    let mut pending: Vec<&Job> = Vec::new();
    let mut applied = 0;
    for job in batch {
        let earlier = steps
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
            applied += 1;
        } else if mark.is_some_and(|m| job.sent_at_ms < m) {
            tracing::warn!(message_id = %job.message_id, "a newer message of this thread has already ended; this older one is superseded and not applied");
            journal.superseded.insert(job.message_id.clone());
        } else {
            pending.push(job);
        }
    }
    journal.time("prepare", t);
    started.sent().await;
    if let Some(target) = request.rollback_target() {
        // A rollback is its own short path, without the agent or a build (`rollback.rs`);
        // one that came too late (superseded) is not applied.
        if pending.is_empty() && applied == 0 {
            return Ok(());
        }
        return crate::batch::rollback::rollback(run, job, target, journal).await;
    }
    if pending.is_empty() && applied == 0 {
        // Nothing of this batch is to be applied: nothing to build or publish.
        return Ok(());
    }

    let ran_agent = !pending.is_empty();
    // The dependencies install while the agent works, outside the build slots: the build then
    // only checks and links them. Not stopped by an interrupt: the newer work needs them too;
    // stopped when the lease ends: the checkout is another worker's then.
    // Then the build's own Node process starts loading Astro (`prepared_build`); dropping the
    // task's result (this job ended early) ends it.
    let mut prefetch = ran_agent.then(|| {
        let spec = ctx.build.clone();
        let dir = workspace_dir.clone();
        let sandbox = ctx.sandbox.clone();
        let workspace = request.workspace();
        let lost = scope.check.lost().clone();
        tokio::spawn(
            async move {
                crate::steps::build::prefetch_dependencies(&spec, &sandbox, &workspace, &dir, &lost)
                    .await
            }
            .in_current_span(),
        )
    });
    let mut prepared = None;
    if ran_agent {
        journal.cost_payer = Some(pending[0].message_id.clone());
        // 2 and 3. The agent, then a commit of what it changed.
        agent_turn(run, &pending, batch_prompt(&pending), journal, "request").await?;
        scope.check.check()?;
        commit_turn(
            steps,
            &pending,
            agent_commit_subject(&pending[0].request.command),
            journal,
        )
        .await?;
    }

    // 4 and 5. Build (asking the agent to repair a build its edit broke), publish; then the
    // push, and the browser check of what is live now, side by side. When the check finds
    // problems this publish brought, the agent is resumed once with them and its repair goes
    // the same way (build, publish, push, check).
    let mut repairs = 0;
    let mut check_repair: Option<(Vec<String>, crate::steps::check::CheckReport)> = None;
    // Pages the check looks at again after a repair, changed by it or not.
    let mut recheck: Vec<String> = Vec::new();
    loop {
        let built = build_and_publish(
            run,
            job,
            ran_agent,
            &pending,
            &mut prefetch,
            &mut prepared,
            &mut repairs,
            journal,
        )
        .await?;
        let Some(changed) = built else {
            // Nothing new to publish (a repair that changed nothing): the check before it
            // stands, unrepaired.
            if let Some((found, mut report)) = check_repair {
                report.repair = Some(crate::steps::check::RepairReport {
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
            report.repair = Some(crate::steps::check::RepairReport {
                found,
                fixed: !left,
            });
            journal.check = Some(report);
            return Ok(());
        }
        if outcome.new_problems.is_empty() || !ran_agent || !config.check.repair {
            journal.check = Some(report);
            return Ok(());
        }
        tracing::warn!(
            problems = ?outcome.new_problems,
            "the browser check found problems this publish brought; asking the agent to repair them"
        );
        let prompt = crate::steps::check::repair_prompt(&outcome.new_problems);
        agent_turn(run, &pending, prompt, journal, "check repair").await?;
        commit_turn(
            steps,
            &pending,
            "Claude: Fix what the browser check found".into(),
            journal,
        )
        .await?;
        recheck = crate::batch::check_step::paths_of(&outcome.new_problems);
        check_repair = Some((outcome.new_problems, report));
    }
}

/// Build the checkout's head (resuming the agent when its edit broke the build, up to
/// `BUILD_REPAIR_ATTEMPTS` over the batch: `repairs`) and publish it. `Ok(Some(changed))`: the
/// keys the publish changed; `Ok(None)`: this commit is live already, nothing was done.
#[allow(clippy::too_many_arguments)]
async fn build_and_publish(
    run: &BatchRun<'_>,
    job: &Job,
    ran_agent: bool,
    pending: &[&Job],
    prefetch: &mut Option<
        tokio::task::JoinHandle<Result<crate::steps::build::Prefetched, BuildError>>,
    >,
    prepared: &mut Option<crate::steps::build::prepared_build::PreparedBuild>,
    repairs: &mut u32,
    journal: &mut Journal,
) -> Result<Option<Vec<String>>, JobError> {
    let BatchRun {
        ctx,
        steps,
        stop,
        scope,
    } = *run;
    let request = &job.request;
    let branch = request.branch();
    let config = &ctx.config;
    let workspace_dir = config.workspace_dir(&request.workspace());
    let bucket = config.bucket_for(&request.workspace());
    // Worker state of the checkout (install stamp, last published commit) lives in .git.
    let state_dir = workspace_dir.join(".git/edit-worker");
    let marker_path = state_dir.join("published");
    let (head, marker) = loop {
        scope.check.check()?;
        let head = steps
            .git
            .ask(|reply| GitMsg::HeadCommit { reply })
            .await??;
        journal.commit = Some(head.clone());
        let marker = format!("{head} {bucket}");
        let live = tokio::fs::read_to_string(&marker_path)
            .await
            .unwrap_or_default();
        if live.trim() == marker {
            tracing::info!(commit = %head, %bucket, "this commit is already published; skipping build");
            return Ok(None);
        }
        // Phases count from the slot on: time spent waiting for one is not the build's.
        if let Some(prefetch) = prefetch.take() {
            // The dependencies were being installed while the agent ran.
            match prefetch.await {
                Ok(Ok(done)) => {
                    if let Some(ms) = done.installed_ms {
                        journal.add("install", ms);
                    }
                    *prepared = done.prepared;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "installing ahead of the build failed; the build installs")
                }
                Err(e) => tracing::warn!(error = %e, "the install ahead of the build ended early"),
            }
        }
        // Handing the checkout over to the tenant is preparation, not building: done before
        // the slot, so that a slot is held only while the build runs.
        let jail = ctx
            .sandbox
            .jail(&request.workspace(), &workspace_dir, None)
            .await?;
        let build_slot = ctx
            .build_slot(stop, prepared.as_ref())
            .await
            .ok_or(JobError::Build(BuildError::Cancelled))?;
        journal.waited_for(&build_slot);
        let t = Instant::now();
        let span = info_span!("build", commit = %head, installed = Empty, error = Empty);
        let built = steps
            .build
            .ask(|reply| BuildMsg::Build {
                jail,
                dir: workspace_dir.clone(),
                state_dir: state_dir.clone(),
                // Only the first build: after a repair the agent has changed the site.
                prepared: prepared.take(),
                stop: stop.token().clone(),
                reply,
            })
            .instrument(span.clone())
            .await?;
        drop(build_slot);
        match &built {
            Ok(b) => span.record("installed", b.install_ms.is_some()),
            Err(e) => span.record("error", e.kind()),
        };
        match built {
            Ok(b) => {
                if let Some(ms) = b.install_ms {
                    journal.add("install", ms);
                }
                journal.add("build", b.build_ms);
                break (head, marker);
            }
            Err(BuildError::BuildFailed { log_tail, status })
                if ran_agent && *repairs < config.build.repair_attempts =>
            {
                journal.time("build", t);
                *repairs += 1;
                journal.build_repairs = *repairs;
                tracing::warn!(
                    attempt = *repairs,
                    %status,
                    log_tail = %crate::telemetry::redact::redact(&log_tail),
                    "the build failed after the agent's edit; asking the agent to repair it"
                );
                let prompt = format!(
                    "The build failed after your change ({status}). Fix the site so that `{}` succeeds, \
                     keeping the requested change. The end of the build log:\n\n{log_tail}",
                    config.build.command.join(" ")
                );
                agent_turn(run, pending, prompt, journal, "build repair").await?;
                commit_turn(steps, pending, "Claude: Fix the build".into(), journal).await?;
            }
            Err(e) => {
                journal.time("build", t);
                // The agent's work is pushed even though it does not build: nothing is lost.
                push(ctx, steps, &branch, scope, journal).await?;
                return Err(e.into());
            }
        }
    };
    // The build ran the tenant's code, which may have turned a folder on the way to the output
    // into a link since the build's own check. The publisher reads the output by path, so
    // nothing on that path may be a link; no process of the tenant runs from here on (its
    // build's group was ended), so the path stays as checked.
    if let Err(refused) =
        crate::tenant::tenant_fs::stat_in(&workspace_dir, config.build.output_dir.as_ref())
    {
        return Err(crate::steps::build::BuildError::UnsafeSiteFile(refused).into());
    }
    {
        // Publishing is not cancelled: it is short, and a half-published site is worse.
        let t = Instant::now();
        let span = info_span!(
            "publish",
            bucket = %bucket,
            uploaded = Empty,
            skipped = Empty,
            deleted = Empty,
            bytes = Empty,
            error = Empty
        );
        let published = steps
            .publisher
            .ask(|reply| PublisherMsg::Publish {
                workspace: request.workspace(),
                bucket: bucket.clone(),
                build_dir: workspace_dir.join(&config.build.output_dir),
                fence: scope.bucket_fence.clone(),
                deploy: crate::steps::publish::deploys::DeployMeta {
                    commit: head.clone(),
                    thread_id: request.thread_id.clone(),
                    message_id: job.message_id.clone(),
                    rolled_back_to: None,
                },
                reply,
            })
            .instrument(span.clone())
            .await?;
        journal.time("publish", t);
        if let (Ok(report), Some(invalidator), Some(distribution)) = (
            &published,
            &ctx.invalidator,
            config.cloudfront_distributions.get(&request.client_id),
        ) && !report.changed.is_empty()
        {
            // The site is published either way; a failed invalidation only delays the CDN.
            let reference = format!("{}-{head}", job.message_id);
            match invalidator
                .invalidate(distribution, &report.changed, &reference)
                .instrument(info_span!("invalidate cdn", distribution = %distribution))
                .await
            {
                Ok(id) => journal.invalidation_id = Some(id),
                Err(e) => {
                    tracing::warn!(%distribution, error = %e, "CloudFront invalidation failed")
                }
            }
        }
        match &published {
            Ok(r) => {
                span.record("uploaded", r.uploaded);
                span.record("skipped", r.skipped);
                span.record("deleted", r.deleted);
                span.record("bytes", r.bytes);
            }
            Err(e) => {
                span.record("error", e.kind());
            }
        }
        match published {
            Ok(report) => journal.published = Some(report),
            Err(e) => {
                if !matches!(e, PublishError::LeaseLost(_) | PublishError::Fenced { .. }) {
                    push(ctx, steps, &branch, scope, journal).await?;
                }
                return Err(e.into());
            }
        }
        if let Err(e) = tokio::fs::write(&marker_path, &marker).await {
            tracing::warn!(error = %e, "could not record the published commit");
        }
    }

    Ok(journal.published.as_ref().map(|r| r.changed.clone()))
}
