# edit-worker: one container serving many clients' Astro sites.
#
# Stage 1 builds the worker; stage 2 is the runtime: Node 22 LTS (Astro 6+ needs Node >= 22.12),
# git, the Claude Code CLI, and the worker binary. No port is exposed: the worker only talks out
# (SQS, S3, the git remote, the model's API).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY actors ./actors
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --bin edit-worker

FROM node:22-bookworm-slim AS runtime
# git for the workspaces, ca-certificates for TLS, tini as PID 1: it forwards SIGTERM to the
# worker and reaps the processes the agent and the builds leave behind.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates tini openssh-client \
 && rm -rf /var/lib/apt/lists/*
# The Claude Code CLI, pinned in tools/claude-code.version (the version the tests run, see
# scripts/lib.sh); with its install script, which puts the native binary in place (without it
# the CLI is a stub that exits 1).
COPY tools/claude-code.version /tmp/claude-code.version
RUN npm install -g "@anthropic-ai/claude-code@$(tr -d '[:space:]' </tmp/claude-code.version)" \
 && claude --version \
 && npm cache clean --force && rm /tmp/claude-code.version
COPY --from=build /src/target/release/edit-worker /usr/local/bin/edit-worker

# Not root: Claude Code refuses --dangerously-skip-permissions as root, and nothing here needs it.
RUN useradd --create-home --uid 10001 worker \
 && mkdir -p /workspace && chown worker:worker /workspace
USER worker
WORKDIR /home/worker

# /workspace holds the client checkouts and, under /workspace/.agent, the thread map and the
# agent's session files: mount persistent storage (EFS on ECS) here so resumes survive restarts.
VOLUME ["/workspace"]
ENV WORKSPACE_ROOT=/workspace \
    HEALTH_FILE=/tmp/edit-worker.health \
    DISABLE_AUTOUPDATER=1 \
    ASTRO_TELEMETRY_DISABLED=1 \
    LOG_FORMAT=json \
    RUST_LOG=info

# No port: health is the age of the file the intake loop touches on every turn (at most 10 s).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["edit-worker", "healthcheck", "--max-age", "90"]

ENTRYPOINT ["/usr/bin/tini", "--", "edit-worker"]
CMD ["run"]
