//! Issue 4: the publisher against moto. Content-compared uploads, order, headers, safety.
//! Issue 13: a bucket belongs to one workspace; size caps on what a build may publish.

use crate::common;

use std::path::Path;
use std::time::Duration;

use edit_worker_actors::contract::message::WorkspaceKey;
use edit_worker_actors::steps::publish::{
    CacheRule, OWNER_KEY, PublishError, PublishOptions, Publisher,
};

/// A small generated site: `pages` HTML pages, one stylesheet per page under _astro/, an image.
fn site(dir: &Path, pages: usize) {
    std::fs::create_dir_all(dir.join("_astro")).unwrap();
    for i in 0..pages {
        let page = if i == 0 {
            dir.join("index.html")
        } else {
            dir.join(format!("p{i}/index.html"))
        };
        std::fs::create_dir_all(page.parent().unwrap()).unwrap();
        std::fs::write(
            &page,
            format!("<html><head><link rel=stylesheet href=/_astro/s{i}.css></head><body>page {i}</body></html>"),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("_astro/s{i}.css")),
            format!("body {{ --p: {i}; }}"),
        )
        .unwrap();
    }
    std::fs::write(dir.join("logo.png"), [0x89, b'P', b'N', b'G', 0, 1, 2, 3]).unwrap();
}

async fn setup(name: &str) -> (common::TestEnv, String, tempfile::TempDir) {
    let env = common::TestEnv::new(name).await;
    let bucket = env.bucket("pub", "site");
    env.create_bucket(&bucket).await;
    (env, bucket, tempfile::tempdir().unwrap())
}

fn publisher(s3: aws_sdk_s3::Client) -> Publisher {
    Publisher::new(s3, PublishOptions::default())
}

