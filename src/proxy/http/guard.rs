//! A guard in front of hyper's HTTP/1 parser for the two request-smuggling shapes hyper lets
//! through: bare LF line endings (RFC 9112 §2.2 allows accepting them; another parser on the
//! path may not agree) and a head carrying both Content-Length and Transfer-Encoding (hyper
//! drops the Content-Length and keeps the connection alive). Such a request is answered 400
//! and the connection closed before hyper sees a byte of it.
//!
//! Only request heads are scanned: body bytes are skipped until the service says the body was
//! fully read, so a binary body can never be mistaken for a malformed head. HTTP/2 (h2c)
//! connections are recognised by their preface and left alone.
//!
//! The guard also keeps the HTTP/1.1 deadlines, because it sees where a head starts: between
//! requests a connection may stay idle for `keepalive_timeout` (then it is closed quietly, as
//! any keep-alive server does); once the first byte of a head arrives, the whole head must
//! follow within `header_read_timeout` (else 408 and close, counted `header_timeout`). hyper's
//! single timer cannot tell the two apart: it starts when the connection goes idle.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Written instead of passing a malformed head to hyper.
const REJECT: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nx-mtls-sidecar-error: malformed_request\r\nconnection: close\r\ncontent-length: 93\r\n\r\nmtls-sidecar: malformed request head (bare LF, or both Content-Length and Transfer-Encoding)\n";

/// Written when a started head did not complete within `header_read_timeout`.
const TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nx-mtls-sidecar-error: header_timeout\r\nconnection: close\r\ncontent-length: 73\r\n\r\nmtls-sidecar: the request head did not arrive within header_read_timeout\n";

/// Shared between the IO wrapper and the service handling the connection's requests.
#[derive(Debug)]
pub struct HeadState {
    expecting_head: AtomicBool,
    /// The connection may switch protocols (a WebSocket upgrade is being forwarded): what
    /// follows is not HTTP/1 and must never be scanned as a head.
    upgrading: AtomicBool,
    violation: AtomicU8,
    /// Requests whose response has not been sent completely.
    in_flight: AtomicUsize,
    /// When the connection last became idle (no request in flight), in ms since `born`.
    idle_since_ms: AtomicU64,
    /// Closed by the keep-alive idle timeout.
    idle_closed: AtomicBool,
    born: Instant,
}

impl Default for HeadState {
    fn default() -> Self {
        HeadState {
            expecting_head: AtomicBool::new(false),
            upgrading: AtomicBool::new(false),
            violation: AtomicU8::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            idle_closed: AtomicBool::new(false),
            born: Instant::now(),
        }
    }
}

