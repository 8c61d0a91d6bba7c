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

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};

/// DeleteObjects takes at most this many keys per request.
const DELETE_BATCH: usize = 1000;
/// Below this many objects in the bucket the deletion cap does not apply: a tiny site may
/// legitimately change most of its files.
const DELETE_CAP_MIN_OBJECTS: usize = 10;

/// One `Cache-Control` rule: keys matching `pattern` get `value`. A pattern ending in `/` is a
/// key prefix (`_astro/`), `*.ext` matches a suffix, `*` matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRule {
    pub pattern: String,
    pub value: String,
}

impl CacheRule {
    fn matches(&self, key: &str) -> bool {
        if self.pattern == "*" {
            true
        } else if let Some(suffix) = self.pattern.strip_prefix('*') {
            key.ends_with(suffix)
        } else if self.pattern.ends_with('/') {
            key.starts_with(&self.pattern)
        } else {
            key == self.pattern
        }
    }

    /// Parse `pattern=value;pattern=value` (values may contain `=` and `,`, not `;`).
    pub fn parse_list(text: &str) -> Result<Vec<CacheRule>, String> {
        text.split(';')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|rule| {
                let (pattern, value) = rule
                    .split_once('=')
                    .ok_or_else(|| format!("`{rule}` is not pattern=value"))?;
                let (pattern, value) = (pattern.trim(), value.trim());
                if pattern.is_empty() || value.is_empty() {
                    return Err(format!("`{rule}` is not pattern=value"));
                }
                Ok(CacheRule {
                    pattern: pattern.into(),
                    value: value.into(),
                })
            })
            .collect()
    }

    /// Astro's hashed assets never change under the same name; everything else must be
    /// revalidated so that an edit shows at once.
    pub fn defaults() -> Vec<CacheRule> {
        vec![
            CacheRule {
                pattern: "_astro/".into(),
                value: "public, max-age=31536000, immutable".into(),
            },
            CacheRule {
                pattern: "*".into(),
                value: "no-cache".into(),
            },
        ]
    }
}

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Uploads in flight per publish: S3 takes many at once, but each holds a file open (and a
    /// multipart part in memory).
    pub concurrency: usize,
    /// First match wins; keys no rule matches get `no-cache`.
    pub cache_rules: Vec<CacheRule>,
    /// Files at least this large are uploaded in parts of `part_size`.
    pub multipart_threshold: u64,
    pub part_size: u64,
    /// A publish that would delete more than this share of the bucket's objects fails...
    pub max_delete_percent: u8,
    /// ...unless this is set.
    pub allow_mass_delete: bool,
    /// Attempts per file, on top of the SDK's own retries of each request.
    pub file_attempts: u32,
    /// Uploads at once over every publish of the process: many sessions publishing together
    /// share the network and S3's request rate.
    pub total_concurrency: usize,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            concurrency: 16,
            cache_rules: CacheRule::defaults(),
            multipart_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            max_delete_percent: 50,
            allow_mass_delete: false,
            file_attempts: 3,
            total_concurrency: 64,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublishReport {
    /// Keys uploaded or deleted: what a CDN in front of the bucket must forget.
    #[serde(skip)]
    pub changed: Vec<String>,
    pub uploaded: usize,
    pub skipped: usize,
    pub deleted: usize,
    pub bytes: u64,
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
}

impl PublishError {
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::EmptyBuild(_) => "empty_build",
            PublishError::TooManyDeletions { .. } => "too_many_deletions",
            PublishError::LeaseLost(_) | PublishError::Fenced { .. } => "lease_lost",
            _ => "publish_failed",
        }
    }
}

/// Keys under this prefix are the worker's own (the lease fences), never the site's: a publish
/// neither lists nor deletes them.
pub const RESERVED_PREFIX: &str = ".edit-worker/";

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

