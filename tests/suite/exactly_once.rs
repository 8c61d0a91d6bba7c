//! Issue 11: every request takes effect once, whatever SQS does. One test per scenario of the
//! issue, each against moto, real git and the stand-in agent; where SQS's own misbehaviour is
//! needed (a delete that does not take, a second copy with a new receipt handle) the worker
//! reads its input queue through `tools/sqs-fault-proxy`.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{FaultProxy, Site, TestEnv, git, terminal_for, until};
use serde_json::Value;

/// Send a request that becomes visible only after `delay_secs`: its `SentTimestamp` is now,
/// so it reaches the worker after messages sent later (a reordering standard queues do).
async fn send_delayed(
    env: &TestEnv,
    thread: &str,
    client: &str,
    command: &str,
    delay_secs: i32,
) -> String {
    let body = serde_json::json!({
        "sessionId": "s", "threadId": thread, "clientId": client, "projectId": "site",
        "command": command,
    });
    env.sqs
        .send_message()
        .queue_url(&env.input)
        .message_body(body.to_string())
        .delay_seconds(delay_secs)
        .send()
        .await
        .unwrap()
        .message_id
        .unwrap()
}

fn count(stats: &Value, kind: &str) -> u64 {
    stats["faults"][kind]
        .as_u64()
        .or_else(|| stats[kind].as_u64())
        .unwrap_or(0)
}

fn branch_has_file(upstream: &Path, branch: &str, file: &str) -> bool {
    git(upstream, &["ls-tree", "--name-only", "-r", branch])
        .lines()
        .any(|l| l == file)
}

