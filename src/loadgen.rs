//! `edit-worker loadgen`: the synthetic load generator of the contract. Sends edit requests
//! across `load-c{i}/p{j}` workspaces and `t{k}` threads at a target rate, with a share of
//! bursts into busy workspaces (interrupts), while several readers drain the status queue from
//! the start until every message has its terminal event or the wait is over. Reports outcomes,
//! lost and duplicated events, throughput, latency percentiles and time per phase (table, JSON,
//! SVG chart). With `--ledger`, one JSON line per message (what was sent, in which send call,
//! and every terminal event seen) for checkers such as `bench/exactly_once.py`; with `--settle`,
//! it reads on until the input queue is empty, so that late repeats are seen too.
//!
//! It creates no buckets or repositories: the operator prepares those for the ids above.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use clap::Args;
use edit_worker_actors::contract::status::EventType;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug, Clone)]
pub struct LoadgenArgs {
    #[arg(long, default_value_t = 2)]
    clients: u32,
    #[arg(long, default_value_t = 1)]
    projects: u32,
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Messages to send in all.
    #[arg(long, default_value_t = 10)]
    messages: u32,
    /// Messages per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Share (0..1) of messages sent as a burst into a workspace that just got one (interrupts).
    #[arg(long, default_value_t = 0.0)]
    interrupt_share: f64,
    /// The request text; `{n}` is the message's sequence number (its place in the send order,
    /// from 1), `{client}`, `{project}` and `{thread}` its ids.
    #[arg(long, default_value = "[standin:write load/{n}.txt {n}]")]
    command: String,
    /// How long to collect terminal events after the last send, in seconds.
    #[arg(long, default_value_t = 120)]
    wait: u64,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write an SVG chart (latency over time, throughput) here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// The input queue (default INPUT_QUEUE_URL).
    #[arg(long, env = "INPUT_QUEUE_URL", hide_env_values = true)]
    queue_url: String,
    /// The status queue to read (default OUTPUT_QUEUE_URL).
    #[arg(long, env = "OUTPUT_QUEUE_URL", hide_env_values = true)]
    status_queue_url: String,
    /// Seed of the (deterministic) choice of bursts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Status queue readers working at once. One reader cannot keep up with a busy worker on a
    /// slow local SQS, and a queue left to grow gets slower for everyone (moto scans the whole
    /// queue on every send and receive).
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Write what became of every message here, one JSON object a line: its SQS message id, `n`,
    /// ids, command, the batch it was sent in and when, and every terminal event seen for it.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Once every message has its terminal event, go on reading until the input queue is empty
    /// (nothing visible, in flight or delayed: every delete took), then this many seconds more,
    /// so that late second events (after a lost delete, a redelivery) are counted too. 0: stop
    /// 2 s after the last terminal event, without looking at the input queue.
    #[arg(long, default_value_t = 0)]
    settle: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Terminal {
    completed: usize,
    interrupted: usize,
    failed: usize,
    rejected: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    p50: u64,
    p95: u64,
    p99: u64,
    max: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    sent: usize,
    terminal: Terminal,
    lost: usize,
    /// Messages with more than one terminal event (each further event counts once).
    duplicates: usize,
    /// Status events handed out more than once by the queue (the same SQS message again: SQS
    /// delivers at least once). Not duplicates: the worker sent them once.
    redeliveries: usize,
    throughput_per_sec: f64,
    latency_ms: Percentiles,
    /// Per phase of the pipeline (from the events' `durationsMs`): p50, p95, p99, max; and
    /// `orchestration`: end-to-end latency minus the agent, install, build, publish and push.
    phases_ms: BTreeMap<String, Percentiles>,
    /// First send to last terminal event.
    makespan_ms: u64,
}

/// One sent message and what became of it. Times are wall-clock: a terminal event's time is
/// its own `at` (stamped by the worker), not when we got round to reading it.
struct Sent {
    sent_at: SystemTime,
    terminal: Vec<(EventType, SystemTime, serde_json::Value)>,
    /// The status events' own SQS ids, beside `terminal`.
    terminal_ids: Vec<String>,
    /// What was sent, for the ledger.
    meta: Planned,
    /// When the send call that carried it returned.
    acked_at: SystemTime,
}

/// One planned message: its place in the send order (from 1), ids and request text, and the
/// batch (send call, from 0) it goes out in. Batches go out one after the other, at least 1 ms
/// apart, so SQS's `SentTimestamp` orders messages of different batches strictly.
#[derive(Debug, Clone, Default, PartialEq)]
struct Planned {
    n: usize,
    client: String,
    project: String,
    thread: String,
    command: String,
    batch: usize,
}

impl Sent {
    fn new(meta: Planned, sent_at: SystemTime, acked_at: SystemTime) -> Sent {
        Sent {
            sent_at,
            terminal: Vec::new(),
            terminal_ids: Vec::new(),
            meta,
            acked_at,
        }
    }

