//! # The delivery folder
//!
//! Owns getting a message safely in and out, across workers: the SQS side (here), the job that
//! holds a message (`job`), the records of outcomes and thread documents (`records`, `threads`),
//! leases and what fences a holder's writes (`lease`, `lease_check`), notices between workers
//! and each worker's presence. May use only `config`, `contract`, `telemetry`, `tenant` and
//! `backoff`: no step, batch or session.
//!
//! # Delivery
//!
//! SQS delivery of input messages: deleting a finished message (only after its terminal event),
//! keeping a running message invisible, releasing a message to be tried again, and keeping a
//! rejected one in the dead-letter queue.
//!
//! **No message reaches the dead-letter queue without its terminal event** (issue 25). Every
//! receive counts toward the input queue's redrive `maxReceiveCount` (read at start,
//! `read_redrive_limit`), and SQS moves a message whose count has reached it at its next
//! receive, with no event for anyone. So every path that gives a held message back goes
//! through one rule, `Delivery::give_back`: before its last delivery it is released; on its
//! last delivery it is ended here and now, `failed` with `error.kind` `out_of_deliveries`, a
//! copy kept in the dead-letter queue with the reason. And while the worker cannot decide a
//! message at all (the lease or record store not answering) it does not give it back: it keeps
//! it invisible and asks again (`hold_undecided`), for at most `HOLD_UNDECIDED_SECONDS`.

pub(crate) mod job;
pub mod lease;
pub mod lease_check;
pub mod notices;
pub(crate) mod presence;
pub mod records;
pub mod threads;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::contract::status::{EventError, EventType, StatusEvent, StatusSink};
use crate::delivery::records::RecordStore;

/// `error.kind` of a message ended on its last delivery before the queue's redrive because it
/// could not finish here (shutdown, a lost lease, a store away past `HOLD_UNDECIDED_SECONDS`):
/// ended with an event rather than moved to the dead-letter queue without one.
pub(crate) const OUT_OF_DELIVERIES: &str = "out_of_deliveries";

/// A held message's `started` mark is refreshed at every this many visibility renewals.
pub(crate) const MARK_EVERY: u32 = 2;

/// How long a `started` mark holds, for a visibility timeout of `visibility`: five sixths of it.
/// Refreshed every two thirds (two renewals of a third), a live worker's mark never lapses
/// (a sixth to spare); and as each refresh comes with a renewal, a dead worker's mark ends
/// (at most five sixths after its last refresh) before its message is visible again (a full
/// visibility after its last renewal, which is no earlier). A first delivery received a moment ago
/// is not marked at receipt (`intake::decide`): its first mark, at its first renewal (under
/// two thirds of the visibility after the receive), still comes before its message could be
/// visible again, a full visibility after the receive.
pub(crate) fn mark_hold(visibility: Duration) -> Duration {
    visibility * 5 / 6
}

/// What the renewals of a held message (`Delivery::keep_invisible`) do with its `started`
/// mark in the records.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Marking {
    /// Nothing: the message is not decided yet, there is no mark of ours to keep.
    None,
    /// Marked at receipt: refreshed for this long at every `MARK_EVERY`th renewal.
    Refresh(Duration),
    /// Not marked yet (`records::Begin::Unmarked`): marked at the first renewal, a third into
    /// the visibility and so before a copy can come out anywhere, then refreshed as above.
    AtFirstRenewal(Duration),
}

/// `DeliveryError::op` of a delete.
const DELETE: &str = "delete message";

/// How long an undecided message is held when the worker is not told (tests' `Delivery`).
const DEFAULT_HOLD_UNDECIDED: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
#[error("{op}: {message}")]
pub(crate) struct DeliveryError {
    op: &'static str,
    message: String,
}

#[derive(Clone)]
pub(crate) struct Delivery {
    sqs: aws_sdk_sqs::Client,
    /// The input queue, whose messages we delete or release.
    input_queue_url: String,
    /// Where rejected messages are kept.
    dead_letter_queue_url: Option<String>,
    /// Status events.
    pub(crate) status: StatusSink,
    /// The visibility timeout we keep renewing while a message runs.
    visibility: Duration,
    /// Each message's outcome, recorded before it is reported: a message that comes back
    /// after it ended is deleted, not run again.
    pub(crate) records: RecordStore,
    /// The input queue's redrive `maxReceiveCount` (`None`: no redrive policy): a message
    /// received this many times is on its last delivery, and giving it back would hand it to
    /// the dead-letter queue without an event.
    redrive_limit: Option<u32>,
    /// `HOLD_UNDECIDED_SECONDS`: how long a message whose fate cannot be decided (the lease or
    /// record store not answering) is kept invisible, and asked about again, before the rule
    /// of `give_back` applies to it.
    hold_undecided: Duration,
}

