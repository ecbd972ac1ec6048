//! TCP relays: Emissary `TCPMapping`s (a loopback port whose bytes go to one upstream over
//! mTLS) and the TCP side of transparent rules (to the connection's original destination).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Counter;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::connect::{self, ConnectMetrics, Target};
use super::error::UpstreamError;
use super::relay::{RelayEnd, relay};
use crate::config::{DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_IDLE_TIMEOUT_MS, Limits, Millis, TcpMappingConfig};
use crate::metrics::{self as m, Metrics};
use crate::shutdown::Shutdown;
use crate::tls::{ContextSlot, TlsStore};

/// How to relay opaque bytes: the credentials, timeouts and metric handles of one TCP
/// mapping or transparent rule, whatever the destination.
pub struct Relayer {
    /// Name: the `listener` label.
    pub name: Arc<str>,
    context: Option<Arc<ContextSlot>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    buf_size: usize,
    cm: ConnectMetrics,
    metrics: Arc<Metrics>,
    bytes_to: Counter,
    bytes_from: Counter,
    ok: Counter,
}

/// One TCP mapping, resolved at start.
pub struct TcpMapping {
    /// How its bytes are relayed.
    pub relay: Relayer,
    target: Target,
}

impl TcpMapping {
    /// Builds the runtime view of a validated mapping.
    pub fn new(
        cfg: &TcpMappingConfig,
        store: &TlsStore,
        metrics: &Arc<Metrics>,
        limits: &Limits,
    ) -> Result<Self, String> {
        let relay = Relayer::new(
            &cfg.name,
            cfg.tls.as_deref(),
            [cfg.connect_timeout_ms, cfg.idle_timeout_ms],
            store,
            metrics,
            limits,
        )?;
        let target = Target::for_service(&cfg.service, relay.context.as_ref().map(|c| c.config()))
            .map_err(|e| format!("tcp mapping `{}`: {e}", cfg.name))?;
        Ok(TcpMapping { relay, target })
    }

    /// The mapping's name.
    pub fn name(&self) -> &Arc<str> {
        &self.relay.name
    }

    /// Serves one accepted connection to the end.
    pub async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr, shutdown: Shutdown) {
        self.relay.handle(client, peer, &self.target, shutdown).await;
    }
}