    /// The message's line in the ledger file.
    fn ledger_line(&self, message_id: &str) -> serde_json::Value {
        let ms = |t: SystemTime| since(t, SystemTime::UNIX_EPOCH).as_millis() as u64;
        let terminal: Vec<_> = self
            .terminal
            .iter()
            .zip(&self.terminal_ids)
            .map(|((kind, at, event), status_id)| {
                serde_json::json!({
                    "type": kind,
                    "atMs": ms(*at),
                    "commit": event["commit"],
                    "published": event.get("publish").is_some_and(|p| !p.is_null()),
                    "errorKind": event["error"]["kind"],
                    "statusMessageId": status_id,
                    // The whole event as it came, so that a checker can tell a repeat sent
                    // byte for byte from a second, different event (the fields above are a
                    // summary; the status message id differs for every send).
                    "event": event,
                })
            })
            .collect();
        serde_json::json!({
            "messageId": message_id,
            "n": self.meta.n,
            "clientId": self.meta.client,
            "projectId": self.meta.project,
            "threadId": self.meta.thread,
            "command": self.meta.command,
            "batch": self.meta.batch,
            "sentAtMs": ms(self.sent_at),
            "ackedAtMs": ms(self.acked_at),
            "terminal": terminal,
        })
    }
}

/// The place in its batch of the entry with this id (`m{j}`).
fn entry_index(id: &str) -> Option<usize> {
    id.strip_prefix('m')?.parse().ok()
}

/// The request text of message `n`: the template with its placeholders filled in.
fn expand(template: &str, n: usize, client: &str, project: &str, thread: &str) -> String {
    template
        .replace("{n}", &n.to_string())
        .replace("{client}", client)
        .replace("{project}", project)
        .replace("{thread}", thread)
}

/// What became of every sent message, from the status events read so far.
struct Ledger {
    /// By the input message's SQS id (what the events' `messageId` carries).
    sent: HashMap<String, Sent>,
    /// SQS ids of the status events already counted: a second copy is a redelivery.
    seen: HashSet<String>,
    redeliveries: usize,
    /// Sent messages without a terminal event yet (so that the end is seen without a scan).
    unanswered: usize,
}

impl Ledger {
    fn new(sent: HashMap<String, Sent>) -> Ledger {
        Ledger {
            unanswered: sent.len(),
            sent,
            seen: HashSet::new(),
            redeliveries: 0,
        }
    }

