//! What a tenant may touch, and how the worker touches a tenant's files: the sandbox (users,
//! namespaces, rlimits) around the agent, installs, builds and the browser; bounded,
//! link-refusing reads of a tenant's checkout; process groups and the environment a tenant's
//! process gets. May use only the leaves (`config`, `contract`, `telemetry`); every floor above
//! reaches a tenant's files and processes through here.

pub(crate) mod process;
pub mod sandbox;
pub(crate) mod tenant_fs;
