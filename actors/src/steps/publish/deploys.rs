//! Deploys (`CONTRACT.md`, "Deploys and rollback"): what each publish left in the bucket, kept
//! so that an earlier deploy can be made live again without the agent or a build.
//!
//! A deploy record is a JSON object in the bucket itself, under
//! `.edit-worker/deploys/{clientId}/{projectId}/{deployId}.json`: every worker that publishes
//! there sees it (the bucket is the one store they all share, with or without a lease store),
//! it survives the worker and its disk, and the listing every publish takes anyway finds the
//! records at no extra request. A deploy id is `{sequence:06}-{commit:12}`: it sorts in the
//! order the deploys were made (the newest record is the live deploy) and names its commit, so
//! a rollback to a commit finds its deploy from the listing alone.
//!
//! The bytes of a retained deploy stay reachable in one of two ways:
//! - the bucket has versioning on: each file's `versionId` is recorded, and restoring copies
//!   that version back;
//! - otherwise, before a publish (or a rollback) replaces or deletes an object, a server-side
//!   copy of it is made at `.edit-worker/objects/{md5}/{sequence}`: addressed by its content
//!   (any copy of the same MD5 serves), and named by the deploy that replaced it. Bytes that
//!   deploy N replaced are needed only by deploys before N, so once the oldest retained deploy
//!   is N or newer, the copy goes (see [`Retention`]). Sequence numbers, not times: S3's
//!   `LastModified` has whole seconds, and two deploys can fall in one.

use serde::{Deserialize, Serialize};

use crate::contract::message::WorkspaceKey;

/// The deploy records of every workspace publishing into the bucket.
pub const DEPLOYS_DIR: &str = ".edit-worker/deploys/";
/// Content-addressed copies of replaced objects (buckets without versioning).
pub const OBJECTS_DIR: &str = ".edit-worker/objects/";
/// A record lists every file of a site (about 100 bytes each): this is several hundred
/// thousand files, far past any site; anything larger in a record's place is not read.
pub const MAX_RECORD_BYTES: i64 = 32 * 1024 * 1024;
pub use crate::contract::deploy_id::{commit_prefix_of, deploy_id, is_deploy_id, sequence_of};

/// Where the records of `workspace` live.
pub fn records_prefix(workspace: &WorkspaceKey) -> String {
    format!(
        "{DEPLOYS_DIR}{}/{}/",
        workspace.client_id, workspace.project_id
    )
}

/// The key of one record.
pub fn record_key(workspace: &WorkspaceKey, id: &str) -> String {
    format!("{}{id}.json", records_prefix(workspace))
}

/// The key of the copy of the bytes with MD5 `md5` that deploy `sequence` kept.
pub fn stored_key(md5: &str, sequence: u64) -> String {
    format!("{OBJECTS_DIR}{md5}/{sequence:06}")
}

/// The MD5 and deploy sequence of a kept copy's key (relative to [`OBJECTS_DIR`]).
pub fn parse_stored(name: &str) -> Option<(&str, u64)> {
    let (md5, sequence) = name.split_once('/')?;
    Some((md5, sequence.parse().ok()?)).filter(|(m, _)| is_md5(m))
}

/// Whether an ETag (unquoted) is a plain MD5 (a single-part upload): then it names the bytes.
pub fn is_md5(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One deploy: exactly what the bucket held after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeployRecord {
    pub deploy_id: String,
    pub client_id: String,
    pub project_id: String,
    /// The commit whose build the bucket holds (for a rollback: its own `Rollback to` commit,
    /// whose tree is the target's).
    pub commit: String,
    pub thread_id: String,
    pub message_id: String,
    /// RFC 3339, UTC, the worker's clock (retention reads the record's `LastModified`).
    pub at: String,
    /// `edit` or `rollback`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<RolledBackTo>,
    /// The bucket had versioning on: every file carries its `versionId`.
    pub versioned: bool,
    pub files: Vec<DeployedFile>,
}

impl DeployRecord {
    /// The bytes of every file.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// One file of a deploy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeployedFile {
    /// The object's key.
    pub path: String,
    /// MD5 of its bytes (hex): what the publisher compares, and the kept copy's name.
    pub md5: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

pub use crate::contract::status::RolledBackTo;

/// Who a deploy is for: what its record says besides the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployMeta {
    pub commit: String,
    pub thread_id: String,
    pub message_id: String,
    /// Set for a rollback.
    pub rolled_back_to: Option<RolledBackTo>,
}

impl DeployMeta {
    /// The record of deploy `deploy_id` of `workspace` holding `files`.
    pub fn record(
        &self,
        workspace: &WorkspaceKey,
        deploy_id: String,
        versioned: bool,
        files: Vec<DeployedFile>,
    ) -> DeployRecord {
        DeployRecord {
            deploy_id,
            client_id: workspace.client_id.clone(),
            project_id: workspace.project_id.clone(),
            commit: self.commit.clone(),
            thread_id: self.thread_id.clone(),
            message_id: self.message_id.clone(),
            at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            action: if self.rolled_back_to.is_some() {
                "rollback".into()
            } else {
                "edit".into()
            },
            rolled_back_to: self.rolled_back_to.clone(),
            versioned,
            files,
        }
    }
}

/// A record as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRecord {
    pub deploy_id: String,
    pub sequence: u64,
    /// `LastModified`, ms since the epoch (the server's clock).
    pub modified_ms: i64,
    /// With versioning on: every version (and delete marker) of the record's key, so that a
    /// record past retention is removed for good.
    pub version_ids: Vec<String>,
}

