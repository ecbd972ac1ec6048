//! Upstream failures through a TCP mapping: each closes the app's connection without relaying
//! a byte and is counted under its stable `result` reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use mtls_sidecar::testkit::pki::{LeafSpec, TestCa};
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{self, Behavior, Upstream};
use support::{
    CTX, STEP, UPSTREAM_NAME, World, closed_port, expect_closed, metric, report, saw_serial, tcp_result,
    wait_tcp_result,
};

const SPIFFE_ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

/// An upstream presenting `server` (any CA) that requires client certs from the world's CA.
async fn upstream_presenting(w: &World, server: &mtls_sidecar::testkit::pki::Leaf) -> Upstream {
    upstream::start_tcp(upstream::server_config(server, &[], &[&w.ca]), Behavior::ReportAndEcho).await
}

/// Starts a sidecar with a valid client identity toward `up`, connects once and asserts the
/// connection is closed and counted as `result`, with no completed upstream handshake.
async fn assert_tls_failure(w: &World, up: &Upstream, context_extra: &str, result: &str) {
    let leaf = w.ca.client("app");
    w.client_secret("certs", &leaf, &leaf.key_pem);
    let context = format!("secret: certs, sni: {UPSTREAM_NAME}{context_extra}");
    let (sidecar, addr) = w.sidecar(&context, &up.addr.to_string(), "").await;
    assert!(sidecar.readiness.check().is_ok(), "the client side is fine");

    expect_closed(addr).await;
    wait_tcp_result(&sidecar, result, 1.0).await;
    assert_eq!(tcp_result(&sidecar, "ok"), 0.0);
    let text = sidecar.metrics.render();
    assert_eq!(
        metric(
            &text,
            "mtls_sidecar_upstream_connections_total",
            &[("tls_context", CTX), ("result", result)]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        up.observed.handshakes.load(Ordering::SeqCst),
        0,
        "the upstream must not have completed a handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_from_an_untrusted_ca_is_unknown_issuer() {
    let w = World::new();
    let rogue = TestCa::new("rogue CA").server(UPSTREAM_NAME);
    let up = upstream_presenting(&w, &rogue).await;
    assert_tls_failure(&w, &up, "", "unknown_issuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_the_wrong_san_is_bad_san() {
    let w = World::new();
    let elsewhere = w.ca.server("elsewhere.test.svc");
    let up = upstream_presenting(&w, &elsewhere).await;
    assert_tls_failure(&w, &up, "", "bad_san").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_upstream_certificate_is_cert_expired() {
    let w = World::new();
    let now = SystemTime::now();
    let expired = w.ca.issue(
        &LeafSpec::server(UPSTREAM_NAME)
            .valid(now - Duration::from_secs(2 * 86_400), now - Duration::from_secs(86_400)),
    );
    let up = upstream_presenting(&w, &expired).await;
    assert_tls_failure(&w, &up, "", "cert_expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_uri_san_match_succeeds_whatever_the_dns_name() {
    let w = World::new();
    // The DNS SAN does not match the SNI: only the URI identity can make this pass.
    let server = w.ca.issue(&LeafSpec::server("orders-7f9c.pod.test").uri(SPIFFE_ORDERS));
    let up = upstream_presenting(&w, &server).await;
    let leaf = w.ca.client("app");
    w.client_secret("certs", &leaf, &leaf.key_pem);
    let context = format!(r#"secret: certs, sni: {UPSTREAM_NAME}, subject_alt_names: ["{SPIFFE_ORDERS}"]"#);
    let (sidecar, addr) = w.sidecar(&context, &up.addr.to_string(), "").await;
    let (line, _conn) = report(addr).await;
    assert!(saw_serial(&line, &leaf.serial), "{line}");
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_uri_san_mismatch_is_bad_san() {
    let w = World::new();
    let server =
        w.ca.issue(&LeafSpec::server(UPSTREAM_NAME).uri("spiffe://cluster.local/ns/shop/sa/payments"));
    let up = upstream_presenting(&w, &server).await;
    let extra = format!(r#", subject_alt_names: ["{SPIFFE_ORDERS}"]"#);
    assert_tls_failure(&w, &up, &extra, "bad_san").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_spiffe_uri_from_the_wrong_ca_is_unknown_issuer() {
    let w = World::new();
    let rogue = TestCa::new("rogue CA").issue(&LeafSpec::server(UPSTREAM_NAME).uri(SPIFFE_ORDERS));
    let up = upstream_presenting(&w, &rogue).await;
    let extra = format!(r#", subject_alt_names: ["{SPIFFE_ORDERS}"]"#);
    assert_tls_failure(&w, &up, &extra, "unknown_issuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_not_listening_is_connect_refused() {
    let w = World::new();
    let leaf = w.ca.client("app");
    w.client_secret("certs", &leaf, &leaf.key_pem);
    let (sidecar, addr) = w.sidecar_for_secret("certs", closed_port()).await;
    expect_closed(addr).await;
    wait_tcp_result(&sidecar, "connect_refused", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_is_handshake_timeout() {
    let w = World::new();
    let leaf = w.ca.client("app");
    w.client_secret("certs", &leaf, &leaf.key_pem);
    let up = upstream::start_tcp(upstream::server_config(&w.server, &[], &[&w.ca]), Behavior::Silent).await;
    let (sidecar, addr) = w
        .sidecar(
            &format!("secret: certs, sni: {UPSTREAM_NAME}"),
            &up.addr.to_string(),
            "connect_timeout_ms: 300",
        )
        .await;
    let started = Instant::now();
    expect_closed(addr).await;
    let took = started.elapsed();
    wait_tcp_result(&sidecar, "handshake_timeout", 1.0).await;
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 1, "TCP connected");
    assert!(
        took >= Duration::from_millis(250) && took < STEP,
        "closed after {took:?}; connect_timeout_ms is 300"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_secret_at_start_is_not_ready_and_refuses_with_no_client_identity() {
    let w = World::new();
    SecretDir::create(w.secrets_dir().join("certs")).unwrap();
    let up = w.upstream().await;
    let (sidecar, addr) = w.sidecar_for_secret("certs", up.addr).await;

    let missing = sidecar.readiness.check().expect_err("must not be ready");
    assert!(missing.iter().any(|m| m.contains(&format!("`{CTX}`"))), "{missing:?}");
    assert_eq!(metric(&sidecar.metrics.render(), "mtls_sidecar_ready", &[]), 0.0);
    assert!(sidecar.store.get(CTX).unwrap().last_error().is_some());

    expect_closed(addr).await;
    wait_tcp_result(&sidecar, "no_client_identity", 1.0).await;
    assert_eq!(
        up.observed.accepted.load(Ordering::SeqCst),
        0,
        "no upstream connection may be opened without a client identity"
    );
}
