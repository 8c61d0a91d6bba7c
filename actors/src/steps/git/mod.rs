//! Git for one workspace. `Workspace` is the face the rest of the worker sees; behind it,
//! `local` (gix) does status, staging, commits and refs and `subprocess` (the `git` program)
//! does clone, fetch, switch and push.

pub(crate) mod local;
pub mod subprocess;
#[cfg(test)]
mod test_support;
mod workspace;

pub(crate) use workspace::{
    Fence, GitError, SAVE_MESSAGE, SavedWork, Workspace, agent_commit_subject,
};
