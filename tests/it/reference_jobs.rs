//! The reference jobs do their real work on seeded demo rows.

use jobhost::db::Outcome;
use jobhost_tests::guests;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::support::*;

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn integrity_hash_retry_hashes_a_batch_of_pending_rows(pool: PgPool) {
    jobhost::demo::create_tables(&pool).await.unwrap();
    sqlx::query(
        "insert into demo.audit_events (actor, action, payload)
         select 'actor-' || g, 'login', jsonb_build_object('seq', g, 'ok', true)
         from generate_series(1, 60) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut job = job(
        "integrity-hash-retry",
        guests::INTEGRITY_HASH_RETRY,
        &[("batch-size", "50")],
    );
    job.config.role = Some("jobhost_demo_hash".into());
    admit(&pool, &job).await;
    let runner = runner(&pool);

    assert_eq!(
        finished(runner.run(&job, slot(1)).await.unwrap(), Outcome::Ok),
        "hashed 50 rows"
    );
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "select actor, action, payload::text, content_hash from demo.audit_events
          where hash_status = 'complete' order by id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 50);
    for (actor, action, payload, hash) in &rows {
        let expected = hex::encode(Sha256::digest(format!("{actor}\n{action}\n{payload}")));
        assert_eq!(hash, &expected, "hash of {actor}");
    }

    assert_eq!(
        finished(runner.run(&job, slot(2)).await.unwrap(), Outcome::Ok),
        "hashed 10 rows"
    );
    let pending: i64 =
        sqlx::query_scalar("select count(*) from demo.audit_events where hash_status = 'pending'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(pending, 0);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn activation_drip_advances_due_users_one_step(pool: PgPool) {
    jobhost::demo::create_tables(&pool).await.unwrap();
    sqlx::raw_sql(
        "insert into demo.users (email, activation_step, last_step_at) values
           ('due@x.test', 1, now() - interval '7 hours'),
           ('recent@x.test', 1, now() - interval '1 hour'),
           ('done@x.test', 5, now() - interval '7 hours'),
           ('new@x.test', 0, null);",
    )
    .execute(&pool)
    .await
    .unwrap();
    // `new` was created just now, so it is not due yet either.
    let mut job = job(
        "activation-drip",
        guests::ACTIVATION_DRIP,
        &[("max-step", "5"), ("step-interval", "6 hours")],
    );
    job.config.role = Some("jobhost_demo_drip".into());
    admit(&pool, &job).await;
    let msg = finished(runner(&pool).run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    assert_eq!(msg, "advanced 1 users");
    let steps: Vec<(String, i32)> =
        sqlx::query_as("select email, activation_step from demo.users order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        steps,
        vec![
            ("due@x.test".into(), 2),
            ("recent@x.test".into(), 1),
            ("done@x.test".into(), 5),
            ("new@x.test".into(), 0)
        ]
    );
    let messages: Vec<(i32,)> = sqlx::query_as("select step from demo.activation_messages")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(messages, vec![(2,)]);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn db_retention_deletes_rows_past_each_window(pool: PgPool) {
    jobhost::demo::create_tables(&pool).await.unwrap();
    for table in [
        "sessions",
        "job_logs",
        "notifications",
        "password_resets",
        "webhook_events",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "insert into demo.{table} (created_at)
             select now() - make_interval(days => g) + interval '1 hour' from generate_series(0, 39) g"
        )))
        .execute(&pool)
        .await
        .unwrap();
    }
    // Rows are 0..39 days old, minus an hour of slack: a window of N days keeps
    // the rows of days 0..=N, that is N + 1 rows.
    let mut job = job(
        "db-retention",
        guests::DB_RETENTION,
        &[
            ("demo.sessions", "7 days"),
            ("demo.job_logs", "30 days"),
            ("demo.notifications", "14 days"),
            ("demo.password_resets", "1 day"),
            ("demo.webhook_events", "3 days"),
        ],
    );
    job.config.role = Some("jobhost_demo_retention".into());
    admit(&pool, &job).await;
    let msg = finished(runner(&pool).run(&job, slot(1)).await.unwrap(), Outcome::Ok);
    assert!(msg.starts_with("deleted 140 rows"), "{msg}");
    for (table, kept) in [
        ("sessions", 8),
        ("job_logs", 31),
        ("notifications", 15),
        ("password_resets", 2),
        ("webhook_events", 4),
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from demo.{table}"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, kept, "demo.{table}");
    }
}

/// The demo's roles are shared by every database of the cluster, and the
/// tests set up the demo schema in several databases at once. Setting it up
/// concurrently never fails: altering the same role twice at once made
/// Postgres refuse one with "tuple concurrently updated" (a test failed so).
#[sqlx::test]
async fn the_demo_schema_sets_up_in_several_databases_at_once(pool: PgPool) {
    let db: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut pools = vec![pool.clone()];
    // Test databases' names are long; these keep their tail (unique per test).
    let names: Vec<String> = (1..4)
        .map(|i| format!("jhdemo_{}_{i}", &db[db.len().saturating_sub(16)..]))
        .collect();
    for name in &names {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database \"{name}\"")))
            .execute(&pool)
            .await
            .unwrap();
        let url = jobhost_tests::with_database(&std::env::var("DATABASE_URL").unwrap(), name);
        pools.push(PgPool::connect(&url).await.unwrap());
    }
    let setups = pools.iter().map(|p| async move {
        for _ in 0..15 {
            jobhost::demo::create_tables(p).await?;
        }
        Ok::<_, sqlx::Error>(())
    });
    let done = futures_util::future::join_all(setups).await;
    for (p, name) in pools.into_iter().skip(1).zip(&names) {
        p.close().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop database \"{name}\"")))
            .execute(&pool)
            .await
            .unwrap();
    }
    for result in done {
        result.unwrap();
    }
}
