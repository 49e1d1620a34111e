//! Bounded capture of a guest's stdout and stderr.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much a guest may write in one `write` call (the WASI stream "permit").
const WRITE_PERMIT: usize = 64 * 1024;

/// What a guest wrote to stdout and stderr during one invocation, each cut at the runtime's
/// [`max_log_bytes`](super::RuntimeConfig::max_log_bytes) and then ending with a
/// `[... N bytes truncated]` marker line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestOutput {
    /// Captured standard output (lossy UTF-8).
    pub stdout: String,
    /// Captured standard error (lossy UTF-8).
    pub stderr: String,
}

/// The longest line handed to a [`LogSink`], in bytes: a longer one is handed over in pieces.
pub const MAX_LINE_BYTES: usize = trellis_schemas::logs::MAX_LINE_BYTES;

/// Where a line of guest output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineSource<'a> {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// `wasi:logging`, with its level (`trace` … `critical`) and context.
    Log {
        /// The level.
        level: &'static str,
        /// The context the guest gave (may be empty).
        context: &'a str,
    },
}

/// Receives an invocation's output line by line as the guest writes it (see
/// [`LoadedComponent::with_log`](super::LoadedComponent::with_log)). Called on the thread that
/// runs the guest: it must not block.
pub trait LogSink: Send + Sync {
    /// One line, without its line break, at most [`MAX_LINE_BYTES`] long for stdout and stderr
    /// (`wasi:logging` messages are handed over whole).
    fn line(&self, source: LineSource<'_>, text: &str);

    /// The invocation ended; nothing more comes from it.
    fn finish(&self) {}
}

impl std::fmt::Debug for dyn LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

/// A sink and the source its lines are reported as.
#[derive(Debug, Clone)]
struct Forward {
    sink: Arc<dyn LogSink>,
    source: LineSource<'static>,
}

/// One captured stream: the guest's writes always succeed, bytes past the limit are counted and
/// dropped. With a sink, every line also goes to the sink as it completes.
#[derive(Debug, Clone)]
pub(crate) struct Capture {
    inner: Arc<Mutex<Buffer>>,
}

#[derive(Debug)]
struct Buffer {
    data: Vec<u8>,
    limit: usize,
    dropped: u64,
    forward: Option<Forward>,
    /// The line being written, not yet handed to the sink.
    pending: Vec<u8>,
    /// Pieces of the line being written already went to the sink.
    continued: bool,
}

impl Buffer {
    fn emit(forward: &Forward, bytes: &[u8]) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        forward
            .sink
            .line(forward.source, &String::from_utf8_lossy(bytes));
    }

    /// Hands every completed line of `bytes` (with what was pending) to the sink.
    fn forward(&mut self, mut bytes: &[u8]) {
        let Some(forward) = &self.forward else { return };
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n');
            let (line, rest) = match end {
                Some(i) => (&bytes[..i], &bytes[i + 1..]),
                None => (bytes, &[][..]),
            };
            let mut line = line;
            // Whole pieces of an overlong line go out as they fill.
            while self.pending.len() + line.len() >= MAX_LINE_BYTES {
                let take = MAX_LINE_BYTES - self.pending.len();
                self.pending.extend_from_slice(&line[..take]);
                Self::emit(forward, &self.pending);
                self.pending.clear();
                self.continued = true;
                line = &line[take..];
            }
            self.pending.extend_from_slice(line);
            if end.is_some() {
                // A line whose last piece already went out ends with nothing more to say.
                if !(self.continued && self.pending.is_empty()) {
                    Self::emit(forward, &self.pending);
                }
                self.pending.clear();
                self.continued = false;
            }
            bytes = rest;
        }
    }

    fn flush(&mut self) {
        if let Some(forward) = &self.forward
            && !self.pending.is_empty()
        {
            Self::emit(forward, &self.pending);
            self.pending.clear();
        }
        self.continued = false;
    }
}

