//! The composition root: store, reloader, listeners, admin, signals → drain.
//!
//! `start` binds every socket before anything serves (a port clash fails start-up cleanly),
//! loads every context once, then spawns the accept loops. Tests call it in-process with
//! `127.0.0.1:0` listeners; `run` adds signal handling and the drain for the real binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

use crate::admin::Admin;
use crate::config::Config;
use crate::metrics::{self as m, Metrics};
use crate::proxy::accept::{Overload, accept_loop};
use crate::proxy::http::HttpProxy;
use crate::proxy::tcp::TcpMapping;
use crate::proxy::transparent::Transparent;
use crate::shutdown::Shutdown;
use crate::tls::TlsStore;
use crate::tls::reload::{self, Reloader};

/// A start-up failure (the configuration was valid, but the world disagreed).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// Address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A mapping could not be resolved.
    #[error("{0}")]
    Mapping(String),
}

/// What readiness depends on.
#[derive(Debug)]
pub struct Readiness {
    store: Arc<TlsStore>,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
}

impl Readiness {
    /// `Ok` when ready, else what is missing. Listeners are bound before this exists.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut missing: Vec<String> = self
            .store
            .missing()
            .iter()
            .map(|c| format!("TLS context `{c}` has no valid credentials (see /certs)"))
            .collect();
        if self.shutdown.is_draining() {
            missing.push("draining: the sidecar is shutting down".to_owned());
        }
        if missing.is_empty() { Ok(()) } else { Err(missing) }
    }

    /// Recomputes the `ready` gauge.
    pub fn refresh(&self) {
        let ready = self.check().is_ok();
        self.metrics.gauge(m::READY, &[]).set(if ready { 1.0 } else { 0.0 });
    }
}

/// A running sidecar.
pub struct Sidecar {
    /// The effective configuration.
    pub config: Arc<Config>,
    /// Bound address of the admin listener.
    pub admin_addr: Option<SocketAddr>,
    /// Notified by `POST /drain`.
    pub drain_requested: Arc<Notify>,
    /// Bound address of the HTTP listener.
    pub http_addr: Option<SocketAddr>,
    /// Bound address of the transparent listener.
    pub transparent_addr: Option<SocketAddr>,
    /// Bound address of each TCP mapping, by name.
    pub tcp_addrs: BTreeMap<String, SocketAddr>,
    /// Credentials.
    pub store: Arc<TlsStore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Drain tokens.
    pub shutdown: Shutdown,
    /// Forces reloads.
    pub reloader: Reloader,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    stop_background: tokio_util::sync::CancellationToken,
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
        what: what.to_owned(),
        addr,
        source,
    })
}

/// Binds an optional listener.
async fn bind_opt(what: &str, l: Option<crate::config::ListenAddr>) -> Result<Option<TcpListener>, StartError> {
    match l {
        Some(l) => bind(what, l.address).await.map(Some),
        None => Ok(None),
    }
}

/// Shared by every plaintext accept loop.
struct Listening {
    shutdown: Shutdown,
    cap: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Listening {
    /// Spawns an accept loop calling `handle` for each connection; returns the bound address.
    fn spawn<F, Fut>(
        &self,
        listener: TcpListener,
        name: Arc<str>,
        reply: &'static [u8],
        handle: F,
    ) -> Result<SocketAddr, StartError>
    where
        F: Fn(tokio::net::TcpStream, SocketAddr, Shutdown) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let addr = local_addr(&listener, &name)?;
        let overload = Overload {
            reply,
            counter: self
                .metrics
                .counter(m::DENIED_TOTAL, &[("listener", &name), ("reason", "overloaded")]),
        };
        let sd = self.shutdown.clone();
        tokio::spawn(accept_loop(
            listener,
            name,
            self.shutdown.clone(),
            self.cap.clone(),
            overload,
            move |stream, peer, permit| {
                let fut = handle(stream, peer, sd.clone());
                async move {
                    fut.await;
                    drop(permit);
                }
            },
        ));
        Ok(addr)
    }
}

