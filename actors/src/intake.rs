//! The intake: long-polls the input queue while there is room, validates each message against
//! the contract, rejects what breaks it, and routes the rest to the supervisor.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use ractor::ActorRef;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::backoff::Backoff;
use crate::batch::context::WorkerContext;
use crate::contract::message::{EditRequest, LooseIds, RequestError, WorkspaceKey};
use crate::contract::status::StatusEvent;
use crate::delivery::HeldMessage;
use crate::delivery::Marking;
use crate::delivery::Receipt;
use crate::delivery::job::{InFlight, Job, Renewal};
use crate::delivery::records::Begin;
use crate::sessions::supervisor::SupervisorMsg;
use crate::telemetry::metrics::metrics;
use crate::telemetry::trace_context;

/// How long a message waits before it is tried again when the record store did not answer.
const RECORD_RETRY_DELAY: Duration = Duration::from_secs(10);

/// SQS returns at most 10 messages per receive.
const MAX_BATCH: usize = 10;
/// Long-poll wait. SQS allows 20 s; we use 10 s because a poll is never abandoned half-way (an
/// abandoned long poll can still take a message, which then stays invisible until its timeout),
/// so on shutdown we wait for the current poll to end and give back what it brought: 10 s
/// keeps that well inside ECS's 30 s between SIGTERM and SIGKILL.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// Messages held over their share wait here, out of the slots, at most this many times
/// `MAX_IN_FLIGHT`. Past it the intake stops receiving until some of them have run.
const PARKED_PER_SLOT: usize = 4;

#[derive(Debug)]
pub enum IntakeEnd {
    /// The queue was empty and nothing ran for the idle time.
    Idle,
    /// Shutdown was asked for. A poll that was under way goes on in this task, which gives
    /// back whatever it receives; wait for it before exiting.
    Shutdown(Option<tokio::task::JoinHandle<()>>),
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("the supervisor has stopped; the worker cannot go on")]
    SupervisorGone,
}

/// The intake's bookkeeping of messages held by this process.
#[derive(Clone)]
pub(crate) struct InFlightRegistry {
    /// Messages at work at once (running or queued in their session). Bounds memory and
    /// leaves messages in the queue, where another container can take them, instead of letting
    /// them wait invisibly in ours while their visibility runs out.
    max: usize,
    /// At most this many messages of one workspace are at work at once. A workspace runs one
    /// job at a time, so more only takes room from other clients.
    max_per_workspace: usize,
    /// At most this many messages of one client (all its projects) are at work at once, so
    /// that a client with 500 queued messages cannot fill every slot and starve a client with
    /// one.
    max_per_client: usize,
    state: Arc<Mutex<Held>>,
    /// Told when a message at work ends: room for the poll, or for a parked message.
    freed: Arc<Notify>,
}

#[derive(Default)]
struct Held {
    /// Every held message (at work or parked) with its receipt: a copy SQS hands us while we
    /// hold the message is not started again, and lends the held one its newer handle.
    receipts: HashMap<String, Receipt>,
    /// Messages at work.
    at_work: usize,
    /// The most messages ever at work at once since the worker started: exported as a gauge
    /// (`in_flight_peak`) so that a test or benchmark reads the exact high-water mark of the
    /// `MAX_IN_FLIGHT` cap instead of sampling the queue now and then (issue 28).
    peak_at_work: usize,
    per_workspace: HashMap<WorkspaceKey, usize>,
    per_client: HashMap<String, usize>,
    /// Valid messages over their workspace's or client's share, oldest first. They are held
    /// (their visibility renewed) rather than given back: every receive counts toward the
    /// queue's `maxReceiveCount`, so giving a message back for fairness could send it to the
    /// dead-letter queue without it ever running.
    parked: VecDeque<Job>,
}

/// What to do with a received message.
enum Claim {
    /// At work: route it. Dropping the guard frees its place.
    Slot(InFlight),
    /// Over its share: park it until its share has room.
    Park,
    /// A copy of a held message: its handle now serves the held one.
    Copy,
}

impl InFlightRegistry {
    pub fn new(max: usize, max_per_workspace: usize, max_per_client: usize) -> InFlightRegistry {
        InFlightRegistry {
            max: max.max(1),
            max_per_workspace: max_per_workspace.max(1),
            max_per_client: max_per_client.max(1),
            state: Arc::default(),
            freed: Arc::default(),
        }
    }

    /// Messages held: at work and parked.
    pub fn in_flight(&self) -> usize {
        let held = self.state.lock().expect("held");
        held.at_work + held.parked.len()
    }

