//! Loading a TLSContext's material through the store: every way a Secret can be wrong gets
//! a precise reason (`kind()`, the metric label) and a message naming the problem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use mtls_sidecar::metrics::Metrics;
use mtls_sidecar::testkit::pki::{KeyFormat, KeyKind, Leaf, TestCa, pem};
use mtls_sidecar::tls::{Generation, MaterialError, ReloadOutcome, TlsStore};
use std::sync::Arc;
use support::{CTX, World, metric};

/// Loads context `ctx` (`secret: certs`) with the given Secret files.
fn load(w: &World, files: &[(&str, &[u8])]) -> (ReloadOutcome, Arc<Metrics>) {
    w.secret("certs", files);
    let yaml = format!(
        "admin: null\nsecrets_dir: \"{}\"\ntls_contexts:\n  {CTX}: {{ secret: certs }}\n",
        w.secrets_dir().display()
    );
    let metrics = Metrics::new();
    let store = TlsStore::new(&support::config(&yaml), metrics.clone());
    let outcome = store.get(CTX).expect("context exists").reload();
    (outcome, metrics)
}

fn failure(w: &World, files: &[(&str, &[u8])]) -> MaterialError {
    match load(w, files).0 {
        ReloadOutcome::Failed(e) => e,
        other => panic!("expected a load failure, got {other:?}"),
    }
}

fn published(w: &World, files: &[(&str, &[u8])]) -> Arc<Generation> {
    match load(w, files).0 {
        ReloadOutcome::Published(g) => g,
        ReloadOutcome::Failed(e) => panic!("expected the material to load: {e}"),
        ReloadOutcome::Unchanged => panic!("first load cannot be unchanged"),
    }
}

/// Secret files for `leaf` with `key` as tls.key and `ca` as ca.crt.
fn files<'a>(leaf: &'a Leaf, key: &'a str, ca: &'a str) -> [(&'static str, &'a [u8]); 3] {
    [
        ("tls.crt", leaf.cert_pem.as_bytes()),
        ("tls.key", key.as_bytes()),
        ("ca.crt", ca.as_bytes()),
    ]
}

fn assert_error(e: &MaterialError, kind: &str, needles: &[&str]) {
    let msg = e.to_string();
    assert_eq!(e.kind(), kind, "{msg}");
    for n in needles {
        assert!(msg.contains(n), "`{msg}` should mention `{n}`");
    }
}

#[test]
fn encrypted_pkcs8_key_is_refused_precisely() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let key = pem("ENCRYPTED PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
    let e = failure(&w, &files(&leaf, &key, &w.ca.cert_pem));
    assert_error(
        &e,
        "encrypted_key",
        &["encrypted private keys are not supported", "tls.key"],
    );
}

#[test]
fn legacy_proc_type_encrypted_key_is_refused_precisely() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let key = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----\n";
    let e = failure(&w, &files(&leaf, key, &w.ca.cert_pem));
    assert_error(&e, "encrypted_key", &["encrypted private keys are not supported"]);
}

#[test]
fn a_certificate_file_without_certificates_is_a_pem_error() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let e = failure(
        &w,
        &[
            ("tls.crt", leaf.key_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", w.ca.cert_pem.as_bytes()),
        ],
    );
    assert_error(&e, "pem_error", &["tls.crt", "no CERTIFICATE section", "PRIVATE KEY"]);
}

#[test]
fn a_key_file_holding_a_certificate_is_a_pem_error() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let e = failure(&w, &files(&leaf, &leaf.cert_pem, &w.ca.cert_pem));
    assert_error(&e, "pem_error", &["tls.key", "no private key", "found: CERTIFICATE"]);
}

#[test]
fn two_keys_in_one_file_are_refused() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let other = w.ca.client("other");
    let both = format!("{}{}", leaf.key_pem, other.key_pem);
    let e = failure(&w, &files(&leaf, &both, &w.ca.cert_pem));
    assert_error(&e, "pem_error", &["tls.key", "2 private keys", "exactly one"]);
}

