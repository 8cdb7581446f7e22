//! The run path: one slot of one job, from BEGIN to COMMIT. Read top-down:
//!
//! 1. take a pooled connection and insert the run's `running` row (committed on
//!    its own, asynchronously, so every host's `status` shows runs in flight;
//!    see [`db::begin_run`] for why that is safe), then `BEGIN`;
//! 2. first statement: `pg_try_advisory_xact_lock(namespace, key)` with the
//!    database clock. Busy: warn `lock_busy`, skip;
//! 3. `Runner::gate`, under the lock: skip a slot the database clock has not
//!    reached (this host's clock is ahead), a slot that already succeeded on any
//!    host (the fleet-wide once-per-slot rule), a slot out of attempts or in
//!    its retry backoff; mark `running` rows of hosts that died as `lost` (one
//!    statement: [`db::slot_history`]);
//! 4. backstops (`SET LOCAL statement_timeout`, `idle_in_transaction_session_
//!    timeout`, `application_name` naming the job), `SAVEPOINT`, the job's role,
//!    in one simple query;
//! 5. lend the transaction to a fresh plugin instance and call `run`;
//! 6. success: write `ok` over the run's row in the same transaction and COMMIT,
//!    so the history can never say `ok` for work that is not there. Anything
//!    else: roll back to the savepoint, write the failure, COMMIT. Either way
//!    COMMIT (or ROLLBACK) releases the lock; there is no unlock call anywhere.
//!
//! `session` jobs (long ones) take a different lock path, in `runner/session.rs`; the
//! history checks under the lock (`Runner::check_slot`) are shared.

use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::config::JobConfig;
use crate::config::LockMode;
use crate::db::{self, Outcome, RunRecord};
use crate::guard::SqlGuard;
use crate::runtime::bindings::types::Context;
use crate::runtime::{Invocation, Lent, Plugin, Returned, RunLimits, Runtime, TxHandle};

mod session;

/// Native work for [`Runner::run_native`]: gets the run's locked transaction.
pub type NativeWork = Box<
    dyn for<'c> FnOnce(
            &'c mut sqlx::PgConnection,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<String, String>> + Send + 'c>,
        > + Send,
>;

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
    /// The slot failed `max-attempts` times; it is not tried again.
    Exhausted,
    /// The slot failed and its retry backoff has not elapsed.
    BackingOff {
        /// When the next attempt may start (database clock).
        until: DateTime<Utc>,
    },
}

/// Runs slots of jobs against the host's pool.
#[derive(Clone)]
pub struct Runner {
    pool: PgPool,
    runtime: Arc<Runtime>,
    host_id: Arc<str>,
    guard: Arc<SqlGuard>,
    abort: CancellationToken,
}

impl Runner {
    /// A runner using `pool` for every job transaction.
    pub fn new(pool: PgPool, runtime: Arc<Runtime>, host_id: &str) -> Self {
        Self {
            pool,
            runtime,
            host_id: host_id.into(),
            guard: Arc::new(SqlGuard::new()),
            abort: CancellationToken::new(),
        }
    }

    /// Interrupts every run in flight on this runner (and its clones): each
    /// rolls back and is recorded `interrupted`. Used when a shutdown's grace
    /// period is over.
    pub fn abort_in_flight(&self) {
        self.abort.cancel();
    }

    /// Runs `slot` of `job` (see the module docs for the steps).
    ///
    /// Errors are host-side failures (Postgres unreachable, the bookkeeping
    /// failed); plugin failures are a `Finished` result with their outcome.
    ///
    /// # Cancel safety
    /// Dropping the future drops the sqlx transaction, which rolls back (and so
    /// releases the lock) when its connection is next used or closed; the
    /// run's row stays `running` until the next holder marks it `lost`.
    pub async fn run(&self, job: &Job, slot: DateTime<Utc>) -> anyhow::Result<RunResult> {
        let span = info_span!("run", job = %job.config.name, slot = %slot.to_rfc3339());
        match job.config.lock {
            LockMode::Xact => self.run_xact(job, slot).instrument(span).await,
            LockMode::Session => self.run_session(job, slot).instrument(span).await,
        }
    }

    /// Runs `slot` of an `xact` job through exactly the plugin's path (lock,
    /// history checks, backstops, savepoint, record, commit) but with `work`,
    /// native Rust, in place of the plugin. Exists so benchmarks can compare
    /// the sandbox against native code on the same path.
    pub async fn run_native(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
        work: NativeWork,
    ) -> anyhow::Result<RunResult> {
        self.run_xact_with(job, slot, Some(work)).await
    }

