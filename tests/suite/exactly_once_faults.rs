//! Issue 11, "prove it under faults": the worker reads its input queue through
//! `tools/sqs-fault-proxy` (deletes dropped while answered as successes, messages handed out a
//! second time with a new receipt handle, receive batches reordered, throttling, lost replies,
//! and SQS's rule that a stale receipt handle "succeeds" without effect), while bursts of
//! requests go to a few workspaces and threads. A quick seeded version of
//! `scripts/bench exactly-once`; the same invariants, for every message:
//! one terminal event type, the agent run at most once (the stand-in's call log), no request of
//! a thread applied after a newer one, each thread's branch holding its newest applied request,
//! each bucket holding the build of the last publish reported, nothing dead-lettered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{self, FaultProxy, Site, TestEnv, is_terminal};
use serde_json::Value;

const CLIENTS: [&str; 3] = ["eoa", "eob", "eoc"];
const PROJECT: &str = "site";
const ROUNDS: usize = 4;
const SEED: u64 = 11;

/// One request sent: `n` is its place in the send order (sends are one at a time, each after
/// the last returned, at least 2 ms apart, so SQS's `SentTimestamp` orders them strictly).
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    n: usize,
    client: String,
    thread: String,
}

/// One agent run of the stand-in: its request markers in prompt order, and what it wrote (none
/// known when it was killed without an end line).
#[derive(Debug)]
struct Run {
    pid: u64,
    start: f64,
    markers: Vec<usize>,
    writes: Option<Vec<(String, String)>>,
}

fn command(n: usize, thread: &str) -> String {
    format!(
        "[load n={n} t={thread}] [standin:write public/threads/{thread}.txt {n}] \
         [standin:write public/live.txt {n}] [standin:sleep 1]"
    )
}

fn markers(prompt: &str) -> Vec<usize> {
    prompt
        .match_indices("[load n=")
        .filter_map(|(i, m)| {
            let rest = &prompt[i + m.len()..];
            rest[..rest.find(' ')?].parse().ok()
        })
        .collect()
}

