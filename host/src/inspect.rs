//! What operators look at: `jobhost status` (jobs, next slot, last and
//! in-flight runs, the hosts of the fleet) and `jobhost locks` (advisory
//! locks with their holders, each judged healthy or STUCK; see [`judge`]).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::config::JobsConfig;
use crate::db::DEADLINE_MARGIN;
use crate::hosts::{self, HostRow};
use crate::lock::LOCK_NAMESPACE;

/// One job's line in `jobhost status`.
#[derive(Debug, Clone)]
pub struct JobStatus {
    /// Job name.
    pub job: String,
    /// Next slot after the database's now.
    pub next_slot: Option<DateTime<Utc>>,
    /// Latest finished run: (outcome, duration in ms, attempt, host, finished at).
    pub last: Option<(String, i64, i32, String, DateTime<Utc>)>,
    /// Runs in flight: (host, started at).
    pub running: Vec<(String, DateTime<Utc>)>,
    /// Paused fleet-wide (`jobhost pause`).
    pub paused: bool,
}

/// The status of every configured job.
pub async fn status(pool: &PgPool, config: &JobsConfig) -> sqlx::Result<Vec<JobStatus>> {
    let db_now: DateTime<Utc> = crate::db::now(pool).await?;
    let mut out = Vec::new();
    for job in &config.jobs {
        let last = crate::db::in_tx!(pool, |c| sqlx::query_as(
            "select outcome, (extract(epoch from finished_at - started_at) * 1000)::int8, attempt, host_id, finished_at
               from jobhost.runs
              where job = $1 and outcome <> 'running'
              order by finished_at desc limit 1",
        )
        .bind(&job.name).persistent(false).fetch_optional(c).await).await?;
        let running = crate::db::in_tx!(pool, |c| {
            sqlx::query_as(
                // Published runs in flight, and `running` rows (which hosts
                // of earlier versions write).
                "select host_id, started_at from jobhost.in_flight where job = $1
                 union all
                 select host_id, started_at from jobhost.runs where job = $1 and outcome = 'running'
                 order by started_at",
            )
            .bind(&job.name)
            .persistent(false)
            .fetch_all(c)
            .await
        })
        .await?;
        let paused: bool = crate::db::in_tx!(pool, |c| {
            sqlx::query_scalar("select exists (select 1 from jobhost.paused where job = $1)")
                .bind(&job.name)
                .persistent(false)
                .fetch_one(c)
                .await
        })
        .await?;
        out.push(JobStatus {
            job: job.name.clone(),
            next_slot: job.schedule.next_after(db_now),
            last,
            running,
            paused,
        });
    }
    Ok(out)
}

/// The hosts of the fleet (for `status`).
pub async fn fleet(pool: &PgPool, config: &JobsConfig) -> sqlx::Result<Vec<HostRow>> {
    hosts::fleet(pool, config.host.liveness.lost_after).await
}

/// Renders the fleet as a table.
pub fn render_fleet(rows: &[HostRow]) -> String {
    let mut s = format!(
        "{:<32} {:<8} {:<10} {:<19} {:<19}\n",
        "HOST", "STATE", "VERSION", "STARTED (UTC)", "LAST SEEN (UTC)"
    );
    for h in rows {
        let _ = writeln!(
            s,
            "{:<32} {:<8} {:<10} {:<19} {:<19}",
            h.id,
            if h.live { "live" } else { "gone" },
            h.version,
            h.started_at.format("%Y-%m-%d %H:%M:%S"),
            h.last_seen.format("%Y-%m-%d %H:%M:%S")
        );
    }
    if rows.is_empty() {
        s.push_str("(no host has registered)\n");
    }
    s
}

/// Renders `status` as a table.
pub fn render_status(rows: &[JobStatus]) -> String {
    let mut s = format!(
        "{:<24} {:<23} {:<12} {:>9} {:>7}  {}\n",
        "JOB", "NEXT SLOT (UTC)", "LAST", "DURATION", "ATTEMPT", "HOST / IN FLIGHT"
    );
    for r in rows {
        let next = r.next_slot.map_or("-".into(), |t| {
            t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
        });
        let (outcome, duration, attempt, host) = match &r.last {
            Some((o, ms, a, h, _)) => (o.clone(), format!("{ms}ms"), a.to_string(), h.clone()),
            None => ("never".into(), "-".into(), "-".into(), "-".into()),
        };
        let mut host = host;
        if r.paused {
            host.push_str("  [PAUSED: jobhost resume]");
        }
        for (h, since) in &r.running {
            let _ = write!(
                host,
                "  [running on {h} since {}]",
                since.format("%H:%M:%S")
            );
        }
        let _ = writeln!(
            s,
            "{:<24} {:<23} {:<12} {:>9} {:>7}  {}",
            r.job, next, outcome, duration, attempt, host
        );
    }
    s
}

