//! A message that has been received and validated, on its way through a session.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::message::EditRequest;

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
        let mut event = crate::status::StatusEvent::for_request(
            crate::status::EventType::Failed,
            &self.request,
            &self.message_id,
        );
        event.trace_id = self.trace_id.clone();
        event.branch = Some(self.request.branch());
        let held = crate::delivery::HeldMessage {
            message_id: self.message_id.clone(),
            receipt: self.receipt.clone(),
            event,
            body: crate::outcome::request_body(&self.request),
        };
        delivery.give_back(held, delay, why).await;
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
pub struct Receipt(Arc<Mutex<(String, u32)>>);

impl Receipt {
    /// The handle of a first delivery (tests).
    #[cfg(test)]
    pub fn new(handle: String) -> Receipt {
        Receipt::delivered(handle, 1)
    }

    /// The handle of the `receive_count`th delivery (`ApproximateReceiveCount`).
    pub fn delivered(handle: String, receive_count: u32) -> Receipt {
        Receipt(Arc::new(Mutex::new((handle, receive_count))))
    }

    pub fn current(&self) -> String {
        self.0.lock().expect("receipt").0.clone()
    }

    /// Deliveries so far, as SQS counted them at the newest one.
    pub fn receive_count(&self) -> u32 {
        self.0.lock().expect("receipt").1
    }

    #[cfg(test)]
    pub fn replace(&self, newer: String) {
        self.0.lock().expect("receipt").0 = newer;
    }

    /// A copy was delivered: its handle and count serve from now on (a count never goes back:
    /// SQS's is approximate).
    pub fn replace_delivered(&self, newer: String, receive_count: u32) {
        let mut held = self.0.lock().expect("receipt");
        held.0 = newer;
        held.1 = held.1.max(receive_count);
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

/// Why running work was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A newer message arrived for the same workspace.
    Interrupted,
    /// The worker is shutting down: save the work and release the message.
    Shutdown,
    /// The workspace's lease was lost (another worker may hold it): stop, touch nothing the
    /// next holder owns (no push, no publish), release the message for the next holder.
    LeaseLost,
}

impl StopReason {
    /// Its name in metrics (`edit_worker.interrupt.latency`'s `reason`): stable, lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Interrupted => "interrupted",
            StopReason::Shutdown => "shutdown",
            StopReason::LeaseLost => "lease_lost",
        }
    }
}

/// Asks running work to stop, out of band: the job checks the token while it runs, so a stop
/// never waits behind a mailbox. The first reason given wins.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
    /// When the first stop was asked for (interrupt latency is measured from here).
    requested_at: Arc<OnceLock<Instant>>,
}

impl StopSignal {
    pub fn request(&self, reason: StopReason) {
        let _ = self.requested_at.set(Instant::now());
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn requested_at(&self) -> Option<Instant> {
        self.requested_at.get().copied()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_newer_handle_serves_every_holder_of_the_receipt() {
        let receipt = Receipt::new("first".into());
        let held_by_renewal = receipt.clone();
        receipt.replace("newer".into());
        assert_eq!(held_by_renewal.current(), "newer");
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

    #[test]
    fn the_first_stop_reason_wins_and_its_time_is_kept() {
        let stop = StopSignal::default();
        assert!(!stop.token().is_cancelled());
        assert_eq!((stop.reason(), stop.requested_at()), (None, None));
        // The session holds one clone, the running job another.
        let running = stop.clone();
        stop.request(StopReason::Interrupted);
        let first = running.requested_at().expect("when it was asked");
        stop.request(StopReason::Shutdown);
        assert!(running.token().is_cancelled());
        assert_eq!(running.reason(), Some(StopReason::Interrupted));
        assert_eq!(running.requested_at(), Some(first));
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