/// Starts everything; returns once every listener is bound and every context was tried once.
pub async fn start(config: Config) -> Result<Sidecar, StartError> {
    let config = Arc::new(config);
    let metrics = Metrics::new();
    let store = Arc::new(TlsStore::new(&config, metrics.clone()));
    let shutdown = Shutdown::new();
    let l = &config.listeners;
    let http_proxy = match l.http.is_some() || l.transparent.is_some() {
        true => Some(HttpProxy::new(&config, &store, &metrics, shutdown.clone()).map_err(StartError::Mapping)?),
        false => None,
    };
    // Bind every socket before anything serves: a port clash fails start-up cleanly.
    let http_listener = bind_opt("listeners.http", l.http).await?;
    let transparent_listener = bind_opt("listeners.transparent", l.transparent).await?;
    let admin_listener = bind_opt("admin", config.admin).await?;
    let mut tcp = Vec::new();
    for mc in &config.tcp_mappings {
        let mapping = TcpMapping::new(mc, &store, &metrics, &config.limits).map_err(StartError::Mapping)?;
        let listener = bind(&format!("tcp_mappings `{}`", mc.name), mc.listen_addr()).await?;
        tcp.push((Arc::new(mapping), listener));
    }

    warn_subpath(&store);
    let readiness = Arc::new(Readiness {
        store: store.clone(),
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
    });
    let stop_background = tokio_util::sync::CancellationToken::new();
    let r = readiness.clone();
    let reloader = reload::start(
        store.clone(),
        metrics.clone(),
        config.reload_poll_interval.0,
        config.reload_watch,
        stop_background.clone(),
        Arc::new(move || r.refresh()),
    )
    .await;

    let listening = Listening {
        shutdown: shutdown.clone(),
        cap: Arc::new(Semaphore::new(config.limits.max_connections)),
        metrics: metrics.clone(),
    };
    let mut own_ports = Vec::new();
    let mut http_addr = None;
    if let (Some(listener), Some(proxy)) = (http_listener, &http_proxy) {
        let p = proxy.clone();
        let addr = listening.spawn(listener, "http".into(), OVERLOADED_503, move |s, peer, _| {
            p.clone().serve_connection(s, peer)
        })?;
        tracing::info!(addr = %addr, mappings = config.mappings.len(), "HTTP listener ready");
        own_ports.push(addr.port());
        http_addr = Some(addr);
    }
    let mut tcp_addrs = BTreeMap::new();
    for (mapping, listener) in tcp {
        let name = mapping.name().clone();
        let addr = listening.spawn(listener, name.clone(), b"", move |s, peer, sd| {
            mapping.clone().handle(s, peer, sd)
        })?;
        tracing::info!(listener = %name, addr = %addr, "TCP mapping ready");
        own_ports.push(addr.port());
        tcp_addrs.insert(name.to_string(), addr);
    }
    let admin_addr = admin_listener.as_ref().map(|a| local_addr(a, "admin")).transpose()?;
    own_ports.extend(admin_addr.map(|a| a.port()));
    let mut transparent_addr = None;
    if let Some(listener) = transparent_listener {
        let mut t = Transparent::new(&config, &store, &metrics, http_proxy.clone(), &config.limits)
            .map_err(StartError::Mapping)?;
        let addr = local_addr(&listener, "listeners.transparent")?;
        for p in own_ports.iter().copied().chain([addr.port()]) {
            t.add_own_port(p);
        }
        let t = Arc::new(t);
        listening.spawn(listener, "transparent".into(), b"", move |s, peer, sd| {
            t.clone().handle(s, peer, sd)
        })?;
        tracing::info!(addr = %addr, rules = config.transparent_rules.len(), "transparent listener ready");
        transparent_addr = Some(addr);
    }

    let drain_requested = Arc::new(Notify::new());
    if let Some(listener) = admin_listener {
        let admin = Arc::new(Admin {
            config: config.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            reloader: reloader.clone(),
            drain_requested: drain_requested.clone(),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(admin.serve(listener));
        tracing::info!(addr = %admin_addr.map(|a| a.to_string()).unwrap_or_default(), "admin listener ready (/metrics /healthz /readyz /certs /config)");
    }
    spawn_housekeeping(metrics.clone(), http_proxy, stop_background.clone());
    readiness.refresh();
    Ok(Sidecar {
        admin_addr,
        drain_requested,
        config,
        http_addr,
        transparent_addr,
        tcp_addrs,
        store,
        metrics,
        shutdown,
        reloader,
        readiness,
        stop_background,
    })
}

/// Once a second: close pooled connections of superseded generations; every 5 s: drain the
/// histogram buffers so memory stays flat between scrapes.
fn spawn_housekeeping(metrics: Arc<Metrics>, http: Option<Arc<HttpProxy>>, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    n += 1;
                    if let Some(p) = &http {
                        p.sweep();
                    }
                    if n % 5 == 0 {
                        metrics.upkeep();
                    }
                }
            }
        }
    });
}

