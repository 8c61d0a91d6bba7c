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
use crate::deploys::{
    DeployMeta, DeployRecord, DeployedFile, ListedRecord, OBJECTS_DIR, copy_source, deploy_id,
    is_md5, record_key, records_prefix, sequence_of, stored_key,
};
use crate::message::WorkspaceKey;

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
    LeaseLost(#[from] crate::lease::LeaseLost),
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

/// The bucket's owner record (under the reserved prefix, so no publish ever deletes it).
pub const OWNER_KEY: &str = ".edit-worker/owner.json";

/// A lease's fence in the bucket it publishes to: an object per workspace holding the newest
/// lease token that published there. A publish first raises it to its own token (a conditional
/// write), and refuses when it is already past it: a worker that lost its lease publishes
/// nothing once the next holder has. The lease itself is checked again before every batch of
/// uploads and before the deletes, so a holder paused mid-publish stops at the next step.
#[derive(Clone)]
pub struct BucketFence {
    pub key: String,
    pub token: u64,
    pub lease: crate::lease::LeaseCheck,
}

impl BucketFence {
    pub fn for_workspace(
        workspace: &crate::message::WorkspaceKey,
        token: u64,
        lease: crate::lease::LeaseCheck,
    ) -> BucketFence {
        BucketFence {
            key: format!(
                "{RESERVED_PREFIX}lease/{}/{}.json",
                workspace.client_id, workspace.project_id
            ),
            token,
            lease,
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FenceRecord {
    token: u64,
}

/// Who a bucket belongs to (`.edit-worker/owner.json`). Written once, by the first workspace
/// that publishes into the bucket, and never changed or deleted by a publish: an operator who
/// gives the bucket to another workspace deletes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct OwnerRecord {
    client_id: String,
    project_id: String,
    /// When the workspace claimed the bucket (RFC 3339): for the operator reading a refusal.
    since: String,
}

impl OwnerRecord {
    fn claiming(workspace: &WorkspaceKey) -> OwnerRecord {
        OwnerRecord {
            client_id: workspace.client_id.clone(),
            project_id: workspace.project_id.clone(),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }

    fn owned_by(&self, workspace: &WorkspaceKey) -> bool {
        self.client_id == workspace.client_id && self.project_id == workspace.project_id
    }
}

/// An owner record as this process last read or wrote it. It is still the bucket's while a
/// listing shows the record with this ETag, so checking it costs no request of its own.
#[derive(Debug, Clone)]
struct KnownOwner {
    record: OwnerRecord,
    /// Without quotes, as listings are compared.
    etag: String,
}

/// One of our records in a bucket as read, with the ETag that a conditional write of its next
/// version must name (`If-Match`).
struct StoredRecord<T> {
    value: T,
    etag: String,
}

/// What a conditional write of a record came to.
enum Written {
    /// It took; the new version's ETag, when the server gave one.
    Took(Option<String>),
    /// Someone wrote first (412 or 409): read the record again.
    LostRace,
}

/// Whether a listing names the kept copies one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeptCopies {
    /// A rollback's: the copies are where restored bytes come from.
    Listed,
    /// A publish's: it needs them only to remove those past retention, which lists them then.
    Skipped,
}

/// What a listing of the bucket found.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// Key → ETag (without quotes) of every object of the site (none under the reserved prefix).
    pub(crate) objects: HashMap<String, String>,
    /// The owner record's ETag (without quotes), when there is one: tells whether the record
    /// this process knows is still the bucket's without reading it.
    pub(crate) owner_etag: Option<String>,
    /// The workspace's deploy records, oldest first (when listed for a workspace).
    pub(crate) records: Vec<ListedRecord>,
    /// Kept copies (`.edit-worker/objects/{md5}/{sequence}`): MD5 → the sequences of the
    /// deploys that kept one. Empty when `stored_listed` is false.
    pub(crate) stored: HashMap<String, Vec<u64>>,
    /// Whether the kept copies were listed: a publish's listing leaves them out (one entry for
    /// all of them), so that they never add listing pages to every publish; only retention,
    /// when it has a deploy to remove, and a rollback list them.
    pub(crate) stored_listed: bool,
    /// With versioning on: the objects' versions.
    pub(crate) versions: Option<Versions>,
}

/// The versions of a versioned bucket's site objects, as one listing found them.
#[derive(Debug, Default)]
pub(crate) struct Versions {
    /// Key → version id of the live object.
    pub(crate) live: HashMap<String, String>,
    /// Every (key, version id) there is: whether a recorded version can still be restored.
    pub(crate) all: std::collections::HashSet<(String, String)>,
    /// Each site key's versions in S3's order (newest first): (version id, `LastModified`,
    /// latest).
    pub(crate) history: HashMap<String, Vec<(String, i64, bool)>>,
    /// Each site key's delete markers' `LastModified`.
    pub(crate) markers: HashMap<String, Vec<i64>>,
}

/// One entry of a version listing, before the versions of a key are put in order.
struct VersionEntry {
    key: String,
    version_id: String,
    /// `None` for a delete marker.
    etag: Option<String>,
    modified_ms: i64,
    latest: bool,
}

/// `LastModified` in ms since the epoch (0 when a server gives none: oldest of all).
fn modified_ms(time: Option<&aws_sdk_s3::primitives::DateTime>) -> i64 {
    time.and_then(|t| t.to_millis().ok()).unwrap_or(0)
}

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

impl Listing {
    /// Put one live object where it belongs: the site, the owner record, this workspace's deploy
    /// records, the kept copies; other bookkeeping is left out.
    fn sort(&mut self, key: &str, etag: String, modified: i64, workspace: Option<&WorkspaceKey>) {
        if key == OWNER_KEY {
            self.owner_etag = Some(etag);
        } else if let Some((md5, sequence)) = key
            .strip_prefix(crate::deploys::OBJECTS_DIR)
            .and_then(crate::deploys::parse_stored)
        {
            self.stored
                .entry(md5.to_owned())
                .or_default()
                .push(sequence);
        } else if let Some(id) = workspace
            .and_then(|w| key.strip_prefix(&records_prefix(w)))
            .and_then(|name| name.strip_suffix(".json"))
            .filter(|id| crate::deploys::is_deploy_id(id))
        {
            self.records.push(ListedRecord {
                deploy_id: id.to_owned(),
                sequence: sequence_of(id).unwrap_or(0),
                modified_ms: modified,
                version_ids: Vec::new(),
            });
        } else if !key.starts_with(RESERVED_PREFIX) {
            self.objects.insert(key.to_owned(), etag);
        }
    }
}

fn list_error<E, R>(bucket: &str, e: aws_sdk_s3::error::SdkError<E, R>) -> PublishError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    PublishError::List {
        bucket: bucket.into(),
        message: DisplayErrorContext(&e).to_string(),
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
            modified_ms: crate::records::now_ms() as i64,
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
        let now = crate::records::now_ms() as i64;
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

    /// Refuse to publish into a bucket that another workspace owns; claim it when nobody does.
    /// `listed` is the owner record's ETag in the listing this publish just took: when it is
    /// the record this process already knows, no request is needed.
    pub(crate) async fn confirm_owner(
        &self,
        bucket: &str,
        workspace: &WorkspaceKey,
        listed: Option<&str>,
    ) -> Result<(), PublishError> {
        let owner = match listed.and_then(|etag| self.known_owner(bucket, etag)) {
            Some(record) => record,
            None => self.claim(bucket, workspace).await?,
        };
        if owner.owned_by(workspace) {
            Ok(())
        } else {
            Err(PublishError::OwnedElsewhere {
                bucket: bucket.into(),
                owner_client: owner.client_id,
                owner_project: owner.project_id,
            })
        }
    }

    /// The owner record this process knows for `bucket`, if it is still the one with `etag`.
    fn known_owner(&self, bucket: &str, etag: &str) -> Option<OwnerRecord> {
        let owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        owners
            .get(bucket)
            .filter(|known| known.etag == etag)
            .map(|known| known.record.clone())
    }

    /// Keep `record` as the bucket's owner while its ETag stays (without one there is nothing
    /// to recognise it by: it is read again next time).
    fn remember(&self, bucket: &str, record: OwnerRecord, etag: Option<&str>) -> OwnerRecord {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        match etag.map(unquoted).filter(|e| !e.is_empty()) {
            Some(etag) => {
                let known = KnownOwner {
                    record: record.clone(),
                    etag: etag.to_owned(),
                };
                owners.insert(bucket.to_owned(), known);
            }
            None => {
                owners.remove(bucket);
            }
        }
        record
    }

    /// Read the bucket's owner record; when there is none, write one naming `workspace`, only
    /// if there is still none (`If-None-Match: *`): of two workspaces claiming a new bucket at
    /// once, exactly one wins, and the other reads the winner's record.
    async fn claim(
        &self,
        bucket: &str,
        workspace: &WorkspaceKey,
    ) -> Result<OwnerRecord, PublishError> {
        let store_err = |message: String| PublishError::OwnerStore {
            bucket: bucket.into(),
            message,
        };
        for _ in 0..RECORD_ATTEMPTS {
            let stored = self
                .read_record::<OwnerRecord>(bucket, OWNER_KEY)
                .await
                .map_err(store_err)?;
            if let Some(stored) = stored {
                return Ok(self.remember(bucket, stored.value, Some(&stored.etag)));
            }
            let record = OwnerRecord::claiming(workspace);
            match self
                .write_record(bucket, OWNER_KEY, &record, None)
                .await
                .map_err(store_err)?
            {
                Written::Took(etag) => {
                    tracing::info!(%bucket, %workspace, "the bucket now belongs to the workspace");
                    return Ok(self.remember(bucket, record, etag.as_deref()));
                }
                Written::LostRace => {}
            }
        }
        Err(store_err("the owner record kept changing under us".into()))
    }

    /// Raise the bucket's fence to this holder's token; refuse when it is already past it.
    pub(crate) async fn raise_fence(
        &self,
        bucket: &str,
        fence: &BucketFence,
    ) -> Result<(), PublishError> {
        let store_err = |message: String| PublishError::FenceStore {
            bucket: bucket.into(),
            message,
        };
        for _ in 0..RECORD_ATTEMPTS {
            let stored = self
                .read_record::<FenceRecord>(bucket, &fence.key)
                .await
                .map_err(store_err)?;
            match stored.as_ref().map(|s| s.value.token) {
                Some(token) if token > fence.token => {
                    return Err(PublishError::Fenced {
                        bucket: bucket.into(),
                        token: fence.token,
                        found: token,
                    });
                }
                Some(token) if token == fence.token => return Ok(()),
                _ => {}
            }
            let record = FenceRecord { token: fence.token };
            let replacing = stored.as_ref().map(|s| s.etag.as_str());
            match self
                .write_record(bucket, &fence.key, &record, replacing)
                .await
                .map_err(store_err)?
            {
                Written::Took(_) => return Ok(()),
                Written::LostRace => {}
            }
        }
        Err(store_err("the fence kept changing under us".into()))
    }

    /// One of our JSON records, with its ETag; `None` when there is none.
    async fn read_record<T: serde::de::DeserializeOwned>(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<StoredRecord<T>>, String> {
        let got = self.s3.get_object().bucket(bucket).key(key).send().await;
        let object = match got {
            Ok(object) => object,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(DisplayErrorContext(&e).to_string()),
        };
        if object.content_length().unwrap_or(0) > MAX_RECORD_BYTES {
            return Err(format!("{key} is larger than a record of ours can be"));
        }
        let etag = object.e_tag().unwrap_or_default().to_owned();
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .into_bytes();
        let value = serde_json::from_slice(&bytes).map_err(|e| format!("{key}: {e}"))?;
        Ok(Some(StoredRecord { value, etag }))
    }

    /// Write one of our records only if it is still as we read it: `replacing` the version
    /// with that ETag (`If-Match`), or where there is none yet (`If-None-Match: *`).
    async fn write_record<T: serde::Serialize>(
        &self,
        bucket: &str,
        key: &str,
        value: &T,
        replacing: Option<&str>,
    ) -> Result<Written, String> {
        let body = serde_json::to_vec(value).expect("records serialize");
        let put = self
            .s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .cache_control("no-store")
            .body(body.into());
        let put = match replacing {
            Some(etag) => put.if_match(etag),
            None => put.if_none_match("*"),
        };
        match put.send().await {
            Ok(out) => Ok(Written::Took(out.e_tag().map(str::to_owned))),
            Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
                Some(412 | 409) => Ok(Written::LostRace),
                _ => Err(DisplayErrorContext(&e).to_string()),
            },
        }
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

    async fn with_stored_md5(
        &self,
        bucket: &str,
        file: LocalFile,
    ) -> Result<(LocalFile, Option<String>), PublishError> {
        let md5 = self.stored_md5(bucket, &file.key).await?;
        Ok((file, md5))
    }

    /// The MD5 we stored in an object's metadata when we uploaded it.
    pub(crate) async fn stored_md5(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<String>, PublishError> {
        let head = self
            .s3
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| PublishError::List {
                bucket: bucket.into(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
        Ok(head.metadata().and_then(|m| m.get("md5")).cloned())
    }

    /// Every object of the site with its ETag, the owner record's ETag and, for a workspace,
    /// its deploy records and, with `kept_copies`, the kept copies; with `versioned`, every
    /// version (one listing either way: the records cost no request of their own).
    pub(crate) async fn list(
        &self,
        bucket: &str,
        workspace: Option<&WorkspaceKey>,
        versioned: bool,
        kept_copies: KeptCopies,
    ) -> Result<Listing, PublishError> {
        if versioned {
            let mut listing = self.list_versions(bucket, workspace).await?;
            listing.stored_listed = true;
            return Ok(listing);
        }
        let mut listing = Listing {
            stored_listed: kept_copies == KeptCopies::Listed,
            ..Listing::default()
        };
        // Without the copies, every key holding `.edit-worker/objects/` is rolled up at it by
        // S3 into one common prefix: the copies (thousands, on a busy site) count as one key
        // against the 1,000 of a listing page. A site key that holds that text further in
        // (`x/.edit-worker/objects/y`) is rolled up too, and listed on its own below.
        let delimiter = (kept_copies == KeptCopies::Skipped).then_some(OBJECTS_DIR);
        let mut rolled_up = Vec::new();
        self.list_range(
            bucket,
            None,
            delimiter,
            &mut rolled_up,
            &mut |key, etag, modified| listing.sort(key, etag, modified, workspace),
        )
        .await?;
        for prefix in rolled_up.into_iter().filter(|p| p != OBJECTS_DIR) {
            self.list_range(
                bucket,
                Some(&prefix),
                None,
                &mut Vec::new(),
                &mut |key, etag, modified| listing.sort(key, etag, modified, workspace),
            )
            .await?;
        }
        listing.records.sort_by_key(|r| r.sequence);
        Ok(listing)
    }

    /// The kept copies alone (`.edit-worker/objects/`): MD5 → the sequences that kept one.
    pub(crate) async fn list_stored(
        &self,
        bucket: &str,
    ) -> Result<HashMap<String, Vec<u64>>, PublishError> {
        let mut listing = Listing::default();
        self.list_range(
            bucket,
            Some(OBJECTS_DIR),
            None,
            &mut Vec::new(),
            &mut |key, etag, modified| listing.sort(key, etag, modified, None),
        )
        .await?;
        Ok(listing.stored)
    }

    /// One ListObjectsV2, all its pages: each object to `object` (key, unquoted ETag,
    /// `LastModified`), the common prefixes a `delimiter` rolled up to `rolled_up`.
    async fn list_range(
        &self,
        bucket: &str,
        prefix: Option<&str>,
        delimiter: Option<&str>,
        rolled_up: &mut Vec<String>,
        object: &mut (dyn FnMut(&str, String, i64) + Send),
    ) -> Result<(), PublishError> {
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .set_prefix(prefix.map(str::to_owned))
            .set_delimiter(delimiter.map(str::to_owned))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| list_error(bucket, e))?;
            for entry in page.contents() {
                let Some(key) = entry.key() else { continue };
                let etag = unquoted(entry.e_tag().unwrap_or_default()).to_owned();
                object(key, etag, modified_ms(entry.last_modified()));
            }
            rolled_up.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix().map(str::to_owned)),
            );
        }
        Ok(())
    }

    /// [`Publisher::list`] of a bucket with versioning on: ListObjectVersions, whose latest
    /// versions are what ListObjectsV2 shows, and whose older ones a rollback restores.
    async fn list_versions(
        &self,
        bucket: &str,
        workspace: Option<&WorkspaceKey>,
    ) -> Result<Listing, PublishError> {
        let mut entries = Vec::new();
        let (mut key_marker, mut version_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .s3
                .list_object_versions()
                .bucket(bucket)
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .send()
                .await
                .map_err(|e| list_error(bucket, e))?;
            for v in page.versions() {
                entries.push(VersionEntry {
                    key: v.key().unwrap_or_default().to_owned(),
                    version_id: v.version_id().unwrap_or("null").to_owned(),
                    etag: Some(unquoted(v.e_tag().unwrap_or_default()).to_owned()),
                    modified_ms: modified_ms(v.last_modified()),
                    latest: v.is_latest().unwrap_or(false),
                });
            }
            for m in page.delete_markers() {
                entries.push(VersionEntry {
                    key: m.key().unwrap_or_default().to_owned(),
                    version_id: m.version_id().unwrap_or("null").to_owned(),
                    etag: None,
                    modified_ms: modified_ms(m.last_modified()),
                    latest: m.is_latest().unwrap_or(false),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            version_marker = page.next_version_id_marker().map(str::to_owned);
            if key_marker.is_none() {
                break;
            }
        }
        let mut listing = Listing::default();
        let mut versions = Versions::default();
        let mut record_versions: HashMap<String, Vec<String>> = HashMap::new();
        // `entries` holds each key's versions in S3's order (newest first), then its markers.
        for entry in &entries {
            let bookkeeping = entry.key.starts_with(RESERVED_PREFIX);
            if bookkeeping {
                if entry.key.starts_with(crate::deploys::DEPLOYS_DIR) {
                    record_versions
                        .entry(entry.key.clone())
                        .or_default()
                        .push(entry.version_id.clone());
                }
            } else {
                versions
                    .all
                    .insert((entry.key.clone(), entry.version_id.clone()));
                match &entry.etag {
                    Some(_) => versions
                        .history
                        .entry(entry.key.clone())
                        .or_default()
                        .push((entry.version_id.clone(), entry.modified_ms, entry.latest)),
                    None => versions
                        .markers
                        .entry(entry.key.clone())
                        .or_default()
                        .push(entry.modified_ms),
                }
            }
            if let (Some(etag), true) = (&entry.etag, entry.latest) {
                listing.sort(&entry.key, etag.clone(), entry.modified_ms, workspace);
                if !bookkeeping {
                    versions
                        .live
                        .insert(entry.key.clone(), entry.version_id.clone());
                }
            }
        }
        for record in &mut listing.records {
            if let Some(workspace) = workspace {
                let key = record_key(workspace, &record.deploy_id);
                record.version_ids = record_versions.remove(&key).unwrap_or_default();
            }
        }
        listing.records.sort_by_key(|r| r.sequence);
        listing.versions = Some(versions);
        Ok(listing)
    }

    /// Upload files with bounded concurrency; the first failure stops the batch.
    async fn upload_all(
        &self,
        bucket: &str,
        files: Vec<LocalFile>,
    ) -> Result<Vec<Placed>, PublishError> {
        futures::stream::iter(files)
            .map(|file| self.upload_with_retry(bucket, file))
            .buffer_unordered(self.options.concurrency)
            .try_collect()
            .await
    }

    /// The SDK retries each request; this retries the whole file (a multipart upload that lost
    /// a part starts over), with backoff.
    async fn upload_with_retry(
        &self,
        bucket: &str,
        file: LocalFile,
    ) -> Result<Placed, PublishError> {
        let _slot = self
            .uploads
            .acquire()
            .await
            .expect("semaphore never closed");
        let mut delay = std::time::Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let result = if file.multipart_etag.is_some() {
                self.upload_multipart(bucket, &file).await
            } else {
                self.upload(bucket, &file).await
            };
            match result {
                Ok(version_id) => {
                    return Ok(Placed {
                        key: file.key,
                        size: file.size,
                        version_id,
                    });
                }
                Err(e) if attempt < self.options.file_attempts => {
                    tracing::warn!(key = %file.key, attempt, error = %e, "upload failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn upload_error(bucket: &str, key: &str, message: String) -> PublishError {
        PublishError::Upload {
            bucket: bucket.into(),
            key: key.into(),
            message,
        }
    }

    /// Upload one file; its version id comes back (with versioning on).
    async fn upload(&self, bucket: &str, file: &LocalFile) -> Result<Option<String>, PublishError> {
        let fail = |message: String| Self::upload_error(bucket, &file.key, message);
        // Streamed from disk, and never more than the size the caps were checked against
        // (a file that shrank since fails here).
        let body = ByteStream::read_from()
            .path(&file.path)
            .length(Length::Exact(file.size))
            .build()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let put = self
            .s3
            .put_object()
            .bucket(bucket)
            .key(&file.key)
            .body(body)
            .content_type(content_type(&file.key))
            .cache_control(self.cache_control(&file.key))
            .metadata("md5", &file.md5_hex)
            .send()
            .await
            .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
        Ok(put.version_id().map(str::to_owned))
    }

    async fn upload_multipart(
        &self,
        bucket: &str,
        file: &LocalFile,
    ) -> Result<Option<String>, PublishError> {
        let fail = |message: String| Self::upload_error(bucket, &file.key, message);
        let created = self
            .s3
            .create_multipart_upload()
            .bucket(bucket)
            .key(&file.key)
            .content_type(content_type(&file.key))
            .cache_control(self.cache_control(&file.key))
            .metadata("md5", &file.md5_hex)
            .send()
            .await
            .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let parts = self.upload_parts(bucket, file, &upload_id).await;
        let completed = match parts {
            Ok(parts) => {
                let done = aws_sdk_s3::types::CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build();
                self.s3
                    .complete_multipart_upload()
                    .bucket(bucket)
                    .key(&file.key)
                    .upload_id(&upload_id)
                    .multipart_upload(done)
                    .send()
                    .await
                    .map(|out| out.version_id().map(str::to_owned))
                    .map_err(|e| fail(DisplayErrorContext(&e).to_string()))
            }
            Err(e) => Err(e),
        };
        if completed.is_err() {
            // Parts of an abandoned upload are billed until aborted.
            let _ = self
                .s3
                .abort_multipart_upload()
                .bucket(bucket)
                .key(&file.key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        completed
    }

    /// Upload the parts one after the other, each streamed from its slice of the file: no
    /// part is held in memory, and no more than the size the caps were checked against is read
    /// (a file that shrank since fails here).
    async fn upload_parts(
        &self,
        bucket: &str,
        file: &LocalFile,
        upload_id: &str,
    ) -> Result<Vec<aws_sdk_s3::types::CompletedPart>, PublishError> {
        let fail = |message: String| Self::upload_error(bucket, &file.key, message);
        let mut parts = Vec::new();
        for (number, offset, length) in part_slices(file.size, self.options.part_size) {
            let body = ByteStream::read_from()
                .path(&file.path)
                .offset(offset)
                .length(Length::Exact(length))
                .build()
                .await
                .map_err(|e| fail(e.to_string()))?;
            let part = self
                .s3
                .upload_part()
                .bucket(bucket)
                .key(&file.key)
                .upload_id(upload_id)
                .part_number(number)
                .body(body)
                .send()
                .await
                .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
            parts.push(
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .build(),
            );
        }
        Ok(parts)
    }

    /// Keep a server-side copy of each of `keys` (live objects about to be replaced or
    /// deleted by deploy `sequence`) at `.edit-worker/objects/{md5}/{sequence}`: the deploys
    /// before this one need those bytes. Returns the MD5s kept. An object whose MD5 we cannot
    /// tell (uploaded by another tool, without our metadata) belongs to no deploy and is not
    /// kept.
    pub(crate) async fn keep_replaced(
        &self,
        bucket: &str,
        keys: &[&str],
        remote: &HashMap<String, String>,
        sequence: u64,
    ) -> Result<std::collections::HashSet<String>, PublishError> {
        let mut copied = std::collections::HashSet::new();
        // Owned keys: a stream of futures borrowing its items would not be `Send` for any
        // lifetime, which the step's future must be.
        let owned: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let kept: Vec<Option<String>> = futures::stream::iter(owned)
            .map(|key: String| async move { self.keep_one(bucket, &key, remote, sequence).await })
            .buffer_unordered(self.options.concurrency)
            .try_collect()
            .await?;
        copied.extend(kept.into_iter().flatten());
        Ok(copied)
    }

    /// Keep one live object (`key`) before deploy `sequence` replaces it: see
    /// [`Publisher::keep_replaced`]. Its MD5 when kept.
    pub(crate) async fn keep_one(
        &self,
        bucket: &str,
        key: &str,
        remote: &HashMap<String, String>,
        sequence: u64,
    ) -> Result<Option<String>, PublishError> {
        let etag = remote.get(key).map(String::as_str).unwrap_or_default();
        let md5 = if is_md5(etag) {
            Some(etag.to_owned())
        } else {
            self.stored_md5(bucket, key).await?
        };
        let Some(md5) = md5 else {
            tracing::warn!(%bucket, %key, "object of unknown content not kept before it is replaced");
            return Ok(None);
        };
        let target = stored_key(&md5, sequence);
        self.copy_object(bucket, &copy_source(bucket, key, None), &target, None)
            .await
            .map_err(|message| PublishError::Keep {
                bucket: bucket.into(),
                key: key.into(),
                message,
            })?;
        Ok(Some(md5))
    }

    /// CopyObject, server-side: `source` (as [`copy_source`] makes it) to `key`. With
    /// `serve_as` set, the copy gets the headers a publish would give the key (its type and
    /// caching, our MD5) instead of the source's: a rollback puts bytes back under their key.
    /// Returns the new version id (with versioning on).
    pub(crate) async fn copy_object(
        &self,
        bucket: &str,
        source: &str,
        key: &str,
        serve_as: Option<&str>,
    ) -> Result<Option<String>, String> {
        let copy = self
            .s3
            .copy_object()
            .bucket(bucket)
            .copy_source(source)
            .key(key);
        let copy = match serve_as {
            Some(md5) => copy
                .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                .content_type(content_type(key))
                .cache_control(self.cache_control(key))
                .metadata("md5", md5),
            None => copy,
        };
        let out = copy
            .send()
            .await
            .map_err(|e| DisplayErrorContext(&e).to_string())?;
        Ok(out.version_id().map(str::to_owned))
    }

    /// Delete objects, or single versions of them (permanently), 1000 per request.
    pub(crate) async fn delete_versions(
        &self,
        bucket: &str,
        targets: &[(String, Option<String>)],
    ) -> Result<(), PublishError> {
        let fail = |message: String| PublishError::Delete {
            bucket: bucket.into(),
            message,
        };
        for chunk in targets.chunks(DELETE_BATCH) {
            let objects = chunk
                .iter()
                .map(|(key, version)| {
                    ObjectIdentifier::builder()
                        .key(key)
                        .set_version_id(version.clone())
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(e.to_string()))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let out = self
                .s3
                .delete_objects()
                .bucket(bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
            if let Some(first) = out.errors().first() {
                return Err(fail(format!(
                    "{} of {} not deleted, first {:?}: {:?}",
                    out.errors().len(),
                    chunk.len(),
                    first.key(),
                    first.message()
                )));
            }
        }
        Ok(())
    }

    fn cache_control(&self, key: &str) -> &str {
        self.options
            .cache_rules
            .iter()
            .find(|rule| rule.matches(key))
            .map(|rule| rule.value.as_str())
            .unwrap_or("no-cache")
    }

    async fn delete(&self, bucket: &str, keys: &[String]) -> Result<(), PublishError> {
        let targets: Vec<(String, Option<String>)> =
            keys.iter().map(|key| (key.clone(), None)).collect();
        self.delete_versions(bucket, &targets).await
    }
}

/// The sequence number of the next deploy: one past the newest record.
pub(crate) fn next_sequence(listing: &Listing) -> u64 {
    listing.records.last().map_or(1, |r| r.sequence + 1)
}

/// The versions no retained deploy needs, `held` being the oldest retained deploy's record
/// (made at `held_at`, ms). For a key it holds, every version older than its one (S3 lists a
/// key's versions newest first, so this needs no clock). For a key it does not hold, the
/// versions replaced (by a newer version or a delete marker) before its record was written,
/// by whole seconds as S3 keeps time: a tie is kept, to go at a later deploy.
fn versions_past(
    versions: &Versions,
    held: &DeployRecord,
    held_at: i64,
) -> Vec<(String, Option<String>)> {
    let holds: HashMap<&str, &str> = held
        .files
        .iter()
        .filter_map(|f| Some((f.path.as_str(), f.version_id.as_deref()?)))
        .collect();
    let mut gone = Vec::new();
    for (key, history) in &versions.history {
        let old: Vec<&String> = match holds.get(key.as_str()) {
            Some(version) => match history.iter().position(|(v, _, _)| v == version) {
                Some(at) => history[at + 1..].iter().map(|(v, _, _)| v).collect(),
                None => Vec::new(),
            },
            None => {
                let markers = versions.markers.get(key).map(Vec::as_slice).unwrap_or(&[]);
                history
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, _, latest))| !latest)
                    .filter(|(at, (_, made, _))| {
                        // Replaced by the next newer version, or by a delete marker after it.
                        let by_version = at.checked_sub(1).map(|newer| history[newer].1);
                        let by_marker = markers.iter().filter(|m| *m >= made).min().copied();
                        let replaced = match (by_version, by_marker) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        replaced.is_some_and(|t| t / 1000 < held_at / 1000)
                    })
                    .map(|(_, (v, _, _))| v)
                    .collect()
            }
        };
        gone.extend(old.into_iter().map(|v| (key.clone(), Some(v.clone()))));
    }
    gone
}

/// What the scan of a build needs from the options: where multipart starts, and the caps.
#[derive(Debug, Clone, Copy)]
struct ScanLimits {
    multipart_threshold: u64,
    part_size: u64,
    max_file_bytes: u64,
    max_total_bytes: u64,
}

impl ScanLimits {
    fn of(options: &PublishOptions) -> ScanLimits {
        ScanLimits {
            multipart_threshold: options.multipart_threshold,
            part_size: options.part_size,
            max_file_bytes: options.max_file_bytes,
            max_total_bytes: options.max_total_bytes,
        }
    }
}

/// A regular file of the build as the walk found it, before it is read.
#[derive(Debug)]
struct FoundFile {
    key: String,
    path: PathBuf,
    size: u64,
}

/// Every regular file under `root`, with its key and MD5. The caps are checked on the sizes
/// first, so a build over them is refused before a byte of it is read; then each file is
/// hashed in chunks.
fn scan_build(root: &Path, limits: &ScanLimits) -> Result<Vec<LocalFile>, PublishError> {
    let found = walk_build(root)?;
    check_limits(&found, limits)?;
    let files = found
        .into_iter()
        .map(|file| hash_file(file, limits))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(files)
}

/// Every regular file under `root`, sorted by key. Symlinks are skipped, never followed, so a
/// link to `/etc/passwd` (or to anything outside the build) is never published.
fn walk_build(root: &Path) -> std::io::Result<Vec<FoundFile>> {
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        // A symlinked or missing output folder counts as no build at all.
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_symlink() {
                tracing::warn!(path = %path.display(), "symlink in the build folder is not published");
            } else if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let rel = path.strip_prefix(root).expect("under root");
                let Some(key) = rel.to_str().map(|s| s.replace('\\', "/")) else {
                    tracing::warn!(path = %path.display(), "file name is not UTF-8; not published");
                    continue;
                };
                // The entry's own metadata: a symlink is never followed here either.
                let size = entry.metadata()?.len();
                files.push(FoundFile { key, path, size });
            }
        }
    }
    // Sorted, so that the file named by a refusal is the same at every try.
    files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(files)
}

/// Refuse a build with a file over `max_file_bytes`, or over `max_total_bytes` in all.
fn check_limits(found: &[FoundFile], limits: &ScanLimits) -> Result<(), PublishError> {
    let mut total: u64 = 0;
    for file in found {
        if file.size > limits.max_file_bytes {
            return Err(PublishError::FileTooLarge {
                key: file.key.clone(),
                size: file.size,
                max: limits.max_file_bytes,
            });
        }
        total = total.saturating_add(file.size);
        if total > limits.max_total_bytes {
            return Err(PublishError::BuildTooLarge {
                key: file.key.clone(),
                total,
                max: limits.max_total_bytes,
            });
        }
    }
    Ok(())
}

/// Hash one file in chunks, reading exactly the size the walk saw (which the caps were checked
/// against): a file that changed size since is an error, not a silently different upload.
fn hash_file(file: FoundFile, limits: &ScanLimits) -> std::io::Result<LocalFile> {
    let multipart = file.size >= limits.multipart_threshold;
    let mut digests = Digests::new(multipart.then_some(limits.part_size));
    // O_NOFOLLOW: the walk saw a regular file here; a link put in its place since is refused.
    let opened = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&file.path)?
    };
    let mut reader = opened.take(file.size);
    let read = std::io::copy(&mut reader, &mut digests)?;
    let grew = reader.into_inner().read(&mut [0u8; 1])? > 0;
    if read != file.size || grew {
        return Err(std::io::Error::other(format!(
            "{} changed while it was read",
            file.path.display()
        )));
    }
    let (md5_hex, multipart_etag) = digests.finish();
    Ok(LocalFile {
        key: file.key,
        path: file.path,
        md5_hex,
        multipart_etag,
        size: file.size,
    })
}

/// The MD5s of a file written into it chunk by chunk (it is an `io::Write`, fed by
/// `io::copy`): of the whole file, and, for a file uploaded in parts, of each part, from which
/// the ETag S3 gives a multipart upload follows.
struct Digests {
    whole: Md5,
    parts: Option<PartDigests>,
}

/// The running MD5s of the parts of a multipart upload.
struct PartDigests {
    part_size: u64,
    current: Md5,
    /// Bytes in `current` so far.
    filled: u64,
    /// The finished parts' digests, one after the other: S3's ETag is their MD5.
    finished: Vec<u8>,
    count: usize,
}

impl Digests {
    /// `part_size`: the parts of a multipart upload, `None` for a single-part one.
    fn new(part_size: Option<u64>) -> Digests {
        Digests {
            whole: Md5::new(),
            parts: part_size.map(|part_size| PartDigests {
                part_size: part_size.max(1),
                current: Md5::new(),
                filled: 0,
                finished: Vec::new(),
                count: 0,
            }),
        }
    }

    /// The file's MD5 (hex) and, for a multipart upload, its ETag.
    fn finish(self) -> (String, Option<String>) {
        let md5 = format!("{:x}", self.whole.finalize());
        (md5, self.parts.map(PartDigests::etag))
    }
}

impl Write for Digests {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Never past the end of the current part: `write_all` hands the rest in again.
        let taken = match &mut self.parts {
            Some(parts) => parts.feed(buf),
            None => buf.len(),
        };
        self.whole.update(&buf[..taken]);
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PartDigests {
    /// Hash as much of `buf` as the current part has room for; returns how much.
    fn feed(&mut self, buf: &[u8]) -> usize {
        let room = self.part_size - self.filled;
        let taken = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.current.update(&buf[..taken]);
        self.filled += taken as u64;
        if self.filled == self.part_size {
            self.close_part();
        }
        taken
    }

    fn close_part(&mut self) {
        let part = std::mem::replace(&mut self.current, Md5::new());
        self.finished.extend_from_slice(&part.finalize());
        self.count += 1;
        self.filled = 0;
    }

    /// The MD5 of the parts' MD5s, then `-{parts}`.
    fn etag(mut self) -> String {
        if self.filled > 0 {
            self.close_part();
        }
        format!("{:x}-{}", Md5::digest(&self.finished), self.count)
    }
}

/// The parts of a multipart upload of `size` bytes: (part number from 1, offset, length), cut
/// where `Digests` cuts them, so the ETag S3 computes is the one we expect.
fn part_slices(size: u64, part_size: u64) -> impl Iterator<Item = (i32, u64, u64)> {
    let part_size = part_size.max(1);
    (0..size.div_ceil(part_size)).map(move |index| {
        let offset = index * part_size;
        let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
        (number, offset, part_size.min(size - offset))
    })
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

    fn limits(max_file_bytes: u64, max_total_bytes: u64) -> ScanLimits {
        ScanLimits {
            max_file_bytes,
            max_total_bytes,
            ..ScanLimits::of(&PublishOptions::default())
        }
    }

    /// Stream `bytes` through the digests in chunks of `chunk` bytes.
    fn digests_of(bytes: &[u8], part_size: Option<u64>, chunk: usize) -> (String, Option<String>) {
        let mut digests = Digests::new(part_size);
        for piece in bytes.chunks(chunk) {
            digests.write_all(piece).unwrap();
        }
        digests.finish()
    }

    #[test]
    fn content_types_carry_charset_for_text() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("_astro/a.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("logo.png"), "image/png");
        assert_eq!(content_type("x.svg"), "image/svg+xml; charset=utf-8");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }

    #[test]
    fn cache_rules_match_in_order() {
        let rules = CacheRule::parse_list(
            "_astro/=public, max-age=31536000, immutable; *.png = max-age=600; robots.txt=max-age=60",
        )
        .unwrap();
        let first = |key: &str| {
            rules
                .iter()
                .find(|r| r.matches(key))
                .map(|r| r.value.clone())
        };
        assert_eq!(
            first("_astro/a.1x2.css").unwrap(),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(first("img/logo.png").unwrap(), "max-age=600");
        assert_eq!(first("robots.txt").unwrap(), "max-age=60");
        assert_eq!(first("index.html"), None);
        assert!(CacheRule::parse_list("nonsense").is_err());
        let defaults = CacheRule::defaults();
        assert!(defaults[0].matches("_astro/x.css") && defaults[1].matches("index.html"));
    }

    #[test]
    fn multipart_etag_is_md5_of_part_md5s() {
        // Two parts of 5 bytes and one of 1: the digest of the three digests, then "-3".
        let mut digests = Vec::new();
        for part in [&b"aaaaa"[..], b"bbbbb", b"c"] {
            digests.extend_from_slice(&Md5::digest(part));
        }
        let expected = format!("{:x}-3", Md5::digest(&digests));
        // However the bytes arrive, the parts are cut at the same places.
        for chunk in [1, 3, 5, 7, 64] {
            let (md5, etag) = digests_of(b"aaaaabbbbbc", Some(5), chunk);
            assert_eq!(etag.as_deref(), Some(expected.as_str()), "chunk {chunk}");
            assert_eq!(md5, format!("{:x}", Md5::digest(b"aaaaabbbbbc")));
        }
        // A file of whole parts has no empty last part.
        let (_, etag) = digests_of(b"aaaaabbbbb", Some(5), 4);
        assert!(etag.unwrap().ends_with("-2"));
        assert_eq!(digests_of(b"abc", None, 2).1, None);
    }

    #[test]
    fn parts_cover_the_file_once_in_order() {
        let parts: Vec<_> = part_slices(11, 5).collect();
        assert_eq!(parts, vec![(1, 0, 5), (2, 5, 5), (3, 10, 1)]);
        assert_eq!(part_slices(10, 5).count(), 2);
        assert_eq!(part_slices(0, 5).count(), 0);
    }

    #[test]
    fn a_file_is_hashed_as_streamed_chunks_and_must_keep_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        // Larger than io::copy's buffer, and not a multiple of it.
        let bytes: Vec<u8> = (0..200_003u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let found = |size| FoundFile {
            key: "big.bin".into(),
            path: path.clone(),
            size,
        };
        let file = hash_file(found(bytes.len() as u64), &limits(u64::MAX, u64::MAX)).unwrap();
        assert_eq!(file.md5_hex, format!("{:x}", Md5::digest(&bytes)));
        // The walk saw it smaller, or larger, than it is now: an error either way.
        assert!(hash_file(found(100), &limits(u64::MAX, u64::MAX)).is_err());
        assert!(hash_file(found(300_000), &limits(u64::MAX, u64::MAX)).is_err());
    }

    #[test]
    fn the_caps_name_the_file_and_allow_exactly_the_limit() {
        let found = |sizes: &[(&str, u64)]| -> Vec<FoundFile> {
            sizes
                .iter()
                .map(|(key, size)| FoundFile {
                    key: (*key).into(),
                    path: PathBuf::from(key),
                    size: *size,
                })
                .collect()
        };
        let build = found(&[("a.css", 40), ("b.png", 60), ("c.html", 10)]);
        assert!(check_limits(&build, &limits(60, 110)).is_ok());
        let err = check_limits(&build, &limits(59, 110)).unwrap_err();
        assert!(
            matches!(&err, PublishError::FileTooLarge { key, size: 60, max: 59 } if key == "b.png"),
            "{err}"
        );
        assert_eq!(err.kind(), "build_too_large");
        let err = check_limits(&build, &limits(60, 109)).unwrap_err();
        assert!(
            matches!(&err, PublishError::BuildTooLarge { key, total: 110, max: 109 } if key == "c.html"),
            "{err}"
        );
        assert!(err.to_string().contains("PUBLISH_MAX_BYTES"), "{err}");
        assert!(err.would_repeat());
    }

    #[test]
    fn an_oversized_build_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dist");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), "hi").unwrap();
        let big = std::fs::File::create(root.join("huge.bin")).unwrap();
        // Sparse: a large file that costs no disk, and would take a while to hash.
        big.set_len(8 << 30).unwrap();
        let err = scan_build(&root, &limits(100 << 20, 1 << 30)).unwrap_err();
        assert!(
            matches!(&err, PublishError::FileTooLarge { key, .. } if key == "huge.bin"),
            "{err}"
        );
    }

    #[test]
    fn the_owner_error_says_who_owns_the_bucket_and_what_to_change() {
        let err = PublishError::OwnedElsewhere {
            bucket: "edit.amelia.webordinary.com".into(),
            owner_client: "amelia".into(),
            owner_project: "stamps".into(),
        };
        assert_eq!(err.kind(), "bucket_owned_elsewhere");
        let text = err.to_string();
        assert!(text.contains("amelia/stamps"), "{text}");
        assert!(
            text.contains("BUCKET_TEMPLATE should contain {projectId}"),
            "{text}"
        );
        let record = OwnerRecord::claiming(&WorkspaceKey {
            client_id: "amelia".into(),
            project_id: "stamps".into(),
        });
        let json: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(json["clientId"], "amelia");
        assert_eq!(json["projectId"], "stamps");
        assert!(json["since"].as_str().unwrap().ends_with('Z'), "{json}");
    }

    #[test]
    fn scan_skips_symlinks_and_finds_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dist");
        std::fs::create_dir_all(root.join("about")).unwrap();
        std::fs::write(root.join("index.html"), "hi").unwrap();
        std::fs::write(root.join("about/index.html"), "about").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        let all = limits(u64::MAX, u64::MAX);
        let keys: Vec<_> = scan_build(&root, &all)
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect();
        assert_eq!(keys, vec!["about/index.html", "index.html"]);
        // A symlinked output folder is no build.
        std::os::unix::fs::symlink(&root, dir.path().join("linked")).unwrap();
        assert!(
            scan_build(&dir.path().join("linked"), &all)
                .unwrap()
                .is_empty()
        );
    }
}
