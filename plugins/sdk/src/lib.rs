//! The guest SDK for jobhost job plugins.
//!
//! A plugin implements [`Job`] and exports it with [`export_job!`]:
//!
//! ```ignore
//! use jobhost_plugin_sdk::{export_job, params, Context, Job, JobError, Tx};
//!
//! #[derive(serde::Deserialize)]
//! struct Pending { id: i64 }
//!
//! struct Sweep;
//! impl Job for Sweep {
//!     fn run(ctx: &Context, tx: &Tx<'_>) -> Result<String, JobError> {
//!         let limit: i64 = ctx.config_or("batch-size", 50)?;
//!         let rows: Vec<Pending> = tx.query("select id from t where done = false limit $1", params![limit])?;
//!         for r in &rows {
//!             tx.execute("update t set done = true where id = $1", params![r.id])?;
//!         }
//!         Ok(format!("swept {} rows", rows.len()))
//!     }
//! }
//! export_job!(Sweep);
//! ```
//!
//! The transaction is the host's: the job's advisory lock is already held, and
//! the host commits when `run` returns `Ok` (and rolls back on `Err`, a panic,
//! or any failed statement). There is no way to commit, unlock or keep it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;

/// Raw bindings generated from the WIT package (for what the SDK does not
/// wrap): the `xact-plugin` world, whose imports both worlds share.
///
/// With `pub_export_macro`, wit-bindgen puts a world's full type (imports
/// *and* exports) into the crate that calls its export macro; the SDK itself
/// carries only the imports. So a plugin built with [`export_job!`] is an
/// `xact-plugin` component and one built with [`export_long_job!`] a
/// `session-plugin` one: the host reads the kind from the world that links.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "xact-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_xact_world",
        default_bindings_module: "jobhost_plugin_sdk::bindings",
    });
}

/// Raw bindings of the `session-plugin` world (its imports are
/// [`bindings`]'s).
pub mod session_bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "session-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_session_world",
        default_bindings_module: "jobhost_plugin_sdk::session_bindings",
        with: {
            "jobhost:plugin/sql@0.2.1": crate::bindings::jobhost::plugin::sql,
            "jobhost:plugin/log@0.2.1": crate::bindings::jobhost::plugin::log,
            "jobhost:plugin/types@0.2.1": crate::bindings::jobhost::plugin::types,
        },
    });
}

use bindings::jobhost::plugin::sql::{Session as WitSession, Transaction};
use bindings::jobhost::plugin::types as wit_types;

pub mod http;
mod packed;
pub mod row;
pub use bindings::jobhost::plugin::sql::{Column, DbError, Error as SqlError, RowSet, Value};

/// What the host tells the plugin about this run.
#[derive(Debug, Clone)]
pub struct Context {
    /// Job name from `jobs.toml`.
    pub job: String,
    /// The slot this run serves (RFC 3339, UTC).
    pub slot: String,
    /// 1 for the first attempt at this slot.
    pub attempt: u32,
    config: BTreeMap<String, String>,
}

impl Context {
    /// The `[job.config]` value `key`, parsed; an error names the key.
    pub fn config<T: FromStr>(&self, key: &str) -> Result<T, JobError>
    where
        T::Err: fmt::Display,
    {
        let raw = self
            .config
            .get(key)
            .ok_or_else(|| JobError::new(format!("missing config key `{key}`")))?;
        raw.parse()
            .map_err(|e| JobError::new(format!("config key `{key}` = {raw:?}: {e}")))
    }

    /// Like [`Context::config`], with a default when the key is absent.
    pub fn config_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, JobError>
    where
        T::Err: fmt::Display,
    {
        if self.config.contains_key(key) {
            self.config(key)
        } else {
            Ok(default)
        }
    }

    /// The raw string value of `key`, if present.
    pub fn config_str(&self, key: &str) -> Option<&str> {
        self.config.get(key).map(String::as_str)
    }

    /// All config entries, sorted by key.
    pub fn config_entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.config.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// The SDK's one error type: why a statement, a decode or a run failed.
/// `?` converts SQL errors and strings into it; [`JobError::sql`] keeps the
/// SQL error typed, and returning it from `run` records it with the failure.
#[derive(Debug, Clone)]
pub struct JobError {
    message: String,
    sql: Option<SqlError>,
}

impl JobError {
    /// A failure with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            sql: None,
        }
    }
}

impl JobError {
    /// The SQL error that caused this failure, typed, if one did.
    pub fn sql(&self) -> Option<&SqlError> {
        self.sql.as_ref()
    }

