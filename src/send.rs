//! `edit-worker send` and `edit-worker rollback`: put one edit (or rollback) request on the
//! input queue, as the upstream service would.

use anyhow::Context;
use aws_sdk_sqs::error::DisplayErrorContext;
use clap::Args;
use tracing::Instrument;

use edit_worker_actors::message::{DEFAULT_MAX_COMMAND_BYTES, EditRequest};

#[derive(Args)]
pub struct SendArgs {
    #[arg(long)]
    client: String,
    #[arg(long)]
    project: String,
    #[arg(long)]
    thread: String,
    /// Defaults to `session-{thread}`.
    #[arg(long)]
    session: Option<String>,
    /// The queue; defaults to INPUT_QUEUE_URL.
    #[arg(long, env = "INPUT_QUEUE_URL", hide_env_values = true)]
    queue_url: String,
    /// The request text.
    command: String,
}

pub enum SendError {
    /// Bad arguments (exit 2).
    Usage(anyhow::Error),
    /// The queue did not take it (exit 1).
    Failed(anyhow::Error),
}

pub async fn send(args: SendArgs) -> Result<(), SendError> {
    let body = serde_json::json!({
        "sessionId": args.session.clone().unwrap_or_else(|| format!("session-{}", args.thread)),
        "threadId": args.thread,
        "clientId": args.client,
        "projectId": args.project,
        "command": args.command,
    });
    put_on_queue(&args.queue_url, body, "edit request").await
}

#[derive(Args)]
pub struct RollbackArgs {
    #[arg(long)]
    client: String,
    #[arg(long)]
    project: String,
    /// The thread whose branch gets the `Rollback to` commit.
    #[arg(long)]
    thread: String,
    /// Defaults to `session-{thread}`.
    #[arg(long)]
    session: Option<String>,
    /// What to go back to: `previous` (the deploy before the live one), a deployId, or a
    /// commit (7 to 40 hex digits) that was deployed.
    #[arg(long, default_value = "previous")]
    to: String,
    /// The queue; defaults to INPUT_QUEUE_URL.
    #[arg(long, env = "INPUT_QUEUE_URL", hide_env_values = true)]
    queue_url: String,
}

/// `edit-worker rollback`: put one rollback message on the input queue.
pub async fn rollback(args: RollbackArgs) -> Result<(), SendError> {
    let body = serde_json::json!({
        "sessionId": args.session.clone().unwrap_or_else(|| format!("session-{}", args.thread)),
        "threadId": args.thread,
        "clientId": args.client,
        "projectId": args.project,
        "action": "rollback",
        "to": args.to,
    });
    put_on_queue(&args.queue_url, body, "rollback request").await
}

/// Check `body` as the worker would, then send it with a trace context; prints the message id.
async fn put_on_queue(
    queue_url: &str,
    body: serde_json::Value,
    what: &'static str,
) -> Result<(), SendError> {
    let body = body.to_string();
    // The same rules the worker applies: refuse to send what it would reject.
    EditRequest::parse(&body, DEFAULT_MAX_COMMAND_BYTES)
        .map_err(|e| SendError::Usage(anyhow::anyhow!(e)))?;
    let sdk = crate::aws::load().await;
    let (span, traceparent) = crate::telemetry::producer_span(what);
    let attribute = aws_sdk_sqs::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(traceparent)
        .build()
        .expect("attribute");
    let out = crate::aws::sqs(&sdk)
        .send_message()
        .queue_url(queue_url)
        .message_body(body)
        .message_attributes("traceparent", attribute)
        .send()
        .instrument(span)
        .await
        .map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(&e)))
        .context("sending the message")
        .map_err(SendError::Failed)?;
    println!("{}", out.message_id().unwrap_or_default());
    Ok(())
}
