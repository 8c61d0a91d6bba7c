//! Issue 3: a step actor that panics is restarted by its session, and the message that was in
//! flight is retried and ends with exactly one terminal event. Needs the test-only cargo
//! feature `fault-injection` (scripts/test enables it).

use std::time::Duration;

use crate::common::{self, Site, TestEnv, is_terminal};

#[tokio::test(flavor = "multi_thread")]
async fn every_step_actor_panics_once_and_the_message_still_completes() {
    let mut env = TestEnv::new("faults").await;
    let bucket = env.bucket("lee", "site");
    env.create_bucket(&bucket).await;
    env.create_upstream("lee", "site", Site::Tiny);
    let markers = env.dir.path().join("fault-markers");
    std::fs::create_dir_all(&markers).unwrap();
    // Five faults: within the restart limit (5 a minute), so each is answered by a restart of
    // its actor (a sixth would fail the session instead, and the test would not see which).
    let faults = format!(
        "git.prepare,agent.run,git.commit,build.run,publish.run@{}",
        markers.display()
    );
    env.start_worker(&[
        ("EDIT_WORKER_FAULT", &faults),
        ("RETRY_BASE_SECONDS", "0"),
        ("MAX_RECEIVES", "10"),
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

    // Each fault fired: its marker file was made as it panicked.
    for step in [
        "git.prepare",
        "agent.run",
        "git.commit",
        "build.run",
        "publish.run",
    ] {
        assert!(
            markers.join(format!("fault-{step}")).exists(),
            "fault {step} never fired"
        );
    }
    // Restarts are announced only in the log: read by message and field.
    let restarted: Vec<String> = env
        .log_lines_saying("restarting step actor")
        .iter()
        .filter(|l| common::log_text(l, "workspace").as_deref() == Some("lee/site"))
        .filter_map(|l| common::log_text(l, "step"))
        .collect();
    for kind in ["Git", "Agent", "Build", "Publisher"] {
        assert!(restarted.iter().any(|r| r == kind), "{kind}: {restarted:?}");
    }
    let live = env.bucket_contents(&bucket).await;
    assert!(String::from_utf8_lossy(&live["index.html"].1).contains("<title>Survived</title>"));
    assert_eq!(env.stop_worker(), Some(0));
}
