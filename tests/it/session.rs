//! Long jobs: the session lock on a dedicated connection, lock loss, short
//! independent transactions, no pool starvation, and outbound HTTP with SSRF
//! refusal. HTTP only ever goes to a server this test starts on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jobhost::config::LockMode;
use jobhost::db::Outcome;
use jobhost::runner::Job;
use jobhost::runtime::http::HttpGrant;
use jobhost::schedule::Schedule;
use jobhost_tests::guests;
use sqlx::PgPool;

use crate::support::*;

fn session_job(name: &str, plugin: &str, config: &[(&str, &str)]) -> Job {
    let mut job = job(name, plugin, config);
    job.config.lock = LockMode::Session;
    job.config.heartbeat = Duration::from_millis(200);
    job
}

/// A loopback HTTP server answering `200 pong` that counts the connections it accepted.
async fn loopback_server() -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong",
                    )
                    .await;
            });
        }
    });
    (addr, accepted)
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn the_session_lock_lives_on_a_dedicated_connection_and_is_unlocked_there(pool: PgPool) {
    create_probe_table(&pool).await;
    let logs = LogCapture::start();
    let job = session_job(
        "long",
        guests::TEST_SESSION_PROBE,
        &[("mode", "hold"), ("sleep-ms", "800")],
    );
    // Observe the lock from another thread while the run is awaited here (so
    // the log capture of this thread sees the runner's events).
    let options = pool.connect_options().as_ref().clone();
    let observer = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            // The run's precheck holds the job's lock for microseconds on a
            // pooled connection (it tries the lock in a statement of its
            // own): a lock is the run's only once two polls in a row see it.
            let mut before = None;
            loop {
                let seen: Option<(i32, String, String)> = sqlx::query_as(
                    "select l.pid, a.application_name, l.mode from pg_locks l
                       join pg_stat_activity a on a.pid = l.pid
                      where l.locktype = 'advisory' and a.datname = current_database()",
                )
                .fetch_optional(&pool)
                .await
                .unwrap();
                let held = seen.is_some() && seen == before;
                before = seen.clone();
                if let Some(seen) = seen.filter(|_| held) {
                    let pooled: Vec<i32> = sqlx::query_scalar(
                        "select pid from pg_stat_activity
                          where application_name = 'jobhost:test-host' and datname = current_database()",
                    )
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                    return (seen, pooled);
                }
                assert!(Instant::now() < deadline, "no session lock seen");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    });
    // The host's pool, named as a host names its connections, so the
    // observer can list them.
    let host_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(
            pool.connect_options()
                .as_ref()
                .clone()
                .application_name("jobhost:test-host"),
        )
        .await
        .unwrap();
    let msg = finished(
        runner(&host_pool).run(&job, slot(1)).await.unwrap(),
        Outcome::Ok,
    );
    assert_eq!(msg, "held 800 ms");
    let ((holder, app, mode), pooled) = observer.join().unwrap();
    assert!(
        app.ends_with("/long/lock"),
        "a connection of its own: {app}"
    );
    assert_eq!(mode, "ExclusiveLock");
    assert!(
        !pooled.is_empty(),
        "the run's precheck went through the pool, which must be listed"
    );
    assert!(
        !pooled.contains(&holder),
        "holder {holder} is one of the pool's: {pooled:?}"
    );
    host_pool.close().await;

    let text = logs.text();
    let released = text
        .lines()
        .find(|l| l.contains("session lock released"))
        .unwrap_or_default();
    assert!(
        released.contains(&format!("pid={holder}")),
        "unlocked on the holder's own backend, which answered true: {released}"
    );
    assert!(!text.contains("returned false"), "{text}");
    assert_eq!(advisory_locks(&pool).await, 0);
    assert_eq!(probe_rows(&pool).await, 1);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_terminated_lock_backend_interrupts_the_run_within_the_heartbeat(pool: PgPool) {
    create_probe_table(&pool).await;
    let job = session_job(
        "zombie",
        guests::TEST_SESSION_PROBE,
        &[("mode", "hold"), ("sleep-ms", "20000")],
    );
    let task = {
        let (runner, job) = (runner(&pool), job.clone());
        tokio::spawn(async move { runner.run(&job, slot(1)).await })
    };
    wait_for(Duration::from_secs(10), "the session lock", || async {
        advisory_locks(&pool).await == 1
    })
    .await;
    wait_for(
        Duration::from_secs(10),
        "the plugin's open transaction",
        || open_write(&pool),
    )
    .await;
    let killed_at = Instant::now();
    terminate_lock_holder(&pool).await;
    let result = task.await.unwrap().unwrap();
    let took = killed_at.elapsed();
    let msg = finished(result, Outcome::LockLost);
    assert!(msg.contains("lock lost"), "{msg}");
    // Heartbeat 200 ms, ping timeout 1 s: interrupted well before the 20 s sleep.
    assert!(took < Duration::from_secs(5), "interrupted after {took:?}");
    assert_eq!(runs(&pool, "zombie").await[0].0, "lock_lost");
    assert_eq!(
        probe_rows(&pool).await,
        0,
        "the open transaction was rolled back"
    );
    assert_eq!(advisory_locks(&pool).await, 0);
}

