//! TCP connect + TLS handshake to an upstream, under one deadline, with every failure
//! classified and counted.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::error::UpstreamError;
use crate::config::{Scheme, ServiceTarget, TlsContextConfig};
use crate::metrics::{self as m, Metrics};
use crate::tls::info::subject_and_serial;

/// Where to connect, resolved once from a mapping's `service`.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host name or IP literal, as configured (used for DNS).
    pub host: Arc<str>,
    /// Port.
    pub port: u16,
    /// Name sent as SNI and verified (from `sni:` or the host), when TLS is used.
    pub server_name: Option<ServerName<'static>>,
    /// The last successful lookup, shared by clones.
    pub dns: Arc<std::sync::Mutex<Option<CachedLookup>>>,
}

impl Target {
    /// Resolves a validated `service` and the context that secures it.
    pub fn for_service(service: &str, tls: Option<&TlsContextConfig>) -> Result<Self, String> {
        let t = ServiceTarget::parse(service)?;
        let tls_on = tls.is_some() || t.scheme == Some(Scheme::Https);
        let server_name = match tls {
            Some(ctx) => {
                let name = ctx.sni.clone().unwrap_or_else(|| t.name_for_tls().to_owned());
                Some(
                    ServerName::try_from(name.clone())
                        .map_err(|_| format!("`{name}` cannot be used as a TLS server name"))?,
                )
            }
            None => None,
        };
        let port = t.port_or_default(tls_on);
        Ok(Target::new(t.host.into(), port, server_name))
    }

    /// A target by parts.
    pub fn new(host: Arc<str>, port: u16, server_name: Option<ServerName<'static>>) -> Self {
        Target {
            host,
            port,
            server_name,
            dns: Arc::default(),
        }
    }

    fn cached(&self) -> Option<Vec<SocketAddr>> {
        let guard = self.dns.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .filter(|(at, _)| at.elapsed() < DNS_CACHE_TTL)
            .map(|(_, a)| a.clone())
    }

    fn remember(&self, addrs: &[SocketAddr]) {
        *self.dns.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), addrs.to_vec()));
    }

    /// Drops the cached lookup (after every address failed).
    fn forget(&self) {
        *self.dns.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// `host:port` for logs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What the handshake negotiated, for logs.
#[derive(Debug, Clone, Default)]
pub struct HandshakeInfo {
    /// `TLSv1_3` etc.
    pub version: Option<&'static str>,
    /// Negotiated ALPN.
    pub alpn: Option<Vec<u8>>,
    /// Whether the session was resumed.
    pub resumed: bool,
}

impl HandshakeInfo {
    /// ALPN as text.
    pub fn alpn_str(&self) -> &str {
        self.alpn
            .as_deref()
            .and_then(|a| std::str::from_utf8(a).ok())
            .unwrap_or("-")
    }
}

/// A connected upstream: TLS or plain TCP.
#[derive(Debug)]
pub enum UpstreamStream {
    /// Originated TLS.
    Tls(Box<TlsStream<TcpStream>>),
    /// Plaintext (a mapping without `tls:`).
    Plain(TcpStream),
}

impl UpstreamStream {
    /// Subject and serial of the upstream's certificate (parsed on demand: it costs).
    pub fn peer_subject_serial(&self) -> Option<(String, String)> {
        match self {
            UpstreamStream::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| subject_and_serial(c.as_ref())),
            UpstreamStream::Plain(_) => None,
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tls(s) => s.is_write_vectored(),
            UpstreamStream::Plain(s) => s.is_write_vectored(),
        }
    }
}

/// Keeps `upstream_connections_active` honest: decremented when the connection is dropped.
#[derive(Debug)]
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Metric handles of one TLS context (or `none` for plaintext), created once.
#[derive(Clone)]
pub struct ConnectMetrics {
    label: Arc<str>,
    metrics: Arc<Metrics>,
    ok: Counter,
    handshake_fresh: Counter,
    handshake_resumed: Counter,
    handshake_duration: Histogram,
    active: Gauge,
}

impl ConnectMetrics {
    /// Handles for `tls_context` (use `none` for plaintext upstreams).
    pub fn new(metrics: &Arc<Metrics>, tls_context: &str) -> Self {
        let l = [("tls_context", tls_context)];
        let hs = |resumed: &str| {
            metrics.counter(
                m::TLS_HANDSHAKES_TOTAL,
                &[("tls_context", tls_context), ("result", "ok"), ("resumed", resumed)],
            )
        };
        ConnectMetrics {
            label: tls_context.into(),
            metrics: metrics.clone(),
            ok: metrics.counter(
                m::UPSTREAM_CONNECTIONS_TOTAL,
                &[("tls_context", tls_context), ("result", "ok")],
            ),
            handshake_fresh: hs("false"),
            handshake_resumed: hs("true"),
            handshake_duration: metrics.histogram(m::TLS_HANDSHAKE_DURATION, &l),
            active: metrics.gauge(m::UPSTREAM_CONNECTIONS_ACTIVE, &l),
        }
    }

    fn failed(&self, kind: &'static str, during_handshake: bool) {
        self.metrics
            .counter(
                m::UPSTREAM_CONNECTIONS_TOTAL,
                &[("tls_context", &self.label), ("result", kind)],
            )
            .increment(1);
        if during_handshake {
            self.metrics
                .counter(
                    m::TLS_HANDSHAKES_TOTAL,
                    &[("tls_context", &self.label), ("result", kind), ("resumed", "false")],
                )
                .increment(1);
        }
    }

