//! The disk watch of a run: what the workspace's uid holds on disk is counted twice a second
//! while the run lasts, and a run past `SANDBOX_MAX_DISK_MB` is stopped.

#[allow(clippy::wildcard_imports)] // the sandbox's shared types and imports
use super::*;

/// How often a run's disk use is added up. A run writing at disk speed overshoots the limit by
/// at most this much time's worth; each file stays under `SANDBOX_MAX_FILE_MB` anyway.
pub(super) const DISK_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// A run's disk watch: ends (is aborted) when dropped.
#[derive(Debug)]
pub(crate) struct DiskWatch {
    task: tokio::task::JoinHandle<()>,
    exceeded: Arc<std::sync::atomic::AtomicBool>,
}

impl DiskWatch {
    /// The run wrote past the limit and its process group was killed.
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for DiskWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Jail {
    /// While the run in process group `pgid` lasts: add up what the workspace's uid has in its
    /// folders, and past `SANDBOX_MAX_DISK_MB` kill the group (a tenant filling the disk with
    /// many files, each under the file limit). `None` without a uid of its own.
    pub(crate) fn watch_disk(&self, pgid: Option<i32>) -> Option<DiskWatch> {
        let (Some(sandbox), Some(uid), Some(pgid)) = (&self.sandbox, self.uid, pgid) else {
            return None;
        };
        let max = sandbox.limits.disk_bytes;
        let dirs = self.private.clone();
        let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = exceeded.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(DISK_CHECK).await;
                let dirs = dirs.clone();
                let used = tokio::task::spawn_blocking(move || {
                    dirs.iter()
                        .map(|d| tenant_fs::bytes_of_uid(d, uid, &[OsStr::new(".git")]))
                        .sum::<u64>()
                })
                .await
                .unwrap_or(0);
                if used > max {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    // Counted before the kill, so that the run's end (and its message's) comes
                    // after it.
                    crate::telemetry::metrics::metrics()
                        .disk_limit_stops
                        .add(1, &[]);
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    tracing::warn!(
                        uid,
                        used_mb = used >> 20,
                        max_mb = max >> 20,
                        "a tenant's run wrote past its disk limit; stopped"
                    );
                    return;
                }
            }
        });
        Some(DiskWatch { task, exceeded })
    }
}
