//! A plugin's stdout and stderr: captured for the host's log, kept up to a
//! cap, and the rest counted and dropped.
//!
//! Why not wasmtime's `MemoryOutputPipe`: it refuses writes past its
//! capacity, and a Rust guest's `println!` panics on a refused write, so a
//! chatty plugin would trap and lose its run. Output is diagnostics; it is
//! never worth a run. Here every write succeeds, and the runner logs how many
//! bytes were dropped.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much a guest may write per call; it is always ready for more.
const WRITE_PERMIT: usize = 64 * 1024;

/// Shared by the guest's stdout and stderr and by the host, which reads it
/// after the run.
#[derive(Clone)]
pub struct CappedOutput {
    cap: usize,
    captured: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    dropped: u64,
}

impl CappedOutput {
    /// Keeps the first `cap` bytes written.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            captured: Arc::default(),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut c = self.captured.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.cap.saturating_sub(c.kept.len());
        let keep = room.min(bytes.len());
        c.kept.extend_from_slice(&bytes[..keep]);
        c.dropped += (bytes.len() - keep) as u64;
    }

    /// What was kept (lossy UTF-8), and how many bytes were dropped past the cap.
    pub fn contents(&self) -> (String, u64) {
        let c = self.captured.lock().unwrap_or_else(|p| p.into_inner());
        (String::from_utf8_lossy(&c.kept).into_owned(), c.dropped)
    }
}

#[async_trait::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

#[async_trait::async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_cap_and_counts_the_rest() {
        let out = CappedOutput::new(10);
        let mut stream = out.p2_stream();
        stream.write(Bytes::from_static(b"hello ")).unwrap();
        stream
            .write(Bytes::from_static(b"world, and more"))
            .unwrap();
        assert_eq!(stream.check_write().unwrap(), WRITE_PERMIT, "never full");
        assert_eq!(out.contents(), ("hello worl".to_owned(), 11));
    }
}
