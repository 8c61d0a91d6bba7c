"""Publisher benchmark (issue 4): edit-worker's content-compared publish against
`aws s3 sync --delete`, on the same local S3 server in the same run.

A generated static site of 1,000 pages plus assets (2,003 files). Three cases, each timed five
times (median reported) for both tools:
  1. cold: empty bucket to full site;
  2. rebuild, one page changed: every file rewritten with a new timestamp, one page different;
  3. nothing changed: every file rewritten with identical content.
Run it with: scripts/bench publish
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import boto3

PAGES = int(os.environ.get("PAGES", "1000"))
REPS = int(os.environ.get("REPS", "5"))
WORKER = os.environ["WORKER_BIN"]
AWS = os.environ["AWS_CLI"]


def write_site(root, variant, changed_page):
    """Write every file of the site (new timestamps); page `changed_page` carries `variant`."""
    os.makedirs(os.path.join(root, "_astro"), exist_ok=True)
    for i in range(PAGES):
        folder = root if i == 0 else os.path.join(root, f"p{i}")
        os.makedirs(folder, exist_ok=True)
        extra = f"<p>edit {variant}</p>" if i == changed_page else ""
        body = ("<!DOCTYPE html><html><head><title>Page %d</title>"
                "<link rel=stylesheet href=/_astro/p%d.a1b2c3.css></head><body>%s%s</body></html>\n"
                % (i, i, ("Lorem ipsum dolor sit amet. " * 60), extra))
        with open(os.path.join(folder, "index.html"), "w") as f:
            f.write(body)
        with open(os.path.join(root, "_astro", f"p{i}.a1b2c3.css"), "w") as f:
            f.write(".page-%d { color: #%06x; margin: %dpx; }\n" % (i, i * 2654435761 % 0xFFFFFF, i % 40) * 12)
    for name, size in (("favicon.ico", 4096), ("logo.png", 20000), ("robots.txt", 40)):
        with open(os.path.join(root, name), "wb") as f:
            f.write(bytes((j * 7) % 256 for j in range(size)))


def count_files(root):
    return sum(len(files) for _, _, files in os.walk(root))


def run_worker_publish(env, bucket, root):
    t = time.perf_counter()
    out = subprocess.run([WORKER, "publish", "--bucket", bucket, root], env=env, check=True,
                         capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    return elapsed, json.loads(out.stdout)["uploaded"]


def run_aws_sync(env, endpoint, bucket, root):
    t = time.perf_counter()
    out = subprocess.run([AWS, "s3", "sync", root, f"s3://{bucket}", "--delete", "--no-progress",
                          "--endpoint-url", endpoint], env=env, check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    return elapsed, sum(1 for line in out.stdout.splitlines() if line.startswith("upload:"))


def bench_backend(label, endpoint, credentials):
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": credentials[0], "AWS_SECRET_ACCESS_KEY": credentials[1],
           "AWS_EC2_METADATA_DISABLED": "true", "RUST_LOG": "error"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1])
    work = tempfile.mkdtemp(prefix="bench-pub-")
    results = {}
    for tool in ("edit-worker", "aws s3 sync"):
        times = {1: [], 2: [], 3: []}
        uploads = {1: [], 2: [], 3: []}
        for rep in range(REPS):
            bucket = f"bench-{tool.split()[0].replace('-', '')}-{rep}-{os.getpid()}"
            s3.create_bucket(Bucket=bucket)
            root = os.path.join(work, f"{bucket}-site")
            write_site(root, variant=0, changed_page=-1)
            for case in (1, 2, 3):
                if case == 2:
                    write_site(root, variant=rep + 1, changed_page=PAGES // 2)
                elif case == 3:
                    write_site(root, variant=rep + 1, changed_page=PAGES // 2)
                # aws s3 sync compares modification times at one-second resolution.
                time.sleep(1.05)
                if tool == "edit-worker":
                    elapsed, uploaded = run_worker_publish(env, bucket, root)
                else:
                    elapsed, uploaded = run_aws_sync(env, endpoint, bucket, root)
                times[case].append(elapsed)
                uploads[case].append(uploaded)
            shutil.rmtree(root)
        results[tool] = (times, uploads)
        print(f"  {label}: {tool} done", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return results


def report(label, results, files):
    names = {1: "1. cold (empty bucket)", 2: "2. rebuild, one page changed", 3: "3. nothing changed"}
    print(f"\n{label}: {files} files, median of {REPS} runs")
    print(f"| case | edit-worker | aws s3 sync --delete | speed-up | objects uploaded (edit-worker / aws) |")
    print(f"| --- | --- | --- | --- | --- |")
    for case in (1, 2, 3):
        ew = statistics.median(results["edit-worker"][0][case])
        aws = statistics.median(results["aws s3 sync"][0][case])
        up_ew = statistics.median(results["edit-worker"][1][case])
        up_aws = statistics.median(results["aws s3 sync"][1][case])
        print(f"| {names[case]} | {ew:.2f} s | {aws:.2f} s | {aws / ew:.1f}x | {up_ew:.0f} / {up_aws:.0f} |")


def main():
    tmp = tempfile.mkdtemp()
    write_site(tmp, 0, -1)
    files = count_files(tmp)
    shutil.rmtree(tmp)
    backends = [("moto", os.environ["MOTO_ENDPOINT"], ("testing", "testing"))]
    if os.environ.get("S3S_ENDPOINT"):
        backends.append(("s3s-fs", os.environ["S3S_ENDPOINT"], ("benchkey", "benchsecret")))
    only = os.environ.get("BACKENDS")
    if only:
        backends = [b for b in backends if b[0] in only.split(",")]
    for label, endpoint, creds in backends:
        print(f"benchmarking against {label} ...", file=sys.stderr)
        report(label, bench_backend(label, endpoint, creds), files)


if __name__ == "__main__":
    main()