    /// The SQLSTATE of the Postgres error that caused this failure
    /// (`"23505"` for a unique violation), if one did.
    pub fn code(&self) -> Option<&str> {
        match &self.sql {
            Some(SqlError::Database(db)) => Some(&db.code),
            _ => None,
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobError {}

impl From<SqlError> for JobError {
    fn from(e: SqlError) -> Self {
        let message = match &e {
            SqlError::Database(db) => format!("SQLSTATE {}: {}", db.code, db.message),
            SqlError::Refused(why) => format!("statement refused: {why}"),
            SqlError::TransactionAborted => "transaction aborted by an earlier error".into(),
            SqlError::ScopeClosed => "transaction scope closed".into(),
            SqlError::Timeout => "statement timed out".into(),
            SqlError::LimitExceeded(what) => format!("limit exceeded: {what}"),
        };
        Self {
            message,
            sql: Some(e),
        }
    }
}

impl From<String> for JobError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for JobError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

/// A transaction: the one the host lends an `xact` run, or one a session
/// job began (see [`Session::begin`], which hands it out as a
/// [`SessionTx`], the only kind that can be committed: calling `commit` on
/// the lent one does not compile).
pub struct Tx<'a> {
    inner: TxRef<'a>,
}

enum TxRef<'a> {
    Lent(&'a Transaction),
    Owned(Transaction),
}

impl TxRef<'_> {
    fn get(&self) -> &Transaction {
        match self {
            TxRef::Lent(t) => t,
            TxRef::Owned(t) => t,
        }
    }
}

impl Tx<'_> {
    /// Runs a query and decodes each row into `T` with serde: a struct by
    /// column name, a tuple by position, a single value from one column (see
    /// [`row`] for the mapping). Errors name the statement and the column.
    pub fn query<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<Vec<T>, JobError> {
        let set = self.query_raw(sql, params)?;
        set.rows
            .into_iter()
            .map(|cells| {
                row::decode(&set.columns, cells)
                    .map_err(|e| JobError::new(format!("cannot decode a row of `{sql}`: {e}")))
            })
            .collect()
    }

    /// Runs a query that must return exactly one row, decoded into `T`.
    pub fn query_one<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<T, JobError> {
        let mut rows = self.query::<T>(sql, params)?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            n => Err(JobError::new(format!(
                "`{sql}` returned {n} rows where exactly one was expected"
            ))),
        }
    }

    /// Runs a query that returns at most one row, decoded into `T`.
    pub fn query_opt<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<T>, JobError> {
        let mut rows = self.query::<T>(sql, params)?;
        match rows.len() {
            0 => Ok(None),
            1 => Ok(Some(rows.remove(0))),
            n => Err(JobError::new(format!(
                "`{sql}` returned {n} rows where at most one was expected"
            ))),
        }
    }

    /// Runs a query and returns the positional row set. The rows come packed
    /// in one buffer (`query-packed`): one allocation for the whole result
    /// rather than one per row and per string, each a call into the guest.
    pub fn query_raw(&self, sql: &str, params: &[Value]) -> Result<RowSet, JobError> {
        let packed = self.inner.get().query_packed(sql, params)?;
        packed::unpack(packed)
            .map_err(|e| JobError::new(format!("the host's rows for `{sql}` are malformed: {e}")))
    }

    /// Runs a statement; returns the rows it affected.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, JobError> {
        Ok(self.inner.get().execute(sql, params)?)
    }
}

/// A transaction a session job began: everything a [`Tx`] does, and
/// `commit`. Dropping it without committing rolls it back.
pub struct SessionTx {
    tx: Tx<'static>,
}

impl std::ops::Deref for SessionTx {
    type Target = Tx<'static>;
    fn deref(&self) -> &Tx<'static> {
        &self.tx
    }
}

impl SessionTx {
    /// Commits it (refused, and rolled back, if the job's lock was lost or
    /// the session check found something left on the connection).
    pub fn commit(self) -> Result<(), JobError> {
        Ok(self.tx.inner.get().commit()?)
    }
}

/// Lent to session (long) jobs: begins short transactions, one at a time,
/// each committed on its own.
pub struct Session<'a> {
    inner: &'a WitSession,
}

