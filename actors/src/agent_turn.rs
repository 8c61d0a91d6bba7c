//! One agent turn of a batch: the thread's conversation (resumed, restored from the shared
//! store, or started and recorded before the run), the run under an agent slot with its
//! `progress` events, the run's share of the conversation's cost, and the commit of what it
//! changed.

use std::time::Instant;

use tracing::field::Empty;
use tracing::{Instrument, info_span};

use crate::agent::{AgentError, Conversation};
use crate::batch::{BatchRun, batch_ids, batch_prompt};
use crate::job::Job;
use crate::job_error::JobError;
use crate::journal::Journal;
use crate::progress::{ProgressTarget, report_progress};
use crate::steps::{AgentMsg, GitMsg, Steps};
use crate::threads::{ThreadRecord, ThreadStore};

/// Run the agent on `prompt` in the thread's conversation: resume it when the thread has one,
/// else start it. Reports what the agent does as throttled `progress` events, and adds this
/// run's share of the conversation's cost (the agent reports a running total) to the `journal`.
pub(crate) async fn agent_turn(
    run: &BatchRun<'_>,
    batch: &[&Job],
    prompt: String,
    journal: &mut Journal,
    purpose: &'static str,
) -> Result<(), JobError> {
    let span = info_span!(
        "agent run",
        agent.purpose = purpose,
        agent.session_id = Empty,
        agent.resumed = Empty,
        agent.turns = Empty,
        agent.cost_usd = Empty,
        agent.result_subtype = Empty,
        error = Empty
    );
    let outcome = agent_turn_inner(run, batch, prompt, journal, &span)
        .instrument(span.clone())
        .await;
    if let Err(e) = &outcome {
        span.record("error", e.kind());
    }
    outcome
}

