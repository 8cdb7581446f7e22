//! Job roles: admitted at start and reload, refused when they cannot serve,
//! confined to their own jobs, and claimed only while some host runs a job as
//! them (docs/DESIGN.md §7).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jobhost::db::{DEADLINE_MARGIN, Outcome};
use jobhost::lock::LockKey;
use jobhost::pools::RunPools;
use jobhost::roles::Admitted;
use jobhost_tests::guests;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::support::*;

/// One job's role cannot act for another job, nor write the history
/// itself: on a connection that logs in as job `a`'s role (what any code of
/// `a`'s runs, a function it created included, runs as), the gate refuses
/// job `b`, a run's row needs the token its gate drew, and the host's
/// tables and internals are out of reach.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn one_jobs_role_cannot_gate_or_record_another_jobs_runs(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let runs = jobhost::pools::RunPools::over(pool.clone());
    let mut a = job("a", guests::TEST_CORE_PROBE, &[]).config;
    a.role = Some(role.clone());
    jobhost::roles::Admitted::new("test-host")
        .admit(&runs, &[a])
        .await
        .unwrap();
    let mut conn = runs.pool(Some(&role)).unwrap().acquire().await.unwrap();
    let mut attempt = async |sql: String| match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => Ok(rows),
        Err(e) => Err((
            e.as_database_error()
                .and_then(|d| d.code())
                .unwrap_or_default()
                .into_owned(),
            e.to_string(),
        )),
    };
    let gate = |job: &str, n: i64| {
        jobhost::db::slot_gate_sql(
            job,
            slot(n),
            "h",
            Duration::from_secs(60),
            Some(LockKey::derive(job)),
            true,
        )
    };
    let (code, msg) = attempt(gate("b", 1)).await.expect_err("gate of b");
    assert!(
        code == "JH003" && msg.contains("may not run job 'b'"),
        "{code} {msg}"
    );
    let rows = attempt(gate("a", 1)).await.expect("its own job's gate");
    let history = jobhost::db::SlotGate::from_row(&rows[0])
        .unwrap()
        .history
        .unwrap();
    let (id, token) = (history.run_id.unwrap(), history.run_token);
    assert!(token.is_some(), "a job role's gate draws a token");
    let row = |job: &str| jobhost::db::RunRow {
        job: job.into(),
        slot: slot(1),
        host_id: "h".into(),
        plugin_sha256: "x".into(),
        started_at: None,
        backend_pid: None,
    };
    let ok = jobhost::db::RunRecord {
        attempt: 1,
        outcome: Outcome::Ok,
        message: "forged",
    };
    // Its own gate's token, for another job: refused.
    let (code, msg) = attempt(jobhost::db::record_sql(id, token, &row("b"), &ok))
        .await
        .expect_err("a row of b");
    assert!(code == "JH003" && msg.contains("job 'b'"), "{code} {msg}");
    // Its own job, another run's id: the token does not match it.
    let (code, msg) = attempt(jobhost::db::record_sql(id + 1, token, &row("a"), &ok))
        .await
        .expect_err("a row without its gate");
    assert!(
        code == "JH003" && msg.contains("wrong token"),
        "{code} {msg}"
    );
    for sql in [
        "insert into jobhost.runs (job, slot, host_id, plugin_sha256, started_at, outcome) \
         values ('a', now(), 'h', 'x', now(), 'ok')",
        "select * from jobhost.run_secret",
        "select jobhost.slot_gate('a', now(), 'h', 60, null, null)",
        "select jobhost.run_token(1, 'a')",
    ] {
        let (code, msg) = attempt(sql.to_owned()).await.expect_err(sql);
        assert_eq!(code, "42501", "{sql}: {msg}");
    }
    // What the gate let through is still the host's to record: the row
    // with its token stands.
    attempt(jobhost::db::record_sql(id, token, &row("a"), &ok))
        .await
        .expect("the run's own row");
    drop(conn);
    runs.close_roles().await;
    drop_role(&pool, &role).await;
}

