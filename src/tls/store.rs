//! One swappable slot per TLSContext. The set of contexts is fixed by configuration; only their
//! contents rotate. The hot path is one atomic load and an `Arc` clone.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use metrics::Gauge;
use serde::Serialize;

use super::client_config::{self, ClientConfigs};
use super::info::{CertInfo, rfc3339, unix};
use super::material::{self, MaterialError, Source};
use super::options;
use crate::config::{Config, TlsContextConfig};
use crate::metrics::{self as m, Metrics};

/// An immutable set of credentials and the client configs built from them.
#[derive(Debug)]
pub struct Generation {
    /// 1, 2, … per context.
    pub number: u64,
    /// The context's name.
    pub context: Arc<str>,
    /// Client configs; their session caches belong to this generation.
    pub configs: ClientConfigs,
    /// The client chain, described (empty for origination-only contexts).
    pub chain: Vec<CertInfo>,
    /// The CA bundle, described.
    pub ca: Vec<CertInfo>,
    /// CA entries that could not be used.
    pub ca_ignored: usize,
    /// Key algorithm, e.g. `ECDSA P-256`.
    pub key_type: Option<String>,
    /// When this generation was published.
    pub loaded_at: SystemTime,
    digest: [u8; 32],
}

impl Generation {
    /// notAfter of the client certificate, if any: no connection opened with it is reused after.
    pub fn client_not_after(&self) -> Option<SystemTime> {
        self.chain.first().map(CertInfo::not_after_time)
    }
}

/// What one reload attempt did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// Same bytes as the published generation: nothing to do.
    Unchanged,
    /// A new generation is serving.
    Published(Arc<Generation>),
    /// The last good generation (if any) keeps serving.
    Failed(MaterialError),
}

/// The last reload error, for `/certs` and the "log once" rule.
#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    /// Stable reason.
    pub kind: &'static str,
    /// Full message.
    pub message: String,
    /// When (RFC 3339).
    pub at: String,
}

#[derive(Debug, Default)]
struct SlotState {
    numbers: u64,
    last_error: Option<LastError>,
    last_success: Option<SystemTime>,
}

struct SlotMetrics {
    generation: Gauge,
    client_not_after: Gauge,
    client_not_before: Gauge,
    ca_not_after: Gauge,
    ca_not_before: Gauge,
    last_success: Gauge,
    present: Gauge,
}

/// One TLSContext's current generation and reload state.
pub struct ContextSlot {
    /// The context's name.
    pub name: Arc<str>,
    cfg: TlsContextConfig,
    source: Source,
    current: ArcSwapOption<Generation>,
    state: Mutex<SlotState>,
    metrics: Arc<Metrics>,
    gauges: SlotMetrics,
}

