//! Keeping the store within its bounds: which entries to remove (incomplete ones, those unused
//! past `NPM_STORE_MAX_AGE`, then the least recently used past `NPM_STORE_MAX_BYTES`), the sweep
//! that removes them along with abandoned installs and unused lock files, and the removal of a
//! read-only tree that an install's processes may have written.

#[allow(clippy::wildcard_imports)] // the store's shared types, paths and helpers
use super::*;

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

impl Inner {
    pub(super) async fn first_sweep(&self) {
        let mut swept = self.swept.lock().await;
        if !*swept {
            *swept = true;
            self.sweep("").await;
        }
    }

    /// Remove what eviction chooses, abandoned installs and leftovers of earlier removals.
    /// Errors are logged: a full sweep is retried after the next install.
    pub(super) async fn sweep(&self, keep: &str) {
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
pub(super) fn tmp_key(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(".tmp.")?;
    let mut parts = rest.rsplitn(3, '.');
    let (_n, _pid, key) = (parts.next()?, parts.next()?, parts.next()?);
    (!key.is_empty()).then_some(key)
}

pub(super) struct Listing {
    entries: Vec<EntryInfo>,
    /// `.tmp.*` and `.trash.*` folders, with their age.
    leftovers: Vec<(PathBuf, Duration)>,
    /// Keys that have lock files.
    lock_keys: HashSet<String>,
}

pub(super) fn list_store(dir: &Path) -> std::io::Result<Listing> {
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

/// Remove a tree that may be read-only (a non-root owner needs write permission on folders).
/// An install's folder was written by its install's processes, which may still be running
/// after a failure: every folder is opened by handle before its mode changes, so a folder
/// swapped for a link is never entered, chmodded or emptied through.
pub(super) fn remove_tree(root: &Path) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::build::npm_store::install::make_read_only;
    use crate::steps::build::npm_store::tests::{
        INSTALL, T, folder, key_of, names, site, store, store_with, tag,
    };

    fn entry(key: &str, bytes: u64, last_used: u64) -> EntryInfo {
        EntryInfo {
            key: key.into(),
            bytes,
            last_used,
            complete: true,
        }
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
