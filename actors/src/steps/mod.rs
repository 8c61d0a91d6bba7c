//! # The steps folder
//!
//! Owns the step actors (here) and what each runs: `agent/`, `git/`, `build/`, `publish/`,
//! `check/`, and the slots that bound agents and builds. A step knows nothing of batches or
//! sessions: it may use `delivery` (leases, records), `tenant`, and the leaves.
//!
//! # The step actors
//!
//! The session's steps: git, agent, build, publisher. Each runs in an actor of one shape
//! (`StepActor`), around a handler that does the work: the real one (`Workspace`, `AgentSpec`,
//! `BuildSpec`, `Publisher`) or, in tests, a fake, made by the `StepFactory` the session is
//! given.
//!
//! Each serves exactly one caller at a time (its session's running job), so a handler may await
//! its operation to the end: nothing else waits in its mailbox. Stopping long work never goes
//! through a mailbox either: the job's `StopSignal` token reaches the running operation directly.
//! What an actor buys us is isolation: a step that panics takes down only its actor, which the
//! session restarts (`Steps::respawn`), and the job that asked sees `StepCrashed`.

pub(crate) mod agent;
pub mod build;
pub mod check;
pub mod git;
pub mod publish;
pub(crate) mod slots;
use std::marker::PhantomData;
use std::path::PathBuf;

use futures::future::BoxFuture;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SpawnErr,
    rpc::CallResult,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::contract::message::RollbackTarget;
use crate::contract::message::WorkspaceKey;
use crate::contract::status::PublishReport;
use crate::steps::agent::{AgentActivity, AgentError, AgentReport, AgentSpec, Conversation};
use crate::steps::build::prepared_build::PreparedBuild;
use crate::steps::build::{BuildError, BuildReport, BuildSpec};
use crate::steps::git::{Fence, GitError, SavedWork, Workspace};
use crate::steps::publish::deploys::{DeployMeta, DeployRecord, ResolvedDeploy};
use crate::steps::publish::{BucketFence, PublishError, Publisher};
use crate::tenant::sandbox::Jail;

// ---------------------------------------------------------------- the shape of a step

/// The kinds of step a session has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepKind {
    Git,
    Agent,
    Build,
    Publisher,
}

impl StepKind {
    /// Its name in errors (`the git step crashed`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            StepKind::Git => "git",
            StepKind::Agent => "agent",
            StepKind::Build => "build",
            StepKind::Publisher => "publisher",
        }
    }
}

/// What a step does with each message it is asked: the real work, or a test's fake. The
/// answer goes back through the reply port inside the message.
pub(crate) trait StepHandler<M>: Send + 'static {
    fn handle(&mut self, msg: M) -> BoxFuture<'_, ()>;
}

/// Makes the handlers of a session's steps, for its workspace: `RealSteps` in the worker;
/// fakes in tests, so that a session runs without git, an agent, a build or S3.
pub(crate) trait StepFactory: Send + Sync + 'static {
    fn git(&self, key: &WorkspaceKey) -> Box<dyn StepHandler<GitMsg>>;
    fn agent(&self, key: &WorkspaceKey) -> Box<dyn StepHandler<AgentMsg>>;
    fn build(&self, key: &WorkspaceKey) -> Box<dyn StepHandler<BuildMsg>>;
    fn publisher(&self, key: &WorkspaceKey) -> Box<dyn StepHandler<PublisherMsg>>;
}

/// The one actor every step runs in: it hands each message to its handler.
struct StepActor<M>(PhantomData<fn() -> M>);

impl<M: ractor::Message> Actor for StepActor<M> {
    type Msg = M;
    type State = Box<dyn StepHandler<M>>;
    type Arguments = Box<dyn StepHandler<M>>;

    async fn pre_start(
        &self,
        _myself: ActorRef<M>,
        handler: Box<dyn StepHandler<M>>,
    ) -> Result<Box<dyn StepHandler<M>>, ActorProcessingErr> {
        Ok(handler)
    }

    async fn handle(
        &self,
        _myself: ActorRef<M>,
        msg: M,
        handler: &mut Box<dyn StepHandler<M>>,
    ) -> Result<(), ActorProcessingErr> {
        handler.handle(msg).await;
        Ok(())
    }
}

