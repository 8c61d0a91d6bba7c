//! Metrics over OTLP: messages by outcome, phase durations, messages in flight, queue wait,
//! interrupts and how long they take, actor failures and restarts, sessions stopped, the
//! isolation level, disk-limit stops, shared-store installs, notices between workers, push
//! retries and the record store's requests.
//! Instruments come from the global meter, which does nothing until `src/telemetry.rs` installs
//! an exporting provider (only when an endpoint is set).
//!
//! Each instrument added for what the log used to be the only place to say is recorded next to
//! that log line, with the same meaning; the line stays.

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, UpDownCounter};

pub struct Metrics {
    pub messages: Counter<u64>,
    pub phase_ms: Histogram<f64>,
    pub in_flight: UpDownCounter<i64>,
    /// The most messages at work at once since the worker started (the high-water mark of
    /// `in_flight`, which `MAX_IN_FLIGHT` caps), recorded when it rises: exact, where reading
    /// `in_flight` at each export only samples it (issue 28).
    pub in_flight_peak: Gauge<u64>,
    pub queue_wait_ms: Histogram<f64>,
    pub interrupts: Counter<u64>,
    pub restarts: Counter<u64>,
    /// Step actors that failed (panicked), by `step` and `escalated`: `true` when the failure
    /// was past the restart limit and failed its session instead of being restarted.
    pub step_failures: Counter<u64>,
    /// Sets of a session's step actors stopped, by `reason`: `no_work` (the session's work ran
    /// out; the next job starts new ones) or `session_ended` (they go with their session).
    pub step_actors_stopped: Counter<u64>,
    /// Sessions the supervisor stopped or lost, by `reason`: `idle` or `failed`.
    pub sessions_stopped: Counter<u64>,
    /// From a stop request to the running work stopped (the agent's process group gone, or the
    /// build stopped), in microseconds as the log's `interrupt_latency_us`, by `reason`
    /// (`interrupted`, `shutdown`, `lease_lost`).
    pub interrupt_latency_us: Histogram<u64>,
    /// From the stop to the agent's turn ended and reported (its result line), in microseconds
    /// as the log's `idle_after_us`, by `in_band`: `true` when the CLI's in-band interrupt
    /// ended it, `false` when SIGINT did.
    pub agent_idle_after_stop_us: Histogram<u64>,
    /// 1 for the isolation `level` tenants' code runs at (`users+namespaces`, `users`,
    /// `namespaces`, `none`), set once at start.
    pub isolation: Gauge<u64>,
    /// Tenants' runs killed for writing past `SANDBOX_MAX_DISK_MB`.
    pub disk_limit_stops: Counter<u64>,
    /// Installs into the shared dependency store (one per distinct lock file while the entry
    /// lasts; a workspace that finds its entry installs nothing).
    pub store_installs: Counter<u64>,
    /// Notices this worker sent to another worker's notice queue (`notices.rs`), by `kind`
    /// (`newer`: a newer message for a workspace the other holds; `released`: the workspace
    /// this worker held is free) and `to`, the other worker's `WORKER_ID`. Worker ids are few
    /// (one per process of a deployment), so they are fine as an attribute; message ids are
    /// not, and stay in the log line.
    pub notices_sent: Counter<u64>,
    /// Notices this worker received, by `kind` and `from`, the sender's `WORKER_ID`.
    pub notices_received: Counter<u64>,
    /// Pushes that failed and are tried again (the log's "push failed; retrying"): the upstream
    /// or the way to it failed for a while. A push that fails for good fails its message
    /// (`push_failed`), counted with the messages.
    pub push_retries: Counter<u64>,
    /// Agent runs ended (beside the log line "agent run finished"), by `ok`: what a benchmark
    /// needs to bound a run's makespan by agent slots x think time (issue 28). A message
    /// stopped while it waited for an agent slot ran no agent and is not counted.
    pub agent_runs: Counter<u64>,
    /// Rollbacks that restored a deploy (beside the log line "rolling back"): with the
    /// stand-in's log, what shows that a rollback ran no agent and no build.
    pub rollbacks: Counter<u64>,
    /// Requests the record store made (outcome records, thread documents, conversations,
    /// leases and presence: everything `records.rs` reads or writes), by `op`: `read` or
    /// `write` (a conditional write or a delete). The same count as the log line "record store
    /// calls" at exit, but live and without the log: what the lease store costs per message
    /// (issue 25's target) is read from it by the benchmarks (issue 28).
    pub record_calls: Counter<u64>,
}

/// Bucket bounds of the stop latencies, in microseconds: 0.5 ms to 10 s. The SDK's default
/// bounds (0 to 10,000) are made for milliseconds and would put every stop of the real CLI (tens
/// of milliseconds) past the last bucket.
const STOP_LATENCY_BOUNDS_US: [f64; 14] = [
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    25_000.0,
    50_000.0,
    100_000.0,
    250_000.0,
    500_000.0,
    1_000_000.0,
    2_500_000.0,
    5_000_000.0,
    10_000_000.0,
];