fn read_runs(call_log: &Path) -> Vec<Run> {
    let text = std::fs::read_to_string(call_log).unwrap_or_default();
    let mut ends: HashMap<u64, Value> = HashMap::new();
    let mut starts = Vec::new();
    for line in text.lines() {
        let Ok(record) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let pid = record["pid"].as_u64().unwrap_or(0);
        match record["event"].as_str() {
            Some("start") => starts.push(record),
            Some("end") => {
                ends.insert(pid, record);
            }
            _ => {}
        }
    }
    let mut runs: Vec<Run> = starts
        .into_iter()
        .map(|s| {
            let pid = s["pid"].as_u64().unwrap_or(0);
            Run {
                pid,
                start: s["start"].as_f64().unwrap_or(0.0),
                markers: markers(s["prompt"].as_str().unwrap_or_default()),
                writes: ends.get(&pid).map(|e| {
                    e["writes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|w| {
                            (
                                w[0].as_str().unwrap_or_default().to_owned(),
                                w[1].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect()
                }),
            }
        })
        .collect();
    runs.sort_by(|a, b| a.start.total_cmp(&b.start));
    runs
}

/// Every violation of the invariants, as kind -> what was seen.
async fn violations(
    env: &TestEnv,
    sent: &[Sent],
    events: &[Value],
    runs: &[Run],
    dead_lettered: &BTreeSet<usize>,
) -> BTreeMap<&'static str, Vec<String>> {
    let mut found: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let by_n: HashMap<usize, &Sent> = sent.iter().map(|s| (s.n, s)).collect();
    let terminal_of = |id: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["messageId"] == id && is_terminal(e))
            .collect()
    };

    for s in sent {
        let terminal = terminal_of(&s.id);
        let types: BTreeSet<&str> = terminal.iter().filter_map(|e| e["type"].as_str()).collect();
        let who = format!("n={} {} ({}/{})", s.n, s.id, s.client, s.thread);
        if terminal.is_empty() {
            found.entry("lost").or_default().push(who.clone());
        } else if types.len() > 1 {
            found
                .entry("conflicting_terminal")
                .or_default()
                .push(format!("{who}: {types:?}"));
        } else {
            // A repeated terminal event is the recorded one sent again byte for byte: every
            // field, not only type and commit (issue 28), so compare the whole bodies.
            let bodies: BTreeSet<String> = terminal.iter().map(|e| e.to_string()).collect();
            if bodies.len() > 1 {
                found.entry("differing_repeat").or_default().push(format!(
                    "{who}: {} different bodies {bodies:?}",
                    bodies.len()
                ));
            }
        }
        let ran: Vec<u64> = runs
            .iter()
            .filter(|r| r.markers.contains(&s.n))
            .map(|r| r.pid)
            .collect();
        if ran.len() > 1 {
            found
                .entry("agent_ran_twice")
                .or_default()
                .push(format!("{who}: agent pids {ran:?}"));
        }
        if ran.is_empty() && types.contains("completed") {
            found
                .entry("completed_without_run")
                .or_default()
                .push(who.clone());
        }
        if dead_lettered.contains(&s.n) {
            found.entry("dead_lettered").or_default().push(who);
        }
    }

    // Per thread: the order the agent applied its requests in, and what its branch holds.
    let mut threads: BTreeMap<(String, String), BTreeSet<usize>> = BTreeMap::new();
    for s in sent {
        threads
            .entry((s.client.clone(), s.thread.clone()))
            .or_default()
            .insert(s.n);
    }
    for ((client, thread), ns) in &threads {
        let mut newest: Option<usize> = None;
        let mut written: Option<usize> = None;
        for run in runs {
            let mine: Vec<usize> = run
                .markers
                .iter()
                .copied()
                .filter(|n| ns.contains(n))
                .collect();
            if mine.is_empty() {
                continue;
            }
            if mine.windows(2).any(|w| w[0] > w[1]) {
                found
                    .entry("older_after_newer")
                    .or_default()
                    .push(format!("{client}/{thread}: joined out of order {mine:?}"));
            }
            for &n in &mine {
                if let Some(newer) = newest.filter(|&newer| n < newer) {
                    found.entry("older_after_newer").or_default().push(format!(
                        "{client}/{thread}: n={n} {} ran (pid {}) after n={newer} {}",
                        by_n[&n].id, run.pid, by_n[&newer].id
                    ));
                }
                newest = newest.max(Some(n));
            }
            let file = format!("public/threads/{thread}.txt");
            let wrote = match &run.writes {
                // Killed without an end line: the request writes first, so its writes happened.
                None => mine.iter().max().copied(),
                Some(writes) => writes
                    .iter()
                    .filter(|(path, _)| *path == file)
                    .filter_map(|(_, text)| text.trim().parse().ok())
                    .next_back(),
            };
            written = wrote.or(written);
        }
        let upstream = env.upstream(client, PROJECT);
        let branch = format!("thread-{thread}");
        let path = format!("public/threads/{thread}.txt");
        let held = show(&upstream, &format!("{branch}:{path}"));
        if written.is_some() && held != written {
            found.entry("branch_not_newest").or_default().push(format!(
                "{client}/{thread}: the branch holds {held:?}, the newest request applied is {written:?}"
            ));
        }
        let history = git_out(
            &upstream,
            &[
                "rev-list",
                "--reverse",
                "--first-parent",
                &branch,
                "--",
                &path,
            ],
        );
        let mut last: Option<usize> = None;
        for commit in history.split_whitespace() {
            let Some(value) = show(&upstream, &format!("{commit}:{path}")) else {
                continue;
            };
            if let Some(before) = last.filter(|&before| value < before) {
                found.entry("branch_regressed").or_default().push(format!(
                    "{client}/{thread}: commit {commit} replaced n={before} by the older n={value}"
                ));
            }
            last = Some(value);
        }
    }

    // Per workspace: the bucket holds the build of the last publish a first terminal event
    // reported.
    for client in CLIENTS {
        let mut last: Option<(String, &str, usize)> = None;
        for s in sent.iter().filter(|s| s.client == client) {
            let Some(first) = terminal_of(&s.id).into_iter().next() else {
                continue;
            };
            let published = first.get("publish").is_some_and(|p| !p.is_null());
            let (Some(at), Some(commit)) = (first["at"].as_str(), first["commit"].as_str()) else {
                continue;
            };
            if published && last.as_ref().is_none_or(|(t, _, _)| at > t.as_str()) {
                last = Some((at.to_owned(), commit, s.n));
            }
        }
        let Some((_, commit, n)) = last else {
            continue;
        };
        let expected = show(
            &env.upstream(client, PROJECT),
            &format!("{commit}:public/live.txt"),
        );
        let live = env.bucket_contents(&env.bucket(client, PROJECT)).await;
        let held = live
            .get("live.txt")
            .and_then(|(_, body)| String::from_utf8_lossy(body).trim().parse().ok());
        if expected.is_none() || held != expected {
            found.entry("bucket_not_newest").or_default().push(format!(
                "{client}: the bucket holds {held:?}; the last publish (n={n}, {commit}) built {expected:?}"
            ));
        }
    }
    found
}

