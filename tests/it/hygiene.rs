//! Nothing a plugin does outlives its run (docs/DESIGN.md invariant 11, "verify, don't
//! enumerate"). Each hostile case goes through a route the scope guard cannot
//! see (a function or operator the job created in an ordinary schema, called
//! in a later run), on a pool of ONE connection, so that a leak would reach
//! the next job. Every case runs with a restricted job role and without one.

use std::sync::Arc;
use std::time::Duration;

use jobhost::config::Pooler;
use jobhost::db::Outcome;
use jobhost::hygiene::AfterCommit;
use jobhost::lock::LockKey;
use jobhost::metrics::Metrics;
use jobhost::runner::Runner;
use jobhost::tx::OpenTx;
use jobhost_tests::guests;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::support::*;

/// The job's lock key of `victim`: what the hostile plugin tries to keep.
const VICTIM_KEY: (i32, i32) = (1785684584, 2115140381);

/// A runner on a pool of one connection on the test's database.
async fn one_connection_runner(pool: &PgPool) -> (Runner, PgPool) {
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    (Runner::new(one.clone(), runtime(), "hygiene-host"), one)
}

/// [`one_connection_runner`], counting into metrics of its own.
async fn counted_runner(pool: &PgPool) -> (Runner, PgPool, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (runner, one) = one_connection_runner(pool).await;
    (runner.with_metrics(metrics.clone()), one, metrics)
}

/// Whether `metrics` counted one leak of `job`'s, found `found`
/// (`before_commit`, `after_commit`).
fn counted_leak(metrics: &Metrics, job: &str, found: &str) -> bool {
    metrics
        .encode()
        .lines()
        .any(|l| l == format!("jobhost_session_leaks_total{{job=\"{job}\",found=\"{found}\"}} 1"))
}

/// Runs `sql` through the hostile plugin as job `name` (role `role`).
async fn hostile_run(
    runner: &Runner,
    name: &str,
    role: Option<&str>,
    sql: &str,
    n: i64,
) -> jobhost::runner::RunResult {
    let mut job = job(
        name,
        guests::TEST_SANDBOX_HOSTILE,
        &[("mode", "sql"), ("sql", sql)],
    );
    job.config.role = role.map(str::to_owned);
    admit_on(runner, &job).await;
    runner.run(&job, slot(n)).await.unwrap()
}

/// Admits `job`'s role (if any) through `runner`'s pools, as a start does.
async fn admit_on(runner: &Runner, job: &jobhost::runner::Job) {
    if job.config.role.is_some() {
        jobhost::roles::Admitted::new("test-host")
            .admit(runner.run_pools(), std::slice::from_ref(&job.config))
            .await
            .unwrap();
    }
}

/// What a *different* job sees on the (single) pooled connection of `role`
/// afterwards: its search_path, temporary objects, and advisory locks of its
/// backend.
async fn next_job_sees(runner: &Runner, role: Option<&str>, n: i64) -> String {
    next_job_reads(
        runner,
        role,
        n,
        "select current_setting('search_path') || ' | temp objects: ' ||
                (select count(*) from pg_class where relnamespace = pg_my_temp_schema())::text ||
                ' | session locks: ' ||
                (select count(*) from pg_locks where pid = pg_backend_pid() and locktype = 'advisory'
                    and not (objsubid = 2 and objid::int8 = ($1::int8 & 4294967295)))::text as seen",
    )
    .await
}

/// What the next job reads of `app.tenant` ([`next_job_reads`]): `unset`, then
/// its lock key, when no job left a value there.
const TENANT_SEEN: &str =
    "select coalesce(nullif(current_setting('app.tenant', true), ''), 'unset') || ' ' || $1::text";

/// What `sql` (one text column; `$1` is the bystander's own lock key) reads
/// for a *different* job on the (single) pooled connection of `role`.
async fn next_job_reads(runner: &Runner, role: Option<&str>, n: i64, sql: &str) -> String {
    let mut job = job(
        "bystander",
        guests::TEST_CORE_PROBE,
        &[
            ("mode", "query"),
            ("sql", sql),
            (
                "params",
                &format!("[[\"int4\", {}]]", LockKey::derive("bystander").key),
            ),
        ],
    );
    job.config.role = role.map(str::to_owned);
    admit_on(runner, &job).await;
    finished(runner.run(&job, slot(1000 + n)).await.unwrap(), Outcome::Ok)
}

