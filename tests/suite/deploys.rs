//! Issue 26: every publish is a deploy, and a rollback message makes the bucket hold an earlier
//! deploy again, without the agent or a build, with a `Rollback to` commit on the thread's
//! branch. Against moto (with bucket versioning on and off), git with a bare upstream, the
//! tiny site and the stand-in agent.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Site, TestEnv, git};

/// One edit of the tiny site (agent stand-in, a Node build of four files, a publish, a push)
/// takes about 2 s alone; a rollback well under one. Several tests share two busy cores with
/// Node builds of their own, so a step is given two minutes: generous by far, and still a
/// failure well before the suite's own timeout.
const STEP: Duration = Duration::from_secs(120);

const CLIENT: &str = "dep";
const PROJECT: &str = "site";
const THREAD: &str = "t1";

/// What one completed edit or rollback left.
struct Deploy {
    id: String,
    commit: String,
    event: Value,
    /// The site as the bucket served it right after.
    files: BTreeMap<String, Vec<u8>>,
}

/// A test's world: a worker serving one workspace, its bucket (versioned or not).
async fn world(name: &str, versioned: bool, extra: &[(&str, &str)]) -> (TestEnv, String) {
    let mut env = TestEnv::new(name).await;
    let bucket = env.bucket(CLIENT, PROJECT);
    env.create_bucket(&bucket).await;
    if versioned {
        env.enable_versioning(&bucket).await;
    }
    env.create_upstream(CLIENT, PROJECT, Site::Tiny);
    env.start_worker(extra);
    (env, bucket)
}

/// Wait for `id`'s terminal event and return it (failing the test on anything but `kind`).
async fn ended(env: &TestEnv, id: &str, kind: &str) -> Value {
    let events = env
        .wait_until(&format!("terminal event of {id}"), STEP, |e| {
            e["messageId"] == id && crate::common::is_terminal(e)
        })
        .await;
    let end = events
        .iter()
        .find(|e| e["messageId"] == id && crate::common::is_terminal(e))
        .unwrap()
        .clone();
    assert_eq!(end["type"], kind, "{end:#}\n{}", env.worker_log());
    end
}

async fn deployed(env: &TestEnv, bucket: &str, id: &str) -> Deploy {
    let event = ended(env, id, "completed").await;
    Deploy {
        id: event["deployId"]
            .as_str()
            .unwrap_or_else(|| panic!("no deployId: {event:#}"))
            .to_owned(),
        commit: event["commit"].as_str().unwrap().to_owned(),
        files: env.site_files(bucket).await,
        event,
    }
}

async fn edit(env: &TestEnv, bucket: &str, command: &str) -> Deploy {
    let id = env.send(CLIENT, PROJECT, THREAD, command).await;
    deployed(env, bucket, &id).await
}

async fn rollback(env: &TestEnv, bucket: &str, to: Option<&str>) -> Deploy {
    let id = env.send_rollback(CLIENT, PROJECT, THREAD, to).await;
    deployed(env, bucket, &id).await
}

/// A rollback's event: what it went back to, a new deploy, and no agent, install or build.
fn assert_rolled_back(done: &Deploy, to: &Deploy) {
    let event = &done.event;
    assert_eq!(
        event["rolledBackTo"]["deployId"],
        to.id.as_str(),
        "{event:#}"
    );
    assert_eq!(
        event["rolledBackTo"]["commit"],
        to.commit.as_str(),
        "{event:#}"
    );
    assert_ne!(
        done.id, to.id,
        "a rollback is a deploy of its own: {event:#}"
    );
    for phase in ["agent", "install", "build"] {
        assert!(
            event["durationsMs"].get(phase).is_none(),
            "a rollback ran `{phase}`: {event:#}"
        );
    }
    for phase in ["prepare", "commit", "publish", "push", "total"] {
        assert!(event["durationsMs"][phase].is_u64(), "{phase}: {event:#}");
    }
    assert_eq!(
        done.files, to.files,
        "the bucket must hold exactly the target deploy's files (keys and bytes)"
    );
}