/// Rewrite every file with the same content and a new timestamp, as `npm run build` does.
fn rebuild_all(dir: &Path) {
    for key in common::files_under(dir) {
        let path = dir.join(key);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_with_one_change_uploads_exactly_that_file() {
    let (env, bucket, dir) = setup("pub-one").await;
    site(dir.path(), 20);
    let p = publisher(env.s3.clone());
    let cold = p.publish(&bucket, dir.path(), None).await.unwrap();
    assert_eq!((cold.uploaded, cold.skipped, cold.deleted), (41, 0, 0));

    rebuild_all(dir.path());
    std::fs::write(
        dir.path().join("p3/index.html"),
        "<html>changed page</html>",
    )
    .unwrap();
    let again = p.publish(&bucket, dir.path(), None).await.unwrap();
    assert_eq!(
        (again.uploaded, again.skipped, again.deleted),
        (1, 40, 0),
        "{again:?}"
    );
    let live = env.bucket_contents(&bucket).await;
    assert_eq!(live["p3/index.html"].1, b"<html>changed page</html>");

    rebuild_all(dir.path());
    let same = p.publish(&bucket, dir.path(), None).await.unwrap();
    assert_eq!((same.uploaded, same.skipped, same.bytes), (0, 41, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_same_size_edit_with_an_older_timestamp_is_uploaded() {
    let (env, bucket, dir) = setup("pub-older").await;
    site(dir.path(), 2);
    let p = publisher(env.s3.clone());
    p.publish(&bucket, dir.path(), None).await.unwrap();
    let file = dir.path().join("_astro/s1.css");
    let before = std::fs::read(&file).unwrap();
    let after: Vec<u8> = before
        .iter()
        .map(|b| if *b == b'1' { b'7' } else { *b })
        .collect();
    assert_eq!(before.len(), after.len());
    std::fs::write(&file, &after).unwrap();
    // A timestamp a day in the past: `aws s3 sync` would skip this file.
    common::age_file(&file, Duration::from_secs(86_400));
    let report = p.publish(&bucket, dir.path(), None).await.unwrap();
    assert_eq!(report.uploaded, 1);
    assert_eq!(env.bucket_contents(&bucket).await["_astro/s1.css"].1, after);
}

#[tokio::test(flavor = "multi_thread")]
async fn html_arrives_after_the_assets_and_deletions_come_last() {
    let (env, bucket, dir) = setup("pub-order").await;
    site(dir.path(), 6);
    std::fs::write(dir.path().join("old.txt"), "stale").unwrap();
    publisher(env.s3.clone())
        .publish(&bucket, dir.path(), None)
        .await
        .unwrap();
    std::fs::remove_file(dir.path().join("old.txt")).unwrap();
    for i in 0..6 {
        std::fs::write(
            dir.path().join(format!("_astro/s{i}.css")),
            format!("body {{ --v: {i}; }}"),
        )
        .unwrap();
    }
    for page in ["index.html", "p1/index.html", "p4/index.html"] {
        std::fs::write(dir.path().join(page), format!("<html>new {page}</html>")).unwrap();
    }

    let proxy = common::recording_proxy(common::endpoint(), vec![]).await;
    let s3 = common::s3_client(&proxy.url).await;
    let report = publisher(s3)
        .publish(&bucket, dir.path(), None)
        .await
        .unwrap();
    assert_eq!((report.uploaded, report.deleted), (9, 1));
    let seen = proxy.requests.lock().unwrap().clone();
    let writes: Vec<&String> = seen
        .iter()
        .filter(|r| r.starts_with("PUT ") || r.starts_with("POST "))
        .collect();
    let first_html = writes.iter().position(|r| r.contains(".html")).unwrap();
    let last_asset = writes.iter().rposition(|r| r.contains(".css")).unwrap();
    assert!(last_asset < first_html, "assets after HTML: {writes:#?}");
    let delete = writes
        .iter()
        .position(|r| r.contains("?delete"))
        .expect("a DeleteObjects request");
    assert_eq!(delete, writes.len() - 1, "deletion last: {writes:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_upload_stops_the_deletions() {
    let (env, bucket, dir) = setup("pub-fail").await;
    site(dir.path(), 3);
    std::fs::write(
        dir.path().join("stale.txt"),
        "keep me until the site is whole",
    )
    .unwrap();
    publisher(env.s3.clone())
        .publish(&bucket, dir.path(), None)
        .await
        .unwrap();
    std::fs::remove_file(dir.path().join("stale.txt")).unwrap();
    std::fs::write(dir.path().join("fail-me.css"), "new").unwrap();

    let proxy = common::recording_proxy(common::endpoint(), vec!["fail-me".into()]).await;
    let s3 = common::s3_client(&proxy.url).await;
    let err = publisher(s3)
        .publish(&bucket, dir.path(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Upload { .. }), "{err}");
    let live = env.bucket_contents(&bucket).await;
    assert!(
        live.contains_key("stale.txt"),
        "deleted although an upload failed"
    );
    assert!(
        !proxy
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("?delete"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinks_are_not_published_and_empty_builds_are_refused() {
    let (env, bucket, dir) = setup("pub-safety").await;
    site(dir.path(), 1);
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
    std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
    let p = publisher(env.s3.clone());
    p.publish(&bucket, dir.path(), None).await.unwrap();
    let live = env.bucket_contents(&bucket).await;
    assert!(
        !live
            .keys()
            .any(|k| k.contains("passwd") || k.starts_with("etc")),
        "{:?}",
        live.keys()
    );

    let empty = tempfile::tempdir().unwrap();
    let err = p.publish(&bucket, empty.path(), None).await.unwrap_err();
    assert_eq!(err.kind(), "empty_build");
    let err = p
        .publish(&bucket, &empty.path().join("missing"), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "empty_build");
    assert_eq!(
        env.bucket_contents(&bucket).await.len(),
        live.len(),
        "nothing was wiped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_deletes_most_of_the_site_fails_unless_allowed() {
    let (env, bucket, dir) = setup("pub-cap").await;
    site(dir.path(), 10);
    let p = publisher(env.s3.clone());
    p.publish(&bucket, dir.path(), None).await.unwrap();
    let small = tempfile::tempdir().unwrap();
    site(small.path(), 1);
    let err = p.publish(&bucket, small.path(), None).await.unwrap_err();
    assert_eq!(err.kind(), "too_many_deletions", "{err}");
    assert_eq!(
        env.bucket_contents(&bucket).await.len(),
        21,
        "nothing changed"
    );

    let allowed = Publisher::new(
        env.s3.clone(),
        PublishOptions {
            allow_mass_delete: true,
            ..PublishOptions::default()
        },
    );
    let report = allowed.publish(&bucket, small.path(), None).await.unwrap();
    assert_eq!(report.deleted, 18);
    assert_eq!(env.bucket_contents(&bucket).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_follow_the_configured_rules() {
    let (env, bucket, dir) = setup("pub-headers").await;
    site(dir.path(), 1);
    let custom = Publisher::new(
        env.s3.clone(),
        PublishOptions {
            cache_rules: CacheRule::parse_list(
                "_astro/=public, max-age=31536000, immutable; *.png=public, max-age=600; *=no-cache",
            )
            .unwrap(),
            ..PublishOptions::default()
        },
    );
    custom.publish(&bucket, dir.path(), None).await.unwrap();
    let head = |key: &'static str| {
        let s3 = env.s3.clone();
        let bucket = bucket.clone();
        async move {
            s3.head_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap()
        }
    };
    let css = head("_astro/s0.css").await;
    assert_eq!(css.content_type(), Some("text/css; charset=utf-8"));
    assert_eq!(
        css.cache_control(),
        Some("public, max-age=31536000, immutable")
    );
    let html = head("index.html").await;
    assert_eq!(html.content_type(), Some("text/html; charset=utf-8"));
    assert_eq!(html.cache_control(), Some("no-cache"));
    let png = head("logo.png").await;
    assert_eq!(png.content_type(), Some("image/png"));
    assert_eq!(png.cache_control(), Some("public, max-age=600"));
    assert!(html.metadata().unwrap().contains_key("md5"));
}

#[tokio::test(flavor = "multi_thread")]
async fn large_files_go_in_parts_and_are_recognised_afterwards() {
    let (env, bucket, dir) = setup("pub-multipart").await;
    site(dir.path(), 1);
    // 12 MiB with a threshold of 5 MiB: three parts.
    let big: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("video.mp4"), &big).unwrap();
    let options = PublishOptions {
        multipart_threshold: 5 * 1024 * 1024,
        part_size: 5 * 1024 * 1024,
        ..PublishOptions::default()
    };
    let p = Publisher::new(env.s3.clone(), options.clone());
    p.publish(&bucket, dir.path(), None).await.unwrap();
    let head = env
        .s3
        .head_object()
        .bucket(&bucket)
        .key("video.mp4")
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap().ends_with("-3\""),
        "{:?}",
        head.e_tag()
    );
    rebuild_all(dir.path());
    let again = p.publish(&bucket, dir.path(), None).await.unwrap();
    assert_eq!(again.uploaded, 0, "{again:?}");
    // Uploaded in parts of another size: the stored MD5 still recognises it.
    let other = Publisher::new(
        env.s3.clone(),
        PublishOptions {
            part_size: 6 * 1024 * 1024,
            multipart_threshold: 6 * 1024 * 1024,
            ..options
        },
    );
    assert_eq!(
        other
            .publish(&bucket, dir.path(), None)
            .await
            .unwrap()
            .uploaded,
        0
    );
    let got = env
        .s3
        .get_object()
        .bucket(&bucket)
        .key("video.mp4")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().len(),
        big.len()
    );
}

/// A distribution in front of the client's bucket gets the changed paths invalidated.
#[tokio::test(flavor = "multi_thread")]
async fn a_cloudfront_distribution_gets_the_changed_paths_invalidated() {
    use aws_sdk_cloudfront::types::{
        DefaultCacheBehavior, DistributionConfig, Origin, Origins, S3OriginConfig,
        ViewerProtocolPolicy,
    };
    let mut env = common::TestEnv::new("cdn").await;
    let bucket = env.bucket("uma", "site");
    env.create_bucket(&bucket).await;
    env.create_upstream("uma", "site", common::Site::Tiny);
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(common::endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_cloudfront::config::Credentials::new(
            "testing", "testing", None, None, "t",
        ))
        .load()
        .await;
    let cloudfront = aws_sdk_cloudfront::Client::new(&sdk);
    let origin = Origin::builder()
        .id("edit-bucket")
        .domain_name(format!("{bucket}.s3.amazonaws.com"))
        .s3_origin_config(S3OriginConfig::builder().origin_access_identity("").build())
        .build()
        .unwrap();
    let behavior = DefaultCacheBehavior::builder()
        .target_origin_id("edit-bucket")
        .viewer_protocol_policy(ViewerProtocolPolicy::AllowAll)
        // AWS's managed "CachingOptimized" policy.
        .cache_policy_id("658327ea-f89d-4fab-a63d-7e88639e58f6")
        .build()
        .unwrap();
    let config = DistributionConfig::builder()
        .caller_reference(env.name.clone())
        .origins(
            Origins::builder()
                .quantity(1)
                .items(origin)
                .build()
                .unwrap(),
        )
        .default_cache_behavior(behavior)
        .comment("edit site")
        .enabled(true)
        .build()
        .unwrap();
    let created = cloudfront
        .create_distribution()
        .distribution_config(config)
        .send()
        .await
        .unwrap();
    let distribution = created.distribution().unwrap().id().to_owned();

    env.start_worker(&[("CLOUDFRONT_DISTRIBUTIONS", &format!("uma={distribution}"))]);
    let id = env
        .send("uma", "site", "t", "Update the homepage title to \"Fresh\"")
        .await;
    let events = env.wait_for(&id, "completed", common::ONE_MESSAGE).await;
    let done = common::event_of(&events, &id, "completed");
    let invalidation = done["invalidationId"]
        .as_str()
        .expect("an invalidation id")
        .to_owned();
    let listed = cloudfront
        .list_invalidations()
        .distribution_id(&distribution)
        .send()
        .await
        .unwrap();
    let ids: Vec<String> = listed
        .invalidation_list()
        .map(|l| l.items().iter().map(|i| i.id().to_owned()).collect())
        .unwrap_or_default();
    assert!(ids.contains(&invalidation), "{ids:?}");
    let got = cloudfront
        .get_invalidation()
        .distribution_id(&distribution)
        .id(&invalidation)
        .send()
        .await
        .unwrap();
    let paths = got
        .invalidation()
        .unwrap()
        .invalidation_batch()
        .unwrap()
        .paths()
        .unwrap()
        .items()
        .to_vec();
    assert!(
        paths.contains(&"/".to_owned()) && paths.contains(&"/index.html".to_owned()),
        "{paths:?}"
    );
    assert_eq!(env.stop_worker(), Some(0));
}

/// Issue 12: a publish carries its lease's token into the bucket, so a worker that lost the
/// workspace's lease (paused past its expiry) cannot publish over the next holder's site.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_under_an_older_lease_token_is_refused() {
    use edit_worker_actors::contract::message::WorkspaceKey;
    use edit_worker_actors::delivery::lease::{Acquired, Leases};
    use edit_worker_actors::steps::publish::BucketFence;

    let (env, bucket, dir) = setup("pub-fence").await;
    site(dir.path(), 2);
    let key = WorkspaceKey {
        client_id: "pub".into(),
        project_id: "site".into(),
    };
    // A check that holds (the fence in the bucket is what this test is about).
    let Acquired::Granted(lease) = Leases::alone().try_acquire(&key).await.unwrap() else {
        panic!("alone, always granted");
    };
    let fence = |token| BucketFence::for_workspace(&key, token, lease.check().clone());
    let p = publisher(env.s3.clone());
    p.publish(&bucket, dir.path(), Some(&fence(1)))
        .await
        .unwrap();
    // The next holder (token 2) publishes its site.
    std::fs::write(dir.path().join("index.html"), "<p>newer holder</p>").unwrap();
    p.publish(&bucket, dir.path(), Some(&fence(2)))
        .await
        .unwrap();
    // The old holder wakes up with its older build: refused, and the site is the newer one.
    std::fs::write(dir.path().join("index.html"), "<p>stale holder</p>").unwrap();
    let stale = p.publish(&bucket, dir.path(), Some(&fence(1))).await;
    assert!(
        matches!(
            stale,
            Err(PublishError::Fenced {
                token: 1,
                found: 2,
                ..
            })
        ),
        "{stale:?}"
    );
    assert_eq!(stale.unwrap_err().kind(), "lease_lost");
    let contents = env.bucket_contents(&bucket).await;
    assert_eq!(contents["index.html"].1, b"<p>newer holder</p>");
    // The fence is the worker's, not the site's: never deleted by a publish, never counted.
    assert!(contents.contains_key(".edit-worker/lease/pub/site.json"));
    let again = p
        .publish(&bucket, dir.path(), Some(&fence(2)))
        .await
        .unwrap();
    assert_eq!(again.deleted, 0);
}

// ---------------------------------------------------------------- issue 13: one bucket, one workspace

/// What a test publish records as its deploy.
fn deploy() -> edit_worker_actors::steps::publish::deploys::DeployMeta {
    edit_worker_actors::steps::publish::deploys::DeployMeta {
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        thread_id: "t".into(),
        message_id: "m".into(),
        rolled_back_to: None,
    }
}

fn workspace(client: &str, project: &str) -> WorkspaceKey {
    WorkspaceKey {
        client_id: client.into(),
        project_id: project.into(),
    }
}

/// The requests through a recording proxy that write (PUT, POST, DELETE).
fn writes(proxy: &common::RecordingProxy) -> Vec<String> {
    proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| {
            ["PUT ", "POST ", "DELETE "]
                .iter()
                .any(|m| r.starts_with(m))
        })
        .cloned()
        .collect()
}

/// How many `method` requests the proxy saw for the owner record.
fn owner_requests(proxy: &common::RecordingProxy, method: &str) -> usize {
    proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with(method) && r.contains(OWNER_KEY))
        .count()
}

/// Two projects of one client, one bucket (a `BUCKET_TEMPLATE` without `{projectId}`): the
/// first to publish owns it, and the second's publish fails without touching anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_workspace_cannot_publish_into_a_bucket_another_workspace_owns() {
    use edit_worker_actors::delivery::lease::{Acquired, Leases};
    use edit_worker_actors::steps::publish::BucketFence;

    let (env, bucket, dir) = setup("pub-owned").await;
    let (one, two) = (workspace("pub", "one"), workspace("pub", "two"));
    site(dir.path(), 3);
    let p = publisher(env.s3.clone());
    let first = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!(first.uploaded, 7);
    let before = env.bucket_contents(&bucket).await;
    let owner: serde_json::Value = serde_json::from_slice(&before[OWNER_KEY].1).unwrap();
    assert_eq!(owner["clientId"], "pub", "{owner}");
    assert_eq!(owner["projectId"], "one", "{owner}");
    assert!(owner["since"].is_string(), "{owner}");

    // The other project's build: another home page, and fewer files (it would delete the rest).
    let other = tempfile::tempdir().unwrap();
    site(other.path(), 1);
    std::fs::write(other.path().join("index.html"), "<p>project two</p>").unwrap();
    // As another worker process would (nothing known yet), with a lease fence of its own.
    let Acquired::Granted(lease) = Leases::alone().try_acquire(&two).await.unwrap() else {
        panic!("alone, always granted");
    };
    let fence = BucketFence::for_workspace(&two, 1, lease.check().clone());
    let proxy = common::recording_proxy(common::endpoint(), vec![]).await;
    let elsewhere = publisher(common::s3_client(&proxy.url).await);
    let err = elsewhere
        .publish_for(&two, &bucket, other.path(), Some(&fence), &deploy())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            PublishError::OwnedElsewhere { bucket: b, owner_client, owner_project }
                if b == &bucket && owner_client == "pub" && owner_project == "one"
        ),
        "{err}"
    );
    assert_eq!(err.kind(), "bucket_owned_elsewhere");
    let message = err.to_string();
    assert!(message.contains("pub/one"), "{message}");
    assert!(
        message.contains("BUCKET_TEMPLATE should contain {projectId}"),
        "{message}"
    );
    assert_eq!(
        writes(&proxy),
        Vec::<String>::new(),
        "nothing may be written"
    );

    // The publisher that serves project one (it knows the owner already) refuses too.
    let err = p
        .publish_for(&two, &bucket, other.path(), None, &deploy())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "bucket_owned_elsewhere", "{err}");
    assert_eq!(
        env.bucket_contents(&bucket).await,
        before,
        "project one's site (and its owner record) must be exactly as it was"
    );

    // And project one goes on publishing.
    std::fs::write(dir.path().join("index.html"), "<p>one, again</p>").unwrap();
    let again = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!((again.uploaded, again.deleted), (1, 0), "{again:?}");
    assert_eq!(
        env.bucket_contents(&bucket).await["index.html"].1,
        b"<p>one, again</p>"
    );
}

/// The owner publishes as often as it likes; its record costs one read per bucket and process,
/// and a record that went missing is written again.
#[tokio::test(flavor = "multi_thread")]
async fn the_owner_publishes_again_reading_its_record_once() {
    let (env, bucket, dir) = setup("pub-mine").await;
    let one = workspace("pub", "one");
    site(dir.path(), 2);
    let proxy = common::recording_proxy(common::endpoint(), vec![]).await;
    let p = publisher(common::s3_client(&proxy.url).await);
    p.publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    std::fs::write(dir.path().join("index.html"), "<p>second</p>").unwrap();
    let second = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!(second.uploaded, 1, "{second:?}");
    let live = env.bucket_contents(&bucket).await;
    assert_eq!(live["index.html"].1, b"<p>second</p>");
    let deploys = |prefix: &str| live.keys().filter(|k| k.starts_with(prefix)).count();
    // Each publish is a deploy (issue 26): a record each, and the replaced home page kept.
    assert_eq!(
        deploys(".edit-worker/deploys/pub/one/"),
        2,
        "{:?}",
        live.keys()
    );
    assert_eq!(deploys(".edit-worker/objects/"), 1, "{:?}", live.keys());
    assert_eq!(
        live.len() - 3,
        6,
        "the site and the owner record: {:?}",
        live.keys()
    );
    assert_eq!(owner_requests(&proxy, "GET "), 1);
    assert_eq!(owner_requests(&proxy, "PUT "), 1);

    // An operator removed the record: the listing shows it gone, so it is claimed again.
    env.s3
        .delete_object()
        .bucket(&bucket)
        .key(OWNER_KEY)
        .send()
        .await
        .unwrap();
    let third = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!(third.uploaded, 0, "{third:?}");
    let live = env.bucket_contents(&bucket).await;
    let owner: serde_json::Value = serde_json::from_slice(&live[OWNER_KEY].1).unwrap();
    assert_eq!(owner["projectId"], "one", "{owner}");
    assert_eq!(owner_requests(&proxy, "GET "), 2);
    assert_eq!(owner_requests(&proxy, "PUT "), 2);

    // Another process serving the same workspace reads the record and publishes too.
    let fresh = publisher(env.s3.clone());
    let same = fresh
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!((same.uploaded, same.skipped), (0, 5), "{same:?}");
}

/// What a publisher knows about a bucket's owner holds only while the record is unchanged: a
/// bucket handed to another workspace (record deleted, claimed anew) is refused to the old one.
#[tokio::test(flavor = "multi_thread")]
async fn a_known_owner_is_not_trusted_once_the_record_changed() {
    let (env, bucket, dir) = setup("pub-handed").await;
    let (one, two) = (workspace("pub", "one"), workspace("pub", "two"));
    site(dir.path(), 2);
    let p = publisher(env.s3.clone());
    p.publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    env.s3
        .delete_object()
        .bucket(&bucket)
        .key(OWNER_KEY)
        .send()
        .await
        .unwrap();
    let theirs = tempfile::tempdir().unwrap();
    site(theirs.path(), 2);
    std::fs::write(theirs.path().join("index.html"), "<p>two's</p>").unwrap();
    publisher(env.s3.clone())
        .publish_for(&two, &bucket, theirs.path(), None, &deploy())
        .await
        .unwrap();
    let before = env.bucket_contents(&bucket).await;

    let err = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::OwnedElsewhere { owner_project, .. } if owner_project == "two"),
        "{err}"
    );
    assert_eq!(env.bucket_contents(&bucket).await, before);
    assert_eq!(before["index.html"].1, b"<p>two's</p>");
}

