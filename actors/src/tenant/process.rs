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

/// npm's own settings that reach installs and builds from the worker's environment as
/// `npm_config_<name>` (any case, `_` or `-`): where packages come from and how npm behaves,
/// none of which is a credential. Everything else of npm's stays out, above all `_authToken`,
/// `_auth`, `_password` (`npm_config_//registry/:_authToken`), `userconfig` and `globalconfig`
/// (files that hold tokens), `script-shell` and `node-options` (commands). A value of an allowed
/// setting that carries a credential (`https://user:password@proxy`) is withheld too: the
/// site's own scripts would read it.
pub const NPM_CONFIG_ALLOWED: &[&str] = &[
    "registry",
    "cache",
    "prefer-offline",
    "prefer-online",
    "offline",
    "fund",
    "audit",
    "update-notifier",
    "loglevel",
    "progress",
    "color",
    "fetch-retries",
    "fetch-retry-factor",
    "fetch-retry-mintimeout",
    "fetch-retry-maxtimeout",
    "fetch-timeout",
    "maxsockets",
    "proxy",
    "https-proxy",
    "noproxy",
    "strict-ssl",
    "cafile",
];

/// The npm setting an environment variable sets, if it is one: `npm_config_fetch_retries` ->
/// `fetch-retries` (npm's own reading: prefix in any case, the rest lower-cased, `_` as `-`
/// except a leading one).
fn npm_setting(name: &str) -> Option<String> {
    const PREFIX: &str = "npm_config_";
    let head = name.get(..PREFIX.len())?;
    if !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let rest = &name[PREFIX.len()..];
    let mut setting = String::with_capacity(rest.len());
    for (i, c) in rest.chars().enumerate() {
        setting.push(if c == '_' && i > 0 {
            '-'
        } else {
            c.to_ascii_lowercase()
        });
    }
    Some(setting)
}

/// Pass the worker's allowed `npm_config_*` variables (`NPM_CONFIG_ALLOWED`) to `cmd`.
pub fn allow_npm_config(cmd: &mut Command) {
    allow_npm_config_from(cmd, std::env::vars_os());
}

fn allow_npm_config_from(
    cmd: &mut Command,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) {
    for (name, value) in vars {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else {
            continue;
        };
        let Some(setting) = npm_setting(name) else {
            continue;
        };
        if !NPM_CONFIG_ALLOWED.contains(&setting.as_str()) {
            continue;
        }
        if crate::telemetry::redact::redact(value) != value {
            tracing::warn!(
                variable = name,
                "an npm setting carries a credential; not passed to installs and builds"
            );
            continue;
        }
        cmd.env(name, value);
    }
}

/// Signal a whole process group. ESRCH (the group is already gone) is the normal case after
/// a clean exit, so it is not an error.
pub fn signal_group(pgid: Option<i32>, signal: nix::sys::signal::Signal) {
    if let Some(pgid) = pgid {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut cmd = Command::new("true");
        cmd.env_clear();
        allow_npm_config_from(&mut cmd, vars.iter().map(|(k, v)| (k.into(), v.into())));
        let mut out: Vec<(String, String)> = cmd
            .as_std()
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn npm_settings_are_read_as_npm_reads_them() {
        assert_eq!(npm_setting("npm_config_cache").as_deref(), Some("cache"));
        assert_eq!(
            npm_setting("NPM_CONFIG_FETCH_RETRY_MINTIMEOUT").as_deref(),
            Some("fetch-retry-mintimeout")
        );
        assert_eq!(
            npm_setting("npm_config_https-proxy").as_deref(),
            Some("https-proxy")
        );
        assert_eq!(
            npm_setting("npm_config__authToken").as_deref(),
            Some("_authtoken")
        );
        assert_eq!(npm_setting("npm_configx"), None);
        assert_eq!(npm_setting("PATH"), None);
    }

    #[test]
    fn only_harmless_npm_settings_pass() {
        let got = passed(&[
            ("npm_config_cache", "/var/cache/npm"),
            ("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org/"),
            ("npm_config_fetch_retries", "5"),
            ("npm_config_prefer_offline", "true"),
            (
                "npm_config__authToken",
                "npm_abcdefghijklmnopqrstuvwxyz0123456789",
            ),
            ("npm_config_//registry.npmjs.org/:_authToken", "secret"),
            ("NPM_CONFIG_USERCONFIG", "/root/.npmrc"),
            ("npm_config_globalconfig", "/etc/npmrc"),
            ("npm_config_script_shell", "/bin/evil"),
            ("npm_config_node_options", "--require /x"),
            ("npm_config_https_proxy", "http://user:pass@proxy:3128"),
            ("npm_config_proxy", "http://proxy:3128"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
        ]);
        assert_eq!(
            got,
            vec![
                (
                    "NPM_CONFIG_REGISTRY".into(),
                    "https://registry.npmjs.org/".into()
                ),
                ("npm_config_cache".into(), "/var/cache/npm".into()),
                ("npm_config_fetch_retries".into(), "5".into()),
                ("npm_config_prefer_offline".into(), "true".into()),
                ("npm_config_proxy".into(), "http://proxy:3128".into()),
            ]
        );
    }
}
