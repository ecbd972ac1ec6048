//! The upstream stream under a pooled connection, watched for the TLS alert that says why it
//! broke: h2 flattens I/O errors into strings (`h2::proto::Error::Io`), so the rustls error
//! inside (e.g. the upstream rejecting our client certificate) must be caught on the way up.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::connect::UpstreamStream;
use crate::proxy::error::{classify_tls, tls_error};

/// An upstream stream that records the first TLS error its reads return.
pub(super) struct Watched {
    inner: UpstreamStream,
    tls_failure: Arc<OnceLock<&'static str>>,
    /// A write error held back until the read side has shown why the connection broke.
    write_error: Option<io::Error>,
    probes: u8,
}

impl Watched {
    /// Wraps `inner`; TLS failures go to `tls_failure`.
    pub(super) fn new(inner: UpstreamStream, tls_failure: Arc<OnceLock<&'static str>>) -> Self {
        Watched {
            inner,
            tls_failure,
            write_error: None,
            probes: 0,
        }
    }

    fn record<T>(&self, r: &Poll<io::Result<T>>) {
        if let Poll::Ready(Err(e)) = r
            && let Some(t) = tls_error(e)
        {
            let _ = self.tls_failure.set(classify_tls(t));
        }
    }

    /// An upstream that rejects our client certificate (TLS 1.3: after the handshake, as far
    /// as we can tell) sends an alert and closes. Our next write can fail (EPIPE, reset)
    /// before anything has read that alert, and the reason would be lost; so a failed write
    /// first reads what the upstream sent, waiting (at most a few wake-ups) for the reactor to
    /// report the socket readable. The connection is dead either way: data read here is
    /// discarded.
    fn fail_write<T>(&mut self, cx: &mut Context<'_>, e: io::Error) -> Poll<io::Result<T>> {
        if self.tls_failure.get().is_some() || !matches!(self.inner, UpstreamStream::Tls(_)) || self.probes >= 3 {
            return Poll::Ready(Err(e));
        }
        self.probes += 1;
        let mut scratch = [0u8; 2048];
        for _ in 0..16 {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                Poll::Pending => {
                    self.write_error = Some(e);
                    return Poll::Pending;
                }
                read => {
                    self.record(&read);
                    break;
                }
            }
        }
        Poll::Ready(Err(e))
    }

    fn write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut UpstreamStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Some(e) = self.write_error.take() {
            return self.fail_write(cx, e);
        }
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(Err(e)) => self.fail_write(cx, e),
            other => other,
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.record(&r);
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
