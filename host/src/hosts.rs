//! Host liveness: which hosts of the fleet are alive, judged by a heartbeat
//! into `jobhost.hosts`, never by backend pids (a backend outlives a host's
//! dead task, and behind a transaction pooler pids mean nothing).
//!
//! - Every `heartbeat` each host updates its row's `last_seen` (the database
//!   clock) and marks its *own* `running` rows that no task of it is running
//!   any more as `lost` (a run whose task died while the host lives on).
//! - A host not seen for `lost_after` is dead: the next holder of a job's lock
//!   marks that host's `running` rows of the job `lost`
//!   ([`crate::db::slot_history`]), and `jobhost locks` calls a lock held by
//!   one of its backends STUCK.
//! - A graceful shutdown sets `stopped_at`; `status` shows the fleet.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db;

/// How liveness is judged (`[host] heartbeat`, `host-lost-after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// How often a host reports itself alive.
    pub heartbeat: Duration,
    /// A host not seen for this long is dead.
    pub lost_after: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            lost_after: Duration::from_secs(30),
        }
    }
}

/// The ids of this host's runs in flight (their `running` rows).
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Mutex<HashSet<i64>>>);

impl InFlight {
    /// Registers `run_id` until the returned guard is dropped (the run ended,
    /// or its task died or was cancelled).
    pub fn enter(&self, run_id: i64) -> InFlightGuard {
        self.lock().insert(run_id);
        InFlightGuard {
            set: self.clone(),
            run_id,
        }
    }

    /// The runs in flight now.
    pub fn snapshot(&self) -> Vec<i64> {
        self.lock().iter().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        // Single inserts and removes: a poisoned set is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps a run registered as in flight while it lives.
#[derive(Debug)]
pub struct InFlightGuard {
    set: InFlight,
    run_id: i64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.run_id);
    }
}

/// Registers (or re-registers) this host as alive; `listens` says whether it
/// hears `NOTIFY jobhost_reload` (it has a direct connection) or only polls
/// reload requests at each heartbeat; `reload_seen` is the latest reload
/// request its job set already covers (read before it was loaded).
pub async fn register(
    pool: &PgPool,
    host_id: &str,
    listens: bool,
    reload_seen: i64,
) -> sqlx::Result<()> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    crate::db::in_tx!(pool, |c| {
        sqlx::query(
            "insert into jobhost.hosts (id, hostname, pid, version, started_at, last_seen, listens, reload_seen)
             values ($1, $2, $3, $4, clock_timestamp(), clock_timestamp(), $5, $6)
             on conflict (id) do update
                set hostname = excluded.hostname, pid = excluded.pid, version = excluded.version,
                    started_at = excluded.started_at, last_seen = excluded.last_seen, stopped_at = null,
                    listens = excluded.listens, reload_seen = excluded.reload_seen",
        )
        .bind(host_id)
        .bind(hostname)
        .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(listens)
        .bind(reload_seen)
        .persistent(false)
        .execute(c)
        .await
    })
    .await?;
    Ok(())
}

/// The latest reload request (`jobhost reload`, a publish), 0 if none. Read
/// before a host resolves and loads its jobs: any later request may carry
/// a change that load did not see.
pub async fn latest_reload_request(pool: &PgPool) -> sqlx::Result<i64> {
    let mut conn = pool.acquire().await?;
    db::simple_one(
        &mut conn,
        "select coalesce(max(id), 0)::int8 from jobhost.reload_requests".to_owned(),
    )
    .await
}

/// What one heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// This host's `running` rows no task runs any more, now marked `lost`.
    pub marked_lost: u64,
    /// The latest reload request (`jobhost reload`), 0 if none.
    pub latest_reload: i64,
}

