//! Shared harness for the integration tests: real SQS and S3 (one moto server for the whole run,
//! started by `scripts/test`), real git repositories with a local bare upstream, the real
//! `edit-worker` binary and the stand-in agent. Every test gets its own queues, buckets and
//! folders, so tests run in parallel.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

// How long the tests wait (issue 30). Each limit is a deadline for an event that normally comes
// in a small part of it: waiting costs nothing when the event comes, while a limit too short
// fails a healthy run on a busy machine. Each is derived from the slowest legitimate path on this
// kind of machine (2 cores): a first run on a fresh clone (cold caches), four tests at once (the
// suite's own parallelism) and, with `STRESS=1 scripts/test`, a CPU hog on each core beside them.
// A test whose point is a time limit (a watchdog, a lease) sets that limit on the worker and
// arranges the wait itself, so that only the limit it tests can end it.

/// One message of the tiny site with the stand-in, from its send to its terminal event
/// (checkout, agent, commit, build, publish, push). About 2 s on a quiet machine; under
/// `STRESS=1` with the suite beside it the slowest seen took tens of seconds, most of it
/// waiting for a core. Also the limit for a few such messages run at once by one worker.
pub const ONE_MESSAGE: Duration = Duration::from_secs(180);

/// A message whose path includes a real dependency install (`npm ci` against the registry into
/// the shared store) or a real Astro build: the install is network-bound and the build about
/// 3.5 CPU-seconds, which take several times that with four tests and two hogs on two cores.
pub const WITH_INSTALL: Duration = Duration::from_secs(420);

/// A step inside a running message that the test waits for before acting (the agent's first
/// edit, a progress event, a lease taken): the same path as ONE_MESSAGE up to that point.
pub const STEP: Duration = ONE_MESSAGE;

/// For something the test expects *not* to happen (no event, no file): how long it looks. A
/// negative check cannot wait for an event, so it is kept short and is never the only proof.
pub const QUIET_LOOK: Duration = Duration::from_secs(3);

/// The moto endpoint. `scripts/test` starts one moto for the whole run and exports it.
pub fn endpoint() -> String {
    set_by_scripts_test("EDIT_WORKER_TEST_ENDPOINT")
}

/// A setting `scripts/test` makes (moto's address, the CLI it installed). Without it (a plain
/// `cargo test`), the run ends at once with one line saying how to run the suite, instead of
/// every test failing on its own.
fn set_by_scripts_test(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) => value,
        Err(_) => {
            use std::io::Write;
            // Straight to the process's stderr: the test harness captures `eprintln!`, and
            // the exit would take the captured text with it.
            let _ = writeln!(
                std::io::stderr(),
                "{name} is not set: run the integration tests with `scripts/test` (it installs \
                 moto and the pinned Claude Code CLI, starts moto, then runs cargo test)"
            );
            std::process::exit(2)
        }
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn standin() -> PathBuf {
    repo_root().join("tools/claude-standin")
}

