//! `edit-worker doctor`: check the configuration and the environment the way an operator would
//! before going live, one PASS/FAIL line per check.

use std::process::Stdio;
use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use clap::Args;
use edit_worker_actors::config::WorkerConfig;
use edit_worker_actors::contract::message::WorkspaceKey;
use edit_worker_actors::steps::git::subprocess::GitProgram;
use edit_worker_actors::steps::publish::deploys::Retention;

#[derive(Args)]
pub struct DoctorArgs {
    /// A TOML file with the same keys as the environment.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Also check this client's bucket and git remote (default: CLIENT_ID).
    #[arg(long)]
    client: Option<String>,
    /// With --client: the project (default: PROJECT_ID).
    #[arg(long)]
    project: Option<String>,
}

struct Report {
    failed: usize,
}

impl Report {
    fn line(&mut self, name: &str, outcome: Result<String, String>) {
        match outcome {
            Ok(detail) => println!("PASS  {name}: {detail}"),
            Err(detail) => {
                self.failed += 1;
                println!("FAIL  {name}: {detail}");
            }
        }
    }
}

/// Exit code: 0 when every check passed, 1 otherwise, 2 for a configuration that does not load.
pub async fn doctor(args: DoctorArgs) -> u8 {
    let mut report = Report { failed: 0 };
    let sdk = crate::aws::load().await;
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "us-east-1".into());
    let config = match crate::config::Settings::load(args.config.as_deref())
        .and_then(|s| s.worker_config(&region))
    {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL  configuration: {e}");
            return 2;
        }
    };
    report.line("configuration", Ok(format!("loaded (region {region})")));
    let sqs = crate::aws::sqs(&sdk);
    let queues = [
        ("input queue", Some(config.input_queue_url.clone())),
        ("status queue", config.output_queue_url.clone()),
        ("dead-letter queue", config.dead_letter_queue_url.clone()),
    ];
    for (name, url) in queues {
        let Some(url) = url else {
            report.line(name, Ok("not configured".into()));
            continue;
        };
        let outcome = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map(|out| {
                let depth = out
                    .attributes()
                    .and_then(|a| {
                        a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
                    })
                    .cloned()
                    .unwrap_or_default();
                format!("reachable, {depth} messages waiting")
            })
            .map_err(|e| format!("{url}: {}", DisplayErrorContext(&e)));
        report.line(name, outcome);
    }
    report.line("workspace root", check_workspace_root(&config).await);
    report.line("lease store", check_lease_store(&sdk, &config).await);
    report.line("isolation", check_isolation(&config).await);
    report.line("browser check", check_browser(&config).await);
    report.line("git", version("git", &["--version"]).await);
    report.line("npm", version("npm", &["--version"]).await);
    let agent = config.agent.bin.display().to_string();
    report.line(
        &format!("agent ({agent})"),
        version(&agent, &["--version"]).await,
    );

    let client = args.client.or(config.only_client.clone());
    let project = args.project.or(config.only_project.clone());
    if let Some(client) = client {
        let key = WorkspaceKey {
            client_id: client,
            project_id: project.unwrap_or_else(|| "site".into()),
        };
        let bucket = config.bucket_for(&key);
        report.line(
            &format!("bucket {bucket}"),
            check_bucket(&sdk, &bucket).await,
        );
        report.line(
            &format!("deploys in {bucket}"),
            check_deploys(&sdk, &bucket, config.publish.retention).await,
        );
        match config.remote_for(&key) {
            Some(remote) => report.line(
                &format!("git remote of {key}"),
                GitProgram::ls_remote(&remote)
                    .await
                    .map(|()| "reachable".into())
                    .map_err(|e| e.to_string()),
            ),
            None => report.line(
                "git remote",
                Ok("not configured (workspaces must exist)".into()),
            ),
        }
    } else {
        println!("SKIP  bucket and git remote: name a client with --client (or CLIENT_ID)");
    }
    if report.failed == 0 { 0 } else { 1 }
}

/// What `run` would use for the browser check (`BROWSER_CHECK`): the Chromium found and its
/// version, or why publishes are not checked (a failure only when `on` asks for it).
async fn check_browser(config: &WorkerConfig) -> Result<String, String> {
    use edit_worker_actors::steps::check::CheckMode;
    if config.check.mode == CheckMode::Off {
        return Ok("off (BROWSER_CHECK=off)".into());
    }
    match edit_worker_actors::steps::check::browser::find_chromium(
        config.check.chrome_bin.as_deref(),
    ) {
        Ok(bin) => {
            let shown = bin.display().to_string();
            version(&shown, &["--version"])
                .await
                .map(|v| format!("{v} at {shown}"))
        }
        Err(e) if config.check.mode == CheckMode::Auto => Ok(format!(
            "BROWSER_CHECK=auto and {e}: publishes are not checked in a browser"
        )),
        Err(e) => Err(format!("BROWSER_CHECK=on and {e}")),
    }
}

