//! Issue 25, the holder's side: a holder whose lease store hangs or who was paused (SIGSTOP)
//! stops its work on its own clock and writes nothing after it lost the lease (thread record,
//! conversation, branch, site); work that cannot be pushed is kept on the upstream under a
//! ref of its own before a message is deleted; and what the lease store costs per message.
//! The checks read the workers' spans, metrics, S3 requests (seen by a proxy) and the
//! upstream, never their logs (kept for failure messages).

use crate::common;

use std::time::Duration;

use crate::common::{
    RecordingProxy, Site, StallingProxy, TestEnv, WorkerProcess, git_ok, now_ms, pids_working_in,
    recording_proxy, tail, until,
};

/// LEASE_SECONDS of these tests: short, so that a lease ends within seconds, and still 2 s
/// between renewals (a third of it), far more than a renewal takes on a busy 2-core machine.
const LEASE: u64 = 6;

/// The tiny site's build, the same for every worker of these tests.
const BUILD: (&str, &str) = ("BUILD_COMMAND", "cp -R public dist");

/// How many processes of the agent (the stand-in) work in `checkout`: not git or a build.
fn agent_pids_in(checkout: &std::path::Path) -> usize {
    pids_working_in(checkout)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|argv| String::from_utf8_lossy(&argv).contains("claude-standin"))
        })
        .count()
}

/// When the first "lease lost" span of `worker` says it lost its lease (its `at_ms`).
async fn lease_lost_at(worker: &WorkerProcess, timeout: Duration) -> u64 {
    let spans = worker
        .otlp
        .wait_for_spans(
            &format!("a lost lease of worker {}", worker.name),
            timeout,
            |spans| spans.iter().any(|s| s.name == "lease lost"),
        )
        .await;
    spans
        .iter()
        .find(|s| s.name == "lease lost")
        .and_then(|s| s.attributes.get("at_ms"))
        .and_then(|at| at.parse().ok())
        .expect("a lease span has at_ms")
}

/// Worker "a" with a lease store whose S3 requests (leases, records, the site) go through `s3`;
/// SQS goes straight to moto. `extra` on top.
async fn spawn_holder(
    env: &TestEnv,
    store: &str,
    s3: &StallingProxy,
    extra: &[(&str, &str)],
) -> WorkerProcess {
    let lease = LEASE.to_string();
    let mut settings = vec![
        ("LEASE_STORE", store),
        ("LEASE_SECONDS", lease.as_str()),
        ("AWS_ENDPOINT_URL_S3", s3.url.as_str()),
        BUILD,
    ];
    settings.extend_from_slice(extra);
    env.spawn_worker("a", &settings).await
}

/// Stall the lease store, see `worker`'s lease end on its own clock within the lease's time
/// of the stall, and every process working in `checkout` end at once after it; then let the
/// store answer again. Generous: the lease ends at most LEASE - LEASE/5 after the stall (the
/// last renewal came before it), with 20 s more for a span export on a busy machine; the stop
/// kills a process group at once, and 10 s is room for a starved machine.
async fn stall_and_see_the_work_stop(
    worker: &WorkerProcess,
    s3: &StallingProxy,
    checkout: &std::path::Path,
) {
    let stalled_at = now_ms();
    s3.stall();
    let lost_at = lease_lost_at(worker, Duration::from_secs(LEASE + 20)).await;
    assert!(
        lost_at <= stalled_at + LEASE * 1000,
        "the lease ended {} ms after the store stopped answering, past the lease's {LEASE} s",
        lost_at - stalled_at
    );
    until("the work's processes gone", Duration::from_secs(10), || {
        pids_working_in(checkout).is_empty()
    })
    .await;
    s3.resume();
}

/// Item 1: the lease store (S3) stops answering while the agent works. The heartbeat's renewal
/// hangs (no answer, no error), yet the holder's own monotonic clock ends the lease on time and
/// that stops the agent at once. On the old code the hung renewal kept the lease "held" and the
/// agent ran on.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_lease_store_ends_the_lease_on_time_and_stops_the_agent() {
    let env = TestEnv::new("hold-hang").await;
    env.create_site("hang", "site", Site::Tiny).await;
    let store = env.create_lease_store().await;
    let s3 = StallingProxy::start(common::endpoint()).await;
    let worker = spawn_holder(&env, &store, &s3, &[]).await;
    worker.wait_until_receiving(common::STEP).await;
    env.send("hang", "site", "t", "[standin:sleep 120]").await;
    let checkout = env.workspace_root().join("hang/site");
    until("the agent at work", common::STEP, || {
        agent_pids_in(&checkout) > 0
    })
    .await;
    // The agent's process group.
    stall_and_see_the_work_stop(&worker, &s3, &checkout).await;
}

