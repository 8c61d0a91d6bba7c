//! # The publish folder
//!
//! Owns what goes into a client's bucket: the publisher (here, with `listing`, `upload`,
//! `local_files` and the bucket's `owner` record), the deploy records (`deploys`), a rollback's
//! restore (`restore`) and the CDN's invalidation (`invalidate`). Knows no other step.
//!
//! # The publisher
//!
//! Publishes a build folder to an S3 bucket so that the bucket holds exactly that build.
//!
//! What to upload is decided by content, not by time. Each local file's MD5 is compared with
//! the object's ETag from ListObjectsV2 (one request per 1,000 keys): for single-part uploads
//! the ETag is the MD5; for multipart ones it is `md5(part md5s)-N`, which we compute locally
//! with our part size; only when neither matches do we read the MD5 we store in the object's
//! metadata (`x-amz-meta-md5`, one HEAD). A rebuild that rewrites every file with new
//! timestamps therefore uploads only what really changed, and a same-size edit is never missed.
//!
//! Order keeps the site whole at every moment: assets first, then the HTML that points at them,
//! then deletions of what is gone, and no deletion at all when any upload failed. Symlinks are
//! never followed, an empty build is refused, and a build that would delete most of a site is
//! refused unless allowed, so a broken build can never wipe a live site.
//!
//! A bucket belongs to one workspace: `.edit-worker/owner.json` names it. The first workspace
//! that publishes into a bucket writes that record (`If-None-Match: *`), and a publish for any
//! other workspace is refused before it writes anything, so one tenant's publish can never
//! replace another's site (a `BUCKET_TEMPLATE` without `{projectId}` gives a client's projects
//! one bucket; the second project's publishes then fail as `bucket_owned_elsewhere`).
//!
//! Every publish for a workspace is a deploy (`deploys.rs`): its record lists what the bucket
//! holds afterwards, and the bytes it replaces stay reachable (object versions, or a
//! server-side copy under `.edit-worker/objects/` made before they are overwritten), so that
//! a rollback (`restore.rs`) needs no build.
//!
//! A build is never read whole into memory: files are hashed in chunks and uploaded from disk
//! (a multipart upload holds one part at a time). A file over `max_file_bytes`, or a build over
//! `max_total_bytes`, is refused before anything is written to the bucket.

pub mod deploys;
pub(crate) mod invalidate;
pub(crate) mod restore;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};

pub use crate::config::{CacheRule, PublishOptions};
use crate::contract::message::WorkspaceKey;
use crate::contract::status::PublishReport;
use crate::steps::publish::deploys::{
    DeployMeta, DeployRecord, DeployedFile, ListedRecord, OBJECTS_DIR, copy_source, deploy_id,
    is_md5, record_key, records_prefix, sequence_of, stored_key,
};

mod listing;
mod local_files;
mod owner;
mod upload;
pub(crate) use listing::{KeptCopies, Listing, next_sequence};
use listing::{list_error, versions_past};
use local_files::{ScanLimits, scan_build};
pub use owner::{BucketFence, OWNER_KEY};
use owner::{KnownOwner, Written};