    /// Counts a TLS failure noticed after the handshake (TLS 1.3 client-cert rejections arrive
    /// as an alert on the first read).
    pub fn late_handshake_failure(&self, kind: &'static str) {
        self.failed(kind, true);
    }
}

/// A successful connection.
#[derive(Debug)]
pub struct Connected {
    /// The stream.
    pub stream: UpstreamStream,
    /// Negotiated parameters.
    pub info: HandshakeInfo,
    /// Decrements the active gauge when dropped.
    pub guard: ActiveGuard,
}

/// When a lookup happened, and its addresses.
pub type CachedLookup = (Instant, Vec<SocketAddr>);

/// How long a successful lookup is reused. getaddrinfo does not tell the record's TTL; a
/// few seconds spares the resolver a lookup per connection (pods' `ndots:5` makes each one
/// up to six queries) while following DNS changes quickly.
const DNS_CACHE_TTL: Duration = Duration::from_secs(5);

/// Link-local addresses (169.254.0.0/16 and fe80::/10): cloud metadata endpoints live there.
/// A name that resolves into them is refused; a mapping that names one literally is refused
/// by config validation.
pub fn is_link_local(ip: std::net::IpAddr) -> bool {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

async fn resolve(target: &Target, deadline: Instant) -> Result<Vec<SocketAddr>, UpstreamError> {
    if let Ok(ip) = target.host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    if let Some(addrs) = target.cached() {
        return Ok(addrs);
    }
    let lookup = tokio::net::lookup_host((&*target.host, target.port));
    let addrs: Vec<SocketAddr> = match tokio::time::timeout_at(deadline.into(), lookup).await {
        Err(_) => {
            return Err(UpstreamError::DnsTimeout {
                host: target.host.to_string(),
            });
        }
        Ok(Err(e)) => {
            return Err(UpstreamError::Dns {
                host: target.host.to_string(),
                message: e.to_string(),
            });
        }
        Ok(Ok(addrs)) => addrs.collect(),
    };
    let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| !is_link_local(a.ip())).collect();
    if allowed.is_empty() && !addrs.is_empty() {
        return Err(UpstreamError::DestinationDenied {
            host: target.host.to_string(),
            addr: addrs[0].ip().to_string(),
        });
    }
    if allowed.is_empty() {
        return Err(UpstreamError::Dns {
            host: target.host.to_string(),
            message: "no addresses".to_owned(),
        });
    }
    target.remember(&allowed);
    Ok(allowed)
}

/// Resolves and connects, trying each address in turn until the deadline.
pub async fn tcp_connect(target: &Target, deadline: Instant) -> Result<TcpStream, UpstreamError> {
    let addrs = resolve(target, deadline).await?;
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline.into(), TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout { addr: addr.to_string() });
            }
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                last = Some(UpstreamError::ConnectRefused { addr: addr.to_string() });
            }
            Ok(Err(e)) => {
                last = Some(UpstreamError::Connect {
                    addr: addr.to_string(),
                    source: e,
                });
            }
        }
    }
    target.forget();
    Err(last.unwrap_or_else(|| UpstreamError::Dns {
        host: target.host.to_string(),
        message: "no addresses".to_owned(),
    }))
}

/// Connects to `target`; with `tls`, originates TLS with that config. `timeout` covers DNS,
/// TCP connect and the handshake together.
pub async fn connect(
    target: &Target,
    tls: Option<&Arc<ClientConfig>>,
    timeout: Duration,
    cm: &ConnectMetrics,
) -> Result<Connected, UpstreamError> {
    let deadline = Instant::now() + timeout;
    let tcp = match tcp_connect(target, deadline).await {
        Ok(s) => s,
        Err(e) => {
            cm.failed(e.kind(), false);
            return Err(e);
        }
    };
    let (stream, info) = match (tls, &target.server_name) {
        (Some(config), Some(name)) => match handshake(tcp, config, name.clone(), deadline, cm).await {
            Ok(v) => v,
            Err(e) => {
                cm.failed(e.kind(), true);
                return Err(e);
            }
        },
        _ => (UpstreamStream::Plain(tcp), HandshakeInfo::default()),
    };
    cm.ok.increment(1);
    cm.active.increment(1.0);
    Ok(Connected {
        stream,
        info,
        guard: ActiveGuard(cm.active.clone()),
    })
}

async fn handshake(
    tcp: TcpStream,
    config: &Arc<ClientConfig>,
    name: ServerName<'static>,
    deadline: Instant,
    cm: &ConnectMetrics,
) -> Result<(UpstreamStream, HandshakeInfo), UpstreamError> {
    let addr = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let started = Instant::now();
    let connecting = TlsConnector::from(config.clone()).connect(name, tcp);
    let tls = match tokio::time::timeout_at(deadline.into(), connecting).await {
        Err(_) => return Err(UpstreamError::HandshakeTimeout { addr }),
        Ok(Err(e)) => return Err(UpstreamError::from_io(&addr, e)),
        Ok(Ok(s)) => s,
    };
    cm.handshake_duration.record(started.elapsed().as_secs_f64());
    let conn = tls.get_ref().1;
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if resumed {
        cm.handshake_resumed.increment(1);
    } else {
        cm.handshake_fresh.increment(1);
    }
    let info = HandshakeInfo {
        version: conn.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "other",
        }),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        resumed,
    };
    Ok((UpstreamStream::Tls(Box::new(tls)), info))
}
