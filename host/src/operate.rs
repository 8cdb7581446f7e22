//! What operators *do* (as opposed to look at, [`crate::inspect`]):
//! `jobhost run-now` (one slot now, through the same lock path as a
//! scheduled run), `history`, `pause` / `resume` (fleet-wide, through
//! `jobhost.paused`, which every host's gate reads under the job's lock).

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::config::JobsConfig;
use crate::db::{self, Outcome};
use crate::runner::{RunResult, Runner};
use crate::{HostOptions, hosts, jobset};

/// Refuses a job name `jobs.toml` does not have, naming the ones it has.
pub fn known_job(config: &JobsConfig, job: &str) -> anyhow::Result<()> {
    if config.jobs.iter().any(|j| j.name == job) {
        return Ok(());
    }
    let names: Vec<&str> = config.jobs.iter().map(|j| j.name.as_str()).collect();
    anyhow::bail!(
        "no job `{job}` in `{}` (jobs: {})",
        config.path.display(),
        names.join(", ")
    )
}

/// Runs one slot of `job` now, as a one-run host: the job's plugin is loaded
/// and validated as at a start, the slot is the database's now (to the
/// millisecond, so it is a slot of its own), and the run takes the same path
/// as a scheduled one: lock, gate (a paused job is skipped), verified commit,
/// history. Returns the result and a line for the operator.
pub async fn run_now(
    config: &JobsConfig,
    job: &str,
    options: &HostOptions,
) -> anyhow::Result<(RunResult, String)> {
    known_job(config, job)?;
    let mut only = config.clone();
    only.jobs.retain(|j| j.name == job);
    let runtime = Arc::new(crate::jobset::runtime(&only)?);
    let mut only = only.with_direct_url(options.direct_url.is_some());
    let db::Connected {
        pool,
        direct,
        session_baseline,
        runs,
    } = db::connect(options.endpoints(config), 2, &options.host_id).await?;
    let dir = only.host.published_dir();
    crate::published::resolve(&pool, &mut only, &dir).await?;
    let admitted = crate::roles::Admitted::new(&options.host_id);
    admitted.admit(&runs, &only.jobs).await?;
    let loaded = jobset::load(&runtime, &only, &[], None).await?;
    hosts::go_live(
        &pool,
        &options.host_id,
        false,
        0,
        &admitted,
        config.host.liveness.lost_after,
    )
    .await?;
    let runner = Runner::new(pool.clone(), runtime, &options.host_id)
        .with_connections(direct, config.host.pooler)
        .with_run_pools(runs.clone())
        .with_liveness(config.host.liveness)
        .with_session_baseline(session_baseline);
    let slot: DateTime<Utc> = crate::db::in_tx!(&pool, |c| {
        sqlx::query_scalar("select date_trunc('milliseconds', clock_timestamp())")
            .persistent(false)
            .fetch_one(c)
            .await
    })
    .await
    .context("cannot read the database clock")?;
    // A heartbeat while the run lasts, as a host's: a run longer than
    // `host-lost-after` keeps its host live, so its lock is not called
    // STUCK and its role's claim is not reaped under it.
    let stop_heartbeat = tokio_util::sync::CancellationToken::new();
    let heartbeat = tokio::spawn(hosts::heartbeat(
        hosts::Heartbeat {
            pool: pool.clone(),
            host_id: options.host_id.clone(),
            liveness: config.host.liveness,
            reload_seen: 0,
            reloads: tokio::sync::mpsc::channel(1).0,
            live: hosts::LiveHosts::new(std::time::Duration::ZERO),
            admitted: admitted.clone(),
        },
        stop_heartbeat.clone(),
    ));
    let result = runner.run(&loaded[0], slot).await;
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    if let Err(e) = admitted.release(&pool).await {
        tracing::warn!(error = %e, "cannot delete the one-run host's job-role claims");
    }
    if let Err(e) = hosts::stop(&pool, &options.host_id).await {
        tracing::warn!(error = %e, "cannot mark the one-run host stopped");
    }
    runs.close_roles().await;
    pool.close().await;
    let result = result?;
    let line = match &result {
        RunResult::Finished {
            outcome, message, ..
        } => format!(
            "{job}: {} at slot {} — {message}",
            outcome.as_str(),
            slot.to_rfc3339()
        ),
        RunResult::LockBusy => format!("{job}: skipped, another holder has the job's lock"),
        RunResult::Paused => format!("{job}: skipped, the job is paused (`jobhost resume {job}`)"),
        other => format!("{job}: skipped ({other:?})"),
    };
    Ok((result, line))
}

