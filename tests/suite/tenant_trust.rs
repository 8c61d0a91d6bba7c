//! Issue 24: one tenant's dependencies, links and agent files never reach another tenant or
//! the worker. A hostile site commits links where the worker reads (`.npmrc` to `.git/config`
//! or `/proc/self/environ`, the lock file to `/dev/zero`); a hostile dependency's install
//! script plants a hook in its install's `HOME`, fills it, or waits while another install ends;
//! a hostile agent swaps its conversation file for a link. The hostile packages are tarballs
//! served from loopback (`TarballServer`): nothing comes from outside. The worker runs with the
//! isolation the host allows (`ISOLATION=auto`, users+namespaces here), except the test of
//! `ISOLATION=users` alone.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Site, TestEnv, is_terminal, make_removable};
use serde_json::{Value, json};

const SECRET: &str = "tenant-trust-test-secret-value";

/// Each message here is the stand-in (instant) and a tiny build, with at most one small install
/// from loopback; 240 s is generous for a cold, busy 2-core machine running other tests.
const WAIT: Duration = Duration::from_secs(240);

/// A loopback server of npm tarballs (python's http.server on 127.0.0.1, a port of its own):
/// the hostile packages, nothing from outside.
struct TarballServer {
    dir: PathBuf,
    base_url: String,
    child: Child,
}

impl TarballServer {
    fn start(dir: &Path) -> TarballServer {
        let dir = dir.join("tarballs");
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m http.server");
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .unwrap_or_else(|| panic!("no port in {line:?}"))
            .to_owned();
        TarballServer {
            dir,
            base_url: format!("http://127.0.0.1:{port}"),
            child,
        }
    }

