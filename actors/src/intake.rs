//! The intake: long-polls the input queue while there is room, validates each message against
//! the contract, rejects what breaks it, and routes the rest to the supervisor.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use ractor::ActorRef;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::job::{InFlight, Job, Renewal};
use crate::message::{EditRequest, LooseIds, RequestError, WorkspaceKey};
use crate::metrics::metrics;
use crate::pipeline::WorkerContext;
use crate::status::StatusEvent;
use crate::supervisor::SupervisorMsg;
use crate::trace_context;

/// SQS returns at most 10 messages per receive.
const MAX_BATCH: usize = 10;
/// Long-poll wait. SQS allows 20 s; we use 10 s because a poll is never abandoned half-way (an
/// abandoned long poll can still take a message, which then stays invisible until its timeout),
/// so on shutdown we wait for the current poll to end and give back what it brought: 10 s
/// keeps that well inside ECS's 30 s between SIGTERM and SIGKILL.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// How long a message deferred for fairness stays out of sight.
const DEFER_DELAY: Duration = Duration::from_secs(2);

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
pub struct InFlightRegistry {
    /// One permit per message held (received, not yet finished or released). Bounds memory and
    /// leaves messages in the queue, where another container can take them, instead of letting
    /// them wait invisibly in ours while their visibility runs out.
    slots: Arc<Semaphore>,
    max: usize,
    /// At most this many messages of one workspace are held at once. A workspace runs one job
    /// at a time, so holding more only takes room from other clients.
    max_per_workspace: usize,
    /// At most this many messages of one client (all its projects) are held at once, so that
    /// a client with 500 queued messages cannot fill every slot and starve a client with one.
    max_per_client: usize,
    state: Arc<Mutex<Held>>,
}

#[derive(Default)]
struct Held {
    /// Ids of held messages: a message SQS hands us again while we still work on it is not
    /// started a second time.
    ids: HashSet<String>,
    per_workspace: HashMap<WorkspaceKey, usize>,
    per_client: HashMap<String, usize>,
    /// Times we gave a message back unread for fairness; they are not failed attempts, so they
    /// are taken off its receive count (in memory: a restart forgets them).
    deferrals: HashMap<String, u32>,
}

/// Why a message was not taken.
enum Refusal {
    /// Already held: a second copy.
    Duplicate,
    /// Its workspace or its client holds its share already.
    ShareTaken,
}

