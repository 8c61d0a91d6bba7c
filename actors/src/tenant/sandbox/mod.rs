//! Where a tenant's code runs: the agent, dependency installs and builds of one workspace.
//!
//! All of that is code none of us wrote (the site's scripts, its dependencies' install scripts,
//! whatever the request leads the agent to do), so it runs as a user of its own and, where the
//! host allows, in namespaces of its own:
//!
//! - **separate users** (the worker runs as root): each workspace gets a uid of its own,
//!   allocated once and kept in `{WORKSPACE_ROOT}/.sandbox/uids.json`. The checkout belongs to
//!   that uid, except `.git`, which stays the worker's (mode 0700: a tenant can neither read the
//!   remote's credentials nor plant hooks or configuration). The checkout folder is
//!   `root:{tenant gid}` with mode 3770: other uids cannot enter it, and the sticky bit keeps the
//!   tenant from renaming `.git` away. Another uid cannot read the worker's `/proc/*/environ`.
//! - **namespaces** (bubblewrap, where the kernel lets unprivileged users make them): its own PID
//!   view (the worker's processes do not exist for it, and nothing it starts outlives the run), a
//!   private `/tmp` of limited size, and `WORKSPACE_ROOT` replaced by an empty folder with only its
//!   own checkout, home and agent folder bound in (and the dependency store, read-only).
//! - **limits** (rlimits, set on every process it starts): processes (per uid, so a fork bomb
//!   stops there), data memory, size of one file, CPU seconds, open files, no core files.
//!
//! `ISOLATION` chooses: `auto` (default: the strongest the host allows, and an error at start
//! when it allows nothing), `users`, `namespaces`, `users+namespaces`, or `none` (an explicit,
//! logged opt-out). Network stays: the agent needs its API and npm its registry.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::process::Command;

pub use crate::config::{IsolationSetting, Limits};
use crate::contract::message::WorkspaceKey;
use crate::tenant::tenant_fs;

mod detect;
mod disk_watch;
mod jail;
mod uids;
use detect::BWRAP_NAMESPACES;
pub(crate) use disk_watch::DiskWatch;
pub(crate) use jail::Jail;

/// Each workspace root has a range of uids of its own, chosen at random once and kept in
/// `.sandbox/uid-range`: two roots on one host (two workers with their own disks, tests side
/// by side) must not share uids, or one's process limit and clean-up would reach the other's
/// tenants. Workers sharing one root (a shared volume) read the same range. The ranges start
/// far above a distribution's own users and stay below 2^31.
const RANGE_START: u32 = 1_000_000;
const RANGE_SIZE: u32 = 100_000;
const RANGES: u32 = 20_000;
/// Shared dependency installs at once, each as a uid of its own from the top of the range: a
/// dependency's install script is nobody's tenant, and one install must neither see what
/// another left behind nor be ended by another's clean-up (with separate users but no
/// namespaces, the end of a run kills every process of its uid). Installs run one per lock
/// file, while agents work; past this many at once, an install waits for a uid.
const INSTALL_UIDS: u32 = 64;
/// The browser's uid (`Sandbox::browser_jail`): just below the install uids, no workspace's.
const BROWSER_UID_OFFSET: u32 = RANGE_SIZE - 1 - INSTALL_UIDS;
/// How many workspaces one root can have uids for: the range, less the first uid (the store's
/// before installs had uids of their own, kept unused), the browser's and the install uids.
const MAX_TENANTS: u32 = RANGE_SIZE - 2 - INSTALL_UIDS;
/// Who probes for namespaces at start: `nobody`, a uid every system has.
const PROBE_UID: u32 = 65_534;

/// What is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isolation {
    /// Each workspace runs as a uid of its own.
    pub separate_users: bool,
    /// Each run is in namespaces of its own (bubblewrap).
    pub namespaces: bool,
}

impl Isolation {
    pub(crate) const NONE: Isolation = Isolation {
        separate_users: false,
        namespaces: false,
    };

