//! The host's side of Postgres: the pool every job transaction comes from, the
//! migrations of the host's own schema, and the run history.
//!
//! This is the only module that creates connections. Plugins reach the database
//! solely through the transaction handle the runner lends them.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

/// The host's migrations (schema `jobhost`). Applied by [`connect`].
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How a run ended, as stored in `jobhost.runs.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin returned success and the transaction committed.
    Ok,
    /// The plugin returned an error, or a statement failed; rolled back.
    Error,
    /// The plugin trapped (panic, memory limit, ...); rolled back.
    Trap,
    /// The run exceeded its timeout; rolled back.
    Timeout,
}

impl Outcome {
    /// The value stored in the runs table.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
        }
    }
}

/// One row of `jobhost.runs`.
#[derive(Debug, Clone)]
pub struct RunRecord<'a> {
    /// Job name.
    pub job: &'a str,
    /// Slot served.
    pub slot: DateTime<Utc>,
    /// Attempt number at this slot.
    pub attempt: i32,
    /// The host that ran it.
    pub host_id: &'a str,
    /// SHA-256 of the plugin file that ran.
    pub plugin_sha256: &'a str,
    /// When the run started (host clock).
    pub started_at: DateTime<Utc>,
    /// How it ended.
    pub outcome: Outcome,
    /// Summary or error message.
    pub message: &'a str,
}

/// Opens the host pool and applies the host's migrations.
///
/// Every connection carries `application_name = jobhost:<host_id>` so that
/// `pg_stat_activity` (and `pg_locks` joined to it) shows which host holds what.
pub async fn connect(database_url: &str, pool_size: u32, host_id: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = database_url
        .parse()
        .context("invalid DATABASE_URL (expected postgres://user@host:port/db)")?;
    let options = options.application_name(&application_name(host_id));
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("cannot connect to Postgres (DATABASE_URL)")?;
    MIGRATOR
        .run(&pool)
        .await
        .context("cannot apply the host's migrations (schema `jobhost`)")?;
    Ok(pool)
}

/// `application_name` for a host's connections; Postgres truncates it at 63 bytes.
pub fn application_name(host_id: &str) -> String {
    format!("jobhost:{host_id}")
}

/// A default host id: `<hostname>:<pid>`, unique per process on a fleet.
pub fn default_host_id() -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{hostname}:{}", std::process::id())
}

/// Whether `slot` of `job` already has a successful run. Called under the job's
/// lock, so a concurrent success cannot appear between this check and the run.
pub async fn slot_succeeded(
    conn: &mut PgConnection,
    job: &str,
    slot: DateTime<Utc>,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "select exists(select 1 from jobhost.runs where job = $1 and slot = $2 and outcome = 'ok')",
    )
    .bind(job)
    .bind(slot)
    .fetch_one(conn)
    .await
}

/// The attempt number the next run of `slot` will have.
pub async fn next_attempt(
    conn: &mut PgConnection,
    job: &str,
    slot: DateTime<Utc>,
) -> sqlx::Result<i32> {
    sqlx::query_scalar(
        "select coalesce(max(attempt), 0) + 1 from jobhost.runs where job = $1 and slot = $2",
    )
    .bind(job)
    .bind(slot)
    .fetch_one(conn)
    .await
}

/// Inserts a finished run. Called inside the job's transaction, so an `ok` row
/// commits atomically with the work it describes.
pub async fn record_run(conn: &mut PgConnection, run: &RunRecord<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "insert into jobhost.runs
             (job, slot, attempt, host_id, plugin_sha256, started_at, finished_at, outcome, message)
         values ($1, $2, $3, $4, $5, $6, clock_timestamp(), $7, $8)",
    )
    .bind(run.job)
    .bind(run.slot)
    .bind(run.attempt)
    .bind(run.host_id)
    .bind(run.plugin_sha256)
    .bind(run.started_at)
    .bind(run.outcome.as_str())
    .bind(run.message)
    .execute(conn)
    .await?;
    Ok(())
}
