//! Demo tables and rows for the reference jobs (`demo/*.sql`), and the small
//! HTTP server the demo's `test-scheduler` probes.
//!
//! Kept apart from the host's migrations on purpose: a production host start
//! must never create demo tables. Only `jobhost --demo` and the tests call this.

use sqlx::PgPool;

/// The demo schema (idempotent).
pub const SCHEMA_SQL: &str = include_str!("../../demo/schema.sql");
/// The demo rows (inserted only into empty tables).
pub const SEED_SQL: &str = include_str!("../../demo/seed.sql");

/// Creates the demo tables if missing and seeds the empty ones.
pub async fn setup(pool: &PgPool) -> sqlx::Result<()> {
    create_tables(pool).await?;
    sqlx::raw_sql(SEED_SQL).execute(pool).await?;
    Ok(())
}

/// Creates the demo tables without rows (tests seed their own).
pub async fn create_tables(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::raw_sql(SCHEMA_SQL).execute(pool).await?;
    Ok(())
}

/// Where the demo HTTP server listens (the seeded capabilities point here).
pub const DEMO_HTTP_ADDR: &str = "127.0.0.1:8089";

/// Serves the demo's probe targets on `addr` until the task is dropped:
/// `/broken` answers 500, unknown paths 404, everything else 200 `ok`.
/// Only for `jobhost --demo`; a production host serves nothing.
pub async fn serve_probe_targets(addr: &str) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/broken" => ("500 Internal Server Error", "broken"),
                    "/health" | "/reports" | "/exports" | "/" => ("200 OK", "ok"),
                    _ => ("404 Not Found", "not found"),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    }))
}
