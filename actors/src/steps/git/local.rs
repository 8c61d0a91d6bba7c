//! Local repository work with gix: refs, status, staging and commits. Nothing here runs the
//! `git` program (that is `subprocess.rs`), and nothing here touches the network.
//!
//! gix is blocking; every function here is called from `spawn_blocking` by `Workspace`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::Path;

use gix::bstr::{BString, ByteSlice};
use gix::object::tree::EntryKind;

use crate::tenant::tenant_fs::{self, DirHandle};

/// A gix operation failed. gix's errors differ per operation, so they are kept as their text
/// with the name of what we were doing.
#[derive(Debug, thiserror::Error)]
#[error("git {op}: {message}")]
pub(crate) struct LocalGitError {
    pub op: &'static str,
    pub message: String,
}

fn err<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> LocalGitError {
    move |e| LocalGitError {
        op,
        message: e.to_string(),
    }
}

/// The largest worktree file the worker reads to commit it: the default `SANDBOX_MAX_FILE_MB`,
/// the most a tenant's process may write to one file.
const COMMIT_FILE_MAX_BYTES: u64 = 1 << 30;

/// Who the worker's commits are by.
pub(crate) struct Identity<'a> {
    pub name: &'a str,
    pub email: &'a str,
}

/// The branch HEAD points at, if any (`None` when detached).
pub(crate) fn current_branch(dir: &Path) -> Result<Option<String>, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    let head = repo.head_name().map_err(err("read HEAD"))?;
    Ok(head.map(|name| name.shorten().to_string()))
}

/// The commit a reference (`refs/heads/x`, `refs/remotes/origin/x`) points at, if it exists.
pub(crate) fn resolve_ref(dir: &Path, full_name: &str) -> Result<Option<String>, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    match repo
        .try_find_reference(full_name)
        .map_err(err("find reference"))?
    {
        Some(mut r) => Ok(Some(
            r.peel_to_id().map_err(err("peel reference"))?.to_string(),
        )),
        None => Ok(None),
    }
}

/// The commit HEAD points at.
pub(crate) fn head_commit(dir: &Path) -> Result<String, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    Ok(repo.head_id().map_err(err("read HEAD"))?.to_string())
}

/// The paths git would see as changed: tracked files modified or deleted, staged changes, and
/// untracked files that are not ignored.
pub(crate) fn changed_paths(dir: &Path) -> Result<BTreeSet<BString>, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    let status = repo
        .status(gix::progress::Discard)
        .map_err(err("status"))?
        // One entry per file, so that every new file is staged by name.
        .untracked_files(gix::status::UntrackedFiles::Files);
    let mut paths = BTreeSet::new();
    for item in status
        .into_iter(Vec::<BString>::new())
        .map_err(err("status"))?
    {
        let item = item.map_err(err("status"))?;
        paths.insert(item.location().to_owned());
    }
    Ok(paths)
}

