//! What the post-run check takes for a clean session on a pool's
//! connections, and the fingerprints of clean settings it learns
//! ([`Baseline`]): the state of the check, beside the SQL that
//! [`super`] builds.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sqlx::Row as _;
use sqlx::postgres::PgRow;

use super::text_array;

/// What the checks take for a clean session on a pool's connections: the
/// settings a fresh connection carries at session level (`name=value`, see
/// [`crate::db::Connected::session_baseline`]), and the fingerprints of the
/// settings of sessions that the full `pg_settings` read found clean, which
/// let the check before COMMIT skip that read.
///
/// The fingerprints are learned, not computed up front: the check returns
/// one each time it had to read `pg_settings` and found nothing, and the host
/// keeps the last [`CLEAN_KEPT`]. So whatever makes a pool's sessions differ
/// (a job role's `ALTER ROLE ... SET`, a configuration reload, a pooler's
/// settings) costs one full read per new state, never a wrong verdict: a
/// session whose watched values all equal a clean session's has nothing of
/// its own at session level that the full read could name. Clones share the
/// fingerprints.
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    settings: Arc<[String]>,
    clean: Arc<Mutex<VecDeque<String>>>,
    counters: Option<CheckCounters>,
}

/// How the checks that passed verified the settings: by a fingerprint seen
/// clean, or by reading `pg_settings` (a new state, or a plugin's `SET
/// LOCAL`); see [`crate::metrics::Metrics::settings_checks`]. A hit rate
/// that falls says the host keeps meeting new states (more role pools than
/// [`CLEAN_KEPT`], settings that differ per connection) and pays the read.
#[derive(Debug, Clone)]
pub struct CheckCounters {
    /// Checks that skipped the read.
    pub fingerprint: prometheus_client::metrics::counter::Counter,
    /// Checks that read `pg_settings`.
    pub read: prometheus_client::metrics::counter::Counter,
}

/// How many fingerprints of clean sessions a [`Baseline`] keeps (the oldest
/// goes first): enough for a host's role pools, each usually one state.
pub const CLEAN_KEPT: usize = 8;

/// The column of the check before COMMIT when it was given fingerprints: the
/// fingerprint to learn if it read `pg_settings`, null if it did not.
pub(super) const CLEAN_COLUMN: &str = "clean_settings";

/// The column of the check before COMMIT when it was given none (the plugin
/// used `SET LOCAL`): it read `pg_settings`.
pub(super) const READ_COLUMN: &str = "settings_read";

impl Baseline {
    /// A baseline of `settings` (`name=value`), with no fingerprint learned.
    pub fn new(settings: Vec<String>) -> Self {
        Self {
            settings: Arc::from(settings),
            clean: Arc::default(),
            counters: None,
        }
    }

    /// The same, counting its checks into `counters`.
    pub fn counting(mut self, counters: CheckCounters) -> Self {
        self.counters = Some(counters);
        self
    }

    /// The settings a fresh connection carries at session level.
    pub fn settings(&self) -> &[String] {
        &self.settings
    }

    /// How many fingerprints of clean sessions it holds.
    pub fn clean_fingerprints(&self) -> usize {
        self.clean().len()
    }

    /// Remembers the fingerprint the check before COMMIT returned among
    /// `rows` (the closing query's, which passed it), if it returned one,
    /// and counts how the check verified the settings.
    pub fn learn_from(&self, rows: &[PgRow]) -> sqlx::Result<()> {
        use sqlx::Column as _;
        let check = rows.iter().find_map(|row| {
            let column = row.columns().first()?.name();
            [CLEAN_COLUMN, READ_COLUMN]
                .contains(&column)
                .then(|| (column == CLEAN_COLUMN, row))
        });
        let Some((fingerprinted, row)) = check else {
            return Ok(());
        };
        let fingerprint: Option<String> = row.try_get(0)?;
        let read = !fingerprinted || fingerprint.is_some();
        if let Some(counters) = &self.counters {
            match read {
                true => counters.read.inc(),
                false => counters.fingerprint.inc(),
            };
        }
        if let Some(fingerprint) = fingerprint {
            self.learn(fingerprint);
        }
        Ok(())
    }

    /// Remembers `fingerprint` as clean, forgetting the oldest beyond
    /// [`CLEAN_KEPT`].
    pub(super) fn learn(&self, fingerprint: String) {
        let mut clean = self.clean();
        if clean.contains(&fingerprint) {
            return;
        }
        if clean.len() == CLEAN_KEPT {
            // More states than kept: some of them cost the read again each
            // time they come back. Worth knowing when the check's cost grows.
            tracing::info!(
                kept = CLEAN_KEPT,
                "the post-run session check met more distinct clean settings states than it keeps; it forgets the oldest and reads pg_settings again when that one returns"
            );
            clean.pop_front();
        } else {
            tracing::debug!(
                kept = clean.len() + 1,
                "the post-run session check learned a clean settings state"
            );
        }
        clean.push_back(fingerprint);
    }

    /// The fingerprints as a `text[]` literal.
    pub(super) fn clean_sql(&self) -> String {
        text_array(self.clean().iter())
    }

    fn clean(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        // Single pushes and pops cannot leave the queue inconsistent, so a
        // poisoned lock is safe to reuse.
        self.clean.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_baseline_keeps_the_last_fingerprints_once_each() {
        let baseline = Baseline::new(vec!["TimeZone=UTC".into()]);
        let shared = baseline.clone();
        assert_eq!(baseline.clean_sql(), "array[]::text[]");
        for i in 0..CLEAN_KEPT + 2 {
            baseline.learn(format!("fp{i}"));
            baseline.learn(format!("fp{i}"));
        }
        assert_eq!(shared.clean_fingerprints(), CLEAN_KEPT, "clones share them");
        assert_eq!(
            shared.clean_sql(),
            "array[E'fp2', E'fp3', E'fp4', E'fp5', E'fp6', E'fp7', E'fp8', E'fp9']::text[]",
            "the oldest went first"
        );
    }
}
