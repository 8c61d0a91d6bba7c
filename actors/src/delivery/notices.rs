//! Notices between workers: how a newer message reaches the worker that holds its workspace.
//!
//! Every worker with a lease store owns an SQS queue of its own (`{input queue}-notices-{worker}`),
//! created at start, named in every lease it holds, long-polled all the time and deleted on a
//! graceful stop. A worker that receives a message for a workspace another worker holds keeps
//! the message (its visibility renewed: no receive is burnt) and sends the holder `Newer`; the
//! holder stops its work as for a local interrupt when the message is newer than that work, and
//! releases the lease when the work has ended, answering `Released` so that the waiter takes it
//! at once. Notices only speed things up: the waiter also polls the lease, so a lost notice, or
//! a holder that died, costs time (at most the lease's expiry) but never a message.

use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::contract::message::WorkspaceKey;

/// SQS's shortest retention: a notice older than this is of no use anyway.
const RETENTION_SECONDS: &str = "60";
/// SQS queue names: at most 80 characters of `[A-Za-z0-9_-]`.
const MAX_QUEUE_NAME: usize = 80;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub(crate) enum Notice {
    /// A message for a workspace you hold waits on worker `from`.
    #[serde(rename_all = "camelCase")]
    Newer {
        client_id: String,
        project_id: String,
        message_id: String,
        /// The waiting message's `SentTimestamp`: only work older than it is interrupted.
        sent_at_ms: u64,
        from: String,
        /// The waiter's notice queue, for `Released`.
        reply_to: Option<String>,
    },
    /// I released the workspace's lease: take it now.
    #[serde(rename_all = "camelCase")]
    Released {
        client_id: String,
        project_id: String,
        from: String,
    },
}

