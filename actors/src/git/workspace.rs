//! One client's workspace: a git checkout at `{WORKSPACE_ROOT}/{clientId}/{projectId}`.
//!
//! This is the only type the rest of the worker uses for git. It combines gix (`local`) for
//! local work with the `git` program (`subprocess`) for what gix cannot do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::local::{self, Identity, LocalGitError};
use super::subprocess::{GitCommandError, GitProgram};

/// The commit message of work saved because it was interrupted or left behind by a crash.
pub const SAVE_MESSAGE: &str = "Interrupted - saving work";
/// The trailer that records which SQS message's finished agent run produced a commit: a
/// redelivered message whose commit exists does not run the agent again.
pub const MESSAGE_TRAILER: &str = "Edit-Worker-Message";
/// The trailer of saved, unfinished work. Distinct from `MESSAGE_TRAILER` so that a message
/// whose work was only saved (interrupted, shut down) still runs when it comes back.
pub const SAVED_TRAILER: &str = "Edit-Worker-Saved";
/// Folders that must never be committed, whatever the site's own `.gitignore` says: installed
/// packages and build output are thousands of files that the upstream does not want.
const ALWAYS_EXCLUDED: &[&str] = &["node_modules/", ".astro/"];

const AUTHOR: Identity<'static> = Identity {
    name: "edit-worker",
    email: "edit-worker@webordinary.com",
};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
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
        "thread branch {branch} has diverged from the upstream and the two cannot be merged \
         without conflicts; resolve it on the upstream ({detail})"
    )]
    Diverged { branch: String, detail: String },
}

/// Unfinished work found in the worktree and committed on its own branch before switching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedWork {
    pub branch: String,
    pub commit: String,
}

#[derive(Debug, Clone)]
pub struct Workspace {
    /// The checkout; its parent folders are created on first clone.
    dir: PathBuf,
    /// Upstream remote (`origin`), when the workspace is cloned and pushed.
    remote: Option<String>,
    /// The build output folder (relative), kept out of commits.
    build_output_dir: PathBuf,
}

impl Workspace {
    pub fn new(dir: PathBuf, remote: Option<String>, build_output_dir: PathBuf) -> Workspace {
        Workspace {
            dir,
            remote,
            build_output_dir,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn has_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Worker state that belongs to this checkout but not to its history (install stamps,
    /// the last published commit). Inside `.git`, so it is never committed or published.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(".git").join("edit-worker")
    }

    /// Clone the workspace when it does not exist yet and make sure it is usable. True when it
    /// was cloned just now.
    pub async fn ensure_ready(&self) -> Result<bool, GitError> {
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
        self.write_excludes().await?;
        self.remove_stale_locks().await?;
        tokio::fs::create_dir_all(self.state_dir()).await?;
        Ok(cloned)
    }

    /// Check out `branch`, saving unfinished work of whatever was checked out first.
    ///
    /// The branch comes from the upstream when it exists there; a new thread starts from the
    /// upstream's default branch, never from another thread's work.
    pub async fn prepare_thread(
        &self,
        branch: &str,
        message_id: &str,
    ) -> Result<Option<SavedWork>, GitError> {
        let cloned = self.ensure_ready().await?;
        let saved = self.save_unfinished_work(message_id).await?;
        let git = GitProgram::new(&self.dir);
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
    pub async fn commit_all(
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
        let dir = self.dir.clone();
        let commit =
            tokio::task::spawn_blocking(move || local::commit_all(&dir, &message, &AUTHOR))
                .await??;
        Ok(commit)
    }

    /// The commit on `branch` that `message_id` produced, if any (redelivery check).
    pub async fn commit_of_message(
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

    pub async fn head_commit(&self) -> Result<String, GitError> {
        self.blocking(local::head_commit).await
    }

    /// Push `branch` to the upstream, retrying with backoff: a remote that is away for a
    /// moment must not cost the client their edit.
    pub async fn push(&self, branch: &str, attempts: u32) -> Result<(), GitError> {
        if self.remote.is_none() {
            return Ok(());
        }
        let git = GitProgram::new(&self.dir);
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match git.push(branch).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < attempts.max(1) => {
                    tracing::warn!(branch, attempt, error = %e, "push failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
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
        f: fn(&Path) -> Result<T, LocalGitError>,
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
pub fn agent_commit_subject(command: &str) -> String {
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
