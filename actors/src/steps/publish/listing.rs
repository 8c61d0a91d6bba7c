//! What is in the bucket: the listing a publish compares the build with (stored MD5s, the
//! deploy records, kept copies rolled up), or with versioning on the version listing; the
//! deploys' sequence numbers and which old versions retention may remove.

#[allow(clippy::wildcard_imports)] // the publisher's shared types and imports
use super::*;

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
pub(super) struct VersionEntry {
    key: String,
    version_id: String,
    /// `None` for a delete marker.
    etag: Option<String>,
    modified_ms: i64,
    latest: bool,
}

/// `LastModified` in ms since the epoch (0 when a server gives none: oldest of all).
pub(super) fn modified_ms(time: Option<&aws_sdk_s3::primitives::DateTime>) -> i64 {
    time.and_then(|t| t.to_millis().ok()).unwrap_or(0)
}

impl Listing {
    /// Put one live object where it belongs: the site, the owner record, this workspace's deploy
    /// records, the kept copies; other bookkeeping is left out.
    pub(super) fn sort(
        &mut self,
        key: &str,
        etag: String,
        modified: i64,
        workspace: Option<&WorkspaceKey>,
    ) {
        if key == OWNER_KEY {
            self.owner_etag = Some(etag);
        } else if let Some((md5, sequence)) = key
            .strip_prefix(crate::steps::publish::deploys::OBJECTS_DIR)
            .and_then(crate::steps::publish::deploys::parse_stored)
        {
            self.stored
                .entry(md5.to_owned())
                .or_default()
                .push(sequence);
        } else if let Some(id) = workspace
            .and_then(|w| key.strip_prefix(&records_prefix(w)))
            .and_then(|name| name.strip_suffix(".json"))
            .filter(|id| crate::steps::publish::deploys::is_deploy_id(id))
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

pub(super) fn list_error<E, R>(bucket: &str, e: aws_sdk_s3::error::SdkError<E, R>) -> PublishError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    PublishError::List {
        bucket: bucket.into(),
        message: DisplayErrorContext(&e).to_string(),
    }
}

impl Publisher {
    pub(super) async fn with_stored_md5(
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
    pub(super) async fn list_range(
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
    pub(super) async fn list_versions(
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
                if entry
                    .key
                    .starts_with(crate::steps::publish::deploys::DEPLOYS_DIR)
                {
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
pub(super) fn versions_past(
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
