//! Helpers shared by the integration tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, TimeDelta, Utc};
use jobhost::lock::LockKey;
use jobhost::runner::{Job, RunResult, Runner};
use jobhost::runtime::{Plugin, Runtime};
use sqlx::PgPool;

pub use jobhost_tests::Scratch;

/// One engine for the whole test binary (as in a host process).
pub fn runtime() -> Arc<Runtime> {
    static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
    RT.get_or_init(|| Arc::new(Runtime::new().expect("engine")))
        .clone()
}

/// Loads (and caches) a compiled plugin.
pub fn plugin(path: &str) -> Plugin {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Plugin>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().unwrap().get(Path::new(path)) {
        return p.clone();
    }
    let p = runtime().load(Path::new(path)).expect("load plugin");
    cache.lock().unwrap().insert(path.into(), p.clone());
    p
}

/// A job over `plugin_path` with the given config.
pub fn job(name: &str, plugin_path: &str, config: &[(&str, &str)]) -> Job {
    Job {
        config: jobhost_tests::job_config(name, plugin_path, config),
        plugin: plugin(plugin_path),
    }
}

/// The core probe guest configured with `mode`.
pub fn probe(name: &str, mode: &str) -> Job {
    job(
        name,
        jobhost_tests::guests::TEST_CORE_PROBE,
        &[("mode", mode)],
    )
}

/// A probe job that sleeps `ms` milliseconds in its plugin (a run long
/// enough to be seen in flight).
pub fn sleeper(name: &str, ms: u64) -> Job {
    job(
        name,
        jobhost_tests::guests::TEST_CORE_PROBE,
        &[("mode", "sleep"), ("sleep-ms", &ms.to_string())],
    )
}

/// `job`'s run of `slot` on `runner`, in a task of its own.
pub fn spawn_run(
    runner: &Runner,
    job: &Job,
    slot: DateTime<Utc>,
) -> tokio::task::JoinHandle<anyhow::Result<RunResult>> {
    let (runner, job) = (runner.clone(), job.clone());
    tokio::spawn(async move { runner.run(&job, slot).await })
}

/// A runner on `pool`.
pub fn runner(pool: &PgPool) -> Runner {
    Runner::new(pool.clone(), runtime(), "test-host")
}

