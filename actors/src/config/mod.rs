//! # The config folder
//!
//! Owns `WorkerConfig` and every setting type, the steps' included (leaf files: `agent`,
//! `check`, `isolation`, `lease_store`, `publish`, `store`): the configuration never imports a
//! step, so every floor may import it. Behaviour that needs a step (which browser a
//! `CheckSettings` finds) stays with that step.
//!
//! What the actor system needs to know, already parsed and checked. The process (`src/config.rs`)
//! builds this from the environment and the optional TOML file; tests build it directly.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::contract::message::WorkspaceKey;

// The settings types of the steps and the sandbox live here, below the modules that read them,
// so that the configuration imports none of them (each step module re-exports its own).
mod agent;
mod check;
mod isolation;
mod lease_store;
mod publish;
mod store;
pub use agent::{AgentSpec, INTERRUPT_GRACE, InputMode, SIGNAL_GRACE};
pub use check::{CheckMode, CheckSettings};
pub use isolation::{IsolationSetting, Limits};
pub use lease_store::StoreLocation;
pub use publish::{CacheRule, PublishOptions, Retention};
pub use store::StoreSettings;

/// Not `Clone`: it holds the one [`OutputDir`], and the process keeps one configuration (in
/// `WorkerContext`), which the actors share by reference.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The queue of edit requests.
    pub input_queue_url: String,
    /// Where status events go; `None` means they are only logged.
    pub output_queue_url: Option<String>,
    /// Where rejected messages are kept; `None` means they are only logged and dropped.
    pub dead_letter_queue_url: Option<String>,
    /// Workspaces live at `{workspace_root}/{clientId}/{projectId}`.
    pub workspace_root: PathBuf,
    /// Upstream remote of a workspace, with `{clientId}` and `{projectId}`. `None`: the workspace
    /// must already exist (nothing is cloned).
    pub git_remote_template: Option<String>,
    /// Edit bucket name, with `{clientId}` and `{projectId}`.
    pub bucket_template: String,
    /// Public address of a bucket's site, with `{bucket}` and `{region}`.
    pub preview_url_template: String,
    /// How the agent (`CLAUDE_BIN`) runs: its limits, model, permissions and tools.
    pub agent: AgentSpec,
    /// Progress events of one message are sent at most this often (a chatty agent must not
    /// flood the status queue); what happens in between is summed up in the next one.
    pub progress_interval: Duration,
    /// How sites are built (`BUILD_*`): what `BuildSpec` takes.
    pub build: BuildSettings,
    /// Serve only this client / project; others are rejected.
    pub only_client: Option<String>,
    pub only_project: Option<String>,
    /// Largest accepted `command`, in bytes.
    pub max_command_bytes: usize,
    /// AWS region, for the preview URL.
    pub region: String,
    /// How many messages may be held (received, not yet finished) at once. Bounds memory and
    /// keeps messages in the queue, where another container can take them, rather than waiting
    /// invisible in ours.
    pub max_in_flight: usize,
    /// At most this many held messages per workspace, and per client (fairness). The
    /// workspace share is also how large a burst into one thread can be coalesced.
    pub max_held_per_workspace: usize,
    pub max_held_per_client: usize,
    /// Agent runs at once, over all workspaces. The agent mostly waits on the model, so this is
    /// high; it bounds processes and memory, not CPU.
    pub agent_concurrency: usize,
    /// A session with nothing to do for this long is stopped; the next message starts it
    /// again. Memory follows the active workspaces, not every workspace ever seen.
    pub session_idle: Duration,
    /// Visibility timeout we keep extending while a message is being worked on, and the one
    /// each receive asks for: short, so that a frozen or killed worker's messages come back
    /// within it (issue 25).
    pub visibility_timeout: Duration,
    /// `HOLD_UNDECIDED_SECONDS`: how long a message the worker cannot decide (lease or record
    /// store away) is kept invisible and asked about again before it is given back.
    pub hold_undecided: Duration,
    /// `AWS_ATTEMPT_TIMEOUT_SECONDS` / `AWS_OPERATION_TIMEOUT_SECONDS`: every AWS call's
    /// bounds, so that no hung request holds a release, a renewal or the intake.
    pub aws_attempt_timeout: Duration,
    pub aws_operation_timeout: Duration,
    /// How builds are published (concurrency, Cache-Control rules, deletion cap).
    pub publish: PublishOptions,
    /// How often a failed push is retried before the message fails.
    pub push_attempts: u32,
    /// CloudFront distribution in front of a client's edit bucket (client id -> distribution
    /// id); after a publish, the changed paths are invalidated there. Empty: no invalidation.
    pub cloudfront_distributions: std::collections::BTreeMap<String, String>,
    /// Characters of the request text kept on the message's span (0: none). Traces go to
    /// another system; the full text stays in git and the status events.
    pub trace_command_chars: usize,
    /// Touched by the intake on every turn of its loop; the container's HEALTHCHECK reads its
    /// age (no port needed).
    pub health_file: Option<PathBuf>,
    /// Deliveries of one message before a passing failure (S3 or the git remote away, a
    /// crashed step) becomes its final `failed` event and the message goes to the dead-letter
    /// queue. Keep it at or below the input queue's own redrive `maxReceiveCount`.
    pub max_receives: u32,
    /// Delay before the first retry of a passing failure; doubled on each further delivery.
    pub retry_base_delay: Duration,
    /// Dependencies: one install per lock file in a shared store, or `npm ci` per workspace.
    pub npm_store: StoreSettings,
    /// `LEASE_STORE`: where the shared records (message outcomes, thread marks) live. `None`:
    /// the worker assumes it is alone and keeps them in `{WORKSPACE_ROOT}/.records`.
    pub lease_store: Option<StoreLocation>,
    /// `WORKER_ID`: this worker's name in records, leases and logs; unique per process.
    pub worker_id: String,
    /// `LEASE_SECONDS`: how long a workspace lease lasts without a heartbeat (one every
    /// third). A worker that dies holds its workspaces this long at most.
    pub lease_duration: Duration,
    /// `ISOLATION`: how tenants' code (agent, installs, builds) is kept from the worker and
    /// from each other (`sandbox`). Detected at start; `none` only when asked for.
    pub isolation: IsolationSetting,
    /// `SANDBOX_MAX_*`: the limits on every process of a tenant's run.
    pub sandbox_limits: Limits,
    /// `SHUTDOWN_DEADLINE_SECONDS`: on SIGTERM, how long running work may take to save itself
    /// and give its messages back before the worker exits anyway (ECS gives 30 s between
    /// SIGTERM and SIGKILL).
    pub shutdown_deadline: Duration,
    /// `BROWSER_CHECK`, `CHECK_MAX_PAGES`, `CHECK_REPAIR`, `CHROME_BIN`: the browser check
    /// after each publish (`browser_check.rs`).
    pub check: CheckSettings,
}

