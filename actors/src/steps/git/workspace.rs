//! One client's workspace: a git checkout at `{WORKSPACE_ROOT}/{clientId}/{projectId}`.
//!
//! This is the only type the rest of the worker uses for git. It combines gix (`local`) for
//! local work with the `git` program (`subprocess`) for what gix cannot do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

use super::local::{self, Identity, LocalGitError};
use super::subprocess::{GitCommandError, GitPolicy, GitProgram};

/// The commit message of work saved because it was interrupted or left behind by a crash.
pub(crate) const SAVE_MESSAGE: &str = "Interrupted - saving work";
/// The trailer that records which SQS message's finished agent run produced a commit: a
/// redelivered message whose commit exists does not run the agent again.
pub(crate) const MESSAGE_TRAILER: &str = "Edit-Worker-Message";
/// The trailer of saved, unfinished work. Distinct from `MESSAGE_TRAILER` so that a message
/// whose work was only saved (interrupted, shut down) still runs when it comes back.
pub(crate) const SAVED_TRAILER: &str = "Edit-Worker-Saved";
/// Folders that must never be committed, whatever the site's own `.gitignore` says: installed
/// packages and build output are thousands of files that the upstream does not want.
const ALWAYS_EXCLUDED: &[&str] = &["node_modules/", ".astro/"];

const AUTHOR: Identity<'static> = Identity {
    name: "edit-worker",
    email: "edit-worker@webordinary.com",
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum GitError {
    #[error("workspace {0} does not exist and no GIT_REMOTE_TEMPLATE is configured")]
    NoWorkspace(PathBuf),
    #[error(transparent)]
    Command(#[from] GitCommandError),
    #[error(transparent)]
    Local(#[from] LocalGitError),
    #[error("workspace file system: {0}")]
    Io(#[from] std::io::Error),
    #[error("gix task ended unexpectedly: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(
        "the upstream's fence {fence_ref} is past this worker's lease token {token}: another \
         worker holds the workspace now ({detail})"
    )]
    Fenced {
        fence_ref: String,
        token: u64,
        detail: String,
    },
    #[error(
        "commit {0} is not in the workspace's repository (nor on the upstream): there is nothing \
         to roll back to"
    )]
    UnknownCommit(String),
    #[error(
        "thread branch {branch} has diverged from the upstream and the two cannot be merged \
         without conflicts; resolve it on the upstream ({detail})"
    )]
    Diverged { branch: String, detail: String },
}

/// The lease that fences this worker's pushes: the upstream ref that holds the fence commit and
/// the holder's token. A push carries the fence atomically, and a new holder moves the fence
/// before it works, so the pushes of a worker that lost its lease are refused by the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fence {
    pub ref_name: String,
    pub token: u64,
}

impl Fence {
    /// The fence ref of a workspace: `refs/edit-worker/lease/{clientId}/{projectId}`.
    pub(crate) fn for_workspace(key: &crate::contract::message::WorkspaceKey, token: u64) -> Fence {
        Fence {
            ref_name: format!(
                "refs/edit-worker/lease/{}/{}",
                key.client_id, key.project_id
            ),
            token,
        }
    }
}

/// Unfinished work found in the worktree and committed on its own branch before switching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedWork {
    pub branch: String,
    pub commit: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Workspace {
    /// The checkout; its parent folders are created on first clone.
    dir: PathBuf,
    /// Upstream remote (`origin`), when the workspace is cloned and pushed.
    remote: Option<String>,
    /// The build output folder (relative), kept out of commits.
    build_output_dir: crate::config::OutputDir,
    /// What git may do here (transports, `origin`), from `remote`.
    policy: GitPolicy,
    /// The lease the current batch works under ends when this is cancelled: every `git` call
    /// of this workspace then stops (`GitCommandError::Stopped`). Set by [`Workspace::work_under`]
    /// at the start of each batch.
    lease_lost: CancellationToken,
}

impl Workspace {
    pub(crate) fn new(
        dir: PathBuf,
        remote: Option<String>,
        build_output_dir: crate::config::OutputDir,
    ) -> Workspace {
        Workspace {
            policy: GitPolicy::for_remote(remote.as_deref()),
            dir,
            remote,
            build_output_dir,
            lease_lost: CancellationToken::new(),
        }
    }

    /// From now on, git here works under the lease whose end cancels `lost`.
    pub(crate) fn work_under(&mut self, lost: CancellationToken) {
        self.lease_lost = lost;
    }

    /// The `git` program in this checkout, under this workspace's policy and lease.
    fn git(&self) -> GitProgram {
        GitProgram::new(&self.dir, &self.policy).stopped_by(&self.lease_lost)
    }

    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Worker state that belongs to this checkout but not to its history (install stamps,
    /// the last published commit). Inside `.git`, so it is never committed or published.
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.join(".git").join("edit-worker")
    }

