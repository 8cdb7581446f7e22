//! The SQL scope guard: refuses, before they reach Postgres, statements that
//! would let a plugin escape the transaction and lock scope the host lent it.
//!
//! Statements are parsed with Postgres's own parser (`pg_query`, libpg_query),
//! so quoting, comments, nesting and odd spellings cannot slip past a pattern.
//! Refused:
//!
//! - more than one statement in one string;
//! - transaction control: BEGIN/START, COMMIT, ROLLBACK, SAVEPOINT, RELEASE,
//!   PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED;
//! - `SET`/`RESET` at session level, and role or backstop changes even with
//!   `LOCAL` (`ROLE`, `SESSION AUTHORIZATION`, `statement_timeout`, ...);
//! - functions, anywhere in the statement: advisory locks (`pg_advisory*`,
//!   `pg_try_advisory*`), `pg_terminate_backend`, `pg_cancel_backend`,
//!   `dblink*`, `set_config` (a SET in disguise);
//! - `COPY` (files, programs, and the client streams the handle cannot carry),
//!   `LISTEN`/`UNLISTEN`, `DISCARD`, `DO` (its body is not visible to the guard),
//!   session-level `PREPARE`/`DEALLOCATE`, `LOAD`, `ALTER SYSTEM`;
//! - anything naming `pg_temp` (creating, calling or using temporary
//!   functions, operators, types, tables) and temporary relations
//!   (`CREATE TEMP TABLE`, `SELECT ... INTO TEMP`): temporary objects belong
//!   to the *connection*, which goes back to the pool and serves other jobs;
//! - writes to `pg_settings` (an `UPDATE` there is a session-level SET in
//!   disguise);
//! - anything naming the schema `jobhost` (the run history, and the
//!   functions that verify every run).
//!
//! What the guard cannot see: the bodies of functions the plugin calls. A job
//! that must not create or call arbitrary functions needs a role without that
//! privilege (`role = "..."` in `jobs.toml`), which Postgres itself enforces.
//! And a list of refusals is never complete, so the guard is the first line
//! only: after every run the runner *verifies* the connection (see
//! [`crate::hygiene`]) and rolls back a run that left anything behind.
//!
//! Verdicts are cached per statement text (bounded), since jobs repeat theirs.

use std::collections::HashMap;
use std::sync::Mutex;

use pg_query::NodeEnum;

/// Cached verdicts kept at most; the cache is cleared when full (jobs reuse a
/// handful of statements, so this only matters for generated SQL).
const CACHE_LIMIT: usize = 4096;

/// Settings a plugin may not change even for its own transaction: they are the
/// host's backstops or its identity.
const HOST_OWNED_SETTINGS: &[&str] = &[
    "role",
    "session_authorization",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "transaction_timeout",
    "lock_timeout",
    "idle_session_timeout",
    // The host's statements after the plugin's resolve names through it.
    "search_path",
    // Identifies the run's holder in pg_stat_activity (`jobhost locks`).
    "application_name",
    // `replica` disables triggers and foreign keys.
    "session_replication_role",
];

/// The host's own schema: its history and the functions that verify every
/// run. A job running as the host's role could otherwise replace them.
const HOST_SCHEMA: &str = "jobhost";

/// What the guard learned from a statement it let through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    /// The setting a `SET LOCAL` changes: the post-run check must not take it
    /// for a leaked session-level change (both show as `source = session`
    /// until the transaction ends).
    pub sets_local: Option<String>,
}

/// Refuses statements that would escape the lent scope (see module docs).
#[derive(Debug, Default)]
pub struct SqlGuard {
    cache: Mutex<HashMap<String, Verdict>>,
}

