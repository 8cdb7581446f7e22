//! The `sql` capability: the `transaction` an `xact` plugin is lent for one
//! run, and the `session` a `session` plugin is lent to begin its own short
//! transactions from the host's pool.
//!
//! A [`TxHandle`] owns the run's sqlx transaction while the plugin holds the
//! borrow. It also remembers the first database error: after any statement error
//! Postgres aborts the transaction and a later COMMIT silently rolls back (while
//! sqlx's `commit()` still returns `Ok`), so the host, not the plugin, must know
//! that the run's work is gone. Later statements get `transaction-aborted`
//! without reaching Postgres, and the runner records the run as an error even if
//! the plugin swallowed the failure and returned success.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use wasmtime::component::Resource;

use super::RunState;
use super::bindings::sql::{self, DbError, Error, PackedRows, RowSet, Value};
use super::values::{self, StatementError};
use crate::guard::SqlGuard;
use crate::hygiene;
use crate::pools::RunPools;
use crate::tx::OpenTx;

/// Host side of one lent `transaction`.
pub struct TxHandle {
    tx: Option<OpenTx>,
    first_error: Option<String>,
    max_rows: usize,
    job: Arc<str>,
    guard: Arc<SqlGuard>,
    /// Settings the plugin changed with `SET LOCAL` (the post-run check must
    /// not take them for session-level leaks).
    local_settings: Vec<String>,
    /// Whether any statement of the plugin's reached the connection (if
    /// none did, the session cannot have changed).
    touched: bool,
    /// Set for transactions a session plugin began: it may commit them while
    /// the job's lock is held.
    own_commit: Option<CommitRights>,
}

/// What a session job's short transaction needs to commit safely.
#[derive(Clone)]
struct CommitRights {
    /// Cancelled when the heartbeat finds the lock connection gone.
    lost: CancellationToken,
    /// The lock connection, checked by the database in the COMMIT's own query.
    holder: LockHolder,
    /// The job's role: each transaction's connection logs in as it.
    role: Option<String>,
    /// The first leak found by a commit's check, and whether it was found
    /// before the COMMIT (refusing it): the run is then an error.
    leaked: Arc<OnceLock<(String, bool)>>,
    /// What a clean session of the pool is.
    session_baseline: hygiene::Baseline,
}

/// The connection that holds a session job's lock: key, backend pid and
/// start (a pid alone can be reused by a new backend).
#[derive(Debug, Clone, Copy)]
pub struct LockHolder {
    /// The job's lock key (namespace, key).
    pub key: (i32, i32),
    /// Backend pid of the lock connection.
    pub pid: i32,
    /// When that backend started.
    pub backend_start: DateTime<Utc>,
}

/// The role and deadline of each short transaction a session begins.
#[derive(Debug, Clone)]
pub struct TxScope {
    /// The job's role, which each transaction's connection logs in as
    /// ([`crate::pools`]).
    pub role: Option<String>,
    /// The run's timeout: no statement runs longer.
    pub timeout: std::time::Duration,
    /// What a clean session of the pool is.
    pub session_baseline: hygiene::Baseline,
    /// What the pool leads to (see [`crate::config::Pooler`]).
    pub pooler: crate::config::Pooler,
}

/// What a closed [`TxHandle`] hands back to the runner.
pub struct Closed {
    /// The transaction, if still open.
    pub tx: Option<OpenTx>,
    /// The first database error of the run.
    pub db_error: Option<String>,
    /// Settings the plugin changed with `SET LOCAL`.
    pub local_settings: Vec<String>,
    /// Whether any statement of the plugin's reached the connection.
    pub touched: bool,
}

impl TxHandle {
    /// Wraps the run's transaction (already locked by the runner). Every
    /// statement passes `guard` before it reaches Postgres.
    pub fn new(tx: OpenTx, job: Arc<str>, max_rows: usize, guard: Arc<SqlGuard>) -> Self {
        Self {
            tx: Some(tx),
            first_error: None,
            max_rows,
            job,
            guard,
            local_settings: Vec::new(),
            touched: false,
            own_commit: None,
        }
    }

    /// The transaction's connection, for native work on the same path
    /// (benchmarks); `None` once the scope is closed. Whoever gets it may
    /// send anything, so the run counts as having used the connection (the
    /// post-run check applies), as a plugin's statements do.
    pub fn connection(&mut self) -> Option<&mut PgConnection> {
        let conn = self.tx.as_mut().and_then(OpenTx::conn)?;
        self.touched = true;
        Some(conn)
    }

