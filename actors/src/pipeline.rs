//! The life of one job, run as a task by its session: prepare the thread, run the agent,
//! commit, build, publish, push, report. Every way out ends the message exactly once: a
//! terminal event and a delete, or (crash of a step, shutdown) a release back to the queue.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorRef, RpcReplyPort, rpc::CallResult};
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, info_span};

use crate::agent::{AgentActivity, AgentError, AgentReport, AgentSession};
use crate::build::BuildError;
use crate::config::WorkerConfig;
use crate::delivery::Delivery;
use crate::git::subprocess::GitCommandError;
use crate::git::{Fence, GitError, SAVE_MESSAGE, agent_commit_subject};
use crate::job::{Job, StopReason, StopSignal};
use crate::lease::{Acquired, Lease, LeaseCheck, LeaseError, LeaseLost, Leases};
use crate::message::WorkspaceKey;
use crate::notices::{Notice, NoticeSender};
use crate::publish::{BucketFence, PublishError, PublishReport};
use crate::status::{EventError, EventType, StatusEvent};
use crate::steps::{AgentMsg, BuildMsg, GitMsg, PublisherMsg};
use crate::threads::{ThreadRecord, ThreadStore};

/// What every job of the process shares.
pub struct WorkerContext {
    pub config: WorkerConfig,
    pub delivery: Delivery,
    /// CloudFront, when some client's bucket has a distribution.
    pub invalidator: Option<crate::invalidate::Invalidator>,
    /// Agent runs at once over all workspaces (`AGENT_CONCURRENCY`).
    agent_slots: Arc<tokio::sync::Semaphore>,
    /// Builds at once (`BUILD_CONCURRENCY`, CPU-bound).
    build_slots: Arc<tokio::sync::Semaphore>,
    /// The build as the build actors run it; its dependency store is the one they share, so
    /// that installing ahead of a build (while the agent runs) installs each lock file once.
    build: crate::build::BuildSpec,
    /// Workspace leases: one worker at a time per workspace (granted at once when alone).
    pub leases: Leases,
    /// Notices to other workers (`None` when alone).
    pub notices: Option<NoticeSender>,
    /// This worker's notice queue, where a holder answers `Released`.
    pub notice_url: Option<String>,
    /// Which conversation each thread has, and the agent's conversation files when shared.
    pub threads: ThreadStore,
    /// Where the agent keeps its conversation files (`CLAUDE_CONFIG_DIR`), when known. With
    /// isolation each workspace has its own folder under it (`agent_config_dir_for`).
    agent_config_dir: Option<std::path::PathBuf>,
    /// Where tenants' code runs (`ISOLATION`); off until the worker sets what it detected.
    pub sandbox: Arc<crate::sandbox::Sandbox>,
}

impl WorkerContext {
    /// The agent's `CLAUDE_CONFIG_DIR` for workspace `key`.
    pub fn agent_config_dir_for(&self, key: &WorkspaceKey) -> Option<std::path::PathBuf> {
        let base = self.agent_config_dir.as_deref()?;
        Some(self.sandbox.agent_config_dir(base, key))
    }

    pub fn new(
        config: WorkerConfig,
        delivery: Delivery,
        invalidator: Option<crate::invalidate::Invalidator>,
        build: crate::build::BuildSpec,
    ) -> WorkerContext {
        let threads = ThreadStore::for_worker(&config.workspace_root, &delivery.records);
        // The agent gets the worker's own CLAUDE_CONFIG_DIR when it has one (`agent_env`).
        let agent_config_dir = std::env::var_os("CLAUDE_CONFIG_DIR")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| config.agent.config_dir.clone());
        WorkerContext {
            invalidator,
            build,
            leases: Leases::alone(),
            notices: None,
            notice_url: None,
            threads,
            sandbox: crate::sandbox::Sandbox::off(&config.workspace_root),
            agent_config_dir,
            agent_slots: Arc::new(tokio::sync::Semaphore::new(config.agent_concurrency.max(1))),
            build_slots: Arc::new(tokio::sync::Semaphore::new(config.build_concurrency.max(1))),
            config,
            delivery,
        }
    }
}

