//! # The check folder
//!
//! Owns the browser check: the worker's Chromium (`browser`, over `cdp`), the bucket served as
//! website hosting serves it (`site_server`), changed pixels (`pixels`), and the check itself
//! (here). Uses the publisher's reserved prefix and nothing else of the other steps.
//!
//! # The check
//!
//! The browser check after a publish (CONTRACT.md, "The browser check"): the worker's browser
//! loads `/` and the pages whose HTML this publish changed, as the bucket serves them
//! (`site_server.rs`), at a desktop and a phone width, and reports each page's status, title,
//! console errors and failed same-site requests, with screenshots uploaded to the bucket and
//! the share of pixels that changed since the previous check of the same page.
//!
//! The previous check is remembered in the bucket (`.edit-worker/checks/latest.json`): each
//! page's newest screenshot and the problems it had, so that a repair is asked for only for
//! problems this publish brought (`CheckOutcome::new_problems`). A check never fails a message:
//! what goes wrong in it is logged and the event goes without `check`.

pub mod browser;
pub mod cdp;
pub mod pixels;
pub mod site_server;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use crate::config::{CheckMode, CheckSettings};
pub use crate::contract::check_report::{CheckReport, FailedRequest, PageReport, RepairReport};
use crate::steps::check::browser::{
    Browser, BrowserError, COMMAND_TIMEOUT, DESKTOP, PHONE, Page, Running,
};
use crate::steps::check::cdp::Event;
use crate::steps::check::pixels::{Rgba, changed_share};
use crate::steps::check::site_server::SiteServer;
use crate::steps::publish::RESERVED_PREFIX;

/// Where checks keep their screenshots and their memory, in the bucket (under the worker's
/// reserved prefix: a publish never deletes it).
const CHECKS_PREFIX: &str = ".edit-worker/checks/";
const LATEST_KEY: &str = ".edit-worker/checks/latest.json";
/// A page that has not fired `load` in this time is reported as not loaded (a slow image
/// server, an endless script); generous for a busy machine, short next to a build.
const LOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// Pages remembered in `latest.json`: more than any site checks, fewer than would make the
/// record large (a site with more pages forgets its oldest screenshots first).
const MAX_REMEMBERED_PAGES: usize = 500;
/// The largest `latest.json` or earlier screenshot read back: ours are far smaller.
const MAX_RECORD_BYTES: i64 = 8 << 20;
/// Texts kept per page (console errors, failed requests): the first ones say enough.
const MAX_FINDINGS: usize = 20;
/// One console error's text, at most (characters).
const MAX_TEXT_CHARS: usize = 500;

/// The id of a check whose publish recorded no deploy (a publish names its check by its
/// `deployId`): the commit's short id and the time.
pub(crate) fn check_id(commit: &str, at: SystemTime) -> String {
    let short = &commit[..commit.len().min(12)];
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{short}-{ms}")
}

/// What a check found, for the event and for the repair.
pub(crate) struct CheckOutcome {
    pub report: CheckReport,
    /// `path: problem` for each problem the previous check of that page did not have.
    pub new_problems: Vec<String>,
}

/// The check's memory in the bucket (`latest.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Remembered {
    /// Path -> its newest check.
    pages: BTreeMap<String, RememberedPage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RememberedPage {
    /// Key of its desktop screenshot.
    screenshot: Option<String>,
    problems: Vec<String>,
    /// Milliseconds since the epoch: which pages to forget first.
    at_ms: u64,
}