/// DeleteObjects takes at most this many keys per request.
const DELETE_BATCH: usize = 1000;
/// Below this many objects in the bucket the deletion cap does not apply: a tiny site may
/// legitimately change most of its files.
const DELETE_CAP_MIN_OBJECTS: usize = 10;
/// Reads and conditional writes of one of our records (fence, owner) before giving up: each
/// lost race means another writer made progress, so a few rounds always settle it.
const RECORD_ATTEMPTS: usize = 4;
/// Our records are a few dozen bytes; anything larger in their place is not ours and is not
/// read into memory.
const MAX_RECORD_BYTES: i64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the build produced no files in {0}; refusing to publish an empty site")]
    EmptyBuild(PathBuf),
    #[error("reading the build folder: {0}")]
    Walk(#[from] std::io::Error),
    #[error("listing bucket {bucket}: {message}")]
    List { bucket: String, message: String },
    #[error("uploading {key} to {bucket}: {message}")]
    Upload {
        bucket: String,
        key: String,
        message: String,
    },
    #[error("deleting stale objects from {bucket}: {message}")]
    Delete { bucket: String, message: String },
    #[error("{0}")]
    LeaseLost(#[from] crate::delivery::lease_check::LeaseLost),
    #[error(
        "bucket {bucket} is fenced past this worker's lease token {token} (it carries {found}): \
         another worker holds the workspace now"
    )]
    Fenced {
        bucket: String,
        token: u64,
        found: u64,
    },
    #[error("the lease fence in {bucket}: {message}")]
    FenceStore { bucket: String, message: String },
    #[error(
        "this build would delete {stale} of the {total} objects in {bucket} (more than {max_percent}%); \
         refusing (set PUBLISH_ALLOW_MASS_DELETE=true if that is intended)"
    )]
    TooManyDeletions {
        bucket: String,
        stale: usize,
        total: usize,
        max_percent: u8,
    },
    #[error(
        "bucket {bucket} belongs to the workspace {owner_client}/{owner_project} (its \
         .edit-worker/owner.json says so); refusing to publish another workspace's site into it. \
         Every workspace needs a bucket of its own: BUCKET_TEMPLATE should contain {{projectId}}"
    )]
    OwnedElsewhere {
        bucket: String,
        owner_client: String,
        owner_project: String,
    },
    #[error("the owner record .edit-worker/owner.json in {bucket}: {message}")]
    OwnerStore { bucket: String, message: String },
    #[error("the deploy record in {bucket}: {message}")]
    DeployRecord { bucket: String, message: String },
    #[error("keeping a copy of {key} in {bucket} before it is replaced: {message}")]
    Keep {
        bucket: String,
        key: String,
        message: String,
    },
    #[error("cannot roll back to {target}: {reason}")]
    UnknownDeploy { target: String, reason: String },
    #[error(
        "the build file {key} is {size} bytes, more than the {max} bytes a published file may \
         have (PUBLISH_MAX_FILE_BYTES); nothing was published"
    )]
    FileTooLarge { key: String, size: u64, max: u64 },
    #[error(
        "the build is larger than the {max} bytes a publish may carry (PUBLISH_MAX_BYTES): \
         with {key} it comes to {total} bytes; nothing was published"
    )]
    BuildTooLarge { key: String, total: u64, max: u64 },
}

impl PublishError {
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::EmptyBuild(_) => "empty_build",
            PublishError::TooManyDeletions { .. } => "too_many_deletions",
            PublishError::LeaseLost(_) | PublishError::Fenced { .. } => "lease_lost",
            PublishError::OwnedElsewhere { .. } => "bucket_owned_elsewhere",
            PublishError::FileTooLarge { .. } | PublishError::BuildTooLarge { .. } => {
                "build_too_large"
            }
            PublishError::UnknownDeploy { .. } => "unknown_deploy",
            _ => "publish_failed",
        }
    }

    /// The same build would fail the same way at every try: nothing passing (S3 away, a lost
    /// race) caused it, so retrying the message only delays its `failed` event.
    pub(crate) fn would_repeat(&self) -> bool {
        matches!(
            self,
            PublishError::EmptyBuild(_)
                | PublishError::OwnedElsewhere { .. }
                | PublishError::FileTooLarge { .. }
                | PublishError::BuildTooLarge { .. }
                | PublishError::UnknownDeploy { .. }
        )
    }
}

/// Keys under this prefix are the worker's own (the lease fences, the owner record), never the
/// site's: a publish neither lists nor deletes them.
pub(crate) const RESERVED_PREFIX: &str = ".edit-worker/";

/// An object uploaded (or copied) into place: its size and, with versioning on, its version.
pub(crate) struct Placed {
    pub(crate) key: String,
    pub(crate) size: u64,
    pub(crate) version_id: Option<String>,
}