/// One hostile case: `setup` runs (each statement a run of its own, ok), then
/// `attack` must end as an error naming `leaked`, with nothing left behind.
async fn leak_case(pool: &PgPool, setup: &[&str], attack: &str, leaked: &str) {
    create_probe_table(pool).await;
    sqlx::query("create schema jobspace")
        .execute(pool)
        .await
        .unwrap();
    let role = restricted_role(pool).await;
    for (round, role) in [None, Some(role.as_str())].into_iter().enumerate() {
        // A fresh schema for each round, so both create the same objects.
        let fresh = format!(
            "drop schema jobspace cascade; create schema jobspace; grant usage, create on schema jobspace to \"{}\"",
            role.map_or_else(|| "public".to_owned(), str::to_owned)
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(fresh.replace("\"public\"", "public")))
            .execute(pool)
            .await
            .unwrap();
        let logs = LogCapture::start();
        let (runner, one, metrics) = counted_runner(pool).await;
        let name = format!("hostile-{round}");
        for (i, sql) in setup.iter().enumerate() {
            let result = hostile_run(&runner, &name, role, sql, (round * 100 + i) as i64).await;
            finished(result, Outcome::Ok);
        }
        let result = hostile_run(&runner, &name, role, attack, (round * 100 + 50) as i64).await;
        let msg = finished(result, Outcome::Error);
        assert!(
            msg.contains("session_state_leaked") && msg.contains(leaked),
            "role {role:?}: `{attack}` must be caught naming `{leaked}`, got: {msg}"
        );
        let text = logs.text();
        assert!(
            text.lines()
                .any(|l| l.contains("session_state_leaked") && l.contains(&format!("job={name}"))),
            "a structured event names the job: {text}"
        );
        assert!(
            counted_leak(&metrics, &name, "before_commit"),
            "role {role:?}: the leak is counted: {}",
            metrics.encode()
        );
        // The plugin's write before the attack was rolled back with it.
        assert_eq!(
            sqlx::query_scalar::<_, i64>("select count(*) from probe where note = 'hostile'")
                .fetch_one(pool)
                .await
                .unwrap(),
            setup.len() as i64 * (round as i64 + 1),
            "role {role:?}: only the setup runs' writes stand"
        );
        // Nothing reached the next job on the same pooled connection.
        let seen = next_job_sees(&runner, role, round as i64).await;
        assert!(
            seen.contains("public | temp objects: 0 | session locks: 0")
                && !seen.contains("jobspace"),
            "role {role:?}: the next job saw {seen}"
        );
        assert_eq!(advisory_locks(pool).await, 0, "role {role:?}");
        one.close().await;
    }
    drop_role(pool, &role).await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_function_taking_a_session_lock_is_caught_and_rolled_back(pool: PgPool) {
    leak_case(
        &pool,
        &[&format!(
            "create function jobspace.g() returns void language sql as 'select pg_advisory_lock({}, {})'",
            VICTIM_KEY.0, VICTIM_KEY.1
        )],
        "select jobspace.g()",
        &format!("advisory locks ({}, {})", VICTIM_KEY.0, VICTIM_KEY.1),
    )
    .await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_leaking_runs_connection_is_never_handed_to_the_run_waiting_for_it(pool: PgPool) {
    // A run hands its connection straight to the run waiting for it only
    // when its end proved the connection clean (DESIGN §3, "handed on"). One
    // whose plugin left a session lock on it is closed, even with a run
    // queued for the pool's one connection: that run opens a fresh one.
    create_probe_table(&pool).await;
    sqlx::query("create schema jobspace")
        .execute(&pool)
        .await
        .unwrap();
    let (runner, one) = one_connection_runner(&pool).await;
    let setup = format!(
        "create function jobspace.g() returns void language sql as 'select pg_advisory_lock({}, {})'",
        VICTIM_KEY.0, VICTIM_KEY.1
    );
    finished(
        hostile_run(&runner, "hostile", None, &setup, 1).await,
        Outcome::Ok,
    );
    // The attack takes the connection; the bystander queues behind it.
    let (attacked, seen) = tokio::join!(
        hostile_run(&runner, "hostile", None, "select jobspace.g()", 2),
        next_job_sees(&runner, None, 3),
    );
    let msg = finished(attacked, Outcome::Error);
    assert!(msg.contains("session_state_leaked"), "{msg}");
    assert!(
        seen.contains("session locks: 0"),
        "the run waiting for the connection saw {seen}"
    );
    assert_eq!(advisory_locks(&pool).await, 0);
    one.close().await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn an_operator_over_pg_advisory_lock_is_caught(pool: PgPool) {
    // No function-call node at all: the guard cannot see this one.
    leak_case(
        &pool,
        &["create operator jobspace.### (rightarg = bigint, function = pg_advisory_lock)"],
        "select operator(jobspace.###) 12::bigint",
        "advisory locks",
    )
    .await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_session_setting_changed_through_a_function_is_caught(pool: PgPool) {
    leak_case(
        &pool,
        &["create function jobspace.sp() returns text language sql as $$ select set_config('search_path', 'jobspace, public', false) $$"],
        "select jobspace.sp()",
        "search_path",
    )
    .await;
}

/// The check before COMMIT of `baseline`'s pool on `conn` (in a transaction
/// with the host's own `SET LOCAL`): the fingerprint it returned (it read
/// `pg_settings` and found nothing), which `baseline` learns; `Ok(None)`
/// when it did not read them.
async fn check_settings(
    conn: &mut sqlx::PgConnection,
    baseline: &jobhost::hygiene::Baseline,
) -> Result<Option<String>, sqlx::Error> {
    use sqlx::Row as _;
    let sql = jobhost::hygiene::assert_clean_sql(None, baseline, &[]);
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    baseline.learn_from(&rows)?;
    rows[0].try_get(0)
}

/// Reading `pg_settings` is most of what the check costs, so it is skipped
/// when the values of every setting a session can change (and the caller's
/// `search_path`) are those of a session the read found clean. Any value of
/// its own that a plugin left at session level changes them: the read runs
/// and names it.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn the_check_reads_settings_only_for_a_session_it_has_not_seen_clean(pool: PgPool) {
    let baseline = jobhost::hygiene::Baseline::default();
    let mut conn = pool.acquire().await.unwrap();
    let begin = "begin; set local statement_timeout = 1234; set local application_name = 'run-1'";
    sqlx::raw_sql(begin).execute(&mut *conn).await.unwrap();
    let first = check_settings(&mut conn, &baseline).await.unwrap();
    assert!(first.is_some(), "a pool's first check reads the settings");
    assert_eq!(baseline.clean_fingerprints(), 1);
    assert_eq!(
        check_settings(&mut conn, &baseline).await.unwrap(),
        None,
        "the same session's settings are not read again"
    );
    sqlx::raw_sql("rollback").execute(&mut *conn).await.unwrap();

    // Another run: its own timeout and name (the host's SET LOCALs) are not
    // the session's.
    let other = "begin; set local statement_timeout = 99; set local application_name = 'run-2'";
    sqlx::raw_sql(other).execute(&mut *conn).await.unwrap();
    assert_eq!(check_settings(&mut conn, &baseline).await.unwrap(), None);
    // A value set at session level to what it already was changes nothing
    // for the next job (and the reset after each run undoes it anyway).
    sqlx::raw_sql("select set_config('work_mem', current_setting('work_mem'), false)")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(check_settings(&mut conn, &baseline).await.unwrap(), None);
    // A value of its own is read and named.
    sqlx::raw_sql("select set_config('work_mem', '7777kB', false)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let e = check_settings(&mut conn, &baseline).await.unwrap_err();
    assert_eq!(
        jobhost::hygiene::leaked(&e).as_deref(),
        Some("session_state_leaked: session settings work_mem"),
        "{e}"
    );
    sqlx::raw_sql("rollback").execute(&mut *conn).await.unwrap();

    // So is a search_path of its own, which is not among the watched settings
    // but in the fingerprint as the caller's.
    sqlx::raw_sql(begin).execute(&mut *conn).await.unwrap();
    sqlx::raw_sql("select set_config('search_path', 'pg_temp, public', false)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let e = check_settings(&mut conn, &baseline).await.unwrap_err();
    assert!(
        jobhost::hygiene::leaked(&e).is_some_and(|m| m.contains("search_path (pg_temp, public)")),
        "{e}"
    );
    sqlx::raw_sql("rollback").execute(&mut *conn).await.unwrap();
    assert_eq!(baseline.clean_fingerprints(), 1, "no leak was learned");
}

/// Clean runs of different jobs teach a runner one fingerprint; a job role
/// whose sessions carry settings of their own (`ALTER ROLE ... SET`) costs
/// one more read and one more fingerprint, and a plugin's change of that
/// role's setting is still named.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_role_with_settings_of_its_own_learns_its_clean_state_and_its_leaks_are_named(
    pool: PgPool,
) {
    let role = jobspace_and_role(&pool).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "alter role \"{role}\" set work_mem = '8MB'"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let (runner, one, metrics) = counted_runner(&pool).await;
    let learned = || runner.session_baseline().clean_fingerprints();
    for (n, name) in ["first", "second", "first"].into_iter().enumerate() {
        let result = hostile_run(&runner, name, None, "select 1", n as i64).await;
        finished(result, Outcome::Ok);
    }
    assert_eq!(learned(), 1, "clean runs of two jobs: one state");
    for n in 10..12 {
        let result = hostile_run(&runner, "as-role", Some(&role), "select 1", n).await;
        finished(result, Outcome::Ok);
    }
    assert_eq!(learned(), 2, "the role's sessions: one state more");

    let setup = "create function jobspace.wm() returns text language sql as $$ select set_config('work_mem', '16MB', false) $$";
    finished(
        hostile_run(&runner, "as-role", Some(&role), setup, 20).await,
        Outcome::Ok,
    );
    let msg = finished(
        hostile_run(&runner, "as-role", Some(&role), "select jobspace.wm()", 21).await,
        Outcome::Error,
    );
    assert!(
        msg.contains("session_state_leaked") && msg.contains("work_mem"),
        "{msg}"
    );
    assert_eq!(learned(), 2);
    // The checks that passed: two reads (one per state), four skipped.
    let text = metrics.encode();
    for line in [
        "jobhost_session_check_settings_total{settings=\"read\"} 2",
        "jobhost_session_check_settings_total{settings=\"fingerprint\"} 4",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in {text}");
    }
    one.close().await;
    runner.run_pools().close_roles().await;
    drop_role(&pool, &role).await;
}

/// A custom setting (`app.tenant`: the usual key of row-level security
/// policies) is a placeholder that no view lists, `pg_settings` included, so
/// no check can find one a plugin set at session level. The host resets
/// every setting at the end of each run that sent SQL (after the check):
/// the value one job set never reaches the next job on the same connection.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_custom_setting_set_through_a_function_never_reaches_the_next_job(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    for (round, role) in [None, Some(role.as_str())].into_iter().enumerate() {
        let (runner, one) = one_connection_runner(&pool).await;
        let name = format!("tenant-{round}");
        let n = round as i64 * 100;
        let setup = format!(
            "create function jobspace.tenant_{round}() returns text language sql as $$ select set_config('app.tenant', '42', false) $$"
        );
        finished(
            hostile_run(&runner, &name, role, &setup, n).await,
            Outcome::Ok,
        );
        let attack = format!("select jobspace.tenant_{round}()");
        finished(
            hostile_run(&runner, &name, role, &attack, n + 1).await,
            Outcome::Ok,
        );
        let seen = next_job_reads(&runner, role, n, TENANT_SEEN).await;
        assert!(
            seen.contains("\"unset "),
            "role {role:?}: the next job read app.tenant = {seen}"
        );
        one.close().await;
    }
    drop_role(&pool, &role).await;
}

/// A sequence's last value is session state no view lists: after a job's
/// `nextval`, the next job on the connection would read it with `currval`
/// (or `lastval()`), another job's number. The host forgets them after each
/// run that sent SQL, as a fresh connection would: `currval` is undefined.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_sequence_value_never_reaches_the_next_job(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create sequence jobspace.numbers start 4242; grant usage on sequence jobspace.numbers to \"{role}\""
    )))
    .execute(&pool)
    .await
    .unwrap();
    for (round, role) in [None, Some(role.as_str())].into_iter().enumerate() {
        let (runner, one) = one_connection_runner(&pool).await;
        let n = round as i64 * 100;
        let name = format!("numbering-{round}");
        let drawn = "select nextval('jobspace.numbers')";
        finished(
            hostile_run(&runner, &name, role, drawn, n).await,
            Outcome::Ok,
        );
        let mut next = job(
            "bystander",
            guests::TEST_CORE_PROBE,
            &[
                ("mode", "query"),
                ("sql", "select currval('jobspace.numbers')"),
            ],
        );
        next.config.role = role.map(str::to_owned);
        admit_on(&runner, &next).await;
        let seen = finished(
            runner.run(&next, slot(n + 1)).await.unwrap(),
            Outcome::Error,
        );
        assert!(
            seen.contains("is not yet defined in this session"),
            "role {role:?}: the next job read another job's sequence value: {seen}"
        );
        one.close().await;
    }
    drop_role(&pool, &role).await;
}

