//! Row 5a's references: one instant of many slots, released at once without
//! the scheduler, three ways side by side: the plugin's runs, their native
//! twins, and the **floor**, the run's SQL alone.
//!
//! The floor sends what a no-op run sends (the runner's own opening query,
//! [`Runner::opening_sql`], and the closing query of an `ok` run whose
//! plugin sent no SQL, through the host's [`OpenTx`]) from a client that
//! does nothing else: no scheduler, runner, instance, in-flight set or log.
//! It is what the database alone needs to start the instant's runs on this
//! machine, over the same 10 connections: no host can start them sooner, so
//! row 5a's target can be judged against it, as rows 3 and 3l are against
//! wasmtime's floor (3f). Start lags are read from the runs' rows, as row
//! 5a's are.

use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use jobhost::config::Pooler;
use jobhost::db::{self, Outcome, RunRecord, RunRow, SlotGate};
use jobhost::hygiene::{self, AfterCommit};
use jobhost::lock::LockKey;
use jobhost::runner::{Job, Runner};
use jobhost::runtime::Runtime;
use jobhost::tx::OpenTx;
use sqlx::PgPool;

use crate::{MachineCpu, cpu_seconds, ok, percentile};

/// How the instant's slots are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Through the runner, the no-op plugin.
    Plugin,
    /// Through the runner, its native twin (no instance).
    Native,
    /// The run's two queries alone (see the module docs).
    Floor,
}

impl How {
    pub const ALL: [How; 3] = [How::Plugin, How::Native, How::Floor];

    /// Every way, in an order that turns with `round` (so that drift over a
    /// run hits each alike), with each one's place in [`How::ALL`].
    pub fn in_turn(round: usize) -> impl Iterator<Item = (usize, How)> {
        let n = How::ALL.len();
        (0..n).map(move |k| {
            let i = (round + k) % n;
            (i, How::ALL[i])
        })
    }

    fn tag(self) -> &'static str {
        match self {
            How::Plugin => "plugin",
            How::Native => "native",
            How::Floor => "floor",
        }
    }
}

/// One instant's figures.
pub struct Burst {
    /// Start lag of every run (ms), sorted.
    pub lags: Vec<f64>,
    /// This process's CPU per run (µs).
    pub host_us: f64,
    /// The rest of the machine's CPU per run (µs): Postgres, on a machine
    /// where nothing else runs.
    pub database_us: f64,
}

impl Burst {
    pub fn pct(&self, q: f64) -> f64 {
        percentile(&self.lags, q)
    }

    /// One line of `--only instant` or `--only burst`.
    pub fn line(&self, how: How) -> String {
        format!(
            "{} slots released at once, {how:?}: start lag p50 / p99 {:.1} / {:.1} ms; CPU per run: host {:.0} µs, database {:.0} µs",
            self.lags.len(),
            self.pct(0.5),
            self.pct(0.99),
            self.host_us,
            self.database_us,
        )
    }
}

/// Runs `n` slots of one instant `how`, over a pool of 10 connections, all
/// released at once. Each call uses jobs of its own (`round` in their names),
/// so every slot is due and runs.
pub async fn burst(
    url: &str,
    pool: &PgPool,
    runtime: &Arc<Runtime>,
    noop: &Job,
    n: usize,
    how: How,
    round: usize,
) -> anyhow::Result<Burst> {
    let tag = how.tag();
    let runs = jobhost::pools::pool_options()
        .max_connections(10)
        .connect(url)
        .await?;
    // Every connection open before the instant, as a host's are after its
    // first second.
    let mut warm = Vec::new();
    for _ in 0..10 {
        warm.push(runs.acquire().await?);
    }
    drop(warm);
    let host_id: Arc<str> = format!("bench-burst-{tag}").into();
    let runner = Arc::new(Runner::new(runs.clone(), runtime.clone(), &host_id));
    let prefix = format!("burst-{tag}-{round}-");
    let jobs: Vec<Job> = (0..n)
        .map(|i| {
            let mut j = noop.clone();
            j.config.name = format!("{prefix}{i}");
            j.config.lock_key = LockKey::derive(&j.config.name);
            j
        })
        .collect();
    // A slot the database's clock has just reached: every gate finds it due.
    let slot: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(pool)
        .await?;
    let (machine, process) = (MachineCpu::now(), cpu_seconds());
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let (runner, host_id) = (runner.clone(), host_id.clone());
            tokio::spawn(async move {
                match how {
                    How::Plugin => ok(runner.run(&job, slot).await?),
                    How::Native => ok(runner.run_native(&job, slot, None).await?),
                    How::Floor => floor_run(&runner, &host_id, &job, slot).await,
                }
                .with_context(|| format!("job `{}`", job.config.name))
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let host = cpu_seconds() - process;
    let database = machine.busy_seconds_since() - host;
    runs.close().await;
    let mut lags: Vec<f64> = sqlx::query_scalar(
        "select extract(epoch from started_at - slot)::float8 * 1000 from jobhost.runs
          where job like $1 || '%' and outcome = 'ok'",
    )
    .bind(&prefix)
    .fetch_all(pool)
    .await?;
    anyhow::ensure!(
        lags.len() == n,
        "{tag}: {} of {n} slots ran ok at the instant",
        lags.len()
    );
    lags.sort_by(f64::total_cmp);
    let per_run = |seconds: f64| seconds * 1e6 / n as f64;
    Ok(Burst {
        lags,
        host_us: per_run(host),
        database_us: per_run(database),
    })
}

/// One slot's floor: the opening query a run sends, its gate read, the
/// closing query of an `ok` run whose plugin sent no SQL; through the
/// host's own [`OpenTx`], so the wire sees what a run's connection sees.
async fn floor_run(
    runner: &Runner,
    host_id: &str,
    job: &Job,
    slot: DateTime<Utc>,
) -> anyhow::Result<()> {
    // Through the runner's own pools, as a run's connection comes and goes
    // (handed on from run to run while others wait).
    let conn = runner.run_pools().acquire(None).await?;
    let (mut tx, rows) =
        OpenTx::begin_fetch(conn, &runner.opening_sql(job, slot), Pooler::None).await?;
    let gate = SlotGate::from_row(rows.first().context("the gate returned no row")?)?;
    let history = gate.history.context("the gate found the slot not due")?;
    let id = history.run_id.context("the gate drew no run id")?;
    let row = RunRow {
        job: job.config.name.clone(),
        slot,
        host_id: host_id.to_owned(),
        plugin_sha256: job.plugin.sha256.clone(),
        started_at: Some(gate.db_now),
        backend_pid: Some(history.backend_pid),
    };
    let record = RunRecord {
        attempt: 1,
        outcome: Outcome::Ok,
        message: "",
    };
    let baseline = runner.session_baseline();
    let closing = hygiene::commit_ok_sql(
        &job.config,
        false,
        baseline,
        &[],
        &db::record_sql(id, None, &row, &record),
    );
    tx.finish(&closing, AfterCommit::Skip, baseline).await?;
    Ok(())
}
