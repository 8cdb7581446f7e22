//! The host's side of Postgres: the pool every job transaction comes from, the
//! migrations of the host's own schema, and the run history.
//!
//! This module and [`crate::pools`] (the run connections, one pool per job
//! role) are the only ones that create connections. Plugins reach the
//! database solely through the transaction handle the runner lends them.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};

use crate::config::Pooler;

/// The host's migrations (schema `jobhost`). Applied by [`connect`].
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How a run ended, as stored in `jobhost.runs.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin returned success and the transaction committed.
    Ok,
    /// The plugin returned an error, or a statement failed; rolled back.
    Error,
    /// The plugin trapped (panic, memory limit, ...); rolled back.
    Trap,
    /// The run exceeded its timeout; rolled back.
    Timeout,
    /// The host shut down and the run outlived the grace period; rolled back.
    Interrupted,
    /// A `session` job's lock connection failed mid-run; the run was stopped.
    LockLost,
}

impl Outcome {
    /// Whether this outcome is a failure of the job's own doing, which counts
    /// against `max-attempts` and drives the retry backoff (the same set as
    /// the `failures` that `jobhost.slot_gate`, migration 0008, counts).
    pub fn counts_against_attempts(self) -> bool {
        matches!(
            self,
            Outcome::Error | Outcome::Trap | Outcome::Timeout | Outcome::LockLost
        )
    }

    /// The value stored in the runs table.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::Interrupted => "interrupted",
            Outcome::LockLost => "lock_lost",
        }
    }
}

/// How one run ended: with its [`RunRow`], the run's one row in `jobhost.runs`.
#[derive(Debug, Clone)]
pub struct RunRecord<'a> {
    /// Attempt number at this slot.
    pub attempt: i32,
    /// How it ended.
    pub outcome: Outcome,
    /// Summary or error message.
    pub message: &'a str,
}

/// The host's pool, and what a fresh connection of it carries.
pub struct Connected {
    /// The pool every run's connection comes from (`DATABASE_URL`).
    pub pool: PgPool,
    /// How to open a connection that is one real server session, for what
    /// needs one: `session`-mode locks and their heartbeats, LISTEN. The
    /// pool's own options on a direct connection; `JOBHOST_DIRECT_URL`'s
    /// behind a transaction pooler; `None` behind one without it.
    pub direct: Option<PgConnectOptions>,
    /// Settings a fresh connection already has at session level, as
    /// `name=value` (set by a session-mode pooler such as PgBouncer, which
    /// replays the client's `TimeZone`, `DateStyle`... on the server
    /// session), or as a bare `name` for those a transaction pooler sets on
    /// whichever server session it hands over: the post-run check takes them
    /// as the connection's own, not as a plugin's leak. Empty on a direct
    /// connection.
    pub session_baseline: Vec<String>,
    /// The connections runs take: `pool` for jobs without a role, a pool
    /// per job role that logs in as that role.
    pub runs: crate::pools::RunPools,
}

/// Where the host's connections go (from the environment and `[host]`).
#[derive(Debug, Clone, Copy)]
pub struct Endpoints<'a> {
    /// `DATABASE_URL`: the pool.
    pub database_url: &'a str,
    /// `JOBHOST_DIRECT_URL`: Postgres itself, for what needs a real session.
    pub direct_url: Option<&'a str>,
    /// What `DATABASE_URL` leads to.
    pub pooler: Pooler,
}

/// The parameters a transaction pooler sets on a server session for each
/// client it hands it to (PgBouncer's tracked parameters): seen at session
/// level on any connection behind one, whoever set them.
const POOLER_TRACKED: [&str; 6] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "standard_conforming_strings",
    "TimeZone",
];

/// Connect options for `url` as the host uses them. Directly: server-side
/// keepalives and `client_connection_check_interval` ride in the startup
/// packet. Behind a transaction pooler: no startup parameters a pooler
/// refuses (`options`, `extra_float_digits`).
pub fn connect_options(
    url: &str,
    what: &str,
    pooler: Pooler,
    application_name: &str,
) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("invalid {what} (expected postgres://user@host:port/db)"))?;
    let options = options.application_name(application_name);
    Ok(match pooler {
        // Server-side keepalives: if this host vanishes without closing its
        // sockets, Postgres notices within ~1 min, ends the session and so
        // releases whatever lock the session's transaction held.
        //
        // `client_connection_check_interval`: a backend busy with a statement
        // checks every second that its client is still there, so a connection
        // the host closed mid-statement (a run cut off by its timeout) is
        // rolled back, and its lock released, within a second instead of when
        // the statement ends.
        Pooler::None => options.options([
            ("tcp_keepalives_idle", "30"),
            ("tcp_keepalives_interval", "10"),
            ("tcp_keepalives_count", "3"),
            ("client_connection_check_interval", "1000"),
        ]),
        // Statements a run's plugin prepares stay cached for the
        // transaction only ([`crate::tx::OpenTx`] closes them before it
        // ends); the host's own statements outside runs are unnamed
        // (`in_tx!`).
        Pooler::Transaction => options.extra_float_digits(None),
    })
}

/// Opens the host pool, applies (or, behind a transaction pooler without a
/// direct URL, checks) the host's migrations, and finds the connection for
/// what needs a real session.
///
/// Every connection carries `application_name = jobhost:<host_id>` so that
/// `pg_stat_activity` (and `pg_locks` joined to it) shows which host holds what.
pub async fn connect(
    endpoints: Endpoints<'_>,
    pool_size: u32,
    host_id: &str,
) -> anyhow::Result<Connected> {
    let app = application_name(host_id);
    let options = connect_options(
        endpoints.database_url,
        "DATABASE_URL",
        endpoints.pooler,
        &app,
    )?;
    let direct = match endpoints.direct_url {
        Some(url) => {
            let direct = connect_options(url, "JOBHOST_DIRECT_URL", Pooler::None, &app)?;
            // Session locks go there: it must be one session per connection.
            refuse_transaction_pooler(&direct, "JOBHOST_DIRECT_URL").await?;
            Some(direct)
        }
        None if endpoints.pooler == Pooler::None => Some(options.clone()),
        None => None,
    };
    let session_baseline = match endpoints.pooler {
        Pooler::None => refuse_transaction_pooler(&options, "DATABASE_URL").await?,
        Pooler::Transaction => {
            let mut conn = PgConnection::connect_with(&options)
                .await
                .context("cannot connect to Postgres (DATABASE_URL, through the pooler)")?;
            let mut baseline = session_settings(&mut conn)
                .await
                .context("cannot read a fresh connection's session settings")?;
            // Whatever value the pooler set them to last.
            for setting in &mut baseline {
                if let Some((name, _)) = setting.split_once('=')
                    && POOLER_TRACKED.iter().any(|t| t.eq_ignore_ascii_case(name))
                {
                    *setting = name.to_owned();
                }
            }
            baseline
        }
    };
    let pool = crate::pools::pool_options()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("cannot connect to Postgres (DATABASE_URL)")?;
    let runs = crate::pools::RunPools::new(
        pool.clone(),
        crate::pools::Template::from_url(endpoints.database_url, endpoints.pooler, &app)?,
    );
    match &direct {
        // The migrator takes a session-level advisory lock and prepares
        // statements: it needs a real session.
        Some(direct) => {
            // Named apart: the migrator holds a session lock on it, which
            // `jobhost locks` and the tests must not take for a leak.
            let migrating = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(direct.clone().application_name(&format!("{app}/migrate")))
                .await
                .context("cannot connect to Postgres to apply the host's migrations")?;
            MIGRATOR
                .run(&migrating)
                .await
                .context("cannot apply the host's migrations (schema `jobhost`)")?;
            migrating.close().await;
        }
        None => refuse_pending_migrations(&pool).await?,
    }
    // The settings the check's fingerprint covers, as this server has them
    // (after an upgrade, new ones). Without it the check stays right, and
    // only a setting the list lacks is left to the reset after each run.
    if let Err(e) = sqlx::raw_sql("select jobhost.watch_settings()")
        .execute(&pool)
        .await
    {
        tracing::warn!(error = %e, "cannot refresh jobhost.watched_settings (the settings the post-run check fingerprints); it keeps the list its migration made");
    }
    Ok(Connected {
        pool,
        direct,
        session_baseline,
        runs,
    })
}

/// Behind a transaction pooler without a direct URL the host cannot migrate;
/// it runs only if the schema is current (another host, or a deployment
/// step, migrated it through a direct connection).
async fn refuse_pending_migrations(pool: &PgPool) -> anyhow::Result<()> {
    use sqlx::Row as _;
    let rows = sqlx::raw_sql("select version from _sqlx_migrations where success")
        .fetch_all(pool)
        .await;
    let applied: Vec<i64> = match rows {
        Ok(rows) => rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<sqlx::Result<_>>()?,
        // 42P01: no migration was ever applied on this database.
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P01") => {
            Vec::new()
        }
        Err(e) => return Err(anyhow::Error::new(e).context("cannot read the applied migrations")),
    };
    let pending: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the host's schema (`jobhost`) needs migrations ({}), which need a real Postgres session, \
         not a transaction pooler: set JOBHOST_DIRECT_URL to Postgres itself (it is used for \
         migrations, session locks and LISTEN), or start one host with DATABASE_URL pointing at \
         Postgres directly once",
        pending.join(", ")
    )
}

/// Settings at session level on `conn`, as `name=value`.
async fn session_settings(conn: &mut PgConnection) -> sqlx::Result<Vec<String>> {
    use sqlx::Row as _;
    let rows = sqlx::raw_sql(
        "select name || '=' || setting from pg_settings where source = 'session' order by name",
    )
    .fetch_all(conn)
    .await?;
    rows.iter().map(|r| r.try_get::<String, _>(0)).collect()
}

/// What jobhost says when it finds a transaction pooler where it needs one
/// server session per connection.
const POOLER_ADVICE: &str = "point it at Postgres directly or at a pooler in session mode \
     (PgBouncer `pool_mode = session`); or, to run through the transaction pooler, set \
     `pooler = \"transaction\"` in jobs.toml `[host]` and JOBHOST_DIRECT_URL to Postgres itself \
     (for migrations, `session` locks and LISTEN)";

