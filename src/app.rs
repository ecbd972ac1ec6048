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

/// Starts everything; returns once every listener is bound and every context was tried once.
pub async fn start(config: Config) -> Result<Sidecar, StartError> {
    let config = Arc::new(config);
    let metrics = Metrics::new();
    let store = Arc::new(TlsStore::new(&config, metrics.clone()));
    let shutdown = Shutdown::new();
    let cap = Arc::new(Semaphore::new(config.limits.max_connections));

    let http = match &config.listeners.http {
        Some(l) => {
            let proxy = HttpProxy::new(&config, &store, &metrics, shutdown.clone()).map_err(StartError::Mapping)?;
            Some((proxy, bind("listeners.http", l.address).await?))
        }
        None => None,
    };
    let admin_listener = match &config.admin {
        Some(a) => Some(bind("admin", a.address).await?),
        None => None,
    };
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

    let mut http_addr = None;
    let mut http_proxy = None;
    if let Some((proxy, listener)) = http {
        let addr = local_addr(&listener, "listeners.http")?;
        http_addr = Some(addr);
        let overload = Overload {
            reply: OVERLOADED_503,
            counter: metrics.counter(m::DENIED_TOTAL, &[("listener", "http"), ("reason", "overloaded")]),
        };
        let p = proxy.clone();
        tokio::spawn(accept_loop(
            listener,
            "http".into(),
            shutdown.clone(),
            cap.clone(),
            overload,
            move |stream, peer, permit| {
                let p = p.clone();
                async move {
                    p.serve_connection(stream, peer).await;
                    drop(permit);
                }
            },
        ));
        tracing::info!(addr = %addr, mappings = config.mappings.len(), "HTTP listener ready");
        http_proxy = Some(proxy);
    }
    let mut tcp_addrs = BTreeMap::new();
    for (mapping, listener) in tcp {
        let addr = local_addr(&listener, &mapping.name)?;
        tcp_addrs.insert(mapping.name.to_string(), addr);
        let name = mapping.name.clone();
        let overload = Overload {
            reply: b"",
            counter: metrics.counter(
                m::DENIED_TOTAL,
                &[("listener", &mapping.name), ("reason", "overloaded")],
            ),
        };
        let sd = shutdown.clone();
        tokio::spawn(accept_loop(
            listener,
            mapping.name.clone(),
            shutdown.clone(),
            cap.clone(),
            overload,
            move |stream, peer, permit| {
                let (mapping, sd) = (mapping.clone(), sd.clone());
                async move {
                    mapping.handle(stream, peer, sd).await;
                    drop(permit);
                }
            },
        ));
        tracing::info!(listener = %name, addr = %addr, "TCP mapping ready");
    }

    let metrics_upkeep = metrics.clone();
    let stop = stop_background.clone();
    let sweeper = http_proxy.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    n += 1;
                    if let Some(p) = &sweeper {
                        p.sweep();
                    }
                    if n % 5 == 0 {
                        metrics_upkeep.upkeep();
                    }
                }
            }
        }
    });
    let drain_requested = Arc::new(Notify::new());
    let mut admin_addr = None;
    if let Some(listener) = admin_listener {
        admin_addr = Some(local_addr(&listener, "admin")?);
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
    readiness.refresh();
    Ok(Sidecar {
        admin_addr,
        drain_requested,
        config,
        http_addr,
        tcp_addrs,
        store,
        metrics,
        shutdown,
        reloader,
        readiness,
        stop_background,
    })
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