pub async fn clients() -> (aws_sdk_sqs::Client, aws_sdk_s3::Client) {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    (aws_sdk_sqs::Client::new(&sdk), s3)
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "node_modules" || name == "dist" || name == ".astro" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Which sample site an upstream starts from.
#[derive(Clone, Copy)]
pub enum Site {
    /// The real Astro site (npm ci + astro build): slow, used by few tests.
    Astro,
    /// Same pages, built by a dependency-free script.
    Tiny,
    /// The tiny site with one small dependency from the npm registry (a lock file, an
    /// install of a second or so): for the shared store's tests, which need a real install
    /// and a build that loads what it installed, not Astro.
    WithDependency,
}

/// One test's world: queues, folders, upstream repositories and the worker process.
pub struct TestEnv {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub bucket_template: String,
    worker: Option<Child>,
}

impl TestEnv {
    pub async fn new(name: &str) -> TestEnv {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{name}-{}-{n}", std::process::id());
        let (sqs, s3) = clients().await;
        let mut queues = Vec::new();
        for kind in ["in", "out", "dlq"] {
            let url = sqs
                .create_queue()
                .queue_name(format!("{name}-{kind}"))
                .send()
                .await
                .expect("create queue")
                .queue_url
                .unwrap();
            queues.push(url);
        }
        let dir = tempfile::tempdir().unwrap();
        // Tenants' uids must pass through it to reach their workspaces (tests/isolation.rs).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("workspaces")).unwrap();
        std::fs::create_dir_all(dir.path().join("upstream")).unwrap();
        TestEnv {
            // With `{projectId}`: a bucket belongs to one workspace, and tests serve several
            // projects of one client (e.g. 24 in tests/load_and_fairness.rs). The longest
            // name stays within S3's 63 characters: `edit.` + client + project + name + `.test`.
            bucket_template: format!("edit.{{clientId}}.{{projectId}}.{name}.test"),
            name,
            dir,
            sqs,
            s3,
            input: queues[0].clone(),
            output: queues[1].clone(),
            dlq: queues[2].clone(),
            worker: None,
        }
    }

    /// The edit bucket of `client/project`, as the worker names it.
    pub fn bucket(&self, client: &str, project: &str) -> String {
        let bucket = self
            .bucket_template
            .replace("{clientId}", client)
            .replace("{projectId}", project);
        // The worker rejects a message whose bucket name S3 would refuse.
        assert!(
            bucket.len() <= 63,
            "bucket name over 63 characters: {bucket}"
        );
        bucket
    }

    pub async fn create_bucket(&self, bucket: &str) {
        self.s3
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("create bucket");
    }

    pub fn workspace_root(&self) -> PathBuf {
        self.dir.path().join("workspaces")
    }

    pub fn upstream(&self, client: &str, project: &str) -> PathBuf {
        self.dir
            .path()
            .join("upstream")
            .join(client)
            .join(format!("{project}.git"))
    }

    /// A client's site as most tests start it: its edit bucket and its upstream holding `site`
    /// on `main`. Returns the bucket's name.
    pub async fn create_site(&self, client: &str, project: &str, site: Site) -> String {
        let bucket = self.bucket(client, project);
        self.create_bucket(&bucket).await;
        self.create_upstream(client, project, site);
        bucket
    }

    /// A bare upstream for `client/project` holding the sample site on `main`.
    pub fn create_upstream(&self, client: &str, project: &str, site: Site) -> PathBuf {
        let bare = self.upstream(client, project);
        std::fs::create_dir_all(&bare).unwrap();
        git(
            &bare,
            &["init", "--quiet", "--bare", "--initial-branch=main"],
        );
        let seed = self.dir.path().join(format!("seed-{client}-{project}"));
        let fixtures = repo_root().join("tests/fixtures");
        match site {
            Site::Astro => copy_dir(&fixtures.join("astro-site"), &seed),
            Site::Tiny => copy_dir(&fixtures.join("tiny-site"), &seed),
            Site::WithDependency => {
                copy_dir(&fixtures.join("tiny-site"), &seed);
                // Its package.json replaces the tiny site's.
                copy_dir(&fixtures.join("dependency-site"), &seed);
            }
        }
        git(&seed, &["init", "--quiet", "--initial-branch=main"]);
        git(&seed, &["add", "-A"]);
        git(&seed, &["commit", "--quiet", "-m", "Initial site"]);
        git(&seed, &["remote", "add", "origin", bare.to_str().unwrap()]);
        git(&seed, &["push", "--quiet", "origin", "main"]);
        std::fs::remove_dir_all(&seed).unwrap();
        bare
    }

    /// The environment a worker of this test runs with.
    pub fn worker_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_owned(), v);
        };
        set("INPUT_QUEUE_URL", self.input.clone());
        set("OUTPUT_QUEUE_URL", self.output.clone());
        set("DEAD_LETTER_QUEUE_URL", self.dlq.clone());
        set(
            "WORKSPACE_ROOT",
            self.workspace_root().display().to_string(),
        );
        set(
            "GIT_REMOTE_TEMPLATE",
            format!(
                "{}/upstream/{{clientId}}/{{projectId}}.git",
                self.dir.path().display()
            ),
        );
        set("BUCKET_TEMPLATE", self.bucket_template.clone());
        set("CLAUDE_BIN", standin().display().to_string());
        set(
            "CLAUDE_CONFIG_DIR",
            self.dir.path().join("claude").display().to_string(),
        );
        // The parts these tests are about run the same with or without the tenant sandbox;
        // tests/isolation.rs runs the worker with the isolation the host allows.
        set("ISOLATION", "none".into());
        // A browser per worker would slow every test; tests/suite/browser_check.rs turns it on.
        set("BROWSER_CHECK", "off".into());
        set("AWS_ENDPOINT_URL", endpoint());
        set("AWS_REGION", "us-east-1".into());
        set("AWS_ACCESS_KEY_ID", "testing".into());
        set("AWS_SECRET_ACCESS_KEY", "testing".into());
        set(
            "RUST_LOG",
            "info,aws=warn,aws_smithy_runtime=warn,aws_config=warn".into(),
        );
        env
    }

    /// Start `edit-worker run` with this test's environment plus `extra`.
    pub fn start_worker(&mut self, extra: &[(&str, &str)]) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edit-worker"));
        cmd.args(["run", "--exit-when-idle", "120"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .envs(self.worker_env())
            // JSON lines: a test that must read the log reads a line's message and fields
            // (`log_lines`), never its layout.
            .env("LOG_FORMAT", "json")
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("worker.log")).unwrap());
        if let Ok(cache) = std::env::var("npm_config_cache") {
            cmd.env("npm_config_cache", cache);
        }
        self.worker = Some(cmd.spawn().expect("start edit-worker"));
    }

    pub fn worker_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }

    /// The worker's log lines, each a JSON object (`start_worker` sets `LOG_FORMAT=json`), in
    /// order. Only for tests of the log itself (the contract's `ISOLATION=none` line, no secret
    /// in it): what the worker does is waited on by its status events or its metrics (`Otlp`),
    /// never by its log text. Read a line's message and fields, never its layout.
    pub fn log_lines(&self) -> Vec<Value> {
        self.worker_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// Every run of the stand-in agent so far: the `start` records of its call log
    /// (`standin-calls.jsonl` in this test's `CLAUDE_CONFIG_DIR`), in order. What counts agent
    /// runs: a `started` event is sent per message and delivery, whether the agent runs or not.
    pub fn agent_runs(&self) -> Vec<Value> {
        standin_calls(&self.dir.path().join("claude"), "start")
    }

    /// Send SIGTERM and wait for the worker to exit; returns its exit code.
    pub fn stop_worker(&mut self) -> Option<i32> {
        let mut child = self.worker.take()?;
        let _ = nix_kill(child.id(), "TERM");
        // A graceful stop saves running work (commit, push) within SHUTDOWN_DEADLINE_SECONDS,
        // which no test sets above 120 s; past that the worker is killed and None says so.
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Put a raw body on the input queue; returns the message id.
    pub async fn send_raw(&self, body: &str) -> String {
        self.sqs
            .send_message()
            .queue_url(&self.input)
            .message_body(body)
            .send()
            .await
            .expect("send message")
            .message_id
            .unwrap()
    }

    pub async fn send(&self, client: &str, project: &str, thread: &str, command: &str) -> String {
        let body = serde_json::json!({
            "sessionId": format!("s-{thread}"),
            "threadId": thread,
            "clientId": client,
            "projectId": project,
            "command": command,
        });
        self.send_raw(&body.to_string()).await
    }

    /// Read status events until `terminal` terminal events have arrived (or time runs out).
    pub async fn events_until_terminal(&self, terminal: usize, timeout: Duration) -> Vec<Value> {
        let mut events = Vec::new();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let done = events.iter().filter(|e: &&Value| is_terminal(e)).count();
            if done >= terminal {
                break;
            }
            events.extend(self.drain(&self.output, 1).await);
        }
        events
    }

    /// Receive and delete what a queue holds now (waiting up to `wait_secs`).
    pub async fn drain(&self, queue: &str, wait_secs: i32) -> Vec<Value> {
        let out = self
            .sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .wait_time_seconds(wait_secs)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive");
        let mut found = Vec::new();
        for m in out.messages.unwrap_or_default() {
            let body = m.body.clone().unwrap_or_default();
            found.push(serde_json::from_str(&body).unwrap_or(Value::String(body)));
            self.sqs
                .delete_message()
                .queue_url(queue)
                .receipt_handle(m.receipt_handle.unwrap())
                .send()
                .await
                .expect("delete");
        }
        found
    }

    /// Messages in a queue, visible or not.
    pub async fn queue_depth(&self, queue: &str) -> usize {
        let attrs = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
            .send()
            .await
            .expect("queue attributes")
            .attributes
            .unwrap_or_default();
        let get = |name: aws_sdk_sqs::types::QueueAttributeName| {
            attrs
                .get(&name)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
        };
        get(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            + get(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
    }

    /// Key → (content type, body) of every object in a bucket.
    pub async fn bucket_contents(&self, bucket: &str) -> BTreeMap<String, (String, Vec<u8>)> {
        let mut contents = BTreeMap::new();
        let listed = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .send()
            .await
            .expect("list bucket");
        for object in listed.contents() {
            let key = object.key().unwrap().to_owned();
            let got = self
                .s3
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .unwrap();
            let content_type = got.content_type().unwrap_or_default().to_owned();
            let body = got.body.collect().await.unwrap().into_bytes().to_vec();
            contents.insert(key, (content_type, body));
        }
        contents
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(mut child) = self.worker.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn is_terminal(event: &Value) -> bool {
    matches!(
        event["type"].as_str(),
        Some("completed" | "interrupted" | "failed" | "rejected")
    )
}

/// Every terminal event of message `id` among `events` (a repeat shows as a second one).
pub fn terminal_for<'a>(events: &'a [Value], id: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["messageId"] == id && is_terminal(e))
        .collect()
}

/// The terminal event of message `id` among `events` (panics, listing them, if there is none).
pub fn terminal(events: &[Value], id: &str) -> Value {
    terminal_for(events, id)
        .first()
        .map(|e| (*e).clone())
        .unwrap_or_else(|| panic!("no terminal event for {id}: {events:#?}"))
}

/// Each case (`client`, its command, the `error.kind` it must end with), sent as `ids` to
/// `{prefix}{client}/site`, ended `failed` with its kind and published nothing.
pub async fn assert_failed_unpublished(
    env: &TestEnv,
    events: &[Value],
    prefix: &str,
    cases: &[(&str, &str, &str)],
    ids: &[String],
) {
    for ((client, _, kind), id) in cases.iter().zip(ids) {
        let end = terminal(events, id);
        assert_eq!(end["type"], "failed", "{client}: {end}");
        assert_eq!(
            end["error"]["kind"],
            *kind,
            "{client}: {end}\n{}",
            env.worker_log()
        );
        assert!(
            env.bucket_contents(&env.bucket(&format!("{prefix}{client}"), "site"))
                .await
                .is_empty()
        );
    }
}

/// Set `file`'s modification time `age` into the past.
pub fn age_file(file: &Path, age: Duration) {
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - age)
        .unwrap();
}

/// The event of `kind` for message `id` among `events` (panics, listing them, if there is none).
pub fn event_of<'a>(events: &'a [Value], id: &str, kind: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["messageId"] == id && e["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} event for {id}: {events:#?}"))
}

