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
use crate::message::WorkspaceKey;
use crate::tenant_fs;

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
    Tree(#[from] crate::tenant_fs::TenantFileError),
}

/// `edit_worker.isolation`: 1 for the level in force, said once, where the log says it at start
/// (the gauge keeps its last value, so every export carries it).
fn record_isolation(isolation: Isolation) {
    crate::metrics::metrics().isolation.record(
        1,
        &[opentelemetry::KeyValue::new("level", isolation.to_string())],
    );
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

    fn first_uid(&self) -> u32 {
        *self
            .first_uid
            .get()
            .expect("the uid range is read at start, before any jail")
    }

    /// This root's uid range: the one recorded, or a new one chosen at random.
    fn read_or_choose_range(&self) -> Result<u32, SandboxError> {
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

    /// One of the `INSTALL_UIDS` install slots, locked for as long as the returned file is
    /// open: the first free one, or (all taken) the next in turn, waited for.
    fn claim_install_slot(&self) -> Result<(u32, std::fs::File), SandboxError> {
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
    fn uid_for(&self, name: &str) -> Result<u32, SandboxError> {
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
    fn prepare_root(&self) -> Result<(), SandboxError> {
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

/// bubblewrap's namespaces for a run: its own user, PID, IPC, UTS (and cgroup, where it can)
/// namespaces, the network shared (the agent needs its API, npm its registry), the host's files
/// read-only, its own `/dev` and `/proc`, and the run dies with its parent.
const BWRAP_NAMESPACES: &[&str] = &[
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
async fn probe_namespaces(uid: Option<u32>) -> Result<(), String> {
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

/// Where one run of a tenant's code happens. Cheap to clone; made per run.
#[derive(Debug, Clone)]
pub(crate) struct Jail {
    /// `None`: no isolation, the run is the worker's own child.
    sandbox: Option<Arc<Sandbox>>,
    /// The uid (and gid) it runs as; `None`: the worker's own.
    uid: Option<u32>,
    workdir: PathBuf,
    /// `HOME` (npm's cache, the CLI's own files), the tenant's and nobody else's.
    home: PathBuf,
    /// `CLAUDE_CONFIG_DIR` of the workspace, when the run is the agent's.
    agent_config_dir: Option<PathBuf>,
    /// What the run may write: bound into the namespaces, owned by its uid.
    private: Vec<PathBuf>,
    /// A shared install's slot (`Sandbox::store_jail`): its uid and home are this install's
    /// alone while the lock is held, that is while any clone of the jail lives.
    install_slot: Option<Arc<std::fs::File>>,
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

    fn bwrap_args(&self, sandbox: &Sandbox, cwd: &Path) -> Vec<OsString> {
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

    fn hand_over_blocking(&self) -> Result<(), SandboxError> {
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
                    crate::metrics::metrics().disk_limit_stops.add(1, &[]);
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

/// How often a run's disk use is added up. A run writing at disk speed overshoots the limit by
/// at most this much time's worth; each file stays under `SANDBOX_MAX_FILE_MB` anyway.
const DISK_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

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

/// `own_uid`: the run has a uid of its own. `RLIMIT_NPROC` counts every process of the uid, so
/// it is set only then: on the worker's own uid it would count the worker and every tenant.
fn apply_limits(limits: &Limits, own_uid: bool) -> std::io::Result<()> {
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

    #[test]
    fn isolation_settings_are_read_by_name() {
        assert_eq!("".parse(), Ok(IsolationSetting::Auto));
        assert_eq!("auto".parse(), Ok(IsolationSetting::Auto));
        assert_eq!("none".parse(), Ok(IsolationSetting::None));
        assert_eq!(
            "users+namespaces".parse(),
            Ok(IsolationSetting::UsersAndNamespaces)
        );
        let err = "chroot".parse::<IsolationSetting>().unwrap_err();
        assert!(err.contains("auto, users, namespaces"), "{err}");
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
