//! One install per lock file: a shared store of installed dependencies.
//!
//! Workspaces of one agency mostly share a `package-lock.json`. Instead of `npm ci` in every
//! workspace, the dependencies of each distinct lock file (with the `.npmrc`, the Node major
//! version and the platform in the key) are installed once into the store and made read-only;
//! a workspace gets them by links, in milliseconds.
//!
//! The store folder (`NPM_STORE_DIR`, default `{WORKSPACE_ROOT}/.cache/npm-store`) holds:
//!
//! ```text
//! {key}/                  a complete entry: node_modules/, package.json, package-lock.json and
//!                         `.complete` (written last, before the entry gets its name); read-only
//! {key}.used              when the entry was last used (unix seconds), outside the read-only entry
//! .tmp.{key}.{pid}.{n}/   an install under way: never used, renamed to {key} when complete
//! .trash.{key}.{n}/       an entry being removed
//! .lock.{key}             flock: held exclusively to check, install, replace or remove {key}
//! .lock.{key}.in-use      flock: held shared by every build using {key}, exclusively to remove it
//! ```
//!
//! Several worker processes may share the folder (one `WORKSPACE_ROOT` on an EFS volume). Inside
//! one process a per-key mutex and in-use counts do the work; across processes the two
//! `flock(2)` lock files per key do (advisory locks: on local disks, and on NFSv4/EFS as
//! byte-range locks on the whole file). Two lock files, not one, because using an entry and
//! installing it must not exclude each other: one file held shared by users and exclusively by
//! installers would make every build wait for all running builds of the same lock file to end
//! (and deadlock a build that checks its entry after the build against one waiting to install).
//! So: an install (check, then install) holds `.lock.{key}` exclusively, and takes
//! `.lock.{key}.in-use` shared before letting go, so there is no moment when the entry is
//! neither installed-under-lock nor in use. An eviction takes both exclusively without waiting
//! and skips the entry when it cannot; a `.tmp.*` folder is abandoned once nobody holds its
//! key's install lock (its installer's locks died with it), whatever its age or pid (pids
//! repeat across containers). Lock files are removed only while both are held exclusively; a
//! locker checks after locking that the file it locked is still the one at the path.
//!
//! A workspace's `node_modules` is a real folder holding one symlink per top-level entry of the
//! store's `node_modules` (`.bin` included), plus the build's own writable caches (`.vite`,
//! `.astro`, `.cache`), which stay between builds. Node resolves the links to the store's real
//! paths, so the packages find each other there; Vite and Astro write their caches into the
//! workspace's own folder, never into the store.
//!
//! A tenant must not change what another tenant's build loads. The entry is made read-only
//! (`chmod a-w`): that stops any process that is not the worker's user, such as a tenant
//! sandbox's. Processes that run as the worker's user (today's default, or root) are caught by
//! a fingerprint: the stat data (inode, mode, size, mtime, ctime) of every file in the entry,
//! taken at install and checked before every use and after every build (a walk of ~10,000
//! files, tens of milliseconds). A changed entry is discarded and installed again; a build that
//! changed it fails. What a process has verified itself counts over the marker, for the same
//! install (the same folder and the marker's random install id): another process may evict an
//! entry and install it again, and that new install is judged by its own marker.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::config::StoreSettings;
use crate::steps::build::logged_run::{self, BuildError};
use crate::tenant::sandbox::Sandbox;
use crate::tenant::tenant_fs::{self, DirHandle, TenantFileError};

mod eviction;
mod install;
mod link;
mod locks;
use eviction::remove_tree;
use install::scan;
use link::link_overlay;
use locks::{Lock, Take, lock_file, lock_key, lock_path};

/// Written last into an entry: its presence means the install finished.
const MARKER: &str = ".complete";
/// Folders the build writes into `node_modules`: per workspace, kept between builds.
pub(crate) const CACHE_DIRS: &[&str] = &[".vite", ".astro", ".cache"];
/// Names an install copies from the workspace.
const LOCK: &str = "package-lock.json";
const PACKAGE: &str = "package.json";
const NPMRC: &str = ".npmrc";
/// The workspace's record of the entry linked into its `node_modules` (in the state folder).
pub(crate) const LINK_STAMP: &str = "npm-store.link";
/// The per-workspace install's record of the lock file it installed (in the state folder);
/// linking a store entry into the workspace removes it.
pub(crate) const INSTALL_STAMP: &str = "npm-ci.stamp";