/// Admits `job`'s role for it, as a host's start does
/// ([`jobhost::roles::Admitted::admit`], for the runner's host id): its runs
/// log in as the role, and the gate acts for a job only for a role admitted
/// for it.
pub async fn admit(pool: &PgPool, job: &Job) {
    jobhost::roles::Admitted::new("test-host")
        .admit(
            &jobhost::pools::RunPools::over(pool.clone()),
            std::slice::from_ref(&job.config),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot admit job `{}`'s role: {e:#}", job.config.name));
}

/// Distinct slots in the past: slot(n) = a fixed day + n seconds.
pub fn slot(n: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + TimeDelta::seconds(n)
}

/// Creates the table the probe guest writes to.
pub async fn create_probe_table(pool: &PgPool) {
    sqlx::query("create table probe (id bigserial primary key, note text not null)")
        .execute(pool)
        .await
        .unwrap();
}

/// Rows in `probe`.
pub async fn probe_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from probe")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Advisory locks currently held in this database (any backend).
pub async fn advisory_locks(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Advisory locks in this database other than `key`'s (a job that is
/// legitimately running elsewhere in the test).
pub async fn advisory_locks_except(pool: &PgPool, key: LockKey) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_locks
          where locktype = 'advisory'
            and database = (select oid from pg_database where datname = current_database())
            and not (objsubid = 2 and classid::bigint = ($1::bigint & 4294967295)
                     and objid::bigint = ($2::bigint & 4294967295))",
    )
    .bind(key.namespace)
    .bind(key.key)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// `(outcome, message)` of every recorded run of `job`, oldest first.
pub async fn runs(pool: &PgPool, job: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "select outcome, coalesce(message, '') from jobhost.runs where job = $1 order by id",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Asserts the run finished with `outcome` and returns its message.
pub fn finished(result: RunResult, outcome: jobhost::db::Outcome) -> String {
    match result {
        RunResult::Finished {
            outcome: o,
            message,
            ..
        } if o == outcome => message,
        other => panic!("expected a finished run with {outcome:?}, got {other:?}"),
    }
}

/// Captures `tracing` output on the current thread (sqlx::test runs a
/// current-thread runtime, so the runner's events land here).
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl LogCapture {
    /// Starts capturing.
    pub fn start() -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || CaptureWriter(writer.clone()))
            .finish();
        Self {
            buf,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The URL of the test's own database (DATABASE_URL with the name replaced).
pub async fn database_url(pool: &PgPool) -> String {
    let db: String = sqlx::query_scalar("select current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    jobhost_tests::with_database(&std::env::var("DATABASE_URL").unwrap(), &db)
}

/// The run of `job` that is inside its plugin right now, as (run id,
/// backend pid): its host has published it in flight
/// ([`jobhost::in_flight`]), and its backend is idle in the run's
/// transaction with the job in its `application_name` (set after the lock
/// and the history checks).
pub async fn run_in_plugin(pool: &PgPool, job: &str) -> Option<(i64, i32)> {
    sqlx::query_as(
        "select f.run_id, f.backend_pid from jobhost.in_flight f
           join pg_stat_activity a on a.pid = f.backend_pid
          where f.job = $1
            and a.state = 'idle in transaction' and a.application_name like '%/' || $1",
    )
    .bind(job)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// The backend of the run of `job` that is inside its plugin right now
/// (idle in the run's transaction, with the job in its `application_name`),
/// published or not.
pub async fn backend_in_plugin(pool: &PgPool, job: &str) -> Option<i32> {
    sqlx::query_scalar(
        // This test's database only: tests run side by side, and another
        // may run a job of the same name.
        "select pid from pg_stat_activity
          where datname = current_database()
            and state = 'idle in transaction' and application_name like '%/' || $1",
    )
    .bind(job)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Polls `cond` every 10 ms until it holds; fails the test after `within`.
pub async fn wait_for<F, Fut>(within: std::time::Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_some(within, what, || {
        let fut = cond();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `probe` every 10 ms until it yields a value and returns that value;
/// fails the test after `within`. Returning what the successful poll saw,
/// rather than querying again afterwards, is what keeps a test from racing a
/// run that ends between the wait and the next query.
pub async fn wait_for_some<T, F, Fut>(within: std::time::Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// `GET path` on loopback; (status line, body).
pub async fn http_get(port: u16, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `toml` as the `jobs.toml` of a scratch directory of its own
/// (named by `tag`): the directory, to keep while the file is used, and the
/// file's path.
pub fn jobs_file(tag: &str, toml: &str) -> (Scratch, std::path::PathBuf) {
    let dir = Scratch::new(tag);
    let file = dir.join("jobs.toml");
    std::fs::write(&file, toml).unwrap();
    (dir, file)
}

/// `jobhost --config CONFIG --database-url URL ARGS...`, for `run_cli`.
pub fn cli_args(config: &Path, url: &str, args: &[&str]) -> Vec<std::ffi::OsString> {
    let config = config.display().to_string();
    ["jobhost", "--config", &config, "--database-url", url]
        .iter()
        .chain(args)
        .map(Into::into)
        .collect()
}

/// A runner on `pool` for another host id (fleet tests in one process).
pub fn runner_as(pool: &PgPool, host_id: &str) -> Runner {
    Runner::new(pool.clone(), runtime(), host_id)
}

/// A role that may write `probe` and create objects in schema `jobspace`
/// (what "a job role that can create a function in any schema" means), and
/// that schema. Roles are cluster-wide: the name is unique to the database.
pub async fn restricted_role(pool: &PgPool) -> String {
    let db: String = sqlx::query_scalar("select current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    // Test databases are named per test; so is the role. A role left by an
    // earlier, failed run of the same test is dropped first.
    let role = format!("jhjob_{}", &db[db.len().saturating_sub(16)..]);
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_roles where rolname = $1)")
            .bind(&role)
            .fetch_one(pool)
            .await
            .unwrap();
    if exists {
        drop_role(pool, &role).await;
    }
    for sql in [
        format!("create role \"{role}\" login"),
        format!("grant usage, create on schema jobspace to \"{role}\""),
        format!("grant insert, select on probe to \"{role}\""),
        format!("grant usage on sequence probe_id_seq to \"{role}\""),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .unwrap();
    }
    role
}

/// Drops `role` and what it owns (roles are cluster-wide: every test that
/// made one drops it).
pub async fn drop_role(pool: &PgPool, role: &str) {
    let sql = format!("drop owned by \"{role}\" cascade; drop role \"{role}\"");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .unwrap();
}

/// The probe table, schema `jobspace` and a restricted role that may create
/// in it ([`restricted_role`]); the role.
pub async fn jobspace_and_role(pool: &PgPool) -> String {
    create_probe_table(pool).await;
    sqlx::query("create schema jobspace")
        .execute(pool)
        .await
        .unwrap();
    restricted_role(pool).await
}

/// A test's scratch directory goes with the test, unless the test failed:
/// then its host logs are kept to be read.
#[test]
fn a_scratch_directory_is_removed_unless_its_test_failed() {
    let passed = Scratch::new("scratch-passed");
    std::fs::write(passed.join("host.log"), "ok").unwrap();
    let path = passed.to_path_buf();
    drop(passed);
    assert!(!path.exists(), "{} outlived its test", path.display());

    let failed = std::panic::catch_unwind(|| {
        let dir = Scratch::new("scratch-failed");
        std::fs::write(dir.join("host.log"), "why it failed").unwrap();
        let path = dir.to_path_buf();
        std::panic::panic_any(path);
    });
    let path = *failed
        .expect_err("the test failed")
        .downcast::<PathBuf>()
        .unwrap();
    let kept = std::fs::read_to_string(path.join("host.log"));
    let _ = std::fs::remove_dir_all(&path);
    assert_eq!(kept.unwrap(), "why it failed", "the failed test's log");
}
