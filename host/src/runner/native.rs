//! The benchmark's native twin of an `xact` run (feature `bench`): the same
//! [open](Runner::open) and [close](Runner::close) as a plugin's run, with
//! native Rust in place of the plugin, so the benchmark measures what the
//! sandbox adds and nothing else. Not part of a production build.

use chrono::{DateTime, Utc};

use super::{Job, RunResult, Runner};
use crate::runtime::bindings::types::{Failure, Report};
use crate::runtime::{Invocation, Lent, Returned};

/// Native work: gets the run's locked transaction, returns a summary or an
/// error message.
pub type NativeWork = Box<
    dyn for<'c> FnOnce(
            &'c mut sqlx::PgConnection,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<String, String>> + Send + 'c>,
        > + Send,
>;

impl Runner {
    /// Runs `slot` of an `xact` job through exactly the plugin's path (span
    /// and metrics, lock, history checks, backstops, savepoint, verify,
    /// record, commit) with `work` in place of the plugin; `None` is a body
    /// that does nothing and never touches the connection (the twin of a
    /// plugin that sends no SQL, which the post-run check skips alike).
    pub async fn run_native(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
        work: Option<NativeWork>,
    ) -> anyhow::Result<RunResult> {
        self.around(job, slot, self.native_xact(job, slot, work))
            .await
    }

    /// The twin's body: open, `work` on the run's connection, close.
    async fn native_xact(
        &self,
        job: &Job,
        slot: DateTime<Utc>,
        work: Option<NativeWork>,
    ) -> anyhow::Result<RunResult> {
        let (mut opened, ()) = match self.open(job, slot, std::future::ready(())).await? {
            Ok(opened) => opened,
            Err(skip) => return Ok(skip),
        };
        let returned = match work {
            None => Returned::Value(Ok(Report {
                summary: String::new(),
            })),
            Some(work) => match opened.handle.connection() {
                Some(conn) => Returned::Value(
                    work(conn)
                        .await
                        .map(|summary| Report { summary })
                        .map_err(|message| Failure { message, sql: None }),
                ),
                None => Returned::Trap(wasmtime::Error::msg("no transaction")),
            },
        };
        let invocation = Invocation {
            returned,
            lent: Lent::Transaction(opened.handle),
            spent: None,
            output: String::new(),
            output_dropped: 0,
            last_error: None,
        };
        Ok(self.close(job, opened.run, invocation).await)
    }
}