/// Refuses a transaction pooler (PgBouncer `pool_mode = transaction`, RDS
/// Proxy, Supavisor...) where the host expects one server session per
/// connection (`what` names the URL): a transaction pooler hands a
/// client's consecutive transactions to different server sessions, so named
/// prepared statements then point at other statements, session locks stay
/// behind on server connections other clients get (the bug this project
/// exists to prevent), NOTIFY is dropped. Never run into that silently.
///
/// The probe (simple queries only, which any pooler passes): two client
/// connections A and B; A and B each open a transaction (so the pooler must
/// give them different server sessions), one ends first, then B asks for
/// its backend pid outside a transaction. A pooler that reuses released
/// server sessions last-in-first-out hands B A's session in one order, a
/// first-in-first-out one in the other: across both, B sees another backend.
/// Directly connected, B's pid never changes. A pooler with a single server
/// session makes B's BEGIN wait for A's transaction, which a direct
/// connection never does.
///
/// Also: a pooler that refuses the startup parameters (`options`, which
/// carries the keepalives) is named as such, and one that drops them
/// silently is warned about. Returns the settings a fresh connection carries
/// at session level (see [`Connected::session_baseline`]).
pub async fn refuse_transaction_pooler(
    options: &PgConnectOptions,
    what: &str,
) -> anyhow::Result<Vec<String>> {
    use sqlx::{Connection as _, Row as _};
    let connect = || async {
        PgConnection::connect_with(options).await.map_err(|e| {
            let text = e.to_string();
            let e = anyhow::Error::new(e);
            if text.contains("unsupported startup parameter") {
                e.context(format!(
                    "cannot connect to Postgres ({what}): the server refused a startup parameter, which PgBouncer and other poolers do; {POOLER_ADVICE}"
                ))
            } else {
                e.context(format!("cannot connect to Postgres ({what})"))
            }
        })
    };
    async fn backend(conn: &mut PgConnection, sql: &'static str) -> sqlx::Result<i32> {
        let rows = sqlx::raw_sql(sql).fetch_all(conn).await?;
        rows.last()
            .ok_or(sqlx::Error::RowNotFound)?
            .try_get::<i32, _>(0)
    }
    let mut a = connect().await?;
    let mut b = connect().await?;
    let probe = async {
        let own = backend(&mut b, "select pg_backend_pid()").await?;
        for a_ends_first in [false, true] {
            backend(&mut a, "begin; select pg_backend_pid()").await?;
            let waited = tokio::time::timeout(
                Duration::from_secs(3),
                backend(&mut b, "begin; select pg_backend_pid()"),
            )
            .await;
            match waited {
                Err(_) => {
                    return Ok(Path::Pooler(
                        "a second client's BEGIN waited for the first client's transaction (one server session shared by both)".to_owned(),
                    ));
                }
                Ok(pid) => {
                    pid?;
                }
            }
            let order: [&mut PgConnection; 2] = if a_ends_first {
                [&mut a, &mut b]
            } else {
                [&mut b, &mut a]
            };
            for conn in order {
                sqlx::raw_sql("commit").execute(conn).await?;
            }
            let now = backend(&mut b, "select pg_backend_pid()").await?;
            if now != own {
                return Ok(Path::Pooler(format!(
                    "one client connection was served by backend {own}, then by backend {now}"
                )));
            }
        }
        // Startup options that did not arrive: a pooler dropping them.
        let check = sqlx::raw_sql("select current_setting('client_connection_check_interval')")
            .fetch_one(&mut b)
            .await?;
        let interval: String = check.try_get(0)?;
        Ok::<_, sqlx::Error>(if interval == "0" && options.get_options().is_some() {
            Path::OptionsDropped
        } else {
            Path::Direct
        })
    };
    let found = probe
        .await
        .with_context(|| format!("cannot probe the connection to Postgres ({what})"))?;
    let baseline = session_settings(&mut a)
        .await
        .context("cannot read a fresh connection's session settings")?;
    drop(a);
    drop(b);
    match found {
        Path::Direct => Ok(baseline),
        Path::OptionsDropped => {
            tracing::warn!(url = what, session_settings = ?baseline, "the connection's startup options (TCP keepalives, client_connection_check_interval) did not reach Postgres: a pooler may be dropping them; a vanished host is then noticed later");
            Ok(baseline)
        }
        Path::Pooler(what_found) => anyhow::bail!(
            "{what} leads to a transaction pooler, not to one Postgres session per connection: {what_found}. jobhost needs a real session there (locks, prepared statements and run transactions rely on it): {POOLER_ADVICE}"
        ),
    }
}