/// `role` is hidden from `pg_settings`, and a `SET ROLE` inside a function
/// the job created is out of the guard's sight: the check reads it.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_role_set_through_a_function_is_caught(pool: PgPool) {
    leak_case(
        &pool,
        &["create function jobspace.r() returns text language sql as $$ select set_config('role', current_user, false) $$"],
        "select jobspace.r()",
        "session role",
    )
    .await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_temporary_table_created_through_a_function_is_caught(pool: PgPool) {
    leak_case(
        &pool,
        &["create function jobspace.mk() returns void language plpgsql as $$ begin create temp table sneaky (x int); end $$"],
        "select jobspace.mk()",
        "temporary objects sneaky",
    )
    .await;
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_setting_changed_by_a_deferred_trigger_is_caught_before_commit(pool: PgPool) {
    // Postgres runs a deferred trigger at COMMIT, after the check: the host
    // fires them before it, so this is caught like any other leak.
    leak_case(
        &pool,
        &[
            "create table jobspace.later (x int)",
            "create function jobspace.sp() returns trigger language plpgsql as $$ begin perform set_config('search_path', 'jobspace, public', false); return null; end $$",
            "create constraint trigger sp after insert on jobspace.later deferrable initially deferred for each row execute function jobspace.sp()",
        ],
        "insert into jobspace.later values (1)",
        "search_path",
    )
    .await;
}

/// Both triggers of [`redeferring_setup`] ran, each as `role`.
async fn both_fired_as(pool: &PgPool, role: &str) {
    let fired: Vec<(String, String)> =
        sqlx::query_as("select fired, by_role from jobspace.who order by fired")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        fired,
        [
            ("first".to_owned(), role.to_owned()),
            ("second".to_owned(), role.to_owned())
        ],
        "each deferred trigger ran as the job's role"
    );
}

