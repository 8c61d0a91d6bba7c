//! Which Claude Code conversation belongs to which thread, kept where it survives a restart and
//! where every worker serving the workspace sees it: under the workspace root, beside the
//! workspaces (`{WORKSPACE_ROOT}/.agent/threads/{clientId}/{projectId}/{threadId}.json`) for a
//! worker that is alone, or in the shared lease store (`conversations/…`) when workers share a
//! queue. With a shared store the agent's own conversation files travel too: saved after each
//! run and restored before a `--resume` on a worker that does not have them (or whose copy may
//! be older: the workspace came from another worker), so a thread's next message continues its
//! conversation wherever it runs. `.agent` cannot clash with a client: client ids never start
//! with a dot.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::message::WorkspaceKey;
use crate::records::{RecordStore, Version};

/// What we remember of a thread's conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ThreadRecord {
    /// The agent's session id, for `--resume`.
    pub session_id: String,
    /// The session's cumulative cost after the last run (the agent reports a running total).
    pub total_cost_usd: f64,
    /// The agent has written this conversation (a run reported, or left its file). A
    /// conversation recorded at a run's start but stopped before the agent wrote anything was
    /// never there to lose: not finding it is no restart. Records from before this field were
    /// written after runs, hence the default.
    #[serde(default = "written_by_default")]
    pub written: bool,
}

fn written_by_default() -> bool {
    true
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

    /// Where the agent keeps a conversation started in `cwd`: Claude Code files sessions under
    /// `{CLAUDE_CONFIG_DIR}/projects/{cwd with every non-alphanumeric as -}/{id}.jsonl`, and
    /// resumes only from the same working directory.
    pub fn conversation_file(config_dir: &Path, cwd: &Path, session_id: &str) -> PathBuf {
        let cwd = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_owned());
        let folder: String = cwd
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        config_dir
            .join("projects")
            .join(folder)
            .join(format!("{session_id}.jsonl"))
    }

    /// Keep the agent's conversation file where the next worker finds it (shared store only).
    pub async fn save_conversation(
        &self,
        key: &WorkspaceKey,
        session_id: &str,
        file: &Path,
    ) -> Result<(), String> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let text = match tokio::fs::read_to_string(file).await {
            Ok(text) => text,
            // The run ended before the agent wrote anything: nothing to keep.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        shared
            .write_document(
                &Self::shared_key(key, &format!("{session_id}.jsonl")),
                &text,
                Version::Any,
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Put the shared copy of the conversation in place before it is resumed, when this worker
    /// has none or may have an older one (`stale`). True when a copy was restored.
    pub async fn restore_conversation(
        &self,
        key: &WorkspaceKey,
        session_id: &str,
        file: &Path,
        stale: bool,
    ) -> Result<bool, String> {
        let Some(shared) = &self.shared else {
            return Ok(false);
        };
        if !stale && tokio::fs::try_exists(file).await.unwrap_or(false) {
            return Ok(false);
        }
        let found = shared
            .read_document(&Self::shared_key(key, &format!("{session_id}.jsonl")))
            .await
            .map_err(|e| e.to_string())?;
        let Some((text, _)) = found else {
            return Ok(false);
        };
        let dir = file.parent().expect("conversation files live in a folder");
        let write = async {
            tokio::fs::create_dir_all(dir).await?;
            let tmp = file.with_extension("jsonl.restoring");
            tokio::fs::write(&tmp, text).await?;
            tokio::fs::rename(&tmp, file).await
        };
        write
            .await
            .map(|()| true)
            .map_err(|e| format!("{}: {e}", file.display()))
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

    pub(crate) async fn load(&self, key: &WorkspaceKey, thread_id: &str) -> Option<ThreadRecord> {
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

    /// Write atomically (temp file + rename), so a crash never leaves half a record.
    pub(crate) async fn save(
        &self,
        key: &WorkspaceKey,
        thread_id: &str,
        record: &ThreadRecord,
    ) -> std::io::Result<()> {
        if let Some(shared) = &self.shared {
            let text = serde_json::to_string(record).expect("record serializes");
            return shared
                .write_document(
                    &Self::shared_key(key, &format!("{thread_id}.json")),
                    &text,
                    Version::Any,
                )
                .await
                .map(drop)
                .map_err(std::io::Error::other);
        }
        let path = self.path(key, thread_id);
        let dir = path.parent().expect("record has a folder");
        tokio::fs::create_dir_all(dir).await?;
        let tmp = path.with_extension("json.tmp");
        tokio::fs::write(&tmp, serde_json::to_vec(record).expect("record serializes")).await?;
        tokio::fs::rename(&tmp, &path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_round_trip_and_bad_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ThreadStore::new(dir.path());
        let key = WorkspaceKey {
            client_id: "a".into(),
            project_id: "b".into(),
        };
        assert_eq!(store.load(&key, "t").await, None);
        let record = ThreadRecord {
            session_id: "s-1".into(),
            total_cost_usd: 0.5,
            written: true,
        };
        store.save(&key, "t", &record).await.unwrap();
        assert_eq!(store.load(&key, "t").await, Some(record));
        std::fs::write(dir.path().join(".agent/threads/a/b/t.json"), "{broken").unwrap();
        assert_eq!(store.load(&key, "t").await, None);
    }
}
