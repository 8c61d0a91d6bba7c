//! The session with fake steps (`steps::fake`), in milliseconds, without git, an agent, a
//! build, S3 or SQS. The real supervisor and
//! job runner run; what they report is read from the status events, what the steps were asked
//! from the fakes' calls. Tests wait on those, never on time; the timeouts only keep a broken
//! test from hanging.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::build::BuildSpec;
use crate::config::WorkerConfig;
use crate::context::WorkerContext;
use crate::delivery::Delivery;
use crate::job::{Job, Receipt, Renewal};
use crate::message::{DEFAULT_MAX_COMMAND_BYTES, EditRequest};
use crate::records::RecordStore;
use crate::restart::RestartPolicy;
use crate::status::{EventType, StatusEvent, StatusSink};
use crate::steps::StepKind;
use crate::steps::fake::{Call, FakeSteps};
use crate::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};

/// Longest a test waits for anything before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// A worker without its intake: the supervisor, with fake steps, fed jobs by the test.
struct Harness {
    supervisor: ractor::ActorRef<SupervisorMsg>,
    events: UnboundedReceiver<StatusEvent>,
    /// Terminal events received so far, by message id.
    ended: HashMap<String, StatusEvent>,
    calls: UnboundedReceiver<Call>,
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
            command: config.build_command.clone(),
            output_dir: config.build_output_dir.clone(),
            scripts_without_npm: true,
            timeout: config.build_timeout,
            store: None,
        };
        let ctx = Arc::new(WorkerContext::new(config, delivery, None, build));
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
            _root: root,
        }
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
        let job = Job {
            request,
            message_id: id.into(),
            receipt: Receipt::new(format!("receipt-{id}")),
            sent_at_ms,
            received_at: std::time::Instant::now(),
            receive_count: 1,
            trace_id: None,
            span: tracing::Span::none(),
            renewal: Renewal::none(),
            slot: None,
        };
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
