"""Interrupt latency benchmark (issues 3, 28).

The condition measured: a newer message of the same workspace reaches its session while that
workspace's agent is at work (its first tool use reported), and agent slots are to spare
(AGENT_CONCURRENCY is above the number of agents running), so the stop is the agent's own and
not the cancel of a wait for a slot. Timed inside the real worker from the stop request to the
agent's whole process group gone, while OTHER_MESSAGES agents of other workspaces keep running
in the same worker.

Figures come from the worker's OTLP telemetry, never its log: the per-interrupt samples are the
`interrupt_latency_us` attribute of its "work stopped" span events with reason Interrupted; the
metric `edit_worker.interrupt.latency{reason=interrupted}` must count as many (and its min/max
agree), and `edit_worker.agent.runs{ok=false}` must count one ended agent run per interrupt
(a message stopped while waiting for a slot runs no agent and would not be counted).

Prints median, p99 and max. Run: scripts/bench interrupt-latency (INTERRUPTS, OTHER_MESSAGES).
"""

import json
import os
import shutil
import sys
import tempfile
import time

from common import (ROOT, Otlp, aws_clients, commit_of_tree, env_num, pct, seed_repo, start_worker,
                    worker_bin, worker_env)

WORKER = worker_bin()
INTERRUPTS = env_num("INTERRUPTS", 200, int)
OTHERS = env_num("OTHER_MESSAGES", 100, int)


def upstream(base, client):
    """The client's upstream: a copy of the tiny site's bare repository."""
    shutil.copytree(seed_repo(base, "tiny-site"), os.path.join(base, "upstream", client, "site.git"))


def main():
    sqs, s3 = aws_clients()
    base = tempfile.mkdtemp(prefix="bench-int-")
    # Tenants' uids pass through it to their workspaces (the worker's sandbox, ISOLATION).
    os.chmod(base, 0o711)
    q = {n: sqs.create_queue(QueueName=f"bi-{os.getpid()}-{n}")["QueueUrl"] for n in ("in", "out")}
    clients = ["target"] + [f"other{i}" for i in range(OTHERS)]
    for c in clients:
        upstream(base, c)
        s3.create_bucket(Bucket=f"edit.{c}.bench-int.test")
    otlp = Otlp()
    # Agents at once: the OTHERS plus the target's one; slots to spare beyond that.
    agent_slots = OTHERS + 10
    env = worker_env(**{
        "INPUT_QUEUE_URL": q["in"], "OUTPUT_QUEUE_URL": q["out"],
        "WORKSPACE_ROOT": os.path.join(base, "ws"),
        "GIT_REMOTE_TEMPLATE": os.path.join(base, "upstream/{clientId}/{projectId}.git"),
        "BUCKET_TEMPLATE": "edit.{clientId}.bench-int.test",
        "CLAUDE_BIN": os.path.join(ROOT, "tools/claude-standin"),
        "CLAUDE_CONFIG_DIR": os.path.join(base, "claude"),
        "MAX_IN_FLIGHT": str(OTHERS + 50),
        "AGENT_CONCURRENCY": str(agent_slots),
        **otlp.env(),
        "RUST_LOG": "warn",
    })
    log_path = os.path.join(base, "worker.log")
    worker = start_worker(WORKER, env, log_path)

    def send(client, thread, command):
        body = json.dumps({"sessionId": "s", "threadId": thread, "clientId": client,
                           "projectId": "site", "command": command})
        return sqs.send_message(QueueUrl=q["in"], MessageBody=body)["MessageId"]

    # Status events seen, by message: the types it has had.
    seen = {}

    def wait_at_work(message_ids, timeout=300):
        """Until each message's agent is at work: its first `progress` event (the worker sends
        the first tool use at once, later ones at most every PROGRESS_INTERVAL_SECONDS)."""
        deadline = time.time() + timeout
        waiting = set(message_ids)
        while waiting and time.time() < deadline:
            out = sqs.receive_message(QueueUrl=q["out"], MaxNumberOfMessages=10, WaitTimeSeconds=1)
            for m in out.get("Messages", []):
                sqs.delete_message(QueueUrl=q["out"], ReceiptHandle=m["ReceiptHandle"])
                event = json.loads(m["Body"])
                seen.setdefault(event.get("messageId"), set()).add(event["type"])
            waiting = {mid for mid in waiting if "progress" not in seen.get(mid, ())}
            for mid in waiting:
                if seen.get(mid, set()) & {"failed", "rejected", "completed"}:
                    raise SystemExit(f"message {mid} ended {seen[mid]}; see {log_path}")
        if waiting:
            raise SystemExit(f"{len(waiting)} messages never had their agent at work; see {log_path}")

    try:
        # Other work held by the same worker: every one of these agents keeps running.
        others = [send(c, "busy", "[standin:sleep 3600]") for c in clients[1:]]
        wait_at_work(others)
        print(f"{len(others)} agents of other workspaces at work", file=sys.stderr)
        previous = send("target", "t", "[standin:write a.txt a] [standin:sleep 3600]")
        wait_at_work([previous])
        for i in range(INTERRUPTS):
            previous = send("target", "t" if i % 2 else "u", f"[standin:write n{i}.txt {i}] [standin:sleep 3600]")
            wait_at_work([previous])
        # Every interrupt counted by the worker's metrics: the stops, and one agent run ended
        # (not ok) per stop: each stopped an agent at work, not a wait for a slot.
        otlp.wait("all interrupts in the metrics", lambda o: (
            o.histogram("edit_worker.interrupt.latency", reason="interrupted")["count"] >= INTERRUPTS
            and o.value("edit_worker.agent.runs", ok="false") >= INTERRUPTS), timeout=120)
        hist = otlp.histogram("edit_worker.interrupt.latency", reason="interrupted")
        runs_stopped = otlp.value("edit_worker.agent.runs", ok="false")
        otlp.wait("a span event per interrupt", lambda o: len(
            o.event_values("interrupt_latency_us", reason="Interrupted")) >= INTERRUPTS, timeout=60)
        samples = [int(v) / 1000.0 for v in otlp.event_values("interrupt_latency_us", reason="Interrupted")]
    finally:
        worker.terminate()
        worker.wait(timeout=120)
        otlp.stop()
    if hist["count"] != INTERRUPTS or runs_stopped != INTERRUPTS or len(samples) != INTERRUPTS:
        raise SystemExit(f"expected {INTERRUPTS} interrupts: metric {hist['count']}, agent runs "
                         f"stopped {runs_stopped}, span events {len(samples)}; see {log_path}")
    if abs(min(samples) * 1000 - hist["min"]) > 1 or abs(max(samples) * 1000 - hist["max"]) > 1:
        raise SystemExit(f"span events and metric disagree: {min(samples)}..{max(samples)} ms "
                         f"against {hist['min']}..{hist['max']} us")
    print(f"interrupt latency, commit {commit_of_tree()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("condition: newer message of the same workspace at its session while the agent is at work, "
          f"{OTHERS} other agents at work, AGENT_CONCURRENCY={agent_slots} (slots to spare) -> "
          "the agent's process group gone")
    print(f"  interrupts measured  {len(samples)} (metric count {hist['count']}, agent runs stopped {runs_stopped})")
    print(f"  median               {pct(samples, 50):.1f} ms")
    print(f"  p99                  {pct(samples, 99):.1f} ms")
    print(f"  max                  {max(samples):.1f} ms")
    print(f"  target p99 < 50 ms   {'met' if pct(samples, 99) < 50 else 'NOT met'}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
