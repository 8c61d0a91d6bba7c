//! The agent's environment: an allow-list of the worker's variables (`AGENT_ENV`, the
//! `AGENT_ENV_ALLOW` names and patterns), Bedrock's only with `CLAUDE_CODE_USE_BEDROCK=1`, and
//! the OTLP settings and trace parent that let the CLI's traces join the worker's. Nothing
//! else of the worker's (its AWS credentials, queue URLs) reaches the agent.

#[allow(clippy::wildcard_imports)] // the agent step's shared types and imports
use super::*;

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
pub(super) const BEDROCK_ENV: &[&str] = &[
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
pub(super) const OTLP_ENV: &[&str] = &[
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
pub(super) const OTLP_AGENT_DEFAULTS: &[(&str, &str)] = &[
    ("CLAUDE_CODE_ENABLE_TELEMETRY", "1"),
    ("CLAUDE_CODE_ENHANCED_TELEMETRY_BETA", "1"),
    ("OTEL_TRACES_EXPORTER", "otlp"),
    ("OTEL_METRICS_EXPORTER", "none"),
    ("OTEL_LOGS_EXPORTER", "none"),
];

/// The `traceparent` of the current span (the job's `agent run` span, carried into the agent
/// actor's handler with the message), when it belongs to a trace.
pub(super) fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| crate::telemetry::trace_context::traceparent(sc))
}

/// Does `name` match `pattern` (one `*` at most, for any run of characters)?
pub(super) fn name_matches(pattern: &str, name: &str) -> bool {
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
    pub(super) fn set(env: &mut Vec<(OsString, OsString)>, k: OsString, v: OsString) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::agent::tests::spec;
    use std::path::PathBuf;

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
}
