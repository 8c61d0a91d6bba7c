//! `progress` events: the agent's activity, throttled (at most one event per
//! `PROGRESS_INTERVAL_SECONDS`), summed up and numbered, for every message of the batch.

use std::time::Duration;

use crate::contract::status::{EventType, StatusEvent};
use crate::delivery::Delivery;
use crate::delivery::job::Job;
use crate::steps::agent::AgentActivity;

/// Who a progress event is about.
pub(crate) struct ProgressTarget {
    request: crate::contract::message::EditRequest,
    message_id: String,
    trace_id: Option<String>,
}

impl ProgressTarget {
    pub(crate) fn of(job: &Job) -> ProgressTarget {
        ProgressTarget {
            request: job.request.clone(),
            message_id: job.message_id.clone(),
            trace_id: job.trace_id.clone(),
        }
    }
}

/// Turn the agent's activity into `progress` events: at most one per `interval`, each summing
/// up what happened since the last, numbered so that a consumer can order them (a standard SQS
/// queue does not keep order). Returns the last sequence number used.
pub(crate) async fn report_progress(
    delivery: Delivery,
    targets: Vec<ProgressTarget>,
    mut activity: tokio::sync::mpsc::UnboundedReceiver<AgentActivity>,
    interval: Duration,
    mut sequence: u64,
    workspace: std::path::PathBuf,
) -> u64 {
    let mut pending: Vec<String> = Vec::new();
    let mut next_allowed = tokio::time::Instant::now();
    loop {
        let open = tokio::select! {
            item = activity.recv() => match item {
                Some(a) => {
                    let step = describe(&a, &workspace);
                    // A span event of the agent's span (the OpenTelemetry layer takes debug).
                    tracing::debug!(step = %step, "agent activity");
                    pending.push(step);
                    true
                }
                None => false,
            },
            _ = tokio::time::sleep_until(next_allowed), if !pending.is_empty() => true,
        };
        let due = tokio::time::Instant::now() >= next_allowed;
        if !pending.is_empty() && (due || !open) {
            sequence += 1;
            let detail = summarize(&std::mem::take(&mut pending));
            for target in &targets {
                let mut event = StatusEvent::for_request(
                    EventType::Progress,
                    &target.request,
                    &target.message_id,
                );
                event.trace_id = target.trace_id.clone();
                event.detail = Some(detail.clone());
                event.sequence = Some(sequence);
                if let Err(e) = delivery.status.send(&event).await {
                    tracing::warn!(error = %e, "progress event not sent");
                }
            }
            next_allowed = tokio::time::Instant::now() + interval;
        }
        if !open {
            return sequence;
        }
    }
}

fn describe(activity: &AgentActivity, workspace: &std::path::Path) -> String {
    match activity {
        AgentActivity::Started { .. } => "agent started".into(),
        AgentActivity::ToolUse { tool, target: None } => tool.clone(),
        AgentActivity::ToolUse {
            tool,
            target: Some(target),
        } => {
            // Paths are shown relative to the workspace; nothing else of the machine shows.
            let shown = match std::path::Path::new(target).strip_prefix(workspace) {
                Ok(rel) => rel.display().to_string(),
                Err(_) if target.starts_with('/') => std::path::Path::new(target)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                Err(_) => target.clone(),
            };
            format!("{tool} {shown}")
        }
    }
}

/// Up to five steps, then how many more.
fn summarize(steps: &[String]) -> String {
    let shown: Vec<&str> = steps.iter().take(5).map(String::as_str).collect();
    let mut text = shown.join("; ");
    if steps.len() > shown.len() {
        text.push_str(&format!("; and {} more", steps.len() - shown.len()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tool(tool: &str, target: Option<&str>) -> AgentActivity {
        AgentActivity::ToolUse {
            tool: tool.into(),
            target: target.map(str::to_owned),
        }
    }

    #[test]
    fn steps_show_paths_relative_to_the_workspace_and_nothing_else_of_the_machine() {
        let ws = Path::new("/workspace/amelia/stamps");
        let cases = [
            (
                tool(
                    "Edit",
                    Some("/workspace/amelia/stamps/src/pages/index.astro"),
                ),
                "Edit src/pages/index.astro",
            ),
            (tool("Read", Some("/etc/passwd")), "Read passwd"),
            (tool("Bash", Some("npm test")), "Bash npm test"),
            (tool("TodoWrite", None), "TodoWrite"),
            (
                AgentActivity::Started {
                    session_id: None,
                    version: None,
                },
                "agent started",
            ),
        ];
        for (activity, shown) in cases {
            assert_eq!(describe(&activity, ws), shown);
        }
    }

    #[test]
    fn a_summary_shows_five_steps_then_how_many_more() {
        let steps: Vec<String> = (1..=7).map(|i| format!("Edit f{i}")).collect();
        assert_eq!(
            summarize(&steps),
            "Edit f1; Edit f2; Edit f3; Edit f4; Edit f5; and 2 more"
        );
        assert_eq!(summarize(&steps[..2]), "Edit f1; Edit f2");
        assert_eq!(summarize(&[]), "");
    }
}
