//! Workspace leases: a workspace (`{clientId}/{projectId}`) is worked by one worker at a time,
//! across processes and machines.
//!
//! A lease is a small document in the shared record store (`LEASE_STORE=s3://…`), written only
//! with S3 conditional writes (`If-None-Match: *` to create, `If-Match: <ETag>` to change), as
//! the DynamoDB lock client does with its record version: no lock service of our own. It names
//! its holder, an expiry and a **token** that grows by one each time the workspace changes hands.
//! The holder renews it (a heartbeat every third of its duration) while it has work for the
//! workspace and releases it when the work runs out; a worker that died leaves a lease that
//! simply expires. The token fences the holder's effects: pushes carry it in a fence ref
//! (`git::Fence`) and publishes in a fence object of the bucket (`publish::BucketFence`), so a
//! worker that lost its lease (paused past the expiry) cannot push or publish once the next
//! holder has started.
//!
//! Without a lease store the worker assumes it is alone: every lease is granted at once, with
//! token 0, and never fenced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::contract::message::WorkspaceKey;
use crate::delivery::lease_check::LeaseCheck;
use crate::delivery::records::{RecordError, RecordStore, Version, now_ms};

/// Say a lease transition ("lease acquired", "lease released", "lease lost") twice, with the
/// same fields: as the log line operators read, and as a span of its own named like it, its
/// fields as attributes, ended at once. Ended, the span goes out with the exporter's next batch
/// (within `OTEL_BSP_SCHEDULE_DELAY`), so a worker killed later has still told the collector
/// which leases it held, and tests and dashboards rebuild who held what when from the spans
/// rather than from the log's text. Each is a root (`parent: None`), a trace of its own: a lease
/// outlives the messages whose batches take it (it is kept across batches), and it is released
/// or lost outside any message (by the session, by the heartbeat), so under a message it would
/// put one end of a holding into that message's trace and the other nowhere. Fields are
/// evaluated once for each of the two: pass values (`at_ms`) that must agree as variables.
macro_rules! lease_event {
    ($level:expr, $name:literal, $($fields:tt)+) => {{
        tracing::event!($level, $($fields)+, $name);
        drop(tracing::span!(parent: None, $level, $name, $($fields)+));
    }};
}

/// The lease document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseRecord {
    /// The worker that holds (or last held) the workspace.
    holder: String,
    /// Grows by one whenever the workspace changes hands; fences pushes and publishes.
    token: u64,
    /// Wall-clock expiry (ms since the epoch); 0 once released. A waiting worker takes an
    /// expired lease, so the holder's clock and the waiter's must agree within the safety
    /// allowance (`LeaseConfig::skew_allowance`), as EC2's time sync keeps them.
    expires_at_ms: u64,
    /// The holder's notice queue: where a worker with a newer message for the workspace tells
    /// the holder to stop (`notices.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notices: Option<String>,
}

/// What the leases of this worker need to know.
#[derive(Debug, Clone)]
pub(crate) struct LeaseConfig {
    /// How long a lease lasts without a heartbeat (`LEASE_SECONDS`).
    pub duration: Duration,
    /// This worker's name (`WORKER_ID`).
    pub worker: String,
}

impl LeaseConfig {
    /// The clock-skew allowance: the holder's lease ends this long before the record's expiry
    /// by its own monotonic clock (measured from the moment it *asked* for the write that set
    /// that expiry), so a waiter whose wall clock runs ahead of the holder's by less than this
    /// never takes a lease its holder still works under. A fifth of `LEASE_SECONDS` (6 s of
    /// the default 30): EC2's time sync keeps hosts within milliseconds, and the rest is room
    /// for the renewal's own round trip.
    pub(crate) fn skew_allowance(&self) -> Duration {
        self.duration / 5
    }