    /// Clone the workspace when it does not exist yet and make sure it is usable. True when it
    /// was cloned just now.
    pub(crate) async fn ensure_ready(&self) -> Result<bool, GitError> {
        let cloned = !self.dir.join(".git").exists();
        if cloned {
            let Some(remote) = &self.remote else {
                return Err(GitError::NoWorkspace(self.dir.clone()));
            };
            let parent = self.dir.parent().expect("workspace dir has a parent");
            tokio::fs::create_dir_all(parent).await?;
            // Clone beside the target, then rename: a clone cut short never looks like a
            // workspace, and the next attempt starts clean.
            let name = self.dir.file_name().expect("workspace dir has a name");
            let tmp = parent.join(format!(".{}.cloning", name.to_string_lossy()));
            if tmp.exists() {
                tokio::fs::remove_dir_all(&tmp).await?;
            }
            GitProgram::clone_into(remote, &tmp).await?;
            tokio::fs::rename(&tmp, &self.dir).await?;
        }
        // First: a `.git` that leads elsewhere is refused before anything is written into it,
        // and gix reads the configuration next (status, commits): the worker's, not the
        // tenant's.
        self.git().secure_checkout().await?;
        self.write_excludes().await?;
        self.remove_stale_locks().await?;
        tokio::fs::create_dir_all(self.state_dir()).await?;
        Ok(cloned)
    }

    /// Take the workspace over from another worker (or from nobody known): move the upstream's
    /// fence to this holder's token, so the previous holder can push nothing more, and set
    /// aside what a previous holder left in the worktree (a worker killed mid-run: its message
    /// comes back and runs again, so its half-done edit is kept in a stash entry, not applied).
    pub(crate) async fn take_over(&self, fence: &Fence) -> Result<(), GitError> {
        self.ensure_ready().await?;
        if !self.blocking(local::changed_paths).await?.is_empty() {
            let note = format!(
                "edit-worker: left in the worktree before lease token {}",
                fence.token
            );
            self.git()
                .stash_all(&note, AUTHOR.name, AUTHOR.email)
                .await?;
            tracing::warn!(
                token = fence.token,
                "the previous holder left changes in the worktree; kept aside in a stash entry, not applied"
            );
        }
        if self.remote.is_some() {
            self.claim_fence(fence).await?;
        }
        // Another worker may have published since this checkout last did.
        match tokio::fs::remove_file(self.state_dir().join("published")).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        Ok(())
    }

    /// The fence commit of this holder, in the local object store.
    async fn fence_commit(&self, fence: &Fence) -> Result<String, GitError> {
        let label = fence.ref_name.clone();
        let token = fence.token;
        self.blocking(move |dir| local::fence_commit(dir, &label, token))
            .await
    }