/// Stage everything that changed and commit it on the current branch, as `git add -A && git
/// commit` would. Returns the new commit id, or `None` when there was nothing to commit.
///
/// The new tree is HEAD's tree with every changed path set to what the worktree holds now
/// (a missing file is removed). Afterwards the index is rewritten from the new tree, so that git
/// and gix both see a clean worktree.
pub(crate) fn commit_all(
    dir: &Path,
    message: &str,
    who: &Identity<'_>,
) -> Result<Option<String>, LocalGitError> {
    let paths = changed_paths(dir)?;
    if paths.is_empty() {
        return Ok(None);
    }
    let repo = gix::open(dir).map_err(err("open"))?;
    let head = repo.head_commit().map_err(err("read HEAD"))?;
    let head_tree = head.tree_id().map_err(err("read HEAD tree"))?;
    let mut editor = repo.edit_tree(head_tree).map_err(err("edit tree"))?;
    let workdir = repo
        .workdir()
        .ok_or_else(|| err("open")("repository has no worktree"))?
        .to_owned();

    for rela in &paths {
        let rela_str = rela.to_str().map_err(err("path"))?;
        // The worktree is the tenant's: what is at the path is looked at by folder handle,
        // never following a link on the way. A folder on the way that is a link (or a file)
        // means the path is not in the worktree any more, as git itself sees it.
        let (folder, name) = match rela_str.rsplit_once('/') {
            Some((folder, name)) => (Path::new(folder), name),
            None => (Path::new(""), rela_str),
        };
        let parent = match DirHandle::open(&workdir).and_then(|w| w.open_dir(folder)) {
            Ok(parent) => Some(parent),
            Err(e) if e.is_not_found() || e.is_refusal() => None,
            Err(e) => return Err(err("read worktree")(e)),
        };
        let stat = match &parent {
            Some(parent) => parent
                .stat(OsStr::new(name))
                .map_err(err("read worktree"))?,
            None => None,
        };
        match (&parent, stat) {
            (_, None) | (None, _) => {
                editor.remove(rela_str).map_err(err("stage removal"))?;
            }
            // A link is committed as a link, never followed.
            (Some(parent), Some(stat)) if tenant_fs::is_link(&stat) => {
                let target = parent
                    .link_target(OsStr::new(name))
                    .ok_or_else(|| err("read link")(format!("{rela_str} went away")))?;
                let id = repo
                    .write_blob(target.as_os_str().as_encoded_bytes())
                    .map_err(err("write blob"))?;
                editor
                    .upsert(rela_str, EntryKind::Link, id)
                    .map_err(err("stage link"))?;
            }
            (Some(parent), Some(stat)) if tenant_fs::is_regular(&stat) => {
                // As root, in the tenant's checkout (its build started ahead may be changing
                // it): by handle, no link followed on the way, a regular file only, bounded.
                let bytes = parent
                    .read(Path::new(name), COMMIT_FILE_MAX_BYTES)
                    .map_err(err("read worktree"))?
                    .ok_or_else(|| err("read worktree")(format!("{rela_str} went away")))?;
                let id = repo.write_blob(&bytes).map_err(err("write blob"))?;
                let kind = if stat.st_mode & 0o111 != 0 {
                    EntryKind::BlobExecutable
                } else {
                    EntryKind::Blob
                };
                editor
                    .upsert(rela_str, kind, id)
                    .map_err(err("stage file"))?;
            }
            // A directory where a file was (or a nested repository): the files inside are
            // listed on their own; the old file entry goes.
            _ => {
                if editor.get(rela_str).is_some() {
                    editor.remove(rela_str).map_err(err("stage removal"))?;
                }
            }
        }
    }

    let tree_id = editor.write().map_err(err("write tree"))?.detach();
    if tree_id == head_tree {
        // Only stat information changed (e.g. a file rewritten with identical content).
        refresh_index(&repo, &tree_id)?;
        return Ok(None);
    }
    commit_on_head(&repo, head.id, tree_id, message, who).map(Some)
}

/// Commit `tree` on HEAD (whose commit is `parent`) as `who`, now, and make the index equal
/// to the tree; the new commit's id.
fn commit_on_head(
    repo: &gix::Repository,
    parent: gix::ObjectId,
    tree: gix::ObjectId,
    message: &str,
    who: &Identity<'_>,
) -> Result<String, LocalGitError> {
    let signature = gix::actor::Signature {
        name: who.name.into(),
        email: who.email.into(),
        time: gix::date::Time::now_utc(),
    };
    let mut buf_committer = gix::date::parse::TimeBuf::default();
    let mut buf_author = gix::date::parse::TimeBuf::default();
    let commit_id = repo
        .commit_as(
            signature.to_ref(&mut buf_committer),
            signature.to_ref(&mut buf_author),
            "HEAD",
            message,
            tree,
            [parent],
        )
        .map_err(err("commit"))?
        .detach();
    refresh_index(repo, &tree)?;
    Ok(commit_id.to_string())
}

/// Whether `commit` names a commit in this repository.
pub(crate) fn has_commit(dir: &Path, commit: &str) -> Result<bool, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    let Ok(id) = gix::ObjectId::from_hex(commit.as_bytes()) else {
        return Ok(false);
    };
    Ok(repo
        .find_object(id)
        .ok()
        .is_some_and(|o| o.try_into_commit().is_ok()))
}

