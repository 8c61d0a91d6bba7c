//! Files the worker opens, as root, inside what a tenant controls: its checkout, its home, its
//! agent folder, a shared install's folder. The tenant (its agent, its build, a dependency's
//! install script) can put anything there, a link to `.git/config`, to `/proc/self/environ` or to
//! `/dev/zero` above all, and can swap a folder for a link while the worker walks it. So:
//!
//! - every path below a trusted folder (the worker's own path to the checkout or agent folder) is
//!   opened one component at a time, relative to the folder handle before it, with `O_NOFOLLOW`:
//!   a link anywhere on the way is refused (`TenantFileError::Link`), never followed;
//! - a file is read only when `fstat` on the open handle says it is a regular file (a FIFO,
//!   device or socket is refused, and opening one never blocks: `O_NONBLOCK`), and never past a
//!   size bound, whatever the file claims (`TenantFileError::TooBig`);
//! - a file is written under a fresh name made with `O_CREAT | O_EXCL | O_NOFOLLOW` and renamed
//!   into place inside the same folder handle (a link in the way is replaced, never written
//!   through);
//! - a walk (ownership changes, disk use) holds a handle per folder and acts on entries by name
//!   relative to it (`fstatat`/`fchownat` with `AT_SYMLINK_NOFOLLOW`, `openat` with
//!   `O_NOFOLLOW`): a folder swapped for a link meanwhile is not entered, so no walk leaves the
//!   tree it started in.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, unlinkat};

/// The largest `package.json`, lock file or `.npmrc` the worker reads from a site. The sample
/// Astro site's lock file is 150 kB; big real ones reach a few MB. Past this the site is refused
/// rather than read: the bound is what keeps the worker's memory flat.
pub(crate) const SITE_FILE_MAX_BYTES: u64 = 16 << 20;

/// How deep a walk goes below its folder. npm's trees are a few dozen levels at most; a tenant's
/// folder nested deeper is refused (each level holds one open handle while the walk is in it).
const MAX_DEPTH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TenantFileError {
    #[error(
        "{} is a link, or passes through one; the worker does not follow a tenant's links",
        .path.display()
    )]
    Link { path: PathBuf },
    #[error("{} is not a regular file ({kind})", .path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is larger than {max} bytes, the most the worker reads of it", .path.display())]
    TooBig { path: PathBuf, max: u64 },
    #[error("{} is nested more than {MAX_DEPTH} folders deep", .path.display())]
    TooDeep { path: PathBuf },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TenantFileError {
    /// Refused for what the tenant put there (a link, a device, a giant), not an I/O failure:
    /// trying again would find the same.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, TenantFileError::Io { .. })
    }

    /// Not there at all (the caller may treat a missing file as absent).
    pub fn is_not_found(&self) -> bool {
        matches!(self, TenantFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    fn at(path: PathBuf, errno: Errno) -> TenantFileError {
        match errno {
            // O_NOFOLLOW on a link: ELOOP.
            Errno::ELOOP => TenantFileError::Link { path },
            // A file where a folder was expected on the way.
            Errno::ENOTDIR => TenantFileError::NotRegular {
                path,
                kind: "a file where a folder should be",
            },
            e => TenantFileError::Io {
                path,
                source: std::io::Error::from(e),
            },
        }
    }
}

/// The name a `FileStat`'s type has in messages.
fn kind_of(stat: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a folder",
        SFlag::S_IFLNK => "a link",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        _ => "of an unknown kind",
    }
}

/// `stat` is of a regular file.
pub(crate) fn is_regular(stat: &FileStat) -> bool {
    is(stat, SFlag::S_IFREG)
}

fn is(stat: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == kind
}

/// The components of `rel`, which must be relative and plain (no `..`, no root): a caller's
/// mistake otherwise, never the tenant's (callers pass names they made).
fn components(rel: &Path) -> Result<Vec<&OsStr>, TenantFileError> {
    rel.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(TenantFileError::Io {
                path: rel.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a plain relative path",
                ),
            }),
        })
        .collect()
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// An open folder: what every path below it is opened relative to.
#[derive(Debug)]
pub(crate) struct DirHandle {
    fd: OwnedFd,
    /// For messages only: the path it was reached by.
    path: PathBuf,
}

