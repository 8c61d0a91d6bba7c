//! Issue 13, tenants in one container: a hostile site whose install script, build script and
//! agent each try to read the worker's secrets, read and write a neighbour's checkout and
//! conversation, plant git hooks, fork-bomb, allocate 4 GiB, write 10 GiB and leave a process
//! behind. With the sandbox every attempt fails, the neighbour's messages complete meanwhile
//! and the worker stays up; without it (`ISOLATION=none`) the same script succeeds, which is
//! what shows these checks can fail. Real parts: moto, git, bubblewrap, the worker binary, the
//! stand-in agent (its `exec` runs the hostile script as the CLI's Bash tool would).

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::common::{Otlp, Site, TestEnv, is_terminal};
use serde_json::Value;

const SECRET: &str = "hostile-test-secret-value";

/// 1 for the isolation level the worker runs tenants' code at, by `level`.
const ISOLATION_LEVEL: &str = "edit_worker.isolation";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        common::repo_root()
            .join("tests/fixtures/hostile-site")
            .join(name),
    )
    .unwrap()
}

/// `good/site` (a plain site) and `evil/site`, whose thread `t-evil` carries the hostile
/// script, package.json and lock file (the install script makes it install in its workspace).
async fn two_tenants(env: &TestEnv) {
    for client in ["good", "evil"] {
        env.create_upstream(client, "site", Site::Tiny);
        env.create_bucket(&env.bucket(client, "site")).await;
    }
    let files = ["hostile.mjs", "package.json", "package-lock.json"].map(|f| (f, fixture(f)));
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    env.push_branch_with("evil", "site", "thread-t-evil", &files);
}

/// The neighbour's first message, to its end: it has a checkout and a conversation before the
/// hostile tenant arrives.
async fn neighbour_settles_in(env: &TestEnv) {
    let first = env
        .send(
            "good",
            "site",
            "t1",
            "Update the homepage title to \"Good 1\"",
        )
        .await;
    terminals(env, std::slice::from_ref(&first), Duration::from_secs(60)).await;
}

/// Terminal events for all of `ids`, by message id.
async fn terminals(env: &TestEnv, ids: &[String], timeout: Duration) -> BTreeMap<String, Value> {
    let mut found = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    while found.len() < ids.len() && Instant::now() < deadline {
        for event in env.drain(&env.output, 1).await {
            let id = event["messageId"].as_str().unwrap_or_default().to_owned();
            if is_terminal(&event) && ids.contains(&id) {
                found.insert(id, event);
            }
        }
    }
    assert_eq!(
        found.len(),
        ids.len(),
        "terminal events: {found:#?}\n{}",
        common::tail(&env.worker_log(), 60)
    );
    found
}

/// What the hostile script recorded in `phase` (agent, install, build).
fn attacks(env: &TestEnv, phase: &str) -> serde_json::Map<String, Value> {
    let path = env
        .workspace_root()
        .join("evil/site")
        .join(format!("attacks-{phase}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\n{}",
            path.display(),
            common::tail(&env.worker_log(), 60)
        )
    });
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_object()
        .unwrap()
        .clone()
}

/// Pids of processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// The command-line mark of what the hostile script leaves running in `phase`, unique to
/// this test's folder (tests run side by side).
fn leftover_marker(env: &TestEnv, phase: &str) -> String {
    format!("hostile-leftover-{phase}-{}", env.dir.path().display())
}

fn files_named_like(dir: &Path, needle: &str) -> Vec<String> {
    common::files_under(dir)
        .into_iter()
        .filter(|f| f.contains(needle))
        .collect()
}

const ATTEMPTS: &[&str] = &[
    "read-worker-environment",
    "read-other-checkout",
    "write-other-checkout",
    "read-other-conversations",
    "write-other-conversations",
    "read-worker-records",
    "plant-own-hook",
    "plant-own-git-config",
    "plant-other-hook",
];
const HEAVY: &[&str] = &["fork-bomb", "allocate-4-gib", "write-10-gib"];