/// A file of the build, ready to compare and upload.
#[derive(Debug, Clone)]
struct LocalFile {
    key: String,
    path: PathBuf,
    md5_hex: String,
    /// The ETag S3 gives this file when we upload it in parts (`None` below the threshold).
    multipart_etag: Option<String>,
    /// As the walk saw it: the caps were checked against it, and no more is ever read.
    size: u64,
}

/// What a publish will do, decided before it does anything.
#[derive(Debug, Default)]
struct Plan {
    assets: Vec<LocalFile>,
    pages: Vec<LocalFile>,
    skipped: usize,
    stale: Vec<String>,
}

impl Plan {
    /// A file to upload: HTML with the pages, everything else with the assets.
    fn push(&mut self, file: LocalFile) {
        if is_html(&file.key) {
            self.pages.push(file);
        } else {
            self.assets.push(file);
        }
    }
}

/// Uploads builds to S3. Cheap to clone: the SDK client is shared.
#[derive(Clone)]
pub struct Publisher {
    s3: aws_sdk_s3::Client,
    options: PublishOptions,
    /// Shared by every clone: the process-wide upload limit.
    uploads: Arc<tokio::sync::Semaphore>,
    /// Owner records by bucket, shared by every clone: a bucket's record is read once per
    /// process, then trusted while the listings every publish takes anyway show it unchanged.
    owners: Arc<Mutex<HashMap<String, KnownOwner>>>,
    /// Whether each bucket has versioning on, asked once per process: an operator turns it on
    /// (or off) rarely, and a worker restart picks the change up.
    versioning: Arc<Mutex<HashMap<String, bool>>>,
}

impl Publisher {
    pub fn new(s3: aws_sdk_s3::Client, mut options: PublishOptions) -> Publisher {
        options.concurrency = options.concurrency.max(1);
        options.part_size = options.part_size.max(5 * 1024 * 1024);
        options.multipart_threshold = options.multipart_threshold.max(options.part_size);
        options.file_attempts = options.file_attempts.max(1);
        let uploads = Arc::new(tokio::sync::Semaphore::new(
            options.total_concurrency.max(1),
        ));
        Publisher {
            s3,
            options,
            uploads,
            owners: Arc::default(),
            versioning: Arc::default(),
        }
    }

    /// The S3 client (the rollback's reads and copies go through it too).
    pub(crate) fn s3(&self) -> &aws_sdk_s3::Client {
        &self.s3
    }

    /// Copies or uploads in flight per publish or rollback.
    pub(crate) fn concurrency(&self) -> usize {
        self.options.concurrency
    }

    /// Make `bucket`, which belongs to `workspace`, hold exactly the files under `build_dir`,
    /// as a deploy described by `deploy` (its id comes back in the report). A bucket nobody
    /// owns yet becomes the workspace's; one that another workspace owns is refused
    /// (`bucket_owned_elsewhere`) before anything in it is written.
    pub async fn publish_for(
        &self,
        workspace: &WorkspaceKey,
        bucket: &str,
        build_dir: &Path,
        fence: Option<&BucketFence>,
        deploy: &DeployMeta,
    ) -> Result<PublishReport, PublishError> {
        self.run(bucket, build_dir, Some((workspace, deploy)), fence)
            .await
    }

    /// Make `bucket` hold exactly the files under `build_dir`, without reading or writing its
    /// owner record: for a bucket that belongs to no workspace (`edit-worker publish`, the
    /// benchmarks). The worker's own publishes go through [`Publisher::publish_for`].
    pub async fn publish(
        &self,
        bucket: &str,
        build_dir: &Path,
        fence: Option<&BucketFence>,
    ) -> Result<PublishReport, PublishError> {
        self.run(bucket, build_dir, None, fence).await
    }

