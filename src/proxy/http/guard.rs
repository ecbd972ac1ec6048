//! A guard in front of hyper's HTTP/1 parser for the two request-smuggling shapes hyper lets
//! through: bare LF line endings (RFC 9112 §2.2 allows accepting them; another parser on the
//! path may not agree) and a head carrying both Content-Length and Transfer-Encoding (hyper
//! drops the Content-Length and keeps the connection alive). Such a request is answered 400
//! and the connection closed before hyper sees a byte of it.
//!
//! Only request heads are scanned: body bytes are skipped until the service says the body was
//! fully read, so a binary body can never be mistaken for a malformed head. HTTP/2 (h2c)
//! connections are recognised by their preface and left alone.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Written instead of passing a malformed head to hyper.
const REJECT: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nx-mtls-sidecar-error: malformed_request\r\nconnection: close\r\ncontent-length: 96\r\n\r\nmtls-sidecar: malformed request head (bare LF, or both Content-Length and Transfer-Encoding)\n";

/// Shared between the IO wrapper and the service handling the connection's requests.
#[derive(Debug, Default)]
pub struct HeadState {
    expecting_head: AtomicBool,
    violation: AtomicU8,
}

/// What the guard refused, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A line ended in LF without CR.
    BareLf,
    /// Both Content-Length and Transfer-Encoding.
    ClAndTe,
}

impl HeadState {
    /// The current request's body has been read to its end (or it had none): the next bytes
    /// on the connection start a new head.
    pub fn request_done(&self) {
        self.expecting_head.store(true, Ordering::Release);
    }

    /// The refusal, once the connection has ended.
    pub fn violation(&self) -> Option<Violation> {
        match self.violation.load(Ordering::Acquire) {
            1 => Some(Violation::BareLf),
            2 => Some(Violation::ClAndTe),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// First bytes: HTTP/1 head or the h2 preface?
    Detect,
    Head,
    Body,
    /// h2c: nothing to check.
    Off,
    /// Writing the 400; then EOF.
    Rejecting(usize),
}

/// The IO wrapper.
pub struct HeadGuard<IO> {
    io: IO,
    state: Arc<HeadState>,
    mode: Mode,
    prev: u8,
    line_start: bool,
    name: [u8; 18],
    name_len: usize,
    in_name: bool,
    saw_cl: bool,
    saw_te: bool,
    /// A request line has started: empty lines before it are skipped by the parser (RFC
    /// 9112 §2.2), so they must not end the scan either.
    seen_content: bool,
}

impl<IO> HeadGuard<IO> {
    /// Wraps a fresh connection.
    pub fn new(io: IO) -> (Self, Arc<HeadState>) {
        let state = Arc::new(HeadState::default());
        let g = HeadGuard {
            io,
            state: state.clone(),
            mode: Mode::Detect,
            prev: b'\n',
            line_start: true,
            name: [0; 18],
            name_len: 0,
            in_name: true,
            saw_cl: false,
            saw_te: false,
            seen_content: false,
        };
        (g, state)
    }

    fn start_head(&mut self) {
        self.mode = Mode::Head;
        self.prev = b'\n';
        self.line_start = true;
        self.name_len = 0;
        self.in_name = true;
        self.saw_cl = false;
        self.saw_te = false;
        self.seen_content = false;
    }

    /// Scans `bytes` of a head; returns the violation, if any.
    fn scan(&mut self, bytes: &[u8]) -> Option<Violation> {
        for &b in bytes {
            if self.mode != Mode::Head {
                // The head ended inside this read: the rest is body.
                break;
            }
            if b == b'\n' {
                if self.prev != b'\r' {
                    return Some(Violation::BareLf);
                }
                if self.line_start && self.seen_content {
                    // CRLF on an empty line: end of the head.
                    if self.saw_cl && self.saw_te {
                        return Some(Violation::ClAndTe);
                    }
                    self.mode = Mode::Body;
                }
                self.line_start = true;
                self.name_len = 0;
                self.in_name = true;
            } else if b == b'\r' {
                // A CR ends a field name (a CR inside one is malformed anyway).
                self.in_name = false;
            } else {
                self.seen_content = true;
                if self.in_name {
                    if b == b':' {
                        let name = &self.name[..self.name_len];
                        self.saw_cl |= name.eq_ignore_ascii_case(b"content-length");
                        self.saw_te |= name.eq_ignore_ascii_case(b"transfer-encoding");
                        self.in_name = false;
                    } else if self.name_len < self.name.len() {
                        self.name[self.name_len] = b;
                        self.name_len += 1;
                    } else {
                        self.in_name = false;
                    }
                }
                self.line_start = false;
            }
            self.prev = b;
        }
        None
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadGuard<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Mode::Rejecting(done) = this.mode {
                if done < REJECT.len() {
                    let n = std::task::ready!(Pin::new(&mut this.io).poll_write(cx, &REJECT[done..]))?;
                    this.mode = Mode::Rejecting(done + n);
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                std::task::ready!(Pin::new(&mut this.io).poll_flush(cx))?;
                // EOF for hyper: it never saw the malformed head.
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Body && this.state.expecting_head.swap(false, Ordering::AcqRel) {
                this.start_head();
            }
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            let new = &buf.filled()[before..];
            if this.mode == Mode::Detect && !new.is_empty() {
                this.mode = if new.starts_with(b"PRI") { Mode::Off } else { Mode::Head };
            }
            if this.mode == Mode::Head {
                if let Some(v) = this.scan(new) {
                    this.state.violation.store(v as u8 + 1, Ordering::Release);
                    buf.set_filled(before);
                    this.mode = Mode::Rejecting(0);
                    continue;
                }
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadGuard<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Scans one complete request head as the guard would (for fuzzing and tests).
pub fn check_head(head: &[u8]) -> Option<Violation> {
    let (mut g, _) = HeadGuard::new(());
    g.start_head();
    g.scan(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(head: &[u8]) -> Option<Violation> {
        let (mut g, _) = HeadGuard::new(());
        g.start_head();
        g.scan(head)
    }

    #[test]
    fn finds_bare_lf_and_cl_te() {
        assert_eq!(scan(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
        assert_eq!(scan(b"GET / HTTP/1.1\nHost: a\n\n"), Some(Violation::BareLf));
        assert_eq!(
            scan(b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n"),
            Some(Violation::BareLf)
        );
        assert_eq!(
            scan(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(Violation::ClAndTe)
        );
        assert_eq!(
            scan(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n"),
            Some(Violation::ClAndTe)
        );
        assert_eq!(
            scan(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhe\nlo"),
            None,
            "body bytes are not scanned"
        );
        assert_eq!(
            scan(b"GET / HTTP/1.1\r\nX-Content-Length-Ish: 1\r\nTransfer-Encoding: x\r\n\r\n"),
            None
        );
    }

    #[test]
    fn a_head_split_across_reads_is_scanned_whole() {
        let (mut g, _) = HeadGuard::new(());
        g.start_head();
        assert_eq!(g.scan(b"POST / HTTP/1.1\r\nContent-Le"), None);
        assert_eq!(g.scan(b"ngth: 5\r\nTransfer-Enc"), None);
        assert_eq!(g.scan(b"oding: chunked\r\n\r\n"), Some(Violation::ClAndTe));
    }
}