impl SqlGuard {
    /// A guard with an empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// `Ok` if `sql` may run in a lent transaction, otherwise why not.
    pub fn check(&self, sql: &str) -> Verdict {
        // The lock is never held across the parse: two threads may parse the same
        // text once each, which is cheaper than serialising every parse.
        if let Some(v) = self.lock().get(sql) {
            return v.clone();
        }
        let verdict = verdict(sql);
        let mut cache = self.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(sql.to_owned(), verdict.clone());
        verdict
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Verdict>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single insert/clear calls), so a poisoned lock is safe to reuse.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The guard's answer for one statement.
pub type Verdict = Result<Allowed, String>;

fn verdict(sql: &str) -> Verdict {
    let parsed = pg_query::parse(sql, 0).map_err(|e| format!("cannot parse statement: {e}"))?;
    let stmts = &parsed.protobuf.stmts;
    match stmts.len() {
        0 => return Err("empty statement".into()),
        1 => {}
        n => {
            return Err(format!(
                "{n} statements in one string; send one statement per call"
            ));
        }
    }
    let node = stmts[0]
        .stmt
        .as_ref()
        .and_then(|s| s.node.as_ref())
        .ok_or("empty statement")?;
    let allowed = check_statement(node)?;
    // Walk the whole tree generically (through its serde form) so that no node
    // type can hide a function call, a temporary object or a write to
    // pg_settings from the guard.
    let tree = serde_json::to_value(&parsed.protobuf)
        .map_err(|e| format!("cannot inspect statement: {e}"))?;
    check_tree(&tree)?;
    Ok(allowed)
}

fn check_statement(node: &NodeEnum) -> Verdict {
    let refuse = |what: &str| {
        Err(format!(
            "{what} is not allowed: the host owns the transaction and session"
        ))
    };
    match node {
        NodeEnum::TransactionStmt(_) => refuse(
            "transaction control (BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE/PREPARE TRANSACTION)",
        ),
        NodeEnum::VariableSetStmt(set) => {
            let name = set.name.to_ascii_lowercase();
            if HOST_OWNED_SETTINGS.contains(&name.as_str()) {
                refuse(&format!("changing `{name}`"))
            } else if !set.is_local {
                refuse("session-level SET/RESET (use SET LOCAL)")
            } else {
                Ok(Allowed {
                    sets_local: Some(name),
                })
            }
        }
        NodeEnum::CopyStmt(_) => refuse("COPY"),
        NodeEnum::ListenStmt(_) => refuse("LISTEN"),
        NodeEnum::UnlistenStmt(_) => refuse("UNLISTEN"),
        NodeEnum::DiscardStmt(_) => refuse("DISCARD"),
        NodeEnum::DoStmt(_) => refuse("DO (its body cannot be checked)"),
        NodeEnum::PrepareStmt(_) | NodeEnum::DeallocateStmt(_) => {
            refuse("session-level PREPARE/DEALLOCATE")
        }
        NodeEnum::LoadStmt(_) => refuse("LOAD"),
        NodeEnum::AlterSystemStmt(_) => refuse("ALTER SYSTEM"),
        _ => Ok(Allowed::default()),
    }
}

fn forbidden_function(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("pg_advisory")
        || n.starts_with("pg_try_advisory")
        || n.starts_with("dblink")
        || n == "pg_terminate_backend"
        || n == "pg_cancel_backend"
        || n == "set_config"
}

/// Walks the whole tree: refuses forbidden function names in every
/// `FuncCall`, any qualified name in `pg_temp`, temporary relations, and
/// writes to `pg_settings`.
fn check_tree(tree: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value as J;
    match tree {
        J::Object(map) => {
            // Names (schema-qualified or not) are lists of `String` nodes;
            // string constants are `A_Const`, so `select 'pg_temp'` passes.
            // Relations carry their schema as a plain field instead.
            let name = match (map.get("String"), map.get("schemaname")) {
                (Some(J::Object(name)), _) => name.get("sval").and_then(J::as_str),
                (_, Some(J::String(schema))) => Some(schema.as_str()),
                _ => None,
            };
            if let Some(s) = name {
                if is_temp_schema(s) {
                    return Err(format!(
                        "`{s}` is not allowed: temporary objects belong to the pooled connection and would outlive the run"
                    ));
                }
                if s.eq_ignore_ascii_case(HOST_SCHEMA) {
                    return Err(format!(
                        "schema `{HOST_SCHEMA}` is the host's own (run history, the checks that end every run)"
                    ));
                }
            }
            if map.get("relpersistence").and_then(J::as_str) == Some("t") {
                return Err("temporary tables, views and sequences are not allowed: they belong to the pooled connection and would outlive the run".into());
            }
            for write in ["UpdateStmt", "InsertStmt", "DeleteStmt", "MergeStmt"] {
                let target = map
                    .get(write)
                    .and_then(|w| w.get("relation"))
                    .and_then(|r| r.get("relname"))
                    .and_then(J::as_str);
                if target.is_some_and(|t| t.eq_ignore_ascii_case("pg_settings")) {
                    return Err("writing to `pg_settings` is not allowed: it changes session settings that outlive the run".into());
                }
            }
            if let Some(J::Object(call)) = map.get("FuncCall") {
                // funcname is a list of String nodes; the last one is the name
                // (earlier ones are the schema, e.g. pg_catalog).
                let names = call
                    .get("funcname")
                    .and_then(J::as_array)
                    .into_iter()
                    .flatten();
                let last = names.filter_map(find_sval).next_back();
                if let Some(name) = last
                    && forbidden_function(&name)
                {
                    return Err(format!(
                        "calling `{name}` is not allowed: the host owns locks and sessions"
                    ));
                }
            }
            map.values().try_for_each(check_tree)
        }
        J::Array(items) => items.iter().try_for_each(check_tree),
        _ => Ok(()),
    }
}

/// `pg_temp` and the backend-specific `pg_temp_N` / `pg_toast_temp_N`.
fn is_temp_schema(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "pg_temp" || n.starts_with("pg_temp_") || n.starts_with("pg_toast_temp")
}

fn find_sval(node: &serde_json::Value) -> Option<String> {
    match node {
        serde_json::Value::Object(map) => match map.get("sval") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => map.values().find_map(find_sval),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sql: &str) -> String {
        SqlGuard::new().check(sql).expect_err(sql)
    }

    #[test]
    fn refuses_every_escape() {
        for sql in [
            "BEGIN",
            "start transaction",
            "COMMIT",
            "rollback",
            "SAVEPOINT s",
            "release savepoint s",
            "rollback to savepoint s",
            "PREPARE TRANSACTION 'x'",
            "commit prepared 'x'",
            "SET ROLE postgres",
            "set local role postgres",
            "RESET ROLE",
            "SET SESSION AUTHORIZATION postgres",
            "reset session authorization",
            "SET search_path = evil",
            "set work_mem = '1GB'",
            "RESET ALL",
            "set local statement_timeout = 0",
            "select pg_advisory_lock(1)",
            "select pg_catalog.pg_try_advisory_xact_lock(1, 2)",
            "SELECT \"pg_advisory_unlock_all\"()",
            "select * from t where id in (select pg_advisory_lock(id) from u)",
            "with x as (select pg_try_advisory_lock(1)) select * from x",
            "explain analyze select pg_advisory_lock(1)",
            "insert into t select pg_advisory_lock(1) returning 1",
            "select pg_terminate_backend(123)",
            "select pg_cancel_backend(123)",
            "select * from dblink('host=x', 'select 1') as t(a int)",
            "select dblink_exec('x', 'y')",
            "select set_config('role', 'postgres', false)",
            "COPY t FROM '/etc/passwd'",
            "copy t to program 'rm -rf /'",
            "copy t to stdout",
            "LISTEN chan",
            "unlisten *",
            "DISCARD ALL",
            "do $$ begin perform pg_advisory_lock(1); end $$",
            "prepare p as select 1",
            "deallocate all",
            "select 1; select 2",
            "delete from t; commit",
            "set local search_path = evil, pg_catalog",
            "set local application_name = 'jobhost:other-host'",
            "set local session_replication_role = replica",
            "update pg_settings set setting = 'pg_temp, public' where name = 'search_path'",
            "UPDATE pg_catalog.PG_SETTINGS set setting = '0' where name = 'work_mem'",
            "with s as (update pg_settings set setting = 'x' where name = 'search_path' returning 1) select * from s",
            "create function pg_temp.g() returns void language sql as 'select pg_advisory_lock(1, 2)'",
            "select pg_temp.g()",
            "create operator pg_temp.### (rightarg = bigint, function = pg_advisory_lock)",
            "select operator(pg_temp.###) 12::bigint",
            "create temp table t (id int)",
            "create temporary view v as select 1",
            "create table pg_temp.t (id int)",
            "select 1 as x into temp t2",
            "create temp sequence s",
            "create type pg_temp.mood as enum ('a')",
            "create or replace function jobhost.assert_clean() returns bool language sql as 'select true'",
            "update jobhost.runs set outcome = 'ok'",
            "drop schema jobhost cascade",
            "",
            "select from where",
        ] {
            let why = refused(sql);
            assert!(!why.is_empty(), "{sql}");
        }
    }

    #[test]
    fn accepts_ordinary_dml_and_ddl() {
        let guard = SqlGuard::new();
        for sql in [
            "select 1",
            "select * from demo.audit_events where hash_status = 'pending' for update skip locked",
            "with due as (select id from t where x < $1) update t set y = 1 from due where t.id = due.id returning t.id",
            "insert into t (a, b) values ($1, $2) on conflict (a) do update set b = excluded.b",
            "update t set n = n + 1 where id = $1 returning n",
            "delete from t where created_at < now() - $1::interval",
            "create table if not exists t (id bigserial primary key)",
            "alter table t add column z text",
            "create index on t (z)",
            "set local work_mem = '64MB'",
            "select 'pg_advisory_lock(1)' as looks_like_a_call",
            "select advisory, pg_advisory from t",
            "notify chan, 'x'",
            "lock table t in share mode",
            "select count(*) from t; ",
            "select 'pg_temp' as schema_name_as_text",
            "select * from pg_settings where name = 'work_mem'",
            "update settings set setting = 1",
        ] {
            assert!(guard.check(sql).is_ok(), "{sql}: {:?}", guard.check(sql));
        }
    }

    #[test]
    fn set_local_names_its_setting() {
        let guard = SqlGuard::new();
        assert_eq!(
            guard.check("SET LOCAL Work_Mem = '64MB'"),
            Ok(Allowed {
                sets_local: Some("work_mem".into())
            })
        );
        assert_eq!(guard.check("select 1"), Ok(Allowed::default()));
    }

    #[test]
    fn verdicts_are_cached() {
        let guard = SqlGuard::new();
        assert!(guard.check("select pg_advisory_lock(1)").is_err());
        assert!(guard.check("select 1").is_ok());
        assert_eq!(guard.lock().len(), 2);
    }
}