impl CheckSettings {
    /// The browser these settings ask for: `Ok(None)` when checks are off, or `auto` found no
    /// Chromium (logged); an error only when `on` found none.
    pub fn browser_bin(&self) -> Result<Option<std::path::PathBuf>, BrowserError> {
        if self.mode == CheckMode::Off {
            return Ok(None);
        }
        match crate::steps::check::browser::find_chromium(self.chrome_bin.as_deref()) {
            Ok(bin) => Ok(Some(bin)),
            Err(e) if self.mode == CheckMode::Auto => {
                tracing::warn!(error = %e, "BROWSER_CHECK=auto: no Chromium found; publishes are not checked in a browser");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// What is published where, for one check.
pub(crate) struct CheckTarget<'a> {
    pub bucket: &'a str,
    /// The site's public URL (`previewUrl`, ending in `/`): screenshots are linked under it.
    pub preview_url: &'a str,
    /// Keys this publish uploaded or deleted.
    pub changed: &'a [String],
    /// Paths checked whether or not they changed (those a repair was asked to fix).
    pub also: &'a [String],
    /// The publish's `deployId` (or `check_id` without one): names the screenshots' folder.
    pub id: String,
}

/// The worker's checker: its browser, the S3 client, and how many pages a check looks at.
pub struct Checker {
    pub(crate) browser: Arc<Browser>,
    s3: aws_sdk_s3::Client,
    max_pages: usize,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error(transparent)]
    Browser(#[from] BrowserError),
    #[error("starting the site server: {0}")]
    Serve(std::io::Error),
    #[error("S3: {0}")]
    S3(String),
}

impl Checker {
    pub fn new(browser: Arc<Browser>, s3: aws_sdk_s3::Client, max_pages: usize) -> Checker {
        Checker {
            browser,
            s3,
            max_pages: max_pages.max(1),
        }
    }

    /// Check what `target` published. A browser that dies during the check is started again
    /// and the check run once more; other failures are returned for the caller to log.
    pub(crate) async fn check(&self, target: &CheckTarget<'_>) -> Result<CheckOutcome, CheckError> {
        let started = Instant::now();
        let remembered = self.remembered(target.bucket).await;
        let paths = self.pages_to_check(target).await?;
        let server = SiteServer::start(self.s3.clone(), target.bucket.to_owned(), 0)
            .await
            .map_err(CheckError::Serve)?;
        let mut loads = match self.load_all(&server.origin(), &paths).await {
            Err(e) if e.is_browser_gone() => {
                tracing::warn!(error = %e, "the browser died during the check; checking again with a new one");
                self.load_all(&server.origin(), &paths).await?
            }
            other => other?,
        };
        drop(server);
        let mut pages = Vec::new();
        let mut new_problems = Vec::new();
        let mut memory = remembered;
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for path in &paths {
            let (desktop, phone) = loads.remove(path).expect("each path was loaded");
            let slug = slug(path);
            let key = format!("{CHECKS_PREFIX}{}/{slug}.png", target.id);
            let mobile_key = format!("{CHECKS_PREFIX}{}/{slug}.mobile.png", target.id);
            let previous = memory.pages.get(path).cloned();
            let changed_pixels = match (
                &desktop.png,
                previous.as_ref().and_then(|p| p.screenshot.as_deref()),
            ) {
                (Some(now), Some(before)) => self.changed_since(target.bucket, before, now).await,
                _ => None,
            };
            let mut report = merge(path, &desktop, &phone);
            if let Some(png) = &desktop.png {
                self.upload(target.bucket, &key, png.clone()).await?;
                report.screenshot = Some(format!("{}{key}", target.preview_url));
            }
            if let Some(png) = &phone.png {
                self.upload(target.bucket, &mobile_key, png.clone()).await?;
                report.screenshot_mobile = Some(format!("{}{mobile_key}", target.preview_url));
            }
            report.changed_pixels = changed_pixels;
            let problems = report.problems();
            let before: BTreeSet<&String> = previous
                .as_ref()
                .map(|p| p.problems.iter().collect())
                .unwrap_or_default();
            new_problems.extend(
                problems
                    .iter()
                    .filter(|p| !before.contains(p))
                    .map(|p| format!("{path}: {p}")),
            );
            memory.pages.insert(
                path.clone(),
                RememberedPage {
                    screenshot: desktop.png.is_some().then_some(key),
                    problems,
                    at_ms: now_ms,
                },
            );
            pages.push(report);
        }
        forget_oldest(&mut memory);
        let record = serde_json::to_vec(&memory).expect("plain data serializes");
        self.put(target.bucket, LATEST_KEY, record, "application/json")
            .await?;
        let report = CheckReport {
            ok: pages.iter().all(PageReport::is_ok),
            ms: started.elapsed().as_millis() as u64,
            pages,
            repair: None,
        };
        Ok(CheckOutcome {
            report,
            new_problems,
        })
    }

    /// `/`, the pages asked for again (`also`, a repair's), and the pages this publish changed
    /// that are still there: `max_pages` at most, though never fewer than `/` and `also`.
    async fn pages_to_check(&self, target: &CheckTarget<'_>) -> Result<Vec<String>, CheckError> {
        let mut paths = vec!["/".to_owned()];
        let changed: BTreeSet<String> = target
            .changed
            .iter()
            .filter_map(|key| page_path(key))
            .collect();
        let limit = self.max_pages.max(1 + target.also.len());
        let candidates = target.also.iter().cloned().chain(changed);
        for path in candidates {
            if paths.len() >= limit {
                break;
            }
            if paths.contains(&path) {
                continue;
            }
            // A page this publish deleted is not checked: its 404 is what was asked for.
            let key = path_key(&path);
            if self.exists(target.bucket, &key).await? {
                paths.push(path);
            }
        }
        Ok(paths)
    }

    /// Each path, all at once (bounded by the browser's open pages), in one browser context
    /// of their own: loaded at the desktop width, then shown at the phone's.
    async fn load_all(
        &self,
        origin: &str,
        paths: &[String],
    ) -> Result<BTreeMap<String, (Load, Load)>, BrowserError> {
        let running = self.browser.running().await?;
        let context = running.new_context().await?;
        let loads = paths.iter().map(|path| {
            let (running, context) = (&running, &context);
            async move {
                let url = format!("{origin}{path}");
                let loads = self.load_one(running, context, &url, origin).await?;
                Ok::<_, BrowserError>((path.clone(), loads))
            }
        });
        let results = futures::future::join_all(loads).await;
        running.dispose_context(&context).await;
        results.into_iter().collect()
    }

    async fn load_one(
        &self,
        running: &Arc<Running>,
        context: &str,
        url: &str,
        origin: &str,
    ) -> Result<(Load, Load), BrowserError> {
        let mut page = self.browser.open_page(running, context, DESKTOP).await?;
        let loaded = match load(&mut page, url, origin).await {
            // The same page at the phone's size: its layout (media queries, the viewport meta
            // tag) follows the new size without a second load, which would cost the check
            // another renderer's worth of CPU for what the first load already told.
            Ok(desktop) if desktop.error.is_none() => as_phone(&page).await.map(|png| {
                (
                    desktop,
                    Load {
                        png,
                        ..Load::default()
                    },
                )
            }),
            Ok(desktop) => Ok((desktop, Load::default())),
            Err(e) => Err(e),
        };
        #[cfg(feature = "fault-injection")]
        if fault_fires("browser.kill") {
            tracing::warn!("fault injected: killing the browser during the check");
            running.kill();
        }
        page.close().await;
        if running.cdp.is_closed() {
            return Err(BrowserError::Cdp(
                crate::steps::check::cdp::CdpError::Closed,
            ));
        }
        loaded
    }

    async fn changed_since(&self, bucket: &str, before_key: &str, now: &[u8]) -> Option<f64> {
        let before = self.read_bounded(bucket, before_key).await.ok().flatten()?;
        let now = now.to_vec();
        tokio::task::spawn_blocking(move || {
            let before = Rgba::decode_png(&before).ok()?;
            let now = Rgba::decode_png(&now).ok()?;
            // Four decimals: enough to tell a changed word from nothing.
            Some((changed_share(&before, &now) * 10_000.0).round() / 10_000.0)
        })
        .await
        .ok()
        .flatten()
    }

    async fn remembered(&self, bucket: &str) -> Remembered {
        match self.read_bounded(bucket, LATEST_KEY).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the previous check's record is unreadable; comparing with nothing");
                Remembered::default()
            }),
            Ok(None) => Remembered::default(),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the previous check's record");
                Remembered::default()
            }
        }
    }

    /// An object of the worker's own, at most `MAX_RECORD_BYTES`; `None` when absent.
    async fn read_bounded(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, CheckError> {
        debug_assert!(key.starts_with(RESERVED_PREFIX));
        let got = self.s3.get_object().bucket(bucket).key(key).send().await;
        let out = match got {
            Ok(out) => out,
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                return Ok(None);
            }
            Err(e) => return Err(s3_error(e)),
        };
        if out.content_length().unwrap_or(0) > MAX_RECORD_BYTES {
            return Err(CheckError::S3(format!(
                "{key} is larger than any record of ours"
            )));
        }
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| CheckError::S3(e.to_string()))?;
        Ok(Some(bytes.to_vec()))
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, CheckError> {
        match self.s3.head_object().bucket(bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
            Err(e) => Err(s3_error(e)),
        }
    }

    async fn upload(&self, bucket: &str, key: &str, png: Vec<u8>) -> Result<(), CheckError> {
        self.put(bucket, key, png, "image/png").await
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), CheckError> {
        self.s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(s3_error)?;
        Ok(())
    }
}

