//! What the worker tells its operator: metrics, the trace context a message carries, and the
//! redaction every logged text goes through. Leaves.

pub(crate) mod metrics;
pub(crate) mod redact;
pub mod trace_context;
