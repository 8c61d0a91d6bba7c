//! `LEASE_STORE`: where the records and leases live (a folder of this worker's, or an S3
//! prefix every worker shares). The record store itself is `crate::delivery::records`.

use std::path::PathBuf;

/// Where the records live, as `LEASE_STORE` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A folder on this worker's disk: the worker assumes it is alone.
    Local(PathBuf),
    /// `s3://BUCKET/PREFIX`, on the SDK's endpoint.
    S3 { bucket: String, prefix: String },
}

impl StoreLocation {
    /// Parse `s3://BUCKET/PREFIX` (the prefix may be empty).
    pub fn parse(text: &str) -> Result<StoreLocation, String> {
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err("s3://BUCKET/PREFIX needs a bucket".into());
            }
            let prefix = prefix.trim_matches('/');
            return Ok(StoreLocation::S3 {
                bucket: bucket.to_owned(),
                prefix: if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                },
            });
        }
        if text.starts_with("dynamodb://") {
            return Err(
                "dynamodb:// is not supported by this build; use s3://BUCKET/PREFIX".into(),
            );
        }
        Err(format!("`{text}` is not s3://BUCKET/PREFIX"))
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Local(dir) => write!(f, "local folder {}", dir.display()),
            StoreLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}