/// A file of the build, ready to compare and upload.
#[derive(Debug, Clone)]
struct LocalFile {
    key: String,
    path: PathBuf,
    md5_hex: String,
    /// The ETag S3 gives this file when we upload it in parts (`None` below the threshold).
    multipart_etag: Option<String>,
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
    uploads: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Publisher {
    pub fn new(s3: aws_sdk_s3::Client, mut options: PublishOptions) -> Publisher {
        options.concurrency = options.concurrency.max(1);
        options.part_size = options.part_size.max(5 * 1024 * 1024);
        options.multipart_threshold = options.multipart_threshold.max(options.part_size);
        options.file_attempts = options.file_attempts.max(1);
        let uploads = std::sync::Arc::new(tokio::sync::Semaphore::new(
            options.total_concurrency.max(1),
        ));
        Publisher {
            s3,
            options,
            uploads,
        }
    }

    /// Make `bucket` hold exactly the files under `build_dir`.
    pub async fn publish(
        &self,
        bucket: &str,
        build_dir: &Path,
        fence: Option<&BucketFence>,
    ) -> Result<PublishReport, PublishError> {
        if let Some(fence) = fence {
            fence.lease.check()?;
            self.raise_fence(bucket, fence).await?;
        }
        let still_held = || fence.map_or(Ok(()), |f| f.lease.check());
        let root = build_dir.to_owned();
        let part_size = self.options.part_size;
        let threshold = self.options.multipart_threshold;
        // Hash the build and list the bucket at the same time: neither needs the other.
        let scan = tokio::task::spawn_blocking(move || scan_build(&root, threshold, part_size));
        let (local, remote) = tokio::join!(scan, self.list(bucket));
        let local = local.map_err(|e| PublishError::Walk(std::io::Error::other(e)))??;
        let remote = remote?;
        if local.is_empty() {
            return Err(PublishError::EmptyBuild(build_dir.to_owned()));
        }
        let plan = self.plan(bucket, &local, &remote).await?;
        let total = remote.len();
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

        let mut report = PublishReport {
            skipped: plan.skipped,
            ..PublishReport::default()
        };
        // Assets before the pages that reference them, so no visitor sees a page whose
        // stylesheet is not there yet; each batch ends before the next begins.
        for batch in [plan.assets, plan.pages] {
            still_held()?;
            let count = batch.len();
            report.changed.extend(batch.iter().map(|f| f.key.clone()));
            report.bytes += self.upload_all(bucket, batch).await?;
            report.uploaded += count;
        }
        still_held()?;
        self.delete(bucket, &plan.stale).await?;
        report.deleted = plan.stale.len();
        report.changed.extend(plan.stale);
        Ok(report)
    }

    /// Raise the bucket's fence to this holder's token; refuse when it is already past it.
    async fn raise_fence(&self, bucket: &str, fence: &BucketFence) -> Result<(), PublishError> {
        let store_err = |message: String| PublishError::FenceStore {
            bucket: bucket.into(),
            message,
        };
        for _ in 0..4 {
            let got = self
                .s3
                .get_object()
                .bucket(bucket)
                .key(&fence.key)
                .send()
                .await;
            let (found, etag) = match got {
                Ok(object) => {
                    let etag = object.e_tag().unwrap_or_default().to_owned();
                    let bytes = object
                        .body
                        .collect()
                        .await
                        .map_err(|e| store_err(e.to_string()))?
                        .into_bytes();
                    let record: FenceRecord =
                        serde_json::from_slice(&bytes).map_err(|e| store_err(e.to_string()))?;
                    (Some(record.token), Some(etag))
                }
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => (None, None),
                Err(e) => return Err(store_err(DisplayErrorContext(&e).to_string())),
            };
            match found {
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
            let body =
                serde_json::to_vec(&FenceRecord { token: fence.token }).expect("fences serialize");
            let put = self
                .s3
                .put_object()
                .bucket(bucket)
                .key(&fence.key)
                .content_type("application/json")
                .cache_control("no-store")
                .body(body.into());
            let put = match etag {
                Some(etag) => put.if_match(etag),
                None => put.if_none_match("*"),
            };
            match put.send().await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    if !matches!(status, Some(412 | 409)) {
                        return Err(store_err(DisplayErrorContext(&e).to_string()));
                    }
                    // Someone wrote first: read it again.
                }
            }
        }
        Err(store_err("the fence kept changing under us".into()))
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
    async fn stored_md5(&self, bucket: &str, key: &str) -> Result<Option<String>, PublishError> {
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

    /// Key → ETag (without quotes) of every object in the bucket.
    async fn list(&self, bucket: &str) -> Result<HashMap<String, String>, PublishError> {
        let mut objects = HashMap::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| PublishError::List {
                bucket: bucket.into(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
            for object in page.contents() {
                if let Some(key) = object.key()
                    && !key.starts_with(RESERVED_PREFIX)
                {
                    let etag = object.e_tag().unwrap_or_default().trim_matches('"');
                    objects.insert(key.to_owned(), etag.to_owned());
                }
            }
        }
        Ok(objects)
    }

    /// Upload files with bounded concurrency; the first failure stops the batch.
    async fn upload_all(&self, bucket: &str, files: Vec<LocalFile>) -> Result<u64, PublishError> {
        let sizes: Vec<u64> = futures::stream::iter(files)
            .map(|file| self.upload_with_retry(bucket, file))
            .buffer_unordered(self.options.concurrency)
            .try_collect()
            .await?;
        Ok(sizes.iter().sum())
    }

    /// The SDK retries each request; this retries the whole file (a multipart upload that lost
    /// a part starts over), with backoff.
    async fn upload_with_retry(&self, bucket: &str, file: LocalFile) -> Result<u64, PublishError> {
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
                Ok(size) => return Ok(size),
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

    async fn upload(&self, bucket: &str, file: &LocalFile) -> Result<u64, PublishError> {
        let fail = |message: String| Self::upload_error(bucket, &file.key, message);
        let body = ByteStream::from_path(&file.path)
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.s3
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
        Ok(file.size)
    }

    async fn upload_multipart(&self, bucket: &str, file: &LocalFile) -> Result<u64, PublishError> {
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
                    .map(drop)
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
        completed.map(|()| file.size)
    }

    async fn upload_parts(
        &self,
        bucket: &str,
        file: &LocalFile,
        upload_id: &str,
    ) -> Result<Vec<aws_sdk_s3::types::CompletedPart>, PublishError> {
        use tokio::io::AsyncReadExt;
        let fail = |message: String| Self::upload_error(bucket, &file.key, message);
        let mut reader = tokio::fs::File::open(&file.path)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut parts = Vec::new();
        let mut number = 1;
        loop {
            let mut chunk = Vec::with_capacity(self.options.part_size as usize);
            let read = (&mut reader)
                .take(self.options.part_size)
                .read_to_end(&mut chunk)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if read == 0 {
                break;
            }
            let part = self
                .s3
                .upload_part()
                .bucket(bucket)
                .key(&file.key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(chunk))
                .send()
                .await
                .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
            parts.push(
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .build(),
            );
            number += 1;
        }
        Ok(parts)
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
        let fail = |message: String| PublishError::Delete {
            bucket: bucket.into(),
            message,
        };
        for chunk in keys.chunks(DELETE_BATCH) {
            let objects = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
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
                    "{} of {} keys not deleted, first {:?}: {:?}",
                    out.errors().len(),
                    chunk.len(),
                    first.key(),
                    first.message()
                )));
            }
        }
        Ok(())
    }
}

