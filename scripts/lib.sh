# Shared by scripts/test, scripts/demo and the benchmarks: install what they need into the
# project (a local Python venv for moto, the pinned Claude Code CLI) and start moto on loopback.

MOTO_VERSION="5.2.5"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

# The real Claude Code CLI, pinned in one place (tools/claude-code.version, which the
# Dockerfile reads too), installed into the project: .tools/claude-code/node_modules/.bin/claude.
CLAUDE_CODE_VERSION="$(tr -d '[:space:]' <"$ROOT/tools/claude-code.version")"
CLAUDE_CODE_DIR="$ROOT/.tools/claude-code"
CLAUDE_CODE_BIN="$CLAUDE_CODE_DIR/node_modules/.bin/claude"

log() { printf '==> %s\n' "$*" >&2; }

# moto in server mode, in a project-local venv (nothing installed system-wide).
ensure_moto() {
  if [ ! -x "$VENV/bin/moto_server" ] || ! "$VENV/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
    log "installing moto[server]==$MOTO_VERSION into .venv"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  fi
}

# The pinned CLI, unless it is there already (then this costs one `claude --version`). The npm
# package brings a native binary through an optional platform package and its install script
# puts it in place; without that script it is a stub that exits 1, so the script is run by hand
# when npm did not. Needs only node and npm (the CLI's own engines field asks for a newer node
# than the binary needs: npm only warns).
claude_cli_ok() {
  [ -x "$CLAUDE_CODE_BIN" ] && [ "$("$CLAUDE_CODE_BIN" --version 2>/dev/null | awk '{print $1}')" = "$CLAUDE_CODE_VERSION" ]
}

ensure_claude_cli() {
  if claude_cli_ok; then
    return 0
  fi
  log "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION into .tools/claude-code"
  mkdir -p "$CLAUDE_CODE_DIR"
  # The folder ignores itself: nothing under .tools is ever committed.
  printf '*\n' >"$ROOT/.tools/.gitignore"
  printf '{"private": true, "dependencies": {"@anthropic-ai/claude-code": "%s"}}\n' \
    "$CLAUDE_CODE_VERSION" >"$CLAUDE_CODE_DIR/package.json"
  rm -f "$CLAUDE_CODE_DIR/package-lock.json"
  (cd "$CLAUDE_CODE_DIR" && npm install --no-audit --no-fund --loglevel=error \
    --include=optional --ignore-scripts=false >&2)
  if ! claude_cli_ok; then
    log "running the CLI's install script by hand"
    (cd "$CLAUDE_CODE_DIR/node_modules/@anthropic-ai/claude-code" && node install.cjs >&2) || true
  fi
  if ! claude_cli_ok; then
    log "the Claude Code CLI $CLAUDE_CODE_VERSION did not install: $("$CLAUDE_CODE_BIN" --version 2>&1 | head -3)"
    return 1
  fi
  log "claude $CLAUDE_CODE_VERSION at $CLAUDE_CODE_BIN"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Start moto on 127.0.0.1; sets MOTO_PID and MOTO_ENDPOINT. The caller traps stop_moto.
start_moto() {
  local port
  port="$(free_port)"
  # tools/moto-server: moto_server with conditional PUTs made atomic, as on S3 (see there).
  "$VENV/bin/python" "$ROOT/tools/moto-server" -H 127.0.0.1 -p "$port" >"${MOTO_LOG:-/dev/null}" 2>&1 &
  MOTO_PID=$!
  MOTO_ENDPOINT="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('$MOTO_ENDPOINT/moto-api/', timeout=1)" 2>/dev/null; then
      log "moto listening on $MOTO_ENDPOINT"
      return 0
    fi
    if ! kill -0 "$MOTO_PID" 2>/dev/null; then
      log "moto exited early"; return 1
    fi
    sleep 0.2
  done
  log "moto did not start"; return 1
}

stop_moto() {
  if [ -n "${MOTO_PID:-}" ]; then
    kill "$MOTO_PID" 2>/dev/null || true
    wait "$MOTO_PID" 2>/dev/null || true
  fi
}

# bubblewrap (Debian's package) for the tenant sandbox's namespaces. Installed when missing and
# the scripts run as root on Debian; elsewhere the worker detects what it has and says so.
ensure_bubblewrap() {
  command -v bwrap >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing bubblewrap (Debian package) for the tenant sandbox"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1; then
      apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
    fi
  else
    log "bubblewrap is missing and cannot be installed here (not root, or no apt-get)"
  fi
}

# Chromium (Debian's package) for the browser check after each publish, and its tests. Installed
# when missing and the scripts run as root on Debian; elsewhere the worker's BROWSER_CHECK=auto
# says it found none, and `doctor` too. Never downloaded by the worker at run time. With
# fonts-liberation (only recommended by the package): without a font, pages render no text.
ensure_chromium() {
  if [ -n "${CHROME_BIN:-}" ] || command -v chromium >/dev/null 2>&1; then
    report_chromium_version
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium (Debian package) for the browser check"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null 2>&1; then
      apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
    fi
    report_chromium_version
  else
    log "chromium is missing and cannot be installed here (not root, or no apt-get); publishes go unchecked"
  fi
}

# Which Chromium runs, beside the major version the tests are pinned to (tools/chromium.version,
# a floor: Debian's security updates replace the package). An older one is only a warning here;
# the browser test fails on it.
report_chromium_version() {
  local bin version major tested
  bin="${CHROME_BIN:-chromium}"
  version="$("$bin" --version 2>/dev/null | head -1)" || true
  major="$(sed -E 's/^[^0-9]*([0-9]+).*/\1/' <<<"$version")"
  tested="$(tr -d '[:space:]' <"$ROOT/tools/chromium.version")"
  if [ -n "$major" ] && [ "$major" -ge "$tested" ] 2>/dev/null; then
    log "browser: $version (the tests are pinned to $tested or newer)"
  else
    log "browser: '$version' is older than the Chromium $tested the tests are pinned to; the browser tests will fail"
  fi
}

require() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing required tool: $tool"; exit 2; }
  done
}

