//! Verify, don't enumerate: the proof, after every run, that the connection a
//! plugin used carries nothing into its next use (docs/DESIGN.md invariant 11).
//!
//! The [scope guard](crate::guard) refuses what it can see, but a list of
//! refusals is never complete (a function created in one run and called in
//! the next, an operator over `pg_advisory_lock`, an `UPDATE` of a view over
//! `pg_settings`...). So the runner also checks the *state* of the session,
//! with `jobhost.session_state` (migration `..._hosts`), at two points that
//! cost no round trip of their own, because both ride in the simple query
//! that ends the run ([`crate::tx::OpenTx::finish`]):
//!
//! 1. **before COMMIT**, inside the transaction, `jobhost.assert_clean`
//!    raises `session_state_leaked` (SQLSTATE `JH002`) if the session holds
//!    an advisory lock other than the job's own, a setting changed at session
//!    level, a temporary object, a holdable cursor... The runner then rolls
//!    back to the savepoint before the plugin's work and records the run as
//!    `error` naming what it did;
//! 2. **after COMMIT**, the same check with nothing allowed but what a fresh
//!    connection carries ([`after_commit_sql`]): what survives the transaction
//!    (the job's own key taken twice, a `LISTEN`, a session-level change of
//!    a setting the plugin also `SET LOCAL`, a `role`). A connection with
//!    leftovers is closed, never pooled, and the runner logs
//!    `session_state_leaked` with the job.
//!
//! Then, last in the same query, what no check can list is reset as a fresh
//! connection has it ([`RESET_SESSION`]): every setting, a custom one
//! (`app.tenant`, which `pg_settings` does not show) included, and the
//! sequences' last values (`currval`, `lastval()`).
//!
//! Deferred triggers are the plugin's code too, and Postgres runs them at
//! COMMIT, after the check: left alone, a job's `DEFERRABLE INITIALLY
//! DEFERRED` constraint trigger would change the session unchecked. So the
//! host fires them first ([`FIRE_DEFERRED`]) and checks after. A trigger
//! that one of them deferred anew still fires at COMMIT: what it leaves is
//! found by the check after COMMIT (locks, temporary objects, `role`...), and
//! a setting it changed is reset with all the others. Whatever fires runs as
//! the job's role: the run's connection logs in as it ([`crate::pools`]).
//!
//! Cost: reading `pg_settings` (every setting formatted with its
//! descriptions) is most of it, so the check before COMMIT first takes a
//! fingerprint of the values of the settings a session can change, and skips
//! the read when the fingerprint is one of a session that passed it
//! ([`Baseline`]; migration `..._clean_settings`). The check after COMMIT
//! skips the read unless the plugin used `SET LOCAL`. A run none of whose
//! statements reached the connection (a plugin that found nothing to do)
//! cannot have changed the session and is not checked. The benchmark shows
//! the cost side by side with the closing query without checks, and with the
//! full read.
//!
//! The host's own statements after the plugin's run with
//! `search_path = pg_catalog, pg_temp` and schema-qualified names, so a
//! function the job's role created cannot shadow one the host calls. (The
//! guard refuses `SET LOCAL search_path` to plugins; a change through a
//! function is a leak the check reports, since it runs before the host's own
//! `SET LOCAL` would hide it.)

mod baseline;

pub use baseline::{Baseline, CLEAN_KEPT, CheckCounters};
use baseline::{CLEAN_COLUMN, READ_COLUMN};

use crate::config::JobConfig;
use crate::db::quote_literal;

/// SQLSTATE raised by `jobhost.assert_clean`.
pub const LEAKED_SQLSTATE: &str = "JH002";

/// SQLSTATE raised by `jobhost.assert_lock_held` (a session job's lock is gone).
pub const LOCK_GONE_SQLSTATE: &str = "JH001";

/// How much the check after COMMIT reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCommit {
    /// Nothing: no statement of the plugin's reached this connection, so
    /// there is nothing to verify.
    Skip,
    /// Locks, temporary objects, cursors, LISTEN, prepared statements,
    /// `role`; not settings (the check before COMMIT saw them, a rollback
    /// reverts every setting changed in the transaction, and
    /// [`RESET_SESSION`] follows the check).
    Light,
    /// Settings too: the plugin used `SET LOCAL`, which masks a session-level
    /// change of the same setting before COMMIT.
    WithSettings,
}