    /// Every write comes after every check: the build's size and emptiness, the bucket's owner,
    /// the fence, the deletion cap. A publish refused for any of them leaves the bucket as it
    /// was (only an unowned bucket's claim and a raised fence may precede a later refusal).
    async fn run(
        &self,
        bucket: &str,
        build_dir: &Path,
        owner: Option<(&WorkspaceKey, &DeployMeta)>,
        fence: Option<&BucketFence>,
    ) -> Result<PublishReport, PublishError> {
        let still_held = || fence.map_or(Ok(()), |f| f.lease.check());
        still_held()?;
        // Only a workspace's publish is a deploy (`edit-worker publish` records none).
        let versioned = match owner {
            Some(_) => self.versioned(bucket).await?,
            None => false,
        };
        let (local, listing) = self
            .survey(bucket, build_dir, owner.map(|(w, _)| w), versioned)
            .await?;
        if let Some((workspace, _)) = owner {
            self.confirm_owner(bucket, workspace, listing.owner_etag.as_deref())
                .await?;
        }
        if let Some(fence) = fence {
            self.raise_fence(bucket, fence).await?;
        }
        let remote = &listing.objects;
        let plan = self.plan(bucket, &local, remote).await?;
        self.check_deletions(bucket, &plan, remote.len())?;

        // The bytes of the live deploy that this publish replaces or deletes are kept first
        // (without versioning; with it, S3 keeps them): earlier deploys stay restorable. Not
        // before the first deploy: what the bucket held then is no deploy.
        if owner.is_some() && !versioned && !listing.records.is_empty() {
            still_held()?;
            let replaced: Vec<&str> = plan
                .assets
                .iter()
                .chain(&plan.pages)
                .map(|f| f.key.as_str())
                .filter(|key| remote.contains_key(*key))
                .chain(plan.stale.iter().map(String::as_str))
                .collect();
            self.keep_replaced(bucket, &replaced, remote, next_sequence(&listing))
                .await?;
        }

        let mut report = PublishReport {
            skipped: plan.skipped,
            ..PublishReport::default()
        };
        let mut placed_versions = HashMap::new();
        // Assets before the pages that reference them, so no visitor sees a page whose
        // stylesheet is not there yet; each batch ends before the next begins.
        for batch in [plan.assets, plan.pages] {
            still_held()?;
            let count = batch.len();
            report.changed.extend(batch.iter().map(|f| f.key.clone()));
            for placed in self.upload_all(bucket, batch).await? {
                report.bytes += placed.size;
                if let Some(version) = placed.version_id {
                    placed_versions.insert(placed.key, version);
                }
            }
            report.uploaded += count;
        }
        still_held()?;
        self.delete(bucket, &plan.stale).await?;
        report.deleted = plan.stale.len();
        report.changed.extend(plan.stale);

        if let Some((workspace, meta)) = owner {
            let live = listing.versions.as_ref().map(|v| &v.live);
            let files = local
                .iter()
                .map(|f| DeployedFile {
                    path: f.key.clone(),
                    md5: f.md5_hex.clone(),
                    size: f.size,
                    version_id: placed_versions
                        .get(&f.key)
                        .or_else(|| live.and_then(|l| l.get(&f.key)))
                        .cloned(),
                })
                .collect();
            let record = self
                .record_deploy(bucket, workspace, meta, &listing, versioned, files)
                .await?;
            report.deploy_id = Some(record.deploy_id);
        }
        Ok(report)
    }

