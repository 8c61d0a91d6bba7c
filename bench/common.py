"""Shared by the benchmarks (issues 28, 29): moto clients, env knobs, percentiles and medians,
git and upstream repositories, starting the worker, and an OTLP/HTTP receiver for what the
worker itself exports.

Benchmarks read the worker's figures from its telemetry (metrics, and the structured attributes
of its spans' events), never from its log text: a log line that moves or changes its wording
cannot break them, and a figure a benchmark needs that the worker does not export yet is added
as a metric in `actors/src/telemetry/metrics.rs`.
"""

import gzip
import http.server
import math
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# moto, started by `scripts/bench` (empty for a driver that starts its own).
ENDPOINT = os.environ.get("MOTO_ENDPOINT", "")
AWS_ENV = {"AWS_ENDPOINT_URL": ENDPOINT, "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
KW = dict(endpoint_url=ENDPOINT, region_name="us-east-1", aws_access_key_id="testing",
          aws_secret_access_key="testing")


def aws_clients():
    """boto3 SQS and S3 clients for moto."""
    import boto3
    return boto3.client("sqs", **KW), boto3.client("s3", **KW)


def env_num(name, default, kind=float):
    """A numeric knob from the environment (`kind` of it), or `default`."""
    return kind(os.environ.get(name, default))


def env_list(name, default):
    """A comma-separated knob from the environment, empty items dropped."""
    return [s for s in os.environ.get(name, default).split(",") if s]


def worker_bin(default=None):
    """The worker build a driver runs: `WORKER_BIN` (which `scripts/bench` sets, building the
    release one unless it was given), else `default` under the repository."""
    if default is None:
        return os.environ["WORKER_BIN"]
    return os.environ.get("WORKER_BIN", os.path.join(ROOT, default))


def pct(values, p):
    """Nearest-rank percentile: an observed value, never an interpolation; None of nothing."""
    s = sorted(values)
    if not s:
        return None
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def median(values):
    return statistics.median(values)


GIT_ENV = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"}


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, **GIT_ENV})


def git_out(cwd, *args, check=True):
    """`git args` in `cwd`: its output (None when it failed and `check` is false; a failure
    raises RuntimeError with git's message when `check` is true)."""
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **GIT_ENV})
    if check and out.returncode != 0:
        raise RuntimeError(f"git {args}: {out.stderr}")
    return out.stdout if out.returncode == 0 else None


def worker_env(**settings):
    """The environment of a worker run by a benchmark: the PATH and HOME it needs, moto's
    endpoint and test credentials, the log filter the drivers use, npm's cache when one is set,
    then `settings` (strings; they win)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
           **AWS_ENV,
           "RUST_LOG": "info,aws=warn,aws_smithy_runtime=warn,aws_config=warn,hyper=warn"}
    if "npm_config_cache" in os.environ:
        env["npm_config_cache"] = os.environ["npm_config_cache"]
    env.update(settings)
    return env


def start_worker(binary, env, log_path, args=("run",)):
    """Start `binary run` with `env`, its log (stderr) to `log_path`: the process."""
    return subprocess.Popen([binary, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log_path, "w"))


def stop_worker(proc, timeout=60):
    """SIGTERM, then SIGKILL after `timeout` s: its exit code (its telemetry is flushed on a
    SIGTERM stop, not after a kill)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def seed_repo(base, fixture):
    """A bare repository of tests/fixtures/<fixture> under `base`, made once; returns its path."""
    bare = os.path.join(base, f"seed-{fixture}.git")
    if os.path.isdir(bare):
        return bare
    work = os.path.join(base, f"seed-{fixture}")
    shutil.copytree(os.path.join(ROOT, "tests/fixtures", fixture), work,
                    ignore=shutil.ignore_patterns("node_modules", "dist", ".astro"))
    git(work, "init", "--quiet", "--initial-branch=main")
    git(work, "add", "-A")
    git(work, "commit", "--quiet", "-m", "init")
    git(base, "init", "--quiet", "--bare", "--initial-branch=main", bare)
    git(work, "push", "--quiet", bare, "main")
    shutil.rmtree(work)
    return bare


