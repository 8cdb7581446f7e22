//! Row 9: what a Python or JavaScript run costs against the same job in Rust
//! (issue 16's target: at most 2×), empty and with real work, all three
//! interleaved in rounds; each figure is the median over the rounds of a
//! round's median, with the spread (lowest–highest round) beside it.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use jobhost::runner::Runner;
use jobhost::runtime::Runtime;
use jobhost_tests::guests;
use jobhost_tests::polyglot::{self, Lang};
use sqlx::PgPool;

use super::{Repeated, Slots, job, ok};

fn median_secs(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(f64::NAN, Duration::as_secs_f64)
}

/// Measures row 9 and returns its table rows.
pub async fn rows(
    pool: &PgPool,
    runner: &Runner,
    runtime: &Runtime,
    slots: &mut Slots,
    rounds: usize,
    per_round: usize,
) -> anyhow::Result<String> {
    let build = |lang, name| polyglot::build(lang, name, "xact-plugin");
    let py_noop = build(Lang::Python, "noop")?;
    let js_noop = build(Lang::Js, "noop")?;
    let py_hash = build(Lang::Python, "integrity-hash-retry")?;
    let js_retention = build(Lang::Js, "db-retention")?;
    let path = |p: &std::path::Path| p.display().to_string();

    let empty = [
        job(
            "noop-rs",
            guests::TEST_CORE_PROBE,
            runtime,
            &[("mode", "noop")],
        )?,
        job("noop-py", &path(&py_noop), runtime, &[])?,
        job("noop-js", &path(&js_noop), runtime, &[])?,
    ];
    let hash = [
        job(
            "hash-rs",
            guests::INTEGRITY_HASH_RETRY,
            runtime,
            &[("batch-size", "50")],
        )?,
        job("hash-py", &path(&py_hash), runtime, &[("batch-size", "50")])?,
    ];
    sqlx::raw_sql(
        "create table if not exists bench_retention (id int, created_at timestamptz not null)",
    )
    .execute(pool)
    .await?;
    let retention = [
        job(
            "ret-rs",
            guests::DB_RETENTION,
            runtime,
            &[("public.bench_retention", "1 day")],
        )?,
        job(
            "ret-js",
            &path(&js_retention),
            runtime,
            &[("public.bench_retention", "1 day")],
        )?,
    ];
    let seed_hash = "insert into demo.audit_events (actor, action, payload)
        select 'actor-' || g, 'login', jsonb_build_object('seq', g) from generate_series(1, 50) g";
    let seed_retention = "insert into bench_retention
        select g, now() - interval '2 days' from generate_series(1, 50) g";

    let mut empty_r: [Repeated; 3] = Default::default();
    let mut hash_r: [Repeated; 2] = Default::default();
    let mut ret_r: [Repeated; 2] = Default::default();
    for _ in 0..rounds {
        for (i, j) in empty.iter().enumerate() {
            let mut t = Vec::with_capacity(per_round);
            for _ in 0..per_round {
                let start = Instant::now();
                ok(runner.run(j, slots.next()).await?)?;
                t.push(start.elapsed());
            }
            empty_r[i].push(median_secs(t));
        }
        let batches = per_round.div_ceil(10).max(2);
        for (jobs, seed, out) in [
            (&hash, seed_hash, &mut hash_r),
            (&retention, seed_retention, &mut ret_r),
        ] {
            for (i, j) in jobs.iter().enumerate() {
                let mut t = Vec::with_capacity(batches);
                for _ in 0..batches {
                    sqlx::query(seed).execute(pool).await?;
                    let start = Instant::now();
                    ok(runner.run(j, slots.next()).await?)?;
                    t.push(start.elapsed());
                }
                out[i].push(median_secs(t));
            }
        }
    }
    let ratio = |a: &Repeated, b: &Repeated| a.median().0 / b.median().0;
    let met = |r: f64| if r <= 2.0 { "yes" } else { "no" };
    let mut md = String::new();
    for (row, what, lang, r, base) in [
        (
            "9a",
            "empty run, Python vs Rust",
            "Python",
            &empty_r[1],
            &empty_r[0],
        ),
        (
            "9b",
            "empty run, JavaScript vs Rust",
            "JavaScript",
            &empty_r[2],
            &empty_r[0],
        ),
        (
            "9c",
            "50-row integrity-hash batch, Python port vs Rust",
            "Python",
            &hash_r[1],
            &hash_r[0],
        ),
        (
            "9d",
            "50-row retention delete, JavaScript port vs Rust",
            "JavaScript",
            &ret_r[1],
            &ret_r[0],
        ),
    ] {
        let x = ratio(r, base);
        let _ = writeln!(
            md,
            "| {row} | {what}: whole run, median of {rounds} rounds' medians (spread) | {lang}: {} | Rust: {} | {x:.2}× | ≤ 2× (issue 16) | {} |",
            r.ms(),
            base.ms(),
            met(x)
        );
    }
    Ok(md)
}