pub fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// The messages among `events` that have a `started` event (each delivery that reached a
/// session sends one), distinct, in the order first seen.
pub fn started_ids(events: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for e in of_type(events, "started") {
        let id = e["messageId"].as_str().unwrap_or_default().to_owned();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// How many deliveries of message `id` reached a session: its `started` events.
pub fn deliveries_of(events: &[Value], id: &str) -> usize {
    events
        .iter()
        .filter(|e| e["messageId"] == id && e["type"] == "started")
        .count()
}

/// The stand-in agent's call-log records of `event` (`start` or `end`) under `claude_dir` (its
/// `CLAUDE_CONFIG_DIR`), in order; none before its first run.
pub fn standin_calls(claude_dir: &Path, event: &str) -> Vec<Value> {
    std::fs::read_to_string(claude_dir.join("standin-calls.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == event)
        .collect()
}

/// `kill -SIGNAL pid` through the `kill` program (no unsafe code in tests).
pub fn nix_kill(pid: u32, signal: &str) -> std::io::Result<()> {
    Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .map(drop)
}

/// Every file under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(
                    entry
                        .path()
                        .strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    found.sort();
    found
}

/// A TCP proxy in front of `target` that refuses service (accepts and drops every connection)
/// until `blocked_for` has passed, then forwards. Cuts the path to a server without touching
/// the server (moto keeps its state in memory, so it cannot be restarted).
pub async fn flaky_proxy(target: String, blocked_for: Duration) -> String {
    let proxy = CutProxy::start(target).await;
    proxy.cut();
    let url = proxy.url.clone();
    tokio::spawn(async move {
        tokio::time::sleep(blocked_for).await;
        proxy.restore();
        // Kept alive for the rest of the test.
        std::future::pending::<()>().await;
    });
    url
}

/// A TCP proxy in front of `target` whose path a test cuts and restores: while cut, it accepts
/// and drops every new connection, and cutting also drops the connections already open (an
/// SDK keeps its connections and would otherwise go on through them). An outage of one
/// service (`AWS_ENDPOINT_URL_S3` pointed here: S3 only) without touching moto.
pub struct CutProxy {
    pub url: String,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl CutProxy {
    pub async fn start(target: String) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = target.trim_start_matches("http://").to_owned();
        let (cut, watching) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if *watching.borrow() {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut watching = watching.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = watching.wait_for(|cut| *cut) => {}
                        }
                    }
                });
            }
        });
        CutProxy {
            url,
            cut: std::sync::Arc::new(cut),
        }
    }

    /// From now on nothing gets through, and what was open is dropped.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

/// Wait until `check` holds, looking every 100 ms (for state that no event announces, such
/// as a commit the worker made in its checkout).
pub async fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP proxy in front of `target` (an S3 endpoint for `AWS_ENDPOINT_URL_S3`) that forwards
/// until `stall` is called and then stops answering: nothing more goes either way on any
/// connection, open or new, while every connection is held open, so a client waits for an
/// answer that never comes (a hung request, not a refused one: `flaky_proxy` refuses). Bytes
/// in flight at the stall wait with the rest; `resume` lets everything through again.
pub struct StallingProxy {
    pub url: String,
    stalled: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl StallingProxy {
    pub async fn start(target: String) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stalled = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let target = target.trim_start_matches("http://").to_owned();
        let gate = stalled.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (target, gate) = (target.clone(), gate.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        relay_unless_stalled(in_read, out_write, gate.subscribe()),
                        relay_unless_stalled(out_read, in_write, gate.subscribe()),
                    );
                });
            }
        });
        StallingProxy { url, stalled }
    }

    /// From now on nothing is answered.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

/// Copy `from` to `to`, holding every chunk while the gate says stalled.
async fn relay_unless_stalled(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl TestEnv {
    /// Wait until an event of `kind` for `message_id` arrives; returns every event seen.
    pub async fn wait_for(&self, message_id: &str, kind: &str, timeout: Duration) -> Vec<Value> {
        self.wait_until(&format!("{kind} event for {message_id}"), timeout, |e| {
            e["messageId"] == message_id && e["type"] == kind
        })
        .await
    }

    /// Wait until a progress event of `message_id` names `step` (a tool, such as `Edit`, the
    /// agent has used); returns every event seen.
    pub async fn wait_for_step(
        &self,
        message_id: &str,
        step: &str,
        timeout: Duration,
    ) -> Vec<Value> {
        let what = format!("progress event naming {step} for {message_id}");
        self.wait_until(&what, timeout, |e| {
            e["messageId"] == message_id
                && e["type"] == "progress"
                && e["detail"].as_str().is_some_and(|d| d.contains(step))
        })
        .await
    }

    /// Drain status events until one matches `wanted` (`what` names it in the failure);
    /// returns every event seen.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        self.wait_until_all(what, timeout, |events| events.iter().any(&wanted))
            .await
    }

    /// Drain status events until those seen so far satisfy `done` (`what` names it in the
    /// failure); returns every event seen.
    pub async fn wait_until_all(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let mut events = Vec::new();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            events.extend(self.drain(&self.output, 1).await);
            if done(&events) {
                return events;
            }
        }
        panic!("no {what}: {events:#?}\n{}", self.worker_log());
    }

    pub fn worker_pid(&self) -> Option<u32> {
        self.worker.as_ref().map(|c| c.id())
    }

    /// The worker process is still there (not exited).
    pub fn worker_running(&mut self) -> bool {
        self.worker
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Wait for the worker to exit by itself; its exit code.
    pub fn wait_worker(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.worker.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.worker = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// An HTTP/1.1 proxy in front of `target` that records `METHOD /path` of every request in the
/// order the requests arrive, and can refuse requests whose path contains one of `refuse`
/// (it drops the connection, as a network fault would).
pub struct RecordingProxy {
    pub url: String,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub async fn recording_proxy(target: String, refuse: Vec<String>) -> RecordingProxy {
    use std::sync::{Arc, Mutex};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    let target = target.trim_start_matches("http://").to_owned();
    let refuse = Arc::new(refuse);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let (target, log, refuse) = (target.clone(), log.clone(), refuse.clone());
            tokio::spawn(async move {
                let _ = relay_requests(inbound, &target, log, &refuse).await;
            });
        }
    });
    RecordingProxy { url, requests }
}