    /// Whether the transaction is still open (not committed or rolled back).
    pub fn is_open(&self) -> bool {
        self.tx.is_some()
    }

    /// Rolls back if still open (a transaction the plugin never committed),
    /// checking the connection before it goes back to the pool.
    pub async fn rollback(&mut self) {
        if let Some(mut tx) = self.tx.take() {
            // A rollback discards the plugin's deferred triggers unfired.
            let check = hygiene::after_commit(self.touched, &[]);
            let baseline = self
                .own_commit
                .as_ref()
                .map(|rights| rights.session_baseline.clone())
                .unwrap_or_default();
            match tx.finish("rollback", check, &baseline).await {
                Ok(None) => {}
                Ok(Some(left)) => self.report_leak(&left, false),
                Err(e) => {
                    tracing::warn!(job = %self.job, error = %e, "rollback failed; the connection is discarded")
                }
            }
        }
    }

    /// Closes the connection without another statement (the plugin was cut
    /// off, possibly mid-statement): Postgres rolls back.
    pub fn abandon(&mut self) {
        if let Some(tx) = self.tx.take() {
            tx.abandon();
        }
    }

    fn report_leak(&self, what: &str, before_commit: bool) {
        crate::hygiene::log_leak(&self.job, what, before_commit);
        if let Some(rights) = &self.own_commit {
            let _ = rights.leaked.set((what.to_owned(), before_commit));
        }
    }

    async fn commit(&mut self) -> wasmtime::Result<Result<(), Error>> {
        let Some(rights) = self.own_commit.clone() else {
            return Ok(Err(Error::Refused(
                "this transaction belongs to the host, which commits it when `run` returns".into(),
            )));
        };
        if rights.lost.is_cancelled() {
            self.rollback().await;
            return Ok(Err(Error::Refused(
                "the job's lock was lost; the transaction was rolled back".into(),
            )));
        }
        if self.tx.is_none() {
            return Ok(Err(Error::ScopeClosed));
        }
        if self.first_error.is_some() {
            // Postgres has aborted it; COMMIT would silently roll back.
            self.rollback().await;
            return Ok(Err(Error::TransactionAborted));
        }
        // One simple query: the host's scope back, the session check, the
        // lock check *in the database*, COMMIT. If the lock connection died
        // a moment ago, the check raises and COMMIT never runs: a session job
        // never commits after its lock is gone.
        let h = rights.holder;
        let lock_check = format!(
            "select jobhost.assert_lock_held({}, {}, {}, {}::timestamptz)",
            h.key.0,
            h.key.1,
            h.pid,
            crate::db::quote_literal(&h.backend_start.to_rfc3339()),
        );
        let closing = hygiene::commit_session_sql(
            self.touched,
            &rights.session_baseline,
            &self.local_settings,
            &lock_check,
        );
        let Some(tx) = self.tx.as_mut() else {
            return Ok(Err(Error::ScopeClosed));
        };
        let check = hygiene::after_commit(self.touched, &self.local_settings);
        match tx.finish(&closing, check, &rights.session_baseline).await {
            Ok(left) => {
                self.tx = None;
                if let Some(left) = left {
                    self.report_leak(&left, false);
                }
                Ok(Ok(()))
            }
            Err(e) => {
                if let Some(leak) = hygiene::leaked(&e) {
                    self.report_leak(&leak, true);
                    self.rollback().await;
                    return Ok(Err(Error::Refused(format!(
                        "{leak}; the transaction was rolled back"
                    ))));
                }
                if e.as_database_error()
                    .is_some_and(|d| d.code().as_deref() == Some(hygiene::LOCK_GONE_SQLSTATE))
                {
                    rights.lost.cancel();
                    self.rollback().await;
                    return Ok(Err(Error::Refused(
                        "the job's lock was lost; the transaction was rolled back".into(),
                    )));
                }
                let out = self.fail(StatementError::Sqlx(e)).map(Err);
                self.rollback().await;
                out
            }
        }
    }