impl Session<'_> {
    /// Begins a transaction; `commit` it, or drop it to roll back.
    pub fn begin(&self) -> Result<SessionTx, JobError> {
        Ok(SessionTx {
            tx: Tx {
                inner: TxRef::Owned(self.inner.begin()?),
            },
        })
    }

    /// The raw `session` resource, for what the SDK does not wrap.
    pub fn raw(&self) -> &WitSession {
        self.inner
    }

    /// Runs `work` in its own transaction and commits it if `work` succeeds.
    pub fn transaction<T>(
        &self,
        work: impl FnOnce(&Tx<'_>) -> Result<T, JobError>,
    ) -> Result<T, JobError> {
        let tx = self.begin()?;
        let value = work(&tx)?;
        tx.commit()?;
        Ok(value)
    }
}

/// A cell as JSON (for logging or inspection; [`Tx::query`] decodes rows
/// without it): numbers stay numbers, `json` is parsed, everything
/// string-carried (numeric, uuid, dates) stays a string.
pub fn to_json(v: Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Boolean(b) => J::Bool(b),
        Value::Int2(i) => J::from(i),
        Value::Int4(i) => J::from(i),
        Value::Int8(i) => J::from(i),
        Value::Float4(f) => J::from(f64::from(f)),
        Value::Float8(f) => J::from(f),
        Value::Bytea(b) => J::from(b),
        Value::Json(s) => serde_json::from_str(&s).unwrap_or(J::String(s)),
        other => string_carried(other).map_or(J::Null, J::String),
    }
}

/// The text of a string-carried value (`numeric`, `text`, `uuid`, dates and
/// times, `other`); the value itself back for any other case.
pub(crate) fn string_carried(v: Value) -> Result<String, Value> {
    match v {
        Value::Numeric(s)
        | Value::Text(s)
        | Value::Uuid(s)
        | Value::Date(s)
        | Value::Time(s)
        | Value::Timestamp(s)
        | Value::Timestamptz(s)
        | Value::Other((_, s)) => Ok(s),
        other => Err(other),
    }
}

macro_rules! value_from {
    ($($t:ty => $case:ident),* $(,)?) => {
        $(impl From<$t> for Value {
            fn from(v: $t) -> Self { Value::$case(v.into()) }
        })*
    };
}
value_from!(bool => Boolean, i8 => Int2, u8 => Int2, i16 => Int2, u16 => Int4, i32 => Int4,
            u32 => Int8, i64 => Int8, f32 => Float4, f64 => Float8,
            String => Text, &str => Text, &String => Text, Vec<u8> => Bytea, &[u8] => Bytea);

/// `u64` past `i64::MAX` does not fit `int8`: it travels as `numeric`.
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        match i64::try_from(v) {
            Ok(i) => Value::Int8(i),
            Err(_) => Value::Numeric(v.to_string()),
        }
    }
}

/// `usize` as `u64`.
impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::from(v as u64)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// `uuid::Uuid`, bound as `uuid`.
#[cfg(feature = "uuid")]
impl From<uuid::Uuid> for Value {
    fn from(v: uuid::Uuid) -> Self {
        Value::Uuid(v.hyphenated().to_string())
    }
}

/// `chrono`'s types, bound as `timestamptz`, `timestamp`, `date` and `time`
/// (text in ISO 8601, parsed by Postgres's own input functions).
#[cfg(feature = "chrono")]
mod chrono_values {
    use super::Value;
    use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, TimeZone};

    impl<Tz: TimeZone> From<DateTime<Tz>> for Value {
        fn from(v: DateTime<Tz>) -> Self {
            Value::Timestamptz(v.to_utc().to_rfc3339_opts(SecondsFormat::AutoSi, true))
        }
    }
    impl From<NaiveDateTime> for Value {
        fn from(v: NaiveDateTime) -> Self {
            Value::Timestamp(v.format("%Y-%m-%dT%H:%M:%S%.f").to_string())
        }
    }
    impl From<NaiveDate> for Value {
        fn from(v: NaiveDate) -> Self {
            Value::Date(v.format("%Y-%m-%d").to_string())
        }
    }
    impl From<NaiveTime> for Value {
        fn from(v: NaiveTime) -> Self {
            Value::Time(v.format("%H:%M:%S%.f").to_string())
        }
    }
}

/// Builds a parameter slice: `params![id, "text", 1.5]`.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::Value::from($v)),*] };
}

/// A job: one call per scheduled slot, inside the host's locked transaction
/// (`lock = "xact"`).
pub trait Job {
    /// Does the work; `Ok(summary)` commits, `Err` rolls back.
    fn run(ctx: &Context, tx: &Tx<'_>) -> Result<String, JobError>;
}

/// A long job (`lock = "session"`): the host holds the job's lock on a
/// connection of its own while the job commits its work in short
/// transactions begun from the session.
pub trait LongJob {
    /// Does the work; each committed transaction stays committed whatever the
    /// result.
    fn run(ctx: &Context, session: &Session<'_>) -> Result<String, JobError>;
}

/// Structured logging into the host's log, tagged with the job and slot.
pub mod log {
    use crate::bindings::jobhost::plugin::log::{Level, log};

