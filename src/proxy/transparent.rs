//! Transparent mode: connections redirected by iptables to `listeners.transparent`. The
//! original destination (SO_ORIGINAL_DST) picks a rule; HTTP is detected from the first
//! bytes and routed by Host through the HTTP mappings exactly as on the HTTP listener; other
//! traffic is relayed over mTLS to the original destination. Nothing unmatched leaves the
//! pod, and nothing leaves in plaintext unless a rule says `passthrough`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::connect::Target;
use super::http::HttpProxy;
use super::tcp::Relayer;
use crate::config::{Cidr, Config, Limits, Protocol, TransparentRule};
use crate::metrics::{self as m, Metrics};
use crate::shutdown::Shutdown;
use crate::tls::TlsStore;

/// The HTTP/2 connection preface's first bytes.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// Methods whose request line we recognise as HTTP/1.x.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
];

struct Rule {
    cidrs: Vec<Cidr>,
    ports: Vec<u16>,
    protocol: Protocol,
    sni: Option<ServerName<'static>>,
    relay: Relayer,
}

impl Rule {
    fn matches(&self, dst: SocketAddr) -> bool {
        self.cidrs.iter().any(|c| c.contains(dst.ip())) && (self.ports.is_empty() || self.ports.contains(&dst.port()))
    }
}

/// The transparent listener's shared state.
pub struct Transparent {
    rules: Vec<Rule>,
    http: Option<Arc<HttpProxy>>,
    own_ports: Vec<u16>,
    detect_timeout: Duration,
    denied: Vec<(&'static str, Counter)>,
}

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line or the h2 preface.
    Http,
    /// Anything else, or nothing within the timeout.
    Opaque,
}

/// Classifies the first bytes of a connection; `None` while more bytes are needed.
pub fn classify(first: &[u8]) -> Option<Detected> {
    if first.is_empty() {
        return None;
    }
    if H2_PREFACE.starts_with(first) {
        return if first.len() >= H2_PREFACE.len() {
            Some(Detected::Http)
        } else {
            None
        };
    }
    if first.starts_with(H2_PREFACE) {
        return Some(Detected::Http);
    }
    for method in METHODS {
        let want = format!("{method} ");
        if first.len() >= want.len() {
            if first.starts_with(want.as_bytes()) {
                return Some(Detected::Http);
            }
        } else if want.as_bytes().starts_with(first) {
            return None;
        }
    }
    Some(Detected::Opaque)
}

impl Transparent {
    /// Builds the rules of a validated configuration.
    pub fn new(
        config: &Config,
        store: &TlsStore,
        metrics: &Arc<Metrics>,
        http: Option<Arc<HttpProxy>>,
        limits: &Limits,
    ) -> Result<Self, String> {
        let rules = config
            .transparent_rules
            .iter()
            .map(|r| Self::rule(r, store, metrics, limits))
            .collect::<Result<Vec<_>, _>>()?;
        let mut own_ports: Vec<u16> = [config.listeners.http, config.listeners.transparent, config.admin]
            .into_iter()
            .flatten()
            .map(|l| l.address.port())
            .chain(config.tcp_mappings.iter().map(|t| t.port))
            .filter(|p| *p != 0)
            .collect();
        own_ports.sort_unstable();
        let denied = ["no_route", "no_original_destination", "loop"]
            .into_iter()
            .map(|r| {
                (
                    r,
                    metrics.counter(m::DENIED_TOTAL, &[("listener", "transparent"), ("reason", r)]),
                )
            })
            .collect();
        Ok(Transparent {
            rules,
            http,
            own_ports,
            detect_timeout: config.protocol_detect_timeout.0,
            denied,
        })
    }