    /// How many more messages one receive may bring.
    fn room(&self) -> usize {
        let held = self.state.lock().expect("held");
        let parking = (self.max * PARKED_PER_SLOT).saturating_sub(held.parked.len());
        self.max.saturating_sub(held.at_work).min(parking)
    }

    /// Wait until a receive may bring at least one message.
    async fn wait_for_room(&self) {
        loop {
            let notified = self.freed.notified();
            if self.room() > 0 {
                return;
            }
            notified.await;
        }
    }

    /// A copy of a message we hold? Then take its newer handle and receive count.
    fn take_copy(&self, message_id: &str, receipt_handle: &str, receive_count: u32) -> bool {
        let held = self.state.lock().expect("held");
        match held.receipts.get(message_id) {
            Some(receipt) => {
                receipt.replace_delivered(receipt_handle.to_owned(), receive_count);
                true
            }
            None => false,
        }
    }

    /// Take a message into the books.
    fn claim(
        &self,
        message_id: &str,
        receipt: &Receipt,
        workspace: Option<&WorkspaceKey>,
    ) -> Claim {
        let mut held = self.state.lock().expect("held");
        if let Some(known) = held.receipts.get(message_id) {
            known.replace_delivered(receipt.current(), receipt.receive_count());
            return Claim::Copy;
        }
        held.receipts.insert(message_id.to_owned(), receipt.clone());
        if let Some(key) = workspace
            && !self.has_share(&held, key)
        {
            return Claim::Park;
        }
        Claim::Slot(self.take_place(&mut held, message_id, workspace))
    }

    fn has_share(&self, held: &Held, key: &WorkspaceKey) -> bool {
        held.at_work < self.max
            && held.per_workspace.get(key).copied().unwrap_or(0) < self.max_per_workspace
            && held.per_client.get(&key.client_id).copied().unwrap_or(0) < self.max_per_client
    }

    fn take_place(
        &self,
        held: &mut Held,
        message_id: &str,
        workspace: Option<&WorkspaceKey>,
    ) -> InFlight {
        held.at_work += 1;
        if held.at_work > held.peak_at_work {
            held.peak_at_work = held.at_work;
            metrics()
                .in_flight_peak
                .record(held.peak_at_work as u64, &[]);
        }
        if let Some(key) = workspace {
            *held.per_workspace.entry(key.clone()).or_default() += 1;
            *held.per_client.entry(key.client_id.clone()).or_default() += 1;
        }
        metrics().in_flight.add(1, &[]);
        let state = self.state.clone();
        let freed = self.freed.clone();
        let id = message_id.to_owned();
        let key = workspace.cloned();
        InFlight::new(move || {
            metrics().in_flight.add(-1, &[]);
            let mut held = state.lock().expect("held");
            held.receipts.remove(&id);
            held.at_work -= 1;
            if let Some(key) = key {
                decrement(&mut held.per_workspace, &key);
                decrement(&mut held.per_client, &key.client_id);
            }
            drop(held);
            freed.notify_one();
        })
    }

    fn park(&self, job: Job) {
        let mut held = self.state.lock().expect("held");
        held.parked.push_back(job);
    }

    /// Parked messages whose share has room now, each with its place taken, oldest first.
    fn unpark_ready(&self) -> Vec<Job> {
        let mut held = self.state.lock().expect("held");
        let mut ready = Vec::new();
        let mut waiting = VecDeque::new();
        while let Some(mut job) = held.parked.pop_front() {
            let key = job.request.workspace();
            if self.has_share(&held, &key) {
                job.slot = Some(self.take_place(&mut held, &job.message_id, Some(&key)));
                ready.push(job);
            } else {
                waiting.push_back(job);
            }
        }
        held.parked = waiting;
        ready
    }

    /// Every parked message, out of the books (shutdown gives them back).
    pub fn take_parked(&self) -> Vec<Job> {
        let mut held = self.state.lock().expect("held");
        let parked: Vec<Job> = held.parked.drain(..).collect();
        for job in &parked {
            held.receipts.remove(&job.message_id);
        }
        parked
    }
}

