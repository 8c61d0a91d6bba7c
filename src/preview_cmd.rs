//! `edit-worker preview --client C --project P [--port N]`: serve a workspace's edit site on
//! loopback as S3 website hosting serves it (index documents, the site's `404.html`), from the
//! bucket through the S3 API: the same server the browser check loads pages from. For anyone
//! running locally against moto, LocalStack or AWS, whose bucket has no website endpoint.

use clap::Args;
use edit_worker_actors::contract::message::{WorkspaceKey, check_dns_label};
use edit_worker_actors::steps::check::site_server::SiteServer;

#[derive(Args)]
pub struct PreviewArgs {
    /// A TOML file with the same keys as the environment (for BUCKET_TEMPLATE).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[arg(long)]
    client: String,
    #[arg(long)]
    project: String,
    /// The loopback port (default: any free one, printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("{0}")]
    Usage(String),
    #[error("serving on 127.0.0.1: {0}")]
    Serve(std::io::Error),
}

/// Serve until `stop` (a signal).
pub async fn preview(
    args: PreviewArgs,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), PreviewError> {
    for (what, id) in [("--client", &args.client), ("--project", &args.project)] {
        check_dns_label(what, id).map_err(|e| PreviewError::Usage(e.to_string()))?;
    }
    let settings = crate::config::Settings::load(args.config.as_deref())
        .map_err(|e| PreviewError::Usage(format!("configuration: {e}")))?;
    let bucket = settings
        .bucket_for(&WorkspaceKey {
            client_id: args.client.clone(),
            project_id: args.project.clone(),
        })
        .map_err(|e| PreviewError::Usage(format!("configuration: {e}")))?;
    let sdk = crate::aws::load().await;
    let server = SiteServer::start(crate::aws::s3(&sdk), bucket.clone(), args.port)
        .await
        .map_err(PreviewError::Serve)?;
    // The one line a person (or a script) reads: where to point the browser.
    println!("{}/", server.origin());
    tracing::info!(%bucket, url = %format!("{}/", server.origin()), "serving the edit site on loopback; Ctrl-C stops");
    stop.cancelled().await;
    Ok(())
}
