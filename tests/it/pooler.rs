//! Behind a pooler: a real PgBouncer (Debian's `pgbouncer`, started by the
//! test on a free loopback port, stopped when the test ends) in front of the
//! test server. A host must refuse a transaction pooler with a message that
//! says what it found and what to do, never run into silent corruption; a
//! session-mode pooler is fine.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jobhost::HostOptions;
use jobhost::config::JobsConfig;
use jobhost_tests::guests;
use sqlx::PgPool;

use crate::support::*;

/// A PgBouncer process of the test's own.
struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl PgBouncer {
    /// Starts PgBouncer in `pool_mode` in front of the server `DATABASE_URL`
    /// names, with `default_pool_size` server connections per database.
    /// `ignore` lists the startup parameters it lets through unanswered.
    fn start(tag: &str, pool_mode: &str, pool_size: u32, ignore: &str) -> PgBouncer {
        let url: sqlx::postgres::PgConnectOptions =
            std::env::var("DATABASE_URL").unwrap().parse().unwrap();
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("jobhost-pgbouncer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={} port={}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 100\nignore_startup_parameters = {ignore}\nlogfile = {}\npidfile = {}\n",
                url.get_host(),
                url.get_port(),
                dir.join("users.txt").display(),
                dir.join("pgbouncer.log").display(),
                dir.join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
        // PgBouncer refuses to run as root: run it as the `postgres` user,
        // which the Debian package creates.
        let mut cmd = if is_root() {
            Command::new("runuser")
        } else {
            Command::new("pgbouncer")
        };
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres", &dir.display().to_string()])
                .status()
                .unwrap();
            cmd.args(["-u", "postgres", "--", "pgbouncer"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer (Debian package `pgbouncer`, installed by .ci/run)");
        let bouncer = PgBouncer { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen: {}",
                std::fs::read_to_string(bouncer.dir.join("pgbouncer.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        bouncer
    }

    /// `url` with PgBouncer's address in place of the server's.
    fn url(&self, database_url: &str) -> String {
        let mut options: sqlx::postgres::PgConnectOptions = database_url.parse().unwrap();
        options = options.host("127.0.0.1").port(self.port);
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            options.get_username(),
            self.port,
            options.get_database().unwrap_or("postgres")
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser forwards the signal to pgbouncer; kill both to be sure.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    // SAFETY-free: `id -u` is enough for a test harness.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn one_job_config(tag: &str) -> JobsConfig {
    let dir = std::env::temp_dir().join(format!("jobhost-pooler-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("jobs.toml"),
        format!(
            "[host]\nwatch = false\nshutdown-grace = \"5s\"\n\n[[job]]\nname = \"through\"\nplugin = {:?}\nevery = \"200ms\"\n[job.config]\nmode = \"write\"\n",
            guests::TEST_CORE_PROBE
        ),
    )
    .unwrap();
    JobsConfig::from_file(dir.join("jobs.toml")).unwrap()
}

/// Starts a host on `url` and returns how its start ended, stopping it after
/// `run_for` if it started.
async fn host_start(url: String, run_for: Duration, tag: &str) -> anyhow::Result<()> {
    let options = HostOptions {
        database_url: url,
        host_id: format!("pooled-{tag}"),
        demo: false,
        clock_offset: chrono::TimeDelta::zero(),
    };
    jobhost::run(one_job_config(tag), options, tokio::time::sleep(run_for)).await
}

/// PgBouncer in transaction mode that lets the host's startup parameters
/// through unanswered (the configuration a user reaches for after the first
/// refusal): the host notices that one client connection is served by
/// different server sessions and refuses to start, saying so. Nothing ran.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_transaction_pooler_is_refused_with_what_was_found(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    for size in [4, 1] {
        let bouncer = PgBouncer::start(
            &format!("tx{size}"),
            "transaction",
            size,
            "extra_float_digits,options",
        );
        let err = host_start(bouncer.url(&url), Duration::from_secs(3), "tx")
            .await
            .expect_err("a host must not start behind a transaction pooler");
        let text = format!("{err:#}");
        assert!(
            text.contains("transaction pooler") && text.contains("pool_mode = session"),
            "pool size {size}: {text}"
        );
        assert!(
            text.contains("served by backend") || text.contains("waited for the first client"),
            "the message says what was found: {text}"
        );
    }
    assert_eq!(probe_rows(&pool).await, 0, "no run happened");
}

/// A plain PgBouncer configuration refuses the host's startup parameters; the
/// host says that this looks like a pooler and what to do.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_pooler_refusing_startup_parameters_is_named(pool: PgPool) {
    let url = database_url(&pool).await;
    let bouncer = PgBouncer::start("plain", "transaction", 4, "");
    let err = host_start(bouncer.url(&url), Duration::from_secs(3), "plain")
        .await
        .expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("refused a startup parameter") && text.contains("PgBouncer"),
        "{text}"
    );
}

/// A session-mode pooler gives each client connection one server session:
/// the host runs (and warns that its keepalive options were dropped).
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_session_pooler_is_accepted(pool: PgPool) {
    create_probe_table(&pool).await;
    let url = database_url(&pool).await;
    let bouncer = PgBouncer::start("session", "session", 8, "extra_float_digits,options");
    let logs = LogCapture::start();
    host_start(bouncer.url(&url), Duration::from_secs(2), "session")
        .await
        .expect("a session pooler is fine");
    assert!(
        probe_rows(&pool).await >= 1,
        "the job ran through the pooler: {:?} {}",
        runs(&pool, "through").await,
        logs.text()
    );
    assert!(
        logs.text().contains("did not reach Postgres"),
        "the dropped startup options are reported: {}",
        logs.text()
    );
}
