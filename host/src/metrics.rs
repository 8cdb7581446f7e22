//! Prometheus metrics of a host, with `prometheus-client` (the Prometheus
//! project's own Rust client: typed label sets, OpenMetrics text, no global
//! registry, so every host and test owns its own).
//!
//! Names follow Prometheus conventions: counters end in `_total`, durations
//! are in seconds (`_seconds`), labels are low-cardinality (`job` is bounded
//! by `jobs.toml`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `jobhost_runs_total` | counter | `job`, `outcome` |
//! | `jobhost_run_duration_seconds` | histogram | `job` |
//! | `jobhost_start_lag_seconds` (slot → lock granted) | histogram | `job` |
//! | `jobhost_skips_total` | counter | `job`, `reason` (`lock_busy`, `already_done`, `not_due`, `backing_off`, `exhausted`, `paused`) |
//! | `jobhost_session_leaks_total` (a plugin left state on its connection: `session_state_leaked`) | counter | `job`, `found` (`before_commit`, `after_commit`) |
//! | `jobhost_session_check_settings_total` (checks before COMMIT that passed, by how they verified the settings: a state seen clean, or the `pg_settings` read) | counter | `settings` (`fingerprint`, `read`) |
//! | `jobhost_runs_in_flight` | gauge | |
//! | `jobhost_plugin_loads_total` | counter | `result` (`ok`, `error`) |
//! | `jobhost_reloads_total` | counter | `result` (`applied`, `rejected`) |
//! | `jobhost_stuck_locks` | gauge (counted by the stuck-lock watch each heartbeat) | |
//! | `jobhost_pool_connections` | gauge (read at scrape) | `state` (`in_use`, `idle`) |
//! | `jobhost_runs_waiting_for_connection` (runs due now that wait because `pool-size` connections are all lent to runs) | gauge (read at scrape) | |
//! | `jobhost_log_lines_dropped_total` (log lines dropped because stdout was not read fast enough: [`crate::logging`]) | counter (read at scrape) | |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::runner::RunResult;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobOutcome {
    job: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobReason {
    job: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobFound {
    job: String,
    found: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SettingsLabel {
    settings: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

type Histograms = Family<JobLabel, Histogram, fn() -> Histogram>;

/// One host's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    runs: Family<JobOutcome, Counter>,
    run_duration: Histograms,
    start_lag: Histograms,
    skips: Family<JobReason, Counter>,
    leaks: Family<JobFound, Counter>,
    settings_checks: Family<SettingsLabel, Counter>,
    in_flight: Gauge,
    plugin_loads: Family<ResultLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    stuck_locks: Gauge,
    pool_connections: Family<StateLabel, Gauge>,
    waiting_for_connection: Gauge,
    log_lines_dropped: Counter,
    /// The dropped lines already counted into `log_lines_dropped`.
    log_lines_counted: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What `/metrics` reads at scrape time ([`Metrics::set_scraped`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Scraped {
    /// Runs in flight on this host.
    pub in_flight: usize,
    /// The host pool's connections lent out.
    pub in_use: usize,
    /// The host pool's idle connections.
    pub idle: usize,
    /// Runs waiting for a connection ([`crate::pools::RunPools::waiting`]).
    pub waiting_for_connection: usize,
}

/// Run durations: 1 ms to ~33 s in doublings.
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Start lags: 0.1 ms to ~6.5 s in doublings.
fn lag_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Metrics {
    /// Empty metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("jobhost");
        let runs = Family::<JobOutcome, Counter>::default();
        registry.register("runs", "Finished runs by job and outcome", runs.clone());
        let run_duration: Histograms = Family::new_with_constructor(duration_buckets);
        registry.register_with_unit(
            "run_duration",
            "Duration of finished runs, lock to commit",
            Unit::Seconds,
            run_duration.clone(),
        );
        let start_lag: Histograms = Family::new_with_constructor(lag_buckets);
        registry.register_with_unit(
            "start_lag",
            "From a slot's instant to its job's lock granted (database clock)",
            Unit::Seconds,
            start_lag.clone(),
        );
        let skips = Family::<JobReason, Counter>::default();
        registry.register("skips", "Slots not run, by job and reason", skips.clone());
        let leaks = Family::<JobFound, Counter>::default();
        registry.register(
            "session_leaks",
            "Runs whose plugin left state on its connection, by job and when the check found it",
            leaks.clone(),
        );
        let settings_checks = Family::<SettingsLabel, Counter>::default();
        registry.register(
            "session_check_settings",
            "Session checks before COMMIT that passed, by how they verified the settings: `fingerprint` (a state seen clean, no pg_settings read) or `read`",
            settings_checks.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "runs_in_flight",
            "Runs in flight on this host",
            in_flight.clone(),
        );
        let plugin_loads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "plugin_loads",
            "Plugin compilations and checks, by result",
            plugin_loads.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register("reloads", "Hot reloads, by result", reloads.clone());
        let stuck_locks = Gauge::default();
        registry.register(
            "stuck_locks",
            "Advisory locks `jobhost locks` calls STUCK, as of the host's last heartbeat",
            stuck_locks.clone(),
        );
        let pool_connections = Family::<StateLabel, Gauge>::default();
        registry.register(
            "pool_connections",
            "The host pool's connections by state, read at scrape",
            pool_connections.clone(),
        );
        let waiting_for_connection = Gauge::default();
        registry.register(
            "runs_waiting_for_connection",
            "Runs that wait for a connection because pool-size connections are all lent to runs, read at scrape",
            waiting_for_connection.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stdout was not read as fast as the host wrote them (the runs did not wait), read at scrape",
            log_lines_dropped.clone(),
        );
        Self {
            registry,
            runs,
            run_duration,
            start_lag,
            skips,
            leaks,
            settings_checks,
            in_flight,
            plugin_loads,
            reloads,
            stuck_locks,
            pool_connections,
            waiting_for_connection,
            log_lines_dropped,
            log_lines_counted: AtomicU64::new(0),
        }
    }

    /// Records what one slot came to, and how long a finished run took.
    pub fn observe(&self, job: &str, result: &RunResult, took: Duration) {
        let reason = match result {
            RunResult::Finished { outcome, .. } => {
                self.runs
                    .get_or_create(&JobOutcome {
                        job: job.to_owned(),
                        outcome: outcome.as_str().to_owned(),
                    })
                    .inc();
                self.run_duration
                    .get_or_create(&JobLabel {
                        job: job.to_owned(),
                    })
                    .observe(took.as_secs_f64());
                return;
            }
            RunResult::LockBusy => "lock_busy",
            RunResult::AlreadyDone => "already_done",
            RunResult::NotDue { .. } => "not_due",
            RunResult::BackingOff { .. } => "backing_off",
            RunResult::Exhausted => "exhausted",
            RunResult::Paused => "paused",
        };
        self.skips
            .get_or_create(&JobReason {
                job: job.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The counters of the checks' two ways to verify a session's settings,
    /// for the [`Baseline`](crate::hygiene::Baseline) that tells them apart.
    pub fn settings_checks(&self) -> crate::hygiene::CheckCounters {
        let counter = |settings: &str| {
            self.settings_checks
                .get_or_create(&SettingsLabel {
                    settings: settings.to_owned(),
                })
                .clone()
        };
        crate::hygiene::CheckCounters {
            fingerprint: counter("fingerprint"),
            read: counter("read"),
        }
    }

    /// Counts a run whose plugin left state on its connection
    /// (`session_state_leaked`): what an operator alerts on, since such a
    /// plugin is buggy or hostile. `before_commit`: the check refused the
    /// commit; otherwise the commit kept it and the connection was closed.
    pub fn leaked(&self, job: &str, before_commit: bool) {
        let found = if before_commit {
            "before_commit"
        } else {
            "after_commit"
        };
        self.leaks
            .get_or_create(&JobFound {
                job: job.to_owned(),
                found: found.to_owned(),
            })
            .inc();
    }

    /// Records the lag from a slot to its lock, in seconds.
    pub fn observe_start_lag(&self, job: &str, lag_secs: f64) {
        self.start_lag
            .get_or_create(&JobLabel {
                job: job.to_owned(),
            })
            .observe(lag_secs.max(0.0));
    }

    /// Counts a plugin load by result.
    pub fn plugin_loaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.plugin_loads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a reload by result.
    pub fn reloaded(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The values read at scrape time.
    pub fn set_scraped(&self, now: Scraped) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.in_flight.set(gauge(now.in_flight));
        for (state, n) in [("in_use", now.in_use), ("idle", now.idle)] {
            self.pool_connections
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(gauge(n));
        }
        self.waiting_for_connection
            .set(gauge(now.waiting_for_connection));
        self.count_dropped_log_lines(crate::logging::dropped_lines());
    }

    /// Brings `jobhost_log_lines_dropped_total` up to `dropped` (the writer's
    /// own count; concurrent scrapes add each line once).
    fn count_dropped_log_lines(&self, dropped: u64) {
        let counted = self.log_lines_counted.fetch_max(dropped, Ordering::Relaxed);
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
    }

    /// Sets the number of STUCK locks last seen.
    pub fn set_stuck_locks(&self, n: usize) {
        self.stuck_locks.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer's count is read at each scrape: each dropped line is counted
    /// once, whatever order two scrapes read it in.
    #[test]
    fn dropped_log_lines_are_counted_once() {
        let m = Metrics::new();
        m.count_dropped_log_lines(5);
        m.count_dropped_log_lines(7);
        // A scrape that read the count before the last one finishes after it.
        m.count_dropped_log_lines(6);
        m.count_dropped_log_lines(7);
        assert_eq!(m.log_lines_dropped.get(), 7);
        assert!(
            m.encode().contains("jobhost_log_lines_dropped_total 7"),
            "{}",
            m.encode()
        );
    }
}
