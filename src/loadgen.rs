//! `edit-worker loadgen`: the synthetic load generator of the contract. Sends edit requests
//! across `load-c{i}/p{j}` workspaces and `t{k}` threads at a target rate, with a share of
//! bursts into busy workspaces (interrupts), while several readers drain the status queue from
//! the start until every message has its terminal event or the wait is over. Reports outcomes,
//! lost and duplicated events, throughput, latency percentiles and time per phase (table, JSON,
//! SVG chart).
//!
//! It creates no buckets or repositories: the operator prepares those for the ids above.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use clap::Args;
use edit_worker_actors::status::EventType;
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
    /// The request text; `{n}` is the message's sequence number.
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
        }
    }
}

/// One status event as a reader got it: the SQS message id tells a redelivery of the same
/// event (at-least-once delivery; moto does it under concurrent receives) from a second event.
struct Received {
    sqs_message_id: String,
    body: String,
}

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
    for (i, chunk) in plan.chunks(batch_size).enumerate() {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(j, (client, project, thread))| {
                let seq = i * batch_size + j + 1;
                let body = serde_json::json!({
                    "sessionId": format!("load-{thread}"),
                    "threadId": thread,
                    "clientId": client,
                    "projectId": project,
                    "command": args.command.replace("{n}", &seq.to_string()),
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
        anyhow::ensure!(
            out.failed().is_empty(),
            "some messages were not accepted: {:?}",
            out.failed()
        );
        for ok in out.successful() {
            sent.insert(
                ok.message_id().to_owned(),
                Sent {
                    sent_at: now,
                    terminal: Vec::new(),
                },
            );
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
    // Ends with whether every reader stopped on its own (they only do on an error).
    let readers_gone = loop {
        let until = grace_until.map_or(deadline, |g| g.min(deadline));
        let received = tokio::select! {
            r = events.recv() => r,
            _ = tokio::time::sleep_until(until) => None,
        };
        let Some(Received {
            sqs_message_id,
            body,
        }) = received
        else {
            break tokio::time::Instant::now() < until;
        };
        ledger.record(&sqs_message_id, &body);
        if grace_until.is_none() && ledger.unanswered == 0 {
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
                let s = Sent {
                    sent_at: SystemTime::UNIX_EPOCH,
                    terminal: Vec::new(),
                };
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
