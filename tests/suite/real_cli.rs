//! Issue 14: the agent contract against the REAL Claude Code CLI. Every test here runs the
//! pinned CLI (`tools/claude-code.version`, installed into `.tools/claude-code` by
//! `scripts/test`) through the real worker binary, against `tools/fake-anthropic-api`, a
//! scripted Messages API on loopback that makes the CLI use its own Read, Edit and Write tools
//! in the workspace, and logs what the CLI sends. moto and git as everywhere else.
//!
//! The stand-in (`tools/claude-standin`) stays for tests/agent.rs and the load runs, where speed
//! matters; this file is where the stand-in's reading of the contract meets the real program.

use crate::common;

use std::time::Duration;

use crate::common::{
    FakeApi, Otlp, Site, TestEnv, assert_failed_unpublished, conversation_text, env_pairs, git,
    of_type, pids_working_in, terminal,
};
use serde_json::Value;

/// One message through the real CLI: ONE_MESSAGE's path plus the CLI's own turns (each a start
/// of its native binary and a streamed answer from the scripted API), which take several times
/// the stand-in's on a busy machine (issue 30).
const WAIT: Duration = Duration::from_secs(300);

fn with(api: &FakeApi, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = api.worker_env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn cost(event: &Value) -> f64 {
    event["costUsd"]
        .as_f64()
        .unwrap_or_else(|| panic!("no costUsd: {event}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Uses the real CLI. A plain edit the way a client asks for one: the CLI reads the home page
/// and edits it with its own tools, the worker commits, builds and publishes, and the bucket
/// shows the new title. Also: the request reaches the CLI as stream-json on stdin and the model
/// as the user's words (a request that looks like a flag stays text), the CLI states the
/// workspace as its working directory, the worker parses the CLI's stream-json into progress
/// events and the terminal event (result text, cost), and the thread's conversation is the
/// session the worker chose.
#[tokio::test(flavor = "multi_thread")]
async fn the_real_cli_edits_the_page_and_the_edit_goes_live() {
    edit_goes_live("none").await;
}

/// Uses the real CLI, in the tenant sandbox (issue 13): its own uid, namespaces and limits.
#[tokio::test(flavor = "multi_thread")]
async fn the_real_cli_edits_the_page_from_inside_the_sandbox() {
    edit_goes_live("users+namespaces").await;
}

async fn edit_goes_live(isolation: &str) {
    let mut env = TestEnv::new(&format!("realedit-{}", isolation.replace('+', "-"))).await;
    let api = FakeApi::start(env.dir.path(), None);
    let bucket = env.bucket("rae", "site");
    env.create_bucket(&bucket).await;
    let upstream = env.create_upstream("rae", "site", Site::Tiny);
    env.start_worker(&env_pairs(&with(
        &api,
        &[("PROGRESS_INTERVAL_SECONDS", "1"), ("ISOLATION", isolation)],
    )));

    let command = "Update the homepage title to \"Real CLI Title\"";
    let id = env.send("rae", "site", "t", command).await;
    let events = env.wait_for(&id, "completed", WAIT).await;
    let done = terminal(&events, &id);
    assert_eq!(
        done["result"], "Updated the homepage title to \"Real CLI Title\".",
        "{done}"
    );
    let live = env.bucket_contents(&bucket).await;
    let page = String::from_utf8_lossy(&live["index.html"].1).into_owned();
    assert!(page.contains("<title>Real CLI Title</title>"), "{page}");
    assert!(page.contains("<h1>Real CLI Title</h1>"), "{page}");
    let log = git(&upstream, &["log", "--format=%s", "main..thread-t"]);
    assert!(
        log.starts_with("Claude: Update the homepage title"),
        "{log}"
    );

    // What the CLI sent: Read, Edit, Edit, then the final answer, each request carrying the
    // conversation so far; the request text exactly as the client wrote it.
    let turns = api.turns_for(command);
    assert_eq!(turns.len(), 4, "{turns:#?}");
    let workspace = env.workspace_root().join("rae/site");
    assert!(
        conversation_text(&turns[0]).contains(&format!(
            "Primary working directory: {}",
            workspace.display()
        )),
        "the CLI runs in the workspace"
    );
    assert_eq!(turns[0]["prompt"], command);
    // The Edit came after a real Read: the file's content went back as a tool result.
    assert!(conversation_text(&turns[1]).contains("tool_result"));
    assert!(conversation_text(&turns[1]).contains("<title>Amelia Stamps</title>"));
    // One conversation, the one the worker chose and recorded for the thread.
    let record = common::thread_conversation(&env.workspace_root(), "rae", "site", "t");
    for turn in &turns {
        assert_eq!(
            turn["headers"]["x-claude-code-session-id"], record["sessionId"],
            "{record}"
        );
        // The key reached the CLI (the worker passes ANTHROPIC_API_KEY), never the log.
        assert_eq!(turn["headers"]["x-api-key"], "<redacted>");
    }
    // The cost the CLI computed from the usage the API answered: four requests.
    assert!(cost(&done) > 0.0, "{done}");
    assert!(
        close(record["totalCostUsd"].as_f64().unwrap(), cost(&done)),
        "{record} {done}"
    );

    // Progress events from the CLI's real tool use, paths relative to the workspace.
    let details: Vec<String> = of_type(&events, "progress")
        .iter()
        .filter(|e| e["messageId"] == id)
        .map(|e| e["detail"].as_str().unwrap_or_default().to_owned())
        .collect();
    let all = details.join(" | ");
    assert!(all.contains("Read src/pages/index.astro"), "{all}");
    assert!(all.contains("Edit src/pages/index.astro"), "{all}");
    assert!(!all.contains(env.dir.path().to_str().unwrap()), "{all}");

    // A request that looks like a flag is text to the CLI (it goes on stdin, inside JSON).
    let flag = "--version --dangerously-skip-permissions [api:write notes.txt -p --help]";
    let id = env.send("rae", "site", "u", flag).await;
    let events = env.wait_for(&id, "completed", WAIT).await;
    let done = terminal(&events, &id);
    assert_eq!(done["result"], "Done.", "{done}");
    assert_eq!(api.turns_for("--version")[0]["prompt"], flag);
    assert_eq!(git(&upstream, &["show", "thread-u:notes.txt"]), "-p --help");
    assert_eq!(env.stop_worker(), Some(0));
}

/// Uses the real CLI. Every way it fails has its own kind in the `failed` event:
/// `--max-turns` (AGENT_MAX_TURNS), `--max-budget-usd` (AGENT_MAX_BUDGET_USD), an API error
/// answer (400; and 529 retried as often as CLAUDE_CODE_MAX_RETRIES says, a variable that
/// reaches the CLI only through AGENT_ENV_ALLOW), and a CLI killed mid-turn (no result line).
/// The silence watchdog has a test of its own (below): its limit must be short to show its
/// point, and a short limit here would race the CLI's cold start (issue 30: on a fresh machine,
/// with three other tests beside it, the CLI stayed silent past 6 s at start, and `turns` and
/// `budget` ended `agent_silent`).
#[tokio::test(flavor = "multi_thread")]
async fn each_way_the_real_cli_fails_has_its_own_kind() {
    let mut env = TestEnv::new("realfail").await;
    let api = FakeApi::start(env.dir.path(), None);
    let cases = [
        (
            "turns",
            "[api:read package.json] [api:loop] turns",
            "agent_max_turns",
        ),
        (
            "budget",
            "[api:usage 200000 1000] [api:read package.json] [api:loop] budget",
            "agent_max_budget",
        ),
        ("bad", "[api:error 400] bad request", "agent_api_error"),
        ("busy", "[api:error 529] overloaded", "agent_api_error"),
        ("killed", "[api:hang] killed mid-turn", "agent_no_result"),
    ];
    for (client, _, _) in &cases {
        let client = format!("rf-{client}");
        env.create_site(&client, "site", Site::Tiny).await;
    }
    env.start_worker(&env_pairs(&with(
        &api,
        &[
            ("MAX_RECEIVES", "1"),
            ("AGENT_MAX_TURNS", "3"),
            ("AGENT_MAX_BUDGET_USD", "0.5"),
            // No case here is about silence: the watchdog must not end any of them, also not
            // the `killed` one while the test finds and kills its CLI. A cold CLI start on a
            // busy 2-core machine was seen silent for over 6 s; 300 s is far past any start.
            ("AGENT_SILENCE_SECONDS", "300"),
            ("AGENT_ENV_ALLOW", "CLAUDE_CODE_MAX_RETRIES"),
            ("CLAUDE_CODE_MAX_RETRIES", "1"),
        ],
    )));
    let mut ids = Vec::new();
    for (client, command, _) in &cases {
        ids.push(
            env.send(&format!("rf-{client}"), "site", "t", command)
                .await,
        );
    }
    // Kill the CLI of one workspace in the middle of its request: no result line.
    api.wait_for_turns("killed mid-turn", 1, WAIT);
    let workspace = env.workspace_root().join("rf-killed/site");
    let pids = pids_working_in(&workspace);
    assert!(!pids.is_empty(), "no agent runs in {}", workspace.display());
    for pid in pids {
        common::nix_kill(pid, "KILL").unwrap();
    }

    let events = env.events_until_terminal(cases.len(), WAIT).await;
    assert_failed_unpublished(&env, &events, "rf-", &cases, &ids).await;
    let end = |client: &str| {
        let i = cases.iter().position(|c| c.0 == client).unwrap();
        terminal(&events, &ids[i])
    };
    // The limits were the CLI's own: three turns, and a run that spent past its budget.
    assert_eq!(api.turns_for("turns").len(), 3);
    assert!(cost(&end("turns")) > 0.0);
    assert!(cost(&end("budget")) > 0.5, "{}", end("budget"));
    let detail = end("bad")["error"]["message"].as_str().unwrap().to_owned();
    assert!(detail.contains("400"), "{detail}");
    // CLAUDE_CODE_MAX_RETRIES=1 reached the CLI through AGENT_ENV_ALLOW: one retry, not ten.
    assert_eq!(api.turns_for("overloaded").len(), 2);
    assert_eq!(env.stop_worker(), Some(0));
}

/// Uses the real CLI. A CLI that stops writing while its request hangs is stopped by the
/// silence watchdog (`agent_silent`). The test arranges the silence itself: the scripted API
/// holds its answer (`[api:hang]`, pings only), and the test checks that the CLI was stopped
/// *while that request hung*, not during its start-up, so a slow start cannot pass for a hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_cli_that_stops_writing_is_stopped_by_the_silence_watchdog() {
    let mut env = TestEnv::new("realsilent").await;
    let api = FakeApi::start(env.dir.path(), None);
    env.create_site("rs-hung", "site", Site::Tiny).await;
    // 20 s: longer than any cold start seen (a CLI silent for over 6 s before its first
    // request, on a fresh and busy machine), short enough to keep the test quick. The hung
    // request would ping forever.
    let silence = 20;
    env.start_worker(&env_pairs(&with(
        &api,
        &[
            ("MAX_RECEIVES", "1"),
            ("AGENT_SILENCE_SECONDS", &silence.to_string()),
        ],
    )));
    let id = env.send("rs-hung", "site", "t", "[api:hang] hung").await;
    let events = env.events_until_terminal(1, WAIT).await;
    let end = terminal(&events, &id);
    assert_eq!(end["type"], "failed", "{end}");
    assert_eq!(end["error"]["kind"], "agent_silent", "{end}");
    let message = end["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("{silence}s")), "{message}");
    // The CLI got as far as the request that hung: the silence was the hang's.
    assert_eq!(api.turns_for("hung").len(), 1);
    assert!(
        env.bucket_contents(&env.bucket("rs-hung", "site"))
            .await
            .is_empty()
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// Uses the real CLI. One conversation per thread, across a worker restart: the second
/// message resumes the first one's session (the API sees the first request in the second
/// conversation), each message reports its own cost (the CLI reports a running total), another
/// thread starts another conversation, and a thread whose session files are gone starts anew.
#[tokio::test(flavor = "multi_thread")]
async fn a_thread_keeps_its_conversation_across_a_restart_and_each_message_pays_its_share() {
    conversation_across_restart("none").await;
}

/// Uses the real CLI, in the tenant sandbox: the conversation lives in the workspace's own
/// agent folder, and resumes from there after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_thread_keeps_its_conversation_in_the_sandbox() {
    conversation_across_restart("users+namespaces").await;
}

async fn conversation_across_restart(isolation: &str) {
    let mut env = TestEnv::new(&format!("realresume-{}", isolation.replace('+', "-"))).await;
    let api = FakeApi::start(env.dir.path(), None);
    env.create_site("rr", "site", Site::Tiny).await;
    let settings = with(&api, &[("ISOLATION", isolation)]);
    env.start_worker(&env_pairs(&settings));

    // One model request.
    let first = env
        .send("rr", "site", "t", "[api:say one] first words")
        .await;
    let events = env.wait_for(&first, "completed", WAIT).await;
    let one = cost(&terminal(&events, &first));
    assert!(one > 0.0);

    assert_eq!(env.stop_worker(), Some(0));
    env.start_worker(&env_pairs(&settings));

    // Two model requests (a Write, then the answer), in the same conversation.
    let second = env
        .send("rr", "site", "t", "[api:write two.txt 2] second words")
        .await;
    let events = env.wait_for(&second, "completed", WAIT).await;
    let two = cost(&terminal(&events, &second));
    assert!(close(two, 2.0 * one), "{two} is not twice {one}");
    let resumed = api.turns_for("second words");
    assert!(conversation_text(&resumed[0]).contains("first words"));
    let session = api.turns_for("first words")[0]["headers"]["x-claude-code-session-id"].clone();
    assert_eq!(resumed[0]["headers"]["x-claude-code-session-id"], session);
    let record = common::thread_conversation(&env.workspace_root(), "rr", "site", "t");
    assert!(close(record["totalCostUsd"].as_f64().unwrap(), 3.0 * one));

    // Another thread: another conversation.
    let other = env
        .send("rr", "site", "u", "[api:recall] other thread")
        .await;
    let events = env.wait_for(&other, "completed", WAIT).await;
    assert_eq!(
        terminal(&events, &other)["result"],
        "Earlier in this conversation: []"
    );
    let fresh = api.turns_for("other thread");
    assert!(!conversation_text(&fresh[0]).contains("first words"));
    assert_ne!(fresh[0]["headers"]["x-claude-code-session-id"], session);

    // A thread whose conversation's files are gone (new storage) starts a new one.
    let gone = "0b5e55ed-0000-4000-8000-000000000000";
    // Written as a record of the format before issue 25, which the worker still reads.
    let record_dir = env.workspace_root().join(".agent/threads/rr/site");
    std::fs::create_dir_all(&record_dir).unwrap();
    std::fs::write(
        record_dir.join("v.json"),
        serde_json::json!({"sessionId": gone, "totalCostUsd": 1.0}).to_string(),
    )
    .unwrap();
    let lost = env
        .send("rr", "site", "v", "[api:say anew] lost thread")
        .await;
    let events = env.wait_for(&lost, "completed", WAIT).await;
    let anew = terminal(&events, &lost);
    assert!(close(cost(&anew), one), "{anew}");
    let turns = api.turns_for("lost thread");
    assert_eq!(turns.len(), 1);
    assert_ne!(turns[0]["headers"]["x-claude-code-session-id"], gone);
    // The event says so: the agent no longer remembers the thread's earlier requests.
    assert_eq!(anew["conversationRestarted"], true, "{anew}");
    assert_eq!(env.stop_worker(), Some(0));
}

/// Uses the real CLI. The CLI's edit breaks the build; the worker resumes the same
/// conversation with the build log, the CLI repairs the page with its Write tool, and the
/// repaired site goes live.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_broken_by_the_real_cli_is_repaired_in_the_same_conversation() {
    let mut env = TestEnv::new("realrepair").await;
    let script = serde_json::json!({"rules": [{
        "when": "The build failed after your change",
        "steps": [
            {"tool": "Read", "input": {"file_path": "src/pages/broken.astro"}},
            {"tool": "Write", "input": {"file_path": "src/pages/broken.astro",
                                        "content": "---\nconst x = 1;\n---\n<p>fixed {x}</p>\n"}},
            {"text": "Fixed the page."}
        ]
    }]});
    let api = FakeApi::start(env.dir.path(), Some(script));
    let bucket = env.bucket("rp", "site");
    env.create_bucket(&bucket).await;
    let upstream = env.create_upstream("rp", "site", Site::Tiny);
    env.start_worker(&env_pairs(&with(&api, &[])));
    let id = env
        .send(
            "rp",
            "site",
            "t",
            "Update the homepage title to \"Mended\" [api:write src/pages/broken.astro ---\nconst x = ;\n---\n<p>{x}</p>\n]",
        )
        .await;
    let events = env.wait_for(&id, "completed", WAIT).await;
    let done = terminal(&events, &id);
    assert_eq!(done["buildRepairs"].as_u64(), Some(1), "{done}");
    let log = git(&upstream, &["log", "--format=%s", "main..thread-t"]);
    assert_eq!(log.lines().next(), Some("Claude: Fix the build"), "{log}");
    let live = env.bucket_contents(&bucket).await;
    assert!(String::from_utf8_lossy(&live["index.html"].1).contains("<title>Mended</title>"));
    assert!(String::from_utf8_lossy(&live["broken/index.html"].1).contains("<p>fixed 1</p>"));
    // The repair ran in the same conversation: it carried the original request.
    let repair = api.turns_for("The build failed after your change");
    assert!(conversation_text(&repair[0]).contains("Update the homepage title to"));
    assert_eq!(env.stop_worker(), Some(0));
}

/// Sends `first` (a Write, then a model request that takes a minute) on thread `t` of
/// `rt/site`, waits until its CLI is in the middle of that request, then sends `second` on the
/// same thread. Returns the ids. The worker must report progress at least once a second.
async fn interrupt_in_the_middle(
    env: &TestEnv,
    api: &FakeApi,
    first: &str,
    marker: &str,
    second: &str,
) -> (String, String) {
    let id1 = env.send("rt", "site", "t", first).await;
    // The worker has seen the Write (a progress event names it) ...
    env.wait_for_step(&id1, "Write", WAIT).await;
    // ... and the CLI has sent the request after it: the second of the message, which the
    // fake API answers at once with message_start (what the partial run is charged for) and
    // then holds for a minute. The newer message reaches the CLI only after its way through
    // SQS, the intake and the session.
    let deadline = std::time::Instant::now() + WAIT;
    while api.turns_for(marker).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", env.worker_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id2 = env.send("rt", "site", "t", second).await;
    (id1, id2)
}

/// Uses the real CLI. A newer message of the thread interrupts the running one in-band
/// (`control_request` `interrupt` on the CLI's stdin): the interrupted message ends
/// `interrupted` with its partial work saved and pushed, well within the 3 s target, and the
/// follow-up resumes the conversation that holds the interrupted request: the API's request for
/// the follow-up contains it, marked as interrupted by the CLI. (The thread has a conversation
/// already, so this holds with the session recorded only at the end of a run.)
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_message_interrupts_the_real_cli_and_the_follow_up_resumes_its_conversation() {
    interrupt_and_resume("none").await;
}

/// Uses the real CLI, in the tenant sandbox: the in-band interrupt and the signals reach the
/// CLI inside its namespaces.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_message_interrupts_the_real_cli_in_the_sandbox() {
    interrupt_and_resume("users+namespaces").await;
}

async fn interrupt_and_resume(isolation: &str) {
    let mut env = TestEnv::new(&format!("realint-{}", isolation.replace('+', "-"))).await;
    let api = FakeApi::start(env.dir.path(), None);
    env.create_bucket(&env.bucket("rt", "site")).await;
    let upstream = env.create_upstream("rt", "site", Site::Tiny);
    // The worker's metrics come to this receiver; with OTLP on, the worker also turns the
    // CLI's own trace export on, to the same receiver (kept, not looked at here).
    let otlp = Otlp::start().await;
    let settings = [
        otlp.worker_env().as_slice(),
        &[("ISOLATION", isolation), ("PROGRESS_INTERVAL_SECONDS", "1")],
    ]
    .concat();
    env.start_worker(&env_pairs(&with(&api, &settings)));
    let hello = env.send("rt", "site", "t", "[api:say hello] opening").await;
    env.wait_for(&hello, "completed", WAIT).await;

    let (id1, id2) = interrupt_in_the_middle(
        &env,
        &api,
        "make it red [api:write red.txt red] [api:sleep 60] [api:write never.txt x]",
        "make it red",
        "no, make it blue [api:write blue.txt blue]",
    )
    .await;
    let events = env.wait_for(&id2, "completed", WAIT).await;
    let completed_seen = std::time::SystemTime::now();
    let stopped = terminal(&events, &id1);
    assert_eq!(stopped["type"], "interrupted", "{stopped}");
    // The interrupted work is saved on the thread's branch; the follow-up builds on it.
    let log = git(&upstream, &["log", "--format=%s", "main..thread-t"]);
    assert!(log.contains("Interrupted - saving work"), "{log}");
    assert_eq!(git(&upstream, &["show", "thread-t:red.txt"]), "red");
    assert_eq!(git(&upstream, &["show", "thread-t:blue.txt"]), "blue");
    assert!(!git(&upstream, &["ls-tree", "--name-only", "thread-t"]).contains("never.txt"));
    // The follow-up's conversation holds the interrupted request, and the CLI marked it so.
    let follow_up = api.turns_for("no, make it blue");
    let text = conversation_text(&follow_up[0]);
    assert!(text.contains("make it red"), "{text}");
    assert!(text.contains("[Request interrupted by user]"), "{text}");
    // The worker's metrics, collected after everything above was recorded (before the
    // interrupted message's event, which came before the follow-up's).
    let metrics = otlp.metrics_since(completed_seen, WAIT).await;
    // From the newer message at its session to the CLI done with the interrupted turn: one
    // stop, its latency in microseconds.
    let latency = metrics.histogram("edit_worker.interrupt.latency", &[]);
    assert_eq!(latency.count, 1, "{metrics}");
    assert_eq!(
        metrics
            .histogram(
                "edit_worker.interrupt.latency",
                &[("reason", "interrupted")]
            )
            .count,
        1,
        "{metrics}"
    );
    assert!(latency.max.is_some_and(|us| us < 3_000_000.0), "{metrics}");
    // The in-band interrupt ended the CLI's turn, not the signal fallback.
    let idle = "edit_worker.agent.idle_after_stop";
    assert_eq!(metrics.histogram(idle, &[]).count, 1, "{metrics}");
    assert_eq!(
        metrics.histogram(idle, &[("in_band", "true")]).count,
        1,
        "{metrics}"
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// Uses the real CLI. Relies on `agent_turn.rs` recording the thread's conversation at the
/// START of a run, and accounting an interrupted run's cost from
/// `AgentError::InterruptedWithReport`. The thread's FIRST message is interrupted: the
/// follow-up must still resume its conversation (the API sees the interrupted request), the
/// interrupted event carries the cost the CLI reported for the partial run, and the follow-up
/// pays only its own requests.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_first_message_stays_in_the_conversation_and_pays_its_cost() {
    let mut env = TestEnv::new("realint1").await;
    let api = FakeApi::start(env.dir.path(), None);
    env.create_bucket(&env.bucket("rt", "site")).await;
    env.create_bucket(&env.bucket("base", "site")).await;
    env.create_upstream("rt", "site", Site::Tiny);
    env.create_upstream("base", "site", Site::Tiny);
    env.start_worker(&env_pairs(&with(
        &api,
        &[("PROGRESS_INTERVAL_SECONDS", "1")],
    )));
    // What a Write and an answer cost, on a thread of its own.
    let base = env
        .send("base", "site", "t", "[api:write b.txt b] baseline")
        .await;
    let events = env.wait_for(&base, "completed", WAIT).await;
    let baseline = cost(&terminal(&events, &base));

    let (id1, id2) = interrupt_in_the_middle(
        &env,
        &api,
        "make it red [api:write red.txt red] [api:sleep 60] [api:write never.txt x]",
        "make it red",
        "no, make it blue [api:write blue.txt blue]",
    )
    .await;
    let events = env.wait_for(&id2, "completed", WAIT).await;
    let stopped = terminal(&events, &id1);
    assert_eq!(stopped["type"], "interrupted", "{stopped}");
    let follow_up = api.turns_for("no, make it blue");
    let text = conversation_text(&follow_up[0]);
    assert!(text.contains("make it red"), "{text}");
    assert_eq!(
        follow_up[0]["headers"]["x-claude-code-session-id"],
        api.turns_for("make it red")[0]["headers"]["x-claude-code-session-id"]
    );
    // The partial run's cost: one full request and one cut off (its input was paid for).
    let interrupted = cost(&stopped);
    assert!(
        interrupted > baseline / 2.0 && interrupted < baseline,
        "{interrupted} vs {baseline}"
    );
    let done = terminal(&events, &id2);
    assert!(close(cost(&done), baseline), "{done} vs {baseline}");
    assert_eq!(env.stop_worker(), Some(0));
}

/// Uses the real CLI. The agent joins the message's trace: the worker passes TRACEPARENT (its
/// `agent run` span) and, because it exports traces over OTLP itself, what the CLI needs to
/// export its own (CLAUDE_CODE_ENABLE_TELEMETRY, OTEL_TRACES_EXPORTER and the endpoint). The
/// pinned CLI continues the trace: its `claude_code.interaction` span is a child of the
/// worker's `agent run` span, with `claude_code.llm_request` and `claude_code.tool` spans
/// below it; with CLAUDE_CODE_PROPAGATE_TRACEPARENT (passed through AGENT_ENV_ALLOW) it also
/// sends a `traceparent` header on its model requests. The fake API is the OTLP receiver of
/// both, worker and CLI (http/protobuf).
#[tokio::test(flavor = "multi_thread")]
async fn the_real_cli_joins_the_messages_trace() {
    let mut env = TestEnv::new("realtrace").await;
    let api = FakeApi::start(env.dir.path(), None);
    env.create_site("tr", "site", Site::Tiny).await;
    let url = api.url.clone();
    env.start_worker(&env_pairs(&with(
        &api,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("AGENT_ENV_ALLOW", "CLAUDE_CODE_PROPAGATE_TRACEPARENT"),
            ("CLAUDE_CODE_PROPAGATE_TRACEPARENT", "1"),
        ],
    )));
    let id = env
        .send("tr", "site", "t", "[api:write traced.txt yes] traced")
        .await;
    let events = env.wait_for(&id, "completed", WAIT).await;
    let trace_id = terminal(&events, &id)["traceId"]
        .as_str()
        .expect("the event names its trace")
        .to_owned();
    // The worker flushes its spans when it stops.
    assert_eq!(env.stop_worker(), Some(0));

    let spans: Vec<Value> = api
        .requests()
        .iter()
        .filter(|r| r["path"] == "/v1/traces")
        .flat_map(|r| r["spans"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["traceId"] == trace_id.as_str())
        .collect();
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s["service"] == service && s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {service} span {name} in {spans:#?}"))
    };
    let agent_run = find("edit-worker", "agent run");
    let interaction = find("claude-code", "claude_code.interaction");
    assert_eq!(interaction["parentSpanId"], agent_run["spanId"]);
    let llm = find("claude-code", "claude_code.llm_request");
    assert_eq!(llm["parentSpanId"], interaction["spanId"]);
    find("claude-code", "claude_code.tool");
    // The model requests carried the trace too.
    for turn in api.turns_for("traced") {
        let header = turn["headers"]["traceparent"].as_str().unwrap_or_default();
        assert!(header.contains(&trace_id), "{header} in {trace_id}");
    }
}
