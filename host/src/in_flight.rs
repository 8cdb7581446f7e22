//! Runs in flight: this host's set, and its publication into
//! `jobhost.in_flight`, where `status`, the dashboard and the rest of the
//! fleet see them.
//!
//! A run's row in `jobhost.runs` is written once, by the run's own closing
//! query. (It used to insert and commit a `running` row before its
//! transaction and overwrite it at the end: per run, a round trip, a
//! transaction, and every index of `runs` written twice — a third of the
//! database's work for a short run.) What is in flight is published instead,
//! in batches, by one task of the host ([`publish`]):
//!
//! - a run enters the set once its gate says it runs ([`InFlight::enter`]),
//!   with the id its gate drew, which its row will carry;
//! - every [`Publication::every`], one simple query inserts the runs that
//!   have been in flight for [`Publication::after`], deletes the published
//!   ones that ended, and records `lost` each run whose task ended without
//!   recording an outcome (a panic, a dropped future, a database away when it
//!   ended) unless a row of that id exists; a pass with nothing to say sends
//!   nothing;
//! - the next holder of a job's lock records the published runs of a dead
//!   host `lost` (`jobhost.slot_gate`), unless they have a row.
//!
//! So a run shows as in flight once it has run for `after` (a quarter of a
//! second by default), and for at most `every` after it ended. A run that
//! dies with its host before it was published leaves no row: Postgres rolled
//! its transaction back, so nothing of it happened, and it does not count as
//! an attempt.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db::{self, RunRow};

/// When runs are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    /// How often the publisher looks at the set.
    pub every: Duration,
    /// A run is published once it has been in flight this long (shorter runs
    /// never are: they would cost the database more to show than to run).
    pub after: Duration,
}

impl Default for Publication {
    fn default() -> Self {
        Self {
            every: Duration::from_millis(250),
            after: Duration::from_millis(250),
        }
    }
}

/// This host's runs in flight (shared by the runner's clones, the
/// publisher, the heartbeat and `/metrics`).
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    runs: HashMap<i64, Entry>,
    /// Ids this host has in `jobhost.in_flight`.
    published: HashSet<i64>,
    /// Runs whose task ended without recording an outcome.
    abandoned: Vec<(i64, Entry)>,
}

#[derive(Debug, Clone)]
struct Entry {
    row: RunRow,
    attempt: i32,
    since: Instant,
}

impl InFlight {
    /// Registers run `id` until the returned guard is dropped. Call
    /// [`InFlightGuard::recorded`] once the run's row is written; a guard
    /// dropped without it (the run's task died, or its future was dropped)
    /// has the run recorded `lost` by the next publication.
    pub fn enter(&self, id: i64, row: &RunRow, attempt: i32) -> InFlightGuard {
        let entry = Entry {
            row: row.clone(),
            attempt,
            since: Instant::now(),
        };
        self.lock().runs.insert(id, entry);
        InFlightGuard {
            set: self.clone(),
            id,
            recorded: false,
        }
    }

    /// How many runs are in flight now.
    pub fn len(&self) -> usize {
        self.lock().runs.len()
    }

    /// No run is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Single inserts and removes: a poisoned set is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the next publication says, or `None` when it has nothing to
    /// say. Taken out of the set: [`Self::settle`] puts back what failed.
    fn pending(&self, after: Duration) -> Option<Pending> {
        let mut state = self.lock();
        let publish: Vec<(i64, Entry)> = state
            .runs
            .iter()
            .filter(|(id, e)| e.since.elapsed() >= after && !state.published.contains(id))
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        let ended: Vec<i64> = state
            .published
            .iter()
            .filter(|id| !state.runs.contains_key(id))
            .copied()
            .collect();
        let abandoned = std::mem::take(&mut state.abandoned);
        if publish.is_empty() && ended.is_empty() && abandoned.is_empty() {
            return None;
        }
        Some(Pending {
            publish,
            ended,
            abandoned,
        })
    }

    /// Records what a publication did (`ok`), or puts its abandoned runs
    /// back for the next one.
    fn settle(&self, pending: Pending, ok: bool) {
        let mut state = self.lock();
        if ok {
            for id in &pending.ended {
                state.published.remove(id);
            }
            for (id, _) in &pending.abandoned {
                state.published.remove(id);
            }
            for (id, _) in &pending.publish {
                // A run that ended while it was being published is deleted
                // by the next publication.
                state.published.insert(*id);
            }
        } else {
            state.abandoned.extend(pending.abandoned);
        }
    }
}

/// Keeps a run registered as in flight while it lives.
#[derive(Debug)]
pub struct InFlightGuard {
    set: InFlight,
    id: i64,
    recorded: bool,
}

