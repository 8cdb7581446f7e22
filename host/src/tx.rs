//! [`OpenTx`]: a transaction the host opened on a pooled connection, managed
//! by hand instead of through `sqlx::Transaction`, for three reasons:
//!
//! - **the deadline comes with `BEGIN`.** The run's backstops
//!   (`statement_timeout`, `idle_in_transaction_session_timeout`) are sent in
//!   the same simple query as `BEGIN`, so the job's lock, taken by the next
//!   statement, has a server-side deadline from the instant it is granted: a
//!   host frozen right after the lock still loses it (docs/DESIGN.md invariant 12);
//! - **the end is verified.** [`OpenTx::finish`] sends the host's closing
//!   statements, `COMMIT`, and the post-commit check of the session
//!   ([`crate::hygiene`]) in one simple query, one round trip; a connection
//!   that is not proven clean never goes back to the pool;
//! - **a finished transaction's connection goes back when the `OpenTx` is
//!   dropped**, not at once: the runner tears the run's plugin instance down
//!   in between, so an instance never outlives the connection that admitted
//!   it (the instance pool is sized by the connection pool:
//!   [`crate::jobset::allocation`]). One proven clean may go straight to the
//!   next run waiting for it (`pools::Leased::give_back`);
//! - **an interrupted connection is never reused.** A run cut off by its
//!   timeout may have left a statement half-way through the protocol; such a
//!   transaction is [abandoned](OpenTx::abandon) (the socket is closed, and
//!   Postgres rolls back and releases the lock), and so is any `OpenTx`
//!   dropped while still open.

use crate::config::Pooler;
use crate::hygiene::{AfterCommit, Baseline};
use crate::pools::Leased;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row as _};

/// A transaction open on a pooled connection (see the module docs).
pub struct OpenTx {
    /// The connection, with its place in the run pools' budget
    /// ([`crate::pools::RunPools::acquire`]); `None` once given back.
    leased: Option<Leased>,
    /// Behind a transaction pooler: the named statements prepared in this
    /// transaction (sqlx's statement cache) are closed before it ends, so
    /// none outlives it on a server session that the pooler hands to other
    /// clients next (where the next transaction of ours may not be).
    close_statements: bool,
    /// Whether the transaction is still open; once it ended, the connection
    /// is kept until this is dropped.
    state: State,
}

/// Where an [`OpenTx`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Open: statements may be sent.
    Open,
    /// Ended and proven clean: the connection goes back (or on to the next
    /// run: `Leased::give_back`) on drop.
    Clean,
    /// Ended with leftovers, or unverified: the connection is closed on drop.
    Discard,
}

/// What the post-commit check found on the connection: `None` when clean,
/// otherwise what was left behind (advisory locks, session settings, temporary
/// objects, cursors, listened channels).
pub type Leftovers = Option<String>;

impl OpenTx {
    /// Sends `BEGIN` and `setup` (statements that must be in force before
    /// anything else runs, e.g. the run's deadline) as one simple query.
    /// `pooler` is what the connection's pool leads to.
    ///
    /// A pooled connection may turn out to be gone (the server closed it
    /// while it sat idle: [`crate::pools::pool_options`]). Such a connection is
    /// closed, and the transaction opened on another from the same pool, in
    /// the same place in the budget: nothing of a transaction whose
    /// connection died was kept (no `COMMIT` was sent), so opening it again
    /// is safe. At most as many times as the pool has connections, each
    /// time on another (the gone one is closed); a connection taken outside
    /// [`crate::pools::RunPools`] is not replaced.
    pub async fn begin(conn: impl Into<Leased>, setup: &str, pooler: Pooler) -> sqlx::Result<Self> {
        Ok(Self::begin_fetch(conn, setup, pooler).await?.0)
    }