/// The message's root span: a consumer span in OpenTelemetry's messaging conventions,
/// continuing the producer's trace. Returns it with the trace id the message's work is under.
fn root_span(
    ctx: &WorkerContext,
    message: &Message,
    message_id: &str,
) -> (tracing::Span, Option<String>) {
    let queue = ctx
        .config
        .input_queue_url
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let (parent, source) = trace_context::parent_of(message);
    let span = tracing::info_span!(
        "process edit message",
        otel.kind = "consumer",
        messaging.system = "aws_sqs",
        messaging.operation.type = "process",
        messaging.destination.name = queue,
        messaging.message.id = message_id,
        trace.parent_source = source.as_str(),
        edit.client_id = tracing::field::Empty,
        edit.project_id = tracing::field::Empty,
        edit.thread_id = tracing::field::Empty,
        edit.command = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let parent_trace = parent.span().span_context().clone();
    // Before the span is first entered: later, the parent can no longer be set.
    let _ = span.set_parent(parent);
    let own = span.context().span().span_context().clone();
    let trace_id = if own.is_valid() {
        Some(own.trace_id().to_string())
    } else if parent_trace.is_valid() {
        // Not exporting, but the producer's trace id still links the events to its trace.
        Some(parent_trace.trace_id().to_string())
    } else {
        None
    };
    if let Some(id) = &trace_id {
        span.record("trace_id", id.as_str());
    }
    (span, trace_id)
}

/// Count one down; forget the entry at zero, so the maps hold only what is held.
fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

/// Receive and route until shutdown or idleness.
pub(crate) async fn run_intake(
    ctx: Arc<WorkerContext>,
    supervisor: ActorRef<SupervisorMsg>,
    registry: InFlightRegistry,
    exit_when_idle: Option<Duration>,
    shutdown: CancellationToken,
) -> Result<IntakeEnd, IntakeError> {
    let sqs = ctx.delivery.sqs().clone();
    let mut last_activity = Instant::now();
    let mut error_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(20));
    // Messages on their last delivery watched while another worker held them, decided now.
    let (watched_tx, mut watched_rx) = tokio::sync::mpsc::unbounded_channel::<Decided>();
    loop {
        if shutdown.is_cancelled() {
            return Ok(IntakeEnd::Shutdown(None));
        }
        while let Ok((message, receipt, begin)) = watched_rx.try_recv() {
            accept(
                &ctx,
                &supervisor,
                &registry,
                &watched_tx,
                message,
                receipt,
                begin,
            )
            .await?;
        }
        if matches!(
            supervisor.get_status(),
            ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
        ) {
            return Err(IntakeError::SupervisorGone);
        }
        route_unparked(&registry, &supervisor)?;
        if registry.in_flight() > 0 {
            last_activity = Instant::now();
        }
        if let Some(path) = &ctx.config.health_file {
            // The loop turns at least every MAX_WAIT: a stale file means a stuck worker.
            if let Err(e) = tokio::fs::write(path, b"ok\n").await {
                tracing::warn!(path = %path.display(), error = %e, "could not touch the health file");
            }
        }
        let mut wait = MAX_WAIT;
        if let Some(idle) = exit_when_idle {
            let left = idle.saturating_sub(last_activity.elapsed());
            if left.is_zero() {
                return Ok(IntakeEnd::Idle);
            }
            // Poll no longer than the idle time left, so the exit is on time without
            // abandoning a receive half-way (which could hide a message until it times out).
            wait = wait.min(
                Duration::from_secs(left.as_secs_f64().ceil() as u64).max(Duration::from_secs(1)),
            );
        }
        // Backpressure: receive only when at least one more message can be held.
        tokio::select! {
            _ = registry.wait_for_room() => {}
            _ = shutdown.cancelled() => return Ok(IntakeEnd::Shutdown(None)),
            // Re-check idleness, the supervisor and parked messages now and then while full.
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
        }
        let room = registry.room().clamp(1, MAX_BATCH);
        let receive = sqs
            .receive_message()
            .queue_url(&ctx.config.input_queue_url)
            .max_number_of_messages(room as i32)
            .wait_time_seconds(wait.as_secs() as i32)
            .visibility_timeout(ctx.config.visibility_timeout.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send();
        // Before the call: every message it brings was received after this.
        let receive_began = Instant::now();
        let mut receive = tokio::spawn(receive);
        let received = loop {
            tokio::select! {
                r = &mut receive => break r.expect("receive task does not panic"),
                // A message at work ended during the poll: a parked one may go now.
                _ = registry.freed.notified() => route_unparked(&registry, &supervisor)?,
                Some((message, receipt, begin)) = watched_rx.recv() => {
                    accept(&ctx, &supervisor, &registry, &watched_tx, message, receipt, begin).await?
                }
                _ = shutdown.cancelled() => {
                    let delivery = ctx.delivery.clone();
                    let give_back = tokio::spawn(async move {
                        if let Ok(Ok(out)) = receive.await {
                            for m in out.messages.unwrap_or_default() {
                                delivery
                                    .give_back(unopened(&m), Duration::ZERO, "the worker is shutting down")
                                    .await;
                            }
                        }
                    });
                    return Ok(IntakeEnd::Shutdown(Some(give_back)));
                }
            }
        };
        let messages = match received {
            Ok(out) => {
                error_backoff.succeeded();
                out.messages.unwrap_or_default()
            }
            Err(e) => {
                tracing::error!(error = %DisplayErrorContext(&e), "receiving from the input queue failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(error_backoff.failed()) => {}
                    _ = shutdown.cancelled() => return Ok(IntakeEnd::Shutdown(None)),
                }
                continue;
            }
        };
        if !messages.is_empty() {
            last_activity = Instant::now();
        }
        // Each message's record, consulted for all of them at once: while the record store
        // does not answer, each is held (renewed) rather than left to time out behind the
        // others.
        let decided = futures::future::join_all(
            messages
                .into_iter()
                .map(|m| decide(&ctx, &registry, m, receive_began, &shutdown)),
        )
        .await;
        for (message, receipt, begin) in decided.into_iter().flatten() {
            accept(
                &ctx,
                &supervisor,
                &registry,
                &watched_tx,
                message,
                receipt,
                begin,
            )
            .await?;
        }
    }
}

/// A received message whose record was consulted: the message, its receipt, what the record
/// said.
type Decided = (Message, Receipt, Begin);

/// A received message not yet looked into, as `Delivery::give_back` needs it: ids from its
/// body as far as they parse, its body as it came.
fn unopened(message: &Message) -> HeldMessage {
    let message_id = message.message_id.clone().unwrap_or_default();
    let body = message.body.clone().unwrap_or_default();
    let receive_count =
        system_attribute(message, MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(1);
    let mut event =
        StatusEvent::rejected(LooseIds::from_body(&body), &message_id, "", String::new());
    event.error = None;
    HeldMessage {
        receipt: Receipt::delivered(
            message.receipt_handle.clone().unwrap_or_default(),
            receive_count,
        ),
        message_id,
        event,
        body,
    }
}

/// How long this worker's `started` mark of a message holds (`delivery::mark_hold`).
fn mark_hold(ctx: &WorkerContext) -> Duration {
    crate::delivery::mark_hold(ctx.config.visibility_timeout)
}

/// What the record says of a received message, asked again while the record store does not
/// answer, the message kept invisible meanwhile (issue 25: a message given back for every
/// failed look burns its deliveries and ends in the dead-letter queue with no event). `None`
/// for a copy of a message held here (it lends the held one its handle) and for a message
/// given back because the store stayed away past `HOLD_UNDECIDED_SECONDS` or the worker is
/// shutting down. `Some`: the message with what its record says, or `Begin::Unmarked` for a
/// first delivery received a moment ago, not looked up. `received_at`: when the receive call
/// that brought it began.
async fn decide(
    ctx: &Arc<WorkerContext>,
    registry: &InFlightRegistry,
    message: Message,
    received_at: Instant,
    shutdown: &CancellationToken,
) -> Option<(Message, Receipt, Begin)> {
    let message_id = message.message_id.clone().unwrap_or_default();
    let receipt_handle = message.receipt_handle.clone().unwrap_or_default();
    let receive_count: u32 = system_attribute(
        &message,
        MessageSystemAttributeName::ApproximateReceiveCount,
    )
    .unwrap_or(1);
    if registry.take_copy(&message_id, &receipt_handle, receive_count) {
        tracing::info!(%message_id, "a copy of a message we hold; its newer receipt handle now serves the held one");
        return None;
    }
    let receipt = Receipt::delivered(receipt_handle, receive_count);
    // A first delivery received a moment ago is taken without a look at the record (issue
    // 25: a `started` mark written at every receipt was a fifth of the lease store's cost
    // per message). Nobody can have it in hand or have ended it: SQS hands a message out
    // again only once its visibility lapsed, which counts a receive, and it was received
    // less than a third of the visibility ago (after the receive call began, by this
    // worker's monotonic clock); the renewals mark it at the first renewal, a third into
    // the visibility from now (`Marking::AtFirstRenewal`), before a copy can come out. Not
    // for an older receive: a worker frozen with a long poll open finds in it, once
    // resumed, a message that has been handed out again meanwhile and may have ended
    // elsewhere. The rare copy a standard queue hands out twice at once meets the
    // workspace's lease and the thread's mark and commit: one runs, the other repeats the
    // recorded ending (`Delivery::finish`).
    if receive_count <= 1 && received_at.elapsed() < ctx.config.visibility_timeout / 3 {
        return Some((message, receipt, Begin::Unmarked));
    }
    let since = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let mut held: Option<Renewal> = None;
    let why = loop {
        let error = match ctx
            .delivery
            .records
            .begin(&message_id, mark_hold(ctx))
            .await
        {
            Ok(begin) => {
                if let Some(mut renewal) = held {
                    renewal.stop().await;
                    tracing::info!(%message_id, held_ms = since.elapsed().as_millis() as u64, "the record store answers again; the held message goes on");
                }
                return Some((message, receipt, begin));
            }
            Err(e) => e,
        };
        if held.is_none() {
            // Without the record we cannot tell whether it already ran: not now, and not
            // given back either.
            tracing::error!(%message_id, receive_count, error = %error, "the record store is not answering; the message is kept invisible and asked about again");
            let stop = CancellationToken::new();
            held = Some(Renewal::new(
                stop.clone(),
                ctx.delivery.keep_invisible(
                    receipt.clone(),
                    message_id.clone(),
                    Marking::None,
                    stop,
                ),
            ));
        }
        if since.elapsed() >= ctx.delivery.hold_undecided() {
            break format!(
                "the record store did not answer for {} s: {error}",
                since.elapsed().as_secs()
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.failed()) => {}
            _ = shutdown.cancelled() => break "the worker is shutting down".to_owned(),
        }
    };
    if let Some(mut renewal) = held {
        renewal.stop().await;
    }
    let mut given = unopened(&message);
    given.receipt = receipt;
    ctx.delivery
        .give_back(given, RECORD_RETRY_DELAY, &why)
        .await;
    None
}

/// Route the parked messages whose share has room now.
fn route_unparked(
    registry: &InFlightRegistry,
    supervisor: &ActorRef<SupervisorMsg>,
) -> Result<(), IntakeError> {
    for job in registry.unpark_ready() {
        tracing::debug!(message_id = %job.message_id, "its share has room now; no longer parked");
        supervisor
            .cast(SupervisorMsg::Route(Box::new(job)))
            .map_err(|_| IntakeError::SupervisorGone)?;
    }
    Ok(())
}

/// A system attribute of a received message.
fn system_attribute<T: std::str::FromStr>(
    message: &Message,
    name: MessageSystemAttributeName,
) -> Option<T> {
    message
        .attributes()
        .and_then(|a| a.get(&name))
        .and_then(|v| v.parse().ok())
}

/// Validate one message whose record was consulted (`begin`); route it, park it, or reject
/// it. A message whose outcome is already recorded is finished again (its recorded event, then
/// the delete) and never runs twice.
async fn accept(
    ctx: &Arc<WorkerContext>,
    supervisor: &ActorRef<SupervisorMsg>,
    registry: &InFlightRegistry,
    watched: &tokio::sync::mpsc::UnboundedSender<Decided>,
    message: Message,
    receipt: Receipt,
    begin: Begin,
) -> Result<(), IntakeError> {
    let message_id = message.message_id.clone().unwrap_or_default();
    let receipt_handle = receipt.current();
    let body = message.body.clone().unwrap_or_default();
    let receive_count = receipt.receive_count();
    let now = crate::delivery::records::now_ms();
    let sent_at_ms: u64 =
        system_attribute(&message, MessageSystemAttributeName::SentTimestamp).unwrap_or(now);
    metrics()
        .queue_wait_ms
        .record(now.saturating_sub(sent_at_ms) as f64, &[]);
    let (span, trace_id) = root_span(ctx, &message, &message_id);

    let hold = mark_hold(ctx);
    let marking = match begin {
        Begin::Unmarked => Marking::AtFirstRenewal(hold),
        _ => Marking::Refresh(hold),
    };
    match begin {
        Begin::Fresh | Begin::Unmarked => {}
        Begin::Ended(event) => {
            tracing::info!(%message_id, receive_count, "this message already ended; repeating its terminal event and deleting it");
            crate::telemetry::metrics::outcome("repeated");
            let delivery = ctx.delivery.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = delivery.finish_again(&receipt_handle, &event).await {
                        tracing::warn!(error = %e, "an ended message could not be finished again; it comes back later");
                    }
                }
                .instrument(span),
            );
            return Ok(());
        }
        Begin::HeldElsewhere { worker } if ctx.delivery.on_last_delivery(receive_count) => {
            // Left alone it would be visible again after our receive's timeout, and that next
            // receive moves it to the dead-letter queue: watch it instead, ours to delete once
            // the other worker has ended it (our handle is the newest, the one a delete needs)
            // or ours to run once its mark lapses.
            tracing::warn!(%message_id, %worker, receive_count, "another worker has this message in hand and this is its last delivery; holding this copy until it ends there");
            tokio::spawn(watch_held_elsewhere(
                ctx.clone(),
                watched.clone(),
                message,
                receipt,
            ));
            return Ok(());
        }
        Begin::HeldElsewhere { worker } => {
            // Left as it is: it is visible again after its timeout, by when the other worker
            // has ended it (and the record says so) or has died (and its mark has lapsed).
            tracing::warn!(%message_id, %worker, "another worker has this message in hand; leaving this copy");
            return Ok(());
        }
    }

    let request = EditRequest::parse(&body, ctx.config.max_command_bytes)
        .and_then(|r| served_here(&ctx.config, r));
    let request = match request {
        Ok(r) => r,
        Err(reason) => {
            reject(ctx, &message_id, &receipt_handle, &body, reason, trace_id)
                .instrument(span)
                .await;
            return Ok(());
        }
    };
    span.record("edit.client_id", request.client_id.as_str());
    span.record("edit.project_id", request.project_id.as_str());
    span.record("edit.thread_id", request.thread_id.as_str());
    if ctx.config.trace_command_chars > 0 {
        let shown: String = request
            .command
            .chars()
            .take(ctx.config.trace_command_chars)
            .collect();
        // A key pasted into a request must not reach every log line and trace.
        span.record(
            "edit.command",
            crate::telemetry::redact::redact(&shown).as_ref(),
        );
    }
    let workspace = request.workspace();
    let claim = registry.claim(&message_id, &receipt, Some(&workspace));
    let slot = match claim {
        Claim::Copy => return Ok(()),
        Claim::Slot(slot) => Some(slot),
        Claim::Park => None,
    };
    tracing::info!(%message_id, workspace = %workspace, thread = %request.thread_id, parked = slot.is_none(), "accepted");
    // Renewed from now on: a message may wait (parked, or in its session's queue) longer than
    // its timeout.
    let stop = tokio_util::sync::CancellationToken::new();
    let renewal = Renewal::new(
        stop.clone(),
        ctx.delivery
            .keep_invisible(receipt.clone(), message_id.clone(), marking, stop),
    );
    let job = Job {
        request,
        message_id,
        renewal,
        receipt,
        sent_at_ms,
        received_at: Instant::now(),
        receive_count,
        trace_id,
        span,
        slot,
    };
    if job.slot.is_none() {
        registry.park(job);
        return Ok(());
    }
    supervisor
        .cast(SupervisorMsg::Route(Box::new(job)))
        .map_err(|_| IntakeError::SupervisorGone)
}

