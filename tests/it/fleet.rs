//! Fleet behaviour with real host processes against one database: this test
//! binary re-executes itself as `jobhost` (see [`host_process`]), so each host
//! is a separate OS process running the real CLI that can be SIGKILLed or
//! SIGTERMed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jobhost::db::Outcome;
use jobhost::runner::RunResult;
use jobhost_tests::guests;
use sqlx::PgPool;

use crate::support::*;

const HOST_ARGS_ENV: &str = "JOBHOST_IT_HOST_ARGS";

/// Not a test of its own (so ignored in a normal run): when the binary is
/// re-executed with `--ignored` and `JOBHOST_IT_HOST_ARGS`, this runs the
/// `jobhost` CLI with those arguments and exits with its code.
#[test]
#[ignore = "the entry point of host child processes, not a test"]
fn host_process() {
    let args = std::env::var(HOST_ARGS_ENV)
        .expect("run only as a host child process, with JOBHOST_IT_HOST_ARGS set");
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    // The host's own logging, as its `--log-format` asks.
    let json = args
        .windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json");
    let logging = jobhost::cli::init_logging(
        if json {
            jobhost::cli::LogFormat::Json
        } else {
            jobhost::cli::LogFormat::Text
        },
        jobhost::cli::runs_scheduler(&args),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(jobhost::cli::run_cli(
        std::iter::once("jobhost".to_string())
            .chain(args)
            .map(Into::into),
    ));
    let code = match code {
        Ok(c) if c == std::process::ExitCode::SUCCESS => 0,
        Ok(c) if c == std::process::ExitCode::from(2) => 2,
        Ok(_) => 1,
        Err(e) => {
            eprintln!("host process failed: {e:#}");
            1
        }
    };
    // What the log's writer thread holds is written before the exit, which
    // runs no destructors.
    drop(rt);
    drop(logging);
    std::process::exit(code);
}

/// A host's arguments: `dir/jobs.toml`, the database, the host id, `extra`.
fn host_args(dir: &Path, url: &str, host_id: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--config".to_string(),
        dir.join("jobs.toml").display().to_string(),
        "--database-url".into(),
        url.into(),
        "--host-id".into(),
        host_id.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// This test binary, to be re-executed as `jobhost args…` ([`host_process`]).
pub(crate) fn host_command(args: &[String]) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "fleet::host_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOST_ARGS_ENV, serde_json::to_string(args).unwrap());
    command
}

/// A host child process; killed when dropped.
pub(crate) struct Host {
    child: Child,
    log: PathBuf,
}

impl Host {
    /// A host of `dir/jobs.toml` whose log goes to `dir/<host_id>.log`.
    pub(crate) fn spawn(dir: &Path, url: &str, host_id: &str, extra: &[&str]) -> Host {
        let log = dir.join(format!("{host_id}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = host_command(&host_args(dir, url, host_id, extra))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Host { child, log }
    }

    /// A host whose stdout and stderr are one pipe, returned unread: its
    /// writes block once the pipe is full, as they do when whatever collects
    /// a host's log stalls.
    fn spawn_unread(dir: &Path, url: &str, host_id: &str) -> (Host, std::io::PipeReader) {
        let (reader, writer) = std::io::pipe().unwrap();
        let child = host_command(&host_args(dir, url, host_id, &[]))
            .stdin(Stdio::null())
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .spawn()
            .unwrap();
        let log = dir.join(format!("{host_id}.log"));
        (Host { child, log }, reader)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    pub(crate) fn terminate(mut self, within: Duration) -> i32 {
        self.signal("TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "host did not exit: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temp dir with a jobs.toml of one probe job.
fn config_dir(tag: &str, job: &str) -> Scratch {
    let dir = Scratch::new(&format!("fleet-{tag}"));
    let toml = format!(
        "[host]\npool-size = 2\nshutdown-grace = \"10s\"\nheartbeat = \"200ms\"\nhost-lost-after = \"1s\"\n\n[[job]]\nplugin = {:?}\n{job}\n",
        guests::TEST_CORE_PROBE
    );
    std::fs::write(dir.join("jobs.toml"), toml).unwrap();
    dir
}

/// A connection of its own, idle, holding the session lock (jobhost's
/// namespace, `key`): what the production bug left behind.
async fn idle_holder(url: &str, key: i32) -> sqlx::PgConnection {
    let mut idle = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("select pg_advisory_lock($1, $2)")
        .bind(jobhost::lock::LOCK_NAMESPACE)
        .bind(key)
        .execute(&mut idle)
        .await
        .unwrap();
    idle
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn three_hosts_with_skewed_clocks_run_every_slot_exactly_once(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    let dir = config_dir(
        "skew",
        "name = \"tick\"\nevery = \"1s\"\ntimeout = \"5s\"\n[job.config]\nmode = \"write\"",
    );
    let hosts: Vec<Host> = [("a", "0"), ("b", "450"), ("c", "-450")]
        .iter()
        .map(|(id, offset)| Host::spawn(&dir, &url, id, &["--clock-offset-ms", offset]))
        .collect();
    wait_for(Duration::from_secs(30), "5 successful slots", || async {
        count(
            &pool,
            "select count(*) from jobhost.runs where outcome = 'ok'",
        )
        .await
            >= 5
    })
    .await;
    for h in hosts {
        assert_eq!(h.terminate(Duration::from_secs(20)), 0);
    }

    let per_slot: Vec<(chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
        "select slot, count(*) filter (where outcome = 'ok') from jobhost.runs group by slot order by slot",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(per_slot.iter().all(|(_, ok)| *ok <= 1), "{per_slot:?}");
    // The unique index alone would keep the above true whatever the hosts
    // did: losing a race must not even show up as a failed attempt.
    assert_eq!(
        count(
            &pool,
            "select count(*) from jobhost.runs where outcome <> 'ok'"
        )
        .await,
        0,
        "a losing host recorded a failure"
    );
    let ok = count(
        &pool,
        "select count(*) from jobhost.runs where outcome = 'ok'",
    )
    .await;
    // The work itself happened once per slot: one probe row per successful slot.
    assert_eq!(count(&pool, "select count(*) from probe").await, ok);
    assert_eq!(
        count(&pool, "select count(distinct note) from probe").await,
        ok
    );
    let hosts_that_ran = count(
        &pool,
        "select count(distinct host_id) from jobhost.runs where outcome = 'ok'",
    )
    .await;
    assert!(hosts_that_ran >= 1);
    assert_eq!(advisory_locks(&pool).await, 0);
    assert_eq!(
        count(&pool, "select count(*) from jobhost.in_flight").await,
        0,
        "a stopped host leaves nothing published"
    );
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_killed_host_rolls_back_and_another_host_runs_its_slot(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    let dir = config_dir(
        "kill",
        "name = \"slow\"\nevery = \"2s\"\ntimeout = \"20s\"\ncatch-up = \"1m\"\n[job.config]\nmode = \"sleep\"\nsleep-ms = \"2500\"",
    );
    let a = Host::spawn(&dir, &url, "doomed", &[]);
    // Wait until `doomed` is inside a run: published in flight, holding the lock.
    let (in_flight, _) = wait_for_some(Duration::from_secs(20), "a run in flight", || {
        run_in_plugin(&pool, "slow")
    })
    .await;
    let slot: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "select slot from jobhost.in_flight where run_id = $1 and host_id = 'doomed'",
    )
    .bind(in_flight)
    .fetch_one(&pool)
    .await
    .unwrap();
    a.kill();
    // Host liveness, not backend pids: the survivor may only call the run
    // lost once `doomed` has missed its heartbeats for `host-lost-after`.
    wait_for(Duration::from_secs(10), "doomed to go silent", || async {
        count(
            &pool,
            "select count(*) from jobhost.hosts where id = 'doomed' and last_seen < clock_timestamp() - interval '1 second'",
        )
        .await
            == 1
    })
    .await;

    let b = Host::spawn(&dir, &url, "survivor", &[]);
    wait_for(
        Duration::from_secs(30),
        "the survivor to run the slot",
        || async {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from jobhost.runs where slot = $1 and outcome = 'ok'",
            )
            .bind(slot)
            .fetch_one(&pool)
            .await
            .unwrap()
                == 1
        },
    )
    .await;
    assert_eq!(b.terminate(Duration::from_secs(20)), 0);

    let history: Vec<(String, String, i32)> = sqlx::query_as(
        "select host_id, outcome, attempt from jobhost.runs where slot = $1 order by id",
    )
    .bind(slot)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        history,
        vec![
            ("doomed".into(), "lost".into(), 1),
            // The lost run counts as an attempt, though it was recorded in
            // the same statement that read the history.
            ("survivor".into(), "ok".into(), 2)
        ]
    );
    let rows_for_slot: i64 = sqlx::query_scalar("select count(*) from probe where note = $1")
        .bind(slot.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows_for_slot, 1,
        "the killed host's write was rolled back; the survivor's committed"
    );
    assert_eq!(advisory_locks(&pool).await, 0);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn sigterm_lets_a_run_finish_and_interrupts_it_past_the_grace(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    // Within the grace: the run completes and the process exits 0.
    let dir = config_dir(
        "term",
        "name = \"finisher\"\nevery = \"1s\"\ntimeout = \"20s\"\n[job.config]\nmode = \"sleep\"\nsleep-ms = \"1500\"",
    );
    let host = Host::spawn(&dir, &url, "term", &[]);
    let (in_flight, _) = wait_for_some(Duration::from_secs(20), "a run in flight", || {
        run_in_plugin(&pool, "finisher")
    })
    .await;
    assert_eq!(host.terminate(Duration::from_secs(20)), 0);
    let outcome: String = sqlx::query_scalar("select outcome from jobhost.runs where id = $1")
        .bind(in_flight)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outcome, "ok", "the run in flight at SIGTERM finished");
    // On a slow machine the signal may land after that run, during the next
    // one; whichever runs were in flight, none was cut short inside the grace.
    let not_ok: i64 = sqlx::query_scalar("select count(*) from jobhost.runs where outcome <> 'ok'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(not_ok, 0);

    // Past the grace: the run is interrupted, rolled back, and the exit is still 0.
    let dir = config_dir(
        "term-grace",
        "name = \"lingerer\"\nevery = \"1s\"\ntimeout = \"60s\"\n[job.config]\nmode = \"sleep\"\nsleep-ms = \"30000\"",
    );
    let toml = std::fs::read_to_string(dir.join("jobs.toml"))
        .unwrap()
        .replace("shutdown-grace = \"10s\"", "shutdown-grace = \"300ms\"");
    std::fs::write(dir.join("jobs.toml"), toml).unwrap();
    let host = Host::spawn(&dir, &url, "impatient", &[]);
    let (lingering, _) = wait_for_some(Duration::from_secs(20), "a long run in flight", || {
        run_in_plugin(&pool, "lingerer")
    })
    .await;
    let started = Instant::now();
    assert_eq!(host.terminate(Duration::from_secs(20)), 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "did not wait for the 30 s run"
    );
    let last: (String, String) =
        sqlx::query_as("select outcome, message from jobhost.runs where id = $1")
            .bind(lingering)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(last.0, "interrupted", "{}", last.1);
    assert_eq!(
        count(&pool, "select count(*) from probe").await,
        count(
            &pool,
            "select count(*) from jobhost.runs where outcome = 'ok'"
        )
        .await,
        "only the finished runs' rows: the interrupted one rolled back"
    );
    assert_eq!(advisory_locks(&pool).await, 0);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_terminated_backend_fails_the_run_and_the_host_keeps_serving(pool: PgPool) {
    create_probe_table(&pool).await;
    let runner = runner(&pool);
    let sleeper = sleeper("sleeper", 1500);
    let task = spawn_run(&runner, &sleeper, slot(1));
    let pid = wait_for_some(
        Duration::from_secs(10),
        "the run to be in its plugin",
        || backend_in_plugin(&pool, "sleeper"),
    )
    .await;
    let killed: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    match task.await.unwrap().unwrap() {
        RunResult::Finished {
            outcome, message, ..
        } => {
            assert_ne!(outcome, Outcome::Ok, "{message}");
        }
        other => panic!("{other:?}"),
    }
    let recorded: Vec<(String, String)> = runs(&pool, "sleeper").await;
    assert_ne!(recorded[0].0, "ok");
    assert_eq!(recorded.len(), 1, "the failure was recorded: {recorded:?}");
    assert_eq!(probe_rows(&pool).await, 0);
    // The same host, the same pool: the next job runs normally.
    finished(
        runner.run(&probe("next", "write"), slot(2)).await.unwrap(),
        Outcome::Ok,
    );
    assert_eq!(advisory_locks(&pool).await, 0);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn locks_flags_a_lock_held_by_an_idle_backend(pool: PgPool) {
    let url = database_url(&pool).await;
    let dir = config_dir("locks", "name = \"held\"\nevery = \"1h\"\nlock-key = 77");
    let args = |cmd: &str| cli_args(&dir.join("jobs.toml"), &url, &[cmd]);
    let clean = jobhost::cli::run_cli(args("locks")).await.unwrap();
    assert_eq!(clean, std::process::ExitCode::SUCCESS);

    // The production bug: a session lock left on an idle connection.
    let mut idle = idle_holder(&url, 77).await;
    let config = jobhost::config::JobsConfig::from_file(dir.join("jobs.toml")).unwrap();
    let rows = jobhost::inspect::locks(&pool, &config).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].job.as_deref(), Some("held"));
    assert_eq!(rows[0].state, "idle");
    assert!(rows[0].stuck);
    let stuck = jobhost::cli::run_cli(args("locks")).await.unwrap();
    assert_eq!(stuck, std::process::ExitCode::from(2));

    sqlx::query("select pg_advisory_unlock_all()")
        .execute(&mut idle)
        .await
        .unwrap();
    let clean = jobhost::cli::run_cli(args("locks")).await.unwrap();
    assert_eq!(clean, std::process::ExitCode::SUCCESS);
    assert_eq!(
        jobhost::cli::run_cli(args("status")).await.unwrap(),
        std::process::ExitCode::SUCCESS
    );
}

/// `jobhost locks` confirms a stuck verdict with a second look: a run takes
/// its job's lock in its first statement after idle, and `pg_locks` and
/// `pg_stat_activity` are read at two moments, so one read can show a
/// backend idle with a lock it holds only for a moment. Here an idle
/// connection holds a job's key for 75 ms: not stuck. (Held for good, it is:
/// `locks_flags_a_lock_held_by_an_idle_backend`.)
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn locks_does_not_call_a_lock_held_for_a_moment_stuck(pool: PgPool) {
    let url = database_url(&pool).await;
    let dir = config_dir("brief", "name = \"brief\"\nevery = \"1h\"\nlock-key = 78");
    let config = jobhost::config::JobsConfig::from_file(dir.join("jobs.toml")).unwrap();
    let mut idle = idle_holder(&url, 78).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(75)).await;
        sqlx::query("select pg_advisory_unlock_all()")
            .execute(&mut idle)
            .await
            .unwrap();
        idle
    });
    let rows = jobhost::inspect::locks(&pool, &config).await.unwrap();
    assert!(rows.iter().all(|r| !r.stuck), "{rows:?}");
    drop(release.await.unwrap());
}

use sqlx::Connection as _;

/// A throwaway Postgres cluster of the test's own, so the test may restart it
/// without disturbing the shared server other tests use.
struct PrivateCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    run_as: Option<&'static str>,
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).filter(|p| p.join("pg_ctl").exists()).max())
            .expect("PostgreSQL server binaries (pg_ctl, initdb) are needed: apt-get install postgresql");
        let dir = std::env::temp_dir().join(format!(
            "jobhost-pg-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // initdb refuses to run as root: run the cluster as `postgres` then.
        let run_as =
            (Command::new("id").arg("-u").output().unwrap().stdout == b"0\n").then_some("postgres");
        if let Some(user) = run_as {
            assert!(
                Command::new("chown")
                    .args([user, &dir.display().to_string()])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = PrivateCluster {
            bin,
            dir,
            port,
            run_as,
        };
        cluster.cmd(
            "initdb",
            &["-D", &cluster.data(), "-U", "postgres", "--auth=trust"].map(String::from),
        );
        cluster.pg_ctl("start");
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn cmd(&self, tool: &str, args: &[String]) {
        let tool = self.bin.join(tool).display().to_string();
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", &tool]);
                c
            }
            None => Command::new(&tool),
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl(&self, action: &str) {
        let log = self.dir.join("postgres.log").display().to_string();
        let mut args: Vec<String> = [
            "-D",
            &self.data(),
            "-l",
            &log,
            "-w",
            "-t",
            "60",
            "-m",
            "fast",
        ]
        .map(String::from)
        .to_vec();
        if action != "stop" {
            args.push("-o".into());
            args.push(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                self.port,
                self.dir.display()
            ));
        }
        args.push(action.into());
        self.cmd("pg_ctl", &args);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.pg_ctl("stop")));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test]
async fn hosts_recover_from_a_postgres_restart_without_restarting() {
    let cluster = PrivateCluster::start();
    let url = cluster.url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    create_probe_table(&pool).await;
    let dir = config_dir(
        "restart",
        "name = \"steady\"\nevery = \"500ms\"\ntimeout = \"5s\"\n[job.config]\nmode = \"write\"",
    );
    let host = Host::spawn(&dir, &url, "steady", &[]);
    let ok_runs = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("select count(*) from jobhost.runs where outcome = 'ok'")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
    };
    wait_for(Duration::from_secs(30), "runs before the restart", || {
        ok_runs(pool.clone()).map_ge(2)
    })
    .await;
    pool.close().await;

    cluster.pg_ctl("restart");

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let before = ok_runs(pool.clone()).await;
    wait_for(Duration::from_secs(30), "runs after the restart", || {
        ok_runs(pool.clone()).map_ge(before + 3)
    })
    .await;
    assert_eq!(
        host.terminate(Duration::from_secs(20)),
        0,
        "the same process kept running"
    );
    assert_eq!(advisory_locks(&pool).await, 0);
    pool.close().await;
}

/// `fut.map_ge(n)`: resolves to whether the count reached `n`.
trait MapGe: Future<Output = i64> + Sized {
    async fn map_ge(self, n: i64) -> bool {
        self.await >= n
    }
}
impl<F: Future<Output = i64>> MapGe for F {}

/// Every lock has a server-side deadline from the instant it is granted. The
/// test freezes a host (SIGSTOP) right after it took a job's lock: its
/// history check is held up on a row the test has locked, so the freeze lands
/// between the lock and anything else of the run. Postgres must end that
/// transaction within the job's timeout plus the margin, `jobhost locks` must
/// call the frozen holder STUCK, and another host must run the job.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_host_frozen_right_after_the_lock_loses_it_by_the_deadline(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    let dir = config_dir(
        "freeze",
        "name = \"iced\"\nevery = \"1s\"\ntimeout = \"2s\"\n[job.config]\nmode = \"write\"",
    );
    let config = jobhost::config::JobsConfig::from_file(dir.join("jobs.toml")).unwrap();
    let key = config.jobs[0].lock_key;
    // A `running` row of a dead host: the frozen host's history check will
    // want to mark it lost, and wait on the row lock held here.
    let ghost: i64 = sqlx::query_scalar(
        "insert into jobhost.runs (job, slot, attempt, host_id, plugin_sha256, started_at, outcome)
         values ('iced', now() - interval '1 hour', 0, 'ghost', 'x', now() - interval '1 hour', 'running')
         returning id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("select 1 from jobhost.runs where id = $1 for update")
        .bind(ghost)
        .execute(&mut *blocker)
        .await
        .unwrap();

    let frozen = Host::spawn(&dir, &url, "frozen", &[]);
    let holder: i32 = wait_for_some(
        Duration::from_secs(30),
        "the lock taken, history blocked",
        || async {
            sqlx::query_scalar(
                "select l.pid from pg_locks l join pg_stat_activity a on a.pid = l.pid
              where l.locktype = 'advisory' and l.granted and l.objsubid = 2
                and l.objid::int8 = ($1::int8 & 4294967295) and a.wait_event_type = 'Lock'",
            )
            .bind(key.key)
            .fetch_optional(&pool)
            .await
            .unwrap()
        },
    )
    .await;
    frozen.signal("STOP");
    let frozen_at = Instant::now();
    blocker.rollback().await.unwrap();

    // While frozen: once the host is silent past host-lost-after, its lock
    // is STUCK; then Postgres ends the transaction by the run's deadline.
    let stuck_seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    wait_for(
        Duration::from_secs(20),
        "the frozen holder's lock to be released",
        || {
            let (pool, config, stuck_seen) = (pool.clone(), config.clone(), stuck_seen.clone());
            async move {
                let rows = jobhost::inspect::locks(&pool, &config).await.unwrap();
                let held = rows.iter().find(|r| r.pid == holder);
                if held.is_some_and(|r| r.stuck) {
                    stuck_seen.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                held.is_none()
            }
        },
    )
    .await;
    let released_after = frozen_at.elapsed();
    // timeout 2 s + margin 2 s, and slack for a loaded machine.
    assert!(
        released_after < Duration::from_secs(7),
        "the lock outlived its deadline: {released_after:?}"
    );
    assert!(
        stuck_seen.load(std::sync::atomic::Ordering::SeqCst),
        "`jobhost locks` never called the frozen holder STUCK"
    );

    // The job goes on elsewhere.
    let other = Host::spawn(&dir, &url, "thawed-elsewhere", &[]);
    wait_for(Duration::from_secs(30), "another host to run the job", || async {
        count(
            &pool,
            "select count(*) from jobhost.runs where host_id = 'thawed-elsewhere' and outcome = 'ok'",
        )
        .await
            >= 1
    })
    .await;
    frozen.kill();
    assert_eq!(other.terminate(Duration::from_secs(20)), 0);
    assert_eq!(
        count(
            &pool,
            "select count(*) from jobhost.runs where host_id = 'frozen' and outcome = 'ok'"
        )
        .await,
        0,
        "the frozen host's run never committed"
    );
}

/// `jobhost locks` tells the truth: a healthy long (`session`) job's lock
/// connection sits idle between heartbeats and is not an alarm; the same key
/// held by an idle connection of no live host is.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn locks_does_not_cry_wolf_during_a_session_job(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    let dir = Scratch::new("fleet-wolf");
    std::fs::write(
        dir.join("jobs.toml"),
        format!(
            "[host]\nheartbeat = \"200ms\"\nhost-lost-after = \"1s\"\n\n[[job]]\nname = \"long\"\nplugin = {:?}\nevery = \"1h\"\noffset = \"0s\"\ncatch-up = \"2h\"\nlock = \"session\"\nheartbeat = \"200ms\"\ntimeout = \"30s\"\n[job.config]\nmode = \"hold\"\nsleep-ms = \"4000\"\n",
            guests::TEST_SESSION_PROBE
        ),
    )
    .unwrap();
    // The job's first slot needs a history to catch up from.
    sqlx::query(
        "insert into jobhost.runs (job, slot, attempt, host_id, plugin_sha256, started_at, finished_at, outcome)
         values ('long', date_trunc('hour', now()) - interval '1 hour', 1, 'earlier', 'x', now(), now(), 'ok')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let config = jobhost::config::JobsConfig::from_file(dir.join("jobs.toml")).unwrap();
    let host = Host::spawn(&dir, &url, "steady", &[]);
    let args = cli_args(&dir.join("jobs.toml"), &url, &["locks"]);
    wait_for(Duration::from_secs(30), "the session lock held", || async {
        jobhost::inspect::locks(&pool, &config)
            .await
            .unwrap()
            .iter()
            .any(|r| r.job.as_deref() == Some("long"))
    })
    .await;
    // Sampled across several heartbeats while the run holds its lock.
    for _ in 0..5 {
        let rows = jobhost::inspect::locks(&pool, &config).await.unwrap();
        let held = rows.iter().find(|r| r.job.as_deref() == Some("long"));
        let Some(held) = held else { break };
        // Idle between heartbeats (what the old rule called STUCK), active
        // during one.
        assert!(
            held.state == "idle" || held.state == "active",
            "a lock connection: {held:?}"
        );
        assert!(!held.stuck, "false alarm: {held:?}");
        assert_eq!(
            jobhost::cli::run_cli(args.clone()).await.unwrap(),
            std::process::ExitCode::SUCCESS
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(host.terminate(Duration::from_secs(20)), 0);
}

/// `status`, `locks` and `reload` read the database only: they work on an
/// operator's machine that has `jobs.toml` but not the plugin files; `check`
/// still needs them.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn operator_commands_need_no_plugin_files(pool: PgPool) {
    let url = database_url(&pool).await;
    let dir = Scratch::new("fleet-noplugin");
    std::fs::write(
        dir.join("jobs.toml"),
        "[[job]]\nname = \"elsewhere\"\nplugin = \"not-on-this-machine.wasm\"\nevery = \"1m\"\n",
    )
    .unwrap();
    let run =
        |cmd: &'static str| jobhost::cli::run_cli(cli_args(&dir.join("jobs.toml"), &url, &[cmd]));
    for cmd in ["status", "locks", "reload"] {
        let code = run(cmd).await.unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
        assert_eq!(code, std::process::ExitCode::SUCCESS, "{cmd}");
    }
    let e = run("check").await.unwrap_err();
    assert!(
        format!("{e:#}").contains("not-on-this-machine.wasm"),
        "{e:#}"
    );
}

/// What operators do: `run-now` runs one slot through the lock path and
/// records it (exit code from the outcome), `history` lists it, `pause`
/// stops the job on every host (a run-now is skipped, exit 3), `resume`
/// lifts it; `status` shows the pause.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn run_now_history_pause_and_resume(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    // Two jobs over the probe: one that writes, one that fails.
    let dir = config_dir(
        "operate",
        &format!(
            "name = \"manual\"\nevery = \"1h\"\n[job.config]\nmode = \"write\"\nnote = \"by hand\"\n\n\
             [[job]]\nname = \"broken\"\nplugin = {:?}\nevery = \"1h\"\n[job.config]\nmode = \"error\"\n",
            guests::TEST_CORE_PROBE
        ),
    );
    let cli = |args: &[&str]| {
        let mut all = cli_args(&dir.join("jobs.toml"), &url, &["--host-id", "operator"]);
        all.extend(args.iter().map(Into::into));
        jobhost::cli::run_cli(all)
    };
    use std::process::ExitCode;

    assert_eq!(
        cli(&["run-now", "manual"]).await.unwrap(),
        ExitCode::SUCCESS
    );
    assert_eq!(probe_rows(&pool).await, 1);
    assert_eq!(runs(&pool, "manual").await[0].0, "ok");
    assert_eq!(
        cli(&["run-now", "broken"]).await.unwrap(),
        ExitCode::from(1)
    );
    assert_eq!(runs(&pool, "broken").await[0].0, "error");
    assert_eq!(
        cli(&["history", "manual", "--limit", "5"]).await.unwrap(),
        ExitCode::SUCCESS
    );
    let failed = jobhost::operate::history(&pool, "broken", 5, true)
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].message.contains("deliberate failure"),
        "{failed:?}"
    );
    assert!(
        jobhost::operate::history(&pool, "manual", 5, true)
            .await
            .unwrap()
            .is_empty()
    );

    // Pause: fleet-wide, visible in status, and the gate skips.
    assert_eq!(cli(&["pause", "manual"]).await.unwrap(), ExitCode::SUCCESS);
    let config = jobhost::config::JobsConfig::from_file(dir.join("jobs.toml")).unwrap();
    let status = jobhost::inspect::status(&pool, &config).await.unwrap();
    assert!(status.iter().any(|s| s.job == "manual" && s.paused));
    assert!(jobhost::inspect::render_status(&status).contains("PAUSED"));
    assert_eq!(
        cli(&["run-now", "manual"]).await.unwrap(),
        ExitCode::from(3)
    );
    assert_eq!(probe_rows(&pool).await, 1, "a paused job does not run");
    assert_eq!(cli(&["resume", "manual"]).await.unwrap(), ExitCode::SUCCESS);
    assert_eq!(
        cli(&["run-now", "manual"]).await.unwrap(),
        ExitCode::SUCCESS
    );
    assert_eq!(probe_rows(&pool).await, 2);
    // Unknown names are refused with the names there are.
    let e = cli(&["pause", "nope"]).await.unwrap_err();
    assert!(format!("{e:#}").contains("manual, broken"), "{e:#}");
}

/// `--log-format json`: one JSON object per line, and a run's events carry
/// its job, slot, host, lock key and run id.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn json_logs_carry_the_runs_identity(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    let dir = config_dir(
        "json",
        "name = \"logged\"\nevery = \"200ms\"\n[job.config]\nmode = \"write\"",
    );
    let host = Host::spawn(&dir, &url, "json-host", &["--log-format", "json"]);
    wait_for(Duration::from_secs(30), "a run", || async {
        probe_rows(&pool).await >= 2
    })
    .await;
    assert_eq!(host.terminate(Duration::from_secs(20)), 0);
    let logs = std::fs::read_to_string(dir.join("json-host.log")).unwrap();
    let events: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!events.is_empty(), "{logs}");
    let ok = events
        .iter()
        .find(|e| e["message"] == "run ok")
        .unwrap_or_else(|| panic!("no `run ok` event: {logs}"));
    let span = &ok["span"];
    assert_eq!(span["job"], "logged", "{ok}");
    assert_eq!(span["host"], "json-host", "{ok}");
    assert!(
        span["slot"].as_str().is_some_and(|s| s.starts_with("20")),
        "{ok}"
    );
    assert!(
        span["lock_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("(1785684584, ")),
        "{ok}"
    );
    assert!(span["run_id"].as_i64().is_some(), "{ok}");
}

/// `status` shows a run in flight (its host, since when) once its host has
/// published it, and not after it ended; a run shorter than the
/// publication's `after` is never published. The run's own row is written
/// once, when it ends.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn status_shows_runs_in_flight_from_their_hosts_publication(pool: PgPool) {
    use jobhost::in_flight::{Publication, publish};
    create_probe_table(&pool).await;
    let dir = config_dir("in-flight", "name = \"sleeper\"\nevery = \"1h\"");
    let config = jobhost::config::JobsConfig::from_file(dir.join("jobs.toml")).unwrap();
    let running = || async {
        let status = jobhost::inspect::status(&pool, &config).await.unwrap();
        status
            .into_iter()
            .find(|s| s.job == "sleeper")
            .map(|s| s.running)
            .unwrap_or_default()
    };
    let publishing = |runner: &jobhost::runner::Runner, after: Duration| {
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(publish(
            pool.clone(),
            "test-host".into(),
            runner.in_flight(),
            Publication {
                every: Duration::from_millis(20),
                after,
            },
            stop.clone(),
        ));
        (stop, task)
    };

    // Past `after`: published, shown, then unpublished.
    let runner = runner(&pool);
    let (stop, publisher) = publishing(&runner, Duration::from_millis(50));
    let sleeper = sleeper("sleeper", 1500);
    let task = spawn_run(&runner, &sleeper, slot(1));
    let shown = wait_for_some(Duration::from_secs(10), "the run in status", || async {
        let r = running().await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].0, "test-host");
    let text =
        jobhost::inspect::render_status(&jobhost::inspect::status(&pool, &config).await.unwrap());
    assert!(text.contains("running on test-host"), "{text}");
    assert!(
        runs(&pool, "sleeper").await.is_empty(),
        "no row before it ends"
    );
    finished(task.await.unwrap().unwrap(), Outcome::Ok);
    wait_for(
        Duration::from_secs(10),
        "the run gone from status",
        || async { running().await.is_empty() },
    )
    .await;
    assert_eq!(runs(&pool, "sleeper").await.len(), 1);
    stop.cancel();
    publisher.await.unwrap();

    // Shorter than `after`: never published, though the publisher looked
    // many times while it ran.
    let (stop, publisher) = publishing(&runner, Duration::from_secs(3600));
    finished(runner.run(&sleeper, slot(2)).await.unwrap(), Outcome::Ok);
    stop.cancel();
    publisher.await.unwrap();
    assert_eq!(
        count(&pool, "select count(*) from jobhost.in_flight").await,
        0
    );
    assert_eq!(runs(&pool, "sleeper").await.len(), 2);
}

