//! Shipping plugins through Postgres (`jobhost publish` / `rollback` /
//! `plugins`, `plugin = "published:NAME"`), with host processes that share
//! nothing but the database.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jobhost::published::{self, Published};
use jobhost_tests::guests;
use sqlx::PgPool;

use crate::fleet::Host;
use crate::support::*;

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The first `ok` run on `sha` of each host in `hosts` that started at or
/// after `since`, if every host has one.
async fn first_runs_on(
    pool: &PgPool,
    sha: &str,
    since: DateTime<Utc>,
    hosts: &[&str],
) -> Option<Vec<DateTime<Utc>>> {
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "select host_id, min(started_at) from jobhost.runs
          where plugin_sha256 = $1 and started_at >= $2 and outcome = 'ok' group by 1",
    )
    .bind(sha)
    .bind(since)
    .fetch_all(pool)
    .await
    .unwrap();
    hosts
        .iter()
        .map(|h| rows.iter().find(|(id, _)| id == h).map(|(_, t)| *t))
        .collect()
}

async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn publish_reaches_every_host_and_rollback_returns(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    let v1 = std::fs::read(guests::TEST_CORE_PROBE).unwrap();
    let v2 = jobhost_tests::probe_variant("v2");
    let (sha1, sha2) = (sha(&v1), sha(&v2));
    let runtime = runtime();

    let first = published::publish(&pool, &runtime, "probe", v1.clone(), "tester")
        .await
        .unwrap();
    assert!(matches!(first, Published::New { .. }), "{first:?}");
    assert_eq!(
        published::publish(&pool, &runtime, "probe", v1.clone(), "tester")
            .await
            .unwrap(),
        Published::AlreadyCurrent {
            sha256: sha1.clone()
        },
        "the same bytes again change nothing"
    );

    // Six jobs on the published plugin (so that each host wins some slots),
    // and one whose runs last 3 s (so that one is in flight at the publish).
    let dir = Scratch::new("rollout");
    let mut toml = String::from(
        "[host]\npool-size = 3\nwatch = false\nshutdown-grace = \"10s\"\nheartbeat = \"200ms\"\nhost-lost-after = \"2s\"\n\n",
    );
    for i in 1..=6 {
        toml.push_str(&format!(
            "[[job]]\nname = \"quick{i}\"\nplugin = \"published:probe\"\nevery = \"1s\"\n[job.config]\nmode = \"noop\"\n\n"
        ));
    }
    toml.push_str(
        "[[job]]\nname = \"slow\"\nplugin = \"published:probe\"\nevery = \"1s\"\ntimeout = \"5s\"\n[job.config]\nmode = \"sleep\"\nsleep-ms = 3000\n",
    );
    std::fs::write(dir.join("jobs.toml"), &toml).unwrap();
    let a = Host::spawn(&dir, &url, "a", &[]);
    let b = Host::spawn(&dir, &url, "b", &[]);
    let t0 = db_now(&pool).await;
    wait_for(Duration::from_secs(60), "hosts a and b run v1", || async {
        first_runs_on(&pool, &sha1, t0, &["a", "b"]).await.is_some()
    })
    .await;

    // A bad component is refused at publish, and nothing changes.
    let versions = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from jobhost.plugin_versions")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = versions().await;
    for (what, bytes) in [
        ("not wasm", b"not a component".to_vec()),
        ("a core module", b"\0asm\x01\0\0\0".to_vec()),
    ] {
        let err = published::publish(&pool, &runtime, "probe", bytes, "tester")
            .await
            .expect_err(what);
        assert!(format!("{err:#}").contains("refused"), "{what}: {err:#}");
    }
    assert_eq!(versions().await, before, "a refused publish stores nothing");

    // Publish v2 while `slow` is in flight on v1.
    wait_for(
        Duration::from_secs(10),
        "a run of `slow` in flight",
        || async {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from jobhost.in_flight where job = 'slow'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                > 0
        },
    )
    .await;
    // Through the command line, as an operator would.
    let config = dir.join("jobs.toml");
    std::fs::write(dir.join("v2.wasm"), &v2).unwrap();
    let v2_path = dir.join("v2.wasm").display().to_string();
    let cli = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        jobhost::cli::run_cli(cli_args(&config, &url, &args))
    };
    let code = cli(vec!["publish".into(), "probe".into(), v2_path])
        .await
        .unwrap();
    let returned = Instant::now();
    let t_publish = db_now(&pool).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    // A host started after the publish runs the current version from its start.
    let c = Host::spawn(&dir, &url, "c", &[]);
    let firsts = wait_for_some(Duration::from_secs(60), "every host runs v2", || async {
        first_runs_on(&pool, &sha2, t_publish, &["a", "b", "c"]).await
    })
    .await;
    let last = firsts.iter().max().unwrap();
    eprintln!(
        "publish → last host's first v2 run: {:.0} ms after the publish returned (database clock; {:.1} s wall to see it)",
        (*last - t_publish).num_milliseconds(),
        returned.elapsed().as_secs_f64()
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>(
            "select count(*) from jobhost.runs where host_id = 'c' and plugin_sha256 = $1",
        )
        .bind(&sha1)
        .fetch_one(&pool)
        .await
        .unwrap(),
        0,
        "the late host never ran the old version"
    );
    // The run in flight when v2 became current finished, on v1, and says so.
    let became_current: DateTime<Utc> =
        sqlx::query_scalar("select published_at from jobhost.plugin_versions where sha256 = $1")
            .bind(&sha2)
            .fetch_one(&pool)
            .await
            .unwrap();
    let straddling: Vec<(String, String)> = wait_for_some(
        Duration::from_secs(10),
        "the run in flight at the publish ends",
        || async {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "select plugin_sha256, outcome from jobhost.runs
                  where job = 'slow' and started_at < $1 and finished_at > $1",
            )
            .bind(became_current)
            .fetch_all(&pool)
            .await
            .unwrap();
            (!rows.is_empty()).then_some(rows)
        },
    )
    .await;
    assert!(
        straddling.iter().all(|(s, o)| *s == sha1 && o == "ok"),
        "{straddling:?}"
    );

    // `jobhost plugins`: both versions, v2 current, run by all three hosts.
    let listed = published::list(&pool, Duration::from_secs(2))
        .await
        .unwrap();
    let current: Vec<_> = listed.iter().filter(|v| v.current).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].sha256, sha2);
    wait_for(Duration::from_secs(10), "hosts report v2", || async {
        let listed = published::list(&pool, Duration::from_secs(2))
            .await
            .unwrap();
        listed
            .iter()
            .find(|v| v.current)
            .is_some_and(|v| v.hosts.len() == 3)
    })
    .await;
    let text = published::render_list(&listed);
    assert!(
        text.contains(&sha1[..12]) && text.contains(&sha2[..12]) && text.contains("tester"),
        "{text}"
    );

    // Rollback: every host back on v1.
    assert_eq!(
        cli(vec!["plugins".into()]).await.unwrap(),
        std::process::ExitCode::SUCCESS
    );
    let rolled = published::rollback(&pool, "probe", "tester").await.unwrap();
    assert_eq!(
        (rolled.from.as_str(), rolled.to.as_str()),
        (sha2.as_str(), sha1.as_str())
    );
    let t_rollback = db_now(&pool).await;
    wait_for_some(
        Duration::from_secs(60),
        "every host runs v1 again",
        || async { first_runs_on(&pool, &sha1, t_rollback, &["a", "b", "c"]).await },
    )
    .await;
    // Nothing before v1 to roll back to.
    let err = published::rollback(&pool, "probe", "tester")
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("no version before"), "{err:#}");

    for h in [a, b, c] {
        assert_eq!(h.terminate(Duration::from_secs(20)), 0);
    }
    let failed: Vec<(String, String, Option<String>)> =
        sqlx::query_as("select job, outcome, message from jobhost.runs where outcome <> 'ok'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(failed.is_empty(), "{failed:?}");
}

