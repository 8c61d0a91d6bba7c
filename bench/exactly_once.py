"""Exactly-once under SQS faults (issue 11): the worker reads its input queue through
tools/sqs-fault-proxy (deletes dropped while answered as successes, messages handed out again
early with a new receipt handle, receive batches reordered, throttling, lost replies, and SQS's
stale-handle rule), while `edit-worker loadgen` sends edit requests with interrupt bursts.
Then, for every message:

  lost                    no terminal event at all
  conflicting_terminal    terminal events of more than one type (a repeat of the same type is fine)
  differing_repeat        a terminal event repeated with a different body (any field)
  agent_ran_twice         the agent ran more than once on its request (the stand-in's call log)
  completed_without_run   `completed`, but the agent never ran on its request
  older_after_newer       the agent ran a request of a thread after a newer one of that thread
                          (newer: sent in a later send call, so a later SentTimestamp), or a
                          coalesced prompt joined them out of send order
  branch_not_newest       the thread's branch upstream does not hold the newest request the
                          agent applied for it
  branch_regressed        along the branch's history, a request replaced a newer one
  bucket_not_newest       the workspace's bucket does not hold the build of the last publish
                          reported by a message's first terminal event
  dead_lettered           a message of the run ended in the dead-letter queue

Prints the injected faults by kind, the counts of each violation kind and the totals; writes the
details to .bench/exactly-once.json (with the worker log lines of the first messages of each
kind). Exits 1 when there is a violation.

Run with: scripts/bench exactly-once   (knobs: MESSAGES=500 or SCALE=0.1, CLIENTS=25 PROJECTS=2
THREADS=2, SHARE=0.3, SEED=1, AGENT_SLEEP=1, VISIBILITY=10, MAX_RECEIVE_COUNT=5 (0: no redrive),
LEASE_STORE=1 to run the worker with a lease store on moto and print its record store calls
per message (issue 25: what the lease store costs, from the worker's own counter
`edit_worker.records.calls` over OTLP, final once it stopped),
fault rates THROTTLE=0.05 DROP_DELETE=0.1 EARLY=0.1 REORDER=0.5 LOST_REPLY=0.02; WORKER_BIN to
test another build, KEEP=1 to keep the run's folder)
"""

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import (AWS_ENV, ENDPOINT, ROOT, Otlp, aws_clients, env_num, git_out, seed_repo,
                    start_worker as spawn_worker, stop_worker, worker_bin, worker_env)

WORKER = worker_bin()

SCALE = env_num("SCALE", 1)
MESSAGES = env_num("MESSAGES", max(20, int(500 * SCALE)), int)
CLIENTS = env_num("CLIENTS", max(2, int(25 * SCALE)) if "SCALE" in os.environ else 25, int)
PROJECTS = env_num("PROJECTS", 2, int)
THREADS = env_num("THREADS", 2, int)
SHARE = env_num("SHARE", 0.3)
SEED = env_num("SEED", 1, int)
AGENT_SLEEP = env_num("AGENT_SLEEP", 1)
VISIBILITY = env_num("VISIBILITY", 10, int)
MAX_RECEIVE_COUNT = env_num("MAX_RECEIVE_COUNT", 5, int)
LEASE_STORE = os.environ.get("LEASE_STORE", "0") == "1"
RATES = {
    "--throttle-rate": os.environ.get("THROTTLE", "0.05"),
    "--drop-delete-rate": os.environ.get("DROP_DELETE", "0.1"),
    "--early-rate": os.environ.get("EARLY", "0.1"),
    "--reorder-rate": os.environ.get("REORDER", "0.5"),
    "--lost-reply-rate": os.environ.get("LOST_REPLY", "0.02"),
}
sqs, s3 = aws_clients()
BASE = tempfile.mkdtemp(prefix="bench-exactly-once-")
# Tenants' uids pass through it to their workspaces (the worker's sandbox, ISOLATION).
os.chmod(BASE, 0o711)
TAG = f"eo{os.getpid()}"
MARKER = re.compile(r"\[load n=(\d+) ")
# The message's span on every log line: long, and the message id is in the line anyway.
SPAN = re.compile(r"process edit message\{[^{}]*\}:?")
VIOLATIONS = ["lost", "conflicting_terminal", "differing_repeat", "agent_ran_twice",
              "completed_without_run", "older_after_newer", "branch_not_newest", "branch_regressed",
              "bucket_not_newest", "dead_lettered"]


