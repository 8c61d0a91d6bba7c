//! The life of one job, run as a task by its session: prepare the thread, run the agent,
//! commit, build, publish, push, report. Every way out ends the message exactly once: a
//! terminal event and a delete, or (crash of a step, shutdown) a release back to the queue.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorRef, RpcReplyPort, rpc::CallResult};

use crate::agent::{AgentActivity, AgentError, AgentReport};
use crate::build::BuildError;
use crate::config::WorkerConfig;
use crate::delivery::Delivery;
use crate::git::{GitError, SAVE_MESSAGE, agent_commit_subject};
use crate::job::{Job, StopReason, StopSignal};
use crate::publish::{PublishError, PublishReport};
use crate::status::{EventError, EventType, StatusEvent};
use crate::steps::{AgentMsg, BuildMsg, GitMsg, PublisherMsg};

/// What every job of the process shares.
pub struct WorkerContext {
    pub config: WorkerConfig,
    pub delivery: Delivery,
}

/// A session's step actors, as the job sees them.
#[derive(Clone)]
pub struct Steps {
    pub git: ActorRef<GitMsg>,
    pub agent: ActorRef<AgentMsg>,
    pub build: ActorRef<BuildMsg>,
    pub publisher: ActorRef<PublisherMsg>,
}

/// Why a job could not finish.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("{0}")]
    Git(#[from] GitError),
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("{0}")]
    Publish(#[from] PublishError),
    #[error("the {0} step crashed")]
    StepCrashed(&'static str),
    #[error("push failed: {0}")]
    Push(GitError),
}

impl JobError {
    /// A passing failure, worth another delivery: something we depend on was away (the git
    /// remote, S3, the model's API) or a step crashed. A broken build or an agent that hit its
    /// limits would fail the same way again.
    fn is_retryable(&self) -> bool {
        match self {
            JobError::Git(GitError::NoWorkspace(_)) => false,
            JobError::Git(_) | JobError::Push(_) | JobError::StepCrashed(_) => true,
            JobError::Publish(e) => !matches!(e, PublishError::EmptyBuild(_)),
            JobError::Build(e) => matches!(e, BuildError::InstallFailed { .. }),
            JobError::Agent(e) => matches!(e.kind(), "agent_api_error" | "agent_no_result"),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            JobError::Git(GitError::NoWorkspace(_)) => "workspace_missing",
            JobError::Git(_) => "git_failed",
            JobError::Agent(e) => e.kind(),
            JobError::Build(e) => e.kind(),
            JobError::Publish(e) => e.kind(),
            JobError::StepCrashed(_) => "step_crashed",
            JobError::Push(_) => "push_failed",
        }
    }
}

/// Ask a step actor and wait for its answer. A step that dies before answering is a crash.
async fn ask<M, T>(
    actor: &ActorRef<M>,
    step: &'static str,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, JobError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(build, None).await {
        Ok(CallResult::Success(answer)) => Ok(answer),
        _ => Err(JobError::StepCrashed(step)),
    }
}

/// What the pipeline found out, for the terminal event.
#[derive(Default)]
struct Progress {
    durations: BTreeMap<String, u64>,
    commit: Option<String>,
    agent: Option<AgentReport>,
    published: Option<PublishReport>,
}

impl Progress {
    fn time(&mut self, phase: &str, started: Instant) {
        *self.durations.entry(phase.into()).or_default() += started.elapsed().as_millis() as u64;
    }
}

/// How the job ended, before it is reported.
enum Ending {
    Completed,
    /// Stopped by a newer message or by shutdown; its work was saved in `commit`.
    Stopped(StopReason),
    Failed(JobError),
}

