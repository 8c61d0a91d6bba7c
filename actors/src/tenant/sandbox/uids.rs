//! A uid per workspace: the root's range of uids (chosen once, kept in `.sandbox/`, agreed on by
//! every worker sharing the root), each workspace's uid allocated once and kept, the install
//! uids taken one per running install, and the root's own folder prepared for them.

#[allow(clippy::wildcard_imports)] // the sandbox's shared types and imports
use super::*;

impl Sandbox {
    pub(super) fn first_uid(&self) -> u32 {
        *self
            .first_uid
            .get()
            .expect("the uid range is read at start, before any jail")
    }

    /// This root's uid range: the one recorded, or a new one chosen at random.
    pub(super) fn read_or_choose_range(&self) -> Result<u32, SandboxError> {
        let path = self.state.join("uid-range");
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|e| io_at(&path)(std::io::Error::other(format!("not a uid: {e}")))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let random = uuid::Uuid::new_v4().as_u128() as u32;
                let first = RANGE_START + (random % RANGES) * RANGE_SIZE;
                // Written whole, then linked into place: of two workers starting on one root
                // at once, one range wins and nobody reads a half-written file.
                let tmp = self
                    .state
                    .join(format!("uid-range.{}.{random}", std::process::id()));
                write_private(&tmp, first.to_string().as_bytes())?;
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => Ok(first),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        self.read_or_choose_range()
                    }
                    Err(e) => Err(io_at(&path)(e)),
                }
            }
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// One of the `INSTALL_UIDS` install slots, locked for as long as the returned file is
    /// open: the first free one, or (all taken) the next in turn, waited for.
    pub(super) fn claim_install_slot(&self) -> Result<(u32, std::fs::File), SandboxError> {
        let locks = self.state.join("installs");
        std::fs::create_dir_all(&locks).map_err(io_at(&locks))?;
        set_mode(&locks, 0o711)?;
        let open = |slot: u32| {
            let path = locks.join(format!("{slot}.lock"));
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io_at(&path))
        };
        for slot in 0..INSTALL_UIDS {
            let file = open(slot)?;
            match file.try_lock() {
                Ok(()) => return Ok((slot, file)),
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(io_at(&locks)(e));
                }
            }
        }
        let slot = (self
            .install_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % INSTALL_UIDS as u64) as u32;
        let file = open(slot)?;
        file.lock().map_err(io_at(&locks))?;
        Ok((slot, file))
    }

    /// The uid of workspace `name` (`client/project`), allocated under a file lock so that
    /// workers sharing the root agree.
    pub(super) fn uid_for(&self, name: &str) -> Result<u32, SandboxError> {
        if let Some(uid) = self.uids.lock().expect("uids").get(name) {
            return Ok(*uid);
        }
        let path = self.state.join("uids.json");
        let lock_path = self.state.join("uids.lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        lock.lock().map_err(io_at(&lock_path))?;
        let mut map: BTreeMap<String, u32> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io_at(&path)(std::io::Error::other(e)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_at(&path)(e)),
        };
        let uid = match map.get(name) {
            Some(uid) => *uid,
            None => {
                let first = self.first_uid();
                let next = map.values().max().map_or(first + 1, |max| max + 1);
                if next > first + MAX_TENANTS {
                    return Err(SandboxError::NoUidLeft);
                }
                map.insert(name.to_owned(), next);
                let tmp = self.state.join(format!("uids.json.{}", std::process::id()));
                write_private(
                    &tmp,
                    &serde_json::to_vec_pretty(&map).expect("a map of ids"),
                )?;
                std::fs::rename(&tmp, &path).map_err(io_at(&path))?;
                next
            }
        };
        *self.uids.lock().expect("uids") = map;
        Ok(uid)
    }

    /// The root and the worker's own folders under it: other users may pass through the root
    /// (to reach their checkout) but list nothing, and read none of the worker's records.
    pub(super) fn prepare_root(&self) -> Result<(), SandboxError> {
        set_mode(&self.root, 0o711)?;
        std::fs::create_dir_all(&self.state).map_err(io_at(&self.state))?;
        set_mode(&self.state, 0o711)?;
        let first = self.read_or_choose_range()?;
        let _ = self.first_uid.set(first);
        let homes = self.state.join("home");
        std::fs::create_dir_all(&homes).map_err(io_at(&homes))?;
        set_mode(&homes, 0o711)?;
        // The worker's records and the thread map: nobody else's to read.
        for private in [".records", ".agent/threads"] {
            let dir = self.root.join(private);
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            set_mode(&dir, 0o700)?;
        }
        // Every folder above the root must let other users pass, or no tenant reaches its
        // checkout: say so at start rather than failing every message.
        let mut at = self.root.parent();
        while let Some(dir) = at {
            let mode = std::fs::metadata(dir).map_err(io_at(dir))?.mode();
            if mode & 0o001 == 0 {
                return Err(SandboxError::Io {
                    path: dir.to_owned(),
                    source: std::io::Error::other(
                        "other users cannot pass through this folder (no o+x), so tenants \
                         cannot reach their workspaces under WORKSPACE_ROOT",
                    ),
                });
            }
            at = dir.parent();
        }
        Ok(())
    }
}
