//! The two `flock(2)` lock files of each key (see the module comment of `npm_store`): their
//! paths, taking them (shared, exclusive, or without waiting), and the store's uses of them.

#[allow(clippy::wildcard_imports)] // the store's shared types, paths and helpers
use super::*;

/// A key's two lock files (see the module comment).
#[derive(Debug, Clone, Copy)]
pub(super) enum Lock {
    /// `.lock.{key}`: checking, installing, replacing or removing the entry.
    Install,
    /// `.lock.{key}.in-use`: builds using the entry.
    InUse,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Take {
    Shared,
    Exclusive,
    /// Exclusive, or an error of kind `WouldBlock` at once.
    TryExclusive,
}

pub(super) const IN_USE_SUFFIX: &str = ".in-use";

pub(super) fn lock_path(dir: &Path, key: &str, lock: Lock) -> PathBuf {
    match lock {
        Lock::Install => dir.join(format!(".lock.{key}")),
        Lock::InUse => dir.join(format!(".lock.{key}{IN_USE_SUFFIX}")),
    }
}

/// The key of a lock file's name.
pub(super) fn lock_key(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(".lock.")?;
    let key = rest.strip_suffix(IN_USE_SUFFIX).unwrap_or(rest);
    (!key.is_empty()).then_some(key)
}

/// `flock(2)` on `path`, made when missing. The lock lives as long as the returned open file
/// (locks belong to an open file, so two opens in one process exclude each other too) and
/// dies with the process, however it ends. It blocks the thread: call it in a blocking task.
pub(super) fn lock_file(path: &Path, take: Take) -> std::io::Result<File> {
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

impl Inner {
    /// Take one of `key`'s locks without waiting: `None` when another open file holds it, in
    /// this process or another.
    pub(super) async fn try_lock(&self, key: &str, lock: Lock) -> std::io::Result<Option<File>> {
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
    pub(super) async fn lock_in_use(&self, key: &str) -> Result<File, BuildError> {
        let path = lock_path(&self.dir, key, Lock::InUse);
        Ok(blocking(move || lock_file(&path, Take::Shared)).await?)
    }

    /// Both of the key's locks, exclusively, or `None` when anyone installs, checks or uses it.
    pub(super) async fn lock_for_removal(
        &self,
        key: &str,
    ) -> std::io::Result<Option<(File, File)>> {
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
    pub(super) async fn remove_lock_files(&self, key: &str) {
        for lock in [Lock::InUse, Lock::Install] {
            let _ = tokio::fs::remove_file(lock_path(&self.dir, key, lock)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::build::npm_store::eviction::tmp_key;
    use crate::steps::build::npm_store::tests::folder;

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
}