/// What [`refuse_transaction_pooler`] found between the host and Postgres.
enum Path {
    /// One server session per connection, startup options in force.
    Direct,
    /// One session per connection, but the startup options were dropped.
    OptionsDropped,
    /// Transactions of one connection reach different server sessions.
    Pooler(String),
}

/// Quotes an SQL identifier (`"name"`, inner quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal as `E'...'` (backslashes and quotes
/// doubled), which reads the same whatever `standard_conforming_strings` is.
/// Only for statements that cannot take parameters (`SET`, multi-statement
/// simple queries).
pub fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// How long past its timeout a run's transaction may sit idle before
/// Postgres ends it (and so releases the job's lock) on its own.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// The run's server-side deadline, as `SET LOCAL`s for the `BEGIN` of every
/// transaction that carries a job's work: no statement runs longer than the
/// job's timeout, and a transaction whose host stops talking (frozen,
/// partitioned, hung) is ended by Postgres a little after it. Sent with
/// `BEGIN` itself, so the lock taken next is bounded from the instant it is
/// granted.
pub fn backstops_sql(timeout_ms: u128) -> String {
    let idle_ms = timeout_ms + DEADLINE_MARGIN.as_millis();
    format!(
        "set local statement_timeout = {timeout_ms};\nset local idle_in_transaction_session_timeout = {idle_ms}"
    )
}

