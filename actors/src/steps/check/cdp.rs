//! A minimal client of Chromium's DevTools protocol over `--remote-debugging-pipe`: JSON
//! messages separated by a NUL byte, the browser reading commands on its fd 3 and writing
//! answers and events on its fd 4.
//!
//! Why not a crate such as chromiumoxide: it talks to a DevTools *port*, which on loopback any
//! local process can reach, tenants' builds and agents included (they share the network); a
//! pipe is reachable only by the worker. It also decodes every message into types generated
//! from one protocol revision (decode errors when Chromium is newer, and a 110,000-line crate
//! to compile), where the check reads a dozen fields of a few events as JSON.
//!
//! Commands are answered by id; events are routed by their `sessionId` (flat sessions: one per
//! page) to the page that asked for them. Nothing here knows what a page check is.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The largest message the browser may send: a screenshot of a large page is a few MB as
/// base64; anything beyond this is not a message we asked for, and reading it unbounded would
/// let a page make the worker allocate without limit.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CdpError {
    /// The pipe closed: the browser exited or was killed.
    #[error("the browser is gone (its DevTools pipe closed)")]
    Closed,
    #[error("the browser did not answer {method} within {seconds} s")]
    Timeout { method: String, seconds: u64 },
    #[error("{method} failed: {message}")]
    Command { method: String, message: String },
    #[error("writing to the browser: {0}")]
    Write(std::io::Error),
}

/// An event of one session: its method and parameters.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub method: String,
    pub params: Value,
}

type Pending = HashMap<u64, oneshot::Sender<Result<Value, CdpError>>>;

/// One connection to one browser. Cheap to share (`Arc`); dropping the last handle does not
/// end the browser (its owner does).
pub(crate) struct Cdp {
    writer: Mutex<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    next_id: AtomicU64,
    /// Commands sent and not yet answered: their answer goes to the sender.
    pending: Arc<std::sync::Mutex<Pending>>,
    /// Sessions whose events someone reads.
    sessions: Arc<std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>>,
    /// Cancelled when the reading side ends: the browser is gone.
    closed: CancellationToken,
}

impl Cdp {
    /// A client over the browser's pipe ends: `reader` is its fd 4, `writer` its fd 3.
    pub(crate) fn new(
        reader: impl tokio::io::AsyncRead + Send + Unpin + 'static,
        writer: impl tokio::io::AsyncWrite + Send + Unpin + 'static,
    ) -> Arc<Cdp> {
        let cdp = Arc::new(Cdp {
            writer: Mutex::new(Box::new(writer)),
            next_id: AtomicU64::new(1),
            pending: Arc::default(),
            sessions: Arc::default(),
            closed: CancellationToken::new(),
        });
        let (pending, sessions, closed) = (
            cdp.pending.clone(),
            cdp.sessions.clone(),
            cdp.closed.clone(),
        );
        tokio::spawn(async move {
            read_messages(BufReader::new(reader), &pending, &sessions).await;
            closed.cancel();
            // Whoever still waits learns that no answer will come.
            for (_, waiter) in pending.lock().expect("pending").drain() {
                let _ = waiter.send(Err(CdpError::Closed));
            }
            sessions.lock().expect("sessions").clear();
        });
        cdp
    }

    /// True once the browser's side of the pipe has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Wait until the browser's side of the pipe has closed.
    #[cfg(test)]
    pub(crate) async fn wait_closed(&self) {
        self.closed.cancelled().await
    }

    /// Send `method` (to `session`, or to the browser) and wait up to `timeout` for its result.
    pub(crate) async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, CdpError> {
        if self.is_closed() {
            return Err(CdpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = session.into();
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, tx);
        let mut bytes = serde_json::to_vec(&message).expect("JSON values serialize");
        bytes.push(0);
        let written = {
            let mut writer = self.writer.lock().await;
            match writer.write_all(&bytes).await {
                Ok(()) => writer.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            self.pending.lock().expect("pending").remove(&id);
            return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                CdpError::Closed
            } else {
                CdpError::Write(e)
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer.map_err(|e| match e {
                CdpError::Command { message, .. } => CdpError::Command {
                    method: method.to_owned(),
                    message,
                },
                other => other,
            }),
            Ok(Err(_)) => Err(CdpError::Closed),
            Err(_) => {
                self.pending.lock().expect("pending").remove(&id);
                Err(CdpError::Timeout {
                    method: method.to_owned(),
                    seconds: timeout.as_secs(),
                })
            }
        }
    }

    /// The events of `session` from now on, until `forget` (or the browser ends).
    pub(crate) fn events(&self, session: &str) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        if !self.is_closed() {
            self.sessions
                .lock()
                .expect("sessions")
                .insert(session.to_owned(), tx);
        }
        rx
    }

    /// Stop routing `session`'s events (its page closed).
    pub(crate) fn forget(&self, session: &str) {
        self.sessions.lock().expect("sessions").remove(session);
    }
}

/// Read NUL-separated messages until the pipe closes or says something that is no message.
async fn read_messages(
    mut reader: impl tokio::io::AsyncBufRead + Unpin,
    pending: &std::sync::Mutex<Pending>,
    sessions: &std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>,
) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // `take` bounds one message; a longer one ends the connection (below).
        let mut limited = (&mut reader).take(MAX_MESSAGE_BYTES as u64 + 1);
        match limited.read_until(0, &mut buf).await {
            Ok(0) => return,
            Ok(_) if buf.last() != Some(&0) => {
                if buf.len() > MAX_MESSAGE_BYTES {
                    tracing::warn!(
                        bytes = buf.len(),
                        "the browser sent a message over the limit; dropping the connection"
                    );
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading the browser's pipe");
                return;
            }
        }
        buf.pop();
        let Ok(message) = serde_json::from_slice::<Value>(&buf) else {
            tracing::warn!("the browser sent something that is not JSON; ignored");
            continue;
        };
        dispatch(message, pending, sessions);
    }
}

