"""Edit-to-live latency (issue 15): what a client feels, from sending a request to the edit being
live, with dependencies from the shared store (INSTALL_MODE=shared) against today's per-workspace
`npm ci` (INSTALL_MODE=per-workspace), side by side in one run. Figures are printed, not asserted.

  1. first message into a fresh workspace of the sample Astro site, agent 0 s; the shared store
     is warm (another workspace of the same lock file installed before the samples);
  2. a second message into the same workspace (warm), agent 0 s;
  3. (CASES=1,2,3) the README's realistic run: 20 clients of one lock file, real Astro build,
     agent 10 s, sent at once through `edit-worker loadgen`: p50 / p95 / max.

The two workers run at the same time on queues of their own and take turns sample by sample, so
that the machine's drift (other builds on these 2 cores) falls on both alike. A sample is timed
from just before SendMessage to the arrival of its `completed` status event, which the worker
sends after the publish and the push. Median and p95 are nearest-rank over the samples.

Run with: scripts/bench latency, or directly:
  source scripts/lib.sh; ensure_moto; start_moto
  MOTO_ENDPOINT=$MOTO_ENDPOINT .venv/bin/python bench/latency.py
Settings: WORKER_BIN (default target/release/edit-worker), SAMPLES (default 5), CASES (default
1,2), CLIENTS for case 3 (default 20), MODES (default shared,per-workspace), BUILD_SLOTS for
case 3 (e.g. 1,2,3: one run per BUILD_CONCURRENCY, side by side; default the worker's own),
STORES for case 3 (cold,warm: the lock file installed inside the run, or once before it),
AHEAD for case 3 (e.g. 0,16: one run per BUILD_AHEAD_MAX, side by side; default the worker's
own), ROUNDS for case 3 (default 1: each combination once; more alternate them round by round),
WORKER_RUST_LOG (the workers' RUST_LOG), KEEP=1 (keep the workers' folders: logs, reports),
CHECK (e.g. off,on: each install mode once per BROWSER_CHECK setting, side by side, with the
check's own time and the browser's memory; default the worker's own, `auto`).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import (AWS_ENV, ROOT, Otlp, aws_clients, commit_of_tree, env_list, env_num, pct, seed_repo,
                    start_worker, worker_bin, worker_env)

WORKER = worker_bin("target/release/edit-worker")
SAMPLES = env_num("SAMPLES", 5, int)
CASES = set(os.environ.get("CASES", "1,2").split(","))
CLIENTS = env_num("CLIENTS", 20, int)
MODES = os.environ.get("MODES", "shared,per-workspace").split(",")
# Case 3 with each of these BUILD_CONCURRENCY settings side by side (default: the worker's own,
# the number of cores), to choose the default by measurement.
BUILD_SLOTS = env_list("BUILD_SLOTS", "")
# Case 3 with the store cold (the lock file's first install ever happens inside the run) and/or
# warm (installed once before, as on a volume that has served the agency before; case 1 is
# measured warm too).
STORES = os.environ.get("STORES", "cold").split(",")
# Case 3 with each of these BUILD_AHEAD_MAX settings (0: Astro is not started ahead).
AHEAD = env_list("AHEAD", "")
ROUNDS = env_num("ROUNDS", 1, int)
# BROWSER_CHECK settings side by side (issue 27): each install mode once per setting.
CHECKS = env_list("CHECK", "")
sqs, s3 = aws_clients()
BASE = tempfile.mkdtemp(prefix="bench-latency-")
# Tenants' uids pass through it to their workspaces (the worker's sandbox, ISOLATION).
os.chmod(BASE, 0o711)
RUN = f"{os.getpid()}-{int(time.time())}"


def log(text):
    print(text, file=sys.stderr, flush=True)


def seed():
    """One bare repository of the sample Astro site; every workspace's upstream is a copy."""
    return seed_repo(BASE, "astro-site")