/// The setup of the deferred-trigger cases, as the restricted role: table
/// `first`'s deferred trigger notes who it runs as, then defers again and
/// writes `second`, whose deferred trigger notes who it runs as and runs
/// `then` (SQL in a PL/pgSQL body). Fired early by the host, the first
/// trigger defers the second past the check, to COMMIT.
fn redeferring_setup(then: &str) -> Vec<String> {
    vec![
        "create table jobspace.who (fired text, by_role text)".into(),
        "create table jobspace.first (x int)".into(),
        "create table jobspace.second (x int)".into(),
        "create function jobspace.redefer() returns trigger language plpgsql as $$ begin \
             insert into jobspace.who values (tg_table_name, current_user); \
             set constraints all deferred; insert into jobspace.second values (1); return null; end $$"
            .into(),
        format!(
            "create function jobspace.note() returns trigger language plpgsql as $$ begin \
             insert into jobspace.who values (tg_table_name, current_user); {then} return null; end $$"
        ),
        "create constraint trigger t1 after insert on jobspace.first deferrable initially deferred for each row execute function jobspace.redefer()".into(),
        "create constraint trigger t2 after insert on jobspace.second deferrable initially deferred for each row execute function jobspace.note()".into(),
    ]
}

/// Runs [`redeferring_setup`]`(then)` as job `deferring` with `role`, each
/// statement a run of its own, then the insert whose COMMIT fires both
/// triggers, the second at COMMIT itself. Every run must end `ok`.
async fn commit_through_redeferred_triggers(runner: &Runner, role: &str, then: &str) {
    for (i, sql) in redeferring_setup(then).iter().enumerate() {
        let result = hostile_run(runner, "deferring", Some(role), sql, i as i64).await;
        finished(result, Outcome::Ok);
    }
    let attack = "insert into jobspace.first values (1)";
    finished(
        hostile_run(runner, "deferring", Some(role), attack, 50).await,
        Outcome::Ok,
    );
}

