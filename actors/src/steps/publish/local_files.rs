//! The build on disk as the publisher reads it: walked without following links, checked
//! against the size caps before anything is read, and each file hashed as it is streamed (its
//! MD5 and, for large files, the multipart ETag S3 will report).

#[allow(clippy::wildcard_imports)] // the publisher's shared types and imports
use super::*;

/// What the scan of a build needs from the options: where multipart starts, and the caps.
#[derive(Debug, Clone, Copy)]
pub(super) struct ScanLimits {
    multipart_threshold: u64,
    part_size: u64,
    max_file_bytes: u64,
    max_total_bytes: u64,
}

impl ScanLimits {
    pub(super) fn of(options: &PublishOptions) -> ScanLimits {
        ScanLimits {
            multipart_threshold: options.multipart_threshold,
            part_size: options.part_size,
            max_file_bytes: options.max_file_bytes,
            max_total_bytes: options.max_total_bytes,
        }
    }
}

/// A regular file of the build as the walk found it, before it is read.
#[derive(Debug)]
pub(super) struct FoundFile {
    key: String,
    path: PathBuf,
    size: u64,
}

/// Every regular file under `root`, with its key and MD5. The caps are checked on the sizes
/// first, so a build over them is refused before a byte of it is read; then each file is
/// hashed in chunks.
pub(super) fn scan_build(root: &Path, limits: &ScanLimits) -> Result<Vec<LocalFile>, PublishError> {
    let found = walk_build(root)?;
    check_limits(&found, limits)?;
    let files = found
        .into_iter()
        .map(|file| hash_file(file, limits))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(files)
}

/// Every regular file under `root`, sorted by key. Symlinks are skipped, never followed, so a
/// link to `/etc/passwd` (or to anything outside the build) is never published.
pub(super) fn walk_build(root: &Path) -> std::io::Result<Vec<FoundFile>> {
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        // A symlinked or missing output folder counts as no build at all.
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_symlink() {
                tracing::warn!(path = %path.display(), "symlink in the build folder is not published");
            } else if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let rel = path.strip_prefix(root).expect("under root");
                let Some(key) = rel.to_str().map(|s| s.replace('\\', "/")) else {
                    tracing::warn!(path = %path.display(), "file name is not UTF-8; not published");
                    continue;
                };
                // The entry's own metadata: a symlink is never followed here either.
                let size = entry.metadata()?.len();
                files.push(FoundFile { key, path, size });
            }
        }
    }
    // Sorted, so that the file named by a refusal is the same at every try.
    files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(files)
}

/// Refuse a build with a file over `max_file_bytes`, or over `max_total_bytes` in all.
pub(super) fn check_limits(found: &[FoundFile], limits: &ScanLimits) -> Result<(), PublishError> {
    let mut total: u64 = 0;
    for file in found {
        if file.size > limits.max_file_bytes {
            return Err(PublishError::FileTooLarge {
                key: file.key.clone(),
                size: file.size,
                max: limits.max_file_bytes,
            });
        }
        total = total.saturating_add(file.size);
        if total > limits.max_total_bytes {
            return Err(PublishError::BuildTooLarge {
                key: file.key.clone(),
                total,
                max: limits.max_total_bytes,
            });
        }
    }
    Ok(())
}

/// Hash one file in chunks, reading exactly the size the walk saw (which the caps were checked
/// against): a file that changed size since is an error, not a silently different upload.
pub(super) fn hash_file(file: FoundFile, limits: &ScanLimits) -> std::io::Result<LocalFile> {
    let multipart = file.size >= limits.multipart_threshold;
    let mut digests = Digests::new(multipart.then_some(limits.part_size));
    // O_NOFOLLOW: the walk saw a regular file here; a link put in its place since is refused.
    let opened = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&file.path)?
    };
    let mut reader = opened.take(file.size);
    let read = std::io::copy(&mut reader, &mut digests)?;
    let grew = reader.into_inner().read(&mut [0u8; 1])? > 0;
    if read != file.size || grew {
        return Err(std::io::Error::other(format!(
            "{} changed while it was read",
            file.path.display()
        )));
    }
    let (md5_hex, multipart_etag) = digests.finish();
    Ok(LocalFile {
        key: file.key,
        path: file.path,
        md5_hex,
        multipart_etag,
        size: file.size,
    })
}