/// A request being answered; dropped when its response has been sent completely (or was
/// abandoned). Until then the connection is not idle.
#[derive(Debug)]
pub struct InFlight(Arc<HeadState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        let now = u64::try_from(s.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        s.idle_since_ms.store(now, Ordering::Release);
        s.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the guard refused, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A line ended in LF without CR.
    BareLf,
    /// Both Content-Length and Transfer-Encoding.
    ClAndTe,
    /// A head started but did not complete within `header_read_timeout` (answered 408).
    HeadTimeout,
}

impl HeadState {
    /// The current request's body has been read to its end (or it had none): the next bytes
    /// on the connection start a new head.
    pub fn request_done(&self) {
        self.expecting_head.store(true, Ordering::Release);
    }

    /// A WebSocket upgrade request is being forwarded: stop scanning this connection for good.
    /// Call it before the request is answered (the app sends frames only after the 101); a
    /// refused upgrade must close the connection, as no later head would be scanned.
    pub fn upgrading(&self) {
        self.upgrading.store(true, Ordering::Release);
    }

    /// A request arrived; keep the returned value until its response has been sent.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// How long the connection has had no request in flight (`None` while one is).
    pub fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.born.elapsed().saturating_sub(since))
    }

    /// Whether the guard closed the connection for being idle past `keepalive_timeout`.
    pub fn idle_closed(&self) -> bool {
        self.idle_closed.load(Ordering::Acquire)
    }

    /// Whether `upgrading` was called.
    pub fn is_upgrading(&self) -> bool {
        self.upgrading.load(Ordering::Acquire)
    }

    /// The refusal, once the connection has ended.
    pub fn violation(&self) -> Option<Violation> {
        match self.violation.load(Ordering::Acquire) {
            1 => Some(Violation::BareLf),
            2 => Some(Violation::ClAndTe),
            3 => Some(Violation::HeadTimeout),
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
    /// Writing a refusal (400 or 408); then EOF.
    Rejecting(&'static [u8], usize),
}

/// Which deadline the guard's timer stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Armed {
    /// Off: a request is being answered, or its body read.
    Off,
    /// Between requests: `keepalive_timeout` from when the last response was sent.
    Idle,
    /// A head has started: `header_read_timeout` from its first byte.
    Head,
}

/// The HTTP/1.1 deadlines of one connection.
///
/// The timer is lazy: moving the deadline later (every request does) only records it, and
/// the timer, when it fires early, is re-armed for the recorded deadline. Only an earlier
/// deadline resets it at once. That keeps timer-wheel work off the per-request path.
struct Deadlines {
    header_read: Duration,
    keepalive: Duration,
    sleep: Pin<Box<Sleep>>,
    deadline: tokio::time::Instant,
    armed: Armed,
}

impl Deadlines {
    fn arm(&mut self, what: Armed, after: Duration) {
        self.armed = what;
        self.deadline = tokio::time::Instant::now() + after;
        if self.deadline < self.sleep.deadline() {
            self.sleep.as_mut().reset(self.deadline);
        }
    }

    /// Whether the armed deadline has passed (registers for a wake-up if not).
    fn passed(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if tokio::time::Instant::now() >= self.deadline {
                return true;
            }
            let d = self.deadline;
            self.sleep.as_mut().reset(d);
        }
    }
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
    /// Bytes already taken from the socket before hyper started (at most two, see
    /// `http::sniff`), handed to hyper first.
    replay: [u8; 2],
    replay_len: u8,
    /// A byte of the current head has arrived.
    head_started: bool,
    deadlines: Option<Deadlines>,
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
            replay: [0; 2],
            replay_len: 0,
            head_started: false,
            deadlines: None,
        };
        (g, state)
    }

    /// Keeps the HTTP/1.1 deadlines (see the module documentation). The first head, whose
    /// first bytes have already arrived, must be complete by `first_head_by`. Needs a Tokio
    /// runtime with time enabled.
    pub fn with_deadlines(mut self, header_read: Duration, keepalive: Duration, first_head_by: Instant) -> Self {
        self.head_started = true;
        let first_head_by = tokio::time::Instant::from_std(first_head_by);
        self.deadlines = Some(Deadlines {
            header_read,
            keepalive,
            sleep: Box::pin(tokio::time::sleep_until(first_head_by)),
            deadline: first_head_by,
            armed: if self.mode == Mode::Off {
                Armed::Off
            } else {
                Armed::Head
            },
        });
        self
    }

    /// The protocol is already known from the first bytes (`h2`: the h2c preface), and
    /// `taken` (at most two bytes, already read from `io` while deciding) goes to the reader
    /// before anything else read from `io`.
    pub fn sniffed(mut self, h2: bool, taken: &[u8]) -> Self {
        if h2 {
            self.mode = Mode::Off;
        } else {
            self.start_head();
        }
        let n = taken.len().min(self.replay.len());
        self.replay[..n].copy_from_slice(&taken[..n]);
        self.replay_len = u8::try_from(n).unwrap_or(0);
        self
    }

    fn start_head(&mut self) {
        self.mode = Mode::Head;
        self.head_started = false;
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

impl<IO> HeadGuard<IO> {
    /// Before a read in `Head` mode: between requests, once the last response has been sent,
    /// the idle deadline runs.
    fn arm_idle(&mut self) {
        let Some(d) = self.deadlines.as_mut() else {
            return;
        };
        if self.mode != Mode::Head || self.head_started {
            return;
        }
        let idle = self.state.in_flight.load(Ordering::Acquire) == 0;
        match (d.armed, idle) {
            (Armed::Off, true) => {
                let after = d.keepalive;
                d.arm(Armed::Idle, after);
            }
            (Armed::Idle, false) => d.armed = Armed::Off,
            _ => {}
        }
    }

    /// After a read that returned `new` in `Head` mode (before scanning it).
    fn on_head_bytes(&mut self, new: &[u8]) {
        if self.head_started || new.is_empty() {
            return;
        }
        self.head_started = true;
        if let Some(d) = self.deadlines.as_mut() {
            let after = d.header_read;
            d.arm(Armed::Head, after);
        }
    }

    /// The read would block: has a deadline passed? `Some(true)` for the idle one.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let d = self.deadlines.as_mut()?;
        if d.armed == Armed::Off || !d.passed(cx) {
            return None;
        }
        let idle = d.armed == Armed::Idle;
        d.armed = Armed::Off;
        Some(idle)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadGuard<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Mode::Rejecting(reply, done) = this.mode {
                if done < reply.len() {
                    let n = std::task::ready!(Pin::new(&mut this.io).poll_write(cx, &reply[done..]))?;
                    this.mode = Mode::Rejecting(reply, done + n);
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                std::task::ready!(Pin::new(&mut this.io).poll_flush(cx))?;
                // EOF for hyper: it never saw the malformed head.
                return Poll::Ready(Ok(()));
            }
            if this.mode != Mode::Off && this.state.upgrading.load(Ordering::Acquire) {
                this.mode = Mode::Off;
                if let Some(d) = this.deadlines.as_mut() {
                    d.armed = Armed::Off;
                }
            }
            if this.mode == Mode::Body && this.state.expecting_head.swap(false, Ordering::AcqRel) {
                this.start_head();
            }
            this.arm_idle();
            let before = buf.filled().len();
            if this.replay_len > 0 && buf.remaining() > 0 {
                let n = usize::from(this.replay_len).min(buf.remaining());
                buf.put_slice(&this.replay[..n]);
                this.replay.copy_within(n.., 0);
                this.replay_len = u8::try_from(usize::from(this.replay_len) - n).unwrap_or(0);
            } else if let Poll::Ready(r) = Pin::new(&mut this.io).poll_read(cx, buf) {
                r?;
            } else {
                match this.deadline_passed(cx) {
                    None => return Poll::Pending,
                    Some(true) => {
                        // Idle past keepalive_timeout: EOF between requests, a quiet close.
                        this.state.idle_closed.store(true, Ordering::Release);
                        return Poll::Ready(Ok(()));
                    }
                    Some(false) => {
                        this.state
                            .violation
                            .store(Violation::HeadTimeout as u8 + 1, Ordering::Release);
                        this.mode = Mode::Rejecting(TIMEOUT, 0);
                        continue;
                    }
                }
            }
            let new = &buf.filled()[before..];
            if this.mode == Mode::Detect && !new.is_empty() {
                this.mode = if new.starts_with(b"PRI") { Mode::Off } else { Mode::Head };
            }
            if this.mode == Mode::Head {
                this.on_head_bytes(new);
                if let Some(v) = this.scan(new) {
                    this.state.violation.store(v as u8 + 1, Ordering::Release);
                    buf.set_filled(before);
                    this.mode = Mode::Rejecting(REJECT, 0);
                    continue;
                }
                if this.mode == Mode::Body
                    && let Some(d) = this.deadlines.as_mut()
                {
                    // The head is complete: no deadline while the request is answered.
                    d.armed = Armed::Off;
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
    fn canned_replies_declare_their_body_length() {
        for reply in [REJECT, TIMEOUT] {
            let text = std::str::from_utf8(reply).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let len = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), body.len(), "{head}");
        }
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

    #[tokio::test]
    async fn bytes_taken_while_sniffing_are_read_first_and_still_scanned() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut app, side) = tokio::io::duplex(256);
        app.write_all(b"ST / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        let (g, _) = HeadGuard::new(side);
        let mut g = g.sniffed(false, b"PO");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"\r\n\r\n") {
            let n = g.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "EOF before the head ended: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"POST / HTTP/1.1\r\nHost: a\r\n\r\n");

        // The replayed bytes are part of the scanned head: a bare LF right after them is refused.
        let (mut app, side) = tokio::io::duplex(256);
        app.write_all(b"ST / HTTP/1.1\nHost: a\r\n\r\n").await.unwrap();
        let (g, state) = HeadGuard::new(side);
        let mut g = g.sniffed(false, b"PO");
        let mut rest = Vec::new();
        g.read_to_end(&mut rest).await.unwrap();
        assert_eq!(state.violation(), Some(Violation::BareLf));
        let mut reply = vec![0u8; REJECT.len()];
        app.read_exact(&mut reply).await.unwrap();
        assert!(reply.starts_with(b"HTTP/1.1 400"));
    }
}
