//! Issue 15: one install per lock file, not per workspace. Two workspaces of one lock file
//! install once and both publish; a changed lock file installs again; a half-written or
//! changed store entry is never used; a build cannot change what another site's build loads.
//!
//! The sites have one small real dependency (`Site::WithDependency`: a real `npm ci` from the
//! registry, into the real store, and a build that loads it), not Astro, whose install would
//! take most of a minute per entry here; `build_ahead.rs` builds the real Astro from the store.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::common::{MetricsSnapshot, Otlp, Site, TestEnv, event_of, make_removable};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(360);
/// The worker's count of installs into the shared store (the events say which message's build
/// installed; the store's own count is in the worker's metrics).
const INSTALLS: &str = "edit_worker.store.installs";

fn store_dir(env: &TestEnv) -> PathBuf {
    env.workspace_root().join(".cache/npm-store")
}

/// The dependency the sites load from the store.
const DEPENDENCY: &str = "html-escaper";

fn fixture_lock() -> Vec<u8> {
    std::fs::read(common::repo_root().join("tests/fixtures/dependency-site/package-lock.json"))
        .unwrap()
}

/// The store's complete entries (folders with their completion marker).
fn complete_entries(store: &Path) -> Vec<String> {
    let mut keys: Vec<String> = std::fs::read_dir(store)
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter(|e| e.path().join(".complete").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    keys
}

fn installed(event: &Value) -> bool {
    event["durationsMs"]["install"].is_u64()
}

async fn live_title(env: &TestEnv, client: &str) -> String {
    let contents = env.bucket_contents(&env.bucket(client, "site")).await;
    let (_, body) = contents
        .get("index.html")
        .unwrap_or_else(|| panic!("no index.html in {client}'s bucket: {:?}", contents.keys()));
    let html = String::from_utf8_lossy(body);
    let start = html.find("<title>").expect("a title") + "<title>".len();
    let end = html[start..].find("</title>").unwrap() + start;
    html[start..end].to_owned()
}

async fn world(name: &str, clients: &[&str]) -> TestEnv {
    let env = TestEnv::new(name).await;
    for client in clients {
        env.create_site(client, "site", Site::WithDependency).await;
    }
    env
}

/// The store's installs up to now, and the metrics that say it. Asked after a message's end was
/// seen: every install comes before its message's build and end, so a collection made after
/// this call counts them all.
async fn installs_so_far(otlp: &Otlp) -> (i64, MetricsSnapshot) {
    let metrics = otlp.metrics_since(SystemTime::now(), WAIT).await;
    (metrics.value(INSTALLS, &[]), metrics)
}

async fn completed(env: &TestEnv, id: &str) -> Value {
    let events = env.wait_for(id, "completed", WAIT).await;
    event_of(&events, id, "completed").clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn workspaces_of_one_lock_file_install_once_and_a_changed_lock_file_again() {
    let mut env = world("shared-install", &["alpha", "beta"]).await;
    let otlp = Otlp::start().await;
    env.start_worker(&[otlp.worker_env().as_slice(), &[("BUILD_CONCURRENCY", "2")]].concat());

    // Two fresh workspaces of one lock file at once: one install, the other waits for it.
    let a1 = env
        .send(
            "alpha",
            "site",
            "t",
            "Update the homepage title to \"Alpha one\"",
        )
        .await;
    let b1 = env
        .send(
            "beta",
            "site",
            "t",
            "Update the homepage title to \"Beta one\"",
        )
        .await;
    let events = env.events_until_terminal(2, WAIT).await;
    let (a1, b1) = (
        event_of(&events, &a1, "completed"),
        event_of(&events, &b1, "completed"),
    );
    assert_eq!(
        [installed(a1), installed(b1)]
            .iter()
            .filter(|i| **i)
            .count(),
        1,
        "exactly one of the two installs: {a1}\n{b1}"
    );
    let (installs, metrics) = installs_so_far(&otlp).await;
    assert_eq!(installs, 1, "{metrics}");
    assert_eq!(live_title(&env, "alpha").await, "Alpha one");
    assert_eq!(live_title(&env, "beta").await, "Beta one");
    let store = store_dir(&env);
    let entries = complete_entries(&store);
    assert_eq!(entries.len(), 1, "{entries:?}");

    // The workspace links the entry; the entry is read-only.
    let ws = env.workspace_root().join("beta/site/node_modules");
    assert_eq!(
        std::fs::read_link(ws.join(DEPENDENCY)).unwrap(),
        store
            .join(&entries[0])
            .join("node_modules")
            .join(DEPENDENCY)
    );
    use std::os::unix::fs::PermissionsExt;
    for path in [
        format!("node_modules/{DEPENDENCY}/package.json"),
        format!("node_modules/{DEPENDENCY}"),
        "node_modules".to_owned(),
    ] {
        let mode = std::fs::metadata(store.join(&entries[0]).join(&path))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0, "{path} is writable: {mode:o}");
    }

    // A changed lock file (same dependencies, other bytes) installs once more.
    let mut lock = fixture_lock();
    lock.extend_from_slice(b"\n");
    env.push_branch_with(
        "beta",
        "site",
        "thread-lock",
        &[("package-lock.json", &lock)],
    );
    let b2 = env
        .send(
            "beta",
            "site",
            "lock",
            "Update the homepage title to \"Beta two\"",
        )
        .await;
    let b2 = completed(&env, &b2).await;
    assert!(installed(&b2), "{b2}");
    let (installs, metrics) = installs_so_far(&otlp).await;
    assert_eq!(installs, 2, "{metrics}");
    assert_eq!(complete_entries(&store).len(), 2);
    assert_eq!(live_title(&env, "beta").await, "Beta two");

    // And the first lock file's workspace is still served from its entry: no install.
    let a2 = env
        .send(
            "alpha",
            "site",
            "t",
            "Update the homepage title to \"Alpha two\"",
        )
        .await;
    let a2 = completed(&env, &a2).await;
    assert!(!installed(&a2), "{a2}");
    let (installs, metrics) = installs_so_far(&otlp).await;
    assert_eq!(installs, 2, "{metrics}");
    assert_eq!(live_title(&env, "alpha").await, "Alpha two");
    env.stop_worker();
    make_removable(env.dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_written_or_changed_entry_is_never_used() {
    let mut env = world("store-crash", &["gamma"]).await;
    // What a crash in the middle of an install would leave under the entry's own name: files,
    // no completion marker. Its dependency is broken, so a build that used it would fail.
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .unwrap();
    let major = String::from_utf8_lossy(&node.stdout)
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .unwrap()
        .to_owned();
    let key = edit_worker_actors::steps::build::npm_store::store_key(&fixture_lock(), None, &major);
    let entry = store_dir(&env).join(&key);
    let package = entry.join("node_modules").join(DEPENDENCY);
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(package.join("package.json"), "{}").unwrap();
    std::fs::write(entry.join("package-lock.json"), fixture_lock()).unwrap();
    env.start_worker(&[]);

    let g1 = env
        .send(
            "gamma",
            "site",
            "t",
            "Update the homepage title to \"Gamma one\"",
        )
        .await;
    let g1 = completed(&env, &g1).await;
    assert!(installed(&g1), "the half-written entry was used: {g1}");
    assert_eq!(
        complete_entries(&store_dir(&env)),
        std::slice::from_ref(&key)
    );
    let manifest = std::fs::read_to_string(package.join("package.json")).unwrap();
    assert!(
        manifest.contains(&format!("\"name\": \"{DEPENDENCY}\"")),
        "{manifest}"
    );
    assert_eq!(live_title(&env, "gamma").await, "Gamma one");

    // A write into the entry after its install (here by a process that is allowed to write,
    // as root is) is noticed before the next use: the entry is installed again.
    let planted = package.join("TAMPERED");
    if std::fs::write(&planted, "tampered").is_err() {
        // Not root: the store is read-only to us too; open it up as an attacker would need to.
        make_removable(&entry);
        std::fs::write(&planted, "tampered").unwrap();
    }
    let g2 = env
        .send(
            "gamma",
            "site",
            "t",
            "Update the homepage title to \"Gamma two\"",
        )
        .await;
    let g2 = completed(&env, &g2).await;
    assert!(installed(&g2), "the changed entry was used: {g2}");
    assert!(!planted.exists());
    assert_eq!(complete_entries(&store_dir(&env)), [key]);
    assert_eq!(live_title(&env, "gamma").await, "Gamma two");
    env.stop_worker();
    make_removable(env.dir.path());
}

/// A build that tries to write into its dependencies: through `node_modules` that is the
/// shared store.
const TAMPERING_BUILD: &str = r#"import fs from 'node:fs';

try {
  fs.writeFileSync('node_modules/html-escaper/TAMPERED', 'tampered');
} catch {}
await import('./build.mjs');
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_build_cannot_change_what_another_sites_build_loads() {
    tamper_with_the_store("none").await;
}

/// The same in the tenant sandbox: the store is not the tenant's to write, so the write is
/// refused outright and the tampering build completes without having changed anything.
#[tokio::test(flavor = "multi_thread")]
async fn in_the_sandbox_a_build_cannot_write_the_shared_dependencies() {
    tamper_with_the_store("users+namespaces").await;
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

async fn tamper_with_the_store(isolation: &str) {
    let name = format!("store-tamper-{}", isolation.replace('+', "-"));
    let mut env = world(&name, &["mallory", "victim"]).await;
    env.push_branch_with(
        "mallory",
        "site",
        "thread-evil",
        &[("build-with-dependency.mjs", TAMPERING_BUILD.as_bytes())],
    );
    env.start_worker(&[("ISOLATION", isolation)]);
    let store = store_dir(&env);
    let tampered = |store: &Path| {
        complete_entries(store).iter().any(|k| {
            store
                .join(k)
                .join("node_modules")
                .join(DEPENDENCY)
                .join("TAMPERED")
                .exists()
        })
    };

    let evil = env
        .send(
            "mallory",
            "site",
            "evil",
            "Update the homepage title to \"Mine\"",
        )
        .await;
    let events = env.events_until_terminal(1, WAIT).await;
    let end = events
        .iter()
        .find(|e| e["messageId"] == evil.as_str() && common::is_terminal(e))
        .unwrap_or_else(|| panic!("no end for {evil}: {events:#?}\n{}", env.worker_log()));
    match end["type"].as_str() {
        // The store refused the write (a build that is not the store's owner).
        Some("completed") => {}
        // The write went through (same user as the worker, or root) and was caught.
        Some("failed") => {
            assert_eq!(end["error"]["kind"], "build_failed", "{end}");
            let message = end["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("shared dependencies"), "{message}");
        }
        _ => panic!("unexpected end: {end}"),
    }
    if isolation != "none" {
        assert_eq!(end["type"], "completed", "{end}");
    } else if running_as_root() {
        // Root writes through the read-only store: the write happened, and was caught.
        assert_eq!(end["type"], "failed", "{end}");
    }
    assert!(!tampered(&store), "the write stayed in the store");

    let v = env
        .send(
            "victim",
            "site",
            "t",
            "Update the homepage title to \"Untouched\"",
        )
        .await;
    let v = completed(&env, &v).await;
    assert!(!tampered(&store), "{v}");
    assert_eq!(complete_entries(&store).len(), 1);
    assert_eq!(live_title(&env, "victim").await, "Untouched");
    env.stop_worker();
    make_removable(env.dir.path());
}
