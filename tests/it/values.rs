//! Every `value` case round-trips through parameters and results, and untyped
//! text is inferred by Postgres like a psql literal.

use jobhost::db::Outcome;
use serde_json::{Value as J, json};
use sqlx::PgPool;

use crate::support::*;

/// Runs `sql` with `params` (tagged JSON) in the probe guest; returns its JSON report.
async fn query(pool: &PgPool, sql: &str, params: J) -> J {
    let params = params.to_string();
    let job = job(
        "values",
        jobhost_tests::guests::TEST_CORE_PROBE,
        &[("mode", "query"), ("sql", sql), ("params", &params)],
    );
    let n: i64 = sqlx::query_scalar("select count(*) from jobhost.runs")
        .fetch_one(pool)
        .await
        .unwrap();
    let msg = finished(runner(pool).run(&job, slot(n)).await.unwrap(), Outcome::Ok);
    serde_json::from_str(&msg).unwrap()
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn every_value_case_round_trips(pool: PgPool) {
    sqlx::raw_sql(
        "create type mood as enum ('happy', 'sad');
         create table vals (b boolean, i2 int2, i4 int4, i8 int8, f4 real, f8 double precision,
             n numeric, t text, by bytea, j json, jb jsonb, u uuid, d date, tm time,
             ts timestamp, tz timestamptz, m mood, vc varchar(10), nothing int4);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let params = json!([
        ["boolean", true],
        ["int2", 7],
        ["int4", -42],
        ["int8", 9_007_199_254_740_993i64],
        ["float4", 1.5],
        ["float8", -2.25],
        ["numeric", "12345.678900"],
        ["text", "héllo"],
        ["bytea", [0, 255, 1]],
        ["json", "{\"a\": [1, 2]}"],
        ["json", "{\"b\":true}"],
        ["uuid", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"],
        ["date", "2024-02-29"],
        ["time", "13:45:00.5"],
        ["timestamp", "2024-02-29T13:45:00.5"],
        ["timestamptz", "2024-02-29T13:45:00.5+01:00"],
        ["other", ["mood", "happy"]],
        ["text", "short"],
        ["null", null]
    ]);
    let placeholders: Vec<String> = (1..=19).map(|i| format!("${i}")).collect();
    let sql = format!(
        "insert into vals values ({}) returning *",
        placeholders.join(", ")
    );
    let report = query(&pool, &sql, params).await;

    let expected_row = json!([
        ["boolean", true],
        ["int2", 7],
        ["int4", -42],
        ["int8", 9_007_199_254_740_993i64],
        ["float4", 1.5],
        ["float8", -2.25],
        ["numeric", "12345.678900"],
        ["text", "héllo"],
        ["bytea", [0, 255, 1]],
        ["json", "{\"a\": [1, 2]}"],
        ["json", "{\"b\": true}"],
        ["uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
        ["date", "2024-02-29"],
        ["time", "13:45:00.500"],
        ["timestamp", "2024-02-29T13:45:00.500"],
        ["timestamptz", "2024-02-29T12:45:00.500Z"],
        ["other", ["mood", "happy"]],
        ["text", "short"],
        ["null", null]
    ]);
    assert_eq!(report["rows"], json!([expected_row]), "{report}");
    let types: Vec<&str> = report["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[1].as_str().unwrap())
        .collect();
    assert_eq!(&types[..4], &["bool", "int2", "int4", "int8"]);
    assert_eq!(types[15], "timestamptz");

    // And what was stored is what was meant, seen from outside the sandbox.
    let (tz, n, jb): (chrono::DateTime<chrono::Utc>, String, String) =
        sqlx::query_as("select tz, n::text, jb::text from vals")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(tz.to_rfc3339(), "2024-02-29T12:45:00.500+00:00");
    assert_eq!(n, "12345.678900");
    assert_eq!(jb, "{\"b\": true}");
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn untyped_text_is_inferred_like_a_literal(pool: PgPool) {
    sqlx::raw_sql(
        "create table events (id bigint primary key, at timestamptz not null);
         insert into events values (1, '2024-01-01T00:00:00Z'), (2, '2024-03-01T00:00:00Z'), (3, '2024-09-01T00:00:00Z');",
    )
    .execute(&pool)
    .await
    .unwrap();
    // No cast in the SQL: the text parameter is compared as a timestamptz.
    let report = query(
        &pool,
        "select count(*) as n from events where at < $1",
        json!([["text", "2024-06-01 00:00:00+00"]]),
    )
    .await;
    assert_eq!(report["rows"], json!([[["int8", 2]]]));

    // An int4 value against a bigint column, and an interval from text.
    let report = query(
        &pool,
        "select id from events where id = $1 and at > $2::timestamptz - $3::interval",
        json!([
            ["int4", 3],
            ["text", "2024-09-02T00:00:00Z"],
            ["text", "2 days"]
        ]),
    )
    .await;
    assert_eq!(report["rows"], json!([[["int8", 3]]]));

    // NULL parameters take the type the context gives them.
    let report = query(
        &pool,
        "select count(*) as n from events where at > coalesce($1, 'epoch'::timestamptz)",
        json!([["null", null]]),
    )
    .await;
    assert_eq!(report["rows"], json!([[["int8", 3]]]));
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn bad_parameters_fail_the_run_with_the_reason(pool: PgPool) {
    sqlx::query("create table events (at timestamptz)")
        .execute(&pool)
        .await
        .unwrap();
    let runner = runner(&pool);
    let bad_time = job(
        "bad-time",
        jobhost_tests::guests::TEST_CORE_PROBE,
        &[
            ("mode", "query"),
            ("sql", "select * from events where at < $1"),
            ("params", r#"[["text", "not a time"]]"#),
        ],
    );
    let msg = finished(
        runner.run(&bad_time, slot(1)).await.unwrap(),
        Outcome::Error,
    );
    assert!(
        msg.contains("22007"),
        "invalid_datetime_format from Postgres's own parser: {msg}"
    );

    let wrong_count = job(
        "wrong-count",
        jobhost_tests::guests::TEST_CORE_PROBE,
        &[
            ("mode", "query"),
            ("sql", "select $1, $2"),
            ("params", r#"[["int4", 1]]"#),
        ],
    );
    let msg = finished(
        runner.run(&wrong_count, slot(1)).await.unwrap(),
        Outcome::Error,
    );
    assert!(msg.contains("2 parameter(s) but 1 value(s)"), "{msg}");
    assert_eq!(advisory_locks(&pool).await, 0);
}

/// The SDK's single-row calls: `query_one` wants exactly one row and names
/// the statement otherwise; `query_opt` takes zero or one.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn query_one_and_query_opt_count_rows(pool: PgPool) {
    let run = |mode: &'static str, sql: &'static str, n: i64| {
        let pool = pool.clone();
        async move {
            let mut job = probe(&format!("{mode}-{n}"), mode);
            job.config.config.push(("sql".into(), sql.into()));
            runner(&pool).run(&job, slot(n)).await.unwrap()
        }
    };
    let one = finished(
        run("query-one", "select 7::int8 as n, 'x' as s", 1).await,
        Outcome::Ok,
    );
    assert_eq!(one, r#"{"n":7,"s":"x"}"#);
    let none = finished(
        run("query-one", "select 1 as n where false", 2).await,
        Outcome::Error,
    );
    assert!(
        none.contains("returned 0 rows where exactly one was expected"),
        "{none}"
    );
    let two = finished(
        run("query-opt", "select g as n from generate_series(1, 2) g", 3).await,
        Outcome::Error,
    );
    assert!(two.contains("returned 2 rows where at most one"), "{two}");
    let empty = finished(
        run("query-opt", "select 1 as n where false", 4).await,
        Outcome::Ok,
    );
    assert_eq!(empty, "null");
}

/// Types without a `value` case of their own arrive as `other` with the text
/// Postgres's output function gives them (what psql shows), never as binary
/// wire bytes: an `int4[]` or an `interval` used to arrive as its binary form,
/// NULs and all, because those bytes happened to be valid UTF-8.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn other_types_arrive_in_their_text_form(pool: PgPool) {
    sqlx::raw_sql(
        "create type mood as enum ('happy', 'sad');
         create type pair as (n int4, label text);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let report = query(
        &pool,
        "select '1 day 2 hours 3.5 seconds'::interval as iv,
                array[1, 2, null]::int4[] as ints,
                array['a b', 'c']::text[] as texts,
                int4range(1, 5) as r,
                tstzrange('2024-01-01 00:00+00', null) as tr,
                'sad'::mood as m,
                '192.168.0.1/24'::inet as ip,
                '12.34'::money as cash,
                row(7, 'x y')::pair as p,
                'infinity'::date as forever,
                '08:00:2b:01:02:03'::macaddr as mac
           from generate_series(1, 2)",
        json!([]),
    )
    .await;
    let row = json!([
        ["other", ["interval", "1 day 02:00:03.5"]],
        ["other", ["int4[]", "{1,2,NULL}"]],
        ["other", ["text[]", "{\"a b\",c}"]],
        ["other", ["int4range", "[1,5)"]],
        ["other", ["tstzrange", "[\"2024-01-01 00:00:00+00\",)"]],
        ["other", ["mood", "sad"]],
        ["other", ["inet", "192.168.0.1/24"]],
        ["other", ["money", "$12.34"]],
        ["other", ["pair", "(7,\"x y\")"]],
        ["other", ["date", "infinity"]],
        ["other", ["macaddr", "08:00:2b:01:02:03"]]
    ]);
    assert_eq!(report["rows"], json!([row, row]), "{report}");

    // More cells than one rendering batch holds, and an `other` value sent
    // back as a parameter: the text goes through the type's input function.
    let report = query(
        &pool,
        "select (i || ' minutes')::interval as iv from generate_series(1, 150) i",
        json!([]),
    )
    .await;
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 150);
    assert_eq!(rows[149], json!([["other", ["interval", "02:30:00"]]]));
    let report = query(
        &pool,
        "select $1::interval * 2 as twice",
        json!([["other", ["interval", "1 day 02:00:03.5"]]]),
    )
    .await;
    assert_eq!(
        report["rows"],
        json!([[["other", ["interval", "2 days 04:00:07"]]]])
    );
}
