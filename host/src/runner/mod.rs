//! The run path: one slot of one job, from BEGIN to COMMIT. Read top-down
//! (`Runner::run` → `open` → the plugin → `close`):
//!
//! 0. if another live host is the job's preferred one, wait `fleet-defer`
//!    first ([`crate::hosts::LiveHosts`]), then skip the slot if it
//!    succeeded meanwhile, asked in a batch with other deferred slots
//!    (`deferred.rs`);
//! 1. one simple query on a pooled connection opens the run
//!    ([`crate::tx::OpenTx`]): `BEGIN` with the run's deadline
//!    (`statement_timeout`, `idle_in_transaction_session_timeout`), so the
//!    lock is bounded from the instant it is granted; then the gate,
//!    `jobhost.slot_gate` ([`db::slot_gate_sql`]):
//!    `pg_try_advisory_xact_lock(namespace, key)` with the database clock
//!    and, under the lock, the slot's history (runs of dead hosts recorded
//!    `lost` on the way) and the run's id; then `application_name` naming
//!    the run, `SAVEPOINT`, the job's role;
//! 2. `Runner::decide`: skip when the lock is busy (a DEBUG `lock_busy`
//!    event), when the database clock has not reached the slot (this host's
//!    clock is ahead), for a paused job, a slot that already succeeded on any
//!    host (the fleet-wide once-per-slot rule), a slot out of attempts or in
//!    its retry backoff. A skip commits (keeping what the gate recorded), in
//!    one round trip;
//! 3. the run enters this host's in-flight set, which is published in batches
//!    ([`crate::in_flight`]); lend the transaction to a fresh plugin instance
//!    and call `run`;
//! 4. one closing query ([`crate::hygiene`]): success → the session check
//!    (raises if the plugin left anything on the connection), the run's `ok`
//!    row, COMMIT, the post-commit check; anything else → roll back to the
//!    savepoint, the run's failure row, COMMIT. The history can never say
//!    `ok` for work that is not there, and COMMIT releases the lock; there is
//!    no unlock call anywhere. A run cut off mid-flight (timeout, shutdown)
//!    has its connection closed instead and is recorded on a fresh one.
//!
//! A run is two round trips and one transaction, and writes one row (the
//! pools lend a connection that went from run to run without a round trip
//! to check it: [`crate::pools::pool_options`]).
//!
//! `session` jobs (long ones) take a different lock path, in
//! `runner/session.rs`; the history checks under the lock
//! (`Runner::check_slot`, `Runner::decide`) are shared.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::config::{JobConfig, LockMode, Pooler};
use crate::db::{self, Outcome, RunRecord};
use crate::guard::SqlGuard;
use crate::hosts::Liveness;
use crate::hygiene;
use crate::in_flight::InFlight;
use crate::metrics::Metrics;
use crate::runtime::bindings::types::Context;
use crate::runtime::{
    Closed, Invocation, Lent, Plugin, Returned, RunLimits, Runtime, Spent, TrapReport, TxHandle,
};
use crate::tx::OpenTx;

mod deferred;
#[cfg(feature = "bench")]
mod native;
mod session;

pub use deferred::Confirmations;

#[cfg(feature = "bench")]
pub use native::NativeWork;

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
        /// When the slot may be tried again, if it failed and has attempts
        /// left (counted as the gate counts them: failures of the job's own
        /// doing against `max-attempts`).
        retry_in: Option<std::time::Duration>,
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
    /// The job is paused fleet-wide (`jobhost pause`); nothing ran.
    Paused,
    /// The slot failed and its retry backoff has not elapsed.
    BackingOff {
        /// When the next attempt may start (database clock).
        until: DateTime<Utc>,
    },
}