/// Terminates the backend holding this database's (one) advisory lock: a
/// session job's lock connection dying.
async fn terminate_lock_holder(pool: &PgPool) {
    let holder: i32 = sqlx::query_scalar(
        "select pid from pg_locks where locktype = 'advisory'
            and database = (select oid from pg_database where datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let _: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(holder)
        .fetch_one(pool)
        .await
        .unwrap();
}

/// Whether some backend of this database sits in a transaction that wrote
/// (has an xid): a session plugin's open short transaction.
async fn open_write(pool: &PgPool) -> bool {
    sqlx::query_scalar::<_, i64>(
        "select count(*) from pg_stat_activity
          where datname = current_database() and state = 'idle in transaction'
            and backend_xid is not null",
    )
    .fetch_one(pool)
    .await
    .unwrap()
        >= 1
}

/// A session job never commits after its lock is gone, even before its
/// heartbeat notices: the COMMIT's own query checks, in the database, that the
/// run's lock connection still holds the lock.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_session_job_never_commits_after_its_lock_is_gone(pool: PgPool) {
    create_probe_table(&pool).await;
    let mut job = session_job(
        "late",
        guests::TEST_SESSION_PROBE,
        &[("mode", "hold"), ("sleep-ms", "1500")],
    );
    // Far longer than the run: the heartbeat will not notice in time.
    job.config.heartbeat = Duration::from_secs(30);
    let key = job.config.lock_key;
    let task = {
        let (runner, job) = (runner(&pool), job.clone());
        tokio::spawn(async move { runner.run(&job, slot(1)).await })
    };
    wait_for(
        Duration::from_secs(10),
        "the plugin's open transaction",
        || open_write(&pool),
    )
    .await;
    // The lock connection dies and someone else takes the lock at once.
    terminate_lock_holder(&pool).await;
    let mut thief = pool.acquire().await.unwrap();
    wait_for(Duration::from_secs(5), "the lock to be free", || async {
        advisory_locks(&pool).await == 0
    })
    .await;
    let taken: bool = sqlx::query_scalar("select pg_try_advisory_lock($1, $2)")
        .bind(key.namespace)
        .bind(key.key)
        .fetch_one(&mut *thief)
        .await
        .unwrap();
    assert!(taken);
    let result = task.await.unwrap().unwrap();
    match &result {
        jobhost::runner::RunResult::Finished { outcome, .. } => assert!(
            matches!(outcome, Outcome::Error | Outcome::LockLost),
            "{result:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        probe_rows(&pool).await,
        0,
        "the plugin committed after its lock was gone: {result:?}"
    );
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn one_failing_transaction_leaves_the_others_committed(pool: PgPool) {
    create_probe_table(&pool).await;
    let job = session_job(
        "batches",
        guests::TEST_SESSION_PROBE,
        &[("mode", "commit-each"), ("count", "5"), ("fail-at", "3")],
    );
    let msg = finished(runner(&pool).run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(msg, "4 committed, 1 failed");
    let notes: Vec<(String,)> = sqlx::query_as("select note from probe order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let suffixes: Vec<String> = notes
        .iter()
        .map(|(n,)| n.rsplit('-').next().unwrap().to_owned())
        .collect();
    assert_eq!(suffixes, ["1", "2", "4", "5"]);
    assert_eq!(advisory_locks(&pool).await, 0);
    // The same job is refused an `xact` plugin's world, and vice versa.
    let mut wrong = job.clone();
    wrong.config.lock = LockMode::Xact;
    assert!(jobhost::runner::check_plugin_kind(&wrong.config, &wrong.plugin).is_err());
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_handle_whose_scope_ended_refuses_every_call(pool: PgPool) {
    create_probe_table(&pool).await;
    let job = session_job(
        "after",
        guests::TEST_SESSION_PROBE,
        &[("mode", "after-scope")],
    );
    let msg = finished(runner(&pool).run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(
        msg,
        "Err(Error::ScopeClosed) | Err(Error::ScopeClosed) | Err(Error::ScopeClosed)"
    );
    let notes: Vec<(String,)> = sqlx::query_as("select note from probe")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        notes,
        vec![("committed".to_string(),)],
        "the late insert never reached Postgres"
    );
    assert_eq!(advisory_locks(&pool).await, 0);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn an_xact_job_keeps_its_cadence_with_a_pool_of_two_while_a_long_job_runs(pool: PgPool) {
    create_probe_table(&pool).await;
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let mut long = session_job(
        "long",
        guests::TEST_SESSION_PROBE,
        &[("mode", "hold"), ("sleep-ms", "2500")],
    );
    long.config.schedule = Schedule::every(Duration::from_secs(1));
    let mut ticker = probe("ticker", "write");
    ticker.config.schedule = Schedule::every(Duration::from_millis(200));
    let runner = jobhost::runner::Runner::new(small.clone(), runtime(), "small-host");
    jobhost::scheduler::run(
        runner,
        vec![long, ticker],
        Default::default(),
        tokio::time::sleep(Duration::from_millis(3200)),
    )
    .await;
    let long_runs: i64 = sqlx::query_scalar(
        "select count(*) from jobhost.runs where job = 'long' and outcome = 'ok'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(long_runs >= 1, "the long job ran");
    // Judged inside the long run's own window, by the database's clock: the
    // ticker's runs that started after the long run took its lock and ended
    // before it finished, against the 200 ms slots that window held. A ticker
    // starved of a connection while the long run holds one starts none there;
    // counting against the window rather than a fixed 3.2 s keeps a loaded
    // machine, whose scheduler starts everything late, from failing the test.
    let (during, due): (i64, f64) = sqlx::query_as(
        "select (select count(*) from jobhost.runs t
                  where t.job = 'ticker' and t.outcome = 'ok'
                    and t.started_at > l.started_at and t.finished_at < l.finished_at),
                extract(epoch from l.finished_at - l.started_at)::float8 / 0.2
           from jobhost.runs l
          where l.job = 'long' and l.outcome = 'ok'
          order by l.started_at
          limit 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        due >= 10.0,
        "the long run held its connection for 2.5 s: {due} slots"
    );
    // ~12 slots; a quarter of them leaves room for a loaded CI box, and
    // starvation (none) cannot pass.
    assert!(
        during as f64 >= due / 4.0,
        "the xact job kept its cadence while the long run held a connection: \
         {during} runs in a window of {due:.1} slots"
    );
    small.close().await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn http_is_granted_per_job_and_internal_addresses_are_refused_before_connecting(
    pool: PgPool,
) {
    create_probe_table(&pool).await;
    let (addr, accepted) = loopback_server().await;
    let grant = |allow: &[&str], allow_private: bool| HttpGrant {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        allow_private,
        allow_unpinned_https: false,
        timeout: Duration::from_secs(5),
        max_response_bytes: 1024,
    };
    let logs = LogCapture::start();
    let runner = runner(&pool);

    // Allowed: loopback, explicitly allow-listed with allow-private.
    let url = format!("http://{addr}/ping");
    let mut allowed = session_job(
        "allowed",
        guests::TEST_SESSION_PROBE,
        &[("mode", "http"), ("urls", &url)],
    );
    allowed.config.http = Some(grant(&[&addr], true));
    let msg = finished(runner.run(&allowed, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(msg, format!("{url} -> 200 pong"));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Metadata, RFC 1918 and loopback without allow-private: refused after
    // resolution and before any connection (the loopback server sees nothing).
    let targets = format!("http://169.254.169.254/latest/meta-data/,http://10.0.0.1/,{url}");
    let mut internal = session_job(
        "internal",
        guests::TEST_SESSION_PROBE,
        &[("mode", "http"), ("urls", &targets)],
    );
    internal.config.http = Some(grant(&["169.254.169.254", "10.0.0.1", &addr], false));
    let started = Instant::now();
    let msg = finished(runner.run(&internal, slot(1)).await.unwrap(), Outcome::Ok);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no connect timeout was waited for"
    );
    assert_eq!(
        msg.matches("destination address prohibited").count(),
        3,
        "{msg}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "no connection was attempted"
    );
    let text = logs.text();
    for target in ["169.254.169.254", "10.0.0.1", "127.0.0.1"] {
        assert!(
            text.lines().any(|l| l.contains("outbound HTTP refused")
                && l.contains("before-connect")
                && l.contains(target)
                && l.contains("job=internal")),
            "decision log names {target}: {text}"
        );
    }

    // A host missing from the allow-list, and a job without a grant.
    let mut unlisted = session_job(
        "unlisted",
        guests::TEST_SESSION_PROBE,
        &[("mode", "http"), ("urls", &url)],
    );
    unlisted.config.http = Some(grant(&["api.example.com"], true));
    let msg = finished(runner.run(&unlisted, slot(1)).await.unwrap(), Outcome::Ok);
    assert!(msg.contains("request denied"), "{msg}");
    let ungranted = session_job(
        "ungranted",
        guests::TEST_SESSION_PROBE,
        &[("mode", "http"), ("urls", &url)],
    );
    let msg = finished(runner.run(&ungranted, slot(1)).await.unwrap(), Outcome::Ok);
    assert!(msg.contains("request denied"), "{msg}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert!(logs.text().contains("not granted"));
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn test_scheduler_probes_capabilities_and_records_each_result(pool: PgPool) {
    jobhost::demo::create_tables(&pool).await.unwrap();
    let (addr, _) = loopback_server().await;
    sqlx::query(
        "insert into demo.capabilities (name, url) values
           ('one', $1), ('two', $2), ('refused', 'http://unlisted.invalid/'), ('off', $1)",
    )
    .bind(format!("http://{addr}/one"))
    .bind(format!("http://{addr}/two"))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("update demo.capabilities set enabled = false where name = 'off'")
        .execute(&pool)
        .await
        .unwrap();
    let mut job = session_job(
        "test-scheduler",
        guests::TEST_SCHEDULER,
        &[("batch-size", "20")],
    );
    job.config.role = Some("jobhost_demo_scheduler".into());
    admit(&pool, &job).await;
    job.config.http = Some(HttpGrant {
        allow: vec![addr.clone()],
        allow_private: true,
        allow_unpinned_https: false,
        timeout: Duration::from_secs(5),
        max_response_bytes: 65536,
    });
    let msg = finished(runner(&pool).run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(msg, "probed 3 capabilities: 2 ok, 1 failed");
    let results: Vec<(String, bool, Option<i32>)> = sqlx::query_as(
        "select c.name, r.ok, r.status from demo.test_results r join demo.capabilities c on c.id = r.capability_id order by c.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        results,
        vec![
            ("one".into(), true, Some(200)),
            ("two".into(), true, Some(200)),
            ("refused".into(), false, None)
        ]
    );
    assert_eq!(advisory_locks(&pool).await, 0);
}
