//! The scheduler: one task per job that sleeps until the job's next slot and
//! hands it to the [`Runner`].
//!
//! Hosts only decide *when to look*. Whether a slot is due is judged by the
//! database clock inside the locked transaction; when this host's clock runs
//! ahead, the runner answers `NotDue` with the database's time and the task
//! corrects its estimate of the offset and sleeps again. Missed slots (the host
//! was busy or down) are skipped: after a run the next slot is the first one
//! after *now*, never a backlog.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info};

use crate::runner::{Job, RunResult, Runner};

/// Runs every job's loop until `shutdown` resolves, then lets in-flight runs
/// finish (each is bounded by its job's timeout) and returns.
pub async fn run(runner: Runner, jobs: Vec<Job>, shutdown: impl Future<Output = ()>) {
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    for job in jobs {
        tracker.spawn(job_loop(runner.clone(), job, token.clone()));
    }
    tracker.close();
    shutdown.await;
    info!("shutting down: no new runs; waiting for in-flight runs");
    token.cancel();
    tracker.wait().await;
    info!("all runs finished");
}

/// The loop of one job.
///
/// # Cancel safety
/// The token is only raced against sleeping, never against a run, so a
/// shutdown lets the current run finish and commit or roll back.
async fn job_loop(runner: Runner, job: Job, token: CancellationToken) {
    let name = job.config.name.clone();
    // Estimated (database clock - host clock); corrected by `NotDue` answers.
    let mut offset = TimeDelta::zero();
    let Some(mut slot) = job.config.schedule.next_after(Utc::now() + offset) else {
        error!(job = %name, "schedule has no future slot; job disabled");
        return;
    };
    info!(job = %name, next_slot = %slot.to_rfc3339(), "job scheduled");
    loop {
        let wait = to_std(slot - (Utc::now() + offset));
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let result = runner.run(&job, slot).await;
        match result {
            Ok(RunResult::NotDue { db_now }) => {
                // This host is ahead of the database: adopt the database's time.
                offset = db_now - Utc::now();
                debug!(job = %name, offset_ms = offset.num_milliseconds(), "host clock ahead of database; waiting for the slot");
                continue;
            }
            Ok(RunResult::AlreadyDone) => debug!(job = %name, "slot already done elsewhere"),
            Ok(_) => {}
            Err(e) => error!(job = %name, error = %format!("{e:#}"), "run failed on the host side"),
        }
        let now = Utc::now() + offset;
        match job.config.schedule.next_after(now.max(slot)) {
            Some(next) => slot = next,
            None => {
                info!(job = %name, "schedule has no further slot; job done");
                return;
            }
        }
    }
}

fn to_std(d: TimeDelta) -> Duration {
    d.to_std().unwrap_or(Duration::ZERO)
}