    /// Pack `{name}@1.0.0` with an `install` script (run with `node -e`); its `(url, integrity)`.
    fn publish(&self, name: &str, install_js: &str) -> (String, String) {
        let work = self.dir.join(format!("src-{name}"));
        let package = work.join("package");
        std::fs::create_dir_all(&package).unwrap();
        let manifest = json!({
            "name": name,
            "version": "1.0.0",
            "scripts": {"install": "node install.js"},
        });
        std::fs::write(package.join("package.json"), manifest.to_string()).unwrap();
        std::fs::write(package.join("install.js"), install_js).unwrap();
        let file = format!("{name}-1.0.0.tgz");
        let tarball = self.dir.join(&file);
        let packed = Command::new("tar")
            .args(["czf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&work)
            .arg("package")
            .status()
            .unwrap();
        assert!(packed.success());
        // npm checks this before it unpacks anything.
        let integrity = Command::new("node")
            .args([
                "-e",
                "process.stdout.write('sha512-' + require('crypto').createHash('sha512')\
                 .update(require('fs').readFileSync(process.argv[1])).digest('base64'))",
            ])
            .arg(&tarball)
            .output()
            .unwrap();
        assert!(integrity.status.success());
        (
            format!("{}/{file}", self.base_url),
            String::from_utf8(integrity.stdout).unwrap(),
        )
    }
}

impl Drop for TarballServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The site's build: the tiny site's, then it publishes whatever its dependencies' install
/// scripts left in their packages (`leaked.txt`, `HOOKED`): what a tenant would show on its page.
const BUILD_JS: &str = r#"import fs from 'node:fs';
await import('./build.mjs');
for (const pkg of fs.existsSync('node_modules') ? fs.readdirSync('node_modules') : []) {
  for (const found of ['leaked.txt', 'HOOKED']) {
    const path = `node_modules/${pkg}/${found}`;
    if (fs.existsSync(path)) fs.copyFileSync(path, `dist/${pkg}-${found}`);
  }
}
"#;

/// `package.json` and `package-lock.json` of a site depending on `(name, url, integrity)`.
fn site_files(site: &str, deps: &[(&str, &(String, String))]) -> (Vec<u8>, Vec<u8>) {
    let wanted: BTreeMap<&str, &str> = deps
        .iter()
        .map(|(n, (url, _))| (*n, url.as_str()))
        .collect();
    let package = json!({
        "name": site,
        "private": true,
        "version": "0.1.0",
        "type": "module",
        "scripts": {"build": "node build-trust.mjs"},
        "dependencies": wanted,
    });
    let mut packages = serde_json::Map::new();
    packages.insert(
        String::new(),
        json!({"name": site, "version": "0.1.0", "dependencies": wanted}),
    );
    for (name, (url, integrity)) in deps {
        packages.insert(
            format!("node_modules/{name}"),
            json!({
                "version": "1.0.0",
                "resolved": url,
                "integrity": integrity,
                "hasInstallScript": true,
            }),
        );
    }
    let lock = json!({
        "name": site,
        "version": "0.1.0",
        "lockfileVersion": 3,
        "requires": true,
        "packages": packages,
    });
    (
        serde_json::to_vec_pretty(&package).unwrap(),
        serde_json::to_vec_pretty(&lock).unwrap(),
    )
}

/// Tenants `aaa` and `bbb`, each with an upstream, a bucket and a `thread-t` whose site installs
/// its own dependencies (`package.json`, lock file) and builds with `BUILD_JS`.
async fn two_install_sites(env: &TestEnv, a: (&[u8], &[u8]), b: (&[u8], &[u8])) {
    for (client, (package, lock)) in [("aaa", a), ("bbb", b)] {
        env.create_upstream(client, "site", Site::Tiny);
        env.create_bucket(&env.bucket(client, "site")).await;
        let files: [(&str, &[u8]); 3] = [
            ("package.json", package),
            ("package-lock.json", lock),
            ("build-trust.mjs", BUILD_JS.as_bytes()),
        ];
        push_thread(env, client, "t", &files, &[]);
    }
}

/// Push `thread-{thread}` to `client/site`: `main` with `files` written and `links` (path,
/// target) made as symbolic links, committed as git commits links (a tenant's own commit).
fn push_thread(
    env: &TestEnv,
    client: &str,
    thread: &str,
    files: &[(&str, &[u8])],
    links: &[(&str, &str)],
) {
    let branch = format!("thread-{thread}");
    let seed = env.dir.path().join(format!("links-{client}-{branch}"));
    let upstream = env.upstream(client, "site");
    common::git(
        env.dir.path(),
        &[
            "clone",
            "--quiet",
            upstream.to_str().unwrap(),
            seed.to_str().unwrap(),
        ],
    );
    common::git(&seed, &["checkout", "--quiet", "-b", &branch]);
    for (path, content) in files {
        std::fs::write(seed.join(path), content).unwrap();
    }
    for (path, target) in links {
        let _ = std::fs::remove_file(seed.join(path));
        std::os::unix::fs::symlink(target, seed.join(path)).unwrap();
    }
    common::git(&seed, &["add", "-A"]);
    common::git(&seed, &["commit", "--quiet", "-m", "tenant's commit"]);
    common::git(&seed, &["push", "--quiet", "origin", &branch]);
    std::fs::remove_dir_all(&seed).unwrap();
}

/// Terminal events for all of `ids`, by message id.
async fn ends(env: &TestEnv, ids: &[&str], timeout: Duration) -> BTreeMap<String, Value> {
    let mut found = BTreeMap::new();
    ends_into(env, ids, ids, timeout, &mut found).await;
    found
}

/// Collect into `found` the terminal events of `keep` that come until all of `until` have
/// ended (an early end of another message is kept, not lost).
async fn ends_into(
    env: &TestEnv,
    keep: &[&str],
    until: &[&str],
    timeout: Duration,
    found: &mut BTreeMap<String, Value>,
) {
    let deadline = Instant::now() + timeout;
    let done = |found: &BTreeMap<String, Value>| until.iter().all(|id| found.contains_key(*id));
    while !done(found) && Instant::now() < deadline {
        for event in env.drain(&env.output, 1).await {
            let id = event["messageId"].as_str().unwrap_or_default().to_owned();
            if is_terminal(&event) && keep.contains(&id.as_str()) {
                found.insert(id, event);
            }
        }
    }
    assert!(
        done(found),
        "terminal events: {found:#?}\n{}",
        common::tail(&env.worker_log(), 60)
    );
}

/// Every file under `dir` (relative; none when there is no `dir`), not following links.
fn files_in(dir: &Path) -> Vec<String> {
    if !dir.is_dir() {
        return Vec::new();
    }
    common::files_under(dir)
}

/// Every file under `dir` (not following links) whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    files_in(dir)
        .into_iter()
        .filter(|f| {
            let path = dir.join(f);
            std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file())
                && std::fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// Objects of `bucket` whose bytes hold `needle`.
async fn objects_holding(env: &TestEnv, bucket: &str, needle: &[u8]) -> Vec<String> {
    env.bucket_contents(bucket)
        .await
        .into_iter()
        .filter(|(_, (_, body))| body.windows(needle.len()).any(|w| w == needle))
        .map(|(key, _)| key)
        .collect()
}

fn store_dir(env: &TestEnv) -> PathBuf {
    env.workspace_root().join(".cache/npm-store")
}

/// A dependency whose install script copies the install folder's `.npmrc` (what the worker
/// wrote there from the site) into its own package, for the site's build to publish.
const COPY_NPMRC: &str = r#"const fs = require('fs');
const from = require('path').join(process.env.INIT_CWD || '../..', '.npmrc');
try { fs.copyFileSync(from, 'leaked.txt'); } catch (e) {}
"#;

/// A committed `.npmrc` that is a link to the checkout's `.git/config` (the remote URL, a token
/// in it with some remotes) or to `/proc/self/environ` (the worker's environment, read as the
/// worker): the worker refuses the site with `unsafe_site_file`, and no byte of either reaches
/// the store, a build or a bucket; a neighbour with the same dependency completes meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_committed_npmrc_link_reaches_neither_store_nor_build_nor_bucket() {
    let mut env = TestEnv::new("trust-npmrc").await;
    let server = TarballServer::start(env.dir.path());
    let copier = server.publish("npmrc-copier", COPY_NPMRC);
    let (package, lock) = site_files("linked", &[("npmrc-copier", &copier)]);
    for client in ["gitcfg", "environ", "plain"] {
        env.create_upstream(client, "site", Site::Tiny);
        env.create_bucket(&env.bucket(client, "site")).await;
    }
    let files: [(&str, &[u8]); 3] = [
        ("package.json", &package),
        ("package-lock.json", &lock),
        ("build-trust.mjs", BUILD_JS.as_bytes()),
    ];
    push_thread(&env, "gitcfg", "t", &files, &[(".npmrc", ".git/config")]);
    push_thread(
        &env,
        "environ",
        "t",
        &files,
        &[(".npmrc", "/proc/self/environ")],
    );
    // The neighbour's own `.npmrc` (a plain file) is copied and published: the path works.
    let plain_rc = b"fund=false\n# plain-npmrc-marker\n";
    push_thread(
        &env,
        "plain",
        "t",
        &[files.as_slice(), &[(".npmrc", plain_rc.as_slice())]].concat(),
        &[],
    );
    env.start_worker(&[("ISOLATION", "auto"), ("HOSTILE_TEST_SECRET", SECRET)]);
    let title = "Update the homepage title to \"Linked\"";
    let gitcfg = env.send("gitcfg", "site", "t", title).await;
    let environ = env.send("environ", "site", "t", title).await;
    let plain = env.send("plain", "site", "t", title).await;
    let got = ends(&env, &[&gitcfg, &environ, &plain], WAIT).await;
    for id in [&gitcfg, &environ] {
        let end = &got[id];
        assert_eq!(end["type"], "failed", "{end:#}");
        assert_eq!(end["error"]["kind"], "unsafe_site_file", "{end:#}");
        let message = end["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(".npmrc") && message.contains("link"),
            "{message}"
        );
    }
    assert_eq!(got[&plain]["type"], "completed", "{:#}", got[&plain]);
    let plain_bucket = env.bucket_contents(&env.bucket("plain", "site")).await;
    assert!(
        plain_bucket.contains_key("npmrc-copier-leaked.txt"),
        "the neighbour's copy of its own .npmrc was not published: {:?}",
        plain_bucket.keys()
    );
    // Neither the remote's URL (in `.git/config`) nor the worker's environment anywhere.
    let git_config = std::fs::read(env.workspace_root().join("gitcfg/site/.git/config")).unwrap();
    let remote = b"upstream/gitcfg/site.git";
    assert!(git_config.windows(remote.len()).any(|w| w == remote));
    for needle in [
        remote.as_slice(),
        SECRET.as_bytes(),
        b"repositoryformatversion",
    ] {
        let text = String::from_utf8_lossy(needle);
        assert_eq!(
            files_holding(&store_dir(&env), needle),
            Vec::<String>::new(),
            "{text}"
        );
        for client in ["gitcfg", "environ"] {
            let site = env.workspace_root().join(client).join("site");
            let dist = files_holding(&site.join("dist"), needle);
            assert_eq!(dist, Vec::<String>::new(), "{client}: {text}");
            let bucket = env.bucket(client, "site");
            let objects = objects_holding(&env, &bucket, needle).await;
            assert_eq!(objects, Vec::<String>::new(), "{client}: {text}");
        }
    }
    assert!(env.worker_running(), "the worker stopped");
    env.stop_worker();
    make_removable(env.dir.path());
}

/// The worker's resident memory in bytes.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A lock file committed as a link to `/dev/zero`: the worker used to read it without end
/// (2 GiB in seconds, every tenant's work on the worker gone with it). Now the message ends
/// `failed` at once, the worker's memory stays flat, and the neighbour completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_file_linked_to_dev_zero_fails_and_memory_stays_flat() {
    let mut env = TestEnv::new("trust-zero").await;
    for client in ["zero", "good"] {
        env.create_upstream(client, "site", Site::WithDependency);
        env.create_bucket(&env.bucket(client, "site")).await;
    }
    push_thread(
        &env,
        "zero",
        "t",
        &[],
        &[("package-lock.json", "/dev/zero")],
    );
    env.start_worker(&[("ISOLATION", "auto")]);
    let pid = env.worker_pid().unwrap();
    // What the worker held at start, for the message.
    let baseline = rss_of(pid);
    let sent = Instant::now();
    let zero = env
        .send("zero", "site", "t", "Update the homepage title to \"Zero\"")
        .await;
    let mut zero_ended = None;
    let good = env
        .send("good", "site", "t", "Update the homepage title to \"Good\"")
        .await;
    // Watch the worker's memory while the messages run. 768 MiB is far past anything a tiny
    // site's messages take (the worker idles at tens of MB) and far short of the host: the old
    // worker passed it within a second or two of its build starting; it is killed there, so
    // that the test fails rather than the machine.
    const RUNAWAY: u64 = 768 << 20;
    let mut peak = baseline;
    let mut found = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    while found.len() < 2 && Instant::now() < deadline {
        let rss = rss_of(pid);
        peak = peak.max(rss);
        if rss > RUNAWAY {
            let _ = common::nix_kill(pid, "KILL");
            panic!(
                "the worker's memory ran away: {} MiB (baseline {} MiB)",
                rss >> 20,
                baseline >> 20
            );
        }
        for event in env.drain(&env.output, 0).await {
            let id = event["messageId"].as_str().unwrap_or_default().to_owned();
            if is_terminal(&event) && (id == zero || id == good) {
                if id == zero {
                    zero_ended = Some(sent.elapsed());
                }
                found.insert(id, event);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        found.len(),
        2,
        "{found:#?}\n{}",
        common::tail(&env.worker_log(), 40)
    );
    let end = &found[&zero];
    assert_eq!(end["type"], "failed", "{end:#}");
    assert_eq!(end["error"]["kind"], "unsafe_site_file", "{end:#}");
    let message = end["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("package-lock.json"), "{message}");
    assert_eq!(found[&good]["type"], "completed", "{:#}", found[&good]);
    // Within seconds: the checkout, the stand-in's turn and the refusal take a few seconds
    // here; 60 s leaves room for a cold, busy 2-core machine, and no read of /dev/zero ends.
    let took = zero_ended.unwrap();
    assert!(took < Duration::from_secs(60), "ended after {took:?}");
    eprintln!(
        "worker memory: {} MiB at start, peak {} MiB",
        baseline >> 20,
        peak >> 20
    );
    // Flat: under 256 MiB all along (two tiny sites' messages take the worker tens of MB; the
    // lock file's bytes are never read).
    assert!(
        peak < 256 << 20,
        "peak {} MiB (at start {} MiB)",
        peak >> 20,
        baseline >> 20
    );
    assert!(env.worker_running(), "the worker stopped");
    env.stop_worker();
    make_removable(env.dir.path());
}

/// An install script that plants a hook in its install's `HOME`: npm reads `$HOME/.npmrc`, and
/// `node-options=--require` would run the hook in every later install's Node scripts.
const PLANT_HOOK: &str = r#"const fs = require('fs');
const home = process.env.HOME;
fs.writeFileSync(home + '/hook.js', "require('fs').writeFileSync(process.cwd() + '/HOOKED', 'hooked')");
fs.appendFileSync(home + '/.npmrc', '\nnode-options=--require ' + home + '/hook.js\n');
"#;

/// An ordinary dependency with a Node install script (what the hook would run in).
const PLAIN_INSTALL: &str = r#"require('fs').writeFileSync('ran.txt', 'ran');"#;

/// Tenant A's install plants a hook in its `HOME`; tenant B's install (another lock file) runs
/// after it and must not run the hook: each install has a fresh, empty `HOME` and npm cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_hook_one_install_plants_in_its_home_does_not_run_in_the_next() {
    let mut env = TestEnv::new("trust-hook").await;
    let server = TarballServer::start(env.dir.path());
    let planter = server.publish("hook-planter", PLANT_HOOK);
    let plain = server.publish("plain-install", PLAIN_INSTALL);
    let (a_package, a_lock) = site_files("site-a", &[("hook-planter", &planter)]);
    let (b_package, b_lock) = site_files("site-b", &[("plain-install", &plain)]);
    two_install_sites(&env, (&a_package, &a_lock), (&b_package, &b_lock)).await;
    env.start_worker(&[("ISOLATION", "auto")]);
    let a = env
        .send("aaa", "site", "t", "Update the homepage title to \"A\"")
        .await;
    let got = ends(&env, &[&a], WAIT).await;
    assert_eq!(got[&a]["type"], "completed", "{:#}", got[&a]);
    let b = env
        .send("bbb", "site", "t", "Update the homepage title to \"B\"")
        .await;
    let got = ends(&env, &[&b], WAIT).await;
    assert_eq!(got[&b]["type"], "completed", "{:#}", got[&b]);
    // B's dependency did install (its script ran), and no hook ran in it.
    let store = store_dir(&env);
    let ran: Vec<String> = files_in(&store)
        .into_iter()
        .filter(|f| f.ends_with("plain-install/ran.txt"))
        .collect();
    assert_eq!(ran.len(), 1, "{:?}", files_in(&store));
    let hooked: Vec<String> = files_in(&store)
        .into_iter()
        .filter(|f| f.ends_with("HOOKED"))
        .collect();
    assert_eq!(hooked, Vec::<String>::new(), "A's hook ran in B's install");
    let b_bucket = env.bucket_contents(&env.bucket("bbb", "site")).await;
    assert!(
        !b_bucket.contains_key("plain-install-HOOKED"),
        "{:?}",
        b_bucket.keys()
    );
    // Nothing of A's install is left where another install would run.
    let sandbox = env.workspace_root().join(".sandbox");
    let planted: Vec<String> = files_in(&sandbox)
        .into_iter()
        .filter(|f| f.ends_with("hook.js"))
        .collect();
    assert_eq!(planted, Vec::<String>::new());
    env.stop_worker();
    make_removable(env.dir.path());
}

/// An install script that writes 40 MiB into its `HOME`, says it started (a line in
/// `signals/started`, one per run of it), and then waits for the test's `go` (at most 200 s).
fn waiting_install(signals: &Path) -> String {
    format!(
        r#"const fs = require('fs');
fs.writeFileSync(process.env.HOME + '/junk-slow', Buffer.alloc(40 << 20, 1));
fs.appendFileSync({started:?}, 'started\n');
const until = Date.now() + 200000;
while (!fs.existsSync({go:?}) && Date.now() < until) {{
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100);
}}
"#,
        started = signals.join("started").display().to_string(),
        go = signals.join("go").display().to_string(),
    )
}

/// An install script that writes 40 MiB into its `HOME`, then stays long enough (1.5 s) for
/// the disk watch (every 0.5 s) to count it.
const QUICK_INSTALL: &str = r#"const fs = require('fs');
fs.writeFileSync(process.env.HOME + '/junk-quick', Buffer.alloc(40 << 20, 1));
Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1500);
"#;

/// With `ISOLATION=users` (no namespaces) the end of a run kills every process of its uid.
/// Two shared installs at once: B's end must not kill A's install, and B's disk limit
/// (`SANDBOX_MAX_DISK_MB=64`) counts only what B writes (40 MiB), not what A wrote (40 MiB) in
/// a shared home. Each failure is collected and reported together, so that a run of the old
/// worker shows both.
#[tokio::test(flavor = "multi_thread")]
async fn with_users_alone_one_install_neither_kills_nor_counts_another() {
    let mut env = TestEnv::new("trust-users").await;
    let server = TarballServer::start(env.dir.path());
    let signals = env.dir.path().join("signals");
    std::fs::create_dir_all(&signals).unwrap();
    // The install's uid writes its signal here.
    std::fs::set_permissions(
        &signals,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let slow = server.publish("slow-install", &waiting_install(&signals));
    let quick = server.publish("quick-install", QUICK_INSTALL);
    let (a_package, a_lock) = site_files("site-a", &[("slow-install", &slow)]);
    let (b_package, b_lock) = site_files("site-b", &[("quick-install", &quick)]);
    two_install_sites(&env, (&a_package, &a_lock), (&b_package, &b_lock)).await;
    env.start_worker(&[
        ("ISOLATION", "users"),
        ("SANDBOX_MAX_DISK_MB", "64"),
        // An install killed by another's sweep would be retried; once shows it.
        ("MAX_RECEIVES", "1"),
    ]);
    let a = env
        .send("aaa", "site", "t", "Update the homepage title to \"A\"")
        .await;
    // A's install is under way (its script said so), and waits for `go`.
    let deadline = Instant::now() + WAIT;
    while !signals.join("started").exists() {
        assert!(
            Instant::now() < deadline,
            "A's install did not start\n{}",
            common::tail(&env.worker_log(), 40)
        );
        let early = env.drain(&env.output, 1).await;
        assert!(
            !early.iter().any(is_terminal),
            "A ended before its install started: {early:#?}"
        );
    }
    let b = env
        .send("bbb", "site", "t", "Update the homepage title to \"B\"")
        .await;
    let mut got = BTreeMap::new();
    ends_into(&env, &[&a, &b], &[&b], WAIT, &mut got).await;
    std::fs::write(signals.join("go"), "go").unwrap();
    ends_into(&env, &[&a, &b], &[&a], WAIT, &mut got).await;
    let mut wrong = Vec::new();
    if got[&b]["type"] != "completed" {
        wrong.push(format!(
            "B's install was stopped (its disk count took in what A wrote?): {:#}",
            got[&b]
        ));
    }
    if got[&a]["type"] != "completed" {
        wrong.push(format!(
            "A's install was killed (by the sweep after B's?): {:#}",
            got[&a]
        ));
    }
    // Killed, A's install would have run again for its build: it ran once.
    let runs = std::fs::read_to_string(signals.join("started")).unwrap();
    if runs.lines().count() != 1 {
        wrong.push(format!(
            "A's install ran {} times: the sweep after B's install killed it",
            runs.lines().count()
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    env.stop_worker();
    make_removable(env.dir.path());
}

/// What the tenant's agent does to its own conversation files (run last, after the
/// stand-in's final write, as the tenant, in its sandbox): `up` swaps each for a link to the
/// worker's environment; `down VICTIM` removes each and plants a link to VICTIM where the worker
/// writes a restored copy first.
const CONVERSATION_SH: &str = r#"for f in "$CLAUDE_CONFIG_DIR"/projects/*/*.jsonl; do
  case "$1" in
    up) ln -sf /proc/self/environ "$f" ;;
    down) rm -f "$f"; ln -sf "$2" "$f.restoring" ;;
  esac
done
"#;

/// The agent's conversation files travel through the lease store. A conversation file
/// replaced by a link: saving it never uploads what the link points to (the worker's
/// environment), and restoring it never writes through a planted link (a file of the
/// worker's); the restored file is the tenant's, in the tenant's folder.
#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_file_replaced_by_a_link_is_neither_uploaded_nor_written_through() {
    let mut env = TestEnv::new("trust-conv").await;
    for client in ["up", "down"] {
        env.create_upstream(client, "site", Site::Tiny);
        env.create_bucket(&env.bucket(client, "site")).await;
        push_thread(
            &env,
            client,
            "t",
            &[("conversation.sh", CONVERSATION_SH.as_bytes())],
            &[],
        );
    }
    let victim = env.dir.path().join("victim.txt");
    std::fs::write(&victim, "untouched").unwrap();
    let lease_store = env.create_lease_store().await;
    env.start_worker(&[
        ("ISOLATION", "auto"),
        ("LEASE_STORE", &lease_store),
        ("HOSTILE_TEST_SECRET", SECRET),
    ]);
    let send = |client: &'static str, text: String| {
        let env = &env;
        async move { env.send(client, "site", "t", &text).await }
    };
    // Each thread's first message: an ordinary conversation, saved to the lease store.
    let up1 = send("up", "Update the homepage title to \"Up 1\"".into()).await;
    let down1 = send("down", "Update the homepage title to \"Down 1\"".into()).await;
    let got = ends(&env, &[&up1, &down1], WAIT).await;
    for end in got.values() {
        assert_eq!(end["type"], "completed", "{end:#}");
    }
    // Then the agent swaps its files.
    let up2 = send(
        "up",
        "[standin:exec-last sh conversation.sh up] Update the homepage title to \"Up 2\"".into(),
    )
    .await;
    let down2 = send(
        "down",
        format!(
            "[standin:exec-last sh conversation.sh down {}] Update the homepage title to \"Down 2\"",
            victim.display()
        ),
    )
    .await;
    let got = ends(&env, &[&up2, &down2], WAIT).await;
    for end in got.values() {
        assert_eq!(end["type"], "completed", "{end:#}");
    }
    // Down's next message: its conversation is restored from the lease store.
    let down3 = send("down", "Update the homepage title to \"Down 3\"".into()).await;
    let got = ends(&env, &[&down3], WAIT).await;
    assert_eq!(got[&down3]["type"], "completed", "{:#}", got[&down3]);

    // Upload: the shared copies hold conversations, never the worker's environment.
    let bucket = lease_store
        .trim_start_matches("s3://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let shared = env.bucket_contents(&bucket).await;
    let conversations: Vec<&String> = shared
        .keys()
        .filter(|k| k.contains("conversations/up/site/") && k.ends_with(".jsonl"))
        .collect();
    assert_eq!(conversations.len(), 1, "{:?}", shared.keys());
    // Both directions are checked before either fails, so that a run of the old worker shows
    // each.
    let mut wrong = Vec::new();
    let leaked = objects_holding(&env, &bucket, SECRET.as_bytes()).await;
    if !leaked.is_empty() {
        wrong.push(format!(
            "the worker's environment was uploaded as a conversation: {leaked:?}"
        ));
    }
    // Restore: not written through the planted link.
    let victim_now = std::fs::read_to_string(&victim).unwrap();
    if victim_now != "untouched" {
        wrong.push(format!(
            "the restore wrote through the planted link into {}: {victim_now:.80}",
            victim.display()
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let agent = env.dir.path().join("claude/workspaces/down/site/projects");
    let restored: Vec<PathBuf> = files_in(&agent)
        .into_iter()
        .filter(|f| f.ends_with(".jsonl"))
        .map(|f| agent.join(f))
        .collect();
    assert_eq!(restored.len(), 1, "{restored:?}");
    let meta = std::fs::symlink_metadata(&restored[0]).unwrap();
    assert!(meta.is_file(), "{meta:?}");
    // The tenant's (the resumed agent wrote it again since, as the tenant).
    use std::os::unix::fs::MetadataExt;
    assert_ne!(meta.uid(), 0, "the conversation file is not the tenant's");
    env.stop_worker();
    make_removable(env.dir.path());
}

/// A build that turns a folder on the way to a nested `BUILD_OUTPUT_DIR` into a link after the
/// build's own check (here: `site` of `site/dist`, made a link to a folder of the worker's)
/// publishes nothing from behind the link: the message fails `unsafe_site_file` and no byte of
/// the folder reaches the bucket. The publisher reads the output by path, so the path is
/// checked again, by handle, after the build.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_links_away_its_output_folder_publishes_nothing_from_behind_it() {
    let mut env = TestEnv::new("trust-outlink").await;
    let bucket = env.create_site("olga", "site", Site::Tiny).await;
    // A folder of the worker's that looks like a build output.
    let outside = env.dir.path().join("worker-private");
    std::fs::create_dir_all(outside.join("dist")).unwrap();
    let secret = b"worker-private-bytes-7f3a";
    std::fs::write(outside.join("dist/index.html"), secret).unwrap();
    let build = format!(
        "import fs from 'node:fs';\n\
         fs.rmSync('site', {{ recursive: true, force: true }});\n\
         fs.symlinkSync({:?}, 'site');\n",
        outside.to_str().unwrap()
    );
    env.push_branch_with(
        "olga",
        "site",
        "thread-t",
        &[("build.mjs", build.as_bytes())],
    );
    env.start_worker(&[("ISOLATION", "none"), ("BUILD_OUTPUT_DIR", "site/dist")]);
    let id = env
        .send("olga", "site", "t", "[standin:write note.txt linked]")
        .await;
    let events = env.events_until_terminal(1, common::ONE_MESSAGE).await;
    let end = events
        .iter()
        .find(|e| e["messageId"] == id.as_str() && is_terminal(e))
        .unwrap_or_else(|| panic!("no end: {events:#?}\n{}", env.worker_log()));
    assert_eq!(end["type"], "failed", "{end}");
    assert_eq!(end["error"]["kind"], "unsafe_site_file", "{end}");
    assert!(objects_holding(&env, &bucket, secret).await.is_empty());
    assert!(env.bucket_contents(&bucket).await.is_empty());
    env.stop_worker();
    make_removable(env.dir.path());
}
