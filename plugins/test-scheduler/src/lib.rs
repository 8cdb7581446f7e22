//! `test-scheduler`: the reference long job (docs/DESIGN.md §4). Reads up to `batch-size` (≤ 20)
//! enabled capabilities, probes each over HTTP, and writes one
//! `demo.test_results` row per probe in its own short transaction, so one
//! failing probe (or one failing write) leaves the other results committed.
//!
//! Runs with `lock = "session"`: the host holds the job's lock on a connection
//! of its own for the whole poll cycle; no pooled connection is pinned.

use jobhost_plugin_sdk::{Context, JobError, LongJob, Session, export_long_job, http, log, params};
use serde::Deserialize;

#[derive(Deserialize)]
struct Capability {
    id: i64,
    name: String,
    url: String,
}

struct TestScheduler;

impl LongJob for TestScheduler {
    fn run(ctx: &Context, session: &Session<'_>) -> Result<String, JobError> {
        let batch: i64 = ctx.config_or::<i64>("batch-size", 20)?.clamp(1, 20);
        let capabilities: Vec<Capability> = session.transaction(|tx| {
            tx.query(
                "select id, name, url from demo.capabilities where enabled order by id limit $1",
                params![batch],
            )
        })?;
        let (mut passed, mut failed) = (0, 0);
        for cap in &capabilities {
            let started = std::time::Instant::now();
            let (ok, status, error) = match http::get(&cap.url) {
                Ok(r) if (200..300).contains(&r.status) => (true, Some(i32::from(r.status)), None),
                Ok(r) => (
                    false,
                    Some(i32::from(r.status)),
                    Some(format!("HTTP {}", r.status)),
                ),
                Err(e) => (false, None, Some(e.to_string())),
            };
            let latency_ms = started.elapsed().as_millis() as i64;
            let written = session.transaction(|tx| {
                tx.execute(
                    "insert into demo.test_results (capability_id, ok, status, latency_ms, error)
                     values ($1, $2, $3, $4, $5)",
                    params![cap.id, ok, status, latency_ms, error.clone()],
                )?;
                Ok(())
            });
            if let Err(e) = written {
                // This probe's row is lost; the others are not.
                log::warn(&format!("cannot record the probe of `{}`: {e}", cap.name));
            }
            if ok {
                passed += 1;
            } else {
                failed += 1;
            }
        }
        Ok(format!(
            "probed {} capabilities: {passed} ok, {failed} failed",
            capabilities.len()
        ))
    }
}

export_long_job!(TestScheduler);