async fn relay_requests(
    inbound: tokio::net::TcpStream,
    target: &str,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    refuse: &[String],
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let outbound = tokio::net::TcpStream::connect(target).await?;
    let (in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    // Responses flow back untouched.
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
    });
    let mut reader = BufReader::new(in_read);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line).await? == 0 {
                return Ok(());
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let first = text.lines().next().unwrap_or_default();
        let mut words = first.split(' ');
        let request = format!(
            "{} {}",
            words.next().unwrap_or(""),
            words.next().unwrap_or("")
        );
        if refuse.iter().any(|r| request.contains(r.as_str())) {
            return Ok(());
        }
        log.lock().unwrap().push(request);
        out_write.write_all(&head).await?;
        let header = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        if let Some(len) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
            let mut body = (&mut reader).take(len);
            tokio::io::copy(&mut body, &mut out_write).await?;
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut size_line = Vec::new();
                reader.read_until(b'\n', &mut size_line).await?;
                out_write.write_all(&size_line).await?;
                let size_text = String::from_utf8_lossy(&size_line);
                let size =
                    u64::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
                        .unwrap_or(0);
                if size == 0 {
                    loop {
                        let mut trailer = Vec::new();
                        reader.read_until(b'\n', &mut trailer).await?;
                        out_write.write_all(&trailer).await?;
                        if trailer == b"\r\n" || trailer.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let mut chunk = (&mut reader).take(size + 2);
                tokio::io::copy(&mut chunk, &mut out_write).await?;
            }
        }
    }
}

/// An S3 client for `endpoint` (moto or a proxy in front of it).
pub async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    )
}

// ------------------------------------------------- the real Claude Code CLI (tests/suite/real_cli.rs)

/// The REAL Claude Code CLI, pinned in `tools/claude-code.version` and installed into
/// `.tools/claude-code` by `scripts/test`, which exports its path.
pub fn real_claude() -> PathBuf {
    PathBuf::from(set_by_scripts_test("EDIT_WORKER_TEST_CLAUDE_BIN"))
}

/// `tools/fake-anthropic-api` for one test: a scripted Messages API on loopback that the real
/// CLI talks to, and the log of every request it received.
pub struct FakeApi {
    pub url: String,
    pub log: PathBuf,
    child: Child,
}

impl FakeApi {
    /// Start it in `dir`, with an optional script (see the tool's header for its format).
    pub fn start(dir: &Path, script: Option<Value>) -> FakeApi {
        use std::io::BufRead as _;
        let log = dir.join("fake-api-requests.jsonl");
        let mut cmd = Command::new(repo_root().join("tools/fake-anthropic-api"));
        cmd.arg("--log").arg(&log);
        if let Some(script) = script {
            let path = dir.join("fake-api-script.json");
            std::fs::write(&path, script.to_string()).unwrap();
            cmd.arg("--script").arg(path);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("fake-api.err")).unwrap());
        let mut child = cmd.spawn().expect("start tools/fake-anthropic-api");
        let mut url = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut url)
            .expect("the fake API prints its URL");
        assert!(url.starts_with("http://127.0.0.1:"), "{url:?}");
        FakeApi {
            url: url.trim().to_owned(),
            log,
            child,
        }
    }

    /// The worker settings that make it run the real CLI against this server.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        [
            ("CLAUDE_BIN", real_claude().display().to_string()),
            ("ANTHROPIC_BASE_URL", self.url.clone()),
            ("ANTHROPIC_API_KEY", "sk-ant-test-not-a-key".into()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The model requests of agent conversations (`POST /v1/messages` with tools), in order.
    pub fn turns(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r["method"] == "POST"
                    && r["path"].as_str().unwrap_or("").starts_with("/v1/messages")
                    && !r["path"].as_str().unwrap_or("").contains("count_tokens")
                    && r["body"]["tools"].as_array().is_some_and(|t| !t.is_empty())
            })
            .collect()
    }

    /// The model requests whose current prompt contains `text`.
    pub fn turns_for(&self, text: &str) -> Vec<Value> {
        self.turns()
            .into_iter()
            .filter(|r| r["prompt"].as_str().is_some_and(|p| p.contains(text)))
            .collect()
    }

    /// Wait until `count` model requests for a prompt containing `text` have arrived.
    pub fn wait_for_turns(&self, text: &str, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.turns_for(text);
            if found.len() >= count {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "the fake API saw {} of {count} requests for {text:?}",
                found.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole conversation a model request carried, as text (for `contains` checks).
pub fn conversation_text(request: &Value) -> String {
    request["body"]["messages"].to_string()
}

/// `(&str, &str)` pairs for `start_worker` from owned ones.
pub fn env_pairs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Processes whose working directory is `dir` (the agent of a workspace), by pid.
pub fn pids_working_in(dir: &Path) -> Vec<u32> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd == dir) {
            pids.push(pid);
        }
    }
    pids
}

impl TestEnv {
    /// Push `branch` to the upstream of `client/project`: `main` with `files` (path relative
    /// to the site, content) written and committed on top.
    pub fn push_branch_with(
        &self,
        client: &str,
        project: &str,
        branch: &str,
        files: &[(&str, &[u8])],
    ) {
        let seed = self
            .dir
            .path()
            .join(format!("branch-{client}-{project}-{branch}"));
        let upstream = self.upstream(client, project);
        git(
            self.dir.path(),
            &[
                "clone",
                "--quiet",
                upstream.to_str().unwrap(),
                seed.to_str().unwrap(),
            ],
        );
        git(&seed, &["checkout", "--quiet", "-b", branch]);
        for (path, content) in files {
            let target = seed.join(path);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::write(target, content).unwrap();
        }
        git(&seed, &["add", "-A"]);
        git(
            &seed,
            &["commit", "--quiet", "-m", &format!("Test branch {branch}")],
        );
        git(&seed, &["push", "--quiet", "origin", branch]);
        std::fs::remove_dir_all(&seed).unwrap();
    }
}

