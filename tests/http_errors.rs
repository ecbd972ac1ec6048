//! What the application sees when the upstream side fails (SPEC §6): the status, the
//! `x-mtls-sidecar-error` reason and a plain-text body, for every TLS and connection failure
//! an operator can act on; plus mid-body failures and the retry rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "http_support/mod.rs"]
mod http_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use http_support::{
    CTX, HttpWorld, UPSTREAM_NAME, assert_sidecar_error, get, get_req, mapping, metric, only_http11, send, within,
};
use mtls_sidecar::testkit::client::Conn;
use mtls_sidecar::testkit::http_upstream::start_https;
use mtls_sidecar::testkit::pki::TestCa;
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::server_config;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const HOST: &str = "orders.shop.svc";

fn orders(upstream: std::net::SocketAddr, extra: &str) -> String {
    let extra = if extra.is_empty() {
        format!("host: {HOST}")
    } else {
        format!("host: {HOST}, {extra}")
    };
    mapping("orders", upstream, &extra)
}

/// `upstream_connections_total{tls_context="ctx", result}`.
fn connections(sc: &mtls_sidecar::app::Sidecar, result: &str) -> f64 {
    metric(
        &sc.metrics.render(),
        "mtls_sidecar_upstream_connections_total",
        &[("tls_context", CTX), ("result", result)],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_upstream_ca_is_unknown_issuer() {
    let w = HttpWorld::new();
    let rogue = TestCa::new("rogue CA");
    let up = start_https(server_config(&rogue.server(UPSTREAM_NAME), &[], &[&w.ca])).await;
    let (sc, addr) = w.sidecar(&orders(up.addr, "")).await;

    let r = get(addr, HOST, "/x").await;
    assert_sidecar_error(&r, 502, "unknown_issuer");
    assert_eq!(connections(&sc, "unknown_issuer"), 1.0);
    assert_eq!(up.observed.handshakes.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_san_is_bad_san() {
    let w = HttpWorld::new();
    let up = start_https(server_config(&w.ca.server("someone-else.test.svc"), &[], &[&w.ca])).await;
    let (sc, addr) = w.sidecar(&orders(up.addr, "")).await;

    let r = get(addr, HOST, "/x").await;
    assert_sidecar_error(&r, 502, "bad_san");
    assert!(r.text().contains("bad_san"), "{}", r.text());
    assert_eq!(connections(&sc, "bad_san"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_is_connect_refused() {
    let w = HttpWorld::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (sc, addr) = w.sidecar(&orders(closed, "")).await;

    let r = get(addr, HOST, "/x").await;
    assert_sidecar_error(&r, 502, "connect_refused");
    assert!(
        r.text().contains(&closed.to_string()),
        "names the address: {}",
        r.text()
    );
    assert_eq!(connections(&sc, "connect_refused"), 1.0);
    let text = sc.metrics.render();
    assert_eq!(
        metric(
            &text,
            "mtls_sidecar_requests_total",
            &[("mapping", "orders"), ("code", "502")]
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_beyond_timeout_ms_is_a_504() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w.sidecar(&orders(up.addr, "timeout_ms: 300")).await;

    let started = Instant::now();
    let r = get(addr, HOST, "/slow/5000").await;
    assert_sidecar_error(&r, 504, "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the 504 must come at timeout_ms, not when the upstream answers ({:?})",
        started.elapsed()
    );
    // Within the budget the same mapping works.
    let r = get(addr, HOST, "/slow/10").await;
    assert_eq!(r.head.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_rejecting_our_client_certificate_is_named() {
    let w = HttpWorld::new();
    let other = TestCa::new("another client CA");
    // The upstream only trusts client certificates from `other`.
    let up = start_https(server_config(&w.server, &[], &[&other])).await;
    let (sc, addr) = w.sidecar(&orders(up.addr, "")).await;

    for h2 in [false, true] {
        let req = get_req(&format!("http://{HOST}/x"), Some(HOST));
        let r = send(addr, h2, req).await;
        eprintln!("h2c app: {h2}");
        assert_sidecar_error(&r, 502, "peer_rejected_client_cert");
    }
    // With an HTTP/1.1-only upstream too (a different pool path).
    let up1 = start_https(only_http11(server_config(&w.server, &[], &[&other]))).await;
    let (_sc1, addr1) = w.sidecar(&orders(up1.addr, "")).await;
    let r = get(addr1, HOST, "/x").await;
    eprintln!("h1 upstream");
    assert_sidecar_error(&r, 502, "peer_rejected_client_cert");

    let text = sc.metrics.render();
    assert!(
        metric(
            &text,
            "mtls_sidecar_tls_handshakes_total",
            &[("tls_context", CTX), ("result", "peer_rejected_client_cert")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(up.observed.handshakes.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn context_without_credentials_is_no_client_identity() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    // A Secret volume that exists but was never projected.
    SecretDir::create(w.secrets_dir().join("not-yet")).unwrap();
    let contexts = format!("  {CTX}: {{ secret: not-yet, sni: {UPSTREAM_NAME} }}\n");
    let (sc, addr) = w.sidecar_with(&contexts, &orders(up.addr, "")).await;
    assert!(sc.readiness.check().is_err(), "not ready without credentials");

    let r = get(addr, HOST, "/x").await;
    assert_sidecar_error(&r, 503, "no_client_identity");
    assert!(r.text().contains(CTX), "names the context: {}", r.text());
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_to_an_http11_only_upstream_is_alpn_mismatch() {
    let w = HttpWorld::new();
    let up = w.upstream_h1().await;
    let (_sc, addr) = w.sidecar(&orders(up.addr, "")).await;

    let r = send(addr, true, get_req(&format!("http://{HOST}/x"), None)).await;
    assert_sidecar_error(&r, 502, "alpn_mismatch");
    // HTTP/1.1 from the app still works against it.
    let r = get(addr, HOST, "/x").await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_cut_mid_stream_never_reaches_the_app_as_complete() {
    let w = HttpWorld::new();
    let up2 = w.upstream().await;
    let up1 = w.upstream_h1().await;
    for (up, what) in [(&up2, "h2 upstream"), (&up1, "http/1.1 upstream")] {
        let (_sc, addr) = w.sidecar(&orders(up.addr, "")).await;
        for h2 in [false, true] {
            let req = get_req(&format!("http://{HOST}/die-mid-body"), Some(HOST));
            let outcome = within("a request whose body dies", async {
                let mut conn = Conn::open(addr, h2).await.expect("connecting");
                conn.send(req).await
            })
            .await;
            if let Ok(r) = outcome {
                assert!(
                    r.body.len() < 100_000,
                    "{what}, h2c app: {h2}: a truncated body was delivered as complete ({} bytes, status {})",
                    r.body.len(),
                    r.head.status
                );
            }
        }
    }
}

/// An HTTP/1.1-only mTLS upstream that answers the first request of each connection and
/// closes the connection after reading the head of the second one, without answering.
struct ResetSecond {
    addr: std::net::SocketAddr,
    heads: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ResetSecond {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_head(s: &mut (impl AsyncReadExt + Unpin)) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn reset_second(config: Arc<ServerConfig>) -> ResetSecond {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads, resets) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (h, r) = (heads.clone(), resets.clone());
    let acceptor = TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, h, r) = (acceptor.clone(), h.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Some((head, mut rest)) = read_head(&mut tls).await else {
                    return;
                };
                h.fetch_add(1, Ordering::SeqCst);
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut chunk = [0u8; 4096];
                while rest.len() < len {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => rest.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nfirst")
                    .await;
                let _ = tls.flush().await;
                if read_head(&mut tls).await.is_some() {
                    h.fetch_add(1, Ordering::SeqCst);
                    r.fetch_add(1, Ordering::SeqCst);
                }
                // Dropped without a response: the second request was written and lost.
            });
        }
    });
    ResetSecond {
        addr,
        heads,
        resets,
        task,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_requests_are_retried_after_a_reset_on_a_reused_connection() {
    let w = HttpWorld::new();
    let up = reset_second(w.server_config_h1()).await;
    let retry = "retry_policy: { retry_on: reset, num_retries: 1 }";
    let (_sc, addr) = w.sidecar(&orders(up.addr, retry)).await;

    let mut conn = Conn::open(addr, false).await.unwrap();
    for i in 0..10 {
        let r = within("GET", conn.send(get_req("/x", Some(HOST)))).await.unwrap();
        assert_eq!(
            (r.head.status.as_u16(), r.text().as_str()),
            (200, "first"),
            "GET #{i} must be retried on a fresh connection after a reset on a reused one ({:?})",
            r.error_reason()
        );
    }
    assert!(
        up.resets.load(Ordering::SeqCst) >= 1,
        "the test is vacuous unless some GET hit a reused connection that reset"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_is_never_retried_after_upstream_reset() {
    let w = HttpWorld::new();
    let up = reset_second(w.server_config_h1()).await;
    let retry = "retry_policy: { retry_on: \"connect-failure,reset\", num_retries: 3 }";
    let (_sc, addr) = w.sidecar(&orders(up.addr, retry)).await;

    let mut conn = Conn::open(addr, false).await.unwrap();
    let (mut sent, mut failed) = (0, 0);
    for _ in 0..10 {
        let req = Request::post("/orders")
            .header("host", HOST)
            .body(Full::new(Bytes::from_static(b"{\"qty\":1}")))
            .unwrap();
        sent += 1;
        let r = within("POST", conn.send(req)).await.unwrap();
        match r.head.status.as_u16() {
            200 => {}
            _ => {
                assert_sidecar_error(&r, 502, "upstream_reset");
                failed += 1;
            }
        }
        if failed >= 3 {
            break;
        }
    }
    assert!(
        failed >= 1,
        "no POST ever hit a reused connection; the test proved nothing"
    );
    assert_eq!(
        up.heads.load(Ordering::SeqCst),
        sent,
        "every POST must reach the upstream exactly once (a retried POST may charge twice)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_failures_are_retried_num_retries_times() {
    let w = HttpWorld::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // Retrying a connect failure is safe for any method: nothing was sent.
    let retry = "retry_policy: { retry_on: connect-failure, num_retries: 2 }";
    let (sc, addr) = w.sidecar(&orders(closed, retry)).await;
    let req = Request::post("/x")
        .header("host", HOST)
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    assert_sidecar_error(&send(addr, false, req).await, 502, "connect_refused");
    assert_eq!(connections(&sc, "connect_refused"), 3.0, "one attempt plus num_retries");

    // Without a retry policy: exactly one attempt.
    let (sc, addr) = w.sidecar(&orders(closed, "")).await;
    assert_sidecar_error(&get(addr, HOST, "/x").await, 502, "connect_refused");
    assert_eq!(connections(&sc, "connect_refused"), 1.0);
}
