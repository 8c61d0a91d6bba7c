//! Status events (`CONTRACT.md`, "Status events"): one JSON object per SQS message on the
//! status queue, and always in the log.
//!
//! The free text of an event (`result`, `detail`, `error.message`: the agent's words, its
//! progress, git's and the build's messages) is redacted (`crate::telemetry::redact`) when the event is
//! serialized. Every event leaves the worker only as its JSON (the status queue, the log line,
//! the record a repeated event is sent from), so no path around the redaction exists.

use std::collections::BTreeMap;

use aws_sdk_sqs::error::DisplayErrorContext;
use serde::{Deserialize, Serialize, Serializer};

use crate::contract::message::{EditRequest, LooseIds};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Started,
    Progress,
    Completed,
    Interrupted,
    Failed,
    Rejected,
}

impl EventType {
    pub fn is_terminal(self) -> bool {
        !matches!(self, EventType::Started | EventType::Progress)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct EventError {
    /// Stable, machine-readable.
    pub kind: String,
    /// For a person; for a failed build, the tail of the build log. Redacted when serialized.
    #[serde(serialize_with = "redacted")]
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusEvent {
    #[serde(rename = "type")]
    pub event_type: EventType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    pub message_id: String,
    /// RFC 3339, UTC.
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview_url: Option<String>,
    /// The agent's result text. Redacted when serialized.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "redacted_option"
    )]
    pub result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// True when the thread's conversation could not be resumed (its files were gone) and the
    /// agent started a new one: it no longer remembers the thread's earlier requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_restarted: Option<bool>,
    /// In a coalesced batch (one agent run for several messages), the message whose event
    /// carries the run's cost; this one reports 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_paid_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durations_ms: Option<BTreeMap<String, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishReport>,
    /// The deploy a publish (or a rollback) recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy_id: Option<String>,
    /// What a rollback went back to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<RolledBackTo>,
    /// An extension of the contract's events (issue 25): the upstream ref under which an
    /// interrupted or failed job's saved work was kept because its branch could not be pushed
    /// (`refs/edit-worker/saved/{branch}/{messageId}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    /// What is happening, for `progress` events. Redacted when serialized.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "redacted_option"
    )]
    pub detail: Option<String>,
    /// Order of a message's `progress` events (1, 2, ...): the status queue may reorder them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// Agent turns this message took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_turns: Option<u64>,
    /// Times the agent was resumed to repair a build its edit broke.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_repairs: Option<u32>,
    /// The CloudFront invalidation made after the publish, when the bucket has a distribution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalidation_id: Option<String>,
    /// The browser check of the published site (`completed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::contract::check_report::CheckReport>,
}

fn redacted<S: Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&crate::telemetry::redact::redact(text))
}

fn redacted_option<S: Serializer>(text: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match text {
        Some(text) => serializer.serialize_some(&*crate::telemetry::redact::redact(text)),
        None => serializer.serialize_none(),
    }
}

impl StatusEvent {
    /// An event about a valid request.
    pub fn for_request(event_type: EventType, request: &EditRequest, message_id: &str) -> Self {
        let mut event = StatusEvent::bare(event_type, message_id);
        event.session_id = Some(request.session_id.clone());
        event.thread_id = Some(request.thread_id.clone());
        event.client_id = Some(request.client_id.clone());
        event.project_id = Some(request.project_id.clone());
        event
    }

    /// A `rejected` event, with whatever valid ids the message carried.
    pub fn rejected(ids: LooseIds, message_id: &str, kind: &str, message: String) -> Self {
        let mut event = StatusEvent::bare(EventType::Rejected, message_id);
        event.session_id = ids.session_id;
        event.thread_id = ids.thread_id;
        event.client_id = ids.client_id;
        event.project_id = ids.project_id;
        event.error = Some(EventError {
            kind: kind.into(),
            message,
        });
        event
    }

