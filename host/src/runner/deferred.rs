//! Deferred slots, confirmed in batches.
//!
//! A host that is not a job's preferred one ([`crate::hosts::LiveHosts`])
//! waits `fleet-defer` before it tries a slot, so that the preferred host
//! normally runs it first. Asked one slot at a time, "did it?" still cost each
//! of those hosts a transaction per slot: three hosts ran about twice the
//! transactions of one. Here every slot a host deferred within a few
//! milliseconds (one 20 ms window) shares one simple query; a slot found `ok`
//! is not opened at all. Anything else (no row, a run in flight, the query
//! failing) goes on to open the run, whose gate stays the one judge of
//! whether to run: the batch only ever skips a slot that succeeded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::db::{quote_literal, timestamp_literal};

/// How long the first question of a batch waits for others.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// The most slots one query asks about.
const MAX_BATCH: usize = 1000;

struct Ask {
    job: Arc<str>,
    slot: DateTime<Utc>,
    reply: oneshot::Sender<bool>,
}

/// Answers "has this slot already succeeded?" for deferred slots, in batches.
/// Cheap to clone; the batching task ends with the last clone.
#[derive(Clone)]
pub struct Confirmations {
    asks: mpsc::UnboundedSender<Ask>,
    queries: Arc<AtomicU64>,
}

impl Confirmations {
    /// Starts the batching task on `pool` (needs a tokio runtime).
    pub fn start(pool: PgPool) -> Self {
        let (asks, rx) = mpsc::unbounded_channel();
        let queries = Arc::new(AtomicU64::new(0));
        tokio::spawn(serve(pool, rx, queries.clone()));
        Self { asks, queries }
    }

    /// How many queries have answered so far (each answers a batch).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Whether `slot` of `job` has an `ok` run. `false` when it has not, or
    /// when that could not be learned: the caller then opens the run.
    pub async fn succeeded(&self, job: &str, slot: DateTime<Utc>) -> bool {
        let (reply, answer) = oneshot::channel();
        let ask = Ask {
            job: job.into(),
            slot,
            reply,
        };
        if self.asks.send(ask).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

async fn serve(pool: PgPool, mut asks: mpsc::UnboundedReceiver<Ask>, queries: Arc<AtomicU64>) {
    while let Some(first) = asks.recv().await {
        tokio::time::sleep(BATCH_WINDOW).await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match asks.try_recv() {
                Ok(ask) => batch.push(ask),
                Err(_) => break,
            }
        }
        queries.fetch_add(1, Ordering::Relaxed);
        let done = match succeeded(&pool, &batch).await {
            Ok(done) => done,
            Err(e) => {
                // Nothing is skipped: every slot goes on to its own gate.
                tracing::debug!(error = %e, slots = batch.len(), "deferred slots: batch check failed");
                vec![false; batch.len()]
            }
        };
        for (ask, done) in batch.into_iter().zip(done) {
            let _ = ask.reply.send(done);
        }
    }
}

/// One simple query (with literals: safe through a transaction pooler, and one
/// round trip) for the whole batch; `true` where the slot has an `ok` run.
async fn succeeded(pool: &PgPool, batch: &[Ask]) -> sqlx::Result<Vec<bool>> {
    use sqlx::Row as _;
    let jobs: Vec<String> = batch.iter().map(|a| quote_literal(&a.job)).collect();
    let slots: Vec<String> = batch.iter().map(|a| timestamp_literal(a.slot)).collect();
    let sql = format!(
        "select j.i from unnest(array[{}]::text[], array[{}]::timestamptz[]) with ordinality as j(job, slot, i)
          where exists (select 1 from jobhost.runs r
                         where r.job = j.job and r.slot = j.slot and r.outcome = 'ok')",
        jobs.join(","),
        slots.join(",")
    );
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?;
    let mut done = vec![false; batch.len()];
    for row in rows {
        let i: i64 = row.try_get(0)?;
        if let Some(d) = usize::try_from(i - 1).ok().and_then(|i| done.get_mut(i)) {
            *d = true;
        }
    }
    Ok(done)
}
