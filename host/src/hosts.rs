//! Host liveness: which hosts of the fleet are alive, judged by a heartbeat
//! into `jobhost.hosts`, never by backend pids (a backend outlives a host's
//! dead task, and behind a transaction pooler pids mean nothing).
//!
//! - Every `heartbeat` each host updates its row's `last_seen` (the database
//!   clock). (Its runs in flight are published apart, more often:
//!   [`crate::in_flight`].)
//! - A host not seen for `lost_after` is dead: the next holder of a job's lock
//!   records that host's published runs of the job `lost`
//!   ([`crate::db::slot_gate_sql`]), and `jobhost locks` calls a lock held by
//!   one of its backends STUCK.
//! - A graceful shutdown sets `stopped_at`; `status` shows the fleet.

use std::sync::Arc;
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

/// The live hosts of the fleet as this host's last heartbeat saw them, and
/// which of them is each job's *preferred* host: the one that tries a slot
/// at its instant while the others wait [`LiveHosts::defer`] first. By then
/// the preferred host holds the job's lock or has finished the slot, so the
/// others find that (the deferred slots' batched check, then the gate's
/// try-lock) and write nothing: a fleet costs the database about one host's
/// writes. If the preferred
/// host is dead, slow, lost the race or does not run the job at all (hosts
/// with different `jobs.toml`s), the slot runs `defer` late on another; the
/// lock still decides, so correctness does not depend on this.
///
/// The preference is rendezvous hashing of (job, host id): every host
/// computes the same answer from the same live set, and a host joining or
/// leaving moves only its own share of the jobs.
#[derive(Debug, Clone)]
pub struct LiveHosts {
    ids: Arc<std::sync::RwLock<Vec<String>>>,
    /// How long a host that is not a job's preferred one waits.
    pub defer: Duration,
}

impl LiveHosts {
    /// An empty view (no preference: every host tries at the slot).
    pub fn new(defer: Duration) -> Self {
        Self {
            ids: Arc::default(),
            defer,
        }
    }

    /// Replaces the live set (at each heartbeat).
    pub fn set(&self, mut ids: Vec<String>) {
        ids.sort();
        *self.ids.write().unwrap_or_else(|p| p.into_inner()) = ids;
    }

    /// The host that tries `job`'s slots first, if the fleet has more than
    /// one live host.
    pub fn preferred(&self, job: &str) -> Option<String> {
        let ids = self.ids.read().unwrap_or_else(|p| p.into_inner());
        if ids.len() < 2 {
            return None;
        }
        ids.iter().max_by_key(|id| rendezvous(job, id)).cloned()
    }

    /// How long `host_id` waits before trying a slot of `job`.
    pub fn wait_before(&self, job: &str, host_id: &str) -> Duration {
        match self.preferred(job) {
            Some(p) if p != host_id => self.defer,
            _ => Duration::ZERO,
        }
    }
}