    pub fn is_none(&self) -> bool {
        !self.separate_users && !self.namespaces
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.separate_users, self.namespaces) {
            (true, true) => "users+namespaces",
            (true, false) => "users",
            (false, true) => "namespaces",
            (false, false) => "none",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "this host cannot isolate tenants' code: {why}. Run the worker as root (separate users) \
         or where user namespaces are allowed (bubblewrap), or set ISOLATION=none to run every \
         tenant's code as the worker's own user"
    )]
    Unavailable { why: String },
    #[error("ISOLATION={asked} is not possible on this host: {why}")]
    NotPossible { asked: String, why: String },
    #[error("no uid is left for another workspace ({MAX_TENANTS} are taken)")]
    NoUidLeft,
    #[error("preparing the sandbox at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Handing a tenant's folder over (or back) by handle met what the worker does not follow.
    #[error("preparing the sandbox: {0}")]
    Tree(#[from] crate::tenant::tenant_fs::TenantFileError),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError + '_ {
    move |source| SandboxError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The sandbox of one worker: what the host allows, and the uids of the workspaces.
#[derive(Debug)]
pub struct Sandbox {
    isolation: Isolation,
    limits: Limits,
    /// `WORKSPACE_ROOT`, hidden as a whole inside namespaces.
    root: PathBuf,
    /// `{root}/.sandbox`: uids, homes. Only the worker reads it.
    state: PathBuf,
    /// What every run must see but not change: the dependency store (its links point there)
    /// and the programs it runs (the agent), wherever the namespaces would hide them.
    read_only: Vec<PathBuf>,
    /// Workspace -> uid, as read from or written to `uids.json`.
    uids: Mutex<BTreeMap<String, u32>>,
    /// The first uid of this root's range (`.sandbox/uid-range`), read at start.
    first_uid: std::sync::OnceLock<u32>,
    /// Which install slot an install waits for when all are taken (round robin).
    install_turn: std::sync::atomic::AtomicU64,
}

impl Sandbox {
    /// No isolation: what tests of other parts and `ISOLATION=none` use.
    pub(crate) fn off(root: &Path) -> Arc<Sandbox> {
        Arc::new(Sandbox::with(
            Isolation::NONE,
            Limits::default(),
            root,
            Vec::new(),
        ))
    }

    fn with(isolation: Isolation, limits: Limits, root: &Path, read_only: Vec<PathBuf>) -> Sandbox {
        Sandbox {
            isolation,
            limits,
            root: root.to_owned(),
            state: root.join(".sandbox"),
            read_only,
            uids: Mutex::new(BTreeMap::new()),
            first_uid: std::sync::OnceLock::new(),
            install_turn: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// What `run` (and `doctor`) detect for `config`: its `ISOLATION` and limits, with the
    /// dependency store (its links point there) and the agent's program kept visible.
    pub async fn for_config(
        config: &crate::config::WorkerConfig,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        let visible = std::iter::once(config.npm_store.dir_under(&config.workspace_root))
            .chain(program_files(&config.agent.bin))
            .collect();
        Sandbox::detect(
            config.isolation,
            config.sandbox_limits.clone(),
            &config.workspace_root,
            visible,
        )
        .await
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Where the agent of `key` keeps its conversations and settings (`CLAUDE_CONFIG_DIR`):
    /// `base` itself without isolation, a folder of the workspace's own under it with.
    pub(crate) fn agent_config_dir(&self, base: &Path, key: &WorkspaceKey) -> PathBuf {
        if self.isolation.is_none() {
            return base.to_owned();
        }
        base.join("workspaces")
            .join(&key.client_id)
            .join(&key.project_id)
    }

    /// The sandbox for a run in workspace `key` (checkout `workdir`; the agent's folder
    /// `agent_config_dir`, if it runs the agent): its uid allocated on first use, and the
    /// checkout, home and agent folder handed to that uid.
    pub(crate) async fn jail(
        self: &Arc<Self>,
        key: &WorkspaceKey,
        workdir: &Path,
        agent_config_dir: Option<&Path>,
    ) -> Result<Jail, SandboxError> {
        self.jail_with(key, workdir, agent_config_dir, true).await
    }

    /// The sandbox for a run in workspace `key` that starts while another run has the
    /// checkout (the build started ahead, while the agent works): the folders as the last
    /// hand-over left them, so that two walks of the checkout do not race. A folder that does
    /// not exist yet is made and handed over all the same.
    pub(crate) async fn jail_as_handed_over(
        self: &Arc<Self>,
        key: &WorkspaceKey,
        workdir: &Path,
    ) -> Result<Jail, SandboxError> {
        self.jail_with(key, workdir, None, false).await
    }

    async fn jail_with(
        self: &Arc<Self>,
        key: &WorkspaceKey,
        workdir: &Path,
        agent_config_dir: Option<&Path>,
        hand_over: bool,
    ) -> Result<Jail, SandboxError> {
        if self.isolation.is_none() {
            return Ok(Jail::open(workdir));
        }
        let name = format!("{}/{}", key.client_id, key.project_id);
        let home = self
            .state
            .join("home")
            .join(&key.client_id)
            .join(&key.project_id);
        let me = self.clone();
        let (workdir, config) = (workdir.to_owned(), agent_config_dir.map(Path::to_owned));
        blocking(move || {
            let uid = if me.isolation.separate_users {
                Some(me.uid_for(&name)?)
            } else {
                None
            };
            let jail = Jail {
                sandbox: Some(me.clone()),
                uid,
                workdir: workdir.clone(),
                home: home.clone(),
                agent_config_dir: config.clone(),
                private: vec![Some(workdir), Some(home), config]
                    .into_iter()
                    .flatten()
                    .collect(),
                install_slot: None,
            };
            if hand_over || jail.private.iter().any(|dir| !dir.exists()) {
                jail.hand_over_blocking()?;
            }
            Ok(jail)
        })
        .await
    }

    /// The sandbox for a shared dependency install into `dir` (a fresh folder of the store):
    /// nothing shared with any other install but its inputs (in `dir`) and its output (`dir`,
    /// taken back by the worker after it). It holds one of the install slots of this root
    /// (`.sandbox/installs/{n}`, claimed by `flock` so that workers sharing the root never hold
    /// the same one): with separate users that slot's own uid (its process limit, its clean-up
    /// and its disk count reach this install only), and always a fresh, empty `HOME` (npm's
    /// config and cache, `TMPDIR` without namespaces), removed by `take_back`. So nothing one
    /// install writes (a `$HOME/.npmrc` with `node-options`, a poisoned cache) is there for the
    /// next.
    pub(crate) async fn store_jail(self: &Arc<Self>, dir: &Path) -> Result<Jail, SandboxError> {
        if self.isolation.is_none() {
            return Ok(Jail::open(dir));
        }
        let me = self.clone();
        let dir = dir.to_owned();
        blocking(move || {
            let (slot, claim) = me.claim_install_slot()?;
            let folder = me.state.join("installs").join(slot.to_string());
            let home = folder.join("home");
            // Whatever an earlier holder of the slot left (it crashed before `take_back`).
            remove_if_there(&home)?;
            std::fs::create_dir_all(&home).map_err(io_at(&home))?;
            let jail = Jail {
                sandbox: Some(me.clone()),
                uid: me
                    .isolation
                    .separate_users
                    .then(|| me.first_uid() + RANGE_SIZE - 1 - slot),
                workdir: dir.clone(),
                home: home.clone(),
                agent_config_dir: None,
                private: vec![dir, home],
                install_slot: Some(Arc::new(claim)),
            };
            jail.hand_over_blocking()?;
            Ok(jail)
        })
        .await
    }
}

/// The files a program named `program` is (its path, resolved on `PATH` when it is a bare name,
/// and where its links lead): what must stay visible to a sandboxed run of it.
pub(crate) fn program_files(program: &Path) -> Vec<PathBuf> {
    let found = if program.components().count() > 1 || program.is_absolute() {
        Some(std::path::absolute(program).unwrap_or_else(|_| program.to_owned()))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
    };
    let mut files = Vec::new();
    if let Some(path) = found {
        if let Ok(real) = std::fs::canonicalize(&path) {
            files.push(real);
        }
        files.push(path);
    }
    files
}

/// Write a file only the worker reads (which uid is whose is nobody else's business).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SandboxError> {
    use std::io::Write;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_at(path))?;
    file.write_all(bytes).map_err(io_at(path))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), SandboxError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_at(path))
}

