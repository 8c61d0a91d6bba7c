//! Each worker's presence in the lease store (issue 25): `PREFIX/workers/{WORKER_ID}.json`,
//! `{nonce, startedAtMs, renewedAtMs, notices}`, written at start and renewed every
//! `RENEW_EVERY` with conditional writes.
//!
//! It does two things the leases alone cannot:
//! - **One live process per `WORKER_ID`.** Records, marks and leases name a worker by its id, so
//!   two live processes with one id would take each other's marks for their own and run one
//!   message twice. The nonce is this process's own: a start that finds another nonce renewed
//!   lately watches it for one renewal; renewed meanwhile, the start is refused (a live process
//!   has the id); not renewed, it was a dead process's (a `kill -9` and a restart) and is taken
//!   over. A renewal that finds the record changed under it has met a second process with its
//!   id after all (two starts at once): it says so and the worker shuts down.
//! - **Notice queues of dead workers are found.** A worker killed with `kill -9` never deletes
//!   its notice queue (`notices.rs`). At start, each queue named like a notice queue of this
//!   input queue (SQS's `QueueNamePrefix`), other than ours, is deleted when it is older than
//!   `DEAD_AFTER` and no live presence record names it: by the store and by age, not by
//!   guessing from a name who is alive.

use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::delivery::records::{RecordError, RecordStore, Version, now_ms};

/// How often a live worker renews its presence: one small conditional PUT, whatever the load.
pub const RENEW_EVERY: Duration = Duration::from_secs(20);
/// A presence not renewed for this long is a dead process's (three renewals missed; wall
/// clocks of two hosts compared, so it also allows for their skew).
pub const DEAD_AFTER: Duration = Duration::from_secs(60);
/// Past a renewal, how long a start waits for it to show, for the write in flight and a
/// busy host.
const WATCH_GRACE: Duration = Duration::from_secs(5);

/// The presence record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PresenceRecord {
    /// This process's own random number: whose the record is, among processes with one id.
    nonce: String,
    started_at_ms: u64,
    /// Wall clock of the last renewal; 0 once the worker has left.
    renewed_at_ms: u64,
    /// Its notice queue, kept from deletion while it lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notices: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error(
        "WORKER_ID {worker} is in use by another live process (it renewed its presence in the \
         lease store while this one watched); give each process its own WORKER_ID"
    )]
    InUse { worker: String },
    #[error("presence in the lease store: {0}")]
    Store(#[from] RecordError),
}

fn presence_key(worker: &str) -> String {
    // The notice queue's name rules: only `[A-Za-z0-9_-]`, and unique per id.
    let name = crate::delivery::notices::queue_name("", worker);
    format!("workers/{name}.json")
}

/// This process's presence, claimed.
pub struct Presence {
    store: RecordStore,
    worker: String,
    record: PresenceRecord,
    version: Version,
    /// `RENEW_EVERY` (shorter in tests).
    every: Duration,
}

impl Presence {
    /// Claim `worker`'s presence for this process (see the module's text). `notices`: this
    /// worker's notice queue.
    pub async fn claim(
        store: RecordStore,
        worker: &str,
        notices: Option<String>,
    ) -> Result<Presence, PresenceError> {
        let key = presence_key(worker);
        let (found, mut version) = store.read_typed::<PresenceRecord>(&key).await?;
        if let Some(other) = found
            && other.renewed_at_ms + (DEAD_AFTER.as_millis() as u64) > now_ms()
        {
            // Someone with this id renewed lately: alive (it renews again within RENEW_EVERY)
            // or just killed (it does not).
            tracing::warn!(
                worker,
                "a recent presence with this WORKER_ID is in the lease store; watching it for one renewal"
            );
            tokio::time::sleep(RENEW_EVERY + WATCH_GRACE).await;
            let (again, newer) = store.read_typed::<PresenceRecord>(&key).await?;
            if again.is_some_and(|r| r != other && r.renewed_at_ms != 0) {
                return Err(PresenceError::InUse {
                    worker: worker.to_owned(),
                });
            }
            version = newer;
        }
        let now = now_ms();
        let record = PresenceRecord {
            nonce: format!("{:016x}{:08x}", rand_u64(), std::process::id()),
            started_at_ms: now,
            renewed_at_ms: now,
            notices,
        };
        let text = serde_json::to_string(&record).expect("presence serializes");
        let Some(version) = store.write_document(&key, &text, version).await? else {
            // Another start wrote between our read and our write.
            return Err(PresenceError::InUse {
                worker: worker.to_owned(),
            });
        };
        Ok(Presence {
            store,
            worker: worker.to_owned(),
            record,
            version,
            every: RENEW_EVERY,
        })
    }