/// Runs share one budget of `pool-size` connections across the host's pool
/// and every role's (the instance pool is sized by it): with two taken by
/// two roles' runs, a third run waits until one is given back.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn runs_share_one_budget_of_connections_across_roles(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let two = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let runs = jobhost::pools::RunPools::over(two.clone());
    let first = runs.acquire(Some(&role)).await.unwrap();
    let second = runs.acquire(None).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(300), runs.acquire(Some(&role))).await;
    assert!(waiting.is_err(), "a third connection was handed out");
    drop(first);
    let mut third = tokio::time::timeout(Duration::from_secs(5), runs.acquire(Some(&role)))
        .await
        .expect("given back")
        .unwrap();
    let user: String = sqlx::query_scalar("select session_user::text")
        .fetch_one(&mut *third.conn)
        .await
        .unwrap();
    assert_eq!(user, role, "a role's connection logs in as the role");
    // Closing a pool waits for its connections to come back.
    drop((second, third));
    runs.close_roles().await;
    // A role used after its pool was closed gets a new one.
    drop(
        runs.acquire(Some(&role))
            .await
            .expect("a new pool for the role"),
    );
    runs.close_roles().await;
    two.close().await;
    drop_role(&pool, &role).await;
}

/// A connection a run hands on goes only to a run of the same pool: a
/// connection that logs in as a job's role never reaches a run of the host's
/// own pool (or of another role), however long that run has waited, and the
/// role's waiting run takes it first.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_roles_connection_is_handed_on_only_to_a_run_as_that_role(pool: PgPool) {
    use jobhost::tx::OpenTx;
    let role = jobspace_and_role(&pool).await;
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let runs = RunPools::over(one.clone());
    let tx = OpenTx::begin(
        runs.acquire(Some(&role)).await.unwrap(),
        "",
        jobhost::config::Pooler::None,
    )
    .await
    .unwrap();
    // Both wait on the budget of one: the host's run first, then the role's.
    let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
    let waiter = |role: Option<String>| {
        let (runs, order_tx) = (runs.clone(), order_tx.clone());
        tokio::spawn(async move {
            let mut leased = runs.acquire(role.as_deref()).await.unwrap();
            let user: String = sqlx::query_scalar("select session_user::text")
                .fetch_one(&mut *leased.conn)
                .await
                .unwrap();
            order_tx.send((role, user)).unwrap();
        })
    };
    let host_run = waiter(None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let role_run = waiter(Some(role.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Ends clean: handed on.
    tx.end("commit").await.unwrap();
    let (first, second) = (order.recv().await.unwrap(), order.recv().await.unwrap());
    assert_eq!(
        first,
        (Some(role.clone()), role.clone()),
        "the role's run takes its pool's connection first, as the role"
    );
    assert_eq!(second.0, None);
    assert_ne!(second.1, role, "the host's run got the role's connection");
    host_run.await.unwrap();
    role_run.await.unwrap();
    runs.close_roles().await;
    one.close().await;
    drop_role(&pool, &role).await;
}

/// The host reads the job roles at start: one that cannot log in, or does
/// not exist, is refused naming the job, the role and the fix; a role that
/// may create (no longer a way out of its rights) or has only the use of
/// its tables is not named. A start admits each role for its job (and its
/// graceful stop releases the claim: [`claims_follow_the_hosts_that_hold_them`]).
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_job_role_that_cannot_log_in_is_refused(pool: PgPool) {
    let creator = jobspace_and_role(&pool).await;
    let shut = format!("{creator}_nologin");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop role if exists \"{shut}\"; create role \"{shut}\" nologin; \
         grant usage on schema jobspace to \"{shut}\"; grant insert on probe to \"{shut}\""
    )))
    .execute(&pool)
    .await
    .unwrap();

    // The audit itself, job by job.
    let with_role = |name: &str, role: &str| {
        let mut j = job(name, guests::TEST_CORE_PROBE, &[]).config;
        j.role = Some(role.to_owned());
        j
    };
    let jobs = [
        with_role("creates", &creator),
        with_role("shut", &shut),
        with_role("missing", "jobhost_no_such_role"),
        job("no-role", guests::TEST_CORE_PROBE, &[]).config,
    ];
    let found = jobhost::roles::audit(&pool, &jobs).await.unwrap();
    let named: Vec<(&str, bool, &str)> = found
        .iter()
        .map(|f| (f.job.as_str(), f.refused, f.what.as_str()))
        .collect();
    assert_eq!(
        named.iter().map(|n| (n.0, n.1)).collect::<Vec<_>>(),
        [("shut", true), ("missing", true)],
        "{named:?}"
    );
    assert!(
        named[0].2.contains("cannot log in") && named[0].2.contains("alter role"),
        "{named:?}"
    );
    assert!(named[1].2.contains("does not exist"), "{named:?}");

    // A host's start: refused, naming the job, the role and the way out.
    let url = database_url(&pool).await;
    let dir = Scratch::new("roles");
    let start = |n: u32| {
        let toml = format!(
            "[host]\nwatch = false\nshutdown-grace = \"5s\"\n\n[[job]]\nname = \"shut\"\nplugin = {:?}\nevery = \"1h\"\nrole = {shut:?}\n",
            guests::TEST_CORE_PROBE,
        );
        let file = dir.join(format!("jobs-{n}.toml"));
        std::fs::write(&file, toml).unwrap();
        let options = jobhost::HostOptions {
            direct_url: None,
            database_url: url.clone(),
            host_id: format!("roles-{n}"),
            demo: false,
            clock_offset: chrono::TimeDelta::zero(),
        };
        jobhost::run(
            jobhost::config::JobsConfig::from_file(&file).unwrap(),
            options,
            tokio::time::sleep(Duration::from_millis(300)),
        )
    };
    let refused = format!(
        "{:#}",
        start(1).await.expect_err("a role that cannot log in")
    );
    assert!(
        refused.contains("job `shut`") && refused.contains(&shut) && refused.contains("alter role"),
        "{refused}"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("alter role \"{shut}\" login")))
        .execute(&pool)
        .await
        .unwrap();
    start(2).await.expect("the role can log in");
    let (claimed, usage): (bool, bool) = sqlx::query_as(
        "select exists (select 1 from jobhost.job_roles where job = 'shut' and role = $1),
                has_schema_privilege($1, 'jobhost', 'USAGE')",
    )
    .bind(&shut)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        usage,
        "the start granted the role the use of schema jobhost"
    );
    assert!(!claimed, "the host's graceful stop released its claim");

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop owned by \"{shut}\"; drop role \"{shut}\""
    )))
    .execute(&pool)
    .await
    .unwrap();
    drop_role(&pool, &creator).await;
}