fn s3_error<E: std::error::Error + Send + Sync + 'static, R: std::fmt::Debug>(
    e: aws_sdk_s3::error::SdkError<E, R>,
) -> CheckError {
    CheckError::S3(aws_sdk_s3::error::DisplayErrorContext(e).to_string())
}

/// What one load of a page at one width saw.
#[derive(Debug, Default)]
struct Load {
    status: Option<u16>,
    title: String,
    console_errors: Vec<String>,
    failed_requests: Vec<FailedRequest>,
    png: Option<Vec<u8>>,
    error: Option<String>,
}

/// Load `url` in `page` and watch it until its `load` event; then its title and a screenshot.
async fn load(page: &mut Page, url: &str, origin: &str) -> Result<Load, BrowserError> {
    let mut seen = Load::default();
    let navigated = page
        .call("Page.navigate", json!({"url": url}), COMMAND_TIMEOUT)
        .await?;
    if let Some(error) = navigated["errorText"].as_str() {
        seen.error = Some(error.to_owned());
        return Ok(seen);
    }
    let document = navigated["loaderId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut watch = Watch {
        origin: format!("{origin}/"),
        document,
        urls: BTreeMap::new(),
        reported: BTreeSet::new(),
    };
    let deadline = tokio::time::Instant::now() + LOAD_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, page.events.recv()).await {
            Err(_) => {
                seen.error = Some(format!("no load event within {} s", LOAD_TIMEOUT.as_secs()));
                break;
            }
            Ok(None) => {
                return Err(BrowserError::Cdp(
                    crate::steps::check::cdp::CdpError::Closed,
                ));
            }
            Ok(Some(event)) if event.method == "Page.loadEventFired" => break,
            Ok(Some(event)) => watch.see(event, &mut seen),
        }
    }
    // Events already delivered with the load (an error thrown by the last script).
    while let Ok(event) = page.events.try_recv() {
        watch.see(event, &mut seen);
    }
    let title = page
        .call(
            "Runtime.evaluate",
            json!({"expression": "document.title", "returnByValue": true}),
            COMMAND_TIMEOUT,
        )
        .await?;
    seen.title = cut(title["result"]["value"].as_str().unwrap_or_default());
    seen.png = screenshot(page).await?;
    Ok(seen)
}