/// Every regular file under `root`, with its key and MD5. Symlinks are skipped, never followed,
/// so a link to `/etc/passwd` (or to anything outside the build) is never published.
fn scan_build(
    root: &Path,
    multipart_threshold: u64,
    part_size: u64,
) -> Result<Vec<LocalFile>, std::io::Error> {
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
                let bytes = std::fs::read(&path)?;
                let size = bytes.len() as u64;
                files.push(LocalFile {
                    key,
                    md5_hex: format!("{:x}", Md5::digest(&bytes)),
                    multipart_etag: (size >= multipart_threshold)
                        .then(|| multipart_etag(&bytes, part_size)),
                    size,
                    path,
                });
            }
        }
    }
    files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(files)
}

/// The ETag S3 computes for a multipart upload: the MD5 of the parts' MD5s, then `-{parts}`.
fn multipart_etag(bytes: &[u8], part_size: u64) -> String {
    let mut digests = Vec::new();
    let mut parts = 0;
    for chunk in bytes.chunks(part_size as usize) {
        digests.extend_from_slice(&Md5::digest(chunk));
        parts += 1;
    }
    format!("{:x}-{parts}", Md5::digest(&digests))
}

fn is_html(key: &str) -> bool {
    key.ends_with(".html") || key.ends_with(".htm")
}

/// `Content-Type` by extension, with a charset for text so that browsers do not guess.
pub fn content_type(key: &str) -> String {
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
        assert_eq!(multipart_etag(b"aaaaabbbbbc", 5), expected);
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
        let keys: Vec<_> = scan_build(&root, u64::MAX, 5 << 20)
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect();
        assert_eq!(keys, vec!["about/index.html", "index.html"]);
        // A symlinked output folder is no build.
        std::os::unix::fs::symlink(&root, dir.path().join("linked")).unwrap();
        assert!(
            scan_build(&dir.path().join("linked"), u64::MAX, 5 << 20)
                .unwrap()
                .is_empty()
        );
    }
}
