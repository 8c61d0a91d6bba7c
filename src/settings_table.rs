//! Every setting of the worker in one table: its name, its kind (how a value is read and
//! checked), its default and its meaning. `config.rs` reads names and defaults from here and
//! nowhere else; the example file (`config/edit-worker.example.toml`) and the README's
//! configuration table are rendered from it, and the tests below fail when either has drifted.
//! To rewrite both after changing the table:
//!
//! ```sh
//! UPDATE_DOCS=1 cargo test -p edit-worker --bin edit-worker settings_table
//! ```
//!
//! A setting the contract names changes in `../shared/CONTRACT.md` first.

use std::path::PathBuf;

use edit_worker_actors::config::OutputDir;
use edit_worker_actors::contract::message::check_dns_label;

/// One setting: an environment variable, or the same key in the TOML file.
#[derive(Debug)]
pub struct Setting {
    pub name: &'static str,
    pub kind: Kind,
    pub default: DefaultIs,
    /// One line of Markdown: the README's "meaning" column, the example file's comment.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "documentation: rendered by the tests")
    )]
    pub meaning: &'static str,
    /// For a setting without a default value: a value to show in the example file (set there
    /// when the setting is required, commented out otherwise).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "documentation: rendered by the tests")
    )]
    pub example: Option<&'static str>,
}

/// How a value is read and checked. Every value is text (the environment's); the TOML file may
/// also give numbers, true/false, and lists for the kinds that are lists.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Any text.
    Text,
    /// A path, as given.
    Path,
    /// An absolute path.
    AbsolutePath,
    /// A folder inside the workspace ([`OutputDir`]).
    InsidePath,
    /// argv words, split on white space (there is no shell, hence no quoting).
    Words,
    /// Comma-separated items; empty ones are dropped.
    List,
    /// Comma-separated environment variable names.
    Names,
    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    Flag,
    /// A whole number from `min` to `max`.
    Number { min: u64, max: u64 },
    /// A number of bytes, at least 1 (the README shows it in MiB/GiB too).
    Bytes,
    /// A positive decimal amount.
    Amount,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A DNS label, as `clientId` and `projectId` are.
    Label,
}

/// At least 1, no upper bound.
const POSITIVE: Kind = Kind::Number {
    min: 1,
    max: u64::MAX,
};
/// 0 or more.
const WHOLE: Kind = Kind::Number {
    min: 0,
    max: u64::MAX,
};
/// A count the worker keeps in 32 bits.
const COUNT: Kind = Kind::Number {
    min: 1,
    max: u32::MAX as u64,
};
const WHOLE_COUNT: Kind = Kind::Number {
    min: 0,
    max: u32::MAX as u64,
};