/// A PNG of what `page` shows now.
async fn screenshot(page: &Page) -> Result<Option<Vec<u8>>, BrowserError> {
    let shot = page
        .call(
            "Page.captureScreenshot",
            json!({"format": "png"}),
            COMMAND_TIMEOUT,
        )
        .await?;
    use base64::Engine;
    Ok(shot["data"]
        .as_str()
        .and_then(|data| base64::engine::general_purpose::STANDARD.decode(data).ok()))
}

/// `page` at the phone's size, and its screenshot there.
async fn as_phone(page: &Page) -> Result<Option<Vec<u8>>, BrowserError> {
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": PHONE.width, "height": PHONE.height, "deviceScaleFactor": 1,
               "mobile": PHONE.mobile}),
        COMMAND_TIMEOUT,
    )
    .await?;
    screenshot(page).await
}

/// The events of one load, read into a `Load`.
struct Watch {
    /// `http://127.0.0.1:PORT/`: a request is the site's when its URL starts so.
    origin: String,
    /// The page's own request (its status is the page's).
    document: String,
    /// Request id -> URL, for failures, which do not repeat it.
    urls: BTreeMap<String, String>,
    /// Requests already reported as failed.
    reported: BTreeSet<String>,
}

impl Watch {
    fn see(&mut self, event: Event, seen: &mut Load) {
        let p = &event.params;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        match event.method.as_str() {
            "Network.requestWillBeSent" => {
                self.urls
                    .insert(text(&p["requestId"]), text(&p["request"]["url"]));
            }
            "Network.responseReceived" => {
                let id = text(&p["requestId"]);
                let status = p["response"]["status"].as_u64().map(|s| s as u16);
                if id == self.document {
                    seen.status = status;
                } else if let Some(s) = status.filter(|s| *s >= 400)
                    && let Some(path) = self.on_site(&text(&p["response"]["url"]))
                    && self.reported.insert(id)
                {
                    push_bounded(
                        &mut seen.failed_requests,
                        FailedRequest {
                            url: path,
                            status: Some(s),
                            error: None,
                        },
                    );
                }
            }
            "Network.loadingFailed" => {
                let id = text(&p["requestId"]);
                if id == self.document || p["canceled"].as_bool() == Some(true) {
                    return;
                }
                let url = self.urls.get(&id).cloned().unwrap_or_default();
                if let Some(path) = self.on_site(&url)
                    && self.reported.insert(id)
                {
                    push_bounded(
                        &mut seen.failed_requests,
                        FailedRequest {
                            url: path,
                            status: None,
                            error: Some(text(&p["errorText"])),
                        },
                    );
                }
            }
            "Runtime.exceptionThrown" => {
                let d = &p["exceptionDetails"];
                let description = d["exception"]["description"]
                    .as_str()
                    .and_then(|s| s.lines().next())
                    .unwrap_or_default();
                let message = match (d["text"].as_str().unwrap_or_default(), description) {
                    (t, "") => t.to_owned(),
                    ("", d) => d.to_owned(),
                    (t, d) => format!("{t} {d}"),
                };
                push_bounded(&mut seen.console_errors, cut(&message));
            }
            "Runtime.consoleAPICalled" if p["type"] == "error" => {
                let words: Vec<String> = p["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| match &a["value"] {
                        Value::String(s) => s.clone(),
                        Value::Null => text(&a["description"]),
                        other => other.to_string(),
                    })
                    .collect();
                push_bounded(&mut seen.console_errors, cut(&words.join(" ")));
            }
            // Errors the console shows that are neither scripts' nor requests' (those come
            // above, and `network` entries repeat the failed requests).
            "Log.entryAdded"
                if p["entry"]["level"] == "error"
                    && matches!(
                        p["entry"]["source"].as_str(),
                        Some("javascript" | "security")
                    ) =>
            {
                push_bounded(&mut seen.console_errors, cut(&text(&p["entry"]["text"])));
            }
            _ => {}
        }
    }

    /// The path (and query) of `url` when it is on the checked site.
    fn on_site(&self, url: &str) -> Option<String> {
        url.strip_prefix(&self.origin)
            .map(|rest| format!("/{rest}"))
    }
}

