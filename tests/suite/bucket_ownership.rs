//! Issue 13, end to end: a bucket belongs to one workspace. With a `BUCKET_TEMPLATE` that leaves
//! out `{projectId}` (the contract's default shape), a client's two projects map to one bucket:
//! the first to publish owns it, the other's message fails at once with
//! `bucket_owned_elsewhere`, and the owner's site stays exactly as it was.

use crate::common::{self, Site, TestEnv, deliveries_of, event_of};

#[tokio::test(flavor = "multi_thread")]
async fn a_second_project_cannot_publish_into_the_first_projects_bucket() {
    let mut env = TestEnv::new("owned").await;
    env.bucket_template = format!("edit.{{clientId}}.{}.test", env.name);
    let bucket = env.bucket("olga", "shop");
    assert_eq!(bucket, env.bucket("olga", "blog"), "one bucket for both");
    env.create_bucket(&bucket).await;
    env.create_upstream("olga", "shop", Site::Tiny);
    env.create_upstream("olga", "blog", Site::Tiny);
    env.start_worker(&[]);

    let shop = env
        .send("olga", "shop", "t", "Update the homepage title to \"Shop\"")
        .await;
    env.wait_for(&shop, "completed", common::ONE_MESSAGE).await;
    let before = env.bucket_contents(&bucket).await;
    assert!(before.contains_key("index.html"), "{:?}", before.keys());
    let owner: serde_json::Value =
        serde_json::from_slice(&before[".edit-worker/owner.json"].1).unwrap();
    assert_eq!(owner["projectId"], "shop", "{owner}");

    let blog = env
        .send("olga", "blog", "t", "Update the homepage title to \"Blog\"")
        .await;
    // At once: a refusal that would repeat is not retried (retries wait for backoff first).
    let events = env.wait_for(&blog, "failed", common::ONE_MESSAGE).await;
    let failed = event_of(&events, &blog, "failed");
    assert_eq!(
        failed["error"]["kind"], "bucket_owned_elsewhere",
        "{failed}"
    );
    let message = failed["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("olga/shop"), "{message}");
    assert!(message.contains("{projectId}"), "{message}");
    // Delivered once: a refusal that would repeat is not given back for another try.
    assert_eq!(deliveries_of(&events, &blog), 1, "{events:#?}");
    assert_eq!(
        env.bucket_contents(&bucket).await,
        before,
        "the shop's site (and its owner record) must be exactly as it was"
    );
    assert_eq!(env.stop_worker(), Some(0));
}
