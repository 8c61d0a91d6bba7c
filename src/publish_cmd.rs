//! `edit-worker publish --bucket B DIR`: publish a folder the way the worker does (for operators,
//! and for the publisher benchmark). Prints the report as JSON.

use std::path::PathBuf;

use clap::Args;
use edit_worker_actors::contract::message::{WorkspaceKey, check_dns_label};
use edit_worker_actors::steps::publish::Publisher;
use edit_worker_actors::steps::publish::deploys::DeployMeta;

#[derive(Args)]
pub struct PublishArgs {
    /// The bucket that should hold exactly DIR afterwards.
    #[arg(long)]
    bucket: String,
    /// The build folder.
    dir: PathBuf,
    /// Publish as the worker publishes for workspace CLIENT/PROJECT: the bucket's owner record,
    /// and a deploy record (issue 26) with `--commit`. Without it, the bucket belongs to no
    /// workspace and no deploy is recorded.
    #[arg(long, value_name = "CLIENT/PROJECT")]
    deploy_for: Option<String>,
    /// With --deploy-for: the commit the deploy record names.
    #[arg(long, default_value = "0000000000000000000000000000000000000000")]
    commit: String,
}

pub async fn publish(args: PublishArgs, settings: &crate::config::Settings) -> anyhow::Result<()> {
    let options = settings.publish_options()?;
    let sdk = crate::aws::load().await;
    let publisher = Publisher::new(crate::aws::s3(&sdk), options);
    let report = match args.deploy_for.as_deref() {
        None => publisher.publish(&args.bucket, &args.dir, None).await?,
        Some(for_workspace) => {
            let (client, project) = for_workspace
                .split_once('/')
                .ok_or_else(|| anyhow::anyhow!("--deploy-for takes CLIENT/PROJECT"))?;
            check_dns_label("client", client)?;
            check_dns_label("project", project)?;
            let workspace = WorkspaceKey {
                client_id: client.into(),
                project_id: project.into(),
            };
            let deploy = DeployMeta {
                commit: args.commit.clone(),
                thread_id: "cli".into(),
                message_id: "edit-worker-publish".into(),
                rolled_back_to: None,
            };
            publisher
                .publish_for(&workspace, &args.bucket, &args.dir, None, &deploy)
                .await?
        }
    };
    let mut out = serde_json::to_value(&report)?;
    if let Some(id) = &report.deploy_id {
        out["deployId"] = id.as_str().into();
    }
    println!("{out}");
    Ok(())
}