impl WorkerConfig {
    /// Defaults of the contract, for a given input queue: the defaults of the settings table
    /// (`src/settings_table.rs`), where the worker reads them; a test there keeps these equal.
    pub fn with_defaults(input_queue_url: impl Into<String>) -> WorkerConfig {
        WorkerConfig {
            input_queue_url: input_queue_url.into(),
            output_queue_url: None,
            dead_letter_queue_url: None,
            workspace_root: PathBuf::from("/workspace"),
            git_remote_template: None,
            bucket_template: "edit.{clientId}.webordinary.com".into(),
            preview_url_template: "http://{bucket}.s3-website-{region}.amazonaws.com/".into(),
            agent: AgentSpec::new(PathBuf::from("claude"), Duration::from_secs(30 * 60)),
            progress_interval: Duration::from_secs(5),
            build: BuildSettings::default(),
            only_client: None,
            only_project: None,
            max_command_bytes: crate::contract::message::DEFAULT_MAX_COMMAND_BYTES,
            region: "us-east-1".into(),
            max_in_flight: 64,
            max_held_per_workspace: 10,
            max_held_per_client: 16,
            agent_concurrency: 16,
            session_idle: Duration::from_secs(300),
            visibility_timeout: Duration::from_secs(30),
            hold_undecided: Duration::from_secs(300),
            aws_attempt_timeout: Duration::from_secs(30),
            aws_operation_timeout: Duration::from_secs(90),
            publish: PublishOptions::default(),
            push_attempts: 4,
            health_file: None,
            trace_command_chars: 80,
            cloudfront_distributions: Default::default(),
            max_receives: 5,
            retry_base_delay: Duration::from_secs(5),
            npm_store: Default::default(),
            lease_store: None,
            worker_id: default_worker_id(),
            lease_duration: Duration::from_secs(30),
            isolation: IsolationSetting::Auto,
            sandbox_limits: Default::default(),
            shutdown_deadline: Duration::from_secs(25),
            check: Default::default(),
        }
    }

