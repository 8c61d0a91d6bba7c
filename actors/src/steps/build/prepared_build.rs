//! An Astro build started ahead of its turn. While the agent works (seconds to minutes in which
//! the machine mostly waits on the model), the build's Node process starts in the tenant's
//! sandbox and loads Astro's CLI and build: about 1.5 of the 3.5 CPU-seconds a small site's
//! build costs. When the build's turn comes, one line on its stdin runs `astro build` in it, so
//! that only the rest is spent in the build slot. Twenty clients whose agents finish together
//! then queue for the slots with less work each.
//!
//! Loading is build work, so it takes a build slot too (released once Astro is loaded): it
//! runs on cores no build is using, and never makes the running builds share their cores with
//! twenty loading processes (which would make every build finish late). When the build's turn
//! comes before a slot did, the build's own slot covers the loading.
//!
//! It is used only when it builds exactly what the usual way would: the build is `npm run
//! <script>` run without npm (`package_script`) whose words start with `astro`; Astro comes from
//! the shared store (whose entry is held, so not evicted, meanwhile); and when the build's turn
//! comes, the script, its environment and the store entry are still what they were when the
//! process started (the agent may have changed them). Otherwise it is stopped and the build
//! runs the usual way. The process runs in the same sandbox as the build, as the same user,
//! under the same limits; its time limit and disk watch start when it is told to build.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::steps::build::logged_run::{self, BuildError, Logged};
use crate::steps::build::npm_store::Acquired;
use crate::steps::build::package_script::DirectScript;
use crate::steps::slots::BuildSlots;
use crate::tenant::process;
use crate::tenant::sandbox::Jail;

/// The Node side (`node --eval`): no file to place where the sandbox can read it.
const SCRIPT: &str = include_str!("prepared_build.mjs");
/// The line the script prints once Astro is loaded; not part of the build's log.
const LOADED: &str = "edit-worker: build tool loaded";

/// What the build runs: argv and what is added to its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub argv: Vec<String>,
    pub env: Vec<(String, OsString)>,
}

impl From<DirectScript> for Plan {
    fn from(script: DirectScript) -> Plan {
        Plan {
            argv: script.argv,
            env: script.env,
        }
    }
}

/// A Node process that has loaded (or is loading) Astro and waits for the word to build.
/// Dropping it ends the process and everything it started.
pub struct PreparedBuild {
    /// `None` once handed to the build, which then owns its end.
    child: Option<Child>,
    pgid: Option<i32>,
    /// What it will build: compared with what the build would run when its turn comes.
    plan: Plan,
    /// The store entry its modules come from...
    store_key: String,
    /// ...held so that it cannot be evicted meanwhile (`None` in unit tests, which have no
    /// store).
    _entry: Option<Acquired>,
    jail: Jail,
    /// One of `BUILD_AHEAD_MAX`: a waiting Node process holds about 150 MB.
    _permit: OwnedSemaphorePermit,
    /// Waits for a build slot, has the process load Astro in it, and gives the pipes back.
    loading: Option<JoinHandle<Pipes>>,
    /// Tells `loading` to stop waiting for a slot: the build's turn has come.
    go_now: Option<oneshot::Sender<()>>,
    /// Set once Astro is loaded: such a build goes before unloaded ones (`BuildSlots`).
    loaded: Arc<AtomicBool>,
}

/// The prepared process's stdin and stdout.
struct Pipes {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Wait for a build slot (or the build's turn), have the process load Astro, and wait until it
/// says so; the slot is let go then.
async fn load(
    mut pipes: Pipes,
    slots: Arc<BuildSlots>,
    go_now: oneshot::Receiver<()>,
    loaded: Arc<AtomicBool>,
) -> Pipes {
    let asked = std::time::Instant::now();
    let slot = tokio::select! {
        slot = slots.for_loading() => Some(slot),
        _ = go_now => None,
    };
    let waited = asked.elapsed();
    if pipes.stdin.write_all(b"load\n").await.is_ok() {
        loaded.store(wait_until_loaded(&mut pipes.stdout).await, Ordering::SeqCst);
    }
    tracing::debug!(
        ahead = slot.is_some(),
        loaded = loaded.load(Ordering::SeqCst),
        waited_ms = waited.as_millis() as u64,
        load_ms = (asked.elapsed() - waited).as_millis() as u64,
        "Astro loaded for a build started ahead"
    );
    drop(slot);
    pipes
}

impl std::fmt::Debug for PreparedBuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedBuild")
            .field("pgid", &self.pgid)
            .field("argv", &self.plan.argv)
            .field("store_key", &self.store_key)
            .finish()
    }
}

