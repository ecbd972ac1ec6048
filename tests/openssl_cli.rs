//! Certificates and keys produced by the `openssl` command line load and work end to end:
//! `ecparam -genkey` (EC PARAMETERS + SEC1), `genrsa -traditional` (PKCS#1), CSRs signed by
//! an openssl-made CA. Skipped, with the reason printed, when `openssl` is not on PATH.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use mtls_sidecar::testkit::upstream::{self, Behavior};
use support::openssl::{self, OpensslCa, OpensslLeaf};
use support::{CTX, World, report, server_config_with_client_ca_pem};

/// The serial as the sidecar and the upstream print it, from the hex given to `-set_serial`.
fn printed_serial(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|b| std::str::from_utf8(b).unwrap().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// Loads `client` through a real sidecar against an upstream that trusts only `ca`.
async fn works_end_to_end(w: &World, ca: &OpensslCa, client: &OpensslLeaf, serial_hex: &str) {
    let secret = format!("openssl-{serial_hex}");
    w.secret(
        &secret,
        &[
            ("tls.crt", client.cert_pem.as_bytes()),
            ("tls.key", client.key_pem.as_bytes()),
            ("ca.crt", w.ca.cert_pem.as_bytes()),
        ],
    );
    let up = upstream::start_tcp(
        server_config_with_client_ca_pem(&w.server, ca.cert_pem.as_bytes()),
        Behavior::ReportAndEcho,
    )
    .await;
    let (sidecar, addr) = w.sidecar_for_secret(&secret, up.addr).await;
    let slot = sidecar.store.get(CTX).unwrap();
    assert!(
        slot.current().is_some(),
        "the openssl-made material did not load: {:?}",
        slot.last_error()
    );
    let (line, _conn) = report(addr).await;
    let serial = printed_serial(serial_hex);
    assert!(
        line.contains(&format!(" serial={serial} ")),
        "the upstream should have seen serial {serial}: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_made_keys_and_certificates_work() {
    let Some(version) = openssl::version() else {
        eprintln!("SKIPPED openssl_made_keys_and_certificates_work: `openssl` is not on PATH");
        return;
    };
    eprintln!("using {version}");
    let w = World::new();
    let dir = w.dir.path().join("openssl");
    std::fs::create_dir(&dir).unwrap();
    let ca = OpensslCa::new(&dir);

    // EC: `openssl ecparam -genkey` writes EC PARAMETERS, then the SEC1 key.
    openssl::run(&dir, &["ecparam", "-name", "prime256v1", "-genkey", "-out", "ec.key"]);
    let ec = ca.sign_client("ec.key", "openssl-ec-client", "1A2B3C4D");
    assert!(
        ec.key_pem.contains("-----BEGIN EC PARAMETERS-----") && ec.key_pem.contains("-----BEGIN EC PRIVATE KEY-----"),
        "ecparam output changed shape:\n{}",
        ec.key_pem
    );
    works_end_to_end(&w, &ca, &ec, "1A2B3C4D").await;

    // RSA, PKCS#1 (`-traditional` on OpenSSL 3; 1.1 writes PKCS#1 by default).
    if openssl::try_run(&dir, &["genrsa", "-traditional", "-out", "rsa.key", "2048"]).is_err() {
        openssl::run(&dir, &["genrsa", "-out", "rsa.key", "2048"]);
    }
    let rsa = ca.sign_client("rsa.key", "openssl-rsa-client", "5E6F7081");
    if rsa.key_pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        works_end_to_end(&w, &ca, &rsa, "5E6F7081").await;
    } else {
        eprintln!("SKIPPED the PKCS#1 part: this openssl cannot write a traditional RSA key");
    }
}