/// A step actor died before it answered: a panic in the step (the session restarts it).
#[derive(Debug, thiserror::Error)]
#[error("the {0} step crashed")]
pub(crate) struct StepCrashed(pub(crate) &'static str);

/// One step, as the job sees it.
pub(crate) struct Step<M> {
    kind: StepKind,
    actor: ActorRef<M>,
}

impl<M> Clone for Step<M> {
    fn clone(&self) -> Self {
        Step {
            kind: self.kind,
            actor: self.actor.clone(),
        }
    }
}

impl<M: ractor::Message> Step<M> {
    /// Start the step's actor around `handler`, linked to its session (`owner`), which hears
    /// when it fails.
    async fn spawn(
        kind: StepKind,
        handler: Box<dyn StepHandler<M>>,
        owner: ActorCell,
    ) -> Result<Step<M>, SpawnErr> {
        let (actor, _) = Actor::spawn_linked(None, StepActor(PhantomData), handler, owner).await?;
        Ok(Step { kind, actor })
    }

    /// Its actor has died (stopping or stopped).
    fn is_dead(&self) -> bool {
        matches!(
            self.actor.get_status(),
            ActorStatus::Stopping | ActorStatus::Stopped
        )
    }

    /// Ask the step and wait for its answer. A step that dies before answering is a crash.
    pub(crate) async fn ask<T: Send + 'static>(
        &self,
        message: impl FnOnce(RpcReplyPort<T>) -> M,
    ) -> Result<T, StepCrashed> {
        match self.actor.call(message, None).await {
            Ok(CallResult::Success(answer)) => Ok(answer),
            _ => Err(StepCrashed(self.kind.name())),
        }
    }
}

/// A session's steps.
#[derive(Clone)]
pub(crate) struct Steps {
    pub(crate) git: Step<GitMsg>,
    pub(crate) agent: Step<AgentMsg>,
    pub(crate) build: Step<BuildMsg>,
    pub(crate) publisher: Step<PublisherMsg>,
}

impl Steps {
    /// Start every step of workspace `key`, linked to its session (`owner`).
    pub(crate) async fn spawn(
        factory: &dyn StepFactory,
        key: &WorkspaceKey,
        owner: ActorCell,
    ) -> Result<Steps, SpawnErr> {
        Ok(Steps {
            git: Step::spawn(StepKind::Git, factory.git(key), owner.clone()).await?,
            agent: Step::spawn(StepKind::Agent, factory.agent(key), owner.clone()).await?,
            build: Step::spawn(StepKind::Build, factory.build(key), owner.clone()).await?,
            publisher: Step::spawn(StepKind::Publisher, factory.publisher(key), owner).await?,
        })
    }

    /// Start step `kind` anew (it died), with a new handler.
    pub(crate) async fn respawn(
        &mut self,
        kind: StepKind,
        factory: &dyn StepFactory,
        key: &WorkspaceKey,
        owner: ActorCell,
    ) -> Result<(), SpawnErr> {
        match kind {
            StepKind::Git => self.git = Step::spawn(kind, factory.git(key), owner).await?,
            StepKind::Agent => self.agent = Step::spawn(kind, factory.agent(key), owner).await?,
            StepKind::Build => self.build = Step::spawn(kind, factory.build(key), owner).await?,
            StepKind::Publisher => {
                self.publisher = Step::spawn(kind, factory.publisher(key), owner).await?
            }
        }
        Ok(())
    }

    /// Which of these steps the actor `id` is, if any.
    pub(crate) fn kind_of(&self, id: ActorId) -> Option<StepKind> {
        [
            (self.git.actor.get_id(), StepKind::Git),
            (self.agent.actor.get_id(), StepKind::Agent),
            (self.build.actor.get_id(), StepKind::Build),
            (self.publisher.actor.get_id(), StepKind::Publisher),
        ]
        .into_iter()
        .find_map(|(step, kind)| (step == id).then_some(kind))
    }

    /// Some step's actor has died: its restart is waiting out its backoff, or its failure is
    /// still on its way to the session.
    pub(crate) fn any_dead(&self) -> bool {
        self.git.is_dead()
            || self.agent.is_dead()
            || self.build.is_dead()
            || self.publisher.is_dead()
    }

    /// Stop every step's actor.
    pub(crate) fn stop(&self) {
        self.git.actor.stop(None);
        self.agent.actor.stop(None);
        self.build.actor.stop(None);
        self.publisher.actor.stop(None);
    }
}

// ---------------------------------------------------------------- the real steps

/// The real steps of the worker: git in the workspace's checkout, the agent CLI, the build,
/// the publisher.
pub(crate) struct RealSteps {
    config: WorkerConfig,
    agent: AgentSpec,
    build: BuildSpec,
    publisher: Publisher,
}

impl RealSteps {
    pub(crate) fn new(
        config: WorkerConfig,
        agent: AgentSpec,
        build: BuildSpec,
        publisher: Publisher,
    ) -> RealSteps {
        RealSteps {
            config,
            agent,
            build,
            publisher,
        }
    }
}

impl StepFactory for RealSteps {
    fn git(&self, key: &WorkspaceKey) -> Box<dyn StepHandler<GitMsg>> {
        Box::new(Workspace::new(
            self.config.workspace_dir(key),
            self.config.remote_for(key),
            self.config.build.output_dir.clone(),
        ))
    }

