//! jobhost runs background jobs shipped as WebAssembly components, each inside
//! a transaction and an advisory lock that the host owns.
//!
//! A plugin never sees a connection, a pool or a lock: the host takes the job's
//! lock as the first statement of a transaction and lends the plugin a handle
//! to that transaction for one call. See `docs/DESIGN.md` for the invariants
//! and the tests that prove each.
//!
//! # Layout
//!
//! - [`config`]: `jobs.toml`, parsed (`*Toml`) and validated (`*Config`).
//! - [`schedule`]: which instants are a job's slots (`every`, `cron`).
//! - [`lock`]: advisory lock keys in the two-int keyspace.
//! - [`db`]: the pool (directly or through a transaction pooler, with the
//!   direct connection for what needs a real session), the host's migrations
//!   and run history.
//! - [`pools`]: the run connections: the host's pool for jobs without a
//!   role, one pool per job role that logs in as it, within one budget;
//!   the options every pool is made from (no round trip to check a
//!   connection that went from run to run), and a clean connection handed
//!   straight to the next run waiting for it, a bounded number of times.
//! - [`guard`]: the SQL scope guard (pg_query) every plugin statement passes.
//! - [`tx`]: the transaction a run opens by hand: deadline in its `BEGIN`,
//!   opened again on another connection if its own was closed by the
//!   server, verified end, never reused after an interruption.
//! - [`hygiene`]: the proof after every run that the connection carries
//!   nothing into its next use (locks, settings, temporary objects), and
//!   the clean settings states it learns so as to skip the dear read.
//! - [`hosts`]: host liveness (the `jobhost.hosts` heartbeat) that decides
//!   whose runs in flight are lost and which lock holders are alive.
//! - [`in_flight`]: this host's runs in flight, published in batches into
//!   `jobhost.in_flight` (a run's own row is written once, when it ends).
//! - [`runtime`]: a narrow layer over wasmtime: the engine (`mod.rs`),
//!   loading a plugin (`plugin.rs`: a component, or a core module built
//!   without WASI that it wraps into a lean one), the compile cache whose
//!   artifacts are mapped from their files (`cache.rs`), one run's store (`store.rs`), one call
//!   (`invoke.rs`), what a trap means for the history (`trap.rs`), the
//!   values between WIT and Postgres (`values.rs`), and the capabilities a plugin is granted (`sql`, `log`,
//!   an empty WASI, `http`). It does not know about locks or history.
//! - [`runner`]: one slot of one job, from one opening query (BEGIN, the
//!   deadline, the lock, history and run id in `jobhost.slot_gate`) through
//!   the plugin call to the closing query that writes the run's row and
//!   commits — the path every invariant
//!   hangs on (`open` → invoke →
//!   `close`; the benchmark's native twin, feature `bench`, composes the same
//!   steps in `runner/native.rs`).
//! - [`scheduler`]: per-job loops that hand due slots to the runner, and swap
//!   in new job versions between runs.
//! - [`jobset`]: the one validation of a job set (config + loaded plugins)
//!   for start, reload and `check`.
//! - [`reload`]: hot reload of `jobs.toml` and plugins (files, SIGHUP,
//!   `jobhost reload` requests seen at the heartbeat or by LISTEN), once per
//!   content change.
//! - [`published`]: plugins shipped through Postgres (`publish`,
//!   `rollback`, `plugins`, `plugin = "published:NAME"`), resolved to local
//!   files at start and at each reload.
//! - [`roles`]: the job roles, read and admitted at start and reload: a role
//!   that cannot log in is refused, an all-powerful one warned about, and
//!   each is claimed for its jobs in `jobhost.job_roles` by the hosts that
//!   run them (claims follow reloads, renewed at each heartbeat, deleted at
//!   a stop or when their host is not live).
//! - [`inspect`]: `status` and `locks` for operators (what they look at).
//! - [`metrics`]: the host's Prometheus metrics.
//! - [`logging`]: the process's log, written off the runs' threads (a
//!   stalled stdout drops and counts lines instead of stopping the host),
//!   filtered by `RUST_LOG` without work on each poll of a run.
//! - [`serve`]: `[host] listen`: `/metrics`, `/healthz`, the read-only
//!   dashboard.
//! - [`operate`]: `run-now`, `history`, `pause`/`resume` (what they do).
//! - [`scaffold`]: `jobhost new NAME --lang rust|python|js`, a plugin
//!   skeleton and its `jobs.toml` entry (templates in `host/templates/new`).
//! - [`cli`]: the command line (the binary is a one-line `main`).
//! - [`demo`]: demo tables and rows for the reference jobs (never created by a
//!   production start).
//!
//! A run, tick to commit: [`scheduler`] → [`runner::Runner::run`] →
//! [`runtime::Runtime::invoke`] → [`runtime::sql`] for each statement →
//! back in the runner, [`hygiene`] and [`tx::OpenTx::finish`].
//!
//! Dependencies point one way: `config` is plain data (it imports no
//! runtime); `runtime` knows nothing of locks or history; `runner` ties them.