fn push_bounded<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if list.len() < MAX_FINDINGS && !list.contains(&item) {
        list.push(item);
    }
}

fn cut(text: &str) -> String {
    text.chars().take(MAX_TEXT_CHARS).collect()
}

/// One page's report from its two loads: the desktop's status and title, the problems of both.
fn merge(path: &str, desktop: &Load, phone: &Load) -> PageReport {
    let mut console_errors = desktop.console_errors.clone();
    for e in &phone.console_errors {
        push_bounded(&mut console_errors, e.clone());
    }
    let mut failed_requests = desktop.failed_requests.clone();
    for r in &phone.failed_requests {
        push_bounded(&mut failed_requests, r.clone());
    }
    PageReport {
        path: path.to_owned(),
        status: desktop.status,
        title: desktop.title.clone(),
        console_errors,
        failed_requests,
        screenshot: None,
        screenshot_mobile: None,
        changed_pixels: None,
        error: desktop.error.clone().or_else(|| phone.error.clone()),
    }
}

/// The page a published key is, if it is one: `index.html` -> `/`, `a/index.html` -> `/a/`,
/// `a.html` -> `/a.html`; the worker's own keys are none.
fn page_path(key: &str) -> Option<String> {
    if key.starts_with(RESERVED_PREFIX) || !key.ends_with(".html") {
        return None;
    }
    Some(match key.strip_suffix("index.html") {
        Some(folder) if folder.is_empty() || folder.ends_with('/') => format!("/{folder}"),
        _ => format!("/{key}"),
    })
}

