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

use std::sync::Arc;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use wasmtime::component::Resource;

use super::RunState;
use super::bindings::sql::{self, DbError, Error, RowSet, Value};
use super::values::{self, StatementError};
use crate::guard::SqlGuard;

/// Host side of one lent `transaction`.
pub struct TxHandle {
    tx: Option<Transaction<'static, Postgres>>,
    first_error: Option<String>,
    max_rows: usize,
    job: Arc<str>,
    guard: Arc<SqlGuard>,
    /// Set for transactions a session plugin began: it may commit them,
    /// unless the job's lock has been lost meanwhile.
    own_commit: Option<CancellationToken>,
}

impl TxHandle {
    /// Wraps the run's transaction (already locked by the runner). Every
    /// statement passes `guard` before it reaches Postgres.
    pub fn new(
        tx: Transaction<'static, Postgres>,
        job: Arc<str>,
        max_rows: usize,
        guard: Arc<SqlGuard>,
    ) -> Self {
        Self {
            tx: Some(tx),
            first_error: None,
            max_rows,
            job,
            guard,
            own_commit: None,
        }
    }

    /// The transaction's connection, for native work on the same path
    /// (benchmarks); `None` once the scope is closed.
    pub fn connection(&mut self) -> Option<&mut PgConnection> {
        self.tx.as_deref_mut()
    }

    /// Whether the transaction is still open (not committed or rolled back).
    pub fn is_open(&self) -> bool {
        self.tx.is_some()
    }

    /// Rolls back if still open (a transaction the plugin never committed).
    pub async fn rollback(&mut self) {
        if let Some(tx) = self.tx.take()
            && let Err(e) = tx.rollback().await
        {
            tracing::warn!(job = %self.job, error = %e, "rollback failed; the connection is discarded");
        }
    }

    async fn commit(&mut self) -> wasmtime::Result<Result<(), Error>> {
        let Some(lost) = &self.own_commit else {
            return Ok(Err(Error::Refused(
                "this transaction belongs to the host, which commits it when `run` returns".into(),
            )));
        };
        if lost.is_cancelled() {
            self.rollback().await;
            return Ok(Err(Error::Refused(
                "the job's lock was lost; the transaction was rolled back".into(),
            )));
        }
        let Some(tx) = self.tx.take() else {
            return Ok(Err(Error::ScopeClosed));
        };
        if self.first_error.is_some() {
            // Postgres has aborted it; COMMIT would silently roll back.
            if let Err(e) = tx.rollback().await {
                tracing::warn!(job = %self.job, error = %e, "rollback failed");
            }
            return Ok(Err(Error::TransactionAborted));
        }
        match tx.commit().await {
            Ok(()) => Ok(Ok(())),
            Err(e) => self.fail(StatementError::Sqlx(e)).map(Err),
        }
    }

    /// Ends the scope: returns the transaction and the first database error, if
    /// any. Every later call on this handle is `scope-closed`.
    pub fn close(&mut self) -> (Option<Transaction<'static, Postgres>>, Option<String>) {
        (self.tx.take(), self.first_error.take())
    }

    /// The connection for `statement`, once the scope is open, the transaction
    /// healthy, and the guard has let the statement through.
    fn conn(&mut self, statement: &str) -> Result<&mut PgConnection, Error> {
        if self.tx.is_none() {
            return Err(Error::ScopeClosed);
        }
        if let Err(why) = self.guard.check(statement) {
            tracing::warn!(job = %self.job, reason = %why, statement, "statement refused by the scope guard");
            return Err(Error::Refused(why));
        }
        if self.first_error.is_some() {
            return Err(Error::TransactionAborted);
        }
        match self.tx.as_mut() {
            Some(tx) => Ok(&mut **tx),
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
        statement: &str,
        params: &[Value],
    ) -> wasmtime::Result<Result<RowSet, Error>> {
        let max_rows = self.max_rows;
        let conn = match self.conn(statement) {
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
        statement: &str,
        params: &[Value],
    ) -> wasmtime::Result<Result<u64, Error>> {
        let conn = match self.conn(statement) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        match values::execute(conn, statement, params).await {
            Ok(n) => Ok(Ok(n)),
            Err(e) => self.fail(e).map(Err),
        }
    }
}

/// Host side of a lent `session`: begins transactions from the pool.
pub struct SessionHandle {
    pool: PgPool,
    job: Arc<str>,
    guard: Arc<SqlGuard>,
    max_rows: usize,
    lost: CancellationToken,
    /// Role and statement timeout applied to each transaction (`SET LOCAL`).
    role: Option<String>,
    statement_timeout_ms: u128,
    /// Every transaction this session began (table reps), so the host can roll
    /// back what the plugin left open when `run` returns.
    began: Vec<u32>,
}

impl SessionHandle {
    /// A session for `job`; `lost` is cancelled when the job's lock is lost.
    /// Each transaction it begins runs as `role` (if any), with
    /// `statement_timeout` set to `statement_timeout`.
    pub fn new(
        pool: PgPool,
        job: Arc<str>,
        guard: Arc<SqlGuard>,
        max_rows: usize,
        lost: CancellationToken,
        role: Option<String>,
        statement_timeout: std::time::Duration,
    ) -> Self {
        Self {
            pool,
            job,
            guard,
            max_rows,
            lost,
            role,
            statement_timeout_ms: statement_timeout.as_millis().max(1),
            began: Vec::new(),
        }
    }

    /// Table reps of the transactions this session began.
    pub fn began(&self) -> &[u32] {
        &self.began
    }
}

impl sql::Host for RunState {}

impl sql::HostSession for RunState {
    async fn begin(
        &mut self,
        session: Resource<SessionHandle>,
    ) -> wasmtime::Result<Result<Resource<TxHandle>, Error>> {
        let s = self.table.get(&session)?;
        if s.lost.is_cancelled() {
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
        let (pool, job, guard, max_rows, lost) = (
            s.pool.clone(),
            s.job.clone(),
            s.guard.clone(),
            s.max_rows,
            s.lost.clone(),
        );
        let (role, timeout_ms) = {
            let s = self.table.get(&session)?;
            (s.role.clone(), s.statement_timeout_ms)
        };
        // Each short transaction gets the run's backstop and the job's role,
        // in one simple query.
        let begun = async {
            let mut tx = pool.begin().await?;
            let mut scope = format!("set local statement_timeout = {timeout_ms}");
            if let Some(role) = role {
                scope.push_str(";\n");
                scope.push_str(&crate::db::set_local_role_sql(&role));
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(scope))
                .execute(&mut *tx)
                .await?;
            Ok::<_, sqlx::Error>(tx)
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
                    own_commit: None,
                };
                return scratch.fail(StatementError::Sqlx(e)).map(Err);
            }
        };
        let mut handle = TxHandle::new(tx, job, max_rows, guard);
        handle.own_commit = Some(lost);
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
        self.table.get_mut(&tx)?.query(&statement, &params).await
    }

    async fn execute(
        &mut self,
        tx: Resource<TxHandle>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        self.table.get_mut(&tx)?.execute(&statement, &params).await
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