/// A held message on its way back to the queue, with what it takes to end it instead.
pub(crate) struct HeldMessage {
    pub(crate) message_id: String,
    /// The newest handle and receive count.
    pub(crate) receipt: Receipt,
    /// Its `failed` event as far as it is known (ids, trace, branch), should it end here.
    pub(crate) event: StatusEvent,
    /// The body kept in the dead-letter queue beside its reason, should it end here.
    pub(crate) body: String,
}

/// What `give_back` did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GaveBack {
    /// Visible again after the delay asked for.
    Released,
    /// It was on its last delivery: ended `failed` (`out_of_deliveries`).
    Ended,
}

impl Delivery {
    pub(crate) fn new(
        sqs: aws_sdk_sqs::Client,
        input_queue_url: String,
        dead_letter_queue_url: Option<String>,
        status: StatusSink,
        visibility: Duration,
        records: RecordStore,
    ) -> Delivery {
        Delivery {
            sqs,
            input_queue_url,
            dead_letter_queue_url,
            status,
            visibility,
            records,
            redrive_limit: None,
            hold_undecided: DEFAULT_HOLD_UNDECIDED,
        }
    }

    /// The input queue's redrive `maxReceiveCount`, as read at start.
    pub(crate) fn with_redrive_limit(mut self, limit: Option<u32>) -> Delivery {
        self.redrive_limit = limit;
        self
    }

    /// `HOLD_UNDECIDED_SECONDS`.
    pub(crate) fn with_hold_undecided(mut self, hold: Duration) -> Delivery {
        self.hold_undecided = hold;
        self
    }

    pub(crate) fn hold_undecided(&self) -> Duration {
        self.hold_undecided
    }

    /// Whether a message delivered `receive_count` times is on its last delivery: SQS moves it
    /// to the dead-letter queue at its next receive.
    pub(crate) fn on_last_delivery(&self, receive_count: u32) -> bool {
        self.redrive_limit
            .is_some_and(|limit| receive_count >= limit)
    }

    /// The one rule for giving a held message back (shutdown, a lost lease, a retry, a session
    /// or the record store that cannot take it, a copy held elsewhere): released to be visible
    /// after `delay`, unless it is on its last delivery; then it is ended now, `failed` with
    /// `out_of_deliveries` and `why`, its body kept in the dead-letter queue with the reason.
    /// Never a silent move to the dead-letter queue. Stop the message's renewal first.
    pub(crate) async fn give_back(
        &self,
        held: HeldMessage,
        delay: Duration,
        why: &str,
    ) -> GaveBack {
        let receive_count = held.receipt.receive_count();
        if !self.on_last_delivery(receive_count) {
            // Our `started` mark expires now: the next worker starts it at once.
            if let Err(e) = self.records.give_up(&held.message_id).await {
                tracing::warn!(error = %e, message_id = %held.message_id, "could not let go of the message's record; the next worker waits for its mark to expire");
            }
            if let Err(e) = self.release(&held.receipt.current(), delay).await {
                tracing::warn!(error = %e, why, message_id = %held.message_id, "could not release the message; it returns after its visibility timeout");
            }
            return GaveBack::Released;
        }
        let reason = format!(
            "given back on its last delivery ({receive_count} of the queue's maxReceiveCount \
             {}) because {why}: ended here rather than moved to the dead-letter queue without \
             an event",
            self.redrive_limit.unwrap_or_default()
        );
        tracing::warn!(message_id = %held.message_id, receive_count, why, "message on its last delivery ended failed (out_of_deliveries) instead of given back");
        crate::telemetry::metrics::outcome("failed");
        let mut event = held.event;
        event.event_type = EventType::Failed;
        event.error = Some(EventError {
            kind: OUT_OF_DELIVERIES.into(),
            message: reason.clone(),
        });
        if let Err(e) = self.dead_letter(&held.body, &reason).await {
            // Still ended with its event; SQS's own redrive keeps the message then.
            tracing::error!(error = %e, message_id = %held.message_id, "could not keep a copy in the dead-letter queue; the event is sent and the message left to the queue's redrive");
            if let Err(e) = self.status.send(&event).await {
                tracing::error!(error = %e, message_id = %held.message_id, "terminal event not sent");
            }
            return GaveBack::Ended;
        }
        // Asked again for a visibility timeout at most: a store that is away has had its
        // `HOLD_UNDECIDED_SECONDS` already on the paths that wait for it.
        self.finish_holding(&held.receipt, &event, true, self.visibility)
            .await;
        GaveBack::Ended
    }

