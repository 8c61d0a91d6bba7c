//! The session with fake steps (`steps::fake`): interrupts, coalescing, restarts and idle
//! stops in milliseconds, without git, an agent, a build, S3 or SQS. The real supervisor and
//! job runner run; what they report is read from the status events, what the steps were asked
//! from the fakes' calls. Tests wait on those, never on time; the timeouts only keep a broken
//! test from hanging.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use crate::batch::context::WorkerContext;
use crate::config::WorkerConfig;
use crate::contract::message::{DEFAULT_MAX_COMMAND_BYTES, EditRequest};
use crate::contract::status::{EventType, StatusEvent, StatusSink};
use crate::delivery::Delivery;
use crate::delivery::job::Job;
use crate::delivery::records::RecordStore;
use crate::sessions::restart::RestartPolicy;
use crate::sessions::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use crate::steps::StepKind;
use crate::steps::build::BuildSpec;
use crate::steps::fake::{Call, FakeSteps};
use crate::steps::git::SAVE_MESSAGE;

/// Longest a test waits for anything before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// A worker without its intake: the supervisor, with fake steps, fed jobs by the test.
struct Harness {
    supervisor: ractor::ActorRef<SupervisorMsg>,
    events: UnboundedReceiver<StatusEvent>,
    /// Terminal events received so far, by message id.
    ended: HashMap<String, StatusEvent>,
    calls: UnboundedReceiver<Call>,
    /// With shared leases (`start_shared`): the notices sent to other workers, and the store.
    notices: Option<UnboundedReceiver<(String, crate::delivery::notices::Notice)>>,
    records: RecordStore,
    /// The worker's leases, as its sessions take them.
    leases: crate::delivery::lease::Leases,
    _root: tempfile::TempDir,
}

/// An SQS client that fails every call at once, before any I/O (it has no credentials): the
/// deletes and releases of the tests' messages fail and are logged, as they would be when SQS
/// is away, and what the tests look at is the events.
fn offline_sqs() -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

impl Harness {
    async fn start(
        configure: impl FnOnce(&mut WorkerConfig),
        step_restarts: RestartPolicy,
    ) -> Harness {
        Harness::start_with(configure, step_restarts, false).await
    }

    /// As `start`, with leases in the (local) record store as several workers share them, and
    /// the notices to other workers tapped.
    async fn start_shared(
        configure: impl FnOnce(&mut WorkerConfig),
        step_restarts: RestartPolicy,
    ) -> Harness {
        Harness::start_with(configure, step_restarts, true).await
    }

    async fn start_with(
        configure: impl FnOnce(&mut WorkerConfig),
        step_restarts: RestartPolicy,
        shared: bool,
    ) -> Harness {
        let root = tempfile::tempdir().expect("temp dir");
        let mut config = WorkerConfig::with_defaults("https://sqs.invalid/123456789012/input");
        config.workspace_root = root.path().to_owned();
        config.worker_id = "test-worker".into();
        configure(&mut config);
        let sqs = offline_sqs();
        let (status, events) = StatusSink::tapped(sqs.clone());
        let records = RecordStore::local(&root.path().join(".records"), &config.worker_id);
        let delivery = Delivery::new(
            sqs,
            config.input_queue_url.clone(),
            None,
            status,
            config.visibility_timeout,
            records,
        );
        let build = BuildSpec {
            settings: config.build.clone(),
            store: None,
            ahead: None,
            slots: crate::steps::slots::BuildSlots::new(1, 16),
        };
        let mut ctx = WorkerContext::new(config, delivery, None, build);
        let mut notices = None;
        if shared {
            ctx.leases = crate::delivery::lease::Leases::shared(
                ctx.delivery.records.clone(),
                crate::delivery::lease::LeaseConfig {
                    duration: Duration::from_secs(30),
                    worker: ctx.config.worker_id.clone(),
                },
            );
            let (sender, tap) = crate::delivery::notices::NoticeSender::tapped(offline_sqs());
            ctx.notices = Some(sender);
            notices = Some(tap);
        }
        let records = ctx.delivery.records.clone();
        let leases = ctx.leases.clone();
        let ctx = Arc::new(ctx);
        let (step_factory, calls) = FakeSteps::new();
        let (supervisor, _) = Actor::spawn(
            None,
            Supervisor,
            SupervisorArgs {
                ctx,
                step_factory,
                restarts: RestartPolicy::default(),
                step_restarts,
            },
        )
        .await
        .expect("supervisor starts");
        Harness {
            supervisor,
            events,
            ended: HashMap::new(),
            calls,
            notices,
            records,
            leases,
            _root: root,
        }
    }

