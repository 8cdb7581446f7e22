//! The benchmark harness (`jobhost-bench`) leaves nothing behind when it is
//! stopped: it starts PgBouncers and a database of its own.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection as _;

/// Stopped by SIGTERM while it measures, the benchmark stops the PgBouncer
/// it started (its directory goes with it) and drops its database, as a
/// finished run does. (A killed full run used to leave its PgBouncer.)
#[tokio::test]
async fn a_stopped_benchmark_leaves_no_pgbouncer_and_no_database() {
    assert!(
        jobhost_tests::pgbouncer::installed(),
        "pgbouncer is not installed (`./dev test` installs it)"
    );
    let mut bench = Command::new(env!("CARGO_BIN_EXE_jobhost-bench"))
        .arg("--quick")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = bench.id();
    let dir = std::env::temp_dir().join(format!("jobhost-pgbouncer-bench-{pid}"));
    let pidfile = dir.join("pgbouncer.pid");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pidfile.exists() {
        assert!(
            bench.try_wait().unwrap().is_none(),
            "the benchmark ended before it started PgBouncer"
        );
        assert!(Instant::now() < deadline, "no PgBouncer after 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its database exists by now (it is made before anything is measured).
    let db = format!("jobhost_bench_{pid}");
    let url = std::env::var("DATABASE_URL").unwrap();
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let exists = async |admin: &mut sqlx::PgConnection| -> bool {
        sqlx::query_scalar("select exists (select from pg_database where datname = $1)")
            .bind(&db)
            .fetch_one(admin)
            .await
            .unwrap()
    };
    assert!(exists(&mut admin).await, "{db} was not made");

    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(term.unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while bench.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = bench.kill();
            panic!("the benchmark did not stop within 60 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let left = dir.exists();
    if left {
        // Leave nothing behind even when the assertion below fails.
        stop_pgbouncer(&dir);
    }
    let db_left = exists(&mut admin).await;
    if db_left {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists {db} with (force)"
        )))
        .execute(&mut admin)
        .await;
    }
    assert!(!left, "the benchmark's PgBouncer outlived it");
    assert!(!db_left, "the benchmark's database outlived it");
}

fn stop_pgbouncer(dir: &Path) {
    if let Ok(pid) = std::fs::read_to_string(dir.join("pgbouncer.pid")) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    let _ = std::fs::remove_dir_all(dir);
}