/// Runs slots of jobs against the host's pool.
#[derive(Clone)]
pub struct Runner {
    /// The host's pool, for its own statements outside runs.
    pool: PgPool,
    /// The connections runs take: one pool per job role, within one budget.
    runs: crate::pools::RunPools,
    runtime: Arc<Runtime>,
    host_id: Arc<str>,
    guard: Arc<SqlGuard>,
    abort: CancellationToken,
    liveness: Liveness,
    in_flight: InFlight,
    /// Session settings a fresh connection carries (`name=value`), which the
    /// post-run check takes as the connection's own, and the fingerprints of
    /// the settings of sessions the check found clean.
    session_baseline: hygiene::Baseline,
    metrics: Arc<Metrics>,
    /// How to open a connection that is one real server session (for
    /// `session` locks); `None` behind a transaction pooler without a direct
    /// URL.
    direct: Option<PgConnectOptions>,
    /// What the pool leads to.
    pooler: Pooler,
    /// The fleet's live hosts, for the preferred-host deferral.
    live: crate::hosts::LiveHosts,
    /// Deferred slots' "already done?", batched (with live hosts only).
    confirmations: Option<deferred::Confirmations>,
    /// Jobs whose latest gate here skipped the slot (see
    /// [`run_xact`](Self::run_xact)).
    skipping: Arc<std::sync::Mutex<HashSet<String>>>,
}

impl Runner {
    /// A runner using `pool` for every job transaction, judging other hosts'
    /// liveness with the default [`Liveness`].
    pub fn new(pool: PgPool, runtime: Arc<Runtime>, host_id: &str) -> Self {
        Self {
            runtime,
            host_id: host_id.into(),
            guard: Arc::new(SqlGuard::new()),
            abort: CancellationToken::new(),
            liveness: Liveness::default(),
            in_flight: InFlight::default(),
            session_baseline: hygiene::Baseline::default(),
            metrics: Arc::default(),
            direct: Some((*pool.connect_options()).clone()),
            runs: crate::pools::RunPools::over(pool.clone()),
            pool,
            pooler: Pooler::None,
            live: crate::hosts::LiveHosts::new(std::time::Duration::ZERO),
            confirmations: None,
            skipping: Arc::default(),
        }
    }

    /// Lets a job's preferred host try each slot first (see
    /// [`crate::hosts::LiveHosts`]); the view is the heartbeat's. A deferred
    /// slot is first checked in a batch ([`Confirmations`]). Needs a tokio
    /// runtime.
    pub fn with_live_hosts(mut self, live: crate::hosts::LiveHosts) -> Self {
        self.live = live;
        self.confirmations = Some(deferred::Confirmations::start(self.pool.clone()));
        self
    }

    /// Where `session` locks are taken (`direct`, see
    /// [`db::Connected::direct`]) and what the pool leads to.
    pub fn with_connections(mut self, direct: Option<PgConnectOptions>, pooler: Pooler) -> Self {
        self.direct = direct;
        self.pooler = pooler;
        self
    }

    /// Takes run connections from `runs` (from [`db::connect`], whose role
    /// pools carry the host's URL and adjustments) instead of pools made
    /// from the host pool's options.
    pub fn with_run_pools(mut self, runs: crate::pools::RunPools) -> Self {
        self.runs = runs;
        self
    }

    /// The pools this runner's runs take connections from (to admit job
    /// roles through: [`crate::roles::Admitted::admit`]).
    pub fn run_pools(&self) -> &crate::pools::RunPools {
        &self.runs
    }

