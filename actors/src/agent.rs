//! Runs the coding agent: anything that speaks the Claude Code CLI contract.
//!
//! `claude -p --output-format stream-json --verbose --input-format stream-json
//! --permission-mode acceptEdits`, with the request on stdin as one stream-json `user` message.
//! The request never goes on the command line: a request that starts with `-` would otherwise be
//! read as a flag (argument injection). stdin stays open while the agent works, so that an
//! interrupt can be sent in-band (`control_request` `interrupt`): the agent ends its turn, writes
//! the interrupted request into its conversation and reports a `result` with its cost. A CLI that
//! does not know `--input-format` (an older one, or the stand-in) is run with the request as plain
//! stdin text instead, and interrupted with SIGINT; the choice is made once per process.
//!
//! Success is decided the way the contract says: the last `result` event has
//! `subtype == "success"` and `is_error == false`. The exit code alone lies (an API error can exit
//! 0). The agent runs in its own process group, so that stopping it stops everything it started.
//!
//! Stopping, in order: the in-band interrupt, then (after `INTERRUPT_GRACE` without a result)
//! SIGINT to the group, then (after `SIGNAL_GRACE`) SIGKILL. A CLI that has printed its result
//! but does not exit within `EXIT_AFTER_RESULT` (a known hang) is killed; its result stands.
//!
//! The agent joins the message's trace: it gets `TRACEPARENT` of the job's `agent run` span
//! (ractor carries the span into the agent actor's handler). What the pinned CLI (2.1.332,
//! checked in tests/suite/real_cli.rs) does with it: in headless mode it takes it as the parent of its
//! own spans, which it exports only when its telemetry is on (`CLAUDE_CODE_ENABLE_TELEMETRY=1`,
//! `CLAUDE_CODE_ENHANCED_TELEMETRY_BETA=1`, `OTEL_TRACES_EXPORTER=otlp` and an OTLP endpoint:
//! the worker sets these when it exports traces itself, see `agent_env`). Then one
//! `claude_code.interaction` span per turn sits under `agent run`, with `claude_code.llm_request`
//! and `claude_code.tool` (`.execution`, `.blocked_on_user`) spans below it. With
//! `CLAUDE_CODE_PROPAGATE_TRACEPARENT=1` (allow it with `AGENT_ENV_ALLOW`) the CLI also sends a
//! `traceparent` header with each model request.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::config::{AgentSpec, InputMode};
use crate::process;
use crate::sandbox::Jail;

/// What the agent may see besides `process::BASE_ENV`: its credentials and settings. The
/// worker's own AWS credentials and queue URLs are withheld: the agent runs code from a model.
/// `AGENT_ENV_ALLOW` adds names.
pub const AGENT_ENV: &[&str] = &[
    // Credentials and where the model is.
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CONFIG_DIR",
    "CLAUDE_CODE_USE_BEDROCK",
    // Vertex AI: its switch, region, project and Google credentials file.
    "CLAUDE_CODE_USE_VERTEX",
    "CLOUD_ML_REGION",
    "ANTHROPIC_VERTEX_PROJECT_ID",
    "GOOGLE_APPLICATION_CREDENTIALS",
    // Proxies and a private certificate authority.
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "NODE_EXTRA_CA_CERTS",
    // Model selection (and `ANTHROPIC_DEFAULT_*_MODEL`, see `AGENT_ENV_PATTERNS`).
    "ANTHROPIC_MODEL",
    "ANTHROPIC_SMALL_FAST_MODEL",
    // Quiet, fixed behaviour.
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
    "DISABLE_AUTOUPDATER",
];
/// Allowed names by pattern: one `*` stands for any run of characters.
pub const AGENT_ENV_PATTERNS: &[&str] = &["ANTHROPIC_DEFAULT_*_MODEL"];
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
/// Passed when the worker exports traces over OTLP, so that the agent's own spans (the CLI's
/// `claude_code.interaction`, `llm_request`, `tool` spans) reach the same collector, under the
/// message's span (`TRACEPARENT`).
const OTLP_ENV: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
];
/// Set for the agent when the worker exports traces: the CLI's traces on, its metrics and logs
/// off (they would otherwise default to an exporter of their own). `AGENT_ENV_ALLOW` naming one
/// of these passes the worker's value instead.
const OTLP_AGENT_DEFAULTS: &[(&str, &str)] = &[
    ("CLAUDE_CODE_ENABLE_TELEMETRY", "1"),
    ("CLAUDE_CODE_ENHANCED_TELEMETRY_BETA", "1"),
    ("OTEL_TRACES_EXPORTER", "otlp"),
    ("OTEL_METRICS_EXPORTER", "none"),
    ("OTEL_LOGS_EXPORTER", "none"),
];

/// After an interrupted run reported, how long it gets to exit (to write its session).
const EXIT_AFTER_INTERRUPT: Duration = Duration::from_secs(1);
/// A CLI that printed its result and has not exited after this long is killed (a known hang).
pub const EXIT_AFTER_RESULT: Duration = Duration::from_secs(5);
/// How much of the agent's stderr is kept for the error message.
const STDERR_TAIL_BYTES: usize = 4096;

impl AgentSpec {
    /// The command line in stream-json input mode, without the prompt (which goes on stdin).
    pub fn args(&self, session: &Conversation) -> Vec<String> {
        self.args_for(session, InputMode::StreamJson)
    }

    /// The command line for `mode`, without the prompt (which goes on stdin).
    pub fn args_for(&self, session: &Conversation, mode: InputMode) -> Vec<String> {
        let mut args: Vec<String> = ["-p", "--output-format", "stream-json", "--verbose"]
            .map(String::from)
            .to_vec();
        if mode == InputMode::StreamJson {
            args.extend(["--input-format".into(), "stream-json".into()]);
        }
        args.extend(["--permission-mode".into(), self.permission_mode.clone()]);
        match session {
            Conversation::New(id) => args.extend(["--session-id".into(), id.clone()]),
            Conversation::Resume(id) => args.extend(["--resume".into(), id.clone()]),
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

/// Which Claude conversation (the CLI's `--session-id` / `--resume`) a run belongs to. Not the
/// session actor of a workspace (`session.rs`), nor a message's `sessionId` (the producer's
/// chat session, kept in the status events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    /// Start a conversation with this id (the thread's first message).
    New(String),
    /// Continue this conversation (later messages of the thread).
    Resume(String),
}

impl Conversation {
    pub fn id(&self) -> &str {
        match self {
            Conversation::New(id) | Conversation::Resume(id) => id,
        }
    }
}

/// What a run reported in its `result` event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReport {
    pub result: Option<String>,
    pub session_id: Option<String>,
    /// The conversation's running total (cumulative over resumed runs).
    pub total_cost_usd: Option<f64>,
    pub num_turns: Option<u64>,
    pub subtype: String,
    /// Why the CLI stopped (`completed`, `max_turns`, `aborted_streaming`, `api_error`, ...),
    /// where the CLI says.
    pub terminal_reason: Option<String>,
    /// The HTTP status of the model API's error, where there was one.
    pub api_error_status: Option<u16>,
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
    /// Stopped from outside before it reported (killed: its cost is not known).
    #[error("the agent was interrupted")]
    Interrupted,
    /// Stopped from outside, and it reported what the run cost before it ended.
    #[error("the agent was interrupted")]
    InterruptedWithReport(AgentReport),
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
            AgentError::Interrupted | AgentError::InterruptedWithReport(_) => "interrupted",
            AgentError::SessionNotFound(_) => "agent_session_lost",
            AgentError::Io(_) => "agent_io",
        }
    }

    /// Stopped from outside (with or without a report).
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            AgentError::Interrupted | AgentError::InterruptedWithReport(_)
        )
    }

    /// The run's `result` event, when it printed one: its session, turns and running cost.
    pub fn report(&self) -> Option<&AgentReport> {
        match self {
            AgentError::Reported { report, .. } | AgentError::InterruptedWithReport(report) => {
                Some(report)
            }
            _ => None,
        }
    }
}

