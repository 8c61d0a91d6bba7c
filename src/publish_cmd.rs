//! `edit-worker publish --bucket B DIR`: publish a folder the way the worker does (for operators,
//! and for the publisher benchmark). Prints the report as JSON.

use std::path::PathBuf;

use clap::Args;
use edit_worker_actors::publish::Publisher;

#[derive(Args)]
pub struct PublishArgs {
    /// The bucket that should hold exactly DIR afterwards.
    #[arg(long)]
    bucket: String,
    /// The build folder.
    dir: PathBuf,
}

pub async fn publish(args: PublishArgs, settings: &crate::config::Settings) -> anyhow::Result<()> {
    let options = settings.publish_options()?;
    let sdk = crate::aws::load().await;
    let publisher = Publisher::new(crate::aws::s3(&sdk), options);
    let report = publisher.publish(&args.bucket, &args.dir, None).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
