//! The run path: one slot of one job, from BEGIN to COMMIT. Read top-down:
//!
//! 1. take a pooled connection and `BEGIN`;
//! 2. first statement: `pg_try_advisory_xact_lock(namespace, key)` (and the
//!    database clock). Busy: roll back, warn `lock_busy`, skip;
//! 3. under the lock: skip a slot the database clock has not reached yet, and a
//!    slot that already succeeded on any host (the fleet-wide once-per-slot
//!    rule); number the attempt;
//! 4. `SET LOCAL statement_timeout` (a backstop so no statement outlives the run)
//!    and `SAVEPOINT` so that a failed run can still be recorded under the lock;
//! 5. lend the transaction to a fresh plugin instance and call `run`;
//! 6. success: record `ok` in the same transaction and COMMIT, so the history
//!    can never say `ok` for work that is not there. Anything else: roll back to
//!    the savepoint, record the failure, COMMIT. Either way the COMMIT (or a
//!    ROLLBACK) releases the lock; there is no unlock call anywhere.

use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::config::JobConfig;
use crate::db::{self, Outcome, RunRecord};
use crate::guard::SqlGuard;
use crate::runtime::bindings::job::Context;
use crate::runtime::{Invocation, Plugin, Returned, RunLimits, Runtime, TxHandle};

/// A configured job with its loaded plugin.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its `jobs.toml` entry.
    pub config: JobConfig,
    /// The plugin version new runs use.
    pub plugin: Plugin,
}

/// What happened to one slot.
#[derive(Debug, Clone, PartialEq)]
pub enum RunResult {
    /// The plugin ran; the outcome is recorded in `jobhost.runs`.
    Finished {
        /// How it ended.
        outcome: Outcome,
        /// Summary or error.
        message: String,
        /// Attempt number at this slot.
        attempt: i32,
    },
    /// Another holder has the job's lock; nothing ran.
    LockBusy,
    /// The slot already has a successful run (on this or another host).
    AlreadyDone,
    /// The database clock has not reached the slot yet (this host's clock is
    /// ahead); try again at the slot by the database's time.
    NotDue {
        /// The database's clock when checked.
        db_now: DateTime<Utc>,
    },
}

/// Runs slots of jobs against the host's pool.
#[derive(Clone)]
pub struct Runner {
    pool: PgPool,
    runtime: Arc<Runtime>,
    host_id: Arc<str>,
    guard: Arc<SqlGuard>,
}

impl Runner {
    /// A runner using `pool` for every job transaction.
    pub fn new(pool: PgPool, runtime: Arc<Runtime>, host_id: &str) -> Self {
        Self {
            pool,
            runtime,
            host_id: host_id.into(),
            guard: Arc::new(SqlGuard::new()),
        }
    }

    /// The host id recorded with each run.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Runs `slot` of `job` (see the module docs for the steps).
    ///
    /// Errors are host-side failures (Postgres unreachable, the bookkeeping
    /// failed); plugin failures are a `Finished` result with their outcome.
    ///
    /// # Cancel safety
    /// Dropping the future drops the sqlx transaction, which rolls back (and so
    /// releases the lock) when its connection is next used or closed.
    pub async fn run(&self, job: &Job, slot: DateTime<Utc>) -> anyhow::Result<RunResult> {
        let span = info_span!("run", job = %job.config.name, slot = %slot.to_rfc3339());
        self.run_inner(job, slot).instrument(span).await
    }