/// A job's deferred triggers run with the job's rights, never the host's:
/// Postgres runs them as the role in force when they fire. When the job's
/// role was only `SET LOCAL ROLE` on the host's connection, the host took
/// its own role back to write the run's row, and a deferred trigger at
/// COMMIT ran as the host's role (here a superuser); the run's connection
/// now logs in as the job's role. The second trigger is deferred past the
/// host's early firing, so it fires at COMMIT itself.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_deferred_trigger_runs_as_the_jobs_role_never_the_hosts(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let (runner, one) = one_connection_runner(&pool).await;
    commit_through_redeferred_triggers(&runner, &role, "").await;
    both_fired_as(&pool, &role).await;
    one.close().await;
    drop_role(&pool, &role).await;
}

/// A setting changed by a trigger that fires at COMMIT itself (deferred anew
/// past the host's early firing) is reset in the run's closing query, after
/// the check: the run's work stands and the next job never sees it, a custom
/// setting (which no check can list) included. The trigger drops both
/// triggers as it fires, so that after COMMIT the database shows no trace of
/// them.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_setting_changed_at_commit_never_reaches_the_next_job(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let (runner, one) = one_connection_runner(&pool).await;
    commit_through_redeferred_triggers(
        &runner,
        &role,
        "perform set_config('search_path', 'jobspace, public', false); \
         perform set_config('app.tenant', '42', false); \
         drop trigger t2 on jobspace.second; drop trigger t1 on jobspace.first;",
    )
    .await;
    both_fired_as(&pool, &role).await;
    let seen = next_job_sees(&runner, Some(&role), 0).await;
    assert!(
        seen.contains("public | temp objects: 0 | session locks: 0") && !seen.contains("jobspace"),
        "the next job saw {seen}"
    );
    let tenant = next_job_reads(&runner, Some(&role), 1, TENANT_SEEN).await;
    assert!(
        tenant.contains("\"unset "),
        "the next job read app.tenant = {tenant}"
    );
    one.close().await;
    drop_role(&pool, &role).await;
}

/// A `role` taken at COMMIT (by a trigger deferred past the host's early
/// firing) is not undone by resetting the settings, and `pg_settings` does
/// not list it: the check after COMMIT reads it, the connection is closed,
/// and the event names the job.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_role_taken_at_commit_is_found_after_it(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let (runner, one, metrics) = counted_runner(&pool).await;
    let logs = LogCapture::start();
    commit_through_redeferred_triggers(
        &runner,
        &role,
        "perform set_config('role', current_user, false); \
         drop trigger t2 on jobspace.second; drop trigger t1 on jobspace.first;",
    )
    .await;
    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains("session_state_leaked")
            && l.contains("job=deferring")
            && l.contains(&format!("session role {role}"))),
        "the leak is logged with the job: {text}"
    );
    assert!(
        counted_leak(&metrics, "deferring", "after_commit"),
        "the leak is counted: {}",
        metrics.encode()
    );
    let seen = next_job_reads(
        &runner,
        Some(&role),
        0,
        "select current_setting('role') || ' ' || $1::text",
    )
    .await;
    assert!(
        seen.contains("\"none "),
        "the next job ran with role {seen}"
    );
    one.close().await;
    drop_role(&pool, &role).await;
}

