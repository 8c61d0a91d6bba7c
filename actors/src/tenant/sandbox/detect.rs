//! What the host allows, found at start: separate users (root), namespaces (a bubblewrap probe
//! as `nobody`), or both; refused when `ISOLATION` asks for more than that, and recorded.

#[allow(clippy::wildcard_imports)] // the sandbox's shared types and imports
use super::*;

impl Sandbox {
    /// Find out what this host allows and set up the root for it. `read_only`: folders every
    /// run must see but not change (the dependency store).
    pub(crate) async fn detect(
        setting: IsolationSetting,
        limits: Limits,
        root: &Path,
        read_only: Vec<PathBuf>,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        if setting == IsolationSetting::None {
            tracing::warn!(
                "ISOLATION=none: every tenant's agent, install and build runs as the worker's own \
                 user, and can read the worker's secrets and every other workspace"
            );
            record_isolation(Isolation::NONE);
            return Ok(Sandbox::off(root));
        }
        tokio::fs::create_dir_all(root).await.map_err(io_at(root))?;
        let root = tokio::fs::canonicalize(root).await.map_err(io_at(root))?;
        let can_switch_users = nix::unistd::geteuid().is_root();
        let probe_uid = can_switch_users.then_some(PROBE_UID);
        let namespaces = probe_namespaces(probe_uid).await;
        let want_users = matches!(
            setting,
            IsolationSetting::Users | IsolationSetting::UsersAndNamespaces
        );
        let want_namespaces = matches!(
            setting,
            IsolationSetting::Namespaces | IsolationSetting::UsersAndNamespaces
        );
        // What an explicit setting asks for is what it gets, or the worker does not start.
        let asked = Isolation {
            separate_users: want_users,
            namespaces: want_namespaces,
        };
        let not_possible = |why: String| SandboxError::NotPossible {
            asked: asked.to_string(),
            why,
        };
        if want_users && !can_switch_users {
            return Err(not_possible(
                "the worker is not root, so it cannot run code as other users".into(),
            ));
        }
        if want_namespaces && let Err(why) = &namespaces {
            return Err(not_possible(why.clone()));
        }
        let isolation = if setting == IsolationSetting::Auto {
            Isolation {
                separate_users: can_switch_users,
                namespaces: namespaces.is_ok(),
            }
        } else {
            asked
        };
        if isolation.is_none() {
            return Err(SandboxError::Unavailable {
                why: format!(
                    "the worker is not root, and namespaces failed ({})",
                    namespaces.err().unwrap_or_default()
                ),
            });
        }
        let sandbox = Arc::new(Sandbox::with(isolation, limits, &root, read_only));
        if isolation.separate_users {
            let s = sandbox.clone();
            blocking(move || s.prepare_root()).await?;
        }
        tracing::info!(
            isolation = %isolation,
            namespaces_probe = namespaces.as_ref().err().map(String::as_str).unwrap_or("ok"),
            "tenants' code runs isolated"
        );
        record_isolation(isolation);
        Ok(sandbox)
    }
}

/// `edit_worker.isolation`: 1 for the level in force, said once, where the log says it at start
/// (the gauge keeps its last value, so every export carries it).
pub(super) fn record_isolation(isolation: Isolation) {
    crate::telemetry::metrics::metrics().isolation.record(
        1,
        &[opentelemetry::KeyValue::new("level", isolation.to_string())],
    );
}

/// bubblewrap's namespaces for a run: its own user, PID, IPC, UTS (and cgroup, where it can)
/// namespaces, the network shared (the agent needs its API, npm its registry), the host's files
/// read-only, its own `/dev` and `/proc`, and the run dies with its parent.
pub(super) const BWRAP_NAMESPACES: &[&str] = &[
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
    "--share-net",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--dev",
    "/dev",
    "--proc",
    "/proc",
];

/// Can unprivileged namespaces be made here (as `uid`, when the worker can switch to it)?
pub(super) async fn probe_namespaces(uid: Option<u32>) -> Result<(), String> {
    let mut cmd = Command::new("bwrap");
    // What every run asks of bubblewrap, so that a probe that passes means runs can start.
    cmd.args(BWRAP_NAMESPACES)
        .args(["--tmpfs", "/tmp", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid).current_dir("/");
    }
    match tokio::time::timeout(std::time::Duration::from_secs(10), cmd.output()).await {
        Err(_) => Err("bwrap did not finish in 10 s".into()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("bubblewrap (bwrap) is not installed".into())
        }
        Ok(Err(e)) => Err(format!("bwrap could not be started: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "bwrap failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}
