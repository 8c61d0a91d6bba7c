//! SQS delivery of input messages: deleting a finished message (only after its terminal event),
//! keeping a running message invisible, releasing a message to be tried again, and keeping a
//! rejected one in the dead-letter queue.

use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use tokio_util::sync::CancellationToken;

use crate::records::RecordStore;
use crate::status::{StatusEvent, StatusSink};

#[derive(Debug, thiserror::Error)]
#[error("{op}: {message}")]
pub struct DeliveryError {
    op: &'static str,
    message: String,
}

#[derive(Clone)]
pub struct Delivery {
    sqs: aws_sdk_sqs::Client,
    /// The input queue, whose messages we delete or release.
    input_queue_url: String,
    /// Where rejected messages are kept.
    dead_letter_queue_url: Option<String>,
    /// Status events.
    pub status: StatusSink,
    /// The visibility timeout we keep renewing while a message runs.
    visibility: Duration,
    /// Each message's outcome, recorded before it is reported: a message that comes back
    /// after it ended is deleted, not run again.
    pub records: RecordStore,
}

impl Delivery {
    pub fn new(
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
        }
    }

    pub fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.sqs
    }

    /// End a message: record its outcome, send the terminal event, then delete the message.
    /// The record comes first, so that whatever fails after it, a copy of the message that
    /// comes back is finished with this same event and never runs again. If the record or the
    /// event cannot be written, the message stays in the queue (it comes back after its
    /// visibility timeout): an event is never skipped.
    pub async fn finish(
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
    pub async fn finish_again(
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

    pub async fn delete(&self, receipt_handle: &str) -> Result<(), DeliveryError> {
        self.sqs
            .delete_message()
            .queue_url(&self.input_queue_url)
            .receipt_handle(receipt_handle)
            .send()
            .await
            .map_err(|e| DeliveryError {
                op: "delete message",
                message: DisplayErrorContext(&e).to_string(),
            })?;
        Ok(())
    }

    /// Make the message visible again after `delay`, for this or another worker to take.
    pub async fn release(
        &self,
        receipt_handle: &str,
        delay: Duration,
    ) -> Result<(), DeliveryError> {
        self.set_visibility(receipt_handle, delay).await
    }

    /// Keep a rejected message in the dead-letter queue, with the reason beside it. The reason
    /// is redacted (a git error can carry the remote's token); the body is the producer's own
    /// message and is kept as it came.
    pub async fn dead_letter(&self, body: &str, reason: &str) -> Result<(), DeliveryError> {
        let Some(url) = &self.dead_letter_queue_url else {
            return Ok(());
        };
        // Redacted before it is cut, so a secret cut in half is still recognised.
        let reason = crate::redact::redact(reason);
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
    pub fn keep_invisible(
        &self,
        receipt: crate::job::Receipt,
        message_id: String,
        hold: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let delivery = self.clone();
        let every = (self.visibility / 3).max(Duration::from_secs(1));
        tokio::spawn(async move {
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
                if let Err(e) = delivery.records.begin(&message_id, hold).await {
                    tracing::warn!(error = %e, "could not refresh the message's mark in the records");
                }
            }
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