/// The host's statements after the plugin's cannot be redirected: the job's
/// role creates a `clock_timestamp()` in its own schema and moves its
/// `search_path` there (through a function, since the guard refuses `SET`).
/// The check (schema-qualified, run before the host's own `search_path`)
/// catches the change, and the shadow is never called.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn host_statements_ignore_a_shadowing_function(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let as_role = format!(
        "set role \"{role}\";
         create sequence jobspace.shadow_calls;
         create function jobspace.clock_timestamp() returns timestamptz language plpgsql
             as $$ begin perform pg_catalog.nextval('jobspace.shadow_calls'); return pg_catalog.now(); end $$;
         create function jobspace.move_path() returns text language sql
             as $$ select pg_catalog.set_config('search_path', 'jobspace, pg_catalog', true) $$;
         reset role"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(as_role))
        .execute(&pool)
        .await
        .unwrap();
    for (n, role) in [None, Some(role.as_str())].into_iter().enumerate() {
        let (runner, one) = one_connection_runner(&pool).await;
        let msg = finished(
            hostile_run(
                &runner,
                "shadow",
                role,
                "select jobspace.move_path()",
                n as i64,
            )
            .await,
            Outcome::Error,
        );
        assert!(msg.contains("search_path"), "{msg}");
        one.close().await;
    }
    let called: bool = sqlx::query_scalar("select is_called from jobspace.shadow_calls")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        !called,
        "the host called the job's shadowing clock_timestamp()"
    );
    drop_role(&pool, &role).await;
}

/// A run cut off by its timeout may be mid-statement: its connection is
/// closed, never handed to the next run.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_timed_out_run_never_returns_its_connection_to_the_pool(pool: PgPool) {
    create_probe_table(&pool).await;
    let (runner, one) = one_connection_runner(&pool).await;
    let mut slow = sleeper("slow", 5000);
    slow.config.timeout = Duration::from_millis(500);
    finished(runner.run(&slow, slot(1)).await.unwrap(), Outcome::Timeout);
    let pid: i32 = sqlx::query_scalar("select backend_pid from jobhost.runs where job = 'slow'")
        .fetch_one(&pool)
        .await
        .unwrap();
    // The next run on the one-connection pool gets a new backend.
    let next = probe("next", "write");
    finished(runner.run(&next, slot(2)).await.unwrap(), Outcome::Ok);
    let next_pid: i32 =
        sqlx::query_scalar("select backend_pid from jobhost.runs where job = 'next'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(pid, next_pid, "the timed-out run's connection was reused");
    wait_for(Duration::from_secs(5), "the old backend to end", || async {
        sqlx::query_scalar::<_, i64>("select count(*) from pg_stat_activity where pid = $1")
            .bind(pid)
            .fetch_one(&pool)
            .await
            .unwrap()
            == 0
    })
    .await;
    assert_eq!(probe_rows(&pool).await, 1, "only the second run's write");
    one.close().await;
}

/// A finished transaction keeps its connection until it is dropped: the
/// runner tears the run's plugin instance down in between, after the commit
/// (so not under the lock) and before the connection can admit another run
/// (so no instance outlives the connection that admitted it, which is what
/// sizes the instance pool). A clean one then goes back to the pool; one
/// whose check found leftovers is closed.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_finished_transaction_keeps_its_connection_until_dropped(pool: PgPool) {
    let (_, one) = one_connection_runner(&pool).await;
    let pid = async |one: &PgPool| -> i32 {
        let mut conn = tokio::time::timeout(Duration::from_secs(5), one.acquire())
            .await
            .expect("the pool's one connection never came back")
            .unwrap();
        sqlx::query_scalar("select pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
    };
    let first = pid(&one).await;

    let mut tx = OpenTx::begin(one.acquire().await.unwrap(), "", Pooler::None)
        .await
        .unwrap();
    let left = tx
        .finish("commit", AfterCommit::Light, &Default::default())
        .await
        .unwrap();
    assert_eq!(left, None);
    assert!(
        tx.conn().is_none(),
        "a finished transaction lends no connection"
    );
    // (A dropped pooled connection returns to its pool in a task of its
    // own: give it ample time to show it did not.)
    assert!(
        tokio::time::timeout(Duration::from_millis(300), one.acquire())
            .await
            .is_err(),
        "the connection went back to the pool before the transaction was dropped"
    );
    drop(tx);
    assert_eq!(pid(&one).await, first, "a clean connection is pooled again");

    // Leftovers: a session lock taken inside the transaction outlives COMMIT.
    let mut tx = OpenTx::begin(one.acquire().await.unwrap(), "", Pooler::None)
        .await
        .unwrap();
    let conn = tx.conn().unwrap();
    sqlx::query("select pg_advisory_lock(1, 2)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let left = tx
        .finish("commit", AfterCommit::Light, &Default::default())
        .await
        .unwrap();
    assert!(
        left.is_some_and(|l| l.contains("advisory")),
        "the check saw the lock"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), one.acquire())
            .await
            .is_err()
    );
    drop(tx);
    assert_ne!(
        pid(&one).await,
        first,
        "a connection with leftovers was pooled"
    );
    one.close().await;
}

