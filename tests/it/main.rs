//! Integration tests: a real Postgres (a fresh database per test through
//! `#[sqlx::test]`, so advisory locks cannot collide between tests) and real
//! compiled components from `plugins/`.
//!
//! Needs `DATABASE_URL` pointing at a server where the user may create
//! databases; `./dev test` sets it up.

mod support;

mod bench;
mod core_run;
mod dashboard;
mod fleet;
mod hygiene;
mod loading;
mod polyglot;
mod pooler;
mod reference_jobs;
mod reload;
mod roles;
mod rollout;
mod sandbox;
mod scaffold;
mod scheduling;
mod session;
mod values;
