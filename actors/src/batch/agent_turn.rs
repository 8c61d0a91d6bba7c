//! One agent turn of a batch: the thread's conversation (resumed, restored from the shared
//! store, or started under an id its thread decides), the run under an agent slot with its
//! `progress` events, the run's share of the conversation's cost, and the commit of what it
//! changed.

use std::time::Instant;

use tracing::field::Empty;
use tracing::{Instrument, info_span};

use crate::batch::job_error::JobError;
use crate::batch::journal::Journal;
use crate::batch::progress::{ProgressTarget, report_progress};
use crate::batch::run::{BatchRun, batch_ids, batch_prompt};
use crate::delivery::job::Job;
use crate::delivery::records::ThreadRecord;
use crate::delivery::threads::ThreadStore;
use crate::steps::agent::{AgentError, Conversation};
use crate::steps::{AgentMsg, GitMsg, Steps};

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
    let thread_id = &job.request.thread_id;
    // The thread's document, read once per batch (`execute` reads it for the mark).
    if journal.thread.is_none() {
        journal.thread = Some(
            ctx.delivery
                .records
                .read_thread(&key, thread_id, scope.check.token())
                .await?,
        );
    }
    let existed = journal.thread.as_ref().is_some_and(|t| t.existed);
    // This batch's own newer record first (a repair resumes the request's conversation).
    let mut record = journal.conversation.clone().or_else(|| {
        journal
            .thread
            .as_ref()
            .and_then(|t| t.doc.conversation.clone())
    });
    if record.is_none() && threads.may_have_legacy(existed) {
        record = threads.load_legacy(&key, thread_id).await;
    }
    let record = record;
    // The conversation may have gone on elsewhere: bring the shared copy of its file here.
    let agent_config_dir = ctx.agent_config_dir_for(&key);
    if let (Some(r), Some(config_dir)) = (&record, &agent_config_dir) {
        match threads
            .restore_conversation(&key, r, config_dir, &cwd, scope.handover)
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
        None => fresh_conversation(&key, thread_id, None, agent_config_dir.as_deref(), &cwd).await,
    };
    // No agent starts under a lease that is over by this worker's clock (issue 25).
    scope.check.check()?;
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
                conversation = fresh_conversation(
                    &key,
                    thread_id,
                    Some(&id),
                    agent_config_dir.as_deref(),
                    &cwd,
                )
                .await;
                // The request's conversation of this batch, if any, is the one just lost.
                journal.conversation = None;
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
    crate::telemetry::metrics::metrics()
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
        // Recorded with the batch's end (`record_thread`), with the shared copy of its file.
        journal.conversation = Some(ThreadRecord::continued(
            record.as_ref(),
            &session_id,
            report.total_cost_usd.unwrap_or(previous),
        ));
    } else if let Some(config_dir) = &agent_config_dir {
        // A run stopped before it reported still wrote its conversation.
        let session_id = match &conversation {
            Conversation::New(id) | Conversation::Resume(id) => id.clone(),
        };
        if ThreadStore::has_conversation(config_dir, &cwd, &session_id).await {
            let cost = record.as_ref().map_or(0.0, |r| r.total_cost_usd);
            journal.conversation =
                Some(ThreadRecord::continued(record.as_ref(), &session_id, cost));
        }
    }
    let report = outcome?;
    journal.agent = Some(report);
    Ok(())
}

/// A new conversation for the thread, under an id its thread and the conversation it replaces
/// (`replacing`; none for the thread's first) decide, resumed when its file is here already.
/// Nothing is written before the run (issue 25: that write was a request per new conversation
/// to the lease store): an interrupted or failed run is recorded at the batch's end
/// (`record_thread`), and a run cut off by a crash left its file under this same id, which the
/// next run on this disk finds and resumes instead of starting over.
async fn fresh_conversation(
    key: &crate::contract::message::WorkspaceKey,
    thread_id: &str,
    replacing: Option<&str>,
    config_dir: Option<&std::path::Path>,
    cwd: &std::path::Path,
) -> Conversation {
    let id = conversation_id(key, thread_id, replacing);
    match config_dir {
        Some(dir) if ThreadStore::has_conversation(dir, cwd, &id).await => {
            tracing::info!(session = %id, "a conversation of this thread that no record names is here; resuming it");
            Conversation::Resume(id)
        }
        _ => Conversation::New(id),
    }
}