/// `jobhost check` agrees with a start about job roles when it has a
/// database: a role that cannot log in is refused, naming the job and the
/// way out, and so is one whose login fails (it logs in as each role, as a
/// start does); once it can, the config is valid.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn check_refuses_a_job_role_that_cannot_log_in_as_a_start_does(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let alter = |change: &str| {
        let sql = format!("alter role \"{role}\" {change}");
        let pool = pool.clone();
        async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let url = database_url(&pool).await;
    let (_dir, file) = jobs_file(
        "check-roles",
        &format!(
            "[[job]]\nname = \"shut\"\nplugin = {:?}\nevery = \"1h\"\nrole = {role:?}\n",
            guests::TEST_CORE_PROBE,
        ),
    );
    let check = || jobhost::cli::run_cli(cli_args(&file, &url, &["check"]));
    // A role that cannot log in is read as such from `pg_roles`; one that
    // may log in but whose login fails (here: no connection left to it; a
    // missing password looks the same) is refused by a real login, as a
    // start's is.
    for (change, said) in [
        ("nologin", "cannot log in"),
        ("login connection limit 0", "cannot log in as its role"),
    ] {
        alter(change).await;
        let refused = format!("{:#}", check().await.expect_err(change));
        assert!(
            refused.contains("job `shut`") && refused.contains(said),
            "{change}: {refused}"
        );
    }
    alter("connection limit -1").await;
    assert_eq!(check().await.unwrap(), std::process::ExitCode::SUCCESS);
    drop_role(&pool, &role).await;
}

/// The (job, role, host) claims in `jobhost.job_roles`, sorted.
async fn claims(pool: &PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as("select job, role::text, host_id from jobhost.job_roles order by 1, 2, 3")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Whether `role` may gate a slot of `job` (logged in as the role, as its
/// runs are), or the SQLSTATE that refused it.
async fn gate_as(runs: &RunPools, role: &str, job: &str) -> Result<(), String> {
    let mut conn = runs.pool(Some(role)).unwrap().acquire().await.unwrap();
    let key = LockKey::derive(job);
    let sql = jobhost::db::slot_gate_sql(
        job,
        chrono::Utc::now(),
        "gate-test",
        Duration::from_secs(30),
        Some(key),
        true,
    );
    let gate = format!("begin; {sql}; rollback");
    match sqlx::raw_sql(sqlx::AssertSqlSafe(gate))
        .execute(&mut *conn)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = sqlx::raw_sql("rollback").execute(&mut *conn).await;
            Err(e
                .as_database_error()
                .and_then(|d| d.code())
                .unwrap_or_default()
                .into_owned())
        }
    }
}

fn write_jobs(file: &std::path::Path, plugin: &str, role: &str) {
    let toml = format!(
        "[[job]]\nname = \"moved\"\nplugin = {plugin:?}\nevery = \"1h\"\ntimeout = \"1s\"\nrole = {role:?}\n"
    );
    std::fs::write(file, toml).unwrap();
}

