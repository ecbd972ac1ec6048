//! Metric names (SPEC §5), their help texts and buckets, and one recorder per sidecar.
//!
//! The recorder is owned by the app rather than installed globally: handles are created from
//! it once per context, mapping or listener, the admin server renders it, and tests can run
//! several sidecars in one process without their counters mixing.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Requests proxied, by mapping, context and HTTP status.
pub const REQUESTS_TOTAL: &str = "mtls_sidecar_requests_total";
/// Request duration.
pub const REQUEST_DURATION: &str = "mtls_sidecar_request_duration_seconds";
/// Requests or connections refused before any upstream work.
pub const DENIED_TOTAL: &str = "mtls_sidecar_denied_total";
/// Upstream connection attempts by result.
pub const UPSTREAM_CONNECTIONS_TOTAL: &str = "mtls_sidecar_upstream_connections_total";
/// Upstream connections open now.
pub const UPSTREAM_CONNECTIONS_ACTIVE: &str = "mtls_sidecar_upstream_connections_active";
/// TLS handshake duration.
pub const TLS_HANDSHAKE_DURATION: &str = "mtls_sidecar_tls_handshake_duration_seconds";
/// TLS handshakes by result and resumption.
pub const TLS_HANDSHAKES_TOTAL: &str = "mtls_sidecar_tls_handshakes_total";
/// TCP-mapping connections by result.
pub const TCP_CONNECTIONS_TOTAL: &str = "mtls_sidecar_tcp_connections_total";
/// Bytes relayed, by listener and direction.
pub const BYTES_TOTAL: &str = "mtls_sidecar_bytes_total";
/// notAfter of loaded certificates.
pub const CERT_NOT_AFTER: &str = "mtls_sidecar_certificate_not_after_timestamp_seconds";
/// notBefore of loaded certificates.
pub const CERT_NOT_BEFORE: &str = "mtls_sidecar_certificate_not_before_timestamp_seconds";
/// Reload attempts by result.
pub const CERT_RELOADS_TOTAL: &str = "mtls_sidecar_certificate_reloads_total";
/// Generation number currently served.
pub const CERT_GENERATION: &str = "mtls_sidecar_certificate_generation";
/// Time of the last successful reload.
pub const CERT_LAST_RELOAD_SUCCESS: &str = "mtls_sidecar_certificate_last_reload_success_timestamp_seconds";
/// How a context's files are watched (`inotify` or `poll`).
pub const CERT_WATCH_MODE: &str = "mtls_sidecar_certificate_watch_mode";
/// 1 while the context's files are present on disk (0 after an optional Secret was deleted).
pub const IDENTITY_PRESENT: &str = "mtls_sidecar_identity_material_present";
/// 1 while a context skips upstream verification.
pub const TLS_INSECURE: &str = "mtls_sidecar_tls_context_insecure";
/// Connections of older generations still open (TCP relays are never cut by a rotation).
pub const CONNECTIONS_BY_GENERATION: &str = "mtls_sidecar_upstream_connections_by_generation";
/// 1 when ready.
pub const READY: &str = "mtls_sidecar_ready";
/// Always 1, labelled with the version.
pub const BUILD_INFO: &str = "mtls_sidecar_build_info";

const HELP: &[(&str, &str)] = &[
    (
        REQUESTS_TOTAL,
        "HTTP requests proxied, by mapping, TLS context and response status code.",
    ),
    (
        REQUEST_DURATION,
        "Time from request headers received to response headers sent, by mapping.",
    ),
    (
        DENIED_TOTAL,
        "Requests or connections refused before any upstream work, by listener and reason.",
    ),
    (
        UPSTREAM_CONNECTIONS_TOTAL,
        "Upstream connection attempts (TCP connect + TLS handshake), by TLS context and result.",
    ),
    (
        UPSTREAM_CONNECTIONS_ACTIVE,
        "Upstream connections currently open, by TLS context.",
    ),
    (
        TLS_HANDSHAKE_DURATION,
        "Duration of TLS handshakes with upstreams, by TLS context.",
    ),
    (
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes with upstreams, by TLS context, result and whether the session was resumed.",
    ),
    (
        TCP_CONNECTIONS_TOTAL,
        "Connections accepted on TCP-mapping listeners, by listener and final result.",
    ),
    (
        BYTES_TOTAL,
        "Payload bytes relayed, by listener and direction (to_upstream, from_upstream).",
    ),
    (
        CERT_NOT_AFTER,
        "notAfter of the certificates served, by TLS context and role (client, ca: the earliest CA).",
    ),
    (
        CERT_NOT_BEFORE,
        "notBefore of the certificates served, by TLS context and role.",
    ),
    (
        CERT_RELOADS_TOTAL,
        "Certificate load attempts that read changed files, by TLS context and result.",
    ),
    (
        CERT_GENERATION,
        "Generation number of the credentials currently served, by TLS context (0: none yet).",
    ),
    (
        CERT_LAST_RELOAD_SUCCESS,
        "Unix time of the last successful certificate load, by TLS context.",
    ),
    (
        CERT_WATCH_MODE,
        "1 for the mode each TLS context's files are watched with (inotify, poll).",
    ),
    (
        IDENTITY_PRESENT,
        "1 while the TLS context's files are present on disk; 0 when they vanished (the last good generation keeps serving).",
    ),
    (
        TLS_INSECURE,
        "1 if the TLS context skips upstream certificate verification (insecure_skip_verify).",
    ),
    (
        CONNECTIONS_BY_GENERATION,
        "Upstream connections open, by TLS context and whether they use the current generation.",
    ),
    (
        READY,
        "1 when every listener is bound and every TLS context has credentials, 0 otherwise.",
    ),
    (BUILD_INFO, "Always 1; the version label says which build this is."),
];

/// Latency buckets in seconds: 100 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static METADATA: Metadata<'static> = Metadata::new("mtls_sidecar", Level::INFO, Some("mtls_sidecar"));

/// One sidecar's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A fresh recorder with help texts, buckets, `build_info` and `ready 0`.
    pub fn new() -> Arc<Self> {
        let mut builder = PrometheusBuilder::new();
        for name in [REQUEST_DURATION, TLS_HANDSHAKE_DURATION] {
            builder = match builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), LATENCY_BUCKETS) {
                Ok(b) => b,
                Err(_) => unreachable!("the bucket list is a non-empty constant"),
            };
        }
        let recorder = builder.build_recorder();
        for (name, help) in HELP {
            let key = KeyName::from_const_str(name);
            if name.ends_with("_total") {
                recorder.describe_counter(key, None, (*help).into());
            } else if name.ends_with("_seconds") && (*name == REQUEST_DURATION || *name == TLS_HANDSHAKE_DURATION) {
                recorder.describe_histogram(key, None, (*help).into());
            } else {
                recorder.describe_gauge(key, None, (*help).into());
            }
        }
        let handle = recorder.handle();
        let m = Arc::new(Metrics { recorder, handle });
        m.gauge(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]).set(1.0);
        m.gauge(READY, &[]).set(0.0);
        m
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        Key::from_parts(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, (*v).to_owned()))
                .collect::<Vec<_>>(),
        )
    }

    /// A counter handle; create once and keep it where the label values are fixed.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder.register_counter(&Self::key(name, labels), &METADATA)
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&Self::key(name, labels), &METADATA)
    }

    /// A histogram handle.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder.register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Drains histogram buffers; called periodically so memory stays flat between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}
