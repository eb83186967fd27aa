//! Plugin stdout and stderr: what a plugin prints goes to the host's log, a line at a time,
//! tagged with the plugin id, through streams that never block. wasmtime-wasi's synchronous
//! bindings run the blocking stream calls (`blocking-write-and-flush`, a stream's drop) by
//! blocking on the async runtime, which a runtime thread (where plugin calls run) may not do;
//! [`link`] replaces those calls with synchronous ones over the same streams.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::bindings::sync::io::streams;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// The longest line logged as one; a longer one is logged in pieces of this size.
const MAX_LINE: usize = 4096;
/// How much a plugin may write at once (the WASI "permit"; blocking writes take at most 4096).
const PERMIT: usize = 64 << 10;

/// Which of the two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Stdout,
    Stderr,
}

/// A plugin's stdout or stderr, for [`wasmtime_wasi::WasiCtxBuilder::stdout`].
#[derive(Debug, Clone)]
pub struct LogStdio {
    plugin: Arc<str>,
    which: Which,
}

impl LogStdio {
    pub fn new(plugin: &str, which: Which) -> LogStdio {
        LogStdio {
            plugin: plugin.into(),
            which,
        }
    }
}

impl IsTerminal for LogStdio {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStdio {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogStream {
            out: self.clone(),
            line: Vec::new(),
        })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LogStream {
            out: self.clone(),
            line: Vec::new(),
        })
    }
}

/// One open stream: bytes are collected into lines, each logged when complete (and the rest
/// when the stream is dropped).
struct LogStream {
    out: LogStdio,
    line: Vec<u8>,
}

impl LogStream {
    fn take(&mut self, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&bytes[..end]);
            self.emit();
            bytes = &bytes[end + 1..];
        }
        self.line.extend_from_slice(bytes);
        while self.line.len() >= MAX_LINE {
            let rest = self.line.split_off(MAX_LINE);
            self.emit();
            self.line = rest;
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches('\r');
        let plugin = &*self.out.plugin;
        match self.out.which {
            Which::Stdout => tracing::info!(plugin, stream = "stdout", "{text}"),
            Which::Stderr => tracing::warn!(plugin, stream = "stderr", "{text}"),
        }
        self.line.clear();
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(PERMIT)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.take(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Replaces the blocking calls of `wasi:io/streams` in `linker` (where wasmtime-wasi linked
/// its own) with synchronous ones. A plugin's only streams are its stdio: stdout and stderr
/// ([`LogStdio`], always ready), and an empty stdin.
pub fn link<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let linked = streams::add_to_linker::<T, NonBlocking>(linker, |t| Io(t.ctx().table));
    linker.allow_shadowing(false);
    linked
}

struct NonBlocking;

impl HasData for NonBlocking {
    type Data<'a> = Io<'a>;
}

/// The resource table, seen through synchronous stream calls.
struct Io<'a>(&'a mut ResourceTable);

type OutRes = Resource<streams::OutputStream>;
type InRes = Resource<streams::InputStream>;

impl Io<'_> {
    /// Writes all of `bytes` to a stream that is ready (a plugin's stdio always is), then
    /// flushes; a stream that is not ready fails the write instead of blocking the thread.
    fn write_now(&mut self, stream: &OutRes, bytes: &[u8]) -> StreamResult<()> {
        if bytes.len() > 4096 {
            return Err(StreamError::trap(
                "blocking writes take at most 4096 bytes at a time",
            ));
        }
        let s = self.0.get_mut(stream)?;
        let mut rest = bytes;
        while !rest.is_empty() {
            let permit = s.check_write()?;
            if permit == 0 {
                return Err(StreamError::LastOperationFailed(wasmtime::Error::msg(
                    "the stream is not ready, and plugin calls cannot wait",
                )));
            }
            let n = permit.min(rest.len());
            s.write(Bytes::copy_from_slice(&rest[..n]))?;
            rest = &rest[n..];
        }
        s.flush()
    }
}

impl streams::Host for Io<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.0, err)
    }
}

impl streams::HostOutputStream for Io<'_> {
    fn drop(&mut self, stream: OutRes) -> wasmtime::Result<()> {
        // Nothing of a plugin's streams runs in the background: there is nothing to cancel.
        self.0.delete(stream)?;
        Ok(())
    }

    fn check_write(&mut self, stream: OutRes) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(self.0, stream)
    }

    fn write(&mut self, stream: OutRes, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(&mut self, stream: OutRes, bytes: Vec<u8>) -> StreamResult<()> {
        self.write_now(&stream, &bytes)
    }

    fn blocking_write_zeroes_and_flush(&mut self, stream: OutRes, len: u64) -> StreamResult<()> {
        let len = usize::try_from(len).unwrap_or(usize::MAX).min(4097);
        self.write_now(&stream, &vec![0; len])
    }

    fn subscribe(&mut self, stream: OutRes) -> wasmtime::Result<Resource<streams::Pollable>> {
        streams::HostOutputStream::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: OutRes, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: OutRes) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: OutRes) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.0, stream)
    }

    fn splice(&mut self, dst: OutRes, src: InRes, len: u64) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.0, dst, src, len)
    }

    fn blocking_splice(&mut self, dst: OutRes, src: InRes, len: u64) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.0, dst, src, len)
    }
}

impl streams::HostInputStream for Io<'_> {
    fn drop(&mut self, stream: InRes) -> wasmtime::Result<()> {
        self.0.delete(stream)?;
        Ok(())
    }

    fn read(&mut self, stream: InRes, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.0, stream, len)
    }

    fn blocking_read(&mut self, stream: InRes, len: u64) -> StreamResult<Vec<u8>> {
        // A plugin's stdin is empty: a read never has to wait.
        streams::HostInputStream::read(self.0, stream, len)
    }

    fn skip(&mut self, stream: InRes, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: InRes, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.0, stream, len)
    }

    fn subscribe(&mut self, stream: InRes) -> wasmtime::Result<Resource<streams::Pollable>> {
        streams::HostInputStream::subscribe(self.0, stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> LogStream {
        LogStream {
            out: LogStdio::new("p", Which::Stdout),
            line: Vec::new(),
        }
    }

    #[test]
    fn lines_are_cut_at_newlines_and_at_the_longest_line() {
        let mut s = stream();
        s.take(b"hello\nwor");
        assert_eq!(s.line, b"wor");
        s.take(b"ld\n");
        assert!(s.line.is_empty());
        s.take(&vec![b'x'; MAX_LINE * 2 + 5]);
        assert_eq!(s.line.len(), 5);
    }
}