impl Drop for PreparedBuild {
    fn drop(&mut self) {
        if let Some(loading) = &self.loading {
            loading.abort();
        }
        if self.child.is_some() {
            process::signal_group(self.pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Astro's CLI module in the store entry's `node_modules`, when `plan` runs the `astro`
/// program of that entry's Astro.
fn astro_cli(store_modules: &Path, plan: &Plan) -> Option<PathBuf> {
    if plan.argv.first().map(String::as_str) != Some("astro") {
        return None;
    }
    let package = store_modules.join("astro");
    // The store entry's files were written by its install's processes (dependencies' install
    // scripts): read by handle, no link followed, bounded.
    let manifest: serde_json::Value = serde_json::from_slice(
        &crate::tenant::tenant_fs::read_in(
            &package,
            Path::new("package.json"),
            crate::tenant::tenant_fs::SITE_FILE_MAX_BYTES,
        )
        .ok()??,
    )
    .ok()?;
    let bin = manifest.get("bin")?.get("astro")?.as_str()?;
    if bin.trim_start_matches("./") != "astro.js" {
        return None;
    }
    let cli = package.join("dist/cli/index.js");
    // A regular file reached without a link (`is_file` follows every one on the path).
    crate::tenant::tenant_fs::stat_in(&package, Path::new("dist/cli/index.js"))
        .ok()
        .flatten()
        .is_some_and(|stat| crate::tenant::tenant_fs::is_regular(&stat))
        .then_some(cli)
}

impl PreparedBuild {
    /// Start the build of `plan` in `dir` ahead of its turn, when it runs Astro from the store
    /// entry `store_key` (its `node_modules` at `store_modules`; see the module's text).
    /// `None`: the build runs the usual way.
    pub(crate) fn start(
        plan: Plan,
        (store_key, entry): (String, Option<Acquired>),
        store_modules: &Path,
        jail: Jail,
        dir: &Path,
        permit: OwnedSemaphorePermit,
        build_slots: Arc<BuildSlots>,
    ) -> Option<PreparedBuild> {
        let cli = astro_cli(store_modules, &plan)?;
        // What `node_modules/.bin/astro` would be in argv[1], had the build started it.
        let bin = dir.join("node_modules/.bin/astro");
        let mut argv: Vec<OsString> = ["node", "--input-type=module", "--eval", SCRIPT]
            .map(OsString::from)
            .into();
        argv.extend([cli.into_os_string(), bin.into_os_string()]);
        argv.extend(plan.argv[1..].iter().map(OsString::from));
        let mut cmd = logged_run::command_for(&argv, &plan.env, &jail, dir);
        cmd.stdin(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                tracing::warn!(error = %e, "could not start the build ahead; it runs the usual way");
                return None;
            }
        };
        let pgid = child.id().map(|id| id as i32);
        let pipes = Pipes {
            stdin: child.stdin.take().expect("piped"),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
        };
        let (go_now, go) = oneshot::channel();
        let loaded = Arc::new(AtomicBool::new(false));
        let loading = tokio::spawn(load(pipes, build_slots, go, loaded.clone()));
        tracing::info!(%store_key, "build started ahead: Astro loads while the agent works");
        Some(PreparedBuild {
            child: Some(child),
            pgid,
            plan,
            store_key,
            _entry: entry,
            jail,
            _permit: permit,
            loading: Some(loading),
            go_now: Some(go_now),
            loaded,
        })
    }

    /// Whether Astro is loaded in it (read when a build slot is handed out).
    pub(crate) fn loaded(&self) -> Arc<AtomicBool> {
        self.loaded.clone()
    }

    /// Run the build in this process, when `plan` from `store_key` is what it was prepared
    /// for and it is still there to run it. `None`: it was not used (and is gone); the caller
    /// builds the usual way.
    pub(crate) async fn build(
        mut self,
        plan: &Plan,
        store_key: Option<&str>,
        timeout: std::time::Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<Logged>, BuildError> {
        if *plan != self.plan || store_key != Some(self.store_key.as_str()) {
            tracing::info!("the build changed since it was started ahead; building the usual way");
            return Ok(None);
        }
        let started = std::time::Instant::now();
        // Until the build has it, dropping `self` ends the process (and its group).
        if let Some(go_now) = self.go_now.take() {
            let _ = go_now.send(());
        }
        let loading = self.loading.as_mut().expect("a prepared build runs once");
        let pipes = tokio::select! {
            pipes = loading => pipes.map_err(|e| BuildError::Io(std::io::Error::other(e)))?,
            _ = tokio::time::sleep(timeout) => {
                return Err(BuildError::Timeout { program: "astro".into(), timeout })
            }
            _ = cancel.cancelled() => return Err(BuildError::Cancelled),
        };
        self.loading = None;
        let Pipes { mut stdin, stdout } = pipes;
        // Set by the loading task, which has ended.
        if !self.loaded.load(Ordering::SeqCst) {
            tracing::warn!(
                "the build started ahead ended before loading Astro; building the usual way"
            );
            return Ok(None);
        }
        // A process that ended since reads nothing; its exit status says so below.
        let _ = stdin.write_all(b"build\n").await;
        drop(stdin);
        let stderr = self
            .child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .expect("piped");
        // The process is the build's now: its end follows the build's rules.
        let child = self.child.take().expect("taken once");
        let remaining = timeout.saturating_sub(started.elapsed());
        logged_run::finish_logged(
            child,
            self.pgid,
            [Box::new(stdout), Box::new(stderr)],
            &self.jail,
            "astro".into(),
            remaining,
            cancel,
        )
        .await
        .map(Some)
    }
}

/// Read the script's lines until it says Astro is loaded (`true`) or ends (`false`).
async fn wait_until_loaded(stdout: &mut BufReader<ChildStdout>) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        match stdout.read_line(&mut line).await {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.trim_end() == LOADED => return true,
            // Something a module printed while loading: not the build's log.
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A dependency's install script made the store's `astro/package.json` and CLI links to
    /// files elsewhere: the worker reads neither through them, so starts no build ahead.
    #[test]
    fn a_store_astro_made_of_links_is_not_started_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (modules, elsewhere) = (
            dir.path().join("node_modules"),
            dir.path().join("elsewhere"),
        );
        std::fs::create_dir_all(modules.join("astro/dist/cli")).unwrap();
        std::fs::create_dir_all(elsewhere.join("cli")).unwrap();
        std::fs::write(
            elsewhere.join("package.json"),
            r#"{"bin": {"astro": "astro.js"}}"#,
        )
        .unwrap();
        std::fs::write(elsewhere.join("cli/index.js"), "").unwrap();
        let plan = Plan {
            argv: vec!["astro".into(), "build".into()],
            env: Vec::new(),
        };
        let astro = modules.join("astro");
        std::fs::write(astro.join("dist/cli/index.js"), "").unwrap();
        std::os::unix::fs::symlink(elsewhere.join("package.json"), astro.join("package.json"))
            .unwrap();
        assert_eq!(
            astro_cli(&modules, &plan),
            None,
            "manifest read through a link"
        );
        std::fs::remove_file(astro.join("package.json")).unwrap();
        std::fs::copy(elsewhere.join("package.json"), astro.join("package.json")).unwrap();
        assert!(astro_cli(&modules, &plan).is_some());
        std::fs::remove_dir_all(astro.join("dist/cli")).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("cli"), astro.join("dist/cli")).unwrap();
        assert_eq!(astro_cli(&modules, &plan), None, "CLI found through a link");
    }

    /// A site whose `node_modules/astro` is a fake Astro: its CLI writes what it saw to
    /// `dist/index.html`. `cli_body` replaces the CLI module's text when given.
    fn fake_site(cli_body: Option<&str>) -> tempfile::TempDir {
        let site = tempfile::tempdir().unwrap();
        let astro = site.path().join("node_modules/astro");
        for folder in ["dist/cli/build", "dist/core/build"] {
            std::fs::create_dir_all(astro.join(folder)).unwrap();
        }
        std::fs::write(
            astro.join("package.json"),
            r#"{"name":"astro","type":"module","bin":{"astro":"./astro.js"}}"#,
        )
        .unwrap();
        std::fs::write(astro.join("dist/cli/build/index.js"), "export {};\n").unwrap();
        std::fs::write(astro.join("dist/core/build/index.js"), "export {};\n").unwrap();
        let cli = cli_body.unwrap_or(
            r#"import { mkdirSync, writeFileSync } from 'node:fs';
export async function cli(argv) {
  mkdirSync('dist', { recursive: true });
  writeFileSync('dist/index.html', JSON.stringify({
    argv: argv.slice(1), execArgv: process.execArgv, pid: process.pid,
    event: process.env.npm_lifecycle_event,
  }));
}
"#,
        );
        std::fs::write(astro.join("dist/cli/index.js"), cli).unwrap();
        site
    }

    fn plan(words: &[&str]) -> Plan {
        Plan {
            argv: words.iter().map(|w| w.to_string()).collect(),
            env: vec![("npm_lifecycle_event".into(), "build".into())],
        }
    }

    fn start(site: &Path, plan: Plan) -> Option<PreparedBuild> {
        start_with_slots(site, plan, BuildSlots::new(2, 16))
    }

    fn start_with_slots(site: &Path, plan: Plan, slots: Arc<BuildSlots>) -> Option<PreparedBuild> {
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        PreparedBuild::start(
            plan,
            ("entry-1".into(), None),
            &site.join("node_modules"),
            Jail::open(site),
            site,
            permit,
            slots,
        )
    }

    /// Gone, or a zombie nobody has reaped yet: either way it runs no more.
    fn ended(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    async fn wait_ended(pid: i32) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if ended(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Build `plan` in `prepared`; it must succeed in that very process. Returns its output
    /// and what the fake Astro saw.
    async fn build_in_it(
        prepared: PreparedBuild,
        plan: &Plan,
        site: &Path,
    ) -> (Logged, serde_json::Value) {
        let pid = prepared.pgid.expect("started");
        let out = prepared
            .build(
                plan,
                Some("entry-1"),
                Duration::from_secs(30),
                &CancellationToken::new(),
            )
            .await
            .unwrap()
            .expect("it built");
        assert!(out.success, "{}", out.tail);
        let seen: serde_json::Value =
            serde_json::from_slice(&std::fs::read(site.join("dist/index.html")).unwrap()).unwrap();
        assert_eq!(seen["pid"], pid, "another process built: {seen}");
        (out, seen)
    }

    #[tokio::test]
    async fn the_build_runs_in_the_process_started_ahead_as_the_astro_program_would() {
        let site = fake_site(None);
        let plan = plan(&["astro", "build", "--silent"]);
        let prepared = start(site.path(), plan.clone()).expect("an Astro build is prepared");
        let (out, seen) = build_in_it(prepared, &plan, site.path()).await;
        let bin = site.path().join("node_modules/.bin/astro");
        assert_eq!(
            seen["argv"],
            serde_json::json!([bin.to_str().unwrap(), "build", "--silent"])
        );
        assert_eq!(seen["execArgv"], serde_json::json!([]), "{seen}");
        assert_eq!(seen["event"], "build");
        assert!(!out.tail.contains(LOADED), "{}", out.tail);
    }

    /// Loading takes a build slot; when the build's turn comes first, its own slot covers it.
    #[tokio::test]
    async fn a_build_whose_turn_comes_before_a_free_slot_loads_astro_itself() {
        let site = fake_site(None);
        let plan = plan(&["astro", "build"]);
        let slots = BuildSlots::new(1, 16);
        let held = slots
            .for_build(&tokio_util::sync::CancellationToken::new(), None)
            .await
            .unwrap();
        let prepared = start_with_slots(site.path(), plan.clone(), slots.clone()).unwrap();
        build_in_it(prepared, &plan, site.path()).await;
        // The loading never took the slot the test holds, and holds none now.
        assert_eq!(slots.free(), 0);
        drop(held);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn a_changed_script_or_store_entry_is_not_built_and_its_process_ends() {
        let site = fake_site(None);
        let prepared_for = plan(&["astro", "build"]);
        for (plan, key) in [
            (plan(&["astro", "build", "--force"]), Some("entry-1")),
            (prepared_for.clone(), Some("entry-2")),
            (prepared_for.clone(), None),
        ] {
            let prepared = start(site.path(), prepared_for.clone()).unwrap();
            let pid = prepared.pgid.unwrap();
            let used = prepared
                .build(
                    &plan,
                    key,
                    Duration::from_secs(30),
                    &CancellationToken::new(),
                )
                .await
                .unwrap();
            assert!(used.is_none(), "{plan:?} {key:?}");
            assert!(wait_ended(pid).await, "the unused process {pid} lives on");
        }
        assert!(!site.path().join("dist").exists());
    }

    #[tokio::test]
    async fn a_process_that_cannot_load_astro_leaves_the_build_to_the_usual_way() {
        let site = fake_site(Some("throw new Error('not this Astro');\n"));
        let plan = plan(&["astro", "build"]);
        let prepared = start(site.path(), plan.clone()).unwrap();
        let used = prepared
            .build(
                &plan,
                Some("entry-1"),
                Duration::from_secs(30),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        assert!(used.is_none());
    }

    #[tokio::test]
    async fn a_dropped_prepared_build_ends_its_process() {
        let site = fake_site(None);
        let prepared = start(site.path(), plan(&["astro", "build"])).unwrap();
        let pid = prepared.pgid.unwrap();
        assert!(!ended(pid));
        drop(prepared);
        assert!(
            wait_ended(pid).await,
            "process {pid} outlived its prepared build"
        );
    }

    #[test]
    fn only_the_astro_program_of_the_store_entry_is_started_ahead() {
        let site = fake_site(None);
        let modules = site.path().join("node_modules");
        assert!(astro_cli(&modules, &plan(&["astro", "build"])).is_some());
        for other in [&["vite", "build"][..], &["node", "build.mjs"], &[]] {
            assert_eq!(astro_cli(&modules, &plan(other)), None, "{other:?}");
        }
        // A package named astro whose `astro` program is something else.
        std::fs::write(
            modules.join("astro/package.json"),
            r#"{"name":"astro","bin":{"astro":"bin/other.js"}}"#,
        )
        .unwrap();
        assert_eq!(astro_cli(&modules, &plan(&["astro", "build"])), None);
    }
}
