//! Fake steps for tests: a session runs with them in milliseconds, without git, an agent, a
//! build or S3. Every step reports what it was asked (`Call`) on one channel, in order, so that
//! a test waits on what happened instead of on time.
//!
//! The fake agent does what its prompt says: `[wait]` runs until the job is stopped (then it
//! was interrupted), `[panic]` panics (the step crashes); anything else succeeds at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::Instant;

use super::{AgentMsg, BuildMsg, GitMsg, PublisherMsg, StepFactory, StepHandler, StepKind};
use crate::contract::message::WorkspaceKey;
use crate::contract::status::PublishReport;
use crate::steps::agent::{AgentError, AgentReport};
use crate::steps::build::BuildReport;

/// What a fake step was asked or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// A step's actor was started (first start or restart), at `at`.
    Started {
        kind: StepKind,
        at: Instant,
    },
    /// A step's handler went away with its actor (stopped, or crashed).
    Stopped(StepKind),
    /// The agent was asked to run `prompt`.
    Agent {
        prompt: String,
    },
    /// The agent is about to panic, at `at`.
    AgentPanics {
        at: Instant,
    },
    /// A commit: finished work, or work saved half-way.
    Commit {
        subject: String,
        finished: bool,
    },
    Build,
    Publish,
    Push {
        branch: String,
    },
}

/// Makes the fake steps; every one reports on the same channel.
pub(crate) struct FakeSteps {
    calls: UnboundedSender<Call>,
    /// Commits made, over all the fake git steps: their ids.
    commits: Arc<AtomicU64>,
}

impl FakeSteps {
    pub(crate) fn new() -> (Arc<FakeSteps>, UnboundedReceiver<Call>) {
        let (calls, rx) = unbounded_channel();
        let steps = FakeSteps {
            calls,
            commits: Arc::default(),
        };
        (Arc::new(steps), rx)
    }

    fn handler(&self, kind: StepKind) -> Fake {
        let _ = self.calls.send(Call::Started {
            kind,
            at: Instant::now(),
        });
        Fake {
            kind,
            calls: self.calls.clone(),
            commits: self.commits.clone(),
        }
    }
}

impl StepFactory for FakeSteps {
    fn git(&self, _key: &WorkspaceKey) -> Box<dyn StepHandler<GitMsg>> {
        Box::new(self.handler(StepKind::Git))
    }

    fn agent(&self, _key: &WorkspaceKey) -> Box<dyn StepHandler<AgentMsg>> {
        Box::new(self.handler(StepKind::Agent))
    }

    fn build(&self, _key: &WorkspaceKey) -> Box<dyn StepHandler<BuildMsg>> {
        Box::new(self.handler(StepKind::Build))
    }

    fn publisher(&self, _key: &WorkspaceKey) -> Box<dyn StepHandler<PublisherMsg>> {
        Box::new(self.handler(StepKind::Publisher))
    }
}

/// One fake step.
struct Fake {
    kind: StepKind,
    calls: UnboundedSender<Call>,
    commits: Arc<AtomicU64>,
}

impl Fake {
    fn tell(&self, call: Call) {
        let _ = self.calls.send(call);
    }

    fn head(&self) -> String {
        format!("commit-{}", self.commits.load(Ordering::SeqCst))
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.tell(Call::Stopped(self.kind));
    }
}

impl StepHandler<GitMsg> for Fake {
    fn handle(&mut self, msg: GitMsg) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match msg {
                GitMsg::WorkUnder { reply, .. } => {
                    let _ = reply.send(());
                }
                GitMsg::TakeOver { reply, .. } => {
                    let _ = reply.send(Ok(()));
                }
                GitMsg::PrepareThread { reply, .. } => {
                    let _ = reply.send(Ok(None));
                }
                GitMsg::CommitOfMessage { reply, .. } => {
                    let _ = reply.send(Ok(None));
                }
                GitMsg::CommitAll {
                    subject,
                    finished,
                    reply,
                    ..
                } => {
                    self.tell(Call::Commit { subject, finished });
                    self.commits.fetch_add(1, Ordering::SeqCst);
                    let _ = reply.send(Ok(Some(self.head())));
                }
                GitMsg::HeadCommit { reply } => {
                    let _ = reply.send(Ok(self.head()));
                }
                GitMsg::RollbackTo { target, reply, .. } => {
                    self.tell(Call::Commit {
                        subject: format!("Rollback to {target}"),
                        finished: true,
                    });
                    self.commits.fetch_add(1, Ordering::SeqCst);
                    let _ = reply.send(Ok(self.head()));
                }
                GitMsg::Push { branch, reply, .. } => {
                    self.tell(Call::Push { branch });
                    let _ = reply.send(Ok(()));
                }
                GitMsg::PushSaved {
                    branch,
                    message_id,
                    reply,
                } => {
                    let _ = reply.send(Ok(format!("refs/edit-worker/saved/{branch}/{message_id}")));
                }
            }
        })
    }
}

impl StepHandler<AgentMsg> for Fake {
    fn handle(&mut self, msg: AgentMsg) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let AgentMsg::Run {
                prompt,
                stop,
                reply,
                ..
            } = msg;
            self.tell(Call::Agent {
                prompt: prompt.clone(),
            });
            if prompt.contains("[panic]") {
                self.tell(Call::AgentPanics { at: Instant::now() });
                panic!("the fake agent panics, as asked");
            }
            if prompt.contains("[wait]") {
                stop.cancelled().await;
                let _ = reply.send(Err(AgentError::Interrupted));
                return;
            }
            let _ = reply.send(Ok(AgentReport {
                result: Some(format!("done: {prompt}")),
                total_cost_usd: Some(0.25),
                num_turns: Some(1),
                subtype: "success".into(),
                ..AgentReport::default()
            }));
        })
    }
}

impl StepHandler<BuildMsg> for Fake {
    fn handle(&mut self, msg: BuildMsg) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let BuildMsg::Build { reply, .. } = msg;
            self.tell(Call::Build);
            let _ = reply.send(Ok(BuildReport::default()));
        })
    }
}

impl StepHandler<PublisherMsg> for Fake {
    fn handle(&mut self, msg: PublisherMsg) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match msg {
                PublisherMsg::Publish { reply, .. } | PublisherMsg::Restore { reply, .. } => {
                    self.tell(Call::Publish);
                    let _ = reply.send(Ok(PublishReport::default()));
                }
                PublisherMsg::Resolve { target, reply, .. } => {
                    let _ = reply.send(Err(crate::steps::publish::PublishError::UnknownDeploy {
                        target: target.to_string(),
                        reason: "the fake publisher keeps no deploys".into(),
                    }));
                }
            }
        })
    }
}
