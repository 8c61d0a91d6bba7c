//! The external contract (CONTRACT.md) as types: the input message, the status events and
//! what they carry (a publish, a browser check, a deploy id). Leaves: nothing here knows the
//! worker's actors, steps or stores.

pub mod check_report;
pub mod deploy_id;
pub mod message;
pub mod status;