/// Whether `e` says the connection was already gone when a statement was
/// sent on it (closed by the server, reset, cut mid-message), rather than
/// that the statement failed: then nothing of its transaction was kept, and
/// the statement may be sent again on another connection. The server says
/// so itself when it closes a session: `connection_failure` and its kin
/// (08000, 08003, 08006), `admin_shutdown` (57P01: `pg_terminate_backend`, a
/// fast shutdown), `crash_shutdown` (57P02), `idle_session_timeout` (57P05).
/// Not `protocol_violation` (08P01), which PgBouncer also uses to refuse a
/// client (its `query_wait_timeout`): sending again would wait again.
pub fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            ["08000", "08003", "08006", "57P01", "57P02", "57P05"].contains(&code.as_ref())
        }),
        _ => false,
    }
}

/// `application_name` for a host's connections; Postgres truncates it at 63 bytes.
pub fn application_name(host_id: &str) -> String {
    format!("jobhost:{host_id}")
}

/// A default host id: `<hostname>:<pid>`, unique per process on a fleet.
pub fn default_host_id() -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{hostname}:{}", std::process::id())
}

/// What the history says about one slot, read under the job's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    /// A run of this slot succeeded (on any host).
    pub succeeded: bool,
    /// Finished attempts so far, of any outcome (numbers the next attempt).
    pub attempts: i32,
    /// Attempts that failed by the job's own doing (error, trap, timeout,
    /// lock lost): these count against `max-attempts` and drive the backoff.
    /// Runs lost to a dead host or interrupted by a shutdown do not.
    pub failures: i32,
    /// When the latest such failure finished.
    pub last_failure: Option<DateTime<Utc>>,
    /// The job is paused fleet-wide (`jobhost pause`).
    pub paused: bool,
}