/// The store key of a lock file: everything that decides what `npm ci` puts on disk.
pub fn store_key(lock: &[u8], npmrc: Option<&[u8]>, node_major: &str) -> String {
    store_key_for(
        lock,
        npmrc,
        node_major,
        std::env::consts::OS,
        std::env::consts::ARCH,
    )
}

fn store_key_for(
    lock: &[u8],
    npmrc: Option<&[u8]>,
    node_major: &str,
    os: &str,
    arch: &str,
) -> String {
    let mut h = Md5::new();
    h.update(b"edit-worker npm store v1\0");
    h.update((lock.len() as u64).to_le_bytes());
    h.update(lock);
    match npmrc {
        Some(rc) => {
            h.update([1]);
            h.update((rc.len() as u64).to_le_bytes());
            h.update(rc);
        }
        None => h.update([0]),
    }
    let major: String = node_major.chars().filter(char::is_ascii_digit).collect();
    format!("node{major}-{os}-{arch}-{:x}", h.finalize())
}

/// Why a site's dependencies cannot come from the store (they depend on the workspace's own
/// files or scripts), or `None` when they can.
pub(crate) fn unshareable_reason(lock: &[u8], package_json: &[u8]) -> Option<&'static str> {
    let has = |needle: &[u8]| lock.windows(needle.len()).any(|w| w == needle);
    if has(b"\"link\": true") {
        return Some("the lock file links local packages (workspaces or file: links)");
    }
    if has(b"\"resolved\": \"file:") {
        return Some("the lock file installs local files");
    }
    let scripts = serde_json::from_slice::<serde_json::Value>(package_json)
        .ok()
        .and_then(|p| p.get("scripts").cloned());
    if let Some(serde_json::Value::Object(scripts)) = scripts {
        const LIFECYCLE: &[&str] = &[
            "preinstall",
            "install",
            "postinstall",
            "prepare",
            "preprepare",
            "postprepare",
        ];
        if LIFECYCLE.iter().any(|s| scripts.contains_key(*s)) {
            return Some("the site's package.json has its own install scripts");
        }
    }
    None
}

/// The files of a site that an install needs.
#[derive(Debug, Clone)]
pub(crate) struct SiteFiles {
    pub lock: Vec<u8>,
    pub package_json: Vec<u8>,
    pub npmrc: Option<Vec<u8>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    key: String,
    fingerprint: String,
    bytes: u64,
    created: u64,
    /// Random per install: with the folder's inode, tells a reinstall (by any process) from the
    /// install a process verified before, even when the file system reuses the inode number.
    #[serde(default)]
    install: String,
}

/// Which install an entry folder holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InstallId {
    dev: u64,
    ino: u64,
    id: String,
}

/// An entry this process installed or verified.
struct Known {
    install: InstallId,
    fingerprint: String,
}

/// A store entry in use by one build: it is not evicted while held, by this process (the
/// lease) or any other sharing the folder (the shared lock).
pub(crate) struct Acquired {
    pub key: String,
    /// `npm ci` ran for this build, taking this long.
    pub installed_ms: Option<u64>,
    /// This build waited this long for another build's install of the same entry.
    pub waited_ms: Option<u64>,
    fingerprint: String,
    install: InstallId,
    _lease: Lease,
    /// `.lock.{key}.in-use`, locked shared: the lock lives as long as this open file.
    _in_use: File,
}

struct Lease {
    inner: Arc<Inner>,
    key: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut leases = self.inner.leases.lock().expect("leases lock");
        if let Some(n) = leases.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                leases.remove(&self.key);
            }
        }
    }
}

/// The shared store. Cheap to clone: every build actor holds one, all share its locks.
#[derive(Clone)]
pub(crate) struct NpmStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NpmStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NpmStore")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

struct Inner {
    dir: PathBuf,
    settings: StoreSettings,
    /// An install left in `.tmp.*` longer than this by another process is abandoned.
    stale_install: Duration,
    node_major: tokio::sync::OnceCell<String>,
    /// One install per key at a time in this process.
    key_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Entries in use by running builds.
    leases: Mutex<HashMap<String, usize>>,
    /// Fingerprints this process installed or verified: a marker rewritten behind our back
    /// does not make a changed entry pass.
    known: Mutex<HashMap<String, Known>>,
    /// `.tmp.*` folders of installs under way in this process.
    installing: Mutex<HashSet<PathBuf>>,
    /// The sweep after a start (leftovers of a crash) has run.
    swept: tokio::sync::Mutex<bool>,
    counter: AtomicU64,
    /// `npm ci`; tests install with a stand-in.
    install_argv: Vec<String>,
    /// Installs run a dependency's install scripts: in the sandbox, each as an install uid of
    /// its own with a fresh `HOME` (`Sandbox::store_jail`).
    sandbox: Arc<Sandbox>,
}

