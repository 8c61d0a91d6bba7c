//! # The build folder
//!
//! Owns building a site: dependencies (`npm_store/`, or `npm ci` in the checkout), Astro started
//! ahead (`prepared_build`), `npm run` without npm (`package_script`), and how every install and
//! build process runs (`logged_run`). Knows no other step.
//!
//! # The build
//!
//! Builds the site: its dependencies first, then the build command (argv words, no shell).
//! Dependencies come from the shared store (`npm_store`: one `npm ci` per distinct lock file,
//! linked into the workspace) or, with `INSTALL_MODE=per-workspace` or a site whose install
//! depends on its own files, from `npm ci` in the workspace when `node_modules` is missing or
//! the lock file changed. Installs and builds run in their own process group with a time limit,
//! and can be cancelled; a failure keeps the tail of the log for the status event.

pub(crate) mod logged_run;
pub mod npm_store;
pub(crate) mod package_script;
pub(crate) mod prepared_build;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use md5::{Digest, Md5};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use tokio::sync::Semaphore;

use crate::config::{BuildSettings, WorkerConfig};
use crate::contract::message::WorkspaceKey;
pub(crate) use crate::steps::build::logged_run::BuildError;
use crate::steps::build::logged_run::run_logged;
use crate::steps::build::npm_store::{INSTALL_STAMP, NpmStore, SiteFiles};
use crate::steps::build::prepared_build::{Plan, PreparedBuild};
use crate::steps::slots::BuildSlots;
use crate::tenant::sandbox::{Jail, Sandbox};
use crate::tenant::tenant_fs;

#[derive(Debug, Clone)]
pub(crate) struct BuildSpec {
    /// What the configuration says (`BUILD_*`).
    pub(crate) settings: BuildSettings,
    /// The shared dependency store; `None`: `npm ci` in each workspace (`INSTALL_MODE=per-workspace`).
    pub(crate) store: Option<NpmStore>,
    /// `BUILD_AHEAD_MAX`: builds whose Node process may wait, started ahead, at once (each
    /// holds about 150 MB while it waits; shared by every build actor). `None`: never.
    pub(crate) ahead: Option<Arc<Semaphore>>,
    /// `BUILD_CONCURRENCY`: builds at once. Held by each build (`WorkerContext::build_slot`),
    /// and by a build started ahead while it loads Astro, when no build waits.
    pub(crate) slots: Arc<BuildSlots>,
}

