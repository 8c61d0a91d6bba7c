//! `edit-worker send` and `edit-worker rollback`: put one edit (or rollback) request on the
//! input queue, as the upstream service would.

use anyhow::Context;
use aws_sdk_sqs::error::DisplayErrorContext;
use clap::Args;
use tracing::Instrument;

use edit_worker_actors::contract::message::{DEFAULT_MAX_COMMAND_BYTES, EditRequest};

/// Which thread a message is for, and the queue it goes on: what `send` and `rollback` share.
#[derive(Args)]
pub struct ThreadTarget {
    #[arg(long)]
    client: String,
    #[arg(long)]
    project: String,
    /// The thread (its branch is `thread-{thread}`).
    #[arg(long)]
    thread: String,
    /// Defaults to `session-{thread}`.
    #[arg(long)]
    session: Option<String>,
    /// The queue; defaults to INPUT_QUEUE_URL.
    #[arg(long, env = "INPUT_QUEUE_URL", hide_env_values = true)]
    queue_url: String,
}

impl ThreadTarget {
    /// The message fields that name the thread.
    fn body(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut body = serde_json::Map::new();
        let session = self
            .session
            .clone()
            .unwrap_or_else(|| format!("session-{}", self.thread));
        body.insert("sessionId".into(), session.into());
        body.insert("threadId".into(), self.thread.clone().into());
        body.insert("clientId".into(), self.client.clone().into());
        body.insert("projectId".into(), self.project.clone().into());
        body
    }
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    target: ThreadTarget,
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
    let mut body = args.target.body();
    body.insert("command".into(), args.command.into());
    put_on_queue(&args.target.queue_url, body.into(), "edit request").await
}

#[derive(Args)]
pub struct RollbackArgs {
    /// The thread whose branch gets the `Rollback to` commit.
    #[command(flatten)]
    target: ThreadTarget,
    /// What to go back to: `previous` (the deploy before the live one), a deployId, or a
    /// commit (7 to 40 hex digits) that was deployed.
    #[arg(long, default_value = "previous")]
    to: String,
}

/// `edit-worker rollback`: put one rollback message on the input queue.
pub async fn rollback(args: RollbackArgs) -> Result<(), SendError> {
    let mut body = args.target.body();
    body.insert("action".into(), "rollback".into());
    body.insert("to".into(), args.to.into());
    put_on_queue(&args.target.queue_url, body.into(), "rollback request").await
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
