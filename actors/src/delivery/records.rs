//! Records that make each message take effect once, whatever SQS does (redelivery, copies,
//! reordering, deletes that do not take), kept where they outlive the process:
//!
//! - **the outcome of each message** (the idempotency pattern of Powertools for AWS Lambda): a
//!   `started` mark with an expiry when a message is accepted, then its terminal event, written
//!   *before* the event is reported. A message whose outcome is recorded is deleted when it comes
//!   back, and its recorded event is sent again, byte for byte: never a second, different one.
//! - **how far each thread has got**: the newest producer send time (`SentTimestamp`) of the
//!   thread's messages that have started to run. A message sent before that mark comes too
//!   late: its request is superseded, never applied on top of newer work.
//!
//! Two engines: a folder on the worker's disk (`{WORKSPACE_ROOT}/.records`, the default for a
//! worker that is alone) or an S3 prefix with conditional writes (`LEASE_STORE=s3://BUCKET/PREFIX`),
//! which every worker of a deployment reads.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use serde::{Deserialize, Serialize};

use crate::config::StoreLocation;
use crate::contract::message::WorkspaceKey;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record store {op}: {message}")]
    Store { op: &'static str, message: String },
    #[error("record {key} is not readable: {message}")]
    Corrupt { key: String, message: String },
}

/// A message's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
enum OutcomeRecord {
    /// Accepted by `worker`, who has it in hand until `expires_at_ms` (a worker that died
    /// leaves the mark behind; after the expiry it counts for nothing).
    #[serde(rename_all = "camelCase")]
    Started { worker: String, expires_at_ms: u64 },
    /// Ended: the terminal event as it was reported (JSON text).
    #[serde(rename_all = "camelCase")]
    Ended { event: String },
}

/// What `begin` found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Begin {
    /// Nothing recorded, or only a stale mark: the message is ours to run.
    Fresh,
    /// Not looked up: a first delivery received a moment ago, which nobody else can have in
    /// hand or have ended (`intake::decide`). Ours to run; marked at its first renewal.
    Unmarked,
    /// The message already ended; this is its terminal event, to be sent again as it was.
    Ended(String),
    /// Another worker accepted it a moment ago and its mark has not expired.
    HeldElsewhere { worker: String },
}

/// A thread's one document in the records (`threads/{client}/{project}/{thread}.json`): how far
/// the thread has got (its mark), the agent's conversation, and the lease token of the holder
/// that wrote it. One document, so that a batch reads it once and writes it once (issue 25: the
/// mark and the conversation were two documents, read and written apart), and every write is
/// fenced: it is conditional on the version read, and refused when the document carries a
/// higher token than the writer's lease, so a holder that lost its lease never overwrites the
/// next holder's record. A mark written before this document existed (`{newestSentMs}`) reads
/// as a document without a conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ThreadDoc {
    /// The newest send time among the thread's messages that started to run: a message sent
    /// before it comes too late (superseded).
    #[serde(default)]
    pub newest_sent_ms: u64,
    /// The lease token of the holder that wrote the document (0: a worker alone).
    #[serde(default)]
    pub lease_token: u64,
    /// The agent's conversation for `--resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ThreadRecord>,
}

/// What we remember of a thread's conversation (its part of the thread's document; what a
/// run makes of it is `threads.rs`'s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ThreadRecord {
    /// The agent's session id, for `--resume`.
    pub session_id: String,
    /// The session's cumulative cost after the last run (the agent reports a running total).
    pub total_cost_usd: f64,
    /// The agent has written this conversation (a run reported, or left its file). A
    /// conversation recorded at a run's start but stopped before the agent wrote anything was
    /// never there to lose: not finding it is no restart. Records from before this field were
    /// written after runs, hence the default.
    #[serde(default = "written_by_default")]
    pub written: bool,
    /// Where the shared copy of the conversation file is (shared store only): a key of the
    /// lease token that wrote it (`conversations/{client}/{project}/{session}.{token}.jsonl`),
    /// so a holder that lost its lease never overwrites the next holder's copy. Absent: the
    /// key of the records before issue 25 (`{session}.jsonl`), or no copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The MD5 of that copy: an unchanged file is not uploaded again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_md5: Option<String>,
}

impl ThreadRecord {
    /// A conversation of `session_id` with nothing shared yet.
    pub(crate) fn new(session_id: &str, total_cost_usd: f64, written: bool) -> ThreadRecord {
        ThreadRecord {
            session_id: session_id.to_owned(),
            total_cost_usd,
            written,
            file: None,
            file_md5: None,
        }
    }
}