/// What a setting is when it is not set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultIs {
    /// This value, read by the setting's kind as if it were set.
    Value(&'static str),
    /// `run` refuses to start without it.
    Required,
    /// Nothing; the text (Markdown) says what that means.
    Nothing(&'static str),
    /// Worked out at start; the text (Markdown) says how.
    Derived(&'static str),
}

/// A value read by its kind.
#[derive(Debug, PartialEq)]
pub enum Value {
    Text(String),
    Path(PathBuf),
    OutputDir(OutputDir),
    List(Vec<String>),
    Flag(bool),
    Number(u64),
    Amount(f64),
}

impl Kind {
    /// Reads `text` as this kind: the value, or why it is not one (without the setting's name,
    /// which the caller adds).
    pub fn parse(self, text: &str) -> Result<Value, String> {
        let split = |sep: char| -> Vec<String> {
            text.split(sep)
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Ok(match self {
            Kind::Text => Value::Text(text.to_owned()),
            Kind::Path => Value::Path(PathBuf::from(text)),
            Kind::AbsolutePath => {
                let path = PathBuf::from(text);
                if !path.is_absolute() {
                    return Err("must be an absolute path".into());
                }
                Value::Path(path)
            }
            Kind::InsidePath => {
                Value::OutputDir(OutputDir::new(text.trim()).map_err(|e| e.to_string())?)
            }
            Kind::Words => Value::List(text.split_whitespace().map(str::to_owned).collect()),
            Kind::List => Value::List(split(',')),
            Kind::Names => {
                let names = split(',');
                if let Some(bad) = names.iter().find(|name| !is_variable_name(name)) {
                    return Err(format!("`{bad}` is not an environment variable name"));
                }
                Value::List(names)
            }
            Kind::Flag => match text.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => Value::Flag(true),
                "0" | "false" | "no" => Value::Flag(false),
                other => return Err(format!("`{other}` is not true or false")),
            },
            Kind::Number { min, max } => {
                let n: u64 = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{text}` is not a whole number"))?;
                if n < min || n > max {
                    return Err(if max == u64::MAX {
                        format!("must be at least {min}")
                    } else {
                        format!("must be {min} to {max}")
                    });
                }
                Value::Number(n)
            }
            Kind::Bytes => return POSITIVE.parse(text),
            Kind::Amount => Value::Amount(
                text.trim()
                    .parse()
                    .ok()
                    .filter(|x: &f64| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| format!("`{text}` is not a positive amount"))?,
            ),
            Kind::Choice(words) => {
                let word = text.trim();
                if !words.contains(&word) {
                    return Err(format!("`{word}` is not one of {}", words.join(", ")));
                }
                Value::Text(word.to_owned())
            }
            Kind::Label => {
                check_dns_label("id", text).map_err(|e| e.to_string())?;
                Value::Text(text.to_owned())
            }
        })
    }

    /// What joins the items of a TOML list given for this kind; `None`: a list is not allowed.
    pub fn list_separator(self) -> Option<&'static str> {
        match self {
            Kind::Words => Some(" "),
            Kind::List | Kind::Names => Some(","),
            _ => None,
        }
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The modes `claude --permission-mode` takes.
const PERMISSION_MODES: &[&str] = &[
    "acceptEdits",
    "bypassPermissions",
    "plan",
    "default",
    "dontAsk",
    "auto",
];

/// Every setting the worker reads, in the README's order.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "INPUT_QUEUE_URL",
        kind: Kind::Text,
        default: DefaultIs::Required,
        meaning: "the queue of edit requests",
        example: Some("https://sqs.us-west-2.amazonaws.com/123456789012/edit-requests"),
    },
    Setting {
        name: "OUTPUT_QUEUE_URL",
        kind: Kind::Text,
        default: DefaultIs::Nothing("none: events only logged"),
        meaning: "the status queue",
        example: Some("https://sqs.us-west-2.amazonaws.com/123456789012/edit-status"),
    },
    Setting {
        name: "DEAD_LETTER_QUEUE_URL",
        kind: Kind::Text,
        default: DefaultIs::Nothing("none"),
        meaning: "where rejected messages are kept",
        example: Some("https://sqs.us-west-2.amazonaws.com/123456789012/edit-requests-dlq"),
    },
    Setting {
        name: "WORKSPACE_ROOT",
        kind: Kind::Path,
        default: DefaultIs::Value("/workspace"),
        meaning: "workspaces live at `{WORKSPACE_ROOT}/{clientId}/{projectId}`",
        example: None,
    },
    Setting {
        name: "GIT_REMOTE_TEMPLATE",
        kind: Kind::Text,
        default: DefaultIs::Nothing("none: the workspace must exist"),
        meaning: "upstream remote, with `{clientId}` and `{projectId}`",
        example: Some("git@github.com:webordinary/{clientId}-{projectId}.git"),
    },
    Setting {
        name: "BUCKET_TEMPLATE",
        kind: Kind::Text,
        default: DefaultIs::Value("edit.{clientId}.webordinary.com"),
        meaning: "edit bucket, with `{clientId}` and `{projectId}`",
        example: None,
    },
    Setting {
        name: "PREVIEW_URL_TEMPLATE",
        kind: Kind::Text,
        default: DefaultIs::Value("http://{bucket}.s3-website-{region}.amazonaws.com/"),
        meaning: "`previewUrl` of events, with `{bucket}` and `{region}`",
        example: None,
    },
    Setting {
        name: "CLAUDE_BIN",
        kind: Kind::Path,
        default: DefaultIs::Value("claude"),
        meaning: "the agent executable",
        example: None,
    },
    Setting {
        name: "BUILD_COMMAND",
        kind: Kind::Words,
        default: DefaultIs::Value("npm run build"),
        meaning: "the build, argv words split on white space, no shell",
        example: None,
    },
    Setting {
        name: "BUILD_OUTPUT_DIR",
        kind: Kind::InsidePath,
        default: DefaultIs::Value("dist"),
        meaning: "the build's output folder, relative: inside the workspace (no `..`, not `.git`)",
        example: None,
    },
    Setting {
        name: "BUILD_SCRIPTS_WITHOUT_NPM",
        kind: Kind::Flag,
        default: DefaultIs::Value("true"),
        meaning: "`npm run <script>` runs the script's words directly (with `node_modules/.bin` \
            first on `PATH` and npm's `npm_lifecycle_*`/`npm_package_*` variables) when npm would \
            add nothing: no `pre`/`post` script, no `.npmrc`, plain words only (no quotes, \
            variables, `&&`, pipes...); otherwise npm runs it. Saves npm's start-up (about 0.25 \
            CPU-seconds, half a second) per build",
        example: None,
    },
    Setting {
        name: "CLIENT_ID",
        kind: Kind::Label,
        default: DefaultIs::Nothing("serve all"),
        meaning: "serve only this client; others are rejected",
        example: Some("amelia"),
    },
    Setting {
        name: "PROJECT_ID",
        kind: Kind::Label,
        default: DefaultIs::Nothing("serve all"),
        meaning: "serve only this project; others are rejected",
        example: Some("stamps"),
    },
    Setting {
        name: "MAX_COMMAND_BYTES",
        kind: POSITIVE,
        default: DefaultIs::Value("16384"),
        meaning: "largest accepted request text",
        example: None,
    },
    Setting {
        name: "AGENT_TIMEOUT_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Value("1800"),
        meaning: "wall-clock limit of one agent run (its process group is killed)",
        example: None,
    },
    Setting {
        name: "AGENT_SILENCE_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Derived("`AGENT_TIMEOUT_SECONDS`"),
        meaning: "watchdog: an agent that writes no event for this long is killed",
        example: Some("600"),
    },
    Setting {
        name: "AGENT_MAX_TURNS",
        kind: COUNT,
        default: DefaultIs::Nothing("unset"),
        meaning: "`--max-turns`",
        example: Some("30"),
    },
    Setting {
        name: "AGENT_MAX_BUDGET_USD",
        kind: Kind::Amount,
        default: DefaultIs::Nothing("unset"),
        meaning: "`--max-budget-usd`",
        example: Some("2.5"),
    },
    Setting {
        name: "AGENT_MODEL",
        kind: Kind::Text,
        default: DefaultIs::Nothing("unset"),
        meaning: "`--model`",
        example: Some("sonnet"),
    },
    Setting {
        name: "AGENT_PERMISSION_MODE",
        kind: Kind::Choice(PERMISSION_MODES),
        default: DefaultIs::Value("acceptEdits"),
        meaning: "`--permission-mode`",
        example: None,
    },
    Setting {
        name: "AGENT_ALLOWED_TOOLS",
        kind: Kind::List,
        default: DefaultIs::Nothing("unset"),
        meaning: "`--allowedTools`: comma-separated, e.g. `Edit,Write,Bash(npm run build)`",
        example: Some("Edit,Write,Bash(npm run build)"),
    },
    Setting {
        name: "AGENT_DISALLOWED_TOOLS",
        kind: Kind::List,
        default: DefaultIs::Nothing("unset"),
        meaning: "`--disallowedTools`: comma-separated, e.g. `WebFetch,WebSearch`",
        example: Some("WebFetch,WebSearch"),
    },
    Setting {
        name: "AGENT_APPEND_SYSTEM_PROMPT",
        kind: Kind::Text,
        default: DefaultIs::Nothing("unset"),
        meaning: "`--append-system-prompt`, e.g. the site's conventions",
        example: Some("Keep the site's existing components and styles."),
    },
    Setting {
        name: "AGENT_ENV_ALLOW",
        kind: Kind::Names,
        default: DefaultIs::Nothing("none"),
        meaning: "extra environment variable names passed to the agent, comma-separated (besides \
            the defaults: Anthropic key and auth tokens, Bedrock and Vertex settings, proxies, \
            `NODE_EXTRA_CA_CERTS`, model selection)",
        example: Some("MY_PROXY_TOKEN"),
    },
    Setting {
        name: "PROGRESS_INTERVAL_SECONDS",
        kind: WHOLE,
        default: DefaultIs::Value("5"),
        meaning: "at most one `progress` event per message this often",
        example: None,
    },
    Setting {
        name: "BUILD_REPAIR_ATTEMPTS",
        kind: WHOLE_COUNT,
        default: DefaultIs::Value("1"),
        meaning: "resume the agent with the build log when its edit broke the build",
        example: None,
    },
    Setting {
        name: "BUILD_TIMEOUT_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Value("600"),
        meaning: "limit for `npm ci` and for the build, each",
        example: None,
    },
    Setting {
        name: "INSTALL_MODE",
        kind: Kind::Choice(&["shared", "per-workspace"]),
        default: DefaultIs::Value("shared"),
        meaning: "`shared`: dependencies installed once per distinct `package-lock.json` (+ \
            `.npmrc`, Node major, platform) into a read-only store and linked into each \
            workspace's `node_modules`; `per-workspace`: `npm ci` in every workspace (sites whose \
            lock file links local packages, or whose `package.json` has install scripts, always \
            install in their workspace)",
        example: None,
    },
    Setting {
        name: "NPM_STORE_DIR",
        kind: Kind::AbsolutePath,
        default: DefaultIs::Derived("`{WORKSPACE_ROOT}/.cache/npm-store`"),
        meaning: "the shared store (absolute)",
        example: Some("/var/cache/edit-worker/npm-store"),
    },
    Setting {
        name: "NPM_STORE_MAX_MB",
        kind: POSITIVE,
        default: DefaultIs::Value("10240"),
        meaning: "the store's size: past it the least recently used entries are removed until the \
            store fits (after those unused for `NPM_STORE_MAX_AGE_DAYS`)",
        example: None,
    },
    Setting {
        name: "NPM_STORE_MAX_AGE_DAYS",
        kind: POSITIVE,
        default: DefaultIs::Value("30"),
        meaning: "store entries unused this long are removed",
        example: None,
    },
    Setting {
        name: "MAX_IN_FLIGHT",
        kind: POSITIVE,
        default: DefaultIs::Value("64"),
        meaning: "messages held at once; the intake receives only while there is room",
        example: None,
    },
    Setting {
        name: "MAX_HELD_PER_WORKSPACE",
        kind: POSITIVE,
        default: DefaultIs::Value("10"),
        meaning: "fairness: messages at work per workspace; more wait parked in the worker (held, \
            their visibility renewed, never given back: every receive counts toward the queue's \
            `maxReceiveCount`), up to 4 x `MAX_IN_FLIGHT` parked, past which the intake stops \
            receiving",
        example: None,
    },
    Setting {
        name: "MAX_HELD_PER_CLIENT",
        kind: POSITIVE,
        default: DefaultIs::Value("16"),
        meaning: "fairness: messages at work per client; more wait parked in the worker, as for \
            `MAX_HELD_PER_WORKSPACE`",
        example: None,
    },
    Setting {
        name: "LEASE_STORE",
        kind: Kind::Text,
        default: DefaultIs::Nothing(
            "none: records in `{WORKSPACE_ROOT}/.records`, no leases, and the worker assumes it \
             is alone on its queue (logged, and said by `doctor`)",
        ),
        meaning: "what workers of one queue share: workspace leases, each message's outcome, each \
            thread's newest started message, the thread map and the agent's conversation files. \
            `s3://BUCKET/PREFIX` (S3 conditional writes, on the SDK's endpoint; give \
            `PREFIX/outcomes/` a 15-day expiry rule). `dynamodb://` is not supported by this \
            build (it is refused at start)",
        example: Some("s3://edit-worker-leases/production"),
    },
    Setting {
        name: "WORKER_ID",
        kind: Kind::Text,
        default: DefaultIs::Derived("host name + process id"),
        meaning: "this worker's name in leases, records and logs; unique per process",
        example: Some("worker-1"),
    },
    Setting {
        name: "LEASE_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Value("30"),
        meaning: "a workspace lease lasts this long without a heartbeat (one every third): the \
            longest a dead worker keeps its workspaces",
        example: None,
    },
    Setting {
        name: "ISOLATION",
        kind: Kind::Choice(&["auto", "users", "namespaces", "users+namespaces", "none"]),
        default: DefaultIs::Value("auto"),
        meaning: "how tenants' code (agent, installs, builds) is isolated: `auto` (the strongest \
            the host allows; the worker refuses to start when it allows nothing), `users` (a uid \
            per workspace: needs root), `namespaces` (bubblewrap), `users+namespaces`, or `none` \
            (an explicit opt-out, logged at start). See \"Tenants\"",
        example: None,
    },
    Setting {
        name: "SANDBOX_MAX_PROCESSES",
        kind: POSITIVE,
        default: DefaultIs::Value("512"),
        meaning: "limit on a tenant's runs: processes and threads of its uid",
        example: None,
    },
    Setting {
        name: "SANDBOX_MAX_MEMORY_MB",
        kind: POSITIVE,
        default: DefaultIs::Value("2048"),
        meaning: "limit on a tenant's runs: private writable memory of one process (`RLIMIT_DATA`)",
        example: None,
    },
    Setting {
        name: "SANDBOX_MAX_FILE_MB",
        kind: POSITIVE,
        default: DefaultIs::Value("1024"),
        meaning: "limit on a tenant's runs: the largest file it may write",
        example: None,
    },
    Setting {
        name: "SANDBOX_MAX_CPU_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Value("1800"),
        meaning: "limit on a tenant's runs: CPU seconds of one process",
        example: None,
    },
    Setting {
        name: "SANDBOX_MAX_TMP_MB",
        kind: POSITIVE,
        default: DefaultIs::Value("512"),
        meaning: "limit on a tenant's runs: the size of its private `/tmp` (namespaces)",
        example: None,
    },
    Setting {
        name: "SANDBOX_MAX_DISK_MB",
        kind: POSITIVE,
        default: DefaultIs::Value("4096"),
        meaning: "limit on a tenant's runs: all its files in its checkout, home and agent folder \
            together (checked twice a second while a run lasts; past it the run is killed)",
        example: None,
    },
    Setting {
        name: "AGENT_CONCURRENCY",
        kind: POSITIVE,
        default: DefaultIs::Value("16"),
        meaning: "agent runs at once (I/O bound: mostly waiting on the model)",
        example: None,
    },
    Setting {
        name: "BUILD_CONCURRENCY",
        kind: POSITIVE,
        default: DefaultIs::Derived("number of cores"),
        meaning: "builds at once (CPU bound)",
        example: Some("2"),
    },
    Setting {
        name: "BUILD_AHEAD_MAX",
        kind: WHOLE_COUNT,
        default: DefaultIs::Value("16"),
        meaning: "Astro builds started ahead: while the agent works, the build's Node process \
            starts in the tenant's sandbox and loads Astro (about 1.5 CPU-seconds of a small \
            site's 3.5), then waits for the build's turn. Used when the build is a plain `npm run` \
            script starting with `astro`, Astro comes from the shared store, and neither changed \
            meanwhile; at most this many wait at once, about 150 MB each; `0` turns it off. A \
            loaded build goes before an unloaded one, at most this many times over each. Needs \
            `BUILD_SCRIPTS_WITHOUT_NPM` (on by default): with it off, nothing is started ahead \
            (said at start). Not \
            with `ISOLATION=users` (the end of the agent's run ends the tenant's processes)",
        example: None,
    },
    Setting {
        name: "S3_UPLOAD_CONCURRENCY",
        kind: POSITIVE,
        default: DefaultIs::Value("64"),
        meaning: "uploads at once over all publishes",
        example: None,
    },
    Setting {
        name: "SESSION_IDLE_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Value("300"),
        meaning: "an idle workspace's session is stopped after this long; the next message starts \
            it again (its step actors stop as soon as its work runs out)",
        example: None,
    },
    Setting {
        name: "TRACE_COMMAND_CHARS",
        kind: WHOLE,
        default: DefaultIs::Value("80"),
        meaning: "characters of the request text kept on the message's span (`0`: none)",
        example: None,
    },
    Setting {
        name: "VISIBILITY_TIMEOUT_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Value("30"),
        meaning: "a received message is invisible this long (`ReceiveMessage`'s \
            `VisibilityTimeout`), renewed every third while it is held: a frozen or killed \
            worker's messages are back within it",
        example: None,
    },
    Setting {
        name: "HOLD_UNDECIDED_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Value("300"),
        meaning: "a message the worker cannot decide (the lease or record store not answering) \
            is kept invisible and asked about again this long before it is given back; on its \
            last delivery before the queue's redrive it then ends `failed` \
            (`out_of_deliveries`)",
        example: None,
    },
    Setting {
        name: "AWS_ATTEMPT_TIMEOUT_SECONDS",
        kind: Kind::Number { min: 15, max: 3600 },
        default: DefaultIs::Value("30"),
        meaning: "one attempt of any AWS call (SQS, S3, CloudFront) ends after this long and is \
            retried by the SDK; above the 10 s long polls",
        example: None,
    },
    Setting {
        name: "AWS_OPERATION_TIMEOUT_SECONDS",
        kind: Kind::Number { min: 15, max: 3600 },
        default: DefaultIs::Value("90"),
        meaning: "any AWS call, all its attempts, ends after this long: no hung call holds \
            a release, a renewal or the intake",
        example: None,
    },
    Setting {
        name: "UPLOAD_CONCURRENCY",
        kind: POSITIVE,
        default: DefaultIs::Value("16"),
        meaning: "parallel S3 uploads per publish",
        example: None,
    },
    Setting {
        name: "CACHE_CONTROL_RULES",
        kind: Kind::Text,
        default: DefaultIs::Value("_astro/=public, max-age=31536000, immutable;*=no-cache"),
        meaning: "`pattern=value;...`, first match wins; `dir/` prefix, `*.ext`, `*`",
        example: None,
    },
    Setting {
        name: "PUBLISH_MAX_DELETE_PERCENT",
        kind: Kind::Number { min: 0, max: 100 },
        default: DefaultIs::Value("50"),
        meaning: "a publish that would delete more of a bucket fails",
        example: None,
    },
    Setting {
        name: "PUBLISH_ALLOW_MASS_DELETE",
        kind: Kind::Flag,
        default: DefaultIs::Value("false"),
        meaning: "`true` lifts that cap",
        example: None,
    },
    Setting {
        name: "PUBLISH_MAX_FILE_BYTES",
        kind: Kind::Bytes,
        default: DefaultIs::Value("104857600"),
        meaning: "a build with a larger file is not published (`build_too_large`, before any \
            upload)",
        example: None,
    },
    Setting {
        name: "PUBLISH_MAX_BYTES",
        kind: Kind::Bytes,
        default: DefaultIs::Value("1073741824"),
        meaning: "a build larger than this in all is not published (`build_too_large`, before any \
            upload)",
        example: None,
    },
    Setting {
        name: "DEPLOY_RETENTION_DAYS",
        kind: WHOLE,
        default: DefaultIs::Value("30"),
        meaning: "earlier deploys stay restorable this many days (their records and kept bytes \
            go after; the live deploy and the newest `DEPLOY_KEEP` always stay)",
        example: None,
    },
    Setting {
        name: "DEPLOY_KEEP",
        kind: POSITIVE,
        default: DefaultIs::Value("20"),
        meaning: "the newest this many deploys stay restorable whatever their age",
        example: None,
    },
    Setting {
        name: "CLOUDFRONT_DISTRIBUTIONS",
        kind: Kind::Text,
        default: DefaultIs::Nothing("none: no invalidation"),
        meaning: "`clientId=DISTRIBUTIONID,...`: after a publish, the changed paths are \
            invalidated there (more than 15: `/*`); the event carries `invalidationId`",
        example: Some("amelia=E2EXAMPLE1234"),
    },
    Setting {
        name: "PUSH_ATTEMPTS",
        kind: COUNT,
        default: DefaultIs::Value("4"),
        meaning: "tries of a push, with backoff, before the message fails",
        example: None,
    },
    Setting {
        name: "MAX_RECEIVES",
        kind: COUNT,
        default: DefaultIs::Value("5"),
        meaning: "deliveries before a passing failure (S3 or git remote away, crashed step) is \
            final and dead-lettered (at most the input queue's redrive `maxReceiveCount`, read \
            at start)",
        example: None,
    },
    Setting {
        name: "RETRY_BASE_SECONDS",
        kind: WHOLE,
        default: DefaultIs::Value("5"),
        meaning: "delay before the first retry of a passing failure, doubled per delivery",
        example: None,
    },
    Setting {
        name: "SHUTDOWN_DEADLINE_SECONDS",
        kind: POSITIVE,
        default: DefaultIs::Value("25"),
        meaning: "how long SIGTERM waits for running work to save itself",
        example: None,
    },
    Setting {
        name: "HEALTH_FILE",
        kind: Kind::Path,
        default: DefaultIs::Nothing("unset"),
        meaning: "touched by the intake every turn; `edit-worker healthcheck` reads its age",
        example: Some("/tmp/edit-worker.health"),
    },
    Setting {
        name: "BROWSER_CHECK",
        kind: Kind::Choice(&["auto", "on", "off"]),
        default: DefaultIs::Value("auto"),
        meaning: "after each publish, headless Chromium loads `/` and the changed pages as the \
            bucket serves them and `completed` carries `check`: `auto` (when Chromium is found; \
            the log and `doctor` say when it is not), `on` (the worker does not start without \
            it), `off`. See \"The browser check\"",
        example: None,
    },
    Setting {
        name: "CHECK_MAX_PAGES",
        kind: Kind::Number { min: 1, max: 50 },
        default: DefaultIs::Value("5"),
        meaning: "pages one check loads at most, `/` included, each at a desktop and a phone width",
        example: None,
    },
    Setting {
        name: "CHECK_REPAIR",
        kind: Kind::Choice(&["on", "off"]),
        default: DefaultIs::Value("on"),
        meaning: "resume the agent once when the check finds a console error or failed request \
            the previous deploy did not have, then build, publish and check again",
        example: None,
    },
    Setting {
        name: "CHROME_BIN",
        kind: Kind::Path,
        default: DefaultIs::Derived("`chromium` on `PATH`"),
        meaning: "the Chromium the browser check runs (Debian's `chromium` package)",
        example: Some("/usr/bin/chromium"),
    },
];

/// Variables others read (the AWS SDK, OpenTelemetry, logging): documented with the settings,
/// never in the TOML file.
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "documentation: rendered by the tests")
)]
pub struct Other {
    /// Markdown, as the README shows it.
    pub names: &'static str,
    pub meaning: &'static str,
    pub default: &'static str,
}

#[cfg_attr(
    not(test),
    expect(dead_code, reason = "documentation: rendered by the tests")
)]
pub const OTHERS: &[Other] = &[
    Other {
        names: "`AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`, credentials",
        meaning: "the AWS SDK's own",
        default: "SDK defaults",
    },
    Other {
        names: "`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_SERVICE_NAME`",
        meaning: "OpenTelemetry's own (the README's \"Tracing\")",
        default: "no export when unset",
    },
    Other {
        names: "`RUST_LOG` / `LOG_FORMAT`",
        meaning: "log filter / `json` for JSON lines",
        default: "`info` / text",
    },
];