/// A message on its last delivery that another worker holds: kept invisible here (our handle
/// is the newest) and its record looked at again every few seconds, until it ended there
/// (deleted here with its recorded event repeated) or the other worker's mark lapsed (it
/// died: the message runs here). The store not answering is undecided, bounded by
/// `HOLD_UNDECIDED_SECONDS`; a live mark is not.
async fn watch_held_elsewhere(
    ctx: Arc<WorkerContext>,
    decided: tokio::sync::mpsc::UnboundedSender<Decided>,
    message: Message,
    receipt: Receipt,
) {
    let message_id = message.message_id.clone().unwrap_or_default();
    let stop = CancellationToken::new();
    let mut renewal = Renewal::new(
        stop.clone(),
        ctx.delivery
            .keep_invisible(receipt.clone(), message_id.clone(), Marking::None, stop),
    );
    let mut store_away_since: Option<Instant> = None;
    let begin = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match ctx
            .delivery
            .records
            .begin(&message_id, mark_hold(&ctx))
            .await
        {
            Ok(Begin::HeldElsewhere { .. }) => store_away_since = None,
            Ok(begin) => break Some(begin),
            Err(e) => {
                let since = *store_away_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= ctx.delivery.hold_undecided() {
                    tracing::error!(%message_id, error = %e, "the record store stayed away while another worker held this message");
                    break None;
                }
            }
        }
    };
    renewal.stop().await;
    match begin {
        // Back to the intake, which accepts it as any other.
        Some(begin) => {
            if decided.send((message, receipt, begin)).is_err() {
                tracing::warn!(%message_id, "the intake has ended; the watched message comes back later");
            }
        }
        None => {
            let mut given = unopened(&message);
            given.receipt = receipt;
            ctx.delivery
                .give_back(given, RECORD_RETRY_DELAY, "the record store did not answer")
                .await;
        }
    }
}

