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

/// Registers (or re-registers) this host as alive.
pub async fn register(pool: &PgPool, host_id: &str) -> sqlx::Result<()> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    sqlx::query(
        "insert into jobhost.hosts (id, hostname, pid, version, started_at, last_seen)
         values ($1, $2, $3, $4, clock_timestamp(), clock_timestamp())
         on conflict (id) do update
            set hostname = excluded.hostname, pid = excluded.pid, version = excluded.version,
                started_at = excluded.started_at, last_seen = excluded.last_seen, stopped_at = null",
    )
    .bind(host_id)
    .bind(hostname)
    .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
    .bind(env!("CARGO_PKG_VERSION"))
    .execute(pool)
    .await?;
    Ok(())
}

/// One heartbeat: `last_seen` now, and this host's `running` rows that no
/// task runs any more marked `lost` (rows younger than `settle` are left
/// alone: their run may have inserted its row after `in_flight` was read).
/// Returns how many rows it marked.
pub async fn beat(
    pool: &PgPool,
    host_id: &str,
    in_flight: &[i64],
    settle: Duration,
) -> sqlx::Result<u64> {
    let marked: i64 = sqlx::query_scalar(
        "with seen as (
            update jobhost.hosts set last_seen = clock_timestamp(), stopped_at = null where id = $1
         ), orphans as (
            update jobhost.runs
               set outcome = 'lost', finished_at = clock_timestamp(),
                   message = 'the host''s task running it ended without recording an outcome; its transaction was rolled back'
             where host_id = $1 and outcome = 'running' and id <> all($2)
               and started_at < clock_timestamp() - make_interval(secs => $3)
            returning 1
         )
         select count(*) from orphans",
    )
    .bind(host_id)
    .bind(in_flight)
    .bind(settle.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(marked).unwrap_or(0))
}

/// Marks this host stopped (graceful shutdown).
pub async fn stop(pool: &PgPool, host_id: &str) -> sqlx::Result<()> {
    sqlx::query("update jobhost.hosts set stopped_at = clock_timestamp() where id = $1")
        .bind(host_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Heartbeats until `stop` is cancelled. A failed beat is logged and retried
/// at the next one: the database being away is what liveness measures.
pub async fn heartbeat(
    pool: PgPool,
    host_id: String,
    liveness: Liveness,
    in_flight: InFlight,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(liveness.heartbeat) => {}
        }
        match beat(&pool, &host_id, &in_flight.snapshot(), liveness.heartbeat).await {
            Ok(marked) => {
                if failing {
                    tracing::info!(host_id = %host_id, "host heartbeat recovered");
                    failing = false;
                }
                if marked > 0 {
                    tracing::warn!(host_id = %host_id, runs = marked, "marked runs whose task ended without an outcome as lost");
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
);

/// Every host that ever registered, live ones first.
pub async fn fleet(pool: &PgPool, lost_after: Duration) -> sqlx::Result<Vec<HostRow>> {
    let rows: Vec<FleetRow> = sqlx::query_as(
        "select id, hostname, pid, version, started_at, last_seen,
                    stopped_at is null and last_seen > clock_timestamp() - make_interval(secs => $1)
               from jobhost.hosts
              order by 7 desc, last_seen desc",
    )
    .bind(lost_after.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, hostname, pid, version, started_at, last_seen, live)| HostRow {
                id,
                hostname,
                pid,
                version,
                started_at,
                last_seen,
                live,
            },
        )
        .collect())
}