    /// Another worker's message, sent at 3 000, waits for amelia/stamps: its `Newer` notice,
    /// with its reply queue `other-queue`.
    fn newer_elsewhere(&self) {
        self.supervisor
            .cast(SupervisorMsg::Notice(
                crate::delivery::notices::Notice::Newer {
                    client_id: "amelia".into(),
                    project_id: "stamps".into(),
                    message_id: "elsewhere".into(),
                    sent_at_ms: 3_000,
                    from: "other-worker".into(),
                    reply_to: Some("other-queue".into()),
                },
            ))
            .unwrap();
    }

    /// The answer to `newer_elsewhere` is `Released`, and it is true: the lease record of
    /// amelia/stamps has no time left for anyone.
    async fn released_and_free(&mut self) {
        let notices = self.notices.as_mut().expect("tapped");
        let (to, notice) = tokio::time::timeout(PATIENCE, notices.recv())
            .await
            .expect("an answer")
            .expect("the tap lives");
        assert_eq!(to, "other-queue");
        assert!(
            matches!(notice, crate::delivery::notices::Notice::Released { .. }),
            "{notice:?}"
        );
        let (lease, _) = self
            .records
            .read_typed::<serde_json::Value>("leases/amelia/stamps.json")
            .await
            .expect("the store answers");
        let lease = lease.expect("a lease record");
        assert_eq!(
            lease["expiresAtMs"], 0,
            "Released was said while the lease was held: {lease}"
        );
    }

    /// Route message `id` of thread `thread`, sent at `sent_at_ms`, asking `command`.
    fn send(&self, id: &str, thread: &str, sent_at_ms: u64, command: &str) {
        let body = serde_json::json!({
            "sessionId": "s",
            "threadId": thread,
            "clientId": "amelia",
            "projectId": "stamps",
            "command": command,
        });
        let request = EditRequest::parse(&body.to_string(), DEFAULT_MAX_COMMAND_BYTES)
            .expect("a valid request");
        let job = Job::for_test(id, request, sent_at_ms);
        self.supervisor
            .cast(SupervisorMsg::Route(Box::new(job)))
            .expect("supervisor alive");
    }