/// One heartbeat: `last_seen` now, and this host's `running` rows that no
/// task runs any more marked `lost` (rows younger than `settle` are left
/// alone: their run may have inserted its row after `in_flight` was read).
/// Also reads the latest reload request, and records `reload_seen`, the one
/// this host acted on. One simple query: one round trip, through any pooler.
pub async fn beat(
    pool: &PgPool,
    host_id: &str,
    in_flight: &[i64],
    settle: Duration,
    reload_seen: i64,
) -> sqlx::Result<Beat> {
    use sqlx::Row as _;
    let in_flight = in_flight
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let host = db::quote_literal(host_id);
    let sql = format!(
        "with seen as (
            update jobhost.hosts set last_seen = clock_timestamp(), stopped_at = null,
                                     reload_seen = {reload_seen}
             where id = {host}
         ), orphans as (
            update jobhost.runs
               set outcome = 'lost', finished_at = clock_timestamp(),
                   message = 'the host''s task running it ended without recording an outcome; its transaction was rolled back'
             where host_id = {host} and outcome = 'running' and id <> all('{{{in_flight}}}'::int8[])
               and started_at < clock_timestamp() - make_interval(secs => {settle})
            returning 1
         )
         select count(*), (select coalesce(max(id), 0) from jobhost.reload_requests) from orphans",
        settle = settle.as_secs_f64(),
    );
    let mut conn = pool.acquire().await?;
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    let row = rows.last().ok_or(sqlx::Error::RowNotFound)?;
    let marked: i64 = row.try_get(0)?;
    Ok(Beat {
        marked_lost: u64::try_from(marked).unwrap_or(0),
        latest_reload: row.try_get(1)?,
    })
}

/// Marks this host stopped (graceful shutdown).
pub async fn stop(pool: &PgPool, host_id: &str) -> sqlx::Result<()> {
    crate::db::in_tx!(pool, |c| {
        sqlx::query("update jobhost.hosts set stopped_at = clock_timestamp() where id = $1")
            .bind(host_id)
            .persistent(false)
            .execute(c)
            .await
    })
    .await?;
    Ok(())
}

/// Heartbeats until `stop` is cancelled. A failed beat is logged and retried
/// at the next one: the database being away is what liveness measures.
/// A reload request newer than `reload_seen` is passed to `reloads` (the
/// reload watch), which is how `jobhost reload` reaches a host that cannot
/// LISTEN, and any host whose listener missed it.
pub async fn heartbeat(
    pool: PgPool,
    host_id: String,
    liveness: Liveness,
    in_flight: InFlight,
    mut reload_seen: i64,
    reloads: tokio::sync::mpsc::Sender<&'static str>,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(liveness.heartbeat) => {}
        }
        match beat(
            &pool,
            &host_id,
            &in_flight.snapshot(),
            liveness.heartbeat,
            reload_seen,
        )
        .await
        {
            Ok(beat) => {
                if failing {
                    tracing::info!(host_id = %host_id, "host heartbeat recovered");
                    failing = false;
                }
                if beat.marked_lost > 0 {
                    tracing::warn!(host_id = %host_id, runs = beat.marked_lost, "marked runs whose task ended without an outcome as lost");
                }
                if beat.latest_reload > reload_seen {
                    reload_seen = beat.latest_reload;
                    let _ = reloads.try_send(crate::reload::REQUESTED);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(host_id = %host_id, error = %e, "host heartbeat failed; other hosts will take this host for dead if it lasts");
                }
                failing = true;
            }
        }
    }
}

/// One host of the fleet, as `status` and `locks` see it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    /// Host id.
    pub id: String,
    /// Machine name.
    pub hostname: String,
    /// OS process id.
    pub pid: i32,
    /// jobhost version.
    pub version: String,
    /// When it (re)started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// Alive: seen within `lost_after` and not stopped.
    pub live: bool,
    /// Hears `NOTIFY jobhost_reload` at once (else: at its next heartbeat).
    pub listens: bool,
}

/// A `jobhost.hosts` row as read, with its liveness.
type FleetRow = (
    String,
    String,
    i32,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    bool,
    bool,
);

/// Every host that ever registered, live ones first.
pub async fn fleet(pool: &PgPool, lost_after: Duration) -> sqlx::Result<Vec<HostRow>> {
    let rows: Vec<FleetRow> = crate::db::in_tx!(pool, |c| {
        sqlx::query_as(
            "select id, hostname, pid, version, started_at, last_seen,
                    stopped_at is null and last_seen > clock_timestamp() - make_interval(secs => $1),
                    listens
               from jobhost.hosts
              order by 7 desc, last_seen desc",
        )
        .bind(lost_after.as_secs_f64())
        .persistent(false)
        .fetch_all(c)
        .await
    })
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, hostname, pid, version, started_at, last_seen, live, listens)| HostRow {
                id,
                hostname,
                pid,
                version,
                started_at,
                last_seen,
                live,
                listens,
            },
        )
        .collect())
}
