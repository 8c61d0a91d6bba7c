"""Publisher benchmark (issues 4, 28): edit-worker's content-compared publish against
`aws s3 sync --delete`, on the same local S3 server, in one run.

Fair by construction (issue 28): the two tools take turns round by round (which goes first
alternates), each round on fresh buckets of its own, and both get the same number of requests at
once: UPLOAD_CONCURRENCY for edit-worker and the CLI's `s3.max_concurrent_requests` are both
CONCURRENCY (default 16, edit-worker's default). Each round's ratio (aws / edit-worker) is
printed with the median of the rounds' ratios.

A generated static site of 1,000 pages plus assets (2,003 files). Three cases per round:
  1. cold: empty bucket to full site;
  2. rebuild, one page changed: every file rewritten with a new timestamp, one page different;
  3. nothing changed: every file rewritten with identical content.
Run it with: scripts/bench publish (REPS rounds, default 5; PAGES; CONCURRENCY; BACKENDS=moto)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import boto3

from common import commit_of_tree, env_num, median, worker_bin

PAGES = env_num("PAGES", 1000, int)
REPS = env_num("REPS", 5, int)
CONCURRENCY = env_num("CONCURRENCY", 16, int)
WORKER = worker_bin()
AWS = os.environ["AWS_CLI"]
TOOLS = ("edit-worker", "aws s3 sync")


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
    work = tempfile.mkdtemp(prefix="bench-pub-")
    # The CLI's own configuration file: the same requests at once as edit-worker's.
    config = os.path.join(work, "aws-config")
    with open(config, "w") as f:
        f.write(f"[default]\ns3 =\n    max_concurrent_requests = {CONCURRENCY}\n")
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": credentials[0], "AWS_SECRET_ACCESS_KEY": credentials[1],
           "AWS_EC2_METADATA_DISABLED": "true", "RUST_LOG": "error", "AWS_CONFIG_FILE": config,
           "UPLOAD_CONCURRENCY": str(CONCURRENCY), "S3_UPLOAD_CONCURRENCY": str(CONCURRENCY)}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1])
    # results[tool][case] = [(seconds, uploaded) per round]
    results = {tool: {1: [], 2: [], 3: []} for tool in TOOLS}
    for rep in range(REPS):
        # Which tool goes first alternates, so that neither always meets a bigger server.
        for tool in (TOOLS if rep % 2 == 0 else TOOLS[::-1]):
            bucket = f"bench-{tool.split()[0].replace('-', '')}-{rep}-{os.getpid()}"
            s3.create_bucket(Bucket=bucket)
            root = os.path.join(work, f"{bucket}-site")
            write_site(root, variant=0, changed_page=-1)
            for case in (1, 2, 3):
                if case in (2, 3):
                    write_site(root, variant=rep + 1, changed_page=PAGES // 2)
                # aws s3 sync compares modification times at one-second resolution.
                time.sleep(1.05)
                if tool == "edit-worker":
                    results[tool][case].append(run_worker_publish(env, bucket, root))
                else:
                    results[tool][case].append(run_aws_sync(env, endpoint, bucket, root))
            shutil.rmtree(root)
        print(f"  {label}: round {rep + 1}/{REPS}: " + ", ".join(
            f"case {c} {results['edit-worker'][c][-1][0]:.2f} s / {results['aws s3 sync'][c][-1][0]:.2f} s"
            for c in (1, 2, 3)), file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return results


def report(label, results, files):
    names = {1: "1. cold (empty bucket)", 2: "2. rebuild, one page changed", 3: "3. nothing changed"}
    print(f"\n{label}: {files} files, {REPS} rounds, tools alternating, fresh buckets each round, "
          f"{CONCURRENCY} requests at once for both")
    print("| case | edit-worker, median | aws s3 sync --delete, median | speed-up per round (median) | objects uploaded (edit-worker / aws) |")
    print("| --- | --- | --- | --- | --- |")
    for case in (1, 2, 3):
        ew = [t for t, _ in results["edit-worker"][case]]
        aws = [t for t, _ in results["aws s3 sync"][case]]
        ratios = [a / e for a, e in zip(aws, ew)]
        up_ew = median(u for _, u in results["edit-worker"][case])
        up_aws = median(u for _, u in results["aws s3 sync"][case])
        print(f"| {names[case]} | {median(ew):.2f} s | {median(aws):.2f} s | "
              f"{', '.join(f'{r:.1f}' for r in ratios)} ({median(ratios):.1f}x) | {up_ew:.0f} / {up_aws:.0f} |")


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
    print(f"publish against aws s3 sync, commit {commit_of_tree()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores")
    for label, endpoint, creds in backends:
        print(f"benchmarking against {label} ...", file=sys.stderr)
        report(label, bench_backend(label, endpoint, creds), files)


if __name__ == "__main__":
    main()
