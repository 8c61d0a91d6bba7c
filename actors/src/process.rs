//! What the agent and the build have in common as child processes: an allow-listed
//! environment, and a process group that is signalled as a whole.

use tokio::process::Command;

/// What any child may see of the worker's environment. Everything else (the worker's AWS
/// credentials, queue URLs, tokens) is withheld unless a caller adds it by name.
pub const BASE_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];

/// Start from an empty environment and pass through `BASE_ENV` and `extra`, where set.
pub fn allow_env(cmd: &mut Command, extra: &[&str]) {
    cmd.env_clear();
    for name in BASE_ENV.iter().chain(extra) {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
}

/// Signal a whole process group. ESRCH (the group is already gone) is the normal case after
/// a clean exit, so it is not an error.
pub fn signal_group(pgid: Option<i32>, signal: nix::sys::signal::Signal) {
    if let Some(pgid) = pgid {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }
}