    /// Logs at `level` with key/value fields.
    pub fn event(level: Level, message: &str, fields: &[(&str, &dyn std::fmt::Display)]) {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_string()))
            .collect();
        log(level, message, &fields);
    }
    /// Info-level event.
    pub fn info(message: &str) {
        event(Level::Info, message, &[]);
    }
    /// Warn-level event.
    pub fn warn(message: &str) {
        event(Level::Warn, message, &[]);
    }
    /// Error-level event.
    pub fn error(message: &str) {
        event(Level::Error, message, &[]);
    }
    /// Debug-level event.
    pub fn debug(message: &str) {
        event(Level::Debug, message, &[]);
    }
    pub use crate::bindings::jobhost::plugin::log::Level as LogLevel;
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    fn context(ctx: wit_types::Context) -> Context {
        Context {
            job: ctx.job,
            slot: ctx.slot,
            attempt: ctx.attempt,
            config: ctx.config.into_iter().collect(),
        }
    }

    fn outcome(r: Result<String, JobError>) -> Result<wit_types::Report, wit_types::Failure> {
        match r {
            Ok(summary) => Ok(wit_types::Report { summary }),
            Err(e) => Err(wit_types::Failure {
                message: e.message,
                sql: e.sql,
            }),
        }
    }

    /// Built without WASI (`wasm32-unknown-unknown`: a lean component),
    /// a panic has no stderr to print to and would trap with its message
    /// lost. Send it through the host's log instead, at error level, where
    /// the host finds it for the run's record. Each run is a fresh instance,
    /// so this is set once per run.
    fn report_panics() {
        #[cfg(not(target_os = "wasi"))]
        std::panic::set_hook(Box::new(|info| {
            crate::log::error(&info.to_string());
        }));
    }

    pub fn run<J: Job>(
        ctx: wit_types::Context,
        tx: &Transaction,
    ) -> Result<wit_types::Report, wit_types::Failure> {
        report_panics();
        outcome(J::run(
            &context(ctx),
            &Tx {
                inner: TxRef::Lent(tx),
            },
        ))
    }

    pub fn run_long<J: LongJob>(
        ctx: wit_types::Context,
        session: &WitSession,
    ) -> Result<wit_types::Report, wit_types::Failure> {
        report_panics();
        outcome(J::run(&context(ctx), &Session { inner: session }))
    }

    pub use crate::bindings::exports::jobhost::plugin::xact_job::Guest as XactGuest;
    pub use crate::bindings::jobhost::plugin::sql::{Session as WitSessionResource, Transaction};
    pub use crate::bindings::jobhost::plugin::types::{Context as WitContext, Failure, Report};
    pub use crate::session_bindings::exports::jobhost::plugin::session_job::Guest as SessionGuest;
}

/// Exports a [`Job`] implementation (`lock = "xact"`): the plugin becomes a
/// component of world `xact-plugin`.
#[macro_export]
macro_rules! export_job {
    ($job:ty) => {
        #[doc(hidden)]
        pub struct __JobhostExport;
        impl $crate::__private::XactGuest for __JobhostExport {
            fn run(
                ctx: $crate::__private::WitContext,
                tx: &$crate::__private::Transaction,
            ) -> ::core::result::Result<$crate::__private::Report, $crate::__private::Failure> {
                $crate::__private::run::<$job>(ctx, tx)
            }
        }
        $crate::bindings::__export_xact_world!(__JobhostExport with_types_in $crate::bindings);
    };
}

/// Exports a [`LongJob`] implementation (`lock = "session"`): the plugin
/// becomes a component of world `session-plugin`.
#[macro_export]
macro_rules! export_long_job {
    ($job:ty) => {
        #[doc(hidden)]
        pub struct __JobhostExport;
        impl $crate::__private::SessionGuest for __JobhostExport {
            fn run_long(
                ctx: $crate::__private::WitContext,
                session: &$crate::__private::WitSessionResource,
            ) -> ::core::result::Result<$crate::__private::Report, $crate::__private::Failure> {
                $crate::__private::run_long::<$job>(ctx, session)
            }
        }
        $crate::session_bindings::__export_session_world!(__JobhostExport with_types_in $crate::session_bindings);
    };
}
