//! `db-retention`: deletes rows older than each table's retention window.
//!
//! Every `[job.config]` key that names a table (`"demo.sessions" = "7 days"`)
//! is one DELETE on `created_at`. The window is any Postgres interval; table
//! names are checked to be plain (schema-)identifiers before they enter SQL.

use jobhost_plugin_sdk::{Context, Job, JobError, Tx, export_job, params};

fn is_table_name(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        })
}

struct DbRetention;

impl Job for DbRetention {
    fn run(ctx: &Context, tx: &Tx<'_>) -> Result<String, JobError> {
        let mut report = Vec::new();
        let mut total = 0u64;
        for (table, window) in ctx.config_entries().filter(|(k, _)| k.contains('.')) {
            if !is_table_name(table) {
                return Err(JobError::new(format!(
                    "config key `{table}` is not a plain table name"
                )));
            }
            let deleted = tx.execute(
                &format!("delete from {table} where created_at < now() - $1::interval"),
                params![window],
            )?;
            total += deleted;
            report.push(format!("{table}={deleted}"));
        }
        if report.is_empty() {
            return Err(JobError::new(
                "no tables configured: add `\"schema.table\" = \"30 days\"` entries to [job.config]",
            ));
        }
        Ok(format!("deleted {total} rows ({})", report.join(", ")))
    }
}

export_job!(DbRetention);