/// Runs in flight are judged by their host's liveness, never by backend
/// pids. Published runs ([`jobhost::in_flight`]): a live host's stays in
/// flight; a dead host's is recorded `lost` by the next holder of the job's
/// lock, unless it had finished (its row stands, the entry goes); a host's
/// own run whose task ended without an outcome is recorded `lost` by that
/// host's next publication, and one that ended with its row is only
/// unpublished. A `running` row (written by hosts of earlier versions) of a
/// dead host is still marked `lost`.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn runs_in_flight_are_judged_by_host_liveness(pool: PgPool) {
    use jobhost::in_flight::{InFlight, publish_once};
    create_probe_table(&pool).await;
    jobhost::hosts::register(&pool, "alive", true, 0)
        .await
        .unwrap();
    sqlx::query(
        "insert into jobhost.hosts (id, hostname, pid, version, started_at, last_seen)
         values ('silent', 'x', 1, '0', now() - interval '1 hour', now() - interval '1 hour')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let next_id = || async {
        sqlx::query_scalar::<_, i64>("select nextval('jobhost.runs_id_seq')")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let row = |host: &str, n: i64| jobhost::db::RunRow {
        job: "judged".into(),
        slot: slot(n),
        host_id: host.into(),
        plugin_sha256: "x".into(),
        started_at: None,
        // A pid would mean nothing here: nothing judges by it.
        backend_pid: None,
    };
    let (alive, silent) = (InFlight::default(), InFlight::default());
    let (live_id, dead_id, done_id, orphan_id, ended_id) = (
        next_id().await,
        next_id().await,
        next_id().await,
        next_id().await,
        next_id().await,
    );
    let live = alive.enter(live_id, &row("alive", 1), 1);
    let orphan = alive.enter(orphan_id, &row("alive", 6), 1);
    let ended = alive.enter(ended_id, &row("alive", 7), 1);
    let dead = silent.enter(dead_id, &row("silent", 2), 3);
    let done = silent.enter(done_id, &row("silent", 5), 1);
    for (host, set) in [("alive", &alive), ("silent", &silent)] {
        assert!(
            publish_once(&pool, host, set, Duration::ZERO)
                .await
                .unwrap()
        );
    }
    // The silent host's `done` run had committed its row before it went.
    sqlx::query(
        "insert into jobhost.runs (id, job, slot, attempt, host_id, plugin_sha256, started_at, outcome)
         values ($1, 'judged', $2, 1, 'silent', 'x', now(), 'ok')",
    )
    .bind(done_id)
    .bind(slot(5))
    .execute(&pool)
    .await
    .unwrap();
    let legacy: i64 = sqlx::query_scalar(
        "insert into jobhost.runs (job, slot, attempt, host_id, plugin_sha256, started_at, outcome)
         values ('judged', $1, 0, 'silent', 'x', now() - interval '1 minute', 'running') returning id",
    )
    .bind(slot(4))
    .fetch_one(&pool)
    .await
    .unwrap();
    let published = || async {
        sqlx::query_scalar::<_, i64>("select run_id from jobhost.in_flight order by run_id")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let recorded = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, i32)>(
                "select outcome, attempt from jobhost.runs where id = $1",
            )
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        published().await,
        vec![live_id, dead_id, done_id, orphan_id, ended_id]
    );

    let job = probe("judged", "write");
    finished(runner(&pool).run(&job, slot(3)).await.unwrap(), Outcome::Ok);
    assert_eq!(
        recorded(live_id).await,
        vec![],
        "a live host's run is in flight"
    );
    assert_eq!(
        recorded(dead_id).await,
        vec![("lost".into(), 3)],
        "a dead host's run"
    );
    assert_eq!(
        recorded(done_id).await,
        vec![("ok".into(), 1)],
        "a finished run stands"
    );
    assert_eq!(
        recorded(legacy).await,
        vec![("lost".into(), 0)],
        "a `running` row"
    );
    assert_eq!(published().await, vec![live_id, orphan_id, ended_id]);
    drop((dead, done));

    // The live host's own publication: one task died, one recorded its run.
    drop(orphan);
    ended.recorded();
    assert!(
        publish_once(&pool, "alive", &alive, Duration::ZERO)
            .await
            .unwrap()
    );
    assert_eq!(recorded(orphan_id).await, vec![("lost".into(), 1)]);
    assert_eq!(
        recorded(ended_id).await,
        vec![],
        "its run writes its own row"
    );
    assert_eq!(published().await, vec![live_id]);
    // Nothing changed: nothing is sent.
    assert!(
        !publish_once(&pool, "alive", &alive, Duration::ZERO)
            .await
            .unwrap()
    );
    drop(live);
}

