//! The input message of the contract (`CONTRACT.md`, "The input message"), and its validation.
//!
//! Everything that comes off the queue is untrusted. Ids become parts of paths, bucket names and
//! git branch names, so each is checked against a whitelist before anything else looks at it.

use serde::Deserialize;

/// Default cap on the request text: large enough for any human request, small enough that a
/// runaway producer cannot make us hand megabytes to the agent.
pub const DEFAULT_MAX_COMMAND_BYTES: usize = 16 * 1024;

/// One validated edit request. Fields are private-by-construction: the only way to get one is
/// [`EditRequest::parse`], so every `EditRequest` in the program has passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditRequest {
    pub session_id: String,
    pub thread_id: String,
    pub client_id: String,
    pub project_id: String,
    /// The request text for the agent; empty for a rollback, which needs none.
    pub command: String,
    /// What the message asks for (`action`, and `to` for a rollback).
    pub action: Action,
}

/// What a message asks for (`action`). A message whose `action` the worker does not know is
/// rejected (`unknown_action`), never run as an edit: a producer newer than the worker must
/// not have its request silently turned into something else.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Action {
    /// Run the agent on `command`, build, publish, push (the default).
    #[default]
    Edit,
    /// Make the bucket hold an earlier deploy again, without the agent or a build.
    Rollback(RollbackTarget),
}

/// What a rollback goes back to (`to`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RollbackTarget {
    /// The deploy that was live before the current one (the default).
    #[default]
    Previous,
    /// A `deployId` from an earlier event.
    Deploy(String),
    /// A commit that was deployed before: 7 to 40 hex digits, lower-cased (a prefix matches).
    Commit(String),
}

impl std::fmt::Display for RollbackTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RollbackTarget::Previous => f.write_str("previous"),
            RollbackTarget::Deploy(id) => write!(f, "deploy {id}"),
            RollbackTarget::Commit(commit) => write!(f, "commit {commit}"),
        }
    }
}

impl RollbackTarget {
    /// Read `to`: `previous`, a deploy id (`crate::contract::deploy_id::is_deploy_id`) or 7 to 40 hex
    /// digits. Anything else is refused rather than guessed at.
    pub fn parse(text: &str) -> Result<RollbackTarget, RequestError> {
        let invalid = |reason| RequestError::InvalidField {
            field: "to",
            reason,
        };
        if text == "previous" {
            Ok(RollbackTarget::Previous)
        } else if crate::contract::deploy_id::is_deploy_id(text) {
            Ok(RollbackTarget::Deploy(text.to_owned()))
        } else if (7..=40).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(RollbackTarget::Commit(text.to_ascii_lowercase()))
        } else {
            Err(invalid(
                "must be \"previous\", a deployId or a commit id of 7 to 40 hex digits",
            ))
        }
    }

    /// As `to` is written in a message.
    pub fn as_field(&self) -> &str {
        match self {
            RollbackTarget::Previous => "previous",
            RollbackTarget::Deploy(id) => id,
            RollbackTarget::Commit(commit) => commit,
        }
    }
}

/// The workspace a request belongs to: `{WORKSPACE_ROOT}/{clientId}/{projectId}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkspaceKey {
    pub client_id: String,
    pub project_id: String,
}

#[cfg(test)]
impl WorkspaceKey {
    /// The key of `client/project`, for tests (real keys come from validated requests).
    pub(crate) fn of(client: &str, project: &str) -> WorkspaceKey {
        WorkspaceKey {
            client_id: client.into(),
            project_id: project.into(),
        }
    }
}

impl std::fmt::Display for WorkspaceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.client_id, self.project_id)
    }
}