/// One advisory lock in `jobhost locks`.
#[derive(Debug, Clone, PartialEq)]
pub struct LockRow {
    /// `(namespace, key)` for two-int locks, the bigint for bigint locks.
    pub key: String,
    /// The configured job whose key this is.
    pub job: Option<String>,
    /// Holder backend pid.
    pub pid: i32,
    /// Holder's `application_name`.
    pub application_name: String,
    /// Holder's state (`active`, `idle in transaction`, `idle`, ...).
    pub state: String,
    /// Seconds the holder has been in its transaction (or idle, if idle).
    pub held_for_secs: f64,
    /// Nobody will release it in time: see [`judge`] for the rules.
    pub stuck: bool,
    /// Why it is healthy or stuck, in words.
    pub verdict: String,
}

/// Who holds a lock, as far as `jobhost locks` can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder<'a> {
    /// A backend of a live host: the run's transaction (`jobhost:<host>/<job>`).
    RunOf(&'a str),
    /// A live host's session-lock connection (`jobhost:<host>/<job>/lock`).
    LockConnectionOf(&'a str),
    /// A live host's backend that is neither (its pool, its CLI).
    OtherOf(&'a str),
    /// A backend named for jobhost whose host is not alive.
    DeadHost,
    /// Not jobhost's.
    Foreign,
}

/// Whose backend `application_name` is, given the live hosts' ids.
pub fn holder<'a>(application_name: &str, live: &'a [String]) -> Holder<'a> {
    let Some(rest) = application_name.strip_prefix("jobhost:") else {
        return Holder::Foreign;
    };
    // Host ids may contain `/`: take the longest live id the name starts with.
    let host = live
        .iter()
        .filter(|id| {
            rest.strip_prefix(id.as_str())
                .is_some_and(|tail| tail.is_empty() || tail.starts_with('/'))
        })
        .max_by_key(|id| id.len());
    let Some(host) = host else {
        return Holder::DeadHost;
    };
    let tail = &rest[host.len()..];
    if tail.ends_with("/lock") {
        Holder::LockConnectionOf(host)
    } else if tail.len() > 1 && !tail.ends_with("/cli") {
        Holder::RunOf(host)
    } else {
        Holder::OtherOf(host)
    }
}

/// Judges one advisory lock (`ours`: in jobhost's namespace). A lock is
/// healthy when something alive will release it in time:
///
/// - a live host's run, inside its transaction, within the run's deadline
///   (`deadline_secs`: the job's timeout plus the margin Postgres is given);
/// - a live host's session-lock connection (its heartbeat keeps it, and
///   `idle_session_timeout` ends it if the host freezes).
///
/// It is STUCK when held by a backend of no live host (a frozen or dead
/// host), by a run past its deadline, or by an idle connection that is not a
/// lock connection (a pooled one: the production bug). Locks that are neither
/// in jobhost's namespace nor held by a jobhost backend are not judged.
pub fn judge(
    holder: Holder<'_>,
    ours: bool,
    state: &str,
    held_secs: f64,
    deadline_secs: f64,
) -> (bool, String) {
    let in_tx = state.starts_with("idle in transaction") || state == "active";
    match holder {
        Holder::LockConnectionOf(h) => (false, format!("session lock of live host {h}")),
        Holder::RunOf(h) | Holder::OtherOf(h) if in_tx => {
            if held_secs <= deadline_secs {
                (false, format!("in a run of live host {h}"))
            } else {
                (
                    true,
                    format!("STUCK: run of {h} past its deadline ({deadline_secs:.0}s)"),
                )
            }
        }
        Holder::RunOf(h) | Holder::OtherOf(h) => (
            true,
            format!("STUCK: left on an idle connection of {h}, outside any run"),
        ),
        Holder::DeadHost => (true, "STUCK: held by a backend of no live host".into()),
        Holder::Foreign if ours && !in_tx => (
            true,
            "STUCK: job key held by an idle non-jobhost backend".into(),
        ),
        Holder::Foreign if ours => {
            if held_secs > deadline_secs {
                (
                    true,
                    "STUCK: job key held by a non-jobhost transaction past the deadline".into(),
                )
            } else {
                (false, "job key held by a non-jobhost transaction".into())
            }
        }
        Holder::Foreign => (false, "-".into()),
    }
}

/// Granted advisory locks in the current database with their holders, each
/// judged (see [`judge`]).
///
/// A lock judged stuck is looked at again [`STUCK_RECHECK`] later and stays
/// stuck only if the same backend still holds it and is still judged so.
/// `pg_locks` and `pg_stat_activity` are read at two moments of one query:
/// a backend read as idle may have begun a run by the time its locks are
/// read, and a run takes its job's lock in its first statement (the opening
/// query). A lock really left behind is still there.
pub async fn locks(pool: &PgPool, config: &JobsConfig) -> sqlx::Result<Vec<LockRow>> {
    let first = read_locks(pool, config).await?;
    if !first.iter().any(|r| r.stuck) {
        return Ok(first);
    }
    tokio::time::sleep(STUCK_RECHECK).await;
    let mut again = read_locks(pool, config).await?;
    for row in &mut again {
        let was_stuck = first
            .iter()
            .any(|f| f.stuck && f.pid == row.pid && f.key == row.key);
        if row.stuck && !was_stuck {
            // Stuck in one read only: the same race, the other way round.
            row.stuck = false;
            row.verdict = "held briefly (not stuck in the first look)".into();
        }
    }
    Ok(again)
}

