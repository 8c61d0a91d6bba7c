//! Issue 25, the delivery side: no message reaches the dead-letter queue without its terminal
//! event, whatever keeps the worker from deciding it. The input queue has a redrive policy
//! (`maxReceiveCount` 3, as an operator would set it) into the test's dead-letter queue, and
//! the lease store (S3, through a `CutProxy`: S3 only, SQS stays up) goes away for longer than
//! those three deliveries last when every failed look gives the message back.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, CutProxy, Site, TestEnv};

/// The redrive allowance of these tests' input queue.
const MAX_RECEIVE_COUNT: u32 = 3;

/// A dead letter: the SQS message id it has in the dead-letter queue and its `rejectReason`
/// attribute (set on the worker's own copies; `None` on a message SQS moved there itself,
/// which keeps its input-queue id).
#[derive(Debug)]
struct DeadLetter {
    message_id: String,
    reason: Option<String>,
}

/// Everything in the dead-letter queue now (received and deleted).
async fn dead_letters(env: &TestEnv) -> Vec<DeadLetter> {
    let mut found = Vec::new();
    loop {
        let out = env
            .sqs
            .receive_message()
            .queue_url(&env.dlq)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive the dead letters");
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            return found;
        }
        for m in messages {
            found.push(DeadLetter {
                message_id: m.message_id.clone().unwrap_or_default(),
                reason: m
                    .message_attributes
                    .as_ref()
                    .and_then(|a| a.get("rejectReason"))
                    .and_then(|v| v.string_value.clone()),
            });
            env.sqs
                .delete_message()
                .queue_url(&env.dlq)
                .receipt_handle(m.receipt_handle.unwrap_or_default())
                .send()
                .await
                .expect("delete a dead letter");
        }
    }
}

