//! How each message of a batch ends: its terminal event (built once, here, from the batch's
//! `Journal`; a redelivered message gets it again from its record), recorded, sent and then
//! the message deleted; or the message released for another try (retry policy in
//! `job_error.rs`), for the next worker (shutdown) or for the lease's next holder. Out of
//! retries, a copy goes to the dead-letter queue with its last error.

use std::time::Duration;

use crate::batch::context::WorkerContext;
use crate::batch::job_error::JobError;
use crate::batch::journal::Journal;
use crate::batch::stop::StopReason;
use crate::contract::status::{EventError, EventType, StatusEvent};
use crate::delivery::job::Job;

/// How the job ended, before it is reported.
pub(crate) enum Ending {
    Completed,
    /// Stopped by a newer message or by shutdown; its work was saved in `commit`.
    Stopped(StopReason),
    Failed(JobError),
}

/// Report one message's ending and delete it, or release it for another try.
pub(crate) async fn finish(ctx: &WorkerContext, job: Job, ending: &Ending, journal: &Journal) {
    let request = &job.request;
    let config = &ctx.config;
    for (phase, ms) in &journal.durations {
        crate::telemetry::metrics::metrics().phase_ms.record(
            *ms as f64,
            &[opentelemetry::KeyValue::new("phase", phase.clone())],
        );
    }
    let superseded = journal.superseded.contains(&job.message_id);
    let event_type = match ending {
        _ if superseded => EventType::Interrupted,
        Ending::Completed => EventType::Completed,
        Ending::Stopped(StopReason::Interrupted) => EventType::Interrupted,
        Ending::Stopped(StopReason::Shutdown) => {
            // Saved and pushed; back to the queue at once for the next worker.
            job.release(&ctx.delivery, Duration::ZERO, "shutdown").await;
            crate::telemetry::metrics::outcome("released");
            return;
        }
        Ending::Stopped(StopReason::LeaseLost) => {
            // The workspace's next holder runs it: back to the queue at once.
            job.release(&ctx.delivery, Duration::ZERO, "lease lost")
                .await;
            crate::telemetry::metrics::outcome("released");
            return;
        }
        Ending::Failed(e) => match e.retry_delay(job.receive_count, config) {
            Some(delay) => {
                tracing::warn!(error = %e, kind = e.kind(), attempt = job.receive_count, ?delay, "passing failure; the message will be tried again");
                job.release(&ctx.delivery, delay, "retry").await;
                crate::telemetry::metrics::outcome("retried");
                return;
            }
            None => EventType::Failed,
        },
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
    event.commit = journal.commit.clone();
    event.durations_ms = Some(journal.durations.clone());
    if let Some(agent) = &journal.agent {
        event.result = agent.result.clone();
    }
    match (&journal.cost_payer, journal.cost_usd) {
        (Some(payer), Some(cost)) if *payer == job.message_id => event.cost_usd = Some(cost),
        (Some(payer), Some(_)) => {
            event.cost_usd = Some(0.0);
            event.cost_paid_by = Some(payer.clone());
        }
        _ => event.cost_usd = journal.cost_usd,
    }
    if journal.turns > 0 {
        event.agent_turns = Some(journal.turns);
    }
    if journal.conversation_restarted {
        event.conversation_restarted = Some(true);
    }
    if journal.build_repairs > 0 {
        event.build_repairs = Some(journal.build_repairs);
    }
    event.invalidation_id = journal.invalidation_id.clone();
    event.check = journal.check.clone();
    if let Some(report) = &journal.published {
        let bucket = config.bucket_for(&request.workspace());
        event.preview_url = Some(config.preview_url_for(&bucket));
        event.bucket = Some(bucket);
        event.publish = Some(report.clone());
        event.deploy_id = report.deploy_id.clone();
    }
    event.rolled_back_to = journal.rolled_back_to.clone();
    event.saved_ref = journal.saved_ref.clone();
    if let Ending::Failed(e) = ending {
        event.error = Some(EventError {
            kind: e.kind().into(),
            message: e.to_string(),
        });
        if e.is_retryable() {
            // Out of retries: keep the message, with its last error, where a person can look.
            let reason = format!("failed after {} deliveries: {e}", job.receive_count);
            let body = crate::contract::message::request_body(request);
            if let Err(err) = ctx.delivery.dead_letter(&body, &reason).await {
                tracing::error!(error = %err, "could not keep the failed message in the dead-letter queue");
            }
        }
    }
    // The thread has got this far: a message of it sent earlier that comes later is
    // superseded, never applied on top of this one.
    // Usually the batch's one write of the thread's document raised it already. Without a
    // lease (the message ended before its batch took one: a newer message of its thread
    // overtook it, or the lease store was away) a shared document is not written: only the
    // workspace's holder writes it, fenced (issue 25), and the newer message raises the mark
    // past this one; an unfenced try cost a read and was refused over any holder's document.
    let fence = journal.fence.clone().or_else(|| {
        (!ctx.delivery.records.is_shared()).then(|| {
            crate::delivery::lease_check::LeaseCheck::unfenced(&request.workspace().to_string())
        })
    });
    if !journal.mark_covers(job.sent_at_ms)
        && let Some(fence) = fence
        && let Err(e) = ctx
            .delivery
            .records
            .raise_thread_mark(
                &request.workspace(),
                &request.thread_id,
                job.sent_at_ms,
                &fence,
            )
            .await
    {
        tracing::warn!(error = %e, "could not record how far the thread has got");
    }
    report(ctx, job, event).await;
}

/// Whether `finish` ends the message here with a terminal event (rather than giving it back):
/// the batch raises the thread's mark for those in its one write of the thread's document.
/// Only a saving: `finish` raises the mark itself for a message that document did not cover.
pub(crate) fn ends_here(
    ctx: &WorkerContext,
    job: &Job,
    ending: &Ending,
    journal: &Journal,
) -> bool {
    match ending {
        _ if journal.superseded.contains(&job.message_id) => true,
        Ending::Completed | Ending::Stopped(StopReason::Interrupted) => true,
        Ending::Stopped(StopReason::Shutdown | StopReason::LeaseLost) => false,
        Ending::Failed(e) => e.retry_delay(job.receive_count, &ctx.config).is_none(),
    }
}

/// Record, report and delete: the message has ended.
async fn report(ctx: &WorkerContext, job: Job, event: StatusEvent) {
    crate::telemetry::metrics::outcome(match event.event_type {
        EventType::Completed => "completed",
        EventType::Interrupted => "interrupted",
        _ => "failed",
    });
    // The record store or the status queue away: the message is kept (invisible) and its
    // ending tried again, rather than given back to burn a delivery (issue 25).
    ctx.delivery
        .finish_holding(&job.receipt, &event, false, ctx.delivery.hold_undecided())
        .await;
}
