//! Which Claude Code conversation belongs to which thread, kept where it survives a restart and
//! where every container serving the workspace sees it: under the workspace root, beside the
//! workspaces (`{WORKSPACE_ROOT}/.agent/threads/{clientId}/{projectId}/{threadId}.json`).
//! `.agent` cannot clash with a client: client ids never start with a dot.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::message::WorkspaceKey;

/// What we remember of a thread's conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThreadRecord {
    /// The agent's session id, for `--resume`.
    pub session_id: String,
    /// The session's cumulative cost after the last run (the agent reports a running total).
    pub total_cost_usd: f64,
}

#[derive(Debug, Clone)]
pub struct ThreadStore {
    root: PathBuf,
}

impl ThreadStore {
    pub fn new(workspace_root: &Path) -> ThreadStore {
        ThreadStore {
            root: workspace_root.join(".agent").join("threads"),
        }
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

    pub async fn load(&self, key: &WorkspaceKey, thread_id: &str) -> Option<ThreadRecord> {
        let text = tokio::fs::read_to_string(self.path(key, thread_id))
            .await
            .ok()?;
        match serde_json::from_str(&text) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(thread_id, error = %e, "unreadable thread record; starting a new conversation");
                None
            }
        }
    }

    /// Write atomically (temp file + rename), so a crash never leaves half a record.
    pub async fn save(
        &self,
        key: &WorkspaceKey,
        thread_id: &str,
        record: &ThreadRecord,
    ) -> std::io::Result<()> {
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
        };
        store.save(&key, "t", &record).await.unwrap();
        assert_eq!(store.load(&key, "t").await, Some(record));
        std::fs::write(dir.path().join(".agent/threads/a/b/t.json"), "{broken").unwrap();
        assert_eq!(store.load(&key, "t").await, None);
    }
}