    /// Name this worker's notice queue in the record from the next renewal on.
    pub fn set_notices(&mut self, url: String) {
        self.record.notices = Some(url);
    }

    /// Whether the record holds this process's nonce (then its version is taken as ours).
    async fn still_ours(&mut self, key: &str) -> bool {
        match self.store.read_typed::<PresenceRecord>(key).await {
            Ok((Some(found), version)) if found.nonce == self.record.nonce => {
                self.version = version;
                true
            }
            Ok(_) => false,
            // Undecided: the next renewal looks again.
            Err(_) => true,
        }
    }

    /// Renew the presence every `RENEW_EVERY` until `stop`; then mark it left. A renewal that
    /// finds the record changed has met a second live process with this id: `duplicate` is
    /// cancelled (the worker shuts down) and the record is left to that process.
    pub async fn keep(mut self, stop: CancellationToken, duplicate: CancellationToken) {
        let key = presence_key(&self.worker);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.cancelled() => break,
            }
            self.record.renewed_at_ms = now_ms();
            let text = serde_json::to_string(&self.record).expect("presence serializes");
            match self
                .store
                .write_document(&key, &text, self.version.clone())
                .await
            {
                Ok(Some(version)) => self.version = version,
                // Our own write after all (an attempt that landed, retried by the SDK after
                // its timeout, finds its own version gone): the nonce says whose it is.
                Ok(None) if self.still_ours(&key).await => {}
                Ok(None) => {
                    tracing::error!(worker = %self.worker, "another live process has this WORKER_ID (it rewrote this worker's presence in the lease store); shutting down: give each process its own WORKER_ID");
                    duplicate.cancel();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew this worker's presence; trying again")
                }
            }
        }
        // Left: a restart with this id starts at once, and the notice queue (deleted by its
        // owner on a graceful stop) is nobody's.
        self.record.renewed_at_ms = 0;
        let text = serde_json::to_string(&self.record).expect("presence serializes");
        if let Err(e) = self.store.write_document(&key, &text, self.version).await {
            tracing::warn!(error = %e, "could not mark this worker's presence left; it lapses by itself");
        }
    }
}

/// A random number without a dependency: the std hasher is seeded randomly per process.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