/// The key a page path is served from.
fn path_key(path: &str) -> String {
    let key = path.trim_start_matches('/');
    if key.is_empty() || key.ends_with('/') {
        format!("{key}index.html")
    } else {
        key.to_owned()
    }
}

/// A page's screenshot name: `/` -> `index`, `/oops/` -> `oops`, `/a/b.html` -> `a/b.html`.
fn slug(path: &str) -> String {
    let s = path.trim_matches('/');
    if s.is_empty() {
        "index".into()
    } else {
        s.into()
    }
}

fn forget_oldest(memory: &mut Remembered) {
    while memory.pages.len() > MAX_REMEMBERED_PAGES {
        let oldest = memory
            .pages
            .iter()
            .min_by_key(|(_, p)| p.at_ms)
            .map(|(k, _)| k.clone())
            .expect("not empty");
        memory.pages.remove(&oldest);
    }
}

/// The prompt that resumes the agent with what the check found.
pub(crate) fn repair_prompt(new_problems: &[String]) -> String {
    let list: Vec<String> = new_problems.iter().map(|p| format!("- {p}")).collect();
    format!(
        "The browser check of the published site found problems your change introduced. Fix the \
         site so that these pages load without console errors or failed requests, keeping the \
         requested change:\n\n{}",
        list.join("\n")
    )
}