/// A file over `max_file_bytes` fails the publish before anything is uploaded, naming the file
/// and the cap; a file of exactly the cap is published.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_over_the_size_cap_fails_before_anything_is_uploaded() {
    const CAP: u64 = 1024 * 1024;
    let (env, bucket, dir) = setup("pub-filecap").await;
    let one = workspace("pub", "site");
    site(dir.path(), 2);
    let p = Publisher::new(
        env.s3.clone(),
        PublishOptions {
            max_file_bytes: CAP,
            ..PublishOptions::default()
        },
    );
    p.publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    let before = env.bucket_contents(&bucket).await;

    std::fs::write(dir.path().join("index.html"), "<p>changed</p>").unwrap();
    std::fs::remove_file(dir.path().join("logo.png")).unwrap();
    let video = dir.path().join("video.mp4");
    std::fs::write(&video, vec![7u8; CAP as usize + 1]).unwrap();
    let err = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::FileTooLarge { key, size, max }
            if key == "video.mp4" && *size == CAP + 1 && *max == CAP),
        "{err}"
    );
    assert_eq!(err.kind(), "build_too_large");
    let message = err.to_string();
    assert!(
        message.contains("video.mp4") && message.contains(&CAP.to_string()),
        "{message}"
    );
    assert_eq!(
        env.bucket_contents(&bucket).await,
        before,
        "nothing uploaded, nothing deleted"
    );

    std::fs::write(&video, vec![7u8; CAP as usize]).unwrap();
    let report = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!((report.uploaded, report.deleted), (2, 1), "{report:?}");
    assert_eq!(
        env.bucket_contents(&bucket).await["video.mp4"].1.len() as u64,
        CAP
    );
}

