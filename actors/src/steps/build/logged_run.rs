//! How every install and build process runs, and the error each reports: the command in the
//! tenant's jail (its own process group, the build's allow-listed environment), waiting for it
//! within a time limit or until cancelled, keeping the tail of its output, and `BuildError`.
//! The build (`build.rs`), the shared store's installs (`npm_store`) and the build started
//! ahead (`prepared_build.rs`) all run their processes through here, so none of them borrows
//! another's runner or error: each depends on this module, which depends on none of them.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::tenant::process;
use crate::tenant::sandbox::{DiskWatch, Jail, SandboxError};

/// Lines of build output kept for the error message: enough to show the error, small enough
/// for a status event.
const LOG_TAIL_LINES: usize = 40;
/// What the build may see besides `process::BASE_ENV`. It runs the site's own scripts, so the
/// worker's secrets stay out of it.
const BUILD_ENV: &[&str] = &["NODE_OPTIONS"];

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
    #[error(
        "the build changed the shared dependencies ({key}), which other sites load; they were \
         discarded and will be installed again"
    )]
    StoreChanged { key: String },
    #[error("the build was cancelled")]
    Cancelled,
    #[error("the build command is empty")]
    EmptyCommand,
    /// A file of the site the worker reads for it (`package.json`, the lock file, `.npmrc`) is
    /// a link, not a regular file, or too big: refused, never followed or read without a bound.
    #[error("the site cannot be built as it is: {0}")]
    UnsafeSiteFile(crate::tenant::tenant_fs::TenantFileError),
    #[error("build state: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
}

impl BuildError {
    pub fn kind(&self) -> &'static str {
        match self {
            BuildError::InstallFailed { .. } => "install_failed",
            BuildError::Cancelled => "interrupted",
            BuildError::Timeout { .. } => "build_timeout",
            BuildError::UnsafeSiteFile(_) => "unsafe_site_file",
            _ => "build_failed",
        }
    }
}

pub(crate) struct Logged {
    pub success: bool,
    pub status: String,
    pub tail: String,
}

/// How long the build's output is still read after the build has ended.
const READ_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Run argv in `dir` in `jail`, in its own process group, with `env` on top of the allowed
/// environment; keep the last lines of stdout and stderr.
pub(crate) async fn run_logged(
    argv: &[String],
    env: &[(String, std::ffi::OsString)],
    jail: &Jail,
    dir: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Logged, BuildError> {
    let program = argv[0].clone();
    let mut cmd = command_for(argv, env, jail, dir);
    cmd.stdin(Stdio::null());
    let mut child = cmd.spawn().map_err(|source| BuildError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pgid = child.id().map(|id| id as i32);
    let output: [Output; 2] = [
        Box::new(child.stdout.take().expect("piped")),
        Box::new(child.stderr.take().expect("piped")),
    ];
    finish_logged(child, pgid, output, jail, program, timeout, cancel).await
}

/// The command for argv in `dir` in `jail`, as every install and build runs: its own process
/// group, stdout and stderr piped, the build's environment with `env` on top. Stdin is the
/// caller's to set.
pub(crate) fn command_for(
    argv: &[impl AsRef<std::ffi::OsStr>],
    env: &[(String, std::ffi::OsString)],
    jail: &Jail,
    dir: &Path,
) -> tokio::process::Command {
    let mut cmd = jail.command(&argv[0], dir);
    cmd.args(&argv[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    process::allow_env(&mut cmd, BUILD_ENV);
    // npm's own harmless settings (cache folder, registry, retries, proxy) pass through by an
    // explicit list; none of npm's credentials or config files do.
    process::allow_npm_config(&mut cmd);
    // The worker must not phone home on the client's behalf.
    cmd.env("ASTRO_TELEMETRY_DISABLED", "1").env("CI", "1");
    // Its own HOME, TMPDIR and npm cache in the sandbox.
    cmd.envs(jail.env());
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// A started process's stdout or stderr.
pub(crate) type Output = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

/// Wait for a started install or build (process group `pgid`) within `timeout`, reading its
/// `[stdout, stderr]`, and end everything it started.
pub(crate) async fn finish_logged(
    mut child: tokio::process::Child,
    pgid: Option<i32>,
    [stdout, stderr]: [Output; 2],
    jail: &Jail,
    program: String,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Logged, BuildError> {
    // A tenant that fills the disk with many files, each under its file limit, is stopped.
    let disk = jail.watch_disk(pgid);
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let readers = [
        tokio::spawn(keep_tail(stdout, tail.clone())),
        tokio::spawn(keep_tail(stderr, tail.clone())),
    ];
    let waited = tokio::select! {
        status = child.wait() => Ok(status?),
        _ = tokio::time::sleep(timeout) => Err(BuildError::Timeout { program, timeout }),
        _ = cancel.cancelled() => Err(BuildError::Cancelled),
    };
    // Whatever happened, nothing of the build outlives this call.
    process::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
    jail.sweep().await;
    let status = waited?;
    // A process that left the group (setsid, a detached child) can hold the pipes open for
    // ever: read what is left for a moment, then stop reading.
    for mut r in readers {
        if tokio::time::timeout(READ_AFTER_EXIT, &mut r).await.is_err() {
            r.abort();
            tracing::warn!(
                "a process the build left behind keeps its output open; no longer reading it"
            );
        }
    }
    let tail = tail
        .lock()
        .expect("tail lock")
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    if disk.as_ref().is_some_and(DiskWatch::exceeded) {
        return Ok(Logged {
            success: false,
            status: format!(
                "stopped: it wrote more than {} MB (SANDBOX_MAX_DISK_MB)",
                jail.disk_limit_mb()
            ),
            tail,
        });
    }
    Ok(Logged {
        success: status.success(),
        status: status.to_string(),
        tail,
    })
}

/// Keep the last lines of a stream. Bytes, not text: a line of invalid UTF-8 is kept lossily
/// and reading goes on (a reader that stopped would leave the build to die of SIGPIPE).
async fn keep_tail(stream: impl tokio::io::AsyncRead + Unpin, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let mut tail = tail.lock().expect("tail lock");
        tail.push_back(
            text.trim_end_matches(['\n', '\r'])
                .chars()
                .take(500)
                .collect(),
        );
        if tail.len() > LOG_TAIL_LINES {
            tail.pop_front();
        }
    }
}
