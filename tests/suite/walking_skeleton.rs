//! Issue 2: one SQS message becomes a pushed commit and a live edit site in S3, against real
//! parts: moto (SQS, S3), git with a bare upstream, the sample sites and the stand-in agent.

use crate::common;

use std::time::{Duration, Instant};

use crate::common::{Site, TestEnv, files_under, git, of_type};

const EXAMPLE_COMMAND: &str =
    "Update the homepage title to \"Amelia Stamps - Handcrafted with Love\"";

#[tokio::test(flavor = "multi_thread")]
async fn contract_example_becomes_a_pushed_commit_and_a_live_site() {
    let mut env = TestEnv::new("example").await;
    // The contract's own bucket name: no other test uses it.
    let bucket = "edit.amelia.webordinary.com";
    env.create_bucket(bucket).await;
    let upstream = env.create_upstream("amelia", "stamps", Site::Astro);
    env.start_worker(&[("BUCKET_TEMPLATE", "edit.{clientId}.webordinary.com")]);
    let body = serde_json::json!({
        "sessionId": "test-session-123",
        "threadId": "test-thread-456",
        "clientId": "amelia",
        "projectId": "stamps",
        "command": EXAMPLE_COMMAND,
    });
    let message_id = env.send_raw(&body.to_string()).await;
    let events = env.events_until_terminal(1, Duration::from_secs(240)).await;
    let completed = of_type(&events, "completed");
    assert_eq!(
        completed.len(),
        1,
        "events: {events:#?}\nlog:\n{}",
        env.worker_log()
    );
    let done = completed[0];
    assert_eq!(done["messageId"], message_id.as_str());
    assert_eq!(done["branch"], "thread-test-thread-456");
    assert_eq!(done["bucket"], bucket);
    assert_eq!(
        done["previewUrl"],
        "http://edit.amelia.webordinary.com.s3-website-us-east-1.amazonaws.com/"
    );
    for phase in [
        "prepare", "agent", "commit", "install", "build", "publish", "push", "total",
    ] {
        assert!(
            done["durationsMs"][phase].is_u64(),
            "phase {phase} missing: {done}"
        );
    }
    assert_eq!(of_type(&events, "started").len(), 1);

    // The upstream has the branch, with the agent's commit on top.
    let tip = git(
        &upstream,
        &["rev-parse", "refs/heads/thread-test-thread-456"],
    );
    assert_eq!(done["commit"], tip.as_str());
    let subject = git(&upstream, &["log", "-1", "--format=%s", &tip]);
    assert_eq!(
        subject,
        "Claude: Update the homepage title to \"Amelia Stamps - Hand..."
    );
    let body = git(&upstream, &["log", "-1", "--format=%b", &tip]);
    assert!(
        body.contains(EXAMPLE_COMMAND),
        "full command in the body: {body}"
    );
    assert!(body.contains(&format!("Edit-Worker-Message: {message_id}")));
    let changed = git(
        &upstream,
        &["diff", "--name-only", &format!("{tip}~1"), &tip],
    );
    assert_eq!(changed, "src/pages/index.astro");

    // The bucket holds exactly the build, with the new title and HTML typed as HTML.
    let workspace = env.workspace_root().join("amelia/stamps");
    let dist = files_under(&workspace.join("dist"));
    let objects = env.bucket_contents(bucket).await;
    // Besides the worker's own records (`.edit-worker/`: the bucket's owner).
    let site: Vec<String> = objects
        .keys()
        .filter(|k| !k.starts_with(".edit-worker/"))
        .cloned()
        .collect();
    assert_eq!(site, dist);
    let (content_type, index) = &objects["index.html"];
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let index = String::from_utf8_lossy(index);
    assert!(
        index.contains("<title>Amelia Stamps - Handcrafted with Love</title>"),
        "{index}"
    );
    assert_eq!(
        done["publish"]["uploaded"].as_u64().unwrap() as usize,
        dist.len(),
        "{done}"
    );

    // The input queue is empty; the status queue held exactly one terminal event.
    assert_eq!(env.queue_depth(&env.input).await, 0);
    assert_eq!(events.iter().filter(|e| common::is_terminal(e)).count(), 1);
    assert_eq!(
        env.stop_worker(),
        Some(0),
        "graceful exit:\n{}",
        env.worker_log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn threads_switch_cleanly_and_clients_run_concurrently() {
    let mut env = TestEnv::new("threads").await;
    env.create_bucket(&env.bucket("bob", "site")).await;
    env.create_bucket(&env.bucket("carol", "site")).await;
    let bob = env.create_upstream("bob", "site", Site::Tiny);
    let carol = env.create_upstream("carol", "site", Site::Tiny);
    env.start_worker(&[]);

    // First thread of bob's workspace.
    env.send(
        "bob",
        "site",
        "one",
        "Update the homepage title to \"One\" [standin:write one.txt first thread]",
    )
    .await;
    let first = env.events_until_terminal(1, common::ONE_MESSAGE).await;
    assert_eq!(
        of_type(&first, "completed").len(),
        1,
        "{first:#?}\n{}",
        env.worker_log()
    );

    // A second thread of the same workspace, and at the same time another client's message:
    // both take two seconds of agent time, so running them one after the other would show.
    let started = Instant::now();
    env.send(
        "bob",
        "site",
        "two",
        "[standin:write two.txt second thread] [standin:sleep 2]",
    )
    .await;
    env.send(
        "carol",
        "site",
        "c1",
        "Update the homepage title to \"Carol\" [standin:sleep 2]",
    )
    .await;
    let events = env.events_until_terminal(2, common::ONE_MESSAGE).await;
    let done = of_type(&events, "completed");
    assert_eq!(done.len(), 2, "{events:#?}\n{}", env.worker_log());
    let elapsed = started.elapsed();

    // Served concurrently: each started before the other completed.
    let at = |kind: &str, client: &str| {
        events
            .iter()
            .find(|e| e["type"] == kind && e["clientId"] == client)
            .map(|e| e["at"].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert!(at("started", "bob") < at("completed", "carol"));
    assert!(at("started", "carol") < at("completed", "bob"));
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");

    // Each thread's branch holds its own work only; main is untouched.
    let files = |branch: &str| git(&bob, &["ls-tree", "-r", "--name-only", branch]);
    assert!(files("thread-one").contains("one.txt"));
    assert!(!files("thread-one").contains("two.txt"));
    assert!(files("thread-two").contains("two.txt"));
    assert!(!files("thread-two").contains("one.txt"));
    assert!(!files("main").contains("one.txt"));
    // Thread two started from main, not from thread one.
    let two_title = git(&bob, &["show", "thread-two:src/pages/index.astro"]);
    assert!(
        two_title.contains("<title>Amelia Stamps</title>"),
        "{two_title}"
    );
    // The workspace is clean and on the last thread.
    let ws = env.workspace_root().join("bob/site");
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");
    assert_eq!(git(&ws, &["branch", "--show-current"]), "thread-two");
    assert!(git(&carol, &["log", "-1", "--format=%s", "thread-c1"]).starts_with("Claude: "));

    // Carol's bucket has her title; bob's has thread two's build.
    let carol_site = env.bucket_contents(&env.bucket("carol", "site")).await;
    assert!(String::from_utf8_lossy(&carol_site["index.html"].1).contains("<title>Carol</title>"));
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_and_the_worker_keeps_serving() {
    let mut env = TestEnv::new("badinput").await;
    env.create_site("dora", "site", Site::Tiny).await;
    env.start_worker(&[]);

    let valid = |field: &str, value: serde_json::Value| {
        let mut v = serde_json::json!({
            "sessionId": "s1", "threadId": "t1", "clientId": "dora", "projectId": "site",
            "command": "Update the homepage title to \"x\"",
        });
        if value.is_null() {
            v.as_object_mut().unwrap().remove(field);
        } else {
            v[field] = value;
        }
        v.to_string()
    };
    let bad = [
        ("{not json".to_owned(), "malformed_message"),
        (valid("threadId", serde_json::Value::Null), "missing_field"),
        (valid("clientId", "../bob".into()), "invalid_field"),
        (valid("threadId", "a..b".into()), "invalid_field"),
        (valid("threadId", "-x".into()), "invalid_field"),
        // 1 MiB in all: SQS's own upper limit for a message.
        (
            valid("command", "x".repeat(1024 * 1024 - 200).into()),
            "command_too_large",
        ),
    ];
    let mut ids = Vec::new();
    for (body, _) in &bad {
        ids.push(env.send_raw(body).await);
    }
    // Shell text is just text: run verbatim, nothing executed.
    let pwned = env.dir.path().join("pwned");
    let shelly = format!(
        "Update the homepage title to \"; touch {}; \" $(id) `id` && touch {}",
        pwned.display(),
        pwned.display()
    );
    let shelly_id = env.send("dora", "site", "t2", &shelly).await;

    let events = env
        .events_until_terminal(bad.len() + 1, common::ONE_MESSAGE)
        .await;
    for ((_, kind), id) in bad.iter().zip(&ids) {
        let event = events
            .iter()
            .find(|e| e["messageId"] == id.as_str())
            .unwrap_or_else(|| panic!("no event for {kind}: {events:#?}\n{}", env.worker_log()));
        assert_eq!(event["type"], "rejected", "{event}");
        assert_eq!(event["error"]["kind"], *kind, "{event}");
        assert!(!event["error"]["message"].as_str().unwrap().is_empty());
    }
    // The invalid client id is not echoed back as if it were valid.
    let bob = events
        .iter()
        .find(|e| e["messageId"] == ids[2].as_str())
        .unwrap();
    assert!(bob.get("clientId").is_none(), "{bob}");

    let ok = events
        .iter()
        .find(|e| e["messageId"] == shelly_id.as_str() && common::is_terminal(e))
        .unwrap();
    assert_eq!(ok["type"], "completed", "{ok}\n{}", env.worker_log());
    assert!(!pwned.exists(), "a shell ran the command");
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    let upstream = env.upstream("dora", "site");
    let message = git(&upstream, &["log", "-1", "--format=%B", "thread-t2"]);
    assert!(
        message.contains(&shelly),
        "command kept verbatim: {message}"
    );

    // Rejected messages are kept in the dead-letter queue and gone from the input queue.
    let mut kept = Vec::new();
    for _ in 0..10 {
        kept.extend(env.drain(&env.dlq, 1).await);
        if kept.len() >= bad.len() {
            break;
        }
    }
    assert_eq!(kept.len(), bad.len(), "{kept:?}");
    assert_eq!(env.queue_depth(&env.input).await, 0);
    // Nothing was written outside the workspace root: only dora's workspace exists, beside the
    // worker's own `.records` (message outcomes and threads' documents, conversations included).
    let mut roots: Vec<_> = std::fs::read_dir(env.workspace_root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    roots.sort();
    assert_eq!(roots, vec![".records", "dora"]);
    assert!(!env.dir.path().join("bob").exists());
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_build_and_agent_error_fail_and_publish_nothing() {
    let mut env = TestEnv::new("failures").await;
    let bucket = env.bucket("erin", "site");
    env.create_bucket(&bucket).await;
    let upstream = env.create_upstream("erin", "site", Site::Tiny);
    // No repair attempt and no retry of the API error (a passing failure): this test is about
    // the failures themselves; repairs and retries are tested apart.
    env.start_worker(&[("BUILD_REPAIR_ATTEMPTS", "0"), ("MAX_RECEIVES", "1")]);

    let broken = env.send("erin", "site", "b", "[standin:break-build]").await;
    let first = env.events_until_terminal(1, common::ONE_MESSAGE).await;
    let api = env
        .send(
            "erin",
            "site",
            "a",
            "Update the homepage title to \"x\" [standin:fail api_error]",
        )
        .await;
    let second = env.events_until_terminal(1, common::ONE_MESSAGE).await;
    let events: Vec<_> = first.into_iter().chain(second).collect();

    let failed = |id: &str| {
        events
            .iter()
            .find(|e| e["messageId"] == id && e["type"] == "failed")
            .unwrap_or_else(|| {
                panic!(
                    "no failed event for {id}: {events:#?}\n{}",
                    env.worker_log()
                )
            })
            .clone()
    };
    let build = failed(&broken);
    assert_eq!(build["error"]["kind"], "build_failed");
    let log_tail = build["error"]["message"].as_str().unwrap();
    assert!(
        log_tail.contains("broken.astro"),
        "build log tail: {log_tail}"
    );
    // The agent's work was committed and pushed even though the build failed: nothing lost.
    assert!(git(&upstream, &["ls-tree", "-r", "--name-only", "thread-b"]).contains("broken.astro"));

    let agent = failed(&api);
    assert_eq!(agent["error"]["kind"], "agent_api_error");
    // Nothing was published for either.
    assert!(env.bucket_contents(&bucket).await.is_empty());
    assert!(of_type(&events, "completed").is_empty());
    assert_eq!(env.queue_depth(&env.input).await, 0);
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn work_pushed_to_the_thread_elsewhere_is_built_on() {
    let mut env = TestEnv::new("elsewhere").await;
    let bucket = env.bucket("dana", "site");
    env.create_bucket(&bucket).await;
    let upstream = env.create_upstream("dana", "site", Site::Tiny);
    env.start_worker(&[]);
    let first = env
        .send("dana", "site", "t", "[standin:write public/mine-1.txt one]")
        .await;
    env.wait_for(&first, "completed", common::ONE_MESSAGE).await;

    // Someone else (another container, a person) pushes to the thread's branch meanwhile.
    let elsewhere = env.dir.path().join("elsewhere");
    git(
        env.dir.path(),
        &[
            "clone",
            "--quiet",
            "--branch",
            "thread-t",
            upstream.to_str().unwrap(),
            elsewhere.to_str().unwrap(),
        ],
    );
    std::fs::write(elsewhere.join("public/elsewhere.txt"), "from elsewhere").unwrap();
    git(&elsewhere, &["add", "-A"]);
    git(
        &elsewhere,
        &["commit", "--quiet", "-m", "An edit made elsewhere"],
    );
    git(&elsewhere, &["push", "--quiet", "origin", "thread-t"]);

    let second = env
        .send("dana", "site", "t", "[standin:write public/mine-2.txt two]")
        .await;
    let events = env
        .wait_for(&second, "completed", common::ONE_MESSAGE)
        .await;
    // The second edit was made on top of the other one: the push was a fast-forward, and the
    // published site has both.
    let files = git(&upstream, &["ls-tree", "-r", "--name-only", "thread-t"]);
    for file in [
        "public/mine-1.txt",
        "public/elsewhere.txt",
        "public/mine-2.txt",
    ] {
        assert!(files.contains(file), "{file}: {files}\n{events:#?}");
    }
    let subjects = git(&upstream, &["log", "--format=%s", "thread-t"]);
    assert!(subjects.contains("An edit made elsewhere"), "{subjects}");
    let live = env.bucket_contents(&bucket).await;
    assert!(
        live.contains_key("elsewhere.txt") && live.contains_key("mine-2.txt"),
        "{:?}",
        live.keys()
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// `npm run build` of a plain package script runs the script directly (npm's start-up is half
/// a second of every build), with what npm would give it: the package's `node_modules/.bin`
/// first on `PATH` and npm's lifecycle variables. With `BUILD_SCRIPTS_WITHOUT_NPM=false`, npm
/// runs it.
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_build_script_runs_without_npm_unless_told_to_use_npm() {
    // The agent makes the build a script that reports who ran it, as the page.
    let edit = "[standin:write package.json {\"name\":\"tiny-site\",\"version\":\"0.1.0\",\
                \"type\":\"module\",\"scripts\":{\"build\":\"node report.mjs\"}}] \
                [standin:write report.mjs import { mkdirSync, writeFileSync } from \"node:fs\"; \
                mkdirSync(\"dist\", { recursive: true }); writeFileSync(\"dist/index.html\", \
                JSON.stringify({ event: process.env.npm_lifecycle_event, \
                npm: process.env.npm_config_user_agent || \"none\", \
                bin: process.env.PATH.split(\":\").shift() }));]";
    for (without_npm, client) in [("true", "dana"), ("false", "fern")] {
        let mut env = TestEnv::new(&format!("scripts-{without_npm}")).await;
        let bucket = env.create_site(client, "site", Site::Tiny).await;
        env.start_worker(&[("BUILD_SCRIPTS_WITHOUT_NPM", without_npm)]);
        env.send(client, "site", "t", edit).await;
        let events = env.events_until_terminal(1, common::ONE_MESSAGE).await;
        assert_eq!(
            of_type(&events, "completed").len(),
            1,
            "{events:#?}\n{}",
            env.worker_log()
        );
        let page = &env.bucket_contents(&bucket).await["index.html"].1;
        let ran: serde_json::Value = serde_json::from_slice(page).unwrap();
        assert_eq!(ran["event"], "build", "{ran}");
        let bin = ran["bin"].as_str().unwrap();
        assert!(bin.ends_with("/node_modules/.bin"), "{ran}");
        let npm = ran["npm"].as_str().unwrap();
        if without_npm == "true" {
            assert_eq!(npm, "none", "npm ran the plain script: {ran}");
        } else {
            assert!(npm.starts_with("npm/"), "npm did not run it: {ran}");
        }
        assert_eq!(env.stop_worker(), Some(0));
    }
}