/// A worker log line without the message's span (long; the message id is on the line anyway).
fn without_span(line: &str) -> String {
    const SPAN: &str = "process edit message{";
    match line.find(SPAN) {
        Some(start) => match line[start..].find('}') {
            Some(len) => {
                let rest = &line[start + len + 1..];
                format!(
                    "{}{}",
                    &line[..start],
                    rest.strip_prefix(':').unwrap_or(rest)
                )
            }
            None => line.to_owned(),
        },
        None => line.to_owned(),
    }
}

fn git_out(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number in a file at `rev:path`, if there is one.
fn show(repo: &Path, spec: &str) -> Option<usize> {
    git_out(repo, &["show", spec]).trim().parse().ok()
}

/// Send request number `sent.len() + 1` and note it.
async fn send(env: &TestEnv, sent: &mut Vec<Sent>, client: &str, thread: &str) -> String {
    let n = sent.len() + 1;
    let id = env.send(client, PROJECT, thread, &command(n, thread)).await;
    sent.push(Sent {
        id: id.clone(),
        n,
        client: client.to_owned(),
        thread: thread.to_owned(),
    });
    // A new millisecond: SentTimestamp orders every request strictly.
    tokio::time::sleep(Duration::from_millis(2)).await;
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_ends_once_and_applies_in_send_order_through_a_faulty_sqs() {
    let mut env = TestEnv::new("eo-faults").await;
    for client in CLIENTS {
        env.create_site(client, PROJECT, Site::Tiny).await;
    }
    // A dead-letter queue after 5 receives, as production has: a message that burns its
    // receives (deferrals, redeliveries) ends there without a terminal event.
    env.redrive_input(&env.dlq, 5).await;
    let input_name = env.input.rsplit('/').next().unwrap().to_owned();
    let seed = SEED.to_string();
    let mut proxy = FaultProxy::start(
        env.dir.path(),
        &input_name,
        &[
            "--seed",
            &seed,
            "--throttle-rate",
            "0.1",
            "--drop-delete-rate",
            "0.25",
            "--early-rate",
            "0.25",
            "--early-delay",
            "2",
            "--reorder-rate",
            "0.5",
            "--lost-reply-rate",
            "0.05",
        ],
    );
    env.start_worker(&[
        ("AWS_ENDPOINT_URL_SQS", proxy.url.as_str()),
        ("BUILD_COMMAND", "cp -R public dist"),
        ("VISIBILITY_TIMEOUT_SECONDS", "6"),
        ("PROGRESS_INTERVAL_SECONDS", "60"),
    ]);

    // Rounds: one request per workspace, and as soon as one of them has started, a burst into
    // every workspace: one more on the same thread and one on the other thread.
    let mut sent: Vec<Sent> = Vec::new();
    let mut events: Vec<Value> = Vec::new();
    for round in 0..ROUNDS {
        let (here, there) = if round % 2 == 0 {
            ("t1", "t2")
        } else {
            ("t2", "t1")
        };
        let mut leads = Vec::new();
        for client in CLIENTS {
            leads.push(send(&env, &mut sent, client, here).await);
        }
        let deadline = Instant::now() + common::STEP;
        while Instant::now() < deadline
            && !events
                .iter()
                .any(|e| e["type"] == "started" && leads.iter().any(|id| e["messageId"] == *id))
        {
            events.extend(env.drain(&env.output, 1).await);
        }
        for client in CLIENTS {
            send(&env, &mut sent, client, here).await;
            send(&env, &mut sent, client, there).await;
        }
    }

    // Until every request has its terminal event and the input queue is empty (every delete
    // took), then a few more seconds of events for late repeats.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut settled: Option<Instant> = None;
    while Instant::now() < deadline && settled.is_none_or(|s| s.elapsed() < Duration::from_secs(4))
    {
        events.extend(env.drain(&env.output, 1).await);
        let answered = sent.iter().all(|s| {
            events
                .iter()
                .any(|e| e["messageId"] == s.id.as_str() && is_terminal(e))
        });
        if settled.is_none() && answered && env.queue_depth(&env.input).await == 0 {
            settled = Some(Instant::now());
        }
    }
    let exit = env.stop_worker();
    let faults = proxy.stop();

    let dead_lettered: BTreeSet<usize> = env
        .drain(&env.dlq, 0)
        .await
        .iter()
        .filter_map(|body| markers(body["command"].as_str()?).first().copied())
        .collect();
    let runs = read_runs(&env.dir.path().join("claude/standin-calls.jsonl"));
    let mut found = violations(&env, &sent, &events, &runs, &dead_lettered).await;
    if settled.is_none() {
        found.entry("not_settled").or_default().push(format!(
            "after 300 s, {} messages were still in the input queue",
            env.queue_depth(&env.input).await
        ));
    }

    let injected = &faults["faults"];
    let repeated = sent
        .iter()
        .filter(|s| {
            events
                .iter()
                .filter(|e| e["messageId"] == s.id.as_str() && is_terminal(e))
                .count()
                > 1
        })
        .count();
    eprintln!(
        "{} requests, {} agent runs, {repeated} with a repeated terminal event (each compared \
         whole); injected faults: {injected}",
        sent.len(),
        runs.len()
    );
    // The run must have met the faults it is about, or it proves nothing.
    for kind in [
        "throttled",
        "delete_dropped",
        "redelivered_early",
        "reordered",
    ] {
        assert!(
            injected[kind].as_u64().unwrap_or(0) > 0,
            "no {kind} fault was injected: {faults:#}"
        );
    }
    if !found.is_empty() {
        let log = env.worker_log();
        let ids: Vec<&str> = sent
            .iter()
            .filter(|s| found.values().flatten().any(|v| v.contains(&s.id)))
            .map(|s| s.id.as_str())
            .take(4)
            .collect();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| ids.iter().any(|id| l.contains(id)))
            .map(without_span)
            .take(80)
            .collect();
        let fault_log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
        let fault_lines: Vec<&str> = fault_log
            .lines()
            .filter(|l| ids.iter().any(|id| l.contains(id)))
            .collect();
        panic!(
            "violations: {:#?}\ninjected faults: {faults:#}\nfaults met by {ids:?}:\n{}\nworker log of {ids:?}:\n{}",
            found,
            fault_lines.join("\n"),
            lines.join("\n")
        );
    }
    assert_eq!(exit, Some(0), "{}", env.worker_log());
}
