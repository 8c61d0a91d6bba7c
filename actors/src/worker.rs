//! The whole worker, put together: the supervisor, the intake, and a graceful shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::Actor;
use tokio_util::sync::CancellationToken;

use crate::batch::context::WorkerContext;
use crate::config::WorkerConfig;
use crate::contract::status::StatusSink;
use crate::delivery::Delivery;
use crate::delivery::lease::{LeaseConfig, Leases};
use crate::delivery::notices::{NoticeQueue, NoticeSender};
use crate::delivery::records::RecordStore;
use crate::intake::{self, InFlightRegistry, IntakeEnd, IntakeError};
use crate::sessions::restart::RestartPolicy;
use crate::sessions::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use crate::steps::RealSteps;
use crate::steps::build::BuildSpec;
use crate::steps::publish::Publisher;
use crate::tenant::sandbox::Sandbox;

/// SQS keeps a message 14 days at most: an outcome record older than that is never needed.
const RECORD_RETENTION: Duration = Duration::from_secs(15 * 24 * 3600);

/// How `run` should end, besides a signal (how long a shutdown may take is a setting:
/// `WorkerConfig::shutdown_deadline`).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Exit when the queue has been empty and nothing has run for this long.
    pub exit_when_idle: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("could not start the supervisor: {0}")]
    Spawn(#[from] ractor::SpawnErr),
    #[error(transparent)]
    Intake(#[from] IntakeError),
    /// `BROWSER_CHECK=on` and no Chromium.
    #[error("BROWSER_CHECK=on: {0}")]
    Browser(#[from] crate::steps::check::browser::BrowserError),
    /// Another live process has this `WORKER_ID` (`presence.rs`): refused at start, or found
    /// later (then this worker shut down first).
    #[error(transparent)]
    WorkerIdInUse(#[from] crate::delivery::presence::PresenceError),
}

impl WorkerError {
    /// A configuration error (exit code 2), not a failure of the worker.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            WorkerError::WorkerIdInUse(crate::delivery::presence::PresenceError::InUse { .. })
        )
    }
}

/// Run until `shutdown` is cancelled or the worker has been idle for the configured time.
pub async fn run(
    config: WorkerConfig,
    sqs: aws_sdk_sqs::Client,
    s3: aws_sdk_s3::Client,
    cloudfront: Option<aws_sdk_cloudfront::Client>,
    sandbox: Arc<Sandbox>,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<IntakeEnd, WorkerError> {
    let sqs_client = sqs.clone();
    let status = StatusSink::new(sqs.clone(), config.output_queue_url.clone());
    let location = config.record_location();
    if config.lease_store.is_none() {
        tracing::warn!(records = %location, "no LEASE_STORE: this worker assumes it is alone on its queue");
    } else {
        tracing::info!(records = %location, worker = %config.worker_id, "records shared through the lease store");
    }
    if config.build.ahead_max > 0 && !config.build.scripts_without_npm {
        // A build started ahead runs the script's words itself; with npm running scripts there
        // are no words to run, so BUILD_AHEAD_MAX would do nothing without a word.
        tracing::warn!(
            build_ahead_max = config.build.ahead_max,
            "BUILD_SCRIPTS_WITHOUT_NPM=false: no build is started ahead, whatever BUILD_AHEAD_MAX says"
        );
    }
    let records = RecordStore::new(&location, &s3, &config.worker_id);
    {
        // An outcome older than SQS's longest retention can no longer meet its message.
        let records = records.clone();
        tokio::spawn(async move {
            match records.forget_older_than(RECORD_RETENTION).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "forgot outcome records past retention"),
                Err(e) => tracing::warn!(error = %e, "could not forget old outcome records"),
            }
        });
    }
    let delivery = Delivery::new(
        sqs,
        config.input_queue_url.clone(),
        config.dead_letter_queue_url.clone(),
        status,
        config.visibility_timeout,
        records,
    )
    .with_hold_undecided(config.hold_undecided);
    // The queue's redrive: a message on its last delivery is never given back (it would reach
    // the dead-letter queue with no event), and a passing failure is final by then.
    let mut config = config;
    let redrive_limit = match delivery.read_redrive_limit().await {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the input queue's redrive policy; assuming it has none");
            None
        }
    };
    if let Some(limit) = redrive_limit {
        if config.max_receives > limit {
            tracing::warn!(
                max_receives = config.max_receives,
                redrive_max_receive_count = limit,
                "MAX_RECEIVES is above the input queue's maxReceiveCount; a passing failure is final at the queue's count"
            );
            config.max_receives = limit;
        }
        tracing::info!(
            redrive_max_receive_count = limit,
            "the input queue's redrive policy"
        );
    }
    let delivery = delivery.with_redrive_limit(redrive_limit);
    let agent = config.agent.clone();
    let build = BuildSpec::from_config(&config, sandbox.clone());
    let check_s3 = s3.clone();
    let publisher = Publisher::new(s3, config.publish.clone());
    let registry = InFlightRegistry::new(
        config.max_in_flight,
        config.max_held_per_workspace,
        config.max_held_per_client,
    );
    let mut ctx = WorkerContext::new(
        config,
        delivery,
        cloudfront.map(crate::steps::publish::invalidate::Invalidator::new),
        build.clone(),
    );
    ctx.sandbox = sandbox;
    // The browser check: one browser for the worker, started at the first check.
    if let Some(bin) = ctx.config.check.browser_bin()? {
        tracing::info!(chromium = %bin.display(), max_pages = ctx.config.check.max_pages, "publishes are checked in a browser");
        let browser = crate::steps::check::browser::Browser::new(bin, ctx.sandbox.clone());
        // Started now rather than at the first publish: the first check finds it warm. One that
        // does not start is said here, and tried again at each check.
        let warm = browser.clone();
        tokio::spawn(async move {
            if let Err(e) = warm.running().await {
                tracing::warn!(error = %e, "the browser for the checks did not start; publishes go unchecked until it does");
            }
        });
        ctx.checker = Some(Arc::new(crate::steps::check::Checker::new(
            browser,
            check_s3,
            ctx.config.check.max_pages,
        )));
    }
    // With a lease store, workspaces are leased and other workers reach this one through its
    // notice queue.
    let mut notice_queue = None;
    let mut presence = None;
    if ctx.delivery.records.is_shared() {
        // One live process per WORKER_ID: records, marks and leases know a worker by it.
        presence = Some(
            crate::delivery::presence::Presence::claim(
                ctx.delivery.records.clone(),
                &ctx.config.worker_id,
                None,
            )
            .await
            .map_err(|e| match e {
                crate::delivery::presence::PresenceError::Store(e) => {
                    // The store away at start: the worker runs (its leases retry), unchecked.
                    tracing::error!(error = %e, "could not claim this worker's presence in the lease store; a second process with this WORKER_ID goes unnoticed");
                    None
                }
                in_use => Some(in_use),
            }),
        );
        if let Some(Err(Some(e))) = presence {
            return Err(e.into());
        }
        let leases = Leases::shared(
            ctx.delivery.records.clone(),
            LeaseConfig {
                duration: ctx.config.lease_duration,
                worker: ctx.config.worker_id.clone(),
            },
        );
        match NoticeQueue::create(
            sqs_client.clone(),
            &ctx.config.input_queue_url,
            &ctx.config.worker_id,
        )
        .await
        {
            Ok(queue) => {
                leases.set_notice_queue(queue.url().to_owned());
                if let Some(Ok(presence)) = &mut presence {
                    presence.set_notices(queue.url().to_owned());
                }
                ctx.notice_url = Some(queue.url().to_owned());
                notice_queue = Some(queue);
            }
            // Leases still hold: a waiter then only learns by polling (slower handovers).
            Err(e) => {
                tracing::error!(error = %e, "no notice queue: newer messages reach this worker's work only when its lease ends")
            }
        }
        ctx.notices = Some(NoticeSender::new(sqs_client.clone()));
        ctx.leases = leases;
    }
    let step_factory = Arc::new(RealSteps::new(ctx.config.clone(), agent, build, publisher));
    let ctx = Arc::new(ctx);
    let (supervisor, supervisor_done) = Actor::spawn(
        None,
        Supervisor,
        SupervisorArgs {
            ctx: ctx.clone(),
            step_factory,
            restarts: RestartPolicy::default(),
            step_restarts: RestartPolicy::default(),
        },
    )
    .await?;

    // The presence renewed while the worker runs; a second live process with this WORKER_ID
    // found at a renewal stops this one, as a signal would.
    let presence_stop = CancellationToken::new();
    let duplicate = CancellationToken::new();
    let presence_kept = match presence {
        Some(Ok(presence)) => Some(tokio::spawn(
            presence.keep(presence_stop.clone(), duplicate.clone()),
        )),
        _ => None,
    };
    let intake_stop = CancellationToken::new();
    {
        let (shutdown, duplicate, intake_stop) =
            (shutdown.clone(), duplicate.clone(), intake_stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = duplicate.cancelled() => {}
            }
            intake_stop.cancel();
        });
    }
    // Notice queues of workers killed before they could delete theirs.
    if ctx.delivery.records.is_shared() {
        let (sqs, records, input, own) = (
            sqs_client.clone(),
            ctx.delivery.records.clone(),
            ctx.config.input_queue_url.clone(),
            ctx.notice_url.clone(),
        );
        tokio::spawn(async move {
            match crate::delivery::presence::sweep_notice_queues(
                &sqs,
                &records,
                &input,
                own.as_deref(),
            )
            .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    removed = n,
                    "deleted notice queues of workers that are gone"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for dead workers' notice queues")
                }
            }
        });
    }

    let notices_stop = CancellationToken::new();
    let notices_served = notice_queue.map(|queue| {
        let supervisor = supervisor.clone();
        let stop = notices_stop.clone();
        tokio::spawn(queue.serve(
            move |notice| {
                let _ = supervisor.cast(SupervisorMsg::Notice(notice));
            },
            stop,
        ))
    });

    let mut end = intake::run_intake(
        ctx.clone(),
        supervisor.clone(),
        registry.clone(),
        options.exit_when_idle,
        intake_stop,
    )
    .await;

    if let Ok(IntakeEnd::Shutdown(poll)) = &mut end {
        tracing::info!(
            in_flight = registry.in_flight(),
            "shutting down: saving running work and releasing messages"
        );
        let deadline = Instant::now() + ctx.config.shutdown_deadline;
        // Parked messages never started: back to the queue at once, for the next worker.
        for job in registry.take_parked() {
            job.release(&ctx.delivery, Duration::ZERO, "shutdown").await;
        }
        let stopped = supervisor.call(SupervisorMsg::Shutdown, Some(ctx.config.shutdown_deadline));
        if !matches!(stopped.await, Ok(ractor::rpc::CallResult::Success(()))) {
            tracing::warn!("sessions did not all stop before the deadline");
        }
        // The poll that was under way ends within its wait time and gives back what it got.
        if let Some(poll) = poll.take() {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, poll).await.is_err() {
                tracing::warn!("the last poll did not end before the deadline");
            }
        }
        // Jobs release their slot when they have reported or released their message.
        while registry.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if registry.in_flight() > 0 {
            tracing::warn!(
                in_flight = registry.in_flight(),
                "exiting with work in flight; those messages return after their visibility timeout"
            );
        }
    }
    supervisor.stop(None);
    let _ = supervisor_done.await;
    let (reads, writes) = ctx.delivery.records.calls();
    tracing::info!(
        records = %ctx.config.record_location(),
        reads,
        writes,
        "record store calls"
    );
    // Sessions have released their leases; the notice queue goes with the worker.
    notices_stop.cancel();
    if let Some(served) = notices_served
        && let Ok(queue) = served.await
        && !duplicate.is_cancelled()
    {
        // Not when another process with this id owns the queue (and the presence) now.
        queue.delete().await;
    }
    presence_stop.cancel();
    if let Some(kept) = presence_kept {
        let _ = kept.await;
    }
    if duplicate.is_cancelled() {
        return Err(WorkerError::WorkerIdInUse(
            crate::delivery::presence::PresenceError::InUse {
                worker: ctx.config.worker_id.clone(),
            },
        ));
    }
    Ok(end?)
}