git = git_out


def prepare():
    """Upstream bare repositories (the tiny site) and one bucket per workspace, and the queues:
    the input queue redrives to a dead-letter queue after MAX_RECEIVE_COUNT receives."""
    seed = seed_repo(BASE, "tiny-site")
    for c in range(1, CLIENTS + 1):
        for p in range(1, PROJECTS + 1):
            shutil.copytree(seed, upstream(f"load-c{c}", f"p{p}"))
            s3.create_bucket(Bucket=bucket(f"load-c{c}", f"p{p}"))
    dlq = sqs.create_queue(QueueName=f"{TAG}-dlq")["QueueUrl"]
    attrs = {}
    if MAX_RECEIVE_COUNT > 0:
        arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        attrs["RedrivePolicy"] = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)})
    q_in = sqs.create_queue(QueueName=f"{TAG}-in", Attributes=attrs)["QueueUrl"]
    q_out = sqs.create_queue(QueueName=f"{TAG}-out")["QueueUrl"]
    return {"in": q_in, "out": q_out, "dlq": dlq}


def upstream(client, project):
    return os.path.join(BASE, "upstream", client, f"{project}.git")


def bucket(client, project):
    return f"{project}.{client}.{TAG}.bench"


def start_proxy():
    stats = os.path.join(BASE, "faults.json")
    log = os.path.join(BASE, "faults.jsonl")
    args = [os.path.join(ROOT, "tools/sqs-fault-proxy"), "--target", ENDPOINT, "--seed", str(SEED),
            "--queue-name-contains", f"{TAG}-in", "--stats", stats, "--log", log]
    for flag, value in RATES.items():
        args += [flag, value]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(os.path.join(BASE, "proxy.log"), "w"),
                            text=True)
    first = proc.stdout.readline().split()
    if len(first) != 2 or first[0] != "listening":
        raise SystemExit(f"the proxy did not start: {first}")
    return proc, first[1], stats, log


def start_worker(q, proxy, otlp):
    log = os.path.join(BASE, "worker.log")
    env = worker_env(**{
        "INPUT_QUEUE_URL": q["in"], "OUTPUT_QUEUE_URL": q["out"], "DEAD_LETTER_QUEUE_URL": q["dlq"],
        "WORKSPACE_ROOT": os.path.join(BASE, "ws"),
        "GIT_REMOTE_TEMPLATE": os.path.join(BASE, "upstream", "{clientId}/{projectId}.git"),
        "BUCKET_TEMPLATE": "{projectId}.{clientId}." + TAG + ".bench",
        "CLAUDE_BIN": os.path.join(ROOT, "tools/claude-standin"),
        "CLAUDE_CONFIG_DIR": os.path.join(BASE, "claude"),
        "BUILD_COMMAND": "cp -R public dist",
        "AWS_ENDPOINT_URL_SQS": proxy,
        "VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY), "PROGRESS_INTERVAL_SECONDS": "60",
        # Metrics only (the record store's calls): spans would only add work to the run.
        **otlp.env(traces=False),
        # What is measured is delivery: SQS's faults against the records. The sandbox (its
        # cost is `scripts/bench isolation`) would give each workspace's agent a config
        # folder of its own, where the stand-in's one call log, which this checker reads,
        # is not; the browser check (its cost is `CHECK=off,on scripts/bench latency`)
        # would only add its seconds to every message.
        "ISOLATION": "none", "BROWSER_CHECK": "off"})
    if LEASE_STORE:
        lease_bucket = f"leases.{TAG}.bench"
        s3.create_bucket(Bucket=lease_bucket)
        env.update({"LEASE_STORE": f"s3://{lease_bucket}/p", "WORKER_ID": "bench"})
    return spawn_worker(WORKER, env, log), log


