//! What every job of the process shares (`WorkerContext`): the configuration, the way messages
//! end (`Delivery`), the stores, and the process-wide limits on how much work runs at once.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::batch::stop::StopSignal;
use crate::config::WorkerConfig;
use crate::contract::message::WorkspaceKey;
use crate::delivery::Delivery;
use crate::delivery::lease::Leases;
use crate::delivery::notices::NoticeSender;
use crate::delivery::threads::ThreadStore;
use crate::steps::slots::{Slot, wait_for_slot};

/// What every job of the process shares.
pub struct WorkerContext {
    pub(crate) config: WorkerConfig,
    pub(crate) delivery: Delivery,
    /// CloudFront, when some client's bucket has a distribution.
    pub(crate) invalidator: Option<crate::steps::publish::invalidate::Invalidator>,
    /// Agent runs at once over all workspaces (`AGENT_CONCURRENCY`). An agent run mostly waits
    /// on the model, so the limit is high: it bounds the agent processes alive at once and
    /// their memory, not CPU.
    agent_slots: Arc<Semaphore>,
    /// The build as the build actors run it; its dependency store is the one they share, so
    /// that installing ahead of a build (while the agent runs) installs each lock file once.
    pub(crate) build: crate::steps::build::BuildSpec,
    /// Workspace leases: one worker at a time per workspace (granted at once when alone).
    pub(crate) leases: Leases,
    /// Notices to other workers (`None` when alone).
    pub(crate) notices: Option<NoticeSender>,
    /// This worker's notice queue, where a holder answers `Released`.
    pub(crate) notice_url: Option<String>,
    /// Which conversation each thread has, and the agent's conversation files when shared.
    pub(crate) threads: ThreadStore,
    /// Where the agent keeps its conversation files (`CLAUDE_CONFIG_DIR`), when known. With
    /// isolation each workspace has its own folder under it (`agent_config_dir_for`).
    agent_config_dir: Option<std::path::PathBuf>,
    /// Where tenants' code runs (`ISOLATION`); off until the worker sets what it detected.
    pub(crate) sandbox: Arc<crate::tenant::sandbox::Sandbox>,
    /// The browser check after each publish (`BROWSER_CHECK`); `None`: publishes are not
    /// checked (off, or no Chromium found).
    pub(crate) checker: Option<Arc<crate::steps::check::Checker>>,
}

impl WorkerContext {
    /// The agent's `CLAUDE_CONFIG_DIR` for workspace `key`.
    pub(crate) fn agent_config_dir_for(&self, key: &WorkspaceKey) -> Option<std::path::PathBuf> {
        let base = self.agent_config_dir.as_deref()?;
        Some(self.sandbox.agent_config_dir(base, key))
    }

    pub(crate) fn new(
        config: WorkerConfig,
        delivery: Delivery,
        invalidator: Option<crate::steps::publish::invalidate::Invalidator>,
        build: crate::steps::build::BuildSpec,
    ) -> WorkerContext {
        let threads = ThreadStore::for_worker(&config.workspace_root, &delivery.records);
        // The agent gets the worker's own CLAUDE_CONFIG_DIR when it has one (`agent_env`).
        let agent_config_dir = std::env::var_os("CLAUDE_CONFIG_DIR")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| config.agent.config_dir.clone());
        WorkerContext {
            invalidator,
            build,
            leases: Leases::alone(),
            notices: None,
            notice_url: None,
            threads,
            sandbox: crate::tenant::sandbox::Sandbox::off(&config.workspace_root),
            agent_config_dir,
            checker: None,
            agent_slots: Arc::new(Semaphore::new(config.agent_concurrency.max(1))),
            config,
            delivery,
        }
    }

    /// A slot for one agent run; `None` when the job is stopped while waiting.
    pub(crate) async fn agent_slot(&self, stop: &StopSignal) -> Option<Slot> {
        wait_for_slot(&self.agent_slots, stop.token()).await
    }

    /// A slot for one build (`BUILD_CONCURRENCY`, shared with the builds started ahead,
    /// which load Astro in one); `None` when the job is stopped while waiting. `prepared`:
    /// its process started ahead, whose build goes first once Astro is loaded in it.
    pub(crate) async fn build_slot(
        &self,
        stop: &StopSignal,
        prepared: Option<&crate::steps::build::prepared_build::PreparedBuild>,
    ) -> Option<Slot> {
        let loaded = prepared.map(|p| p.loaded());
        self.build.slots.for_build(stop.token(), loaded).await
    }
}
