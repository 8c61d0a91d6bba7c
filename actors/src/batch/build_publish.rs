//! Phases 6 and 7 of a batch (`execute`): build the checkout's head, asking the agent to repair
//! a build its edit broke, then publish it and invalidate the CDN. The agent's work is pushed
//! even when it does not build or publish: nothing is lost.

use std::time::Instant;

use tracing::field::Empty;
use tracing::{Instrument, info_span};

use crate::batch::agent_turn::{agent_turn, commit_turn};
use crate::batch::job_error::JobError;
use crate::batch::journal::Journal;
use crate::batch::push::push;
use crate::batch::run::BatchRun;
use crate::delivery::job::Job;
use crate::steps::build::BuildError;
use crate::steps::publish::PublishError;
use crate::steps::{BuildMsg, GitMsg, PublisherMsg};

/// The dependencies installing ahead of the build, while the agent works.
pub(crate) type Prefetch =
    tokio::task::JoinHandle<Result<crate::steps::build::Prefetched, BuildError>>;

/// Build the checkout's head (resuming the agent when its edit broke the build, up to
/// `BUILD_REPAIR_ATTEMPTS` over the batch: `repairs`) and publish it. `Ok(Some(changed))`: the
/// keys the publish changed; `Ok(None)`: this commit is live already, nothing was done.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn build_and_publish(
    run: &BatchRun<'_>,
    job: &Job,
    ran_agent: bool,
    pending: &[&Job],
    prefetch: &mut Option<Prefetch>,
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