/// Item 1, for git: the lease ends while a `git push` waits on an upstream that never
/// answers. The push is killed at once with everything it started, as the agent would be; on
/// the old code it waited out its 5-minute network limit in a checkout that was no longer this
/// worker's. The hang is a `git` first on the worker's PATH whose push sleeps (a child in the
/// checkout, as a remote helper would be); every other call is the real git.
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_that_ends_during_a_hung_push_stops_git_at_once() {
    let env = TestEnv::new("hold-git").await;
    env.create_site("hgit", "site", Site::Tiny).await;
    let store = env.create_lease_store().await;
    let s3 = StallingProxy::start(common::endpoint()).await;
    let bin = env.dir.path().join("hung-push-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real_git = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::fs::write(
        bin.join("git"),
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = push ] && {{ sleep 600; exit 1; }}; done\nexec {} \"$@\"\n",
            real_git.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("git"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let worker = spawn_holder(&env, &store, &s3, &[("PATH", path.as_str())]).await;
    worker.wait_until_receiving(common::STEP).await;
    env.send("hgit", "site", "t", "make the title say Hung")
        .await;
    let checkout = env.workspace_root().join("hgit/site");
    let sleeping_push = || {
        pids_working_in(&checkout).into_iter().any(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|argv| argv == b"sleep\x00600\x00")
        })
    };
    until("a push that hangs", common::STEP, sleeping_push).await;
    // git's process group; the push's own limit is 5 minutes.
    stall_and_see_the_work_stop(&worker, &s3, &checkout).await;
}

/// S3 requests of `proxy` from index `from` on that write (PUT, POST, DELETE) under `needle`.
fn writes_after(proxy: &RecordingProxy, from: usize, needle: &str) -> Vec<String> {
    proxy.requests.lock().unwrap()[from..]
        .iter()
        .filter(|r| !r.starts_with("GET") && !r.starts_with("HEAD") && r.contains(needle))
        .cloned()
        .collect()
}