fn served_here(
    config: &crate::config::WorkerConfig,
    request: EditRequest,
) -> Result<EditRequest, RequestError> {
    let check = |only: &Option<String>, got: &str, what: &str| match only {
        Some(allowed) if allowed != got => Err(RequestError::NotServedHere {
            allowed: format!("{what} {allowed}"),
            got: format!("{what} {got}"),
        }),
        _ => Ok(()),
    };
    check(&config.only_client, &request.client_id, "client")?;
    check(&config.only_project, &request.project_id, "project")?;
    let bucket = config.bucket_for(&request.workspace());
    crate::contract::message::check_bucket_name(&bucket)
        .map_err(|reason| RequestError::InvalidBucket { bucket, reason })?;
    Ok(request)
}

/// A rejected message: the reason in the log and on the status queue, the message kept in the
/// dead-letter queue, and removed from the input queue. If the dead-letter copy cannot be made
/// the message stays in the input queue, so that it is not lost.
async fn reject(
    ctx: &WorkerContext,
    message_id: &str,
    receipt_handle: &str,
    body: &str,
    reason: RequestError,
    trace_id: Option<String>,
) {
    tracing::warn!(%message_id, kind = reason.kind(), %reason, "message rejected");
    crate::telemetry::metrics::outcome("rejected");
    let mut event = StatusEvent::rejected(
        LooseIds::from_body(body),
        message_id,
        reason.kind(),
        reason.to_string(),
    );
    event.trace_id = trace_id;
    if let Err(e) = ctx.delivery.dead_letter(body, &reason.to_string()).await {
        tracing::error!(%message_id, error = %e, "rejected message could not be kept in the dead-letter queue; leaving it in the input queue");
        return;
    }
    if let Err(e) = ctx.delivery.finish(receipt_handle, &event).await {
        tracing::error!(%message_id, error = %e, "rejected message not finished");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid job of `client/project`, as the intake makes one (without its slot).
    fn job(id: &str, client: &str, project: &str) -> Job {
        let body = serde_json::json!({
            "sessionId": "s", "threadId": "t", "clientId": client, "projectId": project,
            "command": "do it",
        });
        Job::for_test(id, EditRequest::parse(&body.to_string(), 1024).unwrap(), 0)
    }

    /// Take message `id` of `client/project` into the books as `accept` does: the job at work
    /// (holding its slot), or `None` when it was parked.
    fn take(registry: &InFlightRegistry, id: &str, client: &str, project: &str) -> Option<Job> {
        let mut job = job(id, client, project);
        match registry.claim(id, &job.receipt, Some(&WorkspaceKey::of(client, project))) {
            Claim::Slot(slot) => {
                job.slot = Some(slot);
                Some(job)
            }
            Claim::Park => {
                registry.park(job);
                None
            }
            Claim::Copy => panic!("{id} is held already"),
        }
    }

    fn ids(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.message_id.as_str()).collect()
    }

    #[test]
    fn no_more_than_max_messages_are_at_work() {
        let registry = InFlightRegistry::new(2, 10, 10);
        assert_eq!(registry.room(), 2);
        let a = take(&registry, "m1", "a", "site").expect("at work");
        let _b = take(&registry, "m2", "b", "site").expect("at work");
        assert_eq!(registry.room(), 0, "full: no receive");
        // One that arrives anyway (a receive brings up to `room` at the time it was asked)
        // waits, held, out of the slots.
        assert!(take(&registry, "m3", "c", "site").is_none());
        assert_eq!(registry.in_flight(), 3);
        assert!(registry.unpark_ready().is_empty());

        drop(a);
        assert_eq!(registry.room(), 1);
        let ready = registry.unpark_ready();
        assert_eq!(ids(&ready), ["m3"]);
        assert!(ready[0].slot.is_some(), "an unparked message holds a slot");
        assert_eq!(registry.room(), 0);
        assert_eq!(registry.in_flight(), 2);
    }

    #[test]
    fn a_workspace_has_no_more_than_its_share_at_work() {
        let registry = InFlightRegistry::new(10, 1, 10);
        let first = take(&registry, "m1", "a", "site").expect("at work");
        assert!(take(&registry, "m2", "a", "site").is_none(), "parked");
        // Another workspace of the same client, and another client, are not held back.
        assert!(take(&registry, "m3", "a", "blog").is_some());
        assert!(take(&registry, "m4", "b", "site").is_some());
        assert!(registry.unpark_ready().is_empty());
        drop(first);
        assert_eq!(ids(&registry.unpark_ready()), ["m2"]);
    }

    #[test]
    fn a_client_has_no_more_than_its_share_at_work_over_all_its_projects() {
        let registry = InFlightRegistry::new(10, 10, 2);
        let p1 = take(&registry, "m1", "a", "p1").expect("at work");
        let _p2 = take(&registry, "m2", "a", "p2").expect("at work");
        assert!(take(&registry, "m3", "a", "p3").is_none(), "parked");
        assert!(take(&registry, "m4", "b", "p1").is_some(), "another client");
        assert!(registry.unpark_ready().is_empty());
        drop(p1);
        assert_eq!(ids(&registry.unpark_ready()), ["m3"]);
    }

    #[test]
    fn dropping_the_slot_frees_its_place_and_forgets_the_message() {
        let registry = InFlightRegistry::new(1, 1, 1);
        let job = take(&registry, "m1", "a", "site").expect("at work");
        assert_eq!(registry.room(), 0);
        drop(job);
        {
            let held = registry.state.lock().unwrap();
            assert_eq!(held.at_work, 0);
            assert!(held.receipts.is_empty());
            // Counts at zero are removed: the maps hold only what is held.
            assert!(held.per_workspace.is_empty());
            assert!(held.per_client.is_empty());
        }
        assert_eq!(registry.room(), 1);
        assert_eq!(registry.in_flight(), 0);
        // The same message again (a redelivery after it ended) is new work, not a copy.
        assert!(take(&registry, "m1", "a", "site").is_some());
    }

    #[test]
    fn a_copy_of_a_held_message_lends_it_the_newer_handle() {
        let registry = InFlightRegistry::new(1, 1, 1);
        let held = take(&registry, "m1", "a", "site").expect("at work");
        let copy = Receipt::new("newer".into());
        assert!(matches!(
            registry.claim("m1", &copy, Some(&WorkspaceKey::of("a", "site"))),
            Claim::Copy
        ));
        assert_eq!(held.receipt.current(), "newer");
        assert!(registry.take_copy("m1", "newest", 2));
        assert_eq!(held.receipt.current(), "newest");
        assert_eq!(held.receipt.receive_count(), 2, "the copy's count counts");
        assert!(!registry.take_copy("m2", "other", 1), "not held");
        assert_eq!(registry.in_flight(), 1, "a copy takes no place");

        // A parked message's copy is a copy too.
        assert!(take(&registry, "m2", "a", "site").is_none());
        assert!(registry.take_copy("m2", "newer-2", 3));
        drop(held);
        let ready = registry.unpark_ready();
        assert_eq!(ready[0].receipt.current(), "newer-2");
    }

    #[test]
    fn parked_messages_are_bounded_and_then_nothing_is_received() {
        let registry = InFlightRegistry::new(2, 1, 10);
        let _at_work = take(&registry, "m0", "a", "site").expect("at work");
        for i in 1..=PARKED_PER_SLOT * 2 {
            assert_eq!(registry.room(), 1, "a slot is free and parking has room");
            assert!(take(&registry, &format!("m{i}"), "a", "site").is_none());
        }
        assert_eq!(registry.room(), 0, "parking is full: no receive");
    }

    #[test]
    fn parked_messages_leave_oldest_first_each_when_its_share_has_room() {
        let registry = InFlightRegistry::new(10, 1, 10);
        let a = take(&registry, "a1", "a", "site").expect("at work");
        let b = take(&registry, "b1", "b", "site").expect("at work");
        for id in ["a2", "b2", "a3"] {
            assert!(take(&registry, id, &id[..1], "site").is_none());
        }
        drop(b);
        drop(a);
        // Both workspaces have room for one: the older of a's two goes, a3 waits behind it.
        let ready = registry.unpark_ready();
        assert_eq!(ids(&ready), ["a2", "b2"]);
        assert!(registry.unpark_ready().is_empty());
        drop(ready);
        assert_eq!(ids(&registry.unpark_ready()), ["a3"]);
    }

    #[test]
    fn parked_messages_are_given_back_and_forgotten() {
        let registry = InFlightRegistry::new(1, 1, 1);
        let _at_work = take(&registry, "m1", "a", "site").expect("at work");
        assert!(take(&registry, "m2", "a", "site").is_none());
        assert!(take(&registry, "m3", "b", "site").is_none());
        assert_eq!(ids(&registry.take_parked()), ["m2", "m3"]);
        assert_eq!(registry.in_flight(), 1);
        assert!(!registry.take_copy("m2", "h", 1), "no longer held");
    }

    #[test]
    fn limits_of_zero_mean_one() {
        let registry = InFlightRegistry::new(0, 0, 0);
        assert_eq!(registry.room(), 1);
        let _one = take(&registry, "m1", "a", "site").expect("at work");
        assert!(take(&registry, "m2", "b", "site").is_none());
    }

    #[tokio::test]
    async fn a_freed_slot_wakes_the_intake_waiting_for_room() {
        let registry = InFlightRegistry::new(1, 1, 1);
        let job = take(&registry, "m1", "a", "site").expect("at work");
        let waiting = {
            let registry = registry.clone();
            tokio::spawn(async move { registry.wait_for_room().await })
        };
        // Full: the wait does not end by itself.
        let full = tokio::time::timeout(Duration::from_millis(50), registry.wait_for_room()).await;
        assert!(full.is_err(), "room while full");
        drop(job);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the slot was freed")
            .unwrap();
    }
}
