//! The worker's one browser: headless Chromium (Debian's `chromium` package; nothing is
//! downloaded at run time), started on first use, reused by every check, started again when
//! it has died, with a bounded number of pages open at once.
//!
//! It shows pages a tenant wrote, so it runs like a tenant's code (`Sandbox::browser_jail`: its
//! own uid, namespaces where the host allows, rlimits), with an allow-listed environment (never
//! the worker's AWS credentials), a fresh profile each start, and dies with the worker. The
//! worker talks to it over a pipe (`cdp.rs`), never a DevTools port.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::steps::check::cdp::{Cdp, CdpError, Event};
use crate::tenant::sandbox::Sandbox;

/// Pages open at once over all checks of the worker: each costs a renderer (tens of MB) and
/// CPU; a check's pages queue for these.
pub const MAX_OPEN_PAGES: usize = 4;
/// A cold start on a busy 2-core machine takes a few seconds; past this it is not starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands other than a page's load answer in milliseconds; this only catches a hung browser.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of the browser's stderr kept for the error when it does not start.
const STDERR_LINES: usize = 20;

/// The flags every start gets. Why each:
const FLAGS: &[&str] = &[
    // No window, no GPU (there is neither in a container).
    "--headless",
    "--disable-gpu",
    // Chromium's own sandbox cannot nest inside bubblewrap's namespaces and refuses to start
    // as root; the browser runs in the worker's tenant sandbox instead (`browser_jail`).
    "--no-sandbox",
    // Only what the check asks for goes over the network: no QUIC, no background fetches,
    // component updates, sync, or first-run pages.
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    // Containers give /dev/shm 64 MB; shared memory goes to the (private) /tmp instead.
    "--disable-dev-shm-usage",
    // The same page gives the same pixels: no scroll bars that come and go.
    "--hide-scrollbars",
    // The worker talks on fds 3 and 4 (`cdp.rs`), not on a port anyone local could reach.
    "--remote-debugging-pipe",
];

#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("no Chromium found: {0}")]
    NotFound(String),
    #[error("preparing the browser's sandbox: {0}")]
    Sandbox(#[from] crate::tenant::sandbox::SandboxError),
    #[error("starting {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("Chromium did not start: {why}; its last output: {stderr}")]
    NotStarted { why: String, stderr: String },
    #[error(transparent)]
    Cdp(#[from] CdpError),
}

impl BrowserError {
    /// The browser died under the caller: a fresh one may do better.
    pub(crate) fn is_browser_gone(&self) -> bool {
        matches!(self, BrowserError::Cdp(CdpError::Closed))
    }
}

/// The major version of Chromium the tests run against (`tools/chromium.version`, which
/// `scripts/lib.sh` and the Dockerfile read too). Debian's package cannot be pinned to one
/// build (its security updates replace it), so this is a floor: an older browser may lack the
/// DevTools commands the check sends, and the worker says so when it starts one.
pub const TESTED_CHROMIUM_MAJOR: u32 =
    tested_major(include_str!("../../../../tools/chromium.version"));

const fn tested_major(text: &str) -> u32 {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut major = 0;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        major = major * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    assert!(
        major > 0,
        "tools/chromium.version starts with the major version"
    );
    major
}

/// The major version in the DevTools `product` string (`Chrome/148.0.7778.167`,
/// `HeadlessChrome/148...`).
pub(crate) fn product_major(product: &str) -> Option<u32> {
    let (_, version) = product.split_once('/')?;
    version.split('.').next()?.parse().ok()
}

/// Where Chromium is: `CHROME_BIN` when set (it must be an executable file), else `chromium` on
/// `PATH`. The error says where it looked.
pub fn find_chromium(chrome_bin: Option<&Path>) -> Result<PathBuf, BrowserError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(bin) = chrome_bin {
        return if executable(bin) {
            Ok(bin.to_owned())
        } else {
            Err(BrowserError::NotFound(format!(
                "CHROME_BIN={} is not an executable file",
                bin.display()
            )))
        };
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromium"))
                .find(|p| executable(p))
        })
        .ok_or_else(|| {
            BrowserError::NotFound(
                "`chromium` is not on PATH and CHROME_BIN is not set (Debian: apt-get install chromium)"
                    .into(),
            )
        })
}

