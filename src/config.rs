//! Configuration: the settings of `settings_table.rs`, from the environment and optionally a
//! TOML file with the same keys. The environment wins over the file. Every value is read by its
//! kind and checked here, so a bad setting stops the process at start (exit code 2) with a
//! message that names it, instead of failing a job later. Names and defaults come from the
//! table only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use edit_worker_actors::config::StoreLocation;
use edit_worker_actors::config::{
    AgentSpec, BuildSettings, OutputDir, WorkerConfig, default_build_concurrency, default_worker_id,
};
use edit_worker_actors::contract::message::check_dns_label;
use edit_worker_actors::delivery::threads::ThreadStore;
use edit_worker_actors::steps::build::npm_store::StoreSettings;
use edit_worker_actors::steps::check::CheckSettings;
use edit_worker_actors::steps::publish::deploys::Retention;
use edit_worker_actors::steps::publish::{CacheRule, PublishOptions};
use edit_worker_actors::tenant::sandbox::Limits;

use crate::settings_table::{self as table, DefaultIs, Kind, Value};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} is required")]
    Missing { key: &'static str },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Raw settings: key → value, from the file and then the environment.
pub struct Settings {
    values: HashMap<&'static str, String>,
    /// The names read so far: a test checks that building the configuration reads every one.
    #[cfg(test)]
    read: std::cell::RefCell<std::collections::BTreeSet<&'static str>>,
}

impl Settings {
    fn new(values: HashMap<&'static str, String>) -> Settings {
        Settings {
            values,
            #[cfg(test)]
            read: Default::default(),
        }
    }

    /// Read the TOML file (if any), then overlay the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut values = match file {
            Some(path) => read_file(path)?,
            None => HashMap::new(),
        };
        for setting in table::SETTINGS {
            if let Ok(v) = std::env::var(setting.name) {
                values.insert(setting.name, v);
            }
        }
        Ok(Settings::new(values))
    }

    /// What `name` is set to (blank counts as unset), else its default value; `None` when it
    /// has neither. A required setting that is not set is an error.
    fn raw(&self, name: &'static str) -> Result<Option<&str>, ConfigError> {
        let setting = table::setting(name);
        #[cfg(test)]
        self.read.borrow_mut().insert(setting.name);
        let set = self
            .values
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty());
        match (set, setting.default) {
            (Some(v), _) => Ok(Some(v)),
            (None, DefaultIs::Value(v)) => Ok(Some(v)),
            (None, DefaultIs::Required) => Err(ConfigError::Missing { key: setting.name }),
            (None, DefaultIs::Nothing(_) | DefaultIs::Derived(_)) => Ok(None),
        }
    }

    /// `name`'s value read by its kind, or `None` when it has none.
    fn value(&self, name: &'static str) -> Result<Option<Value>, ConfigError> {
        let Some(text) = self.raw(name)? else {
            return Ok(None);
        };
        let setting = table::setting(name);
        setting
            .kind
            .parse(text)
            .map(Some)
            .map_err(|message| ConfigError::Invalid {
                key: setting.name,
                message,
            })
    }

    /// `name`'s value, which it always has (set, its default, or required).
    fn given(&self, name: &'static str) -> Result<Value, ConfigError> {
        Ok(self
            .value(name)?
            .unwrap_or_else(|| panic!("{name} has no default value in the settings table")))
    }

    fn text(&self, name: &'static str) -> Result<String, ConfigError> {
        Ok(text_of(name, self.given(name)?))
    }

    fn optional_text(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        Ok(self.value(name)?.map(|v| text_of(name, v)))
    }

    fn path(&self, name: &'static str) -> Result<PathBuf, ConfigError> {
        Ok(path_of(name, self.given(name)?))
    }

    fn optional_path(&self, name: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self.value(name)?.map(|v| path_of(name, v)))
    }

    /// A list; unset is empty.
    fn list(&self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        match self.value(name)? {
            None => Ok(Vec::new()),
            Some(Value::List(items)) => Ok(items),
            Some(other) => panic!("{name} is not a list: {other:?}"),
        }
    }

    fn number(&self, name: &'static str) -> Result<u64, ConfigError> {
        Ok(number_of(name, self.given(name)?))
    }

    fn optional_number(&self, name: &'static str) -> Result<Option<u64>, ConfigError> {
        Ok(self.value(name)?.map(|v| number_of(name, v)))
    }

    fn seconds(&self, name: &'static str) -> Result<Duration, ConfigError> {
        self.number(name).map(Duration::from_secs)
    }

    fn flag(&self, name: &'static str) -> Result<bool, ConfigError> {
        match self.given(name)? {
            Value::Flag(b) => Ok(b),
            other => panic!("{name} is not a flag: {other:?}"),
        }
    }

    /// A value the table's kinds cannot check by themselves (cache rules, a store URL...): read
    /// by its kind first, then by `parse`, whose error names the setting.
    fn parsed_optional<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        if self.value(name)?.is_none() {
            return Ok(None);
        }
        let text = self.raw(name)?.unwrap_or_default();
        parse(text)
            .map(Some)
            .map_err(|message| ConfigError::Invalid { key: name, message })
    }

    /// As `parsed_optional`, for a setting that always has a value.
    fn parsed<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        Ok(self
            .parsed_optional(name, parse)?
            .unwrap_or_else(|| panic!("{name} has no default value in the settings table")))
    }

    /// A whole number of `unit`s, in the smaller unit (MiB in bytes, days in seconds).
    fn scaled(&self, name: &'static str, unit: u64) -> Result<u64, ConfigError> {
        self.number(name)?
            .checked_mul(unit)
            .ok_or_else(|| ConfigError::Invalid {
                key: name,
                message: "is too large".into(),
            })
    }

    fn output_dir(&self, name: &'static str) -> Result<OutputDir, ConfigError> {
        match self.given(name)? {
            Value::OutputDir(dir) => Ok(dir),
            other => panic!("{name} is not a folder inside the workspace: {other:?}"),
        }
    }

    fn optional_amount(&self, name: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.value(name)? {
            None => Ok(None),
            Some(Value::Amount(x)) => Ok(Some(x)),
            Some(other) => panic!("{name} is not an amount: {other:?}"),
        }
    }

    /// `WORKSPACE_ROOT`, absolute (a relative one is taken from the current folder).
    fn workspace_root(&self) -> Result<PathBuf, ConfigError> {
        self.parsed("WORKSPACE_ROOT", |root| {
            std::path::absolute(root).map_err(|e| e.to_string())
        })
    }

    /// How the agent (`CLAUDE_BIN`) runs: its limits, model, permissions and tools.
    fn agent(&self, workspace_root: &Path) -> Result<AgentSpec, ConfigError> {
        let timeout = self.seconds("AGENT_TIMEOUT_SECONDS")?;
        let mut a = AgentSpec::new(self.path("CLAUDE_BIN")?, timeout);
        // The watchdog: by default as long as the whole run may take.
        a.silence_timeout = self
            .optional_number("AGENT_SILENCE_SECONDS")?
            .map_or(timeout, Duration::from_secs);
        a.config_dir = Some(ThreadStore::default_agent_config_dir(workspace_root));
        a.max_turns = self.optional_number("AGENT_MAX_TURNS")?.map(|n| n as u32);
        a.max_budget_usd = self.optional_amount("AGENT_MAX_BUDGET_USD")?;
        a.model = self.optional_text("AGENT_MODEL")?;
        a.permission_mode = self.text("AGENT_PERMISSION_MODE")?;
        a.allowed_tools = self.list("AGENT_ALLOWED_TOOLS")?;
        a.disallowed_tools = self.list("AGENT_DISALLOWED_TOOLS")?;
        a.append_system_prompt = self.optional_text("AGENT_APPEND_SYSTEM_PROMPT")?;
        // More environment variables for the agent, by name (its allow-list is in agent.rs).
        a.env_allow = self.list("AGENT_ENV_ALLOW")?;
        Ok(a)
    }

    /// Dependencies: `INSTALL_MODE` and the shared store's folder and limits.
    fn npm_store(&self) -> Result<StoreSettings, ConfigError> {
        Ok(StoreSettings {
            shared: self.text("INSTALL_MODE")? == "shared",
            dir: self.optional_path("NPM_STORE_DIR")?,
            max_bytes: self.scaled("NPM_STORE_MAX_MB", 1 << 20)?,
            max_age: Duration::from_secs(self.scaled("NPM_STORE_MAX_AGE_DAYS", 86_400)?),
        })
    }

    /// How builds are published; also used by `edit-worker publish`.
    /// `BUCKET_TEMPLATE`, for the commands that read a workspace's bucket without running.
    pub fn bucket_template(&self) -> Result<String, ConfigError> {
        self.text("BUCKET_TEMPLATE")
    }

    pub fn publish_options(&self) -> Result<PublishOptions, ConfigError> {
        Ok(PublishOptions {
            concurrency: self.number("UPLOAD_CONCURRENCY")? as usize,
            cache_rules: self.parsed("CACHE_CONTROL_RULES", CacheRule::parse_list)?,
            max_delete_percent: self.number("PUBLISH_MAX_DELETE_PERCENT")? as u8,
            allow_mass_delete: self.flag("PUBLISH_ALLOW_MASS_DELETE")?,
            total_concurrency: self.number("S3_UPLOAD_CONCURRENCY")? as usize,
            max_file_bytes: self.number("PUBLISH_MAX_FILE_BYTES")?,
            max_total_bytes: self.number("PUBLISH_MAX_BYTES")?,
            retention: Retention {
                days: self.number("DEPLOY_RETENTION_DAYS")?,
                keep: self.number("DEPLOY_KEEP")? as usize,
            },
            // Not settings: how uploads are cut into parts and retried.
            ..PublishOptions::default()
        })
    }

    /// `SANDBOX_MAX_*`: the limits on every process of a tenant's run.
    fn sandbox_limits(&self) -> Result<Limits, ConfigError> {
        Ok(Limits {
            processes: self.number("SANDBOX_MAX_PROCESSES")?,
            memory_bytes: self.scaled("SANDBOX_MAX_MEMORY_MB", 1 << 20)?,
            file_bytes: self.scaled("SANDBOX_MAX_FILE_MB", 1 << 20)?,
            cpu_seconds: self.number("SANDBOX_MAX_CPU_SECONDS")?,
            tmp_bytes: self.scaled("SANDBOX_MAX_TMP_MB", 1 << 20)?,
            disk_bytes: self.scaled("SANDBOX_MAX_DISK_MB", 1 << 20)?,
        })
    }

    /// The edit bucket of `key` (`BUCKET_TEMPLATE`), for `edit-worker preview`.
    pub fn bucket_for(
        &self,
        key: &edit_worker_actors::contract::message::WorkspaceKey,
    ) -> Result<String, ConfigError> {
        Ok(self
            .text("BUCKET_TEMPLATE")?
            .replace("{clientId}", &key.client_id)
            .replace("{projectId}", &key.project_id))
    }

    /// `BROWSER_CHECK`, `CHECK_MAX_PAGES`, `CHECK_REPAIR`, `CHROME_BIN`: the browser check.
    pub fn check_settings(&self) -> Result<CheckSettings, ConfigError> {
        Ok(CheckSettings {
            mode: self.parsed("BROWSER_CHECK", |s| s.parse())?,
            max_pages: self.number("CHECK_MAX_PAGES")? as usize,
            repair: self.text("CHECK_REPAIR")? == "on",
            chrome_bin: self.optional_path("CHROME_BIN")?,
        })
    }

    /// `CLOUDFRONT_DISTRIBUTIONS`: client id -> distribution id.
    fn cloudfront_distributions(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let map = self.parsed_optional("CLOUDFRONT_DISTRIBUTIONS", |map| {
            map.split(',')
                .map(str::trim)
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(c, d)| (c.trim(), d.trim()))
                        .filter(|(c, d)| check_dns_label("id", c).is_ok() && !d.is_empty())
                        .map(|(c, d)| (c.to_owned(), d.to_owned()))
                        .ok_or_else(|| format!("`{pair}` is not clientId=DISTRIBUTIONID"))
                })
                .collect()
        })?;
        Ok(map.unwrap_or_default())
    }

    /// The worker's configuration for `run`.
    pub fn worker_config(&self, region: &str) -> Result<WorkerConfig, ConfigError> {
        let workspace_root = self.workspace_root()?;
        Ok(WorkerConfig {
            input_queue_url: self.text("INPUT_QUEUE_URL")?,
            output_queue_url: self.optional_text("OUTPUT_QUEUE_URL")?,
            dead_letter_queue_url: self.optional_text("DEAD_LETTER_QUEUE_URL")?,
            git_remote_template: self.optional_text("GIT_REMOTE_TEMPLATE")?,
            bucket_template: self.text("BUCKET_TEMPLATE")?,
            preview_url_template: self.text("PREVIEW_URL_TEMPLATE")?,
            agent: self.agent(&workspace_root)?,
            progress_interval: self.seconds("PROGRESS_INTERVAL_SECONDS")?,
            build: BuildSettings {
                command: self.list("BUILD_COMMAND")?,
                output_dir: self.output_dir("BUILD_OUTPUT_DIR")?,
                scripts_without_npm: self.flag("BUILD_SCRIPTS_WITHOUT_NPM")?,
                timeout: self.seconds("BUILD_TIMEOUT_SECONDS")?,
                ahead_max: self.number("BUILD_AHEAD_MAX")? as usize,
                concurrency: self
                    .optional_number("BUILD_CONCURRENCY")?
                    .map_or_else(default_build_concurrency, |n| n as usize),
                repair_attempts: self.number("BUILD_REPAIR_ATTEMPTS")? as u32,
            },
            only_client: self.optional_text("CLIENT_ID")?,
            only_project: self.optional_text("PROJECT_ID")?,
            max_command_bytes: self.number("MAX_COMMAND_BYTES")? as usize,
            region: region.to_owned(),
            max_in_flight: self.number("MAX_IN_FLIGHT")? as usize,
            max_held_per_workspace: self.number("MAX_HELD_PER_WORKSPACE")? as usize,
            max_held_per_client: self.number("MAX_HELD_PER_CLIENT")? as usize,
            agent_concurrency: self.number("AGENT_CONCURRENCY")? as usize,
            session_idle: self.seconds("SESSION_IDLE_SECONDS")?,
            // SQS keeps a message invisible for 12 hours at most.
            visibility_timeout: self
                .seconds("VISIBILITY_TIMEOUT_SECONDS")?
                .min(Duration::from_secs(43_200)),
            hold_undecided: self.seconds("HOLD_UNDECIDED_SECONDS")?,
            aws_attempt_timeout: self.seconds("AWS_ATTEMPT_TIMEOUT_SECONDS")?,
            aws_operation_timeout: self.seconds("AWS_OPERATION_TIMEOUT_SECONDS")?,
            publish: self.publish_options()?,
            push_attempts: self.number("PUSH_ATTEMPTS")? as u32,
            cloudfront_distributions: self.cloudfront_distributions()?,
            trace_command_chars: self.number("TRACE_COMMAND_CHARS")? as usize,
            health_file: self.optional_path("HEALTH_FILE")?,
            max_receives: self.number("MAX_RECEIVES")? as u32,
            retry_base_delay: self.seconds("RETRY_BASE_SECONDS")?,
            npm_store: self.npm_store()?,
            check: self.check_settings()?,
            lease_store: self.parsed_optional("LEASE_STORE", StoreLocation::parse)?,
            worker_id: self
                .optional_text("WORKER_ID")?
                .unwrap_or_else(default_worker_id),
            // Renewed every third: a lease shorter than 3 s would be renewed more than once a
            // second.
            lease_duration: self.seconds("LEASE_SECONDS")?.max(Duration::from_secs(3)),
            isolation: self.parsed("ISOLATION", str::parse)?,
            sandbox_limits: self.sandbox_limits()?,
            shutdown_deadline: self.seconds("SHUTDOWN_DEADLINE_SECONDS")?,
            workspace_root,
        })
    }
}

