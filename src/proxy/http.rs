//! The HTTP front end: HTTP/1.1 and h2c on one loopback port, forward-proxy (absolute-form)
//! and Host-routed requests through one route table, forwarded over pooled mTLS connections.
//!
//! The upstream always comes from the matched mapping; the request only selects a mapping.
//! A request no mapping names is refused before any DNS lookup or connect.

pub mod body;
pub mod guard;
mod headers;
pub mod log;
pub mod mapping;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::Counter;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use self::body::{ConnBody, ReqBody, RespBody};
use self::guard::{HeadGuard, HeadState, Violation};
use self::headers::{ERROR_HEADER, strip_hop_by_hop, strip_spoofable, wants_websocket};
use self::log::RequestLog;
use self::mapping::HttpMapping;
use super::error::UpstreamError;
pub use super::error::classify_hyper;
use super::pool::{Alpn, Checkout, Pool, PoolKey, Sender, UpstreamSpec};
use super::route::{RouteTable, rewrite_path};
use crate::config::Config;
use crate::metrics::{self as m, Metrics};
use crate::shutdown::Shutdown;
use crate::tls::TlsStore;

/// Reasons for refusing a request before any upstream work (the `denied_total` labels).
const DENY_REASONS: &[&str] = &[
    "no_route",
    "connect_method",
    "malformed_request",
    "missing_host",
    "host_mismatch",
    "header_too_large",
    "header_timeout",
    "overloaded",
    "body_too_large",
];

/// How long a connection opened during the drain may stay before it is asked to finish.
const LATE_CONNECTION_GRACE: Duration = Duration::from_secs(1);