/// The one event we need the fields of; the others are read as loose JSON.
#[derive(Debug, Deserialize)]
struct ResultEvent {
    subtype: Option<String>,
    is_error: Option<bool>,
    result: Option<String>,
    session_id: Option<String>,
    total_cost_usd: Option<f64>,
    num_turns: Option<u64>,
    errors: Option<serde_json::Value>,
    terminal_reason: Option<String>,
    api_error_status: Option<u16>,
}

/// What the CLI says when `--resume` names a conversation it does not have.
const NO_CONVERSATION: &str = "No conversation found";

impl ResultEvent {
    /// Does its text or its errors contain `text`?
    fn mentions(&self, text: &str) -> bool {
        self.result.as_deref().is_some_and(|r| r.contains(text))
            || self
                .errors
                .as_ref()
                .is_some_and(|e| e.to_string().contains(text))
    }

    fn report(&self) -> AgentReport {
        AgentReport {
            result: self.result.clone(),
            session_id: self.session_id.clone(),
            total_cost_usd: self.total_cost_usd,
            num_turns: self.num_turns,
            subtype: self.subtype.clone().unwrap_or_default(),
            terminal_reason: self.terminal_reason.clone(),
            api_error_status: self.api_error_status,
        }
    }
}

/// Something the agent is doing, for progress reports.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentActivity {
    /// The CLI's `system`/`init` event: from here on its conversation is `session_id` (sent as
    /// soon as it is known, before the agent's first request to the model).
    Started {
        session_id: Option<String>,
        /// The CLI's version, as it reports it.
        version: Option<String>,
    },
    ToolUse {
        tool: String,
        target: Option<String>,
    },
}

/// Lines of a stream, decoded lossily: a byte of invalid UTF-8 (a tool's output echoed by the
/// agent) costs that character, not the rest of the run. Cancel-safe in `select!`: a partly
/// read line stays in the buffer for the next call.
struct LossyLines<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: tokio::io::AsyncRead + Unpin> LossyLines<R> {
    fn new(stream: R) -> Self {
        LossyLines {
            reader: BufReader::new(stream),
            buf: Vec::new(),
        }
    }

    async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        let read = self.reader.read_until(b'\n', &mut self.buf).await?;
        if read == 0 && self.buf.is_empty() {
            return Ok(None);
        }
        let line = String::from_utf8_lossy(&self.buf)
            .trim_end_matches(['\n', '\r'])
            .to_owned();
        self.buf.clear();
        Ok(Some(line))
    }
}

/// Run the agent on `prompt` in `cwd`. `cancel` stops it (the in-band interrupt, then SIGINT,
/// then SIGKILL); `on_activity` sees what it does as it happens.
pub async fn run_agent(
    spec: &AgentSpec,
    jail: &Jail,
    cwd: &Path,
    prompt: &str,
    session: &Conversation,
    cancel: &CancellationToken,
    mut on_activity: impl FnMut(AgentActivity) + Send,
) -> Result<AgentReport, AgentError> {
    let mut session = session.clone();
    // At most: one retry without stream-json input, one retry resuming a session in use.
    for _ in 0..3 {
        let mode = spec.input_mode();
        let attempt = run_once(
            spec,
            jail,
            cwd,
            prompt,
            &session,
            mode,
            cancel,
            &mut on_activity,
        )
        .await;
        let stderr = attempt.stderr.as_str();
        if !attempt.started && attempt.result.is_none() && !attempt.cancelled {
            if mode == InputMode::StreamJson && rejects_stream_input(stderr) {
                tracing::info!(
                    bin = %spec.bin.display(),
                    "the agent does not take --input-format stream-json; giving it the request as text"
                );
                spec.set_input_mode(InputMode::Text);
                continue;
            }
            if let Conversation::New(id) = &session
                && stderr.contains("already in use")
            {
                // A retry of a run whose CLI created the session: recent CLIs refuse a reused
                // --session-id, and the conversation is there to continue.
                tracing::info!(session = %id, "the session exists already; resuming it");
                session = Conversation::Resume(id.clone());
                continue;
            }
        }
        if mode == InputMode::StreamJson && attempt.started {
            spec.set_input_mode(InputMode::StreamJson);
        }
        return attempt.outcome(&session);
    }
    Err(AgentError::NoResult {
        exit: "not started".into(),
        stderr: ": the agent could not be started in any input mode".into(),
    })
}

/// Does this stderr say the CLI does not know `--input-format` (commander's wording and ours)?
fn rejects_stream_input(stderr: &str) -> bool {
    stderr.contains("--input-format")
        && (stderr.contains("unknown option") || stderr.contains("invalid"))
}

/// What one start of the CLI came to.
struct Attempt {
    /// The `system`/`init` event came.
    started: bool,
    result: Option<ResultEvent>,
    /// Stopped from outside before the result came.
    cancelled: bool,
    /// How the loop ended otherwise.
    failure: Option<AgentError>,
    exit: String,
    stderr: String,
}

impl Attempt {
    // The same `Result` as the public `run_agent`, whose error type the pipeline matches on.
    #[allow(clippy::result_large_err)]
    fn outcome(self, session: &Conversation) -> Result<AgentReport, AgentError> {
        if let Some(e) = self.failure {
            return Err(e);
        }
        // A conversation to resume that is not there: the CLI says so on stderr, and (2.1.x)
        // also in an `error_during_execution` result, before it starts.
        if let Conversation::Resume(id) = session
            && !self.started
            && (self.stderr.contains(NO_CONVERSATION)
                || self
                    .result
                    .as_ref()
                    .is_some_and(|r| r.mentions(NO_CONVERSATION)))
        {
            return Err(AgentError::SessionNotFound(id.clone()));
        }
        let Some(event) = self.result else {
            if self.cancelled {
                return Err(AgentError::Interrupted);
            }
            let stderr = if self.stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", self.stderr.trim())
            };
            return Err(AgentError::NoResult {
                exit: self.exit,
                stderr,
            });
        };
        let report = event.report();
        if self.cancelled {
            return Err(AgentError::InterruptedWithReport(report));
        }
        let is_error = event.is_error.unwrap_or(true);
        if report.subtype == "success" && !is_error {
            return Ok(report);
        }
        let detail = event
            .errors
            .map(|e| e.to_string())
            .or(event.result)
            .unwrap_or_else(|| "no detail given".into());
        Err(AgentError::Reported {
            subtype: report.subtype.clone(),
            is_error,
            detail,
            report,
        })
    }
}

/// Where the stop sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    Running,
    /// The in-band interrupt was sent at this time.
    Interrupted(Instant),
    /// SIGINT was sent at this time.
    Signalled(Instant),
}

