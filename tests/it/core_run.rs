//! The run path: commit, lock busy, rollback on error/trap/timeout, swallowed
//! SQL errors, once per slot, and no advisory lock left behind.

use std::time::Duration;

use jobhost::db::Outcome;
use jobhost::runner::RunResult;
use sqlx::PgPool;

use crate::support::*;

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn writes_commit_and_a_held_lock_skips_the_run(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let job = probe("writer", "write");

    let msg = finished(runner.run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(msg, "wrote attempt 1");
    assert_eq!(probe_rows(&pool).await, 1);
    assert_eq!(runs(&pool, "writer").await, vec![("ok".into(), msg)]);

    // Another session (think: a second host) holds the job's key.
    let key = job.config.lock_key;
    let mut other = pool.acquire().await.unwrap();
    sqlx::query("select pg_advisory_lock($1, $2)")
        .bind(key.namespace)
        .bind(key.key)
        .execute(&mut *other)
        .await
        .unwrap();
    let logs = LogCapture::start();
    assert_eq!(
        runner.run(&job, slot(2)).await.unwrap(),
        RunResult::LockBusy
    );
    let text = logs.text();
    let busy = text
        .lines()
        .find(|l| l.contains("event=\"lock_busy\""))
        .unwrap_or_else(|| panic!("no lock_busy event: {text}"));
    // Losing a slot to another holder is the normal case in a fleet: an
    // event to count, not a warning.
    assert!(busy.contains("DEBUG"), "{busy}");
    assert!(
        busy.contains(&key.key.to_string()),
        "the event names the key: {busy}"
    );
    assert_eq!(probe_rows(&pool).await, 1, "a skipped run writes nothing");
    assert_eq!(runs(&pool, "writer").await.len(), 1, "a skip is not a run");

    sqlx::query("select pg_advisory_unlock_all()")
        .execute(&mut *other)
        .await
        .unwrap();
    drop(other);
    finished(runner.run(&job, slot(2)).await.unwrap(), Outcome::Ok);
    assert_eq!(probe_rows(&pool).await, 2);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn error_result_and_trap_roll_back_and_are_recorded(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);

    let msg = finished(
        runner
            .run(&probe("failing", "error"), slot(1))
            .await
            .unwrap(),
        Outcome::Error,
    );
    assert_eq!(msg, "deliberate failure");
    assert_panic_first(
        runner
            .run(&probe("panicking", "trap"), slot(1))
            .await
            .unwrap(),
    );

    assert_eq!(
        probe_rows(&pool).await,
        0,
        "both runs wrote before failing; nothing survives"
    );
    assert_eq!(advisory_locks(&pool).await, 0);
    assert_eq!(runs(&pool, "failing").await[0].0, "error");
    assert_eq!(runs(&pool, "panicking").await[0].0, "trap");
}

/// A trapped run whose record starts with the probe's panic message, file and
/// line, and carries no wasm backtrace (that goes to the log).
fn assert_panic_first(result: RunResult) {
    let msg = finished(result, Outcome::Trap);
    assert!(
        msg.starts_with("panicked at ")
            && msg.contains("src/lib.rs:")
            && msg.contains(": deliberate panic (plugin trapped: "),
        "the panic message comes first in the history: {msg}"
    );
    assert!(
        !msg.contains("wasm backtrace"),
        "the backtrace goes to the log: {msg}"
    );
}

/// A job that needs no WASI, built for wasm32-unknown-unknown: the host wraps
/// the core module into a component that imports nothing but the host's own
/// interfaces, and it runs like any other. Without stderr, a panic's message
/// still comes first in the history (the SDK logs it).
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_core_module_without_wasi_runs_as_a_lean_component(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let lean = |name: &str, mode: &str| {
        job(
            name,
            jobhost_tests::guests::TEST_CORE_PROBE_LEAN,
            &[("mode", mode)],
        )
    };
    let writer = lean("lean-writer", "write");
    let imports = writer.plugin.imports();
    assert!(
        !imports.is_empty() && imports.iter().all(|i| i.starts_with("jobhost:plugin/")),
        "only the host's interfaces: {imports:?}"
    );
    assert!(
        probe("wasip2", "write")
            .plugin
            .imports()
            .iter()
            .any(|i| i.starts_with("wasi:")),
        "the wasm32-wasip2 build of the same guest imports WASI"
    );

    let msg = finished(runner.run(&writer, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(msg, "wrote attempt 1");
    assert_eq!(probe_rows(&pool).await, 1);

    assert_panic_first(
        runner
            .run(&lean("lean-panicking", "trap"), slot(1))
            .await
            .unwrap(),
    );
    assert_eq!(
        probe_rows(&pool).await,
        1,
        "the panicking run's write is rolled back"
    );
    assert_eq!(advisory_locks(&pool).await, 0);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_swallowed_sql_error_is_never_a_success(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let msg = finished(
        runner
            .run(&probe("swallower", "swallow"), slot(1))
            .await
            .unwrap(),
        Outcome::Error,
    );
    assert!(
        msg.contains("22012"),
        "names the swallowed error (division_by_zero): {msg}"
    );
    assert_eq!(
        probe_rows(&pool).await,
        0,
        "the write before the error is gone"
    );
    let history = runs(&pool, "swallower").await;
    assert_eq!(history.len(), 1);
    assert_eq!(
        history[0].0, "error",
        "never `ok` for work Postgres rolled back"
    );
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_timed_out_run_is_interrupted_and_rolled_back(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let mut job = probe("spinner", "spin");
    job.config.timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let msg = finished(runner.run(&job, slot(1)).await.unwrap(), Outcome::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the endless loop was interrupted"
    );
    assert!(msg.contains("timeout"), "{msg}");
    assert_eq!(probe_rows(&pool).await, 0);
    assert_eq!(advisory_locks(&pool).await, 0);
    // The host keeps serving: the next job runs normally.
    finished(
        runner.run(&probe("after", "write"), slot(1)).await.unwrap(),
        Outcome::Ok,
    );
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_slot_succeeds_once_and_the_database_clock_decides_when_it_is_due(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let job = probe("once", "write");
    finished(runner.run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(
        runner.run(&job, slot(1)).await.unwrap(),
        RunResult::AlreadyDone
    );
    assert_eq!(probe_rows(&pool).await, 1);

    // A failed slot is retried with the next attempt number, up to the limit.
    let mut flaky = probe("flaky", "error");
    flaky.config.retry = jobhost::config::RetryPolicy {
        max_attempts: 2,
        backoff: Duration::ZERO,
    };
    finished(runner.run(&flaky, slot(5)).await.unwrap(), Outcome::Error);
    match runner.run(&flaky, slot(5)).await.unwrap() {
        RunResult::Finished { attempt, .. } => assert_eq!(attempt, 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        runner.run(&flaky, slot(5)).await.unwrap(),
        RunResult::Exhausted
    );

    // A retry waits out its backoff, by the database clock.
    flaky.config.retry.backoff = Duration::from_secs(3600);
    finished(runner.run(&flaky, slot(6)).await.unwrap(), Outcome::Error);
    match runner.run(&flaky, slot(6)).await.unwrap() {
        RunResult::BackingOff { until } => {
            assert!(until > chrono::Utc::now() + chrono::TimeDelta::minutes(59))
        }
        other => panic!("{other:?}"),
    }
    // Skips write nothing: the rows are the runs that ran.
    let rows: i64 = sqlx::query_scalar("select count(*) from jobhost.runs where job = 'flaky'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);

    let future = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    match runner.run(&job, future).await.unwrap() {
        RunResult::NotDue { db_now } => assert!(db_now < future),
        other => panic!("a future slot must not run: {other:?}"),
    }
    assert_eq!(probe_rows(&pool).await, 1);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn two_hundred_mixed_runs_leave_no_advisory_lock(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let jobs = [
        probe("mix-ok", "write"),
        probe("mix-err", "error"),
        probe("mix-trap", "trap"),
    ];
    let mut counts = [0usize; 3];
    for n in 0..200 {
        let which = n % 3;
        let expected = [Outcome::Ok, Outcome::Error, Outcome::Trap][which];
        finished(
            runner.run(&jobs[which], slot(n as i64)).await.unwrap(),
            expected,
        );
        counts[which] += 1;
    }
    assert_eq!(advisory_locks(&pool).await, 0);
    assert_eq!(
        probe_rows(&pool).await,
        counts[0] as i64,
        "only successful runs left rows"
    );
    let recorded: i64 = sqlx::query_scalar("select count(*) from jobhost.runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 200);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_job_name_with_quotes_and_backslashes_runs_and_is_named_exactly(pool: PgPool) {
    // The run's `set local application_name` is inlined as a literal (one
    // simple query for all the backstops): quoting must hold under either
    // `standard_conforming_strings`.
    let nasty = r#"it's "odd" \' job"#;
    for conforming in ["on", "off"] {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "set standard_conforming_strings = {conforming}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        let back: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select {}",
            jobhost::db::quote_literal(nasty)
        )))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(back, nasty, "standard_conforming_strings = {conforming}");
    }

    create_probe_table(&pool).await;
    let mut job = probe(nasty, "query");
    job.config.config.push((
        "sql".into(),
        "select current_setting('application_name') as app".into(),
    ));
    // The host's connections under either setting: a startup option (a
    // session-level SET on a pooled connection is exactly what the post-run
    // check refuses to hand on).
    for (n, conforming) in ["on", "off"].into_iter().enumerate() {
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .options([("standard_conforming_strings", conforming)]);
        let host_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        let msg = finished(
            runner(&host_pool).run(&job, slot(n as i64)).await.unwrap(),
            Outcome::Ok,
        );
        assert!(
            msg.contains(&serde_json::to_string(&format!("jobhost:test-host/{nasty}")).unwrap()),
            "standard_conforming_strings = {conforming}: {msg}"
        );
        host_pool.close().await;
    }
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn the_lock_is_the_first_statement_of_the_plugins_transaction(pool: PgPool) {
    // Invariant 2. On the wire: sqlx logs every statement it sends, in order
    // (all but BEGIN), and this test runs one slot alone. In Postgres: the
    // plugin's own statement sees the job's advisory lock granted to its
    // backend, and an xact lock lives only as long as the transaction that
    // took it.
    let mut job = probe("first", "query");
    let key = job.config.lock_key;
    job.config.config.push((
        "sql".into(),
        format!(
            "select 'plugin-statement' as marker, count(*)::int4 as held from pg_locks
              where locktype = 'advisory' and granted and pid = pg_backend_pid()
                and classid = ({})::int4::oid and objid = ({})::int4::oid and objsubid = 2",
            key.namespace, key.key
        ),
    ));
    // tracing caches per call site whether anyone listens; with many tests
    // starting and dropping thread-local captures at once, a capture can miss
    // sqlx's events for a run. That is the capture failing, not the host:
    // run another slot until one run was captured whole.
    let (msg, text) = {
        let mut captured = None;
        for n in 1..=5 {
            let logs = LogCapture::start();
            let msg = finished(runner(&pool).run(&job, slot(n)).await.unwrap(), Outcome::Ok);
            let text = logs.text();
            if text.contains("plugin-statement") && text.contains("commit") {
                captured = Some((msg, text));
                break;
            }
        }
        captured.expect("no run's statements were captured in 5 tries")
    };
    let sent: Vec<&str> = text.lines().filter(|l| l.contains("sqlx::query")).collect();
    let at = |needle: &str| {
        sent.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("`{needle}` was not sent: {sent:#?}"))
    };
    // The opening query is the run's first: nothing of the run's is written
    // before it (a run's one row is inserted by its closing query). It
    // carries BEGIN, the run's deadline (so the lock is bounded from the
    // instant it is granted), then the gate, whose first act is the lock.
    let begin = at("begin;");
    assert!(
        !sent[..begin].iter().any(|l| l.contains("jobhost.")),
        "the run sent statements before its opening query: {sent:#?}"
    );
    assert!(
        at("insert into jobhost.runs") > at("plugin-statement"),
        "the run's row is written after its work: {sent:#?}"
    );
    assert!(
        sent[begin].contains(
            r#"db.statement="\n\nbegin;\nset local statement_timeout = 20000;\nset local idle_in_transaction_session_timeout = 22000;\nselect * from jobhost.slot_gate("#
        ),
        "BEGIN sets the 20 s timeout and the 22 s idle deadline, then the gate: {}",
        sent[begin]
    );
    // The gate a job role's run calls (`run_gate`) reads nothing but whether
    // the session's role may run the job before it calls `slot_gate`.
    let (wrapper, wrapper_volatility): (String, String) =
        sqlx::query_as("select prosrc, provolatile::text from pg_proc where proname = 'run_gate'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(wrapper_volatility, "v");
    let reached: Vec<&str> = wrapper
        .match_indices("jobhost.")
        .map(|(at, _)| wrapper[at..].split('(').next().unwrap_or_default())
        .collect();
    assert_eq!(
        reached[..2],
        ["jobhost.assert_may_act_for", "jobhost.slot_gate"],
        "run_gate: {wrapper}"
    );
    let (body, volatility): (String, String) =
        sqlx::query_as("select prosrc, provolatile::text from pg_proc where proname = 'slot_gate'")
            .fetch_one(&pool)
            .await
            .unwrap();
    // VOLATILE: in READ COMMITTED each statement of the gate takes a fresh
    // snapshot, so the history, read by a statement after the lock's, sees
    // what the lock's previous holder committed. (Declared STABLE, every
    // statement would read the calling query's snapshot, taken before the
    // lock; Postgres would also refuse the gate's UPDATE.)
    assert_eq!(volatility, "v");
    let first = body
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && *l != "begin")
        .unwrap_or_default();
    assert!(
        first.contains("pg_try_advisory_xact_lock"),
        "the gate's first statement takes the lock: {first}"
    );
    let lock = begin;
    let plugin = at("plugin-statement");
    assert!(plugin > lock, "{sent:#?}");
    assert!(
        !sent[lock..plugin]
            .iter()
            .any(|l| l.contains("COMMIT") || l.contains("ROLLBACK")),
        "no transaction ends between the lock and the plugin: {sent:#?}"
    );
    assert!(
        msg.contains(r#"[["text","plugin-statement"],["int4",1]]"#),
        "the plugin's statement runs under the lock: {msg}"
    );
    assert_eq!(advisory_locks(&pool).await, 0, "COMMIT released it");
}

/// A host that loses a slot writes nothing (fleet efficiency): with the
/// job's lock held elsewhere, or the slot already done, the run's gate reads
/// and skips; no row is inserted (the id sequence, which even a row inserted
/// and deleted advances, and from which a run's id is drawn, does not move).
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_lost_slot_writes_nothing(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let job = probe("loser", "write");
    finished(runner.run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    let ids = || async {
        sqlx::query_scalar::<_, i64>("select last_value from jobhost.runs_id_seq")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = ids().await;

    // The slot already succeeded (on any host).
    assert_eq!(
        runner.run(&job, slot(1)).await.unwrap(),
        RunResult::AlreadyDone
    );
    // Another session holds the job's lock.
    let key = job.config.lock_key;
    let mut other = pool.acquire().await.unwrap();
    sqlx::query("select pg_advisory_lock($1, $2)")
        .bind(key.namespace)
        .bind(key.key)
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(
        runner.run(&job, slot(2)).await.unwrap(),
        RunResult::LockBusy
    );
    assert_eq!(
        ids().await,
        before,
        "a lost slot inserted (and deleted) a row"
    );
    sqlx::query("select pg_advisory_unlock_all()")
        .execute(&mut *other)
        .await
        .unwrap();
    // And the slot still runs once the lock is free.
    finished(runner.run(&job, slot(2)).await.unwrap(), Outcome::Ok);
}

/// In a fleet, a host that is not a job's preferred one defers each slot, then
/// asks whether it succeeded: many slots share one query, and a slot found
/// `ok` is skipped without opening a run (no transaction, no row). A slot not
/// yet run goes on to its gate as before.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn deferred_slots_are_confirmed_in_batches(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let jobs: Vec<_> = (0..40)
        .map(|i| probe(&format!("batch-{i}"), "write"))
        .collect();
    for job in &jobs[..20] {
        finished(runner.run(job, slot(1)).await.unwrap(), Outcome::Ok);
    }
    let confirmations = jobhost::runner::Confirmations::start(pool.clone());
    let answers = futures_util::future::join_all(
        jobs.iter()
            .map(|j| confirmations.succeeded(&j.config.name, slot(1))),
    )
    .await;
    assert_eq!(
        answers[..20],
        [true; 20],
        "the slots that ran are known done"
    );
    assert_eq!(answers[20..], [false; 20], "the others are not");
    assert!(
        confirmations.queries() <= 2,
        "40 deferred slots took {} queries",
        confirmations.queries()
    );

    // A host that is never preferred (the other live host always is, for
    // these jobs) skips the done slots without a row and runs the others.
    let live = jobhost::hosts::LiveHosts::new(std::time::Duration::from_millis(10));
    live.set(vec!["deferring".into(), "preferred".into()]);
    let deferring = runner_as(&pool, "deferring").with_live_hosts(live.clone());
    let others: Vec<&jobhost::runner::Job> = jobs
        .iter()
        .filter(|j| live.preferred(&j.config.name).as_deref() == Some("preferred"))
        .collect();
    assert!(
        others.len() >= 5,
        "rendezvous spreads 40 jobs over two hosts"
    );
    let before: i64 = sqlx::query_scalar("select last_value from jobhost.runs_id_seq")
        .fetch_one(&pool)
        .await
        .unwrap();
    for job in others
        .iter()
        .filter(|j| jobs[..20].iter().any(|d| d.config.name == j.config.name))
    {
        assert_eq!(
            deferring.run(job, slot(1)).await.unwrap(),
            RunResult::AlreadyDone
        );
    }
    let after: i64 = sqlx::query_scalar("select last_value from jobhost.runs_id_seq")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after, before, "a skipped slot wrote no row");
    let fresh = others
        .iter()
        .find(|j| jobs[20..].iter().any(|d| d.config.name == j.config.name))
        .expect("some not-yet-run job prefers the other host");
    finished(deferring.run(fresh, slot(1)).await.unwrap(), Outcome::Ok);
}

/// The slot-history read every run makes under the lock finds its slot by
/// index, whatever the job's history holds: it used to scan every run of the
/// job (a 1 s job reaches 100,000 rows in 28 hours; 9 ms per run, growing).
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn the_slot_history_read_does_not_scan_the_jobs_history(pool: PgPool) {
    sqlx::raw_sql(
        "insert into jobhost.runs (job, slot, attempt, host_id, plugin_sha256, started_at, finished_at, outcome)
         select 'busy', '2024-01-01'::timestamptz + g * interval '1 second', 1, 'h', 'x', now(), now(),
                case when g % 10 = 0 then 'error' else 'ok' end
           from generate_series(1, 30000) g;
         analyze jobhost.runs;",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The gate itself (`jobhost.slot_gate`, as a run sends it), with the
    // scans it made counted in its own transaction.
    let seq_scans = |pool: PgPool| async move {
        let mut tx = pool.begin().await.unwrap();
        let sql = jobhost::db::slot_gate_sql(
            "busy",
            slot(7201),
            "me",
            Duration::from_secs(60),
            Some(jobhost::lock::LockKey::derive("busy")),
            false,
        );
        let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let gate = jobhost::db::SlotGate::from_row(&row).unwrap();
        let state = gate.history.expect("locked and due").state;
        assert!(state.succeeded && state.attempts == 1, "{state:?}");
        let scans: i64 = sqlx::query_scalar(
            "select coalesce(seq_scan, 0) from pg_stat_xact_user_tables
              where schemaname = 'jobhost' and relname = 'runs'",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        scans
    };
    assert_eq!(
        seq_scans(pool.clone()).await,
        0,
        "the history read scans the table"
    );
    // What the index spares: without it, the same call scans.
    sqlx::query("drop index jobhost.runs_by_slot")
        .execute(&pool)
        .await
        .unwrap();
    assert!(seq_scans(pool.clone()).await > 0);
}

/// A no-op probe job `name` on a runtime of its own, so that the runtime's
/// count of instances made is this test's alone, and a runner on `pool`.
fn counted_noop(
    pool: &PgPool,
    name: &str,
) -> (
    std::sync::Arc<jobhost::runtime::Runtime>,
    jobhost::runner::Runner,
    jobhost::runner::Job,
) {
    let runtime = std::sync::Arc::new(jobhost::runtime::Runtime::new().unwrap());
    let runner = jobhost::runner::Runner::new(pool.clone(), runtime.clone(), "test-host");
    let mut job = probe(name, "noop");
    job.plugin = runtime
        .load(std::path::Path::new(jobhost_tests::guests::TEST_CORE_PROBE))
        .unwrap();
    (runtime, runner, job)
}

/// A run's instance is made while its opening query is on the wire: with the
/// gate held up (another session locks a table it reads), the instance is
/// already there, and the run goes on once the gate answers.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn the_instance_is_made_while_the_gate_runs(pool: PgPool) {
    let (runtime, runner, job) = counted_noop(&pool, "early");

    // The gate looks for other hosts' runs in flight first: make it wait.
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("lock table jobhost.in_flight in access exclusive mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let run = spawn_run(&runner, &job, slot(1));
    wait_for(
        Duration::from_secs(10),
        "the gate to wait for the lock",
        || async {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from pg_stat_activity
              where datname = current_database() and wait_event_type = 'Lock'
                and query like '%slot_gate%'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                == 1
        },
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "the instance, made while the gate waits",
        || async { runtime.instances_made() == 1 },
    )
    .await;
    assert!(!run.is_finished());
    blocker.rollback().await.unwrap();
    finished(run.await.unwrap().unwrap(), Outcome::Ok);
    assert_eq!(runtime.instances_made(), 1, "one instance for one run");
}

/// A run's instance is made while its opening query is on the wire, before
/// the gate answers; a job whose latest slot was skipped here is made one
/// only once its gate lets the run through, so a paused job (or one backing
/// off, or run by another host) does not make an instance per tick.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_job_that_keeps_skipping_makes_no_instance_per_tick(pool: PgPool) {
    let (runtime, runner, job) = counted_noop(&pool, "skipper");
    let made = || runtime.instances_made();

    finished(runner.run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(made(), 1);
    assert!(jobhost::db::pause(&pool, "skipper", "test").await.unwrap());
    // The first skip made its instance early, for nothing; the next ones do not.
    assert_eq!(runner.run(&job, slot(2)).await.unwrap(), RunResult::Paused);
    assert_eq!(made(), 2);
    for n in 3..6 {
        assert_eq!(runner.run(&job, slot(n)).await.unwrap(), RunResult::Paused);
    }
    assert_eq!(made(), 2, "a paused job made instances while it skipped");
    // A slot already done is a skip too.
    assert!(jobhost::db::resume(&pool, "skipper").await.unwrap());
    assert_eq!(
        runner.run(&job, slot(1)).await.unwrap(),
        RunResult::AlreadyDone
    );
    assert_eq!(made(), 2);
    // Through the gate after skipping: made once the gate let it through,
    // and the next run's early again.
    finished(runner.run(&job, slot(6)).await.unwrap(), Outcome::Ok);
    assert_eq!(made(), 3);
    finished(runner.run(&job, slot(7)).await.unwrap(), Outcome::Ok);
    assert_eq!(made(), 4);
    assert_eq!(runs(&pool, "skipper").await.len(), 3, "three runs, no more");
}

/// A run's future is boxed inside `Runner::run`: it holds the plugin's
/// instantiation, the opening query and the call (~13 KB in a release
/// build). Inline, every caller carried copies of it: the scheduler's task
/// of each job was ~40 KB for the job's whole life (1,000 jobs, 40 MB), and
/// the future was moved by memcpy at every run's start.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_runs_future_is_small_for_its_caller(pool: PgPool) {
    let runner = runner(&pool);
    let job = probe("small", "noop");
    let run = runner.run(&job, slot(1));
    let size = std::mem::size_of_val(&run);
    assert!(size <= 2048, "Runner::run's future is {size} bytes");
    // Still a run like any other.
    finished(run.await.unwrap(), Outcome::Ok);
}

/// Where `pool`'s server listens, as `host:port`.
fn server_address(pool: &PgPool) -> String {
    let options = pool.connect_options();
    format!("{}:{}", options.get_host(), options.get_port())
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_run_sends_its_two_queries_and_no_check_before_them(pool: PgPool) {
    // DESIGN §3: a run is two round trips, the opening simple query and the
    // closing one, on a connection its pool lends from run to run. sqlx's
    // pools check a connection with a `Sync` (`ping`, a round trip) when it
    // is lent, by default, and always when it is given back: the second is
    // sqlx 0.9's own and cannot be turned off, but it is sent after the
    // run's commit, by the pool (when no run waits for the connection: see
    // the next test). On one connection, in order: Q (opening), Q (closing),
    // S (given back), and no S before a run's first Q.
    let (tap, host_pool, runner) = tapped_runner(&pool).await;
    let job = probe("round-trips", "noop");
    for n in 2..5 {
        finished(runner.run(&job, slot(n)).await.unwrap(), Outcome::Ok);
    }
    wait_for(Duration::from_secs(5), "the last return", || async {
        tap.peek().matches('S').count() >= 3
    })
    .await;
    assert_eq!(
        tap.take(),
        "QQSQQSQQS",
        "three runs, as the host sent them (Q: a simple query, S: a Sync)"
    );
    host_pool.close().await;
}

/// A pool of one connection behind a [`jobhost_tests::WireTap`], warmed by
/// one run (the first run meets a fresh connection: its start-up, and sqlx's
/// statements for the types it decodes, are not a run's), the tap emptied
/// after the connection's return.
async fn tapped_runner(pool: &PgPool) -> (jobhost_tests::WireTap, PgPool, jobhost::runner::Runner) {
    let tap = jobhost_tests::WireTap::start(&server_address(pool)).await;
    let host_pool = jobhost::pools::pool_options()
        .max_connections(1)
        .connect_with(tap.options(&pool.connect_options()))
        .await
        .unwrap();
    let runner = runner(&host_pool);
    finished(
        runner
            .run(&probe("warm-up", "noop"), slot(1))
            .await
            .unwrap(),
        Outcome::Ok,
    );
    wait_for(
        Duration::from_secs(5),
        "the connection's return",
        || async { tap.peek().ends_with('S') },
    )
    .await;
    tap.take();
    (tap, host_pool, runner)
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn runs_waiting_for_the_connection_take_it_from_the_run_before_unchecked(pool: PgPool) {
    // Six runs (of six jobs) want the one connection at once. The first one
    // to end clean hands it, with its place in the budget, to the run that
    // waited longest: no `Sync` between them, the commit proved it clean a
    // moment ago. After `HAND_ON_LIMIT` hand-ons it goes back through the
    // pool (S) and the sixth run takes it from there.
    let (tap, host_pool, runner) = tapped_runner(&pool).await;
    let jobs: Vec<_> = (0..6)
        .map(|i| probe(&format!("hand-on-{i}"), "noop"))
        .collect();
    let results =
        futures_util::future::join_all(jobs.iter().map(|job| runner.run(job, slot(2)))).await;
    for result in results {
        finished(result.unwrap(), Outcome::Ok);
    }
    wait_for(Duration::from_secs(5), "the last return", || async {
        tap.peek().matches('S').count() >= 2
    })
    .await;
    let chain = "QQ".repeat(jobhost::pools::HAND_ON_LIMIT as usize + 1);
    assert_eq!(
        tap.take(),
        format!("{chain}SQQS"),
        "six runs on one connection (Q: a simple query, S: a Sync)"
    );
    host_pool.close().await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn the_hosts_own_work_waits_at_most_a_chain_of_runs(pool: PgPool) {
    // A heartbeat, a publication or a session run's precheck takes from the
    // host's pool outside the runs' queue. However many runs wait, the one
    // connection comes back through the pool after at most `HAND_ON_LIMIT`
    // hand-ons, and the pool serves whoever waited there first.
    let (tap, host_pool, runner) = tapped_runner(&pool).await;
    let jobs: Vec<_> = (0..12)
        .map(|i| probe(&format!("queued-{i}"), "noop"))
        .collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let runs = futures_util::future::join_all(jobs.iter().map(|job| async {
        finished(runner.run(job, slot(2)).await.unwrap(), Outcome::Ok);
        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let host_work = async {
        // Asks once the first run holds the connection and the rest queue.
        wait_for(Duration::from_secs(5), "the first run's query", || async {
            tap.peek().contains('Q')
        })
        .await;
        let conn = host_pool.acquire().await.unwrap();
        let before = done.load(std::sync::atomic::Ordering::SeqCst);
        drop(conn);
        before
    };
    let (_, before) = tokio::join!(runs, host_work);
    assert!(
        before <= jobhost::pools::HAND_ON_LIMIT as usize + 1,
        "the host's own work waited for {before} of 12 runs"
    );
    host_pool.close().await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn runs_waiting_for_a_connection_are_counted_until_they_stop_waiting(pool: PgPool) {
    // What `jobhost_runs_waiting_for_connection` reads: a run that finds a
    // place in the budget never waits; one that does is counted until it
    // gets a connection, or gives up (its place in the queue goes with it).
    let one = jobhost::pools::pool_options()
        .max_connections(1)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let runs = jobhost::pools::RunPools::over(one.clone());
    let held = runs.acquire(None).await.unwrap();
    assert_eq!(runs.waiting(), 0, "a run that found a place does not wait");
    let patient = tokio::spawn({
        let runs = runs.clone();
        async move { runs.acquire(None).await.map(drop) }
    });
    let impatient = tokio::spawn({
        let runs = runs.clone();
        async move { tokio::time::timeout(Duration::from_millis(300), runs.acquire(None)).await }
    });
    wait_for(Duration::from_secs(5), "two runs waiting", || async {
        runs.waiting() == 2
    })
    .await;
    assert!(impatient.await.unwrap().is_err(), "it got a connection");
    assert_eq!(runs.waiting(), 1, "a run that gave up is still counted");
    drop(held);
    patient.await.unwrap().unwrap();
    assert_eq!(runs.waiting(), 0);
    one.close().await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_connection_the_server_closed_costs_the_next_run_nothing(pool: PgPool) {
    // A restart, `pg_terminate_backend` or `idle_session_timeout` closes the
    // pool's idle connections. Lent untested (used a moment ago), each fails
    // the opening query it is sent, and the run opens on another; the last
    // is a new one.
    let app = "jobhost-test-closed-by-server";
    let host_pool = jobhost::pools::pool_options()
        .max_connections(2)
        .connect_with(
            pool.connect_options()
                .as_ref()
                .clone()
                .application_name(app),
        )
        .await
        .unwrap();
    let runner = runner(&host_pool);
    let job = probe("outlives-its-connections", "noop");
    finished(runner.run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    // Both of the pool's connections open and idle.
    let (a, b) = (
        host_pool.acquire().await.unwrap(),
        host_pool.acquire().await.unwrap(),
    );
    drop((a, b));
    let closed: i64 = sqlx::query_scalar(
        "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity
                                where application_name = $1) t",
    )
    .bind(app)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(closed, 2);
    wait_for(
        Duration::from_secs(5),
        "the closed backends to exit",
        || async {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from pg_stat_activity where application_name = $1",
            )
            .bind(app)
            .fetch_one(&pool)
            .await
            .unwrap()
                == 0
        },
    )
    .await;

    let logs = LogCapture::start();
    finished(runner.run(&job, slot(2)).await.unwrap(), Outcome::Ok);
    let replaced = logs.text().matches("a pooled connection was gone").count();
    assert_eq!(
        replaced,
        2,
        "both closed connections were met and replaced: {}",
        logs.text()
    );
    let outcomes: Vec<String> = runs(&pool, "outlives-its-connections")
        .await
        .into_iter()
        .map(|(outcome, _)| outcome)
        .collect();
    assert_eq!(
        outcomes,
        ["ok", "ok"],
        "no failure recorded for the closed connections"
    );
    host_pool.close().await;
}
