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
//! ```
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
//! changed it fails.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::build::{self, BuildError};

/// Written last into an entry: its presence means the install finished.
const MARKER: &str = ".complete";
/// Folders the build writes into `node_modules`: per workspace, kept between builds.
pub const CACHE_DIRS: &[&str] = &[".vite", ".astro", ".cache"];
/// Names an install copies from the workspace.
const LOCK: &str = "package-lock.json";
const PACKAGE: &str = "package.json";
const NPMRC: &str = ".npmrc";
/// The workspace's record of the entry linked into its `node_modules` (in the state folder).
pub const LINK_STAMP: &str = "npm-store.link";

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
pub fn unshareable_reason(lock: &[u8], package_json: &[u8]) -> Option<&'static str> {
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
pub struct SiteFiles {
    pub lock: Vec<u8>,
    pub package_json: Vec<u8>,
    pub npmrc: Option<Vec<u8>>,
}

/// One entry as the eviction sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryInfo {
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
pub fn choose_evictions(
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
}

/// A store entry in use by one build: it is not evicted while held.
pub struct Acquired {
    pub key: String,
    /// `npm ci` ran for this build, taking this long.
    pub installed_ms: Option<u64>,
    /// This build waited this long for another build's install of the same entry.
    pub waited_ms: Option<u64>,
    fingerprint: String,
    _lease: Lease,
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
pub struct NpmStore {
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
    known: Mutex<HashMap<String, String>>,
    /// `.tmp.*` folders of installs under way in this process.
    installing: Mutex<HashSet<PathBuf>>,
    /// The sweep after a start (leftovers of a crash) has run.
    swept: tokio::sync::Mutex<bool>,
    counter: AtomicU64,
}

/// Outcome of checking an entry.
enum Entry {
    Missing,
    Valid(String),
    Invalid(String),
}

impl NpmStore {
    /// A store in `dir` (made absolute). Nothing is read or written until the first build.
    pub fn new(dir: PathBuf, settings: StoreSettings, install_timeout: Duration) -> NpmStore {
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
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The entry for `files`, installed first when there is no valid one. Two builds that need
    /// the same new entry install it once: the second waits for the first. The install itself
    /// is not cancelled with the message that started it (an interrupt's newer message needs
    /// the same dependencies); `cancel` only stops the waiting.
    pub async fn acquire(
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
        // A second worker process sharing this folder would also take an exclusive
        // `flock(2)` on `{dir}/.lock.{key}` here, held as long as this guard (nix::fcntl::Flock
        // in a blocking task); the atomic rename below already keeps a race between processes
        // from ever exposing a half-written entry, it would only install twice.
        let (guard, waited) = match lock.clone().try_lock_owned() {
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
        match inner.check(&key, &files.lock).await? {
            Entry::Valid(fingerprint) => {
                let lease = inner.lease(&key);
                drop(guard);
                inner.touch_used(&key).await;
                tracing::info!(store_key = %key, "using dependencies from the shared store");
                return Ok(Acquired {
                    key,
                    installed_ms: None,
                    waited_ms: waited,
                    fingerprint,
                    _lease: lease,
                });
            }
            Entry::Invalid(reason) => {
                tracing::warn!(store_key = %key, %reason, "discarding a store entry and installing it again");
                inner.discard(&key).await?;
            }
            Entry::Missing => {}
        }
        let task_inner = inner.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = task_inner.install(&task_key, &files, timeout).await;
            let lease = task_inner.lease(&task_key);
            drop(guard);
            let ms = started.elapsed().as_millis() as u64;
            if result.is_ok() {
                task_inner.touch_used(&task_key).await;
                task_inner.sweep(&task_key).await;
            }
            result.map(|fingerprint| (fingerprint, ms, lease))
        });
        let joined = tokio::select! {
            joined = task => joined,
            _ = cancel.cancelled() => return Err(BuildError::Cancelled),
        };
        let (fingerprint, ms, lease) =
            joined.map_err(|e| BuildError::Io(std::io::Error::other(e)))??;
        Ok(Acquired {
            key,
            installed_ms: Some(ms),
            waited_ms: waited,
            fingerprint,
            _lease: lease,
        })
    }

