//! Issue 7: the agent as its users expect: one conversation per thread, cost per message,
//! a failure kind per failure, a watchdog, throttled progress, build repair, a clean
//! environment. Against the stand-in agent, moto and git.

use crate::common::{self, Site, TestEnv, assert_failed_unpublished, git, of_type, terminal};

#[tokio::test(flavor = "multi_thread")]
async fn a_thread_resumes_its_conversation_and_each_message_pays_its_share() {
    let mut env = TestEnv::new("resume").await;
    env.create_site("mia", "site", Site::Tiny).await;
    env.start_worker(&[]);

    let first = env
        .send(
            "mia",
            "site",
            "t",
            "Update the homepage title to \"Bigger\"",
        )
        .await;
    let events = env.wait_for(&first, "completed", common::ONE_MESSAGE).await;
    let one = terminal(&events, &first);
    // One tool use at 0.0125 a turn (the stand-in's price list).
    assert_eq!(one["costUsd"].as_f64(), Some(0.0125), "{one}");

    let second = env
        .send(
            "mia",
            "site",
            "t",
            "[standin:recall] [standin:write a.txt 1] [standin:write b.txt 2]",
        )
        .await;
    let events = env
        .wait_for(&second, "completed", common::ONE_MESSAGE)
        .await;
    let two = terminal(&events, &second);
    // The agent saw the earlier conversation of this thread.
    let result = two["result"].as_str().unwrap();
    assert!(
        result.contains("Update the homepage title to \\\"Bigger\\\""),
        "{result}"
    );
    // Its cost is its own (two turns), not the conversation's running total (three).
    assert_eq!(two["costUsd"].as_f64(), Some(0.025), "{two}");
    assert_eq!(two["agentTurns"].as_u64(), Some(2));

    // Another thread starts another conversation.
    let other = env.send("mia", "site", "u", "[standin:recall]").await;
    let events = env.wait_for(&other, "completed", common::ONE_MESSAGE).await;
    let fresh = terminal(&events, &other);
    assert!(
        fresh["result"]
            .as_str()
            .unwrap()
            .contains("Earlier in this conversation: []"),
        "{fresh}"
    );

    // The thread's record lives under the workspace root, where a restarted worker finds it.
    let record = common::thread_conversation(&env.workspace_root(), "mia", "site", "t");
    assert_eq!(record["totalCostUsd"].as_f64(), Some(0.0375));
    env.stop_worker();
    env.start_worker(&[]);
    let third = env.send("mia", "site", "t", "[standin:recall]").await;
    let events = env.wait_for(&third, "completed", common::ONE_MESSAGE).await;
    let after_restart = terminal(&events, &third);
    assert!(
        after_restart["result"]
            .as_str()
            .unwrap()
            .contains("[standin:recall] [standin:write a.txt 1]")
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// Every way the agent fails has its own kind. The cases whose point is not a time limit run
/// with the default limits; the two that are about a limit each get a worker of their own, with
/// only that limit short, so that a stand-in slow to start on a busy machine cannot end a case
/// by the other limit (issue 30).
#[tokio::test(flavor = "multi_thread")]
async fn each_way_an_agent_fails_has_its_own_kind() {
    failures_end_with_their_kinds(
        "agentfail",
        &[
            ("turns", "[standin:fail error_max_turns]", "agent_max_turns"),
            (
                "budget",
                "[standin:fail error_max_budget_usd]",
                "agent_max_budget",
            ),
            (
                "exec",
                "[standin:fail error_during_execution]",
                "agent_execution_error",
            ),
            (
                "api",
                "Update the homepage title to \"x\" [standin:fail api_error]",
                "agent_api_error",
            ),
            ("noresult", "[standin:no-result]", "agent_no_result"),
        ],
        &[],
    )
    .await;
}

/// An agent that works on past AGENT_TIMEOUT_SECONDS is stopped: `agent_timeout`. It reports a
/// tool use every second, and the silence limit is far past any start-up, so only the
/// wall-clock can end it; the 600 s it would work is far past the 5 s limit.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_past_its_time_limit_is_stopped() {
    failures_end_with_their_kinds(
        "agentslow",
        &[("slow", "[standin:sleep 600]", "agent_timeout")],
        &[
            ("AGENT_TIMEOUT_SECONDS", "5"),
            ("AGENT_SILENCE_SECONDS", "300"),
        ],
    )
    .await;
}

/// An agent that stops writing is stopped by the silence watchdog: `agent_silent`. The
/// stand-in goes silent for 600 s; the wall-clock limit is far past the test.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_stops_writing_is_stopped() {
    failures_end_with_their_kinds(
        "agenthung",
        &[("hung", "[standin:silent 600]", "agent_silent")],
        &[
            ("AGENT_SILENCE_SECONDS", "3"),
            ("AGENT_TIMEOUT_SECONDS", "900"),
        ],
    )
    .await;
}

