//! Row 1o: the host's log on the run's path, switched on for some runs of
//! the process and off for the rest.
//!
//! `jobhost run` logs every run (`run ok`, in the run's span) at the default
//! filter. The benchmark installs the host's own log layer
//! ([`jobhost::logging::layer`], text) behind a filter it can turn off, and
//! a writer it can point at the host's writer thread
//! ([`jobhost::logging::background`]) or at the run itself (a write per
//! line, as the host did before it had the thread). Both write to a file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use jobhost::logging::{DEFAULT_FILTER, LogFormat};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::EnvFilter;
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
}

/// The process's switchable log.
pub struct LogSwitch {
    filter: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    direct: Arc<AtomicBool>,
    _worker: WorkerGuard,
}

/// A writer that is the writer thread's or the file's, as `direct` says.
struct Either {
    background: NonBlocking,
    file: Arc<File>,
    direct: Arc<AtomicBool>,
}

impl<'a> MakeWriter<'a> for Either {
    type Writer = EitherWriter<NonBlocking, &'a File>;

    fn make_writer(&'a self) -> Self::Writer {
        if self.direct.load(Ordering::Relaxed) {
            EitherWriter::B(&*self.file)
        } else {
            EitherWriter::A(self.background.make_writer())
        }
    }
}

impl LogSwitch {
    /// Installs the process's subscriber, off, writing to `path`. None when
    /// `RUST_LOG` asked for the benchmark's own diagnostics instead (there
    /// is one subscriber per process).
    pub fn install(path: &Path) -> anyhow::Result<Option<Self>> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(None);
        }
        let file = Arc::new(File::create(path)?);
        let (background, worker) = jobhost::logging::background(SharedFile(Arc::clone(&file)));
        let direct = Arc::new(AtomicBool::new(false));
        let (filter, handle) = reload::Layer::new(EnvFilter::new("off"));
        tracing_subscriber::registry()
            .with(filter)
            .with(jobhost::logging::layer(
                LogFormat::Text,
                BoxMakeWriter::new(Either {
                    background,
                    file,
                    direct: direct.clone(),
                }),
            ))
            .try_init()?;
        Ok(Some(Self {
            filter: handle,
            direct,
            _worker: worker,
        }))
    }

    /// Logs as `mode` says from now on.
    pub fn set(&self, mode: Mode) -> anyhow::Result<()> {
        self.direct.store(mode == Mode::Direct, Ordering::Relaxed);
        let filter = match mode {
            Mode::Off => "off",
            Mode::Background | Mode::Direct => DEFAULT_FILTER,
        };
        self.filter.reload(EnvFilter::new(filter))?;
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