#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod guard;
pub mod hosts;
pub mod hygiene;
pub mod in_flight;
pub mod inspect;
pub mod jobset;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod operate;
pub mod pools;
pub mod published;
pub mod reload;
pub mod roles;
pub mod runner;
pub mod runtime;
pub mod scaffold;
pub mod schedule;
pub mod scheduler;
pub mod serve;
pub mod tx;

use std::sync::Arc;

use anyhow::Context as _;

use crate::config::JobsConfig;
use crate::runner::{Job, Runner};
use crate::runtime::Runtime;

/// Process-level options (from the CLI and environment).
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Postgres URL (`DATABASE_URL`): the pool every run's transaction
    /// comes from; Postgres itself or a pooler (`[host] pooler`).
    pub database_url: String,
    /// Postgres itself (`JOBHOST_DIRECT_URL`), for what needs a real
    /// session behind a transaction pooler: migrations, `session` locks,
    /// LISTEN. Unused without a pooler.
    pub direct_url: Option<String>,
    /// This host's id in the run history and `application_name`.
    pub host_id: String,
    /// Create and seed the demo tables before starting.
    pub demo: bool,
    /// Added to this host's clock (tests fake clock skew with it).
    pub clock_offset: chrono::TimeDelta,
}

impl HostOptions {
    /// Where this host's connections go, with `config`'s `[host] pooler`.
    pub fn endpoints<'a>(&'a self, config: &JobsConfig) -> db::Endpoints<'a> {
        db::Endpoints {
            database_url: &self.database_url,
            direct_url: self.direct_url.as_deref(),
            pooler: config.host.pooler,
        }
    }
}

/// Loads every job's plugin, failing on the first one that cannot be used
/// (see [`jobset::load`], the one validation for start, reload and check).
pub async fn load_jobs(runtime: &Arc<Runtime>, config: &JobsConfig) -> anyhow::Result<Vec<Job>> {
    jobset::load(runtime, config, &[], None).await
}

