//! Runs the coding agent: anything that speaks the Claude Code CLI contract.
//!
//! `claude -p --output-format stream-json --verbose --permission-mode acceptEdits`, with the
//! request on stdin. The request goes on stdin rather than as the positional argument because a
//! request that starts with `-` would otherwise be read as a flag (argument injection); the CLI
//! reads its prompt from stdin when no positional prompt is given.
//!
//! Success is decided the way the contract says: the last `result` event has
//! `subtype == "success"` and `is_error == false`. The exit code alone lies (an API error can exit
//! 0). The agent runs in its own process group, so that stopping it stops everything it started.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::process;

/// What the agent may see besides `process::BASE_ENV`: its credentials and settings. The
/// worker's own AWS credentials and queue URLs are withheld: the agent runs code from a model.
const AGENT_ENV: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_MODEL",
    "ANTHROPIC_BASE_URL",
    "CLAUDE_CONFIG_DIR",
    "CLAUDE_CODE_USE_BEDROCK",
];
/// Passed only when the agent uses Bedrock (`CLAUDE_CODE_USE_BEDROCK=1`), which needs AWS.
const BEDROCK_ENV: &[&str] = &[
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
];
/// After SIGINT the agent gets this long to end its turn before the whole group is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// How much of the agent's stderr is kept for the error message.
const STDERR_TAIL_BYTES: usize = 4096;

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
            allowed_tools: Vec::new(),
            disallowed_tools: Vec::new(),
            append_system_prompt: None,
        }
    }

    /// The command line, without the prompt (which goes on stdin).
    pub fn args(&self, session: &AgentSession) -> Vec<String> {
        let mut args: Vec<String> = [
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-mode",
        ]
        .map(String::from)
        .to_vec();
        args.push(self.permission_mode.clone());
        match session {
            AgentSession::New(id) => args.extend(["--session-id".into(), id.clone()]),
            AgentSession::Resume(id) => args.extend(["--resume".into(), id.clone()]),
        }
        if let Some(n) = self.max_turns {
            args.extend(["--max-turns".into(), n.to_string()]);
        }
        if let Some(usd) = self.max_budget_usd {
            args.extend(["--max-budget-usd".into(), usd.to_string()]);
        }
        if let Some(model) = &self.model {
            args.extend(["--model".into(), model.clone()]);
        }
        if !self.allowed_tools.is_empty() {
            args.extend(["--allowedTools".into(), self.allowed_tools.join(",")]);
        }
        if !self.disallowed_tools.is_empty() {
            args.extend(["--disallowedTools".into(), self.disallowed_tools.join(",")]);
        }
        if let Some(prompt) = &self.append_system_prompt {
            args.extend(["--append-system-prompt".into(), prompt.clone()]);
        }
        args
    }
}

/// Which conversation a run belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentSession {
    /// Start a conversation with this id (the thread's first message).
    New(String),
    /// Continue this conversation (later messages of the thread).
    Resume(String),
}

/// What a successful run reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReport {
    pub result: Option<String>,
    pub session_id: Option<String>,
    pub total_cost_usd: Option<f64>,
    pub num_turns: Option<u64>,
    pub subtype: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("could not start the agent `{bin}`: {source}")]
    Spawn {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent ran longer than {0:?} and was stopped")]
    Timeout(Duration),
    #[error("the agent wrote nothing for {0:?} and was stopped")]
    Silent(Duration),
    #[error("the agent ended without a result ({exit}){stderr}")]
    NoResult { exit: String, stderr: String },
    #[error("the agent reported {subtype}{}: {detail}", if *is_error { " with is_error" } else { "" })]
    Reported {
        subtype: String,
        is_error: bool,
        detail: String,
        report: AgentReport,
    },
    #[error("the agent was interrupted")]
    Interrupted,
    #[error("the agent has no conversation {0} to resume")]
    SessionNotFound(String),
    #[error("reading the agent's output: {0}")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// Stable kind for the status event.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::Spawn { .. } => "agent_unavailable",
            AgentError::Timeout(_) => "agent_timeout",
            AgentError::Silent(_) => "agent_silent",
            AgentError::NoResult { .. } => "agent_no_result",
            AgentError::Reported { subtype, .. } => match subtype.as_str() {
                "error_max_turns" => "agent_max_turns",
                "error_max_budget_usd" => "agent_max_budget",
                "error_during_execution" => "agent_execution_error",
                // `success` with `is_error: true`: an API error dressed as success.
                "success" => "agent_api_error",
                _ => "agent_error",
            },
            AgentError::Interrupted => "interrupted",
            AgentError::SessionNotFound(_) => "agent_session_lost",
            AgentError::Io(_) => "agent_io",
        }
    }
}