    /// [`begin`](Self::begin), returning the rows `setup`'s statements
    /// produced (in text format), for a setup that reads as well.
    pub async fn begin_fetch(
        conn: impl Into<Leased>,
        setup: &str,
        pooler: Pooler,
    ) -> sqlx::Result<(Self, Vec<PgRow>)> {
        let mut leased: Leased = conn.into();
        let sql = if setup.is_empty() {
            "begin".to_owned()
        } else {
            format!("begin;\n{setup}")
        };
        let mut replaced = 0;
        let rows = loop {
            match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.as_str()))
                .fetch_all(&mut *leased.conn)
                .await
            {
                Ok(rows) => break rows,
                Err(e) => {
                    // The connection's state is unknown: do not hand it back.
                    leased.conn.close_on_drop();
                    match leased.pool() {
                        Some(pool)
                            if crate::db::connection_lost(&e)
                                && replaced < pool.options().get_max_connections() =>
                        {
                            tracing::info!(error = %e, "a pooled connection was gone; opening the transaction on another");
                            replaced += 1;
                            leased.conn = pool.acquire().await?;
                        }
                        _ => return Err(e),
                    }
                }
            }
        };
        let tx = Self {
            leased: Some(leased),
            close_statements: pooler == Pooler::Transaction,
            state: State::Open,
        };
        Ok((tx, rows))
    }

    /// Behind a transaction pooler, closes the statements prepared in this
    /// transaction, still inside it (one round trip, none if there are none).
    async fn close_statements(&mut self) -> sqlx::Result<()> {
        use sqlx::Connection as _;
        if !self.close_statements {
            return Ok(());
        }
        match self.conn() {
            Some(conn) => conn.clear_cached_statements().await,
            None => Ok(()),
        }
    }

    /// The connection, while the transaction is open.
    pub fn conn(&mut self) -> Option<&mut PgConnection> {
        match self.state {
            State::Open => self.leased.as_mut().map(|leased| &mut *leased.conn),
            State::Clean | State::Discard => None,
        }
    }

    /// Ends the transaction with `closing` (the host's last statements, which
    /// must end with `COMMIT` or `ROLLBACK`) followed by the post-commit
    /// session check, in one simple query. Returns what the check found; a
    /// connection with leftovers is closed instead of going back to the pool.
    ///
    /// On error (a closing statement failed, so the rest of the query did not
    /// run) the transaction stays open, in Postgres's aborted state: the
    /// caller may roll back to a savepoint and finish again, or drop it (which
    /// closes the connection).
    ///
    /// `check`: how much the check after COMMIT reads
    /// ([`AfterCommit`]; with `Skip` the connection is returned unchecked,
    /// for transactions no plugin statement reached); `baseline`: what a
    /// clean session of the pool is, which learns the fingerprint the check
    /// before COMMIT returns, if `closing` holds one.
    pub async fn finish(
        &mut self,
        closing: &str,
        check: AfterCommit,
        baseline: &Baseline,
    ) -> sqlx::Result<Leftovers> {
        self.close_statements().await?;
        let after_commit = crate::hygiene::after_commit_sql(check, baseline.settings());
        let Some(conn) = self.conn() else {
            return Err(sqlx::Error::PoolClosed);
        };
        let Some(after_commit) = after_commit else {
            sqlx::raw_sql(sqlx::AssertSqlSafe(closing.to_owned()))
                .execute(&mut *conn)
                .await?;
            self.state = State::Clean;
            return Ok(None);
        };
        let sql = format!("{closing};\n{after_commit}");
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut *conn)
            .await?;
        // The query got past its COMMIT, so the check before it passed.
        baseline.learn_from(&rows)?;
        // The check after COMMIT is the last row (the reset after it returns
        // none). A connection with leftovers, or whose check cannot be read,
        // is closed.
        self.state = State::Discard;
        let leftovers: Option<String> = match rows.last() {
            Some(row) => row.try_get(0)?,
            None => return Err(sqlx::Error::RowNotFound),
        };
        if leftovers.is_none() {
            self.state = State::Clean;
        }
        Ok(leftovers)
    }

    /// Ends a transaction no plugin touched with `closing` (ending in
    /// `COMMIT` or `ROLLBACK`), one simple query, and gives the connection
    /// back without the session check: only the host's own statements ran.
    /// A plugin's transaction must be [finished](Self::finish).
    pub async fn end(mut self, closing: &str) -> sqlx::Result<()> {
        self.close_statements().await?;
        let Some(conn) = self.conn() else {
            return Ok(());
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(closing.to_owned()))
            .execute(conn)
            .await?;
        self.state = State::Clean;
        Ok(())
    }

    /// Closes the connection without another statement: Postgres rolls the
    /// transaction back and releases its locks when it sees the socket close
    /// (at once when idle; within `client_connection_check_interval` while a
    /// statement runs).
    pub fn abandon(mut self) {
        self.state = State::Discard;
    }
}

impl Drop for OpenTx {
    fn drop(&mut self) {
        let Some(leased) = self.leased.take() else {
            return;
        };
        match self.state {
            State::Clean => leased.give_back(),
            // Never return an open (or unverified) transaction to the pool.
            State::Open | State::Discard => drop(leased.conn.detach()),
        }
    }
}
