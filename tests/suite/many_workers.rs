//! Issue 12: many workers on one queue. Several `edit-worker` processes share one input queue and
//! one lease store (`LEASE_STORE=s3://…` on moto), with their own or one shared workspace root:
//! every message ends once, a workspace is held by one worker at a time (checked on the lease
//! transitions each worker exports as spans to an OTLP receiver of its own), nothing is lost or
//! applied twice when a worker dies or is replaced, conversations continue on another worker,
//! and a newer message interrupts work running on another worker. The checks read the workers'
//! spans and metrics, never their logs (kept for failure messages).
//!
//! Every request of these tests writes its number `n` into `public/threads/{thread}.txt` and
//! `public/live.txt` (the build copies `public/` to `dist/`), so a branch and a bucket say which
//! request they hold; the marker `[mw n=…]` in the prompt ties the stand-in's runs (its call
//! log, `standin-calls.jsonl` in each `CLAUDE_CONFIG_DIR`) to the requests.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{
    LeaseHeld, Site, Span, TestEnv, WorkerProcess, git, git_ok, is_terminal, lease_intervals,
    lease_intervals_in, lease_overlaps, now_ms, tail, with_releases_lost_in_kills,
};
use serde_json::Value;

const PROJECT: &str = "site";

/// One request sent by a test.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    n: usize,
    client: String,
    thread: String,
    /// Wall clock just before the send call.
    sent_at_ms: u64,
}

/// Where a worker keeps its checkouts and the agent's files.
#[derive(Clone, Copy, PartialEq)]
enum Roots {
    /// `WORKSPACE_ROOT` and `CLAUDE_CONFIG_DIR` of its own.
    Own,
    /// One `WORKSPACE_ROOT` and one `CLAUDE_CONFIG_DIR` for every worker (a shared volume).
    Shared,
}

/// One run of the stand-in agent, from its call log.
#[derive(Debug, Clone)]
struct Run {
    /// The config dir whose log holds it (with own roots: which worker ran it).
    dir: PathBuf,
    pid: u64,
    session: String,
    resumed: bool,
    start: f64,
    /// The requests (`n`) its prompt carried.
    markers: Vec<usize>,
    /// `None`: no end line (killed with SIGKILL).
    end: Option<Value>,
}

