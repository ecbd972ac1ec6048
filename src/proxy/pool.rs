//! Pooled upstream HTTP connections, keyed by (upstream, credential generation, protocol).
//!
//! One TLS handshake per pooled connection, never one per request. HTTP/2 connections are
//! shared by every request (multiplexed); HTTP/1.1 connections go back to an idle stack when
//! their response is done. A rotation changes the generation in the key, so connections
//! opened with old credentials take no new requests; they close when idle, and a sweep
//! force-closes any still busy after `rotation_drain_timeout`. No connection is reused past
//! the notAfter of the client certificate it was opened with.

mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio_util::sync::CancellationToken;

use self::watch::Watched;
use super::connect::{self, ConnectMetrics, HandshakeInfo, Target};
use super::error::{UpstreamError, classify_hyper};
use super::http::body::ReqBody;

/// Identifies a set of interchangeable connections.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct PoolKey {
    /// Index of the upstream (mapping).
    pub upstream: usize,
    /// Credential generation (0 for plaintext).
    pub generation: u64,
    /// Which protocols the connection may speak.
    pub alpn: Alpn,
}

/// The ALPN offer, which decides what a pooled connection can carry.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Alpn {
    /// `h2, http/1.1`: plain HTTP/1.1 requests.
    Auto,
    /// `h2` only: h2c and gRPC requests.
    H2,
    /// `http/1.1` only: WebSocket upgrades.
    H1,
}

/// What is known about a pooled connection, for logs.
#[derive(Debug, Default)]
pub struct ConnMeta {
    /// Negotiated TLS parameters.
    pub info: HandshakeInfo,
    /// Upstream certificate subject and serial (only parsed when access logs are on).
    pub peer: Option<(String, String)>,
    /// The first TLS failure read on the connection (e.g. the upstream's alert rejecting our
    /// client certificate, which TLS 1.3 delivers after the handshake). Kept here because h2
    /// flattens I/O errors into strings (`h2::proto::Error::Io`), losing the rustls error.
    pub tls_failure: Arc<OnceLock<&'static str>>,
}

/// A connection ready for one request.
pub enum Sender {
    /// HTTP/1.1: exclusive until the response is done.
    H1(http1::SendRequest<ReqBody>),
    /// HTTP/2: shared.
    H2(http2::SendRequest<ReqBody>),
}

/// A checked-out connection.
pub struct Checkout {
    /// The sender.
    pub sender: Sender,
    /// About the connection.
    pub meta: Arc<ConnMeta>,
    /// Whether it served a request before (only those are retried after a reset).
    pub reused: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

struct Idle {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
    meta: Arc<ConnMeta>,
}

struct Entry {
    h2: Option<(http2::SendRequest<ReqBody>, Arc<ConnMeta>)>,
    idle: Vec<Idle>,
    hint: Option<Proto>,
    connect_lock: Arc<tokio::sync::Mutex<()>>,
    last_used: Instant,
    kill: CancellationToken,
    superseded_at: Option<Instant>,
}

impl Entry {
    fn new() -> Self {
        Entry {
            h2: None,
            idle: Vec::new(),
            hint: None,
            connect_lock: Arc::new(tokio::sync::Mutex::new(())),
            last_used: Instant::now(),
            kill: CancellationToken::new(),
            superseded_at: None,
        }
    }

    fn clear(&mut self) {
        self.h2 = None;
        self.idle.clear();
    }
}

/// How to reach one upstream.
pub struct UpstreamSpec<'a> {
    /// Where.
    pub target: &'a Target,
    /// TLS config of the current generation (None: plaintext).
    pub tls: Option<&'a Arc<ClientConfig>>,
    /// Connect + handshake budget.
    pub connect_timeout: Duration,
    /// Idle time after which a pooled connection is not reused.
    pub idle_timeout: Duration,
    /// notAfter of the client certificate the connection presents.
    pub not_after: Option<SystemTime>,
    /// Metrics of the context.
    pub metrics: &'a ConnectMetrics,
    /// Whether to parse the upstream certificate for access logs.
    pub describe_peer: bool,
}

/// The pool.
pub struct Pool {
    entries: Mutex<HashMap<PoolKey, Entry>>,
    force_close: CancellationToken,
}