/// The worker's browser.
pub struct Browser {
    bin: PathBuf,
    sandbox: Arc<Sandbox>,
    /// The running browser, if one was started; replaced when it has died.
    running: Mutex<Option<Arc<Running>>>,
    /// Pages open at once (`MAX_OPEN_PAGES`).
    pages: Arc<Semaphore>,
    /// Starts so far: names each profile folder, and the restarts metric.
    starts: AtomicU64,
}

impl Browser {
    pub fn new(bin: PathBuf, sandbox: Arc<Sandbox>) -> Arc<Browser> {
        Arc::new(Browser {
            bin,
            sandbox,
            running: Mutex::new(None),
            pages: Arc::new(Semaphore::new(MAX_OPEN_PAGES)),
            starts: AtomicU64::new(0),
        })
    }

    /// The running browser, started now if there is none or it has died.
    pub(crate) async fn running(&self) -> Result<Arc<Running>, BrowserError> {
        let mut running = self.running.lock().await;
        if let Some(r) = running.as_ref()
            && !r.cdp.is_closed()
        {
            return Ok(r.clone());
        }
        if running.take().is_some() {
            tracing::warn!("the browser had died; starting it again");
        }
        let n = self.starts.fetch_add(1, Ordering::Relaxed);
        let started = Arc::new(self.start(n).await?);
        browser_starts().add(1, &[opentelemetry::KeyValue::new("restart", n > 0)]);
        tracing::info!(version = %started.version, pid = ?started.pid, restart = n > 0, "browser started");
        if product_major(&started.version).is_none_or(|major| major < TESTED_CHROMIUM_MAJOR) {
            tracing::warn!(
                version = %started.version,
                tested = TESTED_CHROMIUM_MAJOR,
                "this Chromium is older than the one the tests run against; checks may fail"
            );
        }
        *running = Some(started.clone());
        Ok(started)
    }

    /// The main process of the running browser, if any (tests kill it).
    pub async fn pid(&self) -> Option<u32> {
        self.running.lock().await.as_ref().and_then(|r| r.pid)
    }

    /// Resident memory of the browser's processes together, in bytes (its process group).
    pub async fn resident_bytes(&self) -> Option<u64> {
        let pgid = self.running.lock().await.as_ref()?.pgid?;
        Some(resident_bytes_of_group(pgid))
    }

