//! A batch and the workspace's lease: taking it (waiting, with a notice to the holder, while
//! another worker holds it) and what it gives the batch's effects (`LeaseScope`: the check
//! before each of them and the fences its pushes and publishes carry). See ARCHITECTURE.md,
//! "Many workers".

use std::time::{Duration, Instant};

use crate::batch::context::WorkerContext;
use crate::batch::job_error::JobError;
use crate::batch::stop::StopSignal;
use crate::contract::message::WorkspaceKey;
use crate::delivery::job::Job;
use crate::delivery::lease::{Acquired, Lease};
use crate::delivery::lease_check::LeaseCheck;
use crate::delivery::notices::Notice;
use crate::steps::git::Fence;
use crate::steps::publish::BucketFence;

/// What the batch's lease gives its effects: the check before each of them, the fences they
/// carry, and whether the workspace has just come from another worker.
#[derive(Clone)]
pub(crate) struct LeaseScope {
    pub(crate) check: LeaseCheck,
    /// The upstream's fence (pushes), when workers share the queue.
    pub(crate) fence: Option<Fence>,
    /// The bucket's fence (publishes), when workers share the queue.
    pub(crate) bucket_fence: Option<BucketFence>,
    /// The workspace came from another worker (or nobody known): catch up before working.
    pub(crate) handover: bool,
}

impl LeaseScope {
    pub(crate) fn of(lease: &mut Lease) -> LeaseScope {
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
pub(crate) async fn take_lease(
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
                let until_expiry = Duration::from_millis(
                    expires_at_ms.saturating_sub(crate::delivery::records::now_ms()),
                );
                until_expiry.clamp(Duration::from_millis(100), LEASE_POLL)
            }
            Err(e) => {
                // Undecided, not failed: the message is kept (renewed) and the lease asked for
                // again, for `HOLD_UNDECIDED_SECONDS`; a failure given back at once burns a
                // delivery per try (issue 25).
                failures += 1;
                if asked.elapsed() >= ctx.delivery.hold_undecided() {
                    return Err(e.into());
                }
                tracing::warn!(workspace = %key, error = %e, failures, "the lease store did not answer; trying again");
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
        Ok(()) => {
            tracing::info!(
                workspace = %key,
                message_id = %newest.message_id,
                %holder,
                at_ms = crate::delivery::records::now_ms(),
                "interrupt notice sent"
            );
            crate::telemetry::metrics::notice_sent(notice.kind(), holder);
        }
        Err(e) => {
            tracing::warn!(workspace = %key, %holder, error = %e, "notice not sent; waiting for the lease")
        }
    }
}