/// Runs the host until `shutdown` resolves: connects, migrates, loads the
/// plugins (any failure stops the start with the file named), schedules, and
/// hot-reloads changes of `jobs.toml` and the plugins.
pub async fn run(
    config: JobsConfig,
    options: HostOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let runtime = Arc::new(jobset::runtime(&config)?);
    let mut config = config.with_direct_url(options.direct_url.is_some());
    let db::Connected {
        pool,
        direct,
        session_baseline,
        runs,
    } = db::connect(
        options.endpoints(&config),
        config.host.pool_size,
        &options.host_id,
    )
    .await?;
    // Published plugins come from the database: resolved once connected.
    // Reload requests from here on are heard (one racing this load then
    // reloads it, rather than being missed).
    let reload_seen = hosts::latest_reload_request(&pool)
        .await
        .context("cannot read jobhost.reload_requests")?;
    let started = std::time::Instant::now();
    let published_dir = config.host.published_dir();
    published::resolve(&pool, &mut config, &published_dir).await?;
    if options.demo {
        // Before the roles are read: it creates the reference jobs' roles.
        demo::setup(&pool)
            .await
            .context("cannot set up the demo tables")?;
    }
    // Before the plugins load: a refused role need not wait for a compile.
    let admitted = roles::Admitted::new(&options.host_id);
    admitted.admit(&runs, &config.jobs).await?;
    let jobs = load_jobs(&runtime, &config).await?;
    tracing::info!(
        plugins = jobs.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        cache_hits = runtime.cache_hits(),
        "plugins loaded"
    );
    let _demo_http = if options.demo {
        match demo::serve_probe_targets(demo::DEMO_HTTP_ADDR).await {
            Ok(server) => Some(AbortOnDrop(server)),
            Err(e) => {
                tracing::warn!(addr = demo::DEMO_HTTP_ADDR, error = %e, "demo HTTP server not started; test-scheduler probes will fail");
                None
            }
        }
    } else {
        None
    };
    tracing::info!(
        host_id = %options.host_id,
        jobs = jobs.len(),
        config = %config.path.display(),
        "jobhost started"
    );
    if let Err(e) = published::report(&pool, &options.host_id, &config, &jobs, None).await {
        tracing::warn!(error = %e, "cannot record the published plugin versions this host runs");
    }
    hosts::go_live(
        &pool,
        &options.host_id,
        direct.is_some(),
        reload_seen,
        &admitted,
        config.host.liveness.lost_after,
    )
    .await?;
    let metrics = Arc::new(metrics::Metrics::new());
    let live = hosts::LiveHosts::new(config.host.fleet_defer);
    let runner = Runner::new(pool.clone(), runtime.clone(), &options.host_id)
        .with_connections(direct.clone(), config.host.pooler)
        .with_run_pools(runs.clone())
        .with_live_hosts(live.clone())
        .with_liveness(config.host.liveness)
        .with_session_baseline(session_baseline)
        .with_metrics(metrics.clone());
    let stop_heartbeat = tokio_util::sync::CancellationToken::new();
    let (reload_requests, polled_reloads) = tokio::sync::mpsc::channel(1);
    let heartbeat = tokio::spawn(hosts::heartbeat(
        hosts::Heartbeat {
            pool: pool.clone(),
            host_id: options.host_id.clone(),
            liveness: config.host.liveness,
            reload_seen,
            reloads: reload_requests,
            live,
            admitted: admitted.clone(),
        },
        stop_heartbeat.clone(),
    ));
    let stop_publishing = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn(in_flight::publish(
        pool.clone(),
        options.host_id.clone(),
        runner.in_flight(),
        in_flight::Publication::default(),
        stop_publishing.clone(),
    ));
    let scheduler_options = scheduler::SchedulerOptions {
        clock_offset: options.clock_offset,
        shutdown_grace: config.host.shutdown_grace,
    };
    let (updates_tx, updates) = tokio::sync::mpsc::channel(4);
    // The jobs as loaded now, for the stuck-lock watch and the dashboard:
    // applied reloads pass through on their way to the scheduler.
    let current = jobset::Current::new(config.clone(), jobs.clone());
    let (reloaded_tx, mut reloaded) = tokio::sync::mpsc::channel::<Vec<Job>>(4);
    let tap = {
        let current = current.clone();
        tokio::spawn(async move {
            while let Some(jobs) = reloaded.recv().await {
                current.set(jobs.clone());
                if updates_tx.send(jobs).await.is_err() {
                    break;
                }
            }
        })
    };
    let stop_stuck_watch = tokio_util::sync::CancellationToken::new();
    let stuck_watch = tokio::spawn(inspect::watch_stuck(
        pool.clone(),
        current.clone(),
        config.host.liveness.heartbeat,
        metrics.clone(),
        stop_stuck_watch.clone(),
    ));
    let _served = match config.host.listen {
        Some(addr) => {
            let served = serve::Served {
                pool: pool.clone(),
                runs: runs.clone(),
                current,
                metrics: metrics.clone(),
                in_flight: runner.in_flight(),
                host_id: options.host_id.clone(),
            };
            Some(AbortOnDrop(serve::serve(addr, served).await?.1))
        }
        None => None,
    };
    let stop_watching = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(reload::watch(
        reload::Reloader::new(&config, runtime, jobs.clone())
            .with_metrics(metrics)
            .with_published(pool.clone(), &options.host_id)
            .with_roles(runs.clone(), admitted.clone()),
        config.host.watch,
        config.host.reload_debounce,
        reload::Requests {
            listen: direct,
            polled: polled_reloads,
        },
        reloaded_tx,
        stop_watching.clone(),
    ));
    scheduler::run_with_updates(runner, jobs, scheduler_options, updates, shutdown).await;
    stop_watching.cancel();
    let _ = watcher.await;
    tap.abort();
    // Every run has ended: the last publication unpublishes them all.
    stop_publishing.cancel();
    let _ = publisher.await;
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    stop_stuck_watch.cancel();
    let _ = stuck_watch.await;
    if let Err(e) = admitted.release(&pool).await {
        tracing::warn!(host_id = %options.host_id, error = %e, "cannot delete this host's job-role claims; other hosts delete them after host-lost-after");
    }
    if let Err(e) = hosts::stop(&pool, &options.host_id).await {
        tracing::warn!(host_id = %options.host_id, error = %e, "cannot mark this host stopped; others will see it silent after host-lost-after");
    }
    runs.close_roles().await;
    pool.close().await;
    Ok(())
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