    /// Whether `bucket` has versioning on (asked once per process).
    pub(crate) async fn versioned(&self, bucket: &str) -> Result<bool, PublishError> {
        let known = self
            .versioning
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(bucket)
            .copied();
        if let Some(on) = known {
            return Ok(on);
        }
        let out = self
            .s3
            .get_bucket_versioning()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| list_error(bucket, e))?;
        // `Suspended` keeps the versions made so far but makes no new ones: not versioned.
        let on = out.status() == Some(&aws_sdk_s3::types::BucketVersioningStatus::Enabled);
        self.versioning
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(bucket.to_owned(), on);
        Ok(on)
    }

    /// Write the record of a deploy that has just been published, then let go of what is past
    /// retention.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn record_deploy(
        &self,
        bucket: &str,
        workspace: &WorkspaceKey,
        meta: &DeployMeta,
        listing: &Listing,
        versioned: bool,
        files: Vec<DeployedFile>,
    ) -> Result<DeployRecord, PublishError> {
        let sequence = next_sequence(listing);
        let id = deploy_id(sequence, &meta.commit);
        let record = meta.record(workspace, id.clone(), versioned, files);
        let fail = |message: String| PublishError::DeployRecord {
            bucket: bucket.into(),
            message,
        };
        // Never over another record: the lease and the bucket's fence keep two publishes of a
        // workspace apart, so a record already there means a listing we cannot trust.
        match self
            .write_record(bucket, &record_key(workspace, &id), &record, None)
            .await
            .map_err(fail)?
        {
            Written::Took(_) => {}
            Written::LostRace => {
                return Err(fail(format!(
                    "deploy {id} was recorded by someone else meanwhile"
                )));
            }
        }
        tracing::info!(%bucket, deploy_id = %id, files = record.files.len(), "deploy recorded");
        let mut records = listing.records.clone();
        records.push(ListedRecord {
            deploy_id: id,
            sequence,
            modified_ms: crate::delivery::records::now_ms() as i64,
            version_ids: Vec::new(),
        });
        // Retention is housekeeping: the deploy is live and recorded either way.
        if let Err(e) = self
            .prune(bucket, workspace, &records, listing, &record)
            .await
        {
            tracing::warn!(%bucket, error = %e, "old deploys could not be removed; the next deploy tries again");
        }
        Ok(record)
    }

    /// Remove the records past retention (`records`: every record, `newest` last) and the kept
    /// bytes no retained deploy needs. Bytes deploy N replaced are needed only by deploys
    /// before N: copies kept by deploys up to the oldest retained one go; with versioning, the
    /// versions older than the one the oldest retained deploy holds go (and, for a key that
    /// deploy does not hold, those replaced before its record was written).
    async fn prune(
        &self,
        bucket: &str,
        workspace: &WorkspaceKey,
        records: &[ListedRecord],
        listing: &Listing,
        newest: &DeployRecord,
    ) -> Result<(), PublishError> {
        let now = crate::delivery::records::now_ms() as i64;
        let first = self.options.retention.first_kept(records, now);
        if first == 0 {
            return Ok(());
        }
        let oldest = &records[first];
        let mut gone: Vec<(String, Option<String>)> = Vec::new();
        for record in &records[..first] {
            let key = record_key(workspace, &record.deploy_id);
            if record.version_ids.is_empty() {
                gone.push((key, None));
            } else {
                gone.extend(
                    record
                        .version_ids
                        .iter()
                        .map(|v| (key.clone(), Some(v.clone()))),
                );
            }
        }
        let listed_now;
        let stored = if listing.stored_listed {
            &listing.stored
        } else {
            listed_now = self.list_stored(bucket).await?;
            &listed_now
        };
        for (md5, sequences) in stored {
            for sequence in sequences.iter().filter(|s| **s <= oldest.sequence) {
                gone.push((stored_key(md5, *sequence), None));
            }
        }
        if let Some(versions) = &listing.versions {
            let held = if oldest.deploy_id == newest.deploy_id {
                newest.clone()
            } else {
                self.read_deploy(workspace, bucket, &oldest.deploy_id)
                    .await?
            };
            gone.extend(versions_past(versions, &held, oldest.modified_ms));
        }
        tracing::info!(%bucket, deploys = first, objects = gone.len(), "removing deploys past retention");
        self.delete_versions(bucket, &gone).await
    }

    /// Hash the build and list the bucket at the same time: neither needs the other, and
    /// neither writes anything, so a build over a cap, or an empty one, fails here untouched.
    async fn survey(
        &self,
        bucket: &str,
        build_dir: &Path,
        workspace: Option<&WorkspaceKey>,
        versioned: bool,
    ) -> Result<(Vec<LocalFile>, Listing), PublishError> {
        let root = build_dir.to_owned();
        let limits = ScanLimits::of(&self.options);
        let scan = tokio::task::spawn_blocking(move || scan_build(&root, &limits));
        let listed = self.list(bucket, workspace, versioned, KeptCopies::Skipped);
        let (local, listing) = tokio::join!(scan, listed);
        let local = local.map_err(|e| PublishError::Walk(std::io::Error::other(e)))??;
        if local.is_empty() {
            return Err(PublishError::EmptyBuild(build_dir.to_owned()));
        }
        Ok((local, listing?))
    }

    /// Refuse a plan that would delete most of a site (a broken build), unless allowed.
    fn check_deletions(&self, bucket: &str, plan: &Plan, total: usize) -> Result<(), PublishError> {
        if !self.options.allow_mass_delete
            && total >= DELETE_CAP_MIN_OBJECTS
            && plan.stale.len() * 100 > total * self.options.max_delete_percent as usize
        {
            return Err(PublishError::TooManyDeletions {
                bucket: bucket.into(),
                stale: plan.stale.len(),
                total,
                max_percent: self.options.max_delete_percent,
            });
        }
        Ok(())
    }

    /// Decide what to upload, skip and delete.
    async fn plan(
        &self,
        bucket: &str,
        local: &[LocalFile],
        remote: &HashMap<String, String>,
    ) -> Result<Plan, PublishError> {
        let mut plan = Plan::default();
        let mut unsure = Vec::new();
        for file in local {
            let unchanged = match remote.get(&file.key) {
                None => Some(false),
                Some(etag) if etag == &file.md5_hex => Some(true),
                Some(etag) if Some(etag) == file.multipart_etag.as_ref() => Some(true),
                // Uploaded in parts of another size or by another tool, or a server whose
                // listing carries no ETag: our own hash in the metadata decides.
                Some(etag) if etag.is_empty() || etag.contains('-') => None,
                Some(_) => Some(false),
            };
            match unchanged {
                Some(true) => plan.skipped += 1,
                Some(false) => plan.push(file.clone()),
                None => unsure.push(file.clone()),
            }
        }
        let stored: Vec<(LocalFile, Option<String>)> = futures::stream::iter(unsure)
            .map(|file| self.with_stored_md5(bucket, file))
            // HEADs carry no body: many more can be in flight than uploads.
            .buffer_unordered(self.options.concurrency * 4)
            .try_collect()
            .await?;
        for (file, md5) in stored {
            if md5.as_deref() == Some(&file.md5_hex) {
                plan.skipped += 1;
            } else {
                plan.push(file);
            }
        }
        plan.assets.sort_by(|a, b| a.key.cmp(&b.key));
        plan.pages.sort_by(|a, b| a.key.cmp(&b.key));
        let keep: std::collections::HashSet<&str> = local.iter().map(|f| f.key.as_str()).collect();
        plan.stale = remote
            .keys()
            .filter(|k| !keep.contains(k.as_str()))
            .cloned()
            .collect();
        plan.stale.sort();
        Ok(plan)
    }
}

/// An ETag as listings give it, without the quotes that other responses keep.
fn unquoted(etag: &str) -> &str {
    etag.trim_matches('"')
}

pub(crate) fn is_html(key: &str) -> bool {
    key.ends_with(".html") || key.ends_with(".htm")
}

/// `Content-Type` by extension, with a charset for text so that browsers do not guess.
pub(crate) fn content_type(key: &str) -> String {
    let mime = mime_guess::from_path(key).first_or_octet_stream();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || matches!(
            mime.essence_str(),
            "application/javascript" | "application/json" | "application/xml" | "image/svg+xml"
        );
    if textual {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_carry_charset_for_text() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("_astro/a.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("logo.png"), "image/png");
        assert_eq!(content_type("x.svg"), "image/svg+xml; charset=utf-8");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }
}