/// Sends each case's request to a workspace of its own and checks that each ends `failed` with
/// its kind and publishes nothing.
async fn failures_end_with_their_kinds(
    name: &str,
    cases: &[(&str, &str, &str)],
    limits: &[(&str, &str)],
) {
    let mut env = TestEnv::new(name).await;
    for (client, _, _) in cases {
        let client = format!("f-{client}");
        env.create_site(&client, "site", Site::Tiny).await;
    }
    // One delivery each: no retries of passing failures.
    env.start_worker(&[&[("MAX_RECEIVES", "1")], limits].concat());
    let mut ids = Vec::new();
    for (client, command, _) in cases {
        ids.push(env.send(&format!("f-{client}"), "site", "t", command).await);
    }
    let events = env
        .events_until_terminal(cases.len(), common::ONE_MESSAGE)
        .await;
    assert_failed_unpublished(&env, &events, "f-", cases, &ids).await;
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_of_a_chatty_agent_is_throttled_and_numbered() {
    let mut env = TestEnv::new("progress").await;
    env.create_site("ned", "site", Site::Tiny).await;
    env.start_worker(&[("PROGRESS_INTERVAL_SECONDS", "1")]);
    let id = env
        .send(
            "ned",
            "site",
            "t",
            "[standin:chatter 300] [standin:sleep 3] [standin:write done.txt ok]",
        )
        .await;
    let events = env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    let progress = of_type(&events, "progress");
    // 300 tool uses and more in about 3 s, reported at most once a second (plus the last).
    assert!(
        !progress.is_empty() && progress.len() <= 6,
        "{} progress events",
        progress.len()
    );
    let mut sequences: Vec<u64> = progress
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    sequences.sort();
    assert_eq!(sequences, (1..=progress.len() as u64).collect::<Vec<_>>());
    let details: Vec<&str> = progress
        .iter()
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert!(
        details.iter().any(|d| d.contains("more")),
        "summed up: {details:?}"
    );
    assert!(details.iter().any(|d| d.contains("Write")), "{details:?}");
    // No absolute paths of the machine leak into events.
    assert!(
        !details
            .iter()
            .any(|d| d.contains(env.dir.path().to_str().unwrap())),
        "{details:?}"
    );
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_broken_by_the_agent_is_repaired_by_the_resumed_agent() {
    let mut env = TestEnv::new("repair").await;
    let bucket = env.bucket("ola", "site");
    env.create_bucket(&bucket).await;
    let upstream = env.create_upstream("ola", "site", Site::Tiny);
    env.start_worker(&[]);
    let id = env
        .send(
            "ola",
            "site",
            "t",
            "Update the homepage title to \"Mended\" [standin:break-build]",
        )
        .await;
    let events = env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    let done = terminal(&events, &id);
    assert_eq!(done["buildRepairs"].as_u64(), Some(1), "{done}");
    let log = git(&upstream, &["log", "--format=%s", "main..thread-t"]);
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        vec![
            "Claude: Fix the build",
            "Claude: Update the homepage title to \"Mended\" [standin:bre..."
        ],
        "{log}"
    );
    assert!(
        !git(&upstream, &["ls-tree", "-r", "--name-only", "thread-t"]).contains("broken.astro")
    );
    let live = env.bucket_contents(&bucket).await;
    assert!(String::from_utf8_lossy(&live["index.html"].1).contains("<title>Mended</title>"));
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_sees_no_worker_secrets_unless_bedrock_is_configured() {
    let mut env = TestEnv::new("agentenv").await;
    env.create_bucket(&env.bucket("pia", "site")).await;
    let upstream = env.create_upstream("pia", "site", Site::Tiny);
    env.start_worker(&[("ANTHROPIC_API_KEY", "sk-test-not-a-key")]);
    let id = env.send("pia", "site", "plain", "[standin:env]").await;
    env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    let seen = git(&upstream, &["show", "thread-plain:agent-env.txt"]);
    let names: Vec<&str> = seen.lines().collect();
    for secret in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "INPUT_QUEUE_URL",
        "OUTPUT_QUEUE_URL",
    ] {
        assert!(
            !names.contains(&secret),
            "{secret} leaked to the agent: {names:?}"
        );
    }
    for needed in [
        "ANTHROPIC_API_KEY",
        "DISABLE_AUTOUPDATER",
        "PATH",
        "CLAUDE_CONFIG_DIR",
    ] {
        assert!(names.contains(&needed), "{needed} missing: {names:?}");
    }
    env.stop_worker();

    env.start_worker(&[("CLAUDE_CODE_USE_BEDROCK", "1")]);
    let id = env.send("pia", "site", "bedrock", "[standin:env]").await;
    env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    let seen = git(&upstream, &["show", "thread-bedrock:agent-env.txt"]);
    let names: Vec<&str> = seen.lines().collect();
    for needed in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "CLAUDE_CODE_USE_BEDROCK",
    ] {
        assert!(
            names.contains(&needed),
            "{needed} missing with Bedrock: {names:?}"
        );
    }
    assert!(!names.contains(&"INPUT_QUEUE_URL"));
    assert_eq!(env.stop_worker(), Some(0));
}
