//! One run's jail: the command that starts a process as the workspace's (or an install's) uid,
//! in bubblewrap namespaces where the host allows, under rlimits, with its own HOME and TMPDIR;
//! handing the checkout over to that uid and taking it back; ending what a run left behind.

#[allow(clippy::wildcard_imports)] // the sandbox's shared types and imports
use super::*;

/// Where one run of a tenant's code happens. Cheap to clone; made per run.
#[derive(Debug, Clone)]
pub(crate) struct Jail {
    /// `None`: no isolation, the run is the worker's own child.
    pub(super) sandbox: Option<Arc<Sandbox>>,
    /// The uid (and gid) it runs as; `None`: the worker's own.
    pub(super) uid: Option<u32>,
    pub(super) workdir: PathBuf,
    /// `HOME` (npm's cache, the CLI's own files), the tenant's and nobody else's.
    pub(super) home: PathBuf,
    /// `CLAUDE_CONFIG_DIR` of the workspace, when the run is the agent's.
    pub(super) agent_config_dir: Option<PathBuf>,
    /// What the run may write: bound into the namespaces, owned by its uid.
    pub(super) private: Vec<PathBuf>,
    /// A shared install's slot (`Sandbox::store_jail`): its uid and home are this install's
    /// alone while the lock is held, that is while any clone of the jail lives.
    pub(super) install_slot: Option<Arc<std::fs::File>>,
}

impl Jail {
    /// No isolation: the worker's own user, its own environment rules.
    pub(crate) fn open(workdir: &Path) -> Jail {
        Jail {
            sandbox: None,
            uid: None,
            workdir: workdir.to_owned(),
            home: PathBuf::new(),
            agent_config_dir: None,
            private: Vec::new(),
            install_slot: None,
        }
    }

    /// `SANDBOX_MAX_DISK_MB`, for messages.
    pub(crate) fn disk_limit_mb(&self) -> u64 {
        self.sandbox
            .as_ref()
            .map_or(0, |s| s.limits.disk_bytes >> 20)
    }

    /// A process of this jail lives on when another run of the same workspace ends. Not so
    /// with separate users but no namespaces: the end of every run ends all of its uid's
    /// processes (`sweep`, which does nothing exactly when this holds).
    pub(crate) fn outlives_other_runs(&self) -> bool {
        match &self.sandbox {
            Some(sandbox) => sandbox.isolation.namespaces || self.uid.is_none(),
            None => true,
        }
    }

    /// The uid its processes run as, when it is not the worker's.
    #[cfg(test)]
    pub(crate) fn uid(&self) -> Option<u32> {
        self.uid
    }

