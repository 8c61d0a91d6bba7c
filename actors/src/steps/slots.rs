//! The process's limits on how much work runs at once, as places a job holds while its work
//! runs (`Slot`: dropping it frees the place).
//!
//! Build slots are handed out by rule, not first come (`BuildSlots`), because their waiters
//! differ in how much work they still have and in whether a client waits on them:
//! - A build started ahead loads Astro in a slot only when no build is waiting for one.
//!   Loading ahead is work that could be done later; a waiting build is a client waiting.
//!   With a plain first-come queue, twenty loads queued during the agents' turns held both
//!   slots for seconds after the agents ended, while loaded builds waited behind them.
//! - A build whose process has Astro loaded already (about 2.4 of a small site's 4.2
//!   CPU-seconds left) goes before an older build that must still load it: when twenty agents
//!   end at once, half of them loaded, the loaded half is live first instead of every client
//!   waiting for a mix (measured: the 10th build done 21 s after the agents, loaded and
//!   unloaded builds taking turns). Shortest first could starve the others, so an unloaded
//!   build is overtaken at most `overtake_limit` times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use tokio_util::sync::CancellationToken;

/// A place under one of the process's limits, held while the work runs; dropping it frees
/// the place.
pub(crate) struct Slot {
    held: Held,
    /// How long the job waited for it (ms), reported as `durationsMs.queued`, apart from the
    /// work.
    pub(crate) waited_ms: u64,
}

/// What a slot holds, and so what dropping it frees.
enum Held {
    /// Held, never read: dropping it gives the semaphore its permit back.
    Permit { _permit: OwnedSemaphorePermit },
    /// A build slot: dropping it hands it to the next waiter by `BuildSlots`' rule.
    Build(Arc<BuildSlots>),
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Held::Build(slots) = &self.held {
            slots.release();
        }
    }
}

/// Wait for a slot of `slots`, unless the job is stopped first (an interrupt must not wait
/// for another client's work to end).
pub(crate) async fn wait_for_slot(
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<Slot> {
    let asked = Instant::now();
    let permit = match slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = stop.cancelled() => return None,
        },
    };
    Some(Slot {
        held: Held::Permit { _permit: permit },
        waited_ms: asked.elapsed().as_millis() as u64,
    })
}

/// `BUILD_CONCURRENCY`: builds at once over all workspaces (a build is CPU-bound: more builds
/// than cores only make each slower), shared with builds started ahead while they load Astro.
/// Who gets a freed slot is the module's rule.
pub struct BuildSlots {
    state: Mutex<PoolState>,
    /// How many loaded builds may go before one older build that is not loaded.
    overtake_limit: u32,
}

#[derive(Default)]
struct PoolState {
    free: usize,
    /// Who waits, oldest first. Only while no slot is free: a free slot is taken at once.
    waiting: Vec<Waiter>,
    next_ticket: u64,
}

struct Waiter {
    ticket: u64,
    wants: Wants,
    /// Loaded builds that went before this one while it waited.
    overtaken: u32,
    grant: oneshot::Sender<Slot>,
}

#[derive(Debug)]
enum Wants {
    /// A build; `loaded` says, when asked at hand-out time, whether its process has Astro
    /// loaded already (`None`: it has no process started ahead).
    Build { loaded: Option<Arc<AtomicBool>> },
    /// Loading Astro ahead of a build.
    Load,
}

impl Waiter {
    fn is_build(&self) -> bool {
        matches!(self.wants, Wants::Build { .. })
    }

    fn is_loaded_build(&self) -> bool {
        matches!(&self.wants, Wants::Build { loaded: Some(l) } if l.load(Ordering::SeqCst))
    }
}

impl PoolState {
    /// The waiter a freed slot goes to, by the module's rule.
    fn next(&mut self, overtake_limit: u32) -> Option<Waiter> {
        let builds = || {
            self.waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| w.is_build())
        };
        let starved = builds()
            .find(|(_, w)| !w.is_loaded_build() && w.overtaken >= overtake_limit)
            .map(|(i, _)| i);
        let loaded = builds().find(|(_, w)| w.is_loaded_build()).map(|(i, _)| i);
        let oldest_build = builds().next().map(|(i, _)| i);
        let at = match (starved, loaded) {
            (Some(i), _) => i,
            (None, Some(i)) => {
                // Every older build it goes before was not loaded: one more overtake each.
                for w in &mut self.waiting[..i] {
                    if w.is_build() {
                        w.overtaken += 1;
                    }
                }
                i
            }
            // No loaded build waits: the oldest build, or else the oldest load.
            (None, None) => oldest_build.unwrap_or(0),
        };
        (at < self.waiting.len()).then(|| self.waiting.remove(at))
    }
}

