//! A rollback's work in the bucket: find the deploy its `to` names, then make the bucket hold
//! exactly that deploy's files again, by server-side copies (no byte passes through the worker,
//! nothing is built), in the publisher's order: assets, then pages, then deletions. The bytes
//! the rollback replaces are kept first, as a publish keeps them, so a rollback can itself be
//! rolled back; and the rollback is recorded as a deploy of its own.

use std::collections::{HashMap, HashSet};

use aws_sdk_s3::error::DisplayErrorContext;
use futures::{StreamExt, TryStreamExt};

use crate::contract::message::{RollbackTarget, WorkspaceKey};
use crate::contract::status::PublishReport;
use crate::steps::publish::deploys::{
    DeployMeta, DeployRecord, DeployedFile, MAX_RECORD_BYTES, ResolvedDeploy, commit_prefix_of,
    copy_source, is_deploy_id, is_md5, record_key, records_prefix, sequence_of, stored_key,
};
use crate::steps::publish::{
    BucketFence, KeptCopies, Placed, PublishError, Publisher, next_sequence,
};

/// A file to put back, and where its bytes come from (owned: the copies run as a stream of
/// futures that must be `Send` whatever the borrows).
struct Restore {
    file: DeployedFile,
    /// A copy source ([`copy_source`]).
    source: String,
}

impl Publisher {
    /// The record of the deploy `target` names among `workspace`'s deploys in `bucket`. A
    /// target that names nothing recorded (never deployed, or past retention) is
    /// `unknown_deploy`.
    pub async fn resolve_deploy(
        &self,
        workspace: &WorkspaceKey,
        bucket: &str,
        target: &RollbackTarget,
    ) -> Result<ResolvedDeploy, PublishError> {
        let unknown = |reason: &str| PublishError::UnknownDeploy {
            target: target.to_string(),
            reason: reason.to_owned(),
        };
        // Newest first.
        let ids = self.deploy_ids(workspace, bucket).await?;
        let Some(live) = ids.first().cloned() else {
            return Err(unknown("this workspace has no deploys in its bucket"));
        };
        let record = match target {
            RollbackTarget::Previous => match ids.get(1) {
                Some(id) => self.read_deploy(workspace, bucket, id).await?,
                None => return Err(unknown("there is no deploy before the live one")),
            },
            RollbackTarget::Deploy(wanted) => match ids.iter().find(|id| *id == wanted) {
                Some(id) => self.read_deploy(workspace, bucket, id).await?,
                None => {
                    return Err(unknown(
                        "no deploy of this workspace has that id (never made, or past retention)",
                    ));
                }
            },
            RollbackTarget::Commit(commit) => {
                let mut found = None;
                // The id carries the commit's first 12 digits: only records that may match are
                // read, newest first, and the full id in the record decides.
                for id in &ids {
                    let prefix = commit_prefix_of(id).unwrap_or_default();
                    let may_match = if commit.len() <= prefix.len() {
                        prefix.starts_with(commit.as_str())
                    } else {
                        commit.starts_with(prefix)
                    };
                    if !may_match {
                        continue;
                    }
                    let record = self.read_deploy(workspace, bucket, id).await?;
                    if record.commit.starts_with(commit.as_str()) {
                        found = Some(record);
                        break;
                    }
                }
                match found {
                    Some(record) => record,
                    None => {
                        return Err(unknown(
                            "no retained deploy of this workspace is of that commit (never deployed, or past retention)",
                        ));
                    }
                }
            }
        };
        Ok(ResolvedDeploy { record, live })
    }