/// Test-only switch (cargo feature `fault-injection`): true once per marker file when
/// `EDIT_WORKER_FAULT` (`name[,name...]@marker-dir`) names `name`.
#[cfg(feature = "fault-injection")]
fn fault_fires(name: &str) -> bool {
    let Ok(spec) = std::env::var("EDIT_WORKER_FAULT") else {
        return false;
    };
    let (names, dir) = spec.split_once('@').unwrap_or((spec.as_str(), "/tmp"));
    names.split(',').any(|n| n == name)
        && std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(std::path::Path::new(dir).join(format!("fault-{name}")))
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_keys_map_to_the_pages_they_are() {
        assert_eq!(page_path("index.html").as_deref(), Some("/"));
        assert_eq!(page_path("about/index.html").as_deref(), Some("/about/"));
        assert_eq!(page_path("a/b.html").as_deref(), Some("/a/b.html"));
        assert_eq!(
            page_path("notindex.html").as_deref(),
            Some("/notindex.html")
        );
        assert_eq!(page_path("_astro/x.css"), None);
        assert_eq!(page_path(".edit-worker/checks/x/index.html"), None);
        for path in ["/", "/about/", "/a/b.html"] {
            assert_eq!(page_path(&path_key(path)).as_deref(), Some(path));
        }
        assert_eq!(slug("/"), "index");
        assert_eq!(slug("/oops/"), "oops");
    }

    #[test]
    fn a_check_id_is_the_commit_and_the_time() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(
            check_id("0123456789abcdef0123", at),
            "0123456789ab-1700000000123"
        );
    }

    fn event(method: &str, params: Value) -> Event {
        Event {
            method: method.into(),
            params,
        }
    }

    #[test]
    fn errors_and_failed_same_site_requests_are_seen_once_each() {
        let mut w = Watch {
            origin: "http://127.0.0.1:9/".into(),
            document: "D".into(),
            urls: BTreeMap::new(),
            reported: BTreeSet::new(),
        };
        let mut seen = Load::default();
        for e in [
            event(
                "Network.responseReceived",
                json!({"requestId": "D", "response": {"url": "http://127.0.0.1:9/oops/", "status": 200}}),
            ),
            event(
                "Network.requestWillBeSent",
                json!({"requestId": "1", "request": {"url": "http://127.0.0.1:9/missing.png"}}),
            ),
            event(
                "Network.responseReceived",
                json!({"requestId": "1", "response": {"url": "http://127.0.0.1:9/missing.png", "status": 404}}),
            ),
            event(
                "Network.loadingFailed",
                json!({"requestId": "1", "errorText": "net::ERR_ABORTED"}),
            ),
            event(
                "Network.requestWillBeSent",
                json!({"requestId": "2", "request": {"url": "https://elsewhere.example/x.js"}}),
            ),
            event(
                "Network.loadingFailed",
                json!({"requestId": "2", "errorText": "net::ERR_NAME_NOT_RESOLVED"}),
            ),
            event(
                "Runtime.exceptionThrown",
                json!({"exceptionDetails": {"text": "Uncaught", "exception": {"description": "Error: boom\n    at x"}}}),
            ),
            event(
                "Runtime.consoleAPICalled",
                json!({"type": "error", "args": [{"type": "string", "value": "bad"}, {"type": "number", "value": 1}]}),
            ),
            event(
                "Runtime.consoleAPICalled",
                json!({"type": "log", "args": [{"value": "fine"}]}),
            ),
            event(
                "Log.entryAdded",
                json!({"entry": {"level": "error", "source": "network", "text": "Failed to load resource"}}),
            ),
        ] {
            w.see(e, &mut seen);
        }
        assert_eq!(seen.status, Some(200));
        assert_eq!(seen.console_errors, ["Uncaught Error: boom", "bad 1"]);
        assert_eq!(
            seen.failed_requests,
            [FailedRequest {
                url: "/missing.png".into(),
                status: Some(404),
                error: None
            }]
        );
    }

    #[test]
    fn only_problems_the_page_did_not_have_are_new() {
        let page = PageReport {
            path: "/oops/".into(),
            status: Some(200),
            title: "Oops".into(),
            console_errors: vec!["Uncaught Error: boom".into()],
            failed_requests: vec![FailedRequest {
                url: "/missing.png".into(),
                status: Some(404),
                error: None,
            }],
            screenshot: None,
            screenshot_mobile: None,
            changed_pixels: None,
            error: None,
        };
        assert!(!page.is_ok());
        assert_eq!(
            page.problems(),
            [
                "console error: Uncaught Error: boom",
                "failed request: /missing.png (HTTP 404)"
            ]
        );
        assert!(
            repair_prompt(&["/oops/: console error: Uncaught Error: boom".into()])
                .contains("- /oops/: console error: Uncaught Error: boom")
        );
    }
}
