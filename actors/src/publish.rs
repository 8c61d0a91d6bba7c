//! Publishes a build folder to an S3 bucket so that the bucket holds exactly that build.
//!
//! What to upload is decided by content, not by time: each local file's MD5 is compared with
//! the object's ETag (which is the MD5 for the single-part uploads we make). Order keeps the site
//! whole at every moment: assets first, then HTML that points at them, then deletions of what is
//! gone, and no deletion at all when any upload failed. Symlinks are never followed, and an empty
//! build is refused, so a broken build can never wipe a live site.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};

/// DeleteObjects takes at most this many keys per request.
const DELETE_BATCH: usize = 1000;

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublishReport {
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
}

impl PublishError {
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::EmptyBuild(_) => "empty_build",
            _ => "publish_failed",
        }
    }
}

/// A file of the build, ready to compare and upload.
#[derive(Debug, Clone)]
struct LocalFile {
    key: String,
    path: PathBuf,
    md5_hex: String,
    size: u64,
}

/// Uploads builds to S3. Cheap to clone: the SDK client is shared.
#[derive(Clone)]
pub struct Publisher {
    s3: aws_sdk_s3::Client,
    /// Uploads in flight per publish: S3 takes many at once, but each holds a file open.
    concurrency: usize,
}

impl Publisher {
    pub fn new(s3: aws_sdk_s3::Client, concurrency: usize) -> Publisher {
        Publisher {
            s3,
            concurrency: concurrency.max(1),
        }
    }

    /// Make `bucket` hold exactly the files under `build_dir`.
    pub async fn publish(
        &self,
        bucket: &str,
        build_dir: &Path,
    ) -> Result<PublishReport, PublishError> {
        let root = build_dir.to_owned();
        let local = tokio::task::spawn_blocking(move || scan_build(&root))
            .await
            .map_err(|e| PublishError::Walk(std::io::Error::other(e)))??;
        if local.is_empty() {
            return Err(PublishError::EmptyBuild(build_dir.to_owned()));
        }
        let remote = self.list(bucket).await?;

        let mut report = PublishReport::default();
        let (mut assets, mut pages) = (Vec::new(), Vec::new());
        for file in &local {
            if remote.get(&file.key) == Some(&file.md5_hex) {
                report.skipped += 1;
            } else if is_html(&file.key) {
                pages.push(file.clone());
            } else {
                assets.push(file.clone());
            }
        }
        // Assets before the pages that reference them, so no visitor sees a page whose
        // stylesheet is not there yet.
        for batch in [assets, pages] {
            let bytes = self.upload_all(bucket, batch.clone()).await?;
            report.uploaded += batch.len();
            report.bytes += bytes;
        }
        let keep: std::collections::HashSet<&str> = local.iter().map(|f| f.key.as_str()).collect();
        let stale: Vec<String> = remote
            .keys()
            .filter(|k| !keep.contains(k.as_str()))
            .cloned()
            .collect();
        self.delete(bucket, &stale).await?;
        report.deleted = stale.len();
        Ok(report)
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
                if let Some(key) = object.key() {
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
            .map(|file| self.upload(bucket, file))
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await?;
        Ok(sizes.iter().sum())
    }

    async fn upload(&self, bucket: &str, file: LocalFile) -> Result<u64, PublishError> {
        let fail = |message: String| PublishError::Upload {
            bucket: bucket.into(),
            key: file.key.clone(),
            message,
        };
        let body = ByteStream::from_path(&file.path)
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.s3
            .put_object()
            .bucket(bucket)
            .key(&file.key)
            .body(body)
            .content_type(content_type(&file.key))
            .cache_control(cache_control(&file.key))
            .metadata("md5", &file.md5_hex)
            .send()
            .await
            .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
        Ok(file.size)
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
fn scan_build(root: &Path) -> Result<Vec<LocalFile>, std::io::Error> {
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
                files.push(LocalFile {
                    key,
                    md5_hex: format!("{:x}", Md5::digest(&bytes)),
                    size: bytes.len() as u64,
                    path,
                });
            }
        }
    }
    files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(files)
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

/// Astro's hashed assets never change under the same name; everything else must be revalidated
/// so that an edit shows at once.
pub fn cache_control(key: &str) -> &'static str {
    if key.starts_with("_astro/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
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
    fn cache_rules() {
        assert_eq!(
            cache_control("_astro/a.1x2.css"),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(cache_control("index.html"), "no-cache");
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
        let keys: Vec<_> = scan_build(&root)
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect();
        assert_eq!(keys, vec!["about/index.html", "index.html"]);
        // A symlinked output folder is no build.
        std::os::unix::fs::symlink(&root, dir.path().join("linked")).unwrap();
        assert!(scan_build(&dir.path().join("linked")).unwrap().is_empty());
    }
}