    /// Point `{workspace}/node_modules` at the entry: one symlink per top-level name, the
    /// build's caches kept, anything else removed. Records the key in `state_dir`.
    pub async fn link(
        &self,
        acquired: &Acquired,
        workspace: &Path,
        state_dir: &Path,
    ) -> Result<(), BuildError> {
        let modules = self.inner.dir.join(&acquired.key).join("node_modules");
        let target = workspace.join("node_modules");
        blocking(move || link_overlay(&modules, &target)).await?;
        tokio::fs::create_dir_all(state_dir).await?;
        tokio::fs::write(state_dir.join(LINK_STAMP), &acquired.key).await?;
        // A later per-workspace install must start from scratch.
        let _ = tokio::fs::remove_file(state_dir.join(build::INSTALL_STAMP)).await;
        Ok(())
    }

    /// After the build: the entry must be as it was. A build that changed it fails, and the
    /// entry is discarded so that no other build loads it.
    pub async fn verify_unchanged(&self, acquired: &Acquired) -> Result<(), BuildError> {
        let inner = &self.inner;
        let entry = inner.dir.join(&acquired.key);
        let now = blocking(move || scan(&entry)).await;
        if now
            .as_ref()
            .is_ok_and(|s| s.fingerprint == acquired.fingerprint)
        {
            return Ok(());
        }
        let lock = inner.key_lock(&acquired.key);
        let _guard = lock.lock().await;
        // Discard it unless another build has already put a fresh install in its place.
        let known = inner
            .known
            .lock()
            .expect("known lock")
            .get(&acquired.key)
            .cloned();
        let entry = inner.dir.join(&acquired.key);
        let current = blocking(move || scan(&entry)).await.ok();
        if known.is_none() || current.map(|s| s.fingerprint) != known {
            tracing::warn!(store_key = %acquired.key, "the build changed the shared dependencies; discarding them");
            inner.discard(&acquired.key).await?;
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
        match tokio::fs::symlink_metadata(&entry).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Entry::Missing),
            Err(e) => return Err(e.into()),
            Ok(m) if !m.is_dir() => return Ok(Entry::Invalid("not a folder".into())),
            Ok(_) => {}
        }
        let marker = match tokio::fs::read(entry.join(MARKER)).await {
            Ok(bytes) => serde_json::from_slice::<Marker>(&bytes).ok(),
            Err(_) => None,
        };
        let Some(marker) = marker.filter(|m| m.key == key) else {
            return Ok(Entry::Invalid(
                "no completion marker: an install that did not finish".into(),
            ));
        };
        // The key is a digest; the lock file itself is compared too.
        if tokio::fs::read(entry.join(LOCK)).await.ok().as_deref() != Some(lock) {
            return Ok(Entry::Invalid("it holds another lock file".into()));
        }
        let scanned = blocking(move || scan(&entry)).await?;
        let mut known = self.known.lock().expect("known lock");
        let expected = known.get(key).unwrap_or(&marker.fingerprint);
        if scanned.fingerprint != *expected {
            return Ok(Entry::Invalid("its files changed after the install".into()));
        }
        known.insert(key.to_owned(), scanned.fingerprint.clone());
        Ok(Entry::Valid(scanned.fingerprint))
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
    ) -> Result<String, BuildError> {
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
        if result.is_err() {
            let tmp = tmp.clone();
            let _ = blocking(move || remove_tree(&tmp)).await;
        }
        result
    }

