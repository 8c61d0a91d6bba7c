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
use crate::logged_run::{self, BuildError};
use crate::sandbox::Sandbox;
use crate::tenant_fs::{self, DirHandle, TenantFileError};

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

/// One entry as the eviction sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EntryInfo {
    pub key: String,
    /// Disk use (allocated blocks).
    pub bytes: u64,
    /// Unix seconds of the last use.
    pub last_used: u64,
    /// Has its completion marker. An entry without one is a crashed or foreign install.
    pub complete: bool,
}

/// Which entries to remove: the incomplete ones, those unused for longer than `max_age`, then
/// the least recently used until the rest fit in `max_bytes`. Entries in `in_use` stay (their
/// bytes still count).
pub(crate) fn choose_evictions(
    entries: &[EntryInfo],
    now: u64,
    max_age: Duration,
    max_bytes: u64,
    in_use: &HashSet<String>,
) -> Vec<String> {
    let mut sorted: Vec<&EntryInfo> = entries.iter().collect();
    sorted.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.key.cmp(&b.key)));
    let mut evict = Vec::new();
    let mut kept = Vec::new();
    for e in sorted {
        let stale = !e.complete || now.saturating_sub(e.last_used) > max_age.as_secs();
        if stale && !in_use.contains(&e.key) {
            evict.push(e.key.clone());
        } else {
            kept.push(e);
        }
    }
    let mut total: u64 = kept.iter().map(|e| e.bytes).sum();
    for e in kept {
        if total <= max_bytes {
            break;
        }
        if !in_use.contains(&e.key) {
            total -= e.bytes;
            evict.push(e.key.clone());
        }
    }
    evict
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
                crate::process::allow_env(&mut cmd, &[]);
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

    /// Take one of `key`'s locks without waiting: `None` when another open file holds it, in
    /// this process or another.
    async fn try_lock(&self, key: &str, lock: Lock) -> std::io::Result<Option<File>> {
        let path = lock_path(&self.dir, key, lock);
        blocking(move || match lock_file(&path, Take::TryExclusive) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    /// The key's in-use lock, shared. It waits only for an eviction deciding, which holds the
    /// install lock too, so never while the caller holds that.
    async fn lock_in_use(&self, key: &str) -> Result<File, BuildError> {
        let path = lock_path(&self.dir, key, Lock::InUse);
        Ok(blocking(move || lock_file(&path, Take::Shared)).await?)
    }

    /// Both of the key's locks, exclusively, or `None` when anyone installs, checks or uses it.
    async fn lock_for_removal(&self, key: &str) -> std::io::Result<Option<(File, File)>> {
        let Some(install) = self.try_lock(key, Lock::Install).await? else {
            return Ok(None);
        };
        let Some(in_use) = self.try_lock(key, Lock::InUse).await? else {
            return Ok(None);
        };
        Ok(Some((install, in_use)))
    }

    /// Remove the key's lock files, both held exclusively by the caller. The in-use one first:
    /// a new one is only made under the install lock, which the caller still holds.
    async fn remove_lock_files(&self, key: &str) {
        for lock in [Lock::InUse, Lock::Install] {
            let _ = tokio::fs::remove_file(lock_path(&self.dir, key, lock)).await;
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

    /// `npm ci` into a fresh folder beside the entry, made read-only, fingerprinted, marked
    /// complete, and only then renamed to `{key}`. Returns the fingerprint.
    async fn install(
        &self,
        key: &str,
        files: &SiteFiles,
        timeout: Duration,
    ) -> Result<Found, BuildError> {
        tokio::fs::create_dir_all(&self.dir).await?;
        let tmp = self.dir.join(format!(
            ".tmp.{key}.{}.{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        // Registered before it exists, so that no sweep takes it for abandoned.
        self.installing
            .lock()
            .expect("installing")
            .insert(tmp.clone());
        let result = match tokio::fs::create_dir(&tmp).await {
            Ok(()) => self.install_into(key, files, timeout, &tmp).await,
            Err(e) => Err(e.into()),
        };
        self.installing.lock().expect("installing").remove(&tmp);
        // Gone when it became the entry; still there after a failure or a lost race.
        let _ = blocking(move || remove_tree(&tmp)).await;
        result
    }

    async fn install_into(
        &self,
        key: &str,
        files: &SiteFiles,
        timeout: Duration,
        tmp: &Path,
    ) -> Result<Found, BuildError> {
        tokio::fs::write(tmp.join(PACKAGE), &files.package_json).await?;
        tokio::fs::write(tmp.join(LOCK), &files.lock).await?;
        if let Some(rc) = &files.npmrc {
            tokio::fs::write(tmp.join(NPMRC), rc).await?;
        }
        // As an install uid of its own, with only this folder (and a fresh home) to write in.
        let jail = self.sandbox.store_jail(tmp).await?;
        // Not the message's token: see `acquire`.
        let out = logged_run::run_logged(
            &self.install_argv,
            &[],
            &jail,
            tmp,
            timeout,
            &CancellationToken::new(),
        )
        .instrument(tracing::info_span!("install dependencies", store_key = %key))
        .await?;
        // The worker's again before it is made read-only: no tenant can change it after.
        jail.take_back().await?;
        if !out.success {
            return Err(BuildError::InstallFailed {
                status: out.status,
                log_tail: out.tail,
            });
        }
        // The `.npmrc` may hold the tenant's registry token: it does not stay in a shared entry.
        if files.npmrc.is_some() {
            tokio::fs::remove_file(tmp.join(NPMRC)).await?;
        }
        let (key_owned, tmp_owned) = (key.to_owned(), tmp.to_owned());
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (scanned, install) = blocking(move || {
            make_read_only(&tmp_owned, false)?;
            let scanned = scan(&tmp_owned)?;
            let marker = Marker {
                key: key_owned,
                fingerprint: scanned.fingerprint.clone(),
                bytes: scanned.bytes,
                created: unix_now(),
                install: id,
            };
            write_marker(&tmp_owned, &marker)?;
            // The rename below keeps the folder's inode.
            let install = InstallId::of(&std::fs::metadata(&tmp_owned)?, &marker);
            Ok((scanned, install))
        })
        .await?;
        if !self.place(key, tmp).await? {
            // Another process put the entry in place during the install, though this one held
            // the key's install lock: a worker that does not lock (an earlier version, during a
            // rolling deploy) or locks that do not reach every client of a network file system.
            // Its entry is as good as this one, once checked; a broken one is replaced.
            match self.check(key, &files.lock).await? {
                Entry::Valid(found) => {
                    tracing::info!(store_key = %key, "another worker installed the same dependencies first; using its entry");
                    return Ok(found);
                }
                Entry::Invalid(reason) => {
                    tracing::warn!(store_key = %key, %reason, "replacing a store entry another worker put in place");
                    self.discard(key).await?;
                }
                Entry::Missing => {}
            }
            if !self.place(key, tmp).await? {
                return Err(BuildError::Io(std::io::Error::other(format!(
                    "another process keeps putting {key} in place"
                ))));
            }
        }
        self.known.lock().expect("known lock").insert(
            key.to_owned(),
            Known {
                install: install.clone(),
                fingerprint: scanned.fingerprint.clone(),
            },
        );
        tracing::info!(
            store_key = %key,
            bytes = scanned.bytes,
            "installed dependencies into the shared store"
        );
        crate::metrics::metrics().store_installs.add(1, &[]);
        Ok(Found {
            fingerprint: scanned.fingerprint,
            install,
        })
    }

    /// Rename a finished install to `{key}`: `false` when an entry is there already.
    async fn place(&self, key: &str, tmp: &Path) -> std::io::Result<bool> {
        let (tmp, final_dir) = (tmp.to_owned(), self.dir.join(key));
        blocking(move || {
            // The rename is what makes the entry visible, complete or not at all. Same parent
            // folder: no write permission on the entry itself is needed to move it.
            match std::fs::rename(&tmp, &final_dir) {
                Ok(()) => {}
                // rename(2) replaces an empty folder only: an entry makes it fail (ENOTEMPTY
                // or EEXIST; ENOTDIR for a file).
                Err(_) if std::fs::symlink_metadata(&final_dir).is_ok() => return Ok(false),
                Err(e) => return Err(e),
            }
            std::fs::set_permissions(&final_dir, std::fs::Permissions::from_mode(0o555))?;
            Ok(true)
        })
        .await
    }

    async fn first_sweep(&self) {
        let mut swept = self.swept.lock().await;
        if !*swept {
            *swept = true;
            self.sweep("").await;
        }
    }

    /// Remove what eviction chooses, abandoned installs and leftovers of earlier removals.
    /// Errors are logged: a full sweep is retried after the next install.
    async fn sweep(&self, keep: &str) {
        let dir = self.dir.clone();
        let listed = match blocking(move || list_store(&dir)).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the npm store");
                return;
            }
        };
        let mut in_use: HashSet<String> = self
            .leases
            .lock()
            .expect("leases lock")
            .keys()
            .cloned()
            .collect();
        in_use.insert(keep.to_owned());
        let victims = choose_evictions(
            &listed.entries,
            unix_now(),
            self.settings.max_age,
            self.settings.max_bytes,
            &in_use,
        );
        for key in victims {
            let lock = self.key_lock(&key);
            let Ok(_guard) = lock.try_lock_owned() else {
                continue;
            };
            if self.leases.lock().expect("leases lock").contains_key(&key) {
                continue;
            }
            // Other processes: their installs, checks and builds hold one of the key's locks.
            let _locks = match self.lock_for_removal(&key).await {
                Ok(Some(locks)) => locks,
                Ok(None) => {
                    tracing::debug!(store_key = %key, "not evicting a store entry in use by another worker");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(store_key = %key, error = %e, "could not lock a store entry to evict it");
                    continue;
                }
            };
            tracing::info!(store_key = %key, "evicting a store entry");
            if let Err(e) = self.discard(&key).await {
                tracing::warn!(store_key = %key, error = %e, "could not evict a store entry");
                continue;
            }
            let _ = tokio::fs::remove_file(self.dir.join(format!("{key}.used"))).await;
            self.remove_lock_files(&key).await;
        }
        for (path, age) in listed.leftovers {
            let name = path
                .file_name()
                .map(OsStr::to_string_lossy)
                .unwrap_or_default()
                .into_owned();
            // Held while the folder goes, so that no install of its key starts meanwhile (one
            // would make a new folder anyway).
            let _install_lock = if name.starts_with(".trash.") {
                // Another process may be removing it right now; both removals end the same.
                None
            } else {
                // `.tmp.`: one of ours running, or another process's, which holds its key's
                // install lock until it ends (a crashed one's lock died with it). Not its pid:
                // pids repeat across containers and restarts. Without a lock to ask (a name
                // not made here, a lock that fails), its age decides.
                if self.installing.lock().expect("installing").contains(&path) {
                    continue;
                }
                match tmp_key(&name) {
                    Some(key) => match self.try_lock(key, Lock::Install).await {
                        Ok(Some(lock)) => Some(lock),
                        Ok(None) => continue,
                        Err(_) if age <= self.stale_install => continue,
                        Err(_) => None,
                    },
                    None if age <= self.stale_install => continue,
                    None => None,
                }
            };
            let _ = blocking(move || remove_tree(&path)).await;
        }
        // Lock files of keys without an entry (an install that failed or died): removed when
        // nobody holds them, so that they do not pile up.
        let entries: HashSet<&str> = listed.entries.iter().map(|e| e.key.as_str()).collect();
        for key in &listed.lock_keys {
            if entries.contains(key.as_str()) {
                continue;
            }
            if let Ok(Some(_locks)) = self.lock_for_removal(key).await {
                self.remove_lock_files(key).await;
            }
        }
    }
}

/// The key of an install folder `.tmp.{key}.{pid}.{n}`.
fn tmp_key(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(".tmp.")?;
    let mut parts = rest.rsplitn(3, '.');
    let (_n, _pid, key) = (parts.next()?, parts.next()?, parts.next()?);
    (!key.is_empty()).then_some(key)
}

/// A key's two lock files (see the module comment).
#[derive(Debug, Clone, Copy)]
enum Lock {
    /// `.lock.{key}`: checking, installing, replacing or removing the entry.
    Install,
    /// `.lock.{key}.in-use`: builds using the entry.
    InUse,
}

#[derive(Debug, Clone, Copy)]
enum Take {
    Shared,
    Exclusive,
    /// Exclusive, or an error of kind `WouldBlock` at once.
    TryExclusive,
}

const IN_USE_SUFFIX: &str = ".in-use";

fn lock_path(dir: &Path, key: &str, lock: Lock) -> PathBuf {
    match lock {
        Lock::Install => dir.join(format!(".lock.{key}")),
        Lock::InUse => dir.join(format!(".lock.{key}{IN_USE_SUFFIX}")),
    }
}

/// The key of a lock file's name.
fn lock_key(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(".lock.")?;
    let key = rest.strip_suffix(IN_USE_SUFFIX).unwrap_or(rest);
    (!key.is_empty()).then_some(key)
}

/// `flock(2)` on `path`, made when missing. The lock lives as long as the returned open file
/// (locks belong to an open file, so two opens in one process exclude each other too) and
/// dies with the process, however it ends. It blocks the thread: call it in a blocking task.
fn lock_file(path: &Path, take: Take) -> std::io::Result<File> {
    // Removals of lock files racing this loop end in a few rounds; this bounds a broken file
    // system.
    for _ in 0..100 {
        // Read and write: on NFS an exclusive flock is a write lock, which needs a file open
        // for writing.
        // Only the worker's: a tenant holding a lock would stop every install of that key.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let locked = match take {
            Take::Shared => file.lock_shared(),
            Take::Exclusive => file.lock(),
            Take::TryExclusive => match file.try_lock() {
                Ok(()) => Ok(()),
                Err(TryLockError::WouldBlock) => {
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Err(TryLockError::Error(e)) => Err(e),
            },
        };
        // An eviction removes the lock files while it holds them: a lock on a removed file
        // excludes nobody, so it counts only if the path still names the file locked. (On NFS
        // a file removed by another client can also answer "stale".)
        let current = locked.and_then(|()| {
            let held = file.metadata()?;
            let now = std::fs::metadata(path)?;
            Ok((held.dev(), held.ino()) == (now.dev(), now.ino()))
        });
        match current {
            Ok(true) => return Ok(file),
            Ok(false) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::StaleNetworkFileHandle
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "{} kept being replaced while it was locked",
        path.display()
    )))
}

/// Put the completion marker in the finished install folder `tmp`, read-only. The install's
/// own processes (a dependency's install script) wrote in that folder: a `.complete` they left,
/// a link to a file of the worker's above all, is replaced, never written through.
fn write_marker(tmp: &Path, marker: &Marker) -> std::io::Result<()> {
    let tenant = |e: TenantFileError| std::io::Error::other(e.to_string());
    let bytes = serde_json::to_vec(marker).map_err(std::io::Error::other)?;
    let folder = DirHandle::open(tmp).map_err(tenant)?;
    folder
        .replace_file(OsStr::new(MARKER), ".writing", &bytes, None)
        .map_err(tenant)?;
    // A regular file of the worker's now (made exclusively above), in a folder only the worker
    // writes in since the install was taken back: its path is safe to chmod.
    std::fs::set_permissions(tmp.join(MARKER), std::fs::Permissions::from_mode(0o444))
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

struct Listing {
    entries: Vec<EntryInfo>,
    /// `.tmp.*` and `.trash.*` folders, with their age.
    leftovers: Vec<(PathBuf, Duration)>,
    /// Keys that have lock files.
    lock_keys: HashSet<String>,
}

fn list_store(dir: &Path) -> std::io::Result<Listing> {
    let mut listing = Listing {
        entries: Vec::new(),
        leftovers: Vec::new(),
        lock_keys: HashSet::new(),
    };
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(listing),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    for item in read {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        let meta = match item.metadata() {
            Ok(meta) => meta,
            // Removed since it was listed: other processes sweep the same folder.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !meta.is_dir() {
            if let Some(key) = lock_key(&name).filter(|_| meta.is_file()) {
                listing.lock_keys.insert(key.to_owned());
            }
            continue;
        }
        if name.starts_with(".tmp.") || name.starts_with(".trash.") {
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            listing.leftovers.push((item.path(), age));
            continue;
        }
        if name.starts_with('.') {
            continue;
        }
        let marker = read_entry_file(&item.path(), MARKER)
            .and_then(|b| serde_json::from_slice::<Marker>(&b).ok());
        let used = std::fs::read_to_string(dir.join(format!("{name}.used")))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let mtime = meta.mtime().max(0) as u64;
        listing.entries.push(EntryInfo {
            last_used: used.or(marker.as_ref().map(|m| m.created)).unwrap_or(mtime),
            bytes: marker.as_ref().map_or(0, |m| m.bytes),
            complete: marker.is_some_and(|m| m.key == name),
            key: name,
        });
    }
    Ok(listing)
}

pub(crate) struct Scan {
    pub fingerprint: String,
    pub bytes: u64,
}

/// Digest of the stat data of everything under `root` (not following symlinks), without the
/// root folder itself and its marker. Any write, creation, removal, rename, chmod or hard link
/// changes an inode, a size, an mtime or a ctime, and ctime cannot be set back.
pub(crate) fn scan(root: &Path) -> std::io::Result<Scan> {
    let mut h = Md5::new();
    let mut bytes = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut items = std::fs::read_dir(root.join(&rel))?.collect::<Result<Vec<_>, _>>()?;
        items.sort_by_key(|e| e.file_name());
        for item in items {
            let name = item.file_name();
            if rel.as_os_str().is_empty() && name == MARKER {
                continue;
            }
            let path = rel.join(&name);
            let m = item.metadata()?;
            h.update(path.as_os_str().as_bytes());
            h.update([0]);
            for n in [
                m.ino(),
                m.mode() as u64,
                m.size(),
                m.mtime() as u64,
                m.mtime_nsec() as u64,
                m.ctime() as u64,
                m.ctime_nsec() as u64,
            ] {
                h.update(n.to_le_bytes());
            }
            bytes += m.blocks() * 512;
            if m.file_type().is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(Scan {
        fingerprint: format!("{:x}", h.finalize()),
        bytes,
    })
}

/// `chmod a-w` on everything under `root` (symlinks have no mode of their own), and on `root`
/// itself when asked.
fn make_read_only(root: &Path, include_root: bool) -> std::io::Result<()> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            let m = item.metadata()?;
            if m.file_type().is_symlink() {
                continue;
            }
            if m.is_dir() {
                stack.push(item.path());
            }
            let mode = m.mode() & 0o7777 & !0o222;
            std::fs::set_permissions(item.path(), std::fs::Permissions::from_mode(mode))?;
        }
    }
    if include_root {
        let mode = std::fs::metadata(root)?.mode() & 0o7777 & !0o222;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Remove a tree that may be read-only (a non-root owner needs write permission on folders).
/// An install's folder was written by its install's processes, which may still be running
/// after a failure: every folder is opened by handle before its mode changes, so a folder
/// swapped for a link is never entered, chmodded or emptied through.
fn remove_tree(root: &Path) -> std::io::Result<()> {
    let tenant = |e: TenantFileError| std::io::Error::other(e.to_string());
    let (Some(parent), Some(name)) = (root.parent(), root.file_name()) else {
        return Err(std::io::Error::other("no folder to remove"));
    };
    let parent = match DirHandle::open(parent) {
        Ok(parent) => parent,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(tenant(e)),
    };
    match parent.open_dir(Path::new(name)) {
        Ok(top) => {
            top.add_mode(0o700).map_err(tenant)?;
            top.walk(&[], &mut |folder, name, stat| {
                if tenant_fs::is_dir(stat) && stat.st_mode & 0o700 != 0o700 {
                    match folder.open_dir(Path::new(name)) {
                        Ok(inner) => inner.add_mode(0o700)?,
                        // Swapped for a link or gone: removed as what it is now.
                        Err(e) if e.is_not_found() || e.is_refusal() => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .map_err(tenant)?;
        }
        Err(e) if e.is_not_found() => return Ok(()),
        // A link or a file at the top: removed itself below.
        Err(e) if e.is_refusal() => {}
        Err(e) => return Err(tenant(e)),
    }
    parent.remove_entry(name).map_err(tenant)
}

/// Make `modules` (the workspace's `node_modules`) hold exactly one symlink per top-level entry
/// of `store_modules`, plus the build's cache folders. Existing right links stay; anything else
/// (an earlier entry's links, a whole per-workspace install, a package the agent added) goes.
/// Removing a symlink never touches what it points to.
pub(crate) fn link_overlay(store_modules: &Path, modules: &Path) -> std::io::Result<()> {
    let mut wanted: HashMap<std::ffi::OsString, PathBuf> = HashMap::new();
    // A lock file without dependencies installs no `node_modules` at all.
    let listed = match std::fs::read_dir(store_modules) {
        Ok(listed) => listed.collect::<Result<Vec<_>, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    for item in listed {
        let name = item.file_name();
        if CACHE_DIRS.iter().any(|c| OsStr::new(c) == name) {
            continue;
        }
        wanted.insert(name, item.path());
    }
    // The workspace's `node_modules` is the tenant's (its build may run beside this, started
    // ahead): every step is by handle, so a folder swapped for a link is never entered, and
    // nothing outside `node_modules` is removed or linked.
    let tenant = |e: TenantFileError| std::io::Error::other(e.to_string());
    let parent = modules
        .parent()
        .ok_or_else(|| std::io::Error::other("node_modules has no folder"))?;
    let name = modules
        .file_name()
        .ok_or_else(|| std::io::Error::other("node_modules has no name"))?;
    let workspace = DirHandle::open(parent).map_err(tenant)?;
    match workspace.stat(name).map_err(tenant)? {
        Some(stat) if tenant_fs::is_dir(&stat) => {}
        Some(_) => {
            workspace.remove_entry(name).map_err(tenant)?;
            workspace
                .create_dirs(Path::new(name), 0o755, None)
                .map_err(tenant)?;
        }
        None => {
            workspace
                .create_dirs(Path::new(name), 0o755, None)
                .map_err(tenant)?;
        }
    }
    let folder = workspace.open_dir(Path::new(name)).map_err(tenant)?;
    for (name, stat) in folder.entries().map_err(tenant)? {
        if tenant_fs::is_dir(&stat) && CACHE_DIRS.iter().any(|c| OsStr::new(c) == name) {
            continue;
        }
        if tenant_fs::is_link(&stat)
            && let Some(points_to) = folder.link_target(&name)
            && wanted.get(&name) == Some(&points_to)
        {
            wanted.remove(&name);
            continue;
        }
        folder.remove_entry(&name).map_err(tenant)?;
    }
    for (name, target) in wanted {
        folder.make_link(&target, &name).map_err(tenant)?;
    }
    Ok(())
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

    fn entry(key: &str, bytes: u64, last_used: u64) -> EntryInfo {
        EntryInfo {
            key: key.into(),
            bytes,
            last_used,
            complete: true,
        }
    }

    #[test]
    fn eviction_removes_incomplete_then_old_then_least_recently_used() {
        let day = 24 * 3600;
        let now = 100 * day;
        let entries = vec![
            entry("recent", 300, now - 10),
            entry("older", 300, now - day),
            entry("oldest", 300, now - 2 * day),
            entry("ancient", 300, now - 40 * day),
            EntryInfo {
                complete: false,
                ..entry("crashed", 0, now)
            },
        ];
        let none = HashSet::new();
        let max_age = Duration::from_secs(30 * day);
        // Age and incompleteness only: everything else fits.
        let mut v = choose_evictions(&entries, now, max_age, 10_000, &none);
        v.sort();
        assert_eq!(v, ["ancient", "crashed"]);
        // Over the cap: least recently used first, until the rest fits.
        let v = choose_evictions(&entries, now, max_age, 600, &none);
        assert_eq!(v, ["ancient", "crashed", "oldest"]);
        let v = choose_evictions(&entries, now, max_age, 299, &none);
        assert_eq!(v, ["ancient", "crashed", "oldest", "older", "recent"]);
        // In use: never chosen, though its bytes count.
        let in_use: HashSet<String> = ["oldest".to_owned(), "ancient".to_owned()].into();
        let v = choose_evictions(&entries, now, max_age, 600, &in_use);
        assert_eq!(v, ["crashed", "older", "recent"]);
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

    #[test]
    fn the_fingerprint_sees_writes_and_the_overlay_keeps_caches() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("entry");
        std::fs::create_dir_all(store.join("node_modules/astro")).unwrap();
        std::fs::create_dir_all(store.join("node_modules/.bin")).unwrap();
        std::fs::write(store.join("node_modules/astro/index.js"), "x").unwrap();
        make_read_only(&store, false).unwrap();
        let before = scan(&store).unwrap().fingerprint;
        assert_eq!(scan(&store).unwrap().fingerprint, before);
        // The marker does not count; a changed file does.
        std::fs::write(store.join(MARKER), "{}").unwrap();
        assert_eq!(scan(&store).unwrap().fingerprint, before);
        let file = store.join("node_modules/astro/index.js");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_ne!(scan(&store).unwrap().fingerprint, before);

        let ws = dir.path().join("ws/node_modules");
        std::fs::create_dir_all(ws.join(".vite/deps")).unwrap();
        std::fs::create_dir_all(ws.join("leftover")).unwrap();
        std::os::unix::fs::symlink("/elsewhere", ws.join("astro")).unwrap();
        link_overlay(&store.join("node_modules"), &ws).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&ws)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".bin", ".vite", "astro"]);
        assert_eq!(
            std::fs::read_link(ws.join("astro")).unwrap(),
            store.join("node_modules/astro")
        );
        assert!(ws.join(".vite/deps").is_dir());
        remove_tree(&store).unwrap();
        assert!(!store.exists());
    }

    // Stores on one folder stand for worker processes sharing it: each has its own in-process
    // locks and counts, so only the flock locks (per open file, not per process) stand between
    // them, as between processes.

    const T: Duration = Duration::from_secs(60);
    /// A stand-in for `npm ci`: one package, whose `index.js` says `$1`.
    const INSTALL: &str =
        r#"mkdir -p node_modules/pkg && printf %s "$1" > node_modules/pkg/index.js"#;

    /// A temporary folder, removed at the end, read-only entries and all.
    struct Folder(tempfile::TempDir);

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

    fn folder() -> Folder {
        Folder(tempfile::tempdir().unwrap())
    }

    /// A store whose installs run `sh -c script sh args...` in the install folder (no npm, no
    /// network), on a Node 20 (no `node` asked).
    fn store_with(dir: &Path, settings: StoreSettings, script: &str, args: &[&str]) -> NpmStore {
        let mut argv: Vec<String> = vec!["sh".into(), "-c".into(), script.into(), "sh".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let store = NpmStore::with_install_command(
            dir.to_owned(),
            settings,
            T,
            argv,
            crate::sandbox::Sandbox::off(dir),
        );
        store.inner.node_major.set("20".into()).unwrap();
        store
    }

    /// A store whose installs write `tag`.
    fn store(dir: &Path, tag: &str) -> NpmStore {
        store_with(dir, StoreSettings::default(), INSTALL, &[tag])
    }

    fn site(n: u32) -> SiteFiles {
        SiteFiles {
            lock: format!(r#"{{"lockfileVersion": 3, "n": {n}}}"#).into_bytes(),
            package_json: b"{}".to_vec(),
            npmrc: None,
        }
    }

    fn key_of(files: &SiteFiles) -> String {
        store_key(&files.lock, None, "20")
    }

    /// Which install the entry holds.
    fn tag(dir: &Path, key: &str) -> String {
        std::fs::read_to_string(dir.join(key).join("node_modules/pkg/index.js")).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// What a build that writes into its dependencies does (root may; anyone else opens the
    /// folder first, as an attacker would need to).
    fn plant(dir: &Path, key: &str) {
        let pkg = dir.join(key).join("node_modules/pkg");
        std::fs::set_permissions(&pkg, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(pkg.join("planted.js"), "planted").unwrap();
    }

    #[test]
    fn flock_locks_exclude_two_opens_in_one_process() {
        let dir = folder();
        let path = dir.join(".lock.k");
        let held = |take| lock_file(&path, take);
        let blocked =
            |r: std::io::Result<File>| r.is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock);
        let one = held(Take::Shared).unwrap();
        let two = held(Take::Shared).unwrap();
        assert!(blocked(held(Take::TryExclusive)));
        drop(one);
        assert!(blocked(held(Take::TryExclusive)));
        drop(two);
        let exclusive = held(Take::TryExclusive).unwrap();
        assert!(blocked(held(Take::TryExclusive)));

        // A lock file removed while a locker waits on it (as an eviction does): the waiter
        // ends up holding the file now at the path, not the removed one.
        let waiter = std::thread::spawn({
            let path = path.clone();
            move || lock_file(&path, Take::Exclusive)
        });
        std::thread::sleep(Duration::from_millis(200));
        std::fs::remove_file(&path).unwrap();
        drop(exclusive);
        let got = waiter.join().unwrap().unwrap();
        // (The inode number may be the removed file's again: it was free once the waiter
        // closed that file.)
        let now = std::fs::metadata(&path).expect("the waiter made the lock file again");
        assert_eq!(got.metadata().unwrap().ino(), now.ino());
        assert!(blocked(held(Take::TryExclusive)));

        assert_eq!(
            tmp_key(".tmp.node20-linux-x86_64-ab12.7.0"),
            Some("node20-linux-x86_64-ab12")
        );
        assert_eq!(tmp_key(".tmp.x"), None);
        assert_eq!(lock_key(".lock.node20-k"), Some("node20-k"));
        assert_eq!(lock_key(".lock.node20-k.in-use"), Some("node20-k"));
    }

    #[tokio::test]
    async fn an_entry_another_store_uses_is_not_evicted_until_it_is_let_go() {
        let dir = folder();
        let a = store(&dir, "a");
        // B would evict every entry: none fits in its limit.
        let small = StoreSettings {
            max_bytes: 0,
            ..StoreSettings::default()
        };
        let b = store_with(&dir, small, INSTALL, &["b"]);
        let files = site(1);
        let key = key_of(&files);
        let cancel = CancellationToken::new();
        let held = a.acquire(files.clone(), T, &cancel).await.unwrap();
        assert!(held.installed_ms.is_some());
        // By B's own books nobody uses it, and its eviction chooses it.
        let listed = list_store(&dir).unwrap();
        let chosen = choose_evictions(&listed.entries, unix_now(), T, 0, &HashSet::new());
        assert_eq!(chosen, [key.as_str()]);

        b.inner.sweep("").await;
        assert_eq!(
            tag(&dir, &key),
            "a",
            "evicted while another store's build used it"
        );
        a.verify_unchanged(&held).await.unwrap();

        drop(held);
        b.inner.sweep("").await;
        // The entry went, with its record of use and its lock files.
        assert_eq!(names(&dir), Vec::<String>::new());
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
    async fn an_install_under_way_in_another_process_is_not_swept() {
        let dir = folder();
        let b = store(&dir, "b");
        let key = key_of(&site(6));
        // With this process's pid: pids repeat across containers.
        let tmp = dir.join(format!(".tmp.{key}.{}.0", std::process::id()));
        std::fs::create_dir_all(tmp.join("node_modules")).unwrap();
        let installer = lock_file(&lock_path(&dir, &key, Lock::Install), Take::Exclusive).unwrap();
        b.inner.sweep("").await;
        assert!(tmp.is_dir(), "a live install was swept");
        // Its installer died: its lock is gone, so is the folder, and the lock file.
        drop(installer);
        b.inner.sweep("").await;
        assert_eq!(names(&dir), Vec::<String>::new());
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

    /// An install's script plants `.complete` (and `package-lock.json`) in its folder as links
    /// to files of the worker's: the marker replaces the link, nothing is written through it,
    /// and the entry's files are not read through links.
    #[test]
    fn a_planted_marker_link_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, victim) = (dir.path().join("install"), dir.path().join("victim"));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(&victim, "the worker's").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.join(MARKER)).unwrap();
        std::os::unix::fs::symlink(&victim, tmp.join(LOCK)).unwrap();
        let marker = Marker {
            key: "k".into(),
            fingerprint: "f".into(),
            bytes: 1,
            created: 2,
            install: "i".into(),
        };
        write_marker(&tmp, &marker).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "the worker's");
        let meta = std::fs::symlink_metadata(tmp.join(MARKER)).unwrap();
        assert!(meta.is_file() && meta.mode() & 0o777 == 0o444);
        assert_eq!(
            read_entry_file(&tmp, MARKER).unwrap(),
            serde_json::to_vec(&marker).unwrap()
        );
        assert_eq!(read_entry_file(&tmp, LOCK), None);
        std::fs::remove_file(tmp.join(LOCK)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", tmp.join(LOCK)).unwrap();
        assert_eq!(read_entry_file(&tmp, LOCK), None);
    }

    /// A failed install's folder: read-only folders go, a folder link inside goes as the link,
    /// and the read-only folder it points to keeps its mode and its files. (The old path-based
    /// walk also skipped a link that was already there; what it could follow was a folder
    /// swapped for a link between its stat and its chmod, which a test cannot time.)
    #[test]
    fn removing_an_install_folder_changes_nothing_behind_its_links() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, outside) = (dir.path().join("install"), dir.path().join("outside"));
        std::fs::create_dir_all(tmp.join("node_modules/a")).unwrap();
        std::fs::write(tmp.join("node_modules/a/f"), "x").unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, tmp.join("node_modules/out")).unwrap();
        make_read_only(&tmp, true).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o500)).unwrap();
        remove_tree(&tmp).unwrap();
        assert!(std::fs::symlink_metadata(&tmp).is_err());
        assert!(outside.join("keep").is_file());
        let mode = std::fs::metadata(&outside).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o500);
        remove_tree(&tmp).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}