/// What `run` would detect: the isolation in force, or why there is none.
async fn check_isolation(config: &WorkerConfig) -> Result<String, String> {
    let sandbox = edit_worker_actors::tenant::sandbox::Sandbox::for_config(config)
        .await
        .map_err(|e| e.to_string())?;
    let isolation = sandbox.isolation();
    if isolation.is_none() {
        return Ok("none (ISOLATION=none): tenants' code runs as the worker's user".into());
    }
    let l = sandbox.limits();
    Ok(format!(
        "{isolation} (limits: {} processes, {} MB memory per process, {} MB per file, {} CPU s, \
         {} MB /tmp)",
        l.processes,
        l.memory_bytes >> 20,
        l.file_bytes >> 20,
        l.cpu_seconds,
        l.tmp_bytes >> 20
    ))
}

async fn check_workspace_root(config: &WorkerConfig) -> Result<String, String> {
    let root = &config.workspace_root;
    tokio::fs::create_dir_all(root)
        .await
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let probe = root.join(".edit-worker-doctor");
    tokio::fs::write(&probe, b"probe")
        .await
        .map_err(|e| format!("{} is not writable: {e}", root.display()))?;
    let _ = tokio::fs::remove_file(&probe).await;
    Ok(format!("{} is writable", root.display()))
}

/// With `LEASE_STORE`: its conditional writes work, and this worker may create its notice
/// queue. Without: say that the worker assumes it is alone.
async fn check_lease_store(
    sdk: &aws_config::SdkConfig,
    config: &WorkerConfig,
) -> Result<String, String> {
    let Some(location) = &config.lease_store else {
        return Ok(format!(
            "none: this worker assumes it is alone on its queue (records in {}); \
             set LEASE_STORE=s3://BUCKET/PREFIX before running more than one",
            config.record_location()
        ));
    };
    let records = edit_worker_actors::delivery::records::RecordStore::new(
        location,
        &crate::aws::s3(sdk),
        &config.worker_id,
    );
    let probed = records
        .probe_conditional_writes()
        .await
        .map_err(|e| format!("{location}: {e}"))?;
    // A probe queue of its own: SQS refuses a queue name for 60 s after it was deleted, and
    // the worker's own notice queue must be creatable right after this check.
    let sqs = crate::aws::sqs(sdk);
    let probe_worker = format!("doctor-{}", config.worker_id);
    let queue = edit_worker_actors::delivery::notices::NoticeQueue::create(
        sqs.clone(),
        &config.input_queue_url,
        &probe_worker,
    )
    .await
    .map_err(|e| format!("notice queues: {e} (needs sqs:CreateQueue, sqs:DeleteQueue)"))?;
    let _ = sqs.delete_queue().queue_url(queue.url()).send().await;
    Ok(format!(
        "{location}: {probed}; notice queues can be created; worker id {}",
        config.worker_id
    ))
}