/// A reload that moves a job to another role takes the old role's right to
/// the job away, but only once no run of the old configuration can still be
/// in flight (the job's timeout plus the deadline margin): until then its
/// gate and row still go through. A reload that is rejected after its roles
/// were admitted leaves no claim behind. Before claims were per host, the
/// old role kept its row (and the right) until an operator deleted it.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_role_the_jobs_no_longer_name_loses_its_right_to_the_job(pool: PgPool) {
    let old = jobspace_and_role(&pool).await;
    let new = format!("{old}_new");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop role if exists \"{new}\"; create role \"{new}\" login"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let dir = Scratch::new("role-claims");
    let file = dir.join("jobs.toml");
    write_jobs(&file, guests::TEST_CORE_PROBE, &old);
    let config = jobhost::config::JobsConfig::from_file(&file).unwrap();
    let runtime = runtime();
    let jobs = jobhost::load_jobs(&runtime, &config).await.unwrap();
    let runs = RunPools::over(pool.clone());
    let admitted = Admitted::new("h1");
    admitted.admit(&runs, &config.jobs).await.unwrap();
    let lost_after = Duration::from_secs(30);
    let claim = |role: &str| ("moved".to_owned(), role.to_owned(), "h1".to_owned());
    assert_eq!(claims(&pool).await, [claim(&old)]);
    assert_eq!(gate_as(&runs, &old, "moved").await, Ok(()));
    // Never admitted: not even `USAGE` on schema jobhost.
    assert_eq!(gate_as(&runs, &new, "moved").await, Err("42501".into()));

    // Moved to the new role: both may act for the job while a run of the
    // old configuration may be in flight.
    let mut reloader = jobhost::reload::Reloader::new(&config, Arc::clone(&runtime), jobs)
        .with_roles(runs.clone(), admitted.clone());
    write_jobs(&file, guests::TEST_CORE_PROBE, &new);
    let moved_at = Instant::now();
    reloader.reload().await.expect("the reload is applied");
    admitted.renew(&pool, lost_after).await.unwrap();
    let mut both = vec![claim(&old), claim(&new)];
    both.sort();
    assert_eq!(
        claims(&pool).await,
        both,
        "the old role kept until its runs end"
    );
    assert_eq!(gate_as(&runs, &old, "moved").await, Ok(()));
    // Once the old configuration's runs are over (a heartbeat then):
    let later = moved_at + Duration::from_secs(1) + DEADLINE_MARGIN + Duration::from_millis(100);
    admitted.renew_at(&pool, lost_after, later).await.unwrap();
    assert_eq!(claims(&pool).await, [claim(&new)]);
    assert_eq!(gate_as(&runs, &old, "moved").await, Err("JH003".into()));
    assert_eq!(gate_as(&runs, &new, "moved").await, Ok(()));

    // A reload back to the old role that is rejected after its admission
    // (the plugin is not a component): nothing of it stays.
    let broken = dir.join("broken.wasm");
    std::fs::write(&broken, b"not a component").unwrap();
    write_jobs(&file, broken.to_str().unwrap(), &old);
    assert!(reloader.reload().await.is_none(), "the reload is rejected");
    admitted.renew(&pool, lost_after).await.unwrap();
    assert_eq!(claims(&pool).await, [claim(&new)]);
    assert_eq!(gate_as(&runs, &old, "moved").await, Err("JH003".into()));

    admitted.release(&pool).await.unwrap();
    assert_eq!(claims(&pool).await, []);
    runs.close_roles().await;
    drop_role(&pool, &new).await;
    drop_role(&pool, &old).await;
}