/// The stream-json `user` message carrying the request.
pub fn user_message(prompt: &str) -> String {
    serde_json::json!({
        "type": "user",
        "message": {"role": "user", "content": prompt},
        "parent_tool_use_id": null,
    })
    .to_string()
}

/// The in-band interrupt request.
pub fn interrupt_request(request_id: &str) -> String {
    serde_json::json!({
        "type": "control_request",
        "request_id": request_id,
        "request": {"subtype": "interrupt"},
    })
    .to_string()
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    spec: &AgentSpec,
    jail: &Jail,
    cwd: &Path,
    prompt: &str,
    session: &Conversation,
    mode: InputMode,
    cancel: &CancellationToken,
    on_activity: &mut (impl FnMut(AgentActivity) + Send),
) -> Attempt {
    let mut attempt = Attempt {
        started: false,
        result: None,
        cancelled: false,
        failure: None,
        exit: String::new(),
        stderr: String::new(),
    };
    // In the workspace's sandbox: its own user, namespaces and limits where the host allows.
    let mut cmd = jail.command(&spec.bin, cwd);
    cmd.args(spec.args_for(session, mode))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a signal to the group reaches every process it started.
        .process_group(0)
        .kill_on_drop(true);
    cmd.env_clear();
    cmd.envs(agent_env(
        spec,
        std::env::vars_os(),
        current_traceparent().as_deref(),
    ));
    // Its own HOME, TMPDIR and CLAUDE_CONFIG_DIR in the sandbox, over the worker's.
    cmd.envs(jail.env());
    default_signals_and_die_with_parent(&mut cmd);

    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(source) => {
            attempt.failure = Some(AgentError::Spawn {
                bin: spec.bin.display().to_string(),
                source,
            });
            return attempt;
        }
    };
    let pgid = child.id().map(|id| id as i32);
    let guard = GroupGuard(pgid);
    // A tenant that fills the disk with many files, each under its file limit, is stopped.
    let _disk = jail.watch_disk(pgid);

    // stdin from its own task: a prompt larger than the pipe buffer must not block reading.
    // In stream-json mode it stays open for control requests until `stdin_tx` is dropped.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let first = match mode {
        InputMode::StreamJson => user_message(prompt) + "\n",
        InputMode::Text => prompt.to_owned(),
    };
    let writer = tokio::spawn(async move {
        if stdin.write_all(first.as_bytes()).await.is_err() {
            return;
        }
        let _ = stdin.flush().await;
        while let Some(line) = stdin_rx.recv().await {
            if stdin.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            let _ = stdin.flush().await;
        }
        let _ = stdin.shutdown().await;
    });
    let mut stdin_tx = match mode {
        InputMode::StreamJson => Some(stdin_tx),
        // The request is all there is: end of input at once.
        InputMode::Text => {
            drop(stdin_tx);
            None
        }
    };
    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_task = tokio::spawn(read_tail(stderr));
    let mut lines = LossyLines::new(child.stdout.take().expect("stdout is piped"));

    let deadline = Instant::now() + spec.timeout;
    let mut last_output = Instant::now();
    let mut stopping = Stopping::Running;
    let mut result_at: Option<Instant> = None;
    loop {
        // The next moment something must happen without the agent's help.
        let mut wake = deadline.min(last_output + spec.silence_timeout);
        if let Some(at) = result_at {
            let grace = if attempt.cancelled {
                EXIT_AFTER_INTERRUPT
            } else {
                EXIT_AFTER_RESULT
            };
            wake = wake.min(at + grace);
        }
        match stopping {
            Stopping::Interrupted(at) if result_at.is_none() => {
                wake = wake.min(at + spec.interrupt_grace)
            }
            Stopping::Signalled(at) => wake = wake.min(at + spec.signal_grace),
            _ => {}
        }
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    last_output = Instant::now();
                    match read_event(&line, on_activity) {
                        Some(Event::Started) => attempt.started = true,
                        Some(Event::Result(r)) => {
                            attempt.result = Some(*r);
                            result_at = Some(Instant::now());
                            if let Stopping::Interrupted(at) | Stopping::Signalled(at) = stopping {
                                // From the stop to the agent idle, its turn ended and reported.
                                let idle_after_us = at.elapsed().as_micros() as u64;
                                let in_band = matches!(stopping, Stopping::Interrupted(_));
                                tracing::info!(
                                    idle_after_us,
                                    in_band,
                                    "the agent ended its turn after the interrupt"
                                );
                                crate::metrics::metrics().agent_idle_after_stop_us.record(
                                    idle_after_us,
                                    &[opentelemetry::KeyValue::new("in_band", in_band)],
                                );
                            }
                            // Its turn is over: end of input lets a stream-json CLI exit.
                            stdin_tx = None;
                        }
                        None => {}
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    attempt.failure = Some(e.into());
                    break;
                }
            },
            _ = cancel.cancelled(), if stopping == Stopping::Running => {
                if result_at.is_some() {
                    // It has reported and is only exiting: nothing left to stop gracefully.
                    guard.kill();
                    break;
                }
                attempt.cancelled = true;
                match stdin_tx.as_ref() {
                    Some(tx) => {
                        let id = format!("interrupt-{}", uuid::Uuid::new_v4());
                        let _ = tx.send(interrupt_request(&id) + "\n");
                        stopping = Stopping::Interrupted(Instant::now());
                    }
                    None => {
                        process::signal_group(pgid, nix::sys::signal::Signal::SIGINT);
                        stopping = Stopping::Signalled(Instant::now());
                    }
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if let Some(at) = result_at {
                    let grace = if attempt.cancelled { EXIT_AFTER_INTERRUPT } else { EXIT_AFTER_RESULT };
                    if now >= at + grace {
                        if !attempt.cancelled {
                            tracing::warn!(after = ?grace, "the agent reported but did not exit; killing it");
                        }
                        guard.kill();
                        break;
                    }
                }
                match stopping {
                    Stopping::Interrupted(at) if result_at.is_none() && now >= at + spec.interrupt_grace => {
                        tracing::info!("the agent did not end its turn after the interrupt; sending SIGINT");
                        process::signal_group(pgid, nix::sys::signal::Signal::SIGINT);
                        stopping = Stopping::Signalled(now);
                        continue;
                    }
                    Stopping::Signalled(at) if now >= at + spec.signal_grace => {
                        guard.kill();
                        break;
                    }
                    _ => {}
                }
                if now >= deadline {
                    guard.kill();
                    if !attempt.cancelled && result_at.is_none() {
                        attempt.failure = Some(AgentError::Timeout(spec.timeout));
                    }
                    break;
                }
                if now >= last_output + spec.silence_timeout {
                    guard.kill();
                    if !attempt.cancelled && result_at.is_none() {
                        attempt.failure = Some(AgentError::Silent(spec.silence_timeout));
                    }
                    break;
                }
            }
        }
    }
    drop(stdin_tx);
    writer.abort();
    // stdout is closed (or we gave up on it); the process should be gone or going.
    let wait = if result_at.is_some() && !attempt.cancelled {
        EXIT_AFTER_RESULT
    } else {
        spec.signal_grace
    };
    attempt.exit = match tokio::time::timeout(wait, child.wait()).await {
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
    // Anything it left running in its group goes with it, and (without namespaces) anything
    // of its uid that left the group.
    guard.kill();
    jail.sweep().await;
    attempt.stderr = stderr_task.await.unwrap_or_default();
    attempt
}

