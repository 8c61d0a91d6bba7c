//! The test store itself: the leases rely on S3's conditional writes admitting exactly one of
//! several racing writers. moto checks the condition and then writes without a lock; under
//! load two racing writers both won, and two workers held one workspace (a
//! `many_workers::three_workers_on_one_shared_workspace_root` run saw it).
//! `tools/moto-server` makes the check and the write one step; this shows that the moto the
//! suite runs keeps that promise.

use crate::common::TestEnv;

/// Rounds of writers racing on one version of one object.
const ROUNDS: usize = 150;
const WRITERS: usize = 12;

#[tokio::test(flavor = "multi_thread")]
async fn of_racing_conditional_writes_exactly_one_wins() {
    let env = TestEnv::new("cond-race").await;
    let bucket = format!("race.{}.test", env.name);
    env.create_bucket(&bucket).await;
    let mut more_than_one = Vec::new();
    for round in 0..ROUNDS {
        let etag = env
            .s3
            .put_object()
            .bucket(&bucket)
            .key("lease.json")
            .body(format!("round {round}").into_bytes().into())
            .send()
            .await
            .unwrap()
            .e_tag()
            .unwrap()
            .to_owned();
        let writers = (0..WRITERS).map(|writer| {
            let (s3, bucket, etag) = (env.s3.clone(), bucket.clone(), etag.clone());
            tokio::spawn(async move {
                s3.put_object()
                    .bucket(bucket)
                    .key("lease.json")
                    .if_match(etag)
                    .body(format!("round {round} writer {writer}").into_bytes().into())
                    .send()
                    .await
                    .is_ok()
            })
        });
        let mut won = 0;
        for writer in writers.collect::<Vec<_>>() {
            won += usize::from(writer.await.unwrap());
        }
        if won != 1 {
            more_than_one.push((round, won));
        }
    }
    assert!(
        more_than_one.is_empty(),
        "rounds where not exactly one of {WRITERS} writers won: {more_than_one:?}"
    );
}