/// Why a message was rejected. `kind()` is the stable name that goes into the status event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the message body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the message body must be a JSON object")]
    NotAnObject,
    #[error("required field `{0}` is missing")]
    MissingField(&'static str),
    #[error("field `{field}` must be a string")]
    NotAString { field: &'static str },
    #[error("field `{field}` is invalid: {reason}")]
    InvalidField {
        field: &'static str,
        reason: &'static str,
    },
    #[error("field `command` is {len} bytes, more than the limit of {max}")]
    CommandTooLarge { len: usize, max: usize },
    #[error("this worker serves only {allowed}, not {got}")]
    NotServedHere { allowed: String, got: String },
    #[error("the edit bucket name `{bucket}` made from the ids is invalid: it {reason}")]
    InvalidBucket {
        bucket: String,
        reason: &'static str,
    },
    #[error(
        "field `action` is {0:?}, which this worker does not know (it knows \"edit\" and \"rollback\"); \
         the message was not run"
    )]
    UnknownAction(String),
}

impl RequestError {
    /// Stable machine-readable kind, part of the external contract.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            RequestError::MalformedJson(_) | RequestError::NotAnObject => "malformed_message",
            RequestError::MissingField(_) => "missing_field",
            RequestError::NotAString { .. }
            | RequestError::InvalidField { .. }
            | RequestError::InvalidBucket { .. } => "invalid_field",
            RequestError::CommandTooLarge { .. } => "command_too_large",
            RequestError::NotServedHere { .. } => "not_served_here",
            RequestError::UnknownAction(_) => "unknown_action",
        }
    }
}

/// The ids a message carries, as far as they could be read. A rejected message's status event
/// carries whatever of these was readable (and valid), so the producer can match it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LooseIds {
    pub session_id: Option<String>,
    pub thread_id: Option<String>,
    pub client_id: Option<String>,
    pub project_id: Option<String>,
}

/// The raw shape, before validation. Unknown fields are ignored (contract).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMessage {
    session_id: Option<serde_json::Value>,
    thread_id: Option<serde_json::Value>,
    client_id: Option<serde_json::Value>,
    project_id: Option<serde_json::Value>,
    command: Option<serde_json::Value>,
    action: Option<serde_json::Value>,
    to: Option<serde_json::Value>,
}

impl EditRequest {
    /// Parse and validate a message body.
    pub fn parse(body: &str, max_command_bytes: usize) -> Result<EditRequest, RequestError> {
        let value: serde_json::Value =
            serde_json::from_str(body).map_err(|e| RequestError::MalformedJson(e.to_string()))?;
        if !value.is_object() {
            return Err(RequestError::NotAnObject);
        }
        let raw: RawMessage = serde_json::from_value(value)
            .map_err(|e| RequestError::MalformedJson(e.to_string()))?;

        let session_id = required_string("sessionId", raw.session_id)?;
        let thread_id = required_string("threadId", raw.thread_id)?;
        let client_id = required_string("clientId", raw.client_id)?;
        let project_id = required_string("projectId", raw.project_id)?;
        let action = optional_string("action", raw.action)?;
        let to = optional_string("to", raw.to)?;
        // An action this worker does not know is refused before anything else of the message
        // is looked at: it is never run as something else.
        let rollback = match action.as_deref() {
            None | Some("edit") => false,
            Some("rollback") => true,
            Some(other) => {
                return Err(RequestError::UnknownAction(
                    other.chars().take(64).collect(),
                ));
            }
        };
        // A rollback needs no request text; one it carries anyway is not used.
        let command = if rollback {
            optional_string("command", raw.command)?.unwrap_or_default()
        } else {
            required_string("command", raw.command)?
        };

        check_dns_label("clientId", &client_id)?;
        check_dns_label("projectId", &project_id)?;
        check_ref_safe_id("threadId", &thread_id)?;
        check_ref_safe_id("sessionId", &session_id)?;
        let action = if rollback {
            Action::Rollback(match to {
                Some(to) => RollbackTarget::parse(&to)?,
                None => RollbackTarget::Previous,
            })
        } else {
            check_command(&command, max_command_bytes)?;
            if to.is_some() {
                // `to` means something only to a rollback: an edit that carries one was most
                // likely meant as a rollback, and running the agent on it would be a guess.
                return Err(RequestError::InvalidField {
                    field: "to",
                    reason: "is only for \"action\": \"rollback\"",
                });
            }
            Action::Edit
        };

        Ok(EditRequest {
            session_id,
            thread_id,
            client_id,
            project_id,
            command,
            action,
        })
    }