    /// Count one status event. Events of messages we did not send (another producer on the
    /// queue) and events that are not JSON are ignored.
    fn record(&mut self, sqs_message_id: &str, body: &str) {
        if !self.seen.insert(sqs_message_id.to_owned()) {
            self.redeliveries += 1;
            return;
        }
        let Ok(event) = serde_json::from_str::<serde_json::Value>(body) else {
            return;
        };
        let Ok(kind) = EventType::deserialize(&event["type"]) else {
            return;
        };
        if !kind.is_terminal() {
            return;
        }
        let at = event["at"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .unwrap_or_else(SystemTime::now);
        if let Some(entry) = event["messageId"]
            .as_str()
            .and_then(|id| self.sent.get_mut(id))
        {
            if entry.terminal.is_empty() {
                self.unanswered -= 1;
            }
            entry.terminal.push((kind, at, event));
            entry.terminal_ids.push(sqs_message_id.to_owned());
        }
    }
}

/// One status event as a reader got it: the SQS message id tells a redelivery of the same
/// event (at-least-once delivery; moto does it under concurrent receives) from a second event.
struct Received {
    sqs_message_id: String,
    body: String,
}

/// The least time between the return of one send call and the start of the next.
const BATCH_GAP: Duration = Duration::from_millis(2);

/// A tiny deterministic generator (xorshift): bursts are reproducible for a given seed.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The workspace and thread of message `n` (0-based), spreading messages round-robin.
fn target(args: &LoadgenArgs, n: u32) -> (String, String, String) {
    let workspaces = args.clients * args.projects;
    let w = n % workspaces;
    let round = n / workspaces;
    let client = w % args.clients + 1;
    let project = w / args.clients + 1;
    let thread = round % args.threads + 1;
    (
        format!("load-c{client}"),
        format!("p{project}"),
        format!("t{thread}"),
    )
}

/// Bad usage (exit code 2), found before anything is sent.
pub fn validate(args: &LoadgenArgs) -> Result<(), String> {
    if args.clients == 0 || args.projects == 0 || args.threads == 0 {
        return Err("--clients, --projects and --threads must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&args.interrupt_share) {
        return Err("--interrupt-share must be between 0 and 1".into());
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        return Err("--rate must be 0 (as fast as possible) or more".into());
    }
    Ok(())
}

pub async fn loadgen(args: LoadgenArgs) -> anyhow::Result<LoadReport> {
    validate(&args).map_err(anyhow::Error::msg)?;
    let sdk = crate::aws::load().await;
    let sqs = crate::aws::sqs(&sdk);
    let mut rng = Rng(args.seed.max(1) * 0x9E37_79B9_7F4A_7C15);
    let mut plan: Vec<(String, String, String)> = Vec::new();
    let mut n = 0;
    while plan.len() < args.messages as usize {
        let t = target(&args, n);
        plan.push(t.clone());
        // A burst: the same workspace again, on another thread, right away.
        if plan.len() < args.messages as usize && rng.next_f64() < args.interrupt_share {
            let thread = format!(
                "t{}",
                (n / (args.clients * args.projects) + 1) % args.threads + 1
            );
            let other = if args.threads > 1 {
                thread
            } else {
                format!("{}b", t.2)
            };
            plan.push((t.0, t.1, other));
        }
        n += 1;
    }

    // The readers start before the first send, so that the status queue never piles up.
    let (event_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let stop_reading = CancellationToken::new();
    let readers: Vec<_> = (0..args.readers.max(1))
        .map(|_| {
            tokio::spawn(read_status(
                sqs.clone(),
                args.status_queue_url.clone(),
                event_tx.clone(),
                stop_reading.clone(),
            ))
        })
        .collect();
    drop(event_tx);

    let started = Instant::now();
    let started_wall = SystemTime::now();
    let mut sent: HashMap<String, Sent> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let batch_size = if args.rate > 0.0 { 1 } else { 10 };
    let mut last_ack: Option<Instant> = None;
    for (i, chunk) in plan.chunks(batch_size).enumerate() {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        // A new millisecond after the last send returned: SQS's SentTimestamp (milliseconds)
        // then orders this batch strictly after the last one.
        if let Some(ack) = last_ack {
            tokio::time::sleep_until((ack + BATCH_GAP).into()).await;
        }
        let planned: Vec<Planned> = chunk
            .iter()
            .enumerate()
            .map(|(j, (client, project, thread))| {
                let n = i * batch_size + j + 1;
                Planned {
                    n,
                    client: client.clone(),
                    project: project.clone(),
                    thread: thread.clone(),
                    command: expand(&args.command, n, client, project, thread),
                    batch: i,
                }
            })
            .collect();
        let entries = planned
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let body = serde_json::json!({
                    "sessionId": format!("load-{}", p.thread),
                    "threadId": p.thread,
                    "clientId": p.client,
                    "projectId": p.project,
                    "command": p.command,
                });
                let sent_ms = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                // Each message starts its trace at the producer, as the upstream service's do.
                let (_span, traceparent) = crate::telemetry::producer_span("load");
                SendMessageBatchRequestEntry::builder()
                    .id(format!("m{j}"))
                    .message_body(body.to_string())
                    .message_attributes(
                        "traceparent",
                        MessageAttributeValue::builder()
                            .data_type("String")
                            .string_value(traceparent)
                            .build()
                            .expect("attribute"),
                    )
                    .message_attributes(
                        "sentAt",
                        MessageAttributeValue::builder()
                            .data_type("Number")
                            .string_value(sent_ms.to_string())
                            .build()
                            .expect("attribute"),
                    )
                    .build()
                    .expect("entry")
            })
            .collect::<Vec<_>>();
        let now = SystemTime::now();
        let out = sqs
            .send_message_batch()
            .queue_url(&args.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(&e)))
            .context("sending load")?;
        last_ack = Some(Instant::now());
        let acked = SystemTime::now();
        anyhow::ensure!(
            out.failed().is_empty(),
            "some messages were not accepted: {:?}",
            out.failed()
        );
        for ok in out.successful() {
            let meta = entry_index(ok.id())
                .and_then(|j| planned.get(j))
                .cloned()
                .unwrap_or_default();
            sent.insert(ok.message_id().to_owned(), Sent::new(meta, now, acked));
            order.push(ok.message_id().to_owned());
        }
    }
    let sending_done = Instant::now();
    eprintln!(
        "loadgen: sent {} messages in {:.1} s; collecting status events",
        sent.len(),
        sending_done.duration_since(started).as_secs_f64()
    );