/// Outcome of checking an entry.
enum Entry {
    Missing,
    Valid(Found),
    Invalid(String),
}

/// A valid entry.
struct Found {
    fingerprint: String,
    install: InstallId,
}

impl NpmStore {
    /// A store in `dir` (made absolute). Nothing is read or written until the first build.
    pub(crate) fn new(
        dir: PathBuf,
        settings: StoreSettings,
        install_timeout: Duration,
        sandbox: Arc<Sandbox>,
    ) -> NpmStore {
        let argv = ["npm", "ci", "--no-audit", "--no-fund"].map(String::from);
        NpmStore::with_install_command(dir, settings, install_timeout, argv.into(), sandbox)
    }

    fn with_install_command(
        dir: PathBuf,
        settings: StoreSettings,
        install_timeout: Duration,
        install_argv: Vec<String>,
        sandbox: Arc<Sandbox>,
    ) -> NpmStore {
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        NpmStore {
            inner: Arc::new(Inner {
                dir,
                settings,
                stale_install: (install_timeout * 2).max(Duration::from_secs(3600)),
                node_major: tokio::sync::OnceCell::new(),
                key_locks: Mutex::new(HashMap::new()),
                leases: Mutex::new(HashMap::new()),
                known: Mutex::new(HashMap::new()),
                installing: Mutex::new(HashSet::new()),
                swept: tokio::sync::Mutex::new(false),
                counter: AtomicU64::new(0),
                install_argv,
                sandbox,
            }),
        }
    }