/// Item 2: a holder frozen (SIGSTOP) while its agent works; another worker takes the workspace
/// over and completes a newer request of the same thread. Resumed, the frozen worker writes
/// nothing: not the thread record, not the conversation (both fenced by the lease token, and
/// never written under a lease this worker's clock says is over), not the site, not the branch;
/// and it keeps running. On the old code the resumed worker wrote its stale thread record and
/// conversation over the new holder's (unfenced `Version::Any` writes).
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_holder_resumed_writes_nothing() {
    let env = TestEnv::new("hold-frozen").await;
    let bucket = env.create_site("frz", "site", Site::Tiny).await;
    let store = env.create_lease_store().await;
    // Worker a's S3 requests, in order: what it wrote after it was resumed.
    let a_s3 = recording_proxy(common::endpoint(), Vec::new()).await;
    let lease = LEASE.to_string();
    // A short visibility, so that what the frozen worker holds (or its open long poll took)
    // comes back to b within seconds.
    let settings = |root: &str, claude: &str| -> Vec<(String, String)> {
        [
            ("LEASE_STORE", store.clone()),
            ("LEASE_SECONDS", lease.clone()),
            ("VISIBILITY_TIMEOUT_SECONDS", "6".into()),
            (
                "WORKSPACE_ROOT",
                env.dir.path().join(root).display().to_string(),
            ),
            (
                "CLAUDE_CONFIG_DIR",
                env.dir.path().join(claude).display().to_string(),
            ),
            (BUILD.0, BUILD.1.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    let mut a_settings = settings("ws-a", "claude-a");
    a_settings.push(("AWS_ENDPOINT_URL_S3".into(), a_s3.url.clone()));
    let pairs = |s: &[(String, String)]| -> Vec<(String, String)> { s.to_vec() };
    let a_pairs = pairs(&a_settings);
    let mut a = env.spawn_worker("a", &common::env_pairs(&a_pairs)).await;
    a.wait_until_receiving(common::STEP).await;
    // The first request works 8 s: it ends while a is frozen, so that the resumed worker finds
    // its agent's run done and goes straight for the records.
    env.send(
        "frz",
        "site",
        "t",
        "[standin:write public/live.txt first] [standin:sleep 8]",
    )
    .await;
    let a_checkout = env.dir.path().join("ws-a/frz/site");
    // The agent itself, not a git process of the prepare: a holds the lease from then on.
    until("a's agent at work", common::STEP, || {
        agent_pids_in(&a_checkout) > 0
    })
    .await;
    let b_pairs = pairs(&settings("ws-b", "claude-b"));
    let b = env.spawn_worker("b", &common::env_pairs(&b_pairs)).await;
    b.wait_until_receiving(common::STEP).await;
    common::nix_kill(a.pid().unwrap(), "STOP").unwrap();
    let frozen_at = std::time::Instant::now();
    let newer = env
        .send("frz", "site", "t", "[standin:write public/live.txt second]")
        .await;
    // Generous: the lease (6 s) and the visibility (6 s) run out, then b runs the first request
    // and the newer one with the tiny build; minutes on a starved machine.
    env.wait_for(&newer, "completed", common::ONE_MESSAGE).await;
    eprintln!(
        "the newer request completed on b {} ms after the freeze",
        frozen_at.elapsed().as_millis()
    );
    let seen_before_resume = a_s3.requests.lock().unwrap().len();
    common::nix_kill(a.pid().unwrap(), "CONT").unwrap();
    // The resumed worker finds its lease over at once (its own clock) and its batch ends: its
    // messages are given back (they ended on b already), and then it holds none.
    lease_lost_at(&a, common::STEP).await;
    let given_back = a
        .otlp
        .wait_for_metrics("a's batch given back", common::STEP, |m| {
            m.value("edit_worker.messages", &[("outcome", "released")]) >= 1
                && m.value("edit_worker.messages.in_flight", &[]) == 0
        })
        .await;
    eprintln!("the resumed worker's metrics: {given_back}");
    for what in ["/conversations/", "/threads/", &format!("/{bucket}/")] {
        let written = writes_after(&a_s3, seen_before_resume, what);
        assert!(
            written.is_empty(),
            "the resumed worker wrote {what} after it lost its lease: {written:#?}\n{}\nB:\n{}",
            tail(&a.text(), 40),
            tail(&b.text(), 60)
        );
    }
    assert_eq!(
        git_ok(
            &env.upstream("frz", "site"),
            &["show", "thread-t:public/live.txt"]
        )
        .as_deref(),
        Some("second"),
        "the thread's branch holds the newer request"
    );
    // The thread's record names b's conversation and b's token.
    let s3 = common::s3_client(&common::endpoint()).await;
    let (store_bucket, prefix) = store.trim_start_matches("s3://").split_once('/').unwrap();
    let record = s3
        .get_object()
        .bucket(store_bucket)
        .key(format!("{prefix}/threads/frz/site/t.json"))
        .send()
        .await
        .expect("the thread's record")
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let b_token = common::lease_intervals(&b)
        .iter()
        .map(|h| h.token.clone())
        .max()
        .expect("b took the lease");
    assert_eq!(
        record["leaseToken"].to_string(),
        b_token,
        "the thread record is the new holder's: {record}"
    );
    assert!(a.running(), "the resumed worker keeps serving");
    drop(b);
}

/// Item 3: an interrupted job whose branch the upstream will not take (a directory where git
/// must make the branch's lock) keeps its saved work on the upstream under a ref of its own,
/// and its `interrupted` event names it (`savedRef`). On the old code the failed push was only
/// logged: the event named nothing and the work was only in the worker's checkout.
#[tokio::test(flavor = "multi_thread")]
async fn work_that_cannot_reach_its_branch_is_kept_under_a_saved_ref() {
    let mut env = TestEnv::new("hold-saved-ref").await;
    env.create_bucket(&env.bucket("svd", "site")).await;
    let upstream = env.create_upstream("svd", "site", Site::Tiny);
    // Git cannot lock `refs/heads/thread-t` while a directory holds the lock's name: every
    // push of the branch is refused, other refs go through.
    std::fs::create_dir_all(upstream.join("refs/heads/thread-t.lock/x")).unwrap();
    env.start_worker(&[BUILD, ("PUSH_ATTEMPTS", "1")]);
    let first = env
        .send(
            "svd",
            "site",
            "t",
            "[standin:write public/first.txt first] [standin:sleep 60]",
        )
        .await;
    let checkout = env.workspace_root().join("svd/site");
    until("the first request's agent at work", common::STEP, || {
        std::fs::read_to_string(checkout.join("public/first.txt")).is_ok()
    })
    .await;
    env.send(
        "svd",
        "site",
        "t",
        "[standin:write public/second.txt second]",
    )
    .await;
    let events = env
        .wait_for(&first, "interrupted", common::ONE_MESSAGE)
        .await;
    let event = events
        .iter()
        .find(|e| e["messageId"] == first.as_str() && e["type"] == "interrupted")
        .unwrap();
    let saved_ref = event["savedRef"].as_str().unwrap_or_else(|| {
        panic!(
            "the interrupted event names no saved ref: {event:#}\n{}",
            tail(&env.worker_log(), 40)
        )
    });
    assert_eq!(
        saved_ref,
        format!("refs/edit-worker/saved/thread-t/{first}")
    );
    assert_eq!(
        git_ok(
            &upstream,
            &["show", &format!("{saved_ref}:public/first.txt")]
        )
        .as_deref(),
        Some("first"),
        "the saved work is on the upstream under its ref"
    );
    std::fs::remove_dir_all(upstream.join("refs/heads/thread-t.lock")).unwrap();
    env.stop_worker();
}

/// Item 3: a job fails for good (the agent hit its turn limit) while the upstream is away, so
/// its work cannot be saved anywhere durable: its message is not deleted as `failed` but comes
/// back, and ends only once the upstream is back and the work is on it. On the old code the
/// failed save was only logged and the message deleted with its `failed` event at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_save_keeps_the_message_until_the_work_is_durable() {
    let env = TestEnv::new("hold-unsaved").await;
    env.create_bucket(&env.bucket("uns", "site")).await;
    let upstream = env.create_upstream("uns", "site", Site::Tiny);
    let away = upstream.with_extension("away");
    let worker = env
        .spawn_worker(
            "a",
            &[BUILD, ("PUSH_ATTEMPTS", "1"), ("RETRY_BASE_SECONDS", "1")],
        )
        .await;
    worker.wait_until_receiving(common::STEP).await;
    let id = env
        .send(
            "uns",
            "site",
            "t",
            "[standin:write public/kept.txt kept] [standin:sleep 3] [standin:fail error_max_turns]",
        )
        .await;
    let checkout = env.workspace_root().join("uns/site");
    until("the agent at work", common::STEP, || {
        std::fs::read_to_string(checkout.join("public/kept.txt")).is_ok()
    })
    .await;
    // The upstream goes away while the agent works: its failed run's work can go nowhere.
    std::fs::rename(&upstream, &away).unwrap();
    let released = worker
        .otlp
        .wait_for_metrics("the failed message given back", common::STEP, |m| {
            m.value("edit_worker.messages", &[("outcome", "retried")]) >= 1
                || m.value("edit_worker.messages", &[("outcome", "failed")]) >= 1
        })
        .await;
    assert_eq!(
        released.value("edit_worker.messages", &[("outcome", "failed")]),
        0,
        "the message ended as failed while its work was nowhere durable\n{}",
        tail(&worker.text(), 40)
    );
    let early: Vec<_> = env
        .drain(&env.output, 1)
        .await
        .into_iter()
        .filter(|e| e["messageId"] == id.as_str() && common::is_terminal(e))
        .collect();
    assert!(
        early.is_empty(),
        "ended while the upstream was away: {early:#?}"
    );
    std::fs::rename(&away, &upstream).unwrap();
    // Back: the message runs again (the agent fails the same way) and now ends, its work saved.
    let events = env.wait_for(&id, "failed", common::ONE_MESSAGE).await;
    let failed = events
        .iter()
        .find(|e| e["messageId"] == id.as_str() && e["type"] == "failed")
        .unwrap();
    assert_eq!(failed["error"]["kind"], "agent_max_turns", "{failed:#}");
    assert_eq!(
        git_ok(&upstream, &["show", "thread-t:public/kept.txt"]).as_deref(),
        Some("kept"),
        "the failed job's work is on its branch"
    );
}

/// Worker "a" alone with the lease store `store`, its S3 requests seen by a recording proxy
/// (every request to S3, the store's and the site's), with the tiny build and `extra`; receiving.
async fn lone_worker_behind_a_proxy(
    env: &TestEnv,
    store: &str,
    extra: &[(&str, &str)],
) -> (WorkerProcess, RecordingProxy) {
    let s3 = recording_proxy(common::endpoint(), Vec::new()).await;
    let settings: Vec<(&str, &str)> = [
        ("LEASE_STORE", store),
        ("AWS_ENDPOINT_URL_S3", s3.url.as_str()),
        BUILD,
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect();
    let worker = env.spawn_worker("a", &settings).await;
    worker.wait_until_receiving(common::STEP).await;
    (worker, s3)
}

/// Item 5: what the lease store costs a lone worker per message, counted by a proxy in front
/// of S3: at most 4 requests per message of a thread that has run before (the lease taken
/// back, the conversation's copy, the thread's one document, the outcome). A message that
/// ends before its first visibility renewal (a third of the timeout) is never marked
/// `started`: its first delivery cannot be anywhere else yet (`intake::decide`). Before that it cost 5 (the mark at receipt);
/// on the older code about 12 (every record read before it was written, the thread record
/// written before and after the run and the mark apart, the lease released and taken anew).
#[tokio::test(flavor = "multi_thread")]
async fn a_message_costs_at_most_four_lease_store_requests() {
    let env = TestEnv::new("hold-cost").await;
    env.create_site("cst", "site", Site::Tiny).await;
    let store = env.create_lease_store().await;
    let store_bucket = store
        .trim_start_matches("s3://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let (mut worker, s3) = lone_worker_behind_a_proxy(&env, &store, &[]).await;
    let store_requests = || -> Vec<String> {
        s3.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| {
                r.split(' ')
                    .nth(1)
                    .is_some_and(|p| p.starts_with(&format!("/{store_bucket}/")))
            })
            .cloned()
            .collect()
    };
    // The thread's first message (its document and conversation are new), then the ones counted.
    const COUNTED: usize = 4;
    let mut before = 0;
    for n in 0..=COUNTED {
        if n == 1 {
            before = store_requests().len();
        }
        let id = env
            .send(
                "cst",
                "site",
                "t",
                &format!("[standin:write public/live.txt {n}]"),
            )
            .await;
        env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    }
    let counted = store_requests()[before..].to_vec();
    let per_message = counted.len() as f64 / COUNTED as f64;
    eprintln!("{per_message} lease-store requests per message: {counted:#?}");
    assert!(
        per_message <= 4.0,
        "{per_message} lease-store requests per message (at most 4): {counted:#?}"
    );
    // Issue 28: the worker's own counter of its record store's requests says the same as the
    // proxy, read and write apart, so that a benchmark can read the cost from the worker's
    // telemetry. Stopped (SIGTERM), the worker has exported its final totals.
    assert_eq!(
        worker.stop(),
        Some(0),
        "{}",
        common::tail(&worker.text(), 40)
    );
    let all = store_requests();
    let proxied = |methods: &[&str]| {
        all.iter()
            .filter(|r| methods.iter().any(|m| r.starts_with(&format!("{m} "))))
            .count() as i64
    };
    let counted = worker
        .otlp
        .metrics()
        .values_by("edit_worker.records.calls", &[], "op");
    assert_eq!(
        (
            counted.get("read").copied().unwrap_or(0),
            counted.get("write").copied().unwrap_or(0)
        ),
        (proxied(&["GET"]), proxied(&["PUT", "DELETE"])),
        "edit_worker.records.calls by op (read, write) against the proxy's GETs and PUTs + \
         DELETEs to the store: {all:#?}"
    );
}

/// A first delivery received a moment ago is not marked `started` at receipt (the cost test
/// above sees no mark for a message done within a third of its visibility), but one that runs
/// on is marked at its first visibility renewal, while its agent still works: a copy that came
/// out once the visibility lapsed would find it held elsewhere (`intake::decide`). Before
/// issue 25's cost work every message was marked at receipt.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_delivery_that_runs_on_is_marked_at_its_first_renewal() {
    let env = TestEnv::new("hold-mark").await;
    env.create_site("mrk", "site", Site::Tiny).await;
    let store = env.create_lease_store().await;
    // Renewals every 2 s; the agent works 8 s.
    let (mut worker, s3) =
        lone_worker_behind_a_proxy(&env, &store, &[("VISIBILITY_TIMEOUT_SECONDS", "6")]).await;
    let id = env
        .send(
            "mrk",
            "site",
            "t",
            "[standin:write public/x.txt 1] [standin:sleep 8]",
        )
        .await;
    let claude = env.dir.path().join("claude");
    let agent_lines = |event: &str| common::standin_calls(&claude, event).len();
    let marks = || -> Vec<String> {
        s3.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with("PUT ") && r.contains("/outcomes/"))
            .cloned()
            .collect()
    };
    until("the agent at work", common::STEP, || {
        agent_lines("start") == 1
    })
    .await;
    until("the running message's started mark", common::STEP, || {
        !marks().is_empty()
    })
    .await;
    assert_eq!(
        agent_lines("end"),
        0,
        "the mark came only after the run: {:#?}",
        marks()
    );
    env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    // The mark, its refresh at every other renewal, then the ending over it.
    assert!(marks().len() >= 2, "{:#?}", marks());
    assert_eq!(
        worker.stop(),
        Some(0),
        "{}",
        common::tail(&worker.text(), 40)
    );
}