    /// Records into `metrics` (the host's, served at `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.session_baseline = self.session_baseline.counting(metrics.settings_checks());
        self.metrics = metrics;
        self
    }

    /// Settings a fresh connection of the pool already carries at session
    /// level (see [`db::Connected::session_baseline`]).
    pub fn with_session_baseline(mut self, baseline: Vec<String>) -> Self {
        self.session_baseline =
            hygiene::Baseline::new(baseline).counting(self.metrics.settings_checks());
        self
    }

    /// Judges other hosts dead after `liveness.lost_after` without a heartbeat.
    pub fn with_liveness(mut self, liveness: Liveness) -> Self {
        self.liveness = liveness;
        self
    }

    /// What this runner's checks take for a clean session (with the
    /// fingerprints its runs taught it).
    pub fn session_baseline(&self) -> &hygiene::Baseline {
        &self.session_baseline
    }

    /// This runner's runs in flight (for the host heartbeat).
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.clone()
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
    /// Dropping the future drops the run's transaction, which closes its
    /// connection (Postgres rolls back and releases the lock; see
    /// [`OpenTx`]), and takes the run out of the host's in-flight set as
    /// abandoned, so the host's next publication records it `lost`.
    pub async fn run(&self, job: &Job, slot: DateTime<Utc>) -> anyhow::Result<RunResult> {
        // Boxed: a run's future holds the plugin's instantiation, the
        // opening query and the call at once (~13 KB). Unboxed, `around`
        // and every caller's loop would carry copies of it inline (the
        // scheduler's per-job task was ~40 KB), each moved by memcpy when
        // a run starts.
        let body = Box::pin(async {
            match job.config.lock {
                LockMode::Xact => self.run_xact(job, slot).await,
                LockMode::Session => self.run_session(job, slot).await,
            }
        });
        self.around(job, slot, body).await
    }

    /// What every run goes through around its `body`: the preferred host's
    /// head start, the run's span, its metrics. (The benchmark's native twin
    /// goes through it too, so that it differs from a plugin's run by the
    /// sandbox alone.)
    pub(crate) async fn around(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
        body: impl Future<Output = anyhow::Result<RunResult>>,
    ) -> anyhow::Result<RunResult> {
        let started = std::time::Instant::now();
        // Not this job's preferred host: let that one go first, then skip the
        // slot without opening a run if it succeeded meanwhile.
        let wait = self.live.wait_before(&job.config.name, &self.host_id);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            if let Some(c) = &self.confirmations
                && c.succeeded(&job.config.name, slot).await
            {
                let result = RunResult::AlreadyDone;
                self.metrics
                    .observe(&job.config.name, &result, started.elapsed());
                return Ok(result);
            }
        }
        // What every event of the run carries (and a JSON log shows).
        let span = info_span!(
            "run",
            job = %job.config.name,
            slot = %slot.to_rfc3339(),
            host = %self.host_id,
            lock_key = %job.config.lock_key,
            run_id = tracing::field::Empty,
        );
        let result = body.instrument(span).await;
        if let Ok(r) = &result {
            self.metrics.observe(&job.config.name, r, started.elapsed());
        }
        result
    }

    /// An `xact` run: [open](Self::open) (lock, gate, scope) while the
    /// plugin is instantiated, lend the transaction to the instance,
    /// [close](Self::close) (judge, verify, record, commit).
    async fn run_xact(&self, job: &Job, slot: DateTime<Utc>) -> anyhow::Result<RunResult> {
        let name = job.config.name.as_str();
        let slot_text = slot_text(slot);
        let instantiate = || {
            self.runtime.instantiate(
                &job.plugin,
                (name, &slot_text),
                run_limits(job),
                &job.config.env,
                job.config.http.clone(),
            )
        };
        // Instantiating needs nothing of the run's transaction: it is done
        // while the opening query is on the wire, so it neither delays the
        // run nor lengthens the job's lock. A skipped slot drops that
        // instance unused, so a job whose latest slot was skipped here
        // (paused, backing off, run by another host) is instantiated only
        // once its gate lets the run through: a job that keeps skipping does
        // not make an instance per tick (milliseconds for a Python plugin).
        let early = !self.skipped_last(name);
        let alongside = async {
            match early {
                true => Some(instantiate().await),
                false => None,
            }
        };
        let opened = self.open(job, slot, alongside).await?;
        self.note_skipped(name, opened.is_err());
        let (opened, instance) = match opened {
            Ok((opened, Some(instance))) => (opened, instance),
            Ok((opened, None)) => (opened, instantiate().await),
            Err(skip) => return Ok(skip),
        };
        let ctx = run_context(job, slot, opened.run.go.attempt);
        let abort = self.abort.clone();
        let invocation = self
            .runtime
            .call(
                instance,
                &job.plugin.path,
                ctx,
                Lent::Transaction(opened.handle),
                async move {
                    abort.cancelled().await;
                    Returned::Interrupted
                },
            )
            .await;
        Ok(self.close(job, opened.run, invocation).await)
    }

    /// Whether `job`'s latest gate here skipped its slot.
    fn skipped_last(&self, job: &str) -> bool {
        self.skipping().contains(job)
    }

    /// Remembers whether `job`'s gate just skipped its slot.
    fn note_skipped(&self, job: &str, skipped: bool) {
        let mut skipping = self.skipping();
        match skipped {
            true if !skipping.contains(job) => {
                skipping.insert(job.to_owned());
            }
            true => {}
            false => {
                skipping.remove(job);
            }
        }
    }

    fn skipping(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // Single insert/remove calls cannot leave the set inconsistent, so a
        // poisoned lock is safe to reuse.
        self.skipping.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Steps 1–3 of an `xact` run: BEGIN with the deadline, the gate (lock,
    /// history, run id), the scope. `Ok(Err(skip))` when the slot does not
    /// run now; otherwise the transaction, wrapped for lending, and what
    /// `alongside` made: it runs once the run holds a connection, while the
    /// opening query is on the wire.
    pub(crate) async fn open<A: Future>(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
        alongside: A,
    ) -> anyhow::Result<Result<(Opened, A::Output), RunResult>> {
        let name = job.config.name.as_str();
        let key = job.config.lock_key;
        let role = job.config.role.as_deref();
        let conn = self.runs.acquire(role).await.with_context(|| match role {
            Some(role) => format!("job `{name}`: cannot get a connection as its role `{role}`"),
            None => format!("job `{name}`: cannot get a connection"),
        })?;
        let setup = self.opening_sql(job, slot);
        let (opened, made) =
            tokio::join!(OpenTx::begin_fetch(conn, &setup, self.pooler), alongside);
        let opened = match opened {
            // A transaction whose gate cannot be read is dropped here, which
            // closes its connection (Postgres rolls back, the lock goes).
            Ok((tx, rows)) => rows
                .first()
                .ok_or(sqlx::Error::RowNotFound)
                .and_then(db::SlotGate::from_row)
                .map(|gate| (tx, gate))
                .with_context(|| format!("job `{name}`: cannot read lock {key}'s gate")),
            Err(e) => {
                let role = match role {
                    Some(role) => format!(", as role `{role}`"),
                    None => String::new(),
                };
                Err(anyhow::Error::new(e).context(format!(
                    "job `{name}`: cannot open the run (lock {key}, history, savepoint{role})"
                )))
            }
        };
        // What `alongside` made is dropped, on every way out but the run's,
        // before the connection goes back or a fresh one is asked for.
        let (tx, gate) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                drop(made);
                return Err(self.fail_before_plugin(&self.run_row(job, slot), e).await);
            }
        };
        // The row of a run as the job's role is written with its token.
        let decided = self
            .decide(job, slot, gate)
            .and_then(|decided| match decided {
                Ok(go) if role.is_some() && go.run_token.is_none() => Err(anyhow::anyhow!(
                    "job `{name}`: the gate drew no token for a run as the job's role"
                )),
                decided => Ok(decided),
            });
        let decided = match decided {
            Ok(decided) => decided,
            Err(e) => {
                drop((made, tx));
                return Err(self.fail_before_plugin(&self.run_row(job, slot), e).await);
            }
        };
        let go = match decided {
            Ok(go) => go,
            Err(skip) => {
                drop(made);
                // Nothing runs. COMMIT keeps what the gate recorded under the
                // lock (runs of dead hosts `lost`) and releases the lock if
                // it was taken; the scope ends with the transaction.
                if let Err(e) = tx.end("commit").await {
                    warn!(job = %name, error = %e, "cannot close a skipped run; Postgres rolls it back");
                }
                return Ok(Err(skip));
            }
        };
        let opened = Opened {
            run: self.enter(job, slot, go),
            handle: TxHandle::new(tx, name.into(), job.config.max_rows, self.guard.clone()),
        };
        Ok(Ok((opened, made)))
    }

    /// What an `xact` run of `job` at `slot` sends after `BEGIN`, in the
    /// same simple query: one round trip opens the run. First the deadline
    /// (so the lock, taken next, is bounded by the server from the instant
    /// it is granted), then the lock and the history under it
    /// (`jobhost.slot_gate`, whose statements each see what committed before
    /// they started), then the run's name and savepoint. Public for the
    /// benchmark's floor, which sends exactly this without a runner.
    pub fn opening_sql(&self, job: &Job, slot: DateTime<Utc>) -> String {
        let timeout_ms = job.config.timeout.as_millis().max(1);
        format!(
            "{};\n{};\n{}",
            db::backstops_sql(timeout_ms),
            db::slot_gate_sql(
                &job.config.name,
                slot,
                &self.host_id,
                self.liveness.lost_after,
                Some(job.config.lock_key),
                job.config.role.is_some(),
            ),
            scope_sql(&job.config, &self.host_id),
        )
    }

    /// A run past its gate enters the host's in-flight set, under the id its
    /// gate drew.
    fn enter(&self, job: &Job, slot: DateTime<Utc>, go: Go) -> OpenRun {
        tracing::Span::current().record("run_id", go.run_id);
        let row = db::RunRow {
            started_at: Some(go.started_at),
            backend_pid: Some(go.backend_pid),
            ..self.run_row(job, slot)
        };
        OpenRun {
            in_flight: self.in_flight.enter(go.run_id, &row, go.attempt),
            row,
            go,
        }
    }

    /// What a run of `job` at `slot` on this host is, before its gate.
    fn run_row(&self, job: &Job, slot: DateTime<Utc>) -> db::RunRow {
        db::RunRow {
            job: job.config.name.clone(),
            slot,
            host_id: self.host_id.to_string(),
            plugin_sha256: job.plugin.sha256.clone(),
            started_at: None,
            backend_pid: None,
        }
    }

    /// A `session` run's first step: skip without opening a server session
    /// if the job's lock is held elsewhere right now or the slot already
    /// succeeded ([`db::precheck`]).
    async fn precheck(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
    ) -> anyhow::Result<Result<(), RunResult>> {
        let name = job.config.name.as_str();
        let key = job.config.lock_key;
        let mut conn = self
            .pool
            .acquire()
            .await
            .with_context(|| format!("job `{name}`: cannot get a connection"))?;
        let found = db::precheck(&mut conn, self.pooler, name, slot, key)
            .await
            .with_context(|| format!("job `{name}`: cannot check lock {key} and the slot"))?;
        Ok(match found {
            db::Precheck::Free => Ok(()),
            db::Precheck::LockHeld => {
                // Losing the race for a slot is the normal case in a fleet.
                debug!(job = %name, lock_key = %key, event = "lock_busy", "lock_busy: job lock held elsewhere, slot skipped");
                Err(RunResult::LockBusy)
            }
            db::Precheck::SlotDone => Err(RunResult::AlreadyDone),
        })
    }

    /// Step 4 of an `xact` run: judge what the body did, verify the
    /// connection, record, commit; returns the run's result.
    pub(crate) async fn close(
        &self,
        job: &Job,
        run: OpenRun,
        mut invocation: Invocation,
    ) -> RunResult {
        let spent = invocation.spent.take();
        let judged = self.judge(job, invocation);
        let record = RunRecord {
            attempt: run.go.attempt,
            outcome: judged.outcome,
            message: &judged.message,
        };
        let (outcome, message, written) =
            self.finish(job, &run, judged.closed, &record, spent).await;
        if written {
            run.in_flight.recorded();
        }
        finished(job, run.go, outcome, message)
    }

    /// The history checks for a caller holding the job's lock on `conn` (a
    /// `session` run's lock connection, whose lock query read `db_now`): see
    /// [`decide`](Self::decide). `Ok(Ok(attempt))` to run.
    async fn check_slot(
        &self,
        conn: &mut sqlx::PgConnection,
        job: &Job,
        slot: DateTime<Utc>,
        db_now: DateTime<Utc>,
    ) -> anyhow::Result<Result<Go, RunResult>> {
        let name = job.config.name.as_str();
        let mut gate = db::slot_history(conn, name, slot, &self.host_id, self.liveness.lost_after)
            .await
            .with_context(|| format!("job `{name}`: cannot read the slot's history"))?;
        gate.db_now = db_now;
        self.decide(job, slot, gate)
    }

    /// Whether the slot runs now, from what the gate read under the job's
    /// lock, for both lock modes: the lock must be held, the database clock
    /// must have reached the slot; a paused job, a slot that succeeded, ran
    /// out of attempts or is in its retry backoff is skipped. `Ok(Ok(go))`
    /// to run.
    fn decide(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
        gate: db::SlotGate,
    ) -> anyhow::Result<Result<Go, RunResult>> {
        let name = job.config.name.as_str();
        if !gate.locked {
            // Losing the race for a slot is the normal case in a fleet.
            debug!(job = %name, lock_key = %job.config.lock_key, event = "lock_busy", "lock_busy: job lock held elsewhere, slot skipped");
            return Ok(Err(RunResult::LockBusy));
        }
        let db_now = gate.db_now;
        let Some(history) = gate.history.filter(|_| db_now >= slot) else {
            return Ok(Err(RunResult::NotDue { db_now }));
        };
        let state = history.state;
        if history.lost > 0 {
            warn!(job = %name, runs = history.lost, "recorded runs of vanished hosts as lost");
        }
        if state.paused {
            debug!(job = %name, event = "paused", "slot skipped: the job is paused");
            return Ok(Err(RunResult::Paused));
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
        let run_id = history.run_id.with_context(|| {
            format!("job `{name}`: the gate drew no run id for a slot it let through")
        })?;
        let run_token = history.run_token;
        let lag = (db_now - slot).to_std().unwrap_or_default();
        self.metrics.observe_start_lag(name, lag.as_secs_f64());
        Ok(Ok(Go {
            attempt: state.attempts + 1,
            failures,
            run_id,
            run_token,
            backend_pid: history.backend_pid,
            started_at: db_now,
        }))
    }

    /// A run whose plugin left state on its connection: the structured
    /// event, and the counter an operator alerts on.
    fn leak(&self, job: &str, what: &str, before_commit: bool) {
        hygiene::log_leak(job, what, before_commit);
        self.metrics.leaked(job, before_commit);
    }

    /// Decides the outcome. A statement error the plugin swallowed still makes
    /// the run an error: Postgres has already aborted the transaction.
    fn judge(&self, job: &Job, mut invocation: Invocation) -> Judged {
        let name = job.config.name.as_str();
        for line in invocation.output.lines().filter(|l| !l.trim().is_empty()) {
            info!(target: "jobhost::plugin", job = %name, stream = "stdio", "{line}");
        }
        if invocation.output_dropped > 0 {
            warn!(target: "jobhost::plugin", job = %name, dropped_bytes = invocation.output_dropped, "plugin output truncated: stdout/stderr past the per-run cap was dropped");
        }
        let (closed, db_error, leaked) = match &mut invocation.lent {
            Lent::Transaction(handle) => {
                let mut closed = handle.close();
                let db_error = closed.db_error.take();
                (Some(closed), db_error, None)
            }
            // Each session transaction stood on its own; none is left to
            // judge, but a commit may have found the plugin's leftovers
            // (before its COMMIT, refusing it, or after it; the session handle
            // has logged which).
            Lent::Session(session) => (None, None, session.leaked()),
        };
        if let Some((_, before_commit)) = &leaked {
            self.metrics.leaked(name, *before_commit);
        }
        let (outcome, message) = match (invocation.returned, db_error) {
            (Returned::Value(_), _) if leaked.is_some() => (
                Outcome::Error,
                format!(
                    "{}: the plugin left state on a connection that would outlive the run; that transaction was rolled back and the connection closed",
                    leaked.map(|(what, _)| what).unwrap_or_default()
                ),
            ),
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
                let report = TrapReport::new(&trap, &invocation.output, invocation.last_error.as_deref());
                if let Some(backtrace) = &report.backtrace {
                    debug!(target: "jobhost::plugin", job = %name, %backtrace, "plugin trapped");
                }
                let mut m = report.message();
                if m.contains(crate::runtime::MEMORY_LIMIT_TRAP) {
                    m = format!(
                        "plugin exceeded its memory limit of {} MiB ({m})",
                        job.config.max_memory_bytes >> 20
                    );
                }
                let tail = last_lines(&invocation.output, 5);
                if report.guest.is_none() && !tail.is_empty() {
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
        Judged {
            outcome,
            message,
            closed,
        }
    }

    /// Ends an `xact` run: writes the run's row and commits (which releases
    /// the lock), proving the connection clean on the way
    /// ([`crate::hygiene`]). A run cut off mid-flight has its connection
    /// closed instead, and is recorded on a fresh one: nothing of it survived.
    /// Returns what was recorded, and whether the run's row was written.
    ///
    /// The plugin's instance (`spent`) is torn down once the commit is
    /// answered, before the run's connection goes back to the pool and before
    /// any fresh connection is asked for: the lock is not held for the
    /// teardown, and no instance outlives the connection that admitted it.
    async fn finish(
        &self,
        job: &Job,
        run: &OpenRun,
        closed: Option<Closed>,
        record: &RunRecord<'_>,
        spent: Option<Spent>,
    ) -> (Outcome, String, bool) {
        let name = job.config.name.as_str();
        let id = Some(run.go.run_id);
        let Some(Closed {
            tx: Some(mut tx),
            local_settings,
            touched,
            ..
        }) = closed
        else {
            drop(spent);
            let written = self.record_detached(id, &run.row, record).await;
            return (record.outcome, record.message.to_owned(), written);
        };
        if matches!(
            record.outcome,
            Outcome::Timeout | Outcome::Interrupted | Outcome::LockLost
        ) {
            // The plugin may have been cut off inside a statement: never send
            // another one on that connection.
            drop(spent);
            tx.abandon();
            let written = self.record_detached(id, &run.row, record).await;
            return (record.outcome, record.message.to_owned(), written);
        }
        let run_outcome = record.outcome;
        let row_sql = db::record_sql(run.go.run_id, run.go.run_token, &run.row, record);
        let closing = if run_outcome == Outcome::Ok {
            hygiene::commit_ok_sql(
                &job.config,
                touched,
                &self.session_baseline,
                &local_settings,
                &row_sql,
            )
        } else {
            hygiene::commit_failure_sql(&row_sql)
        };
        // Settings after COMMIT only where a plugin's SET LOCAL masked them
        // before it; a rollback to the savepoint reverts them anyway.
        let check = if run_outcome == Outcome::Ok {
            hygiene::after_commit(touched, &local_settings)
        } else {
            hygiene::after_commit(touched, &[])
        };
        let finished = tx.finish(&closing, check, &self.session_baseline).await;
        drop(spent);
        let e = match finished {
            Ok(leftovers) => {
                if let Some(left) = leftovers {
                    // Only what a COMMIT kept can get here (the check before it
                    // passed, or the run had failed anyway): the work stands as
                    // recorded, the connection is closed.
                    self.leak(name, &left, false);
                }
                return (run_outcome, record.message.to_owned(), true);
            }
            Err(e) => e,
        };
        // The transaction is still there, aborted, when the closing query of
        // an `ok` run failed before its COMMIT: the check found a leak, or the
        // plugin's deferred constraints and triggers, fired before the check,
        // raised. Either way the run failed and its work is rolled back to the
        // savepoint; its row is written on the same connection.
        let refused = match hygiene::leaked(&e) {
            Some(leak) => {
                self.leak(name, &leak, true);
                Some(format!(
                    "{leak}: the plugin left state on its connection that would outlive the run; its work was rolled back and the connection closed"
                ))
            }
            None if run_outcome == Outcome::Ok => e.as_database_error().map(|db| {
                let code = db.code().unwrap_or_default();
                // JH003 is the run's own row refused to the job's role (no
                // host claims the role for the job any more), not the plugin.
                let by = if code == "JH003" {
                    "the run's row was refused to the job's role"
                } else {
                    "raised at the end of the run by the plugin's deferred constraints or triggers"
                };
                format!(
                    "SQLSTATE {code}: {} ({by}; its work was rolled back)",
                    db.message()
                )
            }),
            None => None,
        };
        if let Some(message) = refused {
            let failed = RunRecord {
                outcome: Outcome::Error,
                message: &message,
                ..record.clone()
            };
            let closing = hygiene::commit_failure_sql(&db::record_sql(
                run.go.run_id,
                run.go.run_token,
                &run.row,
                &failed,
            ));
            let written = match tx
                .finish(
                    &closing,
                    hygiene::AfterCommit::Light,
                    &self.session_baseline,
                )
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    error!(job = %name, error = %e, "cannot record the run on its connection");
                    drop(tx);
                    self.record_detached(id, &run.row, &failed).await
                }
            };
            return (Outcome::Error, message, written);
        }
        drop(tx);
        error!(job = %name, error = %e, "cannot commit the run; Postgres rolled it back");
        let outcome = if run_outcome == Outcome::Ok {
            Outcome::Error
        } else {
            run_outcome
        };
        let message = format!("{} (transaction lost: {e})", record.message);
        let failed = RunRecord {
            outcome,
            message: &message,
            ..record.clone()
        };
        let written = self.record_detached(id, &run.row, &failed).await;
        (outcome, message, written)
    }

    /// Records a failure that happened before the plugin ran, before its
    /// gate drew an id (a fresh one is drawn); returns the error.
    async fn fail_before_plugin(&self, row: &db::RunRow, e: anyhow::Error) -> anyhow::Error {
        let message = format!("host-side failure before the plugin ran: {e:#}");
        let record = RunRecord {
            attempt: 0,
            outcome: Outcome::Error,
            message: &message,
        };
        self.record_detached(None, row, &record).await;
        e
    }

    /// Writes a run's row on a fresh pooled connection. A failure is logged
    /// and returned: a run whose row could not be written leaves the in-flight
    /// set abandoned, and its publication records it `lost`.
    async fn record_detached(
        &self,
        id: Option<i64>,
        row: &db::RunRow,
        record: &RunRecord<'_>,
    ) -> bool {
        let result = async {
            let mut conn = self.pool.acquire().await?;
            db::finish_run(&mut conn, id, row, record).await
        }
        .await;
        if let Err(e) = &result {
            error!(job = %row.job, run_id = ?id, error = %e, "cannot record the run's outcome");
        }
        result.is_ok()
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

/// What [`Runner::judge`] decided.
struct Judged {
    outcome: Outcome,
    message: String,
    /// The lent transaction, taken back (`xact` runs).
    closed: Option<Closed>,
}

/// An `xact` run past its gate: the bookkeeping [`Runner::close`] needs, and
/// the transaction to lend.
pub(crate) struct Opened {
    pub(crate) run: OpenRun,
    pub(crate) handle: TxHandle,
}

/// A run in flight: its row, its attempt, its place in the in-flight set.
pub(crate) struct OpenRun {
    row: db::RunRow,
    go: Go,
    in_flight: crate::in_flight::InFlightGuard,
}

/// The gate's answer for a slot that runs now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Go {
    /// This attempt's number (every earlier attempt counts).
    pub(crate) attempt: i32,
    /// Earlier failures of the job's own doing (these count against
    /// `max-attempts`).
    failures: u32,
    /// The run's id, drawn by the gate.
    run_id: i64,
    /// What lets the run's row be written on a connection that logs in as
    /// the job's role (see [`db::RunToken`]); `None` on the host's own.
    run_token: Option<db::RunToken>,
    /// The backend the gate ran on.
    backend_pid: i32,
    /// When the gate let it through (database clock).
    started_at: DateTime<Utc>,
}

/// Logs a finished run and makes its result, with when to retry it.
fn finished(job: &Job, go: Go, outcome: Outcome, message: String) -> RunResult {
    let name = job.config.name.as_str();
    let attempt = go.attempt;
    let retry_in = outcome.counts_against_attempts().then(|| {
        let failures = go.failures + 1;
        (failures < job.config.retry.max_attempts).then(|| job.config.retry.delay_after(failures))
    });
    let retry_in = retry_in.flatten();
    match outcome {
        Outcome::Ok => info!(job = %name, attempt, summary = %message, "run ok"),
        _ => {
            warn!(job = %name, attempt, outcome = outcome.as_str(), error = %message, retry_in = ?retry_in, "run failed")
        }
    }
    RunResult::Finished {
        outcome,
        message,
        attempt,
        retry_in,
    }
}

/// What the plugin is told about its run.
fn run_context(job: &Job, slot: DateTime<Utc>, attempt: i32) -> Context {
    Context {
        job: job.config.name.clone(),
        slot: slot_text(slot),
        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
        config: job.config.config.clone(),
    }
}

/// A slot as the plugin and its log lines see it.
fn slot_text(slot: DateTime<Utc>) -> String {
    slot.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A run's limits: its timeout and memory cap.
fn run_limits(job: &Job) -> RunLimits {
    RunLimits {
        timeout: job.config.timeout,
        max_memory_bytes: job.config.max_memory_bytes,
    }
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

/// The run's scope, sent after the gate in the opening query: the run's
/// name in `application_name` and the savepoint a failure rolls back to.
/// (The job's role is the connection's login: [`crate::pools`].)
fn scope_sql(job: &JobConfig, host_id: &str) -> String {
    let app = truncate_utf8(
        &format!("{}/{}", db::application_name(host_id), job.name),
        63,
    );
    format!(
        "set local application_name = {};\nsavepoint jobhost_work",
        db::quote_literal(&app)
    )
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
