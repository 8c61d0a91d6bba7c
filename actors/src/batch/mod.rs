//! # The batch folder
//!
//! Owns the life of one batch, as a task its session spawned: `run_batch` (here) takes the
//! lease, runs `execute` (the phases, in order), and ends each message (`outcome`); the parts
//! (`execute`, `build_publish`, `agent_turn`, `push`, `rollback`, `check_step`) take a
//! `run::BatchRun` and never call back into this file. May use the steps, delivery, tenant and
//! the leaves; knows nothing of sessions or the intake.
//!
//! # run_batch
//!
//! The life of one batch, run as a task by its session: its `started` events, the workspace's
//! lease, the work (`execute`), how it ended, saving what a job that did not complete left, and
//! each message's end (`outcome`). Every way out ends each message exactly once: a terminal
//! event and a delete, or (crash of a step, shutdown, lost lease) a release back to the queue.

pub(crate) mod agent_turn;
pub(crate) mod build_publish;
pub(crate) mod check_step;
pub(crate) mod context;
pub(crate) mod execute;
pub(crate) mod job_error;
pub(crate) mod journal;
pub(crate) mod lease_scope;
pub(crate) mod outcome;
pub(crate) mod progress;
pub(crate) mod push;
pub(crate) mod rollback;
pub(crate) mod run;
pub(crate) mod stop;
use std::sync::Arc;

use crate::batch::agent_turn::record_thread;
use crate::batch::context::WorkerContext;
use crate::batch::execute::execute;
use crate::batch::job_error::JobError;
use crate::batch::journal::Journal;
use crate::batch::lease_scope::{LeaseScope, take_lease};
use crate::batch::outcome::{Ending, ends_here, finish};
use crate::batch::push::save_work;
use crate::batch::run::{BatchRun, StartedEvents};
use crate::batch::stop::{StopReason, StopSignal};
use crate::contract::status::{EventType, StatusEvent};
use crate::delivery::job::Job;
use crate::delivery::lease::Lease;
use crate::steps::Steps;
use crate::steps::build::BuildError;

/// Run a batch to its end: the first job and any directly following jobs of the same thread,
/// which run as one agent turn (their commands joined in order) and each get their own
/// terminal event. Never panics on bad input; every path reports or releases every message.
///
/// The batch runs under the workspace's lease: `lease` when its session still holds it from
/// the batch before, else taken here (waiting for another worker to hand it over; `yielded`:
/// this worker has just handed it to a waiter, who goes first). The lease comes back when it
/// still holds, for the session to keep or release.
pub(crate) async fn run_batch(
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

    let mut journal = Journal::default();
    let key = batch[0].request.workspace();
    let lease = match lease {
        Some(lease) => Ok(lease),
        None => take_lease(&ctx, &key, &batch, &stop, yielded).await,
    };
    let (outcome, mut lease) = match lease {
        Ok(mut lease) => {
            journal.fence = Some(lease.check().clone());
            // A lease found lost stops the work at once, as an interrupt would.
            let lost = lease.check().lost().clone();
            let stopper = stop.clone();
            let watch = tokio::spawn(async move {
                lost.cancelled().await;
                stopper.request(StopReason::LeaseLost);
            });
            let scope = LeaseScope::of(&mut lease);
            let run = BatchRun {
                ctx: &ctx,
                steps: &steps,
                stop: &stop,
                scope: &scope,
            };
            let outcome = execute(&run, &batch, &mut started, &mut journal).await;
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
    let mut ending = match outcome {
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
        crate::telemetry::metrics::metrics().interrupts.add(1, &[]);
    }
    if let (Ending::Stopped(reason), Some(asked)) = (&ending, stop.requested_at()) {
        // From the stop request to the agent's process group gone (or the build stopped).
        let latency_us = asked.elapsed().as_micros() as u64;
        tracing::info!(
            ?reason,
            interrupt_latency_us = latency_us,
            stopped_at_ms = crate::delivery::records::now_ms(),
            "work stopped"
        );
        crate::telemetry::metrics::metrics()
            .interrupt_latency_us
            .record(
                latency_us,
                &[opentelemetry::KeyValue::new("reason", reason.as_str())],
            );
    }
    if matches!(ending, Ending::Stopped(StopReason::LeaseLost)) {
        tracing::warn!(workspace = %key, "the workspace's lease was lost: nothing more is pushed or published here; the messages go back to the queue");
    }
    // Work the agent left in the worktree is never thrown away: commit and push it on the
    // thread's own branch (or keep it upstream under a saved ref) before reporting. Only under
    // a lease that still holds: without it, the checkout (on a shared volume) and the upstream
    // belong to another worker now. A message is deleted as interrupted or failed only once its
    // work is durable: otherwise it goes back to the queue (issue 25).
    let held = lease.as_ref().is_some_and(|l| l.check().check().is_ok());
    let superseded = journal.superseded.clone();
    let durable = match (&ending, &scope) {
        (Ending::Completed, _) => Ok(()),
        // No lease was ever taken, or the branch was never checked out: nothing was done in
        // the checkout, and there is no work to save.
        (_, None) => Ok(()),
        _ if !journal.checked_out => Ok(()),
        (_, Some(scope)) if held => {
            save(&ctx, &steps, &batch, &superseded, scope, &mut journal).await
        }
        // Shutdown and a lost lease give the messages back whatever was saved.
        (Ending::Stopped(StopReason::Shutdown | StopReason::LeaseLost), _) => Ok(()),
        _ => Err("the lease was lost before the work was saved".to_owned()),
    };
    if let Err(detail) = durable {
        tracing::error!(%detail, "unfinished work is not durable; its messages are not deleted");
        if let Ending::Stopped(StopReason::Interrupted) | Ending::Failed(_) = &ending {
            let ended_as = match &ending {
                Ending::Failed(_) => "failed",
                _ => "interrupted",
            };
            ending = Ending::Failed(JobError::WorkNotSaved { ended_as, detail });
        }
    }
    // The thread's document once for the batch (conversation, mark), under its lease.
    if let Some(fence) = journal.fence.clone() {
        let newest_ended = batch
            .iter()
            .filter(|job| ends_here(&ctx, job, &ending, &journal))
            .map(|job| job.sent_at_ms)
            .max();
        record_thread(&ctx, &fence, &key, &mut journal, newest_ended).await;
    }
    let lead_received = batch[0].received_at;
    journal
        .durations
        .insert("total".into(), lead_received.elapsed().as_millis() as u64);
    // Stop renewing visibility, and wait for a renewal in flight, before any message is
    // deleted or released.
    futures::future::join_all(batch.iter_mut().map(|job| job.renewal.stop())).await;
    started.sent().await;
    for job in batch {
        finish(&ctx, job, &ending, &journal).await;
    }
    lease.filter(|l| l.check().check().is_ok())
}

/// Save what the batch's working messages (not the superseded ones) left.
async fn save(
    ctx: &WorkerContext,
    steps: &Steps,
    batch: &[Job],
    superseded: &std::collections::BTreeSet<String>,
    scope: &LeaseScope,
    journal: &mut Journal,
) -> Result<(), String> {
    let working: Vec<&Job> = batch
        .iter()
        .filter(|j| !superseded.contains(&j.message_id))
        .collect();
    save_work(ctx, steps, &working, scope, journal).await
}