    async fn start(&self, n: u64) -> Result<Running, BrowserError> {
        let dir = self.sandbox.browser_dir();
        // Profiles of earlier starts (this process's or a dead worker's) are nobody's now.
        if n == 0 {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        let profile = dir.join(format!("profile-{}-{n}", std::process::id()));
        tokio::fs::create_dir_all(&profile)
            .await
            .map_err(|source| BrowserError::Spawn {
                bin: profile.clone(),
                source,
            })?;
        let jail = self.sandbox.browser_jail(&profile).await?;
        let mut cmd = jail.command(&self.bin, &profile);
        crate::tenant::process::allow_env(&mut cmd, &[]);
        // Without isolation it has no home of its own: the profile is one.
        cmd.env("HOME", &profile).envs(jail.env());
        cmd.args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // Fds 3 (commands in) and 4 (answers out) of the browser: ends of two pipes.
        let (browser_reads, worker_writes) =
            std::io::pipe().map_err(|source| spawn(&self.bin, source))?;
        let (worker_reads, browser_writes) =
            std::io::pipe().map_err(|source| spawn(&self.bin, source))?;
        let (into_fd3, into_fd4) = (browser_reads.as_raw_fd(), browser_writes.as_raw_fd());
        // SAFETY: runs in the forked child before exec; fcntl(2), dup2(2) and close(2) are
        // async-signal-safe, and nothing is allocated.
        unsafe {
            cmd.pre_exec(move || place_pipe_fds(into_fd3, into_fd4));
        }
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| spawn(&self.bin, source))?;
        // The browser's ends are its own now.
        drop((browser_reads, browser_writes));
        let pid = child.id();
        let stderr = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            tokio::spawn(keep_tail(err, stderr.clone()));
        }
        let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(worker_reads))
            .map_err(|source| spawn(&self.bin, source))?;
        let writer = tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(worker_writes))
            .map_err(|source| spawn(&self.bin, source))?;
        let cdp = Cdp::new(reader, writer);
        let mut running = Running {
            cdp,
            child: std::sync::Mutex::new(child),
            pid,
            pgid: pid.map(|p| p as i32),
            profile,
            version: String::new(),
        };
        match running
            .cdp
            .call(None, "Browser.getVersion", json!({}), START_TIMEOUT)
            .await
        {
            Ok(v) => {
                running.version = v["product"].as_str().unwrap_or("unknown").to_owned();
                Ok(running)
            }
            Err(e) => {
                drop(running);
                // Its stderr reader ends with it; what it said is in the tail.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let tail: Vec<String> = stderr.lock().expect("tail").iter().cloned().collect();
                Err(BrowserError::NotStarted {
                    why: e.to_string(),
                    stderr: tail.join(" | "),
                })
            }
        }
    }

    /// A new page in a fresh browser context (`context`), at `width` x `height`, with its
    /// events flowing; waits while `MAX_OPEN_PAGES` are open.
    pub(crate) async fn open_page(
        &self,
        running: &Arc<Running>,
        context: &str,
        viewport: Viewport,
    ) -> Result<Page, BrowserError> {
        let permit = self
            .pages
            .clone()
            .acquire_owned()
            .await
            .expect("the page semaphore is never closed");
        let cdp = running.cdp.clone();
        let target = cdp
            .call(
                None,
                "Target.createTarget",
                json!({"url": "about:blank", "browserContextId": context}),
                COMMAND_TIMEOUT,
            )
            .await?["targetId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let session = cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
                COMMAND_TIMEOUT,
            )
            .await?["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        // Its events are routed before any domain that sends them is enabled.
        let events = cdp.events(&session);
        let page = Page {
            cdp,
            target,
            session,
            events,
            _permit: permit,
        };
        let s = Some(page.session.as_str());
        let (a, b, c, d, e) = tokio::join!(
            page.cdp.call(
                s,
                "Emulation.setDeviceMetricsOverride",
                json!({"width": viewport.width, "height": viewport.height,
                       "deviceScaleFactor": 1, "mobile": viewport.mobile}),
                COMMAND_TIMEOUT
            ),
            page.cdp.call(s, "Page.enable", json!({}), COMMAND_TIMEOUT),
            page.cdp
                .call(s, "Runtime.enable", json!({}), COMMAND_TIMEOUT),
            page.cdp
                .call(s, "Network.enable", json!({}), COMMAND_TIMEOUT),
            page.cdp.call(s, "Log.enable", json!({}), COMMAND_TIMEOUT),
        );
        for r in [a, b, c, d, e] {
            r?;
        }
        Ok(page)
    }
}

/// A page's size: desktop or phone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Viewport {
    pub width: u32,
    pub height: u32,
    /// Phone emulation: the page's `<meta name="viewport">` counts, touch events.
    pub mobile: bool,
}

pub(crate) const DESKTOP: Viewport = Viewport {
    width: 1280,
    height: 800,
    mobile: false,
};
/// A common phone's CSS size (device scale 1: the screenshot stays small).
pub(crate) const PHONE: Viewport = Viewport {
    width: 390,
    height: 844,
    mobile: true,
};