    /// The workspace's deploy ids in `bucket`, newest first (one listing of their prefix).
    pub async fn deploy_ids(
        &self,
        workspace: &WorkspaceKey,
        bucket: &str,
    ) -> Result<Vec<String>, PublishError> {
        let prefix = records_prefix(workspace);
        let mut ids = Vec::new();
        let mut pages = self
            .s3()
            .list_objects_v2()
            .bucket(bucket)
            .prefix(&prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| PublishError::List {
                bucket: bucket.into(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
            for object in page.contents() {
                let id = object
                    .key()
                    .and_then(|k| k.strip_prefix(&prefix))
                    .and_then(|name| name.strip_suffix(".json"))
                    .filter(|id| is_deploy_id(id));
                if let Some(id) = id {
                    ids.push(id.to_owned());
                }
            }
        }
        ids.sort_by_key(|id| std::cmp::Reverse(sequence_of(id).unwrap_or(0)));
        Ok(ids)
    }

    /// One deploy record.
    pub async fn read_deploy(
        &self,
        workspace: &WorkspaceKey,
        bucket: &str,
        id: &str,
    ) -> Result<DeployRecord, PublishError> {
        let key = record_key(workspace, id);
        let fail = |message: String| PublishError::DeployRecord {
            bucket: bucket.into(),
            message: format!("{key}: {message}"),
        };
        let object = self
            .s3()
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
        if object.content_length().unwrap_or(0) > MAX_RECORD_BYTES {
            return Err(fail("larger than a deploy record can be".into()));
        }
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .into_bytes();
        serde_json::from_slice(&bytes).map_err(|e| fail(e.to_string()))
    }

    /// Make `bucket` hold exactly the files of `target` again, and record that as a deploy
    /// described by `meta`. Every source is found before anything is written: a deploy whose
    /// bytes are no longer all kept is `unknown_deploy`, and the bucket stays as it was.
    pub async fn restore(
        &self,
        workspace: &WorkspaceKey,
        bucket: &str,
        target: &DeployRecord,
        meta: &DeployMeta,
        fence: Option<&BucketFence>,
    ) -> Result<PublishReport, PublishError> {
        let still_held = || fence.map_or(Ok(()), |f| f.lease.check());
        still_held()?;
        let versioned = self.versioned(bucket).await?;
        let listing = self
            .list(bucket, Some(workspace), versioned, KeptCopies::Listed)
            .await?;
        self.confirm_owner(bucket, workspace, listing.owner_etag.as_deref())
            .await?;
        if let Some(fence) = fence {
            self.raise_fence(bucket, fence).await?;
        }
        let live = &listing.objects;
        let live_versions = listing.versions.as_ref().map(|v| &v.live);
        let wanted: HashSet<&str> = target.files.iter().map(|f| f.path.as_str()).collect();
        let mut changed: Vec<&DeployedFile> = Vec::new();
        let mut skipped = 0;
        for file in &target.files {
            let same_bytes = live.get(&file.path) == Some(&file.md5);
            let same_version = file.version_id.is_some()
                && live_versions.and_then(|v| v.get(&file.path)) == file.version_id.as_ref();
            if same_bytes || same_version {
                skipped += 1;
            } else {
                changed.push(file);
            }
        }
        let mut stale: Vec<String> = live
            .keys()
            .filter(|k| !wanted.contains(k.as_str()))
            .cloned()
            .collect();
        stale.sort();
        // What this rollback replaces or deletes: kept before it is (without versioning), so
        // those bytes are a source too.
        let replaced: Vec<&str> = changed
            .iter()
            .map(|f| f.path.as_str())
            .filter(|key| live.contains_key(*key))
            .chain(stale.iter().map(String::as_str))
            .collect();
        let replaced_set: HashSet<&str> = replaced.iter().copied().collect();
        let to_be_kept: HashSet<&str> = if versioned {
            HashSet::new()
        } else {
            replaced
                .iter()
                .filter_map(|k| live.get(*k).map(String::as_str))
                .filter(|etag| is_md5(etag))
                .collect()
        };
        // Live objects that stay as they are, by their bytes: a source as good as any.
        let staying: HashMap<&str, &str> = live
            .iter()
            .filter(|(key, etag)| is_md5(etag) && !replaced_set.contains(key.as_str()))
            .map(|(key, etag)| (etag.as_str(), key.as_str()))
            .collect();
        let mut restores = Vec::with_capacity(changed.len());
        // Whether a copy reads bytes this rollback keeps: then every keep comes first.
        let mut keeps_first = false;
        for file in changed {
            let version = file.version_id.as_deref().filter(|v| {
                listing
                    .versions
                    .as_ref()
                    .is_some_and(|all| all.all.contains(&(file.path.clone(), (*v).to_owned())))
            });
            let source = if let Some(version) = version {
                copy_source(bucket, &file.path, Some(version))
            } else if let Some(sequence) =
                listing.stored.get(&file.md5).and_then(|s| s.iter().max())
            {
                copy_source(bucket, &stored_key(&file.md5, *sequence), None)
            } else if to_be_kept.contains(file.md5.as_str()) {
                // Kept by this very rollback, below, before anything is replaced.
                keeps_first = true;
                copy_source(
                    bucket,
                    &stored_key(&file.md5, next_sequence(&listing)),
                    None,
                )
            } else if let Some(key) = staying.get(file.md5.as_str()) {
                copy_source(bucket, key, None)
            } else {
                return Err(PublishError::UnknownDeploy {
                    target: format!("deploy {}", target.deploy_id),
                    reason: format!(
                        "the bytes of {} are no longer kept in the bucket (past retention, or removed)",
                        file.path
                    ),
                });
            };
            restores.push(Restore {
                file: file.clone(),
                source,
            });
        }

        let sequence = next_sequence(&listing);
        still_held()?;
        if !versioned && keeps_first {
            self.keep_replaced(bucket, &replaced, live, sequence)
                .await?;
        }
        // Keep a key's live bytes only where this rollback must (no versions) and has not yet.
        let keep_here = !versioned && !keeps_first;
        let (pages, assets): (Vec<Restore>, Vec<Restore>) = restores
            .into_iter()
            .partition(|r| crate::steps::publish::is_html(&r.file.path));
        let mut report = PublishReport {
            skipped,
            ..PublishReport::default()
        };
        report
            .changed
            .extend(assets.iter().chain(&pages).map(|r| r.file.path.clone()));
        report.uploaded = assets.len() + pages.len();
        // First the assets, each kept and then replaced in one go, beside the keeping of the
        // pages and of what goes: one round of requests fewer than keeping everything first,
        // and still every key kept before it is written. Then the pages, as a publish orders.
        let asset_paths: HashSet<String> = assets.iter().map(|r| r.file.path.clone()).collect();
        let mut first: Vec<(Option<String>, Option<Restore>)> = assets
            .into_iter()
            .map(|r| {
                let keep =
                    (keep_here && live.contains_key(&r.file.path)).then(|| r.file.path.clone());
                (keep, Some(r))
            })
            .collect();
        if keep_here {
            first.extend(
                replaced
                    .iter()
                    .filter(|key| !asset_paths.contains(**key))
                    .map(|key| (Some((*key).to_owned()), None)),
            );
        }
        let placed: Vec<Option<Placed>> = futures::stream::iter(first)
            .map(|(keep, restore)| async move {
                if let Some(key) = keep {
                    self.keep_one(bucket, &key, live, sequence).await?;
                }
                match restore {
                    Some(r) => self.put_back(bucket, r).await.map(Some),
                    None => Ok(None),
                }
            })
            .buffer_unordered(self.concurrency())
            .try_collect()
            .await?;
        still_held()?;
        let mut placed: Vec<Placed> = placed.into_iter().flatten().collect();
        let pages: Vec<Placed> = futures::stream::iter(pages)
            .map(|r| self.put_back(bucket, r))
            .buffer_unordered(self.concurrency())
            .try_collect()
            .await?;
        placed.extend(pages);
        let mut placed_versions = HashMap::new();
        for placed in placed {
            report.bytes += placed.size;
            if let Some(version) = placed.version_id {
                placed_versions.insert(placed.key, version);
            }
        }
        still_held()?;
        let gone: Vec<(String, Option<String>)> =
            stale.iter().map(|key| (key.clone(), None)).collect();
        self.delete_versions(bucket, &gone).await?;
        report.deleted = stale.len();
        report.changed.extend(stale);

        let files = target
            .files
            .iter()
            .map(|f| DeployedFile {
                version_id: placed_versions
                    .get(&f.path)
                    .or_else(|| live_versions.and_then(|l| l.get(&f.path)))
                    .cloned()
                    .or_else(|| f.version_id.clone().filter(|_| versioned)),
                ..f.clone()
            })
            .collect();
        let record = self
            .record_deploy(bucket, workspace, meta, &listing, versioned, files)
            .await?;
        report.deploy_id = Some(record.deploy_id);
        Ok(report)
    }

    /// Copy one file's bytes back under its key, with the headers a publish gives it.
    async fn put_back(&self, bucket: &str, restore: Restore) -> Result<Placed, PublishError> {
        let file = &restore.file;
        let version_id = self
            .copy_object(bucket, &restore.source, &file.path, Some(&file.md5))
            .await
            .map_err(|message| PublishError::Upload {
                bucket: bucket.into(),
                key: file.path.clone(),
                message,
            })?;
        Ok(Placed {
            key: file.path.clone(),
            size: file.size,
            version_id,
        })
    }
}