/// A build over `max_total_bytes` in all fails before anything is written (not even the owner
/// record of a bucket nobody owned); a build of exactly the cap is published.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_over_the_total_cap_fails_before_anything_is_written() {
    let (env, bucket, dir) = setup("pub-totalcap").await;
    let one = workspace("pub", "site");
    site(dir.path(), 20);
    let total: u64 = common::files_under(dir.path())
        .iter()
        .map(|key| std::fs::metadata(dir.path().join(key)).unwrap().len())
        .sum();
    let capped = |max_total_bytes| {
        Publisher::new(
            env.s3.clone(),
            PublishOptions {
                max_total_bytes,
                ..PublishOptions::default()
            },
        )
    };
    let proxy = common::recording_proxy(common::endpoint(), vec![]).await;
    let through_proxy = Publisher::new(
        common::s3_client(&proxy.url).await,
        PublishOptions {
            max_total_bytes: total - 1,
            ..PublishOptions::default()
        },
    );
    let err = through_proxy
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::BuildTooLarge { total: t, max, .. }
            if *t == total && *max == total - 1),
        "{err}"
    );
    assert_eq!(err.kind(), "build_too_large");
    assert!(err.to_string().contains("PUBLISH_MAX_BYTES"), "{err}");
    assert_eq!(writes(&proxy), Vec::<String>::new());
    assert!(env.bucket_contents(&bucket).await.is_empty());

    let report = capped(total)
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!((report.uploaded, report.bytes), (41, total), "{report:?}");
}