/// An answer goes to whoever sent its command; an event to its session's reader.
fn dispatch(
    mut message: Value,
    pending: &std::sync::Mutex<Pending>,
    sessions: &std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>,
) {
    if let Some(id) = message.get("id").and_then(Value::as_u64) {
        let Some(waiter) = pending.lock().expect("pending").remove(&id) else {
            return;
        };
        let answer = match message.get_mut("error") {
            Some(error) => Err(CdpError::Command {
                method: String::new(),
                message: error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_owned(),
            }),
            None => Ok(message
                .get_mut("result")
                .map(Value::take)
                .unwrap_or_default()),
        };
        let _ = waiter.send(answer);
        return;
    }
    let (Some(method), Some(session)) = (
        message
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned),
        message
            .get("sessionId")
            .and_then(Value::as_str)
            .map(str::to_owned),
    ) else {
        // Browser-wide events (targets attached, detached): nobody asked for them.
        return;
    };
    let event = Event {
        method,
        params: message
            .get_mut("params")
            .map(Value::take)
            .unwrap_or_default(),
    };
    let mut sessions = sessions.lock().expect("sessions");
    if let Some(tx) = sessions.get(&session)
        && tx.send(event).is_err()
    {
        sessions.remove(&session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake browser on the other ends of two in-memory pipes: answers each command with its
    /// own method and params, and sends an event of session "S" before each answer.
    fn fake_browser() -> Arc<Cdp> {
        let (to_browser, mut browser_reads) = tokio::io::duplex(1 << 16);
        let (mut browser_writes, from_browser) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while browser_reads.read_exact(&mut byte).await.is_ok() {
                if byte[0] != 0 {
                    buf.push(byte[0]);
                    continue;
                }
                let command: Value = serde_json::from_slice(&buf).unwrap();
                buf.clear();
                if command["method"] == "Die" {
                    return;
                }
                let event = json!({"method": "Page.loadEventFired", "sessionId": "S", "params": {"n": command["id"]}});
                let answer = if command["method"] == "Fail" {
                    json!({"id": command["id"], "error": {"code": -32000, "message": "no such thing"}})
                } else {
                    json!({"id": command["id"], "result": {"echo": command["method"], "session": command["sessionId"]}})
                };
                for m in [event, answer] {
                    let mut bytes = serde_json::to_vec(&m).unwrap();
                    bytes.push(0);
                    browser_writes.write_all(&bytes).await.unwrap();
                }
            }
        });
        Cdp::new(from_browser, to_browser)
    }

    const SECOND: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn answers_reach_their_callers_and_events_their_sessions() {
        let cdp = fake_browser();
        let mut events = cdp.events("S");
        let (a, b) = tokio::join!(
            cdp.call(None, "Browser.getVersion", json!({}), SECOND),
            cdp.call(Some("S"), "Page.enable", json!({}), SECOND)
        );
        assert_eq!(a.unwrap()["echo"], "Browser.getVersion");
        let b = b.unwrap();
        assert_eq!(b["echo"], "Page.enable");
        assert_eq!(b["session"], "S");
        let first = events.recv().await.unwrap();
        assert_eq!(first.method, "Page.loadEventFired");
        assert!(events.recv().await.is_some(), "one event per command");
    }

    #[tokio::test]
    async fn an_error_answer_names_its_command() {
        let cdp = fake_browser();
        let err = cdp.call(None, "Fail", json!({}), SECOND).await.unwrap_err();
        assert_eq!(err.to_string(), "Fail failed: no such thing");
    }

    #[tokio::test]
    async fn a_browser_that_goes_away_fails_waiting_and_later_calls() {
        let cdp = fake_browser();
        let err = cdp.call(None, "Die", json!({}), SECOND).await.unwrap_err();
        assert!(matches!(err, CdpError::Closed), "{err}");
        assert!(cdp.is_closed());
        let err = cdp.call(None, "Page.enable", json!({}), SECOND).await;
        assert!(matches!(err, Err(CdpError::Closed)), "{err:?}");
    }

    #[tokio::test]
    async fn a_message_over_the_limit_ends_the_connection_without_reading_it_all() {
        let (to_browser, _keep) = tokio::io::duplex(64);
        let (mut browser_writes, from_browser) = tokio::io::duplex(1 << 16);
        let cdp = Cdp::new(from_browser, to_browser);
        tokio::spawn(async move {
            let chunk = vec![b'x'; 1 << 16];
            // No NUL ever: one endless message.
            while browser_writes.write_all(&chunk).await.is_ok() {}
        });
        tokio::time::timeout(Duration::from_secs(30), cdp.closed.cancelled())
            .await
            .expect("the connection is dropped at the limit");
    }
}