impl Relayer {
    /// Resolves the context and creates the metric handles of listener `name`.
    pub fn new(
        name: &str,
        tls: Option<&str>,
        [connect_ms, idle_ms]: [Option<Millis>; 2],
        store: &TlsStore,
        metrics: &Arc<Metrics>,
        limits: &Limits,
    ) -> Result<Self, String> {
        let context = tls
            .map(|t| {
                store
                    .get(t)
                    .cloned()
                    .ok_or_else(|| format!("`{name}`: unknown TLS context `{t}`"))
            })
            .transpose()?;
        let label = tls.unwrap_or("none");
        let bytes = |d: &str| metrics.counter(m::BYTES_TOTAL, &[("listener", name), ("direction", d)]);
        Ok(Relayer {
            name: name.into(),
            context,
            connect_timeout: connect_ms.map_or(Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS), |d| d.0),
            idle_timeout: idle_ms.map_or(Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS), |d| d.0),
            buf_size: limits.buffer_bytes,
            cm: ConnectMetrics::new(metrics, label),
            metrics: metrics.clone(),
            bytes_to: bytes("to_upstream"),
            bytes_from: bytes("from_upstream"),
            ok: metrics.counter(m::TCP_CONNECTIONS_TOTAL, &[("listener", name), ("result", "ok")]),
        })
    }

    fn count(&self, result: &'static str) {
        if result == "ok" {
            self.ok.increment(1);
        } else {
            self.metrics
                .counter(
                    m::TCP_CONNECTIONS_TOTAL,
                    &[("listener", &self.name), ("result", result)],
                )
                .increment(1);
        }
    }

    /// The context, if TLS is originated.
    pub fn context(&self) -> Option<&Arc<ContextSlot>> {
        self.context.as_ref()
    }

    /// Relays one accepted connection to `target` until either side is done.
    pub async fn handle(&self, client: TcpStream, peer: SocketAddr, target: &Target, shutdown: Shutdown) {
        let span = tracing::info_span!("conn", listener = %self.name, peer = %peer, tls.context = tracing::field::Empty, generation = tracing::field::Empty);
        self.serve(client, target, shutdown).instrument(span).await;
    }

    async fn serve(&self, mut client: TcpStream, target: &Target, shutdown: Shutdown) {
        let started = Instant::now();
        let generation = match &self.context {
            None => None,
            Some(slot) => {
                tracing::Span::current().record("tls.context", &*slot.name);
                match slot.current() {
                    Some(g) => {
                        tracing::Span::current().record("generation", g.number);
                        Some(g)
                    }
                    None => {
                        let e = UpstreamError::NoClientIdentity {
                            context: slot.name.to_string(),
                        };
                        return self.fail(&e, target, started);
                    }
                }
            }
        };
        let tls = generation.as_ref().map(|g| &g.configs.tcp);
        let connected = tokio::select! {
            r = connect::connect(target, tls, self.connect_timeout, &self.cm) => r,
            _ = shutdown.force_close.cancelled() => return self.count("shutdown"),
        };
        let mut up = match connected {
            Ok(c) => c,
            Err(e) => return self.fail(&e, target, started),
        };
        let peer_cert = tracing::enabled!(target: "access", tracing::Level::INFO)
            .then(|| up.stream.peer_subject_serial())
            .flatten();
        let (stats, end) = relay(
            &mut client,
            &mut up.stream,
            self.idle_timeout,
            self.buf_size,
            &shutdown.force_close,
        )
        .await;
        self.bytes_to.increment(stats.to_upstream);
        self.bytes_from.increment(stats.from_upstream);
        let result: &'static str = match &end {
            RelayEnd::Done => "ok",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::Cancelled => "shutdown",
            RelayEnd::Client(_) => "client_reset",
            RelayEnd::Upstream(e) => {
                let kind = super::error::io_kind(e);
                if kind == "peer_rejected_client_cert" {
                    self.cm.late_handshake_failure(kind);
                }
                kind
            }
        };
        self.count(result);
        if let RelayEnd::Upstream(e) | RelayEnd::Client(e) = &end {
            tracing::warn!(reason = result, upstream = %target.authority(), "relay ended with an error: {e}");
        }
        let (subject, serial) = peer_cert.unwrap_or_default();
        tracing::info!(
            target: "access",
            listener = %self.name,
            mapping = %self.name,
            tls_context = self.context.as_ref().map(|c| &*c.name).unwrap_or("none"),
            upstream = %target.authority(),
            result,
            duration_ms = started.elapsed().as_millis() as u64,
            bytes_to_upstream = stats.to_upstream,
            bytes_from_upstream = stats.from_upstream,
            tls.version = up.info.version.unwrap_or("-"),
            tls.alpn = up.info.alpn_str(),
            tls.resumed = up.info.resumed,
            upstream.subject = %subject,
            upstream.serial = %serial,
            "tcp connection"
        );
    }

    fn fail(&self, e: &UpstreamError, target: &Target, started: Instant) {
        let kind = e.kind();
        self.count(kind);
        tracing::warn!(reason = kind, upstream = %target.authority(), "closing the app's connection: {e}");
        tracing::info!(
            target: "access",
            listener = %self.name,
            mapping = %self.name,
            tls_context = self.context.as_ref().map(|c| &*c.name).unwrap_or("none"),
            upstream = %target.authority(),
            result = kind,
            duration_ms = started.elapsed().as_millis() as u64,
            bytes_to_upstream = 0u64,
            bytes_from_upstream = 0u64,
            "tcp connection"
        );
    }
}
