//! The scheduler hands each slot of a fast cadence to the runner, and a config
//! file is validated before anything starts.

use std::time::Duration;

use jobhost::config::JobsConfig;
use jobhost::schedule::Schedule;
use sqlx::PgPool;

use crate::support::*;

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_fast_cadence_runs_each_slot_once_and_shutdown_waits(pool: PgPool) {
    create_probe_table(&pool).await;
    let mut job = probe("ticker", "write");
    job.config.schedule = Schedule::every(Duration::from_millis(200));
    let shutdown = tokio::time::sleep(Duration::from_millis(1500));
    jobhost::scheduler::run(runner(&pool), vec![job], Default::default(), shutdown).await;

    let slots: Vec<(chrono::DateTime<chrono::Utc>, String)> =
        sqlx::query_as("select slot, outcome from jobhost.runs where job = 'ticker' order by slot")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        slots.len() >= 4,
        "about 7 slots in 1.5 s at 200 ms: {slots:?}"
    );
    assert!(slots.iter().all(|(_, o)| o == "ok"));
    for pair in slots.windows(2) {
        assert_eq!(
            (pair[1].0 - pair[0].0).num_milliseconds() % 200,
            0,
            "slots sit on the 200 ms grid"
        );
        assert!(pair[1].0 > pair[0].0, "no slot twice");
    }
    assert_eq!(probe_rows(&pool).await, slots.len() as i64);
    assert_eq!(advisory_locks(&pool).await, 0);
}

#[test]
fn the_default_jobs_toml_is_valid() {
    // The plugin files exist only after `./dev run` built them into
    // plugins/target; the tests build the same guests elsewhere. Validate the
    // shipped file with its plugin paths pointed at those builds, so every
    // other check (schedules, keys, roles, retries) runs for real.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../jobs.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let built = std::path::Path::new(jobhost_tests::guests::INTEGRITY_HASH_RETRY)
        .parent()
        .unwrap()
        .display()
        .to_string();
    let text = text.replace("plugins/target/wasm32-wasip2/release", &built);
    let config = JobsConfig::from_str_at(&text, std::path::Path::new(path))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let names: Vec<&str> = config.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "integrity-hash-retry",
            "activation-drip",
            "db-retention",
            "test-scheduler"
        ]
    );
}