/// The MD5s of a file written into it chunk by chunk (it is an `io::Write`, fed by
/// `io::copy`): of the whole file, and, for a file uploaded in parts, of each part, from which
/// the ETag S3 gives a multipart upload follows.
pub(super) struct Digests {
    whole: Md5,
    parts: Option<PartDigests>,
}

/// The running MD5s of the parts of a multipart upload.
pub(super) struct PartDigests {
    part_size: u64,
    current: Md5,
    /// Bytes in `current` so far.
    filled: u64,
    /// The finished parts' digests, one after the other: S3's ETag is their MD5.
    finished: Vec<u8>,
    count: usize,
}

impl Digests {
    /// `part_size`: the parts of a multipart upload, `None` for a single-part one.
    pub(super) fn new(part_size: Option<u64>) -> Digests {
        Digests {
            whole: Md5::new(),
            parts: part_size.map(|part_size| PartDigests {
                part_size: part_size.max(1),
                current: Md5::new(),
                filled: 0,
                finished: Vec::new(),
                count: 0,
            }),
        }
    }

    /// The file's MD5 (hex) and, for a multipart upload, its ETag.
    pub(super) fn finish(self) -> (String, Option<String>) {
        let md5 = format!("{:x}", self.whole.finalize());
        (md5, self.parts.map(PartDigests::etag))
    }
}

