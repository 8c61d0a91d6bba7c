"""Small helpers over boto3 (installed with moto in .venv) for the demo and benchmark scripts:
create the local queues and bucket, wait for a terminal status event, read the live page, fetch
the browser check's screenshots."""

import json
import re
import sys
import time

import boto3

ENDPOINT = sys.argv[1]
KW = dict(endpoint_url=ENDPOINT, region_name="us-east-1",
          aws_access_key_id="testing", aws_secret_access_key="testing")


def setup(prefix, bucket):
    sqs = boto3.client("sqs", **KW)
    urls = {}
    for name in ("in", "status", "dlq"):
        urls[name] = sqs.create_queue(QueueName=f"{prefix}-{name}")["QueueUrl"]
    boto3.client("s3", **KW).create_bucket(Bucket=bucket)
    print(json.dumps(urls))


def wait(status_url, seconds):
    sqs = boto3.client("sqs", **KW)
    deadline = time.time() + float(seconds)
    while time.time() < deadline:
        out = sqs.receive_message(QueueUrl=status_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for m in out.get("Messages", []):
            sqs.delete_message(QueueUrl=status_url, ReceiptHandle=m["ReceiptHandle"])
            event = json.loads(m["Body"])
            print(f"status: {event['type']}", file=sys.stderr)
            if event["type"] in ("completed", "interrupted", "failed", "rejected"):
                print(json.dumps(event, indent=2))
                return 0 if event["type"] == "completed" else 1
    print("no terminal status event in time", file=sys.stderr)
    return 1


def title(bucket):
    body = boto3.client("s3", **KW).get_object(Bucket=bucket, Key="index.html")["Body"].read().decode()
    found = re.search(r"<title>(.*?)</title>", body, re.S)
    print(found.group(1) if found else "(no title)")


def screenshots(bucket, event_file, folder):
    """Download the screenshots the event's browser check links to (its `check`) into `folder`;
    print each file, the desktop one of `/` (the page the demo edits) first."""
    event = json.load(open(event_file))
    check = event.get("check")
    if not check:
        print("no browser check in the event (no Chromium found, or BROWSER_CHECK=off)", file=sys.stderr)
        return 1
    preview = event["previewUrl"]
    s3 = boto3.client("s3", **KW)
    pages = sorted(check["pages"], key=lambda p: p["path"] != "/")
    for page in pages:
        for field, suffix in (("screenshot", ""), ("screenshotMobile", ".mobile")):
            url = page.get(field)
            if not url or not url.startswith(preview):
                continue
            name = (page["path"].strip("/").replace("/", "-") or "index") + suffix + ".png"
            path = f"{folder}/{name}"
            s3.download_file(bucket, url[len(preview):], path)
            print(path)
    return 0


if __name__ == "__main__":
    verb, args = sys.argv[2], sys.argv[3:]
    sys.exit({"setup": setup, "wait": wait, "title": title,
              "screenshots": screenshots}[verb](*args) or 0)
