//! The command line: `jobhost [run]`, `check`, `status`, `locks`, `reload`,
//! `run-now`, `history`, `pause`/`resume`, `publish`/`rollback`/`plugins`, `new`.
//!
//! Lives in the library so the binary stays a one-liner and tests can run the
//! exact CLI in a child process.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{JobsConfig, PluginFiles};
use crate::runtime::Runtime;
use crate::{HostOptions, db, inspect, operate};

/// Runs WebAssembly job plugins on schedules from jobs.toml, each inside a
/// host-owned, advisory-locked Postgres transaction.
#[derive(Debug, Parser)]
#[command(name = "jobhost", version)]
pub struct Cli {
    /// The job configuration.
    #[arg(
        long,
        short,
        default_value = "jobs.toml",
        env = "JOBHOST_CONFIG",
        global = true
    )]
    config: PathBuf,
    /// Postgres URL; the host owns every connection made with it.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// Postgres itself, when DATABASE_URL leads to a transaction pooler
    /// (`[host] pooler = "transaction"`): migrations, `session` locks and
    /// LISTEN need a real session and go here.
    #[arg(
        long,
        env = "JOBHOST_DIRECT_URL",
        hide_env_values = true,
        global = true
    )]
    direct_url: Option<String>,
    /// Id of this host in the run history and `application_name`
    /// (default `<hostname>:<pid>`).
    #[arg(long, env = "JOBHOST_HOST_ID", global = true)]
    host_id: Option<String>,
    /// Create and seed the demo tables the reference jobs work on.
    #[arg(long)]
    demo: bool,
    /// Shift this host's clock (testing clock skew across a fleet).
    #[arg(
        long,
        env = "JOBHOST_CLOCK_OFFSET_MS",
        hide = true,
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    clock_offset_ms: i64,
    /// Log format: `text` for people, `json` (one object per event, with the
    /// run's job, slot, run id, host and lock key) for log pipelines.
    #[arg(long, env = "JOBHOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

