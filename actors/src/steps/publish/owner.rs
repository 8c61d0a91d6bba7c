//! Who may publish into a bucket: its owner record (`.edit-worker/owner.json`, claimed by a
//! conditional write on the first publish, so no publish writes into a bucket another
//! workspace owns) and the lease fence (`.edit-worker/lease/...`, raised to the publishing
//! holder's token, so an older holder's publish is refused); both read and written as small
//! conditional records.

#[allow(clippy::wildcard_imports)] // the publisher's shared types and imports
use super::*;

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
    pub lease: crate::delivery::lease_check::LeaseCheck,
}

impl BucketFence {
    pub fn for_workspace(
        workspace: &crate::contract::message::WorkspaceKey,
        token: u64,
        lease: crate::delivery::lease_check::LeaseCheck,
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
pub(super) struct FenceRecord {
    token: u64,
}

/// Who a bucket belongs to (`.edit-worker/owner.json`). Written once, by the first workspace
/// that publishes into the bucket, and never changed or deleted by a publish: an operator who
/// gives the bucket to another workspace deletes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct OwnerRecord {
    client_id: String,
    project_id: String,
    /// When the workspace claimed the bucket (RFC 3339): for the operator reading a refusal.
    since: String,
}

impl OwnerRecord {
    pub(super) fn claiming(workspace: &WorkspaceKey) -> OwnerRecord {
        OwnerRecord {
            client_id: workspace.client_id.clone(),
            project_id: workspace.project_id.clone(),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }

    pub(super) fn owned_by(&self, workspace: &WorkspaceKey) -> bool {
        self.client_id == workspace.client_id && self.project_id == workspace.project_id
    }
}

/// An owner record as this process last read or wrote it. It is still the bucket's while a
/// listing shows the record with this ETag, so checking it costs no request of its own.
#[derive(Debug, Clone)]
pub(super) struct KnownOwner {
    record: OwnerRecord,
    /// Without quotes, as listings are compared.
    etag: String,
}

/// One of our records in a bucket as read, with the ETag that a conditional write of its next
/// version must name (`If-Match`).
pub(super) struct StoredRecord<T> {
    value: T,
    etag: String,
}

/// What a conditional write of a record came to.
pub(super) enum Written {
    /// It took; the new version's ETag, when the server gave one.
    Took(Option<String>),
    /// Someone wrote first (412 or 409): read the record again.
    LostRace,
}

impl Publisher {
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
    pub(super) fn known_owner(&self, bucket: &str, etag: &str) -> Option<OwnerRecord> {
        let owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        owners
            .get(bucket)
            .filter(|known| known.etag == etag)
            .map(|known| known.record.clone())
    }

    /// Keep `record` as the bucket's owner while its ETag stays (without one there is nothing
    /// to recognise it by: it is read again next time).
    pub(super) fn remember(
        &self,
        bucket: &str,
        record: OwnerRecord,
        etag: Option<&str>,
    ) -> OwnerRecord {
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
    pub(super) async fn claim(
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
    pub(super) async fn read_record<T: serde::de::DeserializeOwned>(
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
    pub(super) async fn write_record<T: serde::Serialize>(
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
