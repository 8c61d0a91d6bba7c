//! Metrics over OTLP: messages by outcome, phase durations, messages in flight, queue wait,
//! interrupts, actor restarts. Instruments come from the global meter, which does nothing
//! until `src/telemetry.rs` installs an exporting provider (only when an endpoint is set).

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, UpDownCounter};

pub struct Metrics {
    pub messages: Counter<u64>,
    pub phase_ms: Histogram<f64>,
    pub in_flight: UpDownCounter<i64>,
    pub queue_wait_ms: Histogram<f64>,
    pub interrupts: Counter<u64>,
    pub restarts: Counter<u64>,
}

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
        }
    })
}

pub fn outcome(kind: &str) {
    metrics()
        .messages
        .add(1, &[KeyValue::new("outcome", kind.to_owned())]);
}