/// The setting called `name`. Every name the parser asks for is in the table: a name that is
/// not is a mistake in the code, caught by the first test that parses a configuration.
pub fn setting(name: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the settings table"))
}

/// The README's table and the example file, as the table says they are. Only the tests use
/// them: they check both files, and rewrite them with `UPDATE_DOCS=1`.
#[cfg(test)]
mod docs {
    use super::*;

    /// The table as the README shows it (between its `settings-table` markers).
    pub(super) fn readme_table() -> String {
        let mut out = String::from("| variable | meaning | default |\n| --- | --- | --- |\n");
        for s in SETTINGS {
            let default = match s.default {
                DefaultIs::Value(v) => match (s.kind, v.parse::<u64>()) {
                    (Kind::Bytes, Ok(n)) => format!("`{v}` ({})", binary_size(n)),
                    _ => format!("`{v}`"),
                },
                DefaultIs::Required => "required for `run`".into(),
                DefaultIs::Nothing(text) | DefaultIs::Derived(text) => text.into(),
            };
            out.push_str(&format!("| `{}` | {} | {default} |\n", s.name, s.meaning));
        }
        for o in OTHERS {
            out.push_str(&format!(
                "| {} | {} | {} |\n",
                o.names, o.meaning, o.default
            ));
        }
        out
    }

