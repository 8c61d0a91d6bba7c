//! Issue 5: one trace per message, continued from the producer, exported by the real OTLP
//! exporter to a receiver this test runs on 127.0.0.1 (`common::Otlp`: OTLP over
//! HTTP/protobuf, decoded with the protocol's own message types).

use crate::common;

use crate::common::{Otlp, Site, Span, TestEnv};

/// A worker for client `tess` that exports to the receiver at `url`.
async fn traced_worker(name: &str, url: &str) -> TestEnv {
    let mut env = TestEnv::new(name).await;
    env.create_site("tess", "site", Site::Tiny).await;
    env.start_worker(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", url),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_SERVICE_NAME", "edit-worker-test"),
    ]);
    env
}

async fn send_with_attributes(
    env: &TestEnv,
    thread: &str,
    command: &str,
    traceparent: Option<&str>,
    xray: Option<&str>,
) -> String {
    let body = serde_json::json!({
        "sessionId": "s", "threadId": thread, "clientId": "tess", "projectId": "site", "command": command,
    });
    let mut send = env
        .sqs
        .send_message()
        .queue_url(&env.input)
        .message_body(body.to_string());
    if let Some(tp) = traceparent {
        send = send.message_attributes(
            "traceparent",
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(tp)
                .build()
                .unwrap(),
        );
    }
    if let Some(header) = xray {
        send = send.message_system_attributes(
            aws_sdk_sqs::types::MessageSystemAttributeNameForSends::AwsTraceHeader,
            aws_sdk_sqs::types::MessageSystemAttributeValue::builder()
                .data_type("String")
                .string_value(header)
                .build()
                .unwrap(),
        );
    }
    send.send().await.unwrap().message_id.unwrap()
}

fn root_of<'a>(spans: &'a [Span], message_id: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| {
            s.name == "process edit message"
                && s.attributes.get("messaging.message.id").map(String::as_str) == Some(message_id)
        })
        .unwrap_or_else(|| {
            panic!(
                "no root span for {message_id}: {:#?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_is_one_trace_from_the_producer_to_s3() {
    let otlp = Otlp::start().await;
    let mut env = traced_worker("trace", &otlp.url).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let producer = "00f067aa0ba902b7";
    let id = send_with_attributes(
        &env,
        "t",
        "Update the homepage title to \"Traced\"",
        Some(&format!("00-{trace}-{producer}-01")),
        None,
    )
    .await;
    let events = env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    let done = common::event_of(&events, &id, "completed");
    assert_eq!(done["traceId"], trace, "{done}");

    // An interrupted message's trace shows the interrupt.
    let slow = send_with_attributes(&env, "u", "[standin:sleep 30]", None, None).await;
    // Its agent running (the first progress event, sent when the agent's process speaks),
    // not merely the job started.
    env.wait_for(&slow, "progress", common::ONE_MESSAGE).await;
    let newer = send_with_attributes(&env, "v", "[standin:write n.txt 1]", None, None).await;
    env.wait_for(&newer, "completed", common::ONE_MESSAGE).await;
    // SIGTERM flushes the exporter before the worker exits.
    assert_eq!(env.stop_worker(), Some(0));

    let spans = otlp.spans();
    let root = root_of(&spans, &id);
    assert_eq!(root.trace_id, trace);
    assert_eq!(
        root.parent_span_id, producer,
        "the producer's span is the root's parent"
    );
    assert_eq!(root.kind, 5, "a consumer span");
    assert_eq!(root.attributes["messaging.system"], "aws_sqs");
    assert_eq!(root.attributes["trace.parent_source"], "traceparent");
    assert!(root.attributes["edit.command"].starts_with("Update the homepage"));
    let mine: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let children: Vec<&Span> = {
        let mut c: Vec<&Span> = mine
            .iter()
            .copied()
            .filter(|s| s.parent_span_id == root.span_id)
            .collect();
        c.sort_by_key(|s| s.start);
        c
    };
    let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    let steps = [
        "prepare workspace",
        "agent run",
        "commit",
        "build",
        "publish",
        "push",
    ];
    let positions: Vec<usize> = steps
        .iter()
        .map(|step| {
            names
                .iter()
                .position(|n| n == step)
                .unwrap_or_else(|| panic!("no {step} span under the root: {names:?}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "steps out of order: {names:?}"
    );
    assert!(names.contains(&"send status event"), "{names:?}");
    let agent = children.iter().find(|s| s.name == "agent run").unwrap();
    assert!(!agent.attributes["agent.session_id"].is_empty());
    assert_eq!(agent.attributes["agent.turns"], "1");
    assert_eq!(agent.attributes["agent.result_subtype"], "success");
    assert!(
        agent
            .events
            .iter()
            .any(|(_, a)| a.get("step").is_some_and(|s| s.starts_with("Edit"))),
        "tool uses as events: {:?}",
        agent.events
    );
    let publish = children.iter().find(|s| s.name == "publish").unwrap();
    assert_eq!(
        publish.attributes["uploaded"], "4",
        "{:?}",
        publish.attributes
    );
    // Work done inside the build actor nests under the build span.
    let build = children.iter().find(|s| s.name == "build").unwrap();
    assert!(
        mine.iter()
            .any(|s| s.name == "build site" && s.parent_span_id == build.span_id)
    );
    // Every span of this trace belongs to this message: the root or one of its descendants.
    let ids: std::collections::HashSet<&str> = mine.iter().map(|s| s.span_id.as_str()).collect();
    for s in &mine {
        assert!(
            s.span_id == root.span_id || ids.contains(s.parent_span_id.as_str()),
            "stray span {s:?}"
        );
    }

    let interrupted = root_of(&spans, &slow);
    assert!(
        interrupted
            .events
            .iter()
            .any(|(name, a)| name.contains("work stopped")
                && a.get("reason").is_some_and(|r| r.contains("Interrupted"))),
        "{:?}",
        interrupted.events
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_trace_headers_are_continued_and_untraced_messages_start_a_trace() {
    let otlp = Otlp::start().await;
    let mut env = traced_worker("xray", &otlp.url).await;

    let header = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
    let xray = send_with_attributes(&env, "x", "[standin:write x.txt 1]", None, Some(header)).await;
    let events = env.wait_for(&xray, "completed", common::ONE_MESSAGE).await;
    let plain = send_with_attributes(&env, "y", "[standin:write y.txt 1]", None, None).await;
    let more = env.wait_for(&plain, "completed", common::ONE_MESSAGE).await;
    assert_eq!(env.stop_worker(), Some(0));
    let spans = otlp.spans();

    let root = root_of(&spans, &xray);
    assert_eq!(root.trace_id, "5759e988bd862e3fe1be46a994272793");
    assert_eq!(root.parent_span_id, "53995c3f42cd8ad8");
    assert_eq!(root.attributes["trace.parent_source"], "AWSTraceHeader");
    let done = common::event_of(&events, &xray, "completed");
    assert_eq!(done["traceId"], root.trace_id.as_str());

    let fresh = root_of(&spans, &plain);
    assert!(fresh.parent_span_id.is_empty(), "a new trace has no parent");
    assert_ne!(fresh.trace_id, root.trace_id);
    let done = common::event_of(&more, &plain, "completed");
    assert_eq!(done["traceId"], fresh.trace_id.as_str());
}