    fn bare(event_type: EventType, message_id: &str) -> Self {
        StatusEvent {
            event_type,
            session_id: None,
            thread_id: None,
            client_id: None,
            project_id: None,
            message_id: message_id.into(),
            at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            trace_id: None,
            branch: None,
            commit: None,
            bucket: None,
            preview_url: None,
            result: None,
            cost_usd: None,
            cost_paid_by: None,
            conversation_restarted: None,
            durations_ms: None,
            publish: None,
            deploy_id: None,
            rolled_back_to: None,
            saved_ref: None,
            error: None,
            detail: None,
            sequence: None,
            agent_turns: None,
            build_repairs: None,
            invalidation_id: None,
            check: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("sending a status event: {0}")]
pub(crate) struct StatusSendError(String);

/// Where status events go: the status queue when one is configured, and the log always.
#[derive(Clone)]
pub(crate) struct StatusSink {
    sqs: aws_sdk_sqs::Client,
    queue_url: Option<String>,
    /// Tests only: every event sent is also handed to the test here.
    #[cfg(test)]
    tap: Option<tokio::sync::mpsc::UnboundedSender<StatusEvent>>,
}

impl StatusSink {
    pub fn new(sqs: aws_sdk_sqs::Client, queue_url: Option<String>) -> StatusSink {
        StatusSink {
            sqs,
            queue_url,
            #[cfg(test)]
            tap: None,
        }
    }

    /// Tests only: a sink without a status queue whose events the test receives.
    #[cfg(test)]
    pub(crate) fn tapped(
        sqs: aws_sdk_sqs::Client,
    ) -> (
        StatusSink,
        tokio::sync::mpsc::UnboundedReceiver<StatusEvent>,
    ) {
        let (tap, events) = tokio::sync::mpsc::unbounded_channel();
        let sink = StatusSink {
            sqs,
            queue_url: None,
            tap: Some(tap),
        };
        (sink, events)
    }

    pub async fn send(&self, event: &StatusEvent) -> Result<(), StatusSendError> {
        use tracing::Instrument;
        let span = tracing::info_span!("send status event", event = ?event.event_type);
        self.send_inner(event).instrument(span).await
    }

    async fn send_inner(&self, event: &StatusEvent) -> Result<(), StatusSendError> {
        let body = serde_json::to_string(event).expect("status events serialize");
        tracing::info!(
            event = ?event.event_type,
            message_id = %event.message_id,
            error_kind = event.error.as_ref().map(|e| e.kind.as_str()),
            "status {body}"
        );
        #[cfg(test)]
        if let Some(tap) = &self.tap {
            let _ = tap.send(event.clone());
        }
        self.put_on_queue(body).await
    }

    /// Send an event exactly as it was recorded (a repeated terminal event: same type, same
    /// content, so a consumer keyed by `messageId` sees one outcome).
    pub async fn send_recorded(&self, body: &str) -> Result<(), StatusSendError> {
        tracing::info!(repeated = true, "status {body}");
        self.put_on_queue(body.to_owned()).await
    }

    async fn put_on_queue(&self, body: String) -> Result<(), StatusSendError> {
        let Some(url) = &self.queue_url else {
            return Ok(());
        };
        self.sqs
            .send_message()
            .queue_url(url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| StatusSendError(DisplayErrorContext(&e).to_string()))?;
        Ok(())
    }
}

/// `publish` of a `completed` event: what the publisher did (`steps::publish`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublishReport {
    /// Keys uploaded or deleted: what a CDN in front of the bucket must forget.
    #[serde(skip)]
    pub changed: Vec<String>,
    pub uploaded: usize,
    pub skipped: usize,
    pub deleted: usize,
    pub bytes: u64,
    /// The deploy this publish recorded (a workspace's publish): the event carries it apart.
    #[serde(skip)]
    pub deploy_id: Option<String>,
}

/// What a rollback went back to (`rolledBackTo` in its event and record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolledBackTo {
    pub deploy_id: String,
    pub commit: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_is_redacted_when_serialized() {
        let mut event = StatusEvent::bare(EventType::Failed, "m-1");
        event.result = Some("Read .env: ANTHROPIC_API_KEY=sk-ant-api03-abcdefghijkl".into());
        event.detail = Some("Write keys/sk-ant-api03-abcdefghijkl.txt".into());
        event.error = Some(EventError {
            kind: "git".into(),
            message: "`git clone --quiet -- https://x:ghp_abcdefghijklmnopqrstuvwxyz0123@h/c/p.git` failed"
                .into(),
        });
        let json = serde_json::to_string(&event).unwrap();
        for secret in ["abcdefghijkl", "ghp_abcdef", "x:ghp"] {
            assert!(!json.contains(secret), "{secret} in {json}");
        }
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["result"], "Read .env: ANTHROPIC_API_KEY=***");
        assert_eq!(value["detail"], "Write keys/sk-ant-***.txt");
        assert_eq!(
            value["error"]["message"],
            "`git clone --quiet -- https://***@h/c/p.git` failed"
        );
        assert_eq!(value["error"]["kind"], "git");
        // Absent fields stay absent.
        let bare = serde_json::to_value(StatusEvent::bare(EventType::Started, "m-2")).unwrap();
        assert!(bare.get("result").is_none() && bare.get("detail").is_none());
    }
}
