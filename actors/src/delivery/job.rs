//! A message that has been received and validated, on its way through a session.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::contract::message::EditRequest;
use crate::delivery::Receipt;

/// One valid input message and what we need to finish it.
#[derive(Debug)]
pub struct Job {
    pub request: EditRequest,
    /// The SQS message id: the identity of this piece of work in events and commit trailers.
    pub message_id: String,
    /// Needed to delete, release or extend the message: always the newest handle SQS gave out.
    pub receipt: Receipt,
    /// When the producer sent it (`SentTimestamp`, ms since the epoch; the receive time when
    /// SQS did not say). Orders the work: an older message never interrupts a newer one.
    pub sent_at_ms: u64,
    /// When we received it, for the total duration.
    pub received_at: Instant,
    /// How often SQS has delivered it (`ApproximateReceiveCount`), 1 the first time.
    pub receive_count: u32,
    /// The W3C trace id this message's work is recorded under, when traced.
    pub trace_id: Option<String>,
    /// The message's root span (a consumer span continuing the producer's trace); its work
    /// runs inside it. The span ends when the job is dropped.
    pub span: tracing::Span,
    /// Renews the message's visibility from the moment it is accepted (also while it waits in
    /// its session's queue) until it is finished or released.
    pub renewal: Renewal,
    /// A slot of the intake's in-flight limit. Held as long as the job exists; dropping the job
    /// (however it ends) gives the slot back.
    pub slot: Option<InFlight>,
}

impl Job {
    /// A job as the intake would make it from `request`, for tests: no renewal, no slot, first
    /// delivery, sent at `sent_at_ms`.
    #[cfg(test)]
    pub(crate) fn for_test(message_id: &str, request: EditRequest, sent_at_ms: u64) -> Job {
        Job {
            request,
            message_id: message_id.into(),
            receipt: Receipt::new(format!("receipt-{message_id}")),
            sent_at_ms,
            received_at: Instant::now(),
            receive_count: 1,
            trace_id: None,
            span: tracing::Span::none(),
            renewal: Renewal::none(),
            slot: None,
        }
    }

    /// Give the message back to the queue, visible again after `delay`: stop the renewal
    /// first (and wait for one in flight, which would otherwise hide it again), then go by the
    /// one rule of `Delivery::give_back`: released, or, on its last delivery before the
    /// queue's redrive, ended `failed` (`out_of_deliveries`) so that it never reaches the
    /// dead-letter queue without its terminal event.
    pub async fn release(
        mut self,
        delivery: &crate::delivery::Delivery,
        delay: Duration,
        why: &str,
    ) {
        self.renewal.stop().await;
        let mut event = crate::contract::status::StatusEvent::for_request(
            crate::contract::status::EventType::Failed,
            &self.request,
            &self.message_id,
        );
        event.trace_id = self.trace_id.clone();
        event.branch = Some(self.request.branch());
        let held = crate::delivery::HeldMessage {
            message_id: self.message_id.clone(),
            receipt: self.receipt.clone(),
            event,
            body: crate::contract::message::request_body(&self.request),
        };
        // Its place in the intake's bookkeeping goes first: once given back, the message can
        // be delivered again at once, and while the place is taken that delivery would be
        // taken for a copy of a message still held here (absorbed, and lost to this round).
        drop(self.slot.take());
        delivery.give_back(held, delay, why).await;
    }
}

