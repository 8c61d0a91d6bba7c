//! What a browser check reports (`check` of a `completed` event, CONTRACT.md): each page's
//! status, title, console errors, failed requests and screenshots, and a repair's result. A
//! leaf: the events (`status`) and the batch's journal carry it without knowing the browser.

use serde::{Deserialize, Serialize};

/// `check` of a `completed` event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub ok: bool,
    pub ms: u64,
    pub pages: Vec<PageReport>,
    /// Set when the check found problems the previous deploy did not have and the agent was
    /// asked to repair them: what was found, and whether the check after the repair was clean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PageReport {
    pub path: String,
    /// The HTTP status of the page itself; absent when it did not load at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub title: String,
    pub console_errors: Vec<String>,
    pub failed_requests: Vec<FailedRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot_mobile: Option<String>,
    /// 0 to 1, against the previous check's desktop screenshot of the same path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_pixels: Option<f64>,
    /// Why the page did not load (navigation error, timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct FailedRequest {
    /// Path and query on the site (same-site requests only).
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The network error when there was no response (`net::ERR_...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RepairReport {
    /// The problems the repair was asked to fix, `path: problem`.
    pub found: Vec<String>,
    /// The check after the repair had none of them.
    pub fixed: bool,
}

impl PageReport {
    pub(crate) fn is_ok(&self) -> bool {
        self.status.is_some_and(|s| (200..400).contains(&s))
            && self.error.is_none()
            && self.console_errors.is_empty()
            && self.failed_requests.is_empty()
    }

    /// What is wrong with it, one line each: compared with the previous check's to tell new
    /// problems from old ones.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.error {
            out.push(format!("did not load: {e}"));
        } else if let Some(s) = self.status.filter(|s| !(200..400).contains(s)) {
            out.push(format!("answered HTTP {s}"));
        }
        out.extend(
            self.console_errors
                .iter()
                .map(|e| format!("console error: {e}")),
        );
        out.extend(
            self.failed_requests
                .iter()
                .map(|r| match (r.status, &r.error) {
                    (Some(s), _) => format!("failed request: {} (HTTP {s})", r.url),
                    (None, Some(e)) => format!("failed request: {} ({e})", r.url),
                    (None, None) => format!("failed request: {}", r.url),
                }),
        );
        out
    }
}