/// What [`precheck`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precheck {
    /// Nothing against trying: go on to the lock.
    Free,
    /// Another session holds the job's lock now.
    LockHeld,
    /// The slot already succeeded.
    SlotDone,
}

/// Whether a `session` run should bother opening its lock connection: the
/// job's lock held by another session right now, or the slot already done,
/// say no at the cost of one read on a pooled connection rather than a new
/// server session. In a fleet, the hosts that lose a slot mostly find one or
/// the other. Advisory: the lock, taken next, still decides. (An `xact` run
/// needs no such step: its gate tries the lock in the run's first round
/// trip.)
pub async fn precheck(
    conn: &mut PgConnection,
    pooler: Pooler,
    job: &str,
    slot: DateTime<Utc>,
    lock: crate::lock::LockKey,
) -> sqlx::Result<Precheck> {
    // Try the lock itself rather than read `pg_locks` (which copies the whole
    // lock table under every partition's lock). If it is free, this
    // statement's own transaction holds it until it ends, microseconds later.
    const SQL: &str = "select not pg_try_advisory_xact_lock($3, $4),
                exists (select 1 from jobhost.runs where job = $1 and slot = $2 and outcome = 'ok')";
    let (held, done): (bool, bool) = match pooler {
        // Prepared once per connection: the cheapest for Postgres.
        // pooler: not behind one (the other arm)
        Pooler::None => {
            sqlx::query_as(SQL)
                .bind(job)
                .bind(slot)
                .bind(lock.namespace)
                .bind(lock.key)
                .fetch_one(conn)
                .await?
        }
        // Outside a transaction a pooler may split a prepared statement's
        // parse and execute across server sessions: a simple query instead.
        Pooler::Transaction => {
            use sqlx::Row as _;
            let sql = with_literals(
                SQL,
                &[
                    quote_literal(job),
                    timestamp_literal(slot),
                    lock.namespace.to_string(),
                    lock.key.to_string(),
                ],
            );
            let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .fetch_all(conn)
                .await?;
            let row = rows.last().ok_or(sqlx::Error::RowNotFound)?;
            (row.try_get(0)?, row.try_get(1)?)
        }
    };
    Ok(match (held, done) {
        (_, true) => Precheck::SlotDone,
        (true, false) => Precheck::LockHeld,
        (false, false) => Precheck::Free,
    })
}

/// `sql` with its parameters `$1`, `$2`... replaced by `literals` (already
/// quoted), for a simple query. Only for the host's own statements, whose
/// text has no `$` but its parameters.
fn with_literals(sql: &str, literals: &[String]) -> String {
    let mut out = sql.to_owned();
    // Highest first, so that `$1` does not match the start of `$10`.
    for (i, literal) in literals.iter().enumerate().rev() {
        out = out.replace(&format!("${}", i + 1), literal);
    }
    out
}

/// The database's clock, for judging slots and ages by one clock across the
/// fleet (a simple query: through any pooler).
pub async fn now(pool: &PgPool) -> sqlx::Result<DateTime<Utc>> {
    let mut conn = pool.acquire().await?;
    simple_one(&mut conn, "select clock_timestamp()".to_owned()).await
}

/// Runs a simple query and decodes the first column of its last row.
pub async fn simple_one<T>(conn: &mut PgConnection, sql: String) -> sqlx::Result<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    use sqlx::Row as _;
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(conn)
        .await?;
    rows.last().ok_or(sqlx::Error::RowNotFound)?.try_get(0)
}

/// `'…'::timestamptz` for an instant (RFC 3339, UTC; no quote can occur).
pub fn timestamp_literal(t: DateTime<Utc>) -> String {
    format!(
        "'{}'::timestamptz",
        t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    )
}

