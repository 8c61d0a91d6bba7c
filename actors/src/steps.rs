//! The session's helpers, one actor per kind of step: git, agent, build, publisher.
//!
//! Each serves exactly one caller at a time (its session's running job), so a handler may await
//! its operation to the end: nothing else waits in its mailbox. Stopping long work never goes
//! through a mailbox either: the job's `StopSignal` token reaches the running operation directly.
//! What an actor buys us is isolation: a step that panics takes down only its actor, which the
//! session restarts, and the job that asked sees the reply port dropped.

use std::path::PathBuf;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, rpc::CallResult};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentActivity, AgentError, AgentReport, AgentSession, AgentSpec};
use crate::build::{self, BuildError, BuildReport, BuildSpec};
use crate::git::{Fence, GitError, SavedWork, Workspace};
use crate::message::WorkspaceKey;
use crate::publish::{BucketFence, PublishError, PublishReport, Publisher};
use crate::sandbox::Jail;

/// A session's step actors, as the job sees them.
#[derive(Clone)]
pub(crate) struct Steps {
    pub(crate) git: ActorRef<GitMsg>,
    pub(crate) agent: ActorRef<AgentMsg>,
    pub(crate) build: ActorRef<BuildMsg>,
    pub(crate) publisher: ActorRef<PublisherMsg>,
}

/// A step actor died before it answered: a panic in the step (the session restarts it).
#[derive(Debug, thiserror::Error)]
#[error("the {0} step crashed")]
pub(crate) struct StepCrashed(pub(crate) &'static str);

/// Ask a step actor and wait for its answer. A step that dies before answering is a crash.
pub(crate) async fn ask<M, T>(
    actor: &ActorRef<M>,
    step: &'static str,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, StepCrashed>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(build, None).await {
        Ok(CallResult::Success(answer)) => Ok(answer),
        _ => Err(StepCrashed(step)),
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

pub enum GitMsg {
    /// Check out the thread's branch, saving unfinished work of what was checked out.
    /// Take the workspace over from another worker: move the fence, set leftovers aside.
    TakeOver {
        fence: Fence,
        reply: RpcReplyPort<Result<(), GitError>>,
    },
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
    Push {
        branch: String,
        attempts: u32,
        /// The lease's fence, when workers share the queue.
        fence: Option<Fence>,
        reply: RpcReplyPort<Result<(), GitError>>,
    },
}

/// Owns the workspace's git. One per session, so two git operations on one checkout never
/// overlap.
pub struct GitActor;

impl Actor for GitActor {
    type Msg = GitMsg;
    type State = Workspace;
    type Arguments = Workspace;

    async fn pre_start(
        &self,
        _myself: ActorRef<GitMsg>,
        workspace: Workspace,
    ) -> Result<Workspace, ActorProcessingErr> {
        Ok(workspace)
    }

    async fn handle(
        &self,
        _myself: ActorRef<GitMsg>,
        msg: GitMsg,
        ws: &mut Workspace,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
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
                let _ = reply.send(ws.commit_all(&subject, &body, &message_ids, finished).await);
            }
            GitMsg::HeadCommit { reply } => {
                let _ = reply.send(ws.head_commit().await);
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
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- agent

pub enum AgentMsg {
    Run {
        /// Where it runs: the workspace's sandbox.
        jail: Jail,
        cwd: PathBuf,
        prompt: String,
        /// The thread's conversation.
        session: AgentSession,
        /// Stops the run from outside (interrupt, shutdown).
        stop: CancellationToken,
        /// What the agent is doing, as it happens.
        activity: UnboundedSender<AgentActivity>,
        reply: RpcReplyPort<Result<AgentReport, AgentError>>,
    },
}

pub struct AgentActor;

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentSpec;
    type Arguments = AgentSpec;

    async fn pre_start(
        &self,
        _myself: ActorRef<AgentMsg>,
        spec: AgentSpec,
    ) -> Result<AgentSpec, ActorProcessingErr> {
        Ok(spec)
    }

    async fn handle(
        &self,
        _myself: ActorRef<AgentMsg>,
        msg: AgentMsg,
        spec: &mut AgentSpec,
    ) -> Result<(), ActorProcessingErr> {
        let AgentMsg::Run {
            jail,
            cwd,
            prompt,
            session,
            stop,
            activity,
            reply,
        } = msg;
        maybe_fault("agent.run");
        let outcome = agent::run_agent(spec, &jail, &cwd, &prompt, &session, &stop, |a| {
            let _ = activity.send(a);
        })
        .await;
        let _ = reply.send(outcome);
        Ok(())
    }
}

// ---------------------------------------------------------------- build

pub enum BuildMsg {
    Build {
        /// Where installs and the build run: the workspace's sandbox.
        jail: Jail,
        dir: PathBuf,
        state_dir: PathBuf,
        stop: CancellationToken,
        reply: RpcReplyPort<Result<BuildReport, BuildError>>,
    },
}

pub struct BuildActor;

impl Actor for BuildActor {
    type Msg = BuildMsg;
    type State = BuildSpec;
    type Arguments = BuildSpec;

    async fn pre_start(
        &self,
        _myself: ActorRef<BuildMsg>,
        spec: BuildSpec,
    ) -> Result<BuildSpec, ActorProcessingErr> {
        Ok(spec)
    }

    async fn handle(
        &self,
        _myself: ActorRef<BuildMsg>,
        msg: BuildMsg,
        spec: &mut BuildSpec,
    ) -> Result<(), ActorProcessingErr> {
        let BuildMsg::Build {
            jail,
            dir,
            state_dir,
            stop,
            reply,
        } = msg;
        maybe_fault("build.run");
        let _ = reply.send(build::build_site(spec, &jail, &dir, &state_dir, &stop).await);
        Ok(())
    }
}

// ---------------------------------------------------------------- publisher

pub enum PublisherMsg {
    Publish {
        /// The workspace the bucket must belong to (its owner record).
        workspace: WorkspaceKey,
        bucket: String,
        build_dir: PathBuf,
        /// The lease's fence in the bucket, when workers share the queue.
        fence: Option<BucketFence>,
        reply: RpcReplyPort<Result<PublishReport, PublishError>>,
    },
}

pub struct PublisherActor;

impl Actor for PublisherActor {
    type Msg = PublisherMsg;
    type State = Publisher;
    type Arguments = Publisher;

    async fn pre_start(
        &self,
        _myself: ActorRef<PublisherMsg>,
        publisher: Publisher,
    ) -> Result<Publisher, ActorProcessingErr> {
        Ok(publisher)
    }

    async fn handle(
        &self,
        _myself: ActorRef<PublisherMsg>,
        msg: PublisherMsg,
        publisher: &mut Publisher,
    ) -> Result<(), ActorProcessingErr> {
        let PublisherMsg::Publish {
            workspace,
            bucket,
            build_dir,
            fence,
            reply,
        } = msg;
        maybe_fault("publish.run");
        let _ = reply.send(
            publisher
                .publish_for(&workspace, &bucket, &build_dir, fence.as_ref())
                .await,
        );
        Ok(())
    }
}