    fn agent(&self, _key: &WorkspaceKey) -> Box<dyn StepHandler<AgentMsg>> {
        Box::new(self.agent.clone())
    }

    fn build(&self, _key: &WorkspaceKey) -> Box<dyn StepHandler<BuildMsg>> {
        Box::new(self.build.clone())
    }

    fn publisher(&self, _key: &WorkspaceKey) -> Box<dyn StepHandler<PublisherMsg>> {
        Box::new(self.publisher.clone())
    }
}

/// Test-only switch (cargo feature `fault-injection`): panic in the named step when the
/// environment variable `EDIT_WORKER_FAULT` names it (`git.commit`, `agent.run`, `build.run`,
/// `publish.run`), once per marker file, so the retry after the restart succeeds.
#[cfg(feature = "fault-injection")]
fn maybe_fault(step: &str) {
    let Ok(spec) = std::env::var("EDIT_WORKER_FAULT") else {
        return;
    };
    // Format: `step[,step...]@marker-dir`: the marker dir records which faults already fired.
    let (steps, dir) = spec.split_once('@').unwrap_or((spec.as_str(), "/tmp"));
    if steps.split(',').any(|s| s == step) {
        let marker = std::path::Path::new(dir).join(format!("fault-{step}"));
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_ok()
        {
            panic!("fault injected at {step}");
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
fn maybe_fault(_step: &str) {}

// ---------------------------------------------------------------- git

pub(crate) enum GitMsg {
    /// The batch that starts now works under the lease whose end cancels `lost`: a `git` call
    /// still running then is killed, and none starts after (issue 25).
    WorkUnder {
        lost: CancellationToken,
        reply: RpcReplyPort<()>,
    },
    /// Take the workspace over from another worker: move the fence, set leftovers aside.
    TakeOver {
        fence: Fence,
        reply: RpcReplyPort<Result<(), GitError>>,
    },
    /// Check out the thread's branch, saving unfinished work of what was checked out.
    PrepareThread {
        branch: String,
        message_id: String,
        /// The first work after a takeover: the upstream is right, local-only commits are not.
        trust_upstream: bool,
        reply: RpcReplyPort<Result<Option<SavedWork>, GitError>>,
    },
    /// The commit an earlier delivery of this message already made, if any.
    CommitOfMessage {
        branch: String,
        message_id: String,
        reply: RpcReplyPort<Result<Option<String>, GitError>>,
    },
    /// Stage everything and commit; `None` when nothing changed.
    CommitAll {
        subject: String,
        body: String,
        /// Every message whose work this commit holds (one trailer each).
        message_ids: Vec<String>,
        /// The message's finished work, or work saved half-way.
        finished: bool,
        reply: RpcReplyPort<Result<Option<String>, GitError>>,
    },
    HeadCommit {
        reply: RpcReplyPort<Result<String, GitError>>,
    },
    /// Commit `Rollback to {short}` on the current branch whose tree is `target`'s, and make
    /// the worktree hold that tree. Returns the new commit.
    RollbackTo {
        target: String,
        message_id: String,
        reply: RpcReplyPort<Result<String, GitError>>,
    },
    Push {
        branch: String,
        attempts: u32,
        /// The lease's fence, when workers share the queue.
        fence: Option<Fence>,
        reply: RpcReplyPort<Result<(), GitError>>,
    },
    /// Keep `branch`'s tip on the upstream under `refs/edit-worker/saved/{branch}/{message_id}`
    /// (saved work whose branch push failed). Returns the ref.
    PushSaved {
        branch: String,
        message_id: String,
        reply: RpcReplyPort<Result<String, GitError>>,
    },
}

/// Owns the workspace's git. One per session, so two git operations on one checkout never
/// overlap.
impl StepHandler<GitMsg> for Workspace {
    fn handle(&mut self, msg: GitMsg) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let ws = self;
            match msg {
                GitMsg::WorkUnder { lost, reply } => {
                    ws.work_under(lost);
                    let _ = reply.send(());
                }
                GitMsg::TakeOver { fence, reply } => {
                    let _ = reply.send(ws.take_over(&fence).await);
                }
                GitMsg::PrepareThread {
                    branch,
                    message_id,
                    trust_upstream,
                    reply,
                } => {
                    maybe_fault("git.prepare");
                    let _ = reply.send(
                        ws.prepare_thread(&branch, &message_id, trust_upstream)
                            .await,
                    );
                }
                GitMsg::CommitOfMessage {
                    branch,
                    message_id,
                    reply,
                } => {
                    let _ = reply.send(ws.commit_of_message(&branch, &message_id).await);
                }
                GitMsg::CommitAll {
                    subject,
                    body,
                    message_ids,
                    finished,
                    reply,
                } => {
                    maybe_fault("git.commit");
                    let _ =
                        reply.send(ws.commit_all(&subject, &body, &message_ids, finished).await);
                }
                GitMsg::HeadCommit { reply } => {
                    let _ = reply.send(ws.head_commit().await);
                }
                GitMsg::RollbackTo {
                    target,
                    message_id,
                    reply,
                } => {
                    let _ = reply.send(ws.rollback_to(&target, &message_id).await);
                }
                GitMsg::Push {
                    branch,
                    attempts,
                    fence,
                    reply,
                } => {
                    maybe_fault("git.push");
                    let _ = reply.send(ws.push(&branch, attempts, fence.as_ref()).await);
                }
                GitMsg::PushSaved {
                    branch,
                    message_id,
                    reply,
                } => {
                    let _ = reply.send(ws.push_saved(&branch, &message_id).await);
                }
            }
        })
    }
}