/// A host whose log nobody reads keeps running its jobs: stdout is a pipe
/// that fills, and the log's writer thread, not the runs, waits on it. What
/// it cannot queue it drops and counts (`jobhost_log_lines_dropped_total`),
/// and once the log is read again it says how many lines it lost. (Before,
/// every run blocked on its first log line after the pipe filled, with its
/// transaction open and its lock held, and so did the heartbeat.)
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_host_whose_log_is_not_read_keeps_running_its_jobs(pool: PgPool) {
    let url = database_url(&pool).await;
    let port = free_port();
    let dir = Scratch::new("fleet-unread");
    // Three jobs that print their whole output cap (64 KiB, ~650 lines) at
    // each run, ~160 KiB of log lines: the pipe (64 KiB) is full after the
    // first run, and the writer's queue (4 MiB) after some 26.
    let jobs: String = (0..3)
        .map(|i| {
            format!(
                "[[job]]\nname = \"chatty-{i}\"\nplugin = {:?}\nevery = \"200ms\"\ntimeout = \"5s\"\n[job.config]\nmode = \"chatty\"\n\n",
                guests::TEST_CORE_PROBE
            )
        })
        .collect();
    std::fs::write(
        dir.join("jobs.toml"),
        format!(
            "[host]\nlisten = \"127.0.0.1:{port}\"\nwatch = false\nshutdown-grace = \"10s\"\nheartbeat = \"200ms\"\nhost-lost-after = \"2s\"\n\n{jobs}"
        ),
    )
    .unwrap();
    let ok_runs = || async {
        count(
            &pool,
            "select count(*) from jobhost.runs where outcome = 'ok'",
        )
        .await
    };
    let (host, log) = Host::spawn_unread(&dir, &url, "unread");
    let dropped = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("jobhost_log_lines_dropped_total "))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    // A host that blocks on its log stops answering too: each scrape is
    // bounded, so that the old behaviour fails here rather than hangs.
    let scrape = || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let (status, metrics) =
            tokio::time::timeout(Duration::from_secs(2), http_get(port, "/metrics"))
                .await
                .ok()?;
        assert!(status.contains("200"), "{status}");
        Some(dropped(&metrics))
    };
    // 30 runs are far more than the pipe holds.
    wait_for(
        Duration::from_secs(60),
        "30 runs while the log is not read",
        || async { ok_runs().await >= 30 },
    )
    .await;
    let seen = wait_for_some(Duration::from_secs(30), "log lines dropped", || async {
        scrape().await.filter(|&n| n > 0)
    })
    .await;
    // And they go on.
    let before = ok_runs().await;
    wait_for(
        Duration::from_secs(30),
        "runs while the log is full",
        || async { ok_runs().await >= before + 10 },
    )
    .await;
    let now = scrape().await.expect("the host answers /metrics");
    assert!(now > seen, "dropped {seen}, then {now}");
    let failed = count(
        &pool,
        "select count(*) from jobhost.runs where outcome <> 'ok'",
    )
    .await;
    assert_eq!(failed, 0, "every run succeeded");

    // The log read again: it says what it lost.
    let read = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reading = read.clone();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut log = log;
        let mut chunk = [0u8; 64 * 1024];
        while let Ok(n) = log.read(&mut chunk) {
            if n == 0 {
                break;
            }
            reading
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    wait_for(
        Duration::from_secs(30),
        "the report of lost lines",
        || async { read.lock().unwrap().contains("log lines dropped") },
    )
    .await;
    // Text for a pipe, not a terminal: no colours' escape codes.
    assert!(
        !read.lock().unwrap().contains('\x1b'),
        "escape codes in a log that is not a terminal"
    );
    assert_eq!(host.terminate(Duration::from_secs(20)), 0);
}