    async fn run_xact(&self, job: &Job, slot: DateTime<Utc>) -> anyhow::Result<RunResult> {
        self.run_xact_with(job, slot, None).await
    }

    async fn run_xact_with(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
        native: Option<NativeWork>,
    ) -> anyhow::Result<RunResult> {
        let name = job.config.name.as_str();
        let mut conn = self
            .pool
            .acquire()
            .await
            .with_context(|| format!("job `{name}`: cannot get a connection"))?;
        let run_id = db::begin_run(&mut conn, name, slot, &self.host_id, &job.plugin.sha256)
            .await
            .with_context(|| format!("job `{name}`: cannot record the run's start"))?;
        let mut tx = match Transaction::begin(conn, None).await {
            Ok(tx) => tx,
            Err(e) => {
                let e = anyhow::Error::new(e)
                    .context(format!("job `{name}`: cannot begin a transaction"));
                return Err(self.fail_before_plugin(name, run_id, e).await);
            }
        };

        let attempt = match self.gate(job, slot, run_id, &mut tx).await {
            Ok(Ok(attempt)) => attempt,
            Ok(Err(skip)) => {
                // Nothing runs: drop the `running` row in the same transaction
                // (keeping any `lost` marks made under the lock) and commit,
                // which also releases the lock if we took it.
                let done: sqlx::Result<()> = async {
                    db::discard_run(&mut tx, run_id).await?;
                    tx.commit().await
                }
                .await;
                if let Err(e) = done {
                    warn!(job = %name, error = %e, "cannot close a skipped run; Postgres rolls it back");
                }
                return Ok(skip);
            }
            Err(e) => {
                drop(tx);
                return Err(self.fail_before_plugin(name, run_id, e).await);
            }
        };
        if let Err(e) = prepare(&job.config, &self.host_id, &mut tx).await {
            drop(tx);
            return Err(self.fail_before_plugin(name, run_id, e).await);
        }

        let (ctx, limits) = run_context(job, slot, attempt);
        let handle = TxHandle::new(tx, name.into(), job.config.max_rows, self.guard.clone());
        let abort = self.abort.clone();
        let invocation = if let Some(work) = native {
            let mut handle = handle;
            let returned = match handle.connection() {
                Some(conn) => Returned::Value(
                    work(conn)
                        .await
                        .map(|summary| crate::runtime::bindings::types::Report { summary })
                        .map_err(|message| crate::runtime::bindings::types::Failure {
                            message,
                            sql: None,
                        }),
                ),
                None => Returned::Trap(wasmtime::Error::msg("no transaction")),
            };
            Invocation {
                returned,
                lent: Lent::Transaction(handle),
                output: String::new(),
                output_dropped: 0,
            }
        } else {
            self.runtime
                .invoke(
                    &job.plugin,
                    ctx,
                    Lent::Transaction(handle),
                    limits,
                    &job.config.env,
                    job.config.http.clone(),
                    async move {
                        abort.cancelled().await;
                        Returned::Interrupted
                    },
                )
                .await
        };
        let (outcome, message, tx) = self.judge(job, invocation);

        let record = RunRecord {
            attempt,
            outcome,
            message: &message,
        };
        let role = job.config.role.as_deref();
        let (outcome, message) = self.finish(name, role, run_id, tx, &record).await;
        Ok(finished(name, attempt, outcome, message))
    }

    /// Takes the lock and decides, under it, whether the slot runs now.
    /// `Ok(Ok(attempt))` to run, `Ok(Err(skip))` for a skip.
    async fn gate(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
        run_id: i64,
        tx: &mut Transaction<'static, Postgres>,
    ) -> anyhow::Result<Result<i32, RunResult>> {
        let name = job.config.name.as_str();
        let key = job.config.lock_key;
        // Invariant: the lock is the first statement of the transaction the
        // plugin will use, so it is pinned to this connection and released by
        // COMMIT/ROLLBACK. The clock comes along to judge the slot by the
        // database's time, never this host's.
        let (locked, db_now): (bool, DateTime<Utc>) =
            sqlx::query_as("select pg_try_advisory_xact_lock($1, $2), clock_timestamp()")
                .bind(key.namespace)
                .bind(key.key)
                .fetch_one(&mut **tx)
                .await
                .with_context(|| format!("job `{name}`: cannot try lock {key}"))?;
        if !locked {
            warn!(job = %name, lock_key = %key, event = "lock_busy", "lock_busy: job lock held elsewhere, slot skipped");
            return Ok(Err(RunResult::LockBusy));
        }
        self.check_slot(tx, job, slot, run_id, db_now).await
    }

