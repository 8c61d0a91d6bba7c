"""Many workers on one queue (issue 12): several worker processes on one machine share one input
queue and one lease store (LEASE_STORE=s3://... on moto), driven by `edit-worker loadgen
--ledger`. Figures are printed, not asserted (the script exits 0 whatever it finds, 2 when it
cannot run).

  a. three workers, each with its own WORKSPACE_ROOT and CLAUDE_CONFIG_DIR, 200 workspaces x 5
     messages with interrupt bursts: terminal events per message (must be exactly 1),
     overlapping lease intervals across workers (0), rejected pushes (0), threads whose branch
     or workspaces whose site lacks the newest request, conversations resumed across workers;
  b. the same with one shared WORKSPACE_ROOT (and one CLAUDE_CONFIG_DIR);
  c. kill -9 of one of three workers mid-run (LEASE_SECONDS=6, visibility 6 s): time from the
     kill to each of its workspaces' "lease acquired" by another worker; nothing lost or
     applied twice;
  d. rolling deploy: A works alone, B starts, A gets SIGTERM while working; nothing worked
     twice, A's stopped work continued by B;
  e. cross-worker interrupt latency: A holds every workspace with a slow agent and has no room
     for more messages, so B receives the newer ones and sends A a notice; from the newer
     message's send to A's "work stopped" (stopped_at_ms): median and p99 (target p99 < 2 s);
     the notices found in runs a, b and c are reported too;
  g. takeover at the default visibility and lease (issue 25): the holder of a workspace is
     killed with SIGKILL or frozen with SIGSTOP while its agent runs, a newer request for the
     thread is sent at once, another worker starts: time to that request's `completed` event
     (G_ROUNDS rounds of each, 3);
  f. what the lease store costs a lone worker (issue 25: within 10 % of one without, at most 5
     S3 requests per message): F_ROUNDS rounds, each one worker with a lease store and one
     without on the same load (same loadgen arguments and seed), one after the other, the
     order alternating round by round; the throughput ratio of each round and their median.
     Then 2 and 3 workers with the lease store on the same load, once each. The lease store's
     cost per message: S3 requests to the lease bucket counted in moto's request log (MOTO_LOG,
     which `scripts/bench many-workers` sets), by method and key prefix, beside the workers'
     own counter `edit_worker.records.calls`.

Where the numbers come from: the worker's own OTLP telemetry, never its log text. Each worker
exports to a receiver of its own (bench/common.py's `Otlp`): its lease spans ("lease
acquired"/"released"/"lost", with workspace, token, worker, handover, previous, at_ms: who held
what when), the events of its messages' spans found by their fields (`stopped_at_ms` and
`interrupt_latency_us` of a stop, with the message span's `edit.client_id`/`edit.project_id`;
`holder` and `at_ms` of a notice sent) and its counters (`edit_worker.push.retries`,
`edit_worker.notices.*`, `edit_worker.records.calls`). Each worker's agent is the stand-in
behind a wrapper that notes its pid, so every stand-in run (its call log: session, resumed,
writes) is tied to the worker that ran it. The workers' logs are kept in the run folder for a
reader (KEEP=1), and read by nothing here.

Run with: scripts/bench many-workers   (SCALE=0.1 for a quick look; CASES=a,c,e for some cases;
knobs: WORKSPACES (200), MESSAGES_PER_WORKSPACE (5), SHARE (0.3), AGENT_SLEEP (2), RATE (0: as
fast as possible), SEED (1, loadgen's), LEASE_SECONDS (6, case c), VISIBILITY (6, case c),
INTERRUPTS (20, case e), F_WORKSPACES (100), F_MESSAGES_PER_WORKSPACE (4), F_ROUNDS (3);
WORKER_BIN picks the build; KEEP=1 keeps the run folder)
"""

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import (AWS_ENV, ROOT, Otlp, aws_clients, env_list, env_num, git_out, median, pct,
                    seed_repo, start_worker, stop_worker, worker_bin, worker_env)

WORKER = worker_bin()
MOTO_LOG = os.environ.get("MOTO_LOG")

SCALE = env_num("SCALE", 1)
WORKSPACES = env_num("WORKSPACES", max(4, int(200 * SCALE)), int)
PER_WORKSPACE = env_num("MESSAGES_PER_WORKSPACE", 5, int)
SHARE = env_num("SHARE", 0.3)
AGENT_SLEEP = env_num("AGENT_SLEEP", 2)
RATE = env_num("RATE", 0)
LEASE_SECONDS = env_num("LEASE_SECONDS", 6, int)
VISIBILITY = env_num("VISIBILITY", 6, int)
INTERRUPTS = env_num("INTERRUPTS", max(5, int(20 * min(1, SCALE * 2))), int)
F_WORKSPACES = env_num("F_WORKSPACES", max(4, int(100 * SCALE)), int)
F_PER_WORKSPACE = env_num("F_MESSAGES_PER_WORKSPACE", 4, int)
F_ROUNDS = env_num("F_ROUNDS", 3, int)
SEED = env_num("SEED", 1, int)
CASES = env_list("CASES", "a,b,c,d,e,f,g")
sqs, s3 = aws_clients()
BASE = tempfile.mkdtemp(prefix="bench-many-workers-")
# Tenants' uids pass through it to their workspaces (the worker's sandbox, ISOLATION).
os.chmod(BASE, 0o711)
TAG = f"mw{os.getpid()}"
MARKER = re.compile(r"\[load n=(\d+)[ \]]")
ALL_WORKERS = []
# The worker's lease spans (`lease_event!` in actors/src/lease.rs).
LEASE_SPANS = ("lease acquired", "lease released", "lease lost")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def git(cwd, *args, check=True):
    out = git_out(cwd, *args, check=check)
    return out.strip() if out is not None else None


percentile = pct