/// `run-now`'s exit code: 0 ok, 1 the run failed, 3 nothing ran.
pub fn exit_code(result: &RunResult) -> u8 {
    match result {
        RunResult::Finished {
            outcome: Outcome::Ok,
            ..
        } => 0,
        RunResult::Finished { .. } => 1,
        _ => 3,
    }
}

/// What `pause` / `resume` say.
pub fn paused_message(job: &str, pausing: bool, changed: bool) -> String {
    let state = if pausing { "paused" } else { "resumed" };
    if changed {
        format!("job `{job}` {state} on every host")
    } else {
        format!("job `{job}` was already {state}")
    }
}

/// One run in `jobhost history`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    /// The slot it served.
    pub slot: DateTime<Utc>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Duration in milliseconds, once finished.
    pub duration_ms: Option<i64>,
    /// Attempt number.
    pub attempt: i32,
    /// Outcome.
    pub outcome: String,
    /// The host that ran it.
    pub host_id: String,
    /// Which plugin version ran (first 12 hex digits).
    pub plugin: String,
    /// Summary or error.
    pub message: String,
}

/// A history row as read: slot, started, duration, attempt, outcome, host,
/// plugin, message.
type HistoryTuple = (
    DateTime<Utc>,
    DateTime<Utc>,
    Option<i64>,
    i32,
    String,
    String,
    String,
    String,
);

/// The latest `limit` runs of `job`, newest first; only failures if `failed`.
pub async fn history(
    pool: &PgPool,
    job: &str,
    limit: i64,
    failed: bool,
) -> sqlx::Result<Vec<HistoryRow>> {
    let rows: Vec<HistoryTuple> = crate::db::in_tx!(pool, |c| {
        sqlx::query_as(
            "select slot, started_at,
                    (extract(epoch from finished_at - started_at) * 1000)::int8,
                    attempt, outcome, host_id, left(plugin_sha256, 12), coalesce(message, '')
               from jobhost.runs
              where job = $1 and (not $3 or outcome not in ('ok', 'running'))
              order by id desc
              limit $2",
        )
        .bind(job)
        .bind(limit.max(0))
        .bind(failed)
        .persistent(false)
        .fetch_all(c)
        .await
    })
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(slot, started_at, duration_ms, attempt, outcome, host_id, plugin, message)| {
                HistoryRow {
                    slot,
                    started_at,
                    duration_ms,
                    attempt,
                    outcome,
                    host_id,
                    plugin,
                    message,
                }
            },
        )
        .collect())
}

/// Renders `history` as a table (messages on one line, cut at 120 chars).
pub fn render_history(rows: &[HistoryRow]) -> String {
    let mut s = format!(
        "{:<23} {:<11} {:>9} {:>7} {:<20} {:<12}  {}\n",
        "SLOT (UTC)", "OUTCOME", "DURATION", "ATTEMPT", "HOST", "PLUGIN", "MESSAGE"
    );
    for r in rows {
        let message: String = r.message.replace('\n', " ").chars().take(120).collect();
        let _ = writeln!(
            s,
            "{:<23} {:<11} {:>9} {:>7} {:<20} {:<12}  {}",
            r.slot.format("%Y-%m-%d %H:%M:%S%.3f"),
            r.outcome,
            r.duration_ms.map_or("-".into(), |ms| format!("{ms}ms")),
            r.attempt,
            r.host_id,
            r.plugin,
            message
        );
    }
    if rows.is_empty() {
        s.push_str("(no runs)\n");
    }
    s
}
