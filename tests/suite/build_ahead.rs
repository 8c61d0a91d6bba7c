//! Issue 15: Astro's build started ahead (`BUILD_AHEAD_MAX`). While the agent works, the
//! build's Node process starts in the tenant's sandbox and loads Astro; when the build's turn
//! comes it builds in that process. Shown with the real Astro site and the sandbox on: a page
//! that prints when its Node process started says the process is older than the agent's commit
//! (it is younger with `BUILD_AHEAD_MAX=0`), and the site is what the usual build makes.

use std::time::Duration;

use crate::common::{self, Site, TestEnv, git, of_type};

/// A real Astro install and build (issue 30: see common::WITH_INSTALL).
const WAIT: Duration = common::WITH_INSTALL;
/// How long the agent works: the process started ahead is at least about this much older
/// than the agent's commit.
const AGENT_SECONDS: u64 = 6;
/// A page that prints when the Node process that renders it started (ms since the epoch).
const STARTED_PAGE: &[u8] = b"---\nconst started = Date.now() - Math.round(process.uptime() * 1000);\n---\n<p id=\"started\">{started}</p>\n";

/// When the build's Node process started, from the page it published.
async fn node_started_ms(env: &TestEnv, client: &str) -> u64 {
    let contents = env.bucket_contents(&env.bucket(client, "site")).await;
    let page = &contents
        .get("started/index.html")
        .unwrap_or_else(|| {
            panic!(
                "no started page in {client}'s bucket: {:?}",
                contents.keys()
            )
        })
        .1;
    let html = String::from_utf8_lossy(page);
    let from = html.find("id=\"started\">").expect("the started paragraph") + 13;
    let digits: String = html[from..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or_else(|_| panic!("{html}"))
}

/// Run one edit into `client`'s thread `t` with the worker's `extra` settings; returns (when
/// the build's Node process started, when the agent's commit was made), both in ms.
async fn edit_once(env: &mut TestEnv, client: &str, extra: &[(&str, &str)]) -> (u64, u64) {
    env.create_site(client, "site", Site::Astro).await;
    env.push_branch_with(
        client,
        "site",
        "thread-t",
        &[("src/pages/started.astro", STARTED_PAGE)],
    );
    let mut settings = vec![("ISOLATION", "users+namespaces")];
    settings.extend_from_slice(extra);
    env.start_worker(&settings);
    let id = env
        .send(
            client,
            "site",
            "t",
            &format!("Update the homepage title to \"{client}\" [standin:sleep {AGENT_SECONDS}]"),
        )
        .await;
    let events = env.wait_for(&id, "completed", WAIT).await;
    assert_eq!(
        of_type(&events, "completed").len(),
        1,
        "{events:#?}\n{}",
        env.worker_log()
    );
    assert_eq!(env.stop_worker(), Some(0));
    let html = &env.bucket_contents(&env.bucket(client, "site")).await["index.html"].1;
    assert!(
        String::from_utf8_lossy(html).contains(&format!("<title>{client}</title>")),
        "the edit is not live"
    );
    // Astro's and Vite's caches stay in the workspace for its next build (the dependencies
    // are links into the shared store, which the build cannot write).
    let modules = env.workspace_root().join(client).join("site/node_modules");
    assert!(
        modules.join(".vite").is_dir() || modules.join(".astro").is_dir(),
        "the build's caches are not the workspace's own"
    );
    let upstream = env.upstream(client, "site");
    let committed_s: u64 = git(&upstream, &["log", "-1", "--format=%ct", "thread-t"])
        .trim()
        .parse()
        .unwrap();
    (node_started_ms(env, client).await, committed_s * 1000)
}

#[tokio::test(flavor = "multi_thread")]
async fn astro_loads_while_the_agent_works_and_the_build_runs_in_that_process() {
    let mut env = TestEnv::new("build-ahead").await;
    // First without: this also installs the lock file into the store, so that the second
    // client's dependencies are there when its agent starts.
    let (usual_started, usual_committed) =
        edit_once(&mut env, "usual", &[("BUILD_AHEAD_MAX", "0")]).await;
    assert!(
        usual_started >= usual_committed,
        "without BUILD_AHEAD_MAX the build's Node started {} ms before the agent's commit",
        usual_committed - usual_started
    );
    let (ahead_started, ahead_committed) = edit_once(&mut env, "ahead", &[]).await;
    // The commit time is whole seconds (rounded down): a process that started with the agent
    // is still more than AGENT_SECONDS - 2 older.
    assert!(
        ahead_started + (AGENT_SECONDS - 2) * 1000 < ahead_committed,
        "the build's Node started at {ahead_started}, the agent committed at {ahead_committed}: \
         not started ahead\n{}",
        env.worker_log()
    );
}
