//! Body wrappers: count bytes each way, carry errors through untouched (a body that died
//! mid-stream must reach the app as an error, never as a short but "complete" body), and emit
//! the access log when the response body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::guard::{HeadState, InFlight};
use super::log::RequestLog;

/// Why a request body stopped short: it grew past `limits.max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than limits.max_request_body ({limit} bytes)")]
pub struct BodyTooLarge {
    /// The limit.
    pub limit: u64,
}

/// Errors a request body can end with on its way upstream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The app's request body on its way upstream.
#[derive(Debug)]
pub struct ReqBody {
    inner: Option<Incoming>,
    bytes: Option<Arc<AtomicU64>>,
    on_end: Option<Arc<HeadState>>,
    /// Counting toward `limits.max_request_body`; raises the flag when the body outgrew it.
    limit: Option<(u64, u64, Arc<AtomicBool>)>,
}

impl ReqBody {
    /// No body.
    pub fn empty() -> Self {
        ReqBody {
            inner: None,
            bytes: None,
            on_end: None,
            limit: None,
        }
    }

    /// The app's body, counted into `bytes` when an access log wants the count.
    pub fn new(inner: Incoming, bytes: Option<Arc<AtomicU64>>) -> Self {
        ReqBody {
            inner: Some(inner),
            bytes,
            on_end: None,
            limit: None,
        }
    }

    /// Fails the body once more than `max` bytes came; `over` is raised then, so that the
    /// failed exchange can be answered 413 rather than 502.
    pub fn limit(mut self, max: u64, over: Arc<AtomicBool>) -> Self {
        self.limit = Some((max, 0, over));
        self
    }

    /// Tells `head` when the body has been read to its end (the next bytes are a new head).
    pub fn notify_end(mut self, head: Arc<HeadState>) -> Self {
        self.on_end = Some(head);
        self
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        if let (Poll::Ready(None), Some(h)) = (&r, this.on_end.take()) {
            h.request_done();
        }
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            if let Some(b) = &this.bytes {
                b.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            if let Some((max, seen, over)) = this.limit.as_mut() {
                *seen += d.len() as u64;
                if *seen > *max {
                    over.store(true, Ordering::Release);
                    this.inner = None;
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: *max }))));
                }
            }
        }
        r.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// What the app receives.
#[derive(Debug)]
pub enum RespBody {
    /// The upstream's body; the log is emitted when it ends, fails or is dropped.
    Upstream {
        /// Upstream body.
        inner: Incoming,
        /// Pending access-log record.
        log: Option<Box<RequestLog>>,
    },
    /// A short text (errors) or nothing.
    Full(Option<Bytes>),
}

impl RespBody {
    /// A complete body.
    pub fn text(s: impl Into<Bytes>) -> Self {
        RespBody::Full(Some(s.into()))
    }

    /// The upstream's body with its log record.
    pub fn upstream(inner: Incoming, log: Box<RequestLog>) -> Self {
        RespBody::Upstream { inner, log: Some(log) }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Upstream { inner, log } => {
                let r = Pin::new(inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(d), Some(l)) = (f.data_ref(), log.as_mut()) {
                            l.bytes_from_upstream += d.len() as u64;
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        if let Some(l) = log.take() {
                            (*l).finish(Some(super::classify_hyper(e)));
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(l) = log.take() {
                            (*l).finish(None);
                        }
                    }
                    Poll::Pending => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        if let RespBody::Upstream { inner, log } = self
            && let Some(l) = log.take()
        {
            // Dropped before the end: the app went away (or hyper stopped reading).
            let outcome = (!inner.is_end_stream()).then_some("downstream_closed");
            (*l).finish(outcome);
        }
    }
}

/// A response on its way to the app, holding its request's place on the connection: the
/// connection counts as idle (keep-alive timeout) only once every response has been sent.
#[derive(Debug)]
pub struct ConnBody {
    body: RespBody,
    _in_flight: InFlight,
}

impl ConnBody {
    /// Wraps `body`; `in_flight` is released when the body is sent completely or dropped.
    pub fn new(body: RespBody, in_flight: InFlight) -> Self {
        ConnBody {
            body,
            _in_flight: in_flight,
        }
    }
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