/// A test world: one workspace, a lease store behind a cut-able S3 path, the redrive policy;
/// the worker started with `extra` and receiving.
async fn world(name: &str, extra: &[(&str, &str)]) -> (TestEnv, CutProxy) {
    let mut env = TestEnv::new(name).await;
    env.create_site("ola", "site", Site::Tiny).await;
    let lease_store = env.create_lease_store().await;
    env.redrive_input(&env.dlq.clone(), MAX_RECEIVE_COUNT).await;
    let s3 = CutProxy::start(common::endpoint()).await;
    let health = env.dir.path().join("health");
    let health_setting = health.display().to_string();
    let settings: Vec<(&str, &str)> = [
        ("LEASE_STORE", lease_store.as_str()),
        ("AWS_ENDPOINT_URL_S3", s3.url.as_str()),
        ("BUILD_COMMAND", "cp -R public dist"),
        ("HEALTH_FILE", health_setting.as_str()),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect();
    env.start_worker(&settings);
    // Receiving (its health file is written at the top of every turn of the receive loop):
    // the outage starts after the worker has set itself up.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !health.exists() {
        assert!(Instant::now() < deadline, "{}", env.worker_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (env, s3)
}

/// The lease store is away for 45 s, longer than three deliveries last when each failed look
/// at the record gives the message back (the old code gave it back for 10 s each time: three
/// receives in about 20 s, and SQS moved it at the fourth). Now the worker keeps the message
/// invisible and asks again, and the message completes once S3 is back; it never sits in the
/// dead-letter queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_store_outage_longer_than_the_redrive_allowance_loses_no_message() {
    let (mut env, s3) = world("dlq-outage", &[("RETRY_BASE_SECONDS", "1")]).await;
    s3.cut();
    let cut_at = Instant::now();
    let id = env
        .send("ola", "site", "t", "[standin:write public/x.txt 1]")
        .await;
    // Longer than the redrive allowance: 3 receives, 10 s apart, and the fourth moves it.
    tokio::time::sleep(Duration::from_secs(45).saturating_sub(cut_at.elapsed())).await;
    s3.restore();
    // ONE_MESSAGE after the outage: a cold, busy machine runs one tiny message well within it.
    let events = env
        .wait_until("a terminal event", common::ONE_MESSAGE, |e| {
            e["messageId"] == id.as_str() && common::is_terminal(e)
        })
        .await;
    let ends: Vec<&Value> = events
        .iter()
        .filter(|e| e["messageId"] == id.as_str() && common::is_terminal(e))
        .collect();
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(
        ends[0]["type"],
        "completed",
        "{ends:#?}\n{}",
        env.worker_log()
    );
    let letters = dead_letters(&env).await;
    assert!(letters.is_empty(), "dead letters: {letters:#?}");
    assert_eq!(env.stop_worker(), Some(0));
}

/// The same outage, past the worker's bound (`HOLD_UNDECIDED_SECONDS` 4): each delivery is
/// held that long, then given back, and on its last delivery the message is ended `failed`
/// with `out_of_deliveries` before SQS could move it: the event is out, the worker's copy with
/// its reason is in the dead-letter queue, and the message itself (its own id) is not. The old
/// code sent no event at all and SQS moved the message.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_on_its_last_delivery_ends_failed_with_an_event_not_silently() {
    let (mut env, s3) = world(
        "dlq-last",
        &[
            ("HOLD_UNDECIDED_SECONDS", "4"),
            ("VISIBILITY_TIMEOUT_SECONDS", "6"),
        ],
    )
    .await;
    s3.cut();
    let id = env
        .send("ola", "site", "t", "[standin:write public/x.txt 1]")
        .await;
    // Three deliveries, each held 4 s and given back for 10 s, then the last one's ending:
    // about 40 s. ONE_MESSAGE leaves a cold, busy machine room for slow SDK retries too.
    let events = env
        .wait_until("a terminal event", common::ONE_MESSAGE, |e| {
            e["messageId"] == id.as_str() && common::is_terminal(e)
        })
        .await;
    s3.restore();
    let ends: Vec<&Value> = events
        .iter()
        .filter(|e| e["messageId"] == id.as_str() && common::is_terminal(e))
        .collect();
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(ends[0]["type"], "failed", "{ends:#?}");
    assert_eq!(
        ends[0]["error"]["kind"],
        "out_of_deliveries",
        "{ends:#?}\n{}",
        env.worker_log()
    );
    assert_eq!(ends[0]["clientId"], "ola", "the event names its workspace");
    // Nothing ran while the store was away. (The first delivery, received a moment before
    // and so not looked up in the records, may have said `started`: it then waited for the
    // lease, which the store could not grant.)
    assert!(
        env.agent_runs().is_empty(),
        "an agent ran while the store was away: {:#?}",
        env.agent_runs()
    );
    // Nothing in the input queue any more, and in the dead-letter queue only the worker's
    // copy with its reason: SQS did not move the message itself.
    assert_eq!(env.queue_depth(&env.input).await, 0);
    let letters = dead_letters(&env).await;
    assert!(
        letters.iter().all(|l| l.message_id != id),
        "the message itself reached the dead-letter queue: {letters:#?}"
    );
    assert!(
        letters.iter().any(|l| l
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("last delivery"))),
        "no copy with its reason: {letters:#?}"
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// The settings of worker `name` of the takeover tests: the lease store, its own workspace
/// root and agent folder, the tiny build. Visibility and lease are the defaults: what is
/// measured is what an operator gets.
fn own_roots(env: &TestEnv, name: &str, lease_store: &str) -> Vec<(String, String)> {
    let dir = env.dir.path();
    [
        ("LEASE_STORE", lease_store.to_owned()),
        (
            "WORKSPACE_ROOT",
            dir.join(format!("ws-{name}")).display().to_string(),
        ),
        (
            "CLAUDE_CONFIG_DIR",
            dir.join(format!("claude-{name}")).display().to_string(),
        ),
        ("BUILD_COMMAND", "cp -R public dist".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Whether the stand-in has started a run logged under `claude_dir`.
fn agent_started(claude_dir: &std::path::Path) -> bool {
    !common::standin_calls(claude_dir, "start").is_empty()
}

/// Every terminal event of `id` is the same event (a recorded ending repeated byte for byte
/// is the contract's; a second, different ending is not); the first of them.
fn one_ending<'a>(events: &'a [Value], id: &str) -> &'a Value {
    let ends: Vec<&Value> = events
        .iter()
        .filter(|e| e["messageId"] == id && common::is_terminal(e))
        .collect();
    assert!(!ends.is_empty(), "no ending of {id}: {events:#?}");
    assert!(
        ends.iter().all(|e| *e == ends[0]),
        "{id} ended more than one way: {ends:#?}"
    );
    ends[0]
}

/// A holder frozen (SIGSTOP) while its agent runs; a newer request for the same thread is sent
/// at once, into the frozen worker's open long poll. Then another worker starts. The newer
/// request completes on it within 60 s of the freeze: the receive's visibility is short
/// (`VISIBILITY_TIMEOUT_SECONDS` 30), so what the frozen worker holds comes back within it, and
/// its lease expires within `LEASE_SECONDS`. (The old 120 s visibility kept the newer request
/// hidden in the frozen worker's socket for two minutes.) Resumed (SIGCONT), the frozen worker
/// finds its lease gone, writes nothing to the branch or the site, and keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_holder_hands_its_workspace_over_within_a_minute() {
    let env = TestEnv::new("frozen").await;
    let bucket = env.bucket("fz", "site");
    env.create_bucket(&bucket).await;
    let upstream = env.create_upstream("fz", "site", Site::Tiny);
    let lease_store = env.create_lease_store().await;
    let settings_a = own_roots(&env, "a", &lease_store);
    let mut a = env.spawn_worker("a", &common::env_pairs(&settings_a)).await;
    a.wait_until_receiving(Duration::from_secs(60)).await;
    let first = env
        .send(
            "fz",
            "site",
            "t",
            "[standin:write public/live.txt 1] [standin:sleep 45]",
        )
        .await;
    let claude_a = env.dir.path().join("claude-a");
    let deadline = Instant::now() + common::STEP;
    while !agent_started(&claude_a) {
        assert!(
            Instant::now() < deadline,
            "a never ran its agent\n{}",
            common::tail(&a.text(), 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a holds the workspace, its agent at work, its intake in a long poll.
    common::nix_kill(a.pid().unwrap(), "STOP").unwrap();
    let frozen_at = Instant::now();
    let newer = env
        .send("fz", "site", "t", "[standin:write public/live.txt 2]")
        .await;
    let settings_b = own_roots(&env, "b", &lease_store);
    let mut b = env.spawn_worker("b", &common::env_pairs(&settings_b)).await;
    // 60 s is the bound for the client's wait; nothing here is slower on a busy machine
    // than the visibility (30 s) and the lease (30 s) it waits for, plus one tiny run.
    let mut events = env
        .wait_until(
            "the newer request completed on b",
            Duration::from_secs(120),
            |e| e["messageId"] == newer.as_str() && e["type"] == "completed",
        )
        .await;
    let took = frozen_at.elapsed();
    eprintln!("frozen holder: the newer request completed {took:?} after the freeze");
    // Resumed: a finds its lease gone, stops, and gives its message back, pushing and
    // publishing nothing.
    common::nix_kill(a.pid().unwrap(), "CONT").unwrap();
    a.otlp
        .wait_for_metrics("a giving back its stopped message", common::STEP, |m| {
            m.value("edit_worker.messages", &[("outcome", "released")]) >= 1
        })
        .await;
    let first_ended = |e: &Value| e["messageId"] == first.as_str() && common::is_terminal(e);
    if !events.iter().any(first_ended) {
        events.extend(
            env.wait_until("the first request ended", common::STEP, first_ended)
                .await,
        );
    }
    assert!(
        took < Duration::from_secs(60),
        "the newer request completed {took:?} after the freeze (bound: 60 s)\n{}",
        common::tail(&b.text(), 40)
    );
    let done = one_ending(&events, &newer).clone();
    one_ending(&events, &first);
    // The branch and the site hold the newer request, as b left them.
    let branch = common::git(&upstream, &["rev-parse", "thread-t"]);
    assert_eq!(Some(branch.trim()), done["commit"].as_str(), "{done:#?}");
    assert_eq!(
        common::git(&upstream, &["show", "thread-t:public/live.txt"]).trim(),
        "2"
    );
    let site = env.site_files(&bucket).await;
    assert_eq!(
        String::from_utf8_lossy(&site["live.txt"]).trim(),
        "2",
        "the site"
    );
    // a keeps serving: with b gone, the next request runs on a.
    assert_eq!(b.stop(), Some(0), "{}", common::tail(&b.text(), 40));
    let third = env
        .send("fz", "site", "t", "[standin:write public/live.txt 3]")
        .await;
    env.wait_for(&third, "completed", common::ONE_MESSAGE).await;
    assert_eq!(
        common::git(&upstream, &["show", "thread-t:public/live.txt"]).trim(),
        "3"
    );
    assert_eq!(a.stop(), Some(0), "{}", common::tail(&a.text(), 40));
}

/// A second live process with a `WORKER_ID` already in use is refused at start (exit code 2,
/// a configuration error): it watches the presence record of the first for one renewal, sees
/// it renewed, and stops before it takes anything. The old worker started and ran: two
/// processes that records and leases could not tell apart. The first one keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_live_process_with_the_same_worker_id_is_refused() {
    let env = TestEnv::new("dupid").await;
    env.create_site("du", "site", Site::Tiny).await;
    let lease_store = env.create_lease_store().await;
    let settings = own_roots(&env, "a", &lease_store);
    let mut first = env
        .spawn_worker("same", &common::env_pairs(&settings))
        .await;
    first.wait_until_receiving(Duration::from_secs(60)).await;
    let mut settings = own_roots(&env, "b", &lease_store);
    // Its own health file: its appearing would mean it started receiving.
    let second_health = env.dir.path().join("health-second");
    settings.push(("HEALTH_FILE".into(), second_health.display().to_string()));
    let mut second = env
        .spawn_worker("same", &common::env_pairs(&settings))
        .await;
    // One renewal (20 s) and its grace (5 s), plus a start on a cold, busy machine.
    let deadline = Instant::now() + Duration::from_secs(90);
    while second.running() {
        assert!(
            Instant::now() < deadline,
            "the second process with WORKER_ID `same` still runs\n{}",
            common::tail(&second.text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        second.exit_code,
        Some(2),
        "{}",
        common::tail(&second.text(), 30)
    );
    assert!(!second_health.exists(), "the second process received");
    // The first one serves on.
    let id = env
        .send("du", "site", "t", "[standin:write public/x.txt 1]")
        .await;
    env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    assert!(first.running());
    assert_eq!(first.stop(), Some(0), "{}", common::tail(&first.text(), 30));
}

/// The notice queues of this input queue, by URL.
async fn notice_queues(env: &TestEnv) -> Vec<String> {
    let input_name = env.input.rsplit('/').next().unwrap().to_owned();
    env.sqs
        .list_queues()
        .queue_name_prefix(format!("{input_name}-notices-"))
        .send()
        .await
        .expect("list queues")
        .queue_urls
        .unwrap_or_default()
}

/// A worker killed with `kill -9` leaves its notice queue behind. The next worker to start
/// deletes it once it is older than a presence's lifetime (60 s) and no live worker's
/// presence in the lease store names it; a live worker's queue, as old, stays. The old
/// worker never deleted a dead worker's queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_workers_notice_queue_is_found_and_deleted() {
    let env = TestEnv::new("orphans").await;
    let lease_store = env.create_lease_store().await;
    let mut dead = env
        .spawn_worker(
            "dead",
            &common::env_pairs(&own_roots(&env, "dead", &lease_store)),
        )
        .await;
    let mut live = env
        .spawn_worker(
            "live",
            &common::env_pairs(&own_roots(&env, "live", &lease_store)),
        )
        .await;
    dead.wait_until_receiving(Duration::from_secs(60)).await;
    live.wait_until_receiving(Duration::from_secs(60)).await;
    let created = Instant::now();
    let before = notice_queues(&env).await;
    assert_eq!(before.len(), 2, "{before:?}");
    dead.kill9();
    // The sweep's criterion is age: both queues must be past 60 s old (moto's timestamps are
    // whole seconds; 3 s more for the rounding).
    tokio::time::sleep(Duration::from_secs(63).saturating_sub(created.elapsed())).await;
    let mut next = env
        .spawn_worker(
            "next",
            &common::env_pairs(&own_roots(&env, "next", &lease_store)),
        )
        .await;
    next.wait_until_receiving(Duration::from_secs(60)).await;
    let live_queue = before
        .iter()
        .find(|u| u.contains("-notices-live-"))
        .unwrap()
        .clone();
    let dead_queue = before
        .iter()
        .find(|u| u.contains("-notices-dead-"))
        .unwrap()
        .clone();
    // The sweep runs beside the start; 30 s leave a busy machine room for its few calls.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = notice_queues(&env).await;
        if !now.contains(&dead_queue) {
            assert!(
                now.contains(&live_queue),
                "the live worker's queue went: {now:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead worker's queue is still there: {now:?}\n{}",
            common::tail(&next.text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(live.stop(), Some(0));
    assert_eq!(next.stop(), Some(0));
}
