"""Rollback benchmark (issue 26), on moto, side by side in one run.

A site of 1,000 files (the tiny site plus 995 files in public/) whose deploys each change the
same 10 files. After 12 deploys, each round measures:
  1. a rollback to `previous` (10 files differ), from the message's receipt to `completed`
     (the event's durationsMs.total);
  2. the edit that gets the same 10 files back the slow way: the agent rewrites them, the
     worker commits, builds the 1,000-file site and publishes the 10 changed files;
  3. a rollback to the deploy 10 deploys back.
For each, the S3 requests the worker made to the site's bucket, counted in moto's request log
(every request is one line there). Then the publisher's own figures with and without the deploy
record (`edit-worker publish` with and without --deploy-for), one page changed of the 1,000,
alternating, median of the rounds.
Run it with: scripts/bench rollback   (ROUNDS=3 by default)
"""

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENDPOINT = os.environ["MOTO_ENDPOINT"]
WORKER = os.environ["WORKER_BIN"]
MOTO_LOG = os.environ["MOTO_LOG"]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
FILES = 995  # + the tiny site's 5: index, about, 2 stylesheets, robots.txt
CHANGED = 10
KW = dict(endpoint_url=ENDPOINT, region_name="us-east-1",
          aws_access_key_id="testing", aws_secret_access_key="testing")
CLIENT, PROJECT, THREAD = "rb", "site", "t"


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"})


def upstream(base):
    bare = os.path.join(base, "upstream", CLIENT, PROJECT + ".git")
    os.makedirs(bare)
    git(bare, "init", "--quiet", "--bare", "--initial-branch=main")
    seed = os.path.join(base, "seed")
    shutil.copytree(os.path.join(ROOT, "tests/fixtures/tiny-site"), seed)
    for i in range(FILES):
        with open(os.path.join(seed, "public", f"f{i:04d}.txt"), "w") as f:
            f.write(f"file {i} " + "lorem ipsum " * 20 + "\n")
    git(seed, "init", "--quiet", "--initial-branch=main")
    git(seed, "add", "-A")
    git(seed, "commit", "--quiet", "-m", "init")
    git(seed, "push", "--quiet", bare, "main")
    shutil.rmtree(seed)


def log_size():
    return os.path.getsize(MOTO_LOG)


