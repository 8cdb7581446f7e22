//! What operators look at: `jobhost status` (jobs, next slot, last and
//! in-flight runs) and `jobhost locks` (advisory locks with their holders,
//! flagging a lock held by an idle backend: the signature of a stuck lock).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::config::JobsConfig;
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
}

/// The status of every configured job.
pub async fn status(pool: &PgPool, config: &JobsConfig) -> sqlx::Result<Vec<JobStatus>> {
    let db_now: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(pool)
        .await?;
    let mut out = Vec::new();
    for job in &config.jobs {
        let last = sqlx::query_as(
            "select outcome, (extract(epoch from finished_at - started_at) * 1000)::int8, attempt, host_id, finished_at
               from jobhost.runs
              where job = $1 and outcome <> 'running'
              order by finished_at desc limit 1",
        )
        .bind(&job.name)
        .fetch_optional(pool)
        .await?;
        let running = sqlx::query_as(
            "select host_id, started_at from jobhost.runs
              where job = $1 and outcome = 'running' order by started_at",
        )
        .bind(&job.name)
        .fetch_all(pool)
        .await?;
        out.push(JobStatus {
            job: job.name.clone(),
            next_slot: job.schedule.next_after(db_now),
            last,
            running,
        });
    }
    Ok(out)
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
    /// Held by an idle backend: nobody will release it.
    pub stuck: bool,
}

/// Granted advisory locks in the current database with their holders.
pub async fn locks(pool: &PgPool, config: &JobsConfig) -> sqlx::Result<Vec<LockRow>> {
    let rows: Vec<(i64, i64, i16, i32, String, String, f64)> = sqlx::query_as(
        "select l.classid::int8, l.objid::int8, l.objsubid, l.pid,
                coalesce(a.application_name, ''), coalesce(a.state, 'unknown'),
                coalesce(extract(epoch from clock_timestamp() - coalesce(a.xact_start, a.state_change)), 0)::float8
           from pg_locks l
           left join pg_stat_activity a on a.pid = l.pid
          where l.locktype = 'advisory' and l.granted
            and l.database = (select oid from pg_database where datname = current_database())
          order by l.pid",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(classid, objid, objsubid, pid, app, state, held)| {
            // Two-int locks: classid = first int, objid = second (as unsigned oids).
            let (key, job) = if objsubid == 2 {
                let (ns, k) = (classid as u32 as i32, objid as u32 as i32);
                let job = (ns == LOCK_NAMESPACE)
                    .then(|| config.jobs.iter().find(|j| j.lock_key.key == k))
                    .flatten()
                    .map(|j| j.name.clone());
                (format!("({ns}, {k})"), job)
            } else {
                (((classid << 32) | objid).to_string(), None)
            };
            LockRow {
                key,
                job,
                pid,
                application_name: app,
                stuck: state == "idle",
                state,
                held_for_secs: held,
            }
        })
        .collect())
}

/// Renders `locks` as a table.
pub fn render_locks(rows: &[LockRow]) -> String {
    let mut s = format!(
        "{:<26} {:<22} {:>8} {:<32} {:<20} {:>10}\n",
        "KEY", "JOB", "PID", "APPLICATION", "STATE", "HELD FOR"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<26} {:<22} {:>8} {:<32} {:<20} {:>9.1}s{}",
            r.key,
            r.job.as_deref().unwrap_or("-"),
            r.pid,
            r.application_name,
            r.state,
            r.held_for_secs,
            if r.stuck {
                "  STUCK: held by an idle backend"
            } else {
                ""
            }
        );
    }
    if rows.is_empty() {
        s.push_str("(no advisory locks held)\n");
    }
    s
}
