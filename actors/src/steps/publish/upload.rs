//! Writing to the bucket: uploads (single or multipart, streamed from disk, retried per file),
//! server-side copies that keep replaced bytes, and deletions; each with its `Cache-Control`.

#[allow(clippy::wildcard_imports)] // the publisher's shared types and imports
use super::*;

impl Publisher {
    /// Upload files with bounded concurrency; the first failure stops the batch.
    pub(super) async fn upload_all(
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
    pub(super) async fn upload_with_retry(
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

    pub(super) fn upload_error(bucket: &str, key: &str, message: String) -> PublishError {
        PublishError::Upload {
            bucket: bucket.into(),
            key: key.into(),
            message,
        }
    }

    /// Upload one file; its version id comes back (with versioning on).
    pub(super) async fn upload(
        &self,
        bucket: &str,
        file: &LocalFile,
    ) -> Result<Option<String>, PublishError> {
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

    pub(super) async fn upload_multipart(
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
    pub(super) async fn upload_parts(
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

    pub(super) fn cache_control(&self, key: &str) -> &str {
        self.options
            .cache_rules
            .iter()
            .find(|rule| rule.matches(key))
            .map(|rule| rule.value.as_str())
            .unwrap_or("no-cache")
    }

    pub(super) async fn delete(&self, bucket: &str, keys: &[String]) -> Result<(), PublishError> {
        let targets: Vec<(String, Option<String>)> =
            keys.iter().map(|key| (key.clone(), None)).collect();
        self.delete_versions(bucket, &targets).await
    }
}

/// The parts of a multipart upload of `size` bytes: (part number from 1, offset, length), cut
/// where `Digests` cuts them, so the ETag S3 computes is the one we expect.
pub(super) fn part_slices(size: u64, part_size: u64) -> impl Iterator<Item = (i32, u64, u64)> {
    let part_size = part_size.max(1);
    (0..size.div_ceil(part_size)).map(move |index| {
        let offset = index * part_size;
        let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
        (number, offset, part_size.min(size - offset))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_file_once_in_order() {
        let parts: Vec<_> = part_slices(11, 5).collect();
        assert_eq!(parts, vec![(1, 0, 5), (2, 5, 5), (3, 10, 1)]);
        assert_eq!(part_slices(10, 5).count(), 2);
        assert_eq!(part_slices(0, 5).count(), 0);
    }
}
