//! Issue 27: a real browser (Debian's Chromium) looks at every publish as the bucket serves it:
//! status, title, console errors, failed requests, screenshots and changed pixels in
//! `completed`'s `check`, and a repair by the agent when the publish broke a page. Every test
//! here runs the installed Chromium (scripts/test installs it) against moto and the tiny site.
//!
//! Limits: a message here is the stand-in, the tiny build and a check of two or three pages at
//! two widths; Chromium's cold start on a busy 2-core machine takes seconds, the check itself
//! one or two. 180 s per message is several times what a loaded CI machine needs.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::Value;

use edit_worker_actors::steps::check::pixels::Rgba;

use crate::common::{Otlp, Site, TestEnv, git, of_type};

/// See the module's note on limits.
const MESSAGE_LIMIT: Duration = Duration::from_secs(180);

/// The worker's settings for a checked run: the check on, the repair as given.
fn checked(repair: &str) -> Vec<(&'static str, &str)> {
    vec![("BROWSER_CHECK", "on"), ("CHECK_REPAIR", repair)]
}

/// The `completed` event of `message_id` (the test fails on any other ending).
async fn completed(env: &TestEnv, message_id: &str) -> Value {
    let events = env
        .wait_until(&format!("end of {message_id}"), MESSAGE_LIMIT, |e| {
            e["messageId"] == message_id && crate::common::is_terminal(e)
        })
        .await;
    let done: Vec<&Value> = of_type(&events, "completed")
        .into_iter()
        .filter(|e| e["messageId"] == message_id)
        .collect();
    assert_eq!(done.len(), 1, "{events:#?}\n{}", env.worker_log());
    done[0].clone()
}

fn page<'a>(check: &'a Value, path: &str) -> &'a Value {
    check["pages"]
        .as_array()
        .and_then(|pages| pages.iter().find(|p| p["path"] == path))
        .unwrap_or_else(|| panic!("no page {path} in {check:#}"))
}

