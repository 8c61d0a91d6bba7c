//! Issue 3: interrupts, delivery that loses nothing, crash recovery, shutdown, and faults of
//! the parts we depend on (S3, the git remote), against moto, git and real processes.

use crate::common;

use std::time::{Duration, Instant, SystemTime};

use crate::common::{Otlp, Site, TestEnv, git, is_terminal, of_type, terminal_for};

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_message_interrupts_and_the_partial_work_is_pushed() {
    let mut env = TestEnv::new("interrupt").await;
    env.create_bucket(&env.bucket("fay", "site")).await;
    let upstream = env.create_upstream("fay", "site", Site::Tiny);
    let otlp = Otlp::start().await;
    env.start_worker(
        &[
            otlp.worker_env().as_slice(),
            &[("PROGRESS_INTERVAL_SECONDS", "1")],
        ]
        .concat(),
    );

    let started = Instant::now();
    let slow = env
        .send(
            "fay",
            "site",
            "slow",
            "Update the homepage title to \"Partial\" [standin:sleep 600]",
        )
        .await;
    // The agent has made its partial edit: the stand-in reports its Edit after the file is
    // written, and progress events say so (one a second at most here).
    let mut events = env.wait_for_step(&slow, "Edit", common::STEP).await;
    let newer = env
        .send(
            "fay",
            "site",
            "new",
            "Update the homepage title to \"Newer\"",
        )
        .await;
    events.extend(env.events_until_terminal(2, common::ONE_MESSAGE).await);
    let ends_seen = SystemTime::now();

    let slow_end = terminal_for(&events, &slow);
    assert_eq!(slow_end.len(), 1, "{events:#?}\n{}", env.worker_log());
    assert_eq!(slow_end[0]["type"], "interrupted");
    let saved = slow_end[0]["commit"]
        .as_str()
        .expect("saved commit in the event");
    // The partial edit is committed and pushed on the interrupted thread's own branch.
    assert_eq!(git(&upstream, &["rev-parse", "thread-slow"]), saved);
    assert_eq!(
        git(&upstream, &["log", "-1", "--format=%s", "thread-slow"]),
        "Interrupted - saving work"
    );
    assert!(
        git(&upstream, &["show", "thread-slow:src/pages/index.astro"])
            .contains("<title>Partial</title>")
    );

    let newer_end = terminal_for(&events, &newer);
    assert_eq!(newer_end.len(), 1);
    assert_eq!(newer_end[0]["type"], "completed", "{events:#?}");
    // The newer message did not wait for the slow agent: that one would work 600 s, and both
    // ends came well within ONE_MESSAGE of the first send.
    assert!(
        started.elapsed() < common::ONE_MESSAGE,
        "{:?}",
        started.elapsed()
    );
    let live = env.bucket_contents(&env.bucket("fay", "site")).await;
    assert!(String::from_utf8_lossy(&live["index.html"].1).contains("<title>Newer</title>"));
    // The interrupt's latency is measured: the worker's histogram of stop request to work
    // stopped, recorded before the interrupted work was saved and its event sent.
    let metrics = otlp.metrics_since(ends_seen, Duration::from_secs(30)).await;
    let latency = metrics.histogram(
        "edit_worker.interrupt.latency",
        &[("reason", "interrupted")],
    );
    assert_eq!(latency.count, 1, "{metrics}");
    assert_eq!(env.queue_depth(&env.input).await, 0);
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_in_one_thread_is_one_interrupt_and_one_agent_run() {
    let mut env = TestEnv::new("burst").await;
    env.create_bucket(&env.bucket("gus", "site")).await;
    let upstream = env.create_upstream("gus", "site", Site::Tiny);
    env.start_worker(&[("PROGRESS_INTERVAL_SECONDS", "1")]);

    let running = env
        .send(
            "gus",
            "site",
            "a",
            "[standin:write a.txt a] [standin:sleep 30]",
        )
        .await;
    // Its agent is at work: it has written a.txt (a progress event names the Write). Its
    // `started` event alone would not say so: that is sent before the agent starts.
    let mut events = env.wait_for_step(&running, "Write", common::STEP).await;
    // Four messages of another thread, arriving together.
    let entries: Vec<_> = (1..=4)
        .map(|i| {
            aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                .id(format!("m{i}"))
                .message_body(
                    serde_json::json!({
                        "sessionId": "s", "threadId": "b", "clientId": "gus", "projectId": "site",
                        "command": format!("[standin:write burst-{i}.txt part {i}]"),
                    })
                    .to_string(),
                )
                .build()
                .unwrap()
        })
        .collect();
    let sent = env
        .sqs
        .send_message_batch()
        .queue_url(&env.input)
        .set_entries(Some(entries))
        .send()
        .await
        .unwrap();
    let burst: Vec<String> = sent
        .successful()
        .iter()
        .map(|s| s.message_id().to_owned())
        .collect();
    assert_eq!(burst.len(), 4);

    events.extend(env.events_until_terminal(5, common::ONE_MESSAGE).await);
    assert_eq!(
        events.iter().filter(|e| is_terminal(e)).count(),
        5,
        "{events:#?}\n{}",
        env.worker_log()
    );
    assert_eq!(of_type(&events, "interrupted").len(), 1);
    let completed = of_type(&events, "completed");
    assert_eq!(completed.len(), 4, "{events:#?}");
    // One agent run for all four: one commit, carrying each message's trailer.
    let commits: std::collections::BTreeSet<_> =
        completed.iter().map(|e| e["commit"].to_string()).collect();
    assert_eq!(commits.len(), 1, "{completed:#?}");
    let log = git(&upstream, &["log", "--format=%s", "main..thread-b"]);
    assert_eq!(log.lines().count(), 1, "{log}");
    let message = git(&upstream, &["log", "-1", "--format=%B", "thread-b"]);
    for id in &burst {
        assert!(
            message.contains(&format!("Edit-Worker-Message: {id}")),
            "{message}"
        );
    }
    let tree = git(&upstream, &["ls-tree", "--name-only", "thread-b"]);
    for i in 1..=4 {
        assert!(tree.contains(&format!("burst-{i}.txt")), "{tree}");
    }
    // A `started` event per message, and the agent ran twice in all (its call log): the
    // interrupted run and the coalesced one.
    assert_eq!(common::started_ids(&events).len(), 5, "{events:#?}");
    let runs = env.agent_runs();
    assert_eq!(runs.len(), 2, "agent runs: {runs:#?}");
    assert!(runs[0]["prompt"].as_str().unwrap().contains("a.txt"));
    for i in 1..=4 {
        let burst = format!("burst-{i}.txt");
        assert!(
            runs[1]["prompt"].as_str().unwrap().contains(&burst),
            "{burst} not in the coalesced run: {runs:#?}"
        );
    }
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_run_is_recovered_by_the_next_one() {
    let mut env = TestEnv::new("crash").await;
    env.create_bucket(&env.bucket("hal", "site")).await;
    let upstream = env.create_upstream("hal", "site", Site::Tiny);
    let fast_redelivery = [
        ("VISIBILITY_TIMEOUT_SECONDS", "3"),
        ("PROGRESS_INTERVAL_SECONDS", "1"),
    ];
    env.start_worker(&fast_redelivery);

    let id = env
        .send(
            "hal",
            "site",
            "t",
            "Update the homepage title to \"After crash\" [standin:sleep 5]",
        )
        .await;
    // Mid-run: the agent has made its edit and works on.
    env.wait_for_step(&id, "Edit", common::STEP).await;
    common::nix_kill(env.worker_pid().unwrap(), "KILL").unwrap();
    assert_eq!(
        env.wait_worker(Duration::from_secs(10)),
        None,
        "killed by a signal: no exit code"
    );
    // The crash left uncommitted agent changes; add the stale lock a crash inside git leaves.
    let ws = env.workspace_root().join("hal/site");
    assert!(
        !git(&ws, &["status", "--porcelain"]).is_empty(),
        "agent changes were uncommitted"
    );
    std::fs::write(ws.join(".git/index.lock"), "").unwrap();

    env.start_worker(&fast_redelivery);
    let events = env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    assert_eq!(terminal_for(&events, &id).len(), 1, "{events:#?}");
    let branch_files = git(&upstream, &["show", "thread-t:src/pages/index.astro"]);
    assert!(branch_files.contains("<title>After crash</title>"));
    // Nothing committed twice: the edit appears in exactly one commit of the branch.
    let touching = git(
        &upstream,
        &[
            "log",
            "--format=%H",
            "main..thread-t",
            "--",
            "src/pages/index.astro",
        ],
    );
    assert_eq!(touching.lines().count(), 1, "{touching}");
    git(&ws, &["fsck", "--strict", "--no-progress"]);
    git(&upstream, &["fsck", "--strict", "--no-progress"]);
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");
    let live = env.bucket_contents(&env.bucket("hal", "site")).await;
    assert!(String::from_utf8_lossy(&live["index.html"].1).contains("<title>After crash</title>"));
    // The retry continues the cut-off run's conversation: its file was left here under the id
    // the thread's names decide (nothing in the records named it: the run never ended).
    let runs = env.agent_runs();
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(runs[1]["resumed"], true, "{runs:#?}");
    assert_eq!(runs[1]["sessionId"], runs[0]["sessionId"], "{runs:#?}");
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_saves_running_work_and_releases_the_message() {
    let mut env = TestEnv::new("sigterm").await;
    env.create_bucket(&env.bucket("ida", "site")).await;
    let upstream = env.create_upstream("ida", "site", Site::Tiny);
    // The deadline bounds saving the work (commit and push); 120 s is far past what that
    // takes on a busy machine, and far short of the agent's 600 s, which it must not wait for.
    env.start_worker(&[
        ("SHUTDOWN_DEADLINE_SECONDS", "120"),
        ("PROGRESS_INTERVAL_SECONDS", "1"),
    ]);

    let id = env
        .send(
            "ida",
            "site",
            "t",
            "Update the homepage title to \"Half done\" [standin:sleep 600]",
        )
        .await;
    // Mid-run: the agent has made its edit and works on.
    let mut events = env.wait_for_step(&id, "Edit", common::STEP).await;
    let asked = Instant::now();
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
    assert!(
        asked.elapsed() < Duration::from_secs(120),
        "{:?}",
        asked.elapsed()
    );

    // Saved and pushed, and no terminal event: the message is not finished.
    assert_eq!(
        git(&upstream, &["log", "-1", "--format=%s", "thread-t"]),
        "Interrupted - saving work"
    );
    assert!(git(&upstream, &["show", "thread-t:src/pages/index.astro"]).contains("Half done"));
    // Every event the worker sent, drained until the queue is empty (the worker has exited, so
    // no more come; issue 28: one receive of at most ten was read), and none of them terminal.
    loop {
        let more = env.drain(&env.output, 1).await;
        if more.is_empty() {
            break;
        }
        events.extend(more);
    }
    assert!(
        events
            .iter()
            .any(|e| e["messageId"] == id.as_str() && e["type"] == "started"),
        "{events:#?}"
    );
    assert!(terminal_for(&events, &id).is_empty(), "{events:#?}");
    // The message is visible again at once, for the next worker.
    let again = env
        .sqs
        .receive_message()
        .queue_url(&env.input)
        .wait_time_seconds(2)
        .send()
        .await
        .unwrap();
    let messages = again.messages();
    assert_eq!(messages.len(), 1, "{}", env.worker_log());
    assert_eq!(messages[0].message_id(), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_completes_once_s3_is_back() {
    let mut env = TestEnv::new("s3down").await;
    let bucket = env.create_site("jo", "site", Site::Tiny).await;
    // S3 (only S3) is unreachable for the first 10 seconds.
    let proxy = common::flaky_proxy(common::endpoint(), Duration::from_secs(10)).await;
    env.start_worker(&[
        ("AWS_ENDPOINT_URL_S3", &proxy),
        ("RETRY_BASE_SECONDS", "1"),
        ("MAX_RECEIVES", "8"),
    ]);
    let started = Instant::now();
    let id = env
        .send("jo", "site", "t", "Update the homepage title to \"Back\"")
        .await;
    let events = env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    assert!(started.elapsed() >= Duration::from_secs(10));
    assert_eq!(terminal_for(&events, &id).len(), 1, "{events:#?}");
    // A passing failure: the message was delivered again.
    assert!(
        common::deliveries_of(&events, &id) >= 2,
        "one delivery only: {events:#?}"
    );
    // The agent ran once (its call log): later deliveries found its commit and went straight
    // to publishing.
    let runs = env.agent_runs();
    assert_eq!(runs.len(), 1, "agent runs: {runs:#?}");
    let upstream = env.upstream("jo", "site");
    let edits = git(&upstream, &["log", "--format=%H", "main..thread-t"]);
    assert_eq!(
        edits.lines().count(),
        1,
        "one agent commit for all deliveries: {edits}"
    );
    let live = env.bucket_contents(&bucket).await;
    assert!(String::from_utf8_lossy(&live["index.html"].1).contains("<title>Back</title>"));
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_to_a_remote_that_was_away_is_retried() {
    let mut env = TestEnv::new("gitdown").await;
    env.create_bucket(&env.bucket("kit", "site")).await;
    let upstream = env.create_upstream("kit", "site", Site::Tiny);
    let otlp = Otlp::start().await;
    env.start_worker(
        &[
            otlp.worker_env().as_slice(),
            &[("RETRY_BASE_SECONDS", "1"), ("PUSH_ATTEMPTS", "3")],
        ]
        .concat(),
    );
    let first = env
        .send("kit", "site", "t", "[standin:write first.txt 1]")
        .await;
    env.wait_for(&first, "completed", common::ONE_MESSAGE).await;

    // The remote disappears; the next edit is made on the local checkout meanwhile.
    let away = upstream.with_extension("away");
    std::fs::rename(&upstream, &away).unwrap();
    let second = env
        .send(
            "kit",
            "site",
            "t",
            "Update the homepage title to \"Offline edit\"",
        )
        .await;
    // The remote comes back once a delivery has failed: the next one has started.
    let mut events = env
        .wait_until_all(
            "a second delivery of the offline edit",
            common::ONE_MESSAGE,
            |events| common::deliveries_of(events, &second) >= 2,
        )
        .await;
    // The failed delivery tried its push PUSH_ATTEMPTS times: two retries were counted (issue
    // 28: no test showed this counter above zero, so a wrongly named one would go unnoticed).
    otlp.wait_for_metrics("two push retries counted", common::STEP, |m| {
        m.value("edit_worker.push.retries", &[]) >= 2
    })
    .await;
    // That delivery made the edit and committed it in the checkout; only the push failed.
    let ws = env.workspace_root().join("kit/site");
    let trailer = format!("Edit-Worker-Message: {second}");
    assert!(
        git(&ws, &["log", "--format=%B", "main..thread-t"]).contains(&trailer),
        "the edit is committed locally"
    );
    assert!(
        !git(&away, &["log", "--format=%B", "thread-t"]).contains(&trailer),
        "nothing reached the remote while it was away"
    );
    std::fs::rename(&away, &upstream).unwrap();
    events.extend(
        env.wait_for(&second, "completed", common::ONE_MESSAGE)
            .await,
    );
    assert_eq!(terminal_for(&events, &second).len(), 1);
    assert!(git(&upstream, &["show", "thread-t:src/pages/index.astro"]).contains("Offline edit"));
    assert_eq!(env.stop_worker(), Some(0));
}