/// One started browser. Dropping it kills its processes and removes its profile.
pub(crate) struct Running {
    pub(crate) cdp: Arc<Cdp>,
    /// Killed on drop (and its whole group below).
    child: std::sync::Mutex<tokio::process::Child>,
    pid: Option<u32>,
    /// Its process group (renderers, the GPU and network services are in it).
    pgid: Option<i32>,
    profile: PathBuf,
    version: String,
}

impl Running {
    /// A browser context of its own for one check: no cookie, cache or storage of another
    /// tenant's pages.
    pub(crate) async fn new_context(&self) -> Result<String, BrowserError> {
        Ok(self
            .cdp
            .call(
                None,
                "Target.createBrowserContext",
                json!({"disposeOnDetach": true}),
                COMMAND_TIMEOUT,
            )
            .await?["browserContextId"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Close a context and every page in it.
    pub(crate) async fn dispose_context(&self, context: &str) {
        let _ = self
            .cdp
            .call(
                None,
                "Target.disposeBrowserContext",
                json!({"browserContextId": context}),
                COMMAND_TIMEOUT,
            )
            .await;
    }

    /// Kill the browser (tests of the restart: `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub(crate) fn kill(&self) {
        crate::tenant::process::signal_group(self.pgid, nix::sys::signal::Signal::SIGKILL);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        crate::tenant::process::signal_group(self.pgid, nix::sys::signal::Signal::SIGKILL);
        if let Ok(mut child) = self.child.lock() {
            let _ = child.start_kill();
        }
        // Small (a fresh profile) and the worker's own: removed in the background.
        let profile = self.profile.clone();
        std::thread::spawn(move || {
            let _ = std::fs::remove_dir_all(profile);
        });
    }
}

/// One open page (a target in a context, attached as a flat session).
pub(crate) struct Page {
    pub(crate) cdp: Arc<Cdp>,
    target: String,
    pub(crate) session: String,
    /// Its events, from its attachment on.
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    /// Its place among `MAX_OPEN_PAGES`; freed when the page is dropped.
    _permit: OwnedSemaphorePermit,
}

impl Page {
    pub(crate) async fn call(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, BrowserError> {
        Ok(self
            .cdp
            .call(Some(&self.session), method, params, timeout)
            .await?)
    }

    /// Close it (its context's disposal would too; this frees the renderer sooner).
    pub(crate) async fn close(self) {
        self.cdp.forget(&self.session);
        let _ = self
            .cdp
            .call(
                None,
                "Target.closeTarget",
                json!({"targetId": self.target}),
                COMMAND_TIMEOUT,
            )
            .await;
    }
}

fn spawn(bin: &Path, source: std::io::Error) -> BrowserError {
    BrowserError::Spawn {
        bin: bin.to_owned(),
        source,
    }
}

/// In the child: the pipe ends become fds 3 and 4 (inherited across exec, unlike every fd
/// Rust opens). Copied above 10 first, so that an end that already is fd 3 or 4 is not closed
/// by placing the other.
fn place_pipe_fds(into_fd3: i32, into_fd4: i32) -> std::io::Result<()> {
    let check = |r: i32| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: plain syscalls on fds this child owns.
    unsafe {
        let a = check(libc::fcntl(into_fd3, libc::F_DUPFD, 10))?;
        let b = check(libc::fcntl(into_fd4, libc::F_DUPFD, 10))?;
        check(libc::dup2(a, 3))?;
        check(libc::dup2(b, 4))?;
        libc::close(a);
        libc::close(b);
    }
    Ok(())
}

/// The browser dies with the worker (`PR_SET_PDEATHSIG`): no browser outlives it.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: runs in the forked child before exec and only calls prctl(2).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut tokio::process::Command) {}

/// Keep the last `STDERR_LINES` lines (each cut to 300 bytes) of the browser's stderr.
async fn keep_tail(
    err: tokio::process::ChildStderr,
    tail: Arc<std::sync::Mutex<VecDeque<String>>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(err).split(b'\n');
    while let Ok(Some(line)) = lines.next_segment().await {
        let mut line = String::from_utf8_lossy(&line[..line.len().min(300)]).into_owned();
        line.truncate(line.trim_end().len());
        let mut tail = tail.lock().expect("tail");
        if tail.len() == STDERR_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// Resident memory of the processes in group `pgid` (from /proc: each process's `VmRSS`).
fn resident_bytes_of_group(pgid: i32) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // The 5th field after the command's closing parenthesis is the process group.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if after.split_whitespace().nth(2).and_then(|g| g.parse().ok()) != Some(pgid) {
            continue;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        {
            total += kb * 1024;
        }
    }
    total
}

fn browser_starts() -> &'static opentelemetry::metrics::Counter<u64> {
    static STARTS: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    STARTS.get_or_init(|| {
        opentelemetry::global::meter("edit-worker")
            .u64_counter("edit_worker.browser.starts")
            .with_description(
                "Browser starts, by `restart`: true when it had died (or was killed) and was \
                 started again",
            )
            .build()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_major_version_is_read_from_the_product_and_the_pin() {
        assert_eq!(product_major("Chrome/148.0.7778.167"), Some(148));
        assert_eq!(product_major("HeadlessChrome/99.1"), Some(99));
        assert_eq!(product_major("Chrome"), None);
        assert_eq!(tested_major("148\n"), 148);
    }

    /// Against the installed Chromium (scripts/test installs Debian's package): the start, one
    /// page, and a start again after the browser was killed. A cold start on a busy machine
    /// takes seconds; `START_TIMEOUT` bounds each.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_browser_starts_shows_a_page_and_starts_again_after_it_died() {
        let dir = tempfile::tempdir().unwrap();
        let bin = find_chromium(None).expect("Chromium is installed (scripts/test installs it)");
        let browser = Browser::new(bin, Sandbox::off(dir.path()));
        let first = browser.running().await.expect("starts");
        assert!(first.version.contains("Chrome/"), "{}", first.version);
        // The pin: the tests run against the Chromium `tools/chromium.version` names, or newer.
        let major = product_major(&first.version).expect("a major version");
        assert!(
            major >= TESTED_CHROMIUM_MAJOR,
            "Chromium {} is older than the {TESTED_CHROMIUM_MAJOR} the tests are pinned to",
            first.version
        );
        let context = first.new_context().await.unwrap();
        let mut page = browser.open_page(&first, &context, PHONE).await.unwrap();
        page.call(
            "Page.navigate",
            // A phone page: its layout is the phone's width (390), not a desktop's 980.
            json!({"url": "data:text/html,<meta name=viewport content=width=device-width><title>Hello</title><p>hi</p>"}),
            COMMAND_TIMEOUT,
        )
        .await
        .unwrap();
        while let Some(event) = page.events.recv().await {
            if event.method == "Page.loadEventFired" {
                break;
            }
        }
        let width = page
            .call(
                "Runtime.evaluate",
                json!({"expression": "[document.title, innerWidth]", "returnByValue": true}),
                COMMAND_TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(width["result"]["value"], json!(["Hello", 390]));
        page.close().await;
        first.dispose_context(&context).await;
        assert!(browser.resident_bytes().await.unwrap() > 0);

        // Killed from outside: the next use starts a new one.
        crate::tenant::process::signal_group(first.pgid, nix::sys::signal::Signal::SIGKILL);
        tokio::time::timeout(START_TIMEOUT, first.cdp.wait_closed())
            .await
            .expect("the pipe closes with the browser");
        let second = browser.running().await.expect("starts again");
        assert_ne!(second.pid, first.pid);
        assert!(!second.cdp.is_closed());
        // The same one while it lives.
        assert_eq!(browser.running().await.unwrap().pid, second.pid);
    }
}