    /// Move the upstream's fence to this holder's token, unless it is already past it.
    async fn claim_fence(&self, fence: &Fence) -> Result<(), GitError> {
        let git = self.git();
        let mine = self.fence_commit(fence).await?;
        let mut last = None;
        for _ in 0..3 {
            let current = git.remote_ref(&fence.ref_name).await?;
            if current.as_deref() == Some(mine.as_str()) {
                return Ok(());
            }
            if let Some(current) = &current {
                git.fetch_ref(&fence.ref_name).await?;
                let found = current.clone();
                let token = self
                    .blocking(move |dir| local::fence_token(dir, &found))
                    .await?;
                if let Some(theirs) = token.filter(|t| *t > fence.token) {
                    return Err(GitError::Fenced {
                        fence_ref: fence.ref_name.clone(),
                        token: fence.token,
                        detail: format!("the upstream's fence carries token {theirs}"),
                    });
                }
            }
            match git
                .move_fence(&fence.ref_name, &mine, current.as_deref())
                .await
            {
                Ok(()) => return Ok(()),
                // Moved by someone meanwhile: look again.
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once").into())
    }

    /// Check out `branch`, saving unfinished work of whatever was checked out first.
    ///
    /// The branch comes from the upstream when it exists there; a new thread starts from the
    /// upstream's default branch, never from another thread's work.
    ///
    /// With `trust_upstream` (the first work after a takeover), local commits that the upstream
    /// does not have are a previous holder's unpushed work, whose messages run again: they are
    /// kept under `refs/edit-worker/discarded/{branch}` and the branch starts from the upstream.
    pub(crate) async fn prepare_thread(
        &self,
        branch: &str,
        message_id: &str,
        trust_upstream: bool,
    ) -> Result<Option<SavedWork>, GitError> {
        let cloned = self.ensure_ready().await?;
        let saved = self.save_unfinished_work(message_id).await?;
        let git = self.git();
        // A clone made a moment ago is as fresh as a fetch would make it.
        if self.remote.is_some() && !cloned {
            // With a checkout at hand, a remote that is away for a moment does not stop the
            // edit: it is made on the local state, and the push (retried) catches up.
            if let Err(e) = git.fetch().await {
                tracing::warn!(error = %e, "fetch failed; working on the local state of the workspace");
            }
        }
        let current = self.blocking(local::current_branch).await?;
        let local_ref = format!("refs/heads/{branch}");
        let remote_ref = format!("refs/remotes/origin/{branch}");
        let local_tip = self.resolve(&local_ref).await?;
        let remote_tip = self.resolve(&remote_ref).await?;
        let (has_local, has_remote) = (local_tip.is_some(), remote_tip.is_some());

        if trust_upstream && has_local && local_tip != remote_tip {
            let upstream = format!("origin/{branch}");
            let behind_only = has_remote
                && current.as_deref() == Some(branch)
                && git.fast_forward(&upstream).await.is_ok();
            if !behind_only {
                let start = if has_remote {
                    upstream
                } else {
                    self.default_base().await?
                };
                let local_tip = local_tip.clone().expect("has_local");
                git.update_ref(&format!("refs/edit-worker/discarded/{branch}"), &local_tip)
                    .await?;
                git.switch_reset(branch, &start).await?;
                tracing::warn!(branch, discarded = %local_tip, "local commits the upstream does not have were left by a previous holder; kept aside, the branch starts from the upstream");
            }
            return Ok(saved);
        }
        if current.as_deref() != Some(branch) {
            if has_local {
                git.switch(branch).await?;
            } else if has_remote {
                git.switch_create(branch, &format!("origin/{branch}"), true)
                    .await?;
            } else {
                let base = self.default_base().await?;
                git.switch_create(branch, &base, false).await?;
            }
        }
        if has_local && has_remote && local_tip != remote_tip {
            // Someone else (another container, a person) may have pushed to the thread. Take
            // their work: fast-forward, or, when both sides have new commits, merge theirs in,
            // so that the edit is made on top of it and the push goes through.
            let upstream = format!("origin/{branch}");
            if let Err(ff) = git.fast_forward(&upstream).await {
                tracing::info!(branch, reason = %ff, "thread branch diverged from the upstream; merging the upstream's work");
                if let Err(e) = git.merge(&upstream, AUTHOR.name, AUTHOR.email).await {
                    git.abort_merge().await;
                    return Err(GitError::Diverged {
                        branch: branch.to_owned(),
                        detail: e.to_string(),
                    });
                }
            }
        }
        Ok(saved)
    }

    /// Commit everything in the worktree on the current branch. `None`: nothing changed.
    /// `finished` says whether this is the message's finished work (trailer `MESSAGE_TRAILER`)
    /// or work saved half-way (`SAVED_TRAILER`).
    pub(crate) async fn commit_all(
        &self,
        subject: &str,
        body: &str,
        message_ids: &[String],
        finished: bool,
    ) -> Result<Option<String>, GitError> {
        let trailer = if finished {
            MESSAGE_TRAILER
        } else {
            SAVED_TRAILER
        };
        let message = commit_message(subject, body, trailer, message_ids);
        // The agent and the build ran since the last git call: gix's status must not run a
        // filter driver they configured.
        self.git().secure_checkout().await?;
        let dir = self.dir.clone();
        let commit =
            tokio::task::spawn_blocking(move || local::commit_all(&dir, &message, &AUTHOR))
                .await??;
        Ok(commit)
    }

    /// The commit on `branch` that `message_id` produced, if any (redelivery check).
    pub(crate) async fn commit_of_message(
        &self,
        branch: &str,
        message_id: &str,
    ) -> Result<Option<String>, GitError> {
        let dir = self.dir.clone();
        let start = format!("refs/heads/{branch}");
        let id = message_id.to_owned();
        Ok(tokio::task::spawn_blocking(move || {
            local::find_commit_with_trailer(&dir, &start, MESSAGE_TRAILER, &id, 200)
        })
        .await??)
    }

    /// Roll the current branch back to `target`'s tree: a commit `Rollback to {short}` on top
    /// of the branch (its history kept), the worktree holding that tree. A message whose
    /// rollback commit is there already (a redelivery) gets that commit back, not a second one.
    pub(crate) async fn rollback_to(
        &self,
        target: &str,
        message_id: &str,
    ) -> Result<String, GitError> {
        if let Some(branch) = self.blocking(local::current_branch).await?
            && let Some(done) = self.commit_of_message(&branch, message_id).await?
        {
            return Ok(done);
        }
        let wanted = target.to_owned();
        if !self
            .blocking(move |dir| local::has_commit(dir, &wanted))
            .await?
        {
            return Err(GitError::UnknownCommit(target.to_owned()));
        }
        self.git().checkout_tree_changes(target).await?;
        let short: String = target.chars().take(7).collect();
        let message = commit_message(
            &format!("Rollback to {short}"),
            &format!("The site is back at commit {target}, as it was deployed then."),
            MESSAGE_TRAILER,
            &[message_id.to_owned()],
        );
        let target = target.to_owned();
        self.blocking(move |dir| local::commit_tree_of(dir, &target, &message, &AUTHOR))
            .await
    }

    pub(crate) async fn head_commit(&self) -> Result<String, GitError> {
        self.blocking(local::head_commit).await
    }

    /// Push `branch` to the upstream, retrying with backoff: a remote that is away for a
    /// moment must not cost the client their edit. A push the upstream refuses is not retried.
    ///
    /// With a `fence`, the push carries it (see `Fence`) and one the upstream refuses because
    /// the fence has moved on is not retried: the workspace has another holder.
    pub(crate) async fn push(
        &self,
        branch: &str,
        attempts: u32,
        fence: Option<&Fence>,
    ) -> Result<(), GitError> {
        if self.remote.is_none() {
            return Ok(());
        }
        let git = self.git();
        let fence_commit = match fence {
            Some(f) => Some(self.fence_commit(f).await?),
            None => None,
        };
        let mut delay = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut attempt = 1;
        loop {
            let pushed = match (fence, &fence_commit) {
                (Some(f), Some(commit)) => git.push_fenced(branch, &f.ref_name, commit).await,
                _ => git.push(branch).await,
            };
            // The lease ended: no look at the fence (that git would stop too), no retry.
            if let Err(e @ GitCommandError::Stopped { .. }) = pushed {
                return Err(e.into());
            }
            if let (Err(e), Some(f), Some(commit)) = (&pushed, fence, &fence_commit)
                && git.remote_ref(&f.ref_name).await.ok().flatten().as_deref()
                    != Some(commit.as_str())
            {
                return Err(GitError::Fenced {
                    fence_ref: f.ref_name.clone(),
                    token: f.token,
                    detail: e.to_string(),
                });
            }
            match pushed {
                Ok(()) => return Ok(()),
                // The upstream answered and said no: the same push would get the same answer.
                Err(e @ GitCommandError::PushRefused { .. }) => return Err(e.into()),
                Err(e) if attempt < attempts.max(1) => {
                    tracing::warn!(branch, attempt, error = %e, "push failed; retrying");
                    crate::telemetry::metrics::metrics()
                        .push_retries
                        .add(1, &[]);
                    tokio::time::sleep(delay.failed()).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Keep `branch`'s tip on the upstream under a ref of its own, `refs/edit-worker/saved/
    /// {branch}/{message_id}`, when the branch itself could not be pushed: the saved work is
    /// then somewhere durable before its message is deleted. Returns the ref's name.
    pub(crate) async fn push_saved(
        &self,
        branch: &str,
        message_id: &str,
    ) -> Result<String, GitError> {
        // The branch is a valid ref component already; the message id is made one (SQS ids are
        // UUIDs, anything else is hex-encoded).
        let plain = !message_id.is_empty()
            && message_id.len() <= 128
            && message_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let id = if plain {
            message_id.to_owned()
        } else {
            message_id.bytes().map(|b| format!("{b:02x}")).collect()
        };
        let saved_ref = format!("refs/edit-worker/saved/{branch}/{id}");
        if self.remote.is_none() {
            return Ok(saved_ref);
        }
        self.git().push_saved(branch, &saved_ref).await?;
        Ok(saved_ref)
    }

    /// Commit whatever the worktree holds on the branch it is on, before anything switches away.
    async fn save_unfinished_work(&self, message_id: &str) -> Result<Option<SavedWork>, GitError> {
        let Some(branch) = self.blocking(local::current_branch).await? else {
            return Ok(None);
        };
        let commit = self
            .commit_all(
                SAVE_MESSAGE,
                "Found uncommitted changes in the workspace before starting new work.",
                &[message_id.to_owned()],
                false,
            )
            .await?;
        Ok(commit.map(|commit| SavedWork { branch, commit }))
    }

    /// Where a new thread starts: the upstream's default branch, else the local default.
    async fn default_base(&self) -> Result<String, GitError> {
        for candidate in [
            "refs/remotes/origin/HEAD",
            "refs/remotes/origin/main",
            "refs/remotes/origin/master",
            "refs/heads/main",
            "refs/heads/master",
        ] {
            if let Some(id) = self.resolve(candidate).await? {
                return Ok(id);
            }
        }
        self.head_commit().await
    }

    async fn resolve(&self, full_name: &str) -> Result<Option<String>, GitError> {
        let dir = self.dir.clone();
        let name = full_name.to_owned();
        Ok(tokio::task::spawn_blocking(move || local::resolve_ref(&dir, &name)).await??)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> Result<T, LocalGitError> + Send + 'static,
    ) -> Result<T, GitError> {
        let dir = self.dir.clone();
        Ok(tokio::task::spawn_blocking(move || f(&dir)).await??)
    }

    /// Keep installed packages and build output out of every commit, via the checkout's own
    /// exclude file (never committed, so the client's repository is not changed by it).
    async fn write_excludes(&self) -> Result<(), GitError> {
        let info = self.dir.join(".git").join("info");
        tokio::fs::create_dir_all(&info).await?;
        let path = info.join("exclude");
        let existing = tokio::fs::read_to_string(&path).await.unwrap_or_default();
        let output = format!("/{}/", self.build_output_dir.display());
        let mut wanted: Vec<&str> = ALWAYS_EXCLUDED.to_vec();
        wanted.push(&output);
        let missing: Vec<&str> = wanted
            .into_iter()
            .filter(|line| !existing.lines().any(|l| l.trim() == *line))
            .collect();
        if !missing.is_empty() {
            let mut content = existing;
            if !content.is_empty() && !content.ends_with('\n') {
                content.push('\n');
            }
            content.push_str("# added by edit-worker\n");
            for line in missing {
                content.push_str(line);
                content.push('\n');
            }
            tokio::fs::write(&path, content).await?;
        }
        Ok(())
    }

    /// A session is the only user of its workspace's git, and runs one git operation at a time,
    /// so a lock file found before we start was left by a crash (a `kill -9` inside a commit,
    /// a switch, a fetch or a ref update). Left in place, it would fail every later message of
    /// the thread (a ref's lock) or of the whole workspace (`index.lock`, `HEAD.lock`).
    async fn remove_stale_locks(&self) -> Result<(), GitError> {
        let git_dir = self.dir.join(".git");
        let removed = tokio::task::spawn_blocking(move || stale_locks(&git_dir)).await??;
        for path in removed {
            tracing::warn!(path = %path.display(), "removed a stale git lock file");
        }
        Ok(())
    }
}

/// Remove the lock files under a repository's git folder: its own (`index.lock`, `HEAD.lock`,
/// `config.lock`, `packed-refs.lock`, ...) and those of refs. Objects are never locked this
/// way, so they are not walked. Returns what was removed.
fn stale_locks(git_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    // (folder, walk its subfolders too): the git folder's own files, then all of `refs`.
    let mut folders = vec![(git_dir.to_owned(), false), (git_dir.join("refs"), true)];
    while let Some((folder, deep)) = folders.pop() {
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() && deep {
                folders.push((path, true));
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "lock") {
                std::fs::remove_file(&path)?;
                removed.push(path);
            }
        }
    }
    Ok(removed)
}

/// `{subject}\n\n{body}\n\n{trailer}: {id}` (one trailer line per message).
fn commit_message(subject: &str, body: &str, trailer: &str, message_ids: &[String]) -> String {
    let mut message = String::from(subject);
    message.push_str("\n\n");
    if !body.trim().is_empty() {
        message.push_str(body.trim());
        message.push_str("\n\n");
    }
    for id in message_ids {
        message.push_str(&format!("{trailer}: {id}\n"));
    }
    message
}

/// `Claude: {first 50 characters of the command}...` (the ellipsis only when it was cut).
pub(crate) fn agent_commit_subject(command: &str) -> String {
    let first_line = command.lines().next().unwrap_or("").trim();
    let mut chars = first_line.chars();
    let head: String = chars.by_ref().take(50).collect();
    let cut = chars.next().is_some() || command.trim().lines().count() > 1;
    if cut {
        format!("Claude: {head}...")
    } else {
        format!("Claude: {head}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_keeps_fifty_characters() {
        let cmd = "Update the homepage title to \"Amelia Stamps - Handcrafted with Love\"";
        assert_eq!(
            agent_commit_subject(cmd),
            "Claude: Update the homepage title to \"Amelia Stamps - Hand..."
        );
        assert_eq!(agent_commit_subject("Fix typo"), "Claude: Fix typo");
        // Characters, not bytes: a multi-byte text is never cut inside a character.
        let accents = "é".repeat(60);
        assert_eq!(
            agent_commit_subject(&accents),
            format!("Claude: {}...", "é".repeat(50))
        );
    }

    #[test]
    fn message_carries_the_trailer() {
        let m = commit_message(
            "s",
            "full text",
            MESSAGE_TRAILER,
            &["m-1".into(), "m-2".into()],
        );
        assert_eq!(
            m,
            "s\n\nfull text\n\nEdit-Worker-Message: m-1\nEdit-Worker-Message: m-2\n"
        );
    }

    #[test]
    fn stale_locks_of_the_repository_and_its_refs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let git = dir.path();
        for folder in ["refs/heads/nested", "refs/remotes/origin", "objects/ab"] {
            std::fs::create_dir_all(git.join(folder)).unwrap();
        }
        let locks = [
            "index.lock",
            "HEAD.lock",
            "refs/heads/thread-a.lock",
            "refs/heads/nested/b.lock",
            "refs/remotes/origin/thread-a.lock",
        ];
        for lock in locks {
            std::fs::write(git.join(lock), "").unwrap();
        }
        std::fs::write(git.join("refs/heads/thread-a"), "x").unwrap();
        std::fs::write(git.join("objects/ab/keep.lock"), "").unwrap();
        let mut removed: Vec<String> = stale_locks(git)
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(git).unwrap().display().to_string())
            .collect();
        removed.sort();
        let mut expected: Vec<String> = locks.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(removed, expected);
        assert!(git.join("refs/heads/thread-a").exists());
        assert!(git.join("objects/ab/keep.lock").exists());
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;

    use crate::steps::git::test_support::git;

    /// A bare upstream with one commit on `main`, and two checkouts of it as two workers have.
    fn world() -> (tempfile::TempDir, Workspace, Workspace) {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("up.git");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        git(&seed, &["init", "-q", "-b", "main"]);
        std::fs::write(seed.join("index.html"), "<h1>x</h1>").unwrap();
        git(&seed, &["add", "-A"]);
        git(&seed, &["commit", "-qm", "init"]);
        git(&seed, &["push", "-q", bare.to_str().unwrap(), "main"]);
        let remote = Some(bare.display().to_string());
        let a = Workspace::new(
            dir.path().join("a/ws"),
            remote.clone(),
            crate::config::OutputDir::new("dist").unwrap(),
        );
        let b = Workspace::new(
            dir.path().join("b/ws"),
            remote,
            crate::config::OutputDir::new("dist").unwrap(),
        );
        (dir, a, b)
    }

    fn fence(token: u64) -> Fence {
        Fence {
            ref_name: "refs/edit-worker/lease/c/p".into(),
            token,
        }
    }

    /// The tenant makes a committed folder a link to a folder outside its checkout (which holds
    /// a file and a link of the same names): the commit stages the link as a link and the files
    /// that were under the folder as removed, reading nothing behind the link.
    #[tokio::test]
    async fn a_folder_made_a_link_is_committed_as_the_link_not_followed() {
        let (dir, a, _b) = world();
        a.prepare_thread("thread-t", "m1", true).await.unwrap();
        std::fs::create_dir(a.dir().join("sub")).unwrap();
        std::fs::write(a.dir().join("sub/x.txt"), "mine").unwrap();
        std::os::unix::fs::symlink("x.txt", a.dir().join("sub/l")).unwrap();
        a.commit_all("sub", "sub", &["m1".into()], true)
            .await
            .unwrap()
            .expect("a commit");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("x.txt"), "SECRET-outside").unwrap();
        std::os::unix::fs::symlink("/etc/SECRET-target", outside.join("l")).unwrap();
        std::fs::remove_dir_all(a.dir().join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, a.dir().join("sub")).unwrap();
        a.commit_all("link", "link", &["m1".into()], true)
            .await
            .unwrap()
            .expect("a commit");
        let tree = git(a.dir(), &["ls-tree", "-r", "HEAD"]);
        assert!(
            tree.lines()
                .any(|l| l.starts_with("120000") && l.ends_with("\tsub")),
            "{tree}"
        );
        assert!(!tree.contains("sub/"), "{tree}");
        let objects = git(a.dir(), &["log", "-p", "--format=", "HEAD"]);
        assert!(
            !objects.contains("SECRET"),
            "read behind the link: {objects}"
        );
    }

    #[tokio::test]
    async fn a_holder_whose_fence_was_moved_on_pushes_nothing() {
        let (_dir, a, b) = world();
        // a takes the workspace with token 1 and works on a thread.
        a.take_over(&fence(1)).await.unwrap();
        a.prepare_thread("thread-t", "m1", true).await.unwrap();
        std::fs::write(a.dir().join("a.txt"), "a").unwrap();
        a.commit_all("a", "a", &["m1".into()], true).await.unwrap();
        a.push("thread-t", 1, Some(&fence(1))).await.unwrap();
        // a pauses past its lease; b takes the workspace with token 2.
        b.take_over(&fence(2)).await.unwrap();
        b.prepare_thread("thread-t", "m2", true).await.unwrap();
        // a wakes up and tries to push more: the upstream refuses it.
        std::fs::write(a.dir().join("late.txt"), "late").unwrap();
        a.commit_all("late", "late", &["m1".into()], true)
            .await
            .unwrap();
        let late = a.push("thread-t", 3, Some(&fence(1))).await;
        assert!(
            matches!(late, Err(GitError::Fenced { token: 1, .. })),
            "{late:?}"
        );
        // b's work goes through, and a's late commit is not on the upstream.
        std::fs::write(b.dir().join("b.txt"), "b").unwrap();
        b.commit_all("b", "b", &["m2".into()], true).await.unwrap();
        b.push("thread-t", 1, Some(&fence(2))).await.unwrap();
        let upstream = b.remote.clone().unwrap();
        let files = git(
            Path::new(&upstream),
            &["ls-tree", "--name-only", "thread-t"],
        );
        assert!(
            files.contains("b.txt") && files.contains("a.txt"),
            "{files}"
        );
        assert!(!files.contains("late.txt"), "{files}");
        // An old holder cannot move the fence back either.
        let back = a.take_over(&fence(1)).await;
        assert!(matches!(back, Err(GitError::Fenced { .. })), "{back:?}");
    }

    #[tokio::test]
    async fn a_takeover_sets_a_previous_holders_leftovers_aside() {
        let (_dir, a, _b) = world();
        a.take_over(&fence(1)).await.unwrap();
        a.prepare_thread("thread-t", "m1", true).await.unwrap();
        // Left by a holder that died: a local commit never pushed, and an edit not committed.
        std::fs::write(a.dir().join("unpushed.txt"), "x").unwrap();
        a.commit_all("x", "x", &["m1".into()], true).await.unwrap();
        std::fs::write(a.dir().join("half.txt"), "half").unwrap();
        a.take_over(&fence(2)).await.unwrap();
        a.prepare_thread("thread-t", "m1", true).await.unwrap();
        assert!(
            !a.dir().join("half.txt").exists(),
            "the half edit is set aside"
        );
        assert!(
            !a.dir().join("unpushed.txt").exists(),
            "the unpushed commit is set aside"
        );
        // Kept, not lost.
        git(
            a.dir(),
            &[
                "rev-parse",
                "--verify",
                "refs/edit-worker/discarded/thread-t",
            ],
        );
        assert!(git(a.dir(), &["stash", "list"]).contains("lease token 2"));
    }
}

#[cfg(test)]
mod tenant_config_tests {
    //! A tenant's agent or build can write `.git/hooks` and `.git/config` of its checkout; the
    //! worker's own git calls (switch, commit, push, merge) must run none of it.

    use super::*;

    use crate::steps::git::test_support::git;

    /// An upstream whose `main` has `a.txt` under a `filter=evil` attribute, and a branch
    /// `thread-other` where `a.txt` differs (so switching to it checks the file out); a
    /// workspace of it, cloned; and a folder where planted commands leave their marks.
    async fn world() -> (tempfile::TempDir, Workspace, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("up.git");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        git(&seed, &["init", "-q", "-b", "main"]);
        std::fs::write(
            seed.join(".gitattributes"),
            "*.txt filter=evil merge=evil diff=evil\n",
        )
        .unwrap();
        std::fs::write(seed.join("a.txt"), "main\n").unwrap();
        git(&seed, &["add", "-A"]);
        git(&seed, &["commit", "-qm", "init"]);
        git(&seed, &["push", "-q", bare.to_str().unwrap(), "main"]);
        git(&seed, &["switch", "-qc", "thread-other"]);
        std::fs::write(seed.join("a.txt"), "other\n").unwrap();
        git(&seed, &["commit", "-qam", "other"]);
        git(
            &seed,
            &["push", "-q", bare.to_str().unwrap(), "thread-other"],
        );
        let marks = dir.path().join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        let ws = Workspace::new(
            dir.path().join("ws"),
            Some(bare.display().to_string()),
            crate::config::OutputDir::new("dist").unwrap(),
        );
        ws.prepare_thread("thread-t", "m0", false).await.unwrap();
        (dir, ws, marks)
    }

    const HOOKS: &[&str] = &[
        "pre-commit",
        "prepare-commit-msg",
        "commit-msg",
        "post-commit",
        "post-checkout",
        "post-merge",
        "pre-merge-commit",
        "pre-push",
        "reference-transaction",
        "pre-auto-gc",
    ];

    /// What the tenant plants: a hook for every event, and command-running configuration.
    fn plant(ws: &Workspace, marks: &Path) {
        let hooks = ws.dir().join(".git/hooks");
        std::fs::create_dir_all(&hooks).unwrap();
        for hook in HOOKS {
            let path = hooks.join(hook);
            std::fs::write(
                &path,
                format!("#!/bin/sh\ntouch '{}/{hook}'\n", marks.display()),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mark = |name: &str| format!("touch '{}/{name}'", marks.display());
        let config = ws.dir().join(".git/config");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            "[filter \"evil\"]\n\tclean = \"sh -c \\\"{}; cat\\\"\"\n\tsmudge = \"sh -c \\\"{}; cat\\\"\"\n\
             [merge \"evil\"]\n\tdriver = \"{}\"\n[diff \"evil\"]\n\tcommand = \"{}\"\n\
             [core]\n\tfsmonitor = \"{}\"\n\tsshCommand = \"{}\"\n",
            mark("clean"),
            mark("smudge"),
            mark("merge-driver"),
            mark("diff"),
            mark("fsmonitor"),
            mark("ssh"),
        ));
        std::fs::write(&config, text).unwrap();
    }

    fn marks_left(marks: &Path) -> Vec<String> {
        let mut found: Vec<String> = std::fs::read_dir(marks)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        found
    }

    #[tokio::test]
    async fn planted_hooks_and_filters_do_not_run_on_switch_commit_or_push() {
        let (_dir, ws, marks) = world().await;
        plant(&ws, &marks);
        // Switch: the file under the filter is checked out.
        ws.prepare_thread("thread-other", "m1", false)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.dir().join("a.txt")).unwrap(),
            "other\n"
        );
        plant(&ws, &marks);
        // Commit (gix status and staging) and push.
        std::fs::write(ws.dir().join("a.txt"), "edited\n").unwrap();
        ws.commit_all("edit", "edit", &["m1".into()], true)
            .await
            .unwrap()
            .expect("a commit");
        plant(&ws, &marks);
        ws.push("thread-other", 1, None).await.unwrap();
        // Back to the first thread (saving nothing), and with a fence (ls-remote, push).
        plant(&ws, &marks);
        ws.prepare_thread("thread-t", "m2", false).await.unwrap();
        plant(&ws, &marks);
        std::fs::write(ws.dir().join("b.txt"), "b\n").unwrap();
        ws.commit_all("b", "b", &["m2".into()], true).await.unwrap();
        plant(&ws, &marks);
        ws.take_over(&Fence {
            ref_name: "refs/edit-worker/lease/c/p".into(),
            token: 1,
        })
        .await
        .unwrap();
        assert_eq!(marks_left(&marks), Vec::<String>::new());

        // The test is sound: the same checkout, planted again, runs them under plain git.
        plant(&ws, &marks);
        git(ws.dir(), &["checkout", "-q", "thread-other"]);
        let ran = marks_left(&marks);
        assert!(
            ran.contains(&"post-checkout".to_owned()) && ran.contains(&"smudge".to_owned()),
            "{ran:?}"
        );
    }

    #[tokio::test]
    async fn a_merge_of_the_upstreams_work_runs_no_merge_driver() {
        let (dir, ws, marks) = world().await;
        // A common base of a.txt on thread-other, on the upstream.
        ws.prepare_thread("thread-other", "m1", false)
            .await
            .unwrap();
        std::fs::write(ws.dir().join("a.txt"), "1\n2\n3\n4\n5\n6\n").unwrap();
        ws.commit_all("base", "base", &["m1".into()], true)
            .await
            .unwrap();
        ws.push("thread-other", 1, None).await.unwrap();
        // Someone changes its first line upstream; the checkout changes its last line.
        let other = dir.path().join("other");
        git(
            dir.path(),
            &["clone", "-q", "-b", "thread-other", "up.git", "other"],
        );
        std::fs::write(other.join("a.txt"), "one\n2\n3\n4\n5\n6\n").unwrap();
        git(&other, &["commit", "-qam", "theirs"]);
        git(&other, &["push", "-q", "origin", "thread-other"]);
        std::fs::write(ws.dir().join("a.txt"), "1\n2\n3\n4\n5\nsix\n").unwrap();
        ws.commit_all("mine", "mine", &["m2".into()], true)
            .await
            .unwrap();
        let mine = ws.head_commit().await.unwrap();
        plant(&ws, &marks);
        ws.prepare_thread("thread-other", "m3", false)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.dir().join("a.txt")).unwrap(),
            "one\n2\n3\n4\n5\nsix\n",
            "git's own merge of both sides"
        );
        assert_eq!(marks_left(&marks), Vec::<String>::new());

        // The test is sound: plain git, planted again, runs the driver for that merge.
        git(ws.dir(), &["reset", "-q", "--hard", &mine]);
        plant(&ws, &marks);
        git(
            ws.dir(),
            &["merge", "-q", "--no-edit", "origin/thread-other"],
        );
        assert!(
            marks_left(&marks).contains(&"merge-driver".to_owned()),
            "{:?}",
            marks_left(&marks)
        );
    }

    #[tokio::test]
    async fn gix_status_runs_no_filter_driver() {
        let (_dir, ws, marks) = world().await;
        // Same size, later time: gix must read and hash the file, through the filter.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        std::fs::write(ws.dir().join("a.txt"), "mabn\n").unwrap();
        plant(&ws, &marks);
        ws.commit_all("edit", "edit", &["m1".into()], true)
            .await
            .unwrap()
            .expect("a commit");
        assert_eq!(marks_left(&marks), Vec::<String>::new());

        // The test is sound: gix, on the planted configuration, runs the tenant's clean filter.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        std::fs::write(ws.dir().join("a.txt"), "mbbn\n").unwrap();
        plant(&ws, &marks);
        local::commit_all(ws.dir(), "x", &AUTHOR).unwrap();
        assert_eq!(marks_left(&marks), vec!["clean".to_owned()]);
    }
}
