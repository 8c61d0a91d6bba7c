//! Issue 13, "no secrets out": a token in the remote URL, and secrets the agent prints, reach
//! no status event, no log line and no dead-letter message. Real parts: moto (SQS, S3), git,
//! the worker binary and the stand-in agent.

use std::time::{Duration, Instant};

use crate::common::{self, Site, TestEnv, of_type};
use serde_json::Value;

/// A GitHub-shaped token in the remote template; port 9 (discard) on localhost refuses at once.
const TOKEN: &str = "ghp_SECRETSECRETSECRETSECRETSECRETSECRET12";

/// Every message in `queue` (body and message attributes, as text), received and deleted.
async fn dead_letters(env: &TestEnv, queue: &str, at_least: usize) -> Vec<String> {
    let mut found = Vec::new();
    // The dead letters follow the message's end, which took ONE_MESSAGE at most.
    let deadline = Instant::now() + common::ONE_MESSAGE;
    while found.len() < at_least && Instant::now() < deadline {
        let out = env
            .sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive");
        for m in out.messages.unwrap_or_default() {
            let mut text = m.body.clone().unwrap_or_default();
            for (name, value) in m.message_attributes.clone().unwrap_or_default() {
                text.push_str(&format!(
                    "\n{name}={}",
                    value.string_value.unwrap_or_default()
                ));
            }
            found.push(text);
            env.sqs
                .delete_message()
                .queue_url(queue)
                .receipt_handle(m.receipt_handle.unwrap())
                .send()
                .await
                .expect("delete");
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_in_the_remote_url_reaches_no_event_log_or_dead_letter() {
    let mut env = TestEnv::new("secrets-remote").await;
    let template =
        format!("https://x-access-token:{TOKEN}@127.0.0.1:9/{{clientId}}/{{projectId}}.git");
    env.start_worker(&[
        ("GIT_REMOTE_TEMPLATE", template.as_str()),
        // The first failure is final: failed event and dead letter at once.
        ("MAX_RECEIVES", "1"),
    ]);
    let message_id = env
        .send(
            "tokenco",
            "site",
            "t1",
            "Update the homepage title to \"x\"",
        )
        .await;
    let events = env.events_until_terminal(1, common::ONE_MESSAGE).await;
    let failed = of_type(&events, "failed");
    assert_eq!(
        failed.len(),
        1,
        "events: {events:#?}\nlog:\n{}",
        env.worker_log()
    );
    assert_eq!(failed[0]["messageId"], message_id.as_str());
    let message = failed[0]["error"]["message"].as_str().unwrap_or_default();
    // The clone really ran against the templated remote and failed there.
    assert!(
        message.contains("https://***@127.0.0.1:9/tokenco/site.git"),
        "{message}"
    );

    let dead = dead_letters(&env, &env.dlq, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].contains("rejectReason="), "{}", dead[0]);
    assert!(dead[0].contains("https://***@127.0.0.1:9"), "{}", dead[0]);

    env.stop_worker();
    let log = env.worker_log();
    assert!(
        log.contains("https://***@127.0.0.1:9"),
        "the failure is in the log: {log}"
    );
    for event in &events {
        let text = event.to_string();
        assert!(!text.contains(TOKEN), "token in an event: {text}");
        assert!(!text.contains("SECRETSECRET"), "token in an event: {text}");
    }
    for line in log.lines() {
        assert!(!line.contains("SECRETSECRET"), "token in the log: {line}");
    }
    for message in &dead {
        assert!(
            !message.contains("SECRETSECRET"),
            "token in the DLQ: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_the_agent_prints_are_redacted_in_progress_and_result() {
    let mut env = TestEnv::new("secrets-agent").await;
    env.create_site("keyco", "site", Site::Tiny).await;
    env.start_worker(&[]);
    let key = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv_0123456789";
    // The stand-in writes the file (a `Write` progress step naming it) and says so in its
    // result.
    let command = format!("[standin:write notes/{key}.txt found a key]");
    let message_id = env.send("keyco", "site", "t1", &command).await;
    let events = env.events_until_terminal(1, Duration::from_secs(180)).await;
    let completed = of_type(&events, "completed");
    assert_eq!(
        completed.len(),
        1,
        "events: {events:#?}\nlog:\n{}",
        env.worker_log()
    );
    assert_eq!(completed[0]["messageId"], message_id.as_str());
    assert_eq!(
        completed[0]["result"], "Wrote notes/sk-ant-***.txt.",
        "{:#}",
        completed[0]
    );
    let details: Vec<&str> = of_type(&events, "progress")
        .iter()
        .filter_map(|e| e["detail"].as_str())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("Write notes/sk-ant-***.txt")),
        "{details:?}"
    );
    for event in &events {
        let text = event.to_string();
        assert!(!text.contains("AbCdEfGh"), "key in an event: {text}");
    }
    env.stop_worker();
    // The events in the log are the redacted ones. (The request text itself, the producer's
    // own, may show on the message's span: `TRACE_COMMAND_CHARS`.)
    // Each event is logged as the message `status {event}`.
    let logged: Vec<Value> = env
        .log_lines()
        .iter()
        .filter_map(|l| common::log_message(l).strip_prefix("status "))
        .filter_map(|event| serde_json::from_str::<Value>(event).ok())
        .filter(|event| event["messageId"] == message_id.as_str())
        .collect();
    assert_eq!(
        of_type(&logged, "completed").len(),
        1,
        "{logged:#?}\n{}",
        env.worker_log()
    );
    for event in logged {
        let text = event.to_string();
        assert!(!text.contains("AbCdEfGh"), "key in a logged event: {text}");
    }
}