    /// The history checks under the job's lock, for both lock modes: the
    /// database clock must have reached the slot; runs of hosts that died are
    /// marked `lost`; a slot that succeeded, ran out of attempts or is in its
    /// retry backoff is skipped. `Ok(Ok(attempt))` to run.
    async fn check_slot(
        &self,
        conn: &mut sqlx::PgConnection,
        job: &Job,
        slot: DateTime<Utc>,
        run_id: i64,
        db_now: DateTime<Utc>,
    ) -> anyhow::Result<Result<i32, RunResult>> {
        let name = job.config.name.as_str();
        if db_now < slot {
            return Ok(Err(RunResult::NotDue { db_now }));
        }
        let (lost, state) = db::slot_history(conn, name, slot, run_id)
            .await
            .with_context(|| format!("job `{name}`: cannot read the slot's history"))?;
        if lost > 0 {
            warn!(job = %name, runs = lost, "marked runs of vanished hosts as lost");
        }
        if state.succeeded {
            return Ok(Err(RunResult::AlreadyDone));
        }
        let policy = job.config.retry;
        let failures = u32::try_from(state.failures).unwrap_or(0);
        if failures >= policy.max_attempts {
            return Ok(Err(RunResult::Exhausted));
        }
        if let Some(last) = state.last_failure
            && failures > 0
        {
            let until = last + policy.delay_after(failures);
            if until > db_now {
                return Ok(Err(RunResult::BackingOff { until }));
            }
        }
        Ok(Ok(state.attempts + 1))
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
        if invocation.output_dropped > 0 {
            warn!(target: "jobhost::plugin", job = %name, dropped_bytes = invocation.output_dropped, "plugin output truncated: stdout/stderr past the per-run cap was dropped");
        }
        let (tx, db_error) = match &mut invocation.lent {
            Lent::Transaction(handle) => handle.close(),
            // Each session transaction stood on its own; none is left to judge.
            Lent::Session(_) => (None, None),
        };
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
            (Returned::LockLost, _) => (
                Outcome::LockLost,
                "lock lost: the job's lock connection failed, so another host may take the lock; the run was interrupted and its open transaction rolled back".to_owned(),
            ),
            (Returned::Interrupted, _) => (
                Outcome::Interrupted,
                "interrupted: the host shut down and the run outlived the grace period".to_owned(),
            ),
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

    /// Writes the outcome over the run's row and commits (which releases the
    /// lock). If the transaction is lost, records the failure on a fresh
    /// connection: nothing of the run survived. Returns what was recorded.
    async fn finish(
        &self,
        name: &str,
        role: Option<&str>,
        run_id: i64,
        tx: Option<Transaction<'static, Postgres>>,
        record: &RunRecord<'_>,
    ) -> (Outcome, String) {
        if let Some(mut tx) = tx {
            let attempt: sqlx::Result<()> = async {
                if record.outcome == Outcome::Ok {
                    if role.is_some() {
                        // Back to the host's own role for its bookkeeping.
                        sqlx::query("reset role").execute(&mut *tx).await?;
                    }
                } else {
                    sqlx::query("rollback to savepoint jobhost_work")
                        .execute(&mut *tx)
                        .await?;
                }
                db::finish_run(&mut tx, run_id, record).await?;
                tx.commit().await
            }
            .await;
            let e = match attempt {
                Ok(()) => return (record.outcome, record.message.to_owned()),
                Err(e) => e,
            };
            error!(job = %name, error = %e, "cannot commit the run; Postgres rolled it back");
            let outcome = if record.outcome == Outcome::Ok {
                Outcome::Error
            } else {
                record.outcome
            };
            let message = format!("{} (transaction lost: {e})", record.message);
            let failed = RunRecord {
                outcome,
                message: &message,
                ..record.clone()
            };
            self.record_detached(name, run_id, &failed).await;
            return (outcome, message);
        }
        self.record_detached(name, run_id, record).await;
        (record.outcome, record.message.to_owned())
    }

    /// Records a failure that happened before the plugin ran; returns the error.
    async fn fail_before_plugin(&self, name: &str, run_id: i64, e: anyhow::Error) -> anyhow::Error {
        let message = format!("host-side failure before the plugin ran: {e:#}");
        let record = RunRecord {
            attempt: 0,
            outcome: Outcome::Error,
            message: &message,
        };
        self.record_detached(name, run_id, &record).await;
        e
    }

    /// Writes a run's outcome on a fresh pooled connection. Failures are
    /// logged: the row then stays `running` until the next lock holder marks
    /// it `lost`.
    async fn record_detached(&self, name: &str, run_id: i64, record: &RunRecord<'_>) {
        let result = async {
            let mut conn = self.pool.acquire().await?;
            db::finish_run(&mut conn, run_id, record).await
        }
        .await;
        if let Err(e) = result {
            error!(job = %name, run_id, error = %e, "cannot record the run's outcome");
        }
    }

    /// The earliest slot `job` has any record of.
    pub async fn first_slot(&self, job: &Job) -> sqlx::Result<Option<DateTime<Utc>>> {
        db::first_slot(&self.pool, &job.config.name).await
    }

    /// Slots of `job` at or after `since` that already succeeded (any host).
    pub async fn succeeded_slots(
        &self,
        job: &Job,
        since: DateTime<Utc>,
    ) -> sqlx::Result<Vec<DateTime<Utc>>> {
        db::succeeded_slots(&self.pool, &job.config.name, since).await
    }
}

/// Logs a finished run and makes its result.
fn finished(job: &str, attempt: i32, outcome: Outcome, message: String) -> RunResult {
    match outcome {
        Outcome::Ok => info!(job = %job, attempt, summary = %message, "run ok"),
        _ => warn!(job = %job, attempt, outcome = outcome.as_str(), error = %message, "run failed"),
    }
    RunResult::Finished {
        outcome,
        message,
        attempt,
    }
}

/// What the plugin is told about its run, and the run's limits.
fn run_context(job: &Job, slot: DateTime<Utc>, attempt: i32) -> (Context, RunLimits) {
    let ctx = Context {
        job: job.config.name.clone(),
        slot: slot.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
        config: job.config.config.clone(),
    };
    let limits = RunLimits {
        timeout: job.config.timeout,
        max_memory_bytes: job.config.max_memory_bytes,
    };
    (ctx, limits)
}

/// Why a plugin cannot serve a job: its world must match the lock mode.
pub fn check_plugin_kind(config: &JobConfig, plugin: &Plugin) -> Result<(), String> {
    use crate::runtime::PluginKind;
    match (config.lock, plugin.kind) {
        (LockMode::Xact, PluginKind::Xact) | (LockMode::Session, PluginKind::Session) => Ok(()),
        (LockMode::Xact, PluginKind::Session) => Err(format!(
            "plugin `{}` is a session (long) job: set lock = \"session\"",
            plugin.path.display()
        )),
        (LockMode::Session, PluginKind::Xact) => Err(format!(
            "plugin `{}` is an xact job (one lent transaction): set lock = \"xact\"",
            plugin.path.display()
        )),
    }
}

/// Backstops, savepoint and role for the plugin's part of the transaction,
/// sent as one simple query: one round trip instead of three or four on a
/// path every run takes.
async fn prepare(
    job: &JobConfig,
    host_id: &str,
    tx: &mut Transaction<'static, Postgres>,
) -> anyhow::Result<()> {
    let name = job.name.as_str();
    let timeout_ms = job.timeout.as_millis().max(1);
    // No statement outlives the run; a host that hangs mid-transaction is cut
    // off by Postgres (ending the transaction and so the lock) a little after
    // the run's own budget.
    let idle_ms = timeout_ms + 5_000;
    let app = truncate_utf8(&format!("{}/{name}", db::application_name(host_id)), 63);
    let mut sql = format!(
        "set local statement_timeout = {timeout_ms};
         set local idle_in_transaction_session_timeout = {idle_ms};
         set local application_name = {};
         savepoint jobhost_work",
        db::quote_literal(&app)
    );
    if let Some(role) = &job.role {
        // After the savepoint, so rolling back to it also drops the role.
        sql.push_str(";\n         ");
        sql.push_str(&db::set_local_role_sql(role));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut **tx)
        .await
        .with_context(|| match &job.role {
            Some(role) => {
                format!("job `{name}`: cannot set the run's backstops, savepoint and role `{role}`")
            }
            None => format!("job `{name}`: cannot set the run's backstops and savepoint"),
        })?;
    Ok(())
}

pub(crate) fn truncate_utf8(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