    // Collect until every message has a terminal event (then a short grace for duplicates) or
    // the wait is over. Events read while we were still sending wait in the channel.
    let deadline = tokio::time::Instant::from_std(sending_done + Duration::from_secs(args.wait));
    let mut ledger = Ledger::new(sent);
    let mut grace_until: Option<tokio::time::Instant> = None;
    let mut settle_check = tokio::time::interval(Duration::from_secs(1));
    // Ends with whether every reader stopped on its own (they only do on an error).
    let readers_gone = loop {
        let until = grace_until.map_or(deadline, |g| g.min(deadline));
        let settling = args.settle > 0 && grace_until.is_none() && ledger.unanswered == 0;
        let received = tokio::select! {
            r = events.recv() => r,
            _ = tokio::time::sleep_until(until) => None,
            _ = settle_check.tick(), if settling => {
                if queue_is_empty(&sqs, &args.queue_url).await {
                    eprintln!("loadgen: the input queue is empty; reading {} s more", args.settle);
                    grace_until =
                        Some(tokio::time::Instant::now() + Duration::from_secs(args.settle));
                }
                continue;
            }
        };
        let Some(Received {
            sqs_message_id,
            body,
        }) = received
        else {
            break tokio::time::Instant::now() < until;
        };
        ledger.record(&sqs_message_id, &body);
        if args.settle == 0 && grace_until.is_none() && ledger.unanswered == 0 {
            grace_until = Some(tokio::time::Instant::now() + Duration::from_secs(2));
        }
    };
    stop_reading.cancel();
    for reader in readers {
        let outcome = reader
            .await
            .map_err(anyhow::Error::from)
            .and_then(|read| read);
        if let Err(e) = outcome {
            if readers_gone {
                return Err(e.context("reading the status queue"));
            }
            eprintln!("loadgen: a status reader stopped: {e:#}");
        }
    }

