//! An in-process upstream that requires client certificates and reports what it saw.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::pki::{Leaf, TestCa};
use crate::tls::info::subject_and_serial;

/// What the upstream saw of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenClient {
    /// Client certificate subject.
    pub subject: String,
    /// Client certificate serial.
    pub serial: String,
    /// Whether the session was resumed.
    pub resumed: bool,
    /// Negotiated ALPN.
    pub alpn: Option<String>,
}

/// Counters and observations, shared with the test.
#[derive(Debug, Default)]
pub struct Observed {
    /// TCP connections accepted.
    pub accepted: AtomicUsize,
    /// Completed TLS handshakes.
    pub handshakes: AtomicUsize,
    /// Clients seen, in order.
    pub clients: Mutex<Vec<SeenClient>>,
}

impl Observed {
    /// Serials seen so far.
    pub fn serials(&self) -> Vec<String> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| c.serial.clone())
            .collect()
    }

    /// The last client seen.
    pub fn last(&self) -> Option<SeenClient> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).last().cloned()
    }
}

/// A running upstream.
#[derive(Debug)]
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// What it saw.
    pub observed: Arc<Observed>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Wraps a running accept task.
    pub fn from_parts(addr: SocketAddr, observed: Arc<Observed>, task: JoinHandle<()>) -> Self {
        Upstream { addr, observed, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How the upstream behaves after accepting TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Handshake, write one report line, then echo until EOF.
    ReportAndEcho,
    /// Accept TCP and never say anything (a handshake that never finishes).
    Silent,
}

/// A server config presenting `leaf` and requiring a client certificate issued by one of
/// `client_cas` (or none required when empty).
pub fn server_config(leaf: &Leaf, chain: &[&TestCa], client_cas: &[&TestCa]) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("protocol versions: {e}"));
    let builder = if client_cas.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for ca in client_cas {
            roots.add(ca.der.clone()).unwrap_or_else(|e| panic!("client CA: {e}"));
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap_or_else(|e| panic!("client verifier: {e}"));
        builder.with_client_cert_verifier(verifier)
    };
    let mut certs: Vec<CertificateDer<'static>> = vec![leaf.der.clone()];
    certs.extend(chain.iter().map(|c| c.der.clone()));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pkcs8.clone()));
    let mut cfg = builder
        .with_single_cert(certs, key)
        .unwrap_or_else(|e| panic!("server cert: {e}"));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Describes the client of an accepted connection.
pub fn seen_client(conn: &rustls::ServerConnection) -> SeenClient {
    let (subject, serial) = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| subject_and_serial(c.as_ref()))
        .unwrap_or_else(|| ("-".to_owned(), "-".to_owned()));
    SeenClient {
        subject,
        serial,
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        alpn: conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
    }
}

/// Starts a TCP upstream on 127.0.0.1:0.
pub async fn start_tcp(config: Arc<ServerConfig>, behavior: Behavior) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("binding the upstream: {e}"));
    serve_tcp_on(listener, config, behavior)
}

/// Serves a TCP upstream on an already bound listener (e.g. one inside a network namespace).
pub fn serve_tcp_on(listener: TcpListener, config: Arc<ServerConfig>, behavior: Behavior) -> Upstream {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("upstream address: {e}"));
    let observed = Arc::new(Observed::default());
    let obs = observed.clone();
    let acceptor = TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            obs.accepted.fetch_add(1, Ordering::SeqCst);
            let (acceptor, obs) = (acceptor.clone(), obs.clone());
            tokio::spawn(async move {
                match behavior {
                    Behavior::Silent => {
                        let mut tcp = tcp;
                        let mut sink = [0u8; 1024];
                        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                    }
                    Behavior::ReportAndEcho => report_and_echo(acceptor, tcp, obs).await,
                }
            });
        }
    });
    Upstream { addr, observed, task }
}

async fn report_and_echo(acceptor: TlsAcceptor, tcp: TcpStream, obs: Arc<Observed>) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return;
    };
    let seen = seen_client(tls.get_ref().1);
    obs.handshakes.fetch_add(1, Ordering::SeqCst);
    obs.clients.lock().unwrap_or_else(|e| e.into_inner()).push(seen.clone());
    let line = format!(
        "upstream saw client certificate subject=\"{}\" serial={} resumed={}\n",
        seen.subject, seen.serial, seen.resumed
    );
    if tls.write_all(line.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tls.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tls.shutdown().await;
}