/// The id of the thread's conversation that follows `replacing`: a UUID made from an MD5 of
/// the names (the same on every worker, and never one of another thread's).
fn conversation_id(
    key: &crate::contract::message::WorkspaceKey,
    thread_id: &str,
    replacing: Option<&str>,
) -> String {
    use md5::{Digest, Md5};
    let mut hash = Md5::new();
    for part in [
        "edit-worker conversation",
        &key.client_id,
        &key.project_id,
        thread_id,
        replacing.unwrap_or(""),
    ] {
        // Each part with its length: no two lists of names run together into one.
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    uuid::Builder::from_md5_bytes(hash.finalize().into())
        .into_uuid()
        .to_string()
}

/// At the end of a batch, under its lease: share the conversation file when it changed, then
/// write the thread's document once, with the conversation this batch's agent runs left and
/// the thread's mark raised to `newest_ended` (the newest send time among the batch's
/// messages that end here). One write for the batch (issue 25: the record was written before
/// and after each run and the mark apart, each unfenced); nothing when nothing changed.
pub(crate) async fn record_thread(
    ctx: &crate::batch::context::WorkerContext,
    fence: &crate::delivery::lease_check::LeaseCheck,
    key: &crate::contract::message::WorkspaceKey,
    journal: &mut Journal,
    newest_ended: Option<u64>,
) {
    if fence.check().is_err() {
        // The workspace is another worker's now: its record is not ours to write.
        return;
    }
    let mut conversation = journal.conversation.take();
    if let (Some(record), Some(config_dir)) = (&mut conversation, ctx.agent_config_dir_for(key)) {
        let known = journal
            .thread
            .as_ref()
            .and_then(|t| t.doc.conversation.as_ref());
        match ctx
            .threads
            .save_conversation(
                key,
                &record.session_id,
                known,
                &config_dir,
                &ctx.config.workspace_dir(key),
                fence,
            )
            .await
        {
            Ok(Some(copy)) => {
                record.file = Some(copy.key);
                record.file_md5 = Some(copy.md5);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not share the thread's conversation file"),
        }
    }
    if conversation.is_none() && newest_ended.is_none() {
        return;
    }
    let Some(state) = journal.thread.as_mut() else {
        return;
    };
    let previous_copy = state.doc.conversation.as_ref().and_then(|c| c.file.clone());
    let written = ctx
        .delivery
        .records
        .write_thread(state, fence, |doc| {
            if let Some(record) = &conversation {
                doc.conversation = Some(record.clone());
            }
            if let Some(sent) = newest_ended {
                doc.newest_sent_ms = doc.newest_sent_ms.max(sent);
            }
        })
        .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "could not record the thread's conversation and mark");
        return;
    }
    // The copy an earlier holder (another token) made is named by nothing now: remove it, so
    // copies do not pile up with every change of hands.
    let now_named = state
        .doc
        .conversation
        .as_ref()
        .and_then(|c| c.file.as_deref());
    if let Some(previous) = previous_copy
        && now_named.is_some_and(|now| now != previous)
        && let Err(e) = ctx.delivery.records.delete_document(&previous).await
    {
        tracing::debug!(error = %e, "an earlier conversation copy was not removed");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::message::WorkspaceKey;

    fn key(client: &str, project: &str) -> WorkspaceKey {
        WorkspaceKey {
            client_id: client.into(),
            project_id: project.into(),
        }
    }

    /// The same thread gets the same id on every worker and every run, so that a crashed run's
    /// file is found again; another thread, another workspace, or a replacement gets another.
    #[test]
    fn a_threads_new_conversation_has_an_id_its_names_decide() {
        let first = conversation_id(&key("c", "p"), "t", None);
        assert_eq!(first, conversation_id(&key("c", "p"), "t", None));
        let parsed = uuid::Uuid::parse_str(&first).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 3, "{first}");
        let others = [
            conversation_id(&key("c", "p"), "u", None),
            conversation_id(&key("c", "q"), "t", None),
            conversation_id(&key("cp", ""), "t", None),
            conversation_id(&key("c", "p"), "t", Some(&first)),
        ];
        for other in &others {
            assert_ne!(&first, other);
        }
        assert_ne!(others[0], others[3]);
        // A session name the worker accepts (`ThreadStore::conversation_name`).
        assert!(first.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
    }
}