/// The one event we need the fields of; the others are read as loose JSON.
#[derive(Deserialize)]
struct ResultEvent {
    subtype: Option<String>,
    is_error: Option<bool>,
    result: Option<String>,
    session_id: Option<String>,
    total_cost_usd: Option<f64>,
    num_turns: Option<u64>,
    errors: Option<serde_json::Value>,
}

/// Something the agent is doing, for progress reports.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentActivity {
    Started {
        session_id: Option<String>,
    },
    ToolUse {
        tool: String,
        target: Option<String>,
    },
}

/// Run the agent on `prompt` in `cwd`. `cancel` stops it (SIGINT, then SIGKILL after a grace
/// period); `on_activity` sees what it does as it happens.
pub async fn run_agent(
    spec: &AgentSpec,
    cwd: &Path,
    prompt: &str,
    session: &AgentSession,
    cancel: &CancellationToken,
    mut on_activity: impl FnMut(AgentActivity) + Send,
) -> Result<AgentReport, AgentError> {
    let mut cmd = Command::new(&spec.bin);
    cmd.args(spec.args(session))
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a signal to the group reaches every process it started.
        .process_group(0)
        .kill_on_drop(true);
    apply_agent_env(&mut cmd);
    if std::env::var_os("CLAUDE_CONFIG_DIR").is_none()
        && let Some(dir) = &spec.config_dir
    {
        cmd.env("CLAUDE_CONFIG_DIR", dir);
    }
    die_with_parent(&mut cmd);

    let mut child = cmd.spawn().map_err(|source| AgentError::Spawn {
        bin: spec.bin.display().to_string(),
        source,
    })?;
    let pgid = child.id().map(|id| id as i32);
    let guard = GroupGuard(pgid);

    let mut stdin = child.stdin.take().expect("stdin is piped");
    let prompt = prompt.to_owned();
    // Written from its own task: a prompt larger than the pipe buffer must not block reading.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(prompt.as_bytes()).await;
        let _ = stdin.shutdown().await;
    });
    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_task = tokio::spawn(read_tail(stderr));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();

    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut last_output = Instant::now();
    let mut result: Option<ResultEvent> = None;
    let outcome: Result<(), AgentError> = loop {
        let silence_left = spec.silence_timeout.saturating_sub(last_output.elapsed());
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    last_output = Instant::now();
                    if let Some(r) = read_event(&line, &mut on_activity) {
                        result = Some(r);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.into()),
            },
            _ = cancel.cancelled() => {
                stop_group(pgid, &mut child).await;
                break Err(AgentError::Interrupted);
            }
            _ = tokio::time::sleep_until(deadline) => {
                guard.kill();
                break Err(AgentError::Timeout(spec.timeout));
            }
            _ = tokio::time::sleep(silence_left) => {
                guard.kill();
                break Err(AgentError::Silent(spec.silence_timeout));
            }
        }
    };
    writer.abort();
    // stdout is closed (or we gave up on it); the process should be gone or going.
    let status = match tokio::time::timeout(INTERRUPT_GRACE, child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        _ => {
            guard.kill();
            child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string())
        }
    };
    // Anything it left running in its group goes with it.
    guard.kill();
    let stderr_tail = stderr_task.await.unwrap_or_default();
    outcome?;

    let Some(event) = result else {
        if let AgentSession::Resume(id) = session
            && stderr_tail.contains("No conversation found")
        {
            return Err(AgentError::SessionNotFound(id.clone()));
        }
        let stderr = if stderr_tail.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", stderr_tail.trim())
        };
        return Err(AgentError::NoResult {
            exit: status,
            stderr,
        });
    };
    let subtype = event.subtype.unwrap_or_default();
    let is_error = event.is_error.unwrap_or(true);
    let report = AgentReport {
        result: event.result.clone(),
        session_id: event.session_id,
        total_cost_usd: event.total_cost_usd,
        num_turns: event.num_turns,
        subtype: subtype.clone(),
    };
    if subtype == "success" && !is_error {
        Ok(report)
    } else {
        let detail = event
            .errors
            .map(|e| e.to_string())
            .or(event.result)
            .unwrap_or_else(|| "no detail given".into());
        Err(AgentError::Reported {
            subtype,
            is_error,
            detail,
            report,
        })
    }
}

