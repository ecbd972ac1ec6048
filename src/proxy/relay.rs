//! Bidirectional byte relay with half-close, an idle timeout and per-direction counts.
//!
//! Like `tokio::io::copy_bidirectional`, but it says which side failed (so an upstream TLS
//! alert can be told from the app hanging up), it stops after `idle` without a byte either
//! way, and it can be cut by the force-close token.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// App → upstream.
    pub to_upstream: u64,
    /// Upstream → app.
    pub from_upstream: u64,
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides finished cleanly.
    Done,
    /// No byte either way for the idle timeout.
    IdleTimeout,
    /// The app side failed.
    Client(io::Error),
    /// The upstream side failed.
    Upstream(io::Error),
    /// Closed by shutdown.
    Cancelled,
}

/// First buffer size: enough for request/response traffic; bulk transfers grow it.
const INITIAL_BUF: usize = 4 * 1024;

struct Half {
    buf: Box<[u8]>,
    max: usize,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    finished: bool,
    bytes: u64,
}

impl Half {
    fn new(max: usize) -> Self {
        Half {
            buf: vec![0; INITIAL_BUF.min(max)].into_boxed_slice(),
            max,
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            finished: false,
            bytes: 0,
        }
    }

    /// Copies until `r` is at EOF and `w` is shut down. Errors say which side failed:
    /// `Err((true, e))` for the reader, `Err((false, e))` for the writer.
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<Result<(), (bool, io::Error)>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.cap && !self.read_done {
                if self.cap == self.buf.len() && self.buf.len() < self.max {
                    // The last read filled the buffer: this is a bulk transfer, read more at once.
                    self.buf = vec![0; self.max].into_boxed_slice();
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((true, e))),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|e| (false, e))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n =
                    ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.cap])).map_err(|e| (false, e))?;
                if n == 0 {
                    return Poll::Ready(Err((false, io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.bytes += n as u64;
                self.need_flush = true;
            }
            if self.read_done && self.pos == self.cap {
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|e| (false, e))?;
                // Half-close: the other side may still be talking (e.g. a response after EOF).
                ready!(Pin::new(&mut *w).poll_shutdown(cx)).map_err(|e| (false, e))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Relays until both directions are done, one side fails, `idle` passes without a byte, or
/// `cancel` fires.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    buf_size: usize,
    cancel: &CancellationToken,
) -> (RelayStats, RelayEnd)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Half::new(buf_size);
    let mut down = Half::new(buf_size);
    let mut last_activity = Instant::now();
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let end = poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(RelayEnd::Cancelled);
        }
        let before = up.bytes + down.bytes;
        if let Poll::Ready(Err((reader_failed, e))) = up.poll_copy(cx, client, upstream) {
            // App → upstream: the reader is the app.
            return Poll::Ready(if reader_failed {
                RelayEnd::Client(e)
            } else {
                RelayEnd::Upstream(e)
            });
        }
        if let Poll::Ready(Err((reader_failed, e))) = down.poll_copy(cx, upstream, client) {
            return Poll::Ready(if reader_failed {
                RelayEnd::Upstream(e)
            } else {
                RelayEnd::Client(e)
            });
        }
        if up.finished && down.finished {
            return Poll::Ready(RelayEnd::Done);
        }
        if up.bytes + down.bytes != before {
            last_activity = Instant::now();
        }
        if sleep.as_mut().poll(cx).is_ready() {
            let due = last_activity + idle;
            if due <= Instant::now() {
                return Poll::Ready(RelayEnd::IdleTimeout);
            }
            sleep.as_mut().reset(due.into());
            // Poll once so the timer registers this task again.
            let _ = sleep.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await;
    let stats = RelayStats {
        to_upstream: up.bytes,
        from_upstream: down.bytes,
    };
    (stats, end)
}