def fmt_ms(v):
    return "n/a" if v is None else (f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms")


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |")


# ---------------------------------------------------------------------------------------- setup

def seed():
    return seed_repo(BASE, "tiny-site")


class Run:
    """One case's world: upstreams and buckets for load-c{i}/p1, the queues, the lease store
    (a bucket of its own, so that its requests can be counted), and its workers."""

    def __init__(self, name, workspaces):
        self.name = name
        self.tag = f"{TAG}{name}"
        self.dir = os.path.join(BASE, name)
        self.workspaces = workspaces
        os.makedirs(self.dir)
        for c in range(1, workspaces + 1):
            shutil.copytree(seed(), self.upstream(f"load-c{c}", "p1"))
            s3.create_bucket(Bucket=self.bucket(f"load-c{c}", "p1"))
        self.lease_bucket = f"leases.{self.tag}.bench"
        s3.create_bucket(Bucket=self.lease_bucket)
        self.q = {n: sqs.create_queue(QueueName=f"{self.tag}-{n}")["QueueUrl"] for n in ("in", "out")}
        self.workers = {}

    def upstream(self, client, project):
        return os.path.join(self.dir, "upstream", client, f"{project}.git")

    def bucket(self, client, project):
        return f"{project}.{client}.{self.tag}.bench"

    def start(self, name, shared=False, extra=None):
        w = Worker(self, name, shared, extra or {})
        self.workers[name] = w
        return w

    def config_dirs(self):
        return sorted({w.claude for w in self.workers.values()})

    def stop_all(self):
        return {n: w.stop() for n, w in self.workers.items() if w.proc.poll() is None and w.killed_at_ms is None}


class Worker:
    def __init__(self, run, name, shared, extra):
        self.run = run
        self.name = name
        self.log = os.path.join(run.dir, f"worker-{name}.log")
        self.pids = os.path.join(run.dir, f"agents-{name}.pids")
        self.root = os.path.join(run.dir, "ws" if shared else f"ws-{name}")
        self.claude = os.path.join(run.dir, "claude" if shared else f"claude-{name}")
        # The stand-in behind a wrapper that notes its pid (exec keeps it): which worker ran it.
        wrapper = os.path.join(run.dir, f"agent-{name}")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\necho $$ >> '{self.pids}'\nexec '{os.path.join(ROOT, 'tools/claude-standin')}' \"$@\"\n")
        os.chmod(wrapper, 0o755)
        # Its telemetry: lease spans, its messages' spans, its counters.
        self.otlp = Otlp()
        env = worker_env(**{
            "INPUT_QUEUE_URL": run.q["in"], "OUTPUT_QUEUE_URL": run.q["out"],
            "WORKSPACE_ROOT": self.root, "CLAUDE_CONFIG_DIR": self.claude,
            "GIT_REMOTE_TEMPLATE": os.path.join(run.dir, "upstream", "{clientId}/{projectId}.git"),
            "BUCKET_TEMPLATE": "{projectId}.{clientId}." + run.tag + ".bench",
            "CLAUDE_BIN": wrapper, "BUILD_COMMAND": "cp -R public dist",
            "LEASE_STORE": f"s3://{run.lease_bucket}/p", "WORKER_ID": name,
            "PROGRESS_INTERVAL_SECONDS": "60",
            **self.otlp.env(),
            # What is measured is workers sharing a queue. A sandboxed agent could not write
            # the wrapper's pid file (which worker ran which agent); the sandbox's cost is
            # `scripts/bench isolation`, the browser check's `CHECK=off,on scripts/bench
            # latency`, and neither belongs in these figures.
            "ISOLATION": "none", "BROWSER_CHECK": "off", **extra})
        self.proc = start_worker(WORKER, env, self.log)
        self.killed_at_ms = None
        self.exit_code = None
        self.cpu = 0.0
        ALL_WORKERS.append(self)

    def counter(self, name, **attrs):
        """Its counter `name` (over the points carrying `attrs`): final once it stopped on
        SIGTERM; of a worker killed with SIGKILL, as of its last export (every 500 ms)."""
        return self.otlp.value(name, **attrs)

    def agent_pids(self):
        try:
            with open(self.pids) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def running_agents(self):
        """Its agents alive now (a zombie, exited but not reaped yet, is not alive)."""
        alive = []
        for p in self.agent_pids():
            try:
                with open(f"/proc/{p}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in ("Z", "X"):
                alive.append(p)
        return alive

    def sample_cpu(self):
        """User + system CPU seconds of the worker itself (not its children) so far."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            self.cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
        return self.cpu

    def stop(self):
        self.sample_cpu()
        self.exit_code = stop_worker(self.proc)
        return self.exit_code

    def kill9(self):
        self.sample_cpu()
        self.killed_at_ms = int(time.time() * 1000)
        self.proc.kill()
        self.proc.wait()


def wait_until(what, timeout, check, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def command_template(sleep):
    return ("[load n={n}] [standin:write public/threads/{thread}.txt {n}] [standin:write public/live.txt {n}]"
            + (f" [standin:sleep {sleep}]" if sleep > 0 else ""))


def loadgen_args(run, workspaces, per_workspace, sleep, share=SHARE, rate=RATE, threads=1):
    return [WORKER, "loadgen", "--clients", str(workspaces), "--projects", "1", "--threads", str(threads),
            "--messages", str(workspaces * per_workspace), "--interrupt-share", str(share),
            "--rate", str(rate), "--seed", str(SEED), "--command", command_template(sleep), "--wait", "1800", "--settle", "3",
            "--ledger", os.path.join(run.dir, "ledger.jsonl"), "--report", os.path.join(run.dir, "report.json")]


def loadgen_start(run, *args, **kwargs):
    env = {**os.environ, **AWS_ENV,
           "INPUT_QUEUE_URL": run.q["in"], "OUTPUT_QUEUE_URL": run.q["out"], "RUST_LOG": "warn"}
    out = open(os.path.join(run.dir, "loadgen.out"), "w")
    return subprocess.Popen(loadgen_args(run, *args, **kwargs), env=env, stdout=out,
                            stderr=open(os.path.join(run.dir, "loadgen.err"), "w"))


def loadgen_finish(run, proc):
    code = proc.wait()
    if code != 0:
        raise SystemExit(f"loadgen failed ({code}): {open(os.path.join(run.dir, 'loadgen.err')).read()[-2000:]}")
    with open(os.path.join(run.dir, "ledger.jsonl")) as f:
        ledger = [json.loads(line) for line in f if line.strip()]
    return ledger, json.load(open(os.path.join(run.dir, "report.json")))


# ------------------------------------------------------------------------------------- analysis

def lease_intervals(worker):
    """The leases `worker` held, from its lease spans: each from its "lease acquired" to the
    "lease released" or "lease lost" of the same workspace and token, or to the worker's kill
    ("killed"), or never ended (`until` None, "open")."""
    spans = sorted(worker.otlp.spans(*LEASE_SPANS), key=lambda sp: sp["start_ns"])
    held = []
    for sp in spans:
        a = sp["attributes"]
        ws, token, at = a.get("workspace"), str(a.get("token")), a.get("at_ms")
        if ws is None or at is None:
            raise SystemExit(f"worker {worker.name}: a lease span without workspace or at_ms: {sp}")
        open_one = next((h for h in held if h["workspace"] == ws and h["token"] == token and h["until"] is None), None)
        if sp["name"] == "lease acquired":
            if open_one is None:
                previous = a.get("previous") or None
                held.append({"workspace": ws, "token": token, "worker": a.get("worker", worker.name),
                             "from": int(at), "until": None, "end": "open", "handover": a.get("handover") is True,
                             "previous": previous, "previous_released": a.get("previous_released") is True,
                             "moved": previous is not None and previous != worker.name})
        elif open_one is not None:
            open_one["until"] = int(at)
            open_one["end"] = sp["name"].split()[1]
    for h in held:
        if h["until"] is None and worker.killed_at_ms is not None:
            h["until"], h["end"] = worker.killed_at_ms, "killed"
    return held


def with_releases_lost_in_kills(intervals):
    """A worker killed with SIGKILL may have released a lease in its last moments (within the
    span export delay before the kill) without the span getting out: its holding would seem to
    run on to the kill. The next holder says whether it found the lease released: when a worker
    took it with the next token and found it released, the killed one's holding ended there
    (as tests/suite/common.rs does)."""
    taken = [(h["workspace"], h["previous"], str(int(h["token"]) - 1), h["from"]) for h in intervals
             if h["previous_released"] and h["previous"] and h["token"].isdigit()]
    for h in intervals:
        if h["end"] != "killed":
            continue
        found = next((at for ws, prev, token, at in taken
                      if ws == h["workspace"] and prev == h["worker"] and token == h["token"]), None)
        if found is not None and found < h["until"]:
            h["until"], h["end"] = found, "released (said by the next holder)"
    return intervals


def overlaps(intervals):
    by_ws = collections.defaultdict(list)
    for h in intervals:
        by_ws[h["workspace"]].append(h)
    found = []
    for ws, hs in by_ws.items():
        hs.sort(key=lambda h: h["from"])
        for i, a in enumerate(hs):
            for b in hs[i + 1:]:
                if a["worker"] == b["worker"]:
                    continue
                if b["from"] >= (a["until"] if a["until"] is not None else float("inf")):
                    continue
                found.append((a, b))
    return found


def standin_runs(run):
    """Every stand-in run of the case, with the worker that ran it (wrapper pids)."""
    owner = {}
    for w in run.workers.values():
        for pid in w.agent_pids():
            owner[pid] = w.name
    starts, ends = [], collections.defaultdict(list)
    for d in run.config_dirs():
        path = os.path.join(d, "standin-calls.jsonl")
        if not os.path.exists(path):
            continue
        for line in open(path):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("event") == "start":
                starts.append({**r, "dir": d})
            elif r.get("event") == "end":
                ends[(d, r["pid"], r.get("sessionId"))].append(r)
    # A run's end line is the first one after its start with its call log, pid and session:
    # pids are reused over a run of hundreds of agents, so the pid alone can pair a start with
    # another process's end (as bench/exactly_once.py pairs them).
    starts.sort(key=lambda r: r["start"])
    for r in starts:
        candidates = ends.get((r["dir"], r["pid"], r.get("sessionId")), [])
        later = [e for e in candidates if e["end"] >= r["start"]]
        r["endRecord"] = min(later, key=lambda e: e["end"]) if later else None
        if r["endRecord"] is not None:
            candidates.remove(r["endRecord"])
        r["worker"] = owner.get(r["pid"], "?")
        r["markers"] = [int(n) for n in MARKER.findall(r.get("prompt", ""))]
    return starts


def thread_key(m):
    return (m["clientId"], m["projectId"], m["threadId"])


def check_run(run, ledger):
    """The figures every case reports."""
    by_n = {m["n"]: m for m in ledger}
    runs = standin_runs(run)
    out = {}
    out["messages"] = len(ledger)
    out["lost"] = sum(1 for m in ledger if not m["terminal"])
    # A repeat sent byte for byte (a recorded outcome sent again after a delete that did not take
    # or a worker that died before its delete) is the contract's; a differing one is a violation.
    distinct = lambda m: {(t["type"], t["atMs"], t.get("commit")) for t in m["terminal"]}  # noqa: E731
    out["more_than_one_terminal"] = sum(1 for m in ledger if len(distinct(m)) > 1)
    out["identical_repeats"] = sum(1 for m in ledger if len(m["terminal"]) > len(distinct(m)))
    out["outcomes"] = dict(collections.Counter(m["terminal"][0]["type"] for m in ledger if m["terminal"]))
    out["rejected_pushes_events"] = sum(1 for m in ledger for t in m["terminal"]
                                        if t.get("errorKind") in ("push_failed", "thread_diverged"))
    # Pushes that failed and were tried again (`edit_worker.push.retries`, the workers' count).
    out["push_retries"] = sum(w.counter("edit_worker.push.retries") for w in run.workers.values())
    intervals = with_releases_lost_in_kills([h for w in run.workers.values() for h in lease_intervals(w)])
    out["leases"] = len(intervals)
    out["handovers"] = sum(1 for h in intervals if h["moved"])
    out["overlaps"] = overlaps(intervals)
    out["never_released"] = [h for h in intervals if h["until"] is None]

    # Applied twice: a message's trailer on more than one commit of its thread's branch.
    applied_twice = []
    branch_not_newest = []
    threads = collections.defaultdict(list)
    for m in ledger:
        threads[thread_key(m)].append(m)
    for (client, project, thread), ms in threads.items():
        repo = run.upstream(client, project)
        body = git(repo, "log", "--format=%B", f"thread-{thread}", check=False) or ""
        for m in ms:
            if body.count(f"Edit-Worker-Message: {m['messageId']}") > 1:
                applied_twice.append(m["messageId"])
        ns = {m["n"] for m in ms}
        expected = [m["n"] for m in ms if m["terminal"] and m["terminal"][0]["type"] == "completed"]
        for r in runs:
            if not set(r["markers"]) & ns or not r.get("endRecord"):
                continue
            for path, text in r["endRecord"].get("writes", []):
                if path == f"public/threads/{thread}.txt" and text.strip().isdigit() and int(text) in ns:
                    expected.append(int(text))
        if not expected:
            continue
        held = git(repo, "show", f"thread-{thread}:public/threads/{thread}.txt", check=False)
        if held is None or not held.strip().isdigit() or int(held) != max(expected):
            branch_not_newest.append({"thread": f"{client}/{project}/{thread}", "holds": held,
                                      "newest": max(expected)})
    out["applied_twice"] = applied_twice
    out["branch_not_newest"] = branch_not_newest

    # The site: each bucket holds the build of its workspace's last completion.
    site_not_newest = []
    last = {}
    for m in ledger:
        for t in m["terminal"][:1]:
            if t["type"] == "completed" and t.get("commit"):
                ws = (m["clientId"], m["projectId"])
                if ws not in last or t["atMs"] > last[ws][0]:
                    last[ws] = (t["atMs"], t["commit"])
    for (client, project), (_, commit) in last.items():
        want = git(run.upstream(client, project), "show", f"{commit}:public/live.txt", check=False)
        try:
            got = s3.get_object(Bucket=run.bucket(client, project), Key="live.txt")["Body"].read().decode().strip()
        except Exception:  # noqa: BLE001 - a missing object is the finding
            got = None
        if got != (want or "").strip():
            site_not_newest.append({"workspace": f"{client}/{project}", "bucket": got, "lastCompleted": want})
    out["site_not_newest"] = site_not_newest

    # Conversations: a run of a thread after its first resumes the thread's session; across
    # workers when the previous run of the thread was on another worker.
    prev = {}
    across = restarted = 0
    for r in runs:
        if not r["markers"] or r["markers"][0] not in by_n:
            continue
        key = thread_key(by_n[r["markers"][0]])
        p = prev.get(key)
        if p is not None:
            if r.get("resumed") and r["sessionId"] == p["sessionId"]:
                if r["worker"] != p["worker"]:
                    across += 1
            else:
                restarted += 1
        prev[key] = r
    out["agent_runs"] = len(runs)
    out["resumed_across_workers"] = across
    out["conversation_not_continued"] = restarted
    out["runs"] = runs
    out["intervals"] = intervals
    return out


def notice_latencies(run, ledger):
    """Cross-worker interrupts, from the workers' telemetry: a waiter's notice sent to the
    holder (an event of the newer message's span with `holder` and `at_ms`), followed within
    10 s by a stop of the holder's running work for an interrupt in the same workspace (the
    `stopped_at_ms` event of the stopped message's span, with its `edit.client_id` and
    `edit.project_id`). Returns the latencies from the newer message's send (ledger) to the
    stop, and from the notice sent to the stop (the notice path alone, without the time the
    message waited in the queue); every stop's `interrupt_latency_us` (stop request to agent
    gone); notices not followed by a stop (the holder was idle, or its work was newer, or past
    the agent); stops without a notice (local interrupts); and the `newer` notices the holders
    counted received (`edit_worker.notices.received`)."""
    sent = {m["messageId"]: m["sentAtMs"] for m in ledger}
    notices = []
    for w in run.workers.values():
        for e in w.otlp.span_events("holder"):
            if e.get("at_ms") is not None and e.get("message_id") is not None:
                notices.append({"newer": e["message_id"], "holder": e["holder"], "ws": e.get("workspace"),
                                "at": int(e["at_ms"])})
    notices.sort(key=lambda n: n["at"])
    stops = {}
    local_us = []
    for w in run.workers.values():
        stops[w.name] = []
        for e in w.otlp.span_events("stopped_at_ms"):
            if "nterrupt" not in str(e.get("reason")):
                continue
            stops[w.name].append({"ws": f"{e.get('edit.client_id')}/{e.get('edit.project_id')}",
                                  "at": int(e["stopped_at_ms"]), "used": False})
            if e.get("interrupt_latency_us") is not None:
                local_us.append(int(e["interrupt_latency_us"]))
        stops[w.name].sort(key=lambda x: x["at"])
    cross, path, unmatched = [], [], 0
    for n in notices:
        if n["newer"] not in sent:
            continue
        stop = next((x for x in stops.get(n["holder"], []) if not x["used"] and x["ws"] == n["ws"]
                     and n["at"] - 50 <= x["at"] <= n["at"] + 10_000), None)
        if stop is None:
            unmatched += 1
            continue
        stop["used"] = True
        cross.append(stop["at"] - sent[n["newer"]])
        path.append(stop["at"] - n["at"])
    local_stops = sum(1 for xs in stops.values() for x in xs if not x["used"])
    received = sum(w.counter("edit_worker.notices.received", kind="newer") for w in run.workers.values())
    return {"cross": cross, "path": path, "local_us": local_us, "unmatched": unmatched,
            "local_stops": local_stops, "notices": len(notices), "received": received}


def s3_requests(run, since_offset):
    """Requests to the case's lease bucket in moto's log since `since_offset` (bytes)."""
    if not MOTO_LOG or not os.path.exists(MOTO_LOG):
        return None
    pattern = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (/[^ ]*) HTTP/1\.[01](?:\x1b\[[0-9;]*m)*" (\d{3})')
    counts = collections.Counter()
    with open(MOTO_LOG, "rb") as f:
        f.seek(since_offset)
        for raw in f:
            line = raw.decode("utf-8", "replace")
            m = pattern.search(line)
            if not m:
                continue
            method, path, status = m.groups()
            if not path.startswith(f"/{run.lease_bucket}"):
                continue
            key = path[len(run.lease_bucket) + 2:].split("?")[0]
            parts = key.split("/")
            kind = parts[1] if len(parts) > 1 and parts[0] == "p" else (parts[0] or "(bucket)")
            counts[(method, kind, status == "412")] += 1
    return counts


def moto_offset():
    return os.path.getsize(MOTO_LOG) if MOTO_LOG and os.path.exists(MOTO_LOG) else 0


def summary_rows(label, r, report):
    ok = lambda v, want=0: f"{v}" + ("" if v == want else " **!**")  # noqa: E731
    row(label, "messages / agent runs", f"{r['messages']} / {r['agent_runs']}")
    row("", "outcomes (first terminal event)", json.dumps(r["outcomes"]))
    row("", "messages without a terminal event / with differing ones / with one sent again byte for byte",
        f"{ok(r['lost'])} / {ok(r['more_than_one_terminal'])} / {r['identical_repeats']}")
    row("", "overlapping lease intervals (different workers, one workspace)", ok(len(r["overlaps"])))
    row("", "leases never released (graceful stops)", ok(len(r["never_released"])))
    row("", "rejected pushes (push_failed / thread_diverged events; push retries, the workers' counter)",
        f"{ok(r['rejected_pushes_events'])}; {ok(r['push_retries'])}")
    row("", "threads whose branch lacks the newest applied request", ok(len(r["branch_not_newest"])))
    row("", "workspaces whose site is not the last completed build", ok(len(r["site_not_newest"])))
    row("", "requests applied twice (trailer on two commits)", ok(len(r["applied_twice"])))
    row("", "leases / taken from another worker", f"{r['leases']} / {r['handovers']}")
    row("", "conversations resumed on another worker / not continued (new session)",
        f"{r['resumed_across_workers']} / {r['conversation_not_continued']}")
    if report:
        row("", "makespan / throughput", f"{report['makespanMs'] / 1000:.1f} s / {report['throughputPerSec']:.2f} msg/s")


def details(label, r):
    shown = {k: r[k][:3] for k in ("overlaps", "never_released", "branch_not_newest", "site_not_newest",
                                   "applied_twice") if r[k]}
    if shown:
        log(f"{label}: first findings: {json.dumps(shown, default=str)[:3000]}")


# ---------------------------------------------------------------------------------------- cases

RESULTS = {}


def case_ab(name, shared):
    label = f"{name}. 3 workers, {'one shared' if shared else 'own'} WORKSPACE_ROOT"
    log(f"== {label}: {WORKSPACES} workspaces x {PER_WORKSPACE}, share {SHARE}, agent {AGENT_SLEEP} s")
    run = Run(name, WORKSPACES)
    for w in ("a", "b", "c"):
        run.start(w, shared)
    time.sleep(1)
    proc = loadgen_start(run, WORKSPACES, PER_WORKSPACE, AGENT_SLEEP)
    ledger, report = loadgen_finish(run, proc)
    exits = run.stop_all()
    r = check_run(run, ledger)
    RESULTS[name] = {"label": label, "r": r, "report": report, "exits": exits,
                     "latency": notice_latencies(run, ledger)}
    details(label, r)


def case_c():
    label = f"c. kill -9 of one of 3 workers mid-run (LEASE_SECONDS={LEASE_SECONDS}, visibility {VISIBILITY} s)"
    log(f"== {label}")
    run = Run("c", WORKSPACES)
    extra = {"LEASE_SECONDS": str(LEASE_SECONDS), "VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY)}
    for w in ("a", "b", "c"):
        run.start(w, False, extra)
    time.sleep(1)
    proc = loadgen_start(run, WORKSPACES, PER_WORKSPACE, AGENT_SLEEP)
    victim = run.workers["a"]
    want = max(3, WORKSPACES // 20)
    wait_until("worker a to hold leases and run agents", 300,
               lambda: len(victim.otlp.spans("lease acquired")) >= want
               and victim.running_agents())
    held_before = [h for h in lease_intervals(victim) if h["until"] is None]
    victim.kill9()
    time.sleep(1)
    left = victim.running_agents()
    log(f"killed worker a holding {len(held_before)} leases; its agents still running 1 s later: {len(left)}")
    ledger, report = loadgen_finish(run, proc)
    exits = run.stop_all()
    r = check_run(run, ledger)
    intervals = r["intervals"]
    takeover, not_taken = [], 0
    for h in (h for h in intervals if h["worker"] == "a" and h["end"] == "killed"):
        nxt = [o for o in intervals if o["workspace"] == h["workspace"] and o["worker"] != "a"
               and o["from"] >= victim.killed_at_ms]
        if nxt:
            takeover.append(min(o["from"] for o in nxt) - victim.killed_at_ms)
        else:
            not_taken += 1
    # Agent runs that died with a (no end line) and the messages they carried.
    killed_runs = [x for x in r["runs"] if x["worker"] == "a" and not x.get("endRecord")]
    RESULTS["c"] = {"label": label, "r": r, "report": report, "exits": exits, "takeover": takeover,
                    "not_taken": not_taken, "killed_runs": len(killed_runs), "held": len(held_before),
                    "agents_left": len(left), "latency": notice_latencies(run, ledger)}
    details(label, r)


def case_d():
    workspaces = max(4, int(20 * SCALE))
    label = f"d. rolling deploy (A alone, B starts, SIGTERM A while it works), {workspaces} workspaces x 3"
    log(f"== {label}")
    run = Run("d", workspaces)
    a = run.start("a")
    time.sleep(1)
    proc = loadgen_start(run, workspaces, 3, max(AGENT_SLEEP, 4), share=0, rate=float(os.environ.get("D_RATE", 2)))

    def a_working():
        runs = standin_runs(run)
        return sum(1 for x in runs if x["worker"] == "a" and not x.get("endRecord")) >= min(3, workspaces)
    wait_until("worker a's agents at work", 300, a_working)
    b = run.start("b")
    # Its first metrics export (the isolation gauge is set at start): b is up.
    wait_until("worker b to start", 60, lambda: b.otlp.latest())
    t = time.time()
    a.stop()
    a_exit_s = time.time() - t
    log(f"worker a stopped in {a_exit_s:.1f} s, exit code {a.exit_code}")
    ledger, report = loadgen_finish(run, proc)
    exits = run.stop_all()
    r = check_run(run, ledger)
    # Worked twice: the agent finished a message's request with success more than once.
    success = collections.Counter()
    for x in r["runs"]:
        end = x.get("endRecord") or {}
        if end.get("outcome") == "success":
            for n in set(x["markers"]):
                success[n] += 1
    worked_twice = sum(1 for n, k in success.items() if k > 1)
    # A's stopped runs, and whether B continued them (resumed the same session, succeeded).
    stopped = [x for x in r["runs"] if x["worker"] == "a" and (x.get("endRecord") or {}).get("outcome") != "success"]
    continued = 0
    by_n = {m["n"]: m for m in ledger}
    key = lambda x: thread_key(by_n[x["markers"][0]]) if x["markers"] and x["markers"][0] in by_n else None  # noqa: E731
    for x in stopped:
        # B's next run of the same thread resumed the conversation A's stopped run was in.
        later = [y for y in r["runs"] if y["worker"] == "b" and y["start"] > x["start"] and key(y) == key(x)]
        if later and later[0].get("resumed") and later[0]["sessionId"] == x["sessionId"]:
            continued += 1
    saved = 0
    for c in range(1, workspaces + 1):
        body = git(run.upstream(f"load-c{c}", "p1"), "log", "--all", "--format=%s", check=False) or ""
        saved += body.count("Interrupted - saving work")
    RESULTS["d"] = {"label": label, "r": r, "report": report, "exits": {**exits, "a": a.exit_code},
                    "a_exit_s": a_exit_s, "worked_twice": worked_twice, "stopped_on_a": len(stopped),
                    "continued_by_b": continued, "saved_commits": saved}
    details(label, r)


def case_e():
    n = INTERRUPTS
    label = f"e. cross-worker interrupt latency ({n} interrupts; A holds {n} workspaces, B gets the newer messages)"
    log(f"== {label}")
    run = Run("e", n)
    # A has room for exactly the n slow messages, so B receives every newer one.
    a = run.start("a", extra={"MAX_IN_FLIGHT": str(n), "AGENT_CONCURRENCY": str(n)})
    slow = []
    for c in range(1, n + 1):
        body = {"sessionId": "s", "threadId": "slow", "clientId": f"load-c{c}", "projectId": "p1",
                "command": "[load n=0] [standin:write public/threads/slow.txt 0] [standin:sleep 120]"}
        slow.append(sqs.send_message(QueueUrl=run.q["in"], MessageBody=json.dumps(body))["MessageId"])
    wait_until(f"worker a to run {n} agents", 300, lambda: len(a.running_agents()) >= n)
    b = run.start("b")
    # Both workers' notice queues exist: b is up.
    wait_until("worker b's notice queue", 60, lambda: len(sqs.list_queues(
        QueueNamePrefix=f"{run.tag}-in-notices").get("QueueUrls", [])) >= 2, every=0.5)
    newer = {}
    for c in range(1, n + 1):
        body = {"sessionId": "s", "threadId": "new", "clientId": f"load-c{c}", "projectId": "p1",
                "command": "[load n=1] [standin:write public/threads/new.txt 1]"}
        at = int(time.time() * 1000)
        mid = sqs.send_message(QueueUrl=run.q["in"], MessageBody=json.dumps(body))["MessageId"]
        newer[mid] = at
        time.sleep(float(os.environ.get("INTERVAL", "0.25")))
    ledger = [{"messageId": k, "sentAtMs": v} for k, v in newer.items()]
    want = set(slow) | set(newer)
    ended = {}
    deadline = time.time() + 300
    while time.time() < deadline and not want <= set(ended):
        for m in sqs.receive_message(QueueUrl=run.q["out"], MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            e = json.loads(m["Body"])
            if e.get("type") in ("completed", "interrupted", "failed", "rejected"):
                ended.setdefault(e["messageId"], []).append(e["type"])
            sqs.delete_message(QueueUrl=run.q["out"], ReceiptHandle=m["ReceiptHandle"])
    exits = run.stop_all()
    outcomes = collections.Counter(ended.get(m, ["none"])[0] for m in slow)
    outcomes_new = collections.Counter(ended.get(m, ["none"])[0] for m in newer)
    RESULTS["e"] = {"label": label, "latency": notice_latencies(run, ledger),
                    "slow": dict(outcomes), "new": dict(outcomes_new), "exits": exits}


def f_run(name, k, lease_store):
    """One run of case f: `k` workers (with the lease store or, alone, without it) on the case's
    load, same loadgen arguments and seed every time. Its figures."""
    run = Run(name, F_WORKSPACES)
    extra = {} if lease_store else {"LEASE_STORE": ""}
    for w in "abc"[:k]:
        run.start(w, extra=extra)
    time.sleep(1)
    offset = moto_offset()
    proc = loadgen_start(run, F_WORKSPACES, F_PER_WORKSPACE, AGENT_SLEEP)
    ledger, report = loadgen_finish(run, proc)
    cpu = sum(w.sample_cpu() for w in run.workers.values())
    exits = run.stop_all()
    r = check_run(run, ledger)
    who = f"{k}" + ("" if lease_store else " (no lease store)")
    x = {"workers": who, "report": report, "r": r, "counts": s3_requests(run, offset), "cpu": cpu,
         "exits": exits,
         # The workers' own counts (stopped on SIGTERM: final): lease spans, and the record
         # store's requests (records, thread documents, conversations, leases, presence).
         "lease_spans": sum(len(w.otlp.spans(*LEASE_SPANS)) for w in run.workers.values()),
         "store_calls": sum(w.counter("edit_worker.records.calls") for w in run.workers.values()),
         "throughput": report["throughputPerSec"]}
    log(f"   {who} worker(s): {x['throughput']:.2f} msg/s")
    return x


def case_f():
    label = (f"f. a lone worker with the lease store against one without ({F_ROUNDS} rounds, the order "
             f"alternating), then 2 and 3 workers with it; {F_WORKSPACES} workspaces x {F_PER_WORKSPACE}, "
             f"share {SHARE}, agent {AGENT_SLEEP} s, seed {SEED}")
    log(f"== {label}")
    rounds = []
    for i in range(F_ROUNDS):
        # Round by round, which of the two goes first alternates: neither always meets the
        # fresher moto (it grows with every run's buckets and queues) or the quieter machine.
        order = (True, False) if i % 2 == 0 else (False, True)
        got = {with_store: f_run(f"f{i}{'s' if with_store else 'n'}", 1, with_store) for with_store in order}
        ratio = got[True]["throughput"] / (got[False]["throughput"] or float("nan"))
        rounds.append({"first": "with" if order[0] else "without", "with": got[True], "without": got[False],
                       "ratio": ratio})
        log(f"   round {i + 1}: with / without {ratio:.2f}")
    more = [f_run(f"fw{k}", k, True) for k in (2, 3)]
    RESULTS["f"] = {"label": label, "rounds": rounds, "more": more}


def case_g():
    """Takeover at the default settings (issue 25): A holds one workspace, its agent at work;
    A is killed with SIGKILL or frozen with SIGSTOP, a newer request for the same thread is sent
    at once (into A's open long poll, when A was frozen), then B starts. From the kill or the
    freeze to the newer request's `completed` event (run by B)."""
    rounds = int(os.environ.get("G_ROUNDS", 3))
    label = f"g. takeover at the default visibility and lease, after kill -9 and after SIGSTOP ({rounds} rounds each)"
    log(f"== {label}")
    took = {"kill -9": [], "SIGSTOP": []}
    for mode in took:
        for i in range(rounds):
            run = Run(f"g{'k' if mode == 'kill -9' else 's'}{i}", 1)
            a = run.start("a")

            def send(command):
                body = {"sessionId": "s", "threadId": "t", "clientId": "load-c1", "projectId": "p1",
                        "command": command}
                return sqs.send_message(QueueUrl=run.q["in"], MessageBody=json.dumps(body))["MessageId"]
            slow = send("[standin:write public/live.txt 1] [standin:sleep 120]")

            def agent_started():
                # Its "agent started" progress event: the agent's pid file may be out of reach
                # of a sandboxed agent.
                for m in sqs.receive_message(QueueUrl=run.q["out"], MaxNumberOfMessages=10,
                                             WaitTimeSeconds=1).get("Messages", []):
                    sqs.delete_message(QueueUrl=run.q["out"], ReceiptHandle=m["ReceiptHandle"])
                    e = json.loads(m["Body"])
                    if e.get("messageId") == slow and e.get("detail") == "agent started":
                        return True
                return False
            wait_until("a's agent at work", 300, agent_started, every=0)
            t0 = time.time()
            if mode == "kill -9":
                a.kill9()
            else:
                a.proc.send_signal(signal.SIGSTOP)
            newer = send("[standin:write public/live.txt 2]")
            b = run.start("b")

            def completed():
                for m in sqs.receive_message(QueueUrl=run.q["out"], MaxNumberOfMessages=10,
                                             WaitTimeSeconds=1).get("Messages", []):
                    sqs.delete_message(QueueUrl=run.q["out"], ReceiptHandle=m["ReceiptHandle"])
                    e = json.loads(m["Body"])
                    if e.get("messageId") == newer and e.get("type") == "completed":
                        return time.time()
                return None
            done = wait_until("the newer request completed", 600, completed, every=0)
            took[mode].append((done - t0) * 1000)
            log(f"   {mode} round {i + 1}: the newer request completed {done - t0:.1f} s after")
            if mode == "SIGSTOP":
                a.proc.send_signal(signal.SIGCONT)
            run.stop_all()
    RESULTS["g"] = {"label": label, "took": took}


# ---------------------------------------------------------------------------------------- report

def s3_per_message(x):
    """Lease-store S3 requests per message in moto's log, and the 412 conflicts among them."""
    n = x["r"]["messages"] or 1
    if x["counts"] is None:
        return None, None
    return (sum(x["counts"].values()) / n,
            sum(v for (m, k, c), v in x["counts"].items() if c) / n)


def print_f(res):
    print(f"\n### {res['label']}\n")
    print("| round (first) | without: throughput | with: throughput | with / without | with: lease-store S3 "
          "requests per message, moto's log (412 conflicts) | with: record store calls per message, the worker's "
          "counter | without: record store calls per message (local folder) | CPU per message without / with "
          "| lost / >1 terminal / overlaps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, rd in enumerate(res["rounds"]):
        w, wo = rd["with"], rd["without"]
        n_w, n_wo = w["r"]["messages"] or 1, wo["r"]["messages"] or 1
        req, conflicts = s3_per_message(w)
        row(f"{i + 1} ({rd['first']})", f"{wo['throughput']:.2f} msg/s", f"{w['throughput']:.2f} msg/s",
            f"{rd['ratio']:.2f}", "n/a (MOTO_LOG not set)" if req is None else f"{req:.2f} ({conflicts:.2f})",
            f"{w['store_calls'] / n_w:.2f}", f"{wo['store_calls'] / n_wo:.2f}",
            f"{wo['cpu'] * 1000 / n_wo:.0f} / {w['cpu'] * 1000 / n_w:.0f} ms",
            " ; ".join(f"{x['r']['lost']} / {x['r']['more_than_one_terminal']} / {len(x['r']['overlaps'])}"
                       for x in (wo, w)))
    ratios = [rd["ratio"] for rd in res["rounds"]]
    reqs = [s3_per_message(rd["with"])[0] for rd in res["rounds"] if rd["with"]["counts"] is not None]
    calls = [rd["with"]["store_calls"] / (rd["with"]["r"]["messages"] or 1) for rd in res["rounds"]]
    in_log = f"**{median(reqs):.2f}** in moto's log, " if reqs else ""
    print(f"\nmedian of {len(ratios)} rounds: with / without **{median(ratios):.2f}** (target at least 0.90: "
          f"within 10 %), per round {', '.join(f'{x:.2f}' for x in ratios)}; lease-store S3 requests per "
          f"message {in_log}{median(calls):.2f} by the worker's counter (target at most 5)")
    print("\n| workers (with the lease store) | makespan | throughput | vs the lone worker's median | lost / >1 terminal "
          "/ overlaps | worker CPU per message | lease-store S3 requests per message, moto's log (412 conflicts) "
          "| record store calls per message, the workers' counter | lease spans per message |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = median([rd["with"]["throughput"] for rd in res["rounds"]]) or 1
    runs = [{**rd["with"], "workers": f"1 (round {i + 1})"} for i, rd in enumerate(res["rounds"])] + res["more"]
    for x in runs:
        rep, r = x["report"], x["r"]
        n = r["messages"] or 1
        req, conflicts = s3_per_message(x)
        row(x["workers"], f"{rep['makespanMs'] / 1000:.1f} s", f"{x['throughput']:.2f} msg/s",
            f"{x['throughput'] / base:.2f}x",
            f"{r['lost']} / {r['more_than_one_terminal']} / {len(r['overlaps'])}",
            f"{x['cpu'] * 1000 / n:.0f} ms", "n/a (MOTO_LOG not set)" if req is None else f"{req:.1f} ({conflicts:.2f})",
            f"{x['store_calls'] / n:.1f}", f"{x['lease_spans'] / n:.1f}")
    for x in [res["rounds"][-1]["with"]] + res["more"]:
        if x["counts"]:
            by = collections.Counter()
            for (m, k, c), v in x["counts"].items():
                by[f"{m} {k}"] += v
            n = x["r"]["messages"] or 1
            print(f"\n{x['workers']} worker(s), lease-store requests per message by method and key prefix: " +
                  ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])))


