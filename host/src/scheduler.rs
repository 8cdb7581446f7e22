//! The scheduler: one task per job that sleeps until the job's next slot and
//! hands it to the [`Runner`].
//!
//! Hosts only decide *when to look*. Whether a slot is due is judged by the
//! database clock inside the locked transaction; when this host's clock runs
//! ahead, the runner answers `NotDue` with the database's time and the task
//! adopts that offset and sleeps again. Every decision about a slot's history
//! (done, attempts, backoff) is also made under the lock, so hosts never need
//! to agree with each other directly.
//!
//! - **Retries**: after a failed attempt the task comes back after the job's
//!   backoff, unless the next regular slot is due first (then the failed slot
//!   is left with the attempts it had).
//! - **Missed slots**: skipped by default: after any run the next slot is the
//!   first one after *now*. With `catch-up = "<window>"` the task first runs,
//!   oldest first, every slot of the window that has no successful run, from
//!   the job's first recorded slot on (a new job does not "catch up" on slots
//!   from before it existed).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::runner::{Job, RunResult, Runner};

/// Scheduler settings.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerOptions {
    /// Added to this host's clock (tests use it to fake clock skew between hosts).
    pub clock_offset: TimeDelta,
    /// After shutdown, how long in-flight runs may finish before they are
    /// interrupted and rolled back.
    pub shutdown_grace: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            clock_offset: TimeDelta::zero(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Runs every job's loop until `shutdown` resolves. Then no new run starts;
/// in-flight runs get `shutdown_grace` to finish, after which they are
/// interrupted (rolled back, recorded `interrupted`). Returns when all are done.
pub async fn run(
    runner: Runner,
    jobs: Vec<Job>,
    options: SchedulerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let (_keep, updates) = mpsc::channel(1);
    run_with_updates(runner, jobs, options, updates, shutdown).await;
}

/// Like [`run`], and applies each job set received on `updates` (hot reload):
/// an added job starts at its next slot, a removed one stops after any run in
/// flight, a changed one applies from its next run. A run in flight always
/// finishes on the plugin version and config it started with.
pub async fn run_with_updates(
    runner: Runner,
    jobs: Vec<Job>,
    options: SchedulerOptions,
    mut updates: mpsc::Receiver<Vec<Job>>,
    shutdown: impl Future<Output = ()>,
) {
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut loops: Loops = HashMap::new();
    let apply = |jobs: Vec<Job>, loops: &mut Loops| {
        let names: HashSet<String> = jobs.iter().map(|j| j.config.name.clone()).collect();
        loops.retain(|name, (_, stop)| {
            let keep = names.contains(name);
            if !keep {
                info!(job = %name, "job removed; it stops after any run in flight");
                stop.cancel();
            }
            keep
        });
        for job in jobs {
            match loops.get(&job.config.name) {
                Some((current, _)) => {
                    current.send_if_modified(|old| {
                        let changed = !same_job(old, &job);
                        if changed {
                            info!(job = %job.config.name, plugin_sha256 = %job.plugin.sha256, "job updated; applies from its next run");
                            *old = Arc::new(job.clone());
                        }
                        changed
                    });
                }
                None => {
                    let name = job.config.name.clone();
                    let (tx, rx) = watch::channel(Arc::new(job));
                    let stop = token.child_token();
                    tracker.spawn(job_loop(runner.clone(), rx, options, stop.clone()));
                    loops.insert(name, (tx, stop));
                }
            }
        }
    };
    apply(jobs, &mut loops);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(jobs) = updates.recv() => apply(jobs, &mut loops),
        }
    }
    tracker.close();
    info!(grace = %humantime::format_duration(options.shutdown_grace), "shutting down: no new runs; waiting for in-flight runs");
    token.cancel();
    if tokio::time::timeout(options.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!("grace period over: interrupting in-flight runs");
        runner.abort_in_flight();
        tracker.wait().await;
    }
    info!("all runs finished");
}

/// The running job loops: the current version of each job, and its stop.
type Loops = HashMap<String, (watch::Sender<Arc<Job>>, CancellationToken)>;

/// Whether a reload changed nothing a run depends on.
fn same_job(a: &Job, b: &Job) -> bool {
    a.plugin.sha256 == b.plugin.sha256 && a.config == b.config
}