/// What ends the simple query of a run that sent SQL, after its COMMIT (or
/// ROLLBACK): the check (the query's last row: one nullable text column,
/// what was left), then [`RESET_SESSION`]. `None` for
/// [`AfterCommit::Skip`].
pub fn after_commit_sql(check: AfterCommit, baseline: &[String]) -> Option<String> {
    leftovers_sql(check, baseline).map(|check| format!("{check};\n{RESET_SESSION}"))
}

/// What no check can list, reset after the check has read the rest: every
/// setting back to its value at connection start, and the sequences' last
/// values forgotten.
///
/// A custom setting (`app.tenant`, the usual key of row-level-security
/// policies) is a placeholder that `pg_settings` does not show, so one a
/// plugin set at session level (through a function, a trigger, a view) would
/// reach the next job on the connection unseen. A setting changed at COMMIT
/// by a trigger deferred past [`FIRE_DEFERRED`] is reset too (this rides in
/// the same simple query, so behind a transaction pooler it reaches the same
/// server session, which the pooler sets up again for its next client).
/// `role` is not reset by `RESET ALL`: the check reads it (migration
/// `..._session_role`).
///
/// A sequence's last value stays with the session too: after one job's
/// `nextval`, the next job on the connection read it with `currval`, a
/// number of another job's (`DISCARD SEQUENCES`, which the guard refuses to
/// plugins, is the host's).
pub const RESET_SESSION: &str = "reset all;\ndiscard sequences";

/// The post-commit check: one row, one nullable text column (`None` for
/// [`AfterCommit::Skip`]). `baseline` is what a fresh connection of the pool
/// carries at session level (`name=value`), which is not a leak.
fn leftovers_sql(check: AfterCommit, baseline: &[String]) -> Option<String> {
    let allowed = match check {
        AfterCommit::Skip => return None,
        AfterCommit::Light => "null".to_owned(),
        AfterCommit::WithSettings => text_array(baseline),
    };
    Some(format!(
        "select jobhost.session_state(null, null, {allowed}, {CALLER_SEARCH_PATH})"
    ))
}

/// `items` as a `text[]` literal.
fn text_array<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let quoted: Vec<String> = items
        .into_iter()
        .map(|s| quote_literal(s.as_ref()))
        .collect();
    format!("array[{}]::text[]", quoted.join(", "))
}

/// The check after COMMIT for a transaction the plugin used as described.
pub fn after_commit(touched: bool, plugin_local: &[String]) -> AfterCommit {
    match (touched, plugin_local.is_empty()) {
        (false, _) => AfterCommit::Skip,
        (true, true) => AfterCommit::Light,
        (true, false) => AfterCommit::WithSettings,
    }
}

/// Settings the host itself sets with `SET LOCAL` in a run's transaction
/// before the plugin runs. (`search_path` is not one: the guard refuses it to
/// plugins, so any change of it is a leak.)
const HOST_LOCAL_SETTINGS: &[&str] = &[
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "application_name",
];

/// The caller's `search_path`, as an argument of the check: inside the
/// function it is the function's own.
const CALLER_SEARCH_PATH: &str = "pg_catalog.current_setting('search_path')";

/// Fires the plugin's deferred triggers (constraint triggers `DEFERRABLE
/// INITIALLY DEFERRED`) now, before the check: left for COMMIT, they would
/// run after it.
pub const FIRE_DEFERRED: &str = "set constraints all immediate";

/// The end of a plugin's scope, up to the run's row: its deferred triggers
/// fired ([`FIRE_DEFERRED`]), then the check of what the plugin left (it
/// reads the `search_path` the plugin left, so it comes first), then a
/// `search_path` no job can have planted anything in for the host's
/// statements that follow. Every name is schema-qualified as well. `check`
/// is `None` when no statement of the plugin's reached the connection:
/// nothing of it can be pending or left.
fn host_scope_checked(check: Option<&str>) -> String {
    let mut sql = String::new();
    if let Some(check) = check {
        sql.push_str(FIRE_DEFERRED);
        sql.push_str(";\n");
        sql.push_str(check);
        sql.push_str(";\n");
    }
    sql.push_str(HOST_SEARCH_PATH);
    sql
}

/// The `search_path` of the host's statements after a plugin's.
const HOST_SEARCH_PATH: &str = "set local search_path = pg_catalog, pg_temp";