impl Run {
    fn writes(&self) -> Vec<(String, String)> {
        self.end
            .as_ref()
            .and_then(|e| e["writes"].as_array())
            .map(|ws| {
                ws.iter()
                    .filter_map(|w| {
                        Some((w[0].as_str()?.to_owned(), w[1].as_str()?.trim().to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn outcome(&self) -> String {
        self.end
            .as_ref()
            .and_then(|e| e["outcome"].as_str())
            .unwrap_or("no end line")
            .to_owned()
    }
}

fn markers(prompt: &str) -> Vec<usize> {
    prompt
        .split("[mw n=")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Every run of the stand-in logged under these config dirs, by start time.
fn standin_runs(dirs: &[PathBuf]) -> Vec<Run> {
    let mut runs = Vec::new();
    for dir in dirs {
        let text = std::fs::read_to_string(dir.join("standin-calls.jsonl")).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let ends: BTreeMap<u64, Value> = lines
            .iter()
            .filter(|l| l["event"] == "end")
            .filter_map(|l| Some((l["pid"].as_u64()?, l.clone())))
            .collect();
        for l in lines.iter().filter(|l| l["event"] == "start") {
            let pid = l["pid"].as_u64().unwrap_or(0);
            let prompt = l["prompt"].as_str().unwrap_or_default();
            runs.push(Run {
                dir: dir.clone(),
                pid,
                session: l["sessionId"].as_str().unwrap_or_default().to_owned(),
                resumed: l["resumed"].as_bool().unwrap_or(false),
                start: l["start"].as_f64().unwrap_or(0.0),
                markers: markers(prompt),
                end: ends.get(&pid).cloned(),
            });
        }
    }
    runs.sort_by(|a, b| a.start.total_cmp(&b.start));
    runs
}

/// Request `n` of `thread`: writes its number, then works for `sleep` seconds (so that a newer
/// request finds it running).
fn command(n: usize, thread: &str, sleep: u32) -> String {
    format!(
        "[mw n={n}] [standin:write public/threads/{thread}.txt {n}] \
         [standin:write public/live.txt {n}] [standin:sleep {sleep}]"
    )
}

/// Violations found by the checks, by kind.
type Found = BTreeMap<&'static str, Vec<String>>;

/// A test's workers, what it sent and every status event seen.
struct Cluster {
    env: TestEnv,
    lease_store: String,
    clients: Vec<String>,
    workers: Vec<WorkerProcess>,
    sent: Vec<Sent>,
    events: Vec<Value>,
    config_dirs: Vec<PathBuf>,
    /// Accept a terminal event sent again byte for byte (the contract's repeat of a recorded
    /// outcome, after a worker died between sending it and deleting the message).
    identical_repeats_allowed: bool,
}

impl Cluster {
    /// A test world with one workspace `{client}/site` (tiny site, own bucket) per client and
    /// a lease store.
    async fn new(name: &str, clients: &[String]) -> Cluster {
        let env = TestEnv::new(name).await;
        for client in clients {
            env.create_site(client, PROJECT, Site::Tiny).await;
        }
        let lease_store = env.create_lease_store().await;
        Cluster {
            env,
            lease_store,
            clients: clients.to_vec(),
            workers: Vec::new(),
            sent: Vec::new(),
            events: Vec::new(),
            config_dirs: Vec::new(),
            identical_repeats_allowed: false,
        }
    }

    fn upstream(&self, client: &str) -> PathBuf {
        self.env.upstream(client, PROJECT)
    }

    /// The settings of worker `name`: lease store, roots, the tiny build, and `extra` (wins).
    fn settings(&self, name: &str, roots: Roots, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let (root, claude) = match roots {
            Roots::Own => (
                self.env.dir.path().join(format!("ws-{name}")),
                self.env.dir.path().join(format!("claude-{name}")),
            ),
            Roots::Shared => (
                self.env.workspace_root(),
                self.env.dir.path().join("claude"),
            ),
        };
        let mut settings: Vec<(String, String)> = [
            ("LEASE_STORE", self.lease_store.clone()),
            ("WORKSPACE_ROOT", root.display().to_string()),
            ("CLAUDE_CONFIG_DIR", claude.display().to_string()),
            ("BUILD_COMMAND", "cp -R public dist".into()),
            ("PROGRESS_INTERVAL_SECONDS", "60".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        settings
    }

    /// Start worker `name`, exporting to a receiver of its own; its index in `workers`.
    async fn start(&mut self, name: &str, roots: Roots, extra: &[(&str, &str)]) -> usize {
        let settings = self.settings(name, roots, extra);
        let claude = PathBuf::from(
            &settings
                .iter()
                .rev()
                .find(|(k, _)| k == "CLAUDE_CONFIG_DIR")
                .unwrap()
                .1,
        );
        if !self.config_dirs.contains(&claude) {
            self.config_dirs.push(claude);
        }
        let pairs: Vec<(&str, &str)> = settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.workers.push(self.env.spawn_worker(name, &pairs).await);
        self.workers.len() - 1
    }

    fn worker(&self, name: &str) -> &WorkerProcess {
        self.workers.iter().find(|w| w.name == name).unwrap()
    }

    fn worker_mut(&mut self, name: &str) -> &mut WorkerProcess {
        self.workers.iter_mut().find(|w| w.name == name).unwrap()
    }

    /// Send request number `sent.len() + 1` to `client`'s workspace, thread `thread`.
    async fn send(&mut self, client: &str, thread: &str, sleep: u32) -> String {
        let n = self.sent.len() + 1;
        let sent_at_ms = now_ms();
        let id = self
            .env
            .send(client, PROJECT, thread, &command(n, thread, sleep))
            .await;
        self.sent.push(Sent {
            id: id.clone(),
            n,
            client: client.to_owned(),
            thread: thread.to_owned(),
            sent_at_ms,
        });
        // A new millisecond: SentTimestamp orders every request strictly.
        tokio::time::sleep(Duration::from_millis(2)).await;
        id
    }

    fn sent_by_id(&self, id: &str) -> &Sent {
        self.sent.iter().find(|s| s.id == id).unwrap()
    }

    fn terminal_of(&self, id: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e["messageId"] == id && is_terminal(e))
            .collect()
    }

    /// Read status events until one of `ids` has started.
    async fn wait_started_any(&mut self, ids: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .events
                .iter()
                .any(|e| e["type"] == "started" && ids.iter().any(|id| e["messageId"] == *id))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "none of {ids:?} started within {timeout:?}\n{}",
                self.logs_tail(40)
            );
            let got = self.env.drain(&self.env.output, 1).await;
            self.events.extend(got);
        }
    }

    /// Read status events until every request sent so far has a terminal event and the input
    /// queue is empty (every delete took), then 3 s more (late second events).
    async fn wait_all_ended(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut settled: Option<Instant> = None;
        while settled.is_none_or(|s| s.elapsed() < Duration::from_secs(3)) {
            let got = self.env.drain(&self.env.output, 1).await;
            self.events.extend(got);
            if settled.is_none() {
                let open: Vec<&Sent> = self
                    .sent
                    .iter()
                    .filter(|s| self.terminal_of(&s.id).is_empty())
                    .collect();
                if open.is_empty() && self.env.queue_depth(&self.env.input).await == 0 {
                    settled = Some(Instant::now());
                } else if Instant::now() > deadline {
                    let keep = self.keep_logs("not-ended");
                    panic!(
                        "{} of {} requests without a terminal event after {timeout:?}: {:?}\n\
                         logs kept in {}\n{}",
                        open.len(),
                        self.sent.len(),
                        open.iter().map(|s| (s.n, &s.id)).collect::<Vec<_>>(),
                        keep.display(),
                        self.logs_tail(40)
                    );
                }
            }
        }
    }

    /// Wait until no worker holds a lease (sessions gone idle release theirs), as their lease
    /// spans say. One worker after the other: after the work has ended, a worker that released
    /// everything takes nothing again.
    async fn wait_leases_released(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        for w in &self.workers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            w.wait_no_lease_held(left).await;
        }
    }

    /// SIGTERM every worker still running; the exit codes by worker.
    fn stop_all(&mut self) -> BTreeMap<String, Option<i32>> {
        self.workers
            .iter_mut()
            .filter(|w| w.killed_at_ms.is_none())
            .map(|w| (w.name.clone(), w.stop()))
            .collect()
    }

    /// Every lease the workers held, from their lease spans.
    fn leases(&self) -> Vec<LeaseHeld> {
        with_releases_lost_in_kills(self.workers.iter().flat_map(lease_intervals).collect())
    }

    fn logs_tail(&self, n: usize) -> String {
        self.workers
            .iter()
            .map(|w| format!("--- worker {} ---\n{}", w.name, tail(&w.text(), n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Copy the workers' logs, the stand-in's call logs, the events and the leases the workers'
    /// spans say they held to `target/many-workers/{label}-{test}` for a look after the test is
    /// gone.
    fn keep_logs(&self, label: &str) -> PathBuf {
        let to = common::repo_root()
            .join("target/many-workers")
            .join(format!("{label}-{}", self.env.name));
        let _ = std::fs::create_dir_all(&to);
        for w in &self.workers {
            let _ = std::fs::copy(&w.log, to.join(format!("worker-{}.log", w.name)));
        }
        for (i, dir) in self.config_dirs.iter().enumerate() {
            let _ = std::fs::copy(
                dir.join("standin-calls.jsonl"),
                to.join(format!("standin-calls-{i}.jsonl")),
            );
        }
        let events: Vec<String> = self.events.iter().map(Value::to_string).collect();
        let _ = std::fs::write(to.join("events.jsonl"), events.join("\n"));
        let leases: Vec<String> = self.leases().iter().map(|h| format!("{h:?}")).collect();
        let _ = std::fs::write(to.join("leases.txt"), leases.join("\n"));
        let sent: Vec<String> = self
            .sent
            .iter()
            .map(|s| {
                format!(
                    "{} {} {}/{} {}",
                    s.n, s.id, s.client, s.thread, s.sent_at_ms
                )
            })
            .collect();
        let _ = std::fs::write(to.join("sent.txt"), sent.join("\n"));
        to
    }

    /// Fail with every violation found, keeping the logs.
    fn assert_none(&self, found: &Found) {
        if found.values().all(Vec::is_empty) {
            return;
        }
        let keep = self.keep_logs("failed");
        let shown: BTreeMap<_, _> = found
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k, v.iter().take(8).collect::<Vec<_>>()))
            .collect();
        panic!(
            "violations: {shown:#?}\nlogs kept in {}\n{}",
            keep.display(),
            self.logs_tail(30)
        );
    }

    /// What must hold after every run: one terminal event per request, none failed, the
    /// newest request of each workspace completed, no push rejected, no trailer twice on a
    /// branch, no two workers holding one workspace at once, every lease of a worker that
    /// stopped gracefully released.
    fn check_common(&self, found: &mut Found) {
        for s in &self.sent {
            let ends = self.terminal_of(&s.id);
            let mut distinct: Vec<&Value> = Vec::new();
            for e in &ends {
                if !distinct.contains(e) {
                    distinct.push(e);
                }
            }
            let one = if self.identical_repeats_allowed {
                distinct.len() == 1
            } else {
                ends.len() == 1
            };
            if ends.len() > distinct.len() {
                eprintln!(
                    "n={} {}: its terminal event was sent again byte for byte ({} in all)",
                    s.n,
                    s.id,
                    ends.len()
                );
            }
            if !one {
                found
                    .entry("not_one_terminal_event")
                    .or_default()
                    .push(format!(
                        "n={} {} has {} terminal events: {:?}",
                        s.n,
                        s.id,
                        ends.len(),
                        ends.iter().map(|e| &e["type"]).collect::<Vec<_>>()
                    ));
            }
            for e in &ends {
                if !matches!(e["type"].as_str(), Some("completed" | "interrupted")) {
                    found
                        .entry("failed_or_rejected")
                        .or_default()
                        .push(format!("n={} {}: {e}", s.n, s.id));
                }
                if matches!(
                    e["error"]["kind"].as_str(),
                    Some("push_failed" | "push_rejected" | "thread_diverged")
                ) {
                    found
                        .entry("push_rejected")
                        .or_default()
                        .push(format!("n={} {}: {e}", s.n, s.id));
                }
            }
        }
        for client in &self.clients {
            let newest = self.sent.iter().rfind(|s| &s.client == client);
            if let Some(newest) = newest {
                let ends = self.terminal_of(&newest.id);
                if ends.first().map(|e| &e["type"]) != Some(&Value::from("completed")) {
                    found
                        .entry("newest_not_completed")
                        .or_default()
                        .push(format!(
                            "{client}: newest request n={} {} ended {:?}",
                            newest.n,
                            newest.id,
                            ends.first().map(|e| &e["type"])
                        ));
                }
            }
            // Nothing applied twice: a request's trailer is on at most one commit of a branch.
            let upstream = self.upstream(client);
            let threads: BTreeSet<&str> = self
                .sent
                .iter()
                .filter(|s| &s.client == client)
                .map(|s| s.thread.as_str())
                .collect();
            for thread in threads {
                let Some(log) = git_ok(
                    &upstream,
                    &["log", "--format=%B", &format!("thread-{thread}")],
                ) else {
                    continue;
                };
                for s in self.sent.iter().filter(|s| &s.client == client) {
                    let times = log
                        .matches(&format!("Edit-Worker-Message: {}", s.id))
                        .count();
                    if times > 1 {
                        found.entry("applied_twice").or_default().push(format!(
                            "{client}/thread-{thread}: the trailer of n={} {} is on {times} commits",
                            s.n, s.id
                        ));
                    }
                }
            }
        }
        // Called once every worker has stopped (SIGTERM flushes its metrics) or was killed
        // (its last export is at most METRIC_EXPORT_INTERVAL_MS old), so the newest
        // collection holds its total.
        for w in &self.workers {
            let retries = w.otlp.metrics().value("edit_worker.push.retries", &[]);
            if retries > 0 {
                found.entry("push_retried").or_default().push(format!(
                    "worker {}: {retries} pushes failed and were retried",
                    w.name
                ));
            }
        }
        // A lease outlives the messages that use it: its spans are roots, in no message's trace.
        for w in &self.workers {
            for span in w.otlp.spans() {
                if span.name.starts_with("lease ") && !span.parent_span_id.is_empty() {
                    found
                        .entry("lease_span_not_a_root")
                        .or_default()
                        .push(format!("worker {}: {span:?}", w.name));
                }
            }
        }
        let leases = self.leases();
        found
            .entry("workers_held_one_workspace_at_once")
            .or_default()
            .extend(lease_overlaps(&leases));
        for h in leases.iter().filter(|h| h.until_ms.is_none()) {
            found
                .entry("lease_never_released")
                .or_default()
                .push(format!("{h:?}"));
        }
        for client in &self.clients {
            let workspace = format!("{client}/{PROJECT}");
            if !leases.iter().any(|h| h.workspace == workspace) {
                found
                    .entry("workspace_never_leased")
                    .or_default()
                    .push(workspace);
            }
        }
    }

    /// Each thread's branch holds the newest of its requests that was applied: the newest that
    /// completed, or that an agent run (interrupted or not) wrote and so was saved.
    fn check_branches(&self, runs: &[Run], found: &mut Found) {
        let mut threads: BTreeMap<(String, String), Vec<&Sent>> = BTreeMap::new();
        for s in &self.sent {
            threads
                .entry((s.client.clone(), s.thread.clone()))
                .or_default()
                .push(s);
        }
        for ((client, thread), sent) in threads {
            let file = format!("public/threads/{thread}.txt");
            let ns: BTreeSet<usize> = sent.iter().map(|s| s.n).collect();
            let completed = sent
                .iter()
                .filter(|s| {
                    self.terminal_of(&s.id)
                        .first()
                        .is_some_and(|e| e["type"] == "completed")
                })
                .map(|s| s.n);
            let written = runs
                .iter()
                .filter(|r| r.markers.iter().any(|n| ns.contains(n)))
                .flat_map(|r| r.writes())
                .filter(|(path, _)| *path == file)
                .filter_map(|(_, text)| text.parse::<usize>().ok())
                .filter(|n| ns.contains(n));
            let Some(expected) = completed.chain(written).max() else {
                continue;
            };
            let held = git_ok(
                &self.upstream(&client),
                &["show", &format!("thread-{thread}:{file}")],
            );
            if held.as_deref() != Some(expected.to_string().as_str()) {
                found.entry("branch_not_newest").or_default().push(format!(
                    "{client}/thread-{thread} holds {held:?}, the newest applied request is n={expected}"
                ));
            }
        }
    }

    /// Each bucket holds the build of the last request that completed in its workspace (by
    /// the events' `at`): its `live.txt`, and its thread's newest edit.
    async fn check_buckets(&self, found: &mut Found) {
        for client in &self.clients {
            let last = self
                .events
                .iter()
                .filter(|e| e["type"] == "completed" && e["clientId"] == client.as_str())
                .max_by(|a, b| a["at"].as_str().cmp(&b["at"].as_str()));
            let Some(last) = last else { continue };
            let commit = last["commit"].as_str().unwrap_or_default();
            let thread = last["threadId"].as_str().unwrap_or_default();
            let upstream = self.upstream(client);
            let live = self
                .env
                .bucket_contents(&self.env.bucket(client, PROJECT))
                .await;
            let body = |key: &str| {
                live.get(key)
                    .map(|(_, b)| String::from_utf8_lossy(b).trim().to_owned())
            };
            let want_live = git_ok(&upstream, &["show", &format!("{commit}:public/live.txt")]);
            let want_thread = git_ok(
                &upstream,
                &[
                    "show",
                    &format!("thread-{thread}:public/threads/{thread}.txt"),
                ],
            );
            if body("live.txt") != want_live
                || body(&format!("threads/{thread}.txt")) != want_thread
            {
                found.entry("bucket_not_newest").or_default().push(format!(
                    "{client}: the bucket holds live.txt {:?} and threads/{thread}.txt {:?}; the \
                     last completed request ({}, commit {commit}) built live.txt {want_live:?}, \
                     its branch holds {want_thread:?}",
                    body("live.txt"),
                    body(&format!("threads/{thread}.txt")),
                    last["messageId"]
                ));
            }
        }
    }

    /// Every run of a thread after its first continues the thread's conversation: it resumes
    /// the session of the thread's previous run; and no event says `conversationRestarted`
    /// when the agent had run on an earlier request of its thread (its conversation existed).
    /// (A thread whose first request was stopped before the agent started has a conversation
    /// id but no conversation: its next request starting anew is no loss.)
    fn check_conversations(&self, runs: &[Run], found: &mut Found) {
        let by_n: BTreeMap<usize, &Sent> = self.sent.iter().map(|s| (s.n, s)).collect();
        for e in self
            .events
            .iter()
            .filter(|e| is_terminal(e) && e["conversationRestarted"] == true)
        {
            let Some(s) = self.sent.iter().find(|s| e["messageId"] == s.id.as_str()) else {
                continue;
            };
            let earlier = runs.iter().any(|r| {
                r.markers.iter().any(|n| {
                    by_n.get(n)
                        .is_some_and(|o| o.client == s.client && o.thread == s.thread && o.n < s.n)
                })
            });
            if earlier {
                found
                    .entry("conversation_restarted")
                    .or_default()
                    .push(format!("n={} {}: {e}", s.n, s.id));
            } else {
                eprintln!(
                    "n={} {}: conversationRestarted, but the agent never ran on an earlier request of {}/{}",
                    s.n, s.id, s.client, s.thread
                );
            }
        }
        let mut last_session: BTreeMap<(String, String), String> = BTreeMap::new();
        for run in runs {
            let Some(s) = run
                .markers
                .first()
                .and_then(|n| self.sent.iter().find(|s| s.n == *n))
            else {
                continue;
            };
            let key = (s.client.clone(), s.thread.clone());
            let previous = last_session.insert(key, run.session.clone());
            match previous {
                Some(session) if !run.resumed || run.session != session => {
                    found
                        .entry("conversation_not_continued")
                        .or_default()
                        .push(format!(
                            "{}/{}: run of n={:?} (pid {}, in {}) has session {} resumed={}, \
                             the thread's previous run had {session}",
                            s.client,
                            s.thread,
                            run.markers,
                            run.pid,
                            run.dir.display(),
                            run.session,
                            run.resumed
                        ));
                }
                _ => {}
            }
        }
    }
}

/// Leases acquired from another worker (named as the previous holder).
fn moves(leases: &[LeaseHeld]) -> usize {
    leases.iter().filter(|h| h.moved()).count()
}

/// Runs that resumed a thread's conversation on another worker than its previous run (own
/// config dirs: the dir tells the worker).
fn resumed_across_workers(cluster: &Cluster, runs: &[Run]) -> usize {
    let mut last_dir: BTreeMap<(String, String), &Path> = BTreeMap::new();
    let mut count = 0;
    for run in runs {
        let Some(s) = run
            .markers
            .first()
            .and_then(|n| cluster.sent.iter().find(|s| s.n == *n))
        else {
            continue;
        };
        let key = (s.client.clone(), s.thread.clone());
        if let Some(dir) = last_dir.get(&key)
            && *dir != run.dir.as_path()
            && run.resumed
        {
            count += 1;
        }
        last_dir.insert(key, run.dir.as_path());
    }
    count
}

fn clients(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

/// Scenarios 1 and 2: three workers on one queue, 12 workspaces x 4 requests: a first
/// request each, then, while those run, a burst of two more into every workspace (one on the
/// same thread, one on another), and when all that has ended and every lease is released, one
/// more on the first thread (most land on another worker than before: a handover, and the
/// conversation continues there).
async fn three_workers(name: &str, roots: Roots) {
    let mut c = Cluster::new(name, &clients("mw", 12)).await;
    let settings = [("SESSION_IDLE_SECONDS", "2"), ("MAX_IN_FLIGHT", "6")];
    for w in ["a", "b", "c"] {
        c.start(w, roots, &settings).await;
    }
    let mut first = Vec::new();
    for client in c.clients.clone() {
        first.push(c.send(&client, "a", 2).await);
    }
    c.wait_started_any(&first, Duration::from_secs(60)).await;
    for client in c.clients.clone() {
        c.send(&client, "a", 2).await;
        c.send(&client, "b", 2).await;
    }
    c.wait_all_ended(Duration::from_secs(120)).await;
    c.wait_leases_released(Duration::from_secs(30)).await;
    for client in c.clients.clone() {
        c.send(&client, "a", 1).await;
    }
    c.wait_all_ended(Duration::from_secs(90)).await;
    let exits = c.stop_all();

    let runs = standin_runs(&c.config_dirs);
    let mut found = Found::new();
    for (worker, code) in &exits {
        if *code != Some(0) {
            found
                .entry("worker_exit")
                .or_default()
                .push(format!("worker {worker} exited with {code:?}"));
        }
    }
    c.check_common(&mut found);
    c.check_branches(&runs, &mut found);
    c.check_buckets(&mut found).await;
    c.check_conversations(&runs, &mut found);
    let leases = c.leases();
    let across = resumed_across_workers(&c, &runs);
    eprintln!(
        "{} requests, {} agent runs, {} leases, {} taken from another worker, {} conversations resumed on another worker",
        c.sent.len(),
        runs.len(),
        leases.len(),
        moves(&leases),
        across
    );
    // The run must have moved workspaces between workers, or it proves little.
    if moves(&leases) == 0 {
        found
            .entry("no_handover")
            .or_default()
            .push("no workspace ever moved to another worker".into());
    }
    if roots == Roots::Own && across == 0 {
        found
            .entry("no_resume_across_workers")
            .or_default()
            .push("no conversation was resumed on another worker".into());
    }
    c.assert_none(&found);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_with_their_own_disks_share_one_queue() {
    three_workers("mw-own", Roots::Own).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_on_one_shared_workspace_root() {
    three_workers("mw-shared", Roots::Shared).await;
}

/// Scenario 3: a thread's second request, on another worker with other disks, continues the
/// conversation its first request started on the first worker.
#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_continues_on_another_worker() {
    let mut c = Cluster::new("mw-convo", &clients("cv", 1)).await;
    c.start("a", Roots::Own, &[]).await;
    let first = c
        .env
        .send(
            "cv1",
            PROJECT,
            "t",
            "Remember the pelican. [standin:write public/threads/t.txt 1]",
        )
        .await;
    let events = c
        .env
        .wait_for(&first, "completed", common::ONE_MESSAGE)
        .await;
    c.events.extend(events);
    assert_eq!(c.worker_mut("a").stop(), Some(0), "{}", c.logs_tail(40));

    c.start("b", Roots::Own, &[]).await;
    let second = c
        .env
        .send(
            "cv1",
            PROJECT,
            "t",
            "What did I ask before? [standin:recall]",
        )
        .await;
    let events = c
        .env
        .wait_for(&second, "completed", common::ONE_MESSAGE)
        .await;
    c.events.extend(events);
    let done = c
        .events
        .iter()
        .find(|e| e["messageId"] == second.as_str() && e["type"] == "completed")
        .unwrap()
        .clone();
    assert_eq!(c.worker_mut("b").stop(), Some(0), "{}", c.logs_tail(40));

    let keep = || c.keep_logs("failed").display().to_string();
    let result = done["result"].as_str().unwrap_or_default();
    assert!(
        result.contains("Remember the pelican."),
        "the second request did not see the first: {done:#}\nlogs kept in {}",
        keep()
    );
    assert_ne!(done["conversationRestarted"], true, "{done:#}");
    // The stand-in ran once on each worker: the second run resumed the first one's session.
    let runs = standin_runs(&c.config_dirs);
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_ne!(runs[0].dir, runs[1].dir);
    assert!(!runs[0].resumed && runs[1].resumed, "{runs:#?}");
    assert_eq!(runs[0].session, runs[1].session, "{runs:#?}");
    // B took the workspace over from A.
    let b_leases = lease_intervals(c.worker("b"));
    assert!(
        b_leases
            .iter()
            .any(|h| h.handover && h.previous.as_deref() == Some("a")),
        "{b_leases:#?}\nlogs kept in {}",
        keep()
    );
    let mut found = Found::new();
    let sent_at = now_ms();
    for (n, id) in [(1, &first), (2, &second)] {
        c.sent.push(Sent {
            id: id.clone(),
            n,
            client: "cv1".into(),
            thread: "t".into(),
            sent_at_ms: sent_at,
        });
    }
    c.check_common(&mut found);
    c.assert_none(&found);
}

/// Scenario 4: one of three workers is killed with SIGKILL while it works. Its workspaces move
/// to the others within the lease expiry plus the visibility timeout; every request still ends
/// once, each workspace's newest request is on its branch, nothing is applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_run_loses_nothing() {
    const LEASE: u64 = 6;
    const VISIBILITY: u64 = 6;
    let mut c = Cluster::new("mw-kill", &clients("kl", 8)).await;
    // a may die between sending a terminal event and deleting its message: the next worker
    // then sends the recorded event again, byte for byte (README, "Whatever SQS does").
    c.identical_repeats_allowed = true;
    let lease = LEASE.to_string();
    let visibility = VISIBILITY.to_string();
    let settings = [
        ("LEASE_SECONDS", lease.as_str()),
        ("VISIBILITY_TIMEOUT_SECONDS", visibility.as_str()),
        ("SESSION_IDLE_SECONDS", "2"),
        ("MAX_IN_FLIGHT", "4"),
    ];
    for w in ["a", "b", "c"] {
        c.start(w, Roots::Own, &settings).await;
    }
    for client in c.clients.clone() {
        c.send(&client, "t", 4).await;
    }
    // Worker a holds a workspace and its agent is at work.
    let a_dir = c.env.dir.path().join("claude-a");
    let deadline = Instant::now() + common::STEP;
    while standin_runs(std::slice::from_ref(&a_dir))
        .iter()
        .all(|r| r.end.is_some())
    {
        assert!(
            Instant::now() < deadline,
            "worker a never ran an agent\n{}",
            c.logs_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What a held is known from its exported lease spans: wait until they are out (a span is
    // sent within SPAN_EXPORT_DELAY_MS of its event), or the kill could leave "a held
    // nothing" to check.
    c.worker("a")
        .otlp
        .wait_for_spans("lease taken by a", Duration::from_secs(10), |spans| {
            spans.iter().any(|s| s.name == "lease acquired")
        })
        .await;
    // A newer request for every workspace (some go to a, some wait on a's leases), then a
    // dies.
    for client in c.clients.clone() {
        c.send(&client, "t", 1).await;
    }
    c.worker_mut("a").kill9();
    let killed_at = c.worker("a").killed_at_ms.unwrap();
    c.wait_all_ended(Duration::from_secs(120)).await;
    let exits = c.stop_all();

    let mut found = Found::new();
    for (worker, code) in &exits {
        if *code != Some(0) {
            found
                .entry("worker_exit")
                .or_default()
                .push(format!("worker {worker} exited with {code:?}"));
        }
    }
    c.check_common(&mut found);
    // Each workspace has one thread: its newest request completed and is on the branch.
    for client in &c.clients {
        let newest = c.sent.iter().rfind(|s| &s.client == client).unwrap();
        let held = git_ok(
            &c.upstream(client),
            &["show", "thread-t:public/threads/t.txt"],
        );
        if held.as_deref() != Some(newest.n.to_string().as_str()) {
            found.entry("branch_not_newest").or_default().push(format!(
                "{client}/thread-t holds {held:?}, the newest request is n={}",
                newest.n
            ));
        }
    }
    c.check_buckets(&mut found).await;
    // a's workspaces went to the others, in time.
    let leases = c.leases();
    let lost_with_a: Vec<&LeaseHeld> = leases
        .iter()
        .filter(|h| h.worker == "a" && h.ended_by == "killed")
        .collect();
    let mut takeovers = Vec::new();
    for held in &lost_with_a {
        let next = leases
            .iter()
            .filter(|h| h.workspace == held.workspace && h.worker != "a" && h.from_ms >= killed_at)
            .min_by_key(|h| h.from_ms);
        match next {
            // a released this lease in the store just before the kill, and the kill cut off
            // the span that would have said so: the next holder read a's release in the
            // record (`previous_released`), which a could only have written alive. Nothing
            // was left to take over.
            Some(next) if next.previous.as_deref() == Some("a") && next.previous_released => {
                eprintln!("a released {} just before it was killed", held.workspace);
            }
            Some(next) => {
                takeovers.push(next.from_ms - killed_at);
                // Taken from a, once a's lease had expired (a's own release is the arm above).
                if !next.handover || next.previous.as_deref() != Some("a") {
                    found
                        .entry("takeover_not_handover")
                        .or_default()
                        .push(format!("{next:?}"));
                }
            }
            None => found
                .entry("workspace_not_taken_over")
                .or_default()
                .push(format!("{held:?}")),
        }
    }
    eprintln!(
        "a held {} workspaces when killed; taken over after {takeovers:?} ms",
        lost_with_a.len()
    );
    let limit = (LEASE + VISIBILITY + 15) * 1000;
    for t in &takeovers {
        if *t > limit {
            found
                .entry("takeover_too_slow")
                .or_default()
                .push(format!("{t} ms after the kill (limit {limit} ms)"));
        }
    }
    c.assert_none(&found);
    assert!(
        !takeovers.is_empty(),
        "a held no lease when it was killed (or released them all just before): the test \
         proved nothing\n{}",
        c.logs_tail(40)
    );
}

/// Scenario 5: a rolling deploy. B starts while A works on a slow request; A gets SIGTERM:
/// A saves its work ("Interrupted - saving work", pushed) and gives the message back; B
/// continues it (resuming the conversation) and completes it; one terminal event.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_deploy_hands_running_work_to_the_new_worker() {
    let mut c = Cluster::new("mw-deploy", &clients("dp", 1)).await;
    c.start("a", Roots::Own, &[]).await;
    let id = c.send("dp1", "t", 8).await;
    // A's agent has made its edit and works on.
    let a_file = c.env.dir.path().join("ws-a/dp1/site/public/threads/t.txt");
    let deadline = Instant::now() + common::STEP;
    while !a_file.exists() {
        assert!(Instant::now() < deadline, "{}", c.logs_tail(40));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.start("b", Roots::Own, &[]).await;
    c.worker("b")
        .wait_until_receiving(Duration::from_secs(30))
        .await;
    assert_eq!(c.worker_mut("a").stop(), Some(0), "{}", c.logs_tail(40));
    c.wait_all_ended(Duration::from_secs(90)).await;
    assert_eq!(c.worker_mut("b").stop(), Some(0), "{}", c.logs_tail(40));

    let mut found = Found::new();
    c.check_common(&mut found);
    let ends = c.terminal_of(&id);
    if ends.first().map(|e| &e["type"]) != Some(&Value::from("completed")) {
        found
            .entry("not_completed")
            .or_default()
            .push(format!("{ends:?}"));
    }
    let upstream = c.upstream("dp1");
    // A's saved work is on the branch, under B's completion.
    let subjects = git(&upstream, &["log", "--format=%H %s", "thread-t"]);
    let saved = subjects
        .lines()
        .find(|l| l.ends_with(" Interrupted - saving work"))
        .map(|l| l.split(' ').next().unwrap().to_owned());
    match (&saved, ends.first().and_then(|e| e["commit"].as_str())) {
        (Some(saved), Some(done)) => {
            if git_ok(&upstream, &["merge-base", "--is-ancestor", saved, done]).is_none() {
                found
                    .entry("saved_work_not_continued")
                    .or_default()
                    .push(format!(
                        "the saved commit {saved} is not under the completed one {done}"
                    ));
            }
            if git_ok(
                &upstream,
                &["show", &format!("{saved}:public/threads/t.txt")],
            )
            .as_deref()
                != Some("1")
            {
                found
                    .entry("saved_work_empty")
                    .or_default()
                    .push(format!("{saved} lacks A's edit"));
            }
        }
        (None, _) => found
            .entry("work_not_saved")
            .or_default()
            .push(format!("no saved work on thread-t: {subjects}")),
        (_, None) => {}
    }
    // The agent ran on A (stopped) and then on B, which resumed A's conversation.
    let runs = standin_runs(&c.config_dirs);
    let a_dir = c.env.dir.path().join("claude-a");
    let on_a: Vec<&Run> = runs.iter().filter(|r| r.dir == a_dir).collect();
    let on_b: Vec<&Run> = runs.iter().filter(|r| r.dir != a_dir).collect();
    if on_a.len() != 1 || on_a[0].outcome() == "success" {
        found
            .entry("a_not_stopped")
            .or_default()
            .push(format!("runs on a: {on_a:?}"));
    }
    if on_b.len() != 1
        || on_b[0].outcome() != "success"
        || !on_b[0].resumed
        || on_a.first().map(|r| &r.session) != Some(&on_b[0].session)
    {
        found
            .entry("b_did_not_continue")
            .or_default()
            .push(format!("runs on a: {on_a:?}; on b: {on_b:?}"));
    }
    c.assert_none(&found);
}

/// Scenario 6: a newer request received by another worker interrupts the holder's work. A
/// (room for one message) runs a slow request; B, started then, gets the newer one and tells
/// A; A stops, saves, and the newer request completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_message_on_another_worker_interrupts_the_holder() {
    let mut c = Cluster::new("mw-interrupt", &clients("ix", 1)).await;
    c.start("a", Roots::Own, &[("MAX_IN_FLIGHT", "1")]).await;
    let slow = c.send("ix1", "t1", 30).await;
    let a_dir = c.env.dir.path().join("claude-a");
    let deadline = Instant::now() + common::STEP;
    while standin_runs(std::slice::from_ref(&a_dir)).is_empty() {
        assert!(Instant::now() < deadline, "{}", c.logs_tail(40));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.start("b", Roots::Own, &[]).await;
    c.worker("b")
        .wait_until_receiving(Duration::from_secs(30))
        .await;
    let newer = c.send("ix1", "t2", 1).await;
    let sent_at = c.sent_by_id(&newer).sent_at_ms;
    c.wait_all_ended(Duration::from_secs(60)).await;
    let exits = c.stop_all();

    let mut found = Found::new();
    for (worker, code) in &exits {
        if *code != Some(0) {
            found
                .entry("worker_exit")
                .or_default()
                .push(format!("worker {worker} exited with {code:?}"));
        }
    }
    c.check_common(&mut found);
    let end_of = |id: &str| {
        c.terminal_of(id)
            .first()
            .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
    };
    if end_of(&slow).as_deref() != Some("interrupted")
        || end_of(&newer).as_deref() != Some("completed")
    {
        found.entry("wrong_outcomes").or_default().push(format!(
            "slow ended {:?}, newer ended {:?}",
            end_of(&slow),
            end_of(&newer)
        ));
    }
    // The notices, from the workers' counters (both stopped: their totals are final). One newer
    // message, so one `newer` notice, b -> a; a answers with one `released`, a -> b, once it has
    // stopped and released the workspace. (The message id is in the log lines beside them, not
    // in the counters: with one newer message in this test, kind and worker say which.)
    let a_metrics = c.worker("a").otlp.metrics();
    let b_metrics = c.worker("b").otlp.metrics();
    // (worker, its metrics, counter, kind, the attribute naming the other worker, who it is)
    let notices = [
        (
            "b",
            &b_metrics,
            "edit_worker.notices.sent",
            "newer",
            "to",
            "a",
        ),
        (
            "a",
            &a_metrics,
            "edit_worker.notices.received",
            "newer",
            "from",
            "b",
        ),
        (
            "a",
            &a_metrics,
            "edit_worker.notices.sent",
            "released",
            "to",
            "b",
        ),
        (
            "b",
            &b_metrics,
            "edit_worker.notices.received",
            "released",
            "from",
            "a",
        ),
    ];
    for (worker, metrics, counter, kind, key, other) in notices {
        let counted = metrics.values_by(counter, &[("kind", kind)], key);
        if counted != BTreeMap::from([(other.to_owned(), 1)]) {
            found.entry("notices").or_default().push(format!(
                "worker {worker}: {counter} of kind {kind} by {key}: {counted:?}, expected one \
                 with {key} {other}"
            ));
        }
    }
    // When a's agent stopped: the "work stopped" event on the slow message's span (a's
    // trace), with the worker's wall clock at the stop (`stopped_at_ms`), so the latency
    // counts from the test's send across the two processes.
    let slow_span = c.worker("a").otlp.spans().into_iter().find(|s| {
        s.name == "process edit message" && s.attributes.get("messaging.message.id") == Some(&slow)
    });
    let stopped_at = slow_span.as_ref().and_then(|span| {
        span.events
            .iter()
            .find(|(name, _)| name == "work stopped")
            .and_then(|(_, attributes)| attributes.get("stopped_at_ms")?.parse::<u64>().ok())
    });
    match stopped_at {
        Some(at) => {
            let latency = at.saturating_sub(sent_at);
            eprintln!("newer request sent -> holder's agent stopped: {latency} ms");
            if latency > 10_000 {
                found
                    .entry("interrupt_too_slow")
                    .or_default()
                    .push(format!("{latency} ms"));
            }
        }
        None => found.entry("work_not_stopped").or_default().push(format!(
            "a's span of the slow message has no \"work stopped\" event with stopped_at_ms: \
             {slow_span:?}"
        )),
    }
    // The slow request's partial work is saved on its own branch.
    let upstream = c.upstream("ix1");
    if git_ok(&upstream, &["log", "-1", "--format=%s", "thread-t1"]).as_deref()
        != Some("Interrupted - saving work")
        || git_ok(&upstream, &["show", "thread-t1:public/threads/t1.txt"]).as_deref()
            != Some(c.sent_by_id(&slow).n.to_string().as_str())
    {
        found.entry("work_not_saved").or_default().push(format!(
            "thread-t1: {:?}",
            git_ok(&upstream, &["log", "--format=%s", "thread-t1"])
        ));
    }
    c.assert_none(&found);
}

/// A lease span as a worker makes it (`lease_event!` in actors/src/delivery/lease.rs), started at
/// `start` ns, with `attributes`.
fn lease_span(name: &str, start: u64, attributes: &[(&str, &str)]) -> Span {
    Span {
        trace_id: format!("{start:032x}"),
        span_id: format!("{start:016x}"),
        parent_span_id: String::new(),
        name: name.to_owned(),
        kind: 1,
        start,
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        events: Vec::new(),
    }
}

/// (from, until, ended_by) of each lease, to compare.
fn spans_of(leases: &[LeaseHeld]) -> Vec<(u64, Option<u64>, &str)> {
    leases
        .iter()
        .map(|h| (h.from_ms, h.until_ms, h.ended_by.as_str()))
        .collect()
}

/// The spans come in export batches, in any order: they are read in the order the worker made
/// them, so a workspace released and taken back with the same token (nobody held it between)
/// is two holdings; one left open at a kill ends at the kill.
#[test]
fn lease_intervals_follow_the_spans_in_the_order_they_were_made() {
    let held = |at: &'static str| {
        [
            ("workspace", "c/p"),
            ("token", "1"),
            ("worker", "a"),
            ("at_ms", at),
        ]
    };
    let spans = [
        lease_span("lease acquired", 3, &held("150")),
        lease_span("lease acquired", 1, &held("100")),
        lease_span("lease released", 2, &held("150")),
    ];
    let leases = lease_intervals_in(&spans, "a", Some(400));
    assert_eq!(
        spans_of(&leases),
        [(100, Some(150), "released"), (150, Some(400), "killed")],
        "{leases:#?}"
    );
}

/// A killed worker's release whose span never got out: the next holder, having found the lease
/// released, ends the killed worker's holding at its own acquire; one that found it expired
/// leaves it ending at the kill. Without that, the overlap check would see two holders.
#[test]
fn a_release_lost_with_a_kill_ends_where_the_next_holder_found_it_released() {
    let a = [
        lease_span(
            "lease acquired",
            1,
            &[
                ("workspace", "c/p"),
                ("token", "3"),
                ("worker", "a"),
                ("at_ms", "100"),
            ],
        ),
        lease_span(
            "lease acquired",
            2,
            &[
                ("workspace", "c/q"),
                ("token", "1"),
                ("worker", "a"),
                ("at_ms", "110"),
            ],
        ),
    ];
    let taken = |workspace: &str, token: &str, at: &str, released: &str| {
        let attributes = [
            ("workspace", workspace),
            ("token", token),
            ("worker", "b"),
            ("handover", "true"),
            ("previous", "a"),
            ("previous_released", released),
            ("at_ms", at),
        ];
        lease_span("lease acquired", 10, &attributes)
    };
    let b = [
        taken("c/p", "4", "320", "true"),
        taken("c/q", "2", "6500", "false"),
    ];
    let mut all = lease_intervals_in(&a, "a", Some(500));
    all.extend(lease_intervals_in(&b, "b", None));
    assert!(
        !lease_overlaps(&all).is_empty(),
        "read alone, a's holding of c/p runs on to the kill, over b's"
    );
    let settled = with_releases_lost_in_kills(all);
    assert_eq!(
        spans_of(&settled[..2]),
        [
            (100, Some(320), "released (said by the next holder)"),
            (110, Some(500), "killed")
        ],
        "{settled:#?}"
    );
    assert!(lease_overlaps(&settled).is_empty(), "{settled:#?}");
}