class Worker:
    """One `edit-worker run` with its own queues, workspaces, upstreams and buckets."""

    def __init__(self, tag, extra):
        self.tag = f"{tag}-{RUN}"
        self.dir = os.path.join(BASE, tag)
        self.upstream = os.path.join(self.dir, "upstream")
        os.makedirs(self.upstream)
        self.q = {n: sqs.create_queue(QueueName=f"lat-{self.tag}-{n}")["QueueUrl"] for n in ("in", "out")}
        self.log = os.path.join(self.dir, "worker.log")
        # The worker's own telemetry: the store's check-and-link times are read from its span
        # events' `link_ms` fields, never from its log (issue 28). Both modes export alike.
        self.otlp = Otlp()
        env = worker_env(**{
            **self.otlp.env(),
            "INPUT_QUEUE_URL": self.q["in"], "OUTPUT_QUEUE_URL": self.q["out"],
            "WORKSPACE_ROOT": os.path.join(self.dir, "ws"),
            "GIT_REMOTE_TEMPLATE": os.path.join(self.upstream, "{clientId}/{projectId}.git"),
            "BUCKET_TEMPLATE": self.bucket("{clientId}"),
            "CLAUDE_BIN": os.path.join(ROOT, "tools/claude-standin"),
            "ASTRO_TELEMETRY_DISABLED": "1",
            "RUST_LOG": os.environ.get("WORKER_RUST_LOG", "warn"),
            "PROGRESS_INTERVAL_SECONDS": "60", **extra})
        # BUILD_SCRIPTS_WITHOUT_NPM=false measures builds through npm, as before.
        if "BUILD_SCRIPTS_WITHOUT_NPM" in os.environ:
            env["BUILD_SCRIPTS_WITHOUT_NPM"] = os.environ["BUILD_SCRIPTS_WITHOUT_NPM"]
        self.proc = start_worker(WORKER, env, self.log)

    def bucket(self, client):
        return f"edit.{client}.{self.tag}.bench"

    def workspace(self, client, project="p1"):
        """A fresh upstream (and bucket) for client/project; its workspace is cloned on first use."""
        shutil.copytree(seed(), os.path.join(self.upstream, client, f"{project}.git"))
        s3.create_bucket(Bucket=self.bucket(client))

    def edit(self, client, text, project="p1", thread="t"):
        """Send one request; wait for its terminal event. Returns (seconds, event)."""
        body = json.dumps({"sessionId": f"s-{thread}", "threadId": thread, "clientId": client,
                           "projectId": project,
                           "command": f"Update the homepage title to \"{text}\""})
        started = time.monotonic()
        mid = sqs.send_message(QueueUrl=self.q["in"], MessageBody=body)["MessageId"]
        deadline = started + 600
        while time.monotonic() < deadline:
            got = sqs.receive_message(QueueUrl=self.q["out"], MaxNumberOfMessages=10, WaitTimeSeconds=2)
            for m in got.get("Messages", []):
                sqs.delete_message(QueueUrl=self.q["out"], ReceiptHandle=m["ReceiptHandle"])
                event = json.loads(m["Body"])
                if event.get("messageId") == mid and event.get("type") in (
                        "completed", "failed", "interrupted", "rejected"):
                    elapsed = time.monotonic() - started
                    if event["type"] != "completed":
                        raise SystemExit(f"{self.tag}: {client} ended {event['type']}: {event.get('error')}"
                                         f"\n(worker log: {self.log})")
                    return elapsed, event
        raise SystemExit(f"{self.tag}: no terminal event for {client} in 600 s (worker log: {self.log})")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.otlp.stop()

    def link_ms(self):
        """Each build's store check (before and after) plus linking: the `link_ms` field of
        the worker's span events (one per build that used the store), after `stop`."""
        return [int(v) for v in self.otlp.event_values("link_ms")]