/// A stable score of (job, host): the same on every host and version.
fn rendezvous(job: &str, host: &str) -> u64 {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::new()
        .chain_update(job.as_bytes())
        .chain_update([0])
        .chain_update(host.as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// Makes this host live once its plugins are loaded: registers it
/// ([`register`]), then claims its job roles again ([`crate::roles::Admitted::renew`]).
/// From here on its claims are its own to keep: written back if a peer reaped
/// them while the plugins loaded (a load slower than `host-lost-after`: a
/// cold compile, a busy machine; a run would otherwise be refused its role at
/// its gate), and the claims of a previous process with this host id that it
/// no longer runs deleted. A host's start and `run-now` both go through it.
pub async fn go_live(
    pool: &PgPool,
    host_id: &str,
    listens: bool,
    reload_seen: i64,
    admitted: &crate::roles::Admitted,
    lost_after: Duration,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    register(pool, host_id, listens, reload_seen)
        .await
        .with_context(|| format!("cannot register host `{host_id}` in jobhost.hosts"))?;
    admitted.renew(pool, lost_after).await.with_context(|| {
        format!("cannot claim the job roles of host `{host_id}` in jobhost.job_roles")
    })
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The latest reload request (`jobhost reload`), 0 if none.
    pub latest_reload: i64,
    /// The live hosts (seen within `lost_after`, not stopped), this one
    /// included.
    pub live: Vec<String>,
}

/// One heartbeat: `last_seen` now. Also reads the latest reload request and
/// the live hosts, and records `reload_seen`, the request this host acted
/// on. One simple query: one round trip, through any pooler.
pub async fn beat(
    pool: &PgPool,
    host_id: &str,
    reload_seen: i64,
    lost_after: Duration,
) -> sqlx::Result<Beat> {
    use sqlx::Row as _;
    let host = db::quote_literal(host_id);
    let sql = format!(
        "with seen as (
            update jobhost.hosts set last_seen = clock_timestamp(), stopped_at = null,
                                     reload_seen = {reload_seen}
             where id = {host}
         )
         select (select coalesce(max(id), 0) from jobhost.reload_requests),
                (select coalesce(string_agg(id, chr(31)), '') from jobhost.hosts
                  where stopped_at is null
                    and (id = {host} or last_seen > clock_timestamp() - make_interval(secs => {lost_after})))",
        lost_after = lost_after.as_secs_f64(),
    );
    let mut conn = pool.acquire().await?;
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    let row = rows.last().ok_or(sqlx::Error::RowNotFound)?;
    let live: String = row.try_get(1)?;
    Ok(Beat {
        latest_reload: row.try_get(0)?,
        live: live
            .split('\u{1f}')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
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

/// What the heartbeat task works with.
pub struct Heartbeat {
    /// The host's pool.
    pub pool: PgPool,
    /// This host.
    pub host_id: String,
    /// Its cadence, and when others count as dead.
    pub liveness: Liveness,
    /// The latest reload request the running job set covers.
    pub reload_seen: i64,
    /// Where newer reload requests go (the reload watch).
    pub reloads: tokio::sync::mpsc::Sender<&'static str>,
    /// The live-host view this heartbeat keeps current.
    pub live: LiveHosts,
    /// This host's job-role claims, renewed at each beat (and the claims of
    /// hosts that are not live deleted): [`crate::roles::Admitted::renew`].
    pub admitted: crate::roles::Admitted,
}

/// Heartbeats until `stop` is cancelled. A failed beat is logged and retried
/// at the next one: the database being away is what liveness measures.
/// A reload request newer than `reload_seen` is passed to `reloads` (the
/// reload watch), which is how `jobhost reload` reaches a host that cannot
/// LISTEN, and any host whose listener missed it. Each beat then renews the
/// host's job-role claims, apart: a failure there is logged and does not
/// make the host look dead.
pub async fn heartbeat(h: Heartbeat, stop: CancellationToken) {
    let Heartbeat {
        pool,
        host_id,
        liveness,
        mut reload_seen,
        reloads,
        live,
        admitted,
    } = h;
    let mut failing = false;
    let mut renewing_failed = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(liveness.heartbeat) => {}
        }
        crate::logging::report_dropped();
        match beat(&pool, &host_id, reload_seen, liveness.lost_after).await {
            Ok(beat) => {
                live.set(beat.live.clone());
                if failing {
                    tracing::info!(host_id = %host_id, "host heartbeat recovered");
                    failing = false;
                }
                if beat.latest_reload > reload_seen {
                    reload_seen = beat.latest_reload;
                    let _ = reloads.try_send(crate::reload::REQUESTED);
                }
                match admitted.renew(&pool, liveness.lost_after).await {
                    Ok(()) => renewing_failed = false,
                    Err(e) if !renewing_failed => {
                        renewing_failed = true;
                        tracing::warn!(host_id = %host_id, error = %e, "cannot renew this host's job-role claims in jobhost.job_roles; retried at the next heartbeat");
                    }
                    Err(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every host computes the same preferred host from the same live set;
    /// jobs spread over the hosts; a host leaving moves only its own jobs.
    #[test]
    fn rendezvous_preference_is_shared_spread_and_stable() {
        let view = LiveHosts::new(Duration::from_millis(50));
        view.set(vec!["c".into(), "a".into(), "b".into()]);
        let other = LiveHosts::new(Duration::from_millis(50));
        other.set(vec!["b".into(), "c".into(), "a".into()]);
        let jobs: Vec<String> = (0..300).map(|i| format!("job-{i}")).collect();
        let mut per_host = std::collections::HashMap::new();
        for j in &jobs {
            let p = view.preferred(j).unwrap();
            assert_eq!(other.preferred(j).as_ref(), Some(&p), "{j}");
            *per_host.entry(p).or_insert(0) += 1;
        }
        assert_eq!(per_host.len(), 3);
        assert!(per_host.values().all(|n| *n > 60), "{per_host:?}");
        let before: Vec<String> = jobs.iter().map(|j| view.preferred(j).unwrap()).collect();
        view.set(vec!["a".into(), "b".into()]);
        for (j, was) in jobs.iter().zip(&before) {
            if was != "c" {
                assert_eq!(&view.preferred(j).unwrap(), was, "{j} moved");
            }
        }
        assert_eq!(
            view.wait_before("job-1", &view.preferred("job-1").unwrap()),
            Duration::ZERO
        );
        let alone = LiveHosts::new(Duration::from_millis(50));
        alone.set(vec!["a".into()]);
        assert_eq!(
            alone.wait_before("job-1", "z"),
            Duration::ZERO,
            "no preference alone"
        );
    }
}