/// The in-transaction check of a run (raises `JH002`). `own` is the job's
/// lock key (`None` for a session job's short transaction, which holds no
/// advisory lock of its own). It accepts at session level the host's own
/// `SET LOCAL`s, what a fresh connection carries (`baseline`) and the
/// settings the plugin changed with `SET LOCAL` (`plugin_local`: the guard
/// saw them). Its fingerprint is taken only when `plugin_local` is empty: a
/// plugin's `SET LOCAL` makes the values differ from any clean session's,
/// and would teach the baseline a state with them.
pub fn assert_clean_sql(
    own: Option<(i32, i32)>,
    baseline: &Baseline,
    plugin_local: &[String],
) -> String {
    let allowed = text_array(
        HOST_LOCAL_SETTINGS
            .iter()
            .copied()
            .chain(baseline.settings().iter().map(String::as_str))
            .chain(plugin_local.iter().map(String::as_str)),
    );
    let (clean, column) = match plugin_local.is_empty() {
        true => (baseline.clean_sql(), CLEAN_COLUMN),
        false => ("null".to_owned(), READ_COLUMN),
    };
    let (ns, key) = match own {
        Some((ns, key)) => (ns.to_string(), key.to_string()),
        None => ("null".into(), "null".into()),
    };
    format!(
        "select jobhost.assert_clean({ns}, {key}, {allowed}, {CALLER_SEARCH_PATH}, {clean}) as {column}"
    )
}

/// The closing statements of a session job's short transaction: the host's
/// scope and the check (if a statement reached the connection: `touched`),
/// the lock check (`lock_check`), COMMIT.
pub fn commit_session_sql(
    touched: bool,
    baseline: &Baseline,
    plugin_local: &[String],
    lock_check: &str,
) -> String {
    let check = touched.then(|| assert_clean_sql(None, baseline, plugin_local));
    format!(
        "{};\n{lock_check};\ncommit",
        host_scope_checked(check.as_deref()),
    )
}

/// The closing statements of an `xact` run whose plugin succeeded: host scope,
/// the check (only if a statement of the plugin's reached the connection:
/// `touched`; see [`assert_clean_sql`]), the run's `ok` row (`record`,
/// [`crate::db::record_sql`]), COMMIT.
pub fn commit_ok_sql(
    job: &JobConfig,
    touched: bool,
    baseline: &Baseline,
    plugin_local: &[String],
    record: &str,
) -> String {
    let key = job.lock_key;
    let check =
        touched.then(|| assert_clean_sql(Some((key.namespace, key.key)), baseline, plugin_local));
    format!(
        "{};\n{record};\ncommit",
        host_scope_checked(check.as_deref())
    )
}

/// The closing statements of an `xact` run that failed: undo the plugin's
/// work (and its settings) back to the savepoint, the run's row
/// (`record`), COMMIT. Valid in an aborted transaction too.
pub fn commit_failure_sql(record: &str) -> String {
    format!("rollback to savepoint jobhost_work;\n{HOST_SEARCH_PATH};\n{record};\ncommit")
}

/// The structured event of a run whose plugin left state on its connection
/// (`before_commit`: the check refused the COMMIT; otherwise the COMMIT kept
/// it and the connection was closed).
pub fn log_leak(job: &str, what: &str, before_commit: bool) {
    let found = if before_commit {
        "before commit"
    } else {
        "after commit"
    };
    tracing::error!(job = %job, event = "session_state_leaked", leaked = %what, found, "session_state_leaked: the plugin left state on its connection; the connection was closed");
}

/// Whether `e` is the in-transaction check's refusal; its message says what
/// leaked.
pub fn leaked(e: &sqlx::Error) -> Option<String> {
    let db = e.as_database_error()?;
    (db.code().as_deref() == Some(LEAKED_SQLSTATE)).then(|| db.message().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugins_set_local_turns_the_fingerprint_off() {
        let baseline = Baseline::new(vec!["TimeZone=UTC".into()]);
        baseline.learn("abc".into());
        let fast = assert_clean_sql(Some((1, 2)), &baseline, &[]);
        assert!(
            fast.ends_with(", array[E'abc']::text[]) as clean_settings"),
            "{fast}"
        );
        assert!(fast.contains("E'TimeZone=UTC'") && fast.contains("E'statement_timeout'"));
        let read = assert_clean_sql(Some((1, 2)), &baseline, &["work_mem".into()]);
        assert!(read.ends_with(", null) as settings_read"), "{read}");
        assert!(read.contains("E'work_mem'"), "{read}");
    }
}
