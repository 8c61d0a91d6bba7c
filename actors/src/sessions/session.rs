//! `SessionActor`: one per `{clientId}/{projectId}` workspace. It keeps the workspace's queue,
//! runs one job at a time as a task, and interrupts the running job when a newer message comes.
//!
//! Its handlers only move jobs between the queue and the running task, so they are short and an
//! interrupt is acted on as soon as its message is taken: it never waits behind a long
//! operation. The stop itself travels out of band, through the running job's `StopSignal`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::Instrument;

use crate::batch::context::WorkerContext;
use crate::batch::run_batch;
use crate::batch::stop::{StopReason, StopSignal};
use crate::contract::message::WorkspaceKey;
use crate::delivery::job::Job;
use crate::delivery::lease::Lease;
use crate::sessions::restart::RestartPolicy;
use crate::steps::{StepFactory, StepKind, Steps};

pub enum SessionMsg {
    /// A new message for this workspace.
    Enqueue(Box<Job>),
    /// A message for this workspace waits on another worker (a notice): interrupt work older
    /// than it, and hand the workspace over when the running work has ended.
    NewerElsewhere(Waiter),
    /// The running job has ended (reported or released), giving back the workspace's lease
    /// when it still holds.
    JobEnded(Option<Lease>),
    /// Restart a step actor that died, after its backoff.
    RestartStep(StepKind),
    /// Stop: save running work, release queued messages, then reply.
    Shutdown(RpcReplyPort<()>),
    /// Idle for the idle time since `epoch`? Then offer to be stopped.
    IdleCheck(u64),
    /// Tests: (a batch is running, the lease is kept between batches).
    #[cfg(test)]
    Probe(RpcReplyPort<(bool, bool)>),
}

/// How a session says it has been idle long enough to be stopped, with the number of jobs it
/// has received: to its supervisor, which decides (it knows whether a job is on its way). A
/// callback rather than the supervisor's address, so that a session knows nothing of who
/// spawned it.
pub type IdleReport = Arc<dyn Fn(WorkspaceKey, u64) + Send + Sync>;

pub struct SessionArgs {
    pub key: WorkspaceKey,
    /// Told when the session has been idle long enough to be stopped.
    pub idle: IdleReport,
    pub ctx: Arc<WorkerContext>,
    /// Makes the handlers of the session's steps (the real ones, or a test's fakes).
    pub step_factory: Arc<dyn StepFactory>,
    /// Restarts of the step actors: backoff, and at most so many within a window.
    pub step_restarts: RestartPolicy,
}

pub struct SessionState {
    args: SessionArgs,
    /// Waiting jobs, in the producer's send order (`Job::sent_at_ms`).
    queue: VecDeque<Job>,
    /// The running batch: its stop signal; `None` when idle.
    running: Option<Running>,
    /// The step actors, while there is work: started with the first job after an idle spell
    /// and stopped when the queue runs dry, so that an idle session is one actor, not five
    /// (1,000 idle sessions took 103 MiB with their step actors kept).
    steps: Option<Steps>,
    /// Restarts of step actors, bounded per time window.
    restarts: RestartPolicy,
    /// Step restarts waiting out their backoff: the steps stay until they are done, so that a
    /// crash is answered by a restart after its backoff even when the session goes idle.
    pending_restarts: usize,
    /// Set by `Shutdown`: new jobs are released at once.
    shutting_down: bool,
    /// Who asked for the shutdown, answered when the running job has ended.
    shutdown_reply: Option<RpcReplyPort<()>>,
    /// Counts the jobs started; an idle check from before the last start is stale.
    epoch: u64,
    /// Jobs received, so the supervisor can tell whether one is still on its way to us.
    received: u64,
    /// The workspace's lease between two batches of one busy spell: kept while more work is
    /// queued here, released when the work runs out or another worker waits for it.
    lease: Option<Lease>,
    /// Workers waiting for the lease (notices), told when it is released.
    waiters: Vec<Waiter>,
    /// Set when the lease was just given up to a waiter: the next batch lets the waiter take
    /// it first, instead of racing it.
    yielded: bool,
}

/// A worker waiting for this workspace's lease.
#[derive(Debug, Clone)]
pub struct Waiter {
    /// Its message's send time: work sent before it is interrupted.
    pub sent_at_ms: u64,
    /// Its notice queue, told when the lease is released.
    pub reply_to: Option<String>,
    /// Its `WORKER_ID`: whom the `released` notice counter names.
    pub worker: String,
}