/// Write and delete a probe object: proves the credentials may write to the bucket.
async fn check_bucket(sdk: &aws_config::SdkConfig, bucket: &str) -> Result<String, String> {
    let s3 = crate::aws::s3(sdk);
    let key = ".edit-worker-doctor-probe";
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"probe"))
        .send()
        .await
        .map_err(|e| {
            format!(
                "not writable: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        })?;
    s3.delete_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| {
            format!(
                "probe not deleted: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        })?;
    Ok("writable".into())
}

/// How the bucket keeps earlier deploys restorable: with versioning (object versions) or
/// without (copies under `.edit-worker/objects/`), and whether a lifecycle rule the operator
/// set would remove kept bytes sooner than `DEPLOY_RETENTION_DAYS` and `DEPLOY_KEEP` promise.
async fn check_deploys(
    sdk: &aws_config::SdkConfig,
    bucket: &str,
    retention: Retention,
) -> Result<String, String> {
    let s3 = crate::aws::s3(sdk);
    let err = |e: String| format!("cannot read its settings: {e}");
    let versioning = s3
        .get_bucket_versioning()
        .bucket(bucket)
        .send()
        .await
        .map_err(|e| err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
    let versioned =
        versioning.status() == Some(&aws_sdk_s3::types::BucketVersioningStatus::Enabled);
    let rules = match s3
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(out) => out.rules().to_vec(),
        Err(e)
            if e.as_service_error().and_then(|s| s.meta().code())
                == Some("NoSuchLifecycleConfiguration") =>
        {
            Vec::new()
        }
        Err(e) => return Err(err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string())),
    };
    let problems = lifecycle_problems(&rules, versioned, retention);
    let how = if versioned {
        "versioning on: earlier deploys are object versions"
    } else {
        "versioning off: earlier deploys' bytes are copies under .edit-worker/objects/"
    };
    if !problems.is_empty() {
        return Err(format!("{how}; {}", problems.join("; ")));
    }
    let rule = if rules.is_empty() {
        "no lifecycle rule (the worker removes what is past retention)"
    } else {
        "its lifecycle rules keep what retention promises"
    };
    Ok(format!(
        "{how}; {rule}; DEPLOY_RETENTION_DAYS={} DEPLOY_KEEP={}",
        retention.days, retention.keep
    ))
}

/// What in `rules` would remove a deploy's bytes that retention keeps.
fn lifecycle_problems(
    rules: &[aws_sdk_s3::types::LifecycleRule],
    versioned: bool,
    retention: Retention,
) -> Vec<String> {
    let mut problems = Vec::new();
    for rule in rules {
        if rule.status() != &aws_sdk_s3::types::ExpirationStatus::Enabled {
            continue;
        }
        let id = rule.id().unwrap_or("(no id)");
        let prefix = rule
            .filter()
            .and_then(|f| f.prefix().or_else(|| f.and().and_then(|a| a.prefix())))
            .or({
                // The old, top-level form of a rule's prefix: S3 still returns it for rules
                // written that way.
                #[allow(deprecated)]
                rule.prefix()
            })
            .unwrap_or("");
        // The rule reaches the site or the worker's bookkeeping.
        let reaches = |of: &str| of.starts_with(prefix) || prefix.starts_with(of);
        let bookkeeping = reaches(".edit-worker/deploys/") || reaches(".edit-worker/objects/");
        if let Some(days) = rule.expiration().and_then(|e| e.days())
            && bookkeeping
        {
            problems.push(format!(
                "rule {id} expires objects under `{prefix}` after {days} days: it removes deploy \
                 records or kept bytes (and the live site) whatever DEPLOY_KEEP says; let the \
                 worker expire them"
            ));
        }
        if let (true, Some(expire)) = (versioned, rule.noncurrent_version_expiration()) {
            let days = expire.noncurrent_days().unwrap_or(0);
            let newer = expire.newer_noncurrent_versions().unwrap_or(0);
            if (days as u64) < retention.days {
                problems.push(format!(
                    "rule {id} removes old versions after {days} days, before \
                     DEPLOY_RETENTION_DAYS={}",
                    retention.days
                ));
            }
            if (newer as usize) < retention.keep {
                problems.push(format!(
                    "rule {id} keeps {newer} newer old versions, fewer than DEPLOY_KEEP={} \
                     (set NewerNoncurrentVersions)",
                    retention.keep
                ));
            }
        }
    }
    problems
}

/// Run `program args` (no shell) and return the first line it prints.
async fn version(program: &str, args: &[&str]) -> Result<String, String> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Err(_) => Err("did not answer within 30 s".into()),
        Ok(Err(e)) => Err(format!("not found or not executable: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()),
        Ok(Ok(out)) => Err(format!(
            "exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::types::{
        ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
        NoncurrentVersionExpiration,
    };

    fn rule(prefix: &str) -> aws_sdk_s3::types::builders::LifecycleRuleBuilder {
        LifecycleRule::builder()
            .id("r")
            .status(ExpirationStatus::Enabled)
            .filter(LifecycleRuleFilter::builder().prefix(prefix).build())
    }

    #[test]
    fn lifecycle_rules_that_remove_what_retention_keeps_are_named() {
        let retention = Retention { days: 30, keep: 20 };
        let noncurrent = |days, newer| {
            rule("")
                .noncurrent_version_expiration(
                    NoncurrentVersionExpiration::builder()
                        .noncurrent_days(days)
                        .newer_noncurrent_versions(newer)
                        .build(),
                )
                .build()
                .unwrap()
        };
        // As the README sets it: nothing to say.
        assert!(lifecycle_problems(&[noncurrent(30, 20)], true, retention).is_empty());
        // Sooner, or fewer versions, than retention.
        assert_eq!(
            lifecycle_problems(&[noncurrent(7, 20)], true, retention).len(),
            1
        );
        assert_eq!(
            lifecycle_problems(&[noncurrent(30, 3)], true, retention).len(),
            1
        );
        // Without versioning, old versions are not how deploys are kept.
        assert!(lifecycle_problems(&[noncurrent(1, 0)], false, retention).is_empty());
        // Expiring the bookkeeping (or everything) removes deploys whatever DEPLOY_KEEP says.
        let expire = |prefix| {
            rule(prefix)
                .expiration(LifecycleExpiration::builder().days(90).build())
                .build()
                .unwrap()
        };
        assert_eq!(lifecycle_problems(&[expire("")], false, retention).len(), 1);
        assert_eq!(
            lifecycle_problems(&[expire(".edit-worker/")], false, retention).len(),
            1
        );
        assert!(lifecycle_problems(&[expire("logs/")], false, retention).is_empty());
        // A disabled rule does nothing.
        let off = rule("")
            .status(ExpirationStatus::Disabled)
            .expiration(LifecycleExpiration::builder().days(1).build())
            .build()
            .unwrap();
        assert!(lifecycle_problems(&[off], false, retention).is_empty());
    }
}
