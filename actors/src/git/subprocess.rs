//! Every call of the `git` program lives here, and nowhere else.
//!
//! gix does our local work (status, staging, commits, refs), but it cannot push, switch a
//! worktree or reset, and its network transports would add minutes to a clean build. For clone,
//! fetch, switch and push we run `git` itself: never through a shell, with argv built from
//! validated ids only, no terminal prompts, stdin closed, and a time limit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Network operations (clone, fetch, push) may take a while on a big site; local ones are quick.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(300);
const LOCAL_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong running `git`.
#[derive(Debug, thiserror::Error)]
pub enum GitCommandError {
    #[error("could not start `git`: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("`git {args}` failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("`git {args}` did not finish within {timeout:?}")]
    TimedOut { args: String, timeout: Duration },
}

/// The `git` program, run in one repository.
#[derive(Debug, Clone)]
pub struct GitProgram {
    /// The working directory of every call (`git -C` would work too; this keeps argv short).
    dir: PathBuf,
}

impl GitProgram {
    pub fn new(dir: impl Into<PathBuf>) -> GitProgram {
        GitProgram { dir: dir.into() }
    }

    /// Clone `remote` into `target`. `target` must not exist; the caller clones into a
    /// temporary folder and renames it, so an interrupted clone never looks like a workspace.
    pub async fn clone_into(remote: &str, target: &Path) -> Result<(), GitCommandError> {
        let parent = target.parent().unwrap_or(Path::new("."));
        let target = target.as_os_str().to_string_lossy().into_owned();
        // `--` ends the options: a remote that starts with `-` is still only a URL.
        GitProgram::new(parent)
            .run(
                &["clone", "--quiet", "--", remote, &target],
                NETWORK_TIMEOUT,
            )
            .await
            .map(drop)
    }

    /// Fetch every branch of `origin`, pruning deleted ones.
    pub async fn fetch(&self) -> Result<(), GitCommandError> {
        self.run(&["fetch", "--quiet", "--prune", "origin"], NETWORK_TIMEOUT)
            .await
            .map(drop)
    }

    /// Switch the worktree to an existing local branch.
    pub async fn switch(&self, branch: &str) -> Result<(), GitCommandError> {
        self.run(&["switch", "--quiet", branch], LOCAL_TIMEOUT)
            .await
            .map(drop)
    }