impl InFlightRegistry {
    pub fn new(max: usize, max_per_workspace: usize, max_per_client: usize) -> InFlightRegistry {
        InFlightRegistry {
            slots: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
            max_per_workspace: max_per_workspace.max(1),
            max_per_client: max_per_client.max(1),
            state: Arc::default(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Take a message into the books: its slot is held until the returned guard is dropped.
    fn claim(
        &self,
        permit: OwnedSemaphorePermit,
        message_id: &str,
        workspace: Option<&WorkspaceKey>,
    ) -> Result<InFlight, Refusal> {
        let mut held = self.state.lock().expect("held");
        if held.ids.contains(message_id) {
            return Err(Refusal::Duplicate);
        }
        if let Some(key) = workspace {
            let in_workspace = held.per_workspace.get(key).copied().unwrap_or(0);
            let of_client = held.per_client.get(&key.client_id).copied().unwrap_or(0);
            if in_workspace >= self.max_per_workspace || of_client >= self.max_per_client {
                *held.deferrals.entry(message_id.to_owned()).or_default() += 1;
                return Err(Refusal::ShareTaken);
            }
            *held.per_workspace.entry(key.clone()).or_default() += 1;
            *held.per_client.entry(key.client_id.clone()).or_default() += 1;
        }
        held.ids.insert(message_id.to_owned());
        metrics().in_flight.add(1, &[]);
        let state = self.state.clone();
        let id = message_id.to_owned();
        let key = workspace.cloned();
        Ok(InFlight::new(permit, move || {
            metrics().in_flight.add(-1, &[]);
            let mut held = state.lock().expect("held");
            held.ids.remove(&id);
            if let Some(key) = key {
                decrement(&mut held.per_workspace, &key);
                decrement(&mut held.per_client, &key.client_id);
            }
        }))
    }

    /// Deliveries that were real attempts: SQS's count less our fairness deferrals.
    fn attempts(&self, message_id: &str, receive_count: u32) -> u32 {
        let mut held = self.state.lock().expect("held");
        let deferred = held.deferrals.remove(message_id).unwrap_or(0);
        receive_count.saturating_sub(deferred).max(1)
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
pub async fn run_intake(
    ctx: Arc<WorkerContext>,
    supervisor: ActorRef<SupervisorMsg>,
    registry: InFlightRegistry,
    exit_when_idle: Option<Duration>,
    shutdown: CancellationToken,
) -> Result<IntakeEnd, IntakeError> {
    let sqs = ctx.delivery.sqs().clone();
    let mut last_activity = Instant::now();
    let mut error_backoff = Duration::from_millis(500);
    loop {
        if shutdown.is_cancelled() {
            return Ok(IntakeEnd::Shutdown(None));
        }
        if matches!(
            supervisor.get_status(),
            ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
        ) {
            return Err(IntakeError::SupervisorGone);
        }
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
        let first = tokio::select! {
            permit = registry.slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = shutdown.cancelled() => return Ok(IntakeEnd::Shutdown(None)),
            // Re-check idleness and the supervisor now and then while full.
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
        };
        let room = (1 + registry.slots.available_permits()).min(MAX_BATCH);
        let receive = sqs
            .receive_message()
            .queue_url(&ctx.config.input_queue_url)
            .max_number_of_messages(room as i32)
            .wait_time_seconds(wait.as_secs() as i32)
            .visibility_timeout(ctx.config.visibility_timeout.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send();
        let mut receive = tokio::spawn(receive);
        let received = tokio::select! {
            r = &mut receive => r.expect("receive task does not panic"),
            _ = shutdown.cancelled() => {
                let delivery = ctx.delivery.clone();
                let give_back = tokio::spawn(async move {
                    if let Ok(Ok(out)) = receive.await {
                        for m in out.messages.unwrap_or_default() {
                            let receipt = m.receipt_handle.unwrap_or_default();
                            if let Err(e) = delivery.release(&receipt, Duration::ZERO).await {
                                tracing::warn!(error = %e, "could not give back a message received during shutdown");
                            }
                        }
                    }
                });
                drop(first);
                return Ok(IntakeEnd::Shutdown(Some(give_back)));
            }
        };
        let messages = match received {
            Ok(out) => {
                error_backoff = Duration::from_millis(500);
                out.messages.unwrap_or_default()
            }
            Err(e) => {
                tracing::error!(error = %DisplayErrorContext(&e), "receiving from the input queue failed; retrying");
                drop(first);
                tokio::select! {
                    _ = tokio::time::sleep(error_backoff) => {}
                    _ = shutdown.cancelled() => return Ok(IntakeEnd::Shutdown(None)),
                }
                error_backoff = (error_backoff * 2).min(Duration::from_secs(20));
                continue;
            }
        };
        if !messages.is_empty() {
            last_activity = Instant::now();
        }
        let mut first = Some(first);
        for message in messages {
            let permit = match first.take() {
                Some(p) => p,
                // We asked for no more than we had room for, so this succeeds.
                None => registry
                    .slots
                    .clone()
                    .try_acquire_owned()
                    .expect("room was counted before receiving"),
            };
            accept(&ctx, &supervisor, &registry, message, permit).await?;
        }
    }
}

/// Validate one message; route it, or reject it.
async fn accept(
    ctx: &Arc<WorkerContext>,
    supervisor: &ActorRef<SupervisorMsg>,
    registry: &InFlightRegistry,
    message: Message,
    permit: OwnedSemaphorePermit,
) -> Result<(), IntakeError> {
    let message_id = message.message_id.clone().unwrap_or_default();
    let receipt_handle = message.receipt_handle.clone().unwrap_or_default();
    let body = message.body.clone().unwrap_or_default();
    let receive_count = message
        .attributes
        .as_ref()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (span, trace_id) = root_span(ctx, &message, &message_id);
    if let Some(sent) = message
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
        .and_then(|v| v.parse::<u64>().ok())
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        metrics()
            .queue_wait_ms
            .record(now.saturating_sub(sent) as f64, &[]);
    }
    let request = EditRequest::parse(&body, ctx.config.max_command_bytes)
        .and_then(|r| served_here(&ctx.config, r));
    let workspace = request.as_ref().ok().map(EditRequest::workspace);
    let slot = match registry.claim(permit, &message_id, workspace.as_ref()) {
        Ok(slot) => slot,
        Err(Refusal::Duplicate) => {
            tracing::warn!(%message_id, "message delivered again while still being worked on; ignoring this copy");
            return Ok(());
        }
        Err(Refusal::ShareTaken) => {
            // Back to the queue for a little while: room for other clients meanwhile.
            tracing::debug!(%message_id, "its workspace or client holds its share of messages; deferring");
            let delivery = ctx.delivery.clone();
            tokio::spawn(async move {
                let _ = delivery.release(&receipt_handle, DEFER_DELAY).await;
            });
            return Ok(());
        }
    };
    let request = match request {
        Ok(r) => r,
        Err(reason) => {
            reject(ctx, &message_id, &receipt_handle, &body, reason, trace_id)
                .instrument(span)
                .await;
            drop(slot);
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
        span.record("edit.command", shown.as_str());
    }
    let receive_count = registry.attempts(&message_id, receive_count);
    tracing::info!(%message_id, workspace = %request.workspace(), thread = %request.thread_id, "accepted");
    // Renewed from now on: a message may wait in its session's queue longer than its timeout.
    let stop = tokio_util::sync::CancellationToken::new();
    let renewal = Renewal::new(
        stop.clone(),
        ctx.delivery.keep_invisible(receipt_handle.clone(), stop),
    );
    let job = Job {
        request,
        message_id,
        renewal,
        receipt_handle,
        received_at: Instant::now(),
        receive_count,
        trace_id,
        span,
        slot: Some(slot),
    };
    supervisor
        .cast(SupervisorMsg::Route(Box::new(job)))
        .map_err(|_| IntakeError::SupervisorGone)
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
    crate::metrics::outcome("rejected");
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