    let report = summarize(&ledger, started_wall);
    print_table(&report);
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.ledger {
        let mut lines = String::new();
        for id in &order {
            lines.push_str(&ledger.sent[id].ledger_line(id).to_string());
            lines.push('\n');
        }
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        let points: Vec<(f64, f64)> = order
            .iter()
            .filter_map(|id| {
                let s = &ledger.sent[id];
                let (_, at, _) = s.terminal.first()?;
                Some((
                    since(*at, started_wall).as_secs_f64(),
                    since(*at, s.sent_at).as_secs_f64() * 1000.0,
                ))
            })
            .collect();
        std::fs::write(path, crate::chart::render(&points))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Whether the queue holds nothing: no message visible, in flight or delayed. A failed look is
/// a no (the caller asks again).
async fn queue_is_empty(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> bool {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let Ok(out) = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(A::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
    else {
        return false;
    };
    let attrs = out.attributes.unwrap_or_default();
    [
        A::ApproximateNumberOfMessages,
        A::ApproximateNumberOfMessagesNotVisible,
        A::ApproximateNumberOfMessagesDelayed,
    ]
    .iter()
    .all(|a| attrs.get(a).is_some_and(|v| v == "0"))
}

/// One status queue reader: receive, hand the events over, delete them, until told to stop.
/// Polls without waiting while the queue has messages, long polls briefly when it is empty.
async fn read_status(
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    events: tokio::sync::mpsc::UnboundedSender<Received>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut empty = false;
    loop {
        let receive = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(if empty { 1 } else { 0 })
            .send();
        let out = tokio::select! {
            out = receive => out.map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(&e)))?,
            _ = stop.cancelled() => return Ok(()),
        };
        let messages = out.messages.unwrap_or_default();
        empty = messages.is_empty();
        let mut deletes = Vec::new();
        for (i, m) in messages.into_iter().enumerate() {
            deletes.push(
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(format!("d{i}"))
                    .receipt_handle(m.receipt_handle.clone().unwrap_or_default())
                    .build()
                    .expect("entry"),
            );
            // The collector is gone only when it has stopped listening: nothing left to do.
            if events
                .send(Received {
                    sqs_message_id: m.message_id.unwrap_or_default(),
                    body: m.body.unwrap_or_default(),
                })
                .is_err()
            {
                return Ok(());
            }
        }
        if !deletes.is_empty() {
            // A failed delete only means the event comes again: counted as a redelivery.
            let _ = sqs
                .delete_message_batch()
                .queue_url(&queue_url)
                .set_entries(Some(deletes))
                .send()
                .await;
        }
    }
}

fn percentiles(mut values: Vec<u64>) -> Percentiles {
    if values.is_empty() {
        return Percentiles::default();
    }
    values.sort_unstable();
    let at = |p: f64| {
        values[((p / 100.0 * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1]
    };
    Percentiles {
        p50: at(50.0),
        p95: at(95.0),
        p99: at(99.0),
        max: *values.last().unwrap(),
    }
}

/// `later - earlier`, zero if the clocks say otherwise.
fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

fn summarize(ledger: &Ledger, started: SystemTime) -> LoadReport {
    let sent = &ledger.sent;
    let mut terminal = Terminal::default();
    let (mut lost, mut duplicates) = (0, 0);
    let mut latencies = Vec::new();
    let mut phases: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut last = started;
    for s in sent.values() {
        let Some((kind, at, event)) = s.terminal.first() else {
            lost += 1;
            continue;
        };
        duplicates += s.terminal.len() - 1;
        match kind {
            EventType::Completed => terminal.completed += 1,
            EventType::Interrupted => terminal.interrupted += 1,
            EventType::Failed => terminal.failed += 1,
            _ => terminal.rejected += 1,
        }
        let latency = since(*at, s.sent_at).as_millis() as u64;
        latencies.push(latency);
        last = last.max(*at);
        if let Some(d) = event["durationsMs"].as_object() {
            for (phase, ms) in d {
                phases
                    .entry(phase.clone())
                    .or_default()
                    .push(ms.as_u64().unwrap_or(0));
            }
            // Everything but the work the worker waits on, from the send to the terminal event:
            // the queue's delivery, preparing the workspace, the commit, status events, and any
            // wait for a free slot or for the workspace's earlier message.
            let work: u64 = ["agent", "install", "build", "publish", "push"]
                .iter()
                .filter_map(|p| d.get(*p)?.as_u64())
                .sum();
            phases
                .entry("orchestration".into())
                .or_default()
                .push(latency.saturating_sub(work));
        }
    }
    let makespan = since(last, started);
    let done = sent.len() - lost;
    LoadReport {
        sent: sent.len(),
        terminal,
        lost,
        duplicates,
        redeliveries: ledger.redeliveries,
        throughput_per_sec: if makespan.is_zero() {
            0.0
        } else {
            done as f64 / makespan.as_secs_f64()
        },
        latency_ms: percentiles(latencies),
        phases_ms: phases
            .into_iter()
            .map(|(k, v)| (k, percentiles(v)))
            .collect(),
        makespan_ms: makespan.as_millis() as u64,
    }
}

fn print_table(r: &LoadReport) {
    println!("sent        {}", r.sent);
    println!("completed   {}", r.terminal.completed);
    println!("interrupted {}", r.terminal.interrupted);
    println!("failed      {}", r.terminal.failed);
    println!("rejected    {}", r.terminal.rejected);
    println!("lost        {}", r.lost);
    println!("duplicates  {}", r.duplicates);
    println!(
        "redelivered {} (the same status event again: not duplicates)",
        r.redeliveries
    );
    println!("makespan    {:.1} s", r.makespan_ms as f64 / 1000.0);
    println!("throughput  {:.2} messages/s", r.throughput_per_sec);
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>8}",
        "ms", "p50", "p95", "p99", "max"
    );
    let row = |name: &str, p: &Percentiles| {
        println!(
            "{:<14} {:>8} {:>8} {:>8} {:>8}",
            name, p.p50, p.p95, p.p99, p.max
        )
    };
    row("end to end", &r.latency_ms);
    for (phase, p) in &r.phases_ms {
        row(phase, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = percentiles((1..=100).collect());
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50, 95, 99, 100));
        assert_eq!(percentiles(vec![]).max, 0);
    }

    #[test]
    fn messages_spread_over_workspaces_then_threads() {
        let args = LoadgenArgs::try_parse_from_for_test(&[
            "--clients",
            "2",
            "--projects",
            "2",
            "--threads",
            "2",
        ]);
        let ids: Vec<_> = (0..6).map(|n| target(&args, n)).collect();
        assert_eq!(ids[0], ("load-c1".into(), "p1".into(), "t1".into()));
        assert_eq!(ids[1], ("load-c2".into(), "p1".into(), "t1".into()));
        assert_eq!(ids[2], ("load-c1".into(), "p2".into(), "t1".into()));
        assert_eq!(ids[4], ("load-c1".into(), "p1".into(), "t2".into()));
    }

    fn event(kind: &str, message_id: &str) -> String {
        serde_json::json!({"type": kind, "messageId": message_id, "at": "2026-11-26T01:00:00Z"})
            .to_string()
    }

    #[test]
    fn the_ledger_tells_redeliveries_from_duplicates() {
        let sent = ["a", "b", "c"]
            .into_iter()
            .map(|id| {
                let s = Sent::new(
                    Planned::default(),
                    SystemTime::UNIX_EPOCH,
                    SystemTime::UNIX_EPOCH,
                );
                (id.to_owned(), s)
            })
            .collect();
        let mut ledger = Ledger::new(sent);
        ledger.record("s1", &event("started", "a"));
        ledger.record("s2", &event("completed", "a"));
        // The queue hands the same status event out again: not a second terminal event.
        ledger.record("s2", &event("completed", "a"));
        // The worker reports message b twice: a duplicate.
        ledger.record("s3", &event("interrupted", "b"));
        ledger.record("s4", &event("completed", "b"));
        // Someone else's message, and a body that is not JSON: ignored.
        ledger.record("s5", &event("completed", "zzz"));
        ledger.record("s6", "not json");
        assert_eq!((ledger.unanswered, ledger.redeliveries), (1, 1));
        let report = summarize(&ledger, SystemTime::UNIX_EPOCH);
        assert_eq!((report.lost, report.duplicates), (1, 1));
        assert_eq!(
            (report.terminal.completed, report.terminal.interrupted),
            (1, 1),
            "a message counts by its first terminal event"
        );
        ledger.record("s7", &event("failed", "c"));
        assert_eq!(ledger.unanswered, 0);
    }

    #[test]
    fn commands_carry_the_sequence_number_and_ids() {
        assert_eq!(
            expand(
                "[load n={n} c={client} p={project} t={thread}] [standin:write t/{thread}.txt {n}]",
                12,
                "load-c3",
                "p1",
                "t2b"
            ),
            "[load n=12 c=load-c3 p=p1 t=t2b] [standin:write t/t2b.txt 12]"
        );
        // The contract's template, and text without placeholders, as before.
        assert_eq!(
            expand("[standin:write load/{n}.txt {n}]", 7, "c", "p", "t"),
            "[standin:write load/7.txt 7]"
        );
        assert_eq!(expand("plain", 1, "c", "p", "t"), "plain");
    }

    #[test]
    fn the_ledger_line_says_what_was_sent_and_every_terminal_event() {
        let meta = Planned {
            n: 3,
            client: "load-c1".into(),
            project: "p1".into(),
            thread: "t1".into(),
            command: "do 3".into(),
            batch: 0,
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000);
        let mut ledger = Ledger::new(HashMap::from([(
            "m-3".to_owned(),
            Sent::new(meta, at, at + Duration::from_millis(5)),
        )]));
        let completed = serde_json::json!({
            "type": "completed", "messageId": "m-3", "at": "2026-11-26T01:00:00Z",
            "commit": "abc", "publish": {"uploaded": 1},
        });
        ledger.record("s1", &completed.to_string());
        ledger.record("s1", &completed.to_string());
        ledger.record("s2", &event("interrupted", "m-3"));
        let line = ledger.sent["m-3"].ledger_line("m-3");
        assert_eq!(line["messageId"], "m-3");
        assert_eq!(line["n"], 3);
        assert_eq!(
            (&line["clientId"], &line["projectId"], &line["threadId"]),
            (
                &serde_json::json!("load-c1"),
                &serde_json::json!("p1"),
                &serde_json::json!("t1")
            )
        );
        assert_eq!(
            (&line["command"], &line["batch"]),
            (&"do 3".into(), &0.into())
        );
        assert_eq!(
            (&line["sentAtMs"], &line["ackedAtMs"]),
            (&1000.into(), &1005.into())
        );
        let terminal = line["terminal"].as_array().unwrap();
        assert_eq!(
            terminal.len(),
            2,
            "the redelivered copy of s1 is not a second event"
        );
        assert_eq!(terminal[0]["type"], "completed");
        assert_eq!(terminal[0]["commit"], "abc");
        assert_eq!(terminal[0]["published"], true);
        assert_eq!(terminal[0]["statusMessageId"], "s1");
        assert_eq!(terminal[1]["type"], "interrupted");
        assert_eq!(terminal[1]["published"], false);
        assert_eq!(terminal[1]["statusMessageId"], "s2");
    }

    #[test]
    fn batch_entries_are_told_apart_by_their_ids() {
        assert_eq!(entry_index("m0"), Some(0));
        assert_eq!(entry_index("m9"), Some(9));
        assert_eq!(entry_index("x1"), None);
        assert_eq!(entry_index("m"), None);
    }

    #[test]
    fn ledger_and_settle_are_optional() {
        let args = LoadgenArgs::try_parse_from_for_test(&[]);
        assert_eq!((args.ledger.clone(), args.settle), (None, 0));
        let args =
            LoadgenArgs::try_parse_from_for_test(&["--ledger", "/tmp/l.jsonl", "--settle", "5"]);
        assert_eq!(args.ledger, Some(PathBuf::from("/tmp/l.jsonl")));
        assert_eq!(args.settle, 5);
    }

    impl LoadgenArgs {
        fn try_parse_from_for_test(extra: &[&str]) -> LoadgenArgs {
            #[derive(clap::Parser)]
            struct Wrapper {
                #[command(flatten)]
                args: LoadgenArgs,
            }
            let mut argv = vec!["x", "--queue-url", "q", "--status-queue-url", "s"];
            argv.extend_from_slice(extra);
            <Wrapper as clap::Parser>::parse_from(argv).args
        }
    }
}
