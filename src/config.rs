//! Configuration: the contract's environment variables, optionally set in a TOML file too.
//! The environment wins over the file. Every value is checked here, so a bad setting stops the
//! process at start (exit code 2) with a message that names it, instead of failing a job later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edit_worker_actors::config::{OutputDir, WorkerConfig};
use edit_worker_actors::message::check_dns_label;
use edit_worker_actors::npm_store::StoreSettings;
use edit_worker_actors::publish::{CacheRule, PublishOptions};
use edit_worker_actors::records::StoreLocation;
use edit_worker_actors::threads::ThreadStore;

/// Every key the worker reads; the TOML file may set the same ones.
const KEYS: &[&str] = &[
    "INPUT_QUEUE_URL",
    "OUTPUT_QUEUE_URL",
    "DEAD_LETTER_QUEUE_URL",
    "WORKSPACE_ROOT",
    "GIT_REMOTE_TEMPLATE",
    "BUCKET_TEMPLATE",
    "PREVIEW_URL_TEMPLATE",
    "CLAUDE_BIN",
    "BUILD_COMMAND",
    "BUILD_OUTPUT_DIR",
    "BUILD_SCRIPTS_WITHOUT_NPM",
    "CLIENT_ID",
    "PROJECT_ID",
    "MAX_COMMAND_BYTES",
    "AGENT_TIMEOUT_SECONDS",
    "AGENT_SILENCE_SECONDS",
    "AGENT_MAX_TURNS",
    "AGENT_MAX_BUDGET_USD",
    "AGENT_MODEL",
    "AGENT_PERMISSION_MODE",
    "AGENT_ALLOWED_TOOLS",
    "AGENT_DISALLOWED_TOOLS",
    "AGENT_APPEND_SYSTEM_PROMPT",
    "AGENT_ENV_ALLOW",
    "PROGRESS_INTERVAL_SECONDS",
    "BUILD_REPAIR_ATTEMPTS",
    "BUILD_TIMEOUT_SECONDS",
    "MAX_IN_FLIGHT",
    "VISIBILITY_TIMEOUT_SECONDS",
    "UPLOAD_CONCURRENCY",
    "CACHE_CONTROL_RULES",
    "PUBLISH_MAX_DELETE_PERCENT",
    "PUBLISH_ALLOW_MASS_DELETE",
    "PUBLISH_MAX_FILE_BYTES",
    "PUBLISH_MAX_BYTES",
    "PUSH_ATTEMPTS",
    "MAX_RECEIVES",
    "RETRY_BASE_SECONDS",
    "SHUTDOWN_DEADLINE_SECONDS",
    "HEALTH_FILE",
    "AGENT_CONCURRENCY",
    "BUILD_CONCURRENCY",
    "S3_UPLOAD_CONCURRENCY",
    "MAX_HELD_PER_WORKSPACE",
    "MAX_HELD_PER_CLIENT",
    "TRACE_COMMAND_CHARS",
    "CLOUDFRONT_DISTRIBUTIONS",
    "SESSION_IDLE_SECONDS",
    "INSTALL_MODE",
    "NPM_STORE_DIR",
    "NPM_STORE_MAX_MB",
    "NPM_STORE_MAX_AGE_DAYS",
    "LEASE_STORE",
    "WORKER_ID",
    "LEASE_SECONDS",
    "ISOLATION",
    "SANDBOX_MAX_PROCESSES",
    "SANDBOX_MAX_MEMORY_MB",
    "SANDBOX_MAX_FILE_MB",
    "SANDBOX_MAX_CPU_SECONDS",
    "SANDBOX_MAX_TMP_MB",
    "SANDBOX_MAX_DISK_MB",
];

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
    values: HashMap<String, String>,
}