/// The loop of one job; `job` carries its current version (hot reload).
///
/// # Cancel safety
/// The token is only raced against sleeping, never against a run, so a
/// shutdown or a removal lets the current run finish and commit or roll back.
async fn job_loop(
    runner: Runner,
    mut job: watch::Receiver<Arc<Job>>,
    options: SchedulerOptions,
    token: CancellationToken,
) {
    let current = job.borrow_and_update().clone();
    let name = current.config.name.clone();
    // Estimated database time; `learned` corrects it from `NotDue` answers.
    let mut learned = TimeDelta::zero();
    let now = |learned: TimeDelta| Utc::now() + options.clock_offset + learned;

    if let Some(window) = current.config.catch_up {
        // Boxed, as a run is: it runs once, and inline its history queries
        // would size every job's task for the whole of its life.
        Box::pin(catch_up(&runner, &current, window, now(learned), &token)).await;
    }

    let Some(mut target) = current.config.schedule.next_after(now(learned)) else {
        error!(job = %name, "schedule has no future slot; job disabled");
        return;
    };
    let mut wake = target;
    info!(job = %name, next_slot = %target.to_rfc3339(), "job scheduled");
    loop {
        let wait = (wake - now(learned)).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = token.cancelled() => return,
            changed = job.changed() => {
                if changed.is_err() {
                    return;
                }
                // A new version: its schedule decides the next slot.
                let schedule = job.borrow().config.schedule.clone();
                match schedule.next_after(now(learned)) {
                    Some(next) if next != target => {
                        target = next;
                        wake = next;
                    }
                    Some(_) => {}
                    None => return,
                }
                continue;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        // The version current at the start of the run is the one it uses.
        let current = job.borrow_and_update().clone();
        let result = runner.run(&current, target).await;
        let retry_at = match result {
            Ok(RunResult::NotDue { db_now }) => {
                // This host is ahead of the database: adopt the database's time.
                learned = db_now - (Utc::now() + options.clock_offset);
                debug!(job = %name, offset_ms = learned.num_milliseconds(), "host clock ahead of the database; waiting for the slot");
                wake = target;
                continue;
            }
            Ok(RunResult::Finished {
                retry_in: Some(delay),
                ..
            }) => Some(now(learned) + delay),
            Ok(RunResult::BackingOff { until }) => Some(until),
            Ok(RunResult::AlreadyDone) => {
                debug!(job = %name, "slot already done elsewhere");
                None
            }
            Ok(_) => None,
            Err(e) => {
                error!(job = %name, error = %format!("{e:#}"), "run failed on the host side");
                None
            }
        };
        let next_regular = job
            .borrow()
            .config
            .schedule
            .next_after(now(learned).max(target));
        match (retry_at, next_regular) {
            (Some(retry), Some(next)) if retry < next => wake = retry,
            (Some(retry), None) => wake = retry,
            (_, Some(next)) => {
                target = next;
                wake = next;
            }
            (None, None) => {
                info!(job = %name, "schedule has no further slot; job done");
                return;
            }
        }
    }
}

/// Runs, oldest first, the slots of the last `window` without a success.
async fn catch_up(
    runner: &Runner,
    job: &Job,
    window: Duration,
    now: DateTime<Utc>,
    token: &CancellationToken,
) {
    let name = &job.config.name;
    let window_start = now - TimeDelta::from_std(window).unwrap_or(TimeDelta::MAX);
    let since = match runner.first_slot(job).await {
        Ok(Some(first)) => first.max(window_start),
        Ok(None) => return,
        Err(e) => {
            error!(job = %name, error = %e, "cannot read history for catch-up; skipping it");
            return;
        }
    };
    let done: HashSet<DateTime<Utc>> = match runner.succeeded_slots(job, since).await {
        Ok(slots) => slots.into_iter().collect(),
        Err(e) => {
            error!(job = %name, error = %e, "cannot read history for catch-up; skipping it");
            return;
        }
    };
    let mut slot = job
        .config
        .schedule
        .next_after(since - TimeDelta::nanoseconds(1));
    let mut ran = 0usize;
    while let Some(s) = slot.filter(|s| *s <= now) {
        if token.is_cancelled() {
            return;
        }
        if !done.contains(&s) {
            match runner.run(job, s).await {
                Ok(r) => debug!(job = %name, slot = %s.to_rfc3339(), result = ?r, "catch-up"),
                Err(e) => {
                    error!(job = %name, error = %format!("{e:#}"), "catch-up run failed on the host side")
                }
            }
            ran += 1;
        }
        slot = job.config.schedule.next_after(s);
    }
    if ran > 0 {
        info!(job = %name, slots = ran, "caught up missed slots");
    }
}