    /// The entry for `files`, installed first when there is no valid one. Two builds that need
    /// the same new entry install it once, in this process or in another sharing the folder:
    /// the second waits for the first. The install itself is not cancelled with the message
    /// that started it (an interrupt's newer message needs the same dependencies); `cancel`
    /// only stops the waiting.
    pub(crate) async fn acquire(
        &self,
        files: SiteFiles,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Acquired, BuildError> {
        let inner = &self.inner;
        let major = inner.node_major().await?;
        let key = store_key(&files.lock, files.npmrc.as_deref(), major);
        inner.first_sweep().await;
        let lock = inner.key_lock(&key);
        let waiting_since = Instant::now();
        let (guard, mut waited) = match lock.clone().try_lock_owned() {
            Ok(g) => (g, None),
            Err(_) => {
                tracing::info!(store_key = %key, "waiting for another build's install of the same dependencies");
                let g = tokio::select! {
                    g = lock.lock_owned() => g,
                    _ = cancel.cancelled() => return Err(BuildError::Cancelled),
                };
                (g, Some(waiting_since.elapsed().as_millis() as u64))
            }
        };
        // Then other processes sharing the folder: the key's install lock, taken after the
        // in-process one, so that the builds of one process queue for it in one place (and
        // hold one blocking thread). Held until the entry is checked (and installed) and its
        // in-use lock taken.
        tokio::fs::create_dir_all(&inner.dir).await?;
        let install_lock = match inner.try_lock(&key, Lock::Install).await? {
            Some(l) => l,
            None => {
                tracing::info!(store_key = %key, "waiting for another worker's install of the same dependencies");
                let path = lock_path(&inner.dir, &key, Lock::Install);
                // flock(2) cannot be interrupted: the waiting runs in a blocking task, whose
                // lock is let go at once if it comes after the build stopped waiting.
                let wait = tokio::task::spawn_blocking(move || lock_file(&path, Take::Exclusive));
                let taken = tokio::select! {
                    taken = wait => taken.map_err(std::io::Error::other)??,
                    _ = cancel.cancelled() => return Err(BuildError::Cancelled),
                };
                waited = Some(waiting_since.elapsed().as_millis() as u64);
                taken
            }
        };
        // Checked under the lock: another process may have installed the entry (or replaced
        // it) while this one waited.
        match inner.check(&key, &files.lock).await? {
            Entry::Valid(found) => {
                let in_use = inner.lock_in_use(&key).await?;
                let lease = inner.lease(&key);
                drop(install_lock);
                drop(guard);
                inner.touch_used(&key).await;
                tracing::info!(store_key = %key, "using dependencies from the shared store");
                return Ok(Acquired {
                    key,
                    installed_ms: None,
                    waited_ms: waited,
                    fingerprint: found.fingerprint,
                    install: found.install,
                    _lease: lease,
                    _in_use: in_use,
                });
            }
            Entry::Invalid(reason) => {
                // Even when builds (here or elsewhere) use it: a changed entry must not be
                // loaded again, and their own check after the build fails them.
                tracing::warn!(store_key = %key, %reason, "discarding a store entry and installing it again");
                inner.discard(&key).await?;
            }
            Entry::Missing => {}
        }
        let task_inner = inner.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = match task_inner.install(&task_key, &files, timeout).await {
                Ok(found) => task_inner
                    .lock_in_use(&task_key)
                    .await
                    .map(|in_use| (found, in_use)),
                Err(e) => Err(e),
            };
            let lease = task_inner.lease(&task_key);
            drop(install_lock);
            drop(guard);
            let ms = started.elapsed().as_millis() as u64;
            if result.is_ok() {
                task_inner.touch_used(&task_key).await;
                task_inner.sweep(&task_key).await;
            }
            result.map(|(found, in_use)| (found, ms, lease, in_use))
        });
        let joined = tokio::select! {
            joined = task => joined,
            _ = cancel.cancelled() => return Err(BuildError::Cancelled),
        };
        let (found, ms, lease, in_use) =
            joined.map_err(|e| BuildError::Io(std::io::Error::other(e)))??;
        Ok(Acquired {
            key,
            installed_ms: Some(ms),
            waited_ms: waited,
            fingerprint: found.fingerprint,
            install: found.install,
            _lease: lease,
            _in_use: in_use,
        })
    }

    /// The `node_modules` folder of entry `key`.
    pub(crate) fn modules_of(&self, key: &str) -> PathBuf {
        self.inner.dir.join(key).join("node_modules")
    }

    /// Point `{workspace}/node_modules` at the entry: one symlink per top-level name, the
    /// build's caches kept, anything else removed. Records the key in `state_dir`.
    pub(crate) async fn link(
        &self,
        acquired: &Acquired,
        workspace: &Path,
        state_dir: &Path,
    ) -> Result<(), BuildError> {
        let modules = self.modules_of(&acquired.key);
        let target = workspace.join("node_modules");
        blocking(move || link_overlay(&modules, &target)).await?;
        tokio::fs::create_dir_all(state_dir).await?;
        tokio::fs::write(state_dir.join(LINK_STAMP), &acquired.key).await?;
        // A later per-workspace install must start from scratch.
        let _ = tokio::fs::remove_file(state_dir.join(INSTALL_STAMP)).await;
        Ok(())
    }

    /// After the build: the entry must be as it was. A build that changed it fails, and the
    /// entry is discarded so that no other build loads it.
    pub(crate) async fn verify_unchanged(&self, acquired: &Acquired) -> Result<(), BuildError> {
        let inner = &self.inner;
        let entry = inner.dir.join(&acquired.key);
        let now = blocking(move || scan(&entry)).await;
        if now
            .as_ref()
            .is_ok_and(|s| s.fingerprint == acquired.fingerprint)
        {
            return Ok(());
        }
        let key = &acquired.key;
        let lock = inner.key_lock(key);
        let _guard = lock.lock().await;
        // Other processes neither install nor replace it while this one decides.
        let path = lock_path(&inner.dir, key, Lock::Install);
        let _install_lock = blocking(move || lock_file(&path, Take::Exclusive)).await?;
        // Discard it unless another build (of this process or another) has already put a
        // fresh, intact install in its place.
        let entry = inner.dir.join(key);
        let current = match tokio::fs::symlink_metadata(&entry).await {
            Ok(meta) if meta.is_dir() => read_marker(&entry, key)
                .await
                .map(|marker| (InstallId::of(&meta, &marker), marker)),
            _ => None,
        };
        let replaced = match current {
            Some((install, marker)) if install != acquired.install => {
                let expected = inner.expected_fingerprint(key, &install, &marker);
                let scanned = blocking(move || scan(&entry)).await.ok();
                scanned.is_some_and(|s| s.fingerprint == expected)
            }
            _ => false,
        };
        if !replaced {
            tracing::warn!(store_key = %key, "the build changed the shared dependencies; discarding them");
            inner.discard(key).await?;
        }
        Err(BuildError::StoreChanged {
            key: acquired.key.clone(),
        })
    }
}