/// A host that cannot load the current version keeps the one it runs, and
/// says why in its log and in `jobhost.host_plugins`. (A version a host
/// cannot load although `publish` accepted it: a valid `session-plugin`
/// published for a job this host runs with `lock = "xact"`.)
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_host_that_cannot_load_a_version_keeps_its_own_and_says_why(pool: PgPool) {
    create_probe_table(&pool).await;
    let runtime = runtime();
    let v1 = std::fs::read(guests::TEST_CORE_PROBE).unwrap();
    published::publish(&pool, &runtime, "p", v1.clone(), "tester")
        .await
        .unwrap();
    let dir = Scratch::new("rollout-keep");
    let toml = "[host]\nwatch = false\nheartbeat = \"200ms\"\nhost-lost-after = \"2s\"\n\n[[job]]\nname = \"j\"\nplugin = \"published:p\"\nevery = \"1s\"\n[job.config]\nmode = \"noop\"\n";
    std::fs::write(dir.join("jobs.toml"), toml).unwrap();
    let url = database_url(&pool).await;
    let host = Host::spawn(&dir, &url, "keeper", &[]);
    let t0 = db_now(&pool).await;
    wait_for(Duration::from_secs(30), "the host runs v1", || async {
        first_runs_on(&pool, &sha(&v1), t0, &["keeper"])
            .await
            .is_some()
    })
    .await;
    let other_kind = std::fs::read(Path::new(guests::TEST_SESSION_PROBE)).unwrap();
    published::publish(&pool, &runtime, "p", other_kind, "tester")
        .await
        .unwrap();
    let error: String = wait_for_some(Duration::from_secs(30), "the host reports why", || async {
        sqlx::query_scalar::<_, Option<String>>(
            "select error from jobhost.host_plugins where host_id = 'keeper' and name = 'p'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap()
        .flatten()
    })
    .await;
    assert!(
        error.contains("job `j`") && error.contains("session"),
        "{error}"
    );
    let still: String = sqlx::query_scalar(
        "select sha256 from jobhost.host_plugins where host_id = 'keeper' and name = 'p'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(still, sha(&v1), "it keeps running the version it has");
    let t1 = db_now(&pool).await;
    wait_for(Duration::from_secs(10), "runs go on, on v1", || async {
        first_runs_on(&pool, &sha(&v1), t1, &["keeper"])
            .await
            .is_some()
    })
    .await;
    assert!(host.logs().contains("reload rejected"), "{}", host.logs());
    assert_eq!(host.terminate(Duration::from_secs(20)), 0);
}
