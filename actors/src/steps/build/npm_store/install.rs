//! One install into the store: `npm ci` in a fresh folder beside the entry, in the sandbox as an
//! install uid of its own, then made read-only, fingerprinted (`scan`), marked complete and
//! renamed into place.

#[allow(clippy::wildcard_imports)] // the store's shared types, paths and helpers
use super::*;

impl Inner {
    /// `npm ci` into a fresh folder beside the entry, made read-only, fingerprinted, marked
    /// complete, and only then renamed to `{key}`. Returns the fingerprint.
    pub(super) async fn install(
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

    pub(super) async fn install_into(
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
        crate::telemetry::metrics::metrics()
            .store_installs
            .add(1, &[]);
        Ok(Found {
            fingerprint: scanned.fingerprint,
            install,
        })
    }

    /// Rename a finished install to `{key}`: `false` when an entry is there already.
    pub(super) async fn place(&self, key: &str, tmp: &Path) -> std::io::Result<bool> {
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
}

/// Put the completion marker in the finished install folder `tmp`, read-only. The install's
/// own processes (a dependency's install script) wrote in that folder: a `.complete` they left,
/// a link to a file of the worker's above all, is replaced, never written through.
pub(super) fn write_marker(tmp: &Path, marker: &Marker) -> std::io::Result<()> {
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

/// `chmod a-w` on everything under `root` (symlinks have no mode of their own), and on `root`
/// itself when asked.
pub(super) fn make_read_only(root: &Path, include_root: bool) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
