//! Builds the site: `npm ci` when the dependencies are missing or the lock file changed, then
//! the build command (argv words, no shell). Both run in their own process group with a time
//! limit, and can be cancelled; a failure keeps the tail of the log for the status event.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::process;

/// Lines of build output kept for the error message: enough to show the error, small enough
/// for a status event.
const LOG_TAIL_LINES: usize = 40;
/// What the build may see besides `process::BASE_ENV`. It runs the site's own scripts, so the
/// worker's secrets stay out of it.
const BUILD_ENV: &[&str] = &["NODE_OPTIONS"];

#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// argv of the build (`npm run build`).
    pub command: Vec<String>,
    /// Output folder, relative to the workspace.
    pub output_dir: PathBuf,
    /// Time limit for the install and for the build, each.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildReport {
    /// `npm ci` ran, and how long it took.
    pub install_ms: Option<u64>,
    pub build_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("installing dependencies failed ({status}):\n{log_tail}")]
    InstallFailed { status: String, log_tail: String },
    #[error("the build failed ({status}):\n{log_tail}")]
    BuildFailed { status: String, log_tail: String },
    #[error("`{program}` could not be started: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program}` ran longer than {timeout:?} and was stopped")]
    Timeout { program: String, timeout: Duration },
    #[error("the build was cancelled")]
    Cancelled,
    #[error("the build command is empty")]
    EmptyCommand,
    #[error("build state: {0}")]
    Io(#[from] std::io::Error),
}

impl BuildError {
    pub fn kind(&self) -> &'static str {
        match self {
            BuildError::InstallFailed { .. } => "install_failed",
            BuildError::Cancelled => "interrupted",
            BuildError::Timeout { .. } => "build_timeout",
            _ => "build_failed",
        }
    }
}

/// Install (when needed) and build the site in `dir`. `state_dir` keeps the install stamp.
pub async fn build_site(
    spec: &BuildSpec,
    dir: &Path,
    state_dir: &Path,
    cancel: &CancellationToken,
) -> Result<BuildReport, BuildError> {
    let mut report = BuildReport::default();
    if let Some(lock_hash) = install_needed(dir, state_dir).await? {
        let started = Instant::now();
        let argv = ["npm", "ci", "--no-audit", "--no-fund"].map(String::from);
        let out = run_logged(&argv, dir, spec.timeout, cancel)
            .instrument(tracing::info_span!("install dependencies"))
            .await?;
        if !out.success {
            return Err(BuildError::InstallFailed {
                status: out.status,
                log_tail: out.tail,
            });
        }
        tokio::fs::write(state_dir.join("npm-ci.stamp"), lock_hash).await?;
        report.install_ms = Some(started.elapsed().as_millis() as u64);
    }
    if spec.command.is_empty() {
        return Err(BuildError::EmptyCommand);
    }
    let started = Instant::now();
    // A stale output folder could hide a build that wrote nothing: start from empty.
    let output = dir.join(&spec.output_dir);
    match tokio::fs::remove_dir_all(&output).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let out = run_logged(&spec.command, dir, spec.timeout, cancel)
        .instrument(tracing::info_span!("build site", command = %spec.command.join(" ")))
        .await?;
    if !out.success {
        return Err(BuildError::BuildFailed {
            status: out.status,
            log_tail: out.tail,
        });
    }
    report.build_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// `Some(hash of package-lock.json)` when `npm ci` must run: a lock file exists and either
/// `node_modules` is missing or the lock changed since the last install.
async fn install_needed(dir: &Path, state_dir: &Path) -> Result<Option<String>, BuildError> {
    let lock = match tokio::fs::read(dir.join("package-lock.json")).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let hash = format!("{:x}", Md5::digest(&lock));
    let installed = tokio::fs::read_to_string(state_dir.join("npm-ci.stamp"))
        .await
        .unwrap_or_default();
    let has_modules = tokio::fs::metadata(dir.join("node_modules")).await.is_ok();
    Ok((!has_modules || installed.trim() != hash).then_some(hash))
}

struct Logged {
    success: bool,
    status: String,
    tail: String,
}

/// Run argv in `dir` in its own process group; keep the last lines of stdout and stderr.
async fn run_logged(
    argv: &[String],
    dir: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Logged, BuildError> {
    let program = argv[0].clone();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    process::allow_env(&mut cmd, BUILD_ENV);
    for (name, value) in std::env::vars_os() {
        // npm's own settings (cache folder, registry) pass through; they hold no secrets of ours.
        let n = name.to_string_lossy();
        if n.starts_with("npm_config_") || n.starts_with("NPM_CONFIG_") {
            cmd.env(&name, value);
        }
    }
    // The worker must not phone home on the client's behalf.
    cmd.env("ASTRO_TELEMETRY_DISABLED", "1").env("CI", "1");
    let mut child = cmd.spawn().map_err(|source| BuildError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pgid = child.id().map(|id| id as i32);
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let readers = [
        tokio::spawn(keep_tail(child.stdout.take().expect("piped"), tail.clone())),
        tokio::spawn(keep_tail(child.stderr.take().expect("piped"), tail.clone())),
    ];
    let waited = tokio::select! {
        status = child.wait() => Ok(status?),
        _ = tokio::time::sleep(timeout) => Err(BuildError::Timeout { program, timeout }),
        _ = cancel.cancelled() => Err(BuildError::Cancelled),
    };
    // Whatever happened, nothing of the build outlives this call.
    process::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
    let status = waited?;
    for r in readers {
        let _ = r.await;
    }
    let tail = tail
        .lock()
        .expect("tail lock")
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Logged {
        success: status.success(),
        status: status.to_string(),
        tail,
    })
}

async fn keep_tail(stream: impl tokio::io::AsyncRead + Unpin, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut tail = tail.lock().expect("tail lock");
        tail.push_back(line.chars().take(500).collect());
        if tail.len() > LOG_TAIL_LINES {
            tail.pop_front();
        }
    }
}
