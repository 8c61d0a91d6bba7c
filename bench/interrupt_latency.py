"""Interrupt latency benchmark (issue 3).

Measures, inside the real worker, the time from a newer message reaching its session to the
running agent's whole process group being gone (the worker logs it as interrupt_latency_us),
while 100 messages of other workspaces are held by the same worker with their agents running.
Prints median, p99 and max. Run it with: scripts/bench interrupt-latency
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENDPOINT = os.environ["MOTO_ENDPOINT"]
WORKER = os.environ["WORKER_BIN"]
INTERRUPTS = int(os.environ.get("INTERRUPTS", "200"))
OTHERS = int(os.environ.get("OTHER_MESSAGES", "100"))
KW = dict(endpoint_url=ENDPOINT, region_name="us-east-1",
          aws_access_key_id="testing", aws_secret_access_key="testing")


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"})


def upstream(base, client):
    bare = os.path.join(base, "upstream", client, "site.git")
    os.makedirs(bare)
    git(bare, "init", "--quiet", "--bare", "--initial-branch=main")
    seed = os.path.join(base, "seed-" + client)
    shutil.copytree(os.path.join(ROOT, "tests/fixtures/tiny-site"), seed)
    git(seed, "init", "--quiet", "--initial-branch=main")
    git(seed, "add", "-A")
    git(seed, "commit", "--quiet", "-m", "init")
    git(seed, "push", "--quiet", bare, "main")
    shutil.rmtree(seed)


def percentile(values, p):
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


def main():
    sqs = boto3.client("sqs", **KW)
    s3 = boto3.client("s3", **KW)
    base = tempfile.mkdtemp(prefix="bench-int-")
    # Tenants' uids pass through it to their workspaces (the worker's sandbox, ISOLATION).
    os.chmod(base, 0o711)
    q = {n: sqs.create_queue(QueueName=f"bi-{os.getpid()}-{n}")["QueueUrl"] for n in ("in", "out")}
    clients = ["target"] + [f"other{i}" for i in range(OTHERS)]
    for c in clients:
        upstream(base, c)
        s3.create_bucket(Bucket=f"edit.{c}.bench-int.test")
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
        "INPUT_QUEUE_URL": q["in"], "OUTPUT_QUEUE_URL": q["out"],
        "WORKSPACE_ROOT": os.path.join(base, "ws"),
        "GIT_REMOTE_TEMPLATE": os.path.join(base, "upstream/{clientId}/{projectId}.git"),
        "BUCKET_TEMPLATE": "edit.{clientId}.bench-int.test",
        "CLAUDE_BIN": os.path.join(ROOT, "tools/claude-standin"),
        "CLAUDE_CONFIG_DIR": os.path.join(base, "claude"),
        "MAX_IN_FLIGHT": str(OTHERS + 50),
        "AWS_ENDPOINT_URL": ENDPOINT, "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "RUST_LOG": "warn,edit_worker_actors::pipeline=info",
    }
    log_path = os.path.join(base, "worker.log")
    worker = subprocess.Popen([WORKER, "run"], env=env, stderr=open(log_path, "w"), stdout=subprocess.DEVNULL)

    def send(client, thread, command):
        body = json.dumps({"sessionId": "s", "threadId": thread, "clientId": client,
                           "projectId": "site", "command": command})
        return sqs.send_message(QueueUrl=q["in"], MessageBody=body)["MessageId"]

    started = set()

    def wait_started(message_id, timeout=60):
        deadline = time.time() + timeout
        while message_id not in started and time.time() < deadline:
            out = sqs.receive_message(QueueUrl=q["out"], MaxNumberOfMessages=10, WaitTimeSeconds=1)
            for m in out.get("Messages", []):
                sqs.delete_message(QueueUrl=q["out"], ReceiptHandle=m["ReceiptHandle"])
                event = json.loads(m["Body"])
                if event["type"] == "started":
                    started.add(event["messageId"])
        if message_id not in started:
            raise SystemExit(f"message {message_id} never started; see {log_path}")

    # Other work held by the same worker: every one of these agents keeps running.
    others = [send(c, "busy", "[standin:sleep 3600]") for c in clients[1:]]
    for m in others:
        wait_started(m, timeout=300)
    print(f"{len(others)} messages of other workspaces are in flight", file=sys.stderr)

    previous = send("target", "t", "[standin:write a.txt a] [standin:sleep 3600]")
    wait_started(previous)
    for i in range(INTERRUPTS):
        time.sleep(0.3)  # let the agent get going
        previous = send("target", "t" if i % 2 else "u", f"[standin:write n{i}.txt {i}] [standin:sleep 3600]")
        wait_started(previous)
    time.sleep(1)
    worker.terminate()
    worker.wait(timeout=60)

    latencies = [int(m) / 1000.0 for m in re.findall(r"reason=Interrupted interrupt_latency_us=(\d+)",
                                                     open(log_path).read())]
    if len(latencies) < INTERRUPTS:
        raise SystemExit(f"only {len(latencies)} interrupts measured; see {log_path}")
    median = percentile(latencies, 50)
    print("interrupt latency (newer message at its session -> agent process group gone)")
    print(f"  interrupts measured  {len(latencies)}")
    print(f"  other messages held  {len(others)}")
    print(f"  median               {median:.1f} ms")
    print(f"  p99                  {percentile(latencies, 99):.1f} ms")
    print(f"  max                  {max(latencies):.1f} ms")
    print(f"  target p99 < 50 ms   {'met' if percentile(latencies, 99) < 50 else 'NOT met'}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