/// Tell `waiters` that this worker released (or does not hold) `key`'s lease.
pub fn tell_released(ctx: &Arc<WorkerContext>, key: &WorkspaceKey, waiters: Vec<Waiter>) {
    let Some(sender) = ctx.notices.clone() else {
        return;
    };
    let notice = crate::delivery::notices::Notice::Released {
        client_id: key.client_id.clone(),
        project_id: key.project_id.clone(),
        from: ctx.config.worker_id.clone(),
    };
    tokio::spawn(async move {
        for waiter in waiters {
            let Some(url) = waiter.reply_to else { continue };
            match sender.send(&url, &notice).await {
                Ok(()) => crate::telemetry::metrics::notice_sent(notice.kind(), &waiter.worker),
                Err(e) => {
                    tracing::debug!(error = %e, "released notice not sent; the waiter polls the lease")
                }
            }
        }
    });
}

/// Why a session's step actors are stopped: the `reason` of `edit_worker.step_actors.stopped`.
/// Idle sessions are kept small by the first; the second means the actors lived until their
/// session went (stopped idle, failed, or shut down).
#[derive(Debug, Clone, Copy)]
enum StepsStop {
    /// No work running, queued or waiting for a restart.
    NoWork,
    /// The session itself stops.
    SessionEnded,
}

impl StepsStop {
    fn as_str(self) -> &'static str {
        match self {
            StepsStop::NoWork => "no_work",
            StepsStop::SessionEnded => "session_ended",
        }
    }
}

/// The batch at work.
struct Running {
    stop: StopSignal,
    /// The newest send time in the batch: only a message sent after it interrupts.
    newest_sent_ms: u64,
}

pub struct SessionActor;

impl SessionActor {
    /// With no work running or queued and no restart waiting out its backoff, the step actors
    /// are not needed until the next job, which starts new ones.
    fn stop_steps_when_idle(state: &mut SessionState) {
        if state.running.is_none() && state.queue.is_empty() && state.pending_restarts == 0 {
            Self::stop_steps(state, StepsStop::NoWork);
        }
    }

    /// Stop the step actors (the session is going idle or away); their next job starts new ones.
    fn stop_steps(state: &mut SessionState, why: StepsStop) {
        if let Some(steps) = state.steps.take() {
            tracing::debug!(workspace = %state.args.key, reason = why.as_str(), "step actors stopped");
            crate::telemetry::metrics::metrics()
                .step_actors_stopped
                .add(1, &[opentelemetry::KeyValue::new("reason", why.as_str())]);
            steps.stop();
        }
    }

    async fn start_next(
        myself: &ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        if state.running.is_some() {
            return Ok(());
        }
        if state.queue.is_empty() {
            if let Some(reply) = state.shutdown_reply.take() {
                let _ = reply.send(());
            }
            Self::stop_steps_when_idle(state);
            let epoch = state.epoch;
            myself.send_after(state.args.ctx.config.session_idle, move || {
                SessionMsg::IdleCheck(epoch)
            });
            return Ok(());
        }
        // A step that died is restarted after its backoff. Until then the next job waits here:
        // handed the dead actor, it would fail as `step_crashed` and use up one of its
        // message's deliveries for nothing. (A step can die before the session hears of it:
        // its failure is then on its way, and its restart starts the job.)
        if state.pending_restarts > 0 || state.steps.as_ref().is_some_and(Steps::any_dead) {
            tracing::info!(workspace = %state.args.key, queued = state.queue.len(), "the next job waits for a step's restart");
            return Ok(());
        }
        let steps = match &state.steps {
            Some(steps) => steps.clone(),
            None => {
                let args = &state.args;
                let steps = Steps::spawn(&*args.step_factory, &args.key, myself.get_cell()).await?;
                state.steps = Some(steps.clone());
                steps
            }
        };
        let lead = state.queue.pop_front().expect("the queue is not empty");
        state.epoch += 1;
        // Directly following messages of the same thread join this run, so that no agent run
        // is started only to be interrupted by the next message of its own thread.
        let mut batch = vec![lead];
        while state.queue.front().is_some_and(|next| {
            // A rollback runs alone: it is no request for the agent to join with others.
            next.request.thread_id == batch[0].request.thread_id
                && next.request.rollback_target().is_none()
                && batch[0].request.rollback_target().is_none()
        }) {
            batch.push(state.queue.pop_front().expect("front exists"));
        }
        let stop = StopSignal::default();
        let lease = state.lease.take();
        let yielded = std::mem::take(&mut state.yielded);
        state.running = Some(Running {
            stop: stop.clone(),
            newest_sent_ms: batch.iter().map(|j| j.sent_at_ms).max().unwrap_or(0),
        });
        let ctx = state.args.ctx.clone();
        let me = myself.clone();
        // The batch runs in its lead message's trace; the others say where their work went.
        let span = batch[0].span.clone();
        for follower in &batch[1..] {
            tracing::info!(parent: &follower.span, lead = %batch[0].message_id, "coalesced into one agent run with earlier messages of the thread");
        }
        tokio::spawn(
            async move {
                let lease = run_batch(ctx, steps, batch, stop, lease, yielded).await;
                let _ = me.cast(SessionMsg::JobEnded(lease));
            }
            .instrument(span),
        );
        Ok(())
    }

