//! The `sql` capability: the `transaction` resource a plugin gets for one run.
//!
//! A [`TxHandle`] owns the run's sqlx transaction while the plugin holds the
//! borrow. It also remembers the first database error: after any statement error
//! Postgres aborts the transaction and a later COMMIT silently rolls back (while
//! sqlx's `commit()` still returns `Ok`), so the host, not the plugin, must know
//! that the run's work is gone. Later statements get `transaction-aborted`
//! without reaching Postgres, and the runner records the run as an error even if
//! the plugin swallowed the failure and returned success.

use std::sync::Arc;

use sqlx::{PgConnection, Postgres, Transaction};
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

impl sql::Host for RunState {}

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

    async fn drop(&mut self, tx: Resource<TxHandle>) -> wasmtime::Result<()> {
        // Only reached for handles the guest owns; the run's handle is only ever
        // lent, and the runner deletes it itself.
        self.table.delete(tx)?;
        Ok(())
    }
}