    pub(crate) fn workspace(&self) -> WorkspaceKey {
        WorkspaceKey {
            client_id: self.client_id.clone(),
            project_id: self.project_id.clone(),
        }
    }

    /// A rollback's target, `None` for an edit.
    pub(crate) fn rollback_target(&self) -> Option<&RollbackTarget> {
        match &self.action {
            Action::Rollback(target) => Some(target),
            Action::Edit => None,
        }
    }

    /// The git branch of this request's thread.
    pub(crate) fn branch(&self) -> String {
        format!("thread-{}", self.thread_id)
    }
}

impl LooseIds {
    /// Read whatever valid ids a (possibly invalid) body carries. Invalid ids are left out:
    /// they must not travel on as if they were trustworthy.
    pub(crate) fn from_body(body: &str) -> LooseIds {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(body)
        else {
            return LooseIds::default();
        };
        let get = |name: &str, check: fn(&'static str, &str) -> Result<(), RequestError>| {
            map.get(name)
                .and_then(|v| v.as_str())
                .filter(|s| check("id", s).is_ok())
                .map(str::to_owned)
        };
        LooseIds {
            session_id: get("sessionId", check_ref_safe_id),
            thread_id: get("threadId", check_ref_safe_id),
            client_id: get("clientId", check_dns_label),
            project_id: get("projectId", check_dns_label),
        }
    }
}

fn required_string(
    field: &'static str,
    value: Option<serde_json::Value>,
) -> Result<String, RequestError> {
    match value {
        None | Some(serde_json::Value::Null) => Err(RequestError::MissingField(field)),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(RequestError::NotAString { field }),
    }
}

fn optional_string(
    field: &'static str,
    value: Option<serde_json::Value>,
) -> Result<Option<String>, RequestError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        value => required_string(field, value).map(Some),
    }
}