impl Write for Digests {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Never past the end of the current part: `write_all` hands the rest in again.
        let taken = match &mut self.parts {
            Some(parts) => parts.feed(buf),
            None => buf.len(),
        };
        self.whole.update(&buf[..taken]);
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PartDigests {
    /// Hash as much of `buf` as the current part has room for; returns how much.
    pub(super) fn feed(&mut self, buf: &[u8]) -> usize {
        let room = self.part_size - self.filled;
        let taken = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.current.update(&buf[..taken]);
        self.filled += taken as u64;
        if self.filled == self.part_size {
            self.close_part();
        }
        taken
    }

    pub(super) fn close_part(&mut self) {
        let part = std::mem::replace(&mut self.current, Md5::new());
        self.finished.extend_from_slice(&part.finalize());
        self.count += 1;
        self.filled = 0;
    }

    /// The MD5 of the parts' MD5s, then `-{parts}`.
    pub(super) fn etag(mut self) -> String {
        if self.filled > 0 {
            self.close_part();
        }
        format!("{:x}-{}", Md5::digest(&self.finished), self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_file_bytes: u64, max_total_bytes: u64) -> ScanLimits {
        ScanLimits {
            max_file_bytes,
            max_total_bytes,
            ..ScanLimits::of(&PublishOptions::default())
        }
    }

    /// Stream `bytes` through the digests in chunks of `chunk` bytes.
    fn digests_of(bytes: &[u8], part_size: Option<u64>, chunk: usize) -> (String, Option<String>) {
        let mut digests = Digests::new(part_size);
        for piece in bytes.chunks(chunk) {
            digests.write_all(piece).unwrap();
        }
        digests.finish()
    }

    #[test]
    fn multipart_etag_is_md5_of_part_md5s() {
        // Two parts of 5 bytes and one of 1: the digest of the three digests, then "-3".
        let mut digests = Vec::new();
        for part in [&b"aaaaa"[..], b"bbbbb", b"c"] {
            digests.extend_from_slice(&Md5::digest(part));
        }
        let expected = format!("{:x}-3", Md5::digest(&digests));
        // However the bytes arrive, the parts are cut at the same places.
        for chunk in [1, 3, 5, 7, 64] {
            let (md5, etag) = digests_of(b"aaaaabbbbbc", Some(5), chunk);
            assert_eq!(etag.as_deref(), Some(expected.as_str()), "chunk {chunk}");
            assert_eq!(md5, format!("{:x}", Md5::digest(b"aaaaabbbbbc")));
        }
        // A file of whole parts has no empty last part.
        let (_, etag) = digests_of(b"aaaaabbbbb", Some(5), 4);
        assert!(etag.unwrap().ends_with("-2"));
        assert_eq!(digests_of(b"abc", None, 2).1, None);
    }

    #[test]
    fn a_file_is_hashed_as_streamed_chunks_and_must_keep_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        // Larger than io::copy's buffer, and not a multiple of it.
        let bytes: Vec<u8> = (0..200_003u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let found = |size| FoundFile {
            key: "big.bin".into(),
            path: path.clone(),
            size,
        };
        let file = hash_file(found(bytes.len() as u64), &limits(u64::MAX, u64::MAX)).unwrap();
        assert_eq!(file.md5_hex, format!("{:x}", Md5::digest(&bytes)));
        // The walk saw it smaller, or larger, than it is now: an error either way.
        assert!(hash_file(found(100), &limits(u64::MAX, u64::MAX)).is_err());
        assert!(hash_file(found(300_000), &limits(u64::MAX, u64::MAX)).is_err());
    }

    #[test]
    fn the_caps_name_the_file_and_allow_exactly_the_limit() {
        let found = |sizes: &[(&str, u64)]| -> Vec<FoundFile> {
            sizes
                .iter()
                .map(|(key, size)| FoundFile {
                    key: (*key).into(),
                    path: PathBuf::from(key),
                    size: *size,
                })
                .collect()
        };
        let build = found(&[("a.css", 40), ("b.png", 60), ("c.html", 10)]);
        assert!(check_limits(&build, &limits(60, 110)).is_ok());
        let err = check_limits(&build, &limits(59, 110)).unwrap_err();
        assert!(
            matches!(&err, PublishError::FileTooLarge { key, size: 60, max: 59 } if key == "b.png"),
            "{err}"
        );
        assert_eq!(err.kind(), "build_too_large");
        let err = check_limits(&build, &limits(60, 109)).unwrap_err();
        assert!(
            matches!(&err, PublishError::BuildTooLarge { key, total: 110, max: 109 } if key == "c.html"),
            "{err}"
        );
        assert!(err.to_string().contains("PUBLISH_MAX_BYTES"), "{err}");
        assert!(err.would_repeat());
    }

    #[test]
    fn an_oversized_build_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dist");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), "hi").unwrap();
        let big = std::fs::File::create(root.join("huge.bin")).unwrap();
        // Sparse: a large file that costs no disk, and would take a while to hash.
        big.set_len(8 << 30).unwrap();
        let err = scan_build(&root, &limits(100 << 20, 1 << 30)).unwrap_err();
        assert!(
            matches!(&err, PublishError::FileTooLarge { key, .. } if key == "huge.bin"),
            "{err}"
        );
    }

    #[test]
    fn scan_skips_symlinks_and_finds_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dist");
        std::fs::create_dir_all(root.join("about")).unwrap();
        std::fs::write(root.join("index.html"), "hi").unwrap();
        std::fs::write(root.join("about/index.html"), "about").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        let all = limits(u64::MAX, u64::MAX);
        let keys: Vec<_> = scan_build(&root, &all)
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect();
        assert_eq!(keys, vec!["about/index.html", "index.html"]);
        // A symlinked output folder is no build.
        std::os::unix::fs::symlink(&root, dir.path().join("linked")).unwrap();
        assert!(
            scan_build(&dir.path().join("linked"), &all)
                .unwrap()
                .is_empty()
        );
    }
}