/// `in_tx!(pool, |c| body)`: evaluates `body` (a `sqlx::Result`, using
/// `c: &mut PgConnection`) in a transaction of its own, and commits; a
/// future of `sqlx::Result<_>`. The form every host
/// statement outside a run takes. Through a transaction pooler, an
/// extended-protocol statement outside a transaction is two syncs (parse,
/// then bind and execute) that the pooler may send to two different server
/// sessions, the second binding whatever another client parsed there; inside
/// `BEGIN` the pooler keeps one session until `COMMIT`. Statements in `body`
/// must be unnamed (`.persistent(false)`): a named one would outlive the
/// transaction on a server session this client may never see again. (A
/// macro, not a function taking an async closure: such a closure's future
/// is not `Send` for every lifetime, which `tokio::spawn` needs.)
macro_rules! in_tx {
    ($pool:expr, |$c:ident| $body:expr) => {
        async {
            let mut tx = $pool.begin().await?;
            let out = {
                let $c: &mut sqlx::PgConnection = &mut tx;
                $body
            }?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(out)
        }
    };
}
pub(crate) use in_tx;

/// What [`slot_gate_sql`] returns: the lock, the database clock, and the
/// slot's history when the lock is held and the slot is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotGate {
    /// The job's lock is held (taken by this call, or held by the caller).
    pub locked: bool,
    /// The database's clock when the lock was tried.
    pub db_now: DateTime<Utc>,
    /// `None` when not locked or the clock has not reached the slot.
    pub history: Option<SlotHistory>,
}

/// What the gate read and drew under the lock, for a slot that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHistory {
    /// Runs of dead hosts recorded `lost` on the way.
    pub lost: u64,
    /// The slot's history.
    pub state: SlotState,
    /// The id of the run about to start (from `jobhost.runs`'s sequence): its
    /// in-flight entry and its row carry it. Drawn only when the slot may
    /// run: `None` for a slot that succeeded or a paused job.
    pub run_id: Option<i64>,
    /// The backend the gate ran on: the run's, or a `session` run's lock
    /// connection.
    pub backend_pid: i32,
    /// What proves the run's row is written for this run (with `run_id`),
    /// from the gate of a job with a role (`jobhost.run_gate`):
    /// `jobhost.record_run` takes nothing else. Never lent to the plugin.
    pub run_token: Option<RunToken>,
}

/// A run's token, from its gate (migration `…_job_roles`): a keyed hash of
/// the run's id and job whose key only the database holds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RunToken([u8; 32]);

impl std::fmt::Debug for RunToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Kept out of logs and panics like any credential.
        f.write_str("RunToken(..)")
    }
}

