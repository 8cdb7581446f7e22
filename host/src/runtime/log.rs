//! The `log` capability: plugin events land in the host's `tracing`, tagged with
//! the job and slot, under the target `jobhost::plugin`.

use super::RunState;
use super::bindings::log::{self, Level};

/// Longest message or field list accepted from a plugin; longer ones are cut so
/// a buggy plugin cannot flood the host's log pipeline.
const MAX_LOG_BYTES: usize = 8 * 1024;

fn capped(mut s: String) -> String {
    if s.len() > MAX_LOG_BYTES {
        let mut cut = MAX_LOG_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("…[truncated]");
    }
    s
}

impl log::Host for RunState {
    async fn log(
        &mut self,
        level: Level,
        message: String,
        fields: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        let message = capped(message);
        let fields = capped(
            fields
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
        if level == Level::Error {
            self.last_error = Some(message.clone());
        }
        let (job, slot) = (&*self.job, &*self.slot);
        macro_rules! emit {
            ($lvl:expr) => {
                tracing::event!(target: "jobhost::plugin", $lvl, job, slot, fields = %fields, "{message}")
            };
        }
        match level {
            Level::Trace => emit!(tracing::Level::TRACE),
            Level::Debug => emit!(tracing::Level::DEBUG),
            Level::Info => emit!(tracing::Level::INFO),
            Level::Warn => emit!(tracing::Level::WARN),
            Level::Error => emit!(tracing::Level::ERROR),
        }
        Ok(())
    }
}
