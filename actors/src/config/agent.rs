//! How to run the agent (`CLAUDE_BIN` and the `AGENT_*`/`CLAUDE_*` settings): `AgentSpec`,
//! which the configuration carries and the agent step (`crate::steps::agent`) runs, and the input
//! mode the first run finds out. A settings type, kept here so that the configuration never
//! imports the step that reads it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// After the in-band interrupt, how long the agent gets to end its turn and report.
pub const INTERRUPT_GRACE: Duration = Duration::from_millis(1500);
/// After SIGINT, how long before the whole group is killed.
pub const SIGNAL_GRACE: Duration = Duration::from_secs(1);

/// How the request reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputMode {
    /// `--input-format stream-json`: a `user` message on stdin, stdin kept open for control
    /// requests (the in-band interrupt).
    StreamJson,
    /// The request as plain text on stdin, then end of input; interrupts are SIGINT.
    Text,
}

const MODE_UNKNOWN: u8 = 0;
const MODE_STREAM: u8 = 1;
const MODE_TEXT: u8 = 2;

/// How to run the agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The executable (`CLAUDE_BIN`).
    pub bin: PathBuf,
    /// Wall-clock limit of one run.
    pub timeout: Duration,
    /// A run that writes no event for this long is considered hung (the watchdog).
    pub silence_timeout: Duration,
    /// `CLAUDE_CONFIG_DIR` for the agent's session files, unless the environment sets one.
    pub config_dir: Option<PathBuf>,
    /// `--max-turns`.
    pub max_turns: Option<u32>,
    /// `--max-budget-usd`.
    pub max_budget_usd: Option<f64>,
    /// `--model`.
    pub model: Option<String>,
    /// `--permission-mode` (default `acceptEdits`: edits without asking, nothing else).
    pub permission_mode: String,
    /// `--allowedTools` / `--disallowedTools`, e.g. `Edit`, `Bash(npm run build)`.
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    /// `--append-system-prompt`: the site's conventions, for example.
    pub append_system_prompt: Option<String>,
    /// `AGENT_ENV_ALLOW`: more environment variable names passed to the agent.
    pub env_allow: Vec<String>,
    /// How long a stop waits after the in-band interrupt before SIGINT (`INTERRUPT_GRACE`).
    pub interrupt_grace: Duration,
    /// How long a stop waits after SIGINT before SIGKILL (`SIGNAL_GRACE`). A field, not only a
    /// constant, so that a test can give a CLI's signal handler time to run on a busy machine.
    pub signal_grace: Duration,
    /// Whether `CLAUDE_BIN` takes `--input-format stream-json`: found out by the first run and
    /// shared by every clone of the spec.
    input_mode: Arc<AtomicU8>,
}

impl AgentSpec {
    pub fn new(bin: PathBuf, timeout: Duration) -> AgentSpec {
        AgentSpec {
            bin,
            timeout,
            silence_timeout: timeout,
            config_dir: None,
            max_turns: None,
            max_budget_usd: None,
            model: None,
            permission_mode: "acceptEdits".into(),
            interrupt_grace: INTERRUPT_GRACE,
            signal_grace: SIGNAL_GRACE,
            allowed_tools: Vec::new(),
            disallowed_tools: Vec::new(),
            append_system_prompt: None,
            env_allow: Vec::new(),
            input_mode: Arc::new(AtomicU8::new(MODE_UNKNOWN)),
        }
    }

    /// The input mode the next run uses: stream-json unless the CLI refused it.
    pub fn input_mode(&self) -> InputMode {
        match self.input_mode.load(Ordering::Relaxed) {
            MODE_TEXT => InputMode::Text,
            _ => InputMode::StreamJson,
        }
    }

    /// Fix the input mode (tests; or a CLI known not to take stream-json input).
    pub fn set_input_mode(&self, mode: InputMode) {
        let value = match mode {
            InputMode::StreamJson => MODE_STREAM,
            InputMode::Text => MODE_TEXT,
        };
        self.input_mode.store(value, Ordering::Relaxed);
    }
}