/// Linux: the agent gets SIGKILL when the worker dies, even by `kill -9`, so a crashed worker
/// leaves no agent editing the workspace behind the next worker's back. And it starts with the
/// stop signals at their defaults, whatever the worker inherited: a worker started in the
/// background of a non-interactive shell ignores SIGINT, an ignored signal stays ignored across
/// exec, and a shell may not trap a signal ignored on entry (POSIX), so the stop's SIGINT stage
/// would reach nothing (a fresh-clone CI run, started that way, showed it).
#[cfg(target_os = "linux")]
fn default_signals_and_die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
    // sigaction(2) (through `signal`), which are async-signal-safe; it allocates nothing and
    // takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::signal::{SigHandler, Signal, signal};
            for stop in [
                Signal::SIGINT,
                Signal::SIGQUIT,
                Signal::SIGTERM,
                Signal::SIGHUP,
            ] {
                signal(stop, SigHandler::SigDfl).map_err(std::io::Error::from)?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn default_signals_and_die_with_parent(_cmd: &mut Command) {}

/// The `traceparent` of the current span (the job's `agent run` span, carried into the agent
/// actor's handler with the message), when it belongs to a trace.
fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| crate::trace_context::traceparent(sc))
}

/// Does `name` match `pattern` (one `*` at most, for any run of characters)?
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.len() >= head.len() + tail.len() && name.starts_with(head) && name.ends_with(tail)
        }
    }
}

/// The agent's whole environment, from the worker's `vars`: `process::BASE_ENV`, `AGENT_ENV`
/// and its patterns, `spec.env_allow`, the AWS variables with Bedrock, the OTLP variables when
/// the worker exports traces, `CLAUDE_CONFIG_DIR` (the spec's unless the worker sets one),
/// `DISABLE_AUTOUPDATER=1` and the message's `TRACEPARENT`. Nothing else of the worker's.
pub fn agent_env(
    spec: &AgentSpec,
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    traceparent: Option<&str>,
) -> Vec<(OsString, OsString)> {
    let vars: Vec<(OsString, OsString)> = vars.into_iter().collect();
    let get = |name: &str| {
        vars.iter()
            .find(|(k, _)| k.to_str() == Some(name))
            .map(|(_, v)| v.clone())
    };
    let is_on = |name: &str| get(name).is_some_and(|v| v == "1" || v == "true");
    let bedrock = is_on("CLAUDE_CODE_USE_BEDROCK");
    let otlp = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|n| get(n).is_some_and(|v| !v.is_empty()));

    let mut env: Vec<(OsString, OsString)> = Vec::new();
    fn set(env: &mut Vec<(OsString, OsString)>, k: OsString, v: OsString) {
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    }
    // Defaults first: what the worker passes on (below) overrides them.
    set(&mut env, "DISABLE_AUTOUPDATER".into(), "1".into());
    if let Some(dir) = &spec.config_dir {
        set(&mut env, "CLAUDE_CONFIG_DIR".into(), dir.into());
    }
    if otlp {
        for (k, v) in OTLP_AGENT_DEFAULTS {
            set(&mut env, k.into(), v.into());
        }
    }
    let allowed = |name: &str| {
        process::BASE_ENV.contains(&name)
            || AGENT_ENV.contains(&name)
            || AGENT_ENV_PATTERNS.iter().any(|p| name_matches(p, name))
            || spec.env_allow.iter().any(|p| p == name)
            || (bedrock && BEDROCK_ENV.contains(&name))
            || (otlp && OTLP_ENV.contains(&name))
    };
    for (k, v) in &vars {
        if let Some(name) = k.to_str()
            && allowed(name)
        {
            set(&mut env, k.clone(), v.clone());
        }
    }
    // The message's trace, which the CLI continues in headless mode (its own spans, when its
    // telemetry is on; `traceparent` headers to the API with CLAUDE_CODE_PROPAGATE_TRACEPARENT).
    if let Some(tp) = traceparent {
        set(&mut env, "TRACEPARENT".into(), tp.into());
    }
    env
}

/// What a stream-json line told us.
enum Event {
    /// The `system`/`init` event.
    Started,
    Result(Box<ResultEvent>),
}