/// The screenshot a `check` links to, read back from the bucket and decoded.
async fn screenshot(env: &TestEnv, bucket: &str, done: &Value, url: &Value) -> Rgba {
    let url = url.as_str().expect("a screenshot URL");
    let preview = done["previewUrl"].as_str().unwrap();
    let key = url
        .strip_prefix(preview)
        .unwrap_or_else(|| panic!("{url} is not under {preview}"));
    assert!(key.starts_with(".edit-worker/checks/"), "{key}");
    let objects = env.bucket_contents(bucket).await;
    let (content_type, bytes) = objects
        .get(key)
        .unwrap_or_else(|| panic!("{key} is not in the bucket"));
    assert_eq!(content_type, "image/png");
    Rgba::decode_png(bytes).expect("a PNG")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_that_throws_and_misses_an_image_is_named_with_real_screenshots() {
    let mut env = TestEnv::new("check-broken").await;
    let bucket = env.create_site("ivy", "site", Site::Tiny).await;
    env.start_worker(&checked("off"));
    let id = env.send("ivy", "site", "t", "[standin:break-page]").await;
    let done = completed(&env, &id).await;
    let check = &done["check"];
    assert_eq!(check["ok"], false, "{done:#}");
    assert!(check["ms"].as_u64().unwrap() > 0);
    let oops = page(check, "/oops/");
    assert_eq!(oops["status"], 200, "{oops:#}");
    assert_eq!(oops["title"], "Oops");
    let errors = oops["consoleErrors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("Error: boom")),
        "{oops:#}"
    );
    assert_eq!(
        oops["failedRequests"],
        serde_json::json!([{"url": "/missing.png", "status": 404}]),
        "{oops:#}"
    );
    // The home page, checked too, is fine.
    let home = page(check, "/");
    assert_eq!(home["consoleErrors"], serde_json::json!([]), "{home:#}");
    assert_eq!(home["failedRequests"], serde_json::json!([]), "{home:#}");
    assert_eq!(home["title"], "Amelia Stamps");
    // Real pictures of the page at both widths, not blank ones.
    let desktop = screenshot(&env, &bucket, &done, &oops["screenshot"]).await;
    let phone = screenshot(&env, &bucket, &done, &oops["screenshotMobile"]).await;
    assert_eq!((desktop.width, desktop.height), (1280, 800));
    assert_eq!((phone.width, phone.height), (390, 844));
    assert!(!desktop.is_blank(), "the desktop screenshot shows nothing");
    assert!(!phone.is_blank(), "the phone screenshot shows nothing");
    // No repair was asked for (CHECK_REPAIR=off): one agent run.
    assert!(check.get("repair").is_none(), "{check:#}");
    assert_eq!(env.agent_runs().len(), 1);
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_edit_is_ok_with_changed_pixels_for_the_changed_page_only() {
    let mut env = TestEnv::new("check-pixels").await;
    env.create_site("jon", "site", Site::Tiny).await;
    env.start_worker(&checked("on"));
    // The first publish: every page is new, so `/` and `/about/` are checked, with nothing
    // earlier to compare.
    let first = env
        .send(
            "jon",
            "site",
            "t",
            "Update the homepage title to \"Jon's Stamps\"",
        )
        .await;
    let done = completed(&env, &first).await;
    let check = &done["check"];
    assert_eq!(check["ok"], true, "{done:#}");
    assert!(
        page(check, "/about/").get("changedPixels").is_none(),
        "{check:#}"
    );
    // Then only the about page changes.
    let about = "[standin:write src/pages/about.astro ---\n---\n<html lang=\"en\">\n  <head>\n    \
                 <meta charset=\"utf-8\" />\n    <title>About - Jon</title>\n  </head>\n  <body>\n    \
                 <h1>About Jon, who carves stamps</h1>\n    <p>Every one by hand, since 1999.</p>\n  \
                 </body>\n</html>]";
    let second = env.send("jon", "site", "t", about).await;
    let done = completed(&env, &second).await;
    let check = &done["check"];
    assert_eq!(check["ok"], true, "{done:#}");
    let changed = page(check, "/about/")["changedPixels"].as_f64().unwrap();
    assert!(changed > 0.0 && changed <= 1.0, "{check:#}");
    assert_eq!(page(check, "/about/")["title"], "About - Jon");
    // `/` is always checked; it did not change.
    assert_eq!(
        page(check, "/")["changedPixels"].as_f64(),
        Some(0.0),
        "{check:#}"
    );
    assert_eq!(check.get("repair"), None);
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_repair_turns_a_broken_page_into_a_clean_one() {
    let mut env = TestEnv::new("check-repair").await;
    let bucket = env.bucket("kai", "site");
    env.create_bucket(&bucket).await;
    let upstream = env.create_upstream("kai", "site", Site::Tiny);
    env.start_worker(&checked("on"));
    let id = env.send("kai", "site", "t", "[standin:break-page]").await;
    let done = completed(&env, &id).await;
    let check = &done["check"];
    let repair = &check["repair"];
    let found: Vec<&str> = repair["found"]
        .as_array()
        .unwrap_or_else(|| panic!("no repair in {done:#}\n{}", env.worker_log()))
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("/oops/: console error:") && f.contains("boom")),
        "{found:?}"
    );
    assert!(
        found.contains(&"/oops/: failed request: /missing.png (HTTP 404)"),
        "{found:?}"
    );
    assert_eq!(repair["fixed"], true, "{done:#}");
    // The check in the event is the one after the repair: clean.
    assert_eq!(check["ok"], true, "{done:#}");
    let oops = page(check, "/oops/");
    assert_eq!(oops["consoleErrors"], serde_json::json!([]));
    assert_eq!(oops["failedRequests"], serde_json::json!([]));
    // The agent ran twice, the second time resumed in the same conversation with the findings.
    let starts = env.agent_runs();
    assert_eq!(starts.len(), 2, "{starts:#?}");
    assert_eq!(starts[1]["resumed"], true);
    assert_eq!(starts[1]["sessionId"], starts[0]["sessionId"]);
    assert!(
        starts[1]["prompt"]
            .as_str()
            .unwrap()
            .contains("/oops/: failed request: /missing.png (HTTP 404)"),
        "{:#}",
        starts[1]
    );
    // The repair is committed, published and pushed like any edit.
    let tip = git(&upstream, &["rev-parse", "refs/heads/thread-t"]);
    assert_eq!(done["commit"], tip.as_str());
    assert_eq!(
        git(&upstream, &["log", "-1", "--format=%s", &tip]),
        "Claude: Fix what the browser check found"
    );
    let live = env.bucket_contents(&bucket).await;
    let html = String::from_utf8_lossy(&live["oops/index.html"].1);
    assert!(!html.contains("missing.png"), "{html}");
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_killed_mid_check_is_started_again_and_the_message_completes() {
    let mut env = TestEnv::new("check-kill").await;
    env.create_site("lea", "site", Site::Tiny).await;
    let otlp = Otlp::start().await;
    let markers = env.dir.path().join("faults");
    std::fs::create_dir_all(&markers).unwrap();
    let fault = format!("browser.kill@{}", markers.display());
    env.start_worker(
        &[
            otlp.worker_env().as_slice(),
            &checked("on"),
            &[("EDIT_WORKER_FAULT", fault.as_str())],
        ]
        .concat(),
    );
    let id = env
        .send("lea", "site", "t", "Update the homepage title to \"Lea\"")
        .await;
    let done = completed(&env, &id).await;
    // The fault fired: the browser was killed after loading its first page.
    assert!(markers.join("fault-browser.kill").exists());
    let check = &done["check"];
    assert_eq!(check["ok"], true, "{done:#}\n{}", env.worker_log());
    assert_eq!(page(check, "/")["title"], "Lea");
    // Two starts: the first, and the one after the kill. The metrics exported after the event
    // count both; 30 s is many export intervals (Otlp::worker_env).
    let metrics = otlp
        .wait_for_metrics("two browser starts", Duration::from_secs(30), |m| {
            m.value("edit_worker.browser.starts", &[]) >= 2
        })
        .await;
    assert_eq!(
        metrics.value("edit_worker.browser.starts", &[("restart", "true")]),
        1,
        "{metrics}"
    );
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_chromium_auto_completes_without_a_check_and_on_refuses_to_start() {
    let mut env = TestEnv::new("check-none").await;
    env.create_site("max", "site", Site::Tiny).await;
    let nowhere = env.dir.path().join("no-chromium-here");
    let nowhere = nowhere.to_str().unwrap();
    env.start_worker(&[("BROWSER_CHECK", "auto"), ("CHROME_BIN", nowhere)]);
    let id = env
        .send("max", "site", "t", "Update the homepage title to \"Max\"")
        .await;
    let done = completed(&env, &id).await;
    assert!(done.get("check").is_none(), "{done:#}");
    assert!(done["publish"]["uploaded"].as_u64().unwrap() > 0);
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
    // The contract's log line: auto found no Chromium, so publishes go unchecked.
    let said = env.log_lines().into_iter().any(|l| {
        crate::common::log_message(&l).contains("no Chromium found")
            && l["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(nowhere))
    });
    assert!(said, "{}", env.worker_log());
    // `on` asks for it: no start without it (a configuration error, exit 2).
    env.start_worker(&[("BROWSER_CHECK", "on"), ("CHROME_BIN", nowhere)]);
    // Exits at once, before any work; 60 s covers a cold start of the binary under load.
    assert_eq!(
        env.wait_worker(Duration::from_secs(60)),
        Some(2),
        "{}",
        env.worker_log()
    );
}

/// One HTTP/1.1 GET on loopback: the status line, the headers, the body.
fn get(origin: &str, path: &str) -> (u16, String, String) {
    let addr = origin.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn preview_serves_the_bucket_as_website_hosting_does() {
    let env = TestEnv::new("preview").await;
    let bucket = env.bucket("noa", "site");
    env.create_bucket(&bucket).await;
    for (key, body) in [
        ("index.html", "<h1>home</h1>"),
        ("about/index.html", "<h1>about</h1>"),
        ("404.html", "<h1>not here</h1>"),
        ("style.css", "h1 {}"),
    ] {
        let content_type = if key.ends_with(".css") {
            "text/css"
        } else {
            "text/html"
        };
        env.s3
            .put_object()
            .bucket(&bucket)
            .key(key)
            .content_type(content_type)
            .body(body.as_bytes().to_vec().into())
            .send()
            .await
            .unwrap();
    }
    let mut preview = std::process::Command::new(env!("CARGO_BIN_EXE_edit-worker"))
        .args(["preview", "--client", "noa", "--project", "site"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.worker_env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Its first line is the URL (printed once it listens).
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(preview.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let origin = line.trim().to_owned();
    assert!(origin.starts_with("http://127.0.0.1:"), "{origin}");
    let served = tokio::task::spawn_blocking(move || {
        ["/", "/about/", "/about", "/nope/", "/style.css"].map(|p| get(&origin, p))
    })
    .await
    .unwrap();
    let _ = preview.kill();
    let _ = preview.wait();
    let [home, about, about_no_slash, missing, css] = served;
    assert_eq!((home.0, home.2.as_str()), (200, "<h1>home</h1>"));
    assert!(home.1.contains("Content-Type: text/html"), "{}", home.1);
    assert_eq!((about.0, about.2.as_str()), (200, "<h1>about</h1>"));
    assert_eq!(about_no_slash.0, 302);
    assert!(
        about_no_slash.1.contains("Location: /about/"),
        "{}",
        about_no_slash.1
    );
    assert_eq!((missing.0, missing.2.as_str()), (404, "<h1>not here</h1>"));
    assert_eq!((css.0, css.2.as_str()), (200, "h1 {}"));
    assert!(css.1.contains("Content-Type: text/css"), "{}", css.1);
}

/// The processes whose command line names a browser profile under `root` (not bubblewrap's,
/// which names it too): pid and command line.
fn browser_processes(root: &std::path::Path) -> Vec<(u32, String)> {
    let profiles = format!(
        "--user-data-dir={}",
        root.join(".sandbox/browser").display()
    );
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a.starts_with(&profiles)) && !args[0].ends_with("bwrap") {
            found.push((pid, args.join(" ")));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn the_browser_runs_as_a_tenant_without_the_workers_secrets_and_dies_with_it() {
    let mut env = TestEnv::new("check-sandbox").await;
    env.create_site("oli", "site", Site::Tiny).await;
    // The isolation the host allows (the tests run as root: a uid of its own at least).
    env.start_worker(&[
        ("ISOLATION", "auto"),
        ("BROWSER_CHECK", "on"),
        ("BROWSER_TEST_SECRET", "s3cr3t-of-the-worker"),
    ]);
    let id = env
        .send("oli", "site", "t", "Update the homepage title to \"Oli\"")
        .await;
    let done = completed(&env, &id).await;
    assert_eq!(done["check"]["ok"], true, "{done:#}\n{}", env.worker_log());
    // The browser stays up between checks: its main process is there to look at.
    let browsers = browser_processes(&env.workspace_root());
    assert!(!browsers.is_empty(), "{}", env.worker_log());
    for (pid, cmdline) in &browsers {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert_ne!(uid, 0, "the browser runs as the worker: {cmdline}");
        let environ =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
                .into_owned();
        for secret in [
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
            "s3cr3t-of-the-worker",
            "INPUT_QUEUE_URL",
        ] {
            assert!(
                !environ.contains(secret),
                "{secret} reached the browser: {environ:?}"
            );
        }
        for flag in [
            "--headless",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
        ] {
            assert!(cmdline.contains(flag), "{flag} missing: {cmdline}");
        }
        assert!(!cmdline.contains("--remote-debugging-port"), "{cmdline}");
    }
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
    // It dies with the worker (PR_SET_PDEATHSIG, bubblewrap's --die-with-parent). A process
    // that is being killed can linger for a moment: 30 s is far more than that under load.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !browser_processes(&env.workspace_root()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the browser outlived the worker: {:?}",
            browser_processes(&env.workspace_root())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
