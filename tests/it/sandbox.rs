//! The sandbox: a hostile plugin's escapes are refused or stopped with the
//! right reason, nothing it wrote survives, no advisory lock remains, and a
//! well-behaved job on the same host keeps its schedule throughout.

use std::time::Duration;

use jobhost::db::Outcome;
use jobhost::runner::Job;
use jobhost::schedule::Schedule;
use jobhost_tests::guests;
use sqlx::PgPool;

use crate::support::*;

fn hostile(name: &str, config: &[(&str, &str)]) -> Job {
    job(name, guests::TEST_SANDBOX_HOSTILE, config)
}

/// One case per escape the scope guard must refuse.
const SQL_ESCAPES: &[&str] = &[
    "commit",
    "begin",
    "rollback",
    "savepoint s1",
    "release savepoint s1",
    "prepare transaction 'x'",
    "set role postgres",
    "reset role",
    "set session authorization postgres",
    "set search_path = public",
    "select pg_advisory_lock(42)",
    "select * from probe where id in (select pg_try_advisory_lock(id::int) from probe)",
    "select pg_terminate_backend(pg_backend_pid())",
    "select pg_cancel_backend(pg_backend_pid())",
    "select dblink_connect('host=127.0.0.1')",
    "copy probe from '/etc/passwd'",
    "copy probe to program 'true'",
    "listen chan",
    "unlisten chan",
    "discard all",
    "delete from probe; commit",
];

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn every_escape_is_refused_while_a_good_job_keeps_its_schedule(pool: PgPool) {
    create_probe_table(&pool).await;
    sqlx::query("create table good (id bigserial primary key, note text not null)")
        .execute(&pool)
        .await
        .unwrap();
    // The well-behaved job: every 100 ms, on the same host and pool.
    let mut good = job(
        "good",
        guests::TEST_CORE_PROBE,
        &[
            ("mode", "query"),
            (
                "sql",
                "insert into good (note) values ('tick') returning id",
            ),
        ],
    );
    good.config.schedule = Schedule::every(Duration::from_millis(100));
    let good_key = good.config.lock_key;
    // A host runs on a multi-threaded runtime (sqlx::test gives this test a
    // single thread): run the scheduler on one, sharing the engine, with a pool
    // of its own on the same database.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = pool.connect_options().as_ref().clone();
    let scheduler = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect_with(options)
                .await
                .unwrap();
            jobhost::scheduler::run(runner(&pool), vec![good], Default::default(), async {
                let _ = stopped.await;
            })
            .await;
            pool.close().await;
        });
    });
    let started = std::time::Instant::now();

    let runner = runner(&pool);
    for (n, sql) in SQL_ESCAPES.iter().enumerate() {
        let job = hostile("hostile-sql", &[("mode", "sql"), ("sql", sql)]);
        let msg = finished(
            runner.run(&job, slot(n as i64)).await.unwrap(),
            Outcome::Error,
        );
        assert!(
            msg.contains("statement refused"),
            "`{sql}` must be refused by the guard, got: {msg}"
        );
        assert_eq!(
            probe_rows(&pool).await,
            0,
            "`{sql}`: nothing the plugin wrote survives"
        );
        assert_eq!(
            advisory_locks_except(&pool, good_key).await,
            0,
            "`{sql}`: no advisory lock remains"
        );
    }

    // Runaway plugins are stopped with the reason.
    let mut spin = hostile("hostile-spin", &[("mode", "spin")]);
    spin.config.timeout = Duration::from_millis(400);
    let msg = finished(
        runner.run(&spin, slot(100)).await.unwrap(),
        Outcome::Timeout,
    );
    assert!(msg.contains("timeout of 400ms"), "{msg}");

    let mut alloc = hostile("hostile-alloc", &[("mode", "alloc")]);
    alloc.config.max_memory_bytes = 32 << 20;
    let msg = finished(runner.run(&alloc, slot(101)).await.unwrap(), Outcome::Trap);
    assert!(msg.contains("memory limit of 32 MiB"), "{msg}");

    let mut rows = hostile("hostile-rows", &[("mode", "many-rows")]);
    rows.config.max_rows = 1000;
    let msg = finished(runner.run(&rows, slot(102)).await.unwrap(), Outcome::Error);
    assert!(msg.contains("more than 1000 rows"), "{msg}");

    assert_eq!(probe_rows(&pool).await, 0);
    assert_eq!(advisory_locks_except(&pool, good_key).await, 0);
    let elapsed = started.elapsed();
    stop.send(()).unwrap();
    scheduler.join().unwrap();
    assert_eq!(advisory_locks(&pool).await, 0);

    // The good job ran throughout: at most a few slots were missed while the
    // hostile ones ran (they share this test's single runtime thread).
    let good_runs: Vec<(String,)> =
        sqlx::query_as("select outcome from jobhost.runs where job = 'good'")
            .fetch_all(&pool)
            .await
            .unwrap();
    let slots = elapsed.as_millis() / 100;
    assert!(good_runs.iter().all(|(o,)| o == "ok"), "{good_runs:?}");
    // Starved for the whole sequence it would manage a handful; a third of
    // the slots tolerates a loaded CI box.
    assert!(
        good_runs.len() as u128 * 3 >= slots,
        "the good job kept its schedule: {} runs in {} slots",
        good_runs.len(),
        slots
    );
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn wasi_grants_nothing_but_declared_env(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let msg = finished(
        runner
            .run(
                &hostile(
                    "hostile-file",
                    &[("mode", "read-file"), ("path", "/etc/passwd")],
                ),
                slot(1),
            )
            .await
            .unwrap(),
        Outcome::Error,
    );
    assert!(msg.starts_with("denied:"), "{msg}");

    let msg = finished(
        runner
            .run(
                &hostile(
                    "hostile-socket",
                    &[("mode", "socket"), ("addr", "127.0.0.1:5432")],
                ),
                slot(1),
            )
            .await
            .unwrap(),
        Outcome::Error,
    );
    assert!(msg.starts_with("denied:"), "{msg}");

    let mut env = hostile("hostile-env", &[("mode", "env")]);
    env.config.env = vec![("DECLARED".into(), "yes".into())];
    let msg = finished(runner.run(&env, slot(1)).await.unwrap(), Outcome::Error);
    assert_eq!(
        msg, "env: [DECLARED=yes]",
        "only declared variables, none of the host's"
    );
    assert_eq!(probe_rows(&pool).await, 0);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_read_only_role_is_enforced_by_postgres(pool: PgPool) {
    create_probe_table(&pool).await;
    sqlx::query("insert into probe (note) values ('keep')")
        .execute(&pool)
        .await
        .unwrap();
    // Roles are cluster-wide: name this one after the test's own database.
    let db: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Within Postgres's 63 bytes (a longer name would be cut at CREATE), and
    // unique to the database.
    let tail = &db[db.len().saturating_sub(24)..];
    let role = format!(
        "ro_{}",
        tail.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop role if exists \"{role}\"; create role \"{role}\" login; grant select on probe to \"{role}\";"
    )))
    .execute(&pool)
    .await
    .unwrap();

    let mut reader = job(
        "reader",
        guests::TEST_CORE_PROBE,
        &[
            ("mode", "query"),
            ("sql", "select count(*) as n from probe"),
        ],
    );
    reader.config.role = Some(role.clone());
    admit(&pool, &reader).await;
    finished(
        runner(&pool).run(&reader, slot(1)).await.unwrap(),
        Outcome::Ok,
    );

    let mut deleter = job(
        "deleter",
        guests::TEST_CORE_PROBE,
        &[("mode", "query"), ("sql", "delete from probe returning id")],
    );
    deleter.config.role = Some(role.clone());
    admit(&pool, &deleter).await;
    let msg = finished(
        runner(&pool).run(&deleter, slot(1)).await.unwrap(),
        Outcome::Error,
    );
    assert!(
        msg.contains("42501"),
        "insufficient_privilege from Postgres: {msg}"
    );
    assert_eq!(probe_rows(&pool).await, 1);
    let recorded: Vec<(String, String)> = runs(&pool, "deleter").await;
    assert_eq!(recorded[0].0, "error");

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop owned by \"{role}\"; drop role \"{role}\";"
    )))
    .execute(&pool)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_chatty_plugin_is_truncated_not_trapped(pool: PgPool) {
    create_probe_table(&pool).await;
    let logs = LogCapture::start();
    // ~200 KB on stdout and stderr against the 64 KiB cap: a refused write
    // would make the guest's `println!` panic and the run trap.
    let msg = finished(
        runner(&pool)
            .run(&probe("chatty", "chatty"), slot(1))
            .await
            .unwrap(),
        Outcome::Ok,
    );
    assert_eq!(msg, "printed 200000 bytes");
    let text = logs.text();
    assert!(text.contains("first-line-marker"), "the start is kept");
    // 1000 × (100 + 100) bytes + the 18-byte marker, 65 536 kept.
    assert!(
        text.contains("plugin output truncated") && text.contains("dropped_bytes=134482"),
        "{}",
        text.lines()
            .filter(|l| l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
