//! The log's writer thread and the bounded queue in front of it.
//!
//! A log line costs the task that makes it a copy into the queue under a
//! mutex held for that copy, never a write and, while lines keep coming,
//! never a wake-up: the thread writes what has gathered in one `write`, then
//! sleeps [`GATHER`] before it looks again, and only when it found nothing
//! does it wait to be woken by the next line. (`tracing-appender`'s
//! non-blocking writer, tried first, wakes its thread for every line: on a
//! 2-vCPU VM that was 35–40 µs more host CPU per logged run than a direct
//! write, against ~5 µs, within the measure's ±10 µs, for this queue;
//! `jobhost-bench --only log`, BENCHMARKS.md.)
//!
//! The queue holds at most `capacity` bytes. A line that does not fit is
//! dropped and counted, never waited for: a stalled reader (a full pipe)
//! blocks the thread's `write`, not the runs.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long the thread lets lines gather after a write before it looks
/// again: at most this late, a line reaches stdout (when it flows).
pub const GATHER: Duration = Duration::from_millis(10);

/// How long dropping a [`Guard`] waits for the thread to write what is
/// queued: a stalled reader must not keep the process from exiting.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

struct Shared {
    state: Mutex<State>,
    /// Signalled by the first line after the thread went idle, and at close.
    wake: Condvar,
    /// Signalled by the thread when it has written everything after close.
    done: Condvar,
    capacity: usize,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    queued: Vec<u8>,
    /// The thread waits on `wake` (nothing was queued when it looked).
    idle: bool,
    closed: bool,
    finished: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where log lines are written: the queue's sending side (cheap to clone).
#[derive(Clone)]
pub struct Lines {
    shared: Arc<Shared>,
}

/// Owns the writer thread: dropping it writes what is queued (waiting at
/// most a second for a stalled sink) and stops the thread.
pub struct Guard {
    shared: Arc<Shared>,
}

/// Starts the thread that writes the lines sent to [`Lines`] into `sink`,
/// holding at most `capacity` bytes waiting.
pub fn start(
    sink: impl Write + Send + 'static,
    capacity: usize,
) -> std::io::Result<(Lines, Guard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        done: Condvar::new(),
        capacity,
        dropped: AtomicU64::new(0),
    });
    let writer = shared.clone();
    std::thread::Builder::new()
        .name("jobhost-log".into())
        .spawn(move || write_until_closed(&writer, sink))?;
    Ok((
        Lines {
            shared: shared.clone(),
        },
        Guard { shared },
    ))
}

fn write_until_closed(shared: &Shared, mut sink: impl Write) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut state = shared.lock();
            while state.queued.is_empty() && !state.closed {
                state.idle = true;
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.idle = false;
            std::mem::swap(&mut batch, &mut state.queued);
            state.closed
        };
        // A sink that fails (stdout closed) loses these lines; the host
        // goes on, as it would with a dropped line.
        let _ = sink.write_all(&batch).and_then(|()| sink.flush());
        batch.clear();
        if closed {
            let mut state = shared.lock();
            if state.queued.is_empty() {
                state.finished = true;
                shared.done.notify_all();
                return;
            }
        }
        std::thread::sleep(GATHER);
    }
}

impl Lines {
    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Write for Lines {
    /// Queues `buf` whole (the log's layer writes one event per call), or
    /// drops and counts it if it does not fit.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.lock();
        if state.queued.len() + buf.len() > self.shared.capacity {
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(buf.len());
        }
        state.queued.extend_from_slice(buf);
        if state.idle {
            state.idle = false;
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Lines;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        self.shared.wake.notify_one();
        let deadline = std::time::Instant::now() + FLUSH_AT_EXIT;
        while !state.finished {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            state = match self.shared.done.wait_timeout(state, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose writes can be held up, as a pipe whose reader stalls.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        stalled: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _wait = self.stalled.lock().unwrap();
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(sink: &Sink) -> String {
        String::from_utf8(sink.written.lock().unwrap().clone()).unwrap()
    }

    /// Lines arrive whole and in order, many to a write, and what is queued
    /// at the end is written when the guard goes.
    #[test]
    fn lines_are_written_in_order_in_batches() {
        let sink = Sink::default();
        let (lines, guard) = start(sink.clone(), 1 << 20).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        for i in 0..1000 {
            lines
                .clone()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        assert_eq!(text(&sink), expected);
        let writes = sink.writes.load(Ordering::Relaxed);
        assert!(writes < 100, "{writes} writes for 1000 lines");
        assert_eq!(lines.dropped(), 0);
    }

    /// While the sink is stalled the writers go on: what does not fit is
    /// dropped and counted, what fits is written once the sink flows.
    #[test]
    fn a_stalled_sink_drops_and_counts_what_does_not_fit() {
        let sink = Sink::default();
        let stall = sink.stalled.lock().unwrap();
        let (lines, guard) = start(sink.clone(), 100).unwrap();
        // The thread takes the first line and blocks writing it.
        lines.clone().write_all(b"first\n").unwrap();
        while !sink_is_waiting(&lines) {
            std::thread::yield_now();
        }
        for i in 0..30 {
            lines
                .clone()
                .write_all(format!("line {i:02}\n").as_bytes())
                .unwrap();
        }
        // 8 bytes a line: 12 fit in 100.
        assert_eq!(lines.dropped(), 18);
        drop(stall);
        drop(guard);
        let expected: String = std::iter::once("first\n".to_owned())
            .chain((0..12).map(|i| format!("line {i:02}\n")))
            .collect();
        assert_eq!(text(&sink), expected);
    }

    /// The first line has left the queue for the sink.
    fn sink_is_waiting(lines: &Lines) -> bool {
        let state = lines.shared.lock();
        state.queued.is_empty() && !state.idle
    }

    /// A sink that never takes its bytes keeps the guard's drop waiting no
    /// longer than [`FLUSH_AT_EXIT`].
    #[test]
    fn exit_does_not_wait_for_a_stalled_sink() {
        let sink = Sink::default();
        let _stall = sink.stalled.lock().unwrap();
        let (lines, guard) = start(sink.clone(), 100).unwrap();
        lines.clone().write_all(b"stuck\n").unwrap();
        let t = std::time::Instant::now();
        drop(guard);
        assert!(t.elapsed() < FLUSH_AT_EXIT + Duration::from_millis(500));
    }
}
