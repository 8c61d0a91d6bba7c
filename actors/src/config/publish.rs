//! How to publish (`PUBLISH_*`, `CACHE_CONTROL`, `DEPLOY_*`): the publisher's settings
//! (`crate::steps::publish`) and the `Cache-Control` rules, kept here so that the configuration never
//! imports the publisher.

/// How long deploys stay restorable (`DEPLOY_RETENTION_DAYS`, `DEPLOY_KEEP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub days: u64,
    /// The newest this many are kept whatever their age (at least the live one).
    pub keep: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { days: 30, keep: 20 }
    }
}

/// One `Cache-Control` rule: keys matching `pattern` get `value`. A pattern ending in `/` is a
/// key prefix (`_astro/`), `*.ext` matches a suffix, `*` matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRule {
    pub pattern: String,
    pub value: String,
}

impl CacheRule {
    pub(crate) fn matches(&self, key: &str) -> bool {
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
    pub(crate) fn defaults() -> Vec<CacheRule> {
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
    /// Uploads in flight per publish: S3 takes many at once, but each holds a file open (parts
    /// and files are streamed from disk, so not their bytes).
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
    /// A build holding a larger file is refused before anything is uploaded: the build is the
    /// tenant's code, and one runaway file (a video, a dump) must not cost every other tenant
    /// the worker's bandwidth and time, nor fill a bucket.
    pub max_file_bytes: u64,
    /// The same for the whole build (every file, whether it needs uploading or not), so a build
    /// of many files each under `max_file_bytes` is bounded too.
    pub max_total_bytes: u64,
    /// How long earlier deploys stay restorable (`DEPLOY_RETENTION_DAYS`, `DEPLOY_KEEP`).
    pub retention: Retention,
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
            max_file_bytes: 100 * 1024 * 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            retention: Retention::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
