//! Issue 7: what can be checked of the container without a Docker engine (none runs on these
//! machines): the Dockerfile's promises, `healthcheck`, and `doctor` against moto.

use crate::common;

use std::process::Command;
use std::time::Duration;

fn dockerfile() -> String {
    std::fs::read_to_string(common::repo_root().join("Dockerfile")).unwrap()
}

/// Instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile().lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            out.push(current.trim().to_owned());
            current.clear();
        }
    }
    out
}

/// Reads the Dockerfile's text only: no Docker engine runs here, so nothing is built (issue 28:
/// the old name said "builds").
#[test]
fn the_dockerfile_text_declares_two_stages_a_node_22_runtime_and_no_port() {
    let lines = instructions();
    let from: Vec<&String> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "multi-stage: {from:?}");
    assert!(from[0].contains("rust:") && from[0].contains(" AS build"));
    assert!(
        from[1].starts_with("FROM node:22"),
        "Node 22 LTS runtime: {}",
        from[1]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("RUN cargo build --release --locked"))
    );
    let installs = lines
        .iter()
        .find(|l| l.contains("apt-get install"))
        .unwrap();
    for pkg in ["git", "ca-certificates", "tini", "bubblewrap"] {
        assert!(
            installs.split_whitespace().any(|w| w == pkg),
            "{pkg} not installed"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("npm install -g") && l.contains("@anthropic-ai/claude-code@"))
    );
    assert!(
        lines.iter().any(
            |l| l.starts_with("COPY --from=build") && l.ends_with("/usr/local/bin/edit-worker")
        )
    );
    // The worker runs as root to run each tenant's code as a uid of its own (the sandbox): no
    // USER that would take that away.
    let user = lines.iter().rev().find(|l| l.starts_with("USER "));
    assert!(user.is_none_or(|u| u.as_str() == "USER root"), "{user:?}");
    assert!(!lines.iter().any(|l| l.starts_with("EXPOSE")), "no port");
    let health = lines
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    assert!(
        health.contains("edit-worker") && health.contains("healthcheck"),
        "{health}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains("edit-worker"))
    );
    assert_eq!(lines.last().unwrap(), "CMD [\"run\"]");
    let env = lines.iter().find(|l| l.starts_with("ENV ")).unwrap();
    for var in [
        "WORKSPACE_ROOT=/workspace",
        "HEALTH_FILE=",
        "DISABLE_AUTOUPDATER=1",
    ] {
        assert!(env.contains(var), "{var} not set: {env}");
    }
    // Every file the build stage copies exists.
    for line in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            assert!(
                common::repo_root().join(src).exists(),
                "COPY {src}: missing"
            );
        }
    }
}

#[test]
fn healthcheck_passes_only_for_a_fresh_health_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("health");
    let check = |max_age: &str| {
        Command::new(env!("CARGO_BIN_EXE_edit-worker"))
            .args([
                "healthcheck",
                "--file",
                file.to_str().unwrap(),
                "--max-age",
                max_age,
            ])
            .env_remove("HEALTH_FILE")
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(check("60"), Some(1), "missing file");
    std::fs::write(&file, "ok").unwrap();
    assert_eq!(check("60"), Some(0));
    common::age_file(&file, Duration::from_secs(300));
    assert_eq!(check("60"), Some(1), "stale file");
}