impl DirHandle {
    /// The folder at `path`, the worker's own path (a checkout, an agent folder): its last
    /// component must not be a link either.
    pub(crate) fn open(path: &Path) -> Result<DirHandle, TenantFileError> {
        let fd = openat(nix::fcntl::AT_FDCWD, path, DIR_FLAGS, Mode::empty()).map_err(|e| {
            let link = e == Errno::ENOTDIR
                && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            TenantFileError::at(path.to_owned(), if link { Errno::ELOOP } else { e })
        })?;
        Ok(DirHandle {
            fd,
            path: path.to_owned(),
        })
    }

    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The folder `rel` below this one, no link followed on the way.
    pub(crate) fn open_dir(&self, rel: &Path) -> Result<DirHandle, TenantFileError> {
        let mut here = DirHandle {
            fd: self.fd.try_clone().map_err(|source| TenantFileError::Io {
                path: self.path.clone(),
                source,
            })?,
            path: self.path.clone(),
        };
        for name in components(rel)? {
            here = here.child_dir(name)?;
        }
        Ok(here)
    }

    fn child_dir(&self, name: &OsStr) -> Result<DirHandle, TenantFileError> {
        let path = self.path.join(name);
        let fd = openat(&self.fd, name, DIR_FLAGS, Mode::empty()).map_err(|e| {
            // O_DIRECTORY | O_NOFOLLOW on a link says ENOTDIR: tell a link from a file.
            let link = e == Errno::ENOTDIR
                && matches!(self.stat(name), Ok(Some(stat)) if is(&stat, SFlag::S_IFLNK));
            TenantFileError::at(path.clone(), if link { Errno::ELOOP } else { e })
        })?;
        Ok(DirHandle { fd, path })
    }

    /// The folder `rel` below this one, made where missing (`mode`, then owned by `owner`
    /// when given), no link followed on the way.
    pub(crate) fn create_dirs(
        &self,
        rel: &Path,
        mode: u32,
        owner: Option<u32>,
    ) -> Result<DirHandle, TenantFileError> {
        let mut here = self.open_dir(Path::new(""))?;
        for name in components(rel)? {
            let path = here.path.join(name);
            match mkdirat(&here.fd, name, Mode::from_bits_truncate(mode)) {
                Ok(()) => {
                    let made = here.child_dir(name)?;
                    if let Some(uid) = owner {
                        made.chown(uid)?;
                    }
                    here = made;
                }
                Err(Errno::EEXIST) => here = here.child_dir(name)?,
                Err(e) => return Err(TenantFileError::at(path, e)),
            }
        }
        Ok(here)
    }

