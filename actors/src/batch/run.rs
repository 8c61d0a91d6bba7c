//! What every part of a batch works with: the worker's context, the session's steps, the stop
//! signal and the lease (`BatchRun`), the batch's `started` events on their way, and the
//! batch's commands and ids as the agent and the commits see them. The batch (`batch.rs`) makes
//! these; its parts (`execute`, `agent_turn`, `push`, `rollback`, `outcome`) take them, and
//! none of them calls back into the batch.

use tracing::Instrument;

use crate::batch::context::WorkerContext;
use crate::batch::lease_scope::LeaseScope;
use crate::batch::stop::StopSignal;
use crate::contract::status::StatusEvent;
use crate::delivery::job::Job;
use crate::steps::Steps;

/// What the work of a batch runs with.
#[derive(Clone, Copy)]
pub(crate) struct BatchRun<'a> {
    pub(crate) ctx: &'a WorkerContext,
    pub(crate) steps: &'a Steps,
    pub(crate) stop: &'a StopSignal,
    pub(crate) scope: &'a LeaseScope,
}

/// The batch's `started` events, on their way while the workspace is prepared: the round trip
/// to the status queue need not hold up the work. They are out before the agent starts (its
/// `progress` events follow them) and before any terminal event.
pub(crate) struct StartedEvents(Option<tokio::task::JoinHandle<()>>);

impl StartedEvents {
    pub(crate) fn send(ctx: &WorkerContext, events: Vec<StatusEvent>) -> StartedEvents {
        let delivery = ctx.delivery.clone();
        let task = tokio::spawn(
            async move {
                for event in events {
                    if let Err(e) = delivery.status.send(&event).await {
                        tracing::warn!(error = %e, "started event not sent");
                    }
                }
            }
            .in_current_span(),
        );
        StartedEvents(Some(task))
    }

    /// Wait until they are sent (at once after the first call).
    pub(crate) async fn sent(&mut self) {
        if let Some(task) = self.0.take() {
            let _ = task.await;
        }
    }
}

/// The commands of a batch, as one request to the agent.
pub(crate) fn batch_prompt(batch: &[&Job]) -> String {
    if batch.len() == 1 {
        return batch[0].request.command.clone();
    }
    batch
        .iter()
        .enumerate()
        .map(|(i, job)| {
            format!(
                "Request {} of {}:\n{}",
                i + 1,
                batch.len(),
                job.request.command
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The message ids of a batch, for the commit trailers.
pub(crate) fn batch_ids(batch: &[&Job]) -> Vec<String> {
    batch.iter().map(|j| j.message_id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::message::{DEFAULT_MAX_COMMAND_BYTES, EditRequest};

    fn job(id: &str, command: &str) -> Job {
        let body = serde_json::json!({
            "sessionId": "s", "threadId": "t", "clientId": "amelia", "projectId": "stamps",
            "command": command,
        });
        let request = EditRequest::parse(&body.to_string(), DEFAULT_MAX_COMMAND_BYTES).unwrap();
        Job::for_test(id, request, 0)
    }

    #[test]
    fn one_request_goes_to_the_agent_as_it_is_and_several_are_numbered_in_order() {
        let one = job("m1", "Make the title say \"Hi\"");
        assert_eq!(batch_prompt(&[&one]), "Make the title say \"Hi\"");
        let (a, b, c) = (job("m1", "first"), job("m2", "second"), job("m3", "third"));
        assert_eq!(
            batch_prompt(&[&a, &b, &c]),
            "Request 1 of 3:\nfirst\n\nRequest 2 of 3:\nsecond\n\nRequest 3 of 3:\nthird"
        );
        assert_eq!(batch_ids(&[&a, &b, &c]), ["m1", "m2", "m3"]);
    }
}