    /// Where this worker's records live: the shared store, or a folder beside the workspaces
    /// (`.records` cannot clash with a client: client ids never start with a dot).
    pub fn record_location(&self) -> StoreLocation {
        self.lease_store
            .clone()
            .unwrap_or_else(|| StoreLocation::Local(self.workspace_root.join(".records")))
    }

    pub(crate) fn workspace_dir(&self, key: &WorkspaceKey) -> PathBuf {
        // Both ids are validated DNS labels: no separators, no dots, so this stays under the root.
        self.workspace_root
            .join(&key.client_id)
            .join(&key.project_id)
    }

    pub fn bucket_for(&self, key: &WorkspaceKey) -> String {
        fill(&self.bucket_template, key)
    }

    pub fn remote_for(&self, key: &WorkspaceKey) -> Option<String> {
        self.git_remote_template.as_deref().map(|t| fill(t, key))
    }

    pub(crate) fn preview_url_for(&self, bucket: &str) -> String {
        self.preview_url_template
            .replace("{bucket}", bucket)
            .replace("{region}", &self.region)
    }
}

/// `BUILD_OUTPUT_DIR`: the build's output folder, a folder inside the workspace. The only way to
/// make one is [`OutputDir::new`], which refuses what would leave the workspace (an absolute
/// path, `..`), the workspace itself (empty, `.`) and the worker's `.git`; the path it keeps is
/// normalised to its plain parts (`./dist/` is `dist`). The build removes this folder before it
/// runs and the publisher uploads what it holds, so `workspace.join(output_dir)` is always a
/// folder of the checkout, never the checkout itself or something outside it.
/// The build (`BuildSpec`) and the checkout's git exclude (`Workspace`) keep it as this type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputDir(PathBuf);

/// Why a path is not an [`OutputDir`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputDirError {
    #[error("`{0}` names no folder inside the workspace")]
    Empty(String),
    #[error("`{0}` is absolute: it must be relative to the workspace")]
    Absolute(String),
    #[error("`{0}` leaves the workspace (`..`): it must be a folder inside it")]
    Parent(String),
    #[error("`{0}` is inside `.git`, which belongs to the worker")]
    Git(String),
}

impl OutputDir {
    /// A relative folder inside the workspace, or why `path` is not one.
    pub fn new(path: impl AsRef<Path>) -> Result<OutputDir, OutputDirError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let mut inside = PathBuf::new();
        for part in path.components() {
            match part {
                Component::Normal(name) if name == ".git" => {
                    return Err(OutputDirError::Git(shown));
                }
                Component::Normal(name) => inside.push(name),
                Component::CurDir => {}
                Component::ParentDir => return Err(OutputDirError::Parent(shown)),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(OutputDirError::Absolute(shown));
                }
            }
        }
        if inside.as_os_str().is_empty() {
            return Err(OutputDirError::Empty(shown));
        }
        Ok(OutputDir(inside))
    }
}

impl std::ops::Deref for OutputDir {
    type Target = PathBuf;

    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for OutputDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl std::str::FromStr for OutputDir {
    type Err = OutputDirError;

    fn from_str(s: &str) -> Result<OutputDir, OutputDirError> {
        OutputDir::new(s)
    }
}

impl std::fmt::Display for OutputDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.display().fmt(f)
    }
}