    /// The folder itself becomes `uid`'s (user and group).
    pub(crate) fn chown(&self, uid: u32) -> Result<(), TenantFileError> {
        fchown(&self.fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))
            .map_err(|e| TenantFileError::at(self.path.clone(), e))
    }

    /// The folder itself gets the mode bits `bits` added (by handle: whatever its path now
    /// leads to is not touched).
    pub(crate) fn add_mode(&self, bits: u32) -> Result<(), TenantFileError> {
        let io = |e| TenantFileError::at(self.path.clone(), e);
        let mode = fstat(&self.fd).map_err(io)?.st_mode & 0o7777;
        if mode & bits != bits {
            nix::sys::stat::fchmod(&self.fd, Mode::from_bits_truncate(mode | bits)).map_err(io)?;
        }
        Ok(())
    }

    /// What `name` is (not following a link there); `None` when nothing is.
    pub(crate) fn stat(&self, name: &OsStr) -> Result<Option<FileStat>, TenantFileError> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(TenantFileError::at(self.path.join(name), e)),
        }
    }

    /// The bytes of the regular file `rel`, at most `max` of them; `Ok(None)` when it does not
    /// exist. A link on the way, a file of another kind, or one larger than `max` is refused.
    pub(crate) fn read(&self, rel: &Path, max: u64) -> Result<Option<Vec<u8>>, TenantFileError> {
        let names = components(rel)?;
        let Some((last, folders)) = names.split_last() else {
            return Err(TenantFileError::NotRegular {
                path: self.path.clone(),
                kind: "a folder",
            });
        };
        let mut here = self.open_dir(Path::new(""))?;
        for name in folders {
            here = match here.child_dir(name) {
                Err(e) if e.is_not_found() => return Ok(None),
                other => other?,
            };
        }
        let path = here.path.join(last);
        // O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOCTTY: a terminal device
        // never becomes the worker's.
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let fd = match openat(&here.fd, *last, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(TenantFileError::at(path, e)),
        };
        let stat = fstat(&fd).map_err(|e| TenantFileError::at(path.clone(), e))?;
        if !is(&stat, SFlag::S_IFREG) {
            return Err(TenantFileError::NotRegular {
                path,
                kind: kind_of(&stat),
            });
        }
        if stat.st_size as u64 > max {
            return Err(TenantFileError::TooBig { path, max });
        }
        // The size said is not trusted either (procfs says 0, a file may grow while read).
        let mut bytes = Vec::with_capacity(stat.st_size as usize);
        std::fs::File::from(fd)
            .take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| TenantFileError::Io {
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > max {
            return Err(TenantFileError::TooBig { path, max });
        }
        Ok(Some(bytes))
    }

    /// Put `bytes` in place as the file `name` of this folder, owned by `owner` when given
    /// (mode 0600): written under `{name}{tmp_suffix}` (whatever was there is removed first, a
    /// planted link included, and the new file is made exclusively, never through a link), then
    /// renamed over `name` (which replaces a link there, never writes through it).
    pub(crate) fn replace_file(
        &self,
        name: &OsStr,
        tmp_suffix: &str,
        bytes: &[u8],
        owner: Option<u32>,
    ) -> Result<(), TenantFileError> {
        let mut tmp = OsString::from(name);
        tmp.push(tmp_suffix);
        let tmp_path = self.path.join(&tmp);
        match unlinkat(&self.fd, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(TenantFileError::at(tmp_path, e)),
        }
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            &self.fd,
            tmp.as_os_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| TenantFileError::at(tmp_path.clone(), e))?;
        if let Some(uid) = owner {
            fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))
                .map_err(|e| TenantFileError::at(tmp_path.clone(), e))?;
        }
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|source| TenantFileError::Io {
                path: tmp_path.clone(),
                source,
            })?;
        renameat(&self.fd, tmp.as_os_str(), &self.fd, name)
            .map_err(|e| TenantFileError::at(self.path.join(name), e))
    }

    /// Visit every entry below this folder (not this folder itself), depth first, never
    /// following a link: `visit(folder, name, what it is)`. A top-level name in `skip` is
    /// neither visited nor entered. A folder that is gone, or is no longer a folder, by the time
    /// it would be entered is passed over (the tenant may be changing its tree meanwhile).
    pub(crate) fn walk(
        &self,
        skip: &[&OsStr],
        visit: &mut dyn FnMut(&DirHandle, &OsStr, &FileStat) -> Result<(), TenantFileError>,
    ) -> Result<(), TenantFileError> {
        self.walk_at(0, skip, visit)
    }

    fn walk_at(
        &self,
        depth: usize,
        skip: &[&OsStr],
        visit: &mut dyn FnMut(&DirHandle, &OsStr, &FileStat) -> Result<(), TenantFileError>,
    ) -> Result<(), TenantFileError> {
        if depth >= MAX_DEPTH {
            return Err(TenantFileError::TooDeep {
                path: self.path.clone(),
            });
        }
        for name in self.names()? {
            if depth == 0 && skip.contains(&name.as_os_str()) {
                continue;
            }
            let Some(stat) = self.stat(&name)? else {
                continue;
            };
            visit(self, &name, &stat)?;
            if is(&stat, SFlag::S_IFDIR) {
                match self.child_dir(&name) {
                    Ok(child) => child.walk_at(depth + 1, skip, visit)?,
                    // Swapped for a link or a file, or removed, since: not entered.
                    Err(TenantFileError::Link { .. } | TenantFileError::NotRegular { .. }) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The names in this folder (without `.` and `..`).
    fn names(&self) -> Result<Vec<OsString>, TenantFileError> {
        let io = |e| TenantFileError::at(self.path.clone(), e);
        // A handle of its own for the listing: reading a folder moves its handle's position.
        let fd = openat(&self.fd, ".", DIR_FLAGS, Mode::empty()).map_err(io)?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(io)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_owned());
            }
        }
        Ok(names)
    }

    /// `name` (in this folder) becomes `uid`'s, user and group; a link itself, never what it
    /// points to.
    pub(crate) fn chown_entry(&self, name: &OsStr, uid: u32) -> Result<(), TenantFileError> {
        match fchownat(
            &self.fd,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(uid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            // Removed since it was listed.
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(TenantFileError::at(self.path.join(name), e)),
        }
    }
}

impl DirHandle {
    /// Remove `name` from this folder, a folder with all it holds: by handle, links removed
    /// and never followed. Nothing there is fine.
    pub(crate) fn remove_entry(&self, name: &OsStr) -> Result<(), TenantFileError> {
        self.remove_at(0, name)
    }

    fn remove_at(&self, depth: usize, name: &OsStr) -> Result<(), TenantFileError> {
        let Some(stat) = self.stat(name)? else {
            return Ok(());
        };
        if is(&stat, SFlag::S_IFDIR) {
            if depth >= MAX_DEPTH {
                return Err(TenantFileError::TooDeep {
                    path: self.path.join(name),
                });
            }
            match self.child_dir(name) {
                Ok(child) => {
                    for inner in child.names()? {
                        child.remove_at(depth + 1, &inner)?;
                    }
                }
                // Swapped for something else since: removed below as what it is now.
                Err(TenantFileError::Link { .. } | TenantFileError::NotRegular { .. }) => {}
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e),
            }
            match unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => return Ok(()),
                // It is no folder any more: removed as a file below.
                Err(Errno::ENOTDIR) => {}
                Err(e) => return Err(TenantFileError::at(self.path.join(name), e)),
            }
        }
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(TenantFileError::at(self.path.join(name), e)),
        }
    }

    /// Where the link `name` of this folder points (`None`: it is not a link, or not there).
    pub(crate) fn link_target(&self, name: &OsStr) -> Option<PathBuf> {
        nix::fcntl::readlinkat(&self.fd, name)
            .ok()
            .map(PathBuf::from)
    }

    /// A new link `name` in this folder, pointing at `target`.
    pub(crate) fn make_link(&self, target: &Path, name: &OsStr) -> Result<(), TenantFileError> {
        nix::unistd::symlinkat(target, &self.fd, name)
            .map_err(|e| TenantFileError::at(self.path.join(name), e))
    }

    /// The names in this folder (without `.` and `..`), each with what it is (not following a
    /// link); a name gone since the listing is left out.
    pub(crate) fn entries(&self) -> Result<Vec<(OsString, FileStat)>, TenantFileError> {
        let mut found = Vec::new();
        for name in self.names()? {
            if let Some(stat) = self.stat(&name)? {
                found.push((name, stat));
            }
        }
        Ok(found)
    }
}

