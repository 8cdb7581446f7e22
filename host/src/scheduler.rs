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

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::db::Outcome;
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
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    for job in jobs {
        tracker.spawn(job_loop(runner.clone(), job, options, token.clone()));
    }
    tracker.close();
    shutdown.await;
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

/// The loop of one job.
///
/// # Cancel safety
/// The token is only raced against sleeping, never against a run, so a
/// shutdown lets the current run finish and commit or roll back.
async fn job_loop(runner: Runner, job: Job, options: SchedulerOptions, token: CancellationToken) {
    let name = job.config.name.clone();
    let schedule = &job.config.schedule;
    // Estimated database time; `learned` corrects it from `NotDue` answers.
    let mut learned = TimeDelta::zero();
    let now = |learned: TimeDelta| Utc::now() + options.clock_offset + learned;

    if let Some(window) = job.config.catch_up {
        catch_up(&runner, &job, window, now(learned), &token).await;
    }

    let Some(mut target) = schedule.next_after(now(learned)) else {
        error!(job = %name, "schedule has no future slot; job disabled");
        return;
    };
    let mut wake = target;
    info!(job = %name, next_slot = %target.to_rfc3339(), "job scheduled");
    loop {
        if !sleep_until(wake, now(learned), &token).await {
            return;
        }
        let result = runner.run(&job, target).await;
        let retry_at = match result {
            Ok(RunResult::NotDue { db_now }) => {
                // This host is ahead of the database: adopt the database's time.
                learned = db_now - (Utc::now() + options.clock_offset);
                debug!(job = %name, offset_ms = learned.num_milliseconds(), "host clock ahead of the database; waiting for the slot");
                wake = target;
                continue;
            }
            Ok(RunResult::Finished {
                outcome, attempt, ..
            }) if outcome != Outcome::Ok
                && u32::try_from(attempt).unwrap_or(u32::MAX) < job.config.retry.max_attempts =>
            {
                let delay = job
                    .config
                    .retry
                    .delay_after(u32::try_from(attempt).unwrap_or(1));
                Some(now(learned) + delay)
            }
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
        let next_regular = schedule.next_after(now(learned).max(target));
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

/// Sleeps until `wake` (estimated database time); false if cancelled first.
async fn sleep_until(wake: DateTime<Utc>, now: DateTime<Utc>, token: &CancellationToken) -> bool {
    let wait = (wake - now).to_std().unwrap_or(Duration::ZERO);
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}
