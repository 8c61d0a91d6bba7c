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
use crate::tenant::process;

mod command_line;
mod env;
mod stream;
use crate::tenant::sandbox::Jail;
pub use env::agent_env;
use env::current_traceparent;
use stream::{Event, LossyLines, NO_CONVERSATION, ResultEvent, read_event};
pub use stream::{interrupt_request, user_message};

/// After an interrupted run reported, how long it gets to exit (to write its session).
const EXIT_AFTER_INTERRUPT: Duration = Duration::from_secs(1);
/// A CLI that printed its result and has not exited after this long is killed (a known hang).
pub const EXIT_AFTER_RESULT: Duration = Duration::from_secs(5);
/// How much of the agent's stderr is kept for the error message.
const STDERR_TAIL_BYTES: usize = 4096;

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
                                crate::telemetry::metrics::metrics().agent_idle_after_stop_us.record(
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

    pub(super) fn spec() -> AgentSpec {
        AgentSpec::new(PathBuf::from("claude"), Duration::from_secs(60))
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
