//! The CLI's stream-json, both ways: the request and the in-band interrupt as input lines, and
//! reading its output (lossy lines, events, the activity the progress events report, and the
//! result that ends a run).

#[allow(clippy::wildcard_imports)] // the agent step's shared types and imports
use super::*;

/// The one event we need the fields of; the others are read as loose JSON.
#[derive(Debug, Deserialize)]
pub(super) struct ResultEvent {
    pub(super) subtype: Option<String>,
    pub(super) is_error: Option<bool>,
    pub(super) result: Option<String>,
    pub(super) session_id: Option<String>,
    pub(super) total_cost_usd: Option<f64>,
    pub(super) num_turns: Option<u64>,
    pub(super) errors: Option<serde_json::Value>,
    pub(super) terminal_reason: Option<String>,
    pub(super) api_error_status: Option<u16>,
}

/// What the CLI says when `--resume` names a conversation it does not have.
pub(super) const NO_CONVERSATION: &str = "No conversation found";

impl ResultEvent {
    /// Does its text or its errors contain `text`?
    pub(super) fn mentions(&self, text: &str) -> bool {
        self.result.as_deref().is_some_and(|r| r.contains(text))
            || self
                .errors
                .as_ref()
                .is_some_and(|e| e.to_string().contains(text))
    }

    pub(super) fn report(&self) -> AgentReport {
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

/// Lines of a stream, decoded lossily: a byte of invalid UTF-8 (a tool's output echoed by the
/// agent) costs that character, not the rest of the run. Cancel-safe in `select!`: a partly
/// read line stays in the buffer for the next call.
pub(super) struct LossyLines<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: tokio::io::AsyncRead + Unpin> LossyLines<R> {
    pub(super) fn new(stream: R) -> Self {
        LossyLines {
            reader: BufReader::new(stream),
            buf: Vec::new(),
        }
    }

    pub(super) async fn next_line(&mut self) -> std::io::Result<Option<String>> {
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

/// What a stream-json line told us.
pub(super) enum Event {
    /// The `system`/`init` event.
    Started,
    Result(Box<ResultEvent>),
}

/// Parse one stream-json line; reports activity, returns the init and result events.
pub(super) fn read_event(line: &str, on_activity: &mut impl FnMut(AgentActivity)) -> Option<Event> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