impl InFlightGuard {
    /// The run's row is written (or was attempted where the run ended, and
    /// its failure logged): the run leaves the set as ended, not abandoned.
    pub fn recorded(mut self) {
        self.recorded = true;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut state = self.set.lock();
        if let Some(entry) = state.runs.remove(&self.id)
            && !self.recorded
        {
            state.abandoned.push((self.id, entry));
        }
    }
}

/// One publication's content.
#[derive(Debug)]
struct Pending {
    publish: Vec<(i64, Entry)>,
    ended: Vec<i64>,
    abandoned: Vec<(i64, Entry)>,
}

impl Pending {
    /// One simple query (one round trip, through any pooler): delete what
    /// ended or was abandoned, record the abandoned runs `lost` unless a row
    /// of theirs exists, insert what is newly in flight.
    fn sql(&self, host_id: &str) -> String {
        let mut sql = String::new();
        let gone: Vec<String> = self
            .ended
            .iter()
            .copied()
            .chain(self.abandoned.iter().map(|(id, _)| *id))
            .map(|id| id.to_string())
            .collect();
        if !gone.is_empty() {
            sql.push_str(&format!(
                "delete from jobhost.in_flight where host_id = {} and run_id in ({});\n",
                db::quote_literal(host_id),
                gone.join(", ")
            ));
        }
        if !self.abandoned.is_empty() {
            let values = values(&self.abandoned);
            sql.push_str(&format!(
                "insert into jobhost.runs (id, job, slot, attempt, host_id, plugin_sha256, started_at,
                                           finished_at, outcome, message, backend_pid)
                 select v.run_id, v.job, v.slot, v.attempt, v.host_id, v.plugin_sha256, v.started_at,
                        clock_timestamp(), 'lost',
                        'the host''s task running it ended without recording an outcome; its transaction was rolled back',
                        v.backend_pid
                   from (values {values}) as v(run_id, host_id, job, slot, attempt, plugin_sha256, started_at, backend_pid)
                  where not exists (select 1 from jobhost.runs r where r.id = v.run_id);\n"
            ));
        }
        if !self.publish.is_empty() {
            sql.push_str(&format!(
                "insert into jobhost.in_flight (run_id, host_id, job, slot, attempt, plugin_sha256, started_at, backend_pid)
                 values {} on conflict (run_id) do nothing;\n",
                values(&self.publish)
            ));
        }
        sql
    }
}

/// `(run_id, host_id, job, slot, attempt, plugin_sha256, started_at,
/// backend_pid), …` as literals.
fn values(entries: &[(i64, Entry)]) -> String {
    entries
        .iter()
        .map(|(id, e)| {
            format!(
                "({id}::int8, {}, {}, {}, {}::int4, {}, {}, {}::int4)",
                db::quote_literal(&e.row.host_id),
                db::quote_literal(&e.row.job),
                db::timestamp_literal(e.row.slot),
                e.attempt,
                db::quote_literal(&e.row.plugin_sha256),
                e.row
                    .started_at
                    .map_or_else(|| "clock_timestamp()".to_owned(), db::timestamp_literal),
                e.row
                    .backend_pid
                    .map_or_else(|| "null".to_owned(), |p| p.to_string()),
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One publication (see the module docs); `Ok(false)` when there was nothing
/// to say. On failure the runs to record `lost` are kept for the next one.
pub async fn publish_once(
    pool: &PgPool,
    host_id: &str,
    in_flight: &InFlight,
    after: Duration,
) -> sqlx::Result<bool> {
    let Some(pending) = in_flight.pending(after) else {
        return Ok(false);
    };
    let result = async {
        let mut conn = pool.acquire().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(pending.sql(host_id)))
            .execute(&mut *conn)
            .await
    }
    .await;
    let lost = pending.abandoned.len();
    in_flight.settle(pending, result.is_ok());
    result?;
    if lost > 0 {
        tracing::warn!(host_id = %host_id, runs = lost, "runs whose task ended without recording an outcome: recorded lost where they have no row");
    }
    Ok(true)
}

/// Publishes this host's runs in flight every `publication.every` until
/// `stop` is cancelled, then once more (so a graceful shutdown leaves
/// nothing published). A failed publication is logged once and retried.
pub async fn publish(
    pool: PgPool,
    host_id: String,
    in_flight: InFlight,
    publication: Publication,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(publication.every) => false,
        };
        // On the way out every run has ended: nothing new is published.
        let after = if stopping {
            Duration::MAX
        } else {
            publication.after
        };
        match publish_once(&pool, &host_id, &in_flight, after).await {
            Ok(_) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(host_id = %host_id, error = %e, "cannot publish the runs in flight; retrying");
                }
                failing = true;
            }
        }
        if stopping {
            return;
        }
    }
}