/// The thread's branch on the upstream: its tip, the tip's subject and tree.
fn branch_tip(env: &TestEnv) -> (String, String, String) {
    let upstream = env.upstream(CLIENT, PROJECT);
    let tip = git(
        &upstream,
        &["rev-parse", &format!("refs/heads/thread-{THREAD}")],
    );
    let subject = git(&upstream, &["log", "-1", "--format=%s", &tip]);
    let tree = git(&upstream, &["rev-parse", &format!("{tip}^{{tree}}")]);
    (tip, subject, tree)
}

fn tree_of(env: &TestEnv, commit: &str) -> String {
    git(
        &env.upstream(CLIENT, PROJECT),
        &["rev-parse", &format!("{commit}^{{tree}}")],
    )
}

/// Three edits, then rollbacks to `previous`, to a deployId and to a commit: each leaves the
/// bucket holding exactly that deploy's files, runs no agent and no build, and puts a
/// `Rollback to` commit with the target's tree on the branch; the next edit builds on it.
async fn rollbacks_restore_exactly_each_deploy(versioned: bool) {
    let name = if versioned { "dep-ver" } else { "dep-cp" };
    let (mut env, bucket) = world(name, versioned, &[]).await;
    let one = edit(
        &env,
        &bucket,
        "Update the homepage title to \"One\" [standin:write public/a.txt one]",
    )
    .await;
    let two = edit(
        &env,
        &bucket,
        "Update the homepage title to \"Two\" [standin:write public/b.txt two]",
    )
    .await;
    let three = edit(
        &env,
        &bucket,
        "Update the homepage title to \"Three\" [standin:write public/a.txt three]",
    )
    .await;
    assert!(one.files.contains_key("a.txt") && !one.files.contains_key("b.txt"));
    assert_ne!(two.files, three.files);
    let agent_runs = env.agent_runs().len();
    assert_eq!(agent_runs, 3);

    // To the deploy before the live one.
    let back = rollback(&env, &bucket, None).await;
    assert_rolled_back(&back, &two);
    let (tip, subject, tree) = branch_tip(&env);
    assert_eq!(tip, back.commit);
    assert_eq!(subject, format!("Rollback to {}", &two.commit[..7]));
    assert_eq!(tree, tree_of(&env, &two.commit));
    // History is kept: the rollback commit sits on top of the edits.
    assert_eq!(
        git(
            &env.upstream(CLIENT, PROJECT),
            &["rev-parse", &format!("{tip}~1")]
        ),
        three.commit
    );

    // To a deploy by its id: one file (b.txt) must go again.
    let first = rollback(&env, &bucket, Some(&one.id)).await;
    assert_rolled_back(&first, &one);
    assert!(!first.files.contains_key("b.txt"));
    assert_eq!(branch_tip(&env).2, tree_of(&env, &one.commit));

    // To a commit, by its short id.
    let again = rollback(&env, &bucket, Some(&three.commit[..7])).await;
    assert_rolled_back(&again, &three);
    assert_eq!(branch_tip(&env).2, tree_of(&env, &three.commit));

    assert_eq!(
        env.agent_runs().len(),
        agent_runs,
        "a rollback must not run the agent"
    );
    // Where the bytes were kept: S3's versions, or server-side copies.
    let copies = env.keys_under(&bucket, ".edit-worker/objects/").await;
    assert_eq!(copies.is_empty(), versioned, "{copies:?}");
    let live = format!(".edit-worker/deploys/{CLIENT}/{PROJECT}/{}.json", again.id);
    let got = env
        .s3
        .get_object()
        .bucket(&bucket)
        .key(&live)
        .send()
        .await
        .unwrap();
    let record: Value =
        serde_json::from_slice(&got.body.collect().await.unwrap().into_bytes()).unwrap();
    assert_eq!(record["versioned"], versioned, "{record:#}");
    let with_versions = record["files"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["versionId"].is_string());
    assert_eq!(with_versions, versioned, "{record:#}");

    // The next edit on the thread builds on the rollback.
    let four = edit(&env, &bucket, "Update the homepage title to \"Four\"").await;
    assert_eq!(
        git(
            &env.upstream(CLIENT, PROJECT),
            &["rev-parse", &format!("{}~1", four.commit)]
        ),
        again.commit
    );
    assert_eq!(four.files["a.txt"], three.files["a.txt"]);
    assert_eq!(four.files["b.txt"], three.files["b.txt"]);
    let home = String::from_utf8_lossy(&four.files["index.html"]);
    assert!(home.contains("<title>Four</title>"), "{home}");

    // `edit-worker deploys`: newest first, the live one marked.
    let listed = deploys_command(&env, &bucket);
    let ids: Vec<&str> = listed
        .iter()
        .map(|d| d["deployId"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            &four.id, &again.id, &first.id, &back.id, &three.id, &two.id, &one.id
        ]
    );
    assert_eq!(listed[0]["live"], true);
    assert!(listed[1..].iter().all(|d| d["live"] == false));
    assert_eq!(listed[1]["action"], "rollback");
    assert_eq!(listed[1]["rolledBackTo"], three.id.as_str());
    assert_eq!(
        listed[0]["files"].as_u64().unwrap() as usize,
        four.files.len()
    );
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}