/// Commit `target`'s tree on top of HEAD (history kept: the new commit's parent is HEAD), as
/// `git commit` of a worktree holding exactly that tree would; the index is made equal to it.
/// Returns the new commit id.
pub(crate) fn commit_tree_of(
    dir: &Path,
    target: &str,
    message: &str,
    who: &Identity<'_>,
) -> Result<String, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    let head = repo.head_commit().map_err(err("read HEAD"))?;
    let id = gix::ObjectId::from_hex(target.as_bytes()).map_err(err("read commit id"))?;
    let tree = repo
        .find_object(id)
        .map_err(err("find commit"))?
        .try_into_commit()
        .map_err(err("find commit"))?
        .tree_id()
        .map_err(err("read tree"))?
        .detach();
    commit_on_head(&repo, head.id, tree, message, who)
}

/// Make the index equal to `tree`, as `git reset --mixed` would after our commit.
fn refresh_index(repo: &gix::Repository, tree: &gix::oid) -> Result<(), LocalGitError> {
    let mut index = repo.index_from_tree(tree).map_err(err("build index"))?;
    index
        .write(gix::index::write::Options::default())
        .map_err(err("write index"))?;
    Ok(())
}

/// The fence commit of `token` for `label`: a parentless commit of the empty tree whose every
/// byte (author, dates, message) follows from the two, so every worker computes the same id.
pub(crate) fn fence_commit(dir: &Path, label: &str, token: u64) -> Result<String, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    let tree = repo
        .write_object(gix::objs::Tree::empty())
        .map_err(err("write empty tree"))?
        .detach();
    let who = gix::actor::Signature {
        name: "edit-worker".into(),
        email: "edit-worker@webordinary.com".into(),
        time: gix::date::Time::new(0, 0),
    };
    let commit = gix::objs::Commit {
        tree,
        parents: Default::default(),
        author: who.clone(),
        committer: who,
        encoding: None,
        message: format!("edit-worker lease fence {label}\n\ntoken {token}\n").into(),
        extra_headers: Vec::new(),
    };
    Ok(repo
        .write_object(&commit)
        .map_err(err("write fence commit"))?
        .to_string())
}

/// The token a fence commit carries (`None`: not a fence commit, or not here).
pub(crate) fn fence_token(dir: &Path, commit: &str) -> Result<Option<u64>, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    let Ok(id) = gix::ObjectId::from_hex(commit.as_bytes()) else {
        return Ok(None);
    };
    let Ok(object) = repo.find_object(id) else {
        return Ok(None);
    };
    let Ok(commit) = object.try_into_commit() else {
        return Ok(None);
    };
    let message = commit.message_raw().map_err(err("read commit"))?;
    Ok(message
        .to_str_lossy()
        .lines()
        .find_map(|l| l.strip_prefix("token "))
        .and_then(|t| t.trim().parse().ok()))
}

/// Find the newest commit reachable from `start` (a ref or commit) whose message carries the
/// trailer `{key}: {value}`, looking at most `limit` commits back.
pub(crate) fn find_commit_with_trailer(
    dir: &Path,
    start: &str,
    key: &str,
    value: &str,
    limit: usize,
) -> Result<Option<String>, LocalGitError> {
    let repo = gix::open(dir).map_err(err("open"))?;
    let Some(mut reference) = repo
        .try_find_reference(start)
        .map_err(err("find reference"))?
    else {
        return Ok(None);
    };
    let tip = reference.peel_to_id().map_err(err("peel reference"))?;
    let needle = format!("\n{key}: {value}");
    let walk = tip.ancestors().all().map_err(err("walk history"))?;
    for info in walk.take(limit) {
        let info = info.map_err(err("walk history"))?;
        let commit = info.object().map_err(err("read commit"))?;
        let message = commit.message_raw().map_err(err("read commit"))?;
        let message = message.to_str_lossy();
        if message.lines().any(|l| l.trim_end() == needle.trim_start()) {
            return Ok(Some(info.id.to_string()));
        }
    }
    Ok(None)
}