pub use crate::logging::LogFormat;

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the scheduler (the default).
    Run,
    /// Validate the configuration and load every plugin, then exit.
    Check,
    /// Jobs, their next slot, last outcome and duration, runs in flight.
    Status,
    /// Advisory locks with their holders; exits 2 if one is STUCK (held by a
    /// backend of no live host, by a run past its deadline, or left on an
    /// idle pooled connection), so monitoring can run it.
    Locks,
    /// Make every host on this database reload jobs.toml and its plugins.
    Reload,
    /// Run one slot of JOB now, through the same lock path as a scheduled
    /// run (recorded in the history). Exit code: 0 ok, 1 failed, 3 skipped
    /// (another holder has the lock, or the job is paused).
    RunNow {
        /// The job's name in jobs.toml.
        job: String,
    },
    /// The latest runs of JOB, newest first.
    History {
        /// The job's name.
        job: String,
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Only runs that did not end `ok`.
        #[arg(long)]
        failed: bool,
    },
    /// Pause JOB on every host of the fleet: its slots are skipped (reason
    /// `paused`) until `resume`. A run in flight finishes.
    Pause {
        /// The job's name.
        job: String,
    },
    /// Resume a paused JOB on every host.
    Resume {
        /// The job's name.
        job: String,
    },
    /// Validate FILE as a plugin and make it NAME's current version in the
    /// database: every host running a `plugin = "published:NAME"` job swaps
    /// to it between runs. Publishing the current bytes again changes
    /// nothing.
    Publish {
        /// The published plugin's name.
        name: String,
        /// The component (`.wasm`).
        file: PathBuf,
    },
    /// Make the version of NAME before the current one current again (again:
    /// further back).
    Rollback {
        /// The published plugin's name.
        name: String,
    },
    /// Published plugins: versions (hash, size, published at and by), which
    /// is current, and which live hosts run which.
    Plugins,
    /// Write a working plugin skeleton NAME (in DIR/NAME) and add its job to
    /// the configuration (`--config`, created if missing).
    New {
        /// The plugin's and the job's name.
        name: String,
        /// The plugin's language.
        #[arg(long, value_enum)]
        lang: crate::scaffold::Lang,
        /// The directory the plugin's directory is created in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The Rust SDK (`plugins/sdk` of a jobhost checkout); found above
        /// DIR when not given.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// Entry point of the binary: arguments, tracing, a runtime, the command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors, `--help` and `--version`: clap prints them (to stdout
        // or stderr as fits) and says which exit code they deserve.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let _logging = init_logging(cli.log_format, cli.runs_scheduler());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jobhost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jobhost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The process's log ([`crate::logging`]): written by a thread of its own
/// for the scheduler (`run`, the default command), whose runs must not wait
/// for stdout; directly for the commands that print and exit. Keep the
/// returned [`Logging`](crate::logging::Logging) until the process exits.
pub fn init_logging(format: LogFormat, scheduler: bool) -> crate::logging::Logging {
    use crate::logging::Writer;
    crate::logging::init(
        format,
        if scheduler {
            Writer::Background
        } else {
            Writer::Direct
        },
    )
}

/// Whether `args` (as the binary gets them, without its own name) run the
/// scheduler: no command, or `run`.
pub fn runs_scheduler(args: &[String]) -> bool {
    Cli::try_parse_from(std::iter::once("jobhost").chain(args.iter().map(String::as_str)))
        .is_ok_and(|cli| cli.runs_scheduler())
}

impl Cli {
    fn runs_scheduler(&self) -> bool {
        matches!(self.command, None | Some(Command::Run))
    }
}

/// Parses `args` and runs the command. A usage error (and `--help`,
/// `--version`) comes back as a `clap::Error` inside the `anyhow::Error`; the
/// caller prints it and exits (see [`main`]): library code never exits the
/// process.
pub async fn run_cli(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<ExitCode> {
    run(Cli::try_parse_from(args)?).await
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // `new` writes files and needs no configuration (it may create it).
    if let Some(Command::New {
        name,
        lang,
        dir,
        sdk,
    }) = &cli.command
    {
        let req = crate::scaffold::NewPlugin {
            name: name.clone(),
            lang: *lang,
            dir: dir.clone(),
            config: cli.config.clone(),
            sdk: sdk.clone(),
        };
        let written = crate::scaffold::new_plugin(&req)?;
        print!("{}", crate::scaffold::render(&written, &req));
        return Ok(ExitCode::SUCCESS);
    }
    let command = cli.command.as_ref().unwrap_or(&Command::Run);
    // Operators' commands read the database only: the plugin files may be
    // on other machines.
    let files = match command {
        Command::Run | Command::Check | Command::RunNow { .. } => PluginFiles::Required,
        Command::Status
        | Command::Locks
        | Command::Reload
        | Command::History { .. }
        | Command::Pause { .. }
        | Command::Resume { .. }
        | Command::Publish { .. }
        | Command::Rollback { .. }
        | Command::Plugins
        | Command::New { .. } => PluginFiles::NotNeeded,
    };
    let config = JobsConfig::read(&cli.config, files)?.with_direct_url(cli.direct_url.is_some());
    let database_url = || {
        cli.database_url
            .clone()
            .context("DATABASE_URL is not set (or pass --database-url)")
    };
    let host_id = cli.host_id.clone().unwrap_or_else(db::default_host_id);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let options = HostOptions {
                database_url: database_url()?,
                direct_url: cli.direct_url.clone(),
                host_id,
                demo: cli.demo,
                clock_offset: chrono::TimeDelta::milliseconds(cli.clock_offset_ms),
            };
            crate::run(config, options, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            // The same engine and compile cache as a host: a check of an
            // unchanged plugin costs a cache hit, not a compile.
            let runtime = Arc::new(crate::jobset::runtime(&config)?);
            let mut config = config;
            // The database, where there is one (published plugins need it):
            // a check agrees with a start, job roles included.
            let url = match &cli.database_url {
                Some(url) => Some(url.clone()),
                None if config.jobs.iter().any(|j| j.published.is_some()) => Some(database_url()?),
                None => None,
            };
            let pool = match &url {
                Some(url) => Some(inspect_pool(url, &config, &host_id).await?),
                None => None,
            };
            if let Some(pool) = &pool
                && config.jobs.iter().any(|j| j.published.is_some())
            {
                let dir = config.host.published_dir();
                crate::published::resolve(pool, &mut config, &dir).await?;
            }
            match (&pool, &url) {
                // As a start reads them, and logs in as each.
                (Some(pool), Some(url)) => {
                    crate::roles::check(pool, &config.jobs).await?;
                    let app = format!("{}/cli", db::application_name(&host_id));
                    let template = crate::pools::Template::from_url(url, config.host.pooler, &app)?;
                    let runs = crate::pools::RunPools::new(pool.clone(), template);
                    let logged_in = crate::roles::log_in(&runs, &config.jobs).await;
                    runs.close_roles().await;
                    logged_in?;
                }
                _ if config.jobs.iter().any(|j| j.role.is_some()) => {
                    println!("job roles not checked: DATABASE_URL is not set");
                }
                _ => {}
            }
            let jobs = crate::load_jobs(&runtime, &config).await?;
            println!("{}: {} job(s) valid", cli.config.display(), jobs.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let rows = inspect::status(&pool, &config)
                .await
                .map_err(|e| schema_error(e, "no run history", "cannot read the run history"))?;
            print!("{}", inspect::render_status(&rows));
            let fleet = inspect::fleet(&pool, &config)
                .await
                .context("cannot read the fleet (jobhost.hosts)")?;
            print!("\n{}", inspect::render_fleet(&fleet));
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload => {
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let request = crate::reload::request(&pool, &host_id)
                .await
                .context("cannot request a reload")?;
            let fleet = crate::hosts::fleet(&pool, config.host.liveness.lost_after)
                .await
                .context("cannot read the fleet (jobhost.hosts)")?;
            print!(
                "{}",
                crate::reload::render_request(request, &fleet, config.host.liveness.heartbeat)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Locks => {
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let rows = inspect::locks(&pool, &config)
                .await
                .context("cannot read pg_locks")?;
            print!("{}", inspect::render_locks(&rows));
            Ok(if rows.iter().any(|r| r.stuck) {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::RunNow { job } => {
            let options = HostOptions {
                database_url: database_url()?,
                direct_url: cli.direct_url.clone(),
                host_id,
                demo: false,
                clock_offset: chrono::TimeDelta::zero(),
            };
            let (result, report) = operate::run_now(&config, &job, &options).await?;
            println!("{report}");
            Ok(ExitCode::from(operate::exit_code(&result)))
        }
        Command::History { job, limit, failed } => {
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let rows = operate::history(&pool, &job, limit, failed)
                .await
                .with_context(|| format!("cannot read the history of job `{job}`"))?;
            print!("{}", operate::render_history(&rows));
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { job } => {
            operate::known_job(&config, &job)?;
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let changed = db::pause(&pool, &job, &host_id)
                .await
                .with_context(|| format!("cannot pause job `{job}`"))?;
            println!("{}", operate::paused_message(&job, true, changed));
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish { name, file } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("cannot read `{}`", file.display()))?;
            let mut runtime = Runtime::with_options(Some(&config.host.compile_cache), false)
                .context("cannot start the WebAssembly engine")?;
            runtime.set_compile_cache_limit(config.host.compile_cache_max_bytes);
            let runtime = Arc::new(runtime);
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let by = publisher(&host_id);
            let done = crate::published::publish(&pool, &runtime, &name, bytes, &by)
                .await
                .with_context(|| format!("cannot publish `{}` as `{name}`", file.display()))?;
            match done {
                crate::published::Published::New { version, sha256 } => println!(
                    "published `{name}` version {version} ({sha256}); every host running it swaps between runs"
                ),
                crate::published::Published::AlreadyCurrent { sha256 } => {
                    println!("`{name}` already is {sha256}: nothing changed")
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollback { name } => {
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let done = crate::published::rollback(&pool, &name, &publisher(&host_id)).await?;
            println!(
                "`{name}` rolled back from {} to {}; every host running it swaps between runs",
                &done.from[..12],
                &done.to[..12]
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::New { .. } => unreachable!("`new` returns before the configuration is read"),
        Command::Plugins => {
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let rows = crate::published::list(&pool, config.host.liveness.lost_after)
                .await
                .map_err(|e| {
                    schema_error(
                        e,
                        "no published plugins",
                        "cannot read the published plugins",
                    )
                })?;
            print!("{}", crate::published::render_list(&rows));
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { job } => {
            operate::known_job(&config, &job)?;
            let pool = inspect_pool(&database_url()?, &config, &host_id).await?;
            let changed = db::resume(&pool, &job)
                .await
                .with_context(|| format!("cannot resume job `{job}`"))?;
            println!("{}", operate::paused_message(&job, false, changed));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An operator command's database error; a missing table (42P01
/// undefined_table: no host of this version has started on this database)
/// says what to do instead.
fn schema_error(e: sqlx::Error, missing: &str, otherwise: &str) -> anyhow::Error {
    let undefined = e
        .as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("42P01"));
    let e = anyhow::Error::new(e);
    if undefined {
        e.context(format!(
            "{missing} in this database (schema `jobhost` is missing or older than this jobhost): start a host on it once, which applies the migrations"
        ))
    } else {
        e.context(otherwise.to_owned())
    }
}

/// Who publishes: the OS user and the host id the command runs as.
fn publisher(host_id: &str) -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("{user}@{host_id}")
}

/// A one-connection pool for the operator commands (no migrations), made
/// as the host makes its own (`[host] pooler`).
async fn inspect_pool(
    url: &str,
    config: &JobsConfig,
    host_id: &str,
) -> anyhow::Result<sqlx::PgPool> {
    let app = format!("{}/cli", db::application_name(host_id));
    let options = db::connect_options(url, "DATABASE_URL", config.host.pooler, &app)?;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("cannot connect to Postgres (DATABASE_URL)")
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_come_back_instead_of_exiting() {
        // Were this `clap::Error::exit()`, the test process would end here.
        let e = futures_executor::block_on(run_cli(["jobhost", "no-such-command"].map(Into::into)))
            .unwrap_err();
        let clap = e.downcast_ref::<clap::Error>().expect("a clap error");
        assert_eq!(clap.exit_code(), 2);
        let help =
            futures_executor::block_on(run_cli(["jobhost", "--help"].map(Into::into))).unwrap_err();
        assert_eq!(help.downcast_ref::<clap::Error>().unwrap().exit_code(), 0);
    }
}