impl Pool {
    /// An empty pool whose connections all close when `force_close` fires.
    pub fn new(force_close: CancellationToken) -> Self {
        Pool {
            entries: Mutex::new(HashMap::new()),
            force_close,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_reuse(
        &self,
        key: PoolKey,
        spec: &UpstreamSpec<'_>,
    ) -> Result<Checkout, (Option<Proto>, Arc<tokio::sync::Mutex<()>>)> {
        let mut map = self.lock();
        let e = map.entry(key).or_insert_with(Entry::new);
        let now = Instant::now();
        e.last_used = now;
        if spec.not_after.is_some_and(|t| SystemTime::now() >= t) {
            // The certificate these connections presented has expired: never reuse them.
            e.clear();
        }
        if let Some((s, meta)) = &e.h2 {
            if !s.is_closed() {
                return Ok(Checkout {
                    sender: Sender::H2(s.clone()),
                    meta: meta.clone(),
                    reused: true,
                });
            }
            e.h2 = None;
        }
        while let Some(idle) = e.idle.pop() {
            if idle.sender.is_ready() && now.duration_since(idle.since) < spec.idle_timeout {
                return Ok(Checkout {
                    sender: Sender::H1(idle.sender),
                    meta: idle.meta,
                    reused: true,
                });
            }
        }
        Err((e.hint, e.connect_lock.clone()))
    }

    /// A connection for `key`: a pooled one if possible, else a new one.
    pub async fn checkout(&self, key: PoolKey, spec: &UpstreamSpec<'_>) -> Result<Checkout, UpstreamError> {
        let (hint, lock) = match self.try_reuse(key, spec) {
            Ok(c) => return Ok(c),
            Err(v) => v,
        };
        if hint == Some(Proto::H1) {
            return self.connect(key, spec).await;
        }
        // The first connection decides the protocol; with HTTP/2 every concurrent request
        // shares it, so only one task connects while the others wait for it.
        let _guard = lock.lock().await;
        if let Ok(c) = self.try_reuse(key, spec) {
            return Ok(c);
        }
        self.connect(key, spec).await
    }

    async fn connect(&self, key: PoolKey, spec: &UpstreamSpec<'_>) -> Result<Checkout, UpstreamError> {
        let connected = connect::connect(spec.target, spec.tls, spec.connect_timeout, spec.metrics).await?;
        let addr = spec.target.authority();
        let alpn_h2 = connected.info.alpn.as_deref() == Some(b"h2");
        let use_h2 = match spec.tls {
            Some(_) => alpn_h2,
            // Plaintext upstream: prior-knowledge h2c when the app itself spoke h2.
            None => key.alpn == Alpn::H2,
        };
        if (key.alpn == Alpn::H2 && !use_h2) || (key.alpn == Alpn::H1 && use_h2) {
            spec.metrics.late_handshake_failure("alpn_mismatch");
            return Err(UpstreamError::AlpnMismatch {
                addr,
                got: connected.info.alpn_str().to_owned(),
            });
        }
        let peer = spec
            .describe_peer
            .then(|| connected.stream.peer_subject_serial())
            .flatten();
        let tls_failure = Arc::new(OnceLock::new());
        let meta = Arc::new(ConnMeta {
            info: connected.info,
            peer,
            tls_failure: tls_failure.clone(),
        });
        let io = TokioIo::new(Watched::new(connected.stream, tls_failure));
        let guard = connected.guard;
        let (kill, force) = {
            let mut map = self.lock();
            let e = map.entry(key).or_insert_with(Entry::new);
            e.hint = Some(if use_h2 { Proto::H2 } else { Proto::H1 });
            (e.kill.clone(), self.force_close.clone())
        };
        let http_err = |e: hyper::Error| UpstreamError::Http {
            addr: addr.clone(),
            kind: classify_hyper(&e),
            source: e,
        };
        if use_h2 {
            // Larger flow-control windows than h2's 64 KiB default: fewer WINDOW_UPDATE round
            // trips and larger reads for bulk responses, bounded per connection.
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(io)
                .await
                .map_err(http_err)?;
            tokio::spawn(async move {
                let _guard = guard;
                tokio::select! {
                    r = conn => if let Err(e) = r { tracing::debug!(error = %e, "upstream h2 connection ended") },
                    _ = kill.cancelled() => {}
                    _ = force.cancelled() => {}
                }
            });
            self.lock().entry(key).or_insert_with(Entry::new).h2 = Some((sender.clone(), meta.clone()));
            Ok(Checkout {
                sender: Sender::H2(sender),
                meta,
                reused: false,
            })
        } else {
            let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(http_err)?;
            tokio::spawn(async move {
                let _guard = guard;
                tokio::select! {
                    r = conn.with_upgrades() => if let Err(e) = r { tracing::debug!(error = %e, "upstream h1 connection ended") },
                    _ = kill.cancelled() => {}
                    _ = force.cancelled() => {}
                }
            });
            Ok(Checkout {
                sender: Sender::H1(sender),
                meta,
                reused: false,
            })
        }
    }

    /// Returns an HTTP/1.1 connection once its response is done (hyper reports it ready).
    pub fn checkin(self: &Arc<Self>, key: PoolKey, mut sender: http1::SendRequest<ReqBody>, meta: Arc<ConnMeta>) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut map = pool.lock();
                if let Some(e) = map.get_mut(&key)
                    && e.superseded_at.is_none()
                {
                    e.idle.push(Idle {
                        sender,
                        since: Instant::now(),
                        meta,
                    });
                }
            }
        });
    }

    /// Drops connections of superseded generations (force-closing those still busy after
    /// `rotation_drain`) and idle connections past their upstream's idle timeout.
    pub fn sweep(
        &self,
        current_generation: impl Fn(usize) -> u64,
        idle_timeout: impl Fn(usize) -> Duration,
        rotation_drain: Duration,
    ) {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|key, e| {
            if key.generation != current_generation(key.upstream) {
                let since = *e.superseded_at.get_or_insert(now);
                e.clear();
                if now.duration_since(since) >= rotation_drain {
                    e.kill.cancel();
                    return false;
                }
                return true;
            }
            let idle = idle_timeout(key.upstream);
            e.idle.retain(|i| now.duration_since(i.since) < idle);
            if e.h2.is_some() && now.duration_since(e.last_used) >= idle {
                e.h2 = None;
            }
            // Forget long-unused keys entirely (their connections are gone by now).
            !(e.h2.is_none()
                && e.idle.is_empty()
                && now.duration_since(e.last_used) >= idle.max(Duration::from_secs(60)))
        });
    }
}