/// `stat` is of a folder.
pub(crate) fn is_dir(stat: &FileStat) -> bool {
    is(stat, SFlag::S_IFDIR)
}

/// `stat` is of a link.
pub(crate) fn is_link(stat: &FileStat) -> bool {
    is(stat, SFlag::S_IFLNK)
}

impl AsFd for DirHandle {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Read the regular file `name` of the folder at `dir` (the worker's own path), as
/// `DirHandle::read` does; `Ok(None)` when the folder or the file does not exist.
pub(crate) fn read_in(
    dir: &Path,
    name: &Path,
    max: u64,
) -> Result<Option<Vec<u8>>, TenantFileError> {
    match DirHandle::open(dir) {
        Ok(handle) => handle.read(name, max),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The folder holding `rel`'s last component below `dir` (the worker's own path), opened by
/// handle with no link followed on the way, and that last name; `Ok(None)` when `dir` or a
/// folder on the way does not exist.
fn parent_of<'a>(
    dir: &Path,
    rel: &'a Path,
) -> Result<Option<(DirHandle, &'a OsStr)>, TenantFileError> {
    let names = components(rel)?;
    let Some((last, folders)) = names.split_last() else {
        return Err(TenantFileError::Io {
            path: rel.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "an empty path"),
        });
    };
    let base = match DirHandle::open(dir) {
        Ok(handle) => handle,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let folder: PathBuf = folders.iter().collect();
    match base.open_dir(&folder) {
        Ok(parent) => Ok(Some((parent, last))),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// What `rel` below `dir` (the worker's own path) is, never following a link, neither on the
/// way (refused: `TenantFileError::Link`) nor at the end (a link there is reported as the
/// link); `Ok(None)` when nothing is there. The stat `std::fs::metadata` or `try_exists` would
/// do follows every link on the path.
pub(crate) fn stat_in(dir: &Path, rel: &Path) -> Result<Option<FileStat>, TenantFileError> {
    match parent_of(dir, rel)? {
        Some((parent, name)) => parent.stat(name),
        None => Ok(None),
    }
}

/// Remove `rel` below `dir` (the worker's own path), a folder with all it holds, by handle:
/// a link at the end is removed itself, a link on the way is refused (`TenantFileError::Link`)
/// and nothing behind it is touched. Nothing there is fine. `std::fs::remove_dir_all` would
/// follow every link on the way to the last component.
pub(crate) fn remove_in(dir: &Path, rel: &Path) -> Result<(), TenantFileError> {
    match parent_of(dir, rel)? {
        Some((parent, name)) => parent.remove_entry(name),
        None => Ok(()),
    }
}

/// Everything under `dir` (the worker's own path; not entering the top-level names in `skip`)
/// becomes `uid`'s, user and group, by handle: no link is followed, no folder swapped for a link
/// is entered.
pub(crate) fn give_tree(dir: &Path, uid: u32, skip: &[&OsStr]) -> Result<(), TenantFileError> {
    let handle = match DirHandle::open(dir) {
        Ok(handle) => handle,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    handle.walk(skip, &mut |folder, name, stat| {
        if stat.st_uid != uid || stat.st_gid != uid {
            folder.chown_entry(name, uid)?;
        }
        Ok(())
    })
}

/// Disk use (allocated blocks) of the files `uid` owns under `dir`, by handle, not following
/// links, not entering the top-level names in `skip`. What cannot be read counts as nothing (a
/// tenant's tree changes while it is added up).
pub(crate) fn bytes_of_uid(dir: &Path, uid: u32, skip: &[&OsStr]) -> u64 {
    let Ok(handle) = DirHandle::open(dir) else {
        return 0;
    };
    let mut total = 0;
    let _ = handle.walk(skip, &mut |_, _, stat| {
        if !is(stat, SFlag::S_IFDIR) && stat.st_uid == uid {
            total += stat.st_blocks as u64 * 512;
        }
        Ok(())
    });
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn folder() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn a_regular_file_is_read_and_a_missing_one_is_none() {
        let dir = folder();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/package.json"), b"{}").unwrap();
        let got = read_in(dir.path(), Path::new("sub/package.json"), 10).unwrap();
        assert_eq!(got.as_deref(), Some(&b"{}"[..]));
        assert_eq!(read_in(dir.path(), Path::new(".npmrc"), 10).unwrap(), None);
        assert_eq!(read_in(dir.path(), Path::new("nope/x"), 10).unwrap(), None);
        assert_eq!(
            read_in(&dir.path().join("gone"), Path::new("x"), 10).unwrap(),
            None
        );
    }

    #[test]
    fn links_anywhere_on_the_way_are_refused_not_followed() {
        let dir = folder();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "the worker's secret").unwrap();
        let site = dir.path().join("site");
        std::fs::create_dir(&site).unwrap();
        symlink(&secret, site.join(".npmrc")).unwrap();
        symlink("/proc/self/environ", site.join("environ")).unwrap();
        symlink(dir.path(), site.join("up")).unwrap();
        for name in [".npmrc", "environ", "up/secret"] {
            let err = read_in(&site, Path::new(name), 1 << 20).unwrap_err();
            assert!(
                matches!(err, TenantFileError::Link { .. }),
                "{name}: {err:?}"
            );
            assert!(err.is_refusal());
        }
        // A dangling link is a link too, not a missing file.
        symlink(dir.path().join("nothing"), site.join("dangling")).unwrap();
        assert!(matches!(
            read_in(&site, Path::new("dangling"), 10),
            Err(TenantFileError::Link { .. })
        ));
        // And the folder itself, reached by a link.
        symlink(&site, dir.path().join("site-link")).unwrap();
        assert!(matches!(
            read_in(&dir.path().join("site-link"), Path::new("x"), 10),
            Err(TenantFileError::Link { .. })
        ));
    }

    #[test]
    fn devices_fifos_and_giants_are_refused_without_blocking_or_reading_them() {
        let dir = folder();
        // A FIFO with no writer: opening it for reading without O_NONBLOCK would wait forever.
        nix::unistd::mkfifo(&dir.path().join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let err = read_in(dir.path(), Path::new("fifo"), 10).unwrap_err();
        assert!(
            matches!(err, TenantFileError::NotRegular { kind: "a FIFO", .. }),
            "{err:?}"
        );
        let err = read_in(Path::new("/dev"), Path::new("zero"), 10).unwrap_err();
        assert!(
            matches!(
                err,
                TenantFileError::NotRegular {
                    kind: "a character device",
                    ..
                }
            ),
            "{err:?}"
        );
        std::fs::write(dir.path().join("big"), vec![b'x'; 11]).unwrap();
        let err = read_in(dir.path(), Path::new("big"), 10).unwrap_err();
        assert!(
            matches!(err, TenantFileError::TooBig { max: 10, .. }),
            "{err:?}"
        );
        assert_eq!(
            read_in(dir.path(), Path::new("big"), 11)
                .unwrap()
                .unwrap()
                .len(),
            11
        );
        // A folder where a file is expected, and a file where a folder is.
        std::fs::create_dir(dir.path().join("d")).unwrap();
        assert!(matches!(
            read_in(dir.path(), Path::new("d"), 10),
            Err(TenantFileError::NotRegular { .. })
        ));
        assert!(matches!(
            read_in(dir.path(), Path::new("big/x"), 10),
            Err(TenantFileError::NotRegular { .. })
        ));
        // Only plain relative names.
        assert!(read_in(dir.path(), Path::new("../x"), 10).is_err());
        assert!(read_in(dir.path(), Path::new("/etc/passwd"), 10).is_err());
    }

    #[test]
    fn a_replaced_file_never_writes_through_a_link() {
        let dir = folder();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let agent = dir.path().join("agent");
        std::fs::create_dir(&agent).unwrap();
        // A link where the temporary file goes, and one where the file goes.
        symlink(&victim, agent.join("c.jsonl.restoring")).unwrap();
        symlink(&victim, agent.join("c.jsonl")).unwrap();
        let handle = DirHandle::open(&agent).unwrap();
        handle
            .replace_file(OsStr::new("c.jsonl"), ".restoring", b"restored", None)
            .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let meta = std::fs::symlink_metadata(agent.join("c.jsonl")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(agent.join("c.jsonl")).unwrap(), b"restored");
        assert!(!agent.join("c.jsonl.restoring").exists());
        // Folders made on the way refuse links too.
        symlink(dir.path(), agent.join("projects")).unwrap();
        assert!(matches!(
            handle.create_dirs(Path::new("projects/x"), 0o700, None),
            Err(TenantFileError::Link { .. })
        ));
        let made = handle.create_dirs(Path::new("p/q"), 0o700, None).unwrap();
        assert_eq!(made.path(), agent.join("p/q"));
        assert!(agent.join("p/q").is_dir());
    }

    #[test]
    fn a_walk_stays_in_its_tree() {
        let dir = folder();
        let tree = dir.path().join("tree");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::create_dir_all(outside.join("deep")).unwrap();
        std::fs::write(tree.join("a/b/f"), vec![0u8; 8192]).unwrap();
        std::fs::write(outside.join("deep/g"), vec![0u8; 1 << 20]).unwrap();
        symlink(&outside, tree.join("a/link")).unwrap();
        std::fs::create_dir(tree.join(".git")).unwrap();
        std::fs::write(tree.join(".git/h"), "x").unwrap();
        let mut seen = Vec::new();
        DirHandle::open(&tree)
            .unwrap()
            .walk(&[OsStr::new(".git")], &mut |folder, name, _| {
                seen.push(folder.path().join(name));
                Ok(())
            })
            .unwrap();
        seen.sort();
        assert_eq!(seen, ["a", "a/b", "a/b/f", "a/link"].map(|p| tree.join(p)));
        let me = nix::unistd::geteuid().as_raw();
        let counted = bytes_of_uid(&tree, me, &[OsStr::new(".git")]);
        assert!((8192..(1 << 20)).contains(&counted), "{counted}");
    }

    /// Needs root (as the worker): ownership moves by handle, links themselves only.
    #[test]
    fn give_tree_changes_links_not_what_they_point_to() {
        let dir = folder();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a")).unwrap();
        std::fs::write(tree.join("a/f"), "x").unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "x").unwrap();
        symlink(&outside, tree.join("a/link")).unwrap();
        give_tree(&tree, 4_000_123, &[]).unwrap();
        let meta = |p: &Path| std::fs::symlink_metadata(p).unwrap();
        assert_eq!(meta(&tree.join("a/f")).uid(), 4_000_123);
        assert_eq!(meta(&tree.join("a/link")).uid(), 4_000_123);
        assert_eq!(meta(&outside).uid(), 0);
    }

    /// A checkout whose `site` is a link to a folder outside (the tenant's doing), and that
    /// outside folder, holding `out/keep` and `node_modules/`.
    fn linked_parent() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = folder();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("out")).unwrap();
        std::fs::create_dir_all(outside.join("node_modules")).unwrap();
        std::fs::write(outside.join("out/keep"), "not the tenant's").unwrap();
        let checkout = dir.path().join("checkout");
        std::fs::create_dir(&checkout).unwrap();
        symlink(&outside, checkout.join("site")).unwrap();
        symlink(outside.join("node_modules"), checkout.join("node_modules")).unwrap();
        (dir, checkout, outside)
    }

    #[test]
    fn stat_in_follows_no_link_on_the_way_or_at_the_end() {
        let (_dir, checkout, _outside) = linked_parent();
        // The old `metadata`/`try_exists` by path said: a folder, and it exists.
        assert!(
            std::fs::metadata(checkout.join("node_modules"))
                .unwrap()
                .is_dir()
        );
        let at_end = stat_in(&checkout, Path::new("node_modules"))
            .unwrap()
            .unwrap();
        assert!(is_link(&at_end), "a link at the end is the link itself");
        let err = stat_in(&checkout, Path::new("site/out/keep")).unwrap_err();
        assert!(matches!(err, TenantFileError::Link { .. }), "{err}");
        assert!(stat_in(&checkout, Path::new("gone/x")).unwrap().is_none());
        assert!(
            stat_in(&checkout.join("gone"), Path::new("x"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn remove_in_never_removes_behind_a_link() {
        let (_dir, checkout, outside) = linked_parent();
        let err = remove_in(&checkout, Path::new("site/out")).unwrap_err();
        assert!(matches!(err, TenantFileError::Link { .. }), "{err}");
        assert!(
            outside.join("out/keep").is_file(),
            "removed through the link"
        );
        // A link at the end goes, what it points to stays.
        remove_in(&checkout, Path::new("node_modules")).unwrap();
        assert!(std::fs::symlink_metadata(checkout.join("node_modules")).is_err());
        assert!(outside.join("node_modules").is_dir());
        // A real nested folder goes with all it holds; nothing there is fine.
        std::fs::create_dir_all(checkout.join("a/out/x")).unwrap();
        std::fs::write(checkout.join("a/out/x/f"), "x").unwrap();
        remove_in(&checkout, Path::new("a/out")).unwrap();
        assert!(!checkout.join("a/out").exists() && checkout.join("a").is_dir());
        remove_in(&checkout, Path::new("a/out")).unwrap();
        remove_in(&checkout, Path::new("none/out")).unwrap();
    }
}