// ---------------------------------------------------------------- agent

pub(crate) enum AgentMsg {
    Run {
        /// Where it runs: the workspace's sandbox.
        jail: Jail,
        cwd: PathBuf,
        prompt: String,
        /// The thread's conversation.
        conversation: Conversation,
        /// Stops the run from outside (interrupt, shutdown).
        stop: CancellationToken,
        /// What the agent is doing, as it happens.
        activity: UnboundedSender<AgentActivity>,
        reply: RpcReplyPort<Result<AgentReport, AgentError>>,
    },
}

impl StepHandler<AgentMsg> for AgentSpec {
    fn handle(&mut self, msg: AgentMsg) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let AgentMsg::Run {
                jail,
                cwd,
                prompt,
                conversation,
                stop,
                activity,
                reply,
            } = msg;
            maybe_fault("agent.run");
            let outcome = agent::run_agent(self, &jail, &cwd, &prompt, &conversation, &stop, |a| {
                let _ = activity.send(a);
            })
            .await;
            let _ = reply.send(outcome);
        })
    }
}

// ---------------------------------------------------------------- build

pub(crate) enum BuildMsg {
    Build {
        /// Where installs and the build run: the workspace's sandbox.
        jail: Jail,
        dir: PathBuf,
        state_dir: PathBuf,
        /// The build's Node process, started while the agent worked, if any.
        prepared: Option<PreparedBuild>,
        stop: CancellationToken,
        reply: RpcReplyPort<Result<BuildReport, BuildError>>,
    },
}

impl StepHandler<BuildMsg> for BuildSpec {
    fn handle(&mut self, msg: BuildMsg) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let BuildMsg::Build {
                jail,
                dir,
                state_dir,
                prepared,
                stop,
                reply,
            } = msg;
            maybe_fault("build.run");
            let built = build::build_site(self, &jail, &dir, &state_dir, prepared, &stop).await;
            let _ = reply.send(built);
        })
    }
}

// ---------------------------------------------------------------- publisher

pub(crate) enum PublisherMsg {
    Publish {
        /// The workspace the bucket must belong to (its owner record).
        workspace: WorkspaceKey,
        bucket: String,
        build_dir: PathBuf,
        /// The lease's fence in the bucket, when workers share the queue.
        fence: Option<BucketFence>,
        /// What the deploy's record says besides its files.
        deploy: DeployMeta,
        reply: RpcReplyPort<Result<PublishReport, PublishError>>,
    },
    /// Find the deploy a rollback names.
    Resolve {
        workspace: WorkspaceKey,
        bucket: String,
        target: RollbackTarget,
        reply: RpcReplyPort<Result<ResolvedDeploy, PublishError>>,
    },
    /// Make the bucket hold `target`'s files again (a rollback), recorded as `deploy`.
    Restore {
        workspace: WorkspaceKey,
        bucket: String,
        target: Box<DeployRecord>,
        fence: Option<BucketFence>,
        deploy: DeployMeta,
        reply: RpcReplyPort<Result<PublishReport, PublishError>>,
    },
}

impl StepHandler<PublisherMsg> for Publisher {
    fn handle(&mut self, msg: PublisherMsg) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match msg {
                PublisherMsg::Publish {
                    workspace,
                    bucket,
                    build_dir,
                    fence,
                    deploy,
                    reply,
                } => {
                    maybe_fault("publish.run");
                    let _ = reply.send(
                        self.publish_for(&workspace, &bucket, &build_dir, fence.as_ref(), &deploy)
                            .await,
                    );
                }
                PublisherMsg::Resolve {
                    workspace,
                    bucket,
                    target,
                    reply,
                } => {
                    let _ = reply.send(self.resolve_deploy(&workspace, &bucket, &target).await);
                }
                PublisherMsg::Restore {
                    workspace,
                    bucket,
                    target,
                    fence,
                    deploy,
                    reply,
                } => {
                    maybe_fault("publish.restore");
                    let _ = reply.send(
                        self.restore(&workspace, &bucket, &target, &deploy, fence.as_ref())
                            .await,
                    );
                }
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod fake;