/// The process's instruments (made on first use, after telemetry is set up).
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("edit-worker");
        Metrics {
            messages: meter
                .u64_counter("edit_worker.messages")
                .with_description("Messages by terminal outcome")
                .build(),
            phase_ms: meter
                .f64_histogram("edit_worker.phase.duration")
                .with_unit("ms")
                .with_description("Time per pipeline phase")
                .build(),
            in_flight: meter
                .i64_up_down_counter("edit_worker.messages.in_flight")
                .with_description("Messages received and not yet finished")
                .build(),
            in_flight_peak: meter
                .u64_gauge("edit_worker.messages.in_flight.peak")
                .with_description("The most messages at work at once since the worker started")
                .build(),
            queue_wait_ms: meter
                .f64_histogram("edit_worker.queue.wait")
                .with_unit("ms")
                .with_description("Time from SQS send to receive")
                .build(),
            interrupts: meter
                .u64_counter("edit_worker.interrupts")
                .with_description("Running work stopped by a newer message")
                .build(),
            restarts: meter
                .u64_counter("edit_worker.actor.restarts")
                .with_description("Step actors restarted after a failure")
                .build(),
            step_failures: meter
                .u64_counter("edit_worker.step.failures")
                .with_description(
                    "Step actors that failed; escalated: past the restart limit, the session failed",
                )
                .build(),
            step_actors_stopped: meter
                .u64_counter("edit_worker.step_actors.stopped")
                .with_description(
                    "Sets of a session's step actors stopped: its work ran out, or it ended",
                )
                .build(),
            sessions_stopped: meter
                .u64_counter("edit_worker.sessions.stopped")
                .with_description("Sessions stopped for being idle, or failed")
                .build(),
            interrupt_latency_us: meter
                .u64_histogram("edit_worker.interrupt.latency")
                .with_unit("us")
                .with_description("From a stop request to the running work stopped")
                .with_boundaries(STOP_LATENCY_BOUNDS_US.to_vec())
                .build(),
            agent_idle_after_stop_us: meter
                .u64_histogram("edit_worker.agent.idle_after_stop")
                .with_unit("us")
                .with_description(
                    "From a stop to the agent's turn ended and reported; in_band: by the in-band interrupt",
                )
                .with_boundaries(STOP_LATENCY_BOUNDS_US.to_vec())
                .build(),
            isolation: meter
                .u64_gauge("edit_worker.isolation")
                .with_description("1 for the isolation level tenants' code runs at")
                .build(),
            disk_limit_stops: meter
                .u64_counter("edit_worker.sandbox.disk_limit_stops")
                .with_description("Tenants' runs killed for writing past their disk limit")
                .build(),
            store_installs: meter
                .u64_counter("edit_worker.store.installs")
                .with_description("Installs into the shared dependency store")
                .build(),
            notices_sent: meter
                .u64_counter("edit_worker.notices.sent")
                .with_description("Notices sent to another worker, by kind and the worker sent to")
                .build(),
            notices_received: meter
                .u64_counter("edit_worker.notices.received")
                .with_description("Notices received from another worker, by kind and sender")
                .build(),
            push_retries: meter
                .u64_counter("edit_worker.push.retries")
                .with_description("Pushes that failed and are tried again")
                .build(),
            agent_runs: meter
                .u64_counter("edit_worker.agent.runs")
                .with_description("Agent runs ended, by ok")
                .build(),
            rollbacks: meter
                .u64_counter("edit_worker.rollbacks")
                .with_description("Rollbacks that restored a deploy")
                .build(),
            record_calls: meter
                .u64_counter("edit_worker.records.calls")
                .with_description("Record store requests, by op: read or write")
                .build(),
        }
    })
}

/// Count a notice sent to worker `to` (beside its log line, where there is one).
pub fn notice_sent(kind: &'static str, to: &str) {
    metrics().notices_sent.add(
        1,
        &[
            KeyValue::new("kind", kind),
            KeyValue::new("to", to.to_owned()),
        ],
    );
}

/// Count a notice received from worker `from`.
pub fn notice_received(kind: &'static str, from: &str) {
    metrics().notices_received.add(
        1,
        &[
            KeyValue::new("kind", kind),
            KeyValue::new("from", from.to_owned()),
        ],
    );
}

/// Count a request of the record store: `op` is `read` or `write` (a delete counts as a write,
/// as in the log line "record store calls").
pub fn record_call(op: &'static str) {
    metrics().record_calls.add(1, &[KeyValue::new("op", op)]);
}

pub fn outcome(kind: &str) {
    metrics()
        .messages
        .add(1, &[KeyValue::new("outcome", kind.to_owned())]);
}