impl std::fmt::Debug for BuildSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().expect("build slots poisoned");
        f.debug_struct("BuildSlots")
            .field("free", &state.free)
            .field("waiting", &state.waiting.len())
            .finish()
    }
}

impl BuildSlots {
    pub fn new(count: usize, overtake_limit: usize) -> Arc<BuildSlots> {
        Arc::new(BuildSlots {
            state: Mutex::new(PoolState {
                free: count.max(1),
                ..PoolState::default()
            }),
            overtake_limit: u32::try_from(overtake_limit).unwrap_or(u32::MAX),
        })
    }

    /// A slot for one build; `None` when the job is stopped while waiting. `loaded`: whether
    /// its process started ahead has Astro loaded (read when a slot is handed out).
    pub(crate) async fn for_build(
        self: &Arc<Self>,
        stop: &CancellationToken,
        loaded: Option<Arc<AtomicBool>>,
    ) -> Option<Slot> {
        tokio::select! {
            slot = self.wait(Wants::Build { loaded }) => Some(slot),
            _ = stop.cancelled() => None,
        }
    }

    /// A slot to load Astro ahead of a build, once one is free and no build waits for it.
    pub(crate) async fn for_loading(self: &Arc<Self>) -> Slot {
        self.wait(Wants::Load).await
    }

    async fn wait(self: &Arc<Self>, wants: Wants) -> Slot {
        let asked = Instant::now();
        let (grant, granted) = oneshot::channel();
        let ticket = {
            let mut state = self.state.lock().expect("build slots poisoned");
            if state.free > 0 {
                state.free -= 1;
                return Slot {
                    held: Held::Build(self.clone()),
                    waited_ms: 0,
                };
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.waiting.push(Waiter {
                ticket,
                wants,
                overtaken: 0,
                grant,
            });
            ticket
        };
        // Given up (stopped, or the job dropped): leave the line. A slot granted meanwhile
        // is in the channel, and freed when the channel is dropped.
        let leave = LeaveOnDrop {
            slots: self,
            ticket,
        };
        let mut slot = granted
            .await
            .expect("a waiter's sender is only dropped by granting");
        std::mem::forget(leave);
        slot.waited_ms = asked.elapsed().as_millis() as u64;
        slot
    }

    /// A slot is free again: hand it to the next waiter, or keep it.
    fn release(self: &Arc<Self>) {
        let next = {
            let mut state = self.state.lock().expect("build slots poisoned");
            match state.next(self.overtake_limit) {
                Some(waiter) => waiter,
                None => {
                    state.free += 1;
                    return;
                }
            }
        };
        let slot = Slot {
            held: Held::Build(self.clone()),
            waited_ms: 0,
        };
        // A waiter that has just given up drops the slot, which frees it again (outside the
        // lock, so this is a new turn, not a deadlock).
        let _ = next.grant.send(slot);
    }

    /// Slots free now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.state.lock().unwrap().free
    }
}