    /// `finish`, asked again while it fails (the record store or the status queue away), the
    /// message kept invisible meanwhile, for at most `hold` (`HOLD_UNDECIDED_SECONDS` when it
    /// ran: its work is done and worth the wait). Past that, a
    /// message on its last delivery (or `must_end`) is ended without its record (the event
    /// sent, the message deleted): an unrecorded ending is better than none; any other is
    /// left to come back after its visibility timeout.
    pub(crate) async fn finish_holding(
        &self,
        receipt: &Receipt,
        event: &StatusEvent,
        must_end: bool,
        hold: Duration,
    ) {
        let started = std::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        let mut renewed = std::time::Instant::now();
        loop {
            let err = match self.finish(&receipt.current(), event).await {
                Ok(()) => return,
                // Recorded and reported: a delete that did not take leaves a message whose
                // next delivery is finished again from its record (and one moved to the
                // dead-letter queue has had its event).
                Err(e) if e.op == DELETE => {
                    tracing::warn!(error = %e, message_id = %event.message_id, "ended message not deleted; its next delivery is finished from its record");
                    return;
                }
                Err(e) => e,
            };
            if started.elapsed() >= hold {
                let last = must_end || self.on_last_delivery(receipt.receive_count());
                if !last {
                    tracing::error!(error = %err, message_id = %event.message_id, "message not finished; it will be delivered again");
                    return;
                }
                tracing::error!(error = %err, message_id = %event.message_id, "message on its last delivery could not be recorded as ended; its event is sent unrecorded and the message deleted");
                if let Err(e) = self.status.send(event).await {
                    tracing::error!(error = %e, message_id = %event.message_id, "terminal event not sent; the message is left to the queue's redrive");
                    return;
                }
                if let Err(e) = self.delete(&receipt.current()).await {
                    tracing::error!(error = %e, message_id = %event.message_id, "ended message not deleted");
                }
                return;
            }
            tracing::warn!(error = %err, message_id = %event.message_id, "message not finished yet; keeping it and trying again");
            if renewed.elapsed() >= self.visibility / 3 {
                if let Err(e) = self
                    .set_visibility(&receipt.current(), self.visibility)
                    .await
                {
                    tracing::warn!(error = %e, "could not extend message visibility");
                }
                renewed = std::time::Instant::now();
            }
            tokio::time::sleep(backoff.failed()).await;
        }
    }