#[test]
fn a_key_that_does_not_match_the_leaf_is_key_mismatch() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let other = w.ca.client("other");
    let (outcome, metrics) = load(&w, &files(&leaf, &other.key_pem, &w.ca.cert_pem));
    let ReloadOutcome::Failed(e) = outcome else {
        panic!("a mismatched pair must not load: {outcome:?}");
    };
    assert_error(&e, "key_mismatch", &["does not match", "tls.key", "tls.crt"]);
    let text = metrics.render();
    let reloads = |result| {
        metric(
            &text,
            "mtls_sidecar_certificate_reloads_total",
            &[("tls_context", CTX), ("result", result)],
        )
    };
    assert_eq!(reloads("key_mismatch"), 1.0, "{text}");
    assert_eq!(reloads("ok"), 0.0);
}

#[test]
fn a_key_of_another_algorithm_is_key_mismatch() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let rsa =
        w.ca.issue(&mtls_sidecar::testkit::pki::LeafSpec::client("rsa").key(KeyKind::Rsa2048));
    let e = failure(&w, &files(&leaf, &rsa.key_pem_as(KeyFormat::Pkcs1), &w.ca.cert_pem));
    assert_error(&e, "key_mismatch", &["does not match"]);
}

#[test]
fn truncated_certificate_pem_says_truncated() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let cut = &leaf.cert_pem[..leaf.cert_pem.len() * 2 / 3];
    let e = failure(
        &w,
        &[
            ("tls.crt", cut.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", w.ca.cert_pem.as_bytes()),
        ],
    );
    assert_error(&e, "pem_error", &["tls.crt", "truncated"]);
}

#[test]
fn truncated_key_pem_says_truncated() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let cut = &leaf.key_pem[..leaf.key_pem.len() / 2];
    let e = failure(&w, &files(&leaf, cut, &w.ca.cert_pem));
    assert_error(&e, "pem_error", &["tls.key", "truncated"]);
}

#[test]
fn expired_client_certificate_is_cert_expired() {
    let w = World::new();
    let leaf = w.ca.expired_client("app");
    let e = failure(&w, &files(&leaf, &leaf.key_pem, &w.ca.cert_pem));
    assert_error(&e, "cert_expired", &["tls.crt", "expired"]);
}

#[test]
fn ca_bundle_with_one_garbage_entry_keeps_the_good_one() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let bundle = format!(
        "{}{}",
        pem("CERTIFICATE", b"this is not an X.509 certificate"),
        w.ca.cert_pem
    );
    let g = published(&w, &files(&leaf, &leaf.key_pem, &bundle));
    assert_eq!(g.ca_ignored, 1);
    assert_eq!(g.ca.len(), 1);
    assert_eq!(g.chain[0].serial, leaf.serial);
}

#[test]
fn ca_bundle_of_only_garbage_is_no_ca() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let bundle = pem("CERTIFICATE", b"garbage");
    let e = failure(&w, &files(&leaf, &leaf.key_pem, &bundle));
    assert_error(
        &e,
        "no_ca",
        &["ca.crt", "no usable CA certificate", "1 could not be parsed"],
    );
}

#[test]
fn a_good_secret_loads_with_every_fact_reported() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let other_ca = TestCa::new("second root");
    let bundle = format!("{}{}", w.ca.cert_pem, other_ca.cert_pem);
    let g = published(&w, &files(&leaf, &leaf.key_pem, &bundle));
    assert_eq!(g.number, 1);
    assert_eq!(g.ca.len(), 2);
    assert_eq!(g.ca_ignored, 0);
    assert_eq!(g.chain[0].subject, "CN=app");
    assert_eq!(g.key_type.as_deref(), Some("ECDSA P-256"));
}

#[test]
fn ca_bundle_with_a_bad_base64_block_keeps_the_good_one() {
    let w = World::new();
    let leaf = w.ca.client("app");
    let bundle = format!(
        "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n{}",
        w.ca.cert_pem
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let secrets = w.secrets_dir();
    w.secret("certs", &files(&leaf, &leaf.key_pem, &bundle));
    // A parser that does not advance past a bad block would spin forever: bound it.
    std::thread::spawn(move || {
        let yaml = format!(
            "admin: null\nsecrets_dir: \"{}\"\ntls_contexts:\n  {CTX}: {{ secret: certs }}\n",
            secrets.display()
        );
        let store = TlsStore::new(&support::config(&yaml), Metrics::new());
        let _ = tx.send(match store.get(CTX).unwrap().reload() {
            ReloadOutcome::Published(g) => Ok((g.ca.len(), g.ca_ignored)),
            other => Err(format!("{other:?}")),
        });
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("loading a CA bundle with a bad base64 block hung");
    assert_eq!(got, Ok((1, 1)));
}