/// The same check guards a session (long) job's short transactions: a
/// commit that would leave a session lock on a pooled connection is refused,
/// rolled back, and the run is an error naming the leak; nothing stays held.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_session_jobs_commit_that_would_leak_is_refused(pool: PgPool) {
    create_probe_table(&pool).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create schema jobspace;
         create function jobspace.g() returns void language sql
             as 'select pg_advisory_lock({}, {})'",
        VICTIM_KEY.0, VICTIM_KEY.1
    )))
    .execute(&pool)
    .await
    .unwrap();
    let logs = LogCapture::start();
    let (runner, one, metrics) = counted_runner(&pool).await;
    let mut long = job(
        "long-leak",
        guests::TEST_SESSION_PROBE,
        &[("mode", "sql"), ("sql", "select jobspace.g()")],
    );
    long.config.lock = jobhost::config::LockMode::Session;
    long.config.heartbeat = Duration::from_millis(200);
    let msg = finished(runner.run(&long, slot(1)).await.unwrap(), Outcome::Error);
    assert!(
        msg.contains("session_state_leaked")
            && msg.contains(&format!("({}, {})", VICTIM_KEY.0, VICTIM_KEY.1)),
        "{msg}"
    );
    assert!(
        logs.text()
            .lines()
            .any(|l| l.contains("session_state_leaked") && l.contains("job=long-leak")),
        "{}",
        logs.text()
    );
    assert!(
        counted_leak(&metrics, "long-leak", "before_commit"),
        "the leak is counted: {}",
        metrics.encode()
    );
    assert_eq!(
        advisory_locks(&pool).await,
        0,
        "the leaked lock's connection was closed"
    );
    one.close().await;
}

/// A session job's own COMMIT fires its deferred triggers as the job's role
/// too (the same closing statements as an `xact` run's).
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_session_jobs_deferred_trigger_runs_as_the_jobs_role(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let setup = redeferring_setup("").join(";\n");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "set role \"{role}\";\n{setup};\nreset role"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let (runner, one) = one_connection_runner(&pool).await;
    let mut long = job(
        "long-deferring",
        guests::TEST_SESSION_PROBE,
        &[
            ("mode", "sql"),
            ("sql", "insert into jobspace.first values (1)"),
        ],
    );
    long.config.lock = jobhost::config::LockMode::Session;
    long.config.heartbeat = Duration::from_millis(200);
    long.config.role = Some(role.clone());
    admit_on(&runner, &long).await;
    finished(runner.run(&long, slot(1)).await.unwrap(), Outcome::Ok);
    both_fired_as(&pool, &role).await;
    one.close().await;
    drop_role(&pool, &role).await;
}

/// A deferred constraint the plugin's work violates is the run's error, like
/// any statement's: its work is rolled back and its row says what Postgres
/// said, written on the run's own connection (the host fires deferred
/// constraints before its check, inside the transaction it can still roll
/// back to the savepoint; at COMMIT, the transaction was lost).
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_violated_deferred_constraint_fails_the_run_and_rolls_it_back(pool: PgPool) {
    create_probe_table(&pool).await;
    sqlx::raw_sql(
        "create schema jobspace;
         create table jobspace.parent (id int primary key);
         create table jobspace.child (parent int references jobspace.parent deferrable initially deferred)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (runner, one) = one_connection_runner(&pool).await;
    let pid = |one: PgPool| async move {
        sqlx::query_scalar::<_, i32>("select pg_backend_pid()")
            .fetch_one(&one)
            .await
            .unwrap()
    };
    let before = pid(one.clone()).await;
    let result = hostile_run(
        &runner,
        "deferred-fk",
        None,
        "insert into jobspace.child values (42)",
        1,
    )
    .await;
    let msg = finished(result, Outcome::Error);
    assert!(
        msg.starts_with("SQLSTATE 23503") && msg.contains("child_parent_fkey"),
        "{msg}"
    );
    let (rows, probes): (i64, i64) = sqlx::query_as(
        "select (select count(*) from jobspace.child), (select count(*) from probe)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, probes), (0, 0), "the run's work was rolled back");
    assert_eq!(
        pid(one.clone()).await,
        before,
        "the run's connection went back to the pool"
    );
    one.close().await;
}

/// A job role that may create a function can put `RESET ROLE` in its body
/// (the guard refuses the statement from the plugin, but cannot see into a
/// function), and Postgres then runs the rest of the transaction as the
/// *session* user. A run's connection logs in as the job's role, so that is
/// the role itself: never the host's login role (DESIGN §7). Before, the
/// function recorded `postgres`.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_job_role_cannot_become_the_hosts_login_role(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let (runner, one) = one_connection_runner(&pool).await;
    let setup = [
        "create table jobspace.seen (by_role text, session_role text)",
        "create function jobspace.escape() returns void language plpgsql as \
         $$ begin reset role; insert into jobspace.seen values (current_user, session_user); end $$",
    ];
    for (i, sql) in setup.iter().enumerate() {
        let result = hostile_run(&runner, "escape", Some(&role), sql, i as i64).await;
        finished(result, Outcome::Ok);
    }
    let attack = "select jobspace.escape()";
    let result = hostile_run(&runner, "escape", Some(&role), attack, 50).await;
    let seen: Vec<(String, String)> =
        sqlx::query_as("select by_role, session_role from jobspace.seen")
            .fetch_all(&pool)
            .await
            .unwrap();
    // The role is cluster-wide: dropped before the verdict.
    one.close().await;
    drop_role(&pool, &role).await;
    finished(result, Outcome::Ok);
    assert_eq!(
        seen,
        [(role.clone(), role.clone())],
        "the job's statements ran as its role only"
    );
}