/// Give the owner write permission on every folder under `dir` (not following symlinks), so
/// that a tree with read-only parts (the shared npm store) can be removed by a user who is
/// not root.
pub fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&d) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let _ = std::fs::set_permissions(
            &d,
            std::fs::Permissions::from_mode(meta.permissions().mode() | 0o700),
        );
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
}

impl TestEnv {
    /// Put JSON bodies on the input queue, ten to a batch; their message ids, in order.
    pub async fn send_batch(&self, bodies: &[Value]) -> Vec<String> {
        let mut ids = Vec::new();
        for chunk in bodies.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, body)| {
                    aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                        .id(format!("m{i}"))
                        .message_body(body.to_string())
                        .build()
                        .unwrap()
                })
                .collect();
            let out = self
                .sqs
                .send_message_batch()
                .queue_url(&self.input)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("send message batch");
            let mut sent: Vec<_> = out.successful().to_vec();
            sent.sort_by_key(|s| s.id()[1..].parse::<usize>().unwrap());
            ids.extend(sent.iter().map(|s| s.message_id().to_owned()));
        }
        ids
    }

    /// Make the input queue move a message to `dead_letter` after `max_receives` receives,
    /// as a real deployment's redrive policy does.
    pub async fn redrive_input(&self, dead_letter: &str, max_receives: u32) {
        use aws_sdk_sqs::types::QueueAttributeName;
        let arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(dead_letter)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue attributes")
            .attributes
            .unwrap()[&QueueAttributeName::QueueArn]
            .clone();
        let policy = serde_json::json!({
            "deadLetterTargetArn": arn,
            "maxReceiveCount": max_receives.to_string(),
        });
        self.sqs
            .set_queue_attributes()
            .queue_url(&self.input)
            .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
            .send()
            .await
            .expect("set the redrive policy");
    }
}

/// `tools/sqs-fault-proxy` in front of the test's moto, injecting faults into the queues whose
/// name contains `queue_name` at the rates `args` give (its defaults otherwise). Its counts go
/// to `{dir}/faults.json` when stopped, and each fault to `{dir}/faults.jsonl`. Killed when
/// dropped.
pub struct FaultProxy {
    pub url: String,
    /// One JSON line per injected fault (time, kind, operation, queue, message id).
    pub log: PathBuf,
    stats: PathBuf,
    child: Child,
}

impl FaultProxy {
    pub fn start(dir: &Path, queue_name: &str, args: &[&str]) -> FaultProxy {
        use std::io::BufRead;
        let stats = dir.join("faults.json");
        let log = dir.join("faults.jsonl");
        let mut child = Command::new(repo_root().join("tools/sqs-fault-proxy"))
            .args(["--target", &endpoint(), "--queue-name-contains", queue_name])
            .arg("--stats")
            .arg(&stats)
            .arg("--log")
            .arg(&log)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
            .spawn()
            .expect("start tools/sqs-fault-proxy");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let url = first
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("the proxy said {first:?}"))
            .trim()
            .to_owned();
        FaultProxy {
            url,
            log,
            stats,
            child,
        }
    }

    /// Its counts so far, asked over HTTP while it runs.
    pub fn stats(&self) -> Value {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.url.trim_start_matches("http://"))
            .expect("reach the fault proxy");
        write!(stream, "GET /__fault_stats HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).unwrap_or_else(|_| panic!("fault proxy stats: {text}"))
    }

    /// Stop it (SIGTERM, so that it writes its counts); its final counts.
    pub fn stop(&mut self) -> Value {
        let _ = nix_kill(self.child.id(), "TERM");
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.stats).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------- several workers on one queue (tests/many_workers.rs)

