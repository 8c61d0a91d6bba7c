//! The browser check's settings (`BROWSER_CHECK`, `CHECK_MAX_PAGES`, `CHECK_REPAIR`,
//! `CHROME_BIN`), which the check (`crate::steps::check`) reads; kept here so that the
//! configuration never imports the check and its browser.

/// `BROWSER_CHECK`: whether publishes are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckMode {
    /// When Chromium is found; said in the log (and `doctor`) when it is not.
    Auto,
    /// Always: the worker does not start without Chromium.
    On,
    Off,
}

impl std::str::FromStr for CheckMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(CheckMode::Auto),
            "on" => Ok(CheckMode::On),
            "off" => Ok(CheckMode::Off),
            other => Err(format!(
                "BROWSER_CHECK must be auto, on or off, not {other:?}"
            )),
        }
    }
}

/// The check's settings (`BROWSER_CHECK`, `CHECK_MAX_PAGES`, `CHECK_REPAIR`, `CHROME_BIN`).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckSettings {
    pub mode: CheckMode,
    /// Pages a check loads at most, `/` included (each at two widths).
    pub max_pages: usize,
    /// Resume the agent once when the check finds problems the previous deploy did not have.
    pub repair: bool,
    /// `CHROME_BIN`: the browser; unset: `chromium` on `PATH`.
    pub chrome_bin: Option<std::path::PathBuf>,
}

impl Default for CheckSettings {
    fn default() -> Self {
        CheckSettings {
            mode: CheckMode::Auto,
            max_pages: 5,
            repair: true,
            chrome_bin: None,
        }
    }
}
