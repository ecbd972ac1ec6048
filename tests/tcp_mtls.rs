//! Mutual TLS through a TCP mapping to an in-process upstream that requires client
//! certificates: every key type and encoding, every Secret layout, explicit files,
//! origination-only contexts, half-close and session resumption.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use mtls_sidecar::testkit::pki::{KeyFormat, KeyKind, LeafSpec};
use mtls_sidecar::testkit::upstream::{self, Behavior};
use support::{CTX, MAPPING, STEP, UPSTREAM_NAME, World, metric, report, saw_serial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client key of `kind`, written as `format`, is loaded and presented to the upstream.
async fn client_key_works(kind: KeyKind, format: KeyFormat, pem_label: &str, key_type: &str) {
    let w = World::new();
    let leaf = w.ca.issue(&LeafSpec::client("app.shop").key(kind));
    let key_pem = leaf.key_pem_as(format);
    assert!(
        key_pem.contains(&format!("-----BEGIN {pem_label}-----")),
        "the test must write a {pem_label} section"
    );
    w.client_secret("certs", &leaf, &key_pem);
    let up = w.upstream().await;
    let (sidecar, addr) = w.sidecar_for_secret("certs", up.addr).await;

    let generation = sidecar.store.get(CTX).unwrap().current().expect("loaded");
    assert_eq!(generation.key_type.as_deref(), Some(key_type));
    let (line, _conn) = report(addr).await;
    assert!(
        saw_serial(&line, &leaf.serial),
        "the upstream should have seen serial {} ({kind:?} {format:?}); it said: {line}",
        leaf.serial
    );
    assert!(line.contains("subject=\"CN=app.shop\""), "{line}");
    assert_eq!(up.observed.serials(), vec![leaf.serial.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p256_pkcs8() {
    client_key_works(KeyKind::P256, KeyFormat::Pkcs8, "PRIVATE KEY", "ECDSA P-256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p256_sec1() {
    client_key_works(KeyKind::P256, KeyFormat::Sec1, "EC PRIVATE KEY", "ECDSA P-256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p256_sec1_after_ec_parameters() {
    client_key_works(KeyKind::P256, KeyFormat::Sec1WithParams, "EC PARAMETERS", "ECDSA P-256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p384_pkcs8() {
    client_key_works(KeyKind::P384, KeyFormat::Pkcs8, "PRIVATE KEY", "ECDSA P-384").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p384_sec1() {
    client_key_works(KeyKind::P384, KeyFormat::Sec1, "EC PRIVATE KEY", "ECDSA P-384").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p521_pkcs8() {
    client_key_works(KeyKind::P521, KeyFormat::Pkcs8, "PRIVATE KEY", "ECDSA P-521").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p521_sec1() {
    client_key_works(KeyKind::P521, KeyFormat::Sec1, "EC PRIVATE KEY", "ECDSA P-521").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_pkcs8() {
    client_key_works(KeyKind::Ed25519, KeyFormat::Pkcs8, "PRIVATE KEY", "Ed25519").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa2048_pkcs8() {
    client_key_works(KeyKind::Rsa2048, KeyFormat::Pkcs8, "PRIVATE KEY", "RSA 2048").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa2048_pkcs1() {
    client_key_works(KeyKind::Rsa2048, KeyFormat::Pkcs1, "RSA PRIVATE KEY", "RSA 2048").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_secret_key_name_scheme_loads() {
    let schemes = [
        ["tls.crt", "tls.key", "ca.crt"],
        ["cert", "key", "cacert"],
        ["cert-chain.pem", "key.pem", "root-cert.pem"],
    ];
    for [cert, key, ca] in schemes {
        let w = World::new();
        let leaf = w.ca.client("scheme-client");
        w.secret(
            "certs",
            &[
                (cert, leaf.cert_pem.as_bytes()),
                (key, leaf.key_pem.as_bytes()),
                (ca, w.ca.cert_pem.as_bytes()),
            ],
        );
        let up = w.upstream().await;
        let (sidecar, addr) = w.sidecar_for_secret("certs", up.addr).await;
        assert!(
            sidecar.readiness.check().is_ok(),
            "{cert}/{key}/{ca}: not ready: {:?}",
            sidecar.readiness.check()
        );
        let (line, _conn) = report(addr).await;
        assert!(saw_serial(&line, &leaf.serial), "{cert}/{key}/{ca}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_files_with_a_leaf_first_chain() {
    let w = World::new();
    let leaf = w.ca.client("files-client");
    let cert = w.file("client-chain.pem", &leaf.chain_pem(&[&w.ca.cert_pem]));
    let key = w.file("client.key", &leaf.key_pem);
    let ca = w.file("ca-bundle.pem", &w.ca.cert_pem);
    let up = w.upstream().await;
    let context = format!(
        r#"cert_chain_file: "{}", private_key_file: "{}", cacert_chain_file: "{}", sni: {UPSTREAM_NAME}"#,
        cert.display(),
        key.display(),
        ca.display()
    );
    let (sidecar, addr) = w.sidecar(&context, &up.addr.to_string(), "").await;
    let generation = sidecar.store.get(CTX).unwrap().current().expect("loaded");
    assert_eq!(generation.chain.len(), 2, "leaf and CA from the chain file");
    assert_eq!(generation.chain[0].serial, leaf.serial, "leaf first");
    let (line, _conn) = report(addr).await;
    assert!(saw_serial(&line, &leaf.serial), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origination_only_context_presents_no_client_certificate() {
    let w = World::new();
    let ca = w.file("ca.pem", &w.ca.cert_pem);
    // This upstream verifies nobody: only the sidecar's side of the handshake is checked.
    let up = upstream::start_tcp(upstream::server_config(&w.server, &[], &[]), Behavior::ReportAndEcho).await;
    let context = format!(r#"cacert_chain_file: "{}", sni: {UPSTREAM_NAME}"#, ca.display());
    let (sidecar, addr) = w.sidecar(&context, &up.addr.to_string(), "").await;
    let generation = sidecar.store.get(CTX).unwrap().current().expect("loaded");
    assert!(generation.chain.is_empty());
    let (line, _conn) = report(addr).await;
    assert!(
        line.contains("subject=\"-\" serial=- "),
        "the upstream should have seen no client certificate: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_delivers_the_echo() {
    let w = World::new();
    let leaf = w.ca.client("half-close");
    w.client_secret("certs", &leaf, &leaf.key_pem);
    let up = w.upstream().await;
    let (sidecar, addr) = w.sidecar_for_secret("certs", up.addr).await;

    let (line, mut conn) = report(addr).await;
    assert!(saw_serial(&line, &leaf.serial), "{line}");
    let payload = b"bytes sent before the app shut down its write side";
    conn.get_mut().write_all(payload).await.unwrap();
    conn.get_mut().shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(STEP, conn.read_to_end(&mut echoed))
        .await
        .expect("the relay did not finish after the half-close")
        .expect("reading the echo");
    assert_eq!(echoed, payload, "the echo must arrive after our write side closed");

    support::wait_tcp_result(&sidecar, "ok", 1.0).await;
    let text = sidecar.metrics.render();
    let bytes = |d| {
        metric(
            &text,
            "mtls_sidecar_bytes_total",
            &[("listener", MAPPING), ("direction", d)],
        )
    };
    assert_eq!(bytes("to_upstream"), payload.len() as f64);
    assert_eq!(bytes("from_upstream"), (line.len() + 1 + payload.len()) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_resumes_the_tls_session() {
    let w = World::new();
    let leaf = w.ca.client("resumer");
    w.client_secret("certs", &leaf, &leaf.key_pem);
    let up = w.upstream().await;
    let (sidecar, addr) = w.sidecar_for_secret("certs", up.addr).await;

    let (first, mut conn) = report(addr).await;
    assert!(first.ends_with("resumed=false"), "{first}");
    // Close the first connection completely: its session ticket arrived before the report.
    conn.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, conn.read_to_end(&mut rest))
        .await
        .expect("first connection did not close")
        .unwrap();

    let (second, _conn) = report(addr).await;
    assert!(
        second.ends_with("resumed=true"),
        "the second handshake should resume the first session: {second}"
    );
    assert!(saw_serial(&second, &leaf.serial), "{second}");
    let text = sidecar.metrics.render();
    let handshakes = |resumed| {
        metric(
            &text,
            "mtls_sidecar_tls_handshakes_total",
            &[("tls_context", CTX), ("result", "ok"), ("resumed", resumed)],
        )
    };
    assert_eq!(handshakes("false"), 1.0);
    assert_eq!(handshakes("true"), 1.0);
}