    fn rule(r: &TransparentRule, store: &TlsStore, metrics: &Arc<Metrics>, limits: &Limits) -> Result<Rule, String> {
        let cidrs = r
            .destination
            .0
            .iter()
            .map(|d| Cidr::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        let sni = r
            .sni
            .as_ref()
            .map(|s| ServerName::try_from(s.clone()).map_err(|_| format!("`{s}` cannot be a TLS server name")))
            .transpose()?;
        let tls = if r.passthrough { None } else { r.tls.as_deref() };
        let relay = Relayer::new(
            &r.name,
            tls,
            [r.connect_timeout_ms, r.idle_timeout_ms],
            store,
            metrics,
            limits,
        )?;
        Ok(Rule {
            cidrs,
            ports: r.ports.clone(),
            protocol: if r.passthrough { Protocol::Tcp } else { r.protocol },
            sni,
            relay,
        })
    }

    /// Add a port the sidecar listens on (ephemeral ports are known only once bound).
    pub fn add_own_port(&mut self, port: u16) {
        self.own_ports.push(port);
    }

    fn deny(&self, reason: &'static str, peer: SocketAddr, detail: &str) {
        if let Some((_, c)) = self.denied.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
        tracing::warn!(listener = "transparent", peer = %peer, reason, "refused a redirected connection: {detail}");
    }

    /// Whether `dst` is one of the sidecar's own listeners (a redirect loop).
    fn is_own(&self, dst: SocketAddr, local: SocketAddr) -> bool {
        let ip = dst.ip().to_canonical();
        let ours = ip.is_loopback() || ip.is_unspecified() || ip == local.ip().to_canonical();
        ours && self.own_ports.contains(&dst.port())
    }

    /// Serves one redirected connection.
    pub async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, shutdown: Shutdown) {
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        };
        let dst = match crate::sys::original_dst(&stream, local.is_ipv6()) {
            Ok(d) => d,
            Err(e) => {
                return self.deny(
                    "no_original_destination",
                    peer,
                    &format!("no SO_ORIGINAL_DST ({e}): only iptables-redirected connections are served here"),
                );
            }
        };
        if self.is_own(dst, local) {
            return self.deny(
                "loop",
                peer,
                &format!("the original destination {dst} is the sidecar itself"),
            );
        }
        let Some(rule) = self.rules.iter().find(|r| r.matches(dst)) else {
            return self.deny("no_route", peer, &format!("no transparent rule matches {dst}"));
        };
        let detected = match rule.protocol {
            Protocol::Http => Detected::Http,
            Protocol::Tcp => Detected::Opaque,
            Protocol::Auto => self.detect(&stream).await,
        };
        match (detected, &self.http) {
            (Detected::Http, Some(http)) => http.clone().serve_connection(stream, peer).await,
            (Detected::Http, None) => self.deny("no_route", peer, "HTTP was detected but no HTTP mappings exist"),
            (Detected::Opaque, _) => {
                let server_name = rule
                    .relay
                    .context()
                    .map(|_| rule.sni.clone().unwrap_or(ServerName::IpAddress(dst.ip().into())));
                let target = Target::new(dst.ip().to_string().into(), dst.port(), server_name);
                rule.relay.handle(stream, peer, &target, shutdown).await;
            }
        }
    }

    /// Peeks at the first bytes; a silent client (server-speaks-first) is opaque after the
    /// detection timeout, and bytes that cannot start HTTP decide at once.
    async fn detect(&self, stream: &TcpStream) -> Detected {
        let mut buf = [0u8; 16];
        let deadline = tokio::time::Instant::now() + self.detect_timeout;
        loop {
            let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return Detected::Opaque,
            };
            if n == 0 {
                return Detected::Opaque;
            }
            if let Some(d) = classify(&buf[..n]) {
                return d;
            }
            // A partial method name: wait for more bytes (peek returns at once while data is
            // queued, so wait for readability changes instead of spinning).
            if tokio::time::timeout_at(deadline, stream.readable()).await.is_err() {
                return Detected::Opaque;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http_h2_and_opaque() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"POST /x"), Some(Detected::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Detected::Http));
        assert_eq!(classify(b"GE"), None, "needs more bytes");
        assert_eq!(classify(b"PRI"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Opaque), "a TLS ClientHello");
        assert_eq!(
            classify(b"\x00\x00\x00\x08"),
            Some(Detected::Opaque),
            "a Postgres startup"
        );
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
    }
}