def record_store_calls(otlp):
    """(reads, writes) of the worker's record store, from its counter `edit_worker.records.calls`
    (by `op`): the totals once the worker stopped on SIGTERM (its last export), None when the
    worker exported none."""
    calls = otlp.values_by("edit_worker.records.calls", "op")
    if not calls:
        return None
    return calls.get("read", 0), calls.get("write", 0)


def run_loadgen(q):
    ledger = os.path.join(BASE, "ledger.jsonl")
    report = os.path.join(BASE, "report.json")
    command = ("[load n={n} t={thread}] [standin:write public/threads/{thread}.txt {n}] "
               "[standin:write public/live.txt {n}] " + (f"[standin:sleep {AGENT_SLEEP}]" if AGENT_SLEEP > 0 else ""))
    env = {**os.environ, **AWS_ENV,
           "INPUT_QUEUE_URL": q["in"], "OUTPUT_QUEUE_URL": q["out"], "RUST_LOG": "warn"}
    args = [WORKER, "loadgen", "--clients", str(CLIENTS), "--projects", str(PROJECTS), "--threads", str(THREADS),
            "--messages", str(MESSAGES), "--interrupt-share", str(SHARE), "--seed", str(SEED),
            "--command", command, "--wait", str(int(os.environ.get("WAIT", 1800))), "--settle", "5",
            "--ledger", ledger, "--report", report]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"loadgen failed ({out.returncode})")
    print(out.stdout, file=sys.stderr)
    with open(ledger) as f:
        messages = [json.loads(line) for line in f if line.strip()]
    return messages, json.load(open(report))


def read_calls():
    """The stand-in's runs: start lines, each with its end line (by pid) when there is one."""
    path = os.path.join(BASE, "claude", "standin-calls.jsonl")
    starts, ends = [], collections.defaultdict(list)
    if os.path.exists(path):
        for line in open(path):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("event") == "start":
                starts.append(r)
            elif r.get("event") == "end":
                ends[(r["pid"], r.get("sessionId"))].append(r)
    # A run's end line is the first one after its start with its pid and session: pids are
    # reused over a long run (hundreds of agents), so the pid alone can pair a start with
    # another process's end.
    starts.sort(key=lambda r: r["start"])
    for r in starts:
        candidates = ends.get((r["pid"], r.get("sessionId")), [])
        later = [e for e in candidates if e["end"] >= r["start"]]
        r["endRecord"] = min(later, key=lambda e: e["end"]) if later else None
        if r["endRecord"] is not None:
            candidates.remove(r["endRecord"])
        r["markers"] = [int(n) for n in MARKER.findall(r.get("prompt", ""))]
    return starts


def dead_lettered(q):
    ids = set()
    while True:
        got = sqs.receive_message(QueueUrl=q["dlq"], MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                  AttributeNames=["All"]).get("Messages", [])
        if not got:
            return ids
        for m in got:
            ids.add(m["MessageId"])
            sqs.delete_message(QueueUrl=q["dlq"], ReceiptHandle=m["ReceiptHandle"])


def file_at(repo, rev, path):
    return git(repo, "show", f"{rev}:{path}", check=False)