    /// A command for `program` that runs inside this jail, in `cwd`. The caller sets up the
    /// environment as for any child (`env_clear` and an allow-list), then adds `self.env()`.
    pub(crate) fn command(&self, program: impl AsRef<OsStr>, cwd: &Path) -> Command {
        let Some(sandbox) = &self.sandbox else {
            let mut cmd = Command::new(program);
            cmd.current_dir(cwd);
            return cmd;
        };
        let mut cmd = if sandbox.isolation.namespaces {
            let mut cmd = Command::new("bwrap");
            cmd.args(self.bwrap_args(sandbox, cwd))
                .arg("--")
                .arg(program);
            // bwrap itself starts from a folder every uid can enter.
            cmd.current_dir("/");
            cmd
        } else {
            let mut cmd = Command::new(program);
            cmd.current_dir(cwd);
            cmd
        };
        if let Some(uid) = self.uid {
            // std drops the supplementary groups (setgroups) when a root parent sets a uid.
            cmd.uid(uid).gid(uid);
        }
        let limits = sandbox.limits.clone();
        let own_uid = self.uid.is_some();
        // SAFETY: runs in the forked child before exec, after the uid change; it only calls
        // setrlimit(2), which is async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || apply_limits(&limits, own_uid));
        }
        cmd
    }

    pub(super) fn bwrap_args(&self, sandbox: &Sandbox, cwd: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = BWRAP_NAMESPACES.iter().map(OsString::from).collect();
        args.extend(["--size".into(), sandbox.limits.tmp_bytes.to_string().into()]);
        args.extend(["--tmpfs", "/tmp"].map(OsString::from));
        // A program that lives under /tmp (a checkout of this project there, with its agent)
        // stays visible, read-only: its top folder under /tmp is bound back first...
        let tmp = Path::new("/tmp");
        let mut shown: Vec<PathBuf> = Vec::new();
        for path in &sandbox.read_only {
            if let Ok(rest) = path.strip_prefix(tmp)
                && let Some(top) = rest.components().next()
            {
                let top = tmp.join(top);
                if !shown.contains(&top) && top.exists() {
                    args.extend([
                        OsString::from("--ro-bind"),
                        top.clone().into(),
                        top.clone().into(),
                    ]);
                    shown.push(top);
                }
            }
        }
        // ...then every workspace, record and home disappears; its own are bound back in.
        args.extend([OsString::from("--tmpfs"), sandbox.root.clone().into()]);
        for dir in &sandbox.read_only {
            if dir.is_dir() && dir.starts_with(&sandbox.root) {
                args.extend([
                    OsString::from("--ro-bind"),
                    dir.clone().into(),
                    dir.clone().into(),
                ]);
            }
        }
        for dir in &self.private {
            args.extend([
                OsString::from("--bind"),
                dir.clone().into(),
                dir.clone().into(),
            ]);
        }
        args.extend([OsString::from("--chdir"), cwd.into()]);
        args
    }

    /// What the run's environment must say about where it is: its own `HOME` and `TMPDIR`
    /// (and npm's cache in it), its own `CLAUDE_CONFIG_DIR`. Empty without isolation.
    pub(crate) fn env(&self) -> Vec<(OsString, OsString)> {
        let Some(sandbox) = &self.sandbox else {
            return Vec::new();
        };
        let tmp = if sandbox.isolation.namespaces {
            PathBuf::from("/tmp")
        } else {
            self.home.join("tmp")
        };
        let mut env = vec![
            ("HOME".into(), self.home.clone().into()),
            ("TMPDIR".into(), tmp.into()),
            ("npm_config_cache".into(), self.home.join(".npm").into()),
        ];
        if let Some(uid) = self.uid {
            env.push(("USER".into(), format!("tenant{uid}").into()));
        }
        if let Some(dir) = &self.agent_config_dir {
            env.push(("CLAUDE_CONFIG_DIR".into(), dir.clone().into()));
        }
        env
    }

    /// Give the tenant what the worker changed in its folders since (new files of a merge,
    /// the links of an install): they become its uid's. Call before each run.
    pub(crate) async fn hand_over(&self) -> Result<(), SandboxError> {
        if self.uid.is_none() {
            return Ok(());
        }
        let me = self.clone();
        blocking(move || me.hand_over_blocking()).await
    }

    pub(super) fn hand_over_blocking(&self) -> Result<(), SandboxError> {
        for dir in &self.private {
            std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        }
        let Some(uid) = self.uid else {
            return Ok(());
        };
        let root = self.sandbox.as_ref().map(|s| s.root.clone());
        for dir in &self.private {
            // The folders between the root and it: passable, not listable. Folders outside
            // the root (a store or agent folder elsewhere) are the operator's to set.
            let mut at = dir.parent();
            while let (Some(p), Some(root)) = (at, &root) {
                if p == root.as_path() || !p.starts_with(root) {
                    break;
                }
                let mode = std::fs::metadata(p).map_err(io_at(p))?.mode() & 0o7777;
                if mode & 0o711 != 0o711 || mode & 0o066 != 0 {
                    set_mode(p, (mode | 0o711) & !0o066)?;
                }
                at = p.parent();
            }
        }
        for dir in &self.private {
            if *dir == self.workdir && dir.join(".git").exists() {
                // root:{tenant} 3770: the tenant writes in it, nobody else enters it, and the
                // sticky bit keeps `.git` (the worker's, 0700) where it is.
                std::os::unix::fs::chown(dir, Some(0), Some(uid)).map_err(io_at(dir))?;
                set_mode(dir, 0o3770)?;
                let git = dir.join(".git");
                std::os::unix::fs::chown(&git, Some(0), Some(0)).map_err(io_at(&git))?;
                set_mode(&git, 0o700)?;
                tenant_fs::give_tree(dir, uid, &[OsStr::new(".git")])?;
            } else {
                std::os::unix::fs::chown(dir, Some(uid), Some(uid)).map_err(io_at(dir))?;
                set_mode(dir, 0o700)?;
                tenant_fs::give_tree(dir, uid, &[])?;
            }
        }
        Ok(())
    }

    /// After a run without namespaces: nothing it started may live on (a daemon that left the
    /// process group). Every process of its uid is killed; with namespaces the kernel does it.
    pub(crate) async fn sweep(&self) {
        if self.outlives_other_runs() {
            return;
        }
        let Some(uid) = self.uid else {
            return;
        };
        let mut cmd = Command::new("true");
        cmd.uid(uid)
            .gid(uid)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: kill(2) is async-signal-safe. kill(-1) as the tenant's uid reaches exactly
        // its processes (Linux spares the caller itself).
        unsafe {
            cmd.pre_exec(|| {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(-1),
                    nix::sys::signal::Signal::SIGKILL,
                );
                Ok(())
            });
        }
        if let Err(e) = cmd.status().await {
            tracing::warn!(uid, error = %e, "could not end what a tenant's run left behind");
        }
    }

    /// Take back what the store's install wrote (the worker makes it read-only for everyone),
    /// and remove the install's home: nothing of it is there for the next install.
    pub(crate) async fn take_back(&self) -> Result<(), SandboxError> {
        if self.sandbox.is_none() {
            return Ok(());
        }
        let (dir, home, uid) = (self.workdir.clone(), self.home.clone(), self.uid);
        let fresh_home = self.install_slot.is_some();
        blocking(move || {
            if fresh_home {
                remove_if_there(&home)?;
            }
            if uid.is_some() {
                std::os::unix::fs::chown(&dir, Some(0), Some(0)).map_err(io_at(&dir))?;
                // Every tenant's build reads it (the entry stays without write bits).
                set_mode(&dir, 0o755)?;
                tenant_fs::give_tree(&dir, 0, &[])?;
            }
            Ok(())
        })
        .await
    }
}

/// `own_uid`: the run has a uid of its own. `RLIMIT_NPROC` counts every process of the uid, so
/// it is set only then: on the worker's own uid it would count the worker and every tenant.
pub(super) fn apply_limits(limits: &Limits, own_uid: bool) -> std::io::Result<()> {
    use nix::sys::resource::{Resource, setrlimit};
    let set = |r: Resource, v: u64| setrlimit(r, v, v).map_err(std::io::Error::from);
    if own_uid {
        set(Resource::RLIMIT_NPROC, limits.processes)?;
    }
    set(Resource::RLIMIT_DATA, limits.memory_bytes)?;
    set(Resource::RLIMIT_FSIZE, limits.file_bytes)?;
    set(Resource::RLIMIT_CPU, limits.cpu_seconds)?;
    set(Resource::RLIMIT_CORE, 0)?;
    Ok(())
}
