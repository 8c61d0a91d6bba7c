//! The agent's command line (`-p`, stream-json output, the input mode, the conversation to
//! start or resume, and the spec's options). The request itself never appears on it: it goes
//! on stdin.

#[allow(clippy::wildcard_imports)] // the agent step's shared types and imports
use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::agent::tests::spec;

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
}