fn local_addr(listener: &TcpListener, what: &str) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        what: what.to_owned(),
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

/// What an app gets when the connection cap is reached.
const OVERLOADED_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nx-mtls-sidecar-error: overloaded\r\nconnection: close\r\ncontent-length: 73\r\n\r\nmtls-sidecar: too many connections (limits.max_connections); retry later\n";

fn warn_subpath(store: &TlsStore) {
    for slot in store.slots() {
        for f in slot.source().files() {
            if crate::tls::material::looks_like_subpath(&f) {
                tracing::warn!(
                    tls.context = %slot.name,
                    file = %f.display(),
                    "this file looks like a subPath mount: it will never be updated when the Secret rotates (kubernetes/kubernetes#50345); mount the whole Secret volume as a directory"
                );
            }
        }
    }
}

impl Sidecar {
    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.shutdown.tracker.len()
    }

    /// Drains: readiness false, keep serving for at least `min` and until no connection is
    /// active or `deadline` passes, then stop accepting and force-close what is left.
    pub async fn drain(&self, min: Duration, deadline: Duration) {
        let started = Instant::now();
        self.shutdown.start_draining();
        self.readiness.refresh();
        tracing::info!(
            drain_timeout_ms = deadline.as_millis() as u64,
            active = self.active_connections(),
            "draining: still serving the application's requests until connections finish"
        );
        loop {
            let elapsed = started.elapsed();
            if elapsed >= deadline || (elapsed >= min && self.active_connections() == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.close().await;
    }

    /// Stops accepting, closes every connection now and stops background tasks.
    pub async fn close(&self) {
        self.shutdown.stop_accepting.cancel();
        self.shutdown.force_close.cancel();
        self.shutdown.tracker.close();
        let left = self.active_connections();
        if left > 0 {
            tracing::info!(connections = left, "closing connections still open");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shutdown.tracker.wait()).await;
        self.stop_background.cancel();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.shutdown.stop_accepting.cancel();
        self.shutdown.force_close.cancel();
        self.stop_background.cancel();
    }
}

/// Runs the sidecar until SIGTERM/SIGINT, then drains (SPEC §8). SIGHUP forces a reload.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let drain_timeout = config.drain_timeout.0;
    let sidecar = start(config).await?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "mtls-sidecar started");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading every TLS context");
                sidecar.reloader.trigger();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = sidecar.drain_requested.notified() => break,
        }
    }
    let min = drain_timeout.min(MIN_DRAIN);
    tokio::select! {
        _ = sidecar.drain(min, drain_timeout) => tracing::info!("drained; exiting"),
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
    Ok(())
}

/// Late requests after SIGTERM (the app may still be finishing work) get at least this long.
pub const MIN_DRAIN: Duration = Duration::from_secs(2);