/// A held message's place in the intake's bookkeeping; dropping it frees the place.
pub struct InFlight {
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl InFlight {
    pub fn new(on_drop: impl FnOnce() + Send + Sync + 'static) -> Self {
        InFlight {
            on_drop: Some(Box::new(on_drop)),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// A running visibility renewal. Stop it (and wait for a renewal in flight) before deleting or
/// releasing the message: a renewal landing after a release would hide the message again.
/// Dropping it only cancels, for the paths that cannot wait.
#[derive(Debug)]
pub struct Renewal {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Renewal {
    pub fn new(stop: CancellationToken, task: tokio::task::JoinHandle<()>) -> Renewal {
        Renewal {
            stop,
            task: Some(task),
        }
    }

    /// No renewal: a job that tests make by hand.
    #[cfg(test)]
    pub fn none() -> Renewal {
        Renewal {
            stop: CancellationToken::new(),
            task: None,
        }
    }

    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Giving a message back frees its place in the intake's bookkeeping before SQS makes it
    /// visible again. A delivery that came while the place was still taken would be taken for
    /// a copy of a message this worker holds: absorbed, its handle kept by a job about to go,
    /// the message then invisible for a whole visibility timeout, and its receive spent; on the
    /// queue's next-to-last delivery that is a move to the dead-letter queue without an event.
    /// The SQS client here answers nothing (no credentials); its interceptor notes, as each
    /// call starts, whether the place was free.
    #[tokio::test]
    async fn a_released_job_frees_its_place_before_the_message_is_visible() {
        use std::sync::Mutex;
        use std::sync::atomic::AtomicBool;

        use aws_sdk_sqs::config::interceptors::BeforeSerializationInterceptorContextRef;
        use aws_sdk_sqs::config::{ConfigBag, Intercept};

        #[derive(Debug)]
        struct PlaceAtEachCall {
            freed: Arc<AtomicBool>,
            seen: Arc<Mutex<Vec<bool>>>,
        }
        impl Intercept for PlaceAtEachCall {
            fn name(&self) -> &'static str {
                "place at each call"
            }
            fn read_before_execution(
                &self,
                _context: &BeforeSerializationInterceptorContextRef<'_>,
                _cfg: &mut ConfigBag,
            ) -> Result<(), aws_sdk_sqs::error::BoxError> {
                let freed = self.freed.load(Ordering::SeqCst);
                self.seen.lock().unwrap().push(freed);
                Ok(())
            }
        }

        let freed = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
                .region(aws_sdk_sqs::config::Region::new("us-east-1"))
                .interceptor(PlaceAtEachCall {
                    freed: freed.clone(),
                    seen: seen.clone(),
                })
                .build(),
        );
        let records = tempfile::tempdir().unwrap();
        let (status, _events) = crate::contract::status::StatusSink::tapped(sqs.clone());
        let delivery = crate::delivery::Delivery::new(
            sqs,
            "https://sqs.invalid/123456789012/input".into(),
            None,
            status,
            Duration::from_secs(30),
            crate::delivery::records::RecordStore::local(records.path(), "w"),
        );
        let body = serde_json::json!({
            "sessionId": "s", "threadId": "t", "clientId": "amelia", "projectId": "stamps",
            "command": "Make the title say \"Hi\"",
        });
        let request = crate::contract::message::EditRequest::parse(
            &body.to_string(),
            crate::contract::message::DEFAULT_MAX_COMMAND_BYTES,
        )
        .unwrap();
        let mut job = Job::for_test("m-1", request, 0);
        job.slot = Some(InFlight::new(move || freed.store(true, Ordering::SeqCst)));

        job.release(&delivery, Duration::ZERO, "retry").await;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![true],
            "one SQS call (the release), made with the job's place already free"
        );
    }

    #[test]
    fn a_place_is_freed_once_when_dropped() {
        let freed = Arc::new(AtomicUsize::new(0));
        let place = {
            let freed = freed.clone();
            InFlight::new(move || {
                freed.fetch_add(1, Ordering::SeqCst);
            })
        };
        assert_eq!(freed.load(Ordering::SeqCst), 0);
        drop(place);
        assert_eq!(freed.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn stopping_a_renewal_waits_for_the_one_in_flight() {
        let stop = CancellationToken::new();
        let finished = Arc::new(AtomicUsize::new(0));
        let task = {
            let (stop, finished) = (stop.clone(), finished.clone());
            tokio::spawn(async move {
                stop.cancelled().await;
                // A renewal still finishing its request.
                tokio::task::yield_now().await;
                finished.fetch_add(1, Ordering::SeqCst);
            })
        };
        let mut renewal = Renewal::new(stop.clone(), task);
        renewal.stop().await;
        assert!(stop.is_cancelled());
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "stop returned before it ended"
        );
        // Stopping again (a release after a failed delete) is harmless.
        renewal.stop().await;
    }

    #[test]
    fn dropping_a_renewal_cancels_it() {
        let stop = CancellationToken::new();
        drop(Renewal {
            stop: stop.clone(),
            task: None,
        });
        assert!(stop.is_cancelled());
        let mut none = Renewal::none();
        assert!(none.task.is_none());
        // `none` stops at once: there is nothing to wait for.
        futures::executor::block_on(none.stop());
    }
}