pub use crate::config::Retention;

impl Retention {
    /// Of `records` (oldest first), the index of the oldest one retained at `now_ms`: every
    /// record from there on is kept, every one before it goes. A record is kept when it is one
    /// of the newest `keep` (the live one, the newest, always) or younger than `days`; since
    /// records are made in order, what is kept is always the newest part of the list.
    pub fn first_kept(&self, records: &[ListedRecord], now_ms: i64) -> usize {
        let by_count = records.len().saturating_sub(self.keep.max(1));
        let cutoff = now_ms.saturating_sub((self.days as i64).saturating_mul(86_400_000));
        let by_age = records
            .iter()
            .position(|r| r.modified_ms >= cutoff)
            .unwrap_or(records.len());
        by_count.min(by_age)
    }
}

/// What a rollback resolved its target to.
#[derive(Debug, Clone)]
pub struct ResolvedDeploy {
    pub record: DeployRecord,
    /// The live deploy's id (the newest record), for the log.
    pub live: String,
}

/// A key as a copy source (`CopySource`: `bucket/key`, URL-encoded; `/` kept).
pub(crate) fn copy_source(bucket: &str, key: &str, version_id: Option<&str>) -> String {
    let mut out = String::with_capacity(bucket.len() + key.len() + 1);
    out.push_str(bucket);
    out.push('/');
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    if let Some(version) = version_id {
        out.push_str("?versionId=");
        out.push_str(version);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(sequence: u64, modified_ms: i64) -> ListedRecord {
        ListedRecord {
            deploy_id: deploy_id(sequence, "0123456789abcdef"),
            sequence,
            modified_ms,
            version_ids: Vec::new(),
        }
    }

    #[test]
    fn retention_keeps_the_newest_and_the_young_and_always_the_live_one() {
        let day = 86_400_000;
        let now = 100 * day;
        // Five records, a day apart, the newest 1 day old.
        let records: Vec<_> = (0..5)
            .map(|i| listed(i + 1, now - (5 - i as i64) * day))
            .collect();
        let r = |days, keep| Retention { days, keep }.first_kept(&records, now);
        // Young enough: all kept.
        assert_eq!(r(30, 2), 0);
        // Older than 2 days go (records 1-3 are 5, 4, 3 days old), unless among the newest 4.
        assert_eq!(r(2, 1), 3);
        assert_eq!(r(2, 4), 1);
        // Nothing is young: only the newest `keep`, and at least the live one.
        assert_eq!(r(0, 2), 3);
        assert_eq!(r(0, 0), 4);
        assert_eq!(Retention::default().first_kept(&[], now), 0);
    }

    #[test]
    fn copy_sources_are_url_encoded_but_keep_slashes() {
        assert_eq!(copy_source("b", "a b/ü.html", None), "b/a%20b/%C3%BC.html");
        assert_eq!(
            copy_source("b", "x/index.html", Some("v1")),
            "b/x/index.html?versionId=v1"
        );
    }

    #[test]
    fn records_round_trip_and_say_their_action() {
        let meta = DeployMeta {
            commit: "c".repeat(40),
            thread_id: "t".into(),
            message_id: "m".into(),
            rolled_back_to: Some(RolledBackTo {
                deploy_id: "000001-cccccccccccc".into(),
                commit: "d".repeat(40),
            }),
        };
        let ws = WorkspaceKey::of("amelia", "stamps");
        let files = vec![DeployedFile {
            path: "index.html".into(),
            md5: "0".repeat(32),
            size: 3,
            version_id: None,
        }];
        let record = meta.record(&ws, "000002-cccccccccccc".into(), false, files);
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["action"], "rollback");
        assert_eq!(json["rolledBackTo"]["deployId"], "000001-cccccccccccc");
        assert!(json["files"][0].get("versionId").is_none());
        let back: DeployRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.bytes(), 3);
        assert_eq!(
            record_key(&ws, &record.deploy_id),
            ".edit-worker/deploys/amelia/stamps/000002-cccccccccccc.json"
        );
    }
}