/// A real host claims its job's role while it runs and releases the claim
/// at its graceful stop; its heartbeats delete the claims of hosts that are
/// not live (a dead one, one that stopped, one that never registered and is
/// older than `host-lost-after`), and keep a live peer's, those of a host
/// that has only just admitted its roles (it registers once its plugins are
/// loaded: here its admission is dated ahead, so the test does not depend on
/// how long this host takes to start), and those of hosts of an earlier
/// version (empty host id), which are the operator's.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn claims_follow_the_hosts_that_hold_them(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "insert into jobhost.hosts (id, hostname, pid, version, started_at, last_seen, stopped_at)
         values ('dead', 'x', 1, 'v', now() - interval '2 hours', now() - interval '1 hour', null),
                ('stopped', 'x', 2, 'v', now() - interval '2 hours', now(), now() - interval '1 hour'),
                ('peer', 'x', 3, 'v', now(), now() + interval '1 hour', null);
         insert into jobhost.job_roles (job, role, host_id, admitted_at)
         select 'held', '{role}', h, now() - interval '1 hour'
           from unnest(array['dead', 'stopped', 'peer', '', 'never-registered']) h;
         insert into jobhost.job_roles (job, role, host_id, admitted_at)
         values ('held', '{role}', 'just-admitted', now() + interval '1 hour')"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let url = database_url(&pool).await;
    let dir = Scratch::new("claims");
    let file = dir.join("jobs.toml");
    std::fs::write(
        &file,
        format!(
            "[host]\nwatch = false\nheartbeat = \"100ms\"\nhost-lost-after = \"2s\"\nshutdown-grace = \"5s\"\n\n\
             [[job]]\nname = \"held\"\nplugin = {:?}\nevery = \"1h\"\nrole = {role:?}\n",
            guests::TEST_CORE_PROBE,
        ),
    )
    .unwrap();
    let options = jobhost::HostOptions {
        direct_url: None,
        database_url: url,
        host_id: "claimer".into(),
        demo: false,
        clock_offset: chrono::TimeDelta::zero(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(jobhost::run(
        jobhost::config::JobsConfig::from_file(&file).unwrap(),
        options,
        async {
            let _ = stopped.await;
        },
    ));
    let hosts = |rows: Vec<(String, String, String)>| -> Vec<String> {
        rows.into_iter().map(|(_, _, h)| h).collect()
    };
    let expected = ["", "claimer", "just-admitted", "peer"];
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let now = hosts(claims(&pool).await);
            if now == expected {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let now = hosts(claims(&pool).await);
    stop.send(()).unwrap();
    host.await.unwrap().expect("the host ran and stopped");
    assert!(seen.is_ok(), "claims while the host ran: {now:?}");
    assert_eq!(
        hosts(claims(&pool).await),
        ["", "just-admitted", "peer"],
        "the graceful stop released the host's claim"
    );
    drop_role(&pool, &role).await;
}

/// `run-now` heartbeats while its run lasts: a run longer than
/// `host-lost-after` keeps its one-run host live, so a peer's heartbeat does
/// not reap its role's claim under it (the run would then fail at its row,
/// `JH003`), and the claim is released when it ends.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_long_run_now_keeps_its_role_claim(pool: PgPool) {
    let role = jobspace_and_role(&pool).await;
    let url = database_url(&pool).await;
    let dir = Scratch::new("run-now-claim");
    let host = "[host]\nwatch = false\nheartbeat = \"100ms\"\nhost-lost-after = \"500ms\"\nshutdown-grace = \"5s\"\n\n";
    let slow = dir.join("slow.toml");
    std::fs::write(
        &slow,
        format!(
            "{host}[[job]]\nname = \"slow\"\nplugin = {:?}\nevery = \"1h\"\ntimeout = \"10s\"\nrole = {role:?}\n\
             [job.config]\nmode = \"sleep\"\nsleep-ms = \"1500\"\n",
            guests::TEST_CORE_PROBE,
        ),
    )
    .unwrap();
    let idle = dir.join("idle.toml");
    std::fs::write(
        &idle,
        format!(
            "{host}[[job]]\nname = \"idle\"\nplugin = {:?}\nevery = \"1h\"\n",
            guests::TEST_CORE_PROBE,
        ),
    )
    .unwrap();
    // A peer whose heartbeats reap the claims of hosts that look dead.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let peer = tokio::spawn(jobhost::run(
        jobhost::config::JobsConfig::from_file(&idle).unwrap(),
        jobhost::HostOptions {
            direct_url: None,
            database_url: url.clone(),
            host_id: "peer".into(),
            demo: false,
            clock_offset: chrono::TimeDelta::zero(),
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut args = cli_args(&slow, &url, &["--host-id", "one-run"]);
    args.extend(["run-now".into(), "slow".into()]);
    let code = jobhost::cli::run_cli(args).await;
    stop.send(()).unwrap();
    peer.await.unwrap().expect("the peer ran and stopped");
    let outcome: Vec<(String, String)> = sqlx::query_as(
        "select outcome, coalesce(message, '') from jobhost.runs where job = 'slow'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let left = claims(&pool).await;
    drop_role(&pool, &role).await;
    assert_eq!(
        code.unwrap(),
        std::process::ExitCode::SUCCESS,
        "{outcome:?}"
    );
    assert_eq!(outcome.len(), 1, "{outcome:?}");
    assert_eq!(outcome[0].0, "ok", "{outcome:?}");
    assert_eq!(outcome[0].1, "slept 1500 ms", "{outcome:?}");
    assert_eq!(left, [], "the one-run host released its claim");
}