def remove_all(path):
    """The store's entries are read-only: give folders back their owner's write bit first."""
    for d, dirs, _ in os.walk(path):
        for name in dirs:
            full = os.path.join(d, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def phase_median(events, phase):
    vals = [e.get("durationsMs", {}).get(phase) for e in events]
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return f"{pct(vals, 50) / 1000:.1f}"


def variants():
    """(label, settings) of each worker to compare: the install modes, each once per CHECK."""
    if not CHECKS:
        return [(m, {"INSTALL_MODE": m}) for m in MODES]
    return [(f"{m}, check {c}", {"INSTALL_MODE": m, "BROWSER_CHECK": c}) for m in MODES for c in CHECKS]


def browser_rss_mb(worker_dir):
    """Resident memory (proportional share, MB) of the Chromium processes a worker started:
    those whose command line names a profile under its workspace root."""
    total_kb = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            if worker_dir not in cmd or "chrom" not in cmd or "bwrap" in cmd.split("\0")[0]:
                continue
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def cases_1_and_2():
    workers = {m: Worker(f"c12-{i}", {**extra, "BUILD_CONCURRENCY": "2"})
               for i, (m, extra) in enumerate(variants())}
    first = {m: [] for m in workers}
    second = {m: [] for m in workers}
    memory = {m: 0.0 for m in workers}
    try:
        # Warm-up, both modes alike: one workspace each, so that the store holds the lock file's
        # entry (shared) and the npm cache and the disk cache are warm (both).
        for m, w in workers.items():
            w.workspace("warm")
            secs, ev = w.edit("warm", "Warm-up")
            log(f"  warm-up {m}: {secs:.1f} s (install {ev['durationsMs'].get('install', '-')} ms)")
        for i in range(SAMPLES):
            for m, w in workers.items():
                client = f"lat{i}"
                w.workspace(client)
                first[m].append(w.edit(client, f"First {i}"))
                memory[m] = max(memory[m], browser_rss_mb(w.dir))
                if "2" in CASES:
                    second[m].append(w.edit(client, f"Second {i}"))
                    memory[m] = max(memory[m], browser_rss_mb(w.dir))
                log(f"  sample {i + 1}/{SAMPLES} {m}: first {first[m][-1][0]:.1f} s"
                    + (f", second {second[m][-1][0]:.1f} s" if "2" in CASES else ""))
    finally:
        for w in workers.values():
            w.stop()
    if CHECKS:
        print("browser memory (Chromium's processes, proportional set size), highest after a message: "
              + ", ".join(f"{m} {mb:.0f} MB" for m, mb in memory.items()))
    links = workers["shared"].link_ms() if "shared" in workers else []
    if links:
        print(f"shared store: check before and after the build plus linking, per build: median "
              f"{pct(links, 50)} ms, p95 {pct(links, 95)} ms, max {max(links)} ms ({len(links)} builds)")
    rows = []
    for case, label, data in (("1", "1. first message, fresh workspace, agent 0 s", first),
                              ("2", "2. second message, same workspace, agent 0 s", second)):
        if case not in CASES:
            continue
        for m in workers:
            secs = [s for s, _ in data[m]]
            events = [e for _, e in data[m]]
            rows.append((label, m, len(secs), f"{pct(secs, 50):.1f} s", f"{pct(secs, 95):.1f} s",
                         phase_median(events, "install"), phase_median(events, "build"),
                         phase_median(events, "publish"), phase_median(events, "check"),
                         phase_median(events, "total")))
    return rows


def case_3():
    """The README's realistic run through loadgen: CLIENTS clients of one lock file at once."""
    rows = []
    runs = [(rnd, v, slots, store, ahead) for rnd in range(ROUNDS) for v in enumerate(variants())
            for slots in (BUILD_SLOTS or [None]) for store in STORES for ahead in (AHEAD or [None])]
    for rnd, (vi, (m, extra)), slots, store, ahead in runs:
        settings = dict(extra)
        if slots:
            settings["BUILD_CONCURRENCY"] = slots
        if ahead:
            settings["BUILD_AHEAD_MAX"] = ahead
        w = Worker(f"c3v{vi}{slots or 'd'}{store[0]}{ahead or 'd'}r{rnd}", settings)
        if store == "warm":
            w.workspace("warm")
            w.edit("warm", "Warm-up")
        for c in range(1, CLIENTS + 1):
            w.workspace(f"load-c{c}")
        report = os.path.join(w.dir, "report.json")
        env = {**os.environ, **AWS_ENV,
               "INPUT_QUEUE_URL": w.q["in"], "OUTPUT_QUEUE_URL": w.q["out"], "RUST_LOG": "warn"}
        gen = subprocess.Popen([WORKER, "loadgen", "--clients", str(CLIENTS), "--projects", "1",
                                "--threads", "1", "--messages", str(CLIENTS), "--wait", "900",
                                "--command", "[standin:sleep 10] Update the homepage title to \"Load {n}\"",
                                "--report", report], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        # The browser's memory, sampled while the checks run.
        peak_mb = 0.0
        while gen.poll() is None:
            if CHECKS:
                peak_mb = max(peak_mb, browser_rss_mb(w.dir))
            time.sleep(0.5)
        out = subprocess.CompletedProcess(gen.args, gen.returncode, gen.stdout.read(), gen.stderr.read())
        w.stop()
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        r = json.load(open(report))
        lat = r["latencyMs"]
        log(f"  case 3 {m}, build slots {slots or 'default'}, store {store}, ahead {ahead or 'default'}: "
            f"p50 {lat['p50']} ms, max {lat['max']} ms, lost {r['lost']}"
            + (f", browser memory peak {peak_mb:.0f} MB" if CHECKS else ""))
        phases = r.get("phasesMs", {})
        done = r["terminal"].get("completed", 0) if isinstance(r["terminal"], dict) else r["terminal"]
        label = f"3. {CLIENTS} clients at once, one lock file, agent 10 s, store {store}"
        if slots:
            label += f", {slots} build slots"
        if ahead:
            label += f", BUILD_AHEAD_MAX {ahead}"
        rows.append((label, m, f"{done} completed",
                     f"{lat['p50'] / 1000:.1f} s", f"{lat['p95'] / 1000:.1f} s / max {lat['max'] / 1000:.1f} s",
                     f"{phases['install']['p50'] / 1000:.1f}" if "install" in phases else "-",
                     f"{phases['build']['p50'] / 1000:.1f}" if "build" in phases else "-",
                     f"{phases['publish']['p50'] / 1000:.1f}" if "publish" in phases else "-",
                     f"{phases['check']['p50'] / 1000:.1f}" if "check" in phases else "-", "-"))
    return rows


def main():
    if not os.path.exists(WORKER):
        raise SystemExit(f"no worker binary at {WORKER}: build it (cargo build --release) or set WORKER_BIN")
    rows = []
    if CASES & {"1", "2"}:
        log(f"cases 1 and 2: {SAMPLES} samples per mode, modes {', '.join(MODES)}")
        rows += cases_1_and_2()
    if "3" in CASES:
        log(f"case 3: {CLIENTS} clients per mode")
        rows += case_3()
    print()
    print(f"edit to live, commit {commit_of_tree()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, worker {WORKER}")
    print("send to live (the `completed` event); phase columns: median of durationsMs, seconds")
    print("| case | install mode | samples | median | p95 | install | build | publish | check | worker total |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    if os.environ.get("KEEP"):
        log(f"kept the workers' folders (logs, reports) under {BASE}")
    else:
        remove_all(BASE)


if __name__ == "__main__":
    main()