/// Wait for a slot of `slots`, unless the job is stopped first (an interrupt must not wait
/// for another client's work to end).
/// Time spent waiting is added to `durationsMs.queued`, apart from the work.
async fn slot(
    slots: &Arc<tokio::sync::Semaphore>,
    stop: &StopSignal,
    progress: &mut Progress,
    stopped: impl FnOnce() -> JobError,
) -> Result<tokio::sync::OwnedSemaphorePermit, JobError> {
    let asked = Instant::now();
    let permit = match slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = stop.token().cancelled() => return Err(stopped()),
        },
    };
    let waited = asked.elapsed().as_millis() as u64;
    if waited > 0 {
        *progress.durations.entry("queued".into()).or_default() += waited;
    }
    Ok(permit)
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
    fn is_retryable(&self) -> bool {
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

    fn kind(&self) -> &'static str {
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
    fn is_lost_lease(&self) -> bool {
        matches!(
            self,
            JobError::LeaseLost(_)
                | JobError::Git(GitError::Fenced { .. })
                | JobError::Push(GitError::Fenced { .. })
                | JobError::Publish(PublishError::LeaseLost(_) | PublishError::Fenced { .. })
        )
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
    /// The last agent run's report.
    agent: Option<AgentReport>,
    /// What this batch's agent runs cost (the difference of the conversation's totals).
    cost_usd: Option<f64>,
    /// The message that reports the cost: the first one the agent ran for. The others of a
    /// coalesced batch report 0 and name it, so that costs add up across events.
    cost_payer: Option<String>,
    /// The thread's conversation was gone and a new one was started.
    conversation_restarted: bool,
    /// Messages of the batch that came too late: sent before a newer message of their thread
    /// that has already ended. They are not applied on top of the newer work.
    superseded: std::collections::BTreeSet<String>,
    turns: u64,
    /// Times the agent was resumed to repair a build its edit broke.
    build_repairs: u32,
    /// Progress events sent so far (their sequence numbers).
    progress_sent: u64,
    /// The CDN invalidation made after the publish.
    invalidation_id: Option<String>,
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
///
/// The batch runs under the workspace's lease: `lease` when its session still holds it from
/// the batch before, else taken here (waiting for another worker to hand it over; `yielded`:
/// this worker has just handed it to a waiter, who goes first). The lease comes back when it
/// still holds, for the session to keep or release.
pub async fn run_batch(
    ctx: Arc<WorkerContext>,
    steps: Steps,
    mut batch: Vec<Job>,
    stop: StopSignal,
    lease: Option<Lease>,
    yielded: bool,
) -> Option<Lease> {
    let events = batch
        .iter()
        .map(|job| {
            let mut started =
                StatusEvent::for_request(EventType::Started, &job.request, &job.message_id);
            started.trace_id = job.trace_id.clone();
            started.branch = Some(job.request.branch());
            started
        })
        .collect();
    let mut started = StartedEvents::send(&ctx, events);

    let mut progress = Progress::default();
    let key = batch[0].request.workspace();
    let lease = match lease {
        Some(lease) => Ok(lease),
        None => take_lease(&ctx, &key, &batch, &stop, yielded).await,
    };
    let (outcome, mut lease) = match lease {
        Ok(mut lease) => {
            // A lease found lost stops the work at once, as an interrupt would.
            let lost = lease.check().lost().clone();
            let stopper = stop.clone();
            let watch = tokio::spawn(async move {
                lost.cancelled().await;
                stopper.request(StopReason::LeaseLost);
            });
            let scope = LeaseScope::of(&mut lease);
            let outcome = execute(
                &ctx,
                &steps,
                &batch,
                &stop,
                &scope,
                &mut started,
                &mut progress,
            )
            .await;
            watch.abort();
            (outcome.map(|()| scope), Some(lease))
        }
        Err(e) => (Err(e), None),
    };
    let scope = match &outcome {
        Ok(scope) => Some(scope.clone()),
        Err(_) => lease.as_mut().map(LeaseScope::of),
    };
    let outcome = outcome.map(drop);
    let ending = match outcome {
        Ok(()) => Ending::Completed,
        Err(JobError::StoppedWaiting) => {
            Ending::Stopped(stop.reason().unwrap_or(StopReason::Interrupted))
        }
        Err(e) if e.is_lost_lease() => Ending::Stopped(StopReason::LeaseLost),
        Err(JobError::Agent(e)) if e.is_interrupted() => {
            Ending::Stopped(stop.reason().unwrap_or(StopReason::Interrupted))
        }
        Err(JobError::Build(BuildError::Cancelled)) => {
            Ending::Stopped(stop.reason().unwrap_or(StopReason::Interrupted))
        }
        Err(e) => Ending::Failed(e),
    };
    if matches!(ending, Ending::Stopped(StopReason::Interrupted)) {
        crate::metrics::metrics().interrupts.add(1, &[]);
    }
    if let (Ending::Stopped(reason), Some(asked)) = (&ending, stop.requested_at()) {
        // From the stop request to the agent's process group gone (or the build stopped).
        tracing::info!(
            ?reason,
            interrupt_latency_us = asked.elapsed().as_micros() as u64,
            stopped_at_ms = crate::records::now_ms(),
            "work stopped"
        );
    }
    if matches!(ending, Ending::Stopped(StopReason::LeaseLost)) {
        tracing::warn!(workspace = %key, "the workspace's lease was lost: nothing more is pushed or published here; the messages go back to the queue");
    }
    // Work the agent left in the worktree is never thrown away: commit and push it on the
    // thread's own branch before reporting. Only under a lease that still holds: without it,
    // the checkout (on a shared volume) and the upstream belong to another worker now.
    let held = lease.as_ref().is_some_and(|l| l.check().check().is_ok());
    if let (false, true, Some(scope)) = (matches!(ending, Ending::Completed), held, &scope) {
        let working: Vec<&Job> = batch
            .iter()
            .filter(|j| !progress.superseded.contains(&j.message_id))
            .collect();
        save_work(&ctx, &steps, &working, scope, &mut progress).await;
    }
    let lead_received = batch[0].received_at;
    progress
        .durations
        .insert("total".into(), lead_received.elapsed().as_millis() as u64);
    // Stop renewing visibility, and wait for a renewal in flight, before any message is
    // deleted or released.
    futures::future::join_all(batch.iter_mut().map(|job| job.renewal.stop())).await;
    started.sent().await;
    for job in batch {
        finish(&ctx, job, &ending, &progress).await;
    }
    lease.filter(|l| l.check().check().is_ok())
}

/// What an agent turn of a batch runs with.
#[derive(Clone, Copy)]
struct BatchRun<'a> {
    ctx: &'a WorkerContext,
    steps: &'a Steps,
    stop: &'a StopSignal,
    scope: &'a LeaseScope,
}

/// What the batch's lease gives its effects: the check before each of them, the fences they
/// carry, and whether the workspace has just come from another worker.
#[derive(Clone)]
struct LeaseScope {
    check: LeaseCheck,
    /// The upstream's fence (pushes), when workers share the queue.
    fence: Option<Fence>,
    /// The bucket's fence (publishes), when workers share the queue.
    bucket_fence: Option<BucketFence>,
    /// The workspace came from another worker (or nobody known): catch up before working.
    handover: bool,
}

impl LeaseScope {
    fn of(lease: &mut Lease) -> LeaseScope {
        let shared = lease.is_shared();
        let token = lease.token();
        let key = lease.key().clone();
        LeaseScope {
            check: lease.check().clone(),
            fence: shared.then(|| Fence::for_workspace(&key, token)),
            bucket_fence: shared
                .then(|| BucketFence::for_workspace(&key, token, lease.check().clone())),
            handover: lease.take_handover(),
        }
    }
}

/// How often a worker waiting for another's lease looks at it again, besides being told.
const LEASE_POLL: Duration = Duration::from_millis(1500);
/// A worker that just handed the workspace to a waiter lets it go first.
const YIELD_TO_WAITER: Duration = Duration::from_millis(500);

/// Take the workspace's lease, waiting while another worker holds it: tell the holder that a
/// message waits here (it interrupts older work and hands over when done), then wait to be
/// told it is released, or look again now and then (the holder may have died: its lease
/// expires). The messages stay held meanwhile (renewed), so no receive is burnt.
async fn take_lease(
    ctx: &WorkerContext,
    key: &WorkspaceKey,
    batch: &[Job],
    stop: &StopSignal,
    yielded: bool,
) -> Result<Lease, JobError> {
    if yielded {
        tokio::select! {
            _ = tokio::time::sleep(YIELD_TO_WAITER) => {}
            _ = stop.token().cancelled() => return Err(JobError::StoppedWaiting),
        }
    }
    let newest = batch
        .iter()
        .max_by_key(|j| j.sent_at_ms)
        .expect("a batch has a job");
    let asked = Instant::now();
    // The holder told so far: once per holder, a second notice would only repeat the first.
    let mut told: Option<String> = None;
    let mut failures = 0;
    loop {
        let released = ctx.leases.released_signal(key);
        let notified = released.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let wait = match ctx.leases.try_acquire(key).await {
            Ok(Acquired::Granted(lease)) => {
                if told.is_some() {
                    tracing::info!(workspace = %key, waited_ms = asked.elapsed().as_millis() as u64, "the workspace was handed over");
                }
                return Ok(lease);
            }
            Ok(Acquired::HeldBy {
                holder,
                notices,
                expires_at_ms,
            }) => {
                if told.as_ref() != Some(&holder) {
                    notify_holder(ctx, key, newest, &holder, notices.as_deref()).await;
                    told = Some(holder);
                }
                let until_expiry =
                    Duration::from_millis(expires_at_ms.saturating_sub(crate::records::now_ms()));
                until_expiry.clamp(Duration::from_millis(100), LEASE_POLL)
            }
            Err(e) => {
                failures += 1;
                if failures >= 5 {
                    return Err(e.into());
                }
                tracing::warn!(workspace = %key, error = %e, "the lease store did not answer; trying again");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.token().cancelled() => return Err(JobError::StoppedWaiting),
        }
    }
}

/// Tell the holder of `key` that `newest` waits here.
async fn notify_holder(
    ctx: &WorkerContext,
    key: &WorkspaceKey,
    newest: &Job,
    holder: &str,
    notices: Option<&str>,
) {
    let (Some(sender), Some(url)) = (&ctx.notices, notices) else {
        tracing::warn!(workspace = %key, %holder, "the holder has no notice queue; waiting for its lease to end");
        return;
    };
    let notice = Notice::Newer {
        client_id: key.client_id.clone(),
        project_id: key.project_id.clone(),
        message_id: newest.message_id.clone(),
        sent_at_ms: newest.sent_at_ms,
        from: ctx.config.worker_id.clone(),
        reply_to: ctx.notice_url.clone(),
    };
    match sender.send(url, &notice).await {
        Ok(()) => tracing::info!(
            workspace = %key,
            message_id = %newest.message_id,
            %holder,
            at_ms = crate::records::now_ms(),
            "interrupt notice sent"
        ),
        Err(e) => {
            tracing::warn!(workspace = %key, %holder, error = %e, "notice not sent; waiting for the lease")
        }
    }
}

/// The batch's `started` events, on their way while the workspace is prepared: the round trip
/// to the status queue need not hold up the work. They are out before the agent starts (its
/// `progress` events follow them) and before any terminal event.
struct StartedEvents(Option<tokio::task::JoinHandle<()>>);

impl StartedEvents {
    fn send(ctx: &WorkerContext, events: Vec<StatusEvent>) -> StartedEvents {
        let delivery = ctx.delivery.clone();
        let task = tokio::spawn(
            async move {
                for event in events {
                    if let Err(e) = delivery.status.send(&event).await {
                        tracing::warn!(error = %e, "started event not sent");
                    }
                }
            }
            .in_current_span(),
        );
        StartedEvents(Some(task))
    }

    /// Wait until they are sent (at once after the first call).
    async fn sent(&mut self) {
        if let Some(task) = self.0.take() {
            let _ = task.await;
        }
    }
}

/// The commands of a batch, as one request to the agent.
fn batch_prompt(batch: &[&Job]) -> String {
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

fn batch_ids(batch: &[&Job]) -> Vec<String> {
    batch.iter().map(|j| j.message_id.clone()).collect()
}

async fn execute(
    ctx: &WorkerContext,
    steps: &Steps,
    batch: &[Job],
    stop: &StopSignal,
    scope: &LeaseScope,
    started: &mut StartedEvents,
    progress: &mut Progress,
) -> Result<(), JobError> {
    let job = &batch[0];
    let request = &job.request;
    let branch = request.branch();
    let config = &ctx.config;
    let run = BatchRun {
        ctx,
        steps,
        stop,
        scope,
    };
    let workspace_dir = config.workspace_dir(&request.workspace());
    let bucket = config.bucket_for(&request.workspace());

    // 1. The thread's branch, with unfinished work of another thread saved first; after a
    // takeover, the fence moved to this holder first and the upstream's state trusted.
    let t = Instant::now();
    if let (true, Some(fence)) = (scope.handover, &scope.fence) {
        ask(&steps.git, "git", |reply| GitMsg::TakeOver {
            fence: fence.clone(),
            reply,
        })
        .instrument(info_span!("take over workspace", token = fence.token))
        .await??;
    }
    let span = info_span!("prepare workspace", branch = %branch, saved_work = Empty);
    let saved = ask(&steps.git, "git", |reply| GitMsg::PrepareThread {
        branch: branch.clone(),
        message_id: job.message_id.clone(),
        trust_upstream: scope.handover && scope.fence.is_some(),
        reply,
    })
    .instrument(span.clone())
    .await??;
    if let Some(saved) = &saved {
        span.record("saved_work", saved.commit.as_str());
    }
    if let Some(saved) = saved {
        tracing::warn!(branch = %saved.branch, commit = %saved.commit, "saved unfinished work found in the workspace");
        match push(ctx, steps, &saved.branch, scope, progress).await {
            Err(JobError::Push(e)) => {
                tracing::warn!(error = %e, "saved work could not be pushed yet; it stays committed locally");
            }
            other => other?,
        }
    }
    // Each message of the batch, one by one: already applied by an earlier delivery (its
    // commit carries its trailer), superseded (sent before a newer message of the thread that
    // has ended), or to be run now.
    let mark = ctx
        .delivery
        .records
        .thread_mark(&request.workspace(), &request.thread_id)
        .await?;
    let mut pending: Vec<&Job> = Vec::new();
    let mut applied = 0;
    for job in batch {
        let earlier = ask(&steps.git, "git", |reply| GitMsg::CommitOfMessage {
            branch: branch.clone(),
            message_id: job.message_id.clone(),
            reply,
        })
        .await??;
        if let Some(commit) = earlier {
            tracing::info!(message_id = %job.message_id, %commit, "message was already applied by an earlier delivery; not running the agent again");
            progress.commit = Some(commit);
            applied += 1;
        } else if mark.is_some_and(|m| job.sent_at_ms < m.newest_sent_ms) {
            tracing::warn!(message_id = %job.message_id, "a newer message of this thread has already ended; this older one is superseded and not applied");
            progress.superseded.insert(job.message_id.clone());
        } else {
            pending.push(job);
        }
    }
    progress.time("prepare", t);
    started.sent().await;
    if pending.is_empty() && applied == 0 {
        // Nothing of this batch is to be applied: nothing to build or publish.
        return Ok(());
    }

    let ran_agent = !pending.is_empty();
    // The dependencies install while the agent works, outside the build slots: the build then
    // only checks and links them. Not stopped by an interrupt: the newer work needs them too.
    // Then the build's own Node process starts loading Astro (`prepared_build`); dropping the
    // task's result (this job ended early) ends it.
    let mut prefetch = ran_agent.then(|| {
        let spec = ctx.build.clone();
        let dir = workspace_dir.clone();
        let sandbox = ctx.sandbox.clone();
        let workspace = request.workspace();
        tokio::spawn(
            async move {
                let never = CancellationToken::new();
                crate::build::prefetch_dependencies(&spec, &sandbox, &workspace, &dir, &never).await
            }
            .in_current_span(),
        )
    });
    let mut prepared = None;
    if ran_agent {
        progress.cost_payer = Some(pending[0].message_id.clone());
        // 2 and 3. The agent, then a commit of what it changed.
        agent_turn(&run, &pending, batch_prompt(&pending), progress, "request").await?;
        commit_turn(
            steps,
            &pending,
            agent_commit_subject(&pending[0].request.command),
            progress,
        )
        .await?;
    }

    // 4. Build; when the agent's edit broke it, resume the agent with the error and try again.
    // Worker state of the checkout (install stamp, last published commit) lives in .git.
    let state_dir = workspace_dir.join(".git/edit-worker");
    let marker_path = state_dir.join("published");
    let mut repairs = 0;
    let (head, marker) = loop {
        let head = ask(&steps.git, "git", |reply| GitMsg::HeadCommit { reply }).await??;
        progress.commit = Some(head.clone());
        let marker = format!("{head} {bucket}");
        let live = tokio::fs::read_to_string(&marker_path)
            .await
            .unwrap_or_default();
        if live.trim() == marker {
            tracing::info!(commit = %head, %bucket, "this commit is already published; skipping build");
            // Nothing to build or publish: straight to the push.
            return push(ctx, steps, &branch, scope, progress).await;
        }
        // Phases count from the slot on: time spent waiting for one is not the build's.
        if let Some(prefetch) = prefetch.take() {
            // The dependencies were being installed while the agent ran.
            match prefetch.await {
                Ok(Ok(done)) => {
                    if let Some(ms) = done.installed_ms {
                        *progress.durations.entry("install".into()).or_default() += ms;
                    }
                    prepared = done.prepared;
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
        let build_slot = slot(&ctx.build_slots, stop, progress, || {
            JobError::Build(BuildError::Cancelled)
        })
        .await?;
        let t = Instant::now();
        let span = info_span!("build", commit = %head, installed = Empty, error = Empty);
        let built = ask(&steps.build, "build", |reply| BuildMsg::Build {
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
                    *progress.durations.entry("install".into()).or_default() += ms;
                }
                *progress.durations.entry("build".into()).or_default() += b.build_ms;
                break (head, marker);
            }
            Err(BuildError::BuildFailed { log_tail, status })
                if ran_agent && repairs < config.build_repair_attempts =>
            {
                progress.time("build", t);
                repairs += 1;
                progress.build_repairs = repairs;
                tracing::warn!(
                    attempt = repairs,
                    %status,
                    log_tail = %crate::redact::redact(&log_tail),
                    "the build failed after the agent's edit; asking the agent to repair it"
                );
                let prompt = format!(
                    "The build failed after your change ({status}). Fix the site so that `{}` succeeds, \
                     keeping the requested change. The end of the build log:\n\n{log_tail}",
                    config.build_command.join(" ")
                );
                agent_turn(&run, &pending, prompt, progress, "build repair").await?;
                commit_turn(steps, &pending, "Claude: Fix the build".into(), progress).await?;
            }
            Err(e) => {
                progress.time("build", t);
                // The agent's work is pushed even though it does not build: nothing is lost.
                push(ctx, steps, &branch, scope, progress).await?;
                return Err(e.into());
            }
        }
    };
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
        let published = ask(&steps.publisher, "publisher", |reply| {
            PublisherMsg::Publish {
                workspace: request.workspace(),
                bucket: bucket.clone(),
                build_dir: workspace_dir.join(&config.build_output_dir),
                fence: scope.bucket_fence.clone(),
                reply,
            }
        })
        .instrument(span.clone())
        .await?;
        progress.time("publish", t);
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
                Ok(id) => progress.invalidation_id = Some(id),
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
            Ok(report) => progress.published = Some(report),
            Err(e) => {
                if !matches!(e, PublishError::LeaseLost(_) | PublishError::Fenced { .. }) {
                    push(ctx, steps, &branch, scope, progress).await?;
                }
                return Err(e.into());
            }
        }
        if let Err(e) = tokio::fs::write(&marker_path, &marker).await {
            tracing::warn!(error = %e, "could not record the published commit");
        }
    }

    // 6. Push.
    push(ctx, steps, &branch, scope, progress).await
}

/// Run the agent on `prompt` in the thread's conversation: resume it when the thread has one,
/// else start it. Reports what the agent does as throttled `progress` events, and adds this
/// run's share of the conversation's cost (the agent reports a running total) to `progress`.
async fn agent_turn(
    run: &BatchRun<'_>,
    batch: &[&Job],
    prompt: String,
    progress: &mut Progress,
    purpose: &'static str,
) -> Result<(), JobError> {
    let span = info_span!(
        "agent run",
        agent.purpose = purpose,
        agent.session_id = Empty,
        agent.resumed = Empty,
        agent.turns = Empty,
        agent.cost_usd = Empty,
        agent.result_subtype = Empty,
        error = Empty
    );
    let outcome = agent_turn_inner(run, batch, prompt, progress, &span)
        .instrument(span.clone())
        .await;
    if let Err(e) = &outcome {
        span.record("error", e.kind());
    }
    outcome
}

async fn agent_turn_inner(
    run: &BatchRun<'_>,
    batch: &[&Job],
    prompt: String,
    progress: &mut Progress,
    span: &tracing::Span,
) -> Result<(), JobError> {
    let BatchRun {
        ctx,
        steps,
        stop,
        scope,
    } = *run;
    let job = &batch[0];
    let key = job.request.workspace();
    let threads = &ctx.threads;
    let cwd = ctx.config.workspace_dir(&key);
    let record = threads.load(&key, &job.request.thread_id).await;
    // The conversation may have gone on elsewhere: bring the shared copy of its file here.
    let agent_config_dir = ctx.agent_config_dir_for(&key);
    if let (Some(r), Some(config_dir)) = (&record, &agent_config_dir) {
        let file = ThreadStore::conversation_file(config_dir, &cwd, &r.session_id);
        match threads
            .restore_conversation(&key, &r.session_id, &file, scope.handover)
            .await
        {
            Ok(true) => {
                tracing::info!(session = %r.session_id, "the thread's conversation was restored from the shared store")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not restore the thread's conversation"),
        }
    }
    let mut session = match &record {
        Some(r) => AgentSession::Resume(r.session_id.clone()),
        None => AgentSession::New(uuid::Uuid::new_v4().to_string()),
    };
    // The thread's conversation is known before the run starts, so that an interrupted,
    // crashed or failed run stays in it (the follow-up resumes it).
    if let AgentSession::New(id) = &session {
        record_new_conversation(threads, &key, &job.request.thread_id, id).await;
    }
    // After the restore: the conversation file is the tenant's too.
    let jail = ctx
        .sandbox
        .jail(&key, &cwd, agent_config_dir.as_deref())
        .await?;
    let _agent_slot = slot(&ctx.agent_slots, stop, progress, || {
        JobError::Agent(AgentError::Interrupted)
    })
    .await?;
    // From the slot on: the wait for a slot is not the agent's time.
    let t = Instant::now();
    let outcome = loop {
        let (activity_tx, activity_rx) = tokio::sync::mpsc::unbounded_channel();
        let reporter = tokio::spawn(
            report_progress(
                ctx.delivery.clone(),
                batch.iter().map(|job| ProgressTarget::of(job)).collect(),
                activity_rx,
                ctx.config.progress_interval,
                progress.progress_sent,
                ctx.config.workspace_dir(&key),
            )
            .instrument(span.clone()),
        );
        let outcome = ask(&steps.agent, "agent", |reply| AgentMsg::Run {
            jail: jail.clone(),
            cwd: ctx.config.workspace_dir(&key),
            prompt: prompt.clone(),
            session: session.clone(),
            stop: stop.token().clone(),
            activity: activity_tx,
            reply,
        })
        .await;
        // The sender went with the agent's message, so the reporter ends by itself.
        progress.progress_sent = reporter.await.unwrap_or(progress.progress_sent);
        match outcome? {
            // The agent's session files are gone (new storage): start the conversation anew.
            Err(AgentError::SessionNotFound(id)) => {
                tracing::warn!(session = %id, "the thread's conversation is gone; starting a new one");
                // Only a conversation the agent had written can be lost.
                progress.conversation_restarted |= record.as_ref().is_some_and(|r| r.written);
                session = AgentSession::New(uuid::Uuid::new_v4().to_string());
                if let AgentSession::New(id) = &session {
                    record_new_conversation(threads, &key, &job.request.thread_id, id).await;
                }
            }
            other => break other,
        }
    };
    progress.time("agent", t);
    tracing::info!(
        elapsed_ms = t.elapsed().as_millis() as u64,
        ok = outcome.is_ok(),
        "agent run finished"
    );
    let report = match &outcome {
        Ok(report) => Some(report.clone()),
        // An interrupted or failed run that reported still spent its tokens.
        Err(e) => e.report().cloned(),
    };
    if let Some(report) = &report {
        let session_id = report.session_id.clone().unwrap_or_else(|| match &session {
            AgentSession::New(id) | AgentSession::Resume(id) => id.clone(),
        });
        span.record("agent.session_id", session_id.as_str());
        span.record("agent.resumed", matches!(session, AgentSession::Resume(_)));
        span.record("agent.turns", report.num_turns.unwrap_or(0));
        span.record("agent.result_subtype", report.subtype.as_str());
        let previous = match (&session, &record) {
            (AgentSession::Resume(_), Some(r)) => r.total_cost_usd,
            _ => 0.0,
        };
        if let Some(total) = report.total_cost_usd {
            // A total below the previous one means a new conversation: all of it is this run's.
            let cost = if total >= previous {
                total - previous
            } else {
                total
            };
            progress.cost_usd = Some(progress.cost_usd.unwrap_or(0.0) + cost);
        }
        progress.turns += report.num_turns.unwrap_or(0);
        let saved = ThreadRecord {
            session_id,
            total_cost_usd: report.total_cost_usd.unwrap_or(previous),
            written: true,
        };
        if let Err(e) = threads.save(&key, &job.request.thread_id, &saved).await {
            tracing::warn!(error = %e, "could not record the thread's conversation");
        }
    }
    // Whatever the run's end (an interrupted run stays in the conversation too), its file
    // goes where the thread's next message finds it, on whichever worker.
    if let Some(config_dir) = &agent_config_dir {
        let session_id = report
            .as_ref()
            .and_then(|r| r.session_id.clone())
            .unwrap_or_else(|| match &session {
                AgentSession::New(id) | AgentSession::Resume(id) => id.clone(),
            });
        let file = ThreadStore::conversation_file(config_dir, &cwd, &session_id);
        let left_a_file = tokio::fs::try_exists(&file).await.unwrap_or(false);
        if report.is_none() && left_a_file {
            // A run stopped before it reported still wrote its conversation.
            let written = ThreadRecord {
                session_id: session_id.clone(),
                total_cost_usd: record.as_ref().map_or(0.0, |r| r.total_cost_usd),
                written: true,
            };
            if let Err(e) = threads.save(&key, &job.request.thread_id, &written).await {
                tracing::warn!(error = %e, "could not record the thread's conversation");
            }
        }
        if let Err(e) = threads.save_conversation(&key, &session_id, &file).await {
            tracing::warn!(error = %e, "could not share the thread's conversation file");
        }
    }
    let report = outcome?;
    progress.agent = Some(report);
    Ok(())
}

/// Record a new conversation as the thread's, with nothing spent yet.
async fn record_new_conversation(
    threads: &ThreadStore,
    key: &crate::message::WorkspaceKey,
    thread_id: &str,
    session_id: &str,
) {
    let record = ThreadRecord {
        session_id: session_id.to_owned(),
        total_cost_usd: 0.0,
        written: false,
    };
    if let Err(e) = threads.save(key, thread_id, &record).await {
        tracing::warn!(error = %e, "could not record the thread's conversation");
    }
}

/// Commit what the agent changed as this batch's finished work.
async fn commit_turn(
    steps: &Steps,
    batch: &[&Job],
    subject: String,
    progress: &mut Progress,
) -> Result<(), JobError> {
    let t = Instant::now();
    let span = info_span!("commit", commit = Empty);
    let commit = ask(&steps.git, "git", |reply| GitMsg::CommitAll {
        subject,
        body: batch_prompt(batch),
        message_ids: batch_ids(batch),
        finished: true,
        reply,
    })
    .instrument(span.clone())
    .await??;
    if let Some(c) = &commit {
        span.record("commit", c.as_str());
    }
    progress.time("commit", t);
    if commit.is_some() {
        progress.commit = commit;
    }
    Ok(())
}

/// Who a progress event is about.
struct ProgressTarget {
    request: crate::message::EditRequest,
    message_id: String,
    trace_id: Option<String>,
}

impl ProgressTarget {
    fn of(job: &Job) -> ProgressTarget {
        ProgressTarget {
            request: job.request.clone(),
            message_id: job.message_id.clone(),
            trace_id: job.trace_id.clone(),
        }
    }
}

/// Turn the agent's activity into `progress` events: at most one per `interval`, each summing
/// up what happened since the last, numbered so that a consumer can order them (a standard SQS
/// queue does not keep order). Returns the last sequence number used.
async fn report_progress(
    delivery: Delivery,
    targets: Vec<ProgressTarget>,
    mut activity: tokio::sync::mpsc::UnboundedReceiver<AgentActivity>,
    interval: Duration,
    mut sequence: u64,
    workspace: std::path::PathBuf,
) -> u64 {
    let mut pending: Vec<String> = Vec::new();
    let mut next_allowed = tokio::time::Instant::now();
    loop {
        let open = tokio::select! {
            item = activity.recv() => match item {
                Some(a) => {
                    let step = describe(&a, &workspace);
                    // A span event of the agent's span (the OpenTelemetry layer takes debug).
                    tracing::debug!(step = %step, "agent activity");
                    pending.push(step);
                    true
                }
                None => false,
            },
            _ = tokio::time::sleep_until(next_allowed), if !pending.is_empty() => true,
        };
        let due = tokio::time::Instant::now() >= next_allowed;
        if !pending.is_empty() && (due || !open) {
            sequence += 1;
            let detail = summarize(&std::mem::take(&mut pending));
            for target in &targets {
                let mut event = StatusEvent::for_request(
                    EventType::Progress,
                    &target.request,
                    &target.message_id,
                );
                event.trace_id = target.trace_id.clone();
                event.detail = Some(detail.clone());
                event.sequence = Some(sequence);
                if let Err(e) = delivery.status.send(&event).await {
                    tracing::warn!(error = %e, "progress event not sent");
                }
            }
            next_allowed = tokio::time::Instant::now() + interval;
        }
        if !open {
            return sequence;
        }
    }
}

fn describe(activity: &AgentActivity, workspace: &std::path::Path) -> String {
    match activity {
        AgentActivity::Started { .. } => "agent started".into(),
        AgentActivity::ToolUse { tool, target: None } => tool.clone(),
        AgentActivity::ToolUse {
            tool,
            target: Some(target),
        } => {
            // Paths are shown relative to the workspace; nothing else of the machine shows.
            let shown = match std::path::Path::new(target).strip_prefix(workspace) {
                Ok(rel) => rel.display().to_string(),
                Err(_) if target.starts_with('/') => std::path::Path::new(target)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                Err(_) => target.clone(),
            };
            format!("{tool} {shown}")
        }
    }
}

/// Up to five steps, then how many more.
fn summarize(steps: &[String]) -> String {
    let shown: Vec<&str> = steps.iter().take(5).map(String::as_str).collect();
    let mut text = shown.join("; ");
    if steps.len() > shown.len() {
        text.push_str(&format!("; and {} more", steps.len() - shown.len()));
    }
    text
}

async fn push(
    ctx: &WorkerContext,
    steps: &Steps,
    branch: &str,
    scope: &LeaseScope,
    progress: &mut Progress,
) -> Result<(), JobError> {
    scope.check.check()?;
    let t = Instant::now();
    let pushed = ask(&steps.git, "git", |reply| GitMsg::Push {
        branch: branch.to_owned(),
        attempts: ctx.config.push_attempts,
        fence: scope.fence.clone(),
        reply,
    })
    .instrument(info_span!("push", branch))
    .await?;
    progress.time("push", t);
    pushed.map_err(JobError::Push)
}

/// Commit whatever the worktree holds as saved work and push it. The push runs even when
/// there was nothing new to commit: work stopped during the build was committed already, and
/// must still reach the upstream. Failures here are logged: the work then stays committed (or
/// in the worktree) locally and is saved by the next job.
async fn save_work(
    ctx: &WorkerContext,
    steps: &Steps,
    working: &[&Job],
    scope: &LeaseScope,
    progress: &mut Progress,
) {
    let Some(lead) = working.first() else {
        return;
    };
    let body = format!("Saved while working on:\n\n{}", batch_prompt(working));
    let t = Instant::now();
    let saved = ask(&steps.git, "git", |reply| GitMsg::CommitAll {
        subject: SAVE_MESSAGE.into(),
        body,
        message_ids: batch_ids(working),
        finished: false,
        reply,
    })
    .await;
    progress.time("commit", t);
    match saved {
        Ok(Ok(commit)) => {
            if commit.is_some() {
                progress.commit = commit;
            }
            if let Err(e) = push(ctx, steps, &lead.request.branch(), scope, progress).await {
                tracing::warn!(error = %e, "saved work not pushed");
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "could not save unfinished work"),
        Err(e) => tracing::error!(error = %e, "could not save unfinished work"),
    }
}

/// Report one message's ending and delete it, or release it for another try.
async fn finish(ctx: &WorkerContext, job: Job, ending: &Ending, progress: &Progress) {
    let request = &job.request;
    let config = &ctx.config;
    for (phase, ms) in &progress.durations {
        crate::metrics::metrics().phase_ms.record(
            *ms as f64,
            &[opentelemetry::KeyValue::new("phase", phase.clone())],
        );
    }
    let superseded = progress.superseded.contains(&job.message_id);
    let event_type = match ending {
        _ if superseded => EventType::Interrupted,
        Ending::Completed => EventType::Completed,
        Ending::Stopped(StopReason::Interrupted) => EventType::Interrupted,
        Ending::Stopped(StopReason::Shutdown) => {
            // Saved and pushed; back to the queue at once for the next worker.
            job.release(&ctx.delivery, Duration::ZERO, "shutdown").await;
            crate::metrics::outcome("released");
            return;
        }
        Ending::Stopped(StopReason::LeaseLost) => {
            // The workspace's next holder runs it: back to the queue at once.
            job.release(&ctx.delivery, Duration::ZERO, "lease lost")
                .await;
            crate::metrics::outcome("released");
            return;
        }
        Ending::Failed(e) if e.is_retryable() && job.receive_count < config.max_receives => {
            let factor = 1u32 << job.receive_count.saturating_sub(1).min(10);
            let delay = (config.retry_base_delay * factor).min(Duration::from_secs(900));
            tracing::warn!(error = %e, kind = e.kind(), attempt = job.receive_count, ?delay, "passing failure; the message will be tried again");
            job.release(&ctx.delivery, delay, "retry").await;
            crate::metrics::outcome("retried");
            return;
        }
        Ending::Failed(_) => EventType::Failed,
    };
    let mut event = StatusEvent::for_request(event_type, request, &job.message_id);
    event.trace_id = job.trace_id.clone();
    event.branch = Some(request.branch());
    if superseded {
        // Nothing ran for it: a newer message of its thread had already ended.
        event.detail = Some(
            "superseded: a newer message of this thread had already ended, so this request was not applied"
                .into(),
        );
        report(ctx, job, event).await;
        return;
    }
    event.commit = progress.commit.clone();
    event.durations_ms = Some(progress.durations.clone());
    if let Some(agent) = &progress.agent {
        event.result = agent.result.clone();
    }
    match (&progress.cost_payer, progress.cost_usd) {
        (Some(payer), Some(cost)) if *payer == job.message_id => event.cost_usd = Some(cost),
        (Some(payer), Some(_)) => {
            event.cost_usd = Some(0.0);
            event.cost_paid_by = Some(payer.clone());
        }
        _ => event.cost_usd = progress.cost_usd,
    }
    if progress.turns > 0 {
        event.agent_turns = Some(progress.turns);
    }
    if progress.conversation_restarted {
        event.conversation_restarted = Some(true);
    }
    if progress.build_repairs > 0 {
        event.build_repairs = Some(progress.build_repairs);
    }
    event.invalidation_id = progress.invalidation_id.clone();
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
    // The thread has got this far: a message of it sent earlier that comes later is
    // superseded, never applied on top of this one.
    if let Err(e) = ctx
        .delivery
        .records
        .raise_thread_mark(&request.workspace(), &request.thread_id, job.sent_at_ms)
        .await
    {
        tracing::warn!(error = %e, "could not record how far the thread has got");
    }
    report(ctx, job, event).await;
}

/// Record, report and delete: the message has ended.
async fn report(ctx: &WorkerContext, job: Job, event: StatusEvent) {
    crate::metrics::outcome(match event.event_type {
        EventType::Completed => "completed",
        EventType::Interrupted => "interrupted",
        _ => "failed",
    });
    if let Err(e) = ctx.delivery.finish(&job.receipt.current(), &event).await {
        tracing::error!(error = %e, message_id = %job.message_id, "message not finished; it will be delivered again");
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