/// Remove the folder at `path` (the worker's own path; links inside are removed, never
/// followed), if there is one.
fn remove_if_there(path: &Path) -> Result<(), SandboxError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(path)(e)),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SandboxError> + Send + 'static,
) -> Result<T, SandboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io_at(Path::new("."))(std::io::Error::other(e))))
}

impl Sandbox {
    /// The sandbox of the worker's browser (the check after each publish, `browser.rs`): it
    /// runs pages a tenant wrote, so it is a tenant as far as the host goes. With separate
    /// users it runs as a uid of the root's range below the install uids (no workspace's: a page must not read
    /// a checkout), with `profile` (its fresh `--user-data-dir`) and its home its only
    /// writable folders; in namespaces it sees no workspace at all.
    pub(crate) async fn browser_jail(
        self: &Arc<Self>,
        profile: &Path,
    ) -> Result<Jail, SandboxError> {
        if self.isolation.is_none() {
            return Ok(Jail::open(profile));
        }
        let home = self.state.join("home").join(".browser");
        let jail = Jail {
            sandbox: Some(self.clone()),
            uid: self
                .isolation
                .separate_users
                .then(|| self.first_uid() + BROWSER_UID_OFFSET),
            workdir: profile.to_owned(),
            home: home.clone(),
            agent_config_dir: None,
            // Its `TMPDIR` outside namespaces is `home/tmp`: made and handed over too.
            private: vec![profile.to_owned(), home.clone(), home.join("tmp")],
            install_slot: None,
        };
        let j = jail.clone();
        blocking(move || j.hand_over_blocking()).await?;
        Ok(jail)
    }