/// The TOML file's keys (upper or lower case) and values, as text.
fn read_file(path: &Path) -> Result<HashMap<&'static str, String>, ConfigError> {
    let bad = |message: String| ConfigError::Parse {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut values = HashMap::new();
    for (key, value) in file {
        let setting = table::SETTINGS
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(&key))
            .ok_or_else(|| bad(format!("unknown key `{key}`")))?;
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(x) if matches!(setting.kind, Kind::Amount) => x.to_string(),
            // A list joins as its kind splits: words on spaces, items on commas.
            toml::Value::Array(items) => {
                let separator = setting
                    .kind
                    .list_separator()
                    .ok_or_else(|| bad(format!("`{key}` takes one value, not a list")))?;
                items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| bad(format!("`{key}` must be a list of strings")))
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(separator)
            }
            _ => {
                return Err(bad(format!(
                    "`{key}` must be a string, a whole number, true or false, or a list of words"
                )));
            }
        };
        values.insert(setting.name, text);
    }
    Ok(values)
}

fn text_of(name: &str, value: Value) -> String {
    match value {
        Value::Text(text) => text,
        other => panic!("{name} is not text: {other:?}"),
    }
}

fn path_of(name: &str, value: Value) -> PathBuf {
    match value {
        Value::Path(path) => path,
        other => panic!("{name} is not a path: {other:?}"),
    }
}

