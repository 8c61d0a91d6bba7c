"""Load benchmarks (issue 6): the release worker, moto, real git and the stand-in agent with a
fixed think time, driven by `edit-worker loadgen`. Figures are printed, not asserted.

  1. throughput: 200 workspaces x 5 messages, agent 2 s, tiny build, at AGENT_CONCURRENCY 16
     (the default) and 32; makespan against the ideal bound (the larger of agent runs x think
     time / slots and the CPU time of everything but the worker / cores) and against one
     message at a time (the seed's design: MAX_IN_FLIGHT=1, AGENT_CONCURRENCY=1), which gets
     the very same loadgen arguments and seed, bursts included. ROUNDS1 rounds (default 1),
     each running the three settings one after another; ratios per round and their median;
  2. orchestration overhead per message at light load, three rounds: end-to-end latency minus
     agent, build, publish and push;
  3. memory: resident size idle, with 1,000 idle sessions, and at the peak of run 1;
  4. lost and duplicated terminal events with interrupt bursts on (every run reports them);
  5. a realistic run: real Astro build of the sample site, agent 10 s.
Run with: scripts/bench load   (SCALE=0.2 for a quick look; RUNS=1,3 for some of the runs;
AGENTS=32 for run 1 at other agent limits than 16 and 32)

Figures about the worker come from its own OTLP telemetry (bench/common.py), never its log:
agent runs from `edit_worker.agent.runs`, the most messages at work at once from
`edit_worker.messages.in_flight.peak` (exact, not sampled).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from common import (AWS_ENV, ROOT, Otlp, aws_clients, commit_of_tree, env_num, median, seed_repo,
                    start_worker, worker_bin, worker_env)

WORKER = worker_bin()
SCALE = env_num("SCALE", 1)
sqs, s3 = aws_clients()
BASE = tempfile.mkdtemp(prefix="bench-load-")
# Tenants' uids pass through it to their workspaces (the worker's sandbox, ISOLATION).
os.chmod(BASE, 0o711)
# The throughput runs' build: a copy of public/ (where the stand-in writes its edits) to dist/.
# Tiny on purpose, so that what the runs measure is the orchestration, not a site generator.
TINY_BUILD = "cp -R public dist"
# The isolation benchmark gives every level the same programs: a tenant's uid cannot enter
# /root, so a PATH that starts there (pyenv's shims, slow) would give the worker's own runs
# other, slower programs than the sandboxed ones.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
SEEDS = {}


def seed(site):
    """One bare repository per fixture; workspaces' upstreams are copies of it."""
    if site not in SEEDS:
        SEEDS[site] = seed_repo(BASE, site)
    return SEEDS[site]


def prepare(tag, clients, projects, site):
    upstream = os.path.join(BASE, tag, "upstream")
    for c in range(1, clients + 1):
        for p in range(1, projects + 1):
            s3.create_bucket(Bucket=f"edit.load-c{c}.p{p}.{tag}.bench")
            shutil.copytree(seed(site), os.path.join(upstream, f"load-c{c}", f"p{p}.git"))
    q = {n: sqs.create_queue(QueueName=f"{tag}-{n}")["QueueUrl"] for n in ("in", "out")}
    return upstream, q


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        return 0


class Worker:
    def __init__(self, tag, upstream, q, extra, telemetry=True):
        """`telemetry`: export to an OTLP receiver of our own (what the figures read); off
        where the benchmark compares export on and off, or must not pay for it."""
        self.log = os.path.join(BASE, tag, "worker.log")
        self.otlp = Otlp() if telemetry else None
        env = worker_env(**{
            "INPUT_QUEUE_URL": q["in"], "OUTPUT_QUEUE_URL": q["out"],
            "WORKSPACE_ROOT": os.path.join(BASE, tag, "ws"),
            "GIT_REMOTE_TEMPLATE": os.path.join(upstream, "{clientId}/{projectId}.git"),
            "BUCKET_TEMPLATE": "edit.{clientId}.{projectId}." + tag + ".bench",
            "CLAUDE_BIN": os.path.join(ROOT, "tools/claude-standin"),
            "ASTRO_TELEMETRY_DISABLED": "1", "RUST_LOG": "warn",
            "MAX_IN_FLIGHT": "64", "PROGRESS_INTERVAL_SECONDS": "60",
            # Metrics only: the figures need no spans, and a span queue would weigh on memory.
            **(self.otlp.env(traces=False) if self.otlp else {}), **extra})
        self.proc = start_worker(WORKER, env, self.log)
        self.peak = 0
        self.running = True
        threading.Thread(target=self._sample, daemon=True).start()
        time.sleep(1.5)
        self.idle_rss = rss_kib(self.proc.pid)

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_kib(self.proc.pid))
            time.sleep(0.2)

    def rss(self):
        return rss_kib(self.proc.pid)

    def agent_runs(self):
        """Agent runs ended (ok or not), from the worker's metrics: read after `stop`, which
        flushes a last collection."""
        return self.otlp.value("edit_worker.agent.runs")

    def in_flight_peak(self):
        """The most messages the worker had at work at once (its own high-water mark)."""
        return self.otlp.value("edit_worker.messages.in_flight.peak")

    def stop(self):
        self.running = False
        self.proc.terminate()
        self.proc.wait(timeout=60)
        if self.otlp:
            self.otlp.stop()