/// `clientId`/`projectId`: a DNS label (they become part of a bucket name and of a path).
pub fn check_dns_label(field: &'static str, s: &str) -> Result<(), RequestError> {
    let invalid = |reason| Err(RequestError::InvalidField { field, reason });
    if s.is_empty() || s.len() > 63 {
        return invalid("must be 1 to 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return invalid("may contain only lower-case letters, digits and '-'");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return invalid("must not start or end with '-'");
    }
    Ok(())
}

/// `threadId`/`sessionId`: safe as a git branch name component and as a file name.
pub(crate) fn check_ref_safe_id(field: &'static str, s: &str) -> Result<(), RequestError> {
    let invalid = |reason| Err(RequestError::InvalidField { field, reason });
    if s.is_empty() || s.len() > 128 {
        return invalid("must be 1 to 128 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("may contain only A-Z, a-z, 0-9, '.', '_' and '-'");
    }
    if s.starts_with('.') || s.starts_with('-') {
        return invalid("must not start with '.' or '-'");
    }
    if s.contains("..") {
        return invalid("must not contain '..'");
    }
    if s.ends_with(".lock") {
        return invalid("must not end in '.lock'");
    }
    // git's own rule for a ref name component (`git check-ref-format`).
    if s.ends_with('.') {
        return invalid("must not end with '.'");
    }
    Ok(())
}

/// An S3 bucket name (general purpose buckets): 3 to 63 characters of lower-case letters,
/// digits, `.` and `-`, starting and ending with a letter or digit, no `..`, `.-` or `-.`, not
/// shaped like an IP address. A message whose ids make an invalid name is bad input, not a
/// passing failure.
pub(crate) fn check_bucket_name(name: &str) -> Result<(), &'static str> {
    if name.len() < 3 || name.len() > 63 {
        return Err("must be 3 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err("may contain only lower-case letters, digits, '.' and '-'");
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge_ok(name.as_bytes()[0]) || !edge_ok(name.as_bytes()[name.len() - 1]) {
        return Err("must start and end with a letter or digit");
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return Err("must not contain '..', '.-' or '-.'");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("must not be shaped like an IP address");
    }
    Ok(())
}

fn check_command(command: &str, max_bytes: usize) -> Result<(), RequestError> {
    if command.trim().is_empty() {
        return Err(RequestError::InvalidField {
            field: "command",
            reason: "must not be empty",
        });
    }
    if command.len() > max_bytes {
        return Err(RequestError::CommandTooLarge {
            len: command.len(),
            max: max_bytes,
        });
    }
    if command.contains('\0') {
        return Err(RequestError::InvalidField {
            field: "command",
            reason: "must not contain NUL",
        });
    }
    Ok(())
}

/// The request as the producer sent it, for a dead-letter copy.
pub(crate) fn request_body(request: &EditRequest) -> String {
    serde_json::to_string(&RequestBody::from(request)).expect("plain strings serialize")
}

/// The request as the producer sent it, for the dead-letter copy.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestBody<'a> {
    session_id: &'a str,
    thread_id: &'a str,
    client_id: &'a str,
    project_id: &'a str,
    command: &'a str,
    /// A rollback's `action` and `to`, so that its dead-letter copy is still a rollback.
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
}

impl<'a> From<&'a EditRequest> for RequestBody<'a> {
    fn from(r: &'a EditRequest) -> Self {
        RequestBody {
            session_id: &r.session_id,
            thread_id: &r.thread_id,
            client_id: &r.client_id,
            project_id: &r.project_id,
            command: &r.command,
            action: r.rollback_target().map(|_| "rollback"),
            to: r.rollback_target().map(|t| t.as_field()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "sessionId": "test-session-123",
      "threadId": "test-thread-456",
      "clientId": "amelia",
      "projectId": "stamps",
      "command": "Update the homepage title to \"Amelia Stamps - Handcrafted with Love\"",
      "somethingNew": 1
    }"#;

    fn with(field: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v[field] = value;
        v.to_string()
    }

    fn kind(body: &str) -> &'static str {
        EditRequest::parse(body, DEFAULT_MAX_COMMAND_BYTES)
            .unwrap_err()
            .kind()
    }

    #[test]
    fn contract_example_parses_and_ignores_unknown_fields() {
        let r = EditRequest::parse(EXAMPLE, DEFAULT_MAX_COMMAND_BYTES).unwrap();
        assert_eq!(r.client_id, "amelia");
        assert_eq!(r.branch(), "thread-test-thread-456");
        assert_eq!(r.workspace().to_string(), "amelia/stamps");
    }

    #[test]
    fn bad_json_and_shapes_are_malformed() {
        assert_eq!(kind("{not json"), "malformed_message");
        assert_eq!(kind("[1,2]"), "malformed_message");
        assert_eq!(kind("\"text\""), "malformed_message");
    }

    #[test]
    fn missing_and_mistyped_fields() {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v.as_object_mut().unwrap().remove("threadId");
        let err = EditRequest::parse(&v.to_string(), 100).unwrap_err();
        assert_eq!(err, RequestError::MissingField("threadId"));
        assert_eq!(
            kind(&with("clientId", serde_json::json!(7))),
            "invalid_field"
        );
        assert_eq!(
            kind(&with("command", serde_json::Value::Null)),
            "missing_field"
        );
    }

    #[test]
    fn client_and_project_must_be_dns_labels() {
        for bad in [
            "../bob",
            "Bob",
            "-x",
            "x-",
            "",
            "a_b",
            "a.b",
            &"a".repeat(64),
        ] {
            assert_eq!(
                kind(&with("clientId", bad.into())),
                "invalid_field",
                "{bad:?}"
            );
            assert_eq!(
                kind(&with("projectId", bad.into())),
                "invalid_field",
                "{bad:?}"
            );
        }
        assert!(EditRequest::parse(&with("clientId", "a-1".into()), 99999).is_ok());
    }

    #[test]
    fn thread_and_session_ids_must_be_ref_safe() {
        for bad in [
            "a..b",
            "-x",
            ".x",
            "x.lock",
            "a/b",
            "a b",
            "",
            "ü",
            &"a".repeat(129),
        ] {
            assert_eq!(
                kind(&with("threadId", bad.into())),
                "invalid_field",
                "{bad:?}"
            );
            assert_eq!(
                kind(&with("sessionId", bad.into())),
                "invalid_field",
                "{bad:?}"
            );
        }
        assert!(EditRequest::parse(&with("threadId", "A.b_c-1".into()), 99999).is_ok());
    }

    #[test]
    fn command_limits() {
        assert_eq!(kind(&with("command", "  ".into())), "invalid_field");
        assert_eq!(kind(&with("command", "a\0b".into())), "invalid_field");
        let big = "x".repeat(1024 * 1024);
        assert_eq!(kind(&with("command", big.into())), "command_too_large");
        // Shell metacharacters are just text.
        let shelly = r#""; touch /tmp/pwned; " $(id)"#;
        let r = EditRequest::parse(&with("command", shelly.into()), 100).unwrap();
        assert_eq!(r.command, shelly);
    }

    #[test]
    fn loose_ids_keep_only_valid_ids() {
        let ids = LooseIds::from_body(&with("clientId", "../bob".into()));
        assert_eq!(ids.client_id, None);
        assert_eq!(ids.thread_id.as_deref(), Some("test-thread-456"));
        assert_eq!(LooseIds::from_body("nope"), LooseIds::default());
    }

    #[test]
    fn ids_that_are_no_valid_ref_component_are_rejected() {
        for bad in ["t.", "a..b", ".t", "-t", "t.lock"] {
            assert_eq!(
                kind(&with("threadId", bad.into())),
                "invalid_field",
                "{bad}"
            );
        }
        assert!(EditRequest::parse(&with("threadId", "a.b_c-1".into()), 1024).is_ok());
    }

    #[test]
    fn bucket_names_follow_s3s_rules() {
        assert!(check_bucket_name("edit.amelia.webordinary.com").is_ok());
        for bad in [
            "ab",
            &"a".repeat(64),
            "Edit.x",
            "-edit",
            "edit-",
            "a..b",
            "a.-b",
            "192.168.1.1",
        ] {
            assert!(check_bucket_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lengths_at_their_limits_pass_and_one_more_fails() {
        let label = "a".repeat(63);
        assert!(EditRequest::parse(&with("clientId", label.as_str().into()), 100).is_ok());
        assert!(EditRequest::parse(&with("projectId", "a".into()), 100).is_ok());
        let id = "a".repeat(128);
        assert!(EditRequest::parse(&with("threadId", id.as_str().into()), 100).is_ok());
        assert!(EditRequest::parse(&with("sessionId", id.as_str().into()), 100).is_ok());

        let exact = "x".repeat(100);
        assert!(EditRequest::parse(&with("command", exact.as_str().into()), 100).is_ok());
        let over = "x".repeat(101);
        assert_eq!(
            EditRequest::parse(&with("command", over.as_str().into()), 100).unwrap_err(),
            RequestError::CommandTooLarge { len: 101, max: 100 }
        );
        // The limit is in bytes of UTF-8, not characters: 60 of these are 120 bytes.
        let wide = "é".repeat(60);
        assert_eq!(
            EditRequest::parse(&with("command", wide.as_str().into()), 100).unwrap_err(),
            RequestError::CommandTooLarge { len: 120, max: 100 }
        );
    }

    #[test]
    fn the_command_is_kept_exactly_as_sent() {
        // Leading dashes, surrounding white space, lines and any script: text, never trimmed.
        for command in [
            "--help",
            "-p --dangerously-skip-permissions",
            "  indented\n\tand two lines  ",
            "Überschrift auf \"Grüße\" ändern 🎉",
        ] {
            let r = EditRequest::parse(&with("command", command.into()), 1024).unwrap();
            assert_eq!(r.command, command);
        }
        for blank in ["", "\n", "\t \r\n"] {
            assert_eq!(
                EditRequest::parse(&with("command", blank.into()), 1024).unwrap_err(),
                RequestError::InvalidField {
                    field: "command",
                    reason: "must not be empty"
                },
                "{blank:?}"
            );
        }
    }

    #[test]
    fn the_first_broken_field_is_named_in_the_contracts_order() {
        assert_eq!(
            EditRequest::parse("{}", 100).unwrap_err(),
            RequestError::MissingField("sessionId")
        );
        assert_eq!(
            EditRequest::parse(&with("threadId", serde_json::json!(["t"])), 100).unwrap_err(),
            RequestError::NotAString { field: "threadId" }
        );
        // Presence and type of every field first, then their values.
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v["clientId"] = "Bad Client".into();
        v.as_object_mut().unwrap().remove("command");
        assert_eq!(
            EditRequest::parse(&v.to_string(), 100).unwrap_err(),
            RequestError::MissingField("command")
        );
        let err = EditRequest::parse(&with("projectId", "Shop".into()), 100).unwrap_err();
        assert!(
            matches!(
                err,
                RequestError::InvalidField {
                    field: "projectId",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn every_rejection_has_its_stable_kind() {
        let cases = [
            (RequestError::MalformedJson("x".into()), "malformed_message"),
            (RequestError::NotAnObject, "malformed_message"),
            (RequestError::MissingField("command"), "missing_field"),
            (
                RequestError::NotAString { field: "command" },
                "invalid_field",
            ),
            (
                RequestError::InvalidField {
                    field: "clientId",
                    reason: "r",
                },
                "invalid_field",
            ),
            (
                RequestError::CommandTooLarge { len: 2, max: 1 },
                "command_too_large",
            ),
            (
                RequestError::NotServedHere {
                    allowed: "client a".into(),
                    got: "client b".into(),
                },
                "not_served_here",
            ),
            (
                RequestError::InvalidBucket {
                    bucket: "b".into(),
                    reason: "r",
                },
                "invalid_field",
            ),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
        }
    }

    #[test]
    fn loose_ids_read_what_they_can_of_any_body() {
        let ids = LooseIds::from_body(EXAMPLE);
        assert_eq!(
            ids,
            LooseIds {
                session_id: Some("test-session-123".into()),
                thread_id: Some("test-thread-456".into()),
                client_id: Some("amelia".into()),
                project_id: Some("stamps".into()),
            }
        );
        // A body that fails for another reason (no command) still names its sender.
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v.as_object_mut().unwrap().remove("command");
        assert_eq!(LooseIds::from_body(&v.to_string()), ids);
        // Ids that are not strings, or not valid, are left out one by one.
        let odd = serde_json::json!({"sessionId": 5, "threadId": "a..b", "clientId": "ok", "projectId": null});
        assert_eq!(
            LooseIds::from_body(&odd.to_string()),
            LooseIds {
                client_id: Some("ok".into()),
                ..LooseIds::default()
            }
        );
        assert_eq!(LooseIds::from_body("[\"amelia\"]"), LooseIds::default());
    }

    #[test]
    fn bucket_names_at_the_edges() {
        assert!(check_bucket_name("abc").is_ok());
        assert!(check_bucket_name(&"a".repeat(63)).is_ok());
        assert!(check_bucket_name("1.2.3").is_ok(), "not an IPv4 address");
        for bad in ["a-.b", "a_b", "a b", "abc.", ".abc", "10.0.0.1"] {
            assert!(check_bucket_name(bad).is_err(), "{bad}");
        }
    }

    fn rollback(extra: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v.as_object_mut().unwrap().remove("command");
        v["action"] = "rollback".into();
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v.to_string()
    }

    #[test]
    fn an_edit_is_the_default_action_and_edit_may_be_said() {
        let r = EditRequest::parse(EXAMPLE, DEFAULT_MAX_COMMAND_BYTES).unwrap();
        assert_eq!(r.action, Action::Edit);
        let r = EditRequest::parse(&with("action", "edit".into()), 1024).unwrap();
        assert_eq!(r.action, Action::Edit);
        assert_eq!(r.rollback_target(), None);
        // An explicit null is as if it were absent.
        let r = EditRequest::parse(&with("action", serde_json::Value::Null), 1024).unwrap();
        assert_eq!(r.action, Action::Edit);
    }

    #[test]
    fn an_unknown_action_is_rejected_and_never_run_as_an_edit() {
        for action in ["deploy", "ROLLBACK", "", "undo"] {
            let err = EditRequest::parse(&with("action", action.into()), 1024).unwrap_err();
            assert_eq!(err, RequestError::UnknownAction(action.into()));
            assert_eq!(err.kind(), "unknown_action");
            let text = err.to_string();
            assert!(
                text.contains("not run") && text.contains("rollback"),
                "{text}"
            );
        }
        assert_eq!(kind(&with("action", serde_json::json!(1))), "invalid_field");
        // A long unknown action is named, but not whole.
        let long = "x".repeat(10_000);
        let err = EditRequest::parse(&with("action", long.as_str().into()), 1024).unwrap_err();
        assert!(err.to_string().len() < 400);
    }

    #[test]
    fn a_rollback_needs_no_command_and_goes_to_previous_by_default() {
        let r = EditRequest::parse(&rollback(serde_json::json!({})), 1024).unwrap();
        assert_eq!(r.action, Action::Rollback(RollbackTarget::Previous));
        assert_eq!(r.command, "");
        let r = EditRequest::parse(&rollback(serde_json::json!({"to": "previous"})), 1024).unwrap();
        assert_eq!(r.rollback_target(), Some(&RollbackTarget::Previous));
        // Its ids are checked as an edit's are.
        let bad = rollback(serde_json::json!({"clientId": "../x"}));
        assert_eq!(kind(&bad), "invalid_field");
    }

    #[test]
    fn a_rollback_names_a_deploy_or_a_commit() {
        let to = |t: &str| {
            EditRequest::parse(&rollback(serde_json::json!({ "to": t })), 1024)
                .map(|r| r.rollback_target().cloned().unwrap())
        };
        assert_eq!(
            to("000012-0123456789ab").unwrap(),
            RollbackTarget::Deploy("000012-0123456789ab".into())
        );
        assert_eq!(
            to("ABCDEF1").unwrap(),
            RollbackTarget::Commit("abcdef1".into())
        );
        let full = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(to(full).unwrap(), RollbackTarget::Commit(full.into()));
        for bad in [
            "abc123",
            &format!("{full}8"),
            "HEAD~1",
            "latest",
            "",
            "../x",
            "0000x",
        ] {
            let err = to(bad).unwrap_err();
            assert!(
                matches!(err, RequestError::InvalidField { field: "to", .. }),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn to_belongs_to_a_rollback_only() {
        let err = EditRequest::parse(&with("to", "previous".into()), 1024).unwrap_err();
        assert!(
            matches!(err, RequestError::InvalidField { field: "to", .. }),
            "{err:?}"
        );
    }
}
