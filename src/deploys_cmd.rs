//! `edit-worker deploys --client C --project P [--limit N] [--json]`: a workspace's deploys,
//! newest first, read from the deploy records in its bucket (`BUCKET_TEMPLATE`); the newest is
//! the live one.

use clap::Args;
use edit_worker_actors::contract::message::{WorkspaceKey, check_dns_label};
use edit_worker_actors::steps::publish::Publisher;
use edit_worker_actors::steps::publish::deploys::DeployRecord;

#[derive(Args)]
pub struct DeploysArgs {
    #[arg(long)]
    client: String,
    #[arg(long)]
    project: String,
    /// Show at most this many (each is one small read of the bucket).
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// One JSON array instead of a table, for tools.
    #[arg(long)]
    json: bool,
}

/// One line of the listing: the record without its file list.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct DeployLine<'a> {
    deploy_id: &'a str,
    at: &'a str,
    commit: &'a str,
    thread_id: &'a str,
    message_id: &'a str,
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rolled_back_to: Option<&'a str>,
    files: usize,
    bytes: u64,
    live: bool,
}

impl<'a> DeployLine<'a> {
    fn of(record: &'a DeployRecord, live: bool) -> DeployLine<'a> {
        DeployLine {
            deploy_id: &record.deploy_id,
            at: &record.at,
            commit: &record.commit,
            thread_id: &record.thread_id,
            message_id: &record.message_id,
            action: &record.action,
            rolled_back_to: record.rolled_back_to.as_ref().map(|r| r.deploy_id.as_str()),
            files: record.files.len(),
            bytes: record.bytes(),
            live,
        }
    }
}

/// Bad arguments (exit 2) or a failure reading the bucket (exit 1).
pub enum DeploysError {
    Usage(anyhow::Error),
    Failed(anyhow::Error),
}

pub async fn deploys(
    args: DeploysArgs,
    settings: &crate::config::Settings,
) -> Result<(), DeploysError> {
    let usage = |e: anyhow::Error| DeploysError::Usage(e);
    check_dns_label("--client", &args.client).map_err(|e| usage(e.into()))?;
    check_dns_label("--project", &args.project).map_err(|e| usage(e.into()))?;
    let workspace = WorkspaceKey {
        client_id: args.client,
        project_id: args.project,
    };
    let bucket = settings
        .bucket_template()
        .map_err(|e| usage(e.into()))?
        .replace("{clientId}", &workspace.client_id)
        .replace("{projectId}", &workspace.project_id);
    let options = settings.publish_options().map_err(|e| usage(e.into()))?;
    let sdk = crate::aws::load().await;
    let publisher = Publisher::new(crate::aws::s3(&sdk), options);
    let failed =
        |e: edit_worker_actors::steps::publish::PublishError| DeploysError::Failed(e.into());
    let ids = publisher
        .deploy_ids(&workspace, &bucket)
        .await
        .map_err(failed)?;
    let mut records = Vec::new();
    for id in ids.iter().take(args.limit) {
        records.push(
            publisher
                .read_deploy(&workspace, &bucket, id)
                .await
                .map_err(failed)?,
        );
    }
    // The newest record is the live deploy: every publish and rollback records one.
    let lines: Vec<DeployLine> = records
        .iter()
        .enumerate()
        .map(|(i, r)| DeployLine::of(r, i == 0))
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&lines).expect("plain values serialize")
        );
        return Ok(());
    }
    if lines.is_empty() {
        println!("no deploys of {workspace} in {bucket}");
        return Ok(());
    }
    println!(
        "{:<4} {:<20} {:<24} {:<9} {:<8} {:<24} {:<36} {:>6} {:>10}",
        "", "deployId", "at", "commit", "action", "thread", "message", "files", "bytes"
    );
    for line in &lines {
        println!(
            "{:<4} {:<20} {:<24} {:<9} {:<8} {:<24} {:<36} {:>6} {:>10}",
            if line.live { "live" } else { "" },
            line.deploy_id,
            line.at,
            line.commit.get(..7).unwrap_or(line.commit),
            line.action,
            line.thread_id,
            line.message_id,
            line.files,
            line.bytes
        );
    }
    if ids.len() > lines.len() {
        println!("({} older not shown; --limit)", ids.len() - lines.len());
    }
    Ok(())
}