    async fn install_into(
        &self,
        key: &str,
        files: &SiteFiles,
        timeout: Duration,
        tmp: &Path,
    ) -> Result<String, BuildError> {
        tokio::fs::write(tmp.join(PACKAGE), &files.package_json).await?;
        tokio::fs::write(tmp.join(LOCK), &files.lock).await?;
        if let Some(rc) = &files.npmrc {
            tokio::fs::write(tmp.join(NPMRC), rc).await?;
        }
        let argv = ["npm", "ci", "--no-audit", "--no-fund"].map(String::from);
        // Not the message's token: see `acquire`.
        let out = build::run_logged(&argv, tmp, timeout, &CancellationToken::new())
            .instrument(tracing::info_span!("install dependencies", store_key = %key))
            .await?;
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
        let (key_owned, tmp_owned, final_dir) =
            (key.to_owned(), tmp.to_owned(), self.dir.join(key));
        let scanned = blocking(move || {
            make_read_only(&tmp_owned, false)?;
            let scanned = scan(&tmp_owned)?;
            let marker = Marker {
                key: key_owned,
                fingerprint: scanned.fingerprint.clone(),
                bytes: scanned.bytes,
                created: unix_now(),
            };
            let path = tmp_owned.join(MARKER);
            std::fs::write(
                &path,
                serde_json::to_vec(&marker).map_err(std::io::Error::other)?,
            )?;
            std::fs::File::open(&path)?.sync_all()?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))?;
            // The rename is what makes the entry visible, complete or not at all. Same parent
            // folder: no write permission on the entry itself is needed to move it.
            std::fs::rename(&tmp_owned, &final_dir)?;
            std::fs::set_permissions(&final_dir, std::fs::Permissions::from_mode(0o555))?;
            Ok(scanned)
        })
        .await?;
        self.known
            .lock()
            .expect("known lock")
            .insert(key.to_owned(), scanned.fingerprint.clone());
        tracing::info!(
            store_key = %key,
            bytes = scanned.bytes,
            "installed dependencies into the shared store"
        );
        Ok(scanned.fingerprint)
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
            tracing::info!(store_key = %key, "evicting a store entry");
            if let Err(e) = self.discard(&key).await {
                tracing::warn!(store_key = %key, error = %e, "could not evict a store entry");
                continue;
            }
            let _ = tokio::fs::remove_file(self.dir.join(format!("{key}.used"))).await;
        }
        let own = format!(".{}.", std::process::id());
        for (path, age) in listed.leftovers {
            let name = path
                .file_name()
                .map(OsStr::to_string_lossy)
                .unwrap_or_default();
            let abandoned = if name.starts_with(".trash.") {
                // Another process may be removing it right now; both removals end the same.
                true
            } else {
                // `.tmp.`: ours and no longer running (a crash before a restart with the same
                // pid, as in a container), or anyone's and far older than an install may take.
                let running = self.installing.lock().expect("installing").contains(&path);
                !running && (name.contains(&own) || age > self.stale_install)
            };
            if abandoned {
                let _ = blocking(move || remove_tree(&path)).await;
            }
        }
    }
}

struct Listing {
    entries: Vec<EntryInfo>,
    /// `.tmp.*` and `.trash.*` folders, with their age.
    leftovers: Vec<(PathBuf, Duration)>,
}

fn list_store(dir: &Path) -> std::io::Result<Listing> {
    let mut listing = Listing {
        entries: Vec::new(),
        leftovers: Vec::new(),
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
        let meta = item.metadata()?;
        if !meta.is_dir() {
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
        let marker = std::fs::read(item.path().join(MARKER))
            .ok()
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
fn remove_tree(root: &Path) -> std::io::Result<()> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !m.is_dir() {
            continue;
        }
        if m.mode() & 0o700 != 0o700 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m.mode() | 0o700))?;
        }
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            if item.file_type()?.is_dir() {
                stack.push(item.path());
            }
        }
    }
    match std::fs::remove_dir_all(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Make `modules` (the workspace's `node_modules`) hold exactly one symlink per top-level entry
/// of `store_modules`, plus the build's cache folders. Existing right links stay; anything else
/// (an earlier entry's links, a whole per-workspace install, a package the agent added) goes.
/// Removing a symlink never touches what it points to.
pub fn link_overlay(store_modules: &Path, modules: &Path) -> std::io::Result<()> {
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
    match std::fs::symlink_metadata(modules) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            std::fs::remove_file(modules)?;
            std::fs::create_dir(modules)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(modules)?,
        Err(e) => return Err(e),
    }
    for item in std::fs::read_dir(modules)? {
        let item = item?;
        let name = item.file_name();
        let kind = item.file_type()?;
        if kind.is_dir() && CACHE_DIRS.iter().any(|c| OsStr::new(c) == name) {
            continue;
        }
        if kind.is_symlink() {
            let points_to = std::fs::read_link(item.path())?;
            if wanted.get(&name) == Some(&points_to) {
                wanted.remove(&name);
                continue;
            }
        }
        if kind.is_dir() {
            std::fs::remove_dir_all(item.path())?;
        } else {
            std::fs::remove_file(item.path())?;
        }
    }
    for (name, target) in wanted {
        std::os::unix::fs::symlink(&target, modules.join(name))?;
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
}