/// Builds at once when `BUILD_CONCURRENCY` is not set: one per core (a build is CPU-bound).
/// How sites are built: the `BUILD_*` settings, in the shape `BuildSpec` takes them.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// The build, as argv words, run without a shell.
    pub command: Vec<String>,
    /// The build's output folder: a folder inside the workspace, by its type.
    pub output_dir: OutputDir,
    /// `npm run <script>` runs the script's words directly when npm would add nothing
    /// (`package_script`): half a second less per build.
    pub scripts_without_npm: bool,
    /// Wall-clock limit of the install and of the build, each.
    pub timeout: Duration,
    /// `BUILD_AHEAD_MAX`: Astro builds whose Node process is started while the agent works
    /// (`prepared_build`), at most this many waiting at once; each holds about 150 MB. 0: off.
    pub ahead_max: usize,
    /// Builds at once. A build is CPU-bound: more builds than cores only makes each slower.
    pub concurrency: usize,
    /// When the build fails after the agent's edit, resume the agent this many times with the
    /// build's error and build again.
    pub repair_attempts: u32,
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            command: vec!["npm".into(), "run".into(), "build".into()],
            output_dir: OutputDir::new("dist").expect("a folder inside the workspace"),
            scripts_without_npm: true,
            timeout: Duration::from_secs(10 * 60),
            ahead_max: 16,
            concurrency: default_build_concurrency(),
            repair_attempts: 1,
        }
    }
}

pub fn default_build_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The host name and the process id: unique among the workers of a deployment.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

fn fill(template: &str, key: &WorkspaceKey) -> String {
    template
        .replace("{clientId}", &key.client_id)
        .replace("{projectId}", &key.project_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_in_ids() {
        let mut c = WorkerConfig::with_defaults("q");
        c.git_remote_template = Some("/srv/git/{clientId}/{projectId}.git".into());
        let key = WorkspaceKey {
            client_id: "amelia".into(),
            project_id: "stamps".into(),
        };
        assert_eq!(c.bucket_for(&key), "edit.amelia.webordinary.com");
        assert_eq!(c.remote_for(&key).unwrap(), "/srv/git/amelia/stamps.git");
        assert_eq!(
            c.preview_url_for("b"),
            "http://b.s3-website-us-east-1.amazonaws.com/"
        );
        assert_eq!(
            c.workspace_dir(&key),
            PathBuf::from("/workspace/amelia/stamps")
        );
    }

    #[test]
    fn an_output_dir_is_a_folder_inside_the_workspace() {
        for (given, kept) in [
            ("dist", "dist"),
            ("build/site", "build/site"),
            ("./dist/", "dist"),
            ("a/./b", "a/b"),
            ("a//b", "a/b"),
            (".output", ".output"),
            ("dist/.gitkeep-not", "dist/.gitkeep-not"),
        ] {
            let dir = OutputDir::new(given).unwrap();
            assert_eq!(dir.as_path(), Path::new(kept), "{given}");
            assert_eq!(dir.to_string(), kept);
            assert_eq!(given.parse::<OutputDir>().unwrap(), dir);
        }
        let error = |path: &str| OutputDir::new(path).unwrap_err();
        assert!(matches!(error(""), OutputDirError::Empty(_)));
        assert!(matches!(error("."), OutputDirError::Empty(_)));
        assert!(matches!(error("./."), OutputDirError::Empty(_)));
        assert!(matches!(error("/srv/dist"), OutputDirError::Absolute(_)));
        assert!(matches!(error("/"), OutputDirError::Absolute(_)));
        assert!(matches!(error(".."), OutputDirError::Parent(_)));
        assert!(matches!(error("../dist"), OutputDirError::Parent(_)));
        assert!(matches!(error("dist/../../x"), OutputDirError::Parent(_)));
        // Even `a/..`, which would stay inside: `..` is never needed to name a folder.
        assert!(matches!(error("dist/.."), OutputDirError::Parent(_)));
        assert!(matches!(error(".git"), OutputDirError::Git(_)));
        assert!(matches!(error("./.git/dist"), OutputDirError::Git(_)));
        assert!(matches!(error("site/.git"), OutputDirError::Git(_)));
        assert_eq!(
            error("../x").to_string(),
            "`../x` leaves the workspace (`..`): it must be a folder inside it"
        );
    }

    #[test]
    fn an_output_dir_joins_under_the_workspace_and_copies_out_as_a_path() {
        let c = WorkerConfig::with_defaults("q");
        let workspace = Path::new("/workspace/amelia/stamps");
        assert_eq!(
            workspace.join(&c.build.output_dir),
            Path::new("/workspace/amelia/stamps/dist")
        );
        // `BuildSpec` and `Workspace` keep copies of the checked folder, not a path.
        let copy: OutputDir = c.build.output_dir.clone();
        assert_eq!(copy.as_path(), Path::new("dist"));
    }
}