/// Delete the notice queues of dead workers beside `input_queue_url` (see the module's text):
/// every queue named like a notice queue of it, except `own`, older than `DEAD_AFTER`, whose
/// worker (its `edit-worker:worker` tag) has no live presence. Returns how many went.
pub async fn sweep_notice_queues(
    sqs: &aws_sdk_sqs::Client,
    store: &RecordStore,
    input_queue_url: &str,
    own: Option<&str>,
) -> Result<usize, String> {
    use aws_sdk_sqs::types::QueueAttributeName;
    let prefix = crate::delivery::notices::queue_prefix(input_queue_url);
    let mut removed = 0;
    let mut next: Option<String> = None;
    loop {
        let page = sqs
            .list_queues()
            .queue_name_prefix(&prefix)
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| DisplayErrorContext(&e).to_string())?;
        for url in page.queue_urls() {
            if Some(url.as_str()) == own {
                continue;
            }
            let tags = match sqs.list_queue_tags().queue_url(url).send().await {
                Ok(out) => out.tags.unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(queue = %url, error = %DisplayErrorContext(&e), "notice queue gone or unreadable");
                    continue;
                }
            };
            // Not one of ours (no owner tag): left alone.
            let Some(worker) = tags.get("edit-worker:worker") else {
                continue;
            };
            let created_ms = sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::CreatedTimestamp)
                .send()
                .await
                .ok()
                .and_then(|out| {
                    out.attributes?
                        .get(&QueueAttributeName::CreatedTimestamp)?
                        // Whole seconds from SQS; some servers add a fraction.
                        .parse::<f64>()
                        .ok()
                })
                .map(|seconds| (seconds * 1000.0) as u64);
            let Some(created_ms) = created_ms else {
                continue;
            };
            if created_ms + (DEAD_AFTER.as_millis() as u64) > now_ms() {
                continue;
            }
            let (presence, _) = match store
                .read_typed::<PresenceRecord>(&presence_key(worker))
                .await
            {
                Ok(found) => found,
                Err(e) => return Err(e.to_string()),
            };
            // By the queue's name: SQS writes one queue's URL in more than one way.
            let name = |u: &str| u.rsplit('/').next().unwrap_or_default().to_owned();
            let alive = presence.is_some_and(|p| {
                p.renewed_at_ms + (DEAD_AFTER.as_millis() as u64) > now_ms()
                    && p.notices.as_deref().map(name) == Some(name(url))
            });
            if alive {
                continue;
            }
            match sqs.delete_queue().queue_url(url).send().await {
                Ok(_) => {
                    tracing::info!(queue = %url, %worker, "deleted the notice queue of a worker that is gone");
                    removed += 1;
                }
                Err(e) => {
                    tracing::warn!(queue = %url, error = %DisplayErrorContext(&e), "could not delete a dead worker's notice queue")
                }
            }
        }
        match page.next_token {
            Some(token) => next = Some(token),
            None => return Ok(removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_live_process_with_the_same_id_is_detected_at_its_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::local(dir.path(), "w");
        let mut first = Presence::claim(store.clone(), "w", None).await.unwrap();
        first.every = Duration::from_millis(20);
        // A second process claims (a start that wrote between the first's read and write, or
        // one that found the first's record stale): the first one's next renewal sees it.
        let mut record = first.record.clone();
        record.nonce = "other".into();
        let key = presence_key("w");
        store
            .write_document(&key, &serde_json::to_string(&record).unwrap(), Version::Any)
            .await
            .unwrap();
        let (stop, duplicate) = (CancellationToken::new(), CancellationToken::new());
        let kept = tokio::spawn(first.keep(stop, duplicate.clone()));
        // Generous: one renewal is 20 ms.
        tokio::time::timeout(Duration::from_secs(10), duplicate.cancelled())
            .await
            .expect("the duplicate is found at the next renewal");
        kept.await.unwrap();
    }

    /// A renewal that lands but whose answer is lost is retried by the SDK, and the retry finds
    /// its own version gone: not a second process (the nonce is still ours).
    #[tokio::test]
    async fn our_own_write_found_by_a_retry_is_not_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::local(dir.path(), "w");
        let mut first = Presence::claim(store.clone(), "w", None).await.unwrap();
        first.every = Duration::from_millis(20);
        let mut landed = first.record.clone();
        landed.renewed_at_ms += 1;
        store
            .write_document(
                &presence_key("w"),
                &serde_json::to_string(&landed).unwrap(),
                Version::Any,
            )
            .await
            .unwrap();
        let (stop, duplicate) = (CancellationToken::new(), CancellationToken::new());
        let kept = tokio::spawn(first.keep(stop.clone(), duplicate.clone()));
        // Several renewals (20 ms each) past the one that meets the changed version.
        let _ = tokio::time::timeout(Duration::from_millis(300), duplicate.cancelled()).await;
        stop.cancel();
        kept.await.unwrap();
        assert!(
            !duplicate.is_cancelled(),
            "its own write taken for another process"
        );
        let (left, _) = store
            .read_typed::<PresenceRecord>(&presence_key("w"))
            .await
            .unwrap();
        assert_eq!(left.unwrap().renewed_at_ms, 0, "marked left at the stop");
    }

    #[test]
    fn presence_keys_are_safe_and_unique_per_id() {
        assert_ne!(presence_key("a/b"), presence_key("a-b"));
        assert!(presence_key("../x").starts_with("workers/"));
        assert!(!presence_key("../x").contains(".."));
    }
}