    /// How long a release waits for a renewal in flight, and then for its own write, before it
    /// leaves the lease to expire by itself: a release runs inside the session's handler and
    /// must never hang with a hung store. A healthy store answers in milliseconds.
    fn release_wait(&self) -> Duration {
        // Generous for a store slowed by a busy machine (a timed-out release only makes the
        // next holder wait for the expiry), short beside the lease itself.
        (self.duration / 5).clamp(Duration::from_millis(500), Duration::from_secs(6))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store did not answer, or a lease record does not parse (`RecordError::Corrupt`).
    #[error("lease store: {0}")]
    Store(#[from] RecordError),
}

/// Says how this worker's holding of a lease ended, exactly once, as the "lease released" or
/// "lease lost" log line and span (`lease_event!`): whichever of the heartbeat, a release, a
/// set-aside or a drop comes first. A holding whose end went unsaid would look held for ever
/// to whoever rebuilds the holdings from the spans (tests, dashboards).
struct HoldingEnd {
    said: std::sync::atomic::AtomicBool,
    workspace: String,
    token: u64,
    worker: String,
}

impl HoldingEnd {
    fn first(&self) -> bool {
        !self.said.swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// This worker stopped working under the lease at `at_ms`. `how`: `written` (released in
    /// the store), `parked` (set aside, no write) or `expires` (the release could not be
    /// written); then the record expires by itself at `expires_at_ms`.
    fn released(&self, at_ms: u64, how: &'static str, expires_at_ms: u64) {
        if self.first() {
            lease_event!(
                tracing::Level::INFO,
                "lease released",
                workspace = %self.workspace,
                token = self.token,
                worker = %self.worker,
                how,
                expires_at_ms,
                at_ms
            );
        }
    }

    /// The lease was lost (another worker changed it, or its time ran out by this worker's
    /// clock).
    fn lost(&self, why: &str) {
        if self.first() {
            let at_ms = now_ms();
            lease_event!(
                tracing::Level::WARN,
                "lease lost",
                workspace = %self.workspace,
                token = self.token,
                worker = %self.worker,
                at_ms,
                error = %why
            );
        }
    }
}

/// What `Leases::try_acquire` found.
pub enum Acquired {
    Granted(Lease),
    /// Another worker holds a live lease.
    HeldBy {
        holder: String,
        /// Where to tell it that a newer message waits.
        notices: Option<String>,
        /// When it expires unless renewed (wall clock, ms).
        expires_at_ms: u64,
    },
}

/// The leases of one worker.
#[derive(Clone)]
pub struct Leases {
    /// `None`: no lease store, the worker is alone.
    shared: Option<Arc<Shared>>,
}

struct Shared {
    store: RecordStore,
    config: LeaseConfig,
    /// This worker's notice queue, written into every lease it holds.
    notices: Mutex<Option<String>>,
    /// Waiters per workspace, woken when its holder says it released the lease.
    released: Mutex<HashMap<WorkspaceKey, Arc<Notify>>>,
    /// The lease records this worker last wrote (released or set aside) and their versions:
    /// taking one back is then one conditional write, without reading it first (issue 25). A
    /// stale entry costs a refused write and a read, never a lease: S3 checks the version.
    mine: Mutex<HashMap<WorkspaceKey, (LeaseRecord, Version)>>,
    /// The leases held here now, each watched by `Leases::let_go`: its channel closes when
    /// the holding ends (`Holding`).
    held_here: Mutex<HashMap<WorkspaceKey, tokio::sync::watch::Receiver<()>>>,
}

/// While it lives, this worker holds the workspace's lease: it goes with the `Held` of a
/// `Lease`, after the release or set-aside is written, or when the lease is dropped or lost.
/// What a waiter's `Released` waits for when no session here answers for the workspace (a
/// failed session's batch may run on, detached, under the lease).
struct Holding {
    shared: Arc<Shared>,
    key: WorkspaceKey,
    alive: tokio::sync::watch::Sender<()>,
}

impl Holding {
    fn new(shared: Arc<Shared>, key: WorkspaceKey) -> Holding {
        let (alive, watched) = tokio::sync::watch::channel(());
        shared
            .held_here
            .lock()
            .expect("held here")
            .insert(key.clone(), watched);
        Holding { shared, key, alive }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let mut held_here = self.shared.held_here.lock().expect("held here");
        // Only our own entry: a newer holding of the same workspace may have replaced it.
        if held_here
            .get(&self.key)
            .is_some_and(|watched| watched.same_channel(&self.alive.subscribe()))
        {
            held_here.remove(&self.key);
        }
    }
}

fn lease_key(key: &WorkspaceKey) -> String {
    // Both are DNS labels: a safe key.
    format!("leases/{}/{}.json", key.client_id, key.project_id)
}

impl Leases {
    /// No lease store: every lease is granted at once.
    pub fn alone() -> Leases {
        Leases { shared: None }
    }

    /// Leases in the shared store.
    pub(crate) fn shared(store: RecordStore, config: LeaseConfig) -> Leases {
        Leases {
            shared: Some(Arc::new(Shared {
                store,
                config,
                notices: Mutex::new(None),
                released: Mutex::default(),
                mine: Mutex::default(),
                held_here: Mutex::default(),
            })),
        }
    }

    /// Name this worker's notice queue in the leases it takes from now on.
    pub(crate) fn set_notice_queue(&self, url: String) {
        if let Some(shared) = &self.shared {
            *shared.notices.lock().expect("notices") = Some(url);
        }
    }

    /// Signalled when the holder of `key` says it released its lease.
    pub(crate) fn released_signal(&self, key: &WorkspaceKey) -> Arc<Notify> {
        match &self.shared {
            Some(shared) => shared
                .released
                .lock()
                .expect("released")
                .entry(key.clone())
                .or_default()
                .clone(),
            None => Arc::new(Notify::new()),
        }
    }

    /// Once no lease of `key` is held here (never was, or released, set aside, lost or
    /// dropped since).
    pub(crate) async fn let_go(&self, key: &WorkspaceKey) {
        let Some(shared) = &self.shared else {
            return;
        };
        let watched = shared
            .held_here
            .lock()
            .expect("held here")
            .get(key)
            .cloned();
        if let Some(mut watched) = watched {
            // Nothing is ever sent: the channel only closes, with its holding.
            while watched.changed().await.is_ok() {}
        }
    }

    /// The holder of `key` released it: wake whoever waits here.
    pub(crate) fn on_released(&self, key: &WorkspaceKey) {
        if let Some(shared) = &self.shared {
            let signal = shared.released.lock().expect("released").remove(key);
            if let Some(signal) = signal {
                signal.notify_waiters();
            }
        }
    }

    /// Release the lease of `key` this worker set aside (`Lease::park`), if it did and it has
    /// not expired: a waiter takes it at once instead of at its expiry. Bounded as a release.
    pub(crate) async fn release_parked(&self, key: &WorkspaceKey) {
        let Some(shared) = &self.shared else {
            return;
        };
        let parked = {
            let mut mine = shared.mine.lock().expect("mine");
            match mine.get(key) {
                Some((record, _)) if record.expires_at_ms > now_ms() => mine.remove(key),
                _ => None,
            }
        };
        let Some((mut record, version)) = parked else {
            return;
        };
        record.expires_at_ms = 0;
        let text = serde_json::to_string(&record).expect("leases serialize");
        let written = tokio::time::timeout(
            shared.config.release_wait(),
            shared.store.write_document(&lease_key(key), &text, version),
        )
        .await;
        match written {
            Ok(Ok(Some(version))) => {
                shared
                    .mine
                    .lock()
                    .expect("mine")
                    .insert(key.clone(), (record, version));
            }
            // Taken meanwhile (it had expired), or the store did not answer: it expires anyway.
            _ => {
                tracing::debug!(workspace = %key, "a set-aside lease was not released; it expires by itself")
            }
        }
    }

    /// Take the workspace's lease if it is free (never held, released, expired, or last held
    /// by this worker).
    pub async fn try_acquire(&self, key: &WorkspaceKey) -> Result<Acquired, LeaseError> {
        let Some(shared) = &self.shared else {
            return Ok(Acquired::Granted(Lease::alone(key)));
        };
        let doc = lease_key(key);
        let me = &shared.config.worker;
        // Ours when we last wrote it (released, or set aside while nothing waited): take it
        // back with the version we wrote. Nobody else held it since, or the write is refused.
        let last = shared.mine.lock().expect("mine").remove(key);
        if let Some((mut record, version)) = last {
            let asked = Instant::now();
            record.expires_at_ms = now_ms() + shared.config.duration.as_millis() as u64;
            record.notices = shared.notices.lock().expect("notices").clone();
            let text = serde_json::to_string(&record).expect("leases serialize");
            if let Ok(Some(version)) = shared.store.write_document(&doc, &text, version).await {
                let at_ms = now_ms();
                lease_event!(
                    tracing::Level::INFO,
                    "lease acquired",
                    workspace = %key,
                    token = record.token,
                    worker = %me,
                    handover = false,
                    previous = me.as_str(),
                    previous_released = true,
                    at_ms
                );
                return Ok(Acquired::Granted(Lease::start(
                    shared.clone(),
                    key.clone(),
                    record,
                    version,
                    asked,
                    false,
                )));
            }
        }
        // A conditional write per attempt; a lost race reads again and decides again.
        for _ in 0..4 {
            let (current, version) = shared.store.read_typed::<LeaseRecord>(&doc).await?;
            let (token, handover) = match &current {
                None => (1, true),
                // Ours (live or not): nobody else held it since, so our checkout, the fence
                // and the published site are still ours too.
                Some(r) if &r.holder == me => (r.token, false),
                Some(r) if r.expires_at_ms > now_ms() => {
                    return Ok(Acquired::HeldBy {
                        holder: r.holder.clone(),
                        notices: r.notices.clone(),
                        expires_at_ms: r.expires_at_ms,
                    });
                }
                Some(r) => (r.token + 1, true),
            };
            let asked = Instant::now();
            let record = LeaseRecord {
                holder: me.clone(),
                token,
                expires_at_ms: now_ms() + shared.config.duration.as_millis() as u64,
                notices: shared.notices.lock().expect("notices").clone(),
            };
            let text = serde_json::to_string(&record).expect("leases serialize");
            if let Some(version) = shared.store.write_document(&doc, &text, version).await? {
                let at_ms = now_ms();
                lease_event!(
                    tracing::Level::INFO,
                    "lease acquired",
                    workspace = %key,
                    token,
                    worker = %me,
                    handover,
                    previous = current.as_ref().map(|r| r.holder.as_str()).unwrap_or(""),
                    // Whether the previous holder gave the lease up (`true`) or let it expire
                    // (as a worker that died does): which kind of handover this was.
                    previous_released = current.as_ref().is_some_and(|r| r.expires_at_ms == 0),
                    at_ms
                );
                return Ok(Acquired::Granted(Lease::start(
                    shared.clone(),
                    key.clone(),
                    record,
                    version,
                    asked,
                    handover,
                )));
            }
        }
        Err(LeaseError::Store(RecordError::Store {
            op: "acquire lease",
            message: format!("{doc} kept changing under us"),
        }))
    }
}

/// A held lease. Renewed by a heartbeat task while it lives; `release` gives it up, and
/// dropping it without release stops the heartbeat (the lease then expires).
pub struct Lease {
    key: WorkspaceKey,
    token: u64,
    handover: bool,
    check: LeaseCheck,
    /// `None` when alone.
    held: Option<Held>,
}

struct Held {
    shared: Arc<Shared>,
    /// Goes with the rest of `Held`, after a release or set-aside is written (or with a
    /// dropped lease): `Leases::let_go` then sees the lease gone from here.
    _holding: Holding,
    /// Says once how the holding ended.
    end: Arc<HoldingEnd>,
    state: Arc<Mutex<HeldState>>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// Stops the heartbeat between two renewals, never in the middle of one: a renewal cut
    /// off after S3 took it would leave us a stale version, and the release would fail.
    stop_heartbeat: CancellationToken,
}

struct HeldState {
    record: LeaseRecord,
    version: Version,
}

impl Lease {
    fn alone(key: &WorkspaceKey) -> Lease {
        Lease {
            key: key.clone(),
            token: 0,
            handover: false,
            check: LeaseCheck::unfenced(&key.to_string()),
            held: None,
        }
    }

    fn start(
        shared: Arc<Shared>,
        key: WorkspaceKey,
        record: LeaseRecord,
        version: Version,
        asked: Instant,
        handover: bool,
    ) -> Lease {
        let config = &shared.config;
        let valid_until = Arc::new(Mutex::new(
            asked + config.duration - config.skew_allowance(),
        ));
        let check = LeaseCheck::held(key.to_string(), record.token, valid_until.clone());
        let state = Arc::new(Mutex::new(HeldState {
            record: record.clone(),
            version,
        }));
        let stop_heartbeat = CancellationToken::new();
        let end = Arc::new(HoldingEnd {
            said: Default::default(),
            workspace: key.to_string(),
            token: record.token,
            worker: shared.config.worker.clone(),
        });
        let holding = Holding::new(shared.clone(), key.clone());
        let heartbeat = tokio::spawn(heartbeat(
            shared.clone(),
            key.clone(),
            state.clone(),
            check.clone(),
            valid_until,
            stop_heartbeat.clone(),
            end.clone(),
        ));
        Lease {
            key,
            token: record.token,
            handover,
            check,
            held: Some(Held {
                _holding: holding,
                shared,
                end,
                state,
                heartbeat,
                stop_heartbeat,
            }),
        }
    }

    pub(crate) fn key(&self) -> &WorkspaceKey {
        &self.key
    }

    /// The fencing token: grows each time the workspace changes hands (0 when alone).
    pub(crate) fn token(&self) -> u64 {
        self.token
    }

    /// Whether the workspace comes from another worker (or from nobody known): then this
    /// worker's checkout, conversation files and published marker may be stale.
    #[cfg(test)]
    pub(crate) fn handover(&self) -> bool {
        self.handover
    }

    /// Whether the workspace came from another worker, once: the first batch under the lease
    /// catches up, the later ones of the same busy spell need not.
    pub(crate) fn take_handover(&mut self) -> bool {
        std::mem::take(&mut self.handover)
    }

    /// Whether leases are shared at all (a fenced deployment).
    pub(crate) fn is_shared(&self) -> bool {
        self.held.is_some()
    }

    pub fn check(&self) -> &LeaseCheck {
        &self.check
    }

    /// Set the lease aside while nothing waits for it (issue 25: a release and a new acquire
    /// per busy spell were two of a message's S3 requests): no write; the heartbeat stops, so
    /// the record expires by itself within `LEASE_SECONDS`, and this worker stops working
    /// under it as after a release ("lease released", `parked`). Taking it back is one
    /// conditional write with the version kept here (`try_acquire`); a waiter that says so
    /// (`Newer`) has it released at once (`Leases::release_parked`).
    pub(crate) async fn park(mut self) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        held.stop_heartbeat.cancel();
        let mut heartbeat = std::mem::replace(&mut held.heartbeat, tokio::spawn(async {}));
        let stopped = tokio::time::timeout(held.shared.config.release_wait(), &mut heartbeat).await;
        let (record, version) = {
            let state = held.state.lock().expect("lease state");
            (state.record.clone(), state.version.clone())
        };
        if stopped.is_err() {
            heartbeat.abort();
            held.end.released(now_ms(), "expires", record.expires_at_ms);
            return;
        }
        if self.check.check().is_err() {
            held.end.lost("its time ran out by this worker's clock");
            return;
        }
        held.end.released(now_ms(), "parked", record.expires_at_ms);
        held.shared
            .mine
            .lock()
            .expect("mine")
            .insert(self.key.clone(), (record, version));
    }

    /// Give the lease up: the next worker (or this one) may take it at once. The token and
    /// holder stay in the record, so the next holder knows whether the workspace changed hands.
    pub(crate) async fn release(mut self) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        held.stop_heartbeat.cancel();
        let wait = held.shared.config.release_wait();
        // A renewal in flight finishes first (its version is the one to release), but a hung
        // one is not waited for: the lease then simply expires (issue 25).
        let mut heartbeat = std::mem::replace(&mut held.heartbeat, tokio::spawn(async {}));
        let stopped = tokio::time::timeout(wait, &mut heartbeat).await;
        let (mut record, version) = {
            let state = held.state.lock().expect("lease state");
            (state.record.clone(), state.version.clone())
        };
        if stopped.is_err() {
            heartbeat.abort();
            tracing::warn!(workspace = %self.key, "a lease renewal hangs; not releasing, the lease expires by itself");
            held.end.released(now_ms(), "expires", record.expires_at_ms);
            return;
        }
        if self.check.check().is_err() {
            held.end.lost("its time ran out by this worker's clock");
            return;
        }
        let expires_at_ms = record.expires_at_ms;
        record.expires_at_ms = 0;
        let text = serde_json::to_string(&record).expect("leases serialize");
        // Stamped before the write: the next holder's "acquired" never precedes our "released".
        let at_ms = now_ms();
        let written = tokio::time::timeout(
            wait,
            held.shared
                .store
                .write_document(&lease_key(&self.key), &text, version),
        )
        .await
        .unwrap_or_else(|_| {
            Err(crate::delivery::records::RecordError::Store {
                op: "release lease",
                message: format!("no answer within {wait:?}"),
            })
        });
        match written {
            Ok(Some(version)) => {
                held.shared
                    .mine
                    .lock()
                    .expect("mine")
                    .insert(self.key.clone(), (record, version));
                held.end.released(at_ms, "written", 0);
            }
            Ok(None) => held.end.lost("another worker changed the lease"),
            Err(e) => {
                tracing::warn!(workspace = %self.key, error = %e, "could not release the lease; it expires by itself");
                held.end.released(at_ms, "expires", expires_at_ms);
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Not released (the task holding it ended early): stop renewing; it expires.
        if let Some(held) = &self.held {
            held.heartbeat.abort();
            if self.check.check().is_ok() {
                let expires_at_ms = held.state.lock().expect("lease state").record.expires_at_ms;
                held.end.released(now_ms(), "expires", expires_at_ms);
            } else {
                held.end.lost("its time ran out by this worker's clock");
            }
        }
    }
}

/// Renew the lease every third of its duration until it is released or lost. A renewal that
/// finds the lease changed means another worker took it: the lease is lost. A store that does
/// not answer is tried again until the lease's own time runs out: then it is lost too. That
/// time is this worker's monotonic clock, and it ends the lease whatever the renewal is doing:
/// a renewal that hangs (a hung S3 request) is abandoned at the deadline, and a process that
/// was paused (SIGSTOP, a starved VM) finds its lease over the moment it runs again, before it
/// asks the store anything.
async fn heartbeat(
    shared: Arc<Shared>,
    key: WorkspaceKey,
    state: Arc<Mutex<HeldState>>,
    check: LeaseCheck,
    valid_until: Arc<Mutex<Instant>>,
    stop: CancellationToken,
    end: Arc<HoldingEnd>,
) {
    let config = &shared.config;
    let doc = lease_key(&key);
    let every = config.duration / 3;
    let mut next = Instant::now() + every;
    let deadline = || *valid_until.lock().expect("valid_until");
    let lose = |why: &str| {
        end.lost(why);
        check.lost().cancel();
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            // Renewals that keep failing end here too, at the deadline, not at their next try.
            _ = tokio::time::sleep_until(deadline().into()) => {
                lose("its time ran out by this worker's clock before a renewal succeeded");
                return;
            }
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        if Instant::now() >= deadline() {
            // Woken after a pause longer than the lease: never renew what may be another's.
            lose("its time ran out by this worker's clock (was the process paused?)");
            return;
        }
        let asked = Instant::now();
        let (mut record, version) = {
            let s = state.lock().expect("lease state");
            (s.record.clone(), s.version.clone())
        };
        record.expires_at_ms = now_ms() + config.duration.as_millis() as u64;
        let text = serde_json::to_string(&record).expect("leases serialize");
        let renewed = tokio::select! {
            renewed = shared.store.write_document(&doc, &text, version) => renewed,
            _ = tokio::time::sleep_until(deadline().into()) => {
                lose("a renewal did not answer before the lease's time ran out by this worker's clock");
                return;
            }
        };
        match renewed {
            Ok(Some(version)) => {
                *valid_until.lock().expect("valid_until") =
                    asked + config.duration - config.skew_allowance();
                let mut s = state.lock().expect("lease state");
                s.record = record;
                s.version = version;
                tracing::debug!(workspace = %key, token = s.record.token, "lease renewed");
                next = asked + every;
            }
            Ok(None) => {
                lose("another worker changed the lease");
                return;
            }
            Err(e) => {
                tracing::warn!(workspace = %key, error = %e, "could not renew the lease; trying again");
                next = Instant::now() + Duration::from_millis(500);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> WorkspaceKey {
        WorkspaceKey {
            client_id: "a".into(),
            project_id: "b".into(),
        }
    }

    fn leases(dir: &std::path::Path, worker: &str, duration: Duration) -> Leases {
        Leases::shared(
            RecordStore::local(dir, worker),
            LeaseConfig {
                duration,
                worker: worker.into(),
            },
        )
    }

    /// `let_go` waits while a lease of the workspace is held here, and ends when its holding
    /// ends, however it ends: released, set aside, or dropped.
    #[tokio::test]
    async fn let_go_ends_with_the_holding_however_it_ends() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let a = leases(dir.path(), "a", Duration::from_secs(30));
        // Nothing held: at once.
        assert!(a.let_go(&key()).now_or_never().is_some());
        type End = fn(Lease) -> futures::future::BoxFuture<'static, ()>;
        let ends: [(&str, End); 3] = [
            ("released", |lease| lease.release().boxed()),
            ("set aside", |lease| lease.park().boxed()),
            ("dropped", |lease| async move { drop(lease) }.boxed()),
        ];
        for (how, end) in ends {
            let Acquired::Granted(lease) = a.try_acquire(&key()).await.unwrap() else {
                panic!("granted");
            };
            let workspace = key();
            let mut waiting = Box::pin(a.let_go(&workspace));
            assert!(
                (&mut waiting).now_or_never().is_none(),
                "let go while held ({how})"
            );
            end(lease).await;
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .unwrap_or_else(|_| panic!("not let go once {how}"));
        }
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_the_token_grows_with_each_hand() {
        let dir = tempfile::tempdir().unwrap();
        let a = leases(dir.path(), "a", Duration::from_secs(30));
        let b = leases(dir.path(), "b", Duration::from_secs(30));
        let Acquired::Granted(first) = a.try_acquire(&key()).await.unwrap() else {
            panic!("a free workspace is granted");
        };
        assert_eq!((first.token(), first.handover()), (1, true));
        match b.try_acquire(&key()).await.unwrap() {
            Acquired::HeldBy { holder, .. } => assert_eq!(holder, "a"),
            Acquired::Granted(_) => panic!("a held workspace is not granted twice"),
        }
        first.release().await;
        // Released by a, taken by b: a new hand, a new token.
        let Acquired::Granted(second) = b.try_acquire(&key()).await.unwrap() else {
            panic!("a released workspace is granted");
        };
        assert_eq!((second.token(), second.handover()), (2, true));
        second.release().await;
        // Taken back by its last holder: same hand, same token, nothing to catch up on.
        let Acquired::Granted(third) = b.try_acquire(&key()).await.unwrap() else {
            panic!("granted");
        };
        assert_eq!((third.token(), third.handover()), (2, false));
    }

    #[tokio::test]
    async fn an_expired_lease_passes_on_and_its_old_holder_learns_it_lost() {
        let dir = tempfile::tempdir().unwrap();
        let a = leases(dir.path(), "a", Duration::from_millis(600));
        let b = leases(dir.path(), "b", Duration::from_millis(600));
        let Acquired::Granted(held) = a.try_acquire(&key()).await.unwrap() else {
            panic!("granted");
        };
        let check = held.check().clone();
        assert!(check.check().is_ok());
        // a stops renewing (a paused process): its lease expires and b takes it.
        drop(held);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            check.check().is_err(),
            "past its time a lease no longer holds"
        );
        let Acquired::Granted(taken) = b.try_acquire(&key()).await.unwrap() else {
            panic!("an expired lease is granted");
        };
        assert_eq!(taken.token(), 2);
    }

    #[tokio::test]
    async fn a_heartbeat_that_finds_another_holder_loses_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let a = leases(dir.path(), "a", Duration::from_millis(900));
        let Acquired::Granted(held) = a.try_acquire(&key()).await.unwrap() else {
            panic!("granted");
        };
        // Someone overwrites the record (as a worker that took the expired lease would).
        let path = dir.path().join(lease_key(&key()));
        std::fs::write(
            &path,
            r#"{"holder":"b","token":9,"expiresAtMs":99999999999999}"#,
        )
        .unwrap();
        let lost = held.check().lost().clone();
        tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
            .await
            .expect("the heartbeat notices");
        assert!(held.check().check().is_err());
    }

    #[tokio::test]
    async fn alone_every_lease_is_granted_with_token_zero() {
        let leases = Leases::alone();
        for _ in 0..2 {
            let Acquired::Granted(lease) = leases.try_acquire(&key()).await.unwrap() else {
                panic!("alone, always granted");
            };
            assert_eq!(
                (lease.token(), lease.handover(), lease.is_shared()),
                (0, false, false)
            );
            assert!(lease.check().check().is_ok());
        }
    }
}
