//! Plugins in Python and JavaScript run under the host as Rust ones do: the
//! same results on the same data, failures rolled back with the guest's own
//! message first, SQL errors carried back typed.
//!
//! The components are built by componentize-py and componentize-js from
//! `plugins/python` and `plugins/js` (see `jobhost_tests::polyglot`).

use jobhost::db::Outcome;
use jobhost_tests::guests;
use jobhost_tests::polyglot::{self, Lang};
use sqlx::PgPool;

use crate::support::*;

fn built(lang: Lang, name: &str) -> String {
    polyglot::build(lang, name, "xact-plugin")
        .unwrap_or_else(|e| panic!("{e:#}"))
        .display()
        .to_string()
}

async fn seed_audit_rows(pool: &PgPool, n: i32) {
    sqlx::query(
        "insert into demo.audit_events (actor, action, payload)
         select 'actor-' || g, case when g % 3 = 0 then 'logout' else 'login' end,
                jsonb_build_object('seq', g, 'ok', g % 2 = 0, 'note', 'é ' || repeat('x', g % 7))
           from generate_series(1, $1) g",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

async fn hashes(pool: &PgPool) -> Vec<(i64, Option<String>, String)> {
    sqlx::query_as("select id, content_hash, hash_status from demo.audit_events order by id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The Python port hashes the same rows to the same hashes, in the same
/// batches, with the same summaries, as the Rust job.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn python_hash_job_matches_the_rust_job(pool: PgPool) {
    jobhost::demo::create_tables(&pool).await.unwrap();
    seed_audit_rows(&pool, 130).await;
    let runner = runner(&pool);
    let config = [("batch-size", "50")];
    let python = built(Lang::Python, "integrity-hash-retry");
    let mut summaries = Vec::new();
    let mut results = Vec::new();
    for (i, path) in [guests::INTEGRITY_HASH_RETRY, python.as_str()]
        .iter()
        .enumerate()
    {
        sqlx::query("update demo.audit_events set content_hash = null, hash_status = 'pending', hashed_at = null")
            .execute(&pool)
            .await
            .unwrap();
        let mut job = job("integrity-hash-retry", path, &config);
        job.config.role = Some("jobhost_demo_hash".into());
        admit(&pool, &job).await;
        let mut said = Vec::new();
        for n in 0..4 {
            let slot = slot(10 * i as i64 + n);
            said.push(finished(runner.run(&job, slot).await.unwrap(), Outcome::Ok));
        }
        summaries.push(said);
        results.push(hashes(&pool).await);
    }
    assert_eq!(
        summaries[0],
        [
            "hashed 50 rows",
            "hashed 50 rows",
            "hashed 30 rows",
            "hashed 0 rows"
        ]
    );
    assert_eq!(summaries[1], summaries[0], "Python said what Rust said");
    assert_eq!(results[0].len(), 130);
    assert!(
        results[0]
            .iter()
            .all(|(_, h, s)| h.is_some() && s == "complete")
    );
    assert_eq!(
        results[1], results[0],
        "Python hashed what Rust hashed, to the same hashes"
    );
}

/// A Python exception is recorded with the exception's own message first; a
/// SQL error comes back typed, with its SQLSTATE; nothing is written either way.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn python_failures_name_the_guest_error_and_roll_back(pool: PgPool) {
    jobhost::demo::create_tables(&pool).await.unwrap();
    seed_audit_rows(&pool, 10).await;
    let runner = runner(&pool);
    let python = built(Lang::Python, "integrity-hash-retry");

    let bad = job("hash-py", &python, &[("batch-size", "many")]);
    let msg = finished(runner.run(&bad, slot(1)).await.unwrap(), Outcome::Trap);
    assert!(
        msg.starts_with("ValueError: invalid literal for int() with base 10: 'many'"),
        "the guest's own error first: {msg}"
    );
    assert!(msg.len() < 1200, "no wasm backtrace in the record: {msg}");

    // LIMIT -1 is rejected by Postgres (2201W): the job returns the SQL error
    // with its failure, typed.
    let negative = job("hash-py", &python, &[("batch-size", "-1")]);
    let msg = finished(
        runner.run(&negative, slot(2)).await.unwrap(),
        Outcome::Error,
    );
    assert!(msg.starts_with("hashing audit rows failed"), "{msg}");
    assert!(msg.contains("code: \"2201W\""), "typed SQL error: {msg}");
    assert!(
        hashes(&pool)
            .await
            .iter()
            .all(|(_, h, s)| h.is_none() && s == "pending")
    );
    assert_eq!(advisory_locks(&pool).await, 0);
}

async fn retention_tables(pool: &PgPool, schema: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create schema {schema};
         create table {schema}.sessions (id int, created_at timestamptz not null);
         create table {schema}.events (id int, created_at timestamptz not null);
         insert into {schema}.sessions select g, now() - g * interval '1 day' from generate_series(1, 20) g;
         insert into {schema}.events select g, now() - g * interval '1 hour' from generate_series(1, 50) g;"
    )))
    .execute(pool)
    .await
    .unwrap();
}

async fn counts(pool: &PgPool, schema: &str) -> (i64, i64) {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select (select count(*) from {schema}.sessions), (select count(*) from {schema}.events)"
    )))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The JavaScript port of db-retention deletes what the Rust job deletes.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn js_retention_job_matches_the_rust_job(pool: PgPool) {
    let runner = runner(&pool);
    let js = built(Lang::Js, "db-retention");
    let mut said = Vec::new();
    for (schema, path) in [("rust", guests::DB_RETENTION), ("js", js.as_str())] {
        retention_tables(&pool, schema).await;
        let sessions = format!("{schema}.sessions");
        let events = format!("{schema}.events");
        let job = job(
            "retention",
            path,
            &[(&sessions, "7 days"), (&events, "1 day 6 hours")],
        );
        let msg = finished(
            runner.run(&job, slot(said.len() as i64)).await.unwrap(),
            Outcome::Ok,
        );
        said.push(msg.replace(&format!("{schema}."), ""));
        assert_eq!(counts(&pool, schema).await, (6, 29), "{schema}: {msg}");
    }
    assert_eq!(said[0], "deleted 35 rows (events=21, sessions=14)");
    assert_eq!(said[1], said[0], "JavaScript said what Rust said");
}

/// A JavaScript failure after a write rolls the write back and keeps the SQL
/// error typed; a plain exception fails the run with its own message.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn js_failures_name_the_guest_error_and_roll_back(pool: PgPool) {
    let runner = runner(&pool);
    let js = built(Lang::Js, "db-retention");
    retention_tables(&pool, "app").await;

    // The first table's delete runs, then the second table does not exist.
    let missing = job(
        "retention-js",
        &js,
        &[("app.sessions", "7 days"), ("app.sessionz", "7 days")],
    );
    let msg = finished(runner.run(&missing, slot(1)).await.unwrap(), Outcome::Error);
    assert!(
        msg.starts_with("deleting from app.sessionz failed"),
        "{msg}"
    );
    assert!(msg.contains("code: \"42P01\""), "typed SQL error: {msg}");
    assert_eq!(
        counts(&pool, "app").await,
        (20, 50),
        "the first delete was rolled back"
    );

    // A plain exception is the run's failure, with its own message.
    let bad_name = job("retention-js", &js, &[("App.Sessions", "7 days")]);
    let msg = finished(
        runner.run(&bad_name, slot(2)).await.unwrap(),
        Outcome::Error,
    );
    assert_eq!(msg, "config key `App.Sessions` is not a plain table name");
    assert_eq!(advisory_locks(&pool).await, 0);
}
