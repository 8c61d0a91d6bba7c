//! Issue 3: a step actor that panics is restarted by its session, at most five times a minute
//! (`RestartPolicy::default`); one failure more and the session fails instead, the supervisor
//! forgets it, and the message's next delivery starts a fresh session. Either way the message
//! ends with exactly one terminal event. Needs the test-only cargo feature `fault-injection`
//! (scripts/test enables it).
//!
//! Each fault fires once (its marker file appears). Restarts and failed sessions are announced
//! only in the worker's log (no status event is about actors), so the tests read its JSON lines
//! by message and field.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Site, TestEnv, is_terminal, log_message, log_text};

/// Step restarts a session allows within a minute.
const RESTART_LIMIT: usize = 5;

const WORKSPACE: &str = "lee/site";

/// A worker whose step actors panic once at each of `faults`, and one message for it: the
/// world, the message id, its status events up to its completion, and the marker folder.
async fn run_with_faults(name: &str, faults: &[&str]) -> (TestEnv, String, Vec<Value>, PathBuf) {
    let mut env = TestEnv::new(name).await;
    let bucket = env.bucket("lee", "site");
    env.create_bucket(&bucket).await;
    env.create_upstream("lee", "site", Site::Tiny);
    let markers = env.dir.path().join("fault-markers");
    std::fs::create_dir_all(&markers).unwrap();
    let spec = format!("{}@{}", faults.join(","), markers.display());
    env.start_worker(&[
        ("EDIT_WORKER_FAULT", &spec),
        ("RETRY_BASE_SECONDS", "0"),
        // A delivery that finds a step still waiting out its restart's backoff fails again
        // at once: room for those on top of one delivery per fault.
        ("MAX_RECEIVES", "40"),
    ]);
    let id = env
        .send(
            "lee",
            "site",
            "t",
            "Update the homepage title to \"Survived\"",
        )
        .await;
    let events = env
        .wait_for(&id, "completed", Duration::from_secs(120))
        .await;
    let terminal: Vec<_> = events.iter().filter(|e| is_terminal(e)).collect();
    assert_eq!(terminal.len(), 1, "{events:#?}");
    for step in faults {
        assert!(
            markers.join(format!("fault-{step}")).exists(),
            "fault {step} never fired"
        );
    }
    let live = env.bucket_contents(&bucket).await;
    assert!(String::from_utf8_lossy(&live["index.html"].1).contains("<title>Survived</title>"));
    (env, id, events, markers)
}

/// The workspace's log lines saying `message`, in order.
fn lines(env: &TestEnv, message: &str) -> Vec<Value> {
    env.log_lines()
        .into_iter()
        .filter(|l| {
            log_message(l) == message && log_text(l, "workspace").as_deref() == Some(WORKSPACE)
        })
        .collect()
}

/// The `step` field of each line, sorted.
fn steps(lines: &[Value]) -> Vec<String> {
    let mut steps: Vec<String> = lines
        .iter()
        .map(|l| log_text(l, "step").unwrap_or_default())
        .collect();
    steps.sort();
    steps
}

/// As many faults as the limit allows: each is answered by a restart of its actor, the session
/// lives on, and the message completes.
#[tokio::test(flavor = "multi_thread")]
async fn faults_within_the_restart_limit_are_each_answered_by_a_restart() {
    let faults = [
        "git.prepare",
        "agent.run",
        "git.commit",
        "build.run",
        "publish.run",
    ];
    assert_eq!(faults.len(), RESTART_LIMIT);
    let (mut env, _, _, _) = run_with_faults("faults", &faults).await;

    let failed = lines(&env, "step actor failed");
    let restarted = lines(&env, "restarting step actor");
    let expected = ["Agent", "Build", "Git", "Git", "Publisher"];
    assert_eq!(steps(&failed), expected, "{failed:#?}");
    // The message's last delivery needed every step, so every crashed actor was back by then.
    assert_eq!(steps(&restarted), expected, "{restarted:#?}");
    let session_failed = lines(&env, "session failed; the next message starts a new one");
    assert!(session_failed.is_empty(), "{session_failed:#?}");
    assert_eq!(env.stop_worker(), Some(0));
}

/// One fault past the limit: the session does not restart the sixth but fails; the supervisor
/// forgets it, and the message's next delivery is served by a fresh session (its faults have
/// fired), which completes it. One failed session is within the supervisor's own limit: the
/// worker goes on and exits cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn a_fault_past_the_restart_limit_fails_the_session_and_a_fresh_one_completes() {
    let faults = [
        "git.prepare",
        "agent.run",
        "git.commit",
        "build.run",
        "publish.run",
        "git.push",
    ];
    assert_eq!(faults.len(), RESTART_LIMIT + 1);
    let (mut env, _, _, _) = run_with_faults("faults-past", &faults).await;

    let failed = lines(&env, "step actor failed");
    assert_eq!(
        steps(&failed),
        ["Agent", "Build", "Git", "Git", "Git", "Publisher"],
        "{failed:#?}"
    );
    // The session failed exactly once, at its sixth step failure, not before.
    let log = env.log_lines();
    let ours = |l: &Value, message: &str| {
        log_message(l) == message && log_text(l, "workspace").as_deref() == Some(WORKSPACE)
    };
    let session_failed: Vec<usize> = (0..log.len())
        .filter(|&i| ours(&log[i], "session failed; the next message starts a new one"))
        .collect();
    assert_eq!(session_failed.len(), 1, "{log:#?}");
    let failures_before = log[..session_failed[0]]
        .iter()
        .filter(|l| ours(l, "step actor failed"))
        .count();
    assert_eq!(failures_before, RESTART_LIMIT + 1, "{failed:#?}");
    // No more restarts than the limit (one whose backoff had not run out when the session
    // failed is not made at all).
    let restarted = lines(&env, "restarting step actor");
    assert!(restarted.len() <= RESTART_LIMIT, "{restarted:#?}");
    assert!(
        env.worker_running(),
        "one failed session does not end the worker"
    );
    assert_eq!(env.stop_worker(), Some(0));
}
