//! The actor system of edit-worker. See `ARCHITECTURE.md` at the root for the map: each folder
//! here is one concern, and dependencies go one way, down (`tests/module_dependencies.rs`):
//!
//! - `worker`, `intake`: the process, and the front door (receive, validate, route);
//! - `sessions`: the supervisor and one session actor per workspace;
//! - `batch`: the life of one batch, phase by phase;
//! - `steps`: the step actors and what they run (agent, git, build, publish, check);
//! - `delivery`: a message safely in and out across workers (leases, records, notices);
//! - `tenant`: what a tenant may touch (the sandbox, bounded reads of its files);
//! - `config`, `contract`, `telemetry`, `backoff`: leaves every floor may use.

mod backoff;
pub(crate) mod batch;
pub mod config;
pub mod contract;
pub mod delivery;
pub mod intake;
pub(crate) mod sessions;
pub mod steps;
pub mod telemetry;
pub mod tenant;
pub mod worker;
