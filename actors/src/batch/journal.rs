//! `Journal`: a batch's record of what happened while it ran (phase times, the commit, the
//! agent's report and cost, the publish), from which each message's terminal event is built
//! (`outcome.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::contract::status::PublishReport;
use crate::steps::agent::AgentReport;
use crate::steps::slots::Slot;

/// What happened to a batch, for its terminal events.
#[derive(Default)]
pub(crate) struct Journal {
    pub(crate) durations: BTreeMap<String, u64>,
    pub(crate) commit: Option<String>,
    /// The thread's branch was checked out. Only from then on can the worktree hold work to
    /// save: a batch that failed before (a clone that could not reach the upstream) leaves no
    /// checkout and no work, and its messages end as they would without a save.
    pub(crate) checked_out: bool,
    /// The last agent run's report.
    pub(crate) agent: Option<AgentReport>,
    /// What this batch's agent runs cost (the difference of the conversation's totals).
    pub(crate) cost_usd: Option<f64>,
    /// The message that reports the cost: the first one the agent ran for. The others of a
    /// coalesced batch report 0 and name it, so that costs add up across events.
    pub(crate) cost_payer: Option<String>,
    /// The thread's conversation was gone and a new one was started.
    pub(crate) conversation_restarted: bool,
    /// Messages of the batch that came too late: sent before a newer message of their thread
    /// that has already ended. They are not applied on top of the newer work.
    pub(crate) superseded: BTreeSet<String>,
    pub(crate) turns: u64,
    /// Times the agent was resumed to repair a build its edit broke.
    pub(crate) build_repairs: u32,
    /// Progress events sent so far (their sequence numbers).
    pub(crate) progress_sent: u64,
    /// The CDN invalidation made after the publish.
    pub(crate) invalidation_id: Option<String>,
    pub(crate) published: Option<PublishReport>,
    /// What a rollback went back to.
    pub(crate) rolled_back_to: Option<crate::steps::publish::deploys::RolledBackTo>,
    /// The browser check of what was published last (after a repair, the check after it).
    pub(crate) check: Option<crate::contract::check_report::CheckReport>,
    /// The thread's document (mark, conversation) as read at the batch's start and written
    /// since; written once more at its end (`agent_turn::record_thread`).
    pub(crate) thread: Option<crate::delivery::records::ThreadState>,
    /// The conversation this batch's agent runs left, written with the batch's end.
    pub(crate) conversation: Option<crate::delivery::records::ThreadRecord>,
    /// Where saved work was kept upstream when its branch could not be pushed
    /// (`refs/edit-worker/saved/…`): the events' `savedRef`.
    pub(crate) saved_ref: Option<String>,
    /// The batch's lease check, which every write of its records carries (fences).
    pub(crate) fence: Option<crate::delivery::lease_check::LeaseCheck>,
}

impl Journal {
    /// Whether the thread's mark, as this batch wrote it, already covers a message sent at
    /// `sent_ms`: then its ending needs no mark write of its own.
    pub(crate) fn mark_covers(&self, sent_ms: u64) -> bool {
        self.thread
            .as_ref()
            .is_some_and(|t| t.existed && t.doc.newest_sent_ms >= sent_ms)
    }
}

impl Journal {
    /// Add the time since `started` to `phase`.
    pub(crate) fn time(&mut self, phase: &str, started: Instant) {
        self.add(phase, started.elapsed().as_millis() as u64);
    }

    /// Add `ms` to `phase`.
    pub(crate) fn add(&mut self, phase: &str, ms: u64) {
        *self.durations.entry(phase.into()).or_default() += ms;
    }

    /// Time spent waiting for `slot` goes to `durationsMs.queued`, apart from the work.
    pub(crate) fn waited_for(&mut self, slot: &Slot) {
        if slot.waited_ms > 0 {
            self.add("queued", slot.waited_ms);
        }
    }
}