def loadgen(tag, q, clients, projects, threads, messages, command, share=0.0, rate=0.0, wait=900, seed=1):
    report = os.path.join(BASE, tag, "report.json")
    chart = os.path.join(ROOT, ".bench", f"{tag}.svg")
    env = {**os.environ, **AWS_ENV,
           "INPUT_QUEUE_URL": q["in"], "OUTPUT_QUEUE_URL": q["out"], "RUST_LOG": "warn"}
    out = subprocess.run([WORKER, "loadgen", "--clients", str(clients), "--projects", str(projects),
                          "--threads", str(threads), "--messages", str(messages), "--rate", str(rate),
                          "--interrupt-share", str(share), "--command", command, "--wait", str(wait),
                          "--seed", str(seed),
                          "--report", report, "--chart", chart], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.load(open(report)), chart


def cpu_seconds(pid, children=False):
    """User + system CPU time of one process, or of its waited-for children (agents, builds, git),
    from /proc: to show where the machine's time went."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        first = 13 if children else 11
        return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_cpu_seconds():
    """CPU time spent by everything on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    # Everything but idle, iowait and steal (time the host gave another machine).
    busy = sum(ticks) - ticks[3] - ticks[4] - ticks[7]
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(moto_pid, worker_pid):
    """CPU seconds so far: the machine, moto, the worker, and the worker's waited-for children."""
    return (machine_cpu_seconds(), cpu_seconds(moto_pid), cpu_seconds(worker_pid),
            cpu_seconds(worker_pid, children=True))


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |")


def otlp_sink():
    """An OTLP/HTTP endpoint that accepts everything (the exporter's cost is what we measure)."""
    import http.server

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def trace_overhead():
    """Issue 5: loadgen throughput with trace export on and off, alternating, in one run."""
    sink = otlp_sink()
    rounds = int(os.environ.get("ROUNDS", "3"))
    messages = max(40, int(150 * SCALE))
    results = {"off": [], "on": []}
    for r in range(rounds):
        for mode in ("off", "on"):
            tag = f"ovh{r}{mode}"
            upstream, q = prepare(tag, 10, 1, "tiny-site")
            extra = {"BUILD_COMMAND": "node build.mjs"}
            if mode == "on":
                extra.update({"OTEL_EXPORTER_OTLP_ENDPOINT": sink, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
            w = Worker(tag, upstream, q, extra, telemetry=False)
            report, _ = loadgen(tag, q, 10, 1, 1, messages, "[standin:write load/{n}.txt {n}]")
            w.stop()
            assert report["lost"] == 0, report
            results[mode].append(report["throughputPerSec"])
            print(f"  round {r + 1} export {mode}: {report['throughputPerSec']:.2f} msg/s", file=sys.stderr)
    off = median(results["off"])
    on = median(results["on"])
    print(f"\ntrace export overhead, commit {commit_of_tree()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
          f"{messages} messages x {rounds} rounds each, alternating, median")
    print("| export | throughput (msg/s) |")
    print("| --- | --- |")
    print(f"| off | {off:.2f} |")
    print(f"| on (OTLP/HTTP to a local sink) | {on:.2f} |")
    ratios = [b / a for a, b in zip(results["off"], results["on"])]
    print(f"\nper round, off / on (msg/s): " + ", ".join(
        f"{a:.2f} / {b:.2f}" for a, b in zip(results["off"], results["on"])))
    print(f"on / off per round: {', '.join(f'{x:.3f}' for x in ratios)} (median {median(ratios):.3f})")
    print(f"\ncost of export: {(1 - on / off) * 100:.1f}% of throughput from the medians, "
          f"{(1 - median(ratios)) * 100:.1f}% from the rounds (target: at most 5%)")


def isolation_cost():
    """Issue 13: what the tenant sandbox costs, against ISOLATION=none, alternating in one run.
    Load (the target): the load benchmark's run 1 (workspaces x 5 messages, agent 2 s, tiny
    build, AGENT_CONCURRENCY 16, interrupt bursts), throughput = messages / makespan.
    No think time (the harshest case): one message into each of 150 fresh workspaces (clone
    included), agent 0 s, a node build, as fast as the worker goes. Light: 10 workspaces at
    4 msg/s, nothing waits, for the time added to each message."""
    rounds = int(os.environ.get("ROUNDS", "3"))
    levels = os.environ.get("ISOLATIONS", "none,users+namespaces,users").split(",")
    messages = max(40, int(150 * SCALE))
    light = max(20, int(60 * SCALE))
    # 60 workspaces x 5 (300 messages, about a minute): the load benchmark's run 1 at
    # LOAD_SCALE=0.3 of its 1,000, so that several rounds fit in one run.
    load_clients = max(2, int(40 * float(os.environ.get("LOAD_SCALE", "0.3"))))
    load_messages = load_clients * 5 * 5
    load = {level: [] for level in levels}
    thr = {level: [] for level in levels}
    lat = {level: [] for level in levels}
    # Where the sandbox's work falls: starting the agent and the build in it, handing the
    # checkout over. The p50 of agent + build per message, at light load.
    steps = {level: [] for level in levels}
    # CPU per message in the saturated runs: the machine, the worker, its children, moto.
    cpu = {level: [] for level in levels}
    moto_pid = int(os.environ.get("MOTO_PID", "0"))
    for r in range(rounds):
        for level in levels:
            name = level.replace("+", "-")
            env = {"ISOLATION": level, "PATH": SYSTEM_PATH}
            tag = f"isl{r}{name}"
            upstream, q = prepare(tag, load_clients, 5, "tiny-site")
            w = Worker(tag, upstream, q, {**env, "BUILD_COMMAND": TINY_BUILD}, telemetry=False)
            report, _ = loadgen(tag, q, load_clients, 5, 1, load_messages,
                                "[standin:sleep 2] [standin:write public/load/{n}.txt {n}]", share=0.1)
            w.stop()
            assert report["lost"] == 0, report
            load[level].append(load_messages / (report["makespanMs"] / 1000))
            tag = f"iso{r}{name}"
            # One message per workspace: none interrupts another, each is a whole run.
            clients = messages // 5
            upstream, q = prepare(tag, clients, 5, "tiny-site")
            w = Worker(tag, upstream, q, {**env, "BUILD_COMMAND": "node build.mjs"}, telemetry=False)
            cpu0 = cpu_snapshot(moto_pid, w.proc.pid)
            report, _ = loadgen(tag, q, clients, 5, 1, messages, "[standin:write public/load/{n}.txt {n}]")
            cpu1 = cpu_snapshot(moto_pid, w.proc.pid)
            w.stop()
            busy, moto_cpu, worker_cpu, children_cpu = (b - a for a, b in zip(cpu0, cpu1))
            cpu[level].append((busy / messages * 1000, worker_cpu / messages * 1000,
                               children_cpu / messages * 1000, moto_cpu / messages * 1000))
            assert report["lost"] == 0 and report["terminal"]["completed"] == messages, report
            thr[level].append(report["throughputPerSec"])
            tag = f"isol{r}{name}"
            upstream, q = prepare(tag, 10, 1, "tiny-site")
            w = Worker(tag, upstream, q, {**env, "BUILD_COMMAND": "node build.mjs"}, telemetry=False)
            report, _ = loadgen(tag, q, 10, 1, 1, light, "[standin:write public/load/{n}.txt {n}]", rate=4)
            w.stop()
            assert report["lost"] == 0, report
            lat[level].append(report["latencyMs"]["p50"])
            steps[level].append(report["phasesMs"]["agent"]["p50"] + report["phasesMs"]["build"]["p50"])
            print(f"  round {r + 1} {level}: load {load[level][-1]:.2f} msg/s, no think {thr[level][-1]:.2f} msg/s, "
                  f"p50 {lat[level][-1]} ms at 4 msg/s", file=sys.stderr)

    # common.median: the mean of the two middle values for an even count (ROUNDS=2 gives two
    # samples).

    # The sandbox's own price per process start, alone: `true` as a tenant's uid in
    # bubblewrap with the worker's arguments, against `true` as the worker.
    def start_ms(argv, **kw):
        times = []
        for _ in range(50):
            t = time.perf_counter()
            subprocess.run(argv, check=True, **kw)
            times.append((time.perf_counter() - t) * 1000)
        return median(times)

    plain = start_ms(["true"])
    as_user = start_ms(["true"], user=1_000_001, group=1_000_001, extra_groups=[], cwd="/")
    bwrap = start_ms(["bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                      "--unshare-cgroup-try", "--share-net", "--die-with-parent", "--ro-bind", "/", "/",
                      "--dev", "/dev", "--proc", "/proc", "--size", str(512 << 20), "--tmpfs", "/tmp",
                      "--tmpfs", BASE, "--chdir", "/", "--", "true"],
                     user=1_000_001, group=1_000_001, extra_groups=[], cwd="/")

    # Against the first level named (none, unless ISOLATIONS says otherwise). Each round's ratio
    # compares runs minutes apart, so a slow spell of the machine hits both sides; the median of
    # those ratios is printed beside the ratio of the medians.
    first = levels[0]
    base_load, base_thr = median(load[first]), median(thr[first])
    base_lat, base_steps = median(lat[first]), median(steps[first])

    def paired(xs, level):
        return median([a / b for a, b in zip(xs[level], xs[first])])

    print(f"\ntenant sandbox cost, commit {commit_of_tree()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{rounds} rounds, levels alternating, medians")
    print(f"- load: the load benchmark's run 1 shape, {load_clients * 5} workspaces x 5 messages, agent 2 s, tiny build")
    print(f"- no think: {messages} messages, one per fresh workspace, agent 0 s, `node build.mjs`")
    print(f"- light: {light} messages at 4 msg/s into 10 workspaces")
    print("| ISOLATION | load (msg/s) | vs none: of medians / median of rounds | no think (msg/s) | vs none: of medians / median of rounds "
          "| send to live p50, light | vs none | agent + build p50 | vs none |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for level in levels:
        lo, t, l, st = median(load[level]), median(thr[level]), median(lat[level]), median(steps[level])
        print(f"| {level} | {lo:.2f} | {lo / base_load:.3f}x / {paired(load, level):.3f}x | {t:.2f} | "
              f"{t / base_thr:.3f}x / {paired(thr, level):.3f}x | {l:.0f} ms | {l - base_lat:+.0f} ms | {st:.0f} ms | {st - base_steps:+.0f} ms |")
    print("\nper round (msg/s), load / no think: " + "; ".join(
        f"{level} " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(load[level], thr[level])) for level in levels))
    print("\n| ISOLATION | CPU per message, saturated: machine / worker / its children / moto (ms) |")
    print("| --- | --- |")
    for level in levels:
        parts = [median([c[i] for c in cpu[level]]) for i in range(4)]
        print(f"| {level} | {' / '.join(f'{p:.0f}' for p in parts)} |")
    print(f"\none process start, median of 50: `true` {plain:.1f} ms, as a tenant's uid {as_user:.1f} ms, "
          f"in bubblewrap as a tenant's uid {bwrap:.1f} ms (a message starts 2: the agent and the build)")
    print("\ntargets: under 50 ms added per message; throughput within 5% of none")


def main():
    if os.environ.get("MODE") == "trace-overhead":
        trace_overhead()
        shutil.rmtree(BASE, ignore_errors=True)
        return
    if os.environ.get("MODE") == "isolation-cost":
        isolation_cost()
        shutil.rmtree(BASE, ignore_errors=True)
        return
    runs_wanted = set(os.environ.get("RUNS", "1,2,3,5").split(","))
    table = []
    think = 2
    reports = []
    if "1" in runs_wanted:
        # Run 1 at the default limits and with twice the agent slots (agent runs are I/O bound),
        # both with bursts on: run 4 reads their lost/duplicate counts.
        idle_rss = None
        clients, projects = max(1, int(40 * SCALE)), 5
        n = clients * projects * 5
        command = f"[standin:sleep {think}] [standin:write public/load/{{n}}.txt {{n}}]"
        settings = [(f"AGENT_CONCURRENCY={a}", {"AGENT_CONCURRENCY": a})
                    for a in os.environ.get("AGENTS", "16,32").split(",")]
        # The seed's design, one message at a time, on the very same workload: the same loadgen
        # arguments and seed (bursts included), not a sample extrapolated.
        settings.append(("one at a time", {"MAX_IN_FLIGHT": "1", "AGENT_CONCURRENCY": "1"}))
        rounds1 = int(os.environ.get("ROUNDS1", "1"))
        makespans = {label: [] for label, _ in settings}
        first = None
        moto_pid = int(os.environ.get("MOTO_PID", "0"))
        for r in range(rounds1):
            for label, limits in settings:
                tag = f"run1-{r}-{label.split('=')[-1].replace(' ', '')}"
                upstream, q = prepare(tag, clients, projects, "tiny-site")
                w = Worker(tag, upstream, q, {"BUILD_COMMAND": TINY_BUILD, **limits})
                cpu0 = cpu_snapshot(moto_pid, w.proc.pid)
                report, chart = loadgen(tag, q, clients, projects, 1, n, command, share=0.1, seed=1)
                cpu1 = cpu_snapshot(moto_pid, w.proc.pid)
                peak = w.peak
                w.stop()
                # Read after the stop, which flushed the worker's last collection.
                runs = w.agent_runs()
                in_flight_peak = w.in_flight_peak()
                reports.append((f"1.{r + 1} {label}", report))
                busy, moto_cpu, worker_cpu, children_cpu = (b - a for a, b in zip(cpu0, cpu1))
                makespan = report["makespanMs"] / 1000
                makespans[label].append(makespan)
                print(f"run 1 round {r + 1} ({label}): {n} messages, {runs} agent runs, "
                      f"makespan {makespan:.1f} s, at most {in_flight_peak} at work", file=sys.stderr, flush=True)
                if label == "one at a time" or r != rounds1 - 1:
                    continue
                agents = int(limits["AGENT_CONCURRENCY"])
                # No schedule beats either bound: the agent slots (runs x think time / slots), or
                # the CPU work of everything but the worker (moto, the stand-in agents, builds and
                # git) spread over every core.
                agent_bound = runs * think / agents
                cpu_bound = (moto_cpu + children_cpu) / os.cpu_count()
                ideal = max(agent_bound, cpu_bound)
                table += [
                    (f"1. {n} messages ({clients * projects} workspaces x 5, bursts on), agent {think} s, "
                     f"tiny build, {label} (round {r + 1})",
                     "makespan / ideal bound (max of agent slots, CPU)",
                     f"{makespan:.1f} s / {ideal:.1f} s = {makespan / ideal:.2f}x "
                     f"(agent slots {agent_bound:.1f} s, CPU {cpu_bound:.1f} s)", "<= 1.25x"),
                    ("", "outcomes; most messages at work at once (worker's own high-water mark)",
                     f"{report['terminal']} in {runs} agent runs; {in_flight_peak} of MAX_IN_FLIGHT 64", ""),
                    ("", f"CPU busy per second ({os.cpu_count()} cores): all / moto / worker / its children",
                     f"{busy / makespan:.2f} / {moto_cpu / makespan:.2f} / {worker_cpu / makespan:.2f} / "
                     f"{children_cpu / makespan:.2f} s", ""),
                    ("", "worker's own CPU per message", f"{worker_cpu / n * 1000:.1f} ms", ""),
                ]
                first = first or (makespan, peak, chart)
        serial = makespans["one at a time"]
        for label, _ in settings[:-1]:
            ratios = [s_ / m for s_, m in zip(serial, makespans[label])]
            table.append((
                "", f"one at a time (same loadgen arguments and seed, {rounds1} round(s), interleaved) "
                    f"against {label}: makespans, ratio per round (median)",
                f"{', '.join(f'{x:.0f}' for x in serial)} s against "
                f"{', '.join(f'{x:.1f}' for x in makespans[label])} s: "
                f"{', '.join(f'{x:.1f}x' for x in ratios)} ({median(ratios):.1f}x)", ">= 20x"))
        chart1 = first[2]
        mem_peak = mib(first[1])
    else:
        idle_rss, mem_peak = None, "not run"

    if "2" in runs_wanted:
        # Run 2: light load, nothing waits for a slot. Three rounds (fresh workspaces each, so
        # a tenth of the messages include their workspace's clone); the median round is shown.
        rounds = []
        for r in range(3):
            tag = f"run2-{r}"
            upstream, q = prepare(tag, 10, 1, "tiny-site")
            w = Worker(tag, upstream, q, {"BUILD_COMMAND": TINY_BUILD}, telemetry=False)
            idle_rss = idle_rss or w.idle_rss
            r2, _ = loadgen(tag, q, 10, 1, 1, max(20, int(100 * SCALE)), "[standin:write public/load/{n}.txt {n}]", rate=4)
            w.stop()
            reports.append((f"2.{r + 1}", r2))
            rounds.append(r2["phasesMs"]["orchestration"])
        p50s = sorted(o["p50"] for o in rounds)
        p99s = sorted(o["p99"] for o in rounds)
        table.append(("2. light load (4 msg/s), 3 rounds",
                      "orchestration overhead (end to end minus agent, build, publish, push): median p50 / median p99 (each round's p99)",
                      f"{p50s[1]} / {p99s[1]} ms ({', '.join(str(o['p99']) for o in rounds)})", "p99 < 50 ms"))

    if "3" in runs_wanted:
        # Run 3: 1,000 sessions left idle.
        sessions = max(50, int(1000 * SCALE))
        upstream, q = prepare("run3", sessions // 10, 10, "tiny-site")
        w = Worker("run3", upstream, q, {"BUILD_COMMAND": TINY_BUILD, "SESSION_IDLE_SECONDS": "3600",
                                         "AGENT_CONCURRENCY": "32"}, telemetry=False)
        idle_rss = idle_rss or w.idle_rss
        r3, _ = loadgen("run3", q, sessions // 10, 10, 1, sessions, "[standin:write public/load/{n}.txt {n}]")
        time.sleep(2)
        rss_sessions = w.rss()
        w.stop()
        reports.append(("3", r3))
    else:
        sessions, rss_sessions = 1000, None

    table.append(("3. memory", f"idle / {sessions} idle sessions (no telemetry export) / peak of run 1 (metrics export on)",
                  f"{mib(idle_rss) if idle_rss else 'not run'} / {mib(rss_sessions) if rss_sessions else 'not run'} / {mem_peak}",
                  "< 30 MiB idle, < 100 MiB with 1,000"))

    if "5" in runs_wanted:
        # Run 5: the real Astro build.
        astro_clients = max(2, int(20 * SCALE))
        upstream, q = prepare("run5", astro_clients, 1, "astro-site")
        w = Worker("run5", upstream, q, {}, telemetry=False)
        r5, chart5 = loadgen("run5", q, astro_clients, 1, 1, astro_clients,
                             "[standin:sleep 10] Update the homepage title to \"Load {n}\"")
        w.stop()
        reports.append(("5", r5))
    table.append(("4. lost / duplicated terminal events (bursts on in run 1)",
                  "runs " + ", ".join(label for label, _ in reports),
                  " ; ".join(f"{r['lost']}/{r['duplicates']}" for _, r in reports), "0 / 0"))
    if "5" in runs_wanted:
        table.append((f"5. {astro_clients} clients, real Astro build, agent 10 s", "latency p50 / p95 / p99 / max",
                      "{p50} / {p95} / {p99} / {max} ms".format(**r5["latencyMs"]), ""))
        table.append(("", "time per phase, p50 (ms; orchestration includes waiting for a build slot)", ", ".join(f"{k} {v['p50']}" for k, v in r5["phasesMs"].items()), ""))

    print()
    print(f"load, commit {commit_of_tree()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"SCALE={SCALE}, {os.cpu_count()} cores")
    print("| run | figure | result | target |")
    print("| --- | --- | --- | --- |")
    for cells in table:
        row(*cells)
    charts = [c for c in (locals().get("chart1"), locals().get("chart5")) if c]
    print(f"\ncharts: {', '.join(charts)}")
    shutil.rmtree(BASE, ignore_errors=True)


if __name__ == "__main__":
    main()
