"""Interrupt latency with the REAL Claude Code CLI (issue 14).

One worker, one workspace, one thread; the pinned CLI (.tools/claude-code, installed by
scripts/test) talks to tools/fake-anthropic-api. Each round sends a message whose second model
request takes a minute, waits until the CLI is in the middle of that request, and sends the next
message of the same thread, which interrupts it (and is itself interrupted by the round after).
The worker exports over OTLP (bench/common.py receives it), per interrupt:
  interrupt_latency_us   newer message at its session -> the agent run over (CLI exited, its
                         process group gone): an attribute of its "work stopped" span event,
                         counted by the metric edit_worker.interrupt.latency{reason=interrupted}
  idle_after_us          the interrupt sent to the CLI -> the CLI's result line (its turn ended,
                         cost known), with in_band; counted by edit_worker.agent.idle_after_stop
Read from that telemetry, never from the worker's log (issue 28); the sample counts must equal
the metrics' counts. Prints median and max of both over INTERRUPTS rounds (default 20): with 20
samples a p99 is the max, so no p99 is printed.

Run from the repository root, after scripts/test (which installs moto and the CLI and builds the
worker):
  .venv/bin/python bench/real_cli_interrupt_latency.py
Environment: INTERRUPTS, WORKER_BIN (default target/debug/edit-worker), CLAUDE_BIN (default the
pinned CLI), MOTO_ENDPOINT (default: a moto started here).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import boto3

from common import ROOT, Otlp, commit_of_tree, env_num, pct, seed_repo, worker_bin

INTERRUPTS = env_num("INTERRUPTS", 20, int)
WORKER = worker_bin("target/debug/edit-worker")
CLAUDE = os.environ.get("CLAUDE_BIN", os.path.join(ROOT, ".tools/claude-code/node_modules/.bin/claude"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_moto():
    port = free_port()
    proc = subprocess.Popen([os.path.join(ROOT, ".venv/bin/python"), os.path.join(ROOT, "tools/moto-server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    sys.exit("moto did not start")


def turns_for(log_path, marker):
    found = []
    try:
        with open(log_path) as f:
            for line in f:
                # The API server may be writing the last line as we read it: a line without
                # its newline is not complete yet, and is read on the next look.
                if not line.endswith("\n"):
                    break
                r = json.loads(line)
                if r.get("path", "").startswith("/v1/messages") and marker in (r.get("prompt") or ""):
                    found.append(r)
    except FileNotFoundError:
        pass
    return found


def stopped_by_interrupt(otlp):
    """interrupt_latency_us of the runs stopped by a newer message (not by the shutdown)."""
    return [int(v) for v in otlp.event_values("interrupt_latency_us", reason="Interrupted")]


def summary(name, micros):
    ms = [m / 1000 for m in micros]
    print(f"| {name} | {len(ms)} | {pct(ms, 50):.1f} ms | {max(ms):.1f} ms |")


def main():
    for path in (WORKER, CLAUDE):
        if not os.path.exists(path):
            sys.exit(f"missing {path}: run scripts/test first")
    moto = None
    endpoint = os.environ.get("MOTO_ENDPOINT")
    if not endpoint:
        moto, endpoint = start_moto()
    kw = dict(endpoint_url=endpoint, region_name="us-east-1",
              aws_access_key_id="testing", aws_secret_access_key="testing")
    sqs, s3 = boto3.client("sqs", **kw), boto3.client("s3", **kw)
    base = tempfile.mkdtemp(prefix="bench-real-int-")
    # Tenants' uids pass through it to their workspaces (the worker's sandbox, ISOLATION).
    os.chmod(base, 0o711)
    name = f"brci-{os.getpid()}"
    queues = {n: sqs.create_queue(QueueName=f"{name}-{n}")["QueueUrl"] for n in ("in", "out")}
    s3.create_bucket(Bucket=f"edit.bench.{name}.test")
    shutil.copytree(seed_repo(base, "tiny-site"), os.path.join(base, "upstream", "bench", "site.git"))

    api_log = os.path.join(base, "api.jsonl")
    api = subprocess.Popen([os.path.join(ROOT, "tools/fake-anthropic-api"), "--log", api_log],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    api_url = api.stdout.readline().strip()
    worker_log = os.path.join(base, "worker.log")
    otlp = Otlp()
    env = {**otlp.env(),
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", base),
        "INPUT_QUEUE_URL": queues["in"], "OUTPUT_QUEUE_URL": queues["out"],
        "WORKSPACE_ROOT": os.path.join(base, "workspaces"),
        "GIT_REMOTE_TEMPLATE": os.path.join(base, "upstream/{clientId}/{projectId}.git"),
        "BUCKET_TEMPLATE": f"edit.{{clientId}}.{name}.test",
        "CLAUDE_BIN": CLAUDE, "CLAUDE_CONFIG_DIR": os.path.join(base, "claude"),
        "ANTHROPIC_BASE_URL": api_url, "ANTHROPIC_API_KEY": "sk-ant-test-not-a-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "RUST_LOG": "warn",
        "ASTRO_TELEMETRY_DISABLED": "1",
    }
    worker = subprocess.Popen([WORKER, "run", "--exit-when-idle", "60"], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(worker_log, "w"))

    def send(text):
        body = {"sessionId": "s", "threadId": "t", "clientId": "bench", "projectId": "site", "command": text}
        sqs.send_message(QueueUrl=queues["in"], MessageBody=json.dumps(body))

    def command(i):
        return f"round {i}: [api:write r{i}.txt {i}] [api:sleep 60] [api:write never{i}.txt x]"

    try:
        send(command(0))
        for i in range(INTERRUPTS):
            deadline = time.time() + 120
            # The CLI of round i is in the middle of its minute-long second request.
            while len(turns_for(api_log, f"round {i}:")) < 2:
                if time.time() > deadline:
                    sys.exit(f"round {i} never reached its slow request; see {worker_log}")
                time.sleep(0.05)
            time.sleep(0.3)
            last = i + 1 == INTERRUPTS
            send(f"round {i + 1}: [api:say done] last" if last else command(i + 1))
            print(f"interrupt {i + 1}/{INTERRUPTS}", file=sys.stderr)
        # The last message completes; then read the figures.
        deadline = time.time() + 120
        while time.time() < deadline:
            if len(stopped_by_interrupt(otlp)) >= INTERRUPTS and len(turns_for(api_log, "last")) >= 1:
                break
            time.sleep(0.2)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        api.kill()
        if moto:
            moto.kill()
    # The worker flushed a last collection when it stopped.
    otlp.stop()
    gone = stopped_by_interrupt(otlp)
    idle = [int(x) for x in otlp.event_values("idle_after_us")]
    in_band = sum(1 for v in otlp.event_values("in_band") if Otlp._text(v) == "true")
    gone_metric = otlp.histogram("edit_worker.interrupt.latency", reason="interrupted")["count"]
    idle_metric = otlp.histogram("edit_worker.agent.idle_after_stop")["count"]
    if len(gone) != gone_metric or len(idle) != idle_metric or len(gone) < INTERRUPTS:
        sys.exit(f"samples and metrics disagree: {len(gone)} stops against {gone_metric}, "
                 f"{len(idle)} idle against {idle_metric} (wanted {INTERRUPTS}); see {worker_log}")
    print(f"real CLI interrupt latency, commit {commit_of_tree()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"real Claude Code CLI {subprocess.run([CLAUDE, '--version'], capture_output=True, text=True).stdout.strip()}, "
          f"{INTERRUPTS} interrupts, {in_band} ended by the in-band interrupt")
    print(f"| | samples | median | max (of {INTERRUPTS}; with fewer than 100 samples the p99 is the max) |")
    print("| --- | --- | --- | --- |")
    summary("newer message at its session -> CLI gone", gone)
    summary("interrupt sent -> CLI idle (result line)", idle)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