    /// Ends the scope: returns the transaction, the first database error and
    /// the plugin's `SET LOCAL`s. Every later call on this handle is
    /// `scope-closed`.
    pub fn close(&mut self) -> Closed {
        Closed {
            tx: self.tx.take(),
            db_error: self.first_error.take(),
            local_settings: std::mem::take(&mut self.local_settings),
            touched: self.touched,
        }
    }

    /// The connection for `statement`, once the scope is open, the transaction
    /// healthy, and the guard has let the statement through.
    fn conn(&mut self, statement: &str) -> Result<&mut PgConnection, Error> {
        if self.tx.is_none() {
            return Err(Error::ScopeClosed);
        }
        match self.guard.check(statement) {
            Err(why) => {
                tracing::warn!(job = %self.job, reason = %why, statement, "statement refused by the scope guard");
                return Err(Error::Refused(why));
            }
            Ok(allowed) => {
                if let Some(name) = allowed.sets_local
                    && !self.local_settings.contains(&name)
                {
                    self.local_settings.push(name);
                }
            }
        }
        if self.first_error.is_some() {
            return Err(Error::TransactionAborted);
        }
        match self.tx.as_mut().and_then(OpenTx::conn) {
            Some(conn) => {
                self.touched = true;
                Ok(conn)
            }
            None => Err(Error::ScopeClosed),
        }
    }

    /// Maps a statement failure to the WIT error, remembering database errors.
    /// A failed connection traps the guest: no SQL error describes it honestly.
    fn fail(&mut self, e: StatementError) -> wasmtime::Result<Error> {
        match e {
            StatementError::Refused(why) => {
                tracing::warn!(job = %self.job, reason = %why, "statement refused");
                Ok(Error::Refused(why))
            }
            StatementError::TooManyRows(n) => {
                // The statement ran; abandoning its stream leaves the transaction
                // usable, but the plugin's view of the result is incomplete.
                Ok(Error::LimitExceeded(format!(
                    "query returned more than {n} rows"
                )))
            }
            StatementError::Sqlx(sqlx::Error::Database(db)) => {
                let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
                let err = DbError {
                    code: db.code().map(|c| c.into_owned()).unwrap_or_default(),
                    message: db.message().to_owned(),
                    detail: pg.and_then(|p| p.detail()).map(str::to_owned),
                    hint: pg.and_then(|p| p.hint()).map(str::to_owned),
                    constraint: db.constraint().map(str::to_owned),
                };
                // 57014 = query_canceled: our statement_timeout backstop fired.
                let wit = if err.code == "57014" {
                    Error::Timeout
                } else {
                    Error::Database(err.clone())
                };
                self.first_error = Some(format!("SQLSTATE {}: {}", err.code, err.message));
                Ok(wit)
            }
            StatementError::Sqlx(other) => {
                self.first_error = Some(format!("database connection failed: {other}"));
                Err(wasmtime::Error::new(other).context("database connection failed"))
            }
        }
    }

    async fn query(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, Error>> {
        let max_rows = self.max_rows;
        let conn = match self.conn(&statement) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        match values::query(conn, statement, params, max_rows).await {
            Ok(rows) => Ok(Ok(rows)),
            Err(e) => self.fail(e).map(Err),
        }
    }

    async fn execute(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let conn = match self.conn(&statement) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        match values::execute(conn, statement, params).await {
            Ok(n) => Ok(Ok(n)),
            Err(e) => self.fail(e).map(Err),
        }
    }
}

/// Host side of a lent `session`: begins transactions from the run pools.
pub struct SessionHandle {
    pools: RunPools,
    job: Arc<str>,
    guard: Arc<SqlGuard>,
    max_rows: usize,
    rights: CommitRights,
    statement_timeout_ms: u128,
    /// Every transaction this session began (table reps), so the host can roll
    /// back what the plugin left open when `run` returns.
    began: Vec<u32>,
    /// What the pool leads to.
    pooler: crate::config::Pooler,
}

impl SessionHandle {
    /// A session for `job`; `lost` is cancelled when the job's lock is lost,
    /// and `holder` is the connection that holds it. Each transaction it
    /// begins runs as `scope.role` (if any), bounded by `scope.timeout`
    /// (`statement_timeout`, and `idle_in_transaction_session_timeout` a
    /// margin later).
    pub fn new(
        pools: RunPools,
        job: Arc<str>,
        guard: Arc<SqlGuard>,
        max_rows: usize,
        lost: CancellationToken,
        holder: LockHolder,
        scope: TxScope,
    ) -> Self {
        let TxScope {
            role,
            timeout: statement_timeout,
            session_baseline,
            pooler,
        } = scope;
        Self {
            pools,
            job,
            guard,
            max_rows,
            rights: CommitRights {
                lost,
                holder,
                role,
                leaked: Arc::default(),
                session_baseline,
            },
            statement_timeout_ms: statement_timeout.as_millis().max(1),
            began: Vec::new(),
            pooler,
        }
    }

