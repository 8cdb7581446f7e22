//! Test guest for the core suite: one component whose `mode` config selects a
//! behaviour, so tests can drive success, failure, traps and arbitrary SQL.
//!
//! Modes: `write` (insert `note` into `probe`), `error` (write, then fail),
//! `trap` (write, then panic), `swallow` (write, hit `select 1/0`, ignore it,
//! return success), `query` (run config `sql` with JSON `params`, report the
//! result as JSON), `sleep` (write, sleep `sleep-ms`, touch the connection),
//! `spin` (loop forever), `chatty` (print `bytes` to stdout and stderr), `query-one` /
//! `query-opt` (config `sql` through the SDK's typed single-row calls), `after-scope` (keep nothing: the
//! borrow ends with the call; proves the handle cannot be smuggled).

use jobhost_plugin_sdk::{Context, Job, JobError, Tx, Value, export_job, params};
use serde_json::{Value as J, json};

fn param(tag: &str, v: &J) -> Result<Value, JobError> {
    let s = || {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| JobError::new(format!("{tag}: expected string")))
    };
    let bad = |e: String| JobError::new(format!("{tag}: {e}"));
    Ok(match tag {
        "null" => Value::Null,
        "boolean" => Value::Boolean(v.as_bool().ok_or_else(|| bad("bool".into()))?),
        "int2" => Value::Int2(v.as_i64().ok_or_else(|| bad("int".into()))? as i16),
        "int4" => Value::Int4(v.as_i64().ok_or_else(|| bad("int".into()))? as i32),
        "int8" => Value::Int8(v.as_i64().ok_or_else(|| bad("int".into()))?),
        "float4" => Value::Float4(v.as_f64().ok_or_else(|| bad("float".into()))? as f32),
        "float8" => Value::Float8(v.as_f64().ok_or_else(|| bad("float".into()))?),
        "numeric" => Value::Numeric(s()?),
        "text" => Value::Text(s()?),
        "bytea" => Value::Bytea(
            v.as_array()
                .ok_or_else(|| bad("bytes".into()))?
                .iter()
                .map(|b| b.as_u64().unwrap_or(0) as u8)
                .collect(),
        ),
        "json" => Value::Json(s()?),
        "uuid" => Value::Uuid(s()?),
        "date" => Value::Date(s()?),
        "time" => Value::Time(s()?),
        "timestamp" => Value::Timestamp(s()?),
        "timestamptz" => Value::Timestamptz(s()?),
        "other" => {
            let pair = v.as_array().ok_or_else(|| bad("pair".into()))?;
            Value::Other((
                pair[0].as_str().unwrap_or_default().to_owned(),
                pair[1].as_str().unwrap_or_default().to_owned(),
            ))
        }
        other => return Err(JobError::new(format!("unknown value tag `{other}`"))),
    })
}

fn tagged(v: Value) -> J {
    match v {
        Value::Null => json!(["null", null]),
        Value::Boolean(b) => json!(["boolean", b]),
        Value::Int2(i) => json!(["int2", i]),
        Value::Int4(i) => json!(["int4", i]),
        Value::Int8(i) => json!(["int8", i]),
        Value::Float4(f) => json!(["float4", f]),
        Value::Float8(f) => json!(["float8", f]),
        Value::Numeric(s) => json!(["numeric", s]),
        Value::Text(s) => json!(["text", s]),
        Value::Bytea(b) => json!(["bytea", b]),
        Value::Json(s) => json!(["json", s]),
        Value::Uuid(s) => json!(["uuid", s]),
        Value::Date(s) => json!(["date", s]),
        Value::Time(s) => json!(["time", s]),
        Value::Timestamp(s) => json!(["timestamp", s]),
        Value::Timestamptz(s) => json!(["timestamptz", s]),
        Value::Other((t, s)) => json!(["other", [t, s]]),
    }
}