/// `edit-worker deploys --json` for the test's workspace.
fn deploys_command(env: &TestEnv, _bucket: &str) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edit-worker"))
        .args([
            "deploys",
            "--client",
            CLIENT,
            "--project",
            PROJECT,
            "--json",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.worker_env())
        .output()
        .expect("run edit-worker deploys");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("deploys --json prints a JSON array")
}

#[tokio::test(flavor = "multi_thread")]
async fn rollbacks_restore_exactly_each_deploy_with_kept_copies() {
    rollbacks_restore_exactly_each_deploy(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rollbacks_restore_exactly_each_deploy_with_bucket_versioning() {
    rollbacks_restore_exactly_each_deploy(true).await;
}

/// What cannot be restored ends `failed` with `unknown_deploy` and changes nothing; an unknown
/// action is rejected and never run as an edit.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_deploys_fail_and_unknown_actions_are_rejected() {
    let (mut env, bucket) = world("dep-unknown", false, &[]).await;
    // Nothing deployed yet: there is nothing to go back to.
    let id = env.send_rollback(CLIENT, PROJECT, THREAD, None).await;
    let failed = ended(&env, &id, "failed").await;
    assert_eq!(failed["error"]["kind"], "unknown_deploy", "{failed:#}");

    let only = edit(&env, &bucket, "Update the homepage title to \"Only\"").await;
    // One deploy: no deploy before the live one.
    let id = env.send_rollback(CLIENT, PROJECT, THREAD, None).await;
    let failed = ended(&env, &id, "failed").await;
    assert_eq!(failed["error"]["kind"], "unknown_deploy", "{failed:#}");
    // A deploy id and a commit never deployed.
    for to in ["000042-0123456789ab", "0123456789abcdef"] {
        let id = env.send_rollback(CLIENT, PROJECT, THREAD, Some(to)).await;
        let failed = ended(&env, &id, "failed").await;
        assert_eq!(
            failed["error"]["kind"], "unknown_deploy",
            "{to}: {failed:#}"
        );
        let message = failed["error"]["message"].as_str().unwrap();
        assert!(message.contains(to), "{message}");
    }
    assert_eq!(env.site_files(&bucket).await, only.files);
    assert_eq!(
        branch_tip(&env).0,
        only.commit,
        "no rollback commit was pushed"
    );

    // An action this worker does not know.
    let body = serde_json::json!({
        "sessionId": "s", "threadId": THREAD, "clientId": CLIENT, "projectId": PROJECT,
        "action": "publish", "command": "Update the homepage title to \"Never\"",
    });
    let id = env.send_raw(&body.to_string()).await;
    let rejected = ended(&env, &id, "rejected").await;
    assert_eq!(rejected["error"]["kind"], "unknown_action", "{rejected:#}");
    assert_eq!(env.agent_runs().len(), 1, "only the one edit ran the agent");
    assert_eq!(env.site_files(&bucket).await, only.files);
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}

/// A rollback is a message like any other: sent while an edit runs, it interrupts the edit
/// (whose work is saved), then restores the deploy before the live one.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_interrupts_a_running_edit() {
    let (mut env, bucket) = world("dep-interrupt", false, &[]).await;
    let one = edit(&env, &bucket, "Update the homepage title to \"One\"").await;
    let two = edit(&env, &bucket, "Update the homepage title to \"Two\"").await;
    let slow = env
        .send(
            CLIENT,
            PROJECT,
            THREAD,
            "Update the homepage title to \"Slow\" [standin:sleep 60]",
        )
        .await;
    // The agent is at work once it reports a step.
    env.wait_for(&slow, "progress", STEP).await;
    let id = env.send_rollback(CLIENT, PROJECT, THREAD, None).await;
    let interrupted = ended(&env, &slow, "interrupted").await;
    assert!(interrupted.get("deployId").is_none(), "{interrupted:#}");
    let back = deployed(&env, &bucket, &id).await;
    assert_rolled_back(&back, &one);
    let _ = two;
    // The interrupted edit's saved work is in the history, under the rollback.
    let upstream = env.upstream(CLIENT, PROJECT);
    let parent = git(
        &upstream,
        &["log", "-1", "--format=%s", &format!("{}~1", back.commit)],
    );
    assert_eq!(parent, "Interrupted - saving work");
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}