impl RunToken {
    /// The token as the gate returns it (hex).
    fn parse(hex_text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// As a literal for `jobhost.record_run`.
    fn literal(&self) -> String {
        format!("'{}'", hex::encode(self.0))
    }
}

/// The statement that gates a run (the function `jobhost.slot_gate`,
/// migrations `…0008`, `…0009`; for a job with a role, `as_job_role`, on a
/// connection that logs in as that role, `jobhost.run_gate`, migration
/// `…_job_roles`, which runs it with the host's rights for a role admitted
/// for the job and returns the run's token too): with `lock`, it tries the job's
/// transaction-level lock; without, the caller holds the lock elsewhere (a
/// `session` run). Under the lock, it records the published runs of `job`
/// whose host is dead (see [`crate::hosts`]: not seen for `lost_after`, or
/// stopped) `lost`, reads the history of `slot`, and draws the run's id.
/// With literals, so that it rides in the simple query that opens the run's
/// transaction (nothing prepared, safe through a transaction pooler); its own
/// statements' plans are cached by PL/pgSQL per server session.
///
/// Recording under the job's lock is safe: no other run of the job is then
/// in its transaction, and a dead host's run died with it (its transaction
/// was rolled back by Postgres: the run's deadline, keepalives). Runs of live
/// hosts, this one's included, are their own heartbeat's to judge
/// ([`crate::in_flight`]).
pub fn slot_gate_sql(
    job: &str,
    slot: DateTime<Utc>,
    host_id: &str,
    lost_after: Duration,
    lock: Option<crate::lock::LockKey>,
    as_job_role: bool,
) -> String {
    let (ns, key) = match lock {
        Some(k) => (k.namespace.to_string(), k.key.to_string()),
        None => ("null".to_owned(), "null".to_owned()),
    };
    format!(
        "select * from jobhost.{}({}, {}, {}, {}::float8, {ns}, {key})",
        if as_job_role { "run_gate" } else { "slot_gate" },
        quote_literal(job),
        timestamp_literal(slot),
        quote_literal(host_id),
        lost_after.as_secs_f64(),
    )
}

impl SlotGate {
    /// Decodes the row of [`slot_gate_sql`] (text or binary format).
    pub fn from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<Self> {
        use sqlx::Row as _;
        let locked: bool = row.try_get("locked")?;
        let db_now: DateTime<Utc> = row.try_get("db_now")?;
        let lost: Option<i64> = row.try_get("lost")?;
        let history = match lost {
            None => None,
            Some(lost) => Some(SlotHistory {
                lost: u64::try_from(lost).unwrap_or(0),
                state: SlotState {
                    succeeded: row.try_get("succeeded")?,
                    attempts: row.try_get("attempts")?,
                    failures: row.try_get("failures")?,
                    last_failure: row.try_get("last_failure")?,
                    paused: row.try_get("paused")?,
                },
                run_id: row.try_get("run_id")?,
                backend_pid: row.try_get("backend_pid")?,
                run_token: run_token(row)?,
            }),
        };
        Ok(Self {
            locked,
            db_now,
            history,
        })
    }
}

/// The run's token in a gate's row: `None` from `jobhost.slot_gate`, which
/// has no such column, and for a slot that does not run.
fn run_token(row: &sqlx::postgres::PgRow) -> sqlx::Result<Option<RunToken>> {
    use sqlx::{Column as _, Row as _};
    if !row.columns().iter().any(|c| c.name() == "run_token") {
        return Ok(None);
    }
    row.try_get::<Option<String>, _>("run_token")?
        .map(|t| {
            RunToken::parse(&t).ok_or_else(|| {
                sqlx::Error::Decode("jobhost.run_gate returned a malformed token".into())
            })
        })
        .transpose()
}

/// [`slot_gate_sql`] on its own, for a caller that already holds the job's
/// lock (a `session` run, on its lock connection).
pub async fn slot_history(
    conn: &mut PgConnection,
    job: &str,
    slot: DateTime<Utc>,
    host_id: &str,
    lost_after: Duration,
) -> sqlx::Result<SlotGate> {
    let sql = slot_gate_sql(job, slot, host_id, lost_after, None, false);
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_one(conn)
        .await?;
    SlotGate::from_row(&row)
}

/// A run, as its one row in `jobhost.runs` names it: written when the run
/// ends (the run's id is drawn by its gate; a run that failed before its gate
/// has none and gets a fresh one).
#[derive(Debug, Clone)]
pub struct RunRow {
    /// The job.
    pub job: String,
    /// The slot.
    pub slot: DateTime<Utc>,
    /// The host that ran it.
    pub host_id: String,
    /// Which plugin version ran.
    pub plugin_sha256: String,
    /// When it started (database clock; `None`: when the row is written).
    pub started_at: Option<DateTime<Utc>>,
    /// The backend it ran on (the lock connection's, for a `session` run).
    pub backend_pid: Option<i32>,
}

/// Writes a run's one row outside the run's transaction, on a connection
/// of the host's own (a run cut off, or failed before its plugin). A row of
/// that id already there (the run did commit, or the next holder of the lock
/// recorded it `lost`) stands.
pub async fn finish_run(
    conn: &mut PgConnection,
    id: Option<i64>,
    row: &RunRow,
    run: &RunRecord<'_>,
) -> sqlx::Result<()> {
    let sql = format!(
        "{} on conflict (id) do nothing",
        insert_run_sql(id, row, run)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(conn)
        .await?;
    Ok(())
}

/// The run's one row, written in its own transaction, with literals (it
/// rides in a multi-statement simple query, which cannot take parameters):
/// an `ok` commits atomically with the work it describes. On the host's own
/// connection (`token` `None`) an `INSERT`; on one that logs in as the job's
/// role, `jobhost.record_run` with the token the run's gate drew (migration
/// `…_job_roles`), the role having no right to the table.
pub fn record_sql(id: i64, token: Option<RunToken>, row: &RunRow, run: &RunRecord<'_>) -> String {
    let Some(token) = token else {
        return insert_run_sql(Some(id), row, run);
    };
    format!(
        "select jobhost.record_run({}, {id}, {}, {}, {}, {})",
        token.literal(),
        run_values(row, run)[..].join(", "),
        quote_literal(run.outcome.as_str()),
        quote_literal(&message_text(run.message)),
        pid_literal(row.backend_pid),
    )
}

/// `INSERT` of a run's one row (a fresh id when `id` is `None`).
fn insert_run_sql(id: Option<i64>, row: &RunRow, run: &RunRecord<'_>) -> String {
    format!(
        "insert into jobhost.runs (id, job, slot, attempt, host_id, plugin_sha256, started_at, \
         finished_at, outcome, message, backend_pid) \
         values ({}, {}, pg_catalog.clock_timestamp(), {}, {}, {})",
        id.map_or_else(|| "default".to_owned(), |id| id.to_string()),
        run_values(row, run)[..].join(", "),
        quote_literal(run.outcome.as_str()),
        quote_literal(&message_text(run.message)),
        pid_literal(row.backend_pid),
    )
}

/// The row's job, slot, attempt, host, plugin and start, as literals (a
/// start not known yet is when the row is written).
fn run_values(row: &RunRow, run: &RunRecord<'_>) -> [String; 6] {
    [
        quote_literal(&row.job),
        timestamp_literal(row.slot),
        run.attempt.to_string(),
        quote_literal(&row.host_id),
        quote_literal(&row.plugin_sha256),
        row.started_at.map_or_else(
            || "pg_catalog.clock_timestamp()".to_owned(),
            timestamp_literal,
        ),
    ]
}

/// A run's message as Postgres text, which cannot hold NUL (a plugin's can).
fn message_text(message: &str) -> String {
    message.replace('\0', "\u{fffd}")
}

fn pid_literal(pid: Option<i32>) -> String {
    pid.map_or_else(|| "null".to_owned(), |p| p.to_string())
}

/// Pauses `job` fleet-wide; `false` if it already was.
pub async fn pause(pool: &PgPool, job: &str, by: &str) -> sqlx::Result<bool> {
    let done = crate::db::in_tx!(pool, |c| {
        sqlx::query(
            "insert into jobhost.paused (job, paused_by) values ($1, $2) on conflict (job) do nothing",
        )
        .bind(job)
        .bind(by)
        .persistent(false)
        .execute(c)
        .await
    })
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Resumes `job`; `false` if it was not paused.
pub async fn resume(pool: &PgPool, job: &str) -> sqlx::Result<bool> {
    let done = crate::db::in_tx!(pool, |c| {
        sqlx::query("delete from jobhost.paused where job = $1")
            .bind(job)
            .persistent(false)
            .execute(c)
            .await
    })
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The earliest slot `job` has any record of, finished or published in
/// flight (none for a new job).
pub async fn first_slot(pool: &PgPool, job: &str) -> sqlx::Result<Option<DateTime<Utc>>> {
    crate::db::in_tx!(pool, |c| {
        sqlx::query_scalar(
            "select least((select min(slot) from jobhost.runs where job = $1),
                          (select min(slot) from jobhost.in_flight where job = $1))",
        )
        .bind(job)
        .persistent(false)
        .fetch_one(c)
        .await
    })
    .await
}

/// Slots of `job` at or after `since` that have a successful run.
pub async fn succeeded_slots(
    pool: &PgPool,
    job: &str,
    since: DateTime<Utc>,
) -> sqlx::Result<Vec<DateTime<Utc>>> {
    crate::db::in_tx!(pool, |c| {
        sqlx::query_scalar(
            "select slot from jobhost.runs where job = $1 and slot >= $2 and outcome = 'ok' order by slot",
        )
        .bind(job)
        .bind(since)
        .persistent(false)
        .fetch_all(c)
        .await
    })
    .await
}

#[cfg(test)]
mod tests {
    /// Every extended-protocol statement the host sends outside a run's
    /// transaction must pass a transaction pooler: unnamed, inside its own
    /// transaction (`db::in_tx!`). A named or bare one works directly and
    /// corrupts silently behind PgBouncer (issue: another client's statement
    /// executed), so this reads the source rather than trusting review.
    /// Exempt: the plugin's statements (`runtime/values.rs`, inside the run's
    /// transaction, closed before it ends), the `session` lock connection
    /// (`runner/session.rs`, a direct connection by construction), and
    /// statements after a `// pooler: ` comment that says why they are safe.
    #[test]
    fn host_statements_outside_runs_pass_a_transaction_pooler() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(&src)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                if ["runtime/values.rs", "runner/session.rs"].contains(&rel.as_str()) {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Spelled in two halves so that this test does not find itself.
                for (at, _) in text.match_indices(concat!("sqlx::", "query")) {
                    let line = text[..at].lines().count();
                    let statement = &text[at..];
                    let end = statement.find(".await").unwrap_or(statement.len());
                    let before = &text[at.saturating_sub(300)..at];
                    if !statement[..end].contains(".persistent(false)")
                        && !before.contains("// pooler: ")
                    {
                        offenders.push(format!("{rel}:{line}"));
                    }
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "statements without .persistent(false) (and db::in_tx): {offenders:?}"
        );
    }
}