def commit_of_tree():
    """The commit the benchmark runs from, with `+dirty` when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=9", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        # The results file `scripts/bench all` is writing does not count.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Otlp:
    """An OTLP/HTTP (protobuf) receiver on loopback, as tests/suite/common.rs has one: give a
    worker `env()` and read what it exported. Metrics are cumulative (the SDK's default), so the
    newest collection holds the totals; the worker flushes a last one when it stops."""

    def __init__(self):
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        self._lock = threading.Lock()
        # (collected at, {(name, frozenset(attributes)): value}) per export.
        self._metrics = []
        # (span name, event name, {attribute: value}) of every span event received.
        self._events = []
        # Every span received: {"name", "start_ns", "attributes", "events": [(name, attrs)]}.
        self._spans = []
        self.refused = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                try:
                    if self.path == "/v1/metrics":
                        req = metrics_service_pb2.ExportMetricsServiceRequest()
                        req.ParseFromString(body)
                        outer._take_metrics(req)
                    elif self.path == "/v1/traces":
                        req = trace_service_pb2.ExportTraceServiceRequest()
                        req.ParseFromString(body)
                        outer._take_spans(req)
                except Exception as e:  # a request we cannot read is kept for the report
                    with outer._lock:
                        outer.refused.append(f"{self.path}: {e}")
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self, traces=True):
        """The settings that make a worker export here: metrics every 500 ms and, with
        `traces`, ended spans within 200 ms, with a span queue large enough that a busy run
        drops none (a dropped span would lose a sample; the benchmarks check their sample
        counts against the metrics). Without `traces` only metrics are exported (the
        signal's own endpoint variable, taken as the whole URL)."""
        common = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                  "OTEL_METRIC_EXPORT_INTERVAL": "500"}
        if not traces:
            return {**common, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": self.url + "/v1/metrics"}
        return {**common, "OTEL_EXPORTER_OTLP_ENDPOINT": self.url,
                "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_BSP_MAX_QUEUE_SIZE": "200000"}

    def stop(self):
        self._server.shutdown()

    @staticmethod
    def _text(v):
        """An attribute value as the worker wrote it: booleans as `true`/`false`."""
        return ("true" if v else "false") if isinstance(v, bool) else str(v)

    @staticmethod
    def _attrs(kvs):
        out = {}
        for kv in kvs:
            v = kv.value
            kind = v.WhichOneof("value")
            out[kv.key] = getattr(v, kind) if kind else None
        return out

    def _take_metrics(self, req):
        points = {}
        collected = 0
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    data = getattr(m, kind)
                    for p in data.data_points:
                        collected = max(collected, p.time_unix_nano)
                        attrs = frozenset((k, self._text(v)) for k, v in self._attrs(p.attributes).items())
                        if kind == "histogram":
                            value = {"count": p.count, "sum": p.sum,
                                     "min": p.min if p.HasField("min") else None,
                                     "max": p.max if p.HasField("max") else None,
                                     "bounds": list(p.explicit_bounds),
                                     "buckets": list(p.bucket_counts)}
                        else:
                            value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        points[(m.name, attrs)] = value
        with self._lock:
            self._metrics.append((collected, points))

    def _take_spans(self, req):
        events, spans = [], []
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    own = [(ev.name, self._attrs(ev.attributes)) for ev in span.events]
                    events.extend((span.name, name, attrs) for name, attrs in own)
                    spans.append({"name": span.name, "start_ns": span.start_time_unix_nano,
                                  "attributes": self._attrs(span.attributes), "events": own})
        with self._lock:
            self._events.extend(events)
            self._spans.extend(spans)

    def latest(self):
        """The newest collection of metrics: {(name, attributes): value}."""
        with self._lock:
            if not self._metrics:
                return {}
            return max(self._metrics, key=lambda m: m[0])[1]

    def value(self, name, **attrs):
        """Counter, up-down counter or gauge `name` over its points carrying `attrs`, added up."""
        want = {(k, self._text(v)) for k, v in attrs.items()}
        return sum(v for (n, a), v in self.latest().items() if n == name and want <= a)

    def histogram(self, name, **attrs):
        """Histogram `name` over its points carrying `attrs`, merged: count, sum, min, max."""
        want = {(k, self._text(v)) for k, v in attrs.items()}
        out = {"count": 0, "sum": 0.0, "min": None, "max": None}
        for (n, a), v in self.latest().items():
            if n == name and want <= a:
                out["count"] += v["count"]
                out["sum"] += v["sum"]
                for k, f in (("min", min), ("max", max)):
                    if v[k] is not None:
                        out[k] = v[k] if out[k] is None else f(out[k], v[k])
        return out

    def event_values(self, key, **attrs):
        """The values of attribute `key` over every span event that carries it (and `attrs`):
        one sample per event, in the order received. A span event is one of the worker's
        tracing events with its fields as attributes, found by field, not by wording."""
        want = {k: self._text(v) for k, v in attrs.items()}
        with self._lock:
            return [a[key] for _, _, a in self._events
                    if key in a and all(self._text(a.get(k)) == v for k, v in want.items())]

    def spans(self, *names):
        """The spans received so far (named one of `names`, when given), in the order received.
        A span comes within `OTEL_BSP_SCHEDULE_DELAY` of its end (200 ms with `env()`), and at
        the latest when the worker stops on SIGTERM; of a worker killed with SIGKILL, what it
        ended in its last moments may be missing."""
        with self._lock:
            return [sp for sp in self._spans if not names or sp["name"] in names]

    def span_events(self, key):
        """Every span event that carries attribute `key`, each as its attributes over its
        span's (`edit.client_id` of the message's span, say): found by field, not by wording."""
        with self._lock:
            return [{**sp["attributes"], **attrs} for sp in self._spans
                    for _, attrs in sp["events"] if key in attrs]

    def values_by(self, name, key, **attrs):
        """Counter `name` over its points carrying `attrs`, added up by the value of attribute
        `key`: {value: total}."""
        want = {(k, self._text(v)) for k, v in attrs.items()}
        out = {}
        for (n, a), v in self.latest().items():
            if n == name and want <= a:
                by = dict(a).get(key)
                out[by] = out.get(by, 0) + v
        return out

    def wait(self, what, done, timeout=60):
        """Wait until `done(self)` holds; fail with `what` after `timeout` seconds."""
        deadline = time.time() + timeout
        while not done(self):
            if time.time() > deadline:
                raise SystemExit(f"no {what} within {timeout} s (refused: {self.refused[:3]})")
            time.sleep(0.1)
