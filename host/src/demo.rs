//! Demo tables and rows for the reference jobs (`demo/*.sql`).
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
