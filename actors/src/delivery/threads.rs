//! Which Claude Code conversation belongs to which thread, kept where it survives a restart and
//! where every worker serving the workspace sees it: in the thread's one document of the records
//! (`records::ThreadDoc`; under `{WORKSPACE_ROOT}/.records` for a worker that is alone, in the
//! shared lease store when workers share a queue). A map of the older layout
//! (`{WORKSPACE_ROOT}/.agent/threads/{clientId}/{projectId}/{threadId}.json`) is still read. With a shared store the agent's own conversation files travel too: saved after each
//! run and restored before a `--resume` on a worker that does not have them (or whose copy may
//! be older: the workspace came from another worker), so a thread's next message continues its
//! conversation wherever it runs. `.agent` cannot clash with a client: client ids never start
//! with a dot.

use std::path::{Path, PathBuf};

use crate::contract::message::WorkspaceKey;
use crate::delivery::records::{RecordStore, ThreadRecord, Version};
use crate::tenant::tenant_fs;

/// The largest conversation file the worker reads from a tenant's agent folder to share it: a
/// long thread's transcript is a few MB; past this it stays on this worker only.
const CONVERSATION_MAX_BYTES: u64 = 64 << 20;

impl ThreadRecord {
    /// The record after a run of `session_id` that the agent wrote: the shared copy of the
    /// file `previous` names is kept only for the same conversation (a new one has none yet).
    pub(crate) fn continued(
        previous: Option<&ThreadRecord>,
        session_id: &str,
        total_cost_usd: f64,
    ) -> ThreadRecord {
        let mut record = ThreadRecord::new(session_id, total_cost_usd, true);
        if let Some(previous) = previous.filter(|p| p.session_id == session_id) {
            record.file = previous.file.clone();
            record.file_md5 = previous.file_md5.clone();
        }
        record
    }
}

/// The shared copy of a conversation file that `save_conversation` made or found current.
pub(crate) struct SharedCopy {
    pub key: String,
    pub md5: String,
}

#[derive(Clone)]
pub struct ThreadStore {
    root: PathBuf,
    /// The shared store, when workers share a queue: records and conversation files live there.
    shared: Option<RecordStore>,
}

impl ThreadStore {
    pub fn new(workspace_root: &Path) -> ThreadStore {
        ThreadStore {
            root: workspace_root.join(".agent").join("threads"),
            shared: None,
        }
    }

    /// Threads in `records` when it is shared by every worker, else under the workspace root.
    pub fn for_worker(workspace_root: &Path, records: &RecordStore) -> ThreadStore {
        let mut store = ThreadStore::new(workspace_root);
        if records.is_shared() {
            store.shared = Some(records.clone());
        }
        store
    }

    fn shared_key(key: &WorkspaceKey, name: &str) -> String {
        // Validated ids (DNS labels, ref-safe thread ids, UUID session ids): a safe key.
        format!("conversations/{}/{}/{name}", key.client_id, key.project_id)
    }