impl Inner {
    async fn node_major(&self) -> Result<&String, BuildError> {
        self.node_major
            .get_or_try_init(|| async {
                let mut cmd = Command::new("node");
                cmd.arg("--version").stdin(std::process::Stdio::null());
                crate::tenant::process::allow_env(&mut cmd, &[]);
                let out = cmd.output().await.map_err(|source| BuildError::Spawn {
                    program: "node".into(),
                    source,
                })?;
                let text = String::from_utf8_lossy(&out.stdout);
                let major: String = text
                    .trim()
                    .trim_start_matches('v')
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if !out.status.success() || major.is_empty() {
                    return Err(BuildError::Io(std::io::Error::other(format!(
                        "`node --version` said {text:?}"
                    ))));
                }
                Ok(major)
            })
            .await
    }

    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.key_locks.lock().expect("key locks");
        // Forget locks nobody holds or waits on, so the map follows the live keys.
        locks.retain(|k, l| k == key || Arc::strong_count(l) > 1);
        locks.entry(key.to_owned()).or_default().clone()
    }

    fn lease(self: &Arc<Self>, key: &str) -> Lease {
        *self
            .leases
            .lock()
            .expect("leases lock")
            .entry(key.to_owned())
            .or_default() += 1;
        Lease {
            inner: self.clone(),
            key: key.to_owned(),
        }
    }

    async fn touch_used(&self, key: &str) {
        let path = self.dir.join(format!("{key}.used"));
        if let Err(e) = tokio::fs::write(&path, unix_now().to_string()).await {
            tracing::warn!(path = %path.display(), error = %e, "could not record the store entry's use");
        }
    }

    /// Is `{key}` complete, for this lock file, and unchanged since it was installed?
    async fn check(&self, key: &str, lock: &[u8]) -> Result<Entry, BuildError> {
        let entry = self.dir.join(key);
        let meta = match tokio::fs::symlink_metadata(&entry).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Entry::Missing),
            Err(e) => return Err(e.into()),
            Ok(m) if !m.is_dir() => return Ok(Entry::Invalid("not a folder".into())),
            Ok(m) => m,
        };
        let Some(marker) = read_marker(&entry, key).await else {
            return Ok(Entry::Invalid(
                "no completion marker: an install that did not finish".into(),
            ));
        };
        // The key is a digest; the lock file itself is compared too.
        let held = {
            let entry = entry.clone();
            tokio::task::spawn_blocking(move || read_entry_file(&entry, LOCK))
                .await
                .ok()
                .flatten()
        };
        if held.as_deref() != Some(lock) {
            return Ok(Entry::Invalid("it holds another lock file".into()));
        }
        let install = InstallId::of(&meta, &marker);
        let expected = self.expected_fingerprint(key, &install, &marker);
        let scanned = blocking(move || scan(&entry)).await?;
        if scanned.fingerprint != expected {
            return Ok(Entry::Invalid("its files changed after the install".into()));
        }
        self.known.lock().expect("known lock").insert(
            key.to_owned(),
            Known {
                install: install.clone(),
                fingerprint: scanned.fingerprint.clone(),
            },
        );
        Ok(Entry::Valid(Found {
            fingerprint: scanned.fingerprint,
            install,
        }))
    }

    /// What the entry's files must digest to: what this process saw of this same install,
    /// else (an install it never saw, maybe another process's) what its marker says.
    fn expected_fingerprint(&self, key: &str, install: &InstallId, marker: &Marker) -> String {
        match self.known.lock().expect("known lock").get(key) {
            Some(known) if known.install == *install => known.fingerprint.clone(),
            _ => marker.fingerprint.clone(),
        }
    }

    /// Move `{key}` out of the way (one rename: no build sees a half-removed entry), then
    /// remove it.
    async fn discard(&self, key: &str) -> Result<(), BuildError> {
        self.known.lock().expect("known lock").remove(key);
        let trash = self.dir.join(format!(
            ".trash.{key}.{}.{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        match tokio::fs::rename(self.dir.join(key), &trash).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        blocking(move || remove_tree(&trash)).await?;
        Ok(())
    }
}

/// The file `name` of a store entry (or of an install's folder), read as a tenant's file is:
/// the install's processes wrote there, so a link (to `/dev/zero`, to a secret) is not
/// followed, and at most `SITE_FILE_MAX_BYTES` is read. `None` when missing or refused.
fn read_entry_file(entry: &Path, name: &str) -> Option<Vec<u8>> {
    tenant_fs::read_in(entry, Path::new(name), tenant_fs::SITE_FILE_MAX_BYTES)
        .ok()
        .flatten()
}

/// An entry's marker, when it has one for `key`.
async fn read_marker(entry: &Path, key: &str) -> Option<Marker> {
    let entry = entry.to_owned();
    let bytes = tokio::task::spawn_blocking(move || read_entry_file(&entry, MARKER))
        .await
        .ok()??;
    serde_json::from_slice::<Marker>(&bytes)
        .ok()
        .filter(|m| m.key == key)
}

impl InstallId {
    fn of(folder: &std::fs::Metadata, marker: &Marker) -> InstallId {
        InstallId {
            dev: folder.dev(),
            ino: folder.ino(),
            id: marker.install.clone(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_lock_npmrc_node_and_platform() {
        let lock = br#"{"lockfileVersion": 3}"#;
        let key = store_key_for(lock, None, "20", "linux", "x86_64");
        assert!(key.starts_with("node20-linux-x86_64-"), "{key}");
        assert_eq!(key, store_key_for(lock, None, "20", "linux", "x86_64"));
        let others = [
            store_key_for(br#"{"lockfileVersion": 3} "#, None, "20", "linux", "x86_64"),
            store_key_for(
                lock,
                Some(b"legacy-peer-deps=true"),
                "20",
                "linux",
                "x86_64",
            ),
            store_key_for(lock, Some(b""), "20", "linux", "x86_64"),
            store_key_for(lock, None, "22", "linux", "x86_64"),
            store_key_for(lock, None, "20", "linux", "aarch64"),
            store_key_for(lock, None, "20", "macos", "x86_64"),
        ];
        for other in &others {
            assert_ne!(&key, other);
        }
        // No separator or dot can come from the inputs: the key is a folder name.
        assert!(!key.contains('/') && !key.starts_with('.'));
        assert_eq!(store_key_for(lock, None, "v20/..", "linux", "x86_64"), key);
    }

    #[test]
    fn local_links_and_install_scripts_are_not_shared() {
        let plain = br#"{"packages": {"node_modules/astro": {"resolved": "https://registry.npmjs.org/astro/-/astro-5.9.4.tgz"}}}"#;
        let pkg = br#"{"scripts": {"build": "astro build"}}"#;
        assert_eq!(unshareable_reason(plain, pkg), None);
        let linked =
            br#"{"packages": {"node_modules/ui": {"resolved": "packages/ui", "link": true}}}"#;
        assert!(unshareable_reason(linked, pkg).is_some());
        let file = br#"{"packages": {"node_modules/x": {"resolved": "file:../x.tgz"}}}"#;
        assert!(unshareable_reason(file, pkg).is_some());
        let scripted = br#"{"scripts": {"postinstall": "patch-package"}}"#;
        assert!(unshareable_reason(plain, scripted).is_some());
    }

    // Stores on one folder stand for worker processes sharing it: each has its own in-process
    // locks and counts, so only the flock locks (per open file, not per process) stand between
    // them, as between processes.

    pub(super) const T: Duration = Duration::from_secs(60);
    /// A stand-in for `npm ci`: one package, whose `index.js` says `$1`.
    pub(super) const INSTALL: &str =
        r#"mkdir -p node_modules/pkg && printf %s "$1" > node_modules/pkg/index.js"#;

    /// A temporary folder, removed at the end, read-only entries and all.
    pub(super) struct Folder(tempfile::TempDir);

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = remove_tree(self.0.path());
        }
    }

    impl std::ops::Deref for Folder {
        type Target = Path;
        fn deref(&self) -> &Path {
            self.0.path()
        }
    }

    pub(super) fn folder() -> Folder {
        Folder(tempfile::tempdir().unwrap())
    }

    /// A store whose installs run `sh -c script sh args...` in the install folder (no npm, no
    /// network), on a Node 20 (no `node` asked).
    pub(super) fn store_with(
        dir: &Path,
        settings: StoreSettings,
        script: &str,
        args: &[&str],
    ) -> NpmStore {
        let mut argv: Vec<String> = vec!["sh".into(), "-c".into(), script.into(), "sh".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let store = NpmStore::with_install_command(
            dir.to_owned(),
            settings,
            T,
            argv,
            crate::tenant::sandbox::Sandbox::off(dir),
        );
        store.inner.node_major.set("20".into()).unwrap();
        store
    }

    /// A store whose installs write `tag`.
    pub(super) fn store(dir: &Path, tag: &str) -> NpmStore {
        store_with(dir, StoreSettings::default(), INSTALL, &[tag])
    }

    pub(super) fn site(n: u32) -> SiteFiles {
        SiteFiles {
            lock: format!(r#"{{"lockfileVersion": 3, "n": {n}}}"#).into_bytes(),
            package_json: b"{}".to_vec(),
            npmrc: None,
        }
    }

    pub(super) fn key_of(files: &SiteFiles) -> String {
        store_key(&files.lock, None, "20")
    }

    /// Which install the entry holds.
    pub(super) fn tag(dir: &Path, key: &str) -> String {
        std::fs::read_to_string(dir.join(key).join("node_modules/pkg/index.js")).unwrap()
    }

    pub(super) fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// What a build that writes into its dependencies does (root may; anyone else opens the
    /// folder first, as an attacker would need to).
    pub(super) fn plant(dir: &Path, key: &str) {
        let pkg = dir.join(key).join("node_modules/pkg");
        std::fs::set_permissions(&pkg, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(pkg.join("planted.js"), "planted").unwrap();
    }

    #[tokio::test]
    async fn a_store_that_finds_the_entry_in_place_at_its_rename_uses_it() {
        let root = folder();
        let (shared, elsewhere) = (root.join("store"), root.join("elsewhere"));
        let files = site(2);
        let key = key_of(&files);
        let cancel = CancellationToken::new();
        // The winner's entry: complete, read-only, fingerprinted, on the same file system.
        let winner = store(&elsewhere, "winner");
        drop(winner.acquire(files.clone(), T, &cancel).await.unwrap());
        let won = scan(&elsewhere.join(&key)).unwrap().fingerprint;
        // While B installs, the winner's entry appears under the final name (a worker that does
        // not lock finishing first). Moving a folder to another parent needs write permission
        // on it (for its `..`), unless one is root.
        let b = store_with(
            &shared,
            StoreSettings::default(),
            &format!(r#"{INSTALL} && chmod u+w "$2" && mv "$2" "$3""#),
            &[
                "b",
                elsewhere.join(&key).to_str().unwrap(),
                shared.join(&key).to_str().unwrap(),
            ],
        );
        let got = b.acquire(files.clone(), T, &cancel).await.unwrap();
        assert!(got.installed_ms.is_some());
        assert_eq!(tag(&shared, &key), "winner");
        assert_eq!(got.fingerprint, won);
        // B's own install is gone, nothing half-done is left.
        let mut left = names(&shared);
        left.retain(|n| !n.starts_with(".lock."));
        assert_eq!(left, [key.clone(), format!("{key}.used")]);
        b.verify_unchanged(&got).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_waits_for_another_stores_install_and_uses_it() {
        let dir = folder();
        let files = site(3);
        let key = key_of(&files);
        let slow = format!("sleep 1 && {INSTALL}");
        let a = store_with(&dir, StoreSettings::default(), &slow, &["a"]);
        // B must not install at all: its install would fail.
        let b = store_with(&dir, StoreSettings::default(), "exit 3", &[]);
        let first = tokio::spawn({
            let (a, files) = (a.clone(), files.clone());
            async move { a.acquire(files, T, &CancellationToken::new()).await }
        });
        let under_way = || names(&dir).iter().any(|n| n.starts_with(".tmp."));
        for _ in 0..1000 {
            if under_way() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(under_way(), "A's install did not start");
        let second = b
            .acquire(files.clone(), T, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(second.installed_ms, None);
        assert!(second.waited_ms.is_some());
        let first = first.await.unwrap().unwrap();
        assert!(first.installed_ms.is_some());
        assert_eq!(first.fingerprint, second.fingerprint);
        assert_eq!(tag(&dir, &key), "a");
    }

    #[tokio::test]
    async fn waiting_for_another_stores_install_can_be_cancelled() {
        let dir = folder();
        let b = store(&dir, "b");
        let files = site(4);
        let key = key_of(&files);
        // Another process's install holds the key.
        let other = lock_file(&lock_path(&dir, &key, Lock::Install), Take::Exclusive).unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn({
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                cancel.cancel();
            }
        });
        let waited = tokio::time::timeout(T, b.acquire(files.clone(), T, &cancel))
            .await
            .expect("the cancel did not stop the waiting");
        assert!(matches!(waited, Err(BuildError::Cancelled)));
        assert!(!dir.join(&key).exists());
        drop(other);
        let got = b
            .acquire(files, T, &CancellationToken::new())
            .await
            .unwrap();
        assert!(got.installed_ms.is_some());
    }

    #[tokio::test]
    async fn two_stores_use_one_entry_at_once() {
        let dir = folder();
        let (a, b) = (store(&dir, "a"), store(&dir, "b"));
        let files = site(5);
        let cancel = CancellationToken::new();
        let first = a.acquire(files.clone(), T, &cancel).await.unwrap();
        // Using an entry does not lock out a use anywhere else (nor a second one here).
        let quick = Duration::from_secs(10);
        let second = tokio::time::timeout(quick, b.acquire(files.clone(), T, &cancel))
            .await
            .expect("B waited for A's build")
            .unwrap();
        let third = tokio::time::timeout(quick, a.acquire(files.clone(), T, &cancel))
            .await
            .expect("A's second build waited for its first")
            .unwrap();
        assert_eq!((second.installed_ms, third.installed_ms), (None, None));
        assert_eq!(tag(&dir, &key_of(&files)), "a");
        drop((first, second, third));
    }

    #[tokio::test]
    async fn a_reinstall_by_another_store_is_not_taken_for_a_change() {
        let dir = folder();
        let (a, b) = (store(&dir, "a"), store(&dir, "b"));
        let files = site(7);
        let key = key_of(&files);
        let cancel = CancellationToken::new();
        drop(a.acquire(files.clone(), T, &cancel).await.unwrap());
        // B removes the entry (as an eviction does) and installs it again.
        b.inner.discard(&key).await.unwrap();
        let b_got = b.acquire(files.clone(), T, &cancel).await.unwrap();
        assert!(b_got.installed_ms.is_some());
        drop(b_got);
        let again = a.acquire(files.clone(), T, &cancel).await.unwrap();
        assert_eq!(
            again.installed_ms, None,
            "A took B's install for a changed one"
        );
        assert_eq!(tag(&dir, &key), "b");
        drop(again);

        // A change to the install A has seen still counts, even with its marker rewritten.
        plant(&dir, &key);
        let entry = dir.join(&key);
        let marker_path = entry.join(MARKER);
        let mut marker: Marker =
            serde_json::from_slice(&std::fs::read(&marker_path).unwrap()).unwrap();
        marker.fingerprint = scan(&entry).unwrap().fingerprint;
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&marker_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&marker_path, serde_json::to_vec(&marker).unwrap()).unwrap();
        let third = a.acquire(files.clone(), T, &cancel).await.unwrap();
        assert!(third.installed_ms.is_some(), "a changed entry was used");
        assert_eq!(tag(&dir, &key), "a");
    }

    #[tokio::test]
    async fn the_check_after_a_build_keeps_another_stores_fresh_install() {
        let dir = folder();
        let (a, b) = (store(&dir, "a"), store(&dir, "b"));
        let files = site(8);
        let key = key_of(&files);
        let cancel = CancellationToken::new();
        let a_got = a.acquire(files.clone(), T, &cancel).await.unwrap();
        // A's build writes into the entry; B sees the change first and installs it again.
        plant(&dir, &key);
        let b_got = b.acquire(files.clone(), T, &cancel).await.unwrap();
        assert!(b_got.installed_ms.is_some());
        let changed = a.verify_unchanged(&a_got).await;
        assert!(matches!(changed, Err(BuildError::StoreChanged { .. })));
        assert_eq!(tag(&dir, &key), "b", "A discarded B's fresh install");
        b.verify_unchanged(&b_got).await.unwrap();
        // A change to the entry a build used, with nothing in its place, is discarded.
        plant(&dir, &key);
        let changed = b.verify_unchanged(&b_got).await;
        assert!(matches!(changed, Err(BuildError::StoreChanged { .. })));
        assert!(!dir.join(&key).exists());
    }
}