/// Run a batch to its end: the first job and any directly following jobs of the same thread,
/// which run as one agent turn (their commands joined in order) and each get their own
/// terminal event. Never panics on bad input; every path reports or releases every message.
pub async fn run_batch(ctx: Arc<WorkerContext>, steps: Steps, batch: Vec<Job>, stop: StopSignal) {
    let heartbeat = tokio_util::sync::CancellationToken::new();
    let renewals: Vec<_> = batch
        .iter()
        .map(|job| {
            ctx.delivery
                .keep_invisible(job.receipt_handle.clone(), heartbeat.clone())
        })
        .collect();
    // If this task is dropped half-way, the renewals stop with it.
    let heartbeat_guard = heartbeat.clone().drop_guard();

    for job in &batch {
        let mut started =
            StatusEvent::for_request(EventType::Started, &job.request, &job.message_id);
        started.trace_id = job.trace_id.clone();
        started.branch = Some(job.request.branch());
        if let Err(e) = ctx.delivery.status.send(&started).await {
            tracing::warn!(error = %e, "started event not sent");
        }
    }

    let mut progress = Progress::default();
    let ending = match execute(&ctx, &steps, &batch, &stop, &mut progress).await {
        Ok(()) => Ending::Completed,
        Err(JobError::Agent(AgentError::Interrupted))
        | Err(JobError::Build(BuildError::Cancelled)) => {
            Ending::Stopped(stop.reason().unwrap_or(StopReason::Interrupted))
        }
        Err(e) => Ending::Failed(e),
    };
    if let (Ending::Stopped(reason), Some(asked)) = (&ending, stop.requested_at()) {
        // From the stop request to the agent's process group gone (or the build stopped).
        tracing::info!(
            ?reason,
            interrupt_latency_us = asked.elapsed().as_micros() as u64,
            "work stopped"
        );
    }
    // Work the agent left in the worktree is never thrown away: commit and push it on the
    // thread's own branch before reporting.
    if !matches!(ending, Ending::Completed) {
        save_work(&ctx, &steps, &batch, &mut progress).await;
    }
    let lead_received = batch[0].received_at;
    progress
        .durations
        .insert("total".into(), lead_received.elapsed().as_millis() as u64);
    // Stop renewing visibility, and wait for a renewal in flight, before any message is
    // deleted or released.
    heartbeat.cancel();
    futures::future::join_all(renewals).await;
    drop(heartbeat_guard);
    for job in batch {
        finish(&ctx, job, &ending, &progress).await;
    }
}