    /// `projects/{cwd with every non-alphanumeric as -}`, below the agent's folder: Claude Code
    /// files sessions under `{CLAUDE_CONFIG_DIR}/projects/{that}/{id}.jsonl`, and resumes only
    /// from the same working directory. (Only ever a path relative to the agent folder handle:
    /// the worker reaches the file through `tenant_fs`, never by a joined path.)
    fn conversation_folder(cwd: &Path) -> PathBuf {
        let cwd = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_owned());
        let folder: String = cwd
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        Path::new("projects").join(folder)
    }

    /// The conversation file's name, when `session_id` is one the worker may use in a path and
    /// a key: the agent reports it, and the agent is the tenant's.
    fn conversation_name(session_id: &str) -> Result<String, String> {
        let plain = !session_id.is_empty()
            && session_id.len() <= 128
            && session_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if plain {
            Ok(format!("{session_id}.jsonl"))
        } else {
            Err(format!("not a session id the worker uses: {session_id:?}"))
        }
    }

    /// The agent left its conversation file in the tenant's agent folder: a regular file, found
    /// by handle without following a link on the way or at the end (a `try_exists` by path
    /// follows them, so a planted link to any file of the worker's would count).
    pub async fn has_conversation(config_dir: &Path, cwd: &Path, session_id: &str) -> bool {
        let Ok(name) = Self::conversation_name(session_id) else {
            return false;
        };
        let rel = Self::conversation_folder(cwd).join(name);
        let dir = config_dir.to_owned();
        tokio::task::spawn_blocking(move || tenant_fs::stat_in(&dir, &rel))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .is_some_and(|stat| tenant_fs::is_regular(&stat))
    }

    /// Keep the agent's conversation file where the next worker finds it (shared store only),
    /// under a key of this lease's token, and only when it changed since `known` was shared
    /// (issue 25: every run uploaded it). Fenced: nothing is uploaded under a lease that no
    /// longer holds. The file is in the tenant's agent folder (`config_dir`), so it is read as
    /// every tenant's file is (`tenant_fs`): never through a link, only a regular file, at most
    /// `CONVERSATION_MAX_BYTES`. `None`: nothing to share (alone, or the run wrote no file).
    pub(crate) async fn save_conversation(
        &self,
        key: &WorkspaceKey,
        session_id: &str,
        known: Option<&ThreadRecord>,
        config_dir: &Path,
        cwd: &Path,
        fence: &crate::delivery::lease_check::LeaseCheck,
    ) -> Result<Option<SharedCopy>, String> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let name = Self::conversation_name(session_id)?;
        let rel = Self::conversation_folder(cwd).join(&name);
        let dir = config_dir.to_owned();
        let read = tokio::task::spawn_blocking(move || {
            tenant_fs::read_in(&dir, &rel, CONVERSATION_MAX_BYTES)
        })
        .await
        .map_err(|e| e.to_string())?;
        let bytes = match read {
            Ok(Some(bytes)) => bytes,
            // The run ended before the agent wrote anything: nothing to keep.
            Ok(None) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let md5 = {
            use md5::{Digest, Md5};
            format!("{:x}", Md5::digest(&bytes))
        };
        let copy_key = Self::shared_key(key, &format!("{session_id}.{}.jsonl", fence.token()));
        if let Some(known) = known
            && known.session_id == session_id
            && known.file.as_deref() == Some(copy_key.as_str())
            && known.file_md5.as_deref() == Some(md5.as_str())
        {
            return Ok(Some(SharedCopy { key: copy_key, md5 }));
        }
        fence.check().map_err(|e| e.to_string())?;
        let text = String::from_utf8(bytes).map_err(|e| format!("{name}: {e}"))?;
        shared
            .write_document(&copy_key, &text, Version::Any)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some(SharedCopy { key: copy_key, md5 }))
    }

    /// Put the shared copy of the conversation in place before it is resumed, when this worker
    /// has none or may have an older one (`stale`). True when a copy was restored. The tenant's
    /// agent folder (`config_dir`) is written by handle (`tenant_fs`): folders made without
    /// following links, the file under a fresh name made exclusively and renamed into place (a
    /// link there is replaced, never written through), owned by whoever owns the agent folder
    /// (the tenant, with separate users), mode 0600.
    pub(crate) async fn restore_conversation(
        &self,
        key: &WorkspaceKey,
        record: &ThreadRecord,
        config_dir: &Path,
        cwd: &Path,
        stale: bool,
    ) -> Result<bool, String> {
        let Some(shared) = &self.shared else {
            return Ok(false);
        };
        let name = Self::conversation_name(&record.session_id)?;
        // The copy the record names; records from before issue 25 kept it under its name.
        let copy_key = record
            .file
            .clone()
            .unwrap_or_else(|| Self::shared_key(key, &name));
        let folder = Self::conversation_folder(cwd);
        if !stale {
            let (dir, folder, name) = (config_dir.to_owned(), folder.clone(), name.clone());
            // Only a regular file counts as a copy: a link in its place is replaced.
            let have = tokio::task::spawn_blocking(move || {
                let handle = tenant_fs::DirHandle::open(&dir)
                    .ok()?
                    .open_dir(&folder)
                    .ok()?;
                let stat = handle.stat(std::ffi::OsStr::new(&name)).ok()??;
                Some(tenant_fs::is_regular(&stat))
            })
            .await
            .map_err(|e| e.to_string())?;
            if have == Some(true) {
                return Ok(false);
            }
        }
        let found = shared
            .read_document(&copy_key)
            .await
            .map_err(|e| e.to_string())?;
        let Some((text, _)) = found else {
            return Ok(false);
        };
        let dir = config_dir.to_owned();
        tokio::task::spawn_blocking(move || {
            // The worker's own path to the tenant's agent folder: made when missing (the jail
            // hands it over before the agent runs).
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let base = tenant_fs::DirHandle::open(&dir).map_err(|e| e.to_string())?;
            let owner = std::fs::metadata(&dir)
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .filter(|uid| *uid != nix::unistd::geteuid().as_raw());
            let folder = base
                .create_dirs(&folder, 0o700, owner)
                .map_err(|e| e.to_string())?;
            folder
                .replace_file(
                    std::ffi::OsStr::new(&name),
                    ".restoring",
                    text.as_bytes(),
                    owner,
                )
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
        .map(|()| true)
    }

    /// The default `CLAUDE_CONFIG_DIR`: the agent's own session files, on the same persistent
    /// storage as the workspaces (resume needs them, and the same working directory).
    pub fn default_agent_config_dir(workspace_root: &Path) -> PathBuf {
        workspace_root.join(".agent").join("claude")
    }

    fn path(&self, key: &WorkspaceKey, thread_id: &str) -> PathBuf {
        // All three are validated ids: no separators, no `..`.
        self.root
            .join(&key.client_id)
            .join(&key.project_id)
            .join(format!("{thread_id}.json"))
    }

    /// The thread's conversation as recorded before issue 25, apart from its mark: on this
    /// worker's disk (alone) or in the shared store (`conversations/…/{thread}.json`). Read
    /// only for a thread whose document has no conversation yet; the next write moves it into
    /// the document.
    pub(crate) async fn load_legacy(
        &self,
        key: &WorkspaceKey,
        thread_id: &str,
    ) -> Option<ThreadRecord> {
        let text = match &self.shared {
            Some(shared) => {
                match shared
                    .read_document(&Self::shared_key(key, &format!("{thread_id}.json")))
                    .await
                {
                    Ok(found) => found?.0,
                    Err(e) => {
                        tracing::warn!(thread_id, error = %e, "thread record not readable; starting a new conversation");
                        return None;
                    }
                }
            }
            None => tokio::fs::read_to_string(self.path(key, thread_id))
                .await
                .ok()?,
        };
        match serde_json::from_str(&text) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(thread_id, error = %e, "unreadable thread record; starting a new conversation");
                None
            }
        }
    }

    /// Whether a thread without a conversation in its document may have one recorded the old
    /// way: always worth a look on this worker's disk; in the shared store (a request) only
    /// for a thread that has a document already (a mark from before), never for a new thread.
    pub(crate) fn may_have_legacy(&self, document_existed: bool) -> bool {
        self.shared.is_none() || document_existed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn legacy_records_are_read_and_bad_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ThreadStore::new(dir.path());
        let key = WorkspaceKey {
            client_id: "a".into(),
            project_id: "b".into(),
        };
        assert_eq!(store.load_legacy(&key, "t").await, None);
        let folder = dir.path().join(".agent/threads/a/b");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join("t.json"),
            r#"{"sessionId":"s-1","totalCostUsd":0.5}"#,
        )
        .unwrap();
        assert_eq!(
            store.load_legacy(&key, "t").await,
            Some(ThreadRecord::new("s-1", 0.5, true))
        );
        std::fs::write(folder.join("t.json"), "{broken").unwrap();
        assert_eq!(store.load_legacy(&key, "t").await, None);
    }

    #[tokio::test]
    async fn a_conversation_file_counts_only_as_a_regular_file_reached_without_links() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, cwd, outside) = (
            dir.path().join("agent"),
            dir.path().join("site"),
            dir.path().join("outside"),
        );
        for d in [&agent, &cwd, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(outside.join("s-1.jsonl"), "the worker's").unwrap();
        let folder = agent.join(ThreadStore::conversation_folder(&cwd));
        std::fs::create_dir_all(folder.parent().unwrap()).unwrap();
        // The tenant's agent made its project folder a link to a folder of the worker's.
        std::os::unix::fs::symlink(&outside, &folder).unwrap();
        assert!(!ThreadStore::has_conversation(&agent, &cwd, "s-1").await);
        std::fs::remove_file(&folder).unwrap();
        std::fs::create_dir(&folder).unwrap();
        // The file itself a link.
        std::os::unix::fs::symlink(outside.join("s-1.jsonl"), folder.join("s-1.jsonl")).unwrap();
        assert!(!ThreadStore::has_conversation(&agent, &cwd, "s-1").await);
        std::fs::remove_file(folder.join("s-1.jsonl")).unwrap();
        std::fs::write(folder.join("s-1.jsonl"), "{}").unwrap();
        assert!(ThreadStore::has_conversation(&agent, &cwd, "s-1").await);
        assert!(!ThreadStore::has_conversation(&agent, &cwd, "../s-1").await);
    }
}