/// The HTTP listener's shared state.
pub struct HttpProxy {
    routes: RouteTable<Arc<HttpMapping>>,
    mappings: Vec<Arc<HttpMapping>>,
    pool: Arc<Pool>,
    shutdown: Shutdown,
    denied: Vec<(&'static str, Counter)>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// Also the deadline for a new connection's first bytes.
    header_read_timeout: Duration,
    /// How long an app connection may stay idle between requests.
    keepalive_timeout: Duration,
    /// Largest request body, if limited.
    max_request_body: Option<u64>,
    rotation_drain: Duration,
}

/// What a new app connection's first bytes say.
enum FirstBytes {
    /// HTTP/1.x, with the bytes taken from the socket while deciding (at most two).
    Http1(Vec<u8>),
    /// The h2c prior-knowledge preface (`PRI * HTTP/2.0…`), with the bytes taken.
    H2c(Vec<u8>),
    /// The app closed without sending anything.
    Closed,
}

/// Decides between HTTP/1.x and h2c by peeking at the first bytes, instead of reading them
/// into a buffer and replaying it: hyper then reads the request into its own buffer once.
/// Only when the app sent just `P` or `PR` so far are those bytes taken (so that the next peek
/// waits for more) and replayed by the guard.
async fn sniff(stream: &mut TcpStream) -> std::io::Result<FirstBytes> {
    const H2_START: &[u8] = b"PRI";
    let mut buf = [0u8; 3];
    let mut taken = 0;
    loop {
        let n = stream.peek(&mut buf[taken..]).await?;
        if n == 0 {
            return Ok(if taken == 0 {
                FirstBytes::Closed
            } else {
                FirstBytes::Http1(buf[..taken].to_vec())
            });
        }
        let seen = &buf[..taken + n];
        if seen.len() == H2_START.len() || !H2_START.starts_with(seen) {
            let taken = buf[..taken].to_vec();
            return Ok(if seen.starts_with(H2_START) {
                FirstBytes::H2c(taken)
            } else {
                FirstBytes::Http1(taken)
            });
        }
        let got = stream.read(&mut buf[taken..taken + n]).await?;
        taken += got;
    }
}

/// Status for an upstream failure reason.
fn status_for(kind: &str) -> StatusCode {
    match kind {
        "no_client_identity" | "overloaded" => StatusCode::SERVICE_UNAVAILABLE,
        "connect_timeout" | "handshake_timeout" | "dns_timeout" | "upstream_timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// A refusal or failure as the app sees it: short text, and the reason in a header.
pub fn error_response(status: StatusCode, reason: &str, message: &str) -> Response<RespBody> {
    let mut r = Response::new(RespBody::text(format!("mtls-sidecar: {message}\n")));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert(ERROR_HEADER, v);
    }
    r
}

fn same_host(a: &str, b: &str) -> bool {
    let norm = |s: &str| super::route::split_authority(s).map(|(h, _)| h);
    norm(a).is_some() && norm(a) == norm(b)
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl HttpProxy {
    /// Builds the route table and the server settings from validated configuration.
    pub fn new(
        config: &Config,
        store: &TlsStore,
        metrics: &Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, String> {
        let mut mappings = Vec::new();
        let mut routes = Vec::new();
        for (i, mc) in config.mappings.iter().enumerate() {
            let mapping = Arc::new(HttpMapping::new(i, mc, store, metrics)?);
            routes.push(mapping.route(mc)?);
            mappings.push(mapping);
        }
        let l = &config.limits;
        let mut h1 = http1::Builder::new();
        // The guard keeps the real deadlines (idle between requests, then the head); hyper's
        // timer, which starts when a connection goes idle, is only a backstop behind both.
        h1.timer(TokioTimer::new())
            .header_read_timeout(l.keepalive_timeout.0 + l.header_read_timeout.0 + Duration::from_secs(1))
            .max_buf_size(l.max_header_bytes.max(8192))
            .max_headers(l.max_headers)
            .half_close(false);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(1024)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let denied = DENY_REASONS
            .iter()
            .map(|r| {
                (
                    *r,
                    metrics.counter(m::DENIED_TOTAL, &[("listener", "http"), ("reason", r)]),
                )
            })
            .collect();
        Ok(Arc::new(HttpProxy {
            routes: RouteTable::new(routes),
            mappings,
            pool: Arc::new(Pool::new(shutdown.force_close.clone())),
            shutdown,
            denied,
            h1,
            h2,
            header_read_timeout: l.header_read_timeout.0,
            keepalive_timeout: l.keepalive_timeout.0,
            max_request_body: l.max_request_body,
            rotation_drain: config.rotation_drain_timeout.0,
        }))
    }

    /// The `denied_total{listener="http", reason}` counter.
    pub fn denied(&self, reason: &str) -> Option<&Counter> {
        self.denied.iter().find(|(r, _)| *r == reason).map(|(_, c)| c)
    }

    fn deny(&self, status: StatusCode, reason: &'static str, message: &str) -> Response<RespBody> {
        if let Some(c) = self.denied(reason) {
            c.increment(1);
        }
        tracing::info!(reason, "refused a request: {message}");
        let mut r = error_response(status, reason, message);
        if status == StatusCode::BAD_REQUEST {
            // A client that sends malformed requests may be out of step with us: never read
            // another request from this connection (hyper closes it after the response).
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    /// Closes pooled connections of superseded generations and idle ones; call periodically.
    pub fn sweep(&self) {
        self.pool.sweep(
            |i| {
                self.mappings
                    .get(i)
                    .and_then(|m| m.context.as_ref())
                    .and_then(|c| c.current())
                    .map_or(0, |g| g.number)
            },
            |i| self.mappings.get(i).map_or(Duration::from_secs(60), |m| m.idle_timeout),
            self.rotation_drain,
        );
    }

    /// Serves one accepted connection (HTTP/1.1 or h2c) until it closes.
    pub async fn serve_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let span = tracing::info_span!("conn", listener = "http", peer = %peer);
        self.serve_connection_inner(stream, peer).instrument(span).await;
    }

    async fn serve_connection_inner(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        let accepted = Instant::now();
        // Connections open when the drain starts are told to finish (HTTP/1.1: close when
        // idle; HTTP/2: GOAWAY). Connections the app opens during the drain are served first:
        // closing them before their request arrived would refuse exactly the late requests
        // the drain exists for; they get `Connection: close` or a GOAWAY a moment later.
        let drain = self.shutdown.drain.clone();
        let grace = if drain.is_cancelled() {
            LATE_CONNECTION_GRACE
        } else {
            Duration::ZERO
        };
        let drain_started = async move {
            drain.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(drain_started);
        // A connection that sends nothing is closed at the header deadline, like one that
        // sends a head too slowly (hyper's timer starts only once it serves the connection).
        let first = tokio::select! {
            r = tokio::time::timeout(self.header_read_timeout, sniff(&mut stream)) => r,
            () = &mut drain_started => return,
            () = self.shutdown.force_close.cancelled() => return,
        };
        let (h2, taken) = match first {
            Ok(Ok(FirstBytes::Http1(taken))) => (false, taken),
            Ok(Ok(FirstBytes::H2c(taken))) => (true, taken),
            Ok(Ok(FirstBytes::Closed)) => return,
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "app connection failed before its first byte");
                return;
            }
            Err(_) => {
                if let Some(c) = self.denied("header_timeout") {
                    c.increment(1);
                }
                tracing::info!(peer = %peer, reason = "header_timeout", "closed an app connection that sent nothing within header_read_timeout");
                return;
            }
        };
        let this = self.clone();
        let (guarded, head) = HeadGuard::new(stream);
        let mut guarded = guarded.sniffed(h2, &taken);
        if !h2 {
            guarded = guarded.with_deadlines(
                self.header_read_timeout,
                self.keepalive_timeout,
                accepted + self.header_read_timeout,
            );
        }
        let guarded = TokioIo::new(guarded);
        let head_state = head.clone();
        let svc = service_fn(move |req| {
            let (this, head) = (this.clone(), head.clone());
            let in_flight = head.request_started();
            async move {
                let resp = this.handle(req, head).await;
                Ok::<_, Infallible>(resp.map(|b| ConnBody::new(b, in_flight)))
            }
        });
        if h2 {
            // Boxed: an HTTP/2 connection's state is several KiB, and this task's future is
            // as large as its largest branch; HTTP/1.1 connections are the many.
            let conn = self.h2.serve_connection(guarded, svc);
            let idle = Some(self.keepalive_timeout);
            Box::pin(self.drive(conn, |c| c.graceful_shutdown(), drain_started, &head_state, idle, peer)).await;
        } else {
            // HTTP/1.1 idle connections are closed by the guard (it sees where heads start).
            let conn = self.h1.serve_connection(guarded, svc).with_upgrades();
            self.drive(conn, |c| c.graceful_shutdown(), drain_started, &head_state, None, peer)
                .await;
        }
    }

    /// Runs a served connection to its end, finishing it gracefully once the drain starts,
    /// or once it has had no request in flight for `idle` (h2c; HTTP/1.1 has the guard).
    async fn drive<C>(
        &self,
        conn: C,
        graceful: fn(Pin<&mut C>),
        mut drain_started: Pin<&mut impl Future<Output = ()>>,
        head_state: &HeadState,
        idle: Option<Duration>,
        peer: SocketAddr,
    ) where
        C: Future<Output = Result<(), hyper::Error>>,
    {
        tokio::pin!(conn);
        let mut finishing = false;
        let idle_check = tokio::time::sleep(idle.unwrap_or(Duration::MAX / 4));
        tokio::pin!(idle_check);
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    match head_state.violation() {
                        Some(Violation::HeadTimeout) => {
                            if let Some(c) = self.denied("header_timeout") {
                                c.increment(1);
                            }
                            tracing::info!(peer = %peer, reason = "header_timeout", "answered 408 and closed an app connection whose request head did not arrive within header_read_timeout");
                        }
                        Some(v) => {
                            if let Some(c) = self.denied("malformed_request") {
                                c.increment(1);
                            }
                            tracing::info!(peer = %peer, reason = "malformed_request", "refused a smuggling-shaped request head ({v:?}) with 400 and closed the connection");
                        }
                        None if head_state.idle_closed() => {
                            tracing::debug!(peer = %peer, "closed an app connection idle for keepalive_timeout");
                        }
                        None => {
                            if let Err(e) = r {
                                self.connection_error(&e, peer);
                            }
                        }
                    }
                    return;
                }
                () = drain_started.as_mut(), if !finishing => {
                    finishing = true;
                    graceful(conn.as_mut());
                }
                () = idle_check.as_mut(), if !finishing && idle.is_some() => {
                    let limit = idle.unwrap_or_default();
                    match head_state.idle_for() {
                        Some(t) if t >= limit => {
                            tracing::debug!(peer = %peer, "closing an h2c app connection idle for keepalive_timeout (GOAWAY)");
                            finishing = true;
                            graceful(conn.as_mut());
                        }
                        // Busy, or idle for less: look again when it could have run out.
                        t => idle_check.as_mut().reset(
                            tokio::time::Instant::now() + limit.saturating_sub(t.unwrap_or_default()),
                        ),
                    }
                }
                () = self.shutdown.force_close.cancelled() => return,
            }
        }
    }

    fn connection_error(&self, e: &(dyn std::error::Error + 'static), peer: SocketAddr) {
        let Some(h) = e.downcast_ref::<hyper::Error>() else {
            tracing::debug!(peer = %peer, error = %e, "app connection ended with an error");
            return;
        };
        let reason = if h.is_parse_too_large() {
            "header_too_large"
        } else if h.is_parse() || h.is_parse_status() {
            "malformed_request"
        } else if h.is_timeout() {
            "header_timeout"
        } else {
            tracing::debug!(peer = %peer, error = %h, "app connection ended with an error");
            return;
        };
        if let Some(c) = self.denied(reason) {
            c.increment(1);
        }
        tracing::info!(peer = %peer, reason, "closed an app connection: {h}");
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, head: Arc<HeadState>) -> Response<RespBody> {
        let version = req.version();
        if http_body::Body::is_end_stream(req.body()) {
            head.request_done();
        }
        let mut resp = self.route_and_forward(req, head.clone()).await;
        let refused_upgrade = head.is_upgrading() && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
        // A refused upgrade (or one that failed upstream) ends the connection: after
        // `upgrading()` no later head on it would be scanned for smuggling shapes.
        if refused_upgrade || (self.shutdown.is_draining() && version == Version::HTTP_11) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    async fn route_and_forward(&self, mut req: Request<Incoming>, head: Arc<HeadState>) -> Response<RespBody> {
        let started = Instant::now();
        if req.method() == Method::CONNECT {
            return self.deny(
                StatusCode::FORBIDDEN,
                "connect_method",
                "CONNECT tunnels are refused: inside a tunnel the app would run its own TLS and the sidecar could not add the client certificate; send plain http:// requests and let a mapping add mTLS",
            );
        }
        let h = req.headers();
        if req.version() == Version::HTTP_11
            && h.contains_key(header::TRANSFER_ENCODING)
            && h.contains_key(header::CONTENT_LENGTH)
        {
            return self.deny(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                "a request with both Content-Length and Transfer-Encoding is ambiguous (request smuggling); send one of them",
            );
        }
        if h.get_all(header::HOST).iter().nth(1).is_some() {
            // RFC 9112 §3.2: more than one Host is a 400; routing on either would be a guess.
            return self.deny(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                "the request has more than one Host header",
            );
        }
        let host_header = h.get(header::HOST).and_then(|v| v.to_str().ok());
        let authority = match (req.uri().authority().map(|a| a.as_str()), host_header) {
            (Some(a), Some(hh)) if !same_host(a, hh) => {
                return self.deny(
                    StatusCode::BAD_REQUEST,
                    "host_mismatch",
                    &format!("the request target names `{a}` but the Host header says `{hh}`; they must agree"),
                );
            }
            (Some(a), _) => a.to_owned(),
            (None, Some(hh)) => hh.to_owned(),
            (None, None) => {
                return self.deny(
                    StatusCode::BAD_REQUEST,
                    "missing_host",
                    "the request has no Host header and no absolute URI",
                );
            }
        };
        let Some(route) = self.routes.lookup(&authority, req.uri().path()) else {
            return self.deny(
                StatusCode::FORBIDDEN,
                "no_route",
                &format!("no mapping routes `{authority}{}`; add a Mapping for this host and prefix (the sidecar is not an open proxy)", req.uri().path()),
            );
        };
        let mapping = route.value.clone();
        if let Some(max) = self.max_request_body
            && let Some(len) = http_body::Body::size_hint(req.body()).exact()
            && len > max
        {
            return self.too_large(&mapping, started, max, req.version());
        }
        let websocket = mapping.allow_websocket && req.version() == Version::HTTP_11 && wants_websocket(req.headers());
        let downstream_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        if websocket {
            // After a 101 the app's bytes are WebSocket frames, not request heads.
            head.upgrading();
        }
        let generation = match &mapping.context {
            None => None,
            Some(slot) => match slot.current() {
                Some(g) => Some(g),
                None => {
                    let e = UpstreamError::NoClientIdentity {
                        context: slot.name.to_string(),
                    };
                    return self.fail(&mapping, started, &e);
                }
            },
        };
        let (mut parts, incoming) = req.into_parts();
        let h2_downstream = parts.version == Version::HTTP_2;
        let orig_pq = parts.uri.path_and_query().cloned();
        // Most mappings keep the path (prefix `/`, rewrite `/`): then the original path is
        // reused as is, without an allocation.
        let new_path: Option<String> = match (&orig_pq, mapping.rewrite.as_deref()) {
            (_, Some("")) => None,
            (_, rw) if rw.unwrap_or("/") == mapping.prefix => None,
            (pq, rw) => Some(rewrite_path(
                pq.as_ref().map_or("/", |p| p.as_str()),
                &mapping.prefix,
                rw,
            )),
        };
        let log_enabled = tracing::enabled!(target: "access", tracing::Level::INFO);
        let counter = log_enabled.then(|| Arc::new(AtomicU64::new(0)));
        let mut log = counter.as_ref().map(|c| {
            Box::new(RequestLog::new(
                started,
                &mapping,
                parts.method.clone(),
                parts.uri.path(),
                parts.version,
                c.clone(),
            ))
        });
        strip_hop_by_hop(&mut parts.headers, websocket);
        strip_spoofable(&mut parts.headers);
        let host = match (&mapping.host_rewrite, parts.headers.get(header::HOST)) {
            (Some(h), _) => h.clone(),
            // The app's own Host header (origin form; it equals the authority, checked above).
            (None, Some(h)) => h.clone(),
            (None, None) => match HeaderValue::from_str(&authority) {
                Ok(v) => v,
                Err(_) => {
                    return self.deny(
                        StatusCode::BAD_REQUEST,
                        "malformed_request",
                        "the authority is not a valid header value",
                    );
                }
            },
        };
        let bodyless = http_body::Body::is_end_stream(&incoming);
        let alpn = if websocket {
            Alpn::H1
        } else if h2_downstream {
            Alpn::H2
        } else {
            Alpn::Auto
        };
        let tls = generation.as_ref().map(|g| match alpn {
            Alpn::Auto => &g.configs.http,
            Alpn::H2 => &g.configs.h2,
            Alpn::H1 => &g.configs.http1,
        });
        let spec = UpstreamSpec {
            target: &mapping.target,
            tls,
            connect_timeout: mapping.connect_timeout,
            idle_timeout: mapping.idle_timeout,
            not_after: generation.as_ref().and_then(|g| g.client_not_after()),
            metrics: &mapping.cm,
            describe_peer: log_enabled,
        };
        let key = PoolKey {
            upstream: mapping.index,
            generation: generation.as_ref().map_or(0, |g| g.number),
            alpn,
        };
        let retry_reset = mapping.retries_on_reset > 0 && idempotent(&parts.method) && bodyless;
        let mut connect_retries = mapping.retries_on_connect;
        let mut reset_retries = mapping.retries_on_reset;
        let mut unsent_retries = 2u32;
        let mut body = ReqBody::new(incoming, counter).notify_end(head);
        // A body of unknown length is counted as it streams; past the limit it fails, and
        // the exchange is answered 413 if no response had started.
        let over_limit = match self.max_request_body {
            Some(max) if !bodyless => {
                let over = Arc::new(AtomicBool::new(false));
                body = body.limit(max, over.clone());
                Some((max, over))
            }
            _ => None,
        };
        let mut pending = Some((parts, body));
        loop {
            let Checkout { sender, meta, reused } = match self.pool.checkout(key, &spec).await {
                Ok(c) => c,
                Err(e) => {
                    let connect_class = matches!(
                        e.kind(),
                        "connect_refused" | "connect_timeout" | "connect_error" | "dns_error"
                    );
                    if connect_class && connect_retries > 0 {
                        connect_retries -= 1;
                        tracing::debug!(mapping = %mapping.name, reason = e.kind(), "retrying after a connect failure");
                        continue;
                    }
                    return self.fail(&mapping, started, &e);
                }
            };
            let Some((mut p, b)) = pending.take() else {
                return self.deny(
                    StatusCode::BAD_REQUEST,
                    "malformed_request",
                    "internal: the request was lost",
                );
            };
            let spare = (retry_reset && reused && reset_retries > 0).then(|| clone_parts(&p));
            match &sender {
                Sender::H1(_) => {
                    p.version = Version::HTTP_11;
                    let origin_form = match (&new_path, &orig_pq) {
                        (Some(path), _) => Uri::try_from(path.as_str()),
                        (None, Some(pq)) => Ok(Uri::from(pq.clone())),
                        (None, None) => Ok(Uri::from_static("/")),
                    };
                    p.uri = match origin_form {
                        Ok(u) => u,
                        Err(_) => {
                            return self.deny(
                                StatusCode::BAD_REQUEST,
                                "malformed_request",
                                "the rewritten path is not a valid URI",
                            );
                        }
                    };
                    p.headers.insert(header::HOST, host.clone());
                }
                Sender::H2(_) => {
                    p.version = Version::HTTP_2;
                    let scheme = if tls.is_some() { "https" } else { "http" };
                    let auth = host.to_str().unwrap_or(&authority);
                    let path = new_path
                        .as_deref()
                        .or(orig_pq.as_ref().map(|p| p.as_str()))
                        .unwrap_or("/");
                    p.uri = match Uri::try_from(format!("{scheme}://{auth}{path}")) {
                        Ok(u) => u,
                        Err(_) => {
                            return self.deny(
                                StatusCode::BAD_REQUEST,
                                "malformed_request",
                                "the rewritten URI is not valid",
                            );
                        }
                    };
                    p.headers.remove(header::HOST);
                }
            }
            let upstream_req = Request::from_parts(p, b);
            let (result, h1_sender) = match sender {
                Sender::H1(mut s) => (
                    tokio::time::timeout(mapping.timeout, s.try_send_request(upstream_req)).await,
                    Some(s),
                ),
                Sender::H2(mut s) => (
                    tokio::time::timeout(mapping.timeout, s.try_send_request(upstream_req)).await,
                    None,
                ),
            };
            let response = match result {
                Err(_) => {
                    let e = UpstreamError::ResponseTimeout {
                        addr: mapping.target.authority(),
                        ms: mapping.timeout.as_millis(),
                    };
                    return self.fail(&mapping, started, &e);
                }
                Ok(Ok(r)) => r,
                Ok(Err(mut err)) => {
                    if let Some(unsent) = err.take_message()
                        && unsent_retries > 0
                    {
                        // Never written: safe to send again on another connection.
                        unsent_retries -= 1;
                        pending = Some(unsent.into_parts());
                        continue;
                    }
                    if let Some((max, over)) = &over_limit
                        && over.load(Ordering::Acquire)
                    {
                        let version = if h2_downstream {
                            Version::HTTP_2
                        } else {
                            Version::HTTP_11
                        };
                        return self.too_large(&mapping, started, *max, version);
                    }
                    let e = err.into_error();
                    // A TLS alert read on this connection is the real cause (h2 hides it).
                    let kind = meta.tls_failure.get().copied().unwrap_or_else(|| classify_hyper(&e));
                    if kind == "peer_rejected_client_cert" && !reused {
                        mapping.cm.late_handshake_failure(kind);
                    }
                    if let Some(p) = spare
                        && kind == "upstream_reset"
                    {
                        reset_retries -= 1;
                        tracing::debug!(mapping = %mapping.name, "retrying an idempotent request after a reset on a reused connection");
                        pending = Some((p, ReqBody::empty()));
                        continue;
                    }
                    let e = UpstreamError::Http {
                        addr: mapping.target.authority(),
                        kind,
                        source: e,
                    };
                    return self.fail(&mapping, started, &e);
                }
            };
            let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS && websocket;
            if let Some(s) = h1_sender
                && !upgraded
            {
                self.pool.checkin(key, s, meta.clone());
            }
            return self.respond(
                &mapping,
                started,
                response,
                meta,
                log.take(),
                if upgraded { downstream_upgrade } else { None },
            );
        }
    }

    fn respond(
        &self,
        mapping: &HttpMapping,
        started: Instant,
        mut response: Response<Incoming>,
        meta: Arc<super::pool::ConnMeta>,
        log: Option<Box<RequestLog>>,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<RespBody> {
        let status = response.status();
        mapping.count(status.as_u16());
        mapping.duration.record(started.elapsed().as_secs_f64());
        let upgrading = downstream_upgrade.is_some();
        if let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut response);
            let force = self.shutdown.force_close.clone();
            let idle = mapping.idle_timeout;
            self.shutdown.tracker.spawn(async move {
                let (Ok(down), Ok(up)) = (down.await, up.await) else {
                    return;
                };
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                let (stats, end) = super::relay::relay(&mut down, &mut up, idle, 16 * 1024, &force).await;
                tracing::debug!(?stats, ?end, "websocket closed");
            });
        }
        let (mut parts, incoming) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrading);
        parts.headers.remove(ERROR_HEADER);
        let body = match log {
            Some(mut l) => {
                l.status = status.as_u16();
                l.conn = Some(meta);
                RespBody::upstream(incoming, l)
            }
            None => RespBody::Upstream {
                inner: incoming,
                log: None,
            },
        };
        Response::from_parts(parts, body)
    }

    /// 413: the request body is (or grew) larger than `limits.max_request_body`. The rest of
    /// the body is not read, so an HTTP/1.1 connection closes after the answer.
    fn too_large(&self, mapping: &HttpMapping, started: Instant, max: u64, version: Version) -> Response<RespBody> {
        mapping.count(StatusCode::PAYLOAD_TOO_LARGE.as_u16());
        mapping.duration.record(started.elapsed().as_secs_f64());
        let mut r = self.deny(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!(
                "the request body is larger than limits.max_request_body ({max} bytes); send less, or raise the limit"
            ),
        );
        if version != Version::HTTP_2 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    fn fail(&self, mapping: &HttpMapping, started: Instant, e: &UpstreamError) -> Response<RespBody> {
        let kind = e.kind();
        let status = status_for(kind);
        mapping.count(status.as_u16());
        mapping.duration.record(started.elapsed().as_secs_f64());
        tracing::warn!(mapping = %mapping.name, tls_context = %mapping.tls_label, upstream = %mapping.target.authority(), reason = kind, status = status.as_u16(), "request failed: {e}");
        error_response(status, kind, &e.to_string())
    }
}

/// A copy of a request head for a possible retry (`Parts` is not `Clone`: extensions).
fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Sends `bytes`, closes the app side, and sniffs what the sidecar side sees.
    async fn sniff_after(bytes: &[u8]) -> FirstBytes {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut side, _) = listener.accept().await.unwrap();
        app.write_all(bytes).await.unwrap();
        app.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), sniff(&mut side))
            .await
            .expect("sniff finished")
            .unwrap()
    }

    #[tokio::test]
    async fn sniff_tells_http1_from_the_h2c_preface_without_taking_bytes() {
        assert!(matches!(sniff_after(b"GET / HTTP/1.1\r\n").await, FirstBytes::Http1(t) if t.is_empty()));
        assert!(matches!(sniff_after(b"POST / HTTP/1.1\r\n").await, FirstBytes::Http1(t) if t.is_empty()));
        assert!(matches!(sniff_after(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await, FirstBytes::H2c(t) if t.is_empty()));
        assert!(matches!(sniff_after(b"").await, FirstBytes::Closed));
    }

    #[tokio::test]
    async fn sniff_takes_an_undecided_start_and_waits_for_more() {
        // `PR` could still become either protocol: the bytes are taken (to be replayed) and the
        // next peek waits; here it sees the end of the stream, so HTTP/1.x parsing gets `PR`.
        assert!(matches!(sniff_after(b"PR").await, FirstBytes::Http1(t) if t == b"PR"));
        assert!(matches!(sniff_after(b"P").await, FirstBytes::Http1(t) if t == b"P"));
    }
}
