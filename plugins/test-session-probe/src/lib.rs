//! Test guest for the session (long job) suite.
//!
//! Modes: `commit-each` (`count` rows, each in its own transaction; the one at
//! `fail-at` hits a SQL error and is dropped), `hold` (insert in an open
//! transaction, sleep `sleep-ms`, then try to commit), `http` (GET each of the
//! comma-separated `urls`, record each outcome in its own transaction),
//! `sql` (run config `sql` in a short transaction and commit it),
//! `after-scope` (call a committed transaction again).

use jobhost_plugin_sdk::{Context, JobError, LongJob, Session, export_long_job, http, params};

struct SessionProbe;

impl LongJob for SessionProbe {
    fn run(ctx: &Context, session: &Session<'_>) -> Result<String, JobError> {
        match ctx.config_str("mode").unwrap_or("commit-each") {
            "commit-each" => {
                let count: u32 = ctx.config_or("count", 3)?;
                let fail_at: u32 = ctx.config_or("fail-at", 0)?;
                let (mut ok, mut failed) = (0, 0);
                for i in 1..=count {
                    let tx = session.begin()?;
                    let note = format!("{}-{i}", ctx.slot);
                    tx.execute("insert into probe (note) values ($1)", params![note])?;
                    if i == fail_at && tx.query_raw("select 1/0", &[]).is_err() {
                        failed += 1;
                        drop(tx); // rolled back; the others stand
                        continue;
                    }
                    tx.commit()?;
                    ok += 1;
                }
                Ok(format!("{ok} committed, {failed} failed"))
            }
            "hold" => {
                let ms: u64 = ctx.config_or("sleep-ms", 1000)?;
                let tx = session.begin()?;
                tx.execute("insert into probe (note) values ('held')", &[])?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                tx.commit()?;
                Ok(format!("held {ms} ms"))
            }
            "http" => {
                let urls = ctx.config_str("urls").unwrap_or_default();
                let mut report = Vec::new();
                for url in urls.split(',').filter(|u| !u.is_empty()) {
                    let outcome = match http::get(url) {
                        Ok(r) => format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
                        Err(e) => format!("error: {e}"),
                    };
                    session.transaction(|tx| {
                        tx.execute(
                            "insert into probe (note) values ($1)",
                            params![format!("{url} -> {outcome}")],
                        )?;
                        Ok(())
                    })?;
                    report.push(format!("{url} -> {outcome}"));
                }
                Ok(report.join("\n"))
            }
            "sql" => {
                // Config `sql` in one short transaction, committed.
                let sql: String = ctx.config("sql")?;
                let tx = session.begin()?;
                tx.execute(&sql, &[])?;
                tx.commit()?;
                Ok(format!("committed `{sql}`"))
            }
            "after-scope" => {
                // A transaction whose scope ended (committed) must refuse every
                // later call, without reaching Postgres.
                let tx = session.raw().begin()?;
                tx.execute("insert into probe (note) values ('committed')", &[])?;
                tx.commit()?;
                let query = format!("{:?}", tx.query("select 1", &[]));
                let execute = format!(
                    "{:?}",
                    tx.execute("insert into probe (note) values ('late')", &[])
                );
                let commit = format!("{:?}", tx.commit());
                Ok(format!("{query} | {execute} | {commit}"))
            }
            other => Err(JobError::new(format!("unknown mode `{other}`"))),
        }
    }
}

export_long_job!(SessionProbe);
