//! `Supervisor`: the root actor. It creates one `SessionActor` per workspace on that
//! workspace's first message, routes jobs to it, and decides what a session's failure means:
//! forget it (the next message starts a fresh one), or, past the restart limit, give up so the
//! process exits and the container is replaced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::batch::context::WorkerContext;
use crate::contract::message::WorkspaceKey;
use crate::delivery::job::Job;
use crate::sessions::restart::RestartPolicy;
use crate::sessions::session::{SessionActor, SessionArgs, SessionMsg};
use crate::steps::StepFactory;

pub enum SupervisorMsg {
    /// A valid job: hand it to its workspace's session.
    Route(Box<Job>),
    /// Stop every session (saving running work), then reply.
    Shutdown(RpcReplyPort<()>),
    /// How many sessions are alive (the session tests' idle-stop check).
    #[cfg(test)]
    SessionCount(RpcReplyPort<usize>),
    /// The session of a workspace, if one lives (session tests).
    #[cfg(test)]
    SessionOf(WorkspaceKey, RpcReplyPort<Option<ActorRef<SessionMsg>>>),
    /// A session has been idle for the idle time, having received `received` jobs.
    SessionIdle { key: WorkspaceKey, received: u64 },
    /// A notice from another worker (`notices.rs`).
    Notice(crate::delivery::notices::Notice),
}

pub struct SupervisorArgs {
    pub ctx: Arc<WorkerContext>,
    /// Makes each session's steps.
    pub step_factory: Arc<dyn StepFactory>,
    /// Failed sessions: past this limit the root gives up (the process exits).
    pub restarts: RestartPolicy,
    /// Each session's restarts of its step actors.
    pub step_restarts: RestartPolicy,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    sessions: HashMap<WorkspaceKey, ActorRef<SessionMsg>>,
    /// Jobs routed to each live session: equal to what the session received means none is
    /// on its way, so an idle session can be stopped without losing one.
    routed: HashMap<WorkspaceKey, u64>,
    /// Reverse map, to know which workspace a supervision event is about.
    by_id: HashMap<ActorId, WorkspaceKey>,
}

pub struct Supervisor;

impl Supervisor {
    async fn session_for(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        key: &WorkspaceKey,
    ) -> Result<ActorRef<SessionMsg>, ActorProcessingErr> {
        if let Some(session) = state.sessions.get(key) {
            return Ok(session.clone());
        }
        let supervisor = myself.clone();
        let args = SessionArgs {
            key: key.clone(),
            idle: Arc::new(move |key, received| {
                let _ = supervisor.cast(SupervisorMsg::SessionIdle { key, received });
            }),
            ctx: state.args.ctx.clone(),
            step_factory: state.args.step_factory.clone(),
            step_restarts: state.args.step_restarts.clone(),
        };
        let (session, _) = Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await?;
        state.sessions.insert(key.clone(), session.clone());
        state.by_id.insert(session.get_id(), key.clone());
        Ok(session)
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            args,
            sessions: HashMap::new(),
            routed: HashMap::new(),
            by_id: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Route(job) => {
                let key = job.request.workspace();
                match Self::session_for(&myself, state, &key).await {
                    Ok(session) => {
                        *state.routed.entry(key.clone()).or_default() += 1;
                        if let Err(e) = session.cast(SessionMsg::Enqueue(job)) {
                            tracing::error!(workspace = %key, error = %e, "session gone; message will be delivered again");
                        }
                    }
                    Err(e) => {
                        tracing::error!(workspace = %key, error = %e, "could not start a session; message will be delivered again");
                        let ctx = state.args.ctx.clone();
                        tokio::spawn(async move {
                            job.release(&ctx.delivery, Duration::from_secs(5), "no session")
                                .await;
                        });
                    }
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                let sessions: Vec<_> = state.sessions.values().cloned().collect();
                // Waiting here would hold the supervisor's mailbox; wait in a task instead.
                tokio::spawn(async move {
                    let waits = sessions.iter().map(|s| s.call(SessionMsg::Shutdown, None));
                    futures::future::join_all(waits).await;
                    let _ = reply.send(());
                });
            }
            SupervisorMsg::Notice(notice) => {
                let key = notice.workspace();
                let kind = notice.kind();
                match notice {
                    crate::delivery::notices::Notice::Released { from, .. } => {
                        crate::telemetry::metrics::notice_received(kind, &from);
                        state.args.ctx.leases.on_released(&key);
                    }
                    crate::delivery::notices::Notice::Newer {
                        message_id,
                        sent_at_ms,
                        from,
                        reply_to,
                        ..
                    } => {
                        tracing::info!(
                            workspace = %key,
                            %message_id,
                            %from,
                            sent_at_ms,
                            at_ms = crate::delivery::records::now_ms(),
                            "interrupt notice received"
                        );
                        crate::telemetry::metrics::notice_received(kind, &from);
                        let waiter = crate::sessions::session::Waiter {
                            sent_at_ms,
                            reply_to,
                            worker: from,
                        };
                        match state.sessions.get(&key) {
                            Some(session) => {
                                if let Err(e) = session.cast(SessionMsg::NewerElsewhere(waiter)) {
                                    tracing::warn!(workspace = %key, error = %e, "session gone; the waiter polls the lease");
                                }
                            }
                            // No session here works on it. Said once nothing here holds its
                            // lease: a failed session's batch may still run, detached, under
                            // it (issue 25: `Released` only after the release), and a lease an
                            // idle session set aside is released first.
                            None => {
                                let ctx = state.args.ctx.clone();
                                tokio::spawn(async move {
                                    ctx.leases.let_go(&key).await;
                                    ctx.leases.release_parked(&key).await;
                                    crate::sessions::session::tell_released(
                                        &ctx,
                                        &key,
                                        vec![waiter],
                                    );
                                });
                            }
                        }
                    }
                }
            }
            #[cfg(test)]
            SupervisorMsg::SessionCount(reply) => {
                let _ = reply.send(state.sessions.len());
            }
            #[cfg(test)]
            SupervisorMsg::SessionOf(key, reply) => {
                let _ = reply.send(state.sessions.get(&key).cloned());
            }
            SupervisorMsg::SessionIdle { key, received } => {
                let routed = state.routed.get(&key).copied().unwrap_or(0);
                if routed == received
                    && let Some(session) = state.sessions.remove(&key)
                {
                    state.routed.remove(&key);
                    state.by_id.remove(&session.get_id());
                    tracing::info!(workspace = %key, "stopping idle session");
                    crate::telemetry::metrics::metrics()
                        .sessions_stopped
                        .add(1, &[opentelemetry::KeyValue::new("reason", "idle")]);
                    session.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(key) = state.by_id.remove(&cell.get_id()) {
                    state.sessions.remove(&key);
                    state.routed.remove(&key);
                }
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(key) = state.by_id.remove(&cell.get_id()) {
                    state.sessions.remove(&key);
                    state.routed.remove(&key);
                    tracing::error!(workspace = %key, %error, "session failed; the next message starts a new one");
                    crate::telemetry::metrics::metrics()
                        .sessions_stopped
                        .add(1, &[opentelemetry::KeyValue::new("reason", "failed")]);
                    // Its in-flight messages come back from SQS after their visibility timeout.
                    state.args.restarts.record_failure().map_err(|e| {
                        ActorProcessingErr::from(format!("sessions keep failing: {e}"))
                    })?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}