def check(messages, runs, dlq_ids):
    """Every violation, as kind -> list of details."""
    found = collections.defaultdict(list)
    by_n = {m["n"]: m for m in messages}
    runs_of = collections.defaultdict(list)
    for r in runs:
        for n in set(r["markers"]):
            runs_of[n].append(r)

    for m in messages:
        who = {"messageId": m["messageId"], "n": m["n"], "thread": f"{m['clientId']}/{m['projectId']}/{m['threadId']}"}
        types = [t["type"] for t in m["terminal"]]
        if not types:
            found["lost"].append(who)
        elif len(set(types)) > 1:
            found["conflicting_terminal"].append({**who, "events": m["terminal"]})
        else:
            # A repeat is the recorded event sent again byte for byte: compare whole event
            # bodies (the ledger's `event`), by a hash of each one's canonical JSON, not only
            # type and commit; the ledger's own summary fields (the status message's SQS id)
            # differ for every send and are not part of the event.
            bodies = {hashlib.sha256(json.dumps(t["event"], sort_keys=True).encode()).hexdigest()
                      for t in m["terminal"]}
            if len(bodies) > 1:
                found["differing_repeat"].append({**who, "bodyHashes": sorted(bodies),
                                                  "events": m["terminal"]})
        ran = runs_of.get(m["n"], [])
        if len(ran) > 1:
            found["agent_ran_twice"].append({**who, "runs": [{"pid": r["pid"], "start": r["start"],
                                                              "markers": r["markers"]} for r in ran]})
        if not ran and "completed" in types:
            found["completed_without_run"].append({**who, "events": m["terminal"]})
        if m["messageId"] in dlq_ids:
            found["dead_lettered"].append({**who, "events": m["terminal"]})

    # Per thread: the order in which the agent applied its requests, and what the branch holds.
    threads = collections.defaultdict(list)
    for m in messages:
        threads[(m["clientId"], m["projectId"], m["threadId"])].append(m)
    for (client, project, thread), ms in threads.items():
        ns = {m["n"] for m in ms}
        newest_batch = -1
        newest = None
        written = None
        for r in runs:
            mine = [n for n in r["markers"] if n in ns]
            if not mine:
                continue
            batches = [by_n[n]["batch"] for n in mine]
            if batches != sorted(batches):
                found["older_after_newer"].append({"thread": f"{client}/{project}/{thread}", "joinedOutOfOrder": mine,
                                                   "pid": r["pid"]})
            for n in mine:
                if by_n[n]["batch"] < newest_batch:
                    found["older_after_newer"].append({
                        "thread": f"{client}/{project}/{thread}", "ran": n, "messageId": by_n[n]["messageId"],
                        "afterNewer": newest, "newerMessageId": by_n[newest]["messageId"], "pid": r["pid"]})
                if by_n[n]["batch"] >= newest_batch:
                    newest_batch, newest = by_n[n]["batch"], n
            end = r.get("endRecord")
            if end is None:
                # Killed without an end line: the request writes first, so its writes happened.
                wrote = [max(mine, key=lambda n: by_n[n]["batch"])]
            else:
                wrote = [int(text) for path, text in end["writes"]
                         if path == f"public/threads/{thread}.txt" and text.strip().isdigit()]
            if wrote:
                written = wrote[-1]
        repo = upstream(client, project)
        branch = f"thread-{thread}"
        held = file_at(repo, branch, f"public/threads/{thread}.txt")
        held = int(held) if held and held.strip().isdigit() else None
        if written is not None and held != written:
            found["branch_not_newest"].append({"thread": f"{client}/{project}/{thread}", "branchHolds": held,
                                               "newestApplied": written,
                                               "newestAppliedMessageId": by_n[written]["messageId"]})
        history = git(repo, "rev-list", "--reverse", "--first-parent", branch, "--",
                      f"public/threads/{thread}.txt", check=False) or ""
        last = None
        for commit in history.split():
            value = file_at(repo, commit, f"public/threads/{thread}.txt")
            if not value or not value.strip().isdigit() or int(value) not in by_n:
                continue
            value = int(value)
            if last is not None and by_n[value]["batch"] < by_n[last]["batch"]:
                found["branch_regressed"].append({"thread": f"{client}/{project}/{thread}", "commit": commit,
                                                  "from": last, "to": value,
                                                  "messageId": by_n[value]["messageId"]})
            last = value

    # Per workspace: the bucket holds the build of the last publish a first terminal event reported.
    workspaces = collections.defaultdict(list)
    for m in messages:
        workspaces[(m["clientId"], m["projectId"])].append(m)
    for (client, project), ms in workspaces.items():
        published = [(m["terminal"][0]["atMs"], m) for m in ms if m["terminal"] and m["terminal"][0]["published"]]
        if not published:
            continue
        _, last = max(published, key=lambda p: p[0])
        commit = last["terminal"][0]["commit"]
        expected = file_at(upstream(client, project), commit, "public/live.txt") if commit else None
        try:
            live = s3.get_object(Bucket=bucket(client, project), Key="live.txt")["Body"].read().decode()
        except Exception as e:  # noqa: BLE001 - a missing object is a finding, not a crash
            live = f"({type(e).__name__})"
        if expected is None or live.strip() != expected.strip():
            found["bucket_not_newest"].append({"workspace": f"{client}/{project}", "bucketLive": live.strip(),
                                               "expected": expected and expected.strip(),
                                               "lastPublishMessageId": last["messageId"], "commit": commit})
    return found


