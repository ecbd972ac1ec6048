//! The runtime form of an Emissary `Mapping`, built once at start with its metric handles.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderValue;
use metrics::{Counter, Histogram};

use crate::config::{DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_REQUEST_TIMEOUT_MS, MappingConfig};
use crate::metrics::{self as m, Metrics};
use crate::proxy::connect::{ConnectMetrics, Target};
use crate::proxy::route::{HostPattern, Route};
use crate::tls::{ContextSlot, TlsStore};

/// One HTTP mapping.
pub struct HttpMapping {
    /// Position in the config: the pool's upstream id.
    pub index: usize,
    /// Name: the `mapping` label.
    pub name: Arc<str>,
    /// Where requests go.
    pub target: Target,
    /// Credentials, if TLS is originated.
    pub context: Option<Arc<ContextSlot>>,
    /// `tls_context` label (`none` for plaintext).
    pub tls_label: Arc<str>,
    /// The matched prefix (for rewriting).
    pub prefix: String,
    /// Replacement for the prefix.
    pub rewrite: Option<String>,
    /// Host header sent upstream instead of the app's.
    pub host_rewrite: Option<HeaderValue>,
    /// Request → response headers.
    pub timeout: Duration,
    /// Connect + handshake.
    pub connect_timeout: Duration,
    /// Pooled connection idle timeout.
    pub idle_timeout: Duration,
    /// Extra attempts after a connect failure.
    pub retries_on_connect: u32,
    /// Extra attempts after a reset on a reused connection.
    pub retries_on_reset: u32,
    /// WebSocket upgrades allowed.
    pub allow_websocket: bool,
    /// Connection metrics of the context.
    pub cm: ConnectMetrics,
    /// Request duration.
    pub duration: Histogram,
    metrics: Arc<Metrics>,
    codes: Box<[OnceLock<Counter>]>,
}

impl HttpMapping {
    /// Builds the runtime view of a validated mapping.
    pub fn new(index: usize, cfg: &MappingConfig, store: &TlsStore, metrics: &Arc<Metrics>) -> Result<Self, String> {
        let context = match &cfg.tls {
            Some(t) => Some(
                store
                    .get(t)
                    .cloned()
                    .ok_or_else(|| format!("mapping `{}`: unknown TLS context `{t}`", cfg.name))?,
            ),
            None => None,
        };
        let target = Target::for_service(&cfg.service, context.as_ref().map(|c| c.config()))
            .map_err(|e| format!("mapping `{}`: {e}", cfg.name))?;
        let host_rewrite = cfg
            .host_rewrite
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| format!("mapping `{}`: host_rewrite is not a valid header value", cfg.name))?;
        let tls_label: Arc<str> = cfg.tls.as_deref().unwrap_or("none").into();
        let (mut on_connect, mut on_reset) = (0, 0);
        if let Some(rp) = &cfg.retry_policy {
            for cond in rp.retry_on.split(',').map(str::trim) {
                match cond {
                    "connect-failure" => on_connect = rp.num_retries,
                    "reset" => on_reset = rp.num_retries,
                    _ => {}
                }
            }
        }
        let name: &str = &cfg.name;
        Ok(HttpMapping {
            index,
            name: name.into(),
            target,
            context,
            prefix: cfg.prefix.clone(),
            rewrite: cfg.rewrite.clone(),
            host_rewrite,
            timeout: cfg
                .timeout_ms
                .map_or(Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS), |d| d.0),
            connect_timeout: cfg
                .connect_timeout_ms
                .map_or(Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS), |d| d.0),
            idle_timeout: cfg
                .idle_timeout_ms
                .map_or(Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS), |d| d.0),
            retries_on_connect: on_connect,
            retries_on_reset: on_reset,
            allow_websocket: cfg.allow_upgrade.iter().any(|u| u.eq_ignore_ascii_case("websocket")),
            cm: ConnectMetrics::new(metrics, &tls_label),
            duration: metrics.histogram(m::REQUEST_DURATION, &[("mapping", name), ("tls_context", &tls_label)]),
            tls_label,
            metrics: metrics.clone(),
            codes: (100..600).map(|_| OnceLock::new()).collect(),
        })
    }

    /// The route for this mapping.
    pub fn route(self: &Arc<Self>, cfg: &MappingConfig) -> Result<Route<Arc<Self>>, String> {
        let host = cfg.host.as_deref().or(cfg.hostname.as_deref()).unwrap_or("*");
        Ok(Route {
            host: HostPattern::parse(host)?,
            prefix: cfg.prefix.clone(),
            exact: cfg.prefix_exact,
            value: self.clone(),
        })
    }

    /// Counts a response by status; the handle per code is created on first use.
    pub fn count(&self, status: u16) {
        let Some(slot) = status.checked_sub(100).and_then(|i| self.codes.get(usize::from(i))) else {
            return;
        };
        slot.get_or_init(|| {
            self.metrics.counter(
                m::REQUESTS_TOTAL,
                &[
                    ("mapping", &self.name),
                    ("tls_context", &self.tls_label),
                    ("code", &status.to_string()),
                ],
            )
        })
        .increment(1);
    }
}