    /// Table reps of the transactions this session began.
    pub fn began(&self) -> &[u32] {
        &self.began
    }

    /// What a commit's check found the plugin left on a connection, if
    /// anything, and whether before the COMMIT.
    pub fn leaked(&self) -> Option<(String, bool)> {
        self.rights.leaked.get().cloned()
    }
}

impl sql::Host for RunState {}

impl sql::HostSession for RunState {
    async fn begin(
        &mut self,
        session: Resource<SessionHandle>,
    ) -> wasmtime::Result<Result<Resource<TxHandle>, Error>> {
        let s = self.table.get(&session)?;
        if s.rights.lost.is_cancelled() {
            return Ok(Err(Error::Refused("the job's lock was lost".into())));
        }
        for rep in s.began.clone() {
            if self
                .table
                .get(&Resource::<TxHandle>::new_borrow(rep))
                .is_ok_and(TxHandle::is_open)
            {
                return Ok(Err(Error::Refused(
                    "one transaction at a time: commit or drop the open one first".into(),
                )));
            }
        }
        let s = self.table.get(&session)?;
        let (pools, job, guard, max_rows, rights, timeout_ms) = (
            s.pools.clone(),
            s.job.clone(),
            s.guard.clone(),
            s.max_rows,
            s.rights.clone(),
            s.statement_timeout_ms,
        );
        let pooler = s.pooler;
        // Each short transaction gets the run's backstops from BEGIN on, in
        // the BEGIN's own simple query, on a connection that logs in as the
        // job's role.
        let scope = crate::db::backstops_sql(timeout_ms);
        let begun = async {
            let conn = pools.acquire(rights.role.as_deref()).await?;
            OpenTx::begin(conn, &scope, pooler).await
        };
        let tx = match begun.await {
            Ok(tx) => tx,
            Err(e) => {
                let mut scratch = TxHandle {
                    tx: None,
                    first_error: None,
                    max_rows,
                    job,
                    guard,
                    local_settings: Vec::new(),
                    touched: false,
                    own_commit: None,
                };
                return scratch.fail(StatementError::Sqlx(e)).map(Err);
            }
        };
        let mut handle = TxHandle::new(tx, job, max_rows, guard);
        handle.own_commit = Some(rights);
        let lent = self.table.push(handle)?;
        self.table.get_mut(&session)?.began.push(lent.rep());
        Ok(Ok(lent))
    }

    async fn drop(&mut self, session: Resource<SessionHandle>) -> wasmtime::Result<()> {
        // Only reached for handles the guest owns; the run's session is lent.
        self.table.delete(session)?;
        Ok(())
    }
}

impl sql::HostTransaction for RunState {
    async fn query(
        &mut self,
        tx: Resource<TxHandle>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, Error>> {
        self.table.get_mut(&tx)?.query(statement, params).await
    }

    async fn query_packed(
        &mut self,
        tx: Resource<TxHandle>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<PackedRows, Error>> {
        let rows = self.table.get_mut(&tx)?.query(statement, params).await?;
        Ok(rows.map(super::packed::pack))
    }

    async fn execute(
        &mut self,
        tx: Resource<TxHandle>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        self.table.get_mut(&tx)?.execute(statement, params).await
    }

    async fn commit(&mut self, tx: Resource<TxHandle>) -> wasmtime::Result<Result<(), Error>> {
        self.table.get_mut(&tx)?.commit().await
    }

    async fn drop(&mut self, tx: Resource<TxHandle>) -> wasmtime::Result<()> {
        // Reached for transactions a session plugin began and dropped:
        // uncommitted means rolled back. (An `xact` run's transaction is only
        // lent; the runner takes it back itself.)
        let mut handle = self.table.delete(tx)?;
        handle.rollback().await;
        Ok(())
    }
}