fn number_of(name: &str, value: Value) -> u64 {
    match value {
        Value::Number(n) => n,
        other => panic!("{name} is not a number: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&'static str, &str)]) -> Settings {
        Settings::new(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    fn with_queue(pairs: &[(&'static str, &str)]) -> Settings {
        let mut all = vec![("INPUT_QUEUE_URL", "q")];
        all.extend_from_slice(pairs);
        settings(&all)
    }

    fn error(pairs: &[(&'static str, &str)]) -> String {
        with_queue(pairs)
            .worker_config("r")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = with_queue(&[]).worker_config("eu-west-1").unwrap();
        assert_eq!(c.workspace_root, PathBuf::from("/workspace"));
        assert_eq!(c.bucket_template, "edit.{clientId}.webordinary.com");
        assert_eq!(c.build.command, ["npm", "run", "build"]);
        assert_eq!(c.build.output_dir.as_path(), Path::new("dist"));
        assert_eq!(c.agent.bin, PathBuf::from("claude"));
        assert_eq!(c.agent.permission_mode, "acceptEdits");
        assert_eq!(
            c.agent.config_dir,
            Some(PathBuf::from("/workspace/.agent/claude"))
        );
        assert_eq!(c.agent.silence_timeout, c.agent.timeout);
        assert_eq!(c.max_command_bytes, 16 * 1024);
        assert!(c.output_queue_url.is_none());
        assert!(c.build.scripts_without_npm);
        assert_eq!(c.shutdown_deadline, Duration::from_secs(25));
        assert_eq!(c.publish.max_file_bytes, 100 << 20);
        assert_eq!(c.sandbox_limits.memory_bytes, 2 << 30);
        let npm = with_queue(&[("BUILD_SCRIPTS_WITHOUT_NPM", "false")])
            .worker_config("eu-west-1")
            .unwrap();
        assert!(!npm.build.scripts_without_npm);
        assert!(!with_queue(&[]).publish_options().unwrap().allow_mass_delete);
    }

    /// The actors' own defaults (`WorkerConfig::with_defaults`, which tests and the actors'
    /// `Default`s use) are the table's: nothing set gives exactly them.
    #[test]
    fn the_tables_defaults_are_the_actors_defaults() {
        let parsed = with_queue(&[]).worker_config("us-east-1").unwrap();
        let mut actors = WorkerConfig::with_defaults("q");
        // Worked out from WORKSPACE_ROOT, which the actors leave to the worker.
        actors.agent.config_dir = parsed.agent.config_dir.clone();
        assert_eq!(format!("{parsed:#?}"), format!("{actors:#?}"));
    }

    /// Every setting of the table is read when the configuration is built: one the parser
    /// forgot would be documented but do nothing.
    #[test]
    fn building_reads_every_setting() {
        let s = with_queue(&[]);
        s.worker_config("r").unwrap();
        let read = s.read.borrow();
        let unread: Vec<&str> = table::SETTINGS
            .iter()
            .map(|setting| setting.name)
            .filter(|name| !read.contains(name))
            .collect();
        assert!(unread.is_empty(), "never read: {unread:?}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = settings(&[]).worker_config("r").unwrap_err();
        assert_eq!(err.to_string(), "INPUT_QUEUE_URL is required");
        // A blank value is no value.
        let err = settings(&[("INPUT_QUEUE_URL", "  ")])
            .worker_config("r")
            .unwrap_err();
        assert_eq!(err.to_string(), "INPUT_QUEUE_URL is required");
        assert!(error(&[("BUILD_OUTPUT_DIR", "../x")]).starts_with("BUILD_OUTPUT_DIR: "));
        assert!(error(&[("CLIENT_ID", "../bob")]).starts_with("CLIENT_ID: "));
        assert_eq!(
            error(&[("MAX_IN_FLIGHT", "many")]),
            "MAX_IN_FLIGHT: `many` is not a whole number"
        );
        assert_eq!(
            error(&[("SHUTDOWN_DEADLINE_SECONDS", "0")]),
            "SHUTDOWN_DEADLINE_SECONDS: must be at least 1"
        );
        assert_eq!(
            error(&[("PUBLISH_MAX_DELETE_PERCENT", "101")]),
            "PUBLISH_MAX_DELETE_PERCENT: must be 0 to 100"
        );
        assert_eq!(
            error(&[("NPM_STORE_MAX_MB", &u64::MAX.to_string())]),
            "NPM_STORE_MAX_MB: is too large"
        );
        assert!(error(&[("ISOLATION", "chroot")]).starts_with("ISOLATION: `chroot` is not one of"));
        assert!(error(&[("CACHE_CONTROL_RULES", "no rule")]).starts_with("CACHE_CONTROL_RULES: "));
        assert!(error(&[("LEASE_STORE", "dynamodb://t")]).starts_with("LEASE_STORE: "));
        assert!(
            error(&[("CLOUDFRONT_DISTRIBUTIONS", "amelia")])
                .starts_with("CLOUDFRONT_DISTRIBUTIONS: ")
        );
        assert!(error(&[("AGENT_MAX_BUDGET_USD", "0")]).starts_with("AGENT_MAX_BUDGET_USD: "));
        assert!(error(&[("AGENT_MAX_TURNS", "5000000000")]).starts_with("AGENT_MAX_TURNS: "));
    }

    /// A value that no setting of its kind takes: each setting of those kinds refuses it with
    /// its own name first.
    #[test]
    fn every_checked_setting_names_itself_when_bad() {
        for setting in table::SETTINGS {
            let bad = match setting.kind {
                Kind::Number { .. } | Kind::Bytes => "lots",
                Kind::Flag => "maybe",
                Kind::Amount => "free",
                Kind::Choice(_) => "something-else",
                Kind::Label => "Not A Label",
                Kind::AbsolutePath => "relative/path",
                Kind::InsidePath => "/etc",
                Kind::Names => "NOT=A NAME",
                Kind::Text | Kind::Path | Kind::Words | Kind::List => continue,
            };
            let err = error(&[(setting.name, bad)]);
            assert!(
                err.starts_with(&format!("{}: ", setting.name)),
                "{}={bad}: {err}",
                setting.name
            );
        }
    }

    #[test]
    fn values_are_read_by_their_kind() {
        let c = with_queue(&[
            ("WORKSPACE_ROOT", "/srv/ws"),
            ("BUILD_COMMAND", "  node   build.mjs --fast "),
            ("BUILD_OUTPUT_DIR", "./site/out/"),
            ("PUBLISH_ALLOW_MASS_DELETE", "YES"),
            ("AGENT_SILENCE_SECONDS", "60"),
            ("AGENT_MAX_TURNS", "7"),
            ("AGENT_MAX_BUDGET_USD", "1.25"),
            ("AGENT_PERMISSION_MODE", "plan"),
            ("AGENT_ALLOWED_TOOLS", "Edit, Write,,Bash(npm run build)"),
            ("CLIENT_ID", "amelia"),
            ("BUILD_CONCURRENCY", "3"),
            ("VISIBILITY_TIMEOUT_SECONDS", "100000"),
            ("LEASE_SECONDS", "1"),
            ("SANDBOX_MAX_TMP_MB", "64"),
            ("NPM_STORE_MAX_AGE_DAYS", "2"),
            ("LEASE_STORE", "s3://leases/prod"),
            ("WORKER_ID", "w-1"),
            ("ISOLATION", "users+namespaces"),
            ("CLOUDFRONT_DISTRIBUTIONS", "amelia=E1, bob = E2"),
            ("HEALTH_FILE", "/tmp/health"),
        ])
        .worker_config("r")
        .unwrap();
        assert_eq!(c.workspace_root, PathBuf::from("/srv/ws"));
        assert_eq!(
            c.agent.config_dir,
            Some(PathBuf::from("/srv/ws/.agent/claude"))
        );
        assert_eq!(c.build.command, ["node", "build.mjs", "--fast"]);
        assert_eq!(c.build.output_dir.as_path(), Path::new("site/out"));
        assert!(c.publish.allow_mass_delete);
        assert_eq!(c.agent.silence_timeout, Duration::from_secs(60));
        assert_eq!(c.agent.max_turns, Some(7));
        assert_eq!(c.agent.max_budget_usd, Some(1.25));
        assert_eq!(c.agent.permission_mode, "plan");
        assert_eq!(
            c.agent.allowed_tools,
            ["Edit", "Write", "Bash(npm run build)"]
        );
        assert_eq!(c.only_client.as_deref(), Some("amelia"));
        assert_eq!(c.only_project, None);
        assert_eq!(c.build.concurrency, 3);
        // Past SQS's 12 hours and under one renewal a second, values are brought in range.
        assert_eq!(c.visibility_timeout, Duration::from_secs(43_200));
        assert_eq!(c.lease_duration, Duration::from_secs(3));
        assert_eq!(c.sandbox_limits.tmp_bytes, 64 << 20);
        assert_eq!(c.npm_store.max_age, Duration::from_secs(2 * 86_400));
        assert_eq!(
            c.lease_store,
            Some(StoreLocation::S3 {
                bucket: "leases".into(),
                prefix: "prod/".into()
            })
        );
        assert_eq!(c.worker_id, "w-1");
        assert_eq!(
            c.isolation,
            edit_worker_actors::tenant::sandbox::IsolationSetting::UsersAndNamespaces
        );
        assert_eq!(
            c.cloudfront_distributions,
            BTreeMap::from([
                ("amelia".to_owned(), "E1".to_owned()),
                ("bob".to_owned(), "E2".to_owned())
            ])
        );
        assert_eq!(c.health_file, Some(PathBuf::from("/tmp/health")));
    }

    /// Every word `ISOLATION` accepts is one the sandbox understands.
    #[test]
    fn isolation_choices_are_the_sandboxs() {
        let Kind::Choice(words) = table::setting("ISOLATION").kind else {
            panic!("ISOLATION is a choice");
        };
        for word in words {
            let c = with_queue(&[("ISOLATION", word)]).worker_config("r");
            assert!(c.is_ok(), "{word}");
        }
    }

    #[test]
    fn toml_file_sets_keys_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "input_queue_url = \"from-file\"\nBUILD_COMMAND = [\"node\", \"build.mjs\"]\n\
             MAX_IN_FLIGHT = 3\nAGENT_ALLOWED_TOOLS = [\"Edit\", \"Bash(npm run build)\"]\n\
             AGENT_MAX_BUDGET_USD = 2.5\nBUILD_SCRIPTS_WITHOUT_NPM = false\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        // The environment of the test process does not set these keys.
        let c = s.worker_config("r").unwrap();
        assert_eq!(c.input_queue_url, "from-file");
        assert_eq!(c.build.command, ["node", "build.mjs"]);
        assert_eq!(c.max_in_flight, 3);
        assert_eq!(c.agent.allowed_tools, ["Edit", "Bash(npm run build)"]);
        assert_eq!(c.agent.max_budget_usd, Some(2.5));
        assert!(!c.build.scripts_without_npm);
        for (bad, why) in [
            ("nonsense_key = 1\n", "unknown key `nonsense_key`"),
            ("MAX_IN_FLIGHT = [\"1\"]\n", "takes one value, not a list"),
            ("MAX_IN_FLIGHT = 1.5\n", "must be a string"),
            ("BUILD_COMMAND = [1, 2]\n", "must be a list of strings"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = Settings::load(Some(&path)).err().unwrap().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    /// The example file parses as it is, and with every line commented out put back: each
    /// default and example it shows is a value its setting takes.
    #[test]
    fn the_example_file_parses_with_and_without_its_comments() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/edit-worker.example.toml");
        let c = Settings::load(Some(&example))
            .unwrap()
            .worker_config("r")
            .unwrap();
        assert_eq!(c.bucket_template, "edit.{clientId}.webordinary.com");
        let text = std::fs::read_to_string(&example).unwrap();
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("all.toml");
        std::fs::write(&path, uncommented).unwrap();
        let c = Settings::load(Some(&path))
            .unwrap()
            .worker_config("r")
            .unwrap();
        assert_eq!(c.only_client.as_deref(), Some("amelia"));
        assert_eq!(c.max_in_flight, 64);
    }

    #[test]
    fn agent_env_allow_takes_variable_names() {
        let c = with_queue(&[(
            "AGENT_ENV_ALLOW",
            "MY_PROXY_TOKEN, CLAUDE_CODE_MAX_RETRIES,,",
        )])
        .worker_config("r")
        .unwrap();
        assert_eq!(
            c.agent.env_allow,
            ["MY_PROXY_TOKEN", "CLAUDE_CODE_MAX_RETRIES"]
        );
        for bad in ["A=B", "1ABC", "X Y", "PATH*"] {
            let err = error(&[("AGENT_ENV_ALLOW", bad)]);
            assert!(err.starts_with("AGENT_ENV_ALLOW"), "{bad}: {err}");
        }
    }

    #[test]
    fn install_mode_and_store_settings() {
        let c = with_queue(&[]).worker_config("r").unwrap();
        assert!(c.npm_store.shared);
        assert_eq!(
            c.npm_store.dir_under(&c.workspace_root),
            PathBuf::from("/workspace/.cache/npm-store")
        );
        let c = with_queue(&[
            ("INSTALL_MODE", "per-workspace"),
            ("NPM_STORE_DIR", "/var/cache/npm-store"),
            ("NPM_STORE_MAX_MB", "512"),
            ("NPM_STORE_MAX_AGE_DAYS", "2"),
        ])
        .worker_config("r")
        .unwrap();
        assert!(!c.npm_store.shared);
        assert_eq!(c.npm_store.dir, Some(PathBuf::from("/var/cache/npm-store")));
        assert_eq!(c.npm_store.max_bytes, 512 << 20);
        assert_eq!(c.npm_store.max_age, Duration::from_secs(2 * 86_400));
        for (key, bad) in [
            ("INSTALL_MODE", "pnpm"),
            ("NPM_STORE_DIR", "relative/store"),
            ("NPM_STORE_MAX_MB", "0"),
        ] {
            let err = error(&[(key, bad)]);
            assert!(err.starts_with(key), "{err}");
        }
    }
}
