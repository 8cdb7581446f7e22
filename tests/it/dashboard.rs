//! The operating surface against a real host and database: `/metrics` and
//! `/healthz` over HTTP, and the dashboard in a real browser (headless
//! Chromium, Debian's `chromium`, installed by `.ci/run`), which must show the
//! facts the test seeded and offer no action. A screenshot is kept as an
//! artifact in the target directory's `tmp/`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use jobhost::HostOptions;
use jobhost::config::JobsConfig;
use jobhost_tests::guests;
use sqlx::{Connection as _, PgPool};

use crate::support::*;

/// Runs headless Chromium with `args` on `url`, bounded in time; its stdout.
/// Awaited, not blocked on: the host serving the page runs on this test's
/// (single-threaded) runtime.
async fn chromium(args: &[&str], url: &str) -> String {
    let child = tokio::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium (Debian package `chromium`, installed by .ci/run)");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("chromium did not finish within 60 s")
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn metrics_health_and_a_read_only_dashboard_in_a_real_browser(pool: PgPool) {
    create_probe_table(&pool).await;
    let port = free_port();
    let dir = Scratch::new("dashboard");
    let job = |name: &str, every: &str, mode: &str| {
        format!(
            "[[job]]\nname = \"{name}\"\nplugin = {:?}\nevery = \"{every}\"\n[job.config]\nmode = \"{mode}\"\n\n",
            guests::TEST_CORE_PROBE
        )
    };
    std::fs::write(
        dir.join("jobs.toml"),
        format!(
            "[host]\nlisten = \"127.0.0.1:{port}\"\nwatch = false\nshutdown-grace = \"5s\"\nheartbeat = \"200ms\"\nhost-lost-after = \"1s\"\n\n{}{}",
            job("tick", "300ms", "write"),
            job("failing", "300ms", "error")
        ),
    )
    .unwrap();
    let config = JobsConfig::from_file(dir.join("jobs.toml")).unwrap();
    let tick_key = config.jobs[0].lock_key;
    let options = HostOptions {
        direct_url: None,
        database_url: database_url(&pool).await,
        host_id: "dash-host".into(),
        demo: false,
        clock_offset: chrono::TimeDelta::zero(),
    };
    let logs = LogCapture::start();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(jobhost::run(config, options, async {
        let _ = stopped.await;
    }));
    wait_for(Duration::from_secs(30), "ok and failed runs", || async {
        let r = runs(&pool, "failing").await;
        probe_rows(&pool).await >= 2 && r.iter().any(|(o, _)| o == "error")
    })
    .await;
    // Seed what the page must show: a paused job, and the production bug, a
    // job's key held by an idle connection (STUCK).
    jobhost::db::pause(&pool, "failing", "the-test")
        .await
        .unwrap();
    let mut idle = sqlx::PgConnection::connect(&database_url(&pool).await)
        .await
        .unwrap();
    sqlx::query("select pg_advisory_lock($1, 777)")
        .bind(tick_key.namespace)
        .execute(&mut idle)
        .await
        .unwrap();

    // The host itself warns about it, once while it lasts (a lost race for
    // a slot is never a warning).
    let stuck_warnings = |t: &str| {
        t.lines()
            .filter(|l| l.contains("WARN") && l.contains("event=\"stuck_lock\""))
            .count()
    };
    wait_for(
        Duration::from_secs(10),
        "the stuck-lock warning",
        || async { stuck_warnings(&logs.text()) >= 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await; // four more watches
    let text = logs.text();
    assert_eq!(stuck_warnings(&text), 1, "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.contains("WARN") && l.contains("lock_busy")),
        "{text}"
    );

    // /healthz and /metrics.
    let (status, body) = http_get(port, "/healthz").await;
    assert!(status.contains("200"), "{status} {body}");
    assert!(body.contains("2 job(s) loaded"), "{body}");
    let (status, metrics) = http_get(port, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    for needle in [
        "jobhost_runs_total{job=\"tick\",outcome=\"ok\"}",
        "jobhost_runs_total{job=\"failing\",outcome=\"error\"}",
        "jobhost_run_duration_seconds_bucket{le=",
        "jobhost_start_lag_seconds_count{job=\"tick\"}",
        "jobhost_runs_in_flight",
        "jobhost_stuck_locks 1",
        "jobhost_pool_connections{state=\"idle\"}",
        "jobhost_runs_waiting_for_connection",
        "# EOF",
    ] {
        assert!(metrics.contains(needle), "`{needle}` missing:\n{metrics}");
    }
    // A paused job's slots are skips, counted by reason.
    wait_for(Duration::from_secs(10), "a paused skip", || async {
        http_get(port, "/metrics")
            .await
            .1
            .contains("jobhost_skips_total{job=\"failing\",reason=\"paused\"}")
    })
    .await;

    // The dashboard in a real browser.
    let url = format!("http://127.0.0.1:{port}/");
    let dom = chromium(&["--dump-dom"], &url).await;
    let sha12: String = runtime()
        .load(Path::new(guests::TEST_CORE_PROBE))
        .unwrap()
        .sha256
        .chars()
        .take(12)
        .collect();
    for fact in [
        "tick",
        "failing",
        "deliberate failure",
        "PAUSED",
        "STUCK",
        "dash-host",
        "live",
        &sha12,
        "every 300ms",
    ] {
        assert!(
            dom.contains(fact),
            "the dashboard does not show `{fact}`:\n{dom}"
        );
    }
    let lower = dom.to_ascii_lowercase();
    for action in ["<form", "<button", "<input", "<script", "method=\"post\""] {
        assert!(
            !lower.contains(action),
            "a read-only page offers `{action}`"
        );
    }
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            "--window-size=1400,1600",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    )
    .await;
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "no screenshot at {}", shot.display());
    eprintln!("dashboard screenshot: {}", shot.display());

    drop(idle);
    let _ = stop.send(());
    host.await.unwrap().unwrap();
}
