//! The `session` lock path, for long jobs (docs/DESIGN.md §1, second shape of the fix; §4).
//!
//! A poll cycle of minutes with live HTTP calls cannot sit in one transaction:
//! it would pin a pooled connection and roll back every result on one failure.
//! So:
//!
//! 1. a read on a pooled connection, released at once, skips the slot if
//!    the lock is held elsewhere or the slot is done, before a server session
//!    is opened for it ([`db::precheck`]);
//! 2. a connection **not from the pool** is opened for this run, with
//!    `idle_session_timeout` a little over two heartbeats from its startup
//!    packet on (a host frozen at any point loses the lock within that, by
//!    the server's own clock), and `pg_try_advisory_lock` taken there (busy:
//!    `lock_busy`, skip);
//! 3. the shared history checks run on that connection, under the lock, and
//!    draw the run's id; the run enters the host's in-flight set;
//! 4. a heartbeat task owns the lock connection and pings it every
//!    `heartbeat`; if it fails (backend terminated, network gone) the lock is
//!    gone, so the plugin is interrupted, its open transaction rolled back and
//!    the run recorded `lock_lost`: a host that takes the lock next never runs
//!    alongside a zombie;
//! 5. the plugin gets a `session` from which it begins short transactions
//!    through the pool, one at a time, each bounded by the run's deadline and
//!    committed on its own in a query that first proves, in the database,
//!    that the lock connection still holds the lock (`jobhost.assert_lock_held`):
//!    a session job never commits after its lock is gone;
//! 6. the run's row is written on the lock connection, then
//!    `pg_advisory_unlock` runs **on that same connection** and its boolean is
//!    checked (false is logged as an error with the key), and the connection
//!    is closed. On any error or cancellation it is closed, never reused:
//!    closing a session releases its locks.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection as _, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Job, RunResult, Runner, finished, run_context, run_limits};
use crate::db::{self, RunRecord};
use crate::runtime::{Lent, LockHolder, Returned, SessionHandle, TxScope};

impl Runner {
    pub(super) async fn run_session(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
    ) -> anyhow::Result<RunResult> {
        let name = job.config.name.as_str();
        let key = job.config.lock_key;
        if let Err(skip) = self.precheck(job, slot).await? {
            return Ok(skip);
        }
        let row = self.run_row(job, slot);

        // A connection of this run's own: never a pooled one, whose return to
        // the pool would keep the lock (the production bug).
        let app = crate::runner::truncate_utf8(
            &format!("{}/{name}/lock", db::application_name(&self.host_id)),
            63,
        );
        // The lock's server-side deadline: the heartbeat talks on this
        // connection every `heartbeat`; if it stops (host frozen, hung,
        // partitioned) Postgres ends the session, and so the lock, on its own.
        let idle_ms = (job.config.heartbeat * 2 + db::DEADLINE_MARGIN).as_millis();
        let Some(direct) = &self.direct else {
            // `jobset::load` refuses such a job; never take a session lock
            // through a transaction pooler.
            let e = anyhow::anyhow!(
                "job `{name}`: a `session` lock needs a real Postgres session (JOBHOST_DIRECT_URL behind a transaction pooler)"
            );
            return Err(self.fail_before_plugin(&row, e).await);
        };
        let options = direct
            .clone()
            .application_name(&app)
            .options([("idle_session_timeout", idle_ms.to_string())]);
        let mut lock = match PgConnection::connect_with(&options).await {
            Ok(c) => c,
            Err(e) => {
                let e = anyhow::Error::new(e)
                    .context(format!("job `{name}`: cannot open the lock connection"));
                return Err(self.fail_before_plugin(&row, e).await);
            }
        };
        let taken: sqlx::Result<(bool, DateTime<Utc>, i32, DateTime<Utc>)> = sqlx::query_as(
            "select pg_try_advisory_lock($1, $2), clock_timestamp(), pg_backend_pid(),
                    (select backend_start from pg_stat_activity where pid = pg_backend_pid())",
        )
        .bind(key.namespace)
        .bind(key.key)
        .fetch_one(&mut lock)
        .await;
        let (locked, db_now, pid, backend_start) = match taken {
            Ok(t) => t,
            Err(e) => {
                drop(lock);
                let e =
                    anyhow::Error::new(e).context(format!("job `{name}`: cannot try lock {key}"));
                return Err(self.fail_before_plugin(&row, e).await);
            }
        };
        if !locked {
            // Losing the race for a slot is the normal case in a fleet.
            debug!(job = %name, lock_key = %key, event = "lock_busy", "lock_busy: job lock held elsewhere, slot skipped");
            close(lock, name).await;
            return Ok(RunResult::LockBusy);
        }

        let go = match self.check_slot(&mut lock, job, slot, db_now).await {
            Ok(Ok(go)) => go,
            Ok(Err(skip)) => {
                unlock_and_close(lock, job, pid).await;
                return Ok(skip);
            }
            Err(e) => {
                drop(lock);
                return Err(self.fail_before_plugin(&row, e).await);
            }
        };

        let lost = CancellationToken::new();
        let stop_heartbeat = CancellationToken::new();
        // Dropping this run's future stops the heartbeat, which then drops
        // (closes) the lock connection: the lock can never outlive the run.
        let _stop_on_drop = stop_heartbeat.clone().drop_guard();
        let heartbeat = tokio::spawn(heartbeat(
            lock,
            job.config.heartbeat,
            lost.clone(),
            stop_heartbeat.clone(),
            name.to_owned(),
        ));

        let run = self.enter(job, slot, go);
        let attempt = go.attempt;
        let (ctx, limits) = (run_context(job, slot, attempt), run_limits(job));
        let holder = LockHolder {
            key: (key.namespace, key.key),
            pid,
            backend_start,
        };
        let session = SessionHandle::new(
            self.runs.clone(),
            name.into(),
            self.guard.clone(),
            job.config.max_rows,
            lost.clone(),
            holder,
            TxScope {
                role: job.config.role.clone(),
                timeout: job.config.timeout,
                session_baseline: self.session_baseline.clone(),
                pooler: self.pooler,
            },
        );
        let (abort, lost_too) = (self.abort.clone(), lost.clone());
        let invocation = self
            .runtime
            .invoke(
                &job.plugin,
                ctx,
                Lent::Session(session),
                limits,
                &job.config.env,
                job.config.http.clone(),
                async move {
                    tokio::select! {
                        _ = abort.cancelled() => Returned::Interrupted,
                        _ = lost_too.cancelled() => Returned::LockLost,
                    }
                },
            )
            .await;
        stop_heartbeat.cancel();
        let lock = heartbeat.await.ok().flatten();
        let judged = self.judge(job, invocation);
        let (outcome, message) = (judged.outcome, judged.message);
        let record = RunRecord {
            attempt,
            outcome,
            message: &message,
        };
        let id = Some(go.run_id);
        let written = match lock {
            Some(mut lock) => match db::finish_run(&mut lock, id, &run.row, &record).await {
                Ok(()) => {
                    unlock_and_close(lock, job, pid).await;
                    true
                }
                Err(e) => {
                    error!(job = %name, error = %e, "cannot record the run on the lock connection");
                    drop(lock);
                    self.record_detached(id, &run.row, &record).await
                }
            },
            None => self.record_detached(id, &run.row, &record).await,
        };
        if written {
            run.in_flight.recorded();
        }
        Ok(finished(job, go, outcome, message))
    }
}