/// How long [`locks`] waits before confirming a stuck lock.
pub const STUCK_RECHECK: std::time::Duration = std::time::Duration::from_millis(150);

/// One read of [`locks`], unconfirmed.
async fn read_locks(pool: &PgPool, config: &JobsConfig) -> sqlx::Result<Vec<LockRow>> {
    let live: Vec<String> = hosts::fleet(pool, config.host.liveness.lost_after)
        .await?
        .into_iter()
        .filter(|h| h.live)
        .map(|h| h.id)
        .collect();
    let margin = DEADLINE_MARGIN.as_secs_f64();
    let longest = config
        .jobs
        .iter()
        .map(|j| j.timeout.as_secs_f64())
        .fold(0.0, f64::max);
    let rows: Vec<(i64, i64, i16, i32, String, String, f64)> = crate::db::in_tx!(pool, |c| sqlx::query_as(
        "select l.classid::int8, l.objid::int8, l.objsubid, l.pid,
                coalesce(a.application_name, ''), coalesce(a.state, 'unknown'),
                coalesce(extract(epoch from clock_timestamp() - coalesce(a.xact_start, a.state_change)), 0)::float8
           from pg_locks l
           left join pg_stat_activity a on a.pid = l.pid
          where l.locktype = 'advisory' and l.granted
            and l.database = (select oid from pg_database where datname = current_database())
          order by l.pid",
    ).persistent(false).fetch_all(c).await).await?;
    Ok(rows
        .into_iter()
        .map(|(classid, objid, objsubid, pid, app, state, held)| {
            // Two-int locks: classid = first int, objid = second (as unsigned oids).
            let (key, job, ours) = if objsubid == 2 {
                let (ns, k) = (classid as u32 as i32, objid as u32 as i32);
                let job = (ns == LOCK_NAMESPACE)
                    .then(|| config.jobs.iter().find(|j| j.lock_key.key == k))
                    .flatten();
                (format!("({ns}, {k})"), job, ns == LOCK_NAMESPACE)
            } else {
                (((classid << 32) | objid).to_string(), None, false)
            };
            // The deadline of the job's run; for a lock that is not a
            // configured job's, the longest any run may take.
            let deadline = job.map_or(longest, |j| j.timeout.as_secs_f64()) + margin;
            let (stuck, verdict) = judge(holder(&app, &live), ours, &state, held, deadline);
            LockRow {
                key,
                job: job.map(|j| j.name.clone()),
                pid,
                application_name: app,
                stuck,
                verdict,
                state,
                held_for_secs: held,
            }
        })
        .collect())
}

/// Renders `locks` as a table.
pub fn render_locks(rows: &[LockRow]) -> String {
    let mut s = format!(
        "{:<26} {:<22} {:>8} {:<32} {:<20} {:>10}  {}\n",
        "KEY", "JOB", "PID", "APPLICATION", "STATE", "HELD FOR", "VERDICT"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<26} {:<22} {:>8} {:<32} {:<20} {:>9.1}s  {}",
            r.key,
            r.job.as_deref().unwrap_or("-"),
            r.pid,
            r.application_name,
            r.state,
            r.held_for_secs,
            r.verdict
        );
    }
    if rows.is_empty() {
        s.push_str("(no advisory locks held)\n");
    }
    s
}

/// Watches for STUCK locks every `every` until `stop`: each one is logged
/// once as a WARN (`event = "stuck_lock"`, with key, job, holder and why)
/// while it lasts, and `metrics` counts them. Losing a slot to a live host
/// is normal in a fleet and never logged at this level; a lock nothing alive
/// will release is what a person must hear about.
pub async fn watch_stuck(
    pool: PgPool,
    current: crate::jobset::Current,
    every: std::time::Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut reported: std::collections::HashSet<(i32, String)> = Default::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let rows = match locks(&pool, &current.config()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read pg_locks for the stuck-lock watch");
                continue;
            }
        };
        let stuck: Vec<&LockRow> = rows.iter().filter(|r| r.stuck).collect();
        metrics.set_stuck_locks(stuck.len());
        let now: std::collections::HashSet<(i32, String)> =
            stuck.iter().map(|r| (r.pid, r.key.clone())).collect();
        for r in &stuck {
            if !reported.contains(&(r.pid, r.key.clone())) {
                tracing::warn!(
                    event = "stuck_lock",
                    lock_key = %r.key,
                    job = r.job.as_deref().unwrap_or("-"),
                    pid = r.pid,
                    application_name = %r.application_name,
                    state = %r.state,
                    verdict = %r.verdict,
                    "stuck advisory lock: nothing alive will release it (`jobhost locks`)"
                );
            }
        }
        reported = now;
    }
}