impl Settings {
    /// Read the TOML file (if any), then overlay the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut values = HashMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            for (key, value) in table {
                let upper = key.to_ascii_uppercase();
                if !KEYS.contains(&upper.as_str()) {
                    return Err(ConfigError::Parse {
                        path: path.to_owned(),
                        message: format!("unknown key `{key}`"),
                    });
                }
                let bad = || ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!(
                        "`{key}` must be a string, a whole number, true or false, or a list of words"
                    ),
                };
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Array(words) => words
                        .iter()
                        .map(|w| w.as_str().map(str::to_owned).ok_or_else(bad))
                        .collect::<Result<Vec<_>, _>>()?
                        .join(" "),
                    _ => return Err(bad()),
                };
                values.insert(upper, text);
            }
        }
        for key in KEYS {
            if let Ok(v) = std::env::var(key) {
                values.insert((*key).to_owned(), v);
            }
        }
        Ok(Settings { values })
    }

    pub fn get(&self, key: &'static str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    pub fn require(&self, key: &'static str) -> Result<&str, ConfigError> {
        self.get(key).ok_or(ConfigError::Missing { key })
    }

    fn number(&self, key: &'static str, default: u64) -> Result<u64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| ConfigError::Invalid {
                key,
                message: format!("`{v}` is not a whole number"),
            }),
        }
    }

    fn positive(&self, key: &'static str, default: u64) -> Result<u64, ConfigError> {
        let n = self.number(key, default)?;
        if n == 0 {
            return Err(ConfigError::Invalid {
                key,
                message: "must be at least 1".into(),
            });
        }
        Ok(n)
    }

    fn flag(&self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "1" | "true" | "yes") => Ok(true),
            Some(v) if matches!(v.as_str(), "0" | "false" | "no") => Ok(false),
            Some(v) => Err(ConfigError::Invalid {
                key,
                message: format!("`{v}` is not true or false"),
            }),
        }
    }

    /// The agent's limits, model, permissions and tools.
    fn agent_limits(&self, c: &mut WorkerConfig) -> Result<(), ConfigError> {
        let a = &mut c.agent;
        a.timeout =
            Duration::from_secs(self.positive("AGENT_TIMEOUT_SECONDS", a.timeout.as_secs())?);
        // The watchdog: by default as long as the whole run may take.
        a.silence_timeout =
            Duration::from_secs(self.positive("AGENT_SILENCE_SECONDS", a.timeout.as_secs())?);
        a.config_dir = Some(ThreadStore::default_agent_config_dir(&c.workspace_root));
        if self.get("AGENT_MAX_TURNS").is_some() {
            a.max_turns = Some(self.positive("AGENT_MAX_TURNS", 1)? as u32);
        }
        if let Some(v) = self.get("AGENT_MAX_BUDGET_USD") {
            let usd: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|x: &f64| *x > 0.0)
                .ok_or_else(|| ConfigError::Invalid {
                    key: "AGENT_MAX_BUDGET_USD",
                    message: format!("`{v}` is not a positive amount"),
                })?;
            a.max_budget_usd = Some(usd);
        }
        a.model = self.get("AGENT_MODEL").map(str::to_owned);
        if let Some(mode) = self.get("AGENT_PERMISSION_MODE") {
            const MODES: &[&str] = &[
                "acceptEdits",
                "bypassPermissions",
                "plan",
                "default",
                "dontAsk",
                "auto",
            ];
            if !MODES.contains(&mode) {
                return Err(ConfigError::Invalid {
                    key: "AGENT_PERMISSION_MODE",
                    message: format!("`{mode}` is not one of {}", MODES.join(", ")),
                });
            }
            a.permission_mode = mode.to_owned();
        }
        let tools = |key| -> Vec<String> {
            self.get(key)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        a.allowed_tools = tools("AGENT_ALLOWED_TOOLS");
        a.disallowed_tools = tools("AGENT_DISALLOWED_TOOLS");
        a.append_system_prompt = self.get("AGENT_APPEND_SYSTEM_PROMPT").map(str::to_owned);
        // More environment variables for the agent, by name (its allow-list is in agent.rs).
        a.env_allow = tools("AGENT_ENV_ALLOW");
        if let Some(bad) = a.env_allow.iter().find(|name| {
            let mut chars = name.chars();
            !chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        }) {
            return Err(ConfigError::Invalid {
                key: "AGENT_ENV_ALLOW",
                message: format!("`{bad}` is not an environment variable name"),
            });
        }
        c.progress_interval = Duration::from_secs(
            self.number("PROGRESS_INTERVAL_SECONDS", c.progress_interval.as_secs())?,
        );
        c.build_repair_attempts =
            self.number("BUILD_REPAIR_ATTEMPTS", c.build_repair_attempts as u64)? as u32;
        Ok(())
    }

    /// Dependencies: `INSTALL_MODE` (`shared` or `per-workspace`) and the shared store's folder
    /// and limits.
    fn npm_store(&self, s: &mut StoreSettings) -> Result<(), ConfigError> {
        match self.get("INSTALL_MODE").map(str::trim) {
            None | Some("shared") => s.shared = true,
            Some("per-workspace") => s.shared = false,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "INSTALL_MODE",
                    message: format!("`{other}` is not `shared` or `per-workspace`"),
                });
            }
        }
        if let Some(dir) = self.get("NPM_STORE_DIR") {
            let dir = PathBuf::from(dir);
            if !dir.is_absolute() {
                return Err(ConfigError::Invalid {
                    key: "NPM_STORE_DIR",
                    message: "must be an absolute path".into(),
                });
            }
            s.dir = Some(dir);
        }
        s.max_bytes = self.positive("NPM_STORE_MAX_MB", s.max_bytes >> 20)? << 20;
        s.max_age = Duration::from_secs(
            self.positive("NPM_STORE_MAX_AGE_DAYS", s.max_age.as_secs() / 86_400)? * 86_400,
        );
        Ok(())
    }

    /// How builds are published; also used by `edit-worker publish`.
    pub fn publish_options(&self) -> Result<PublishOptions, ConfigError> {
        let mut p = PublishOptions::default();
        p.concurrency = self.positive("UPLOAD_CONCURRENCY", p.concurrency as u64)? as usize;
        if let Some(rules) = self.get("CACHE_CONTROL_RULES") {
            p.cache_rules =
                CacheRule::parse_list(rules).map_err(|message| ConfigError::Invalid {
                    key: "CACHE_CONTROL_RULES",
                    message,
                })?;
        }
        let percent = self.number("PUBLISH_MAX_DELETE_PERCENT", p.max_delete_percent as u64)?;
        if percent > 100 {
            return Err(ConfigError::Invalid {
                key: "PUBLISH_MAX_DELETE_PERCENT",
                message: "must be 0 to 100".into(),
            });
        }
        p.max_delete_percent = percent as u8;
        p.allow_mass_delete = self.flag("PUBLISH_ALLOW_MASS_DELETE", p.allow_mass_delete)?;
        p.total_concurrency =
            self.positive("S3_UPLOAD_CONCURRENCY", p.total_concurrency as u64)? as usize;
        p.max_file_bytes = self.positive("PUBLISH_MAX_FILE_BYTES", p.max_file_bytes)?;
        p.max_total_bytes = self.positive("PUBLISH_MAX_BYTES", p.max_total_bytes)?;
        Ok(p)
    }

    /// The worker's configuration for `run`.
    pub fn worker_config(&self, region: &str) -> Result<WorkerConfig, ConfigError> {
        let mut c = WorkerConfig::with_defaults(self.require("INPUT_QUEUE_URL")?);
        c.region = region.to_owned();
        c.output_queue_url = self.get("OUTPUT_QUEUE_URL").map(str::to_owned);
        c.dead_letter_queue_url = self.get("DEAD_LETTER_QUEUE_URL").map(str::to_owned);
        if let Some(root) = self.get("WORKSPACE_ROOT") {
            c.workspace_root = PathBuf::from(root);
        }
        if !c.workspace_root.is_absolute() {
            c.workspace_root = std::env::current_dir()
                .map_err(|e| ConfigError::Invalid {
                    key: "WORKSPACE_ROOT",
                    message: e.to_string(),
                })?
                .join(&c.workspace_root);
        }
        c.git_remote_template = self.get("GIT_REMOTE_TEMPLATE").map(str::to_owned);
        c.health_file = self.get("HEALTH_FILE").map(PathBuf::from);
        if let Some(t) = self.get("BUCKET_TEMPLATE") {
            c.bucket_template = t.to_owned();
        }
        if let Some(t) = self.get("PREVIEW_URL_TEMPLATE") {
            c.preview_url_template = t.to_owned();
        }
        if let Some(bin) = self.get("CLAUDE_BIN") {
            c.agent.bin = PathBuf::from(bin);
        }
        if let Some(cmd) = self.get("BUILD_COMMAND") {
            // argv words, split on white space: there is no shell, hence no quoting.
            c.build_command = cmd.split_whitespace().map(str::to_owned).collect();
        }
        if let Some(dir) = self.get("BUILD_OUTPUT_DIR") {
            c.build_output_dir = OutputDir::new(dir).map_err(|e| ConfigError::Invalid {
                key: "BUILD_OUTPUT_DIR",
                message: e.to_string(),
            })?;
        }
        c.build_scripts_without_npm =
            self.flag("BUILD_SCRIPTS_WITHOUT_NPM", c.build_scripts_without_npm)?;
        for (key, slot) in [
            ("CLIENT_ID", &mut c.only_client),
            ("PROJECT_ID", &mut c.only_project),
        ] {
            if let Some(id) = self.get(key) {
                check_dns_label("id", id).map_err(|e| ConfigError::Invalid {
                    key,
                    message: e.to_string(),
                })?;
                *slot = Some(id.to_owned());
            }
        }
        c.max_command_bytes =
            self.positive("MAX_COMMAND_BYTES", c.max_command_bytes as u64)? as usize;
        self.agent_limits(&mut c)?;
        c.build_timeout =
            Duration::from_secs(self.positive("BUILD_TIMEOUT_SECONDS", c.build_timeout.as_secs())?);
        c.max_in_flight = self.positive("MAX_IN_FLIGHT", c.max_in_flight as u64)? as usize;
        c.max_held_per_workspace =
            self.positive("MAX_HELD_PER_WORKSPACE", c.max_held_per_workspace as u64)? as usize;
        if let Some(map) = self.get("CLOUDFRONT_DISTRIBUTIONS") {
            for pair in map.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (client, distribution) = pair
                    .split_once('=')
                    .map(|(c, d)| (c.trim(), d.trim()))
                    .filter(|(c, d)| check_dns_label("id", c).is_ok() && !d.is_empty())
                    .ok_or_else(|| ConfigError::Invalid {
                        key: "CLOUDFRONT_DISTRIBUTIONS",
                        message: format!("`{pair}` is not clientId=DISTRIBUTIONID"),
                    })?;
                c.cloudfront_distributions
                    .insert(client.to_owned(), distribution.to_owned());
            }
        }
        c.trace_command_chars =
            self.number("TRACE_COMMAND_CHARS", c.trace_command_chars as u64)? as usize;
        c.max_held_per_client =
            self.positive("MAX_HELD_PER_CLIENT", c.max_held_per_client as u64)? as usize;
        c.agent_concurrency =
            self.positive("AGENT_CONCURRENCY", c.agent_concurrency as u64)? as usize;
        c.build_concurrency =
            self.positive("BUILD_CONCURRENCY", c.build_concurrency as u64)? as usize;
        c.session_idle =
            Duration::from_secs(self.positive("SESSION_IDLE_SECONDS", c.session_idle.as_secs())?);
        c.visibility_timeout = Duration::from_secs(
            self.positive("VISIBILITY_TIMEOUT_SECONDS", c.visibility_timeout.as_secs())?
                .min(43_200),
        );
        c.publish = self.publish_options()?;
        c.push_attempts = self.positive("PUSH_ATTEMPTS", c.push_attempts as u64)? as u32;
        c.max_receives = self.positive("MAX_RECEIVES", c.max_receives as u64)? as u32;
        c.retry_base_delay =
            Duration::from_secs(self.number("RETRY_BASE_SECONDS", c.retry_base_delay.as_secs())?);
        self.npm_store(&mut c.npm_store)?;
        if let Some(store) = self.get("LEASE_STORE") {
            c.lease_store =
                Some(
                    StoreLocation::parse(store).map_err(|message| ConfigError::Invalid {
                        key: "LEASE_STORE",
                        message,
                    })?,
                );
        }
        if let Some(id) = self.get("WORKER_ID") {
            c.worker_id = id.to_owned();
        }
        c.lease_duration = Duration::from_secs(
            self.positive("LEASE_SECONDS", c.lease_duration.as_secs())?
                .max(3),
        );
        if let Some(isolation) = self.get("ISOLATION") {
            c.isolation = isolation.parse().map_err(|message| ConfigError::Invalid {
                key: "ISOLATION",
                message,
            })?;
        }
        let l = &mut c.sandbox_limits;
        l.processes = self.positive("SANDBOX_MAX_PROCESSES", l.processes)?;
        l.memory_bytes = self.positive("SANDBOX_MAX_MEMORY_MB", l.memory_bytes >> 20)? << 20;
        l.file_bytes = self.positive("SANDBOX_MAX_FILE_MB", l.file_bytes >> 20)? << 20;
        l.cpu_seconds = self.positive("SANDBOX_MAX_CPU_SECONDS", l.cpu_seconds)?;
        l.tmp_bytes = self.positive("SANDBOX_MAX_TMP_MB", l.tmp_bytes >> 20)? << 20;
        l.disk_bytes = self.positive("SANDBOX_MAX_DISK_MB", l.disk_bytes >> 20)? << 20;
        c.shutdown_deadline = Duration::from_secs(
            self.positive("SHUTDOWN_DEADLINE_SECONDS", c.shutdown_deadline.as_secs())?,
        );
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        Settings {
            values: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = settings(&[("INPUT_QUEUE_URL", "q")])
            .worker_config("eu-west-1")
            .unwrap();
        assert_eq!(c.workspace_root, PathBuf::from("/workspace"));
        assert_eq!(c.bucket_template, "edit.{clientId}.webordinary.com");
        assert_eq!(c.build_command, ["npm", "run", "build"]);
        assert_eq!(c.build_output_dir.as_path(), Path::new("dist"));
        assert_eq!(c.agent.bin, PathBuf::from("claude"));
        assert_eq!(c.agent.permission_mode, "acceptEdits");
        assert_eq!(
            c.agent.config_dir,
            Some(PathBuf::from("/workspace/.agent/claude"))
        );
        assert_eq!(c.max_command_bytes, 16 * 1024);
        assert!(c.output_queue_url.is_none());
        assert!(c.build_scripts_without_npm);
        assert_eq!(c.shutdown_deadline, Duration::from_secs(25));
        let npm = settings(&[
            ("INPUT_QUEUE_URL", "q"),
            ("BUILD_SCRIPTS_WITHOUT_NPM", "false"),
        ])
        .worker_config("eu-west-1")
        .unwrap();
        assert!(!npm.build_scripts_without_npm);
        assert!(
            !settings(&[("INPUT_QUEUE_URL", "q")])
                .publish_options()
                .unwrap()
                .allow_mass_delete
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = settings(&[]).worker_config("r").unwrap_err();
        assert_eq!(err.to_string(), "INPUT_QUEUE_URL is required");
        for bad in ["../x", "/srv/dist", ".", ".git"] {
            let err = settings(&[("INPUT_QUEUE_URL", "q"), ("BUILD_OUTPUT_DIR", bad)])
                .worker_config("r")
                .unwrap_err();
            assert!(err.to_string().starts_with("BUILD_OUTPUT_DIR: "), "{err}");
        }
        let c = settings(&[("INPUT_QUEUE_URL", "q"), ("BUILD_OUTPUT_DIR", "./site/")])
            .worker_config("r")
            .unwrap();
        assert_eq!(c.build_output_dir.as_path(), Path::new("site"));
        let err = settings(&[("INPUT_QUEUE_URL", "q"), ("CLIENT_ID", "../bob")])
            .worker_config("r")
            .unwrap_err();
        assert!(err.to_string().starts_with("CLIENT_ID"));
        let err = settings(&[("INPUT_QUEUE_URL", "q"), ("MAX_IN_FLIGHT", "many")])
            .worker_config("r")
            .unwrap_err();
        assert!(err.to_string().starts_with("MAX_IN_FLIGHT"));
        let err = settings(&[("INPUT_QUEUE_URL", "q"), ("SHUTDOWN_DEADLINE_SECONDS", "0")])
            .worker_config("r")
            .unwrap_err();
        assert!(err.to_string().starts_with("SHUTDOWN_DEADLINE_SECONDS"));
    }

    #[test]
    fn toml_file_sets_keys_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "input_queue_url = \"from-file\"\nBUILD_COMMAND = [\"node\", \"build.mjs\"]\nMAX_IN_FLIGHT = 3\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        // The environment of the test process does not set these keys.
        let c = s.worker_config("r").unwrap();
        assert_eq!(c.build_command, ["node", "build.mjs"]);
        assert_eq!(c.max_in_flight, 3);
        // The example shipped in config/ parses.
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/edit-worker.example.toml");
        let c = Settings::load(Some(&example))
            .unwrap()
            .worker_config("r")
            .unwrap();
        assert_eq!(c.bucket_template, "edit.{clientId}.webordinary.com");
        std::fs::write(&path, "nonsense_key = 1\n").unwrap();
        assert!(Settings::load(Some(&path)).is_err());
    }

    #[test]
    fn agent_env_allow_takes_variable_names() {
        let c = settings(&[
            ("INPUT_QUEUE_URL", "q"),
            (
                "AGENT_ENV_ALLOW",
                "MY_PROXY_TOKEN, CLAUDE_CODE_MAX_RETRIES,,",
            ),
        ])
        .worker_config("r")
        .unwrap();
        assert_eq!(
            c.agent.env_allow,
            ["MY_PROXY_TOKEN", "CLAUDE_CODE_MAX_RETRIES"]
        );
        for bad in ["A=B", "1ABC", "X Y", "PATH*"] {
            let err = settings(&[("INPUT_QUEUE_URL", "q"), ("AGENT_ENV_ALLOW", bad)])
                .worker_config("r")
                .unwrap_err();
            assert!(
                err.to_string().starts_with("AGENT_ENV_ALLOW"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn install_mode_and_store_settings() {
        let c = settings(&[("INPUT_QUEUE_URL", "q")])
            .worker_config("r")
            .unwrap();
        assert!(c.npm_store.shared);
        assert_eq!(
            c.npm_store.dir_under(&c.workspace_root),
            PathBuf::from("/workspace/.cache/npm-store")
        );
        let c = settings(&[
            ("INPUT_QUEUE_URL", "q"),
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
            let err = settings(&[("INPUT_QUEUE_URL", "q"), (key, bad)])
                .worker_config("r")
                .unwrap_err();
            assert!(err.to_string().starts_with(key), "{err}");
        }
    }
}