async fn hostile_tenant_is_contained(isolation: &str) {
    let mut env = TestEnv::new(&format!("iso-{}", isolation.replace('+', "-"))).await;
    two_tenants(&env).await;
    let otlp = Otlp::start().await;
    let settings = [
        ("ISOLATION", isolation),
        ("HOSTILE_TEST_SECRET", SECRET),
        // Small limits, so that the heavy attempts end in seconds.
        ("SANDBOX_MAX_PROCESSES", "128"),
        ("SANDBOX_MAX_MEMORY_MB", "512"),
        ("SANDBOX_MAX_FILE_MB", "64"),
    ];
    env.start_worker(&[otlp.worker_env().as_slice(), &settings].concat());
    neighbour_settles_in(&env).await;

    let evil = env
        .send(
            "evil",
            "site",
            "t-evil",
            "[standin:exec node hostile.mjs agent] Update the homepage title to \"Evil\"",
        )
        .await;
    // Meanwhile the neighbour (one message: a second would interrupt the first).
    let good = vec![
        env.send(
            "good",
            "site",
            "t2",
            "Update the homepage title to \"Good 2\"",
        )
        .await,
    ];
    let mut all = good.clone();
    all.push(evil.clone());
    let ends = terminals(&env, &all, Duration::from_secs(120)).await;
    for id in &good {
        assert_eq!(ends[id]["type"], "completed", "{:#?}", ends[id]);
    }
    // The hostile site's own build goes on after its attempts: it completes too.
    assert_eq!(ends[&evil]["type"], "completed", "{:#?}", ends[&evil]);
    assert!(env.worker_running(), "the worker stopped");

    for phase in ["agent", "install", "build"] {
        let got = attacks(&env, phase);
        for name in ATTEMPTS.iter().chain(HEAVY) {
            let outcome = got
                .get(*name)
                .unwrap_or_else(|| panic!("{phase}: no {name} in {got:#?}"));
            assert_eq!(
                outcome["succeeded"], false,
                "{phase}: {name} succeeded: {got:#?}"
            );
        }
        // The limits, not a failure to try, stopped them.
        let started = got["fork-bomb-started"].as_u64().unwrap();
        assert!(
            started > 10 && started < 128,
            "{phase}: {started} processes"
        );
        assert_eq!(
            got.get("write-10-gib-bytes").and_then(Value::as_u64),
            Some(64 << 20),
            "{phase}: {got:#?}"
        );
        // Nothing the run started lives on after it.
        assert_eq!(got["left-a-process"], true, "{phase}: {got:#?}");
        assert_eq!(
            processes_with(&leftover_marker(&env, phase)),
            Vec::<u32>::new(),
            "{phase} left a process behind"
        );
    }
    let neighbour = env.workspace_root().join("good/site");
    assert_eq!(files_named_like(&neighbour, "pwned"), Vec::<String>::new());
    assert!(!neighbour.join(".git/hooks/pre-push").exists());
    let conversations = env.dir.path().join("claude");
    assert_eq!(
        files_named_like(&conversations, "pwned"),
        Vec::<String>::new()
    );
    assert_eq!(
        files_named_like(env.dir.path(), "hook-ran"),
        Vec::<String>::new()
    );
    // The neighbour's conversation is its own, in a folder of its own.
    assert!(
        !files_named_like(&conversations.join("workspaces/good/site"), ".jsonl").is_empty(),
        "{:?}",
        common::files_under(&conversations)
    );
    let site = env.bucket_contents(&env.bucket("good", "site")).await;
    let index = String::from_utf8_lossy(&site["index.html"].1).into_owned();
    assert!(index.contains("Good 2"), "{index}");
    // The level the worker runs at: set at start, in its metrics (a gauge of 1 for the level
    // in force, in every export), and no other level.
    let metrics = otlp
        .wait_for_metrics("the isolation level", Duration::from_secs(30), |m| {
            m.points(ISOLATION_LEVEL, &[]).next().is_some()
        })
        .await;
    assert_eq!(
        metrics.values_by(ISOLATION_LEVEL, &[], "level"),
        BTreeMap::from([(isolation.to_owned(), 1)]),
        "{metrics}"
    );
    assert_eq!(env.stop_worker(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_tenant_is_contained_by_users_and_namespaces() {
    hostile_tenant_is_contained("users+namespaces").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_tenant_is_contained_by_users_alone() {
    hostile_tenant_is_contained("users").await;
}

/// A tenant that fills the disk with many files, each under the file limit, is stopped at
/// `SANDBOX_MAX_DISK_MB`: its message fails, far short of the 10 GiB it set out to write, and
/// the neighbour's message completes meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_filling_the_disk_is_stopped_at_its_limit() {
    let mut env = TestEnv::new("iso-disk").await;
    two_tenants(&env).await;
    let otlp = Otlp::start().await;
    let settings = [
        ("ISOLATION", "users+namespaces"),
        ("SANDBOX_MAX_DISK_MB", "256"),
        ("SANDBOX_MAX_FILE_MB", "64"),
        // An agent that ends without a result is retried; once is enough here.
        ("MAX_RECEIVES", "1"),
    ];
    env.start_worker(&[otlp.worker_env().as_slice(), &settings].concat());
    let evil = env
        .send(
            "evil",
            "site",
            "t-evil",
            "[standin:exec node hostile.mjs fill]",
        )
        .await;
    let good = env
        .send(
            "good",
            "site",
            "t1",
            "Update the homepage title to \"Good 1\"",
        )
        .await;
    let ends = terminals(
        &env,
        &[evil.clone(), good.clone()],
        Duration::from_secs(120),
    )
    .await;
    let ends_seen = SystemTime::now();
    assert_eq!(ends[&good]["type"], "completed", "{:#?}", ends[&good]);
    assert_eq!(ends[&evil]["type"], "failed", "{:#?}", ends[&evil]);
    let home = env.workspace_root().join(".sandbox/home/evil/site");
    let written: u64 = std::fs::read_dir(&home)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fill-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    // At 256 MiB or past it (the limit counts every file of the uid, these are 32 MiB each),
    // and stopped within a check or two.
    assert!(
        ((256 << 20)..(2 << 30)).contains(&written),
        "{written} bytes written"
    );
    // What stopped it: its message fails like any agent that ends without a result; the
    // worker counts the runs it killed at the disk limit (before their messages ended): this
    // one, once.
    let metrics = otlp.metrics_since(ends_seen, Duration::from_secs(30)).await;
    assert_eq!(
        metrics.value("edit_worker.sandbox.disk_limit_stops", &[]),
        1,
        "{metrics}"
    );
    assert!(env.worker_running());
    assert_eq!(env.stop_worker(), Some(0));
}

/// The agent's program may live under /tmp (a checkout of this project there, as CI makes):
/// the sandbox's private /tmp must not hide it.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_under_tmp_still_runs_in_the_sandbox() {
    let mut env = TestEnv::new("iso-tmp-agent").await;
    two_tenants(&env).await;
    let bin = env.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let agent = bin.join("claude-standin");
    std::fs::copy(common::standin(), &agent).unwrap();
    assert!(agent.starts_with("/tmp"), "{}", agent.display());
    let agent = agent.display().to_string();
    env.start_worker(&[("ISOLATION", "users+namespaces"), ("CLAUDE_BIN", &agent)]);
    let id = env
        .send(
            "good",
            "site",
            "t1",
            "Update the homepage title to \"Under tmp\"",
        )
        .await;
    let ends = terminals(&env, std::slice::from_ref(&id), Duration::from_secs(60)).await;
    assert_eq!(ends[&id]["type"], "completed", "{:#?}", ends[&id]);
    assert_eq!(env.stop_worker(), Some(0));
}

/// The control: without isolation the same script reads the worker's secrets, reads and
/// writes the neighbour's checkout and plants hooks. (The heavy attempts are skipped: no limit
/// would stop them.)
#[tokio::test(flavor = "multi_thread")]
async fn without_isolation_the_hostile_tenant_gets_through() {
    let mut env = TestEnv::new("iso-none").await;
    two_tenants(&env).await;
    env.start_worker(&[("ISOLATION", "none"), ("HOSTILE_TEST_SECRET", SECRET)]);
    neighbour_settles_in(&env).await;
    let evil = env
        .send(
            "evil",
            "site",
            "t-evil",
            "[standin:write light 1] [standin:exec node hostile.mjs agent]",
        )
        .await;
    terminals(&env, std::slice::from_ref(&evil), Duration::from_secs(60)).await;
    let got = attacks(&env, "agent");
    for name in [
        "read-worker-environment",
        "read-other-checkout",
        "write-other-checkout",
        "read-other-conversations",
        "plant-own-hook",
        "plant-other-hook",
    ] {
        assert_eq!(got[name]["succeeded"], true, "{name}: {got:#?}");
    }
    // What the agent left running outlives its run.
    assert_eq!(got["left-a-process"], true);
    assert!(!processes_with(&leftover_marker(&env, "agent")).is_empty());
    // The contract: turning isolation off is logged.
    assert!(
        env.log_lines()
            .iter()
            .any(|l| common::log_message(l).starts_with("ISOLATION=none: every tenant's agent")),
        "{}",
        common::tail(&env.worker_log(), 20)
    );
    env.stop_worker();
    for pid in processes_with(&leftover_marker(&env, "agent")) {
        let _ = common::nix_kill(pid, "KILL");
    }
}