    pub(crate) fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.sqs
    }

    /// End a message: record its outcome, send the terminal event, then delete the message.
    /// The record comes first, so that whatever fails after it, a copy of the message that
    /// comes back is finished with this same event and never runs again. If the record or the
    /// event cannot be written, the message stays in the queue (it comes back after its
    /// visibility timeout): an event is never skipped.
    pub(crate) async fn finish(
        &self,
        receipt_handle: &str,
        event: &StatusEvent,
    ) -> Result<(), DeliveryError> {
        debug_assert!(event.event_type.is_terminal());
        let body = serde_json::to_string(event).expect("status events serialize");
        let earlier = self
            .records
            .end(&event.message_id, &body)
            .await
            .map_err(|e| DeliveryError {
                op: "record the outcome",
                message: e.to_string(),
            })?;
        if let Some(recorded) = earlier {
            // A copy ran elsewhere and ended first: its ending stands, repeated as it was.
            tracing::warn!(message_id = %event.message_id, "this message had already ended (a copy ran elsewhere); repeating its recorded event instead of a second ending");
            return self.finish_again(receipt_handle, &recorded).await;
        }
        self.status.send(event).await.map_err(|e| DeliveryError {
            op: "terminal status event",
            message: e.to_string(),
        })?;
        self.delete(receipt_handle).await
    }

    /// Finish a message whose outcome was recorded earlier (a redelivery, a copy, a delete
    /// that did not take): the recorded event again, as it was, then the delete.
    pub(crate) async fn finish_again(
        &self,
        receipt_handle: &str,
        recorded_event: &str,
    ) -> Result<(), DeliveryError> {
        self.status
            .send_recorded(recorded_event)
            .await
            .map_err(|e| DeliveryError {
                op: "repeated terminal status event",
                message: e.to_string(),
            })?;
        self.delete(receipt_handle).await
    }

    pub(crate) async fn delete(&self, receipt_handle: &str) -> Result<(), DeliveryError> {
        self.sqs
            .delete_message()
            .queue_url(&self.input_queue_url)
            .receipt_handle(receipt_handle)
            .send()
            .await
            .map_err(|e| DeliveryError {
                op: DELETE,
                message: DisplayErrorContext(&e).to_string(),
            })?;
        Ok(())
    }

    /// Make the message visible again after `delay`, for this or another worker to take.
    pub(crate) async fn release(
        &self,
        receipt_handle: &str,
        delay: Duration,
    ) -> Result<(), DeliveryError> {
        self.set_visibility(receipt_handle, delay).await
    }

    /// Keep a rejected message in the dead-letter queue, with the reason beside it. The reason
    /// is redacted (a git error can carry the remote's token); the body is the producer's own
    /// message and is kept as it came.
    pub(crate) async fn dead_letter(&self, body: &str, reason: &str) -> Result<(), DeliveryError> {
        let Some(url) = &self.dead_letter_queue_url else {
            return Ok(());
        };
        // Redacted before it is cut, so a secret cut in half is still recognised.
        let reason = crate::telemetry::redact::redact(reason);
        let reason_attr = aws_sdk_sqs::types::MessageAttributeValue::builder()
            .data_type("String")
            .string_value(reason.chars().take(1024).collect::<String>())
            .build()
            .map_err(|e| DeliveryError {
                op: "dead-letter attribute",
                message: e.to_string(),
            })?;
        // An empty body cannot be sent to SQS; keep the fact that it was empty.
        let body = if body.is_empty() {
            "(empty message)"
        } else {
            body
        };
        self.sqs
            .send_message()
            .queue_url(url)
            .message_body(body)
            .message_attributes("rejectReason", reason_attr)
            .send()
            .await
            .map_err(|e| DeliveryError {
                op: "send to dead-letter queue",
                message: DisplayErrorContext(&e).to_string(),
            })?;
        Ok(())
    }

    /// Renew the message's visibility until `stop` is cancelled, so a long job is not handed to
    /// another worker halfway, and refresh its `started` mark in the records for `hold`.
    /// Renewals happen at a third of the timeout, leaving two chances before it runs out; a
    /// failed renewal is logged and tried again at the next tick.
    ///
    /// Await the returned handle after cancelling, before deleting or releasing the message: a
    /// renewal still in flight would otherwise land after a release and hide the message again.
    ///
    /// `marking` says what becomes of the message's mark meanwhile.
    pub(crate) fn keep_invisible(
        &self,
        receipt: Receipt,
        message_id: String,
        marking: Marking,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let delivery = self.clone();
        let every = (self.visibility / 3).max(Duration::from_secs(1));
        let (hold, first_mark) = match marking {
            Marking::None => (None, MARK_EVERY),
            Marking::Refresh(hold) => (Some(hold), MARK_EVERY),
            Marking::AtFirstRenewal(hold) => (Some(hold), 1),
        };
        tokio::spawn(async move {
            // The mark is refreshed at every other renewal (`MARK_EVERY`): with the short
            // visibility of issue 25 a refresh at each would cost the lease store a GET and a
            // PUT every 10 s per held message. See `mark_hold` for why it still never lapses.
            let mut ticks: u32 = 0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                // The newest handle at each tick: a copy received meanwhile lends us its own.
                if let Err(e) = delivery
                    .set_visibility(&receipt.current(), delivery.visibility)
                    .await
                {
                    tracing::warn!(error = %e, "could not extend message visibility");
                }
                ticks += 1;
                if let Some(hold) = hold
                    && ticks >= first_mark
                    && (ticks - first_mark).is_multiple_of(MARK_EVERY)
                    && let Err(e) = delivery.records.begin(&message_id, hold).await
                {
                    tracing::warn!(error = %e, "could not refresh the message's mark in the records");
                }
            }
        })
    }

    /// The input queue's redrive `maxReceiveCount`, from its `RedrivePolicy` (`None`: the
    /// queue has none). Read once at start: the rule of `give_back` needs it.
    pub(crate) async fn read_redrive_limit(&self) -> Result<Option<u32>, DeliveryError> {
        use aws_sdk_sqs::types::QueueAttributeName;
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.input_queue_url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| DeliveryError {
                op: "read the input queue's redrive policy",
                message: DisplayErrorContext(&e).to_string(),
            })?;
        let Some(policy) = out
            .attributes
            .as_ref()
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        else {
            return Ok(None);
        };
        redrive_limit_of(policy)
            .map(Some)
            .ok_or_else(|| DeliveryError {
                op: "read the input queue's redrive policy",
                message: format!("no maxReceiveCount in {policy}"),
            })
    }

    async fn set_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), DeliveryError> {
        self.sqs
            .change_message_visibility()
            .queue_url(&self.input_queue_url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(timeout.as_secs().min(43_200) as i32)
            .send()
            .await
            .map_err(|e| DeliveryError {
                op: "change message visibility",
                message: DisplayErrorContext(&e).to_string(),
            })?;
        Ok(())
    }
}