/// The intake touches the health file on every turn of its loop (at least once per long poll,
/// 10 s), so a running worker's file keeps getting newer: the test waits for a second touch
/// after the first, and `healthcheck` then passes on it (issue 28: only the first touch was
/// checked, which a worker that touched once and then hung would pass).
#[tokio::test(flavor = "multi_thread")]
async fn a_running_worker_keeps_its_health_file_fresh() {
    let mut env = common::TestEnv::new("health").await;
    let file = env.dir.path().join("health");
    env.start_worker(&[("HEALTH_FILE", file.to_str().unwrap())]);
    let modified = |file: &std::path::Path| std::fs::metadata(file).and_then(|m| m.modified()).ok();
    // Many long polls: a turn of the loop is a 10 s long poll at most, and the worker
    // may start slowly on a busy machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut first = None;
    let mut touched_again = false;
    while std::time::Instant::now() < deadline {
        match (first, modified(&file)) {
            (None, Some(at)) => first = Some(at),
            (Some(before), Some(at)) if at > before => {
                touched_again = true;
                break;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(first.is_some(), "the health file was never written");
    assert!(
        touched_again,
        "the health file was touched once and never again"
    );
    let check = Command::new(env!("CARGO_BIN_EXE_edit-worker"))
        .args([
            "healthcheck",
            "--file",
            file.to_str().unwrap(),
            "--max-age",
            "60",
        ])
        .env_remove("HEALTH_FILE")
        .status()
        .unwrap();
    assert_eq!(check.code(), Some(0));
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_passes_a_good_setup_and_names_what_is_wrong() {
    let env = common::TestEnv::new("doctor").await;
    env.create_bucket(&env.bucket("quin", "site")).await;
    env.create_upstream("quin", "site", common::Site::Tiny);
    let doctor = |extra: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_edit-worker"))
            .args(["doctor", "--client", "quin", "--project", "site"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .envs(env.worker_env())
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = doctor(&[]);
    assert_eq!(code, Some(0), "{text}");
    for check in [
        "input queue",
        "status queue",
        "dead-letter queue",
        "workspace root",
        "git",
        "npm",
        "agent",
        "bucket",
        "git remote",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("PASS") && l.contains(check)),
            "{check}:\n{text}"
        );
    }
    assert!(
        text.contains("2.1.0 (edit-worker stand-in)"),
        "agent version shown:\n{text}"
    );

    let missing_queue = format!("{}-missing", env.input);
    let (code, text) = doctor(&[
        ("INPUT_QUEUE_URL", missing_queue.as_str()),
        ("CLAUDE_BIN", "/nonexistent/claude"),
        ("BUCKET_TEMPLATE", "no-such-bucket-{clientId}"),
    ]);
    assert_eq!(code, Some(1), "{text}");
    for check in ["input queue", "agent", "bucket"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("FAIL") && l.contains(check)),
            "{check}:\n{text}"
        );
    }
    let (code, text) = doctor(&[("MAX_IN_FLIGHT", "lots")]);
    assert_eq!(code, Some(2), "{text}");

    // Issue 12: without a lease store doctor says the worker assumes it is alone; with one,
    // it proves the store's conditional writes and the notice queue permission.
    let (_, text) = doctor(&[]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("PASS") && l.contains("lease store") && l.contains("alone")),
        "{text}"
    );
    let leases = format!("leases-{}", env.name).to_lowercase();
    env.create_bucket(&leases).await;
    let store = format!("s3://{leases}/shared");
    let (code, text) = doctor(&[("LEASE_STORE", store.as_str()), ("WORKER_ID", "doc-1")]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("PASS")
            && l.contains("lease store")
            && l.contains("conditional writes enforced")
            && l.contains("notice queues can be created")),
        "{text}"
    );
    let (code, text) = doctor(&[("LEASE_STORE", "s3://no-such-lease-bucket-x/p")]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("lease store")),
        "{text}"
    );

    // Issue 13: doctor names the isolation in force, or the explicit opt-out (these tests run
    // the worker with ISOLATION=none).
    let isolation = |text: &str| {
        text.lines()
            .find(|l| l.contains("isolation:"))
            .unwrap_or_default()
            .to_owned()
    };
    let (_, text) = doctor(&[]);
    assert!(
        isolation(&text).starts_with("PASS  isolation: none (ISOLATION=none)"),
        "{text}"
    );
    let (code, text) = doctor(&[("ISOLATION", "users+namespaces")]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        isolation(&text).starts_with("PASS  isolation: users+namespaces (limits: 512 processes"),
        "{text}"
    );
    let (code, text) = doctor(&[("ISOLATION", "chroot")]);
    assert_eq!(code, Some(2), "{text}");
}