/// With a lease store, a worker that did none of the publishes (its own workspace root, a fresh
/// clone) rolls back from the records in the bucket, taking the workspace over.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_on_another_worker_with_a_lease_store() {
    let mut env = TestEnv::new("dep-two").await;
    let bucket = env.create_site(CLIENT, PROJECT, Site::Tiny).await;
    let store = env.create_lease_store().await;
    let root_a = env.dir.path().join("root-a");
    let root_b = env.dir.path().join("root-b");
    let (root_a, root_b) = (root_a.to_str().unwrap(), root_b.to_str().unwrap());
    let mut a = env
        .spawn_worker("a", &[("LEASE_STORE", &store), ("WORKSPACE_ROOT", root_a)])
        .await;
    let one = edit(&env, &bucket, "Update the homepage title to \"One\"").await;
    let two = edit(&env, &bucket, "Update the homepage title to \"Two\"").await;
    assert_ne!(one.files, two.files);
    assert_eq!(a.stop(), Some(0), "{}", a.text());
    let mut b = env
        .spawn_worker("b", &[("LEASE_STORE", &store), ("WORKSPACE_ROOT", root_b)])
        .await;
    let back = rollback(&env, &bucket, None).await;
    assert_rolled_back(&back, &one);
    assert_eq!(branch_tip(&env).0, back.commit, "{}", b.text());
    // Worker b, which published nothing before, did it: its own checkout was made for it.
    assert!(
        std::path::Path::new(root_b)
            .join(CLIENT)
            .join(PROJECT)
            .join(".git")
            .exists()
    );
    assert_eq!(b.stop(), Some(0), "{}", b.text());
    env.stop_worker();
}