    /// Create `branch` at `start_point` and switch to it. With `track`, it follows `start_point`
    /// (a remote branch) for later pulls.
    pub async fn switch_create(
        &self,
        branch: &str,
        start_point: &str,
        track: bool,
    ) -> Result<(), GitCommandError> {
        let track = if track { "--track" } else { "--no-track" };
        self.run(
            &["switch", "--quiet", track, "-c", branch, start_point],
            LOCAL_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// Fast-forward the current branch to `upstream` when that is possible; a branch that has
    /// diverged is left as it is (the push will say so).
    pub async fn fast_forward(&self, upstream: &str) -> Result<(), GitCommandError> {
        self.run(&["merge", "--quiet", "--ff-only", upstream], LOCAL_TIMEOUT)
            .await
            .map(drop)
    }

    /// Merge `upstream` into the current branch (both sides have new commits), as `name`.
    pub async fn merge(
        &self,
        upstream: &str,
        name: &str,
        email: &str,
    ) -> Result<(), GitCommandError> {
        let user = format!("user.name={name}");
        let mail = format!("user.email={email}");
        self.run(
            &[
                "-c",
                &user,
                "-c",
                &mail,
                "merge",
                "--quiet",
                "--no-edit",
                "--no-ff",
                upstream,
            ],
            LOCAL_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// Abandon a merge that stopped on conflicts, leaving the branch as it was.
    pub async fn abort_merge(&self) {
        if let Err(e) = self.run(&["merge", "--abort"], LOCAL_TIMEOUT).await {
            tracing::warn!(error = %e, "could not abort the merge");
        }
    }

    /// Push `branch` to the same name on `origin`.
    pub async fn push(&self, branch: &str) -> Result<(), GitCommandError> {
        let refspec = format!("refs/heads/{branch}:refs/heads/{branch}");
        self.run(
            &["push", "--quiet", "--porcelain", "origin", &refspec],
            NETWORK_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// Push `branch` together with the lease's fence ref, atomically: the push goes through
    /// only while the upstream's fence is still `fence_commit` (this holder's token). A newer
    /// holder moves the fence first, so a holder that lost its lease pushes nothing.
    pub async fn push_fenced(
        &self,
        branch: &str,
        fence_ref: &str,
        fence_commit: &str,
    ) -> Result<(), GitCommandError> {
        let branch_spec = format!("refs/heads/{branch}:refs/heads/{branch}");
        let fence_spec = format!("{fence_commit}:{fence_ref}");
        let lease = format!("--force-with-lease={fence_ref}:{fence_commit}");
        self.run(
            &[
                "push",
                "--quiet",
                "--porcelain",
                "--atomic",
                &lease,
                "origin",
                &branch_spec,
                &fence_spec,
            ],
            NETWORK_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// Move the upstream's fence ref to `commit`, only if it is still `expected` (`None`: only
    /// if it does not exist yet).
    pub async fn move_fence(
        &self,
        fence_ref: &str,
        commit: &str,
        expected: Option<&str>,
    ) -> Result<(), GitCommandError> {
        let lease = format!("--force-with-lease={fence_ref}:{}", expected.unwrap_or(""));
        let spec = format!("{commit}:{fence_ref}");
        self.run(
            &["push", "--quiet", "--porcelain", &lease, "origin", &spec],
            NETWORK_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// The commit a ref of `origin` points at, if it exists there.
    pub async fn remote_ref(&self, name: &str) -> Result<Option<String>, GitCommandError> {
        let out = self
            .run(&["ls-remote", "origin", name], NETWORK_TIMEOUT)
            .await?;
        Ok(out
            .lines()
            .find(|l| l.split('\t').nth(1) == Some(name))
            .and_then(|l| l.split('\t').next())
            .map(str::to_owned))
    }

    /// Bring the objects of one ref of `origin` here (into `FETCH_HEAD`, no local ref).
    pub async fn fetch_ref(&self, name: &str) -> Result<(), GitCommandError> {
        self.run(&["fetch", "--quiet", "origin", name], NETWORK_TIMEOUT)
            .await
            .map(drop)
    }

    /// Point a local ref at `commit` (creating it).
    pub async fn update_ref(&self, name: &str, commit: &str) -> Result<(), GitCommandError> {
        self.run(&["update-ref", name, commit], LOCAL_TIMEOUT)
            .await
            .map(drop)
    }

    /// Put every change of the worktree (untracked files too) aside in a stash entry, leaving
    /// the worktree clean.
    pub async fn stash_all(
        &self,
        message: &str,
        name: &str,
        email: &str,
    ) -> Result<(), GitCommandError> {
        let user = format!("user.name={name}");
        let mail = format!("user.email={email}");
        self.run(
            &[
                "-c",
                &user,
                "-c",
                &mail,
                "stash",
                "push",
                "--quiet",
                "--include-untracked",
                "-m",
                message,
            ],
            LOCAL_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// Make `branch` point at `start_point` (created or reset) and switch to it.
    pub async fn switch_reset(
        &self,
        branch: &str,
        start_point: &str,
    ) -> Result<(), GitCommandError> {
        self.run(
            &["switch", "--quiet", "--force", "-C", branch, start_point],
            LOCAL_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// Whether `remote` answers (`git ls-remote`), for `edit-worker doctor`.
    pub async fn ls_remote(remote: &str) -> Result<(), GitCommandError> {
        GitProgram::new(std::env::temp_dir())
            .run(&["ls-remote", "--heads", "--", remote], NETWORK_TIMEOUT)
            .await
            .map(drop)
    }

    /// Run git with `args` in this repository and return its stdout.
    async fn run(&self, args: &[&str], timeout: Duration) -> Result<String, GitCommandError> {
        let mut cmd = Command::new("git");
        // The checkout's own hooks and command-running settings never run with the worker's
        // rights: a tenant's agent or build can write `.git/hooks` or `.git/config`.
        cmd.args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
        ])
        .args(args)
        .current_dir(&self.dir)
        // Never wait for a person: no prompts for credentials, no editor, no pager.
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_EDITOR", "true")
        .env("GIT_PAGER", "cat")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A git that outlives its time limit is killed, not left behind.
        .kill_on_drop(true);
        let joined = args.join(" ");
        let output = match tokio::time::timeout(timeout, cmd.output()).await {
            Ok(result) => result.map_err(GitCommandError::Spawn)?,
            Err(_) => {
                return Err(GitCommandError::TimedOut {
                    args: joined,
                    timeout,
                });
            }
        };
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(GitCommandError::Failed {
                args: joined,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}