fn written_by_default() -> bool {
    true
}

/// A thread's document as a batch read it, with the version its next write expects.
pub(crate) struct ThreadState {
    pub doc: ThreadDoc,
    /// Whether the document existed when read (or was written since).
    pub existed: bool,
    version: Version,
    record_key: String,
}

/// Why a fenced write was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FencedWriteError {
    #[error(transparent)]
    LeaseLost(#[from] crate::delivery::lease_check::LeaseLost),
    /// The document was written under a newer lease: another worker holds the workspace now.
    #[error("{key} was written under lease token {found}, newer than ours ({ours})")]
    Fenced { key: String, found: u64, ours: u64 },
    #[error(transparent)]
    Store(#[from] RecordError),
}

/// The records, on one engine.
#[derive(Clone)]
pub struct RecordStore {
    engine: Engine,
    /// This worker's name in `started` marks.
    worker: String,
    /// Requests made, shared by every clone: what the records cost per message (logged when
    /// the worker stops, read by the benchmarks).
    calls: std::sync::Arc<CallCounts>,
    /// What this worker last wrote or read of each record it is working with: the version a
    /// conditional write can expect without reading first (issue 25: a message's `begin` and
    /// `end` each read before they wrote). A stale entry costs one refused write and a read;
    /// it never lets a write through, since S3 checks the version.
    known: std::sync::Arc<Known>,
}

/// Versions (and thread documents) this worker knows, shared by every clone of the store.
#[derive(Default)]
struct Known {
    versions: std::sync::Mutex<std::collections::HashMap<String, Version>>,
    /// Thread documents as this worker last wrote or read them, by record key.
    threads: std::sync::Mutex<std::collections::HashMap<String, (ThreadDoc, Version)>>,
}

/// Past this many remembered records the memory is cleared (it only saves requests).
const KNOWN_MAX: usize = 20_000;

impl Known {
    fn version(&self, key: &str) -> Option<Version> {
        self.versions.lock().expect("known").get(key).cloned()
    }

    fn remember(&self, key: &str, version: Version) {
        let mut versions = self.versions.lock().expect("known");
        if versions.len() >= KNOWN_MAX {
            versions.clear();
        }
        versions.insert(key.to_owned(), version);
    }

    fn forget(&self, key: &str) {
        self.versions.lock().expect("known").remove(key);
    }

    fn thread(&self, key: &str) -> Option<(ThreadDoc, Version)> {
        self.threads.lock().expect("known").get(key).cloned()
    }

    fn remember_thread(&self, key: &str, doc: &ThreadDoc, version: &Version) {
        let mut threads = self.threads.lock().expect("known");
        if threads.len() >= KNOWN_MAX {
            threads.clear();
        }
        threads.insert(key.to_owned(), (doc.clone(), version.clone()));
    }

    fn forget_thread(&self, key: &str) {
        self.threads.lock().expect("known").remove(key);
    }
}

/// Reads and writes made by a record store.
#[derive(Debug, Default)]
pub(crate) struct CallCounts {
    pub reads: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
enum Engine {
    Local(PathBuf),
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
    },
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A message id as a record key. SQS ids are UUIDs; anything else is hex-encoded, so a key
/// never holds a separator or `..`.
fn message_key(message_id: &str) -> String {
    let plain = !message_id.is_empty()
        && message_id.len() <= 128
        && message_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("outcomes/{message_id}.json")
    } else {
        let hex: String = message_id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("outcomes/x{hex}.json")
    }
}

/// Ids of a validated request: DNS labels and ref-safe ids, so they make a safe key.
fn thread_key(key: &WorkspaceKey, thread_id: &str) -> String {
    format!(
        "threads/{}/{}/{thread_id}.json",
        key.client_id, key.project_id
    )
}

impl RecordStore {
    /// A store in a local folder (tests).
    #[cfg(test)]
    pub(crate) fn local(dir: &Path, worker: &str) -> RecordStore {
        RecordStore {
            engine: Engine::Local(dir.to_owned()),
            worker: worker.to_owned(),
            calls: Default::default(),
            known: Default::default(),
        }
    }

    pub fn new(location: &StoreLocation, s3: &aws_sdk_s3::Client, worker: &str) -> RecordStore {
        let engine = match location {
            StoreLocation::Local(dir) => Engine::Local(dir.clone()),
            StoreLocation::S3 { bucket, prefix } => Engine::S3 {
                client: s3.clone(),
                bucket: bucket.clone(),
                prefix: prefix.clone(),
            },
        };
        RecordStore {
            engine,
            worker: worker.to_owned(),
            calls: Default::default(),
            known: Default::default(),
        }
    }

    /// Take a message in hand: mark it `started` (for `hold`) unless it already ended or another
    /// worker holds a live mark.
    pub(crate) async fn begin(
        &self,
        message_id: &str,
        hold: Duration,
    ) -> Result<Begin, RecordError> {
        let key = message_key(message_id);
        let mine = OutcomeRecord::Started {
            worker: self.worker.clone(),
            expires_at_ms: now_ms() + hold.as_millis() as u64,
        };
        let text = serde_json::to_string(&mine).expect("records serialize");
        // First without reading: a new message has no record (create it), and one this worker
        // marked has the version it wrote (refresh it). Refused: read, and decide as below.
        let expected = self.known.version(&key).unwrap_or(Version::Absent);
        if let Some(version) = self.write_versioned(&key, &text, expected).await? {
            self.known.remember(&key, version);
            return Ok(Begin::Fresh);
        }
        // A conditional write per attempt; a lost race reads again and decides again.
        for _ in 0..4 {
            let (found, version) = self.read_typed::<OutcomeRecord>(&key).await?;
            match found {
                Some(OutcomeRecord::Ended { event }) => return Ok(Begin::Ended(event)),
                Some(OutcomeRecord::Started {
                    worker,
                    expires_at_ms,
                }) if worker != self.worker && expires_at_ms > now_ms() => {
                    return Ok(Begin::HeldElsewhere { worker });
                }
                _ => {}
            }
            if let Some(version) = self.write_versioned(&key, &text, version).await? {
                self.known.remember(&key, version);
                return Ok(Begin::Fresh);
            }
        }
        Err(RecordError::Store {
            op: "begin",
            message: format!("{key} kept changing under us"),
        })
    }

    /// Let go of a message given back to the queue (shutdown, a lost lease, a retry): our
    /// `started` mark expires now, so whichever worker receives it next starts it at once
    /// instead of leaving it for another visibility timeout. An ended record stays as it is.
    pub(crate) async fn give_up(&self, message_id: &str) -> Result<(), RecordError> {
        let key = message_key(message_id);
        let expired = OutcomeRecord::Started {
            worker: self.worker.clone(),
            expires_at_ms: 0,
        };
        if let Some(version) = self.known.version(&key) {
            // Still the mark this worker wrote: let go of it without reading it first.
            let text = serde_json::to_string(&expired).expect("records serialize");
            if self.write_versioned(&key, &text, version).await?.is_some() {
                self.known.forget(&key);
                return Ok(());
            }
        }
        self.known.forget(&key);
        let Some((text, version)) = self.read(&key).await? else {
            return Ok(());
        };
        if let Ok(OutcomeRecord::Started { worker, .. }) = serde_json::from_str(&text)
            && worker == self.worker
        {
            let expired = OutcomeRecord::Started {
                worker,
                expires_at_ms: 0,
            };
            let text = serde_json::to_string(&expired).expect("records serialize");
            // Lost to a newer write (the message ended, or another worker took it): fine.
            self.write(&key, &text, version).await?;
        }
        Ok(())
    }

    /// Record the message's terminal event, written before the event is reported. The first
    /// ending wins: when the message already ended (another worker ran a copy of it that SQS
    /// handed out while this one held it, and ended first), nothing is written and that
    /// recorded event is returned, to be reported instead, so a message never ends two ways.
    pub(crate) async fn end(
        &self,
        message_id: &str,
        event_json: &str,
    ) -> Result<Option<String>, RecordError> {
        let key = message_key(message_id);
        let record = OutcomeRecord::Ended {
            event: event_json.to_owned(),
        };
        let text = serde_json::to_string(&record).expect("records serialize");
        // Without reading first: over the `started` mark this worker wrote, or, for a message
        // never marked (a first delivery that ended before its first refresh, see
        // `intake::decide`), as a new record. Refused: someone wrote first; read and decide.
        let expected = self.known.version(&key).unwrap_or(Version::Absent);
        self.known.forget(&key);
        if self.write_versioned(&key, &text, expected).await?.is_some() {
            return Ok(None);
        }
        for _ in 0..4 {
            let version = match self.read(&key).await? {
                None => Version::Absent,
                Some((found, version)) => {
                    if let Ok(OutcomeRecord::Ended { event }) = serde_json::from_str(&found) {
                        return Ok(Some(event));
                    }
                    version
                }
            };
            if self.write(&key, &text, version).await? {
                return Ok(None);
            }
        }
        Err(RecordError::Store {
            op: "end",
            message: format!("{key} kept changing under us"),
        })
    }

    /// The thread's document (an empty one when there is none yet).
    ///
    /// Under a shared lease with `token`, a document this worker last wrote or read with that
    /// same token is taken from memory: only the holder of a token writes under it, and the
    /// token changes whenever the workspace changes hands, so nobody else can have changed it
    /// since (a stale entry would still only cost a refused conditional write).
    pub(crate) async fn read_thread(
        &self,
        key: &WorkspaceKey,
        thread_id: &str,
        token: u64,
    ) -> Result<ThreadState, RecordError> {
        let record_key = thread_key(key, thread_id);
        if token > 0
            && let Some((doc, version)) = self.known.thread(&record_key)
            && doc.lease_token == token
        {
            return Ok(ThreadState {
                doc,
                existed: true,
                version,
                record_key,
            });
        }
        let (doc, version) = self.read_typed::<ThreadDoc>(&record_key).await?;
        if let Some(doc) = &doc {
            self.known.remember_thread(&record_key, doc, &version);
        }
        Ok(ThreadState {
            existed: doc.is_some(),
            doc: doc.unwrap_or_default(),
            version,
            record_key,
        })
    }

    /// Change the thread's document by `update`, fenced by `fence`: only while the lease holds
    /// (by this worker's clock), only over a document of this lease's token or an older one,
    /// and conditional on the version read (one request when nobody else wrote meanwhile; a
    /// lost race reads again and decides again). Nothing is written when `update` changes
    /// nothing.
    pub(crate) async fn write_thread(
        &self,
        state: &mut ThreadState,
        fence: &crate::delivery::lease_check::LeaseCheck,
        update: impl Fn(&mut ThreadDoc),
    ) -> Result<(), FencedWriteError> {
        let ours = fence.token();
        for _ in 0..4 {
            fence.check()?;
            if state.doc.lease_token > ours {
                return Err(FencedWriteError::Fenced {
                    key: state.record_key.clone(),
                    found: state.doc.lease_token,
                    ours,
                });
            }
            let mut next = state.doc.clone();
            update(&mut next);
            // Nothing new to say (a mark already as far, the same conversation): no write, not
            // even to put our token on it.
            if state.existed && next == state.doc {
                return Ok(());
            }
            next.lease_token = ours;
            let text = serde_json::to_string(&next).expect("records serialize");
            let written = self
                .write_versioned(&state.record_key, &text, state.version.clone())
                .await;
            if written.is_err() {
                // Whether it landed is unknown: read it next time.
                self.known.forget_thread(&state.record_key);
            }
            match written? {
                Some(version) => {
                    self.known
                        .remember_thread(&state.record_key, &next, &version);
                    state.doc = next;
                    state.version = version;
                    state.existed = true;
                    return Ok(());
                }
                None => {
                    self.known.forget_thread(&state.record_key);
                    let (doc, version) = self.read_typed::<ThreadDoc>(&state.record_key).await?;
                    state.existed = doc.is_some();
                    state.doc = doc.unwrap_or_default();
                    state.version = version;
                }
            }
        }
        Err(FencedWriteError::Store(RecordError::Store {
            op: "write thread",
            message: format!("{} kept changing under us", state.record_key),
        }))
    }

    /// Raise the thread's mark to `sent_ms` (never lower it: a mark only moves forward),
    /// fenced as every write of a thread's document is.
    pub(crate) async fn raise_thread_mark(
        &self,
        key: &WorkspaceKey,
        thread_id: &str,
        sent_ms: u64,
        fence: &crate::delivery::lease_check::LeaseCheck,
    ) -> Result<(), FencedWriteError> {
        let mut state = self.read_thread(key, thread_id, fence.token()).await?;
        self.write_thread(&mut state, fence, |doc| {
            doc.newest_sent_ms = doc.newest_sent_ms.max(sent_ms)
        })
        .await
    }

    /// Forget local outcome records older than `age` (SQS keeps a message 14 days at most, so
    /// an older record can no longer meet a copy of its message). S3 prefixes are expired by a
    /// lifecycle rule instead (README).
    pub(crate) async fn forget_older_than(&self, age: Duration) -> Result<usize, RecordError> {
        let Engine::Local(root) = &self.engine else {
            return Ok(0);
        };
        let dir = root.join("outcomes");
        let cutoff = SystemTime::now() - age;
        tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return 0;
            };
            for entry in entries.flatten() {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < cutoff);
                if old && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
            removed
        })
        .await
        .map_err(|e| RecordError::Store {
            op: "forget old records",
            message: e.to_string(),
        })
    }

    /// (reads, writes) made so far by this store and its clones.
    pub(crate) fn calls(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.calls.reads.load(Relaxed),
            self.calls.writes.load(Relaxed),
        )
    }

    /// Whether every worker of the deployment reads these records (an S3 prefix), or only this
    /// one (a local folder).
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.engine, Engine::S3 { .. })
    }

    /// A document of the store (leases, conversations) and its version, if it exists.
    pub(crate) async fn read_document(
        &self,
        key: &str,
    ) -> Result<Option<(String, Version)>, RecordError> {
        self.read(key).await
    }

    /// A JSON record, parsed, with the version a conditional write expects (`Absent` when
    /// there is none). A record that does not parse is `Corrupt`, never taken for absent.
    pub(crate) async fn read_typed<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<(Option<T>, Version), RecordError> {
        match self.read(key).await? {
            None => Ok((None, Version::Absent)),
            Some((text, version)) => {
                let record = serde_json::from_str(&text).map_err(|e| RecordError::Corrupt {
                    key: key.to_owned(),
                    message: e.to_string(),
                })?;
                Ok((Some(record), version))
            }
        }
    }

    /// Write a document if it is still at `version`; its new version, or `None` when someone
    /// wrote first.
    pub(crate) async fn write_document(
        &self,
        key: &str,
        text: &str,
        version: Version,
    ) -> Result<Option<Version>, RecordError> {
        self.write_versioned(key, text, version).await
    }

    /// Remove a document nothing names any more (a conversation copy replaced by a newer
    /// holder's). Best effort: a copy left behind costs storage, nothing else.
    pub(crate) async fn delete_document(&self, key: &str) -> Result<(), RecordError> {
        self.calls
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::telemetry::metrics::record_call("write");
        let failed = |message: String| RecordError::Store {
            op: "delete",
            message: format!("{key}: {message}"),
        };
        match &self.engine {
            Engine::Local(root) => match tokio::fs::remove_file(root.join(key)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(failed(e.to_string())),
                _ => Ok(()),
            },
            Engine::S3 {
                client,
                bucket,
                prefix,
            } => client
                .delete_object()
                .bucket(bucket)
                .key(format!("{prefix}{key}"))
                .send()
                .await
                .map(drop)
                .map_err(|e| failed(DisplayErrorContext(&e).to_string())),
        }
    }

    /// Prove the store enforces conditional writes (`edit-worker doctor`): create a probe
    /// record, change it by its version, see a stale create and a stale change refused, and
    /// remove it. A store that ignores the conditions cannot keep leases.
    pub async fn probe_conditional_writes(&self) -> Result<String, RecordError> {
        let key = format!(
            "doctor/{}.json",
            message_key(&self.worker)
                .trim_start_matches("outcomes/")
                .trim_end_matches(".json")
        );
        let fail = |message: &str| RecordError::Store {
            op: "probe",
            message: format!("{key}: {message}"),
        };
        let first = self
            .read(&key)
            .await?
            .map(|(_, v)| v)
            .unwrap_or(Version::Absent);
        let created = self
            .write_versioned(&key, "{\"probe\":1}", first)
            .await?
            .ok_or_else(|| fail("the probe record changed under us; try again"))?;
        let changed = self
            .write_versioned(&key, "{\"probe\":2}", created.clone())
            .await?
            .ok_or_else(|| fail("a write with the current version was refused"))?;
        if self
            .write_versioned(&key, "{\"probe\":3}", Version::Absent)
            .await?
            .is_some()
        {
            return Err(fail(
                "a create over an existing record was accepted: If-None-Match is not enforced",
            ));
        }
        if self
            .write_versioned(&key, "{\"probe\":4}", created)
            .await?
            .is_some()
        {
            return Err(fail(
                "a write with a stale version was accepted: If-Match is not enforced",
            ));
        }
        drop(changed);
        match &self.engine {
            Engine::Local(root) => {
                let _ = tokio::fs::remove_file(root.join(&key)).await;
            }
            Engine::S3 {
                client,
                bucket,
                prefix,
            } => {
                let _ = client
                    .delete_object()
                    .bucket(bucket)
                    .key(format!("{prefix}{key}"))
                    .send()
                    .await;
            }
        }
        Ok("conditional writes enforced".into())
    }

    /// The record's text and its version (for a conditional write), if it exists.
    async fn read(&self, key: &str) -> Result<Option<(String, Version)>, RecordError> {
        self.calls
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::telemetry::metrics::record_call("read");
        match &self.engine {
            Engine::Local(root) => match tokio::fs::read_to_string(root.join(key)).await {
                Ok(text) => Ok(Some((text.clone(), Version::Text(text)))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(RecordError::Store {
                    op: "read",
                    message: format!("{key}: {e}"),
                }),
            },
            Engine::S3 {
                client,
                bucket,
                prefix,
            } => {
                let got = client
                    .get_object()
                    .bucket(bucket)
                    .key(format!("{prefix}{key}"))
                    .send()
                    .await;
                match got {
                    Ok(object) => {
                        let etag = object.e_tag().unwrap_or_default().to_owned();
                        let bytes =
                            object
                                .body
                                .collect()
                                .await
                                .map_err(|e| RecordError::Store {
                                    op: "read",
                                    message: format!("{key}: {e}"),
                                })?;
                        let text = String::from_utf8_lossy(&bytes.into_bytes()).into_owned();
                        Ok(Some((text, Version::ETag(etag))))
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(RecordError::Store {
                        op: "read",
                        message: format!("{key}: {}", DisplayErrorContext(&e)),
                    }),
                }
            }
        }
    }

    /// Write `text` if the record is still at `version`; false when someone wrote first.
    async fn write(&self, key: &str, text: &str, version: Version) -> Result<bool, RecordError> {
        Ok(self.write_versioned(key, text, version).await?.is_some())
    }

    /// Write `text` if the record is still at `version`: its new version, or `None` when
    /// someone wrote first.
    async fn write_versioned(
        &self,
        key: &str,
        text: &str,
        version: Version,
    ) -> Result<Option<Version>, RecordError> {
        self.calls
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::telemetry::metrics::record_call("write");
        match &self.engine {
            Engine::Local(root) => {
                let path = root.join(key);
                let text = text.to_owned();
                let written = text.clone();
                let done = tokio::task::spawn_blocking(move || write_local(&path, &text, version))
                    .await
                    .map_err(|e| RecordError::Store {
                        op: "write",
                        message: e.to_string(),
                    })??;
                Ok(done.then_some(Version::Text(written)))
            }
            Engine::S3 {
                client,
                bucket,
                prefix,
            } => {
                let mut put = client
                    .put_object()
                    .bucket(bucket)
                    .key(format!("{prefix}{key}"))
                    .content_type("application/json")
                    .body(text.as_bytes().to_vec().into());
                put = match version {
                    Version::Absent => put.if_none_match("*"),
                    Version::ETag(etag) => put.if_match(etag),
                    Version::Any | Version::Text(_) => put,
                };
                match put.send().await {
                    Ok(out) => Ok(Some(match out.e_tag() {
                        Some(etag) => Version::ETag(etag.to_owned()),
                        None => Version::Any,
                    })),
                    Err(e) => {
                        let status = e.raw_response().map(|r| r.status().as_u16());
                        let code = e.as_service_error().and_then(|s| s.code());
                        // 412: the condition failed; 409: a concurrent conditional write won.
                        if matches!(status, Some(412 | 409))
                            || matches!(
                                code,
                                Some("PreconditionFailed" | "ConditionalRequestConflict")
                            )
                        {
                            Ok(None)
                        } else {
                            Err(RecordError::Store {
                                op: "write",
                                message: format!("{key}: {}", DisplayErrorContext(&e)),
                            })
                        }
                    }
                }
            }
        }
    }
}

/// What a conditional write expects to find.
#[derive(Debug, Clone)]
pub(crate) enum Version {
    /// No record yet.
    Absent,
    /// An S3 object with this ETag.
    ETag(String),
    /// A local file with this content.
    Text(String),
    /// Whatever is there.
    Any,
}

/// A local conditional write: the record is replaced atomically (temp file + rename) if its
/// content is still what was read. One worker owns the folder, and its writes of one record
/// come from one place at a time, so compare-then-rename is enough here; shared storage goes
/// through S3's conditional writes instead.
fn write_local(path: &Path, text: &str, version: Version) -> Result<bool, RecordError> {
    let err = |e: std::io::Error| RecordError::Store {
        op: "write",
        message: format!("{}: {e}", path.display()),
    };
    let current = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(e)),
    };
    let expected = match (&version, &current) {
        (Version::Any, _) => true,
        (Version::Absent, None) => true,
        (Version::Text(t), Some(c)) => t == c,
        _ => false,
    };
    if !expected {
        return Ok(false);
    }
    let dir = path.parent().expect("records live in a folder");
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> WorkspaceKey {
        WorkspaceKey {
            client_id: "a".into(),
            project_id: "b".into(),
        }
    }

    #[test]
    fn locations_parse() {
        assert_eq!(
            StoreLocation::parse("s3://bucket/some/prefix/").unwrap(),
            StoreLocation::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix/".into()
            }
        );
        assert_eq!(
            StoreLocation::parse("s3://bucket").unwrap(),
            StoreLocation::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        assert!(StoreLocation::parse("s3:///x").is_err());
        assert!(StoreLocation::parse("dynamodb://t").is_err());
        assert!(StoreLocation::parse("/tmp/x").is_err());
    }

    #[test]
    fn odd_message_ids_make_safe_keys() {
        assert_eq!(message_key("abc-1"), "outcomes/abc-1.json");
        assert_eq!(message_key("../x"), "outcomes/x2e2e2f78.json");
        assert_eq!(message_key(""), "outcomes/x.json");
    }

    #[tokio::test]
    async fn a_message_begins_once_and_its_ending_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::local(dir.path(), "w1");
        let hold = Duration::from_secs(60);
        assert_eq!(store.begin("m1", hold).await.unwrap(), Begin::Fresh);
        // The same worker may take its own message again (a retry after a passing failure).
        assert_eq!(store.begin("m1", hold).await.unwrap(), Begin::Fresh);
        let other = RecordStore::local(dir.path(), "w2");
        assert_eq!(
            other.begin("m1", hold).await.unwrap(),
            Begin::HeldElsewhere {
                worker: "w1".into()
            }
        );
        // Given back to the queue: the next worker may start it at once.
        store.give_up("m1").await.unwrap();
        assert_eq!(other.begin("m1", hold).await.unwrap(), Begin::Fresh);
        assert_eq!(
            store.end("m1", "{\"type\":\"completed\"}").await.unwrap(),
            None
        );
        // A second, different ending (a copy run elsewhere) does not replace the first.
        assert_eq!(
            other.end("m1", "{\"type\":\"failed\"}").await.unwrap(),
            Some("{\"type\":\"completed\"}".into())
        );
        for s in [&store, &other] {
            assert_eq!(
                s.begin("m1", hold).await.unwrap(),
                Begin::Ended("{\"type\":\"completed\"}".into())
            );
        }
    }

    /// A first delivery is ended without ever having been marked (`intake::decide`): its
    /// ending is one write, a create that needs no read, and it still never replaces an
    /// ending or overwrites another worker's mark unread.
    #[tokio::test]
    async fn an_unmarked_message_ends_with_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::local(dir.path(), "w1");
        assert_eq!(
            store.end("m1", "{\"type\":\"completed\"}").await.unwrap(),
            None
        );
        assert_eq!(
            store.calls(),
            (0, 1),
            "(reads, writes) of an unmarked ending"
        );
        // Another worker marked it meanwhile (a copy): read, and the first ending still wins.
        let other = RecordStore::local(dir.path(), "w2");
        assert_eq!(
            other.begin("m2", Duration::from_secs(60)).await.unwrap(),
            Begin::Fresh
        );
        assert_eq!(
            store.end("m2", "{\"type\":\"completed\"}").await.unwrap(),
            None
        );
        assert_eq!(
            other.end("m2", "{\"type\":\"failed\"}").await.unwrap(),
            Some("{\"type\":\"completed\"}".into())
        );
    }

    #[tokio::test]
    async fn a_dead_workers_mark_expires() {
        let dir = tempfile::tempdir().unwrap();
        let gone = RecordStore::local(dir.path(), "gone");
        assert_eq!(gone.begin("m", Duration::ZERO).await.unwrap(), Begin::Fresh);
        let next = RecordStore::local(dir.path(), "next");
        assert_eq!(
            next.begin("m", Duration::from_secs(60)).await.unwrap(),
            Begin::Fresh
        );
    }

    #[tokio::test]
    async fn thread_marks_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::local(dir.path(), "w");
        let alone = crate::delivery::lease_check::LeaseCheck::unfenced("a/b");
        assert_eq!(
            store
                .read_thread(&key(), "t", 0)
                .await
                .unwrap()
                .doc
                .newest_sent_ms,
            0
        );
        store
            .raise_thread_mark(&key(), "t", 20, &alone)
            .await
            .unwrap();
        store
            .raise_thread_mark(&key(), "t", 10, &alone)
            .await
            .unwrap();
        assert_eq!(
            store
                .read_thread(&key(), "t", 0)
                .await
                .unwrap()
                .doc
                .newest_sent_ms,
            20
        );
        // A mark of the old shape reads as a document without a conversation.
        std::fs::write(
            dir.path().join("threads/a/b/u.json"),
            r#"{"newestSentMs":7}"#,
        )
        .unwrap();
        let old = store.read_thread(&key(), "u", 0).await.unwrap();
        assert!(old.existed);
        assert_eq!((old.doc.newest_sent_ms, old.doc.lease_token), (7, 0));
    }

    #[tokio::test]
    async fn a_stale_holder_never_overwrites_the_next_holders_thread_document() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::local(dir.path(), "w");
        let (old_lost, new_lost) = (Default::default(), Default::default());
        let old = crate::delivery::lease_check::LeaseCheck::with_token(1, old_lost);
        let new = crate::delivery::lease_check::LeaseCheck::with_token(2, new_lost);
        // The old holder read the document before it was paused.
        let mut stale = store.read_thread(&key(), "t", 0).await.unwrap();
        let mut fresh = store.read_thread(&key(), "t", 0).await.unwrap();
        store
            .write_thread(&mut fresh, &new, |d| d.newest_sent_ms = 5)
            .await
            .unwrap();
        // Resumed, its write meets the newer document: refused, whatever its version said.
        let refused = store
            .write_thread(&mut stale, &old, |d| d.newest_sent_ms = 9)
            .await;
        assert!(
            matches!(
                refused,
                Err(FencedWriteError::Fenced {
                    found: 2,
                    ours: 1,
                    ..
                })
            ),
            "{refused:?}"
        );
        let doc = store.read_thread(&key(), "t", 0).await.unwrap().doc;
        assert_eq!((doc.newest_sent_ms, doc.lease_token), (5, 2));
        // And a lost lease writes nothing at all.
        let lost = tokio_util::sync::CancellationToken::new();
        lost.cancel();
        let gone = crate::delivery::lease_check::LeaseCheck::with_token(3, lost);
        let mut state = store.read_thread(&key(), "t", 0).await.unwrap();
        assert!(matches!(
            store
                .write_thread(&mut state, &gone, |d| d.newest_sent_ms = 11)
                .await,
            Err(FencedWriteError::LeaseLost(_))
        ));
    }

    /// A batch that has nothing new to say (its mark already as far, as after messages
    /// superseded by one that ended) writes nothing, also as a new holder whose token is not
    /// on the document yet: a write only to put a token there was a lease-store request.
    #[tokio::test]
    async fn a_thread_write_that_changes_nothing_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::local(dir.path(), "w");
        let first = crate::delivery::lease_check::LeaseCheck::with_token(1, Default::default());
        let next = crate::delivery::lease_check::LeaseCheck::with_token(2, Default::default());
        let mut state = store.read_thread(&key(), "t", 1).await.unwrap();
        store
            .write_thread(&mut state, &first, |d| d.newest_sent_ms = 20)
            .await
            .unwrap();
        let (_, writes) = store.calls();
        let mut state = store.read_thread(&key(), "t", 2).await.unwrap();
        store
            .write_thread(&mut state, &next, |d| {
                d.newest_sent_ms = d.newest_sent_ms.max(10)
            })
            .await
            .unwrap();
        assert_eq!(store.calls().1, writes, "a write that changed nothing");
        let doc = store.read_thread(&key(), "t", 0).await.unwrap().doc;
        assert_eq!((doc.newest_sent_ms, doc.lease_token), (20, 1));
        // A change is written, with the writer's token.
        store
            .write_thread(&mut state, &next, |d| d.newest_sent_ms = 30)
            .await
            .unwrap();
        assert_eq!(store.calls().1, writes + 1);
        let doc = store.read_thread(&key(), "t", 0).await.unwrap().doc;
        assert_eq!((doc.newest_sent_ms, doc.lease_token), (30, 2));
    }
}