    async fn run_inner(&self, job: &Job, slot: DateTime<Utc>) -> anyhow::Result<RunResult> {
        let name = job.config.name.as_str();
        let key = job.config.lock_key;
        let started_at = Utc::now();
        let mut tx = self
            .pool
            .begin()
            .await
            .with_context(|| format!("job `{name}`: cannot begin a transaction"))?;

        // Invariant: the lock is the first statement of the transaction the
        // plugin will use, so it is pinned to this connection and released by
        // COMMIT/ROLLBACK. The clock comes along to judge the slot by the
        // database's time, never this host's.
        let (locked, db_now): (bool, DateTime<Utc>) =
            sqlx::query_as("select pg_try_advisory_xact_lock($1, $2), clock_timestamp()")
                .bind(key.namespace)
                .bind(key.key)
                .fetch_one(&mut *tx)
                .await
                .with_context(|| format!("job `{name}`: cannot try lock {key}"))?;
        if !locked {
            rollback(tx, name).await;
            warn!(job = %name, lock_key = %key, event = "lock_busy", "lock_busy: job lock held elsewhere, slot skipped");
            return Ok(RunResult::LockBusy);
        }
        if db_now < slot {
            rollback(tx, name).await;
            return Ok(RunResult::NotDue { db_now });
        }
        let bookkeeping = |what: &'static str| move || format!("job `{name}`: cannot {what}");
        if db::slot_succeeded(&mut tx, name, slot)
            .await
            .with_context(bookkeeping("check the slot's history"))?
        {
            rollback(tx, name).await;
            return Ok(RunResult::AlreadyDone);
        }
        let attempt = db::next_attempt(&mut tx, name, slot)
            .await
            .with_context(bookkeeping("number the attempt"))?;
        let timeout_ms = job.config.timeout.as_millis().max(1);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "set local statement_timeout = {timeout_ms}"
        )))
        .execute(&mut *tx)
        .await
        .with_context(bookkeeping("set statement_timeout"))?;
        sqlx::query("savepoint jobhost_work")
            .execute(&mut *tx)
            .await
            .with_context(bookkeeping("create the work savepoint"))?;
        if let Some(role) = &job.config.role {
            // After the savepoint, so rolling back to it also drops the role.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "set local role {}",
                quote_ident(role)
            )))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("job `{name}`: cannot switch to role `{role}`"))?;
        }

        let ctx = Context {
            job: name.to_owned(),
            slot: slot.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
            config: job.config.config.clone(),
        };
        let limits = RunLimits {
            timeout: job.config.timeout,
            max_memory_bytes: job.config.max_memory_bytes,
        };
        let handle = TxHandle::new(tx, name.into(), job.config.max_rows, self.guard.clone());
        let invocation = self
            .runtime
            .invoke(&job.plugin, ctx, handle, limits, &job.config.env)
            .await;
        let (outcome, message, tx) = self.judge(job, invocation);

        let record = RunRecord {
            job: name,
            slot,
            attempt,
            host_id: &self.host_id,
            plugin_sha256: &job.plugin.sha256,
            started_at,
            outcome,
            message: &message,
        };
        self.finish(tx, &record).await?;
        match outcome {
            Outcome::Ok => info!(job = %name, attempt, summary = %message, "run ok"),
            _ => {
                warn!(job = %name, attempt, outcome = outcome.as_str(), error = %message, "run failed, rolled back")
            }
        }
        Ok(RunResult::Finished {
            outcome,
            message,
            attempt,
        })
    }

    /// Decides the outcome. A statement error the plugin swallowed still makes
    /// the run an error: Postgres has already aborted the transaction.
    fn judge(
        &self,
        job: &Job,
        mut invocation: Invocation,
    ) -> (Outcome, String, Option<Transaction<'static, Postgres>>) {
        let name = job.config.name.as_str();
        for line in invocation.output.lines().filter(|l| !l.trim().is_empty()) {
            info!(target: "jobhost::plugin", job = %name, stream = "stdio", "{line}");
        }
        let (tx, db_error) = invocation.handle.close();
        let (outcome, message) = match (invocation.returned, db_error) {
            (Returned::Value(Ok(report)), None) => (Outcome::Ok, report.summary),
            (Returned::Value(Ok(_)), Some(db)) => (
                Outcome::Error,
                format!(
                    "plugin returned success after a failed statement ({db}); Postgres aborted the transaction, so nothing was committed"
                ),
            ),
            (Returned::Value(Err(failure)), _) => {
                let mut m = failure.message;
                if let Some(sql) = failure.sql {
                    m.push_str(&format!(" (sql: {sql:?})"));
                }
                (Outcome::Error, m)
            }
            (Returned::Trap(trap), _) => {
                let mut m = format!("plugin trapped: {trap:#}");
                if m.contains("forcing trap when growing memory") {
                    m = format!(
                        "plugin exceeded its memory limit of {} MiB ({m})",
                        job.config.max_memory_bytes >> 20
                    );
                }
                let tail = last_lines(&invocation.output, 5);
                if !tail.is_empty() {
                    m.push_str("; output: ");
                    m.push_str(&tail);
                }
                (Outcome::Trap, m)
            }
            (Returned::Timeout, _) => (
                Outcome::Timeout,
                format!(
                    "run exceeded its timeout of {}",
                    humantime::format_duration(job.config.timeout)
                ),
            ),
        };
        (outcome, message, tx)
    }

    /// Records the run and commits (which releases the lock).
    async fn finish(
        &self,
        tx: Option<Transaction<'static, Postgres>>,
        record: &RunRecord<'_>,
    ) -> anyhow::Result<()> {
        let name = record.job;
        if let Some(mut tx) = tx {
            let attempt: anyhow::Result<()> = async {
                if record.outcome == Outcome::Ok {
                    // Back to the host's own role for its bookkeeping.
                    sqlx::query("reset role").execute(&mut *tx).await?;
                } else {
                    sqlx::query("rollback to savepoint jobhost_work")
                        .execute(&mut *tx)
                        .await?;
                }
                db::record_run(&mut tx, record).await?;
                tx.commit().await?;
                Ok(())
            }
            .await;
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // The transaction is lost (connection died, statement timed
                    // out mid-protocol, or COMMIT failed): nothing of the run
                    // survived. Record that on a fresh connection.
                    error!(job = %name, error = %format!("{e:#}"), "cannot commit the run; it was rolled back");
                    let failed = RunRecord {
                        outcome: if record.outcome == Outcome::Ok {
                            Outcome::Error
                        } else {
                            record.outcome
                        },
                        message: &format!("{} (transaction lost: {e:#})", record.message),
                        ..record.clone()
                    };
                    return self.record_detached(&failed).await;
                }
            }
        }
        self.record_detached(record).await
    }

    async fn record_detached(&self, record: &RunRecord<'_>) -> anyhow::Result<()> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .with_context(|| format!("job `{}`: cannot record the run", record.job))?;
        db::record_run(&mut conn, record)
            .await
            .with_context(|| format!("job `{}`: cannot record the run", record.job))
    }
}

async fn rollback(tx: Transaction<'static, Postgres>, job: &str) {
    if let Err(e) = tx.rollback().await {
        // The connection is gone; Postgres ends its transaction (and lock) with it.
        warn!(job = %job, error = %e, "rollback failed");
    }
}

/// Quotes an SQL identifier (`"name"`, inner quotes doubled).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