fn write(ctx: &Context, tx: &Tx<'_>) -> Result<(), JobError> {
    // By default the note is the slot, so tests can count runs per slot.
    // With `table`, the row goes there and names the job too (`job@slot`),
    // so a test can tell whose statement wrote it.
    match ctx.config_str("table") {
        Some(table) => {
            let note = format!("{}@{}", ctx.job, ctx.slot);
            let sql = format!("insert into {table} (note) values ($1)");
            tx.execute(&sql, params![note])?;
        }
        None => {
            let note = ctx.config_str("note").unwrap_or(&ctx.slot);
            tx.execute("insert into probe (note) values ($1)", params![note])?;
        }
    }
    Ok(())
}

struct Probe;

/// Initialised memory (in the module's data, not zeroed) that a run
/// overwrites: the next run must find it as the plugin shipped it.
static MEMORY: std::sync::Mutex<[u8; 8]> = std::sync::Mutex::new(*b"pristine");

impl Job for Probe {
    fn run(ctx: &Context, tx: &Tx<'_>) -> Result<String, JobError> {
        match ctx.config_str("mode").unwrap_or("write") {
            "noop" => Ok(String::new()),
            "remember" => {
                let mut memory = MEMORY.lock().map_err(|_| JobError::new("poisoned"))?;
                let found = String::from_utf8_lossy(&*memory).into_owned();
                *memory = *b"touched!";
                Ok(format!("memory said {found}"))
            }
            "chatty" => {
                // Far past the host's output cap, on both streams.
                let bytes: usize = ctx.config_or("bytes", 200_000)?;
                let line = "x".repeat(99);
                for i in 0..bytes / 200 {
                    println!("{line}");
                    eprintln!("{line}");
                    if i == 0 {
                        println!("first-line-marker");
                    }
                }
                Ok(format!("printed {bytes} bytes"))
            }
            "select-n" => {
                let n: u32 = ctx.config_or("n", 100)?;
                for i in 0..n {
                    tx.query_raw("select $1::int4 as v", &[Value::Int4(i as i32)])?;
                }
                Ok(format!("{n} selects"))
            }
            "write" => {
                write(ctx, tx)?;
                Ok(format!("wrote attempt {}", ctx.attempt))
            }
            "error" => {
                write(ctx, tx)?;
                Err(JobError::new("deliberate failure"))
            }
            "trap" => {
                write(ctx, tx)?;
                panic!("deliberate panic");
            }
            "swallow" => {
                write(ctx, tx)?;
                let swallowed = tx.query_raw("select 1/0", &[]).is_err();
                Ok(format!("swallowed a failed statement: {swallowed}"))
            }
            "query" => {
                let sql: String = ctx.config("sql")?;
                let raw: J = serde_json::from_str(ctx.config_str("params").unwrap_or("[]"))
                    .map_err(|e| JobError::new(format!("params: {e}")))?;
                let params = raw
                    .as_array()
                    .ok_or("params: expected a list")?
                    .iter()
                    .map(|p| param(p[0].as_str().unwrap_or_default(), &p[1]))
                    .collect::<Result<Vec<_>, _>>()?;
                let set = tx.query_raw(&sql, &params)?;
                let columns: Vec<J> = set
                    .columns
                    .iter()
                    .map(|c| json!([c.name, c.type_name]))
                    .collect();
                let rows: Vec<J> = set
                    .rows
                    .into_iter()
                    .map(|r| J::Array(r.into_iter().map(tagged).collect()))
                    .collect();
                Ok(json!({ "columns": columns, "rows": rows }).to_string())
            }
            "query-one" => {
                let sql: String = ctx.config("sql")?;
                let row: J = tx.query_one(&sql, &[])?;
                Ok(row.to_string())
            }
            "query-opt" => {
                let sql: String = ctx.config("sql")?;
                let row: Option<J> = tx.query_opt(&sql, &[])?;
                Ok(serde_json::to_string(&row).unwrap_or_default())
            }
            "sleep" => {
                write(ctx, tx)?;
                let ms: u64 = ctx.config_or("sleep-ms", 1000)?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                tx.query_raw("select 1", &[])?;
                Ok(format!("slept {ms} ms"))
            }
            "spin" => {
                write(ctx, tx)?;
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            other => Err(JobError::new(format!("unknown mode `{other}`"))),
        }
    }
}

export_job!(Probe);