/// A publish's listing rolls the kept copies (`.edit-worker/objects/…`) up into one entry
/// (issue 26), with `.edit-worker/objects/` as S3's delimiter: a site file whose key holds that
/// text further in is rolled up too, and must still be seen (skipped when unchanged, deleted
/// when gone), or every publish would upload it again and none would ever delete it.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_key_holding_the_kept_copies_folder_is_still_listed() {
    let (env, bucket, dir) = setup("pub-rollup").await;
    let one = workspace("pub", "one");
    site(dir.path(), 2);
    let nested = "docs/.edit-worker/objects/note.txt";
    std::fs::create_dir_all(dir.path().join("docs/.edit-worker/objects")).unwrap();
    std::fs::write(dir.path().join(nested), "a note").unwrap();
    let p = publisher(env.s3.clone());
    p.publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    // The second deploy keeps the replaced home page: the bucket now has a kept copy too.
    std::fs::write(dir.path().join("index.html"), "<p>second</p>").unwrap();
    let second = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!(
        (second.uploaded, second.changed.clone()),
        (1, vec!["index.html".to_owned()]),
        "{second:?}"
    );
    std::fs::write(dir.path().join("index.html"), "<p>third</p>").unwrap();
    std::fs::remove_file(dir.path().join(nested)).unwrap();
    let third = p
        .publish_for(&one, &bucket, dir.path(), None, &deploy())
        .await
        .unwrap();
    assert_eq!((third.uploaded, third.deleted), (1, 1), "{third:?}");
    let live = env.bucket_contents(&bucket).await;
    assert!(!live.contains_key(nested), "{:?}", live.keys());
    let kept = live
        .keys()
        .filter(|k| k.starts_with(".edit-worker/objects/"))
        .count();
    assert_eq!(kept, 3, "home page twice and the note: {:?}", live.keys());
}
