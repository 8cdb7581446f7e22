//! Row 1o: the host's log on the run's path, switched on for some runs of
//! the process and off for the rest.
//!
//! `jobhost run` logs every run (`run ok`, in the run's span) at the default
//! filter. The benchmark installs the host's own log layer
//! ([`jobhost::logging::layer`], text) behind a filter it can turn off, and
//! a writer it can point at the host's writer thread
//! ([`jobhost::logging::queue`]), at the run itself (a write per line, as
//! the host did before it had the thread), or (`--only log`) at
//! `tracing-appender`'s non-blocking writer, the alternative the host's
//! thread was measured against. All write to one file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use jobhost::logging::queue;
use jobhost::logging::{DEFAULT_FILTER, Filter, LogFormat};
use std::sync::atomic::AtomicU8;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, EitherWriter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How row 1o's runs write their log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No log (the filter is off): what every other row measures.
    Off,
    /// Through the host's writer thread, as `jobhost run` writes.
    Background,
    /// Written by the run's own thread, a `write` per line.
    Direct,
    /// Through `tracing-appender`'s non-blocking writer (its thread woken
    /// for each line).
    Appender,
}

/// The process's switchable log.
pub struct LogSwitch {
    filter: reload::Handle<Filter, tracing_subscriber::Registry>,
    writer: Arc<AtomicU8>,
    _queue: queue::Guard,
    _appender: WorkerGuard,
}

/// A writer that is the host's queue, the file or `tracing-appender`'s, as
/// `writer` says.
struct Switched {
    queue: queue::Lines,
    file: Arc<File>,
    appender: NonBlocking,
    writer: Arc<AtomicU8>,
}

impl<'a> MakeWriter<'a> for Switched {
    type Writer = EitherWriter<queue::Lines, EitherWriter<&'a File, NonBlocking>>;

    fn make_writer(&'a self) -> Self::Writer {
        match self.writer.load(Ordering::Relaxed) {
            DIRECT => EitherWriter::B(EitherWriter::A(&*self.file)),
            APPENDER => EitherWriter::B(EitherWriter::B(self.appender.make_writer())),
            _ => EitherWriter::A(self.queue.clone()),
        }
    }
}

const DIRECT: u8 = 1;
const APPENDER: u8 = 2;

impl LogSwitch {
    /// Installs the process's subscriber, off, writing to `path`. None when
    /// `RUST_LOG` asked for the benchmark's own diagnostics instead (there
    /// is one subscriber per process).
    pub fn install(path: &Path) -> anyhow::Result<Option<Self>> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(None);
        }
        let file = Arc::new(File::create(path)?);
        let (queue, queue_guard) = queue::start(
            SharedFile(Arc::clone(&file)),
            jobhost::logging::BUFFERED_BYTES,
        )?;
        let (appender, appender_guard) = NonBlockingBuilder::default()
            .lossy(true)
            .finish(SharedFile(Arc::clone(&file)));
        let writer = Arc::new(AtomicU8::new(0));
        let (filter, handle) = reload::Layer::new(Filter::new("off")?);
        tracing_subscriber::registry()
            .with(filter)
            .with(jobhost::logging::layer(
                LogFormat::Text,
                BoxMakeWriter::new(Switched {
                    queue,
                    file,
                    appender,
                    writer: writer.clone(),
                }),
                false,
            ))
            .try_init()?;
        Ok(Some(Self {
            filter: handle,
            writer,
            _queue: queue_guard,
            _appender: appender_guard,
        }))
    }

    /// Logs as `mode` says from now on.
    pub fn set(&self, mode: Mode) -> anyhow::Result<()> {
        let writer = match mode {
            Mode::Direct => DIRECT,
            Mode::Appender => APPENDER,
            Mode::Off | Mode::Background => 0,
        };
        self.writer.store(writer, Ordering::Relaxed);
        let filter = match mode {
            Mode::Off => "off",
            Mode::Background | Mode::Direct | Mode::Appender => DEFAULT_FILTER,
        };
        self.filter.reload(Filter::new(filter)?)?;
        Ok(())
    }
}

/// The log file, shared by the writer thread and the direct writes.
struct SharedFile(Arc<File>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}
