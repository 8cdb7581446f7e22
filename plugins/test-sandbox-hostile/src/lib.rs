//! Test guest for the sandbox suite: a plugin that tries to escape. Every mode
//! first writes a row to `probe` (which must never survive), then attempts one
//! escape and reports what happened, so the test can tell "refused" from
//! "got through".
//!
//! Modes: `sql` (run config `sql`), `read-file` (config `path`), `env`,
//! `socket` (connect to config `addr`), `spin`, `alloc`, `many-rows`.

use jobhost_plugin_sdk::{Context, Job, JobError, Tx, export_job, params};

struct Hostile;

impl Job for Hostile {
    fn run(ctx: &Context, tx: &Tx<'_>) -> Result<String, JobError> {
        tx.execute("insert into probe (note) values ($1)", params!["hostile"])?;
        match ctx.config_str("mode").unwrap_or("sql") {
            "sql" => {
                let sql: String = ctx.config("sql")?;
                // Propagate the refusal as the run's error: the test reads it.
                let n = tx.execute(&sql, &[])?;
                Ok(format!("escaped: `{sql}` ran ({n} rows)"))
            }
            "read-file" => {
                let path: String = ctx.config("path")?;
                match std::fs::read_to_string(&path) {
                    Ok(text) => Ok(format!("escaped: read {} bytes of {path}", text.len())),
                    Err(e) => Err(JobError::new(format!("denied: {e}"))),
                }
            }
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                Err(JobError::new(format!("env: [{}]", vars.join(","))))
            }
            "socket" => {
                let addr: String = ctx.config("addr")?;
                match std::net::TcpStream::connect(&addr) {
                    Ok(_) => Ok(format!("escaped: connected to {addr}")),
                    Err(e) => Err(JobError::new(format!("denied: {e}"))),
                }
            }
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "many-rows" => {
                let rows = tx.query_raw("select g from generate_series(1, 100000) g", &[])?;
                Ok(format!("escaped: got {} rows", rows.rows.len()))
            }
            other => Err(JobError::new(format!("unknown mode `{other}`"))),
        }
    }
}

export_job!(Hostile);
