//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/certs`, `/config`, and the
//! loopback-only `POST /reload` and `POST /drain`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::app::Readiness;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::tls::TlsStore;
use crate::tls::info::{CertInfo, rfc3339, unix};
use crate::tls::reload::Reloader;

/// What the admin server needs to answer.
pub struct Admin {
    /// Effective configuration.
    pub config: Arc<Config>,
    /// Credentials.
    pub store: Arc<TlsStore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// Forces reloads.
    pub reloader: Reloader,
    /// Notified by `POST /drain`.
    pub drain_requested: Arc<Notify>,
    /// For stopping with the rest.
    pub shutdown: Shutdown,
}

type Resp = Response<Full<Bytes>>;

/// Mutating endpoints answer only to this pod: loopback, including `::ffff:127.0.0.1` on a
/// dual-stack listener.
pub fn mutation_allowed(peer: std::net::IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json(value: &impl Serialize) -> Resp {
    match serde_json::to_vec_pretty(value) {
        Ok(v) => respond(StatusCode::OK, "application/json", v),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode JSON: {e}\n")),
    }
}

#[derive(Serialize)]
struct CertView<'a> {
    role: &'static str,
    #[serde(flatten)]
    info: &'a CertInfo,
    seconds_to_expiry: i64,
}

#[derive(Serialize)]
struct ContextView<'a> {
    name: &'a str,
    ready: bool,
    generation: u64,
    insecure_skip_verify: bool,
    key_type: Option<&'a str>,
    loaded_at: Option<String>,
    last_reload_success: Option<String>,
    last_error: Option<crate::tls::store::LastError>,
    watched_dirs: Vec<String>,
    ca_ignored: usize,
    certificates: Vec<CertView<'a>>,
}

impl Admin {
    /// Serves until `stop_accepting` fires.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.force_close.cancelled() => return,
                r = listener.accept() => r,
            };
            let Ok((stream, peer)) = accepted else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.route(req, peer).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    /// Answers one admin request from `peer`.
    pub async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET | &Method::HEAD, "/metrics") => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET | &Method::HEAD, "/readyz") => match self.readiness.check() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(missing) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready:\n{}\n",
                        missing.iter().map(|m| format!("- {m}")).collect::<Vec<_>>().join("\n")
                    ),
                ),
            },
            (&Method::GET, "/certs") => self.certs(),
            (&Method::GET, "/config") => json(&*self.config),
            (&Method::POST, "/reload" | "/drain") if !mutation_allowed(peer.ip()) => text(
                StatusCode::FORBIDDEN,
                format!(
                    "{path} is only accepted from loopback (this pod); {} is not\n",
                    peer.ip()
                ),
            ),
            (&Method::POST, "/reload") => {
                let report = self.reloader.reload_and_report().await;
                json(&report.into_iter().collect::<std::collections::BTreeMap<_, _>>())
            }
            (&Method::POST, "/drain") => {
                tracing::info!(peer = %peer, "POST /drain: starting the drain");
                self.drain_requested.notify_one();
                text(StatusCode::ACCEPTED, "draining\n")
            }
            (_, "/metrics" | "/healthz" | "/readyz" | "/certs" | "/config" | "/reload" | "/drain") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics /healthz /readyz /certs /config, POST /reload, POST /drain\n",
            ),
        }
    }

    fn certs(&self) -> Resp {
        let now = unix(SystemTime::now());
        let mut out = Vec::new();
        let generations: Vec<_> = self.store.slots().map(|s| (s, s.current())).collect();
        for (slot, g) in &generations {
            let mut certificates = Vec::new();
            if let Some(g) = g {
                for (i, c) in g.chain.iter().enumerate() {
                    certificates.push(CertView {
                        role: if i == 0 { "client" } else { "intermediate" },
                        info: c,
                        seconds_to_expiry: c.not_after_unix - now,
                    });
                }
                for c in &g.ca {
                    certificates.push(CertView {
                        role: "ca",
                        info: c,
                        seconds_to_expiry: c.not_after_unix - now,
                    });
                }
            }
            out.push(ContextView {
                name: &slot.name,
                ready: g.is_some(),
                generation: g.as_ref().map_or(0, |g| g.number),
                insecure_skip_verify: slot.config().insecure_skip_verify,
                key_type: g.as_ref().and_then(|g| g.key_type.as_deref()),
                loaded_at: g.as_ref().map(|g| rfc3339(unix(g.loaded_at))),
                last_reload_success: slot.last_success().map(|t| rfc3339(unix(t))),
                last_error: slot.last_error(),
                watched_dirs: slot
                    .source()
                    .watch_dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect(),
                ca_ignored: g.as_ref().map_or(0, |g| g.ca_ignored),
                certificates,
            });
        }
        json(&serde_json::json!({ "contexts": out }))
    }
}

#[cfg(test)]
mod tests {
    use super::mutation_allowed;

    #[test]
    fn only_loopback_peers_may_mutate() {
        for ok in ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"] {
            assert!(mutation_allowed(ok.parse().unwrap()), "{ok}");
        }
        for no in ["10.0.0.7", "192.168.1.2", "::ffff:10.0.0.7", "fd00::1", "0.0.0.0"] {
            assert!(!mutation_allowed(no.parse().unwrap()), "{no}");
        }
    }
}