/// Removes a waiter that gave up from the line.
struct LeaveOnDrop<'a> {
    slots: &'a Arc<BuildSlots>,
    ticket: u64,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        let mut state = self.slots.state.lock().expect("build slots poisoned");
        state.waiting.retain(|w| w.ticket != self.ticket);
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

    fn loaded(yes: bool) -> Option<Arc<AtomicBool>> {
        Some(Arc::new(AtomicBool::new(yes)))
    }

    /// Queue a build (or a load, `None`) on `slots`; the task ends when it has a slot, and
    /// holds it until told.
    fn queue(
        slots: &Arc<BuildSlots>,
        build: Option<Option<Arc<AtomicBool>>>,
        order: &Arc<Mutex<Vec<&'static str>>>,
        name: &'static str,
    ) -> (tokio::task::JoinHandle<()>, oneshot::Sender<()>) {
        let (done, release) = oneshot::channel::<()>();
        let (slots, order) = (slots.clone(), order.clone());
        let task = tokio::spawn(async move {
            let slot = match build {
                Some(loaded) => slots
                    .for_build(&CancellationToken::new(), loaded)
                    .await
                    .unwrap(),
                None => slots.for_loading().await,
            };
            order.lock().unwrap().push(name);
            let _ = release.await;
            drop(slot);
        });
        (task, done)
    }

    type Waiting = (tokio::task::JoinHandle<()>, oneshot::Sender<()>);

    /// Free `held` and let the waiters have the slot one after another (each frees it as soon
    /// as it has had it); the order they got it in.
    async fn run_in_turn(
        slots: &Arc<BuildSlots>,
        held: Slot,
        mut waiters: std::collections::HashMap<&'static str, Waiting>,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> Vec<&'static str> {
        drop(held);
        for turn in 0..waiters.len() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while order.lock().unwrap().len() <= turn {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot went to nobody"
                );
                tokio::task::yield_now().await;
            }
            let name = order.lock().unwrap()[turn];
            let (task, done) = waiters.remove(name).unwrap();
            done.send(()).unwrap();
            task.await.unwrap();
        }
        assert_eq!(slots.free(), 1, "no slot is lost");
        order.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_waiting_build_gets_a_freed_slot_before_a_load_that_waited_longer() {
        let slots = BuildSlots::new(1, 16);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = slots
            .for_build(&CancellationToken::new(), None)
            .await
            .unwrap();
        let mut waiters = std::collections::HashMap::new();
        waiters.insert("load", queue(&slots, None, &order, "load"));
        settle().await;
        waiters.insert("build", queue(&slots, Some(None), &order, "build"));
        settle().await;
        let got = run_in_turn(&slots, held, waiters, &order).await;
        assert_eq!(got, ["build", "load"]);
    }

    #[tokio::test]
    async fn a_loaded_build_goes_before_an_older_one_that_must_still_load() {
        let slots = BuildSlots::new(1, 16);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = slots
            .for_build(&CancellationToken::new(), None)
            .await
            .unwrap();
        let later = Arc::new(AtomicBool::new(false));
        let mut waiters = std::collections::HashMap::new();
        for (name, state) in [
            ("unloaded", loaded(false)),
            ("none", None),
            ("loaded", loaded(true)),
            ("loads-later", Some(later.clone())),
        ] {
            waiters.insert(name, queue(&slots, Some(state), &order, name));
            settle().await;
        }
        // Whether a build is loaded is read when the slot is handed out.
        later.store(true, Ordering::SeqCst);
        let got = run_in_turn(&slots, held, waiters, &order).await;
        assert_eq!(got, ["loaded", "loads-later", "unloaded", "none"]);
    }

    #[tokio::test]
    async fn an_unloaded_build_is_overtaken_at_most_the_limit() {
        let slots = BuildSlots::new(1, 2);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = slots
            .for_build(&CancellationToken::new(), None)
            .await
            .unwrap();
        let mut waiters = std::collections::HashMap::new();
        for (i, name) in ["unloaded", "loaded-1", "loaded-2", "loaded-3"]
            .into_iter()
            .enumerate()
        {
            waiters.insert(name, queue(&slots, Some(loaded(i > 0)), &order, name));
            settle().await;
        }
        let got = run_in_turn(&slots, held, waiters, &order).await;
        assert_eq!(got, ["loaded-1", "loaded-2", "unloaded", "loaded-3"]);
    }

    #[tokio::test]
    async fn a_load_takes_a_free_slot_at_once_when_no_build_waits() {
        let slots = BuildSlots::new(2, 16);
        let _build = slots
            .for_build(&CancellationToken::new(), None)
            .await
            .unwrap();
        let load = tokio::time::timeout(Duration::from_secs(5), slots.for_loading())
            .await
            .expect("a free slot");
        assert_eq!(slots.free(), 0);
        drop(load);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn a_build_that_stops_waiting_leaves_the_line_and_the_load_goes() {
        let slots = BuildSlots::new(1, 16);
        let running = slots
            .for_build(&CancellationToken::new(), None)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let build = tokio::spawn({
            let (slots, stop) = (slots.clone(), stop.clone());
            async move { slots.for_build(&stop, None).await.is_none() }
        });
        let load = tokio::spawn({
            let slots = slots.clone();
            async move { slots.for_loading().await }
        });
        settle().await;
        stop.cancel();
        assert!(build.await.unwrap(), "the stopped build got no slot");
        drop(running);
        let load = tokio::time::timeout(Duration::from_secs(5), load)
            .await
            .expect("the load got the slot the stopped build no longer waits for")
            .unwrap();
        drop(load);
        assert_eq!(slots.free(), 1, "no slot is lost");
    }
}