/// Scenario 1: a coalesced batch looks at each of its messages. Of [applied, new], the new
/// one still runs; of [new, applied], the applied one does not run again.
#[tokio::test(flavor = "multi_thread")]
async fn each_message_of_a_coalesced_batch_is_checked_for_an_earlier_run() {
    let mut env = TestEnv::new("eo-batch").await;
    env.create_bucket(&env.bucket("bea", "site")).await;
    let upstream = env.create_upstream("bea", "site", Site::Tiny);
    env.start_worker(&[]);
    // Four requests sent first, visible only in 4 s; meanwhile a newer slow one runs, so that
    // they queue behind it and start as two batches of two (one per thread).
    let t1 = send_delayed(&env, "t", "bea", "[standin:write t1.txt 1]", 4).await;
    let t2 = send_delayed(&env, "t", "bea", "[standin:write t2.txt 2]", 4).await;
    let u1 = send_delayed(&env, "u", "bea", "[standin:write u1.txt 1]", 4).await;
    let u2 = send_delayed(&env, "u", "bea", "[standin:write u2.txt 2]", 4).await;
    // t1 and u2 "ran already": their commits are on the upstream thread branches, as an earlier
    // delivery that crashed before its delete would have left them.
    let seed = env.dir.path().join("seed");
    git(
        env.dir.path(),
        &[
            "clone",
            "--quiet",
            upstream.to_str().unwrap(),
            seed.to_str().unwrap(),
        ],
    );
    for (thread, id) in [("t", &t1), ("u", &u2)] {
        git(
            &seed,
            &[
                "switch",
                "--quiet",
                "-c",
                &format!("thread-{thread}"),
                "origin/main",
            ],
        );
        git(
            &seed,
            &[
                "commit",
                "--quiet",
                "--allow-empty",
                "-m",
                &format!("Claude: earlier\n\nEdit-Worker-Message: {id}"),
            ],
        );
        git(
            &seed,
            &["push", "--quiet", "origin", &format!("thread-{thread}")],
        );
    }
    let slow = env.send("bea", "site", "x", "[standin:sleep 6]").await;
    let events = env.events_until_terminal(5, common::ONE_MESSAGE).await;
    for id in [&slow, &t1, &t2, &u1, &u2] {
        let ends = terminal_for(&events, id);
        assert_eq!(ends.len(), 1, "{id}: {events:#?}\n{}", env.worker_log());
        assert_eq!(ends[0]["type"], "completed", "{events:#?}");
    }
    // The new ones ran, the applied ones did not run again.
    assert!(branch_has_file(&upstream, "thread-t", "t2.txt"));
    assert!(!branch_has_file(&upstream, "thread-t", "t1.txt"));
    assert!(branch_has_file(&upstream, "thread-u", "u1.txt"));
    assert!(!branch_has_file(&upstream, "thread-u", "u2.txt"));
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenarios 2 and 5: deletes that do not take, and copies handed out again with a new
/// receipt handle. A message that ended is never run again and never gets a second, different
/// terminal event; a held job takes the copy's newer handle, so its delete is not stale.
#[tokio::test(flavor = "multi_thread")]
async fn ended_messages_never_run_again_and_copies_lend_their_handle() {
    let mut env = TestEnv::new("eo-again").await;
    env.create_bucket(&env.bucket("cid", "site")).await;
    let upstream = env.create_upstream("cid", "site", Site::Tiny);
    let queue = env.input.rsplit('/').next().unwrap().to_owned();
    // Every first delete is dropped (answered as a success); every message is handed out a
    // second time within 4 s of its first receive (a random delay). Only these faults: the
    // proxy's other rates are set to nothing. A copy handed out while a delete with the older
    // handle is on its way makes that delete stale whatever the worker does, so each copy is
    // kept away from its message's end (issue 30: with a 1 s delay and a 1 s job that race was
    // lost under load): the second message is sent only once the first's copy was handed out
    // (the first works 30 s until the second interrupts it), and the second works 8 s, past
    // its copy's 4 s at most.
    let proxy = FaultProxy::start(
        env.dir.path(),
        &queue,
        &[
            "--throttle-rate",
            "0",
            "--lost-reply-rate",
            "0",
            "--reorder-rate",
            "0",
            "--drop-delete-rate",
            "1",
            "--max-drops",
            "1",
            "--early-rate",
            "1",
            "--early-delay",
            "4",
        ],
    );
    env.start_worker(&[
        ("AWS_ENDPOINT_URL_SQS", &proxy.url),
        ("VISIBILITY_TIMEOUT_SECONDS", "3"),
    ]);
    let first = env
        .send(
            "cid",
            "site",
            "t",
            "Update the homepage title to \"First\" [standin:sleep 30]",
        )
        .await;
    let mut events = env.wait_for(&first, "started", common::ONE_MESSAGE).await;
    let deadline = Instant::now() + common::STEP;
    while count(&proxy.stats(), "redelivered_early") < 1 {
        assert!(
            Instant::now() < deadline,
            "the first message's copy never came"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = env
        .send(
            "cid",
            "site",
            "t",
            "Update the homepage title to \"Second\" [standin:write second.txt 2] [standin:sleep 8]",
        )
        .await;
    // Each message ends, its first delete is dropped, it comes back and is finished again.
    let deadline = Instant::now() + common::ONE_MESSAGE;
    while [&first, &second]
        .iter()
        .any(|id| terminal_for(&events, id).len() < 2)
    {
        assert!(
            Instant::now() < deadline,
            "{events:#?}\n{}",
            env.worker_log()
        );
        events.extend(env.drain(&env.output, 1).await);
    }
    for id in [&first, &second] {
        let ends: BTreeSet<String> = terminal_for(&events, id)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            ends.len(),
            1,
            "a second, different terminal event for {id}: {ends:#?}"
        );
    }
    assert_eq!(terminal_for(&events, &first)[0]["type"], "interrupted");
    assert_eq!(terminal_for(&events, &second)[0]["type"], "completed");
    // Each request reached the agent once: one `started` per message, and the newer title is
    // live and on the branch.
    for id in [&first, &second] {
        let starts = events
            .iter()
            .filter(|e| e["messageId"] == *id && e["type"] == "started")
            .count();
        assert_eq!(starts, 1, "{id}: {events:#?}");
    }
    let live = env.bucket_contents(&env.bucket("cid", "site")).await;
    assert!(String::from_utf8_lossy(&live["index.html"].1).contains("<title>Second</title>"));
    assert!(
        git(&upstream, &["show", "thread-t:src/pages/index.astro"])
            .contains("<title>Second</title>")
    );
    let stats = proxy.stats();
    assert!(count(&stats, "redelivered_early") >= 1, "{stats}");
    assert!(count(&stats, "delete_dropped") >= 1, "{stats}");
    // The held jobs used the copies' handles: no delete was stale.
    assert_eq!(
        count(&stats, "stale_delete_ignored"),
        0,
        "{stats}\n{}",
        env.worker_log()
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenario 3: a message sent before the running one (late, redelivered, retried) never
/// interrupts it. Of its own thread, it is superseded: reported, never applied on top.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_message_never_interrupts_a_newer_one() {
    let mut env = TestEnv::new("eo-order").await;
    env.create_bucket(&env.bucket("dot", "site")).await;
    let upstream = env.create_upstream("dot", "site", Site::Tiny);
    env.start_worker(&[]);
    let old_same = send_delayed(&env, "t", "dot", "[standin:write old.txt old]", 2).await;
    let old_other = send_delayed(&env, "o", "dot", "[standin:write other.txt other]", 2).await;
    let newer = env
        .send(
            "dot",
            "site",
            "t",
            "[standin:write new.txt new] [standin:sleep 6]",
        )
        .await;
    let events = env.events_until_terminal(3, common::ONE_MESSAGE).await;
    let end = |id: &str| terminal_for(&events, id)[0].clone();
    assert_eq!(
        end(&newer)["type"],
        "completed",
        "{events:#?}\n{}",
        env.worker_log()
    );
    let superseded = end(&old_same);
    assert_eq!(superseded["type"], "interrupted", "{events:#?}");
    assert!(
        superseded["detail"]
            .as_str()
            .unwrap()
            .contains("superseded")
    );
    assert_eq!(end(&old_other)["type"], "completed");
    assert!(branch_has_file(&upstream, "thread-t", "new.txt"));
    assert!(!branch_has_file(&upstream, "thread-t", "old.txt"));
    assert!(branch_has_file(&upstream, "thread-o", "other.txt"));
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenario 4: a burst of 50 into one workspace on a queue that dead-letters after 3
/// receives. Messages over the workspace's share are held, not given back: each ends once.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_over_the_share_burns_no_receives() {
    let mut env = TestEnv::new("eo-burst").await;
    env.create_site("eve", "site", Site::Tiny).await;
    let redrive = env
        .sqs
        .create_queue()
        .queue_name(format!("{}-redrive", env.name))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    env.redrive_input(&redrive, 3).await;
    env.start_worker(&[("MAX_HELD_PER_WORKSPACE", "4")]);
    let bodies: Vec<Value> = (0..50)
        .map(|n| {
            serde_json::json!({
                "sessionId": "s", "threadId": format!("t{}", n % 5), "clientId": "eve",
                "projectId": "site", "command": format!("[standin:write b/{n}.txt {n}] [standin:sleep 1]"),
            })
        })
        .collect();
    let sent = env.send_batch(&bodies).await;
    let events = env
        .events_until_terminal(50, Duration::from_secs(180))
        .await;
    for id in &sent {
        assert_eq!(
            terminal_for(&events, id).len(),
            1,
            "{id}\n{}",
            env.worker_log()
        );
    }
    assert_eq!(env.queue_depth(&redrive).await, 0, "dead-lettered");
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenario 6: work stopped while it waits for a build slot was committed already; it is
/// pushed all the same (nothing new to commit must not mean nothing to push).
#[tokio::test(flavor = "multi_thread")]
async fn work_interrupted_before_its_build_is_pushed() {
    let mut env = TestEnv::new("eo-build").await;
    for client in ["fox", "fog"] {
        env.create_site(client, "site", Site::Tiny).await;
    }
    let upstream = env.upstream("fog", "site");
    // One build slot, held by another workspace's slow build (the fixture's build waits for as
    // many seconds as `slow-build` says).
    env.start_worker(&[("BUILD_CONCURRENCY", "1")]);
    env.send("fox", "site", "s", "[standin:write slow-build 20]")
        .await;
    // The slow build runs, so it holds the one slot: else the other workspace's agent could
    // finish first and take the slot (seen with four tests at once on two cores).
    let fox = env.workspace_root().join("fox/site");
    until(
        "fox's slow build to hold the slot",
        Duration::from_secs(30),
        || {
            common::pids_working_in(&fox).iter().any(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|argv| String::from_utf8_lossy(&argv).contains("build.mjs"))
            })
        },
    )
    .await;
    let waiting = env
        .send("fog", "site", "a", "[standin:write a.txt a]")
        .await;
    let ws = env.workspace_root().join("fog/site");
    until(
        "the agent's commit in the checkout",
        Duration::from_secs(30),
        || {
            ws.join(".git").exists()
                && Command::new("git")
                    .args(["log", "-1", "--format=%B", "thread-a"])
                    .current_dir(&ws)
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&waiting))
        },
    )
    .await;
    env.send("fog", "site", "b", "[standin:write b.txt b]")
        .await;
    let events = env
        .wait_for(&waiting, "interrupted", common::ONE_MESSAGE)
        .await;
    assert_eq!(terminal_for(&events, &waiting).len(), 1, "{events:#?}");
    assert!(
        branch_has_file(&upstream, "thread-a", "a.txt"),
        "interrupted work not pushed"
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenario 7: lock files left by a `kill -9` inside git (HEAD, a branch, a remote branch)
/// do not stop the workspace.
#[tokio::test(flavor = "multi_thread")]
async fn stale_git_locks_are_cleared() {
    let mut env = TestEnv::new("eo-locks").await;
    env.create_bucket(&env.bucket("gil", "site")).await;
    let upstream = env.create_upstream("gil", "site", Site::Tiny);
    env.start_worker(&[]);
    let first = env
        .send("gil", "site", "t", "[standin:write one.txt 1]")
        .await;
    env.wait_for(&first, "completed", common::ONE_MESSAGE).await;
    let git_dir = env.workspace_root().join("gil/site/.git");
    for lock in [
        "HEAD.lock",
        "refs/heads/thread-t.lock",
        "refs/remotes/origin/thread-t.lock",
    ] {
        std::fs::write(git_dir.join(lock), "").unwrap();
    }
    let second = env
        .send("gil", "site", "t", "[standin:write two.txt 2]")
        .await;
    let events = env
        .wait_for(&second, "completed", common::ONE_MESSAGE)
        .await;
    assert_eq!(terminal_for(&events, &second).len(), 1);
    assert!(branch_has_file(&upstream, "thread-t", "two.txt"));
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenario 8: ids that pass the character rules but make no valid ref or bucket name are
/// bad input: rejected at once, not retried as git or S3 failures.
#[tokio::test(flavor = "multi_thread")]
async fn ids_that_make_no_valid_ref_or_bucket_are_rejected() {
    let mut env = TestEnv::new("eo-ids").await;
    env.start_worker(&[("BUCKET_TEMPLATE", "edit.{clientId}.example.com")]);
    let dotted = env.send("hal", "site", "ends-with-dot.", "x").await;
    let long_client = "c".repeat(60);
    let long = env.send(&long_client, "site", "t", "x").await;
    let events = env.events_until_terminal(2, common::ONE_MESSAGE).await;
    for id in [&dotted, &long] {
        let ends = terminal_for(&events, id);
        assert_eq!(ends.len(), 1, "{events:#?}");
        assert_eq!(ends[0]["type"], "rejected");
        assert_eq!(ends[0]["error"]["kind"], "invalid_field");
    }
    assert!(
        terminal_for(&events, &long)[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bucket")
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenario 10: someone else pushed to the thread. Work on both sides merges and the edit
/// goes on; a conflict fails once, with a clear kind.
#[tokio::test(flavor = "multi_thread")]
async fn a_thread_branch_that_diverged_upstream_is_merged_or_fails_clearly() {
    let mut env = TestEnv::new("eo-diverged").await;
    // Two workspaces, so that neither message interrupts the other.
    let mut upstreams = Vec::new();
    for client in ["ivy", "ivo"] {
        env.create_bucket(&env.bucket(client, "site")).await;
        upstreams.push(env.create_upstream(client, "site", Site::Tiny));
    }
    env.start_worker(&[]);
    env.send("ivy", "site", "m", "[standin:write mine.txt 1]")
        .await;
    env.send("ivo", "site", "c", "[standin:write clash.txt worker]")
        .await;
    let first = env.events_until_terminal(2, common::ONE_MESSAGE).await;
    assert_eq!(common::of_type(&first, "completed").len(), 2, "{first:#?}");
    // A person rewrites both thread branches upstream: one touching another file, one the
    // same file differently.
    for (upstream, thread, file, text) in [
        (&upstreams[0], "m", "theirs.txt", "theirs"),
        (&upstreams[1], "c", "clash.txt", "person"),
    ] {
        let seed = env.dir.path().join(format!("person-{thread}"));
        git(
            env.dir.path(),
            &[
                "clone",
                "--quiet",
                upstream.to_str().unwrap(),
                seed.to_str().unwrap(),
            ],
        );
        git(
            &seed,
            &[
                "switch",
                "--quiet",
                "-C",
                &format!("thread-{thread}"),
                "origin/main",
            ],
        );
        std::fs::write(seed.join(file), text).unwrap();
        git(&seed, &["add", file]);
        git(&seed, &["commit", "--quiet", "-m", "by a person"]);
        git(
            &seed,
            &[
                "push",
                "--quiet",
                "--force",
                "origin",
                &format!("thread-{thread}"),
            ],
        );
    }
    let upstream = upstreams[0].clone();
    // The worker's branches hold commits the upstream no longer has: both diverged.
    let merged = env
        .send("ivy", "site", "m", "[standin:write more.txt 2]")
        .await;
    let clash = env
        .send("ivo", "site", "c", "[standin:write clash2.txt 2]")
        .await;
    let events = env.events_until_terminal(2, common::ONE_MESSAGE).await;
    let merged_end = terminal_for(&events, &merged);
    assert_eq!(
        merged_end[0]["type"],
        "completed",
        "{events:#?}\n{}",
        env.worker_log()
    );
    for file in ["mine.txt", "theirs.txt", "more.txt"] {
        assert!(branch_has_file(&upstream, "thread-m", file), "{file}");
    }
    let clash_end = terminal_for(&events, &clash);
    assert_eq!(clash_end.len(), 1);
    assert_eq!(clash_end[0]["type"], "failed", "{events:#?}");
    assert_eq!(clash_end[0]["error"]["kind"], "thread_diverged");
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenario 11: a coalesced batch is one agent run; its cost is reported once, by the first
/// message, and the others name it.
#[tokio::test(flavor = "multi_thread")]
async fn a_coalesced_batch_reports_its_cost_once() {
    let mut env = TestEnv::new("eo-cost").await;
    env.create_site("jay", "site", Site::Tiny).await;
    env.start_worker(&[]);
    let busy = env.send("jay", "site", "x", "[standin:sleep 30]").await;
    env.wait_for(&busy, "started", common::ONE_MESSAGE).await;
    // Three messages of one thread, arriving together behind the busy one: one batch.
    let bodies: Vec<Value> = (0..3)
        .map(|i| {
            serde_json::json!({
                "sessionId": "s", "threadId": "t", "clientId": "jay", "projectId": "site",
                "command": format!("[standin:write c{i}.txt {i}]"),
            })
        })
        .collect();
    let burst = env.send_batch(&bodies).await;
    let events = env.events_until_terminal(4, common::ONE_MESSAGE).await;
    let ends: Vec<&Value> = burst
        .iter()
        .map(|id| terminal_for(&events, id)[0])
        .collect();
    assert!(ends.iter().all(|e| e["type"] == "completed"), "{events:#?}");
    let paying: Vec<_> = ends
        .iter()
        .filter(|e| e["costUsd"].as_f64().unwrap_or(0.0) > 0.0)
        .collect();
    assert_eq!(paying.len(), 1, "{ends:#?}");
    let payer = paying[0]["messageId"].as_str().unwrap();
    for e in ends.iter().filter(|e| e["messageId"] != payer) {
        assert_eq!(e["costUsd"], 0.0);
        assert_eq!(e["costPaidBy"], payer);
    }
    assert_eq!(env.stop_worker(), Some(0));
}

/// Scenario 9: a build that prints invalid UTF-8 and more than a pipe holds, and leaves a
/// detached process holding its output open, still ends, and its message completes.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_build_output_neither_hangs_nor_kills_the_build() {
    let mut env = TestEnv::new("eo-output").await;
    env.create_site("kim", "site", Site::Tiny).await;
    env.start_worker(&[]);
    let id = env
        .send("kim", "site", "t", "[standin:write weird-output yes]")
        .await;
    // The detached process lives 900 s: waiting for its pipe to close would take that long,
    // far past ONE_MESSAGE.
    let events = env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    assert_eq!(terminal_for(&events, &id).len(), 1, "{events:#?}");
    assert_eq!(env.stop_worker(), Some(0));
}