# One busy loop per core (STRESS=1 scripts/test): plain shell loops, no package needed, started in
# their own process group so that stop_cpu_hogs ends every one of them.
start_cpu_hogs() {
  local cores
  cores="$(nproc)"
  log "STRESS=1: a CPU hog on each of the $cores cores beside the tests"
  CPU_HOGS_PGID=""
  set -m
  ( trap 'exit 0' TERM; for _ in $(seq 1 "$cores"); do (while :; do :; done) & done; wait ) &
  CPU_HOGS_PGID=$!
  set +m
}

stop_cpu_hogs() {
  if [ -n "${CPU_HOGS_PGID:-}" ]; then
    kill -TERM -- "-$CPU_HOGS_PGID" 2>/dev/null || true
    CPU_HOGS_PGID=""
  fi
}

# What a first run on a fresh machine does once, done before the tests (issue 30) so that no
# test's limit has to cover it: the Claude Code CLI's first headless turn (its ~200 MB binary
# read from disk, its first configuration written) against the scripted API on loopback, in a
# throwaway folder and HOME. It prints how long that took; a failure here is only a warning,
# since the real-CLI tests then say what is wrong.
warm_up_claude_cli() {
  local dir url api_pid started
  dir="$(mktemp -d)"
  mkdir -p "$dir/home" "$dir/work"
  "$ROOT/tools/fake-anthropic-api" --log "$dir/requests.jsonl" >"$dir/url" 2>"$dir/api.err" &
  api_pid=$!
  for _ in $(seq 1 100); do
    [ -s "$dir/url" ] && break
    sleep 0.1
  done
  url="$(head -1 "$dir/url")"
  started="$(date +%s%N)"
  if (cd "$dir/work" && HOME="$dir/home" ANTHROPIC_BASE_URL="$url" \
      ANTHROPIC_API_KEY=sk-ant-warm-up-not-a-key CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
      DISABLE_AUTOUPDATER=1 timeout 300 "$CLAUDE_CODE_BIN" -p --output-format json "warm up" \
      </dev/null >"$dir/out" 2>&1); then
    log "warm-up: the CLI's first headless turn took $(( ($(date +%s%N) - started) / 1000000 )) ms"
  else
    log "warm-up: the CLI's first headless turn failed: $(head -c 300 "$dir/out")"
  fi
  kill "$api_pid" 2>/dev/null || true
  wait "$api_pid" 2>/dev/null || true
  rm -rf "$dir"
}