    /// `n` bytes in the largest binary unit that divides it.
    pub(super) fn binary_size(n: u64) -> String {
        for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n >= 1 << shift && n.is_multiple_of(1 << shift) {
                return format!("{} {unit}", n >> shift);
            }
        }
        format!("{n} bytes")
    }

    /// The example file: every setting with its meaning; what has a default is commented out and
    /// shows it, a required setting is set to its example.
    pub(super) fn example_file() -> String {
        let mut out: String = [
            "edit-worker configuration: the same keys as the environment (upper or lower case; the",
            "environment wins over this file). A line commented out shows the default, or an",
            "example where there is none.",
            "Use with: edit-worker run --config config/edit-worker.example.toml",
            "",
            "Generated from src/settings_table.rs, with the README's table:",
            "  UPDATE_DOCS=1 cargo test -p edit-worker --bin edit-worker settings_table",
        ]
        .iter()
        .map(|line| format!("#{}{line}\n", if line.is_empty() { "" } else { " " }))
        .collect();
        for s in SETTINGS {
            out.push('\n');
            let note = match s.default {
                DefaultIs::Value(_) => String::new(),
                DefaultIs::Required => " (required for `run`)".into(),
                DefaultIs::Nothing(text) | DefaultIs::Derived(text) => {
                    format!(" (default: {text})")
                }
            };
            for line in wrap(&format!("{}{note}", s.meaning), 98) {
                out.push_str(&format!("# {line}\n"));
            }
            let (value, set) = match (s.default, s.example) {
                (DefaultIs::Value(v), _) => (v, false),
                (DefaultIs::Required, Some(example)) => (example, true),
                (_, Some(example)) => (example, false),
                (_, None) => panic!("{} has neither a default value nor an example", s.name),
            };
            let comment = if set { "" } else { "# " };
            out.push_str(&format!(
                "{comment}{} = {}\n",
                s.name,
                toml_value(s.kind, value)
            ));
        }
        out.push_str("\n# Read from the environment only, never from this file:\n");
        for o in OTHERS {
            for line in wrap(&format!("{}: {}", o.names, o.meaning), 98) {
                out.push_str(&format!("# {line}\n"));
            }
        }
        out
    }

    /// `text` in lines of at most `width` characters, broken at spaces (a longer word stays
    /// whole).
    pub(super) fn wrap(text: &str, width: usize) -> Vec<String> {
        let mut lines = Vec::new();
        let mut line = String::new();
        for word in text.split(' ') {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
        lines
    }

    /// `text` (a default or an example) as a TOML value.
    pub(super) fn toml_value(kind: Kind, text: &str) -> String {
        match kind {
            Kind::Number { .. } | Kind::Bytes | Kind::Amount => text.to_owned(),
            Kind::Flag => text.to_ascii_lowercase(),
            Kind::Words => {
                let words: Vec<String> = text.split_whitespace().map(toml_string).collect();
                format!("[{}]", words.join(", "))
            }
            _ => toml_string(text),
        }
    }

    pub(super) fn toml_string(text: &str) -> String {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

#[cfg(test)]
mod tests {
    use super::docs::*;
    use super::*;

    use std::path::Path;

    #[test]
    fn each_kind_reads_its_values() {
        assert_eq!(Kind::Text.parse(" a b "), Ok(Value::Text(" a b ".into())));
        assert_eq!(Kind::Path.parse("ws"), Ok(Value::Path("ws".into())));
        assert_eq!(
            Kind::AbsolutePath.parse("/var/store"),
            Ok(Value::Path("/var/store".into()))
        );
        assert_eq!(
            Kind::AbsolutePath.parse("var/store"),
            Err("must be an absolute path".into())
        );
        assert_eq!(
            Kind::InsidePath.parse(" ./out/ "),
            Ok(Value::OutputDir(OutputDir::new("out").unwrap()))
        );
        assert!(Kind::InsidePath.parse("../out").is_err());
        assert_eq!(
            Kind::Words.parse(" npm  run\tbuild "),
            Ok(Value::List(vec![
                "npm".into(),
                "run".into(),
                "build".into()
            ]))
        );
        assert_eq!(
            Kind::List.parse("Edit, Bash(npm run build),,"),
            Ok(Value::List(vec![
                "Edit".into(),
                "Bash(npm run build)".into()
            ]))
        );
        assert_eq!(Kind::List.parse(" , "), Ok(Value::List(vec![])));
        assert_eq!(
            Kind::Names.parse("A_1,_B"),
            Ok(Value::List(vec!["A_1".into(), "_B".into()]))
        );
        assert_eq!(
            Kind::Names.parse("A,1B"),
            Err("`1B` is not an environment variable name".into())
        );
        for (text, flag) in [
            ("true", true),
            ("1", true),
            (" YES ", true),
            ("false", false),
            ("0", false),
            ("No", false),
        ] {
            assert_eq!(Kind::Flag.parse(text), Ok(Value::Flag(flag)), "{text}");
        }
        assert_eq!(
            Kind::Flag.parse("maybe"),
            Err("`maybe` is not true or false".into())
        );
        assert_eq!(POSITIVE.parse(" 42 "), Ok(Value::Number(42)));
        assert_eq!(POSITIVE.parse("0"), Err("must be at least 1".into()));
        assert_eq!(
            POSITIVE.parse("-1"),
            Err("`-1` is not a whole number".into())
        );
        assert_eq!(
            POSITIVE.parse("1.5"),
            Err("`1.5` is not a whole number".into())
        );
        assert_eq!(WHOLE.parse("0"), Ok(Value::Number(0)));
        assert_eq!(
            COUNT.parse("4294967296"),
            Err("must be 1 to 4294967295".into())
        );
        let percent = Kind::Number { min: 0, max: 100 };
        assert_eq!(percent.parse("100"), Ok(Value::Number(100)));
        assert_eq!(percent.parse("101"), Err("must be 0 to 100".into()));
        assert_eq!(Kind::Bytes.parse("1024"), Ok(Value::Number(1024)));
        assert_eq!(Kind::Bytes.parse("0"), Err("must be at least 1".into()));
        assert_eq!(Kind::Amount.parse(" 2.5"), Ok(Value::Amount(2.5)));
        for bad in ["0", "-1", "NaN", "inf", "two"] {
            assert!(Kind::Amount.parse(bad).is_err(), "{bad}");
        }
        let modes = Kind::Choice(&["shared", "per-workspace"]);
        assert_eq!(modes.parse(" shared "), Ok(Value::Text("shared".into())));
        assert_eq!(
            modes.parse("pnpm"),
            Err("`pnpm` is not one of shared, per-workspace".into())
        );
        assert_eq!(
            Kind::Label.parse("amelia"),
            Ok(Value::Text("amelia".into()))
        );
        assert!(Kind::Label.parse("../bob").is_err());
        assert!(Kind::Label.parse("Bob").is_err());
    }

    /// The table itself: one entry per name, every default value and example readable by its
    /// kind, an example wherever there is no default value to show.
    #[test]
    fn the_table_is_consistent() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a name is in the table twice");
        for s in SETTINGS {
            assert!(
                s.name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                s.name
            );
            assert!(
                !s.meaning.contains('\n') && !s.meaning.contains('|'),
                "{}",
                s.name
            );
            if let DefaultIs::Value(v) = s.default {
                assert!(s.kind.parse(v).is_ok(), "{}: default {v}", s.name);
                assert!(s.example.is_none(), "{}: shows its default", s.name);
            } else {
                let example = s
                    .example
                    .unwrap_or_else(|| panic!("{} needs an example", s.name));
                assert!(
                    s.kind.parse(example).is_ok(),
                    "{}: example {example}",
                    s.name
                );
            }
        }
        assert_eq!(setting("MAX_IN_FLIGHT").default, DefaultIs::Value("64"));
    }

    #[test]
    #[should_panic(expected = "NO_SUCH_SETTING is not in the settings table")]
    fn a_name_not_in_the_table_is_a_mistake() {
        setting("NO_SUCH_SETTING");
    }

    #[test]
    fn the_readme_row_shows_defaults_as_the_contract_does() {
        let table = readme_table();
        let row = |name: &str| {
            table
                .lines()
                .find(|line| line.starts_with(&format!("| `{name}` | ")))
                .unwrap_or_else(|| panic!("no row for {name}"))
                .to_owned()
        };
        assert_eq!(
            row("INPUT_QUEUE_URL"),
            "| `INPUT_QUEUE_URL` | the queue of edit requests | required for `run` |"
        );
        assert_eq!(
            row("OUTPUT_QUEUE_URL"),
            "| `OUTPUT_QUEUE_URL` | the status queue | none: events only logged |"
        );
        assert!(row("BUILD_COMMAND").ends_with(" | `npm run build` |"));
        assert!(row("PUBLISH_MAX_BYTES").ends_with(" | `1073741824` (1 GiB) |"));
        assert!(row("BUILD_CONCURRENCY").ends_with(" | number of cores |"));
        assert_eq!(binary_size(100 << 20), "100 MiB");
        assert_eq!(binary_size(3 << 10), "3 KiB");
        assert_eq!(binary_size(1000), "1000 bytes");
    }

    #[test]
    fn example_lines_are_toml_of_their_kind() {
        assert_eq!(
            toml_value(Kind::Words, "npm run build"),
            "[\"npm\", \"run\", \"build\"]"
        );
        assert_eq!(toml_value(POSITIVE, "64"), "64");
        assert_eq!(toml_value(Kind::Flag, "true"), "true");
        assert_eq!(toml_value(Kind::Amount, "2.5"), "2.5");
        assert_eq!(
            toml_value(Kind::Text, "say \"hi\" \\o/"),
            "\"say \\\"hi\\\" \\\\o/\""
        );
        let file = example_file();
        assert!(file.contains("\nINPUT_QUEUE_URL = \"https://"));
        assert!(file.contains("\n# MAX_IN_FLIGHT = 64\n"));
        assert!(file.contains("\n# CLIENT_ID = \"amelia\"\n"));
        assert!(
            file.lines().all(|line| line.chars().count() <= 100),
            "{file}"
        );
        assert_eq!(wrap("a bb ccc", 4), ["a bb", "ccc"]);
        assert_eq!(wrap("abcdef", 3), ["abcdef"]);
    }

    const README_BEGIN: &str = "<!-- settings-table: generated from src/settings_table.rs -->\n";
    const README_END: &str = "<!-- /settings-table -->\n";

    fn repo_file(path: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    /// `path` must hold `wanted`; with `UPDATE_DOCS=1` it is written instead.
    fn check_or_update(path: &Path, current: &str, wanted: &str) {
        if std::env::var_os("UPDATE_DOCS").is_some_and(|v| v == "1") {
            if current != wanted {
                std::fs::write(path, wanted).unwrap();
            }
            return;
        }
        if current != wanted {
            let line = current
                .lines()
                .zip(wanted.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| current.lines().count().min(wanted.lines().count()));
            panic!(
                "{} has drifted from src/settings_table.rs (first difference at line {}: {:?} \
                 instead of {:?}); regenerate it with\n  UPDATE_DOCS=1 cargo test -p edit-worker \
                 --bin edit-worker settings_table",
                path.display(),
                line + 1,
                current.lines().nth(line).unwrap_or(""),
                wanted.lines().nth(line).unwrap_or(""),
            );
        }
    }

    #[test]
    fn the_example_file_is_the_tables() {
        let path = repo_file("config/edit-worker.example.toml");
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        check_or_update(&path, &current, &example_file());
    }

    #[test]
    fn the_readme_table_is_the_tables() {
        let path = repo_file("README.md");
        let current = std::fs::read_to_string(&path).unwrap();
        let start = current
            .find(README_BEGIN)
            .expect("README.md has the settings-table begin marker")
            + README_BEGIN.len();
        let end = start
            + current[start..]
                .find(README_END)
                .expect("README.md has the settings-table end marker");
        // A blank line ends the table before the marker, in every Markdown reader.
        let wanted = format!(
            "{}{}\n{}",
            &current[..start],
            readme_table(),
            &current[end..]
        );
        check_or_update(&path, &current, &wanted);
    }
}
