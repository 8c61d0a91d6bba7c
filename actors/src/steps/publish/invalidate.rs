//! Optional CloudFront invalidation after a publish, for edit buckets fronted by a
//! distribution (off unless `CLOUDFRONT_DISTRIBUTIONS` names one for the client). Only the
//! paths that changed are invalidated; beyond `MAX_PATHS` one `/*` is cheaper.

use std::collections::BTreeSet;

use aws_sdk_cloudfront::error::DisplayErrorContext;
use aws_sdk_cloudfront::types::{InvalidationBatch, Paths};

/// CloudFront bills invalidation paths one by one (a wildcard counts as one).
const MAX_PATHS: usize = 15;

/// The paths a visitor may have cached for these changed keys: the object itself, and for an
/// `index.html` the folder URL that serves it.
pub fn paths_for(keys: &[String]) -> Vec<String> {
    let mut paths = BTreeSet::new();
    for key in keys {
        paths.insert(format!("/{key}"));
        if key == "index.html" {
            paths.insert("/".to_owned());
        } else if let Some(dir) = key.strip_suffix("/index.html") {
            paths.insert(format!("/{dir}/"));
            paths.insert(format!("/{dir}"));
        }
    }
    if paths.len() > MAX_PATHS {
        return vec!["/*".to_owned()];
    }
    paths.into_iter().collect()
}

#[derive(Clone)]
pub struct Invalidator {
    cloudfront: aws_sdk_cloudfront::Client,
}

impl Invalidator {
    pub fn new(cloudfront: aws_sdk_cloudfront::Client) -> Invalidator {
        Invalidator { cloudfront }
    }

    /// Invalidate `keys` on `distribution`; returns the invalidation id. `reference` makes a
    /// retried request idempotent (CloudFront answers the same invalidation again).
    pub async fn invalidate(
        &self,
        distribution: &str,
        keys: &[String],
        reference: &str,
    ) -> Result<String, String> {
        let paths = paths_for(keys);
        let batch = InvalidationBatch::builder()
            .paths(
                Paths::builder()
                    .quantity(paths.len() as i32)
                    .set_items(Some(paths))
                    .build()
                    .map_err(|e| e.to_string())?,
            )
            .caller_reference(reference)
            .build()
            .map_err(|e| e.to_string())?;
        let out = self
            .cloudfront
            .create_invalidation()
            .distribution_id(distribution)
            .invalidation_batch(batch)
            .send()
            .await
            .map_err(|e| DisplayErrorContext(&e).to_string())?;
        Ok(out
            .invalidation()
            .map(|i| i.id().to_owned())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_pages_invalidate_their_urls() {
        let keys = vec![
            "index.html".to_owned(),
            "about/index.html".to_owned(),
            "_astro/a.css".to_owned(),
        ];
        assert_eq!(
            paths_for(&keys),
            vec![
                "/",
                "/_astro/a.css",
                "/about",
                "/about/",
                "/about/index.html",
                "/index.html"
            ]
        );
        let many: Vec<String> = (0..20).map(|i| format!("p{i}.html")).collect();
        assert_eq!(paths_for(&many), vec!["/*"]);
    }
}