/// Retention: records past `DEPLOY_RETENTION_DAYS` (0 here: every deploy is old at once) and
/// beyond the newest `DEPLOY_KEEP` go, with the kept bytes only they needed; the live deploy
/// and the newest stay restorable, the removed ones are `unknown_deploy`.
async fn retention_removes_what_is_past_it(versioned: bool) {
    let name = if versioned { "dep-ret-v" } else { "dep-ret" };
    let extra = [("DEPLOY_RETENTION_DAYS", "0"), ("DEPLOY_KEEP", "2")];
    let (mut env, bucket) = world(name, versioned, &extra).await;
    let mut deploys = Vec::new();
    for n in 1..=4 {
        let command =
            format!("Update the homepage title to \"T{n}\" [standin:write public/a.txt v{n}]");
        deploys.push(edit(&env, &bucket, &command).await);
    }
    let prefix = format!(".edit-worker/deploys/{CLIENT}/{PROJECT}/");
    let records = env.keys_under(&bucket, &prefix).await;
    let kept: Vec<String> = deploys[2..]
        .iter()
        .map(|d| format!("{prefix}{}.json", d.id))
        .collect();
    assert_eq!(records, kept, "only the newest two records stay");
    // Every kept byte left is one a retained deploy needs.
    let needed = retained_md5s(&env, &bucket, &kept).await;
    if versioned {
        let versions = env
            .s3
            .list_object_versions()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        let noncurrent: Vec<(String, String)> = versions
            .versions()
            .iter()
            .filter(|v| v.is_latest() == Some(false))
            .filter(|v| !v.key().unwrap_or_default().starts_with(".edit-worker/"))
            .map(|v| {
                (
                    unquote(v.e_tag().unwrap_or_default()),
                    v.key().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert!(
            !noncurrent.is_empty(),
            "deploy 3's replaced page stays kept"
        );
        for (etag, key) in &noncurrent {
            assert!(
                needed.contains(etag),
                "version {etag} of {key} outlived every deploy needing it: {versions:#?}"
            );
        }
    } else {
        let copies = env.keys_under(&bucket, ".edit-worker/objects/").await;
        assert!(!copies.is_empty(), "deploy 3's replaced bytes stay kept");
        for copy in &copies {
            // `.edit-worker/objects/{md5}/{deploy sequence}`
            let md5 = copy.split('/').nth(2).unwrap();
            assert!(
                needed.contains(md5),
                "{copy} outlived every deploy needing it"
            );
        }
    }
    // The removed deploys cannot be restored; the one before the live one can.
    let id = env
        .send_rollback(CLIENT, PROJECT, THREAD, Some(&deploys[0].id))
        .await;
    let failed = ended(&env, &id, "failed").await;
    assert_eq!(failed["error"]["kind"], "unknown_deploy", "{failed:#}");
    let back = rollback(&env, &bucket, None).await;
    assert_rolled_back(&back, &deploys[2]);
    // The live deploy (the rollback) is the newest record, and it is kept.
    let records = env.keys_under(&bucket, &prefix).await;
    assert!(
        records.contains(&format!("{prefix}{}.json", back.id)),
        "{records:?}"
    );
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}

fn unquote(etag: &str) -> String {
    etag.trim_matches('"').to_owned()
}

/// The MD5 of every file of the records `keys`.
async fn retained_md5s(
    env: &TestEnv,
    bucket: &str,
    keys: &[String],
) -> std::collections::BTreeSet<String> {
    let mut md5s = std::collections::BTreeSet::new();
    for key in keys {
        let got = env
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        let record: Value =
            serde_json::from_slice(&got.body.collect().await.unwrap().into_bytes()).unwrap();
        for file in record["files"].as_array().unwrap() {
            md5s.insert(file["md5"].as_str().unwrap().to_owned());
        }
    }
    md5s
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_what_is_past_it_with_kept_copies() {
    retention_removes_what_is_past_it(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_what_is_past_it_with_bucket_versioning() {
    retention_removes_what_is_past_it(true).await;
}

/// Every completed edit says which deploy it made.
#[tokio::test(flavor = "multi_thread")]
async fn every_publish_is_a_recorded_deploy() {
    let (mut env, bucket) = world("dep-rec", false, &[]).await;
    let done = edit(&env, &bucket, "Update the homepage title to \"Recorded\"").await;
    let key = format!(".edit-worker/deploys/{CLIENT}/{PROJECT}/{}.json", done.id);
    let got = env
        .s3
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    let record: Value =
        serde_json::from_slice(&got.body.collect().await.unwrap().into_bytes()).unwrap();
    assert_eq!(record["commit"], done.commit.as_str());
    assert_eq!(record["threadId"], THREAD);
    assert_eq!(record["messageId"], done.event["messageId"]);
    let files: BTreeMap<String, u64> = record["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let served: BTreeMap<String, u64> = done
        .files
        .iter()
        .map(|(k, v)| (k.clone(), v.len() as u64))
        .collect();
    assert_eq!(
        files, served,
        "the record lists exactly what the bucket serves"
    );
    assert_eq!(env.stop_worker(), Some(0), "{}", env.worker_log());
}
