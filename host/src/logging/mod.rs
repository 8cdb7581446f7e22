//! The process's log: `tracing` events as text lines or JSON objects on
//! stdout, written by a thread of their own.
//!
//! Why a thread: a log line written from a run's task blocks that task, and
//! the tokio worker under it, for as long as stdout does. stdout is a pipe to
//! whatever collects the log (a terminal, journald, a container runtime's
//! log driver), and a pipe whose reader stalls fills in 64 KiB: from then on
//! every worker that logs stops, with runs' transactions open and their locks
//! held, the heartbeat stops beating, and the host looks dead to its fleet
//! while it holds its jobs. So the scheduler's process queues each line
//! ([`BUFFERED_BYTES`] at most) for a thread of its own that writes them to
//! stdout in batches ([`queue`]). When the queue is full the line is
//! dropped, never waited for: a job host keeps running its jobs rather than
//! its log. Dropped lines are counted ([`dropped_lines`]: the metric
//! `jobhost_log_lines_dropped_total`) and reported in the log once it flows
//! again ([`report_dropped`], at each heartbeat).
//!
//! Commands that print and exit (`status`, `locks`, …) write their few lines
//! directly, so that a warning keeps its place before their output.
//!
//! `RUST_LOG` is read by [`Filter`]: `tracing-subscriber`'s `EnvFilter`,
//! spared the lock it takes at each entry into a span (each poll of a run)
//! unless a directive names a span ([`filter`]).

pub mod filter;
pub mod queue;

pub use filter::Filter;

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::Layer;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::registry::LookupSpan;

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Bytes queued for the writer thread before new lines are dropped: a
/// burst of 1,000 jobs logging a dozen ~300-byte lines each.
pub const BUFFERED_BYTES: usize = 4 << 20;

/// How the host writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// Where the lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// Written by the caller, as they are made (commands that print and
    /// exit).
    Direct,
    /// Queued for a writer thread, dropped (and counted) when the queue is
    /// full (the scheduler).
    Background,
}

/// Keeps the writer thread: dropping it writes what is queued (waiting at
/// most about a second for a stalled reader) and stops the thread. Hold it
/// until the process is about to exit.
#[must_use = "dropping it stops the log's writer thread"]
pub struct Logging {
    _writer: Option<queue::Guard>,
}

/// The background writer's lines (and their count of dropped ones), once
/// [`init`] made one.
static BACKGROUND: OnceLock<queue::Lines> = OnceLock::new();
/// The count [`report_dropped`] last reported.
static REPORTED: AtomicU64 = AtomicU64::new(0);

/// Installs the process's subscriber: `RUST_LOG` filters ([`Filter`];
/// default [`DEFAULT_FILTER`]), in `format`, to stdout through `writer`.
pub fn init(format: LogFormat, writer: Writer) -> Logging {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (out, writer) = match writer {
        Writer::Direct => (BoxMakeWriter::new(std::io::stdout), None),
        Writer::Background => match queue::start(std::io::stdout(), BUFFERED_BYTES) {
            Ok((lines, guard)) => {
                let _ = BACKGROUND.set(lines.clone());
                (BoxMakeWriter::new(lines), Some(guard))
            }
            // No thread to be had: the lines are written as they come.
            Err(e) => {
                eprintln!(
                    "jobhost: cannot start the log's writer thread ({e}); writing the log directly"
                );
                (BoxMakeWriter::new(std::io::stdout), None)
            }
        },
    };
    tracing_subscriber::registry()
        .with(Filter::from_env_or(DEFAULT_FILTER))
        .with(layer(format, out, std::io::stdout().is_terminal()))
        .init();
    Logging { _writer: writer }
}

/// The host's log lines in `format`, written to `out`: what [`init`]
/// installs (and the benchmark measures, row 1o). Text is coloured only
/// when `colour` (stdout is a terminal): escape codes in a file or a log
/// collector's pipe are noise to every reader and search.
pub fn layer<S>(
    format: LogFormat,
    out: BoxMakeWriter,
    colour: bool,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let text = tracing_subscriber::fmt::layer()
        .with_writer(out)
        .with_ansi(colour);
    match format {
        LogFormat::Text => text.boxed(),
        // The run's span carries job, slot, host, lock key and run id; the
        // event's own fields are flattened beside them.
        LogFormat::Json => text
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}

/// Log lines dropped so far because the writer thread's queue was full (0
/// without a background writer).
pub fn dropped_lines() -> u64 {
    BACKGROUND.get().map_or(0, queue::Lines::dropped)
}

/// Logs how many lines were dropped since the last report, if any: called
/// at each heartbeat, so that a log which lost lines says so once it flows
/// again. The report itself may meet the full queue and be dropped too: it
/// counts as made only if no line was dropped while it was written, and is
/// made again at the next heartbeat otherwise.
pub fn report_dropped() {
    let now = dropped_lines();
    let before = REPORTED.load(Ordering::Relaxed);
    if now <= before {
        return;
    }
    tracing::warn!(
        dropped = now - before,
        dropped_total = now,
        "log lines dropped: stdout was not read as fast as the host wrote to it (jobs kept running)"
    );
    if dropped_lines() == now {
        REPORTED.store(now, Ordering::Relaxed);
    }
}
