//! What `ISOLATION` asks for and the limits on a tenant's processes (`SANDBOX_*`): the settings
//! the sandbox (`crate::tenant::sandbox`) enforces, kept here so that the configuration never imports
//! the sandbox.

/// What `ISOLATION` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationSetting {
    /// The strongest the host allows; refuse to start when it allows nothing.
    Auto,
    Users,
    Namespaces,
    UsersAndNamespaces,
    /// No isolation at all: the operator's explicit choice, logged at start.
    None,
}

impl std::str::FromStr for IsolationSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "auto" => Ok(IsolationSetting::Auto),
            "users" => Ok(IsolationSetting::Users),
            "namespaces" => Ok(IsolationSetting::Namespaces),
            "users+namespaces" => Ok(IsolationSetting::UsersAndNamespaces),
            "none" => Ok(IsolationSetting::None),
            other => Err(format!(
                "ISOLATION must be auto, users, namespaces, users+namespaces or none, not {other:?}"
            )),
        }
    }
}

/// Limits on every process of a tenant's run. The defaults leave room for the real CLI and an
/// Astro build (a few hundred MB each) and stop what no site build needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// `RLIMIT_NPROC`: processes and threads of the tenant's uid, all runs together.
    pub processes: u64,
    /// `RLIMIT_DATA`: private writable memory of one process (V8's reserved but unused address
    /// space does not count, unlike `RLIMIT_AS`).
    pub memory_bytes: u64,
    /// `RLIMIT_FSIZE`: the largest file a process may write.
    pub file_bytes: u64,
    /// `RLIMIT_CPU`: CPU seconds of one process.
    pub cpu_seconds: u64,
    /// Size of the private `/tmp` (namespaces only; without them `/tmp` is the tenant's home).
    pub tmp_bytes: u64,
    /// What the workspace's uid may have on disk in its checkout, home and agent folder, all
    /// files together, while a run lasts (checked twice a second; with separate users).
    pub disk_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            processes: 512,
            memory_bytes: 2 << 30,
            file_bytes: 1 << 30,
            cpu_seconds: 1800,
            tmp_bytes: 512 << 20,
            disk_bytes: 4 << 30,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolation_settings_are_read_by_name() {
        assert_eq!("".parse(), Ok(IsolationSetting::Auto));
        assert_eq!("auto".parse(), Ok(IsolationSetting::Auto));
        assert_eq!("none".parse(), Ok(IsolationSetting::None));
        assert_eq!(
            "users+namespaces".parse(),
            Ok(IsolationSetting::UsersAndNamespaces)
        );
        let err = "chroot".parse::<IsolationSetting>().unwrap_err();
        assert!(err.contains("auto, users, namespaces"), "{err}");
    }
}