/// `maxReceiveCount` of a `RedrivePolicy` document (SQS gives it as a number or as text).
fn redrive_limit_of(policy: &str) -> Option<u32> {
    let doc: serde_json::Value = serde_json::from_str(policy).ok()?;
    match &doc["maxReceiveCount"] {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A held message's receipt handle, and how often SQS has delivered it. SQS gives out a new
/// handle with every delivery, and only the newest one surely deletes or extends the message
/// (an older one can "succeed" without effect), so when a copy of a held message arrives, its
/// handle replaces the one we hold: the renewal and the final delete or release always use the
/// newest. The copy's receive count comes with it: it is what the queue's redrive policy
/// counts, so whether giving the message back would send it to the dead-letter queue
/// (`Delivery::give_back`) is judged by the newest delivery, not the first.
#[derive(Debug, Clone)]
pub(crate) struct Receipt(Arc<Mutex<(String, u32)>>);

impl Receipt {
    /// The handle of a first delivery (tests).
    #[cfg(test)]
    pub(crate) fn new(handle: String) -> Receipt {
        Receipt::delivered(handle, 1)
    }

    /// The handle of the `receive_count`th delivery (`ApproximateReceiveCount`).
    pub(crate) fn delivered(handle: String, receive_count: u32) -> Receipt {
        Receipt(Arc::new(Mutex::new((handle, receive_count))))
    }

    pub(crate) fn current(&self) -> String {
        self.0.lock().expect("receipt").0.clone()
    }

    /// Deliveries so far, as SQS counted them at the newest one.
    pub(crate) fn receive_count(&self) -> u32 {
        self.0.lock().expect("receipt").1
    }

    #[cfg(test)]
    pub(crate) fn replace(&self, newer: String) {
        self.0.lock().expect("receipt").0 = newer;
    }

    /// A copy was delivered: its handle and count serve from now on (a count never goes back:
    /// SQS's is approximate).
    pub(crate) fn replace_delivered(&self, newer: String, receive_count: u32) {
        let mut held = self.0.lock().expect("receipt");
        held.0 = newer;
        held.1 = held.1.max(receive_count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_handle_serves_every_holder_of_the_receipt() {
        let receipt = Receipt::new("first".into());
        let held_by_renewal = receipt.clone();
        receipt.replace("newer".into());
        assert_eq!(held_by_renewal.current(), "newer");
    }

    /// The mark outlives the time between two refreshes (a live worker's never lapses) and
    /// ends before the visibility does (a dead worker's message is never left as held).
    #[test]
    fn a_mark_outlives_its_refresh_and_ends_before_the_message_is_visible() {
        for seconds in [3u64, 6, 30, 120, 43_200] {
            let visibility = Duration::from_secs(seconds);
            let refresh = (visibility / 3).max(Duration::from_secs(1)) * MARK_EVERY;
            let hold = mark_hold(visibility);
            assert!(
                hold > refresh,
                "{seconds} s: hold {hold:?}, refresh {refresh:?}"
            );
            assert!(hold < visibility, "{seconds} s");
        }
    }

    #[test]
    fn the_redrive_limit_is_read_as_a_number_or_as_text() {
        let arn = "arn:aws:sqs:us-east-1:000000000000:dlq";
        for policy in [
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":3}}"#),
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"3"}}"#),
        ] {
            assert_eq!(redrive_limit_of(&policy), Some(3), "{policy}");
        }
        assert_eq!(redrive_limit_of(r#"{"deadLetterTargetArn":"x"}"#), None);
        assert_eq!(redrive_limit_of("not json"), None);
    }
}
