//! How dependencies are installed (`INSTALL_MODE`, `NPM_STORE_*`): the settings of the shared
//! dependency store (`crate::steps::build::npm_store`), kept here so that the configuration never imports
//! the store.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How dependencies are installed (`INSTALL_MODE`, `NPM_STORE_*`).
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `true` (`INSTALL_MODE=shared`, the default): one install per lock file in the store.
    /// `false` (`per-workspace`): every workspace runs its own `npm ci`, as before.
    pub shared: bool,
    /// The store folder; `None`: `{WORKSPACE_ROOT}/.cache/npm-store`.
    pub dir: Option<PathBuf>,
    /// Disk use above which the least recently used entries are removed.
    pub max_bytes: u64,
    /// Entries unused for this long are removed.
    pub max_age: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            shared: true,
            dir: None,
            max_bytes: 10 * 1024 * 1024 * 1024,
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl StoreSettings {
    pub fn dir_under(&self, workspace_root: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| workspace_root.join(".cache").join("npm-store"))
    }
}