impl Notice {
    /// Its `kind` as it is written on the queue (`newer`, `released`): the attribute of the
    /// notice counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::Newer { .. } => "newer",
            Notice::Released { .. } => "released",
        }
    }

    pub fn workspace(&self) -> WorkspaceKey {
        let (client_id, project_id) = match self {
            Notice::Newer {
                client_id,
                project_id,
                ..
            }
            | Notice::Released {
                client_id,
                project_id,
                ..
            } => (client_id, project_id),
        };
        WorkspaceKey {
            client_id: client_id.clone(),
            project_id: project_id.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("notice queue {op}: {message}")]
pub struct NoticeError {
    op: &'static str,
    message: String,
}

/// Sends notices to other workers' queues.
#[derive(Clone)]
pub(crate) struct NoticeSender {
    sqs: aws_sdk_sqs::Client,
    /// Tests: every notice goes here (queue, notice) instead of to SQS.
    #[cfg(test)]
    tap: Option<tokio::sync::mpsc::UnboundedSender<(String, Notice)>>,
}

impl NoticeSender {
    pub fn new(sqs: aws_sdk_sqs::Client) -> NoticeSender {
        NoticeSender {
            sqs,
            #[cfg(test)]
            tap: None,
        }
    }

    /// A sender whose notices a test reads from the returned channel.
    #[cfg(test)]
    pub fn tapped(
        sqs: aws_sdk_sqs::Client,
    ) -> (
        NoticeSender,
        tokio::sync::mpsc::UnboundedReceiver<(String, Notice)>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (NoticeSender { sqs, tap: Some(tx) }, rx)
    }

    pub async fn send(&self, queue_url: &str, notice: &Notice) -> Result<(), NoticeError> {
        #[cfg(test)]
        if let Some(tap) = &self.tap {
            let _ = tap.send((queue_url.to_owned(), notice.clone()));
            return Ok(());
        }
        let body = serde_json::to_string(notice).expect("notices serialize");
        self.sqs
            .send_message()
            .queue_url(queue_url)
            .message_body(body)
            .send()
            .await
            .map(drop)
            .map_err(|e| NoticeError {
                op: "send",
                message: DisplayErrorContext(&e).to_string(),
            })
    }
}

/// This worker's own notice queue.
pub struct NoticeQueue {
    sqs: aws_sdk_sqs::Client,
    url: String,
}

/// The notice queue's name for `worker` beside the input queue: readable, and unique per worker
/// id even when cut to SQS's 80 characters (a hash of the whole id ends it).
pub(crate) fn queue_name(input_queue_url: &str, worker: &str) -> String {
    let input = input_queue_url.rsplit('/').next().unwrap_or("edit-worker");
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let hash = worker.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let suffix = format!("-{:08x}", hash as u32);
    let mut name = format!("{}-notices-{}", clean(input), clean(worker));
    name.truncate(MAX_QUEUE_NAME - suffix.len());
    name.push_str(&suffix);
    name
}

/// What every notice queue beside `input_queue_url` starts with (`queue_name`), for listing
/// them by SQS's `QueueNamePrefix`.
pub(crate) fn queue_prefix(input_queue_url: &str) -> String {
    let full = queue_name(input_queue_url, "");
    // `queue_name` of an empty id: the prefix, then the hash part (`-` + 8 hex digits).
    full[..full.len() - 9].to_owned()
}

impl NoticeQueue {
    /// Create (or find) this worker's queue.
    pub async fn create(
        sqs: aws_sdk_sqs::Client,
        input_queue_url: &str,
        worker: &str,
    ) -> Result<NoticeQueue, NoticeError> {
        let name = queue_name(input_queue_url, worker);
        let out = sqs
            .create_queue()
            .queue_name(&name)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::MessageRetentionPeriod,
                RETENTION_SECONDS,
            )
            .tags("edit-worker:worker", worker)
            .send()
            .await
            .map_err(|e| NoticeError {
                op: "create",
                message: format!("{name}: {}", DisplayErrorContext(&e)),
            })?;
        Ok(NoticeQueue {
            sqs,
            url: out.queue_url.unwrap_or_default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Hand every notice to `on_notice` until `shutdown`; then give the queue back, for the
    /// worker to delete (`delete`), unless another live process with this `WORKER_ID` owns
    /// it now (`presence.rs`).
    pub(crate) async fn serve(
        self,
        on_notice: impl Fn(Notice),
        shutdown: CancellationToken,
    ) -> NoticeQueue {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            let receive = self
                .sqs
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(10)
                .send();
            // A notice poll may be abandoned: notices are only hints (see the module's text).
            let received = tokio::select! {
                r = receive => r,
                _ = shutdown.cancelled() => break,
            };
            let messages = match received {
                Ok(out) => {
                    backoff.succeeded();
                    out.messages.unwrap_or_default()
                }
                Err(e) => {
                    tracing::warn!(error = %DisplayErrorContext(&e), "receiving notices failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.failed()) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            };
            for message in messages {
                let body = message.body().unwrap_or_default();
                match serde_json::from_str::<Notice>(body) {
                    Ok(notice) => on_notice(notice),
                    Err(e) => tracing::warn!(error = %e, "ignoring a notice that is not one"),
                }
                if let Some(receipt) = message.receipt_handle() {
                    let _ = self
                        .sqs
                        .delete_message()
                        .queue_url(&self.url)
                        .receipt_handle(receipt)
                        .send()
                        .await;
                }
            }
        }
        self
    }

    pub(crate) async fn delete(self) {
        if let Err(e) = self.sqs.delete_queue().queue_url(&self.url).send().await {
            tracing::warn!(error = %DisplayErrorContext(&e), "could not delete this worker's notice queue");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_valid_and_unique_per_worker() {
        let url = "http://localhost/123/edit-requests";
        let a = queue_name(url, "host-1.example:42");
        assert!(a.starts_with("edit-requests-notices-host-1-example-42-"));
        let long = "w".repeat(200);
        let b = queue_name(url, &long);
        let c = queue_name(url, &format!("{long}x"));
        for name in [&a, &b, &c] {
            assert!(name.len() <= MAX_QUEUE_NAME);
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            );
        }
        assert_ne!(
            b, c,
            "ids that share their first 80 characters still differ"
        );
    }

    #[test]
    fn every_notice_queue_of_an_input_queue_starts_with_its_prefix() {
        for url in [
            "http://localhost/123/edit-requests",
            &format!("http://localhost/123/{}", "q".repeat(79)),
        ] {
            let prefix = queue_prefix(url);
            for worker in ["a", "host-1:42", &"w".repeat(200)] {
                assert!(
                    queue_name(url, worker).starts_with(&prefix),
                    "{url} {worker}"
                );
            }
        }
    }

    #[test]
    fn notices_round_trip() {
        let n = Notice::Newer {
            client_id: "a".into(),
            project_id: "b".into(),
            message_id: "m".into(),
            sent_at_ms: 5,
            from: "w".into(),
            reply_to: Some("q".into()),
        };
        let text = serde_json::to_string(&n).unwrap();
        assert!(text.contains("\"kind\":\"newer\""), "{text}");
        assert_eq!(serde_json::from_str::<Notice>(&text).unwrap(), n);
    }

    /// The counters' `kind` is what the queue carries, so the two never name one notice
    /// differently.
    #[test]
    fn the_counted_kind_is_the_kind_on_the_queue() {
        let released = Notice::Released {
            client_id: "a".into(),
            project_id: "b".into(),
            from: "w".into(),
        };
        let newer = Notice::Newer {
            client_id: "a".into(),
            project_id: "b".into(),
            message_id: "m".into(),
            sent_at_ms: 5,
            from: "v".into(),
            reply_to: None,
        };
        for notice in [released, newer] {
            let text = serde_json::to_string(&notice).unwrap();
            assert!(
                text.contains(&format!("\"kind\":\"{}\"", notice.kind())),
                "{text}"
            );
        }
    }
}