async fn agent_turn_inner(
    run: &BatchRun<'_>,
    batch: &[&Job],
    prompt: String,
    journal: &mut Journal,
    span: &tracing::Span,
) -> Result<(), JobError> {
    let BatchRun {
        ctx,
        steps,
        stop,
        scope,
    } = *run;
    let job = &batch[0];
    let key = job.request.workspace();
    let threads = &ctx.threads;
    let cwd = ctx.config.workspace_dir(&key);
    let record = threads.load(&key, &job.request.thread_id).await;
    // The conversation may have gone on elsewhere: bring the shared copy of its file here.
    let agent_config_dir = ctx.agent_config_dir_for(&key);
    if let (Some(r), Some(config_dir)) = (&record, &agent_config_dir) {
        match threads
            .restore_conversation(&key, &r.session_id, config_dir, &cwd, scope.handover)
            .await
        {
            Ok(true) => {
                tracing::info!(session = %r.session_id, "the thread's conversation was restored from the shared store")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not restore the thread's conversation"),
        }
    }
    let mut conversation = match &record {
        Some(r) => Conversation::Resume(r.session_id.clone()),
        None => Conversation::New(uuid::Uuid::new_v4().to_string()),
    };
    // The thread's conversation is known before the run starts, so that an interrupted,
    // crashed or failed run stays in it (the follow-up resumes it).
    if let Conversation::New(id) = &conversation {
        record_new_conversation(threads, &key, &job.request.thread_id, id).await;
    }
    // After the restore: the conversation file is the tenant's too.
    let jail = ctx
        .sandbox
        .jail(&key, &cwd, agent_config_dir.as_deref())
        .await?;
    let agent_slot = ctx
        .agent_slot(stop)
        .await
        .ok_or(JobError::Agent(AgentError::Interrupted))?;
    journal.waited_for(&agent_slot);
    // From the slot on: the wait for a slot is not the agent's time.
    let t = Instant::now();
    let outcome = loop {
        let (activity_tx, activity_rx) = tokio::sync::mpsc::unbounded_channel();
        let reporter = tokio::spawn(
            report_progress(
                ctx.delivery.clone(),
                batch.iter().map(|job| ProgressTarget::of(job)).collect(),
                activity_rx,
                ctx.config.progress_interval,
                journal.progress_sent,
                ctx.config.workspace_dir(&key),
            )
            .instrument(span.clone()),
        );
        let outcome = steps
            .agent
            .ask(|reply| AgentMsg::Run {
                jail: jail.clone(),
                cwd: ctx.config.workspace_dir(&key),
                prompt: prompt.clone(),
                conversation: conversation.clone(),
                stop: stop.token().clone(),
                activity: activity_tx,
                reply,
            })
            .await;
        // The sender went with the agent's message, so the reporter ends by itself.
        journal.progress_sent = reporter.await.unwrap_or(journal.progress_sent);
        match outcome? {
            // The agent's conversation files are gone (new storage): start the conversation anew.
            Err(AgentError::SessionNotFound(id)) => {
                tracing::warn!(session = %id, "the thread's conversation is gone; starting a new one");
                // Only a conversation the agent had written can be lost.
                journal.conversation_restarted |= record.as_ref().is_some_and(|r| r.written);
                conversation = Conversation::New(uuid::Uuid::new_v4().to_string());
                if let Conversation::New(id) = &conversation {
                    record_new_conversation(threads, &key, &job.request.thread_id, id).await;
                }
            }
            other => break other,
        }
    };
    journal.time("agent", t);
    tracing::info!(
        elapsed_ms = t.elapsed().as_millis() as u64,
        ok = outcome.is_ok(),
        "agent run finished"
    );
    crate::metrics::metrics()
        .agent_runs
        .add(1, &[opentelemetry::KeyValue::new("ok", outcome.is_ok())]);
    let report = match &outcome {
        Ok(report) => Some(report.clone()),
        // An interrupted or failed run that reported still spent its tokens.
        Err(e) => e.report().cloned(),
    };
    if let Some(report) = &report {
        let session_id = report
            .session_id
            .clone()
            .unwrap_or_else(|| match &conversation {
                Conversation::New(id) | Conversation::Resume(id) => id.clone(),
            });
        span.record("agent.session_id", session_id.as_str());
        span.record(
            "agent.resumed",
            matches!(conversation, Conversation::Resume(_)),
        );
        span.record("agent.turns", report.num_turns.unwrap_or(0));
        span.record("agent.result_subtype", report.subtype.as_str());
        let previous = match (&conversation, &record) {
            (Conversation::Resume(_), Some(r)) => r.total_cost_usd,
            _ => 0.0,
        };
        if let Some(total) = report.total_cost_usd {
            // A total below the previous one means a new conversation: all of it is this run's.
            let cost = if total >= previous {
                total - previous
            } else {
                total
            };
            journal.cost_usd = Some(journal.cost_usd.unwrap_or(0.0) + cost);
        }
        journal.turns += report.num_turns.unwrap_or(0);
        let saved = ThreadRecord {
            session_id,
            total_cost_usd: report.total_cost_usd.unwrap_or(previous),
            written: true,
        };
        if let Err(e) = threads.save(&key, &job.request.thread_id, &saved).await {
            tracing::warn!(error = %e, "could not record the thread's conversation");
        }
    }
    // Whatever the run's end (an interrupted run stays in the conversation too), its file
    // goes where the thread's next message finds it, on whichever worker.
    if let Some(config_dir) = &agent_config_dir {
        let session_id = report
            .as_ref()
            .and_then(|r| r.session_id.clone())
            .unwrap_or_else(|| match &conversation {
                Conversation::New(id) | Conversation::Resume(id) => id.clone(),
            });
        let left_a_file = ThreadStore::has_conversation(config_dir, &cwd, &session_id).await;
        if report.is_none() && left_a_file {
            // A run stopped before it reported still wrote its conversation.
            let written = ThreadRecord {
                session_id: session_id.clone(),
                total_cost_usd: record.as_ref().map_or(0.0, |r| r.total_cost_usd),
                written: true,
            };
            if let Err(e) = threads.save(&key, &job.request.thread_id, &written).await {
                tracing::warn!(error = %e, "could not record the thread's conversation");
            }
        }
        if let Err(e) = threads
            .save_conversation(&key, &session_id, config_dir, &cwd)
            .await
        {
            tracing::warn!(error = %e, "could not share the thread's conversation file");
        }
    }
    let report = outcome?;
    journal.agent = Some(report);
    Ok(())
}

/// Record a new conversation as the thread's, with nothing spent yet.
async fn record_new_conversation(
    threads: &ThreadStore,
    key: &crate::message::WorkspaceKey,
    thread_id: &str,
    session_id: &str,
) {
    let record = ThreadRecord {
        session_id: session_id.to_owned(),
        total_cost_usd: 0.0,
        written: false,
    };
    if let Err(e) = threads.save(key, thread_id, &record).await {
        tracing::warn!(error = %e, "could not record the thread's conversation");
    }
}

/// Commit what the agent changed as this batch's finished work.
pub(crate) async fn commit_turn(
    steps: &Steps,
    batch: &[&Job],
    subject: String,
    journal: &mut Journal,
) -> Result<(), JobError> {
    let t = Instant::now();
    let span = info_span!("commit", commit = Empty);
    let commit = steps
        .git
        .ask(|reply| GitMsg::CommitAll {
            subject,
            body: batch_prompt(batch),
            message_ids: batch_ids(batch),
            finished: true,
            reply,
        })
        .instrument(span.clone())
        .await??;
    if let Some(c) = &commit {
        span.record("commit", c.as_str());
    }
    journal.time("commit", t);
    if commit.is_some() {
        journal.commit = commit;
    }
    Ok(())
}