/// Linux: the agent gets SIGKILL when the worker dies, even by `kill -9`, so a crashed worker
/// leaves no agent editing the workspace behind the next worker's back.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

fn apply_agent_env(cmd: &mut Command) {
    let bedrock = std::env::var("CLAUDE_CODE_USE_BEDROCK").is_ok_and(|v| v == "1" || v == "true");
    let allowed: Vec<&str> = AGENT_ENV
        .iter()
        .chain(if bedrock { BEDROCK_ENV } else { &[] })
        .copied()
        .collect();
    process::allow_env(cmd, &allowed);
    // A headless agent must not try to update itself in the middle of a request.
    cmd.env("DISABLE_AUTOUPDATER", "1");
}

/// Parse one stream-json line; returns the result event when this is it.
fn read_event(line: &str, on_activity: &mut impl FnMut(AgentActivity)) -> Option<ResultEvent> {
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => {
            tracing::debug!(line, "agent wrote a line that is not JSON");
            return None;
        }
    };
    match value.get("type").and_then(|t| t.as_str()) {
        Some("result") => serde_json::from_value(value).ok(),
        Some("system") if value.get("subtype").and_then(|s| s.as_str()) == Some("init") => {
            on_activity(AgentActivity::Started {
                session_id: value
                    .get("session_id")
                    .and_then(|s| s.as_str())
                    .map(str::to_owned),
            });
            None
        }
        Some("assistant") => {
            let blocks = value
                .pointer("/message/content")
                .and_then(|c| c.as_array())
                .cloned()
                .unwrap_or_default();
            for block in blocks {
                if block.get("type").and_then(|t| t.as_str()) == Some("tool_use") {
                    let tool = block
                        .get("name")
                        .and_then(|n| n.as_str())
                        .unwrap_or("tool")
                        .to_owned();
                    let input = block.get("input");
                    let target = ["file_path", "path", "command", "pattern"]
                        .iter()
                        .find_map(|k| input.and_then(|i| i.get(k)).and_then(|v| v.as_str()))
                        .map(|s| s.chars().take(200).collect());
                    on_activity(AgentActivity::ToolUse { tool, target });
                }
            }
            None
        }
        _ => None,
    }
}

/// SIGINT to the group, then SIGKILL if it is still there after the grace period.
async fn stop_group(pgid: Option<i32>, child: &mut Child) {
    process::signal_group(pgid, nix::sys::signal::Signal::SIGINT);
    if tokio::time::timeout(INTERRUPT_GRACE, child.wait())
        .await
        .is_err()
    {
        process::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Kills the agent's process group when dropped, so that no path out of `run_agent` (including
/// the future being dropped) leaves agent processes behind.
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&self) {
        process::signal_group(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Read a stream to its end, keeping only the last `STDERR_TAIL_BYTES`.
async fn read_tail(mut stream: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut tail: VecDeque<u8> = VecDeque::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.extend(&buf[..n]);
        while tail.len() > STDERR_TAIL_BYTES {
            tail.pop_front();
        }
    }
    String::from_utf8_lossy(tail.make_contiguous()).into_owned()
}