/// The commands of a batch, as one request to the agent.
fn batch_prompt(batch: &[Job]) -> String {
    if batch.len() == 1 {
        return batch[0].request.command.clone();
    }
    batch
        .iter()
        .enumerate()
        .map(|(i, job)| {
            format!(
                "Request {} of {}:\n{}",
                i + 1,
                batch.len(),
                job.request.command
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn batch_ids(batch: &[Job]) -> Vec<String> {
    batch.iter().map(|j| j.message_id.clone()).collect()
}

async fn execute(
    ctx: &WorkerContext,
    steps: &Steps,
    batch: &[Job],
    stop: &StopSignal,
    progress: &mut Progress,
) -> Result<(), JobError> {
    let job = &batch[0];
    let request = &job.request;
    let branch = request.branch();
    let config = &ctx.config;
    let workspace_dir = config.workspace_dir(&request.workspace());
    let bucket = config.bucket_for(&request.workspace());

    // 1. The thread's branch, with unfinished work of another thread saved first.
    let t = Instant::now();
    let saved = ask(&steps.git, "git", |reply| GitMsg::PrepareThread {
        branch: branch.clone(),
        message_id: job.message_id.clone(),
        reply,
    })
    .await??;
    if let Some(saved) = saved {
        tracing::warn!(branch = %saved.branch, commit = %saved.commit, "saved unfinished work found in the workspace");
        let pushed = ask(&steps.git, "git", |reply| GitMsg::Push {
            branch: saved.branch.clone(),
            attempts: config.push_attempts,
            reply,
        })
        .await?;
        if let Err(e) = pushed {
            tracing::warn!(error = %e, "saved work could not be pushed yet; it stays committed locally");
        }
    }
    // A redelivered message whose agent run was already committed does not run again.
    let earlier = ask(&steps.git, "git", |reply| GitMsg::CommitOfMessage {
        branch: branch.clone(),
        message_id: job.message_id.clone(),
        reply,
    })
    .await??;
    progress.time("prepare", t);

    if let Some(commit) = earlier {
        tracing::info!(%commit, "message was already applied by an earlier delivery; not running the agent again");
        progress.commit = Some(commit);
    } else {
        // 2. The agent.
        let t = Instant::now();
        let (activity_tx, mut activity_rx) = tokio::sync::mpsc::unbounded_channel();
        let run = ask(&steps.agent, "agent", |reply| AgentMsg::Run {
            cwd: workspace_dir.clone(),
            prompt: batch_prompt(batch),
            stop: stop.token().clone(),
            activity: activity_tx,
            reply,
        });
        let report = run.await?;
        progress.time("agent", t);
        while let Ok(activity) = activity_rx.try_recv() {
            if let AgentActivity::ToolUse { tool, target } = activity {
                tracing::debug!(tool, target, "agent tool use");
            }
        }
        let report = report?;
        progress.agent = Some(report);

        // 3. Commit.
        let t = Instant::now();
        let commit = ask(&steps.git, "git", |reply| GitMsg::CommitAll {
            subject: agent_commit_subject(&request.command),
            body: batch_prompt(batch),
            message_ids: batch_ids(batch),
            finished: true,
            reply,
        })
        .await??;
        progress.time("commit", t);
        progress.commit = commit;
    }
    let head = ask(&steps.git, "git", |reply| GitMsg::HeadCommit { reply }).await??;
    progress.commit = Some(head.clone());

    // 4 and 5. Build and publish, unless this exact commit is already live in this bucket.
    let marker_path = workspace_dir.join(".git/edit-worker/published");
    let marker = format!("{head} {bucket}");
    let live = tokio::fs::read_to_string(&marker_path)
        .await
        .unwrap_or_default();
    if live.trim() == marker {
        tracing::info!(commit = %head, %bucket, "this commit is already published; skipping build");
    } else {
        let built = ask(&steps.build, "build", |reply| BuildMsg::Build {
            dir: workspace_dir.clone(),
            state_dir: workspace_dir.join(".git/edit-worker"),
            stop: stop.token().clone(),
            reply,
        })
        .await?;
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                push(ctx, steps, &branch, progress).await?;
                return Err(e.into());
            }
        };
        if let Some(ms) = built.install_ms {
            progress.durations.insert("install".into(), ms);
        }
        progress.durations.insert("build".into(), built.build_ms);

        // Publishing is not cancelled: it is short, and a half-published site is worse.
        let t = Instant::now();
        let published = ask(&steps.publisher, "publisher", |reply| {
            PublisherMsg::Publish {
                bucket: bucket.clone(),
                build_dir: workspace_dir.join(&config.build_output_dir),
                reply,
            }
        })
        .await?;
        progress.time("publish", t);
        match published {
            Ok(report) => progress.published = Some(report),
            Err(e) => {
                push(ctx, steps, &branch, progress).await?;
                return Err(e.into());
            }
        }
        if let Err(e) = tokio::fs::write(&marker_path, &marker).await {
            tracing::warn!(error = %e, "could not record the published commit");
        }
    }

    // 6. Push.
    push(ctx, steps, &branch, progress).await
}

async fn push(
    ctx: &WorkerContext,
    steps: &Steps,
    branch: &str,
    progress: &mut Progress,
) -> Result<(), JobError> {
    let t = Instant::now();
    let pushed = ask(&steps.git, "git", |reply| GitMsg::Push {
        branch: branch.to_owned(),
        attempts: ctx.config.push_attempts,
        reply,
    })
    .await?;
    progress.time("push", t);
    pushed.map_err(JobError::Push)
}

/// Commit whatever the worktree holds as saved work and push it. Failures here are logged: the
/// work then stays committed (or in the worktree) locally and is saved by the next job.
async fn save_work(ctx: &WorkerContext, steps: &Steps, batch: &[Job], progress: &mut Progress) {
    let body = format!("Saved while working on:\n\n{}", batch_prompt(batch));
    let t = Instant::now();
    let saved = ask(&steps.git, "git", |reply| GitMsg::CommitAll {
        subject: SAVE_MESSAGE.into(),
        body,
        message_ids: batch_ids(batch),
        finished: false,
        reply,
    })
    .await;
    progress.time("commit", t);
    match saved {
        Ok(Ok(Some(commit))) => {
            progress.commit = Some(commit);
            if let Err(e) = push(ctx, steps, &batch[0].request.branch(), progress).await {
                tracing::warn!(error = %e, "saved work not pushed");
            }
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "could not save unfinished work"),
        Err(e) => tracing::error!(error = %e, "could not save unfinished work"),
    }
}

/// Report one message's ending and delete it, or release it for another try.
async fn finish(ctx: &WorkerContext, job: Job, ending: &Ending, progress: &Progress) {
    let request = &job.request;
    let config = &ctx.config;
    let event_type = match ending {
        Ending::Completed => EventType::Completed,
        Ending::Stopped(StopReason::Interrupted) => EventType::Interrupted,
        Ending::Stopped(StopReason::Shutdown) => {
            // Saved and pushed; back to the queue at once for the next worker.
            release(ctx, &job, Duration::ZERO, "shutdown").await;
            return;
        }
        Ending::Failed(e) if e.is_retryable() && job.receive_count < config.max_receives => {
            let factor = 1u32 << job.receive_count.saturating_sub(1).min(10);
            let delay = (config.retry_base_delay * factor).min(Duration::from_secs(900));
            tracing::warn!(error = %e, kind = e.kind(), attempt = job.receive_count, ?delay, "passing failure; the message will be tried again");
            release(ctx, &job, delay, "retry").await;
            return;
        }
        Ending::Failed(_) => EventType::Failed,
    };
    let mut event = StatusEvent::for_request(event_type, request, &job.message_id);
    event.trace_id = job.trace_id.clone();
    event.branch = Some(request.branch());
    event.commit = progress.commit.clone();
    event.durations_ms = Some(progress.durations.clone());
    if let Some(agent) = &progress.agent {
        event.result = agent.result.clone();
        event.cost_usd = agent.total_cost_usd;
    }
    if let Some(report) = &progress.published {
        let bucket = config.bucket_for(&request.workspace());
        event.preview_url = Some(config.preview_url_for(&bucket));
        event.bucket = Some(bucket);
        event.publish = Some(report.clone());
    }
    if let Ending::Failed(e) = ending {
        event.error = Some(EventError {
            kind: e.kind().into(),
            message: e.to_string(),
        });
        if e.is_retryable() {
            // Out of retries: keep the message, with its last error, where a person can look.
            let reason = format!("failed after {} deliveries: {e}", job.receive_count);
            let body = serde_json::to_string(&RequestBody::from(request))
                .expect("plain strings serialize");
            if let Err(err) = ctx.delivery.dead_letter(&body, &reason).await {
                tracing::error!(error = %err, "could not keep the failed message in the dead-letter queue");
            }
        }
    }
    if let Err(e) = ctx.delivery.finish(&job.receipt_handle, &event).await {
        tracing::error!(error = %e, message_id = %job.message_id, "message not finished; it will be delivered again");
    }
}

async fn release(ctx: &WorkerContext, job: &Job, delay: Duration, why: &str) {
    if let Err(e) = ctx.delivery.release(&job.receipt_handle, delay).await {
        tracing::warn!(error = %e, why, "could not release message; it returns after its visibility timeout");
    }
}

/// The request as the producer sent it, for the dead-letter copy.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestBody<'a> {
    session_id: &'a str,
    thread_id: &'a str,
    client_id: &'a str,
    project_id: &'a str,
    command: &'a str,
}

impl<'a> From<&'a crate::message::EditRequest> for RequestBody<'a> {
    fn from(r: &'a crate::message::EditRequest) -> Self {
        RequestBody {
            session_id: &r.session_id,
            thread_id: &r.thread_id,
            client_id: &r.client_id,
            project_id: &r.project_id,
            command: &r.command,
        }
    }
}
