//! Who runs what: the supervisor spawns one session per workspace, which queues its jobs, runs
//! them as batches (`batch`) through its step actors (`steps`), and is restarted with backoff
//! past a crash. May use everything below it; nothing below uses it.

pub(crate) mod restart;
pub(crate) mod session;
pub(crate) mod supervisor;