impl std::fmt::Debug for ContextSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextSlot")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ContextSlot {
    fn new(name: &str, cfg: &TlsContextConfig, secrets_dir: &Path, metrics: Arc<Metrics>) -> Self {
        let l = [("tls_context", name)];
        let role = |r: &'static str| [("tls_context", name), ("role", r)];
        let gauges = SlotMetrics {
            generation: metrics.gauge(m::CERT_GENERATION, &l),
            client_not_after: metrics.gauge(m::CERT_NOT_AFTER, &role("client")),
            client_not_before: metrics.gauge(m::CERT_NOT_BEFORE, &role("client")),
            ca_not_after: metrics.gauge(m::CERT_NOT_AFTER, &role("ca")),
            ca_not_before: metrics.gauge(m::CERT_NOT_BEFORE, &role("ca")),
            last_success: metrics.gauge(m::CERT_LAST_RELOAD_SUCCESS, &l),
            present: metrics.gauge(m::IDENTITY_PRESENT, &l),
        };
        gauges.generation.set(0.0);
        metrics
            .gauge(m::TLS_INSECURE, &l)
            .set(if cfg.insecure_skip_verify { 1.0 } else { 0.0 });
        ContextSlot {
            name: name.into(),
            cfg: cfg.clone(),
            source: Source::new(cfg, secrets_dir),
            current: ArcSwapOption::empty(),
            state: Mutex::new(SlotState::default()),
            metrics,
            gauges,
        }
    }

    /// The generation serving now, if any.
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.current.load_full()
    }

    /// The context's configuration.
    pub fn config(&self) -> &TlsContextConfig {
        &self.cfg
    }

    /// Where its files are.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The last reload error, if the last attempt failed.
    pub fn last_error(&self) -> Option<LastError> {
        self.lock().last_error.clone()
    }

    /// When the last successful load happened.
    pub fn last_success(&self) -> Option<SystemTime> {
        self.lock().last_success
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the files; if their bytes changed, validates, builds and publishes a new
    /// generation. Blocking (file I/O): call from a blocking context.
    pub fn reload(&self) -> ReloadOutcome {
        let outcome = self.try_reload();
        let vanished = matches!(&outcome, ReloadOutcome::Failed(MaterialError::NotFound { .. }));
        self.gauges.present.set(if vanished { 0.0 } else { 1.0 });
        match &outcome {
            ReloadOutcome::Unchanged => {}
            ReloadOutcome::Published(g) => self.on_published(g),
            ReloadOutcome::Failed(e) => self.on_failed(e),
        }
        outcome
    }

    fn try_reload(&self) -> ReloadOutcome {
        let raw = match self.source.read() {
            Ok(raw) => raw,
            Err(e) => return ReloadOutcome::Failed(e),
        };
        let current = self.current();
        if current.as_ref().is_some_and(|g| g.digest == raw.digest) {
            return ReloadOutcome::Unchanged;
        }
        let provider = match options::provider_for(&self.cfg) {
            Ok(p) => p,
            Err(errs) => {
                let msg = errs.into_iter().map(|(f, e)| format!("{f}: {e}")).collect::<Vec<_>>();
                return ReloadOutcome::Failed(MaterialError::Build(msg.join("; ")));
            }
        };
        let material = match material::parse(&raw, &provider, SystemTime::now()) {
            Ok(m) => m,
            Err(e) => return ReloadOutcome::Failed(e),
        };
        let configs = match client_config::build(&self.cfg, &material) {
            Ok(c) => c,
            Err(e) => return ReloadOutcome::Failed(MaterialError::Build(e.to_string())),
        };
        let number = {
            let mut st = self.lock();
            st.numbers += 1;
            st.numbers
        };
        let generation = Arc::new(Generation {
            number,
            context: self.name.clone(),
            configs,
            chain: material.chain,
            ca: material.ca,
            ca_ignored: material.ca_ignored,
            key_type: material.key_type,
            loaded_at: SystemTime::now(),
            digest: material.digest,
        });
        self.current.store(Some(generation.clone()));
        ReloadOutcome::Published(generation)
    }

    fn on_published(&self, g: &Generation) {
        let now = SystemTime::now();
        {
            let mut st = self.lock();
            st.last_error = None;
            st.last_success = Some(now);
        }
        self.metrics
            .counter(m::CERT_RELOADS_TOTAL, &[("tls_context", &self.name), ("result", "ok")])
            .increment(1);
        self.gauges.generation.set(g.number as f64);
        self.gauges.last_success.set(unix(now) as f64);
        if let Some(leaf) = g.chain.first() {
            self.gauges.client_not_after.set(leaf.not_after_unix as f64);
            self.gauges.client_not_before.set(leaf.not_before_unix as f64);
        }
        if let Some(ca) = g.ca.iter().min_by_key(|c| c.not_after_unix) {
            self.gauges.ca_not_after.set(ca.not_after_unix as f64);
            self.gauges.ca_not_before.set(ca.not_before_unix as f64);
        }
        let leaf = g.chain.first();
        tracing::info!(
            tls.context = %self.name,
            generation = g.number,
            cert.subject = leaf.map(|c| c.subject.as_str()).unwrap_or("-"),
            cert.serial = leaf.map(|c| c.serial.as_str()).unwrap_or("-"),
            cert.not_after = leaf.map(|c| c.not_after.as_str()).unwrap_or("-"),
            ca.count = g.ca.len(),
            ca.ignored = g.ca_ignored,
            "published TLS credentials"
        );
        if g.ca_ignored > 0 {
            tracing::warn!(tls.context = %self.name, ca.ignored = g.ca_ignored, "some CA bundle entries could not be parsed and were ignored");
        }
    }

    fn on_failed(&self, e: &MaterialError) {
        let kind = e.kind();
        self.metrics
            .counter(m::CERT_RELOADS_TOTAL, &[("tls_context", &self.name), ("result", kind)])
            .increment(1);
        let message = e.to_string();
        let repeated = {
            let mut st = self.lock();
            let repeated = st.last_error.as_ref().is_some_and(|l| l.message == message);
            if !repeated {
                st.last_error = Some(LastError {
                    kind,
                    message: message.clone(),
                    at: rfc3339(unix(SystemTime::now())),
                });
            }
            repeated
        };
        if repeated {
            return;
        }
        let serving = self.current().map(|g| g.number);
        match serving {
            Some(n) => {
                tracing::warn!(tls.context = %self.name, reason = kind, serving.generation = n, "certificate reload failed, keeping the last good generation: {message}")
            }
            None => {
                tracing::warn!(tls.context = %self.name, reason = kind, "TLS context has no usable credentials yet (not ready; will retry): {message}")
            }
        }
    }
}

/// All contexts.
#[derive(Debug)]
pub struct TlsStore {
    slots: BTreeMap<String, Arc<ContextSlot>>,
}

impl TlsStore {
    /// One empty slot per configured context; nothing is read yet.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        let slots = config
            .tls_contexts
            .iter()
            .map(|(name, cfg)| {
                let slot = ContextSlot::new(name, cfg, &config.secrets_dir, metrics.clone());
                (name.clone(), Arc::new(slot))
            })
            .collect();
        TlsStore { slots }
    }

    /// A context by name.
    pub fn get(&self, name: &str) -> Option<&Arc<ContextSlot>> {
        self.slots.get(name)
    }

    /// Every context.
    pub fn slots(&self) -> impl Iterator<Item = &Arc<ContextSlot>> {
        self.slots.values()
    }

    /// Reloads every context (blocking).
    pub fn reload_all(&self) -> Vec<(Arc<str>, ReloadOutcome)> {
        self.slots.values().map(|s| (s.name.clone(), s.reload())).collect()
    }

    /// Contexts without a generation.
    pub fn missing(&self) -> Vec<Arc<str>> {
        self.slots
            .values()
            .filter(|s| s.current().is_none())
            .map(|s| s.name.clone())
            .collect()
    }
}