def print_report(started):
    print(f"\nmany workers on one queue: worker {os.path.relpath(WORKER, ROOT) if WORKER.startswith(ROOT) else WORKER}, "
          f"SCALE {SCALE}, {time.time() - started:.0f} s in all\n")
    for name in ("a", "b", "c", "d"):
        if name not in RESULTS:
            continue
        res = RESULTS[name]
        print(f"\n### {res['label']}\n")
        print("| case | figure | result |")
        print("| --- | --- | --- |")
        summary_rows(name, res["r"], res["report"])
        row("", "worker exit codes", json.dumps(res["exits"]))
        if name == "c":
            t = res["takeover"]
            row("", "leases held by the killed worker / its agent runs cut off / its agents alive 1 s after",
                f"{res['held']} / {res['killed_runs']} / {res['agents_left']}")
            row("", "kill -> its workspaces' next \"lease acquired\" (median / max)",
                f"{fmt_ms(percentile(t, 50))} / {fmt_ms(max(t) if t else None)} "
                f"(bound: lease {LEASE_SECONDS} s + visibility {VISIBILITY} s)")
            row("", "workspaces of the killed worker never taken over", res["not_taken"])
        if name == "d":
            row("", "worker A: SIGTERM to exit", f"{res['a_exit_s']:.1f} s")
            row("", "messages worked twice (agent succeeded twice)", res["worked_twice"])
            row("", "A's stopped runs / their thread's next run on B resumed the same conversation",
                f"{res['stopped_on_a']} / {res['continued_by_b']}")
            row("", "\"Interrupted - saving work\" commits", res["saved_commits"])
    lat_rows = [(name, RESULTS[name]["latency"]) for name in ("e", "a", "b", "c") if name in RESULTS]
    if lat_rows:
        print("\n### e. interrupts across workers: newer message sent -> holder's agent stopped\n")
        print("| run | interrupts via a notice | sent -> stopped: median / p99 / max | notice sent -> stopped: "
              "median / p99 | notices sent / counted received | notices without a stop | stops without a notice "
              "(local) | stop request -> agent gone, median / p99 (all stops) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, lat in lat_rows:
            c, pth, us = lat["cross"], lat["path"], lat["local_us"]
            row(name, len(c),
                f"{fmt_ms(percentile(c, 50))} / {fmt_ms(percentile(c, 99))} / {fmt_ms(max(c) if c else None)}",
                f"{fmt_ms(percentile(pth, 50))} / {fmt_ms(percentile(pth, 99))}",
                f"{lat['notices']} / {lat['received']}", lat["unmatched"], lat["local_stops"],
                f"{'n/a' if not us else f'{percentile(us, 50) / 1000:.1f} ms'} / "
                f"{'n/a' if not us else f'{percentile(us, 99) / 1000:.1f} ms'}")
        print("\n(a, b, c: under load the send time includes the time the newer message waited in the queue; "
              "the notice path alone is the second column.)")
        if "e" in RESULTS:
            print(f"\ncase e outcomes: slow messages {RESULTS['e']['slow']}, newer messages {RESULTS['e']['new']}; "
                  f"target p99 < 2 s")
    if "g" in RESULTS:
        res = RESULTS["g"]
        print(f"\n### {res['label']}\n")
        print("| holder | newer request completed on the other worker after: median / max | rounds |")
        print("| --- | --- | --- |")
        for mode, t in res["took"].items():
            row(mode, f"{fmt_ms(percentile(t, 50))} / {fmt_ms(max(t) if t else None)}", len(t))
    if "f" in RESULTS:
        print_f(RESULTS["f"])
    out = os.path.join(ROOT, ".bench", "many-workers.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    slim = {}
    drop = ("runs", "intervals")

    def slim_run(x):
        return {**x, "r": {kk: vv for kk, vv in x["r"].items() if kk not in drop},
                "counts": {" ".join(map(str, kk)): vv for kk, vv in (x["counts"] or {}).items()}}
    for k, v in RESULTS.items():
        v = dict(v)
        if "r" in v:
            v["r"] = {kk: vv for kk, vv in v["r"].items() if kk not in drop}
        if "rounds" in v:
            v["rounds"] = [{**rd, "with": slim_run(rd["with"]), "without": slim_run(rd["without"])}
                           for rd in v["rounds"]]
            v["more"] = [slim_run(x) for x in v["more"]]
        slim[k] = v
    with open(out, "w") as f:
        json.dump(slim, f, indent=2, default=str)
    print(f"\ndetails: {out}" + (f"; run folder kept: {BASE}" if os.environ.get("KEEP") else ""))


def main():
    started = time.time()
    try:
        for name in CASES:
            name = name.strip()
            if name == "a":
                case_ab("a", False)
            elif name == "b":
                case_ab("b", True)
            elif name == "c":
                case_c()
            elif name == "d":
                case_d()
            elif name == "e":
                case_e()
            elif name == "f":
                case_f()
            elif name == "g":
                case_g()
            elif name:
                raise SystemExit(f"unknown case {name!r} (CASES=a,b,c,d,e,f,g)")
        print_report(started)
    finally:
        for w in ALL_WORKERS:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        if not os.environ.get("KEEP"):
            shutil.rmtree(BASE, ignore_errors=True)


if __name__ == "__main__":
    main()