def requests_since(offset, bucket):
    """S3 requests to `bucket` in moto's log after byte `offset` (one line each)."""
    with open(MOTO_LOG, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return sum(1 for line in text.splitlines() if f" /{bucket}" in line and '" ' in line)


class Worker:
    def __init__(self, base, bucket, queues):
        self.sqs = boto3.client("sqs", **KW)
        self.queues = queues
        env = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
            "INPUT_QUEUE_URL": queues["in"], "OUTPUT_QUEUE_URL": queues["out"],
            "WORKSPACE_ROOT": os.path.join(base, "ws"),
            "GIT_REMOTE_TEMPLATE": os.path.join(base, "upstream/{clientId}/{projectId}.git"),
            "BUCKET_TEMPLATE": bucket,
            "CLAUDE_BIN": os.path.join(ROOT, "tools/claude-standin"),
            "CLAUDE_CONFIG_DIR": os.path.join(base, "claude"),
            "ISOLATION": "none",
            "AWS_ENDPOINT_URL": ENDPOINT, "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "RUST_LOG": "warn",
        }
        self.proc = subprocess.Popen([WORKER, "run"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(base, "worker.log"), "w"))

    def send(self, body):
        body = {"sessionId": "s", "threadId": THREAD, "clientId": CLIENT, "projectId": PROJECT,
                **body}
        return self.sqs.send_message(QueueUrl=self.queues["in"],
                                     MessageBody=json.dumps(body))["MessageId"]

    def wait(self, message_id, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.sqs.receive_message(QueueUrl=self.queues["out"], MaxNumberOfMessages=10,
                                           WaitTimeSeconds=1)
            for m in out.get("Messages", []):
                self.sqs.delete_message(QueueUrl=self.queues["out"],
                                        ReceiptHandle=m["ReceiptHandle"])
                event = json.loads(m["Body"])
                if event["messageId"] == message_id and event["type"] in (
                        "completed", "failed", "interrupted", "rejected"):
                    if event["type"] != "completed":
                        raise SystemExit(f"not completed: {event}")
                    return event
        raise SystemExit(f"no end for {message_id}")

    def run(self, body, bucket):
        offset = log_size()
        event = self.wait(self.send(body))
        # moto writes its log line as it answers; the event is sent after the last request.
        return event, requests_since(offset, bucket)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def phases(durations):
    return " ".join(f"{k}={v}" for k, v in durations.items() if k != "total")


def edit_body(version):
    writes = " ".join(f"[standin:write public/f{i:04d}.txt version {version}]"
                      for i in range(CHANGED))
    return {"command": f"Update the homepage title to \"v{version}\" {writes}"}


def publisher_figures(base, s3):
    """`edit-worker publish` of a 1,000-file build with one page changed, with and without a
    deploy record, alternating."""
    site = os.path.join(base, "pubsite")
    os.makedirs(site)
    for i in range(1000):
        with open(os.path.join(site, f"p{i:04d}.html"), "w") as f:
            f.write(f"<p>page {i}</p>" + "lorem " * 50)
    env = {**os.environ, "AWS_ENDPOINT_URL": ENDPOINT, "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "RUST_LOG": "error"}
    results = {"plain": ([], []), "deploy": ([], [])}
    buckets = {}
    for mode in results:
        bucket = f"pub-{mode}-{os.getpid()}.bench"
        s3.create_bucket(Bucket=bucket)
        buckets[mode] = bucket
    for r in range(ROUNDS + 1):
        with open(os.path.join(site, "p0000.html"), "w") as f:
            f.write(f"<p>round {r}</p>")
        for mode, bucket in buckets.items():
            args = [WORKER, "publish", "--bucket", bucket, site]
            if mode == "deploy":
                args += ["--deploy-for", f"{CLIENT}/pub", "--commit", f"{r:040x}"]
            offset = log_size()
            t = time.perf_counter()
            subprocess.run(args, env=env, check=True, capture_output=True)
            elapsed = time.perf_counter() - t
            if r > 0:  # round 0 is the cold upload
                results[mode][0].append(elapsed)
                results[mode][1].append(requests_since(offset, bucket))
    return results


def main():
    sqs = boto3.client("sqs", **KW)
    s3 = boto3.client("s3", **KW)
    base = tempfile.mkdtemp(prefix="bench-rollback-")
    os.chmod(base, 0o711)
    queues = {n: sqs.create_queue(QueueName=f"rb-{os.getpid()}-{n}")["QueueUrl"]
              for n in ("in", "out")}
    bucket = f"edit.rb.bench-{os.getpid()}.test"
    s3.create_bucket(Bucket=bucket)
    upstream(base)
    worker = Worker(base, bucket, queues)
    try:
        version = 0
        print(f"setting up: 12 deploys of a {FILES + 5}-file site, {CHANGED} files changed each",
              flush=True)
        deploys = []
        for _ in range(12):
            version += 1
            event, _ = worker.run(edit_body(version), bucket)
            deploys.append(event["deployId"])
        rows = {"previous": [], "edit": [], "ten back": []}
        for r in range(ROUNDS):
            event, n = worker.run({"action": "rollback"}, bucket)
            deploys.append(event["deployId"])
            rows["previous"].append((event["durationsMs"]["total"], n, event["publish"],
                                     event["durationsMs"]))
            # The same 10 files back the slow way: agent, commit, build, publish.
            version += 1
            event, n = worker.run(edit_body(version), bucket)
            deploys.append(event["deployId"])
            rows["edit"].append((event["durationsMs"]["total"], n, event["publish"],
                                 event["durationsMs"]))
            target = deploys[-11]
            event, n = worker.run({"action": "rollback", "to": target}, bucket)
            deploys.append(event["deployId"])
            rows["ten back"].append((event["durationsMs"]["total"], n, event["publish"],
                                     event["durationsMs"]))
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v[-1][0]} ms / {v[-1][1]} requests" for k, v in rows.items()), flush=True)
            print(f"  phases: rollback {phases(rows['previous'][-1][3])}; "
                  f"edit {phases(rows['edit'][-1][3])}", flush=True)
    finally:
        worker.stop()
    pub = publisher_figures(base, s3)
    shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(x[0] for x in v) for k, v in rows.items()}
    req = {k: statistics.median(x[1] for x in v) for k, v in rows.items()}
    changed = {k: statistics.median(x[2]["uploaded"] + x[2]["deleted"] for x in v)
               for k, v in rows.items()}
    print()
    print(f"site: {FILES + 5} files; each deploy changes {CHANGED}; median of {ROUNDS} rounds")
    print("| case | receipt to completed | S3 requests | files changed | requests per changed file |")
    print("| --- | --- | --- | --- | --- |")
    for k, label in (("previous", "rollback to previous"),
                     ("edit", "edit changing the same 10 files (agent, commit, build, publish)"),
                     ("ten back", "rollback to 10 deploys back")):
        per = req[k] / changed[k] if changed[k] else 0
        print(f"| {label} | {med[k]:.0f} ms | {req[k]:.0f} | {changed[k]:.0f} | {per:.1f} |")
    print(f"speed-up of a rollback over the edit: {med['edit'] / med['previous']:.1f}x")
    p_t = {k: statistics.median(v[0]) for k, v in pub.items()}
    p_r = {k: statistics.median(v[1]) for k, v in pub.items()}
    print()
    print("| publish, 1,000 pages, one changed | time | S3 requests |")
    print("| --- | --- | --- |")
    print(f"| without a deploy record | {p_t['plain'] * 1000:.0f} ms | {p_r['plain']:.0f} |")
    print(f"| with a deploy record | {p_t['deploy'] * 1000:.0f} ms | {p_r['deploy']:.0f} |")
    print(f"time ratio {p_t['deploy'] / p_t['plain']:.2f}")


if __name__ == "__main__":
    main()