/// Wall-clock milliseconds since the Unix epoch (what the workers' `at_ms` fields carry).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// `git` that may fail: its output, or `None` (a missing branch or file).
pub fn git_ok(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// One of several worker processes of a test: its `WORKER_ID`, its log (JSON lines: it runs
/// with `LOG_FORMAT=json`; kept for failure messages, never checked), the OTLP receiver of its
/// traces and metrics (what the tests check) and, once killed with SIGKILL, the wall-clock time
/// of the kill. Killed when dropped.
pub struct WorkerProcess {
    pub name: String,
    pub log: PathBuf,
    /// Its own receiver: every span and metric there is this worker's, so nothing needs to
    /// tell the workers' exports apart.
    pub otlp: Otlp,
    /// Its `HEALTH_FILE`, touched by its intake at every turn of the receive loop.
    pub health: PathBuf,
    pub killed_at_ms: Option<u64>,
    pub exit_code: Option<i32>,
    child: Option<Child>,
}

impl TestEnv {
    /// A bucket of this test for `LEASE_STORE`; returns the setting, `s3://{bucket}/leases`.
    pub async fn create_lease_store(&self) -> String {
        let bucket = format!("leases.{}.test", self.name);
        self.create_bucket(&bucket).await;
        format!("s3://{bucket}/leases")
    }

    /// Start `edit-worker run` as worker `name` (`WORKER_ID`), with this test's environment,
    /// `LOG_FORMAT=json`, export to an OTLP receiver of its own, plus `extra` (which wins:
    /// `WORKSPACE_ROOT`, `CLAUDE_CONFIG_DIR`, `LEASE_STORE`, ...). Its log is
    /// `{dir}/worker-{name}.log`, its health file `{dir}/health-{name}`. Independent of the
    /// test's single worker (`start_worker`).
    pub async fn spawn_worker(&self, name: &str, extra: &[(&str, &str)]) -> WorkerProcess {
        let log = self.dir.path().join(format!("worker-{name}.log"));
        let health = self.dir.path().join(format!("health-{name}"));
        let otlp = Otlp::start().await;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edit-worker"));
        cmd.args(["run", "--exit-when-idle", "120"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .envs(self.worker_env())
            .envs(otlp.worker_env())
            .env("LOG_FORMAT", "json")
            .env("WORKER_ID", name)
            .env("HEALTH_FILE", &health)
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Ok(cache) = std::env::var("npm_config_cache") {
            cmd.env("npm_config_cache", cache);
        }
        WorkerProcess {
            name: name.to_owned(),
            log,
            otlp,
            health,
            killed_at_ms: None,
            exit_code: None,
            child: Some(cmd.spawn().expect("start edit-worker")),
        }
    }
}

impl WorkerProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Its log, for failure messages.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running (reaps it if it exited).
    pub fn running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                self.exit_code = status.code();
                self.child = None;
                false
            }
            _ => true,
        }
    }

    /// SIGTERM, then wait up to 40 s for it to exit; its exit code (`None`: killed by a signal,
    /// or it did not exit in time and was killed).
    pub fn stop(&mut self) -> Option<i32> {
        let Some(mut child) = self.child.take() else {
            return self.exit_code;
        };
        let _ = nix_kill(child.id(), "TERM");
        // As TestEnv::stop_worker: a graceful stop saves running work first.
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.exit_code = status.code();
                return self.exit_code;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (`kill -9`), noting the time; waits for it to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.killed_at_ms = Some(now_ms());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait until its intake receives: its health file appears (written at the top of every
    /// turn of the receive loop, after the worker has set up everything it needs).
    pub async fn wait_until_receiving(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.health.exists() {
            assert!(
                Instant::now() < deadline,
                "worker {}: not receiving within {timeout:?}; its log:\n{}",
                self.name,
                tail(&self.text(), 60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The message of a JSON log line (tracing-subscriber's JSON format: `fields.message`).
pub fn log_message(line: &Value) -> &str {
    line["fields"]["message"]
        .as_str()
        .or_else(|| line["message"].as_str())
        .unwrap_or_default()
}

/// One lease a worker held: from its "lease acquired" span to the "lease released" or "lease
/// lost" span of the same workspace and token, or to the worker's kill (`ended_by` "killed"),
/// or never ended (`until_ms` None, `ended_by` "open"). The worker makes each of these spans
/// beside the log line of the same name, with the line's fields as attributes
/// (`lease_event!` in actors/src/delivery/lease.rs), and ends it at once.
#[derive(Debug, Clone)]
pub struct LeaseHeld {
    pub workspace: String,
    pub worker: String,
    pub token: String,
    pub from_ms: u64,
    pub until_ms: Option<u64>,
    pub ended_by: String,
    /// The span's `handover`: the previous holder was another worker, or unknown.
    pub handover: bool,
    /// The span's `previous` holder, when it names one.
    pub previous: Option<String>,
    /// The span's `previous_released`: the previous holder had released the lease (rather than
    /// let it expire).
    pub previous_released: bool,
}

/// The names of the worker's lease spans.
const LEASE_SPANS: [&str; 3] = ["lease acquired", "lease released", "lease lost"];

/// The leases `worker` held, from the lease spans its receiver has been sent so far. A span is
/// exported within `OTEL_BSP_SCHEDULE_DELAY` of its event (200 ms here), and at the latest when
/// the worker stops (SIGTERM flushes); of a worker killed with SIGKILL, what it made in its last
/// moments may be missing.
pub fn lease_intervals(worker: &WorkerProcess) -> Vec<LeaseHeld> {
    lease_intervals_in(&worker.otlp.spans(), &worker.name, worker.killed_at_ms)
}

/// The leases held by worker `name` (killed at `killed_at_ms`, if it was), from its spans.
pub fn lease_intervals_in(spans: &[Span], name: &str, killed_at_ms: Option<u64>) -> Vec<LeaseHeld> {
    let mut transitions: Vec<&Span> = spans
        .iter()
        .filter(|s| LEASE_SPANS.contains(&s.name.as_str()))
        .collect();
    // In the order the worker made them (its wall clock at each span's start), whatever order
    // the batches came in: a workspace retaken by its last holder keeps its token, so its
    // "released" must be read before the next "acquired" of the same token.
    transitions.sort_by_key(|s| s.start);
    let mut held: Vec<LeaseHeld> = Vec::new();
    for span in transitions {
        let attribute = |key: &str| span.attributes.get(key).cloned();
        let (Some(workspace), Some(token), Some(at)) = (
            attribute("workspace"),
            attribute("token"),
            attribute("at_ms").and_then(|at| at.parse::<u64>().ok()),
        ) else {
            panic!("worker {name}: a lease span without workspace, token or at_ms: {span:?}");
        };
        let open = held
            .iter_mut()
            .find(|h| h.workspace == workspace && h.token == token && h.until_ms.is_none());
        match (span.name.as_str(), open) {
            ("lease acquired", None) => held.push(LeaseHeld {
                workspace,
                worker: attribute("worker").unwrap_or_else(|| name.to_owned()),
                token,
                from_ms: at,
                until_ms: None,
                ended_by: "open".into(),
                handover: attribute("handover").as_deref() == Some("true"),
                previous: attribute("previous").filter(|p| !p.is_empty()),
                previous_released: attribute("previous_released").as_deref() == Some("true"),
            }),
            ("lease acquired", Some(_)) => {}
            (end, Some(h)) => {
                h.until_ms = Some(at);
                h.ended_by = end.trim_start_matches("lease ").to_owned();
            }
            (end, None) => panic!(
                "worker {name}: {end} of a lease it never acquired ({workspace} token {token}): {span:?}"
            ),
        }
    }
    if let Some(killed) = killed_at_ms {
        for h in held.iter_mut().filter(|h| h.until_ms.is_none()) {
            h.until_ms = Some(killed);
            h.ended_by = "killed".into();
        }
    }
    held
}

impl WorkerProcess {
    /// Wait until its lease spans say it holds no lease (a session gone idle releases its
    /// own); what it held.
    pub async fn wait_no_lease_held(&self, timeout: Duration) -> Vec<LeaseHeld> {
        let what = format!("release of every lease worker {} took", self.name);
        let spans = self
            .otlp
            .wait_for_spans(&what, timeout, |spans| {
                lease_intervals_in(spans, &self.name, self.killed_at_ms)
                    .iter()
                    .all(|h| h.until_ms.is_some())
            })
            .await;
        lease_intervals_in(&spans, &self.name, self.killed_at_ms)
    }
}

impl LeaseHeld {
    /// Whether the workspace came from another worker (named as the previous holder).
    pub fn moved(&self) -> bool {
        self.previous.as_ref().is_some_and(|p| *p != self.worker)
    }
}

/// The leases of every worker, `all` of them, with the end of each lease of a killed worker
/// that its spans could not say: a worker killed with SIGKILL may have released a lease in its
/// last moments (up to SPAN_EXPORT_DELAY_MS before the kill) without the span getting out, and
/// its holding would then seem to run on to the kill, over the next holder's. The next holder
/// says whether it found the lease released: when a worker took it from the killed one with
/// the next token and found it released, the killed one's holding ended by that acquire (a
/// release is stamped before its write, an acquire after its own). A next holder that found it
/// merely expired leaves the holding ending at the kill.
pub fn with_releases_lost_in_kills(mut all: Vec<LeaseHeld>) -> Vec<LeaseHeld> {
    let taken_released: Vec<(String, String, String, u64)> = all
        .iter()
        .filter(|h| h.previous_released)
        .filter_map(|h| {
            let previous_token = h.token.parse::<u64>().ok()?.checked_sub(1)?;
            Some((
                h.workspace.clone(),
                h.previous.clone()?,
                previous_token.to_string(),
                h.from_ms,
            ))
        })
        .collect();
    for h in all.iter_mut().filter(|h| h.ended_by == "killed") {
        let taken = taken_released.iter().find(|(workspace, from, token, _)| {
            *workspace == h.workspace && *from == h.worker && *token == h.token
        });
        if let Some((.., at)) = taken
            && h.until_ms.is_some_and(|until| *at < until)
        {
            h.until_ms = Some(*at);
            h.ended_by = "released (said by the next holder)".into();
        }
    }
    all
}

/// Pairs of leases of one workspace held by different workers at once.
pub fn lease_overlaps(all: &[LeaseHeld]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if a.workspace != b.workspace || a.worker == b.worker {
                continue;
            }
            let a_until = a.until_ms.unwrap_or(u64::MAX);
            let b_until = b.until_ms.unwrap_or(u64::MAX);
            if a.from_ms < b_until && b.from_ms < a_until {
                found.push(format!("{a:?}\n  overlaps\n{b:?}"));
            }
        }
    }
    found
}

/// One span as the worker exported it (OTLP), with what the tracing tests look at.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub kind: i32,
    pub start: u64,
    pub attributes: HashMap<String, String>,
    pub events: Vec<(String, HashMap<String, String>)>,
}

/// One data point of a metric: a counter's, up-down counter's or gauge's number, or a
/// histogram's summary.
#[derive(Debug, Clone)]
pub struct MetricPoint {
    pub name: String,
    pub attributes: HashMap<String, String>,
    pub value: PointValue,
}

#[derive(Debug, Clone, Copy)]
pub enum PointValue {
    Number(f64),
    Histogram(HistogramSummary),
}

/// What an OTLP histogram data point says besides its buckets; of several points, merged.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HistogramSummary {
    pub count: u64,
    pub sum: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// One collection of the worker's metrics: what one OTLP export carried. The worker's metrics
/// are cumulative (the exporter's default), so the newest collection holds every total.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    /// When the worker collected it (the earliest time of its data points). The SDK takes the
    /// time before it reads an instrument, so everything recorded before this moment is in it.
    pub collected_at: SystemTime,
    pub points: Vec<MetricPoint>,
}

impl Default for MetricsSnapshot {
    fn default() -> Self {
        MetricsSnapshot {
            collected_at: SystemTime::UNIX_EPOCH,
            points: Vec::new(),
        }
    }
}

impl MetricsSnapshot {
    /// The data points of metric `name` that carry every one of `attributes` (they may carry
    /// others as well).
    pub fn points<'a>(
        &'a self,
        name: &'a str,
        attributes: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a MetricPoint> + 'a {
        self.points.iter().filter(move |p| {
            p.name == name
                && attributes
                    .iter()
                    .all(|(k, v)| p.attributes.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of counter, up-down counter or gauge `name`, added up over its data points
    /// that carry `attributes`: 0 when nothing matching was ever recorded (a counter that was
    /// never added to has no data point).
    pub fn value(&self, name: &str, attributes: &[(&str, &str)]) -> i64 {
        self.points(name, attributes)
            .map(|p| match p.value {
                PointValue::Number(n) => n as i64,
                PointValue::Histogram(_) => panic!("{name} is a histogram: {self}"),
            })
            .sum()
    }

    /// `name`'s values among its data points that carry `attributes`, by the value of their
    /// attribute `key` (points without it are left out), added up over the other attributes;
    /// only the non-zero ones.
    pub fn values_by(
        &self,
        name: &str,
        attributes: &[(&str, &str)],
        key: &str,
    ) -> BTreeMap<String, i64> {
        let mut by = BTreeMap::new();
        for p in self.points(name, attributes) {
            if let (Some(k), PointValue::Number(n)) = (p.attributes.get(key), p.value) {
                *by.entry(k.clone()).or_insert(0) += n as i64;
            }
        }
        by.retain(|_, v| *v != 0);
        by
    }

    /// Histogram `name` over its data points that carry `attributes`, merged: count 0 when
    /// nothing matching was recorded.
    pub fn histogram(&self, name: &str, attributes: &[(&str, &str)]) -> HistogramSummary {
        let mut all = HistogramSummary::default();
        for p in self.points(name, attributes) {
            let PointValue::Histogram(h) = p.value else {
                panic!("{name} is not a histogram: {self}");
            };
            all.count += h.count;
            all.sum += h.sum;
            all.min = [all.min, h.min].into_iter().flatten().reduce(f64::min);
            all.max = [all.max, h.max].into_iter().flatten().reduce(f64::max);
        }
        all
    }
}

/// One line per data point, sorted: for failure messages.
impl std::fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut lines: Vec<String> = self
            .points
            .iter()
            .map(|p| {
                let attributes: BTreeMap<&String, &String> = p.attributes.iter().collect();
                format!("{}{attributes:?} = {:?}", p.name, p.value)
            })
            .collect();
        lines.sort();
        writeln!(f, "metrics collected at {:?}:", self.collected_at)?;
        for line in lines {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// What an `Otlp` receiver has been sent.
#[derive(Default)]
struct OtlpReceived {
    spans: Vec<Span>,
    /// Every metrics export, in the order received (not necessarily the order collected).
    metrics: Vec<MetricsSnapshot>,
    /// Requests it could not decode, for failure messages (a test waiting for data would
    /// otherwise time out without saying why).
    refused: Vec<String>,
}

/// A minimal OTLP/HTTP receiver on 127.0.0.1 (protobuf, decoded with the protocol's own
/// message types): spans from `/v1/traces`, metrics from `/v1/metrics`; anything else (the
/// agent's own logs, were they on) is answered and dropped. A test that wants the worker's
/// metrics starts its worker with `worker_env()`, which also sends the worker's traces here:
/// they are kept, and cost the test nothing.
pub struct Otlp {
    pub url: String,
    received: std::sync::Arc<std::sync::Mutex<OtlpReceived>>,
    /// Woken at every request decoded, so that waiting on the data needs no polling interval.
    arrived: std::sync::Arc<tokio::sync::Notify>,
}

/// How often the worker exports its metrics to a test's receiver, in ms
/// (`OTEL_METRIC_EXPORT_INTERVAL`, read by the SDK's periodic reader; 60 s by default).
pub const METRIC_EXPORT_INTERVAL_MS: &str = "200";

/// How long the worker's batch span exporter waits before it sends what has ended, in ms
/// (`OTEL_BSP_SCHEDULE_DELAY`; 5 s by default): a test waiting on a span (a lease taken, say)
/// sees it this soon.
pub const SPAN_EXPORT_DELAY_MS: &str = "200";

impl Otlp {
    pub async fn start() -> Otlp {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = std::sync::Arc::new(std::sync::Mutex::new(OtlpReceived::default()));
        let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
        let (store, notify) = (received.clone(), arrived.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (store, notify) = (store.clone(), notify.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    // One request after another on a kept-alive connection.
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push_str(&line);
                        }
                        let length = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let path = head.split_whitespace().nth(1).unwrap_or_default();
                        let decoded = {
                            let mut store = store.lock().unwrap();
                            let decoded = store.take(path, &body);
                            if let Err(why) = &decoded {
                                store.refused.push(format!("{path}: {why}"));
                            }
                            decoded
                        };
                        notify.notify_waiters();
                        let status = if decoded.is_ok() {
                            "200 OK"
                        } else {
                            "400 Bad Request"
                        };
                        let reply = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
                        );
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Otlp {
            url,
            received,
            arrived,
        }
    }

    /// The settings that make a worker export its traces and metrics here, metrics every
    /// `METRIC_EXPORT_INTERVAL_MS` and ended spans within `SPAN_EXPORT_DELAY_MS`.
    pub fn worker_env(&self) -> [(&'static str, &str); 4] {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.url.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", METRIC_EXPORT_INTERVAL_MS),
            ("OTEL_BSP_SCHEDULE_DELAY", SPAN_EXPORT_DELAY_MS),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    /// Wait until the spans received so far satisfy `done` (`what` names it in the failure);
    /// those spans.
    pub async fn wait_for_spans(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Span]) -> bool,
    ) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the look, so that an export arriving in between still wakes us.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let refused = self.received.lock().unwrap().refused.clone();
                let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                panic!(
                    "no {what} within {timeout:?}; spans received: {names:?}; refused: {refused:#?}"
                );
            }
        }
    }

    /// The newest collection of metrics received (empty before the first).
    pub fn metrics(&self) -> MetricsSnapshot {
        self.received
            .lock()
            .unwrap()
            .metrics
            .iter()
            .max_by_key(|m| m.collected_at)
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until the newest collection of metrics satisfies `done` (`what` names it in the
    /// failure); that collection.
    pub async fn wait_for_metrics(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&MetricsSnapshot) -> bool,
    ) -> MetricsSnapshot {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the look, so that an export arriving in between still wakes us.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let newest = self.metrics();
            if done(&newest) {
                return newest;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let refused = self.received.lock().unwrap().refused.clone();
                panic!("no {what} within {timeout:?}; the newest {newest}refused: {refused:#?}");
            }
        }
    }

    /// The first collection the worker made after `since`: everything it recorded before
    /// `since` (before a status event the test has seen, say) is counted in it, so a total
    /// read there is final for that work.
    pub async fn metrics_since(&self, since: SystemTime, timeout: Duration) -> MetricsSnapshot {
        self.wait_for_metrics("metrics collected after the moment asked", timeout, |m| {
            m.collected_at >= since
        })
        .await
    }
}

impl OtlpReceived {
    /// Decode and keep one request's data (`path` says what it holds).
    fn take(&mut self, path: &str, body: &[u8]) -> Result<(), String> {
        use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        match path {
            "/v1/traces" => {
                let request = ExportTraceServiceRequest::decode(body).map_err(|e| e.to_string())?;
                for s in request
                    .resource_spans
                    .into_iter()
                    .flat_map(|rs| rs.scope_spans)
                    .flat_map(|ss| ss.spans)
                {
                    self.spans.push(Span {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: s.kind,
                        start: s.start_time_unix_nano,
                        attributes: otlp_attributes(&s.attributes),
                        events: s
                            .events
                            .iter()
                            .map(|e| (e.name.clone(), otlp_attributes(&e.attributes)))
                            .collect(),
                    });
                }
                Ok(())
            }
            "/v1/metrics" => {
                let request =
                    ExportMetricsServiceRequest::decode(body).map_err(|e| e.to_string())?;
                self.metrics.push(snapshot_of(request));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The data points of one metrics export (sums, gauges and histograms: what the worker makes).
fn snapshot_of(
    request: opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
) -> MetricsSnapshot {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
    let mut points = Vec::new();
    let mut times = Vec::new();
    for metric in request
        .resource_metrics
        .into_iter()
        .flat_map(|rm| rm.scope_metrics)
        .flat_map(|sm| sm.metrics)
    {
        let numbers = match &metric.data {
            Some(Data::Sum(sum)) => sum.data_points.as_slice(),
            Some(Data::Gauge(gauge)) => gauge.data_points.as_slice(),
            _ => &[],
        };
        for p in numbers {
            times.push(p.time_unix_nano);
            let value = match p.value {
                Some(Number::AsInt(i)) => i as f64,
                Some(Number::AsDouble(d)) => d,
                None => 0.0,
            };
            points.push(MetricPoint {
                name: metric.name.clone(),
                attributes: otlp_attributes(&p.attributes),
                value: PointValue::Number(value),
            });
        }
        if let Some(Data::Histogram(histogram)) = &metric.data {
            for p in &histogram.data_points {
                times.push(p.time_unix_nano);
                points.push(MetricPoint {
                    name: metric.name.clone(),
                    attributes: otlp_attributes(&p.attributes),
                    value: PointValue::Histogram(HistogramSummary {
                        count: p.count,
                        sum: p.sum.unwrap_or(0.0),
                        min: p.min,
                        max: p.max,
                    }),
                });
            }
        }
    }
    let earliest = times.into_iter().min().unwrap_or(0);
    MetricsSnapshot {
        collected_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(earliest),
        points,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// OTLP attributes as text: strings as they are, numbers and booleans written out.
fn otlp_attributes(
    kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> HashMap<String, String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

// ---------------------------------------------------------------- deploys and rollback (issue 26)

impl TestEnv {
    /// Key -> bytes of every object of the site in `bucket`, every page of the listing, the
    /// worker's own `.edit-worker/` left out: what a visitor can be served.
    pub async fn site_files(&self, bucket: &str) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        for key in self.keys_under(bucket, "").await {
            if key.starts_with(".edit-worker/") {
                continue;
            }
            let got = self
                .s3
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .expect("get object");
            files.insert(key, got.body.collect().await.unwrap().into_bytes().to_vec());
        }
        files
    }

    /// Every key under `prefix` in `bucket` (all pages of the listing), sorted.
    pub async fn keys_under(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for object in page.expect("list bucket").contents() {
                keys.push(object.key().unwrap_or_default().to_owned());
            }
        }
        keys.sort();
        keys
    }

    /// Turn versioning on for `bucket`.
    pub async fn enable_versioning(&self, bucket: &str) {
        let on = aws_sdk_s3::types::VersioningConfiguration::builder()
            .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
            .build();
        self.s3
            .put_bucket_versioning()
            .bucket(bucket)
            .versioning_configuration(on)
            .send()
            .await
            .expect("turn versioning on");
    }

    /// Put a rollback message on the input queue (`to`: `None` for the default, `previous`).
    pub async fn send_rollback(
        &self,
        client: &str,
        project: &str,
        thread: &str,
        to: Option<&str>,
    ) -> String {
        let mut body = serde_json::json!({
            "sessionId": format!("s-{thread}"),
            "threadId": thread,
            "clientId": client,
            "projectId": project,
            "action": "rollback",
        });
        if let Some(to) = to {
            body["to"] = to.into();
        }
        self.send_raw(&body.to_string()).await
    }
}

/// A thread's conversation as a worker alone records it: the `conversation` of the thread's one
/// document in its records folder (`{WORKSPACE_ROOT}/.records/threads/{client}/{project}/{thread}.json`,
/// issue 25), with the agent's `sessionId` and `totalCostUsd`.
pub fn thread_conversation(root: &Path, client: &str, project: &str, thread: &str) -> Value {
    let path = root.join(format!(".records/threads/{client}/{project}/{thread}.json"));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_slice(&text).unwrap();
    doc["conversation"].clone()
}