def explain(found, worker_log, fault_log):
    """The worker log lines and injected faults of the first few messages of each kind."""
    lines = open(worker_log, errors="replace").read().splitlines()
    faults = []
    if os.path.exists(fault_log):
        faults = [json.loads(line) for line in open(fault_log) if line.strip()]
    out = {}
    for kind, items in found.items():
        out[kind] = []
        for item in items[:3]:
            ids = [v for k, v in item.items() if k.lower().endswith("messageid") and v]
            out[kind].append({
                **item,
                "faults": [f for f in faults if f.get("messageId") in ids][:20],
                "workerLog": [SPAN.sub("", line)[:400] for line in lines if any(i in line for i in ids)][:40],
            })
    return out


def main():
    q = prepare()
    proxy, proxy_url, stats_path, fault_log = start_proxy()
    otlp = Otlp()
    worker, worker_log = start_worker(q, proxy_url, otlp)
    time.sleep(1)
    started = time.time()
    try:
        messages, report = run_loadgen(q)
    finally:
        # On SIGTERM the worker exports its metrics a last time before it exits: the
        # totals below are final.
        stop_worker(worker)
    faults = json.load(urllib.request.urlopen(proxy_url + "/__fault_stats"))
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(timeout=10)
    runs = read_calls()
    dlq_ids = dead_lettered(q)
    found = check(messages, runs, dlq_ids)
    details = explain(found, worker_log, fault_log)
    counts = {k: len(found.get(k, [])) for k in VIOLATIONS}
    terminal = collections.Counter(m["terminal"][0]["type"] for m in messages if m["terminal"])
    total = sum(counts.values())

    print(f"\nexactly once under SQS faults: {len(messages)} messages, {CLIENTS * PROJECTS} workspaces x "
          f"{THREADS} threads (+ burst threads), interrupt share {SHARE}, seed {SEED}, "
          f"worker {os.path.relpath(WORKER, ROOT) if WORKER.startswith(ROOT) else WORKER}, "
          f"{time.time() - started:.0f} s")
    print("\n| injected fault | count |")
    print("| --- | --- |")
    for kind, n in faults["faults"].items():
        print(f"| {kind} | {n} |")
    print(f"| **injected in all** | {faults['injected']} |")
    print("\n| violation | count |")
    print("| --- | --- |")
    for kind in VIOLATIONS:
        print(f"| {kind} | {counts[kind]} |")
    print(f"| **violations in all** | {total} |")
    store_calls = record_store_calls(otlp)
    otlp.stop()
    if store_calls is not None:
        reads, writes = store_calls
        print(f"\nrecord store calls ({'lease store on S3' if LEASE_STORE else 'local folder'}): "
              f"{reads} reads + {writes} writes = {(reads + writes) / max(1, len(messages)):.2f} per message")
    print(f"\noutcomes (first terminal event): {dict(terminal)}; agent runs {len(runs)}; "
          f"status events seen twice (the same event again) {report.get('redeliveries')}; "
          f"dead-lettered {len(dlq_ids)}")
    os.makedirs(os.path.join(ROOT, ".bench"), exist_ok=True)
    out = os.path.join(ROOT, ".bench", "exactly-once.json")
    with open(out, "w") as f:
        json.dump({"messages": len(messages), "faults": faults, "violations": counts,
                   "details": {k: v for k, v in found.items()}, "explained": details,
                   "outcomes": dict(terminal), "agentRuns": len(runs)}, f, indent=2)
    print(f"details: {out}" + (f"; run folder kept: {BASE}" if os.environ.get("KEEP") else ""))
    for kind, items in details.items():
        for item in items[:1]:
            print(f"\n{kind}: {json.dumps({k: v for k, v in item.items() if k not in ('workerLog', 'faults')})}")
            for f in item["faults"][:5]:
                print(f"  fault: {json.dumps(f)}")
            for line in item["workerLog"][:12]:
                print(f"  log: {line}")
    if not os.environ.get("KEEP"):
        shutil.rmtree(BASE, ignore_errors=True)
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
