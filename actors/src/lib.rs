//! The actor system of edit-worker. See `ARCHITECTURE.md` at the root for the map.

pub mod agent;
pub mod build;
pub mod config;
pub mod delivery;
pub mod git;
pub mod intake;
pub mod invalidate;
pub mod job;
pub mod lease;
pub mod message;
pub mod metrics;
pub mod notices;
pub mod npm_store;
pub mod pipeline;
pub mod process;
pub mod publish;
pub mod records;
pub mod redact;
pub mod restart;
pub mod session;
pub mod status;
pub mod steps;
pub mod supervisor;
pub mod threads;
pub mod trace_context;
pub mod worker;