    /// Where the browser's profiles go (`{WORKSPACE_ROOT}/.sandbox/browser`): the worker's
    /// folder, hidden from tenants like the rest of `.sandbox`.
    pub(crate) fn browser_dir(&self) -> PathBuf {
        self.state.join("browser")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace root other uids can pass through, as `/workspace` is.
    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        dir
    }

    #[tokio::test]
    async fn none_is_no_sandbox_at_all() {
        let dir = root();
        let sandbox = Sandbox::detect(
            IsolationSetting::None,
            Limits::default(),
            dir.path(),
            vec![],
        )
        .await
        .unwrap();
        assert!(sandbox.isolation().is_none());
        let jail = sandbox
            .jail(&WorkspaceKey::of("c", "p"), dir.path(), None)
            .await
            .unwrap();
        assert_eq!(jail.uid(), None);
        assert!(jail.env().is_empty());
        assert_eq!(
            sandbox.agent_config_dir(Path::new("/cfg"), &WorkspaceKey::of("c", "p")),
            Path::new("/cfg")
        );
    }

    /// Needs root (as the worker in its container): separate users.
    #[tokio::test]
    async fn each_workspace_has_its_own_uid_which_workers_on_one_root_agree_on() {
        let dir = root();
        let detect = || {
            Sandbox::detect(
                IsolationSetting::Users,
                Limits::default(),
                dir.path(),
                vec![],
            )
        };
        let (one, two) = (detect().await.unwrap(), detect().await.unwrap());
        let a = one.uid_for("a/site").unwrap();
        let b = one.uid_for("b/site").unwrap();
        assert_ne!(a, b);
        assert_eq!(two.uid_for("a/site").unwrap(), a);
        assert_eq!(two.uid_for("b/site").unwrap(), b);
        assert!(a > one.first_uid() && a < one.first_uid() + RANGE_SIZE);
        // Another root, another range: its uids reach none of these.
        let other = root();
        let three = Sandbox::detect(
            IsolationSetting::Users,
            Limits::default(),
            other.path(),
            vec![],
        )
        .await
        .unwrap();
        assert_ne!(three.first_uid(), one.first_uid());
    }

    /// Needs root: the checkout is handed to the workspace's uid, `.git` is not, and what
    /// runs in the jail runs as that uid under the limits.
    #[tokio::test]
    async fn a_jail_runs_as_its_workspace_under_limits() {
        let dir = root();
        let limits = Limits {
            processes: 77,
            ..Limits::default()
        };
        let sandbox = Sandbox::detect(IsolationSetting::Users, limits, dir.path(), vec![])
            .await
            .unwrap();
        let work = sandbox.root.join("c").join("p");
        std::fs::create_dir_all(work.join(".git/hooks")).unwrap();
        std::fs::create_dir_all(work.join("src")).unwrap();
        std::fs::write(work.join("src/index.astro"), "x").unwrap();
        let jail = sandbox
            .jail(&WorkspaceKey::of("c", "p"), &work, None)
            .await
            .unwrap();
        let uid = jail.uid().unwrap();
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        assert_eq!(meta(&work.join("src/index.astro")).uid(), uid);
        assert_eq!(meta(&work).uid(), 0);
        assert_eq!(meta(&work).mode() & 0o7777, 0o3770);
        assert_eq!(meta(&work.join(".git")).uid(), 0);
        assert_eq!(meta(&work.join(".git")).mode() & 0o777, 0o700);

        let mut cmd = jail.command("sh", &work);
        cmd.args([
            "-c",
            "id -u; awk '/Max processes/ {print $3}' /proc/self/limits; touch mine; \
             touch .git/hooks/x",
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(jail.env());
        let out = cmd.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines, [uid.to_string().as_str(), "77"], "{out:?}");
        assert!(work.join("mine").exists());
        assert!(!work.join(".git/hooks/x").exists());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    }
}
