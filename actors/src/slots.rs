//! The process's limits on how much work runs at once, as places a job holds while its work
//! runs (`Slot`: dropping it frees the place).
//!
//! Build slots have one more rule (`BuildSlots`): a build started ahead loads Astro in a build
//! slot only when no build is waiting for one. Loading ahead is work that could be done later;
//! a waiting build is a client waiting. With a plain first-come queue, twenty loads queued
//! during the agents' turns held both slots for seconds after the agents ended, while the
//! builds of the processes already loaded waited behind them (measured: no build started for
//! 11 s after the agents were done).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::job::StopSignal;

/// A place under one of the process's limits, held while the work runs; dropping it frees
/// the place.
pub(crate) struct Slot {
    /// `None` only inside `drop`, which frees the place before telling `freed`.
    permit: Option<OwnedSemaphorePermit>,
    /// Told once the place is free again (build slots: loads ahead wait for it).
    freed: Option<Arc<Notify>>,
    /// How long the job waited for it (ms), reported as `durationsMs.queued`, apart from the
    /// work.
    pub(crate) waited_ms: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(freed) = &self.freed {
            freed.notify_waiters();
        }
    }
}

/// Wait for a slot of `slots`, unless the job is stopped first (an interrupt must not wait
/// for another client's work to end).
pub(crate) async fn wait_for_slot(slots: &Arc<Semaphore>, stop: &StopSignal) -> Option<Slot> {
    let asked = Instant::now();
    let permit = match slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = stop.token().cancelled() => return None,
        },
    };
    Some(Slot {
        permit: Some(permit),
        freed: None,
        waited_ms: asked.elapsed().as_millis() as u64,
    })
}

/// `BUILD_CONCURRENCY`: builds at once over all workspaces (a build is CPU-bound: more builds
/// than cores only make each slower), shared with builds started ahead while they load Astro.
/// A waiting build goes before every load (see the module's text).
#[derive(Debug)]
pub struct BuildSlots {
    slots: Arc<Semaphore>,
    /// Builds waiting for a slot now: while there is one, no load takes a slot.
    builds_waiting: AtomicUsize,
    /// Told when a slot is freed or the last waiting build got one (or gave up): a load may
    /// take a slot then.
    changed: Arc<Notify>,
}

/// A build's place in the wait, counted in `builds_waiting` until dropped.
struct Waiting<'a>(&'a BuildSlots);

impl<'a> Waiting<'a> {
    fn enter(slots: &'a BuildSlots) -> Waiting<'a> {
        slots.builds_waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(slots)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.0.builds_waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

impl BuildSlots {
    pub fn new(count: usize) -> Arc<BuildSlots> {
        Arc::new(BuildSlots {
            slots: Arc::new(Semaphore::new(count.max(1))),
            builds_waiting: AtomicUsize::new(0),
            changed: Arc::new(Notify::new()),
        })
    }

    /// A slot for one build; `None` when the job is stopped while waiting. Builds are served
    /// in the order they asked, before any load.
    pub(crate) async fn for_build(&self, stop: &StopSignal) -> Option<Slot> {
        let _waiting = Waiting::enter(self);
        let mut slot = wait_for_slot(&self.slots, stop).await?;
        slot.freed = Some(self.changed.clone());
        Some(slot)
    }

    /// A slot to load Astro ahead of a build, once one is free and no build waits for it.
    /// A freed slot goes to the builds queued for it first (the semaphore hands it to its
    /// waiters), so a load never takes a slot a waiting build could have.
    pub(crate) async fn for_loading(&self) -> Slot {
        let asked = Instant::now();
        loop {
            // Registered before looking, so that a change between the look and the wait is
            // not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.builds_waiting.load(Ordering::SeqCst) == 0
                && let Ok(permit) = self.slots.clone().try_acquire_owned()
            {
                return Slot {
                    permit: Some(permit),
                    freed: Some(self.changed.clone()),
                    waited_ms: asked.elapsed().as_millis() as u64,
                };
            }
            changed.await;
        }
    }

    /// Slots free now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_waiting_build_gets_a_freed_slot_before_a_load_that_waited_longer() {
        let slots = BuildSlots::new(1);
        let stop = StopSignal::default();
        let running = slots.for_build(&stop).await.unwrap();
        // A load asks first, then a build.
        let load = tokio::spawn({
            let slots = slots.clone();
            async move { slots.for_loading().await }
        });
        settle().await;
        let build = tokio::spawn({
            let slots = slots.clone();
            async move { slots.for_build(&StopSignal::default()).await }
        });
        settle().await;
        drop(running);
        let build_slot = tokio::time::timeout(Duration::from_secs(5), build)
            .await
            .expect("the build got the freed slot")
            .unwrap()
            .unwrap();
        settle().await;
        assert!(
            !load.is_finished(),
            "the load took a slot while a build held the only one"
        );
        // Once no build waits and a slot is free, the load gets it.
        drop(build_slot);
        let load_slot = tokio::time::timeout(Duration::from_secs(5), load)
            .await
            .expect("the load got the slot once free")
            .unwrap();
        assert_eq!(slots.free(), 0);
        drop(load_slot);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn a_load_takes_a_free_slot_at_once_when_no_build_waits() {
        let slots = BuildSlots::new(2);
        let _build = slots.for_build(&StopSignal::default()).await.unwrap();
        let load = tokio::time::timeout(Duration::from_secs(5), slots.for_loading())
            .await
            .expect("a free slot");
        assert_eq!(slots.free(), 0);
        drop(load);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn a_build_that_stops_waiting_lets_the_loads_go() {
        let slots = BuildSlots::new(1);
        let running = slots.for_build(&StopSignal::default()).await.unwrap();
        let stop = StopSignal::default();
        let build = tokio::spawn({
            let (slots, stop) = (slots.clone(), stop.clone());
            async move { slots.for_build(&stop).await.is_none() }
        });
        let load = tokio::spawn({
            let slots = slots.clone();
            async move { slots.for_loading().await }
        });
        settle().await;
        stop.token().cancel();
        assert!(build.await.unwrap(), "the stopped build got no slot");
        drop(running);
        tokio::time::timeout(Duration::from_secs(5), load)
            .await
            .expect("the load got the slot the stopped build no longer waits for")
            .unwrap();
    }
}