impl Capture {
    /// A capture that also hands each line to `sink` as `source`.
    pub(crate) fn with_sink(
        limit: usize,
        sink: Option<(Arc<dyn LogSink>, LineSource<'static>)>,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Buffer {
                data: Vec::new(),
                limit,
                dropped: 0,
                forward: sink.map(|(sink, source)| Forward { sink, source }),
                pending: Vec::new(),
                continued: false,
            })),
        }
    }

    /// Hands the lines written from now on to `sink` instead (a store made ahead of its
    /// invocation learns the invocation's sink when it takes it).
    pub(crate) fn set_sink(&self, sink: Option<(Arc<dyn LogSink>, LineSource<'static>)>) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forward = sink.map(|(sink, source)| Forward { sink, source });
    }

    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut buffer = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Self::keep(&mut buffer, bytes);
        buffer.forward(bytes);
    }

    /// Captures `bytes` without handing them to the sink (a `wasi:logging` line, which the
    /// sink gets whole and with its level).
    pub(crate) fn push_captured_only(&self, bytes: &[u8]) {
        let mut buffer = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Self::keep(&mut buffer, bytes);
    }

    fn keep(buffer: &mut Buffer, bytes: &[u8]) {
        let room = buffer.limit.saturating_sub(buffer.data.len());
        let kept = room.min(bytes.len());
        buffer.data.extend_from_slice(&bytes[..kept]);
        buffer.dropped = buffer
            .dropped
            .saturating_add(u64::try_from(bytes.len() - kept).unwrap_or(u64::MAX));
    }

    /// Hands the unfinished last line, if any, to the sink.
    pub(crate) fn flush_line(&self) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush();
    }

    /// The captured text, with a truncation marker when bytes were dropped.
    pub(crate) fn text(&self) -> String {
        let buffer = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::from_utf8_lossy(&buffer.data).into_owned();
        if buffer.dropped > 0 {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("[... {} bytes truncated]", buffer.dropped));
        }
        text
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for Capture {
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

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl AsyncWrite for Capture {
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

/// `text` cut to at most `max` bytes, on a character boundary.
pub(crate) fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_character_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("hello", 10), "hello");
    }

    #[test]
    fn keeps_the_head_and_marks_truncation() {
        let capture = Capture::with_sink(8, None);
        capture.push(b"hello ");
        capture.push(b"world, and more");
        assert_eq!(capture.text(), "hello wo\n[... 13 bytes truncated]");
        let small = Capture::with_sink(100, None);
        small.push(b"line\n");
        assert_eq!(small.text(), "line\n");
    }

    #[derive(Default)]
    struct Lines(Mutex<Vec<(String, String)>>);

    impl LogSink for Lines {
        fn line(&self, source: LineSource<'_>, text: &str) {
            self.0
                .lock()
                .unwrap()
                .push((format!("{source:?}"), text.to_owned()));
        }
    }

    fn texts(lines: &Lines) -> Vec<String> {
        lines
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, t)| t.clone())
            .collect()
    }

    #[test]
    fn hands_complete_lines_to_the_sink_as_they_are_written() {
        let lines = Arc::new(Lines::default());
        let capture = Capture::with_sink(8, Some((lines.clone(), LineSource::Stderr)));
        capture.push(b"one\ntw");
        assert_eq!(texts(&lines), ["one"]);
        capture.push(b"o\n\nthree");
        assert_eq!(texts(&lines), ["one", "two", ""]);
        capture.flush_line();
        assert_eq!(texts(&lines), ["one", "two", "", "three"]);
        capture.flush_line();
        assert_eq!(texts(&lines).len(), 4, "nothing pending twice");
        assert_eq!(lines.0.lock().unwrap()[0].0, "Stderr");
        // The capture for crash reports is still cut at its limit; the sink gets everything.
        assert_eq!(capture.text(), "one\ntwo\n[... 6 bytes truncated]");
        capture.push_captured_only(b"[info] not forwarded\n");
        assert_eq!(texts(&lines).len(), 4);
        capture.push(b"four\r\n");
        assert_eq!(texts(&lines)[4], "four", "a CRLF ends a line too");
    }

    #[test]
    fn splits_overlong_lines_into_pieces() {
        let lines = Arc::new(Lines::default());
        let capture = Capture::with_sink(0, Some((lines.clone(), LineSource::Stdout)));
        let long = "y".repeat(MAX_LINE_BYTES * 2);
        capture.push(format!("{long}\nshort\n").as_bytes());
        let got = texts(&lines);
        assert_eq!(
            got.len(),
            3,
            "two pieces and a line: {:?}",
            got.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(got[0].len(), MAX_LINE_BYTES);
        assert_eq!(got[1].len(), MAX_LINE_BYTES);
        assert_eq!(got[2], "short");
        // Written a byte at a time, the same.
        let lines = Arc::new(Lines::default());
        let capture = Capture::with_sink(0, Some((lines.clone(), LineSource::Stdout)));
        for b in format!("{}z\n", "x".repeat(MAX_LINE_BYTES - 1)).bytes() {
            capture.push(&[b]);
        }
        let got = texts(&lines);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].len(), MAX_LINE_BYTES);
    }
}
