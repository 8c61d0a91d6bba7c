//! `npm run <script>` without npm, where that changes nothing but the time: npm itself costs
//! about a quarter of a CPU-second and half a second to start on every build, only to run a
//! script like `astro build` with `node_modules/.bin` first on `PATH`.
//!
//! The worker runs the script's words directly only when npm would do exactly that and no
//! more: the build command is `npm run <name>` (or `npm run-script <name>`) with nothing after
//! it, the site has no `pre<name>`/`post<name>` script (npm would run them) and no `.npmrc`
//! (which can change how npm runs scripts), and the script is plain words: no quotes,
//! variables, globs, redirections, pipes or `&&`, which only a shell would understand. Anything
//! else runs through npm as configured. The script is the site's own text, never a message's;
//! its words become argv, never a shell's input.

use std::ffi::OsString;
use std::path::Path;

/// A package script to run without npm: its argv and what npm would add to its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectScript {
    pub argv: Vec<String>,
    pub env: Vec<(String, OsString)>,
}

/// The script `command` runs in the package at `dir`, when it can run without npm (see the
/// module's text); `None`: run `command` as it is.
pub fn direct(command: &[String], dir: &Path) -> Option<DirectScript> {
    let name = match command {
        [npm, run, name] if npm == "npm" && (run == "run" || run == "run-script") => name,
        _ => return None,
    };
    // Whatever `.npmrc` is (a link included, dangling or not), npm would read it.
    if std::fs::symlink_metadata(dir.join(".npmrc")).is_ok() {
        return None;
    }
    // Read as the worker: never through a link, never past the bound (anything refused here
    // runs through npm, in the tenant's sandbox).
    let manifest = crate::tenant::tenant_fs::read_in(
        dir,
        Path::new("package.json"),
        crate::tenant::tenant_fs::SITE_FILE_MAX_BYTES,
    )
    .ok()??;
    let package: serde_json::Value = serde_json::from_slice(&manifest).ok()?;
    let scripts = package.get("scripts")?.as_object()?;
    if scripts.contains_key(&format!("pre{name}")) || scripts.contains_key(&format!("post{name}")) {
        return None;
    }
    let script = scripts.get(name.as_str())?.as_str()?;
    let argv = plain_words(script)?;
    let text = |key: &str| {
        package
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    // npm puts the package's own binaries first on PATH.
    let mut path = OsString::from(dir.join("node_modules/.bin"));
    if let Some(rest) = std::env::var_os("PATH") {
        path.push(":");
        path.push(rest);
    }
    let env = vec![
        ("PATH".to_owned(), path),
        ("npm_lifecycle_event".to_owned(), name.into()),
        ("npm_lifecycle_script".to_owned(), script.into()),
        ("npm_command".to_owned(), "run-script".into()),
        ("npm_package_name".to_owned(), text("name").into()),
        ("npm_package_version".to_owned(), text("version").into()),
        (
            "npm_package_json".to_owned(),
            dir.join("package.json").into_os_string(),
        ),
        ("INIT_CWD".to_owned(), dir.as_os_str().to_owned()),
    ];
    Some(DirectScript { argv, env })
}

/// The words of `script` when a shell would take it as plain words and nothing else; `None`
/// for anything a shell would interpret (and for an environment assignment in front).
fn plain_words(script: &str) -> Option<Vec<String>> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:,@%+=".contains(c);
    let words: Vec<String> = script.split_ascii_whitespace().map(str::to_owned).collect();
    let first = words.first()?;
    if first.contains('=') || !script.chars().all(|c| plain(c) || c == ' ') {
        return None;
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(package: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("package.json"), package).unwrap();
        dir
    }

    fn npm_run(name: &str) -> Vec<String> {
        vec!["npm".into(), "run".into(), name.into()]
    }

    #[test]
    fn a_plain_script_runs_without_npm_as_npm_would_run_it() {
        let dir = site(
            r#"{"name":"amelia","version":"1.2.0","scripts":{"build":"astro build --silent"}}"#,
        );
        let run = direct(&npm_run("build"), dir.path()).expect("a plain script");
        assert_eq!(run.argv, ["astro", "build", "--silent"]);
        let env: std::collections::HashMap<_, _> = run.env.into_iter().collect();
        let path = env["PATH"].to_string_lossy().into_owned();
        assert!(
            path.starts_with(&format!("{}/node_modules/.bin:", dir.path().display())),
            "{path}"
        );
        assert_eq!(env["npm_lifecycle_event"], "build");
        assert_eq!(env["npm_package_name"], "amelia");
        assert_eq!(env["npm_package_version"], "1.2.0");
        assert_eq!(
            direct(
                &["npm".into(), "run-script".into(), "build".into()],
                dir.path()
            )
            .map(|r| r.argv),
            Some(vec!["astro".into(), "build".into(), "--silent".into()])
        );
    }

    #[test]
    fn anything_npm_or_a_shell_would_add_to_goes_through_npm() {
        for script in [
            "astro build && echo done",
            "astro build | tee log",
            "astro build > log",
            "NODE_ENV=production astro build",
            "astro build $FLAGS",
            "astro 'build'",
            "astro build; rm -rf /",
            "astro build *",
            "astro build `id`",
            "",
        ] {
            let package = serde_json::json!({"scripts": {"build": script}}).to_string();
            assert_eq!(
                direct(&npm_run("build"), site(&package).path()),
                None,
                "{script}"
            );
        }
        let hooks = site(r#"{"scripts":{"prebuild":"node gen.mjs","build":"astro build"}}"#);
        assert_eq!(direct(&npm_run("build"), hooks.path()), None);
        let post = site(r#"{"scripts":{"build":"astro build","postbuild":"node x.mjs"}}"#);
        assert_eq!(direct(&npm_run("build"), post.path()), None);
        let npmrc = site(r#"{"scripts":{"build":"astro build"}}"#);
        std::fs::write(npmrc.path().join(".npmrc"), "script-shell=/bin/zsh\n").unwrap();
        assert_eq!(direct(&npm_run("build"), npmrc.path()), None);
        let plain = site(r#"{"scripts":{"build":"astro build"}}"#);
        for command in [
            vec![
                "npm".to_owned(),
                "run".into(),
                "build".into(),
                "--".into(),
                "--x".into(),
            ],
            vec!["node".into(), "build.mjs".into()],
            npm_run("missing"),
        ] {
            assert_eq!(direct(&command, plain.path()), None, "{command:?}");
        }
        assert_eq!(direct(&npm_run("build"), site("not json").path()), None);
        // A manifest that is a link is not read by the worker, and a dangling `.npmrc` link is
        // still an `.npmrc` to npm.
        let linked = tempfile::tempdir().unwrap();
        let elsewhere = site(r#"{"scripts":{"build":"astro build"}}"#);
        std::os::unix::fs::symlink(
            elsewhere.path().join("package.json"),
            linked.path().join("package.json"),
        )
        .unwrap();
        assert_eq!(direct(&npm_run("build"), linked.path()), None);
        std::os::unix::fs::symlink("/nowhere", plain.path().join(".npmrc")).unwrap();
        assert_eq!(direct(&npm_run("build"), plain.path()), None);
    }
}