/// Parse one stream-json line; reports activity, returns the init and result events.
fn read_event(line: &str, on_activity: &mut impl FnMut(AgentActivity)) -> Option<Event> {
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => {
            tracing::debug!(line, "agent wrote a line that is not JSON");
            return None;
        }
    };
    let text =
        |v: &serde_json::Value, key: &str| v.get(key).and_then(|s| s.as_str()).map(str::to_owned);
    match value.get("type").and_then(|t| t.as_str()) {
        Some("result") => match serde_json::from_value::<ResultEvent>(value) {
            Ok(r) => Some(Event::Result(Box::new(r))),
            Err(e) => {
                tracing::warn!(error = %e, "agent wrote a result event we cannot read");
                None
            }
        },
        Some("system") if value.get("subtype").and_then(|s| s.as_str()) == Some("init") => {
            on_activity(AgentActivity::Started {
                session_id: text(&value, "session_id"),
                version: text(&value, "claude_code_version"),
            });
            Some(Event::Started)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::INTERRUPT_GRACE;
    use std::path::PathBuf;

    fn spec() -> AgentSpec {
        AgentSpec::new(PathBuf::from("claude"), Duration::from_secs(60))
    }

    #[test]
    fn the_request_is_never_on_the_command_line() {
        let mut s = spec();
        s.max_turns = Some(3);
        s.max_budget_usd = Some(0.5);
        s.model = Some("claude-x".into());
        s.allowed_tools = vec!["Edit".into(), "Bash(npm run build)".into()];
        let args = s.args(&Conversation::New("abc".into()));
        assert_eq!(
            args,
            [
                "-p",
                "--output-format",
                "stream-json",
                "--verbose",
                "--input-format",
                "stream-json",
                "--permission-mode",
                "acceptEdits",
                "--session-id",
                "abc",
                "--max-turns",
                "3",
                "--max-budget-usd",
                "0.5",
                "--model",
                "claude-x",
                "--allowedTools",
                "Edit,Bash(npm run build)",
            ]
        );
        let text = s.args_for(&Conversation::Resume("abc".into()), InputMode::Text);
        assert!(!text.iter().any(|a| a == "--input-format"));
        assert!(text.windows(2).any(|w| w == ["--resume", "abc"]));
        // A request that looks like a flag goes on stdin, inside JSON.
        let line = user_message("--dangerously-skip-permissions \"quoted\"\nnext");
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["type"], "user");
        assert_eq!(
            back["message"]["content"],
            "--dangerously-skip-permissions \"quoted\"\nnext"
        );
        assert!(!line.contains('\n'), "one line: {line}");
        let interrupt: serde_json::Value = serde_json::from_str(&interrupt_request("r1")).unwrap();
        assert_eq!(interrupt["type"], "control_request");
        assert_eq!(interrupt["request_id"], "r1");
        assert_eq!(interrupt["request"]["subtype"], "interrupt");
    }

    #[test]
    fn the_input_mode_is_shared_by_clones() {
        let s = spec();
        let clone = s.clone();
        assert_eq!(s.input_mode(), InputMode::StreamJson);
        clone.set_input_mode(InputMode::Text);
        assert_eq!(s.input_mode(), InputMode::Text);
        assert!(rejects_stream_input(
            "error: unknown option '--input-format'\n"
        ));
        assert!(!rejects_stream_input(
            "Error: Session ID x is already in use."
        ));
    }

    fn events(lines: &[&str]) -> (Vec<AgentActivity>, Vec<Event>) {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for line in lines {
            if let Some(e) = read_event(line, &mut |a| seen.push(a)) {
                out.push(e);
            }
        }
        (seen, out)
    }

    #[test]
    fn stream_json_of_the_real_cli_is_read() {
        // Shapes as Claude Code 2.1.x prints them (trimmed).
        let (seen, out) = events(&[
            r#"{"type":"system","subtype":"init","cwd":"/w","session_id":"s-1","tools":["Read"],"claude_code_version":"2.1.332","uuid":"u"}"#,
            r#"{"type":"assistant","message":{"id":"m","role":"assistant","content":[{"type":"tool_use","id":"t1","name":"Read","input":{"file_path":"/w/src/pages/index.astro"}}]},"session_id":"s-1"}"#,
            r#"{"type":"user","message":{"role":"user","content":[{"tool_use_id":"t1","type":"tool_result","content":"1\tx"}]},"session_id":"s-1"}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"hi"},{"type":"tool_use","name":"Bash","input":{"command":"npm run build"}}]}}"#,
            r#"{"type":"control_response","response":{"subtype":"success","request_id":"int-1"}}"#,
            "not json at all",
            r#"{"type":"stream_event","event":{"type":"ping"}}"#,
            r#"{"duration_ms":216,"stop_reason":"end_turn","session_id":"s-1","total_cost_usd":0.024,"is_error":false,"num_turns":4,"subtype":"success","api_error_status":null,"result":"Done.","terminal_reason":"completed","type":"result","usage":{"input_tokens":4000}}"#,
        ]);
        assert_eq!(
            seen,
            vec![
                AgentActivity::Started {
                    session_id: Some("s-1".into()),
                    version: Some("2.1.332".into())
                },
                AgentActivity::ToolUse {
                    tool: "Read".into(),
                    target: Some("/w/src/pages/index.astro".into())
                },
                AgentActivity::ToolUse {
                    tool: "Bash".into(),
                    target: Some("npm run build".into())
                },
            ]
        );
        assert_eq!(out.len(), 2);
        assert!(matches!(out[0], Event::Started));
        let Event::Result(r) = &out[1] else {
            panic!("no result")
        };
        let report = r.report();
        assert_eq!(report.subtype, "success");
        assert_eq!(report.total_cost_usd, Some(0.024));
        assert_eq!(report.num_turns, Some(4));
        assert_eq!(report.terminal_reason.as_deref(), Some("completed"));
        assert_eq!(report.api_error_status, None);
    }

    #[allow(clippy::result_large_err)]
    fn outcome(
        result: Option<&str>,
        cancelled: bool,
        stderr: &str,
    ) -> Result<AgentReport, AgentError> {
        let started = !stderr.contains("No conversation found");
        let result = result.map(|line| match read_event(line, &mut |_| {}) {
            Some(Event::Result(r)) => *r,
            _ => panic!("not a result: {line}"),
        });
        Attempt {
            started,
            result,
            cancelled,
            failure: None,
            exit: "exit status: 1".into(),
            stderr: stderr.into(),
        }
        .outcome(&Conversation::Resume("s-1".into()))
    }

    #[test]
    fn every_ending_has_its_kind() {
        let ok = outcome(
            Some(
                r#"{"type":"result","subtype":"success","is_error":false,"result":"Done.","total_cost_usd":0.1}"#,
            ),
            false,
            "",
        );
        assert_eq!(ok.unwrap().result.as_deref(), Some("Done."));
        let kind = |line: &str| outcome(Some(line), false, "").unwrap_err().kind();
        assert_eq!(
            kind(
                r#"{"type":"result","subtype":"error_max_turns","is_error":true,"errors":["Reached maximum number of turns (2)"],"terminal_reason":"max_turns"}"#
            ),
            "agent_max_turns"
        );
        assert_eq!(
            kind(
                r#"{"type":"result","subtype":"error_max_budget_usd","is_error":true,"errors":["Reached maximum budget ($0.01)"]}"#
            ),
            "agent_max_budget"
        );
        // The API error trap: "success" with is_error.
        let api = outcome(
            Some(r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":400,"result":"API Error: 400 bad","total_cost_usd":0}"#),
            false,
            "",
        )
        .unwrap_err();
        assert_eq!(api.kind(), "agent_api_error");
        assert_eq!(api.report().unwrap().api_error_status, Some(400));
        assert!(api.to_string().contains("API Error: 400"), "{api}");
        // No is_error at all is not a success.
        assert!(outcome(Some(r#"{"type":"result","subtype":"success"}"#), false, "").is_err());

        // Interrupted: with the CLI's report (its cost known) or without.
        let stopped = outcome(
            Some(r#"{"type":"result","subtype":"error_during_execution","is_error":true,"total_cost_usd":0.00402,"terminal_reason":"aborted_streaming","session_id":"s-1"}"#),
            true,
            "",
        )
        .unwrap_err();
        assert!(stopped.is_interrupted());
        assert_eq!(stopped.kind(), "interrupted");
        assert_eq!(stopped.report().unwrap().total_cost_usd, Some(0.00402));
        let killed = outcome(None, true, "").unwrap_err();
        assert!(matches!(killed, AgentError::Interrupted));
        assert!(killed.report().is_none());

        let lost = outcome(None, false, "No conversation found with session ID: s-1").unwrap_err();
        assert!(matches!(lost, AgentError::SessionNotFound(ref id) if id == "s-1"));
        // The real CLI also prints a result for it.
        let lost = outcome(
            Some(r#"{"type":"result","subtype":"error_during_execution","is_error":true,"num_turns":0,"session_id":"s-1","total_cost_usd":0,"errors":["No conversation found with session ID: s-1"]}"#),
            false,
            "No conversation found with session ID: s-1",
        )
        .unwrap_err();
        assert!(matches!(lost, AgentError::SessionNotFound(ref id) if id == "s-1"));
        let none = outcome(None, false, "boom").unwrap_err();
        assert_eq!(none.kind(), "agent_no_result");
        assert!(none.to_string().contains("boom"));
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    fn names(env: &[(OsString, OsString)]) -> Vec<String> {
        let mut n: Vec<String> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    fn value<'a>(env: &'a [(OsString, OsString)], name: &str) -> Option<&'a str> {
        env.iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.to_str())
    }

    #[test]
    fn the_agent_environment_is_allow_listed() {
        let mut s = spec();
        s.config_dir = Some(PathBuf::from("/ws/.agent/claude"));
        let worker = vars(&[
            ("PATH", "/bin"),
            ("HOME", "/home/w"),
            ("AWS_ACCESS_KEY_ID", "AKIA"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("INPUT_QUEUE_URL", "http://q"),
            ("ANTHROPIC_API_KEY", "sk"),
            ("CLAUDE_CODE_OAUTH_TOKEN", "oauth"),
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("no_proxy", "localhost"),
            ("ANTHROPIC_DEFAULT_SONNET_MODEL", "sonnet-x"),
            ("ANTHROPIC_DEFAULT_", "odd"),
            ("MY_SETTING", "1"),
            ("TRACEPARENT", "00-worker-own"),
        ]);
        let env = agent_env(&s, worker.clone(), Some("00-abc-def-01"));
        assert_eq!(
            names(&env),
            [
                "ANTHROPIC_API_KEY",
                "ANTHROPIC_DEFAULT_SONNET_MODEL",
                "CLAUDE_CODE_OAUTH_TOKEN",
                "CLAUDE_CONFIG_DIR",
                "DISABLE_AUTOUPDATER",
                "HOME",
                "HTTPS_PROXY",
                "PATH",
                "TRACEPARENT",
                "no_proxy",
            ]
        );
        assert_eq!(value(&env, "TRACEPARENT"), Some("00-abc-def-01"));
        assert_eq!(value(&env, "CLAUDE_CONFIG_DIR"), Some("/ws/.agent/claude"));
        assert_eq!(value(&env, "DISABLE_AUTOUPDATER"), Some("1"));

        // AGENT_ENV_ALLOW adds names; the worker's own settings win over the defaults.
        s.env_allow = vec!["MY_SETTING".into()];
        let mut more = worker.clone();
        more.push(("CLAUDE_CONFIG_DIR".into(), "/elsewhere".into()));
        let env = agent_env(&s, more, None);
        assert_eq!(value(&env, "MY_SETTING"), Some("1"));
        assert_eq!(value(&env, "CLAUDE_CONFIG_DIR"), Some("/elsewhere"));
        assert!(value(&env, "TRACEPARENT").is_none());
        assert!(value(&env, "AWS_SECRET_ACCESS_KEY").is_none());

        // Bedrock brings the AWS variables.
        let mut bedrock = worker.clone();
        bedrock.push(("CLAUDE_CODE_USE_BEDROCK".into(), "1".into()));
        bedrock.push(("AWS_REGION".into(), "us-west-2".into()));
        let env = agent_env(&s, bedrock, None);
        assert_eq!(value(&env, "AWS_SECRET_ACCESS_KEY"), Some("secret"));
        assert_eq!(value(&env, "AWS_REGION"), Some("us-west-2"));
        assert!(value(&env, "INPUT_QUEUE_URL").is_none());

        // An OTLP exporter of the worker turns on the CLI's traces, to the same collector.
        let mut otlp = worker;
        otlp.push((
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            "http://otel:4318".into(),
        ));
        otlp.push(("OTEL_SERVICE_NAME".into(), "edit-worker".into()));
        let env = agent_env(&s, otlp, Some("00-abc-def-01"));
        assert_eq!(
            value(&env, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some("http://otel:4318")
        );
        assert_eq!(value(&env, "CLAUDE_CODE_ENABLE_TELEMETRY"), Some("1"));
        assert_eq!(value(&env, "OTEL_TRACES_EXPORTER"), Some("otlp"));
        assert_eq!(value(&env, "OTEL_METRICS_EXPORTER"), Some("none"));
        assert!(value(&env, "OTEL_SERVICE_NAME").is_none());
    }

    #[test]
    fn patterns_match_names() {
        assert!(name_matches(
            "ANTHROPIC_DEFAULT_*_MODEL",
            "ANTHROPIC_DEFAULT_OPUS_MODEL"
        ));
        assert!(!name_matches(
            "ANTHROPIC_DEFAULT_*_MODEL",
            "ANTHROPIC_DEFAULT_MODEL"
        ));
        assert!(!name_matches(
            "ANTHROPIC_DEFAULT_*_MODEL",
            "ANTHROPIC_MODEL"
        ));
        assert!(name_matches("PATH", "PATH"));
        assert!(!name_matches("PATH", "PATHS"));
    }

    /// An executable shell script standing in for the CLI, in `dir`.
    ///
    /// The executable is written by `install`, not by this process: a file this process holds
    /// open for writing is inherited by a child another test thread forks meanwhile, and until
    /// that child execs, running the file fails with ETXTBSY ("Text file busy"; seen in CI).
    fn script(dir: &Path, body: &str) -> AgentSpec {
        let source = dir.join("fake-cli.sh");
        std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).unwrap();
        let path = dir.join("fake-cli");
        let installed = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&source)
            .arg(&path)
            .status()
            .unwrap();
        assert!(installed.success(), "install {}", path.display());
        AgentSpec::new(path, Duration::from_secs(30))
    }

    const INIT: &str = r#"{"type":"system","subtype":"init","session_id":"s-1"}"#;

    #[allow(clippy::result_large_err)]
    async fn run(
        spec: &AgentSpec,
        dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<AgentReport, AgentError> {
        run_agent(
            spec,
            &Jail::open(dir),
            dir,
            "do it",
            &Conversation::New("s-1".into()),
            cancel,
            |_| {},
        )
        .await
    }

    #[tokio::test]
    async fn a_cli_that_reported_but_does_not_exit_is_killed_and_its_result_stands() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(
            dir.path(),
            &format!(
                "read line; echo '{INIT}'; echo '{}'; exec sleep 60",
                r#"{"type":"result","subtype":"success","is_error":false,"result":"ok","total_cost_usd":0.5}"#
            ),
        );
        let started = std::time::Instant::now();
        let report = run(&spec, dir.path(), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(report.total_cost_usd, Some(0.5));
        let took = started.elapsed();
        assert!(
            took >= EXIT_AFTER_RESULT && took < EXIT_AFTER_RESULT + Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_json_cli_is_interrupted_in_band_and_reports_its_cost() {
        let dir = tempfile::tempdir().unwrap();
        // Reads the request, then waits for the interrupt on stdin; answers it like Claude Code
        // (a control_response, then an error_during_execution result) and exits at end of input.
        let spec = script(
            dir.path(),
            &format!(
                "read line; echo \"$line\" > request.json; echo '{INIT}'\n\
                 while read line; do case \"$line\" in *'\"interrupt\"'*) \
                 echo '{{\"type\":\"control_response\",\"response\":{{\"subtype\":\"success\"}}}}'; \
                 echo '{}';; esac; done; echo ended > ended.txt",
                r#"{"type":"result","subtype":"error_during_execution","is_error":true,"total_cost_usd":0.004,"terminal_reason":"aborted_streaming"}"#
            ),
        );
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.cancel();
        });
        let started = std::time::Instant::now();
        let err = run(&spec, dir.path(), &cancel).await.unwrap_err();
        assert!(
            matches!(err, AgentError::InterruptedWithReport(ref r) if r.total_cost_usd == Some(0.004)),
            "{err:?}"
        );
        assert!(
            started.elapsed() < INTERRUPT_GRACE,
            "{:?}",
            started.elapsed()
        );
        // It ended by itself at the end of its input, not by a signal.
        assert!(dir.path().join("ended.txt").exists());
        let request: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("request.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(request["message"]["content"], "do it");
        assert_eq!(spec.input_mode(), InputMode::StreamJson);
    }

    #[tokio::test]
    async fn a_cli_that_ignores_the_interrupt_gets_sigint_then_sigkill() {
        // A CLI that reads the in-band interrupt and does nothing, notes every SIGINT and goes
        // on: only SIGKILL can end it. It is stopped once it is running (its pid written), so
        // every stage of the stop is reached (issue 28: the stop was asked before the run,
        // and nothing showed which signals arrived).
        let dir = tempfile::tempdir().unwrap();
        let mut spec = script(
            dir.path(),
            &format!(
                "trap 'echo INT >> signals.txt' INT\n\
                 read line; echo '{INIT}'; echo $$ > pid.txt\n\
                 read interrupt; echo \"$interrupt\" > interrupt.txt\n\
                 while :; do sleep 1; done"
            ),
        );
        // The shell notes SIGINT when it next runs; on a busy machine that was seen to take
        // longer than the 1 s before SIGKILL (a fresh-clone run at load 20 on 2 cores).
        spec.signal_grace = Duration::from_secs(15);
        let cancel = CancellationToken::new();
        let pid_file = dir.path().join("pid.txt");
        let stopper = {
            let cancel = cancel.clone();
            let pid_file = pid_file.clone();
            tokio::spawn(async move {
                while !std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n')) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                cancel.cancel();
            })
        };
        let err = run(&spec, dir.path(), &cancel).await.unwrap_err();
        stopper.await.unwrap();
        assert!(matches!(err, AgentError::Interrupted), "{err:?}");
        // First the in-band interrupt, then SIGINT (ignored), then SIGKILL: the CLI is gone.
        let interrupt = std::fs::read_to_string(dir.path().join("interrupt.txt")).unwrap();
        assert!(interrupt.contains("\"interrupt\""), "{interrupt}");
        let signals = std::fs::read_to_string(dir.path().join("signals.txt")).unwrap_or_default();
        assert!(
            signals.contains("INT"),
            "no SIGINT reached the CLI: {signals:?}"
        );
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH),
            "the CLI that ignored SIGINT is still there"
        );
    }

    #[tokio::test]
    async fn a_cli_without_stream_json_input_gets_the_request_as_text() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(
            dir.path(),
            &format!(
                "for a in \"$@\"; do [ \"$a\" = --input-format ] && {{ echo \"error: unknown option '--input-format'\" >&2; exit 1; }}; done\n\
                 cat > request.txt; echo '{INIT}'; echo '{}'",
                r#"{"type":"result","subtype":"success","is_error":false,"result":"ok"}"#
            ),
        );
        let report = run(&spec, dir.path(), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(report.result.as_deref(), Some("ok"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("request.txt")).unwrap(),
            "do it"
        );
        assert_eq!(spec.input_mode(), InputMode::Text);
    }

    #[tokio::test]
    async fn a_session_id_in_use_is_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(
            dir.path(),
            &format!(
                "for a in \"$@\"; do [ \"$a\" = --session-id ] && {{ echo 'Error: Session ID s-1 is already in use.' >&2; exit 1; }}; done\n\
                 echo \"$@\" > args.txt; read line; echo '{INIT}'; echo '{}'",
                r#"{"type":"result","subtype":"success","is_error":false,"result":"resumed"}"#
            ),
        );
        let report = run(&spec, dir.path(), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(report.result.as_deref(), Some("resumed"));
        let args = std::fs::read_to_string(dir.path().join("args.txt")).unwrap();
        assert!(args.contains("--resume s-1"), "{args}");
    }

    #[tokio::test]
    async fn lines_with_invalid_utf8_are_read_lossily_and_reading_goes_on() {
        let input: &[u8] = b"{\"a\":1}\n\xff\xfe broken\nlast without newline";
        let mut lines = LossyLines::new(input);
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "{\"a\":1}");
        assert_eq!(
            lines.next_line().await.unwrap().unwrap(),
            "\u{fffd}\u{fffd} broken"
        );
        assert_eq!(
            lines.next_line().await.unwrap().unwrap(),
            "last without newline"
        );
        assert_eq!(lines.next_line().await.unwrap(), None);
    }

    #[test]
    fn the_command_line_without_options_and_with_the_rest() {
        // Only what is set: the session, nothing more.
        assert_eq!(
            spec().args(&Conversation::New("s-1".into())),
            [
                "-p",
                "--output-format",
                "stream-json",
                "--verbose",
                "--input-format",
                "stream-json",
                "--permission-mode",
                "acceptEdits",
                "--session-id",
                "s-1",
            ]
        );
        let mut s = spec();
        s.permission_mode = "plan".into();
        s.disallowed_tools = vec!["Bash".into(), "WebFetch".into()];
        s.append_system_prompt = Some("Use British spelling.\nNo emoji.".into());
        assert_eq!(
            s.args_for(&Conversation::Resume("s-2".into()), InputMode::Text),
            [
                "-p",
                "--output-format",
                "stream-json",
                "--verbose",
                "--permission-mode",
                "plan",
                "--resume",
                "s-2",
                "--disallowedTools",
                "Bash,WebFetch",
                "--append-system-prompt",
                "Use British spelling.\nNo emoji.",
            ]
        );
        assert_eq!(Conversation::Resume("s-2".into()).id(), "s-2");
    }

    #[test]
    fn any_request_text_is_one_stream_json_line_that_reads_back_exactly() {
        for prompt in [
            "plain",
            "line one\r\nline two\n",
            "quotes \" and \\ backslashes",
            "separators \u{2028}\u{2029} and emoji 🎉",
            "{\"type\":\"control_request\"}",
            &"long ".repeat(10_000),
        ] {
            let line = user_message(prompt);
            assert!(!line.contains('\n') && !line.contains('\r'), "{prompt:?}");
            let back: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(back["message"]["content"], prompt);
            assert_eq!(back["message"]["role"], "user");
        }
    }

    #[test]
    fn a_tool_use_is_reported_with_its_target() {
        let (seen, out) = events(&[
            // The target is the first of file_path, path, command, pattern that the input has.
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","name":"Grep","input":{"pattern":"title","path":"src"}}]}}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","name":"Glob","input":{"pattern":"**/*.astro"}}]}}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","name":"TodoWrite","input":{"todos":[]}}]}}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","input":{"file_path":"a.txt"}}]}}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","name":"Read"}]}}"#,
            // Nothing to report.
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"Thinking."}]}}"#,
            r#"{"type":"assistant","message":{}}"#,
            r#"{"type":"assistant"}"#,
        ]);
        let tool = |tool: &str, target: Option<&str>| AgentActivity::ToolUse {
            tool: tool.into(),
            target: target.map(Into::into),
        };
        assert_eq!(
            seen,
            [
                tool("Grep", Some("src")),
                tool("Glob", Some("**/*.astro")),
                tool("TodoWrite", None),
                tool("tool", Some("a.txt")),
                tool("Read", None),
            ]
        );
        assert!(out.is_empty());
    }

    #[test]
    fn a_long_target_is_cut_at_200_characters() {
        let command = "é".repeat(300);
        let line = serde_json::json!({"type": "assistant", "message": {"content": [
            {"type": "tool_use", "name": "Bash", "input": {"command": command}}
        ]}})
        .to_string();
        let (seen, _) = events(&[line.as_str()]);
        let [
            AgentActivity::ToolUse {
                target: Some(target),
                ..
            },
        ] = seen.as_slice()
        else {
            panic!("{seen:?}")
        };
        assert_eq!(target.chars().count(), 200);
        assert!(command.starts_with(target.as_str()));
    }

    #[test]
    fn only_init_starts_a_run_and_only_a_readable_result_ends_it() {
        let (seen, out) = events(&[
            r#"{"type":"system","subtype":"api_retry","attempt":1}"#,
            r#"{"type":"system","subtype":"init"}"#,
            // A result whose fields have the wrong types is not taken for one.
            r#"{"type":"result","subtype":"success","is_error":"no","num_turns":"many"}"#,
            "",
            "   ",
            r#"{"type":"result"}"#,
        ]);
        assert_eq!(
            seen,
            [AgentActivity::Started {
                session_id: None,
                version: None
            }]
        );
        assert_eq!(out.len(), 2);
        assert!(matches!(out[0], Event::Started));
        let Event::Result(r) = &out[1] else {
            panic!("no result")
        };
        // A bare result: no subtype, no is_error: not a success.
        let report = r.report();
        assert_eq!(report.subtype, "");
        assert_eq!(report.total_cost_usd, None);
    }

    #[test]
    fn what_an_ending_says_and_which_rule_decides_it() {
        let kind = |line: &str| outcome(Some(line), false, "").unwrap_err().kind();
        assert_eq!(
            kind(r#"{"type":"result","subtype":"error_during_execution","is_error":true}"#),
            "agent_execution_error"
        );
        assert_eq!(
            kind(r#"{"type":"result","subtype":"error_something_new","is_error":true}"#),
            "agent_error"
        );
        // "success" that says it is an error, and an error that says it is none: neither passes.
        assert_eq!(
            kind(r#"{"type":"result","subtype":"success","is_error":true}"#),
            "agent_api_error"
        );
        assert_eq!(
            kind(r#"{"type":"result","subtype":"error_max_turns","is_error":false}"#),
            "agent_max_turns"
        );
        // The detail: the errors, else the result text, else a note that there was none.
        let detail = |line: &str| match outcome(Some(line), false, "").unwrap_err() {
            AgentError::Reported { detail, .. } => detail,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            detail(
                r#"{"type":"result","subtype":"error_max_turns","is_error":true,"errors":["too many"],"result":"r"}"#
            ),
            r#"["too many"]"#
        );
        assert_eq!(
            detail(r#"{"type":"result","subtype":"error_max_turns","is_error":true,"result":"r"}"#),
            "r"
        );
        assert_eq!(
            detail(r#"{"type":"result","subtype":"error_max_turns","is_error":true}"#),
            "no detail given"
        );
        // Without stderr, no dangling colon.
        let none = outcome(None, false, "  \n").unwrap_err();
        assert_eq!(
            none.to_string(),
            "the agent ended without a result (exit status: 1)"
        );
    }

    #[test]
    fn a_failure_of_the_run_itself_outranks_what_it_printed() {
        let result = r#"{"type":"result","subtype":"success","is_error":false,"result":"ok"}"#;
        for (failure, kind) in [
            (AgentError::Timeout(Duration::from_secs(1)), "agent_timeout"),
            (AgentError::Silent(Duration::from_secs(1)), "agent_silent"),
            (
                AgentError::Spawn {
                    bin: "claude".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
                "agent_unavailable",
            ),
            (
                AgentError::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
                "agent_io",
            ),
        ] {
            let attempt = Attempt {
                started: true,
                result: match read_event(result, &mut |_| {}) {
                    Some(Event::Result(r)) => Some(*r),
                    _ => unreachable!(),
                },
                cancelled: false,
                failure: Some(failure),
                exit: String::new(),
                stderr: String::new(),
            };
            let err = attempt
                .outcome(&Conversation::New("s-1".into()))
                .unwrap_err();
            assert_eq!(err.kind(), kind, "{err}");
            assert!(!err.is_interrupted());
        }
    }

    #[test]
    fn only_a_resumed_conversation_that_never_started_is_lost() {
        let attempt = |started: bool| Attempt {
            started,
            result: None,
            cancelled: false,
            failure: None,
            exit: "exit status: 1".into(),
            stderr: "No conversation found with session ID: s-1".into(),
        };
        assert!(matches!(
            attempt(false).outcome(&Conversation::Resume("s-1".into())),
            Err(AgentError::SessionNotFound(_))
        ));
        // A new conversation cannot be missing; nor can one the CLI went on to start.
        for (started, session) in [
            (false, Conversation::New("s-1".into())),
            (true, Conversation::Resume("s-1".into())),
        ] {
            let err = attempt(started).outcome(&session).unwrap_err();
            assert_eq!(
                err.kind(),
                "agent_no_result",
                "{session:?} started={started}"
            );
        }
    }

    #[test]
    fn a_cli_that_refuses_stream_input_is_recognised_by_either_wording() {
        assert!(rejects_stream_input(
            "error: option '--input-format <format>' argument 'stream-json' is invalid."
        ));
        assert!(!rejects_stream_input("error: unknown option '--verbose'"));
        assert!(!rejects_stream_input("--input-format stream-json is fine"));
    }

    #[test]
    fn named_otlp_settings_and_edge_cases_of_the_environment() {
        let mut s = spec();
        // Naming one of the CLI's telemetry defaults passes the worker's value instead.
        s.env_allow = vec!["OTEL_METRICS_EXPORTER".into()];
        let env = agent_env(
            &s,
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318"),
                ("OTEL_METRICS_EXPORTER", "otlp"),
            ]),
            None,
        );
        assert_eq!(value(&env, "OTEL_METRICS_EXPORTER"), Some("otlp"));
        assert_eq!(value(&env, "OTEL_LOGS_EXPORTER"), Some("none"));
        // An empty endpoint exports nothing: no telemetry for the CLI either.
        let env = agent_env(&spec(), vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]), None);
        assert!(value(&env, "CLAUDE_CODE_ENABLE_TELEMETRY").is_none());
        assert!(value(&env, "OTEL_EXPORTER_OTLP_ENDPOINT").is_none());
        // Bedrock by "true" as well as by "1"; anything else keeps AWS out.
        for (on, expected) in [("true", true), ("1", true), ("yes", false), ("0", false)] {
            let env = agent_env(
                &spec(),
                vars(&[
                    ("CLAUDE_CODE_USE_BEDROCK", on),
                    ("AWS_ACCESS_KEY_ID", "AKIA"),
                ]),
                None,
            );
            assert_eq!(value(&env, "AWS_ACCESS_KEY_ID").is_some(), expected, "{on}");
        }
        // The head and tail of a pattern may not overlap.
        assert!(!name_matches("AB*BA", "ABA"));
        assert!(name_matches("AB*BA", "ABBA"));
    }

    #[tokio::test]
    async fn a_request_larger_than_the_pipe_reaches_a_cli_that_writes_first() {
        let dir = tempfile::tempdir().unwrap();
        // Writes far more than a pipe holds before it reads its input: stdin written from the
        // same task as stdout is read would leave both sides waiting for the other.
        let chatter = r#"{"type":"assistant","message":{"content":[{"type":"text","text":"................................................................................"}]}}"#;
        let spec = script(
            dir.path(),
            &format!(
                "echo '{INIT}'\n\
                 i=0; while [ $i -lt 2000 ]; do echo '{chatter}'; i=$((i+1)); done\n\
                 head -n 1 > request.json\n\
                 echo '{}'",
                r#"{"type":"result","subtype":"success","is_error":false,"result":"read it"}"#
            ),
        );
        let prompt = "x".repeat(1 << 20);
        let report = tokio::time::timeout(
            Duration::from_secs(20),
            run_agent(
                &spec,
                &Jail::open(dir.path()),
                dir.path(),
                &prompt,
                &Conversation::New("s-1".into()),
                &CancellationToken::new(),
                |_| {},
            ),
        )
        .await
        .expect("no deadlock")
        .unwrap();
        assert_eq!(report.result.as_deref(), Some("read it"));
        let request: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("request.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            request["message"]["content"].as_str().map(str::len),
            Some(1 << 20)
        );
    }
}
