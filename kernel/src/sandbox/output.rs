//! The guest's stdout and stderr: WASI output streams that forward each write to the kernel as
//! it happens (so a cell's output streams while it runs), count bytes against the cell's output
//! cap, and decode UTF-8 across write boundaries.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::{Event, EventSink, StreamName};

/// What one cell may still publish, shared by both streams and the door's displays.
#[derive(Debug)]
pub(crate) struct OutputBudget {
    used: AtomicU64,
    cap: u64,
    /// Set once the notice that output was dropped has been sent for this cell.
    noticed: std::sync::atomic::AtomicBool,
}

impl OutputBudget {
    pub(crate) fn new(cap: u64) -> Self {
        OutputBudget {
            used: AtomicU64::new(0),
            cap,
            noticed: false.into(),
        }
    }

    /// A new cell starts with the whole budget.
    pub(crate) fn reset(&self) {
        self.used.store(0, Ordering::Relaxed);
        self.noticed.store(false, Ordering::Relaxed);
    }

    /// Takes `n` bytes from the budget; false if they are over it. The first time the cap is
    /// hit in a cell, a notice goes to `sink` on stderr.
    pub(crate) fn take(&self, n: usize, sink: &EventSink) -> bool {
        let before = self.used.fetch_add(n as u64, Ordering::Relaxed);
        if before.saturating_add(n as u64) <= self.cap {
            return true;
        }
        if !self.noticed.swap(true, Ordering::Relaxed) {
            sink.send(Event::Stream {
                name: StreamName::Stderr,
                text: format!(
                    "\n[sandgate] output limit reached: this cell published more than {} bytes; \
                     further output of this cell is dropped (the cell keeps running)\n",
                    self.cap
                ),
            });
        }
        false
    }
}

/// One of the guest's two output streams.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    name: StreamName,
    sink: EventSink,
    budget: Arc<OutputBudget>,
    /// Bytes of an incomplete UTF-8 sequence left by the previous write.
    carry: Arc<Mutex<Vec<u8>>>,
}

impl GuestOutput {
    pub(crate) fn new(name: StreamName, sink: EventSink, budget: Arc<OutputBudget>) -> Self {
        GuestOutput {
            name,
            sink,
            budget,
            carry: Arc::default(),
        }
    }

    fn forward(&self, bytes: &[u8]) {
        if !self.budget.take(bytes.len(), &self.sink) {
            return;
        }
        let text = {
            let mut carry = self.carry.lock().unwrap_or_else(|e| e.into_inner());
            carry.extend_from_slice(bytes);
            let valid = match std::str::from_utf8(&carry) {
                Ok(_) => carry.len(),
                // An incomplete sequence at the end waits for the next write; an invalid one is
                // replaced, as Python's `errors="replace"` would.
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => carry.len(),
            };
            let rest = carry.split_off(valid);
            let text = String::from_utf8_lossy(&carry).into_owned();
            *carry = rest;
            text
        };
        if !text.is_empty() {
            self.sink.send(Event::Stream {
                name: self.name,
                text,
            });
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.forward(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.forward(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output() -> (GuestOutput, tokio::sync::mpsc::Receiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let sink = EventSink::new(tx, Default::default());
        (
            GuestOutput::new(StreamName::Stdout, sink, Arc::new(OutputBudget::new(10))),
            rx,
        )
    }

    #[test]
    fn split_utf8_is_joined() {
        let (out, mut rx) = output();
        let snow = "☃".as_bytes();
        out.forward(&snow[..1]);
        out.forward(&snow[1..]);
        match rx.try_recv().unwrap() {
            Event::Stream { text, .. } => assert_eq!(text, "☃"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn cap_sends_one_notice_then_drops() {
        let (out, mut rx) = output();
        out.forward(b"0123456789");
        out.forward(b"more");
        out.forward(b"and more");
        let mut texts = vec![];
        while let Ok(Event::Stream { text, .. }) = rx.try_recv() {
            texts.push(text);
        }
        assert_eq!(texts.len(), 2);
        assert_eq!(texts[0], "0123456789");
        assert!(texts[1].contains("output limit reached"));
    }
}