/// Owns the lock connection during the run and checks it every `every`.
/// Returns it when stopped, or `None` (after cancelling `lost`) when it failed.
/// If the task ends any other way (a panic unwinds it, dropping, and so
/// closing, the lock connection) `lost` is cancelled too: a run never goes on
/// without its lock.
async fn heartbeat(
    mut conn: PgConnection,
    every: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
    job: String,
) -> Option<PgConnection> {
    let patience = every.max(Duration::from_secs(1));
    let lost_unless_stopped = lost.clone().drop_guard();
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                lost_unless_stopped.disarm();
                return Some(conn);
            }
            _ = tokio::time::sleep(every) => {}
        }
        let ping = tokio::time::timeout(patience, sqlx::query("select 1").execute(&mut conn)).await;
        if !matches!(ping, Ok(Ok(_))) {
            error!(job = %job, "lock connection failed: the job's session lock is lost; interrupting the run");
            lost.cancel();
            return None;
        }
    }
}

/// Unlocks on the connection that holds the lock (backend `pid`), checks the
/// answer, closes.
async fn unlock_and_close(mut lock: PgConnection, job: &Job, pid: i32) {
    let key = job.config.lock_key;
    let name = job.config.name.as_str();
    let unlocked: sqlx::Result<bool> = sqlx::query_scalar("select pg_advisory_unlock($1, $2)")
        .bind(key.namespace)
        .bind(key.key)
        .fetch_one(&mut lock)
        .await;
    match unlocked {
        Ok(true) => {
            info!(job = %name, lock_key = %key, pid, "session lock released");
        }
        Ok(false) => {
            error!(job = %name, lock_key = %key, pid, "pg_advisory_unlock returned false: the session lock was not held by this connection")
        }
        Err(e) => {
            error!(job = %name, lock_key = %key, error = %e, "unlock failed; closing the connection releases the lock")
        }
    }
    close(lock, name).await;
}

async fn close(lock: PgConnection, job: &str) {
    if let Err(e) = lock.close().await {
        warn!(job = %job, error = %e, "closing the lock connection failed; Postgres ends the session");
    }
}
