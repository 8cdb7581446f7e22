//! The `jobhost` binary: parse the CLI, start tracing, load `jobs.toml`, run.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use jobhost::HostOptions;
use jobhost::config::JobsConfig;

/// Runs WebAssembly job plugins on schedules from jobs.toml, each inside a
/// host-owned, advisory-locked Postgres transaction.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The job configuration.
    #[arg(long, short, default_value = "jobs.toml", env = "JOBHOST_CONFIG")]
    config: PathBuf,
    /// Postgres URL; the host owns every connection made with it.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Id of this host in the run history and in `application_name`
    /// (default `<hostname>:<pid>`).
    #[arg(long, env = "JOBHOST_HOST_ID")]
    host_id: Option<String>,
    /// Create and seed the demo tables the reference jobs work on.
    #[arg(long)]
    demo: bool,
    /// Validate the configuration and load every plugin, then exit.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let config = JobsConfig::from_file(&cli.config)?;
    if cli.check {
        let runtime = std::sync::Arc::new(jobhost::runtime::Runtime::new()?);
        let jobs = jobhost::load_jobs(&runtime, &config).await?;
        println!("{}: {} job(s) valid", cli.config.display(), jobs.len());
        return Ok(());
    }
    let options = HostOptions {
        database_url: cli
            .database_url
            .context("DATABASE_URL is not set (or pass --database-url)")?,
        host_id: cli.host_id.unwrap_or_else(jobhost::db::default_host_id),
        demo: cli.demo,
    };
    jobhost::run(config, options, shutdown_signal()).await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