    /// Give the lease up (when held) and then tell the waiters. Awaited in the handler (one
    /// conditional write): the release is done before this session's next batch asks for the
    /// lease again, and before a shutdown is answered, so the next worker never waits for a
    /// lease that was meant to be free.
    async fn release_lease(args: &SessionArgs, lease: Option<Lease>, waiters: Vec<Waiter>) {
        if let Some(lease) = lease {
            lease.release().await;
        }
        args.ctx.leases.release_parked(&args.key).await;
        tell_released(&args.ctx, &args.key, waiters);
    }

    fn release(ctx: &Arc<WorkerContext>, job: Job) {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            job.release(&ctx.delivery, Duration::ZERO, "session stopping")
                .await;
        });
    }

    /// Queue a job in the producer's send order (a late or redelivered message goes where it
    /// was sent, not where it arrived; equal times keep their arrival order).
    fn enqueue_in_send_order(queue: &mut VecDeque<Job>, job: Job) {
        let at = queue.partition_point(|queued| queued.sent_at_ms <= job.sent_at_ms);
        queue.insert(at, job);
    }
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        // Idle from the start: a session whose first job never comes is stopped too.
        let idle = args.ctx.config.session_idle;
        myself.send_after(idle, || SessionMsg::IdleCheck(0));
        let restarts = args.step_restarts.clone();
        Ok(SessionState {
            args,
            queue: VecDeque::new(),
            running: None,
            steps: None,
            restarts,
            pending_restarts: 0,
            shutting_down: false,
            shutdown_reply: None,
            epoch: 0,
            received: 0,
            lease: None,
            waiters: Vec::new(),
            yielded: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Enqueue(job) => {
                if state.shutting_down {
                    Self::release(&state.args.ctx, *job);
                    return Ok(());
                }
                state.received += 1;
                let sent_at_ms = job.sent_at_ms;
                Self::enqueue_in_send_order(&mut state.queue, *job);
                match &state.running {
                    // A newer message interrupts the work in progress; an older one (late,
                    // redelivered, retried) never does: it waits its turn.
                    Some(running) if sent_at_ms > running.newest_sent_ms => {
                        running.stop.request(StopReason::Interrupted)
                    }
                    Some(_) => {
                        tracing::info!(workspace = %state.args.key, sent_at_ms, "an older message waits for the newer work in progress")
                    }
                    None => Self::start_next(&myself, state).await?,
                }
            }
            SessionMsg::NewerElsewhere(waiter) => {
                match &state.running {
                    Some(running) => {
                        if waiter.sent_at_ms > running.newest_sent_ms {
                            running.stop.request(StopReason::Interrupted);
                        }
                        state.waiters.push(waiter);
                    }
                    // Between batches the lease may still be kept for queued work (the next
                    // job waits for a step's restart): `Released` is said only once it is
                    // released, never while it is kept (issue 25). The next batch then lets
                    // the waiter go first.
                    None => {
                        let lease = state.lease.take();
                        if lease.is_some() && !state.queue.is_empty() {
                            state.yielded = true;
                        }
                        Self::release_lease(&state.args, lease, vec![waiter]).await;
                    }
                }
            }
            SessionMsg::JobEnded(lease) => {
                state.running = None;
                let keep = !state.queue.is_empty()
                    && state.waiters.is_empty()
                    && !state.shutting_down
                    && lease.as_ref().is_some_and(|l| l.check().check().is_ok());
                if keep {
                    state.lease = lease;
                } else if state.queue.is_empty()
                    && state.waiters.is_empty()
                    && !state.shutting_down
                    && lease.as_ref().is_some_and(|l| l.check().check().is_ok())
                {
                    // Nobody waits: set it aside without a write; the next batch takes it back
                    // with one, and a waiter's notice has it released (issue 25).
                    if let Some(lease) = lease {
                        lease.park().await;
                    }
                } else {
                    let waiters = std::mem::take(&mut state.waiters);
                    // Only the batch that follows at once yields; a later one finds the lease free.
                    state.yielded = !waiters.is_empty() && !state.queue.is_empty();
                    Self::release_lease(&state.args, lease, waiters).await;
                }
                Self::start_next(&myself, state).await?;
            }
            #[cfg(test)]
            SessionMsg::Probe(reply) => {
                let _ = reply.send((state.running.is_some(), state.lease.is_some()));
            }
            SessionMsg::IdleCheck(epoch) => {
                if epoch == state.epoch && state.running.is_none() && state.queue.is_empty() {
                    // The supervisor decides: it knows whether a job is on its way to us.
                    (state.args.idle)(state.args.key.clone(), state.received);
                }
            }
            SessionMsg::RestartStep(kind) => {
                tracing::warn!(workspace = %state.args.key, step = ?kind, "restarting step actor");
                crate::telemetry::metrics::metrics().restarts.add(
                    1,
                    &[opentelemetry::KeyValue::new("step", format!("{kind:?}"))],
                );
                state.pending_restarts = state.pending_restarts.saturating_sub(1);
                if let Some(steps) = &mut state.steps {
                    let args = &state.args;
                    steps
                        .respawn(kind, &*args.step_factory, &args.key, myself.get_cell())
                        .await?;
                }
                if state.running.is_none() && !state.queue.is_empty() {
                    // Work waited for the restart.
                    Self::start_next(&myself, state).await?;
                } else {
                    // Idle since the crash: the restarted set is not needed until the next job.
                    Self::stop_steps_when_idle(state);
                }
            }
            SessionMsg::Shutdown(reply) => {
                state.shutting_down = true;
                for job in state.queue.drain(..) {
                    Self::release(&state.args.ctx, job);
                }
                match &state.running {
                    Some(running) => {
                        running.stop.request(StopReason::Shutdown);
                        state.shutdown_reply = Some(reply);
                    }
                    None => {
                        let _ = reply.send(());
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SessionMsg>,
        event: SupervisionEvent,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        // ractor's default would stop the session when any child ends; we restart instead.
        if let SupervisionEvent::ActorFailed(cell, error) = event {
            // A step of a set already stopped (the session went idle): nothing to restart.
            let Some(kind) = state.steps.as_ref().and_then(|s| s.kind_of(cell.get_id())) else {
                return Ok(());
            };
            tracing::error!(workspace = %state.args.key, step = ?kind, %error, "step actor failed");
            // Past the limit the failure moves up: the session fails and its supervisor decides.
            let decision = state.restarts.record_failure();
            crate::telemetry::metrics::metrics().step_failures.add(
                1,
                &[
                    opentelemetry::KeyValue::new("step", format!("{kind:?}")),
                    opentelemetry::KeyValue::new("escalated", decision.is_err()),
                ],
            );
            let backoff = decision.map_err(|e| {
                ActorProcessingErr::from(format!("step {kind:?} of {}: {e}", state.args.key))
            })?;
            state.pending_restarts += 1;
            myself.send_after(backoff, move || SessionMsg::RestartStep(kind));
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        // Jobs still waiting go back to the queue at once rather than after their timeout.
        for job in state.queue.drain(..) {
            Self::release(&state.args.ctx, job);
        }
        if let Some(running) = &state.running {
            running.stop.request(StopReason::Shutdown);
        }
        Self::release_lease(
            &state.args,
            state.lease.take(),
            std::mem::take(&mut state.waiters),
        )
        .await;
        // The step actors live and die with their session.
        Self::stop_steps(state, StepsStop::SessionEnded);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