    /// The terminal event of message `id`, waiting for it.
    async fn ended(&mut self, id: &str) -> StatusEvent {
        let wait = async {
            while !self.ended.contains_key(id) {
                let event = self.events.recv().await.expect("the status sink lives");
                if event.event_type.is_terminal() {
                    let first = self.ended.insert(event.message_id.clone(), event);
                    assert!(first.is_none(), "a second terminal event: {first:?}");
                }
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("no terminal event for {id}; ended: {:?}", self.ended));
        self.ended[id].clone()
    }

    /// The next call of a fake step that `want` picks, waiting for it; the calls before it are
    /// returned too, in order.
    async fn call(&mut self, want: impl Fn(&Call) -> bool) -> (Call, Vec<Call>) {
        let mut before = Vec::new();
        let wait = async {
            loop {
                let call = self.calls.recv().await.expect("the fake steps live");
                if want(&call) {
                    return call;
                }
                before.push(call);
            }
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(call) => (call, before),
            Err(_) => panic!("the call never came; calls so far: {before:?}"),
        }
    }

    /// The calls made so far and not yet looked at.
    fn calls_so_far(&mut self) -> Vec<Call> {
        std::iter::from_fn(|| self.calls.try_recv().ok()).collect()
    }
}

fn agent_runs(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Agent { prompt } => Some(prompt.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_newer_message_of_the_thread_stops_the_running_job_which_saves_its_work() {
    let mut h = Harness::start(|_| {}, RestartPolicy::default()).await;
    h.send("m1", "t", 1_000, "First edit [wait]");
    h.call(|c| matches!(c, Call::Agent { prompt } if prompt.contains("First")))
        .await;

    h.send("m2", "t", 2_000, "Second edit");

    let first = h.ended("m1").await;
    assert_eq!(first.event_type, EventType::Interrupted, "{first:?}");
    let second = h.ended("m2").await;
    assert_eq!(second.event_type, EventType::Completed, "{second:?}");
    assert_eq!(second.result.as_deref(), Some("done: Second edit"));
    // The stopped job saved its work (a commit that is not finished work) and pushed it,
    // before the newer one ran.
    let calls = h.calls_so_far();
    let saved = calls
        .iter()
        .position(
            |c| matches!(c, Call::Commit { subject, finished: false } if subject == SAVE_MESSAGE),
        )
        .unwrap_or_else(|| panic!("no saving commit: {calls:?}"));
    assert!(
        matches!(&calls[saved + 1], Call::Push { branch } if branch == "thread-t"),
        "{calls:?}"
    );
    assert_eq!(agent_runs(&calls[saved..]), ["Second edit"], "{calls:?}");
}

#[tokio::test]
async fn a_burst_into_one_thread_runs_as_one_batch() {
    let mut h = Harness::start(|_| {}, RestartPolicy::default()).await;
    h.send("m1", "t", 1_000, "Edit A [wait]");
    h.call(|c| matches!(c, Call::Agent { .. })).await;

    // Three more while the first runs: the first of them interrupts it, and all three wait
    // in the session's queue until it has ended.
    h.send("m2", "t", 2_000, "Edit B");
    h.send("m3", "t", 3_000, "Edit C");
    h.send("m4", "t", 4_000, "Edit D");

    assert_eq!(h.ended("m1").await.event_type, EventType::Interrupted);
    let events = [
        h.ended("m2").await,
        h.ended("m3").await,
        h.ended("m4").await,
    ];
    for event in &events {
        assert_eq!(event.event_type, EventType::Completed, "{event:?}");
    }
    // One agent run for the three, their requests in send order.
    let calls = h.calls_so_far();
    assert_eq!(
        agent_runs(&calls),
        ["Request 1 of 3:\nEdit B\n\nRequest 2 of 3:\nEdit C\n\nRequest 3 of 3:\nEdit D"],
        "{calls:?}"
    );
    // Its cost is reported once, by the first; the others name it.
    assert_eq!(events[0].cost_usd, Some(0.25));
    for event in &events[1..] {
        assert_eq!(event.cost_usd, Some(0.0));
        assert_eq!(event.cost_paid_by.as_deref(), Some("m2"));
    }
}

#[tokio::test]
async fn a_crashed_step_is_restarted_after_its_backoff_and_a_job_sent_meanwhile_waits_for_it() {
    let mut restarts = RestartPolicy::default();
    restarts.base_backoff = Duration::from_millis(300);
    // One delivery: a job that fails as `step_crashed` says so in a `failed` event instead of
    // going back to the queue unseen.
    let mut h = Harness::start(|c| c.max_receives = 1, restarts).await;
    h.send("m1", "t", 1_000, "Edit [panic]");
    let (panicked, _) = h.call(|c| matches!(c, Call::AgentPanics { .. })).await;
    let Call::AgentPanics { at: crashed } = panicked else {
        unreachable!()
    };
    let first = h.ended("m1").await;
    assert_eq!(first.event_type, EventType::Failed, "{first:?}");
    assert_eq!(
        first.error.as_ref().map(|e| e.kind.as_str()),
        Some("step_crashed")
    );

    // Sent while the agent step waits out its backoff: it must wait for the restarted agent,
    // not be handed the dead one and fail as `step_crashed` too (using up a delivery).
    h.send("m2", "t", 2_000, "Second edit");
    let second = h.ended("m2").await;
    assert_eq!(second.event_type, EventType::Completed, "{second:?}");

    let calls = h.calls_so_far();
    let restarted = calls
        .iter()
        .find_map(|c| match c {
            Call::Started {
                kind: StepKind::Agent,
                at,
            } => Some(*at),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the agent step was not restarted: {calls:?}"));
    assert!(
        restarted - crashed >= Duration::from_millis(300),
        "restarted {:?} after the crash, before its backoff",
        restarted - crashed
    );
    assert_eq!(agent_runs(&calls), ["Second edit"], "{calls:?}");
}

#[tokio::test]
async fn a_session_with_nothing_to_do_stops_its_steps_and_then_itself_after_its_idle_time() {
    let idle = Duration::from_millis(200);
    let mut h = Harness::start(|c| c.session_idle = idle, RestartPolicy::default()).await;
    h.send("m1", "t", 1_000, "Edit");
    assert_eq!(h.ended("m1").await.event_type, EventType::Completed);
    let ended = Instant::now();
    let sessions = h.supervisor.get_cell().get_children();
    assert_eq!(sessions.len(), 1);

    // The work ran out: the four step actors stop at once (an idle session is one actor).
    for _ in 0..4 {
        h.call(|c| matches!(c, Call::Stopped(_))).await;
    }
    // And after its idle time the session itself goes.
    tokio::time::timeout(PATIENCE, sessions[0].wait(None))
        .await
        .expect("the idle session stops")
        .expect("waited");
    assert!(
        ended.elapsed() >= idle,
        "stopped {:?} after its work ended, before its idle time",
        ended.elapsed()
    );
    let count = h
        .supervisor
        .call(SupervisorMsg::SessionCount, None)
        .await
        .expect("supervisor answers");
    assert!(matches!(count, ractor::rpc::CallResult::Success(0)));
}

/// Issue 25: a `Newer` notice is answered `Released` only once the lease is released. Here the
/// session keeps the lease between batches for queued work that waits for a step's restart;
/// the old session answered at once ("between batches the lease is not kept") while its lease
/// record still named it the holder, so the waiter found the lease held and waited on.
#[tokio::test]
async fn released_is_said_only_after_the_lease_is_released() {
    let mut restarts = RestartPolicy::default();
    // Long enough that the notice surely comes while the restart is pending.
    restarts.base_backoff = Duration::from_secs(3);
    let mut h = Harness::start_shared(|c| c.max_receives = 1, restarts).await;
    // m1 runs until stopped; m2 (older: it waits) crashes the agent; m3 (newer) stops m1.
    h.send("m1", "t1", 1_000, "First [wait]");
    h.call(|c| matches!(c, Call::Agent { prompt } if prompt.contains("[wait]")))
        .await;
    h.send("m2", "t2", 500, "Second [panic]");
    h.send("m3", "t3", 2_000, "Third");
    assert_eq!(h.ended("m1").await.event_type, EventType::Interrupted);
    let crashed = h.ended("m2").await;
    assert_eq!(
        crashed.error.as_ref().map(|e| e.kind.as_str()),
        Some("step_crashed")
    );
    // Now the session keeps the lease for m3, which waits for the agent's restart.
    let key = crate::contract::message::WorkspaceKey::of("amelia", "stamps");
    let session = h
        .supervisor
        .call(|r| SupervisorMsg::SessionOf(key.clone(), r), None)
        .await
        .expect("supervisor answers")
        .expect("answered")
        .expect("the session lives");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (running, kept) = session
            .call(crate::sessions::session::SessionMsg::Probe, None)
            .await
            .expect("session answers")
            .expect("answered");
        if !running && kept {
            break;
        }
        assert!(Instant::now() < deadline, "never kept between batches");
        tokio::task::yield_now().await;
    }
    // Another worker's message waits for the workspace.
    h.newer_elsewhere();
    h.released_and_free().await;
    // And the queued work still runs, after the waiter's turn.
    assert_eq!(h.ended("m3").await.event_type, EventType::Completed);
}

/// Issue 25, the notice protocol: a workspace that has no session here while this worker still
/// holds its lease (a failed session's batch runs on, detached, under it) is answered
/// `Released` only once that lease is released. The old supervisor answered at once ("nothing
/// here holds the workspace"), and the waiter found the lease held.
#[tokio::test]
async fn released_waits_for_a_lease_held_here_without_a_session() {
    let mut h = Harness::start_shared(|_| {}, RestartPolicy::default()).await;
    let key = crate::contract::message::WorkspaceKey::of("amelia", "stamps");
    let crate::delivery::lease::Acquired::Granted(lease) =
        h.leases.try_acquire(&key).await.expect("the store answers")
    else {
        panic!("a free workspace is granted");
    };
    h.newer_elsewhere();
    let notices = h.notices.as_mut().expect("tapped");
    // Nothing to wait for here but the absence of an answer: the old supervisor's came at
    // once, well within this.
    let early = tokio::time::timeout(Duration::from_millis(500), notices.recv()).await;
    assert!(
        early.is_err(),
        "answered while the lease is held here: {early:?}"
    );
    lease.release().await;
    h.released_and_free().await;
}
