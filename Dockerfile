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
# worker and reaps the processes the agent and the builds leave behind. bubblewrap gives each
# tenant's run its own namespaces where the host allows user namespaces (ECS on EC2 with a
# seccomp profile that allows them); elsewhere (Fargate) the worker detects that and isolates
# by separate users alone. chromium (Debian's package: nothing is downloaded at run time) is
# the browser that checks each publish (BROWSER_CHECK); fonts-liberation gives its
# screenshots the common web fonts' metrics. Its major version is at least the one the tests
# run against (tools/chromium.version: Debian's security updates replace the package, so it
# is a floor, not one build).
COPY tools/chromium.version /tmp/chromium.version
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates tini openssh-client bubblewrap \
      chromium fonts-liberation \
 && chromium --version \
 && [ "$(chromium --version | sed -E 's/^[^0-9]*([0-9]+).*/\1/')" -ge "$(tr -d '[:space:]' </tmp/chromium.version)" ] \
 && rm -rf /var/lib/apt/lists/* /tmp/chromium.version
# The Claude Code CLI, pinned in tools/claude-code.version (the version the tests run, see
# scripts/lib.sh); with its install script, which puts the native binary in place (without it
# the CLI is a stub that exits 1).
COPY tools/claude-code.version /tmp/claude-code.version
RUN npm install -g "@anthropic-ai/claude-code@$(tr -d '[:space:]' </tmp/claude-code.version)" \
 && claude --version \
 && npm cache clean --force && rm /tmp/claude-code.version
COPY --from=build /src/target/release/edit-worker /usr/local/bin/edit-worker

# The worker runs as root so that it can run each workspace's agent, installs and builds as a
# uid of that workspace's own (ISOLATION, README "Tenants"): none of that code ever runs as
# root or as the worker. What root needs of its capabilities: SETUID, SETGID (switching to a
# tenant), CHOWN, FOWNER (handing a checkout to its tenant), DAC_OVERRIDE (reading what
# tenants wrote), KILL (ending what they leave behind); the ECS notes drop the rest.
RUN mkdir -p /workspace && chmod 0711 /workspace
WORKDIR /workspace

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
