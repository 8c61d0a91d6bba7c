//! The browser check as a step of a batch (`execute.rs`): the checker of the worker, if it has
//! one, on what a publish made live; what goes wrong is logged, never the message's failure.

use std::collections::BTreeSet;
use std::time::SystemTime;

use tracing::Instrument;
use tracing::field::Empty;

use crate::batch::context::WorkerContext;
use crate::steps::check::{CheckOutcome, CheckReport, CheckTarget, check_id};

/// Check what the publish of `head` into `bucket` changed (`changed`: its keys), and the pages
/// of `also` (paths a repair was asked to fix, changed or not). The screenshots go under the
/// publish's `deploy_id` (contract: `.edit-worker/checks/{deployId}/`), or under `check_id`
/// where the publish recorded no deploy. `None`: no checker, or the check itself failed
/// (logged).
pub(crate) async fn check(
    ctx: &WorkerContext,
    bucket: &str,
    head: &str,
    deploy_id: Option<&str>,
    changed: &[String],
    also: &[String],
) -> Option<CheckOutcome> {
    let checker = ctx.checker.as_ref()?;
    let preview_url = ctx.config.preview_url_for(bucket);
    let target = CheckTarget {
        bucket,
        preview_url: &preview_url,
        changed,
        also,
        id: deploy_id.map_or_else(|| check_id(head, SystemTime::now()), str::to_owned),
    };
    let span = tracing::info_span!("browser check", id = %target.id, ok = Empty, pages = Empty, new_problems = Empty);
    match checker.check(&target).instrument(span.clone()).await {
        Ok(outcome) => {
            span.record("ok", outcome.report.ok);
            span.record("pages", outcome.report.pages.len());
            span.record("new_problems", outcome.new_problems.len());
            tracing::info!(
                id = %target.id,
                ok = outcome.report.ok,
                pages = outcome.report.pages.len(),
                ms = outcome.report.ms,
                "browser check done"
            );
            Some(outcome)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the browser check failed; the message completes without it");
            None
        }
    }
}

/// The paths of `found` (`path: problem` lines).
pub(crate) fn paths_of(found: &[String]) -> Vec<String> {
    found
        .iter()
        .filter_map(|line| line.split_once(": ").map(|(path, _)| path.to_owned()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// True when the check `report` still shows one of `found`.
pub(crate) fn still_there(found: &[String], report: &CheckReport) -> bool {
    let now: BTreeSet<String> = report
        .pages
        .iter()
        .flat_map(|page| {
            page.problems()
                .into_iter()
                .map(move |p| format!("{}: {p}", page.path))
        })
        .collect();
    found.iter().any(|f| now.contains(f))
}
