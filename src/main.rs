//! `edit-worker`: the process. Command line, configuration, logging, signals; the work itself is
//! in the `edit-worker-actors` crate (`actors/`).

mod aws;
mod chart;
mod config;
mod deploys_cmd;
mod doctor;
mod loadgen;
mod preview_cmd;
mod publish_cmd;
mod send;
mod settings_table;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use edit_worker_actors::intake::IntakeEnd;
use edit_worker_actors::tenant::sandbox::Sandbox;
use edit_worker_actors::worker::{self, RunOptions};

/// Turns edit requests on an SQS queue into committed, built and published sites.
#[derive(Parser)]
#[command(name = "edit-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the input queue until SIGTERM/SIGINT, or until idle for --exit-when-idle seconds.
    Run {
        /// A TOML file with the same keys as the environment (the environment wins).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Exit when the queue has been empty and nothing has run for this many seconds.
        #[arg(long, value_name = "SECONDS")]
        exit_when_idle: Option<u64>,
    },
    /// Put one edit request on the input queue (INPUT_QUEUE_URL).
    Send(send::SendArgs),
    /// Put one rollback request on the input queue (INPUT_QUEUE_URL).
    Rollback(send::RollbackArgs),
    /// List a workspace's deploys, newest first, the live one marked.
    Deploys(deploys_cmd::DeploysArgs),
    /// Send synthetic load and report what became of it (table, JSON, SVG chart).
    Loadgen(loadgen::LoadgenArgs),
    /// Make a bucket hold exactly a build folder, as the worker publishes (prints a JSON report).
    Publish(publish_cmd::PublishArgs),
    /// Check the configuration and the environment before going live (a PASS/FAIL line each).
    Doctor(doctor::DoctorArgs),
    /// Serve a workspace's edit site on 127.0.0.1 as S3 website hosting serves it (prints the
    /// URL; Ctrl-C stops).
    Preview(preview_cmd::PreviewArgs),
    /// For the container's HEALTHCHECK: exit 0 if the worker's HEALTH_FILE is fresh.
    Healthcheck {
        /// The file `run` touches (HEALTH_FILE).
        #[arg(long, env = "HEALTH_FILE")]
        file: std::path::PathBuf,
        /// Oldest acceptable age of the file, in seconds.
        #[arg(long, default_value_t = 120)]
        max_age: u64,
    },
}

/// Exit codes of the contract.
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // clap exits with 2 on bad usage and 0 for --help, as the contract asks.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edit-worker: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async_main(cli))
}

async fn async_main(cli: Cli) -> ExitCode {
    let telemetry = telemetry::init();
    let code = dispatch(cli).await;
    // Spans and metrics are flushed on every way out, SIGTERM included.
    telemetry.shutdown().await;
    code
}

async fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run {
            config,
            exit_when_idle,
        } => run(config, exit_when_idle).await,
        Command::Loadgen(args) => match loadgen::validate(&args) {
            Err(e) => {
                eprintln!("edit-worker loadgen: {e}");
                ExitCode::from(EXIT_USAGE)
            }
            Ok(()) => match loadgen::loadgen(args).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edit-worker loadgen: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            },
        },
        Command::Doctor(args) => ExitCode::from(doctor::doctor(args).await),
        Command::Preview(args) => {
            let stop = CancellationToken::new();
            tokio::spawn(wait_for_signal(stop.clone()));
            match preview_cmd::preview(args, stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ preview_cmd::PreviewError::Usage(_)) => {
                    eprintln!("edit-worker preview: {e}");
                    ExitCode::from(EXIT_USAGE)
                }
                Err(e) => {
                    eprintln!("edit-worker preview: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Healthcheck { file, max_age } => {
            let age = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default());
            match age {
                Ok(age) if age <= Duration::from_secs(max_age) => ExitCode::SUCCESS,
                Ok(age) => {
                    eprintln!(
                        "edit-worker healthcheck: {} is {}s old",
                        file.display(),
                        age.as_secs()
                    );
                    ExitCode::from(EXIT_FAILURE)
                }
                Err(e) => {
                    eprintln!("edit-worker healthcheck: {}: {e}", file.display());
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Publish(args) => {
            let settings = match config::Settings::load(None) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("edit-worker: configuration: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match publish_cmd::publish(args, &settings).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edit-worker publish: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Send(args) => match send::send(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(send::SendError::Usage(e)) => {
                eprintln!("edit-worker send: {e:#}");
                ExitCode::from(EXIT_USAGE)
            }
            Err(send::SendError::Failed(e)) => {
                eprintln!("edit-worker send: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Rollback(args) => match send::rollback(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(send::SendError::Usage(e)) => {
                eprintln!("edit-worker rollback: {e:#}");
                ExitCode::from(EXIT_USAGE)
            }
            Err(send::SendError::Failed(e)) => {
                eprintln!("edit-worker rollback: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Deploys(args) => {
            let settings = match config::Settings::load(None) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("edit-worker: configuration: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match deploys_cmd::deploys(args, &settings).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(deploys_cmd::DeploysError::Usage(e)) => {
                    eprintln!("edit-worker deploys: {e:#}");
                    ExitCode::from(EXIT_USAGE)
                }
                Err(deploys_cmd::DeploysError::Failed(e)) => {
                    eprintln!("edit-worker deploys: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

async fn run(config_file: Option<PathBuf>, exit_when_idle: Option<u64>) -> ExitCode {
    let settings = match config::Settings::load(config_file.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edit-worker: configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let sdk = aws::load().await;
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "us-east-1".into());
    let config = match settings.worker_config(&region) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edit-worker: configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing::info!(
        input = %config.input_queue_url,
        workspace_root = %config.workspace_root.display(),
        agent = %config.agent.bin.display(),
        "edit-worker starting"
    );
    if !config.bucket_template.contains("{projectId}") {
        tracing::warn!(
            bucket_template = %config.bucket_template,
            "BUCKET_TEMPLATE has no {{projectId}}: each client can have one project; a second \
             project's publish into the same bucket fails (bucket_owned_elsewhere)"
        );
    }
    // What the host allows for tenants' code, found out now: a host that allows nothing stops
    // the worker here unless ISOLATION=none says so.
    let sandbox = match Sandbox::for_config(&config).await {
        Ok(sandbox) => sandbox,
        Err(e) => {
            tracing::error!(error = %e, "tenants' code cannot be isolated");
            eprintln!("edit-worker: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // BROWSER_CHECK=on without a Chromium is a configuration error, said before any work.
    if config.check.mode == edit_worker_actors::steps::check::CheckMode::On
        && let Err(e) = config.check.browser_bin()
    {
        eprintln!("edit-worker: configuration: BROWSER_CHECK=on: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let options = RunOptions {
        exit_when_idle: exit_when_idle.map(Duration::from_secs),
    };
    let sdk = aws::with_timeouts(
        &sdk,
        config.aws_attempt_timeout,
        config.aws_operation_timeout,
    );
    let (sqs, s3) = (aws::sqs(&sdk), aws::s3(&sdk));
    // CloudFront only when some client's bucket has a distribution.
    let cloudfront = (!config.cloudfront_distributions.is_empty()).then(|| aws::cloudfront(&sdk));
    match worker::run(config, sqs, s3, cloudfront, sandbox, options, shutdown).await {
        Ok(IntakeEnd::Idle) => {
            tracing::info!("idle; exiting");
            ExitCode::SUCCESS
        }
        Ok(IntakeEnd::Shutdown(_)) => {
            tracing::info!("shut down");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "edit-worker stopped");
            eprintln!("edit-worker: {e}");
            if e.is_configuration() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
    }
}

/// SIGTERM (ECS, docker stop) or SIGINT (a person) starts a graceful shutdown.
async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
