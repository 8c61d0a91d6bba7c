//! Logs and OpenTelemetry.
//!
//! Logs: human-readable by default, JSON lines with `LOG_FORMAT=json` (what CloudWatch wants),
//! filtered by `RUST_LOG` (default `info`), on stderr so stdout stays for command output.
//!
//! Traces and metrics go over OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its
//! `_TRACES_`/`_METRICS_` variant) is set; `OTEL_EXPORTER_OTLP_PROTOCOL` picks `grpc` or
//! `http/protobuf` (the default), `OTEL_SERVICE_NAME` names the service. Metrics are exported
//! every `OTEL_METRIC_EXPORT_INTERVAL` ms (the SDK's periodic reader reads it; 60 s by default;
//! the tests set 200). With no endpoint no OpenTelemetry layer is installed at all: nothing is
//! exported and nothing is paid.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, Registry};

/// Holds the providers so that `shutdown` can flush them (on exit, SIGTERM included).
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn grpc() -> bool {
    std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").is_ok_and(|p| p.trim() == "grpc")
}

fn resource() -> Resource {
    let builder = Resource::builder();
    // OTEL_SERVICE_NAME (read by the builder) wins; otherwise we are "edit-worker".
    if env_set("OTEL_SERVICE_NAME") {
        builder.build()
    } else {
        builder.with_service_name("edit-worker").build()
    }
}

fn tracer_provider() -> Result<Option<SdkTracerProvider>, String> {
    if !env_set("OTEL_EXPORTER_OTLP_ENDPOINT") && !env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    let exporter = if grpc() {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    } else {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
    }
    .map_err(|e| format!("OTLP trace exporter: {e}"))?;
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build(),
    ))
}

fn meter_provider() -> Result<Option<SdkMeterProvider>, String> {
    if !env_set("OTEL_EXPORTER_OTLP_ENDPOINT") && !env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
        return Ok(None);
    }
    let exporter = if grpc() {
        opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
    } else {
        opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
    }
    .map_err(|e| format!("OTLP metric exporter: {e}"))?;
    Ok(Some(
        SdkMeterProvider::builder()
            .with_periodic_exporter(exporter)
            .with_resource(resource())
            .build(),
    ))
}

/// Set up logging and, when configured, OpenTelemetry. Call inside the tokio runtime.
pub fn init() -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in files or CloudWatch.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };

    let mut problems = Vec::new();
    let tracer = tracer_provider().unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let meter = meter_provider().unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = tracer.as_ref().map(|provider| {
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("edit-worker"))
            // Spans of our own crates, and the agent's activity (debug) as span events; the
            // log filter (RUST_LOG) does not decide what the trace gets.
            .with_filter(
                Targets::new()
                    .with_target("edit_worker", tracing::Level::DEBUG)
                    .with_target("edit_worker_actors", tracing::Level::DEBUG),
            )
    });
    if let Some(provider) = &meter {
        opentelemetry::global::set_meter_provider(provider.clone());
    }
    Registry::default()
        .with(fmt.with_filter(filter))
        .with(otel)
        .init();
    for problem in problems {
        tracing::error!("telemetry not exported: {problem}");
    }
    Telemetry { tracer, meter }
}

impl Telemetry {
    /// Flush and stop the exporters. Blocks (the SDK's shutdown does), so it runs off the
    /// async threads.
    pub async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(t) = self.tracer
                && let Err(e) = t.shutdown()
            {
                eprintln!("edit-worker: flushing traces: {e}");
            }
            if let Some(m) = self.meter
                && let Err(e) = m.shutdown()
            {
                eprintln!("edit-worker: flushing metrics: {e}");
            }
        })
        .await;
    }
}

/// A producer span for one message and the `traceparent` to send with it, as the upstream
/// service would: the worker's consumer span then continues this trace. Without an exporter
/// the span has no context of its own, so a fresh random one is made up: the message still
/// starts a trace that the worker's events and logs carry.
pub fn producer_span(message: &str) -> (tracing::Span, String) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::info_span!(
        "send edit request",
        otel.kind = "producer",
        messaging.system = "aws_sqs",
        messaging.operation.type = "send",
        edit.message = message,
    );
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    let header = if sc.is_valid() {
        edit_worker_actors::telemetry::trace_context::traceparent(&sc)
    } else {
        let trace = uuid::Uuid::new_v4().simple().to_string();
        let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
        format!("00-{trace}-{span_id}-01")
    };
    (span, header)
}
