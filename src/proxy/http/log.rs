//! One access-log event per HTTP request, on target `access`, emitted when the response body
//! has been delivered (or failed).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::mapping::HttpMapping;
use crate::proxy::pool::ConnMeta;

/// What is known about a request by the time its response starts.
#[derive(Debug)]
pub struct RequestLog {
    /// When the request head arrived.
    pub started: Instant,
    /// Mapping name.
    pub mapping: Arc<str>,
    /// Context label.
    pub tls_context: Arc<str>,
    /// `host:port` of the upstream.
    pub upstream: String,
    /// Method.
    pub method: http::Method,
    /// Path without the query string (queries may carry secrets).
    pub path: String,
    /// App's HTTP version.
    pub version: http::Version,
    /// Status sent to the app.
    pub status: u16,
    /// Body bytes app → upstream.
    pub bytes_to_upstream: Arc<AtomicU64>,
    /// Body bytes upstream → app.
    pub bytes_from_upstream: u64,
    /// The upstream connection.
    pub conn: Option<Arc<ConnMeta>>,
}

impl RequestLog {
    /// A record for a request routed to `mapping`.
    pub fn new(
        started: Instant,
        mapping: &HttpMapping,
        method: http::Method,
        path: &str,
        version: http::Version,
        bytes_to_upstream: Arc<AtomicU64>,
    ) -> Self {
        RequestLog {
            started,
            mapping: mapping.name.clone(),
            tls_context: mapping.tls_label.clone(),
            upstream: mapping.target.authority(),
            method,
            path: path.to_owned(),
            version,
            status: 0,
            bytes_to_upstream,
            bytes_from_upstream: 0,
            conn: None,
        }
    }

    /// Emits the event; `error` names why the body did not complete.
    pub fn finish(self, error: Option<&'static str>) {
        if let Some(e) = error
            && e != "downstream_closed"
        {
            tracing::warn!(mapping = %self.mapping, upstream = %self.upstream, reason = e, "the upstream failed mid-body; the app's response was aborted, not completed");
        }
        let info = self.conn.as_ref().map(|c| &c.info);
        let (subject, serial) = self
            .conn
            .as_ref()
            .and_then(|c| c.peer.as_ref())
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .unwrap_or(("-", "-"));
        tracing::info!(
            target: "access",
            listener = "http",
            mapping = %self.mapping,
            tls_context = %self.tls_context,
            upstream = %self.upstream,
            method = %self.method,
            path = %self.path,
            version = ?self.version,
            status = self.status,
            result = error.unwrap_or("ok"),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes_to_upstream = self.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_from_upstream = self.bytes_from_upstream,
            tls.version = info.and_then(|i| i.version).unwrap_or("-"),
            tls.alpn = info.map_or("-", |i| i.alpn_str()),
            tls.resumed = info.is_some_and(|i| i.resumed),
            upstream.subject = subject,
            upstream.serial = serial,
            "http request"
        );
    }
}