impl BuildSpec {
    /// The build as configured; the store is shared by every build actor made from this spec.
    /// Shared installs run in `sandbox` as the store's own user.
    pub(crate) fn from_config(
        config: &WorkerConfig,
        sandbox: std::sync::Arc<Sandbox>,
    ) -> BuildSpec {
        let settings = &config.npm_store;
        BuildSpec {
            settings: config.build.clone(),
            ahead: (config.build.ahead_max > 0)
                .then(|| Arc::new(Semaphore::new(config.build.ahead_max))),
            // An unloaded build waits for at most as many loaded ones as can wait at once.
            slots: BuildSlots::new(config.build.concurrency, config.build.ahead_max),
            store: settings.shared.then(|| {
                NpmStore::new(
                    settings.dir_under(&config.workspace_root),
                    settings.clone(),
                    config.build.timeout,
                    sandbox.clone(),
                )
            }),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct BuildReport {
    /// `npm ci` ran for this build (in the workspace, or into the shared store), and how long
    /// it took. `None`: the dependencies were already there.
    pub(crate) install_ms: Option<u64>,
    pub(crate) build_ms: u64,
    /// The shared store entry the build used (`node{major}-{os}-{arch}-{digest}`).
    pub(crate) store_key: Option<String>,
    /// Checking the store entry (before and after the build) and linking it into the workspace.
    pub(crate) link_ms: Option<u64>,
    /// Time spent waiting for another build's install of the same store entry.
    pub(crate) install_wait_ms: Option<u64>,
}

/// Install (when needed) and build the site in `dir`. `state_dir` keeps the install stamp.
pub(crate) async fn build_site(
    spec: &BuildSpec,
    jail: &Jail,
    dir: &Path,
    state_dir: &Path,
    prepared: Option<PreparedBuild>,
    cancel: &CancellationToken,
) -> Result<BuildReport, BuildError> {
    let mut report = BuildReport::default();
    let shared = match &spec.store {
        Some(store) => {
            shared_dependencies(store, spec, dir, state_dir, cancel, &mut report).await?
        }
        None => None,
    };
    if shared.is_none() {
        // The jail was handed over when it was made, just before this build.
        install_in_workspace(spec, jail, dir, state_dir, cancel, &mut report).await?;
    }
    if shared.is_some() {
        // The worker made the store's links since the jail was handed over: they become the
        // tenant's too. (An install in the workspace ran as the tenant already.)
        jail.hand_over().await?;
    }
    let store_key = shared.as_ref().map(|acquired| acquired.key.as_str());
    let built = run_build(spec, jail, dir, prepared, store_key, cancel, &mut report).await;
    if let (Some(store), Some(acquired)) = (&spec.store, &shared) {
        // Also when the build failed: a changed entry must not be loaded by anyone else.
        let started = Instant::now();
        store.verify_unchanged(acquired).await?;
        let ms = started.elapsed().as_millis() as u64;
        report.link_ms = Some(report.link_ms.unwrap_or(0) + ms);
        tracing::info!(
            store_key = %acquired.key,
            link_ms = report.link_ms,
            "the shared dependencies are unchanged after the build"
        );
    }
    built?;
    Ok(report)
}

/// The dependencies from the shared store, when the site has a lock file and its install
/// does not depend on its own files. `None`: the workspace installs its own.
async fn shared_dependencies(
    store: &NpmStore,
    spec: &BuildSpec,
    dir: &Path,
    state_dir: &Path,
    cancel: &CancellationToken,
    report: &mut BuildReport,
) -> Result<Option<npm_store::Acquired>, BuildError> {
    let Some(files) = shareable_files(dir).await? else {
        return Ok(None);
    };
    let started = Instant::now();
    let acquired = store
        .acquire(files, spec.settings.timeout, cancel)
        .instrument(tracing::info_span!("dependencies from the shared store"))
        .await?;
    store.link(&acquired, dir, state_dir).await?;
    report.install_ms = acquired.installed_ms;
    report.install_wait_ms = acquired.waited_ms;
    let elapsed = started.elapsed().as_millis() as u64;
    report.link_ms = Some(
        elapsed
            .saturating_sub(acquired.installed_ms.unwrap_or(0))
            .saturating_sub(acquired.waited_ms.unwrap_or(0)),
    );
    report.store_key = Some(acquired.key.clone());
    Ok(Some(acquired))
}

/// What was done for a build ahead of its turn.
#[derive(Debug, Default)]
pub(crate) struct Prefetched {
    /// How long `npm ci` took, when it ran.
    pub(crate) installed_ms: Option<u64>,
    /// The build's Node process, loading Astro (`prepared_build`), for the build to use.
    pub(crate) prepared: Option<PreparedBuild>,
}

/// Install the site's dependencies into the shared store ahead of its build (for instance while
/// the agent runs), so that the build only checks and links them; and, within
/// `BUILD_AHEAD_MAX`, start the build's Node process so that it loads Astro meanwhile. Does
/// nothing with `INSTALL_MODE=per-workspace`, for a site without a lock file, or for one whose
/// install depends on its own files. Should the agent change the lock file or the build
/// script, the build installs the new one itself and starts its own process.
pub(crate) async fn prefetch_dependencies(
    spec: &BuildSpec,
    sandbox: &Arc<Sandbox>,
    workspace: &WorkspaceKey,
    dir: &Path,
    cancel: &CancellationToken,
) -> Result<Prefetched, BuildError> {
    let Some(store) = &spec.store else {
        return Ok(Prefetched::default());
    };
    let Some(files) = shareable_files(dir).await? else {
        return Ok(Prefetched::default());
    };
    let acquired = store
        .acquire(files, spec.settings.timeout, cancel)
        .instrument(tracing::info_span!("prefetch dependencies"))
        .await?;
    let installed_ms = acquired.installed_ms;
    let prepared = prepare(spec, store, acquired, sandbox, workspace, dir).await;
    Ok(Prefetched {
        installed_ms,
        prepared,
    })
}

/// The build's Node process started ahead, when the build allows it (`prepared_build`) and
/// one of `BUILD_AHEAD_MAX` is free (never waited for).
async fn prepare(
    spec: &BuildSpec,
    store: &NpmStore,
    acquired: npm_store::Acquired,
    sandbox: &Arc<Sandbox>,
    workspace: &WorkspaceKey,
    dir: &Path,
) -> Option<PreparedBuild> {
    let permit = spec.ahead.as_ref()?.clone().try_acquire_owned().ok()?;
    let script = spec
        .settings
        .scripts_without_npm
        .then(|| package_script::direct(&spec.settings.command, dir))??;
    let jail = match sandbox.jail_as_handed_over(workspace, dir).await {
        Ok(jail) => jail,
        Err(e) => {
            tracing::warn!(error = %e, "no sandbox for a build ahead; it runs the usual way");
            return None;
        }
    };
    // Without namespaces, the end of the agent's run ends every process of the tenant's uid.
    if !jail.outlives_other_runs() {
        return None;
    }
    let modules = store.modules_of(&acquired.key);
    let entry = (acquired.key.clone(), Some(acquired));
    let slots = spec.slots.clone();
    PreparedBuild::start(script.into(), entry, &modules, jail, dir, permit, slots)
}

/// The files the shared store needs, or `None` when the site has no lock file or its install
/// depends on its own files.
async fn shareable_files(dir: &Path) -> Result<Option<SiteFiles>, BuildError> {
    let Some(lock) = read_optional(dir, "package-lock.json").await? else {
        return Ok(None);
    };
    let package_json = read_optional(dir, "package.json")
        .await?
        .unwrap_or_default();
    if let Some(reason) = npm_store::unshareable_reason(&lock, &package_json) {
        tracing::info!(
            reason,
            "installing this site's dependencies in its workspace"
        );
        return Ok(None);
    }
    Ok(Some(SiteFiles {
        lock,
        package_json,
        npmrc: read_optional(dir, ".npmrc").await?,
    }))
}

/// The site file `name` in the checkout `dir`, `None` when it does not exist. The worker reads
/// it as root, so through `tenant_fs`: a link (to `.git/config`, `/proc/self/environ`,
/// `/dev/zero`...), a file of another kind or one past `SITE_FILE_MAX_BYTES` is refused.
pub(crate) async fn read_optional(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, BuildError> {
    let (dir, name) = (dir.to_owned(), PathBuf::from(name));
    tokio::task::spawn_blocking(move || {
        tenant_fs::read_in(&dir, &name, tenant_fs::SITE_FILE_MAX_BYTES)
    })
    .await
    .map_err(|e| BuildError::Io(std::io::Error::other(e)))?
    .map_err(BuildError::from_site_file)
}

impl BuildError {
    /// A refusal of what the tenant put there, or an I/O failure of the worker's own.
    fn from_site_file(e: tenant_fs::TenantFileError) -> BuildError {
        match e {
            tenant_fs::TenantFileError::Io { path, source } => BuildError::Io(std::io::Error::new(
                source.kind(),
                format!("{}: {source}", path.display()),
            )),
            refused => BuildError::UnsafeSiteFile(refused),
        }
    }
}

/// `npm ci` in the workspace when `node_modules` is missing or the lock file changed.
async fn install_in_workspace(
    spec: &BuildSpec,
    jail: &Jail,
    dir: &Path,
    state_dir: &Path,
    cancel: &CancellationToken,
    report: &mut BuildReport,
) -> Result<(), BuildError> {
    // `node_modules` made of links into the store: this install starts from scratch.
    if tokio::fs::remove_file(state_dir.join(npm_store::LINK_STAMP))
        .await
        .is_ok()
    {
        // The tenant's folder, removed by handle like every one of its paths.
        remove_site_path(dir, Path::new("node_modules")).await?;
        let _ = tokio::fs::remove_file(state_dir.join(INSTALL_STAMP)).await;
    }
    if let Some(lock_hash) = install_needed(dir, state_dir).await? {
        let started = Instant::now();
        let argv = ["npm", "ci", "--no-audit", "--no-fund"].map(String::from);
        let out = run_logged(&argv, &[], jail, dir, spec.settings.timeout, cancel)
            .instrument(tracing::info_span!("install dependencies"))
            .await?;
        if !out.success {
            return Err(BuildError::InstallFailed {
                status: out.status,
                log_tail: out.tail,
            });
        }
        tokio::fs::create_dir_all(state_dir).await?;
        tokio::fs::write(state_dir.join(INSTALL_STAMP), lock_hash).await?;
        report.install_ms = Some(started.elapsed().as_millis() as u64);
    }
    Ok(())
}

async fn run_build(
    spec: &BuildSpec,
    jail: &Jail,
    dir: &Path,
    prepared: Option<PreparedBuild>,
    store_key: Option<&str>,
    cancel: &CancellationToken,
    report: &mut BuildReport,
) -> Result<(), BuildError> {
    if spec.settings.command.is_empty() {
        return Err(BuildError::EmptyCommand);
    }
    let started = Instant::now();
    // A stale output folder could hide a build that wrote nothing: start from empty.
    clear_output(dir, &spec.settings.output_dir).await?;
    // npm's start-up is half a second of every build; skipped where it would add nothing.
    let direct = spec
        .settings
        .scripts_without_npm
        .then(|| package_script::direct(&spec.settings.command, dir))
        .flatten();
    let plan = match direct {
        Some(script) => Plan::from(script),
        None => Plan {
            argv: spec.settings.command.clone(),
            env: Vec::new(),
        },
    };
    let span = tracing::info_span!(
        "build site",
        command = %plan.argv.join(" "),
        started_ahead = tracing::field::Empty
    );
    let ahead = match prepared {
        Some(prepared) => {
            prepared
                .build(&plan, store_key, spec.settings.timeout, cancel)
                .instrument(span.clone())
                .await?
        }
        None => None,
    };
    span.record("started_ahead", ahead.is_some());
    let out = match ahead {
        Some(out) => out,
        None => {
            run_logged(
                &plan.argv,
                &plan.env,
                jail,
                dir,
                spec.settings.timeout,
                cancel,
            )
            .instrument(span)
            .await?
        }
    };
    if !out.success {
        return Err(BuildError::BuildFailed {
            status: out.status,
            log_tail: out.tail,
        });
    }
    report.build_ms = started.elapsed().as_millis() as u64;
    Ok(())
}

/// `Some(hash of package-lock.json)` when `npm ci` must run: a lock file exists and either
/// `node_modules` is missing or the lock changed since the last install.
async fn install_needed(dir: &Path, state_dir: &Path) -> Result<Option<String>, BuildError> {
    let Some(lock) = read_optional(dir, "package-lock.json").await? else {
        return Ok(None);
    };
    let hash = format!("{:x}", Md5::digest(&lock));
    let installed = tokio::fs::read_to_string(state_dir.join(INSTALL_STAMP))
        .await
        .unwrap_or_default();
    Ok((!has_modules(dir).await? || installed.trim() != hash).then_some(hash))
}

/// The checkout `dir` has a `node_modules` folder of its own: a link there (to a folder
/// elsewhere, which the tenant may have made) is no install, and is not followed to find out.
async fn has_modules(dir: &Path) -> Result<bool, BuildError> {
    let dir = dir.to_owned();
    let stat =
        tokio::task::spawn_blocking(move || tenant_fs::stat_in(&dir, Path::new("node_modules")))
            .await
            .map_err(|e| BuildError::Io(std::io::Error::other(e)))?
            .map_err(BuildError::from_site_file)?;
    Ok(stat.is_some_and(|stat| tenant_fs::is_dir(&stat)))
}

/// Empty the build's output folder `output_dir` (relative, inside the checkout `dir`) before
/// the build. The checkout is the tenant's: a folder on the way (`site` of `site/dist`) made a
/// link is refused (`unsafe_site_file`) and nothing behind it removed; a link at the end is
/// removed itself.
async fn clear_output(dir: &Path, output_dir: &Path) -> Result<(), BuildError> {
    remove_site_path(dir, output_dir).await
}

/// Remove `rel` from the checkout `dir` through `tenant_fs::remove_in` (by handle, no link
/// followed on the way).
async fn remove_site_path(dir: &Path, rel: &Path) -> Result<(), BuildError> {
    let (dir, rel) = (dir.to_owned(), rel.to_owned());
    tokio::task::spawn_blocking(move || tenant_fs::remove_in(&dir, &rel))
        .await
        .map_err(|e| BuildError::Io(std::io::Error::other(e)))?
        .map_err(BuildError::from_site_file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A checkout with a lock file, its install stamp current, and an `outside` folder beside it.
    fn checkout_with_stamp() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (checkout, state, outside) = (
            dir.path().join("checkout"),
            dir.path().join("state"),
            dir.path().join("outside"),
        );
        for d in [&checkout, &state, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(checkout.join("package-lock.json"), b"{}").unwrap();
        let hash = format!("{:x}", Md5::digest(b"{}"));
        std::fs::write(state.join(INSTALL_STAMP), hash).unwrap();
        (dir, checkout, state, outside)
    }

    #[tokio::test]
    async fn node_modules_linked_elsewhere_is_no_install() {
        let (_dir, checkout, state, outside) = checkout_with_stamp();
        std::fs::create_dir(checkout.join("node_modules")).unwrap();
        assert_eq!(install_needed(&checkout, &state).await.unwrap(), None);
        std::fs::remove_dir(checkout.join("node_modules")).unwrap();
        // The tenant's link to a folder outside: not followed, so not taken for an install.
        std::fs::create_dir(outside.join("node_modules")).unwrap();
        symlink(outside.join("node_modules"), checkout.join("node_modules")).unwrap();
        assert!(install_needed(&checkout, &state).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn clearing_a_nested_output_never_removes_behind_a_linked_parent() {
        let (_dir, checkout, _state, outside) = checkout_with_stamp();
        std::fs::create_dir_all(outside.join("out")).unwrap();
        std::fs::write(outside.join("out/keep"), "not the tenant's").unwrap();
        symlink(&outside, checkout.join("site")).unwrap();
        let err = clear_output(&checkout, Path::new("site/out"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "unsafe_site_file", "{err}");
        assert!(
            outside.join("out/keep").is_file(),
            "removed through the link"
        );
        // A real output folder is emptied, a link in its place removed as the link only.
        std::fs::create_dir_all(checkout.join("dist/x")).unwrap();
        clear_output(&checkout, Path::new("dist")).await.unwrap();
        assert!(!checkout.join("dist").exists());
        symlink(&outside, checkout.join("dist")).unwrap();
        clear_output(&checkout, Path::new("dist")).await.unwrap();
        assert!(outside.join("out/keep").is_file() && !checkout.join("dist").exists());
        clear_output(&checkout, Path::new("dist")).await.unwrap();
    }
}
