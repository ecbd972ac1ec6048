//! Emissary import (`--emissary FILE`, `emissary_resources`): the seed example works verbatim,
//! both apiVersions load, other kinds are skipped, and an unknown field is an error that names
//! the object, the field and the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "http_support/mod.rs"]
mod http_support;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use http_support::{HttpWorld, UPSTREAM_NAME, assert_sidecar_error, get, start};
use mtls_sidecar::config::{Config, ConfigError, ConfigSource, Warning, load};

/// The seed example, verbatim.
const SEED: &str = r#"---
apiVersion: getambassador.io/v3alpha1
kind: TLSContext
metadata:
  name: upstream-context
spec:
  hosts: []
  secret: upstream-certs
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata:
  name: upstream-mapping
spec:
  prefix: /upstream/
  service: upstream-service
  tls: upstream-context
"#;

/// The sidecar's own file: only listeners and where the Secrets are mounted.
fn base_config(w: &HttpWorld) -> PathBuf {
    w.file(
        "config.yaml",
        &format!(
            "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\nsecrets_dir: \"{}\"\n",
            w.secrets_dir().display()
        ),
    )
}

/// Loads the base config plus `emissary` as `--emissary FILE`.
fn load_with(w: &HttpWorld, name: &str, emissary: &str) -> Result<(Config, Vec<Warning>), ConfigError> {
    let file = w.file(name, emissary);
    load(&ConfigSource {
        path: Some(base_config(w)),
        emissary: vec![file],
    })
}

/// Publishes this world's client certificate as Secret `upstream-certs`.
fn upstream_certs(w: &HttpWorld) {
    w.secret(
        "upstream-certs",
        &[
            ("tls.crt", w.client.cert_pem.as_bytes()),
            ("tls.key", w.client.key_pem.as_bytes()),
            ("ca.crt", w.ca.cert_pem.as_bytes()),
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_example_loads_verbatim_and_routes() {
    let w = HttpWorld::new();
    upstream_certs(&w);
    let (config, warnings) = load_with(&w, "seed.yaml", SEED).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "the seed needs no warning: {warnings:?}");

    let ctx = &config.tls_contexts["upstream-context"];
    assert_eq!(ctx.secret.as_deref(), Some("upstream-certs"));
    assert!(ctx.hosts.is_empty());
    assert_eq!(config.mappings.len(), 1);
    let m = &config.mappings[0];
    assert_eq!(
        (m.name.as_str(), m.prefix.as_str(), m.service.as_str(), m.tls.as_deref()),
        (
            "upstream-mapping",
            "/upstream/",
            "upstream-service",
            Some("upstream-context")
        )
    );

    let (sc, addr) = start(config).await;
    let generation = sc.store.get("upstream-context").unwrap().current();
    assert!(generation.is_some(), "the context's Secret loaded");

    // `upstream-service` does not resolve here: getting as far as DNS proves the request was
    // routed to this mapping (an unrouted one is a 403 before any lookup).
    let r = get(addr, "anything.svc", "/upstream/x").await;
    assert_sidecar_error(&r, 502, "dns_error");
    assert!(r.text().contains("upstream-service"), "{}", r.text());
    let r = get(addr, "anything.svc", "/elsewhere").await;
    assert_sidecar_error(&r, 403, "no_route");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_with_a_reachable_service_reaches_the_upstream() {
    let w = HttpWorld::new();
    upstream_certs(&w);
    let up = w.upstream().await;
    let yaml = SEED
        .replace(
            "  secret: upstream-certs\n",
            &format!("  secret: upstream-certs\n  sni: {UPSTREAM_NAME}\n"),
        )
        .replace("service: upstream-service", &format!("service: {}", up.addr));
    let (config, _) = load_with(&w, "seed.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
    let (_sc, addr) = start(config).await;

    let r = get(addr, "orders.shop.svc", "/upstream/x").await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["path"], "/x", "Emissary's default rewrite: {j}");
    assert_eq!(j["client_serial"], w.client.serial.as_str(), "{j}");
    assert_eq!(up.observed.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn emissary_resources_in_the_config_file_are_imported() {
    let w = HttpWorld::new();
    upstream_certs(&w);
    w.file("seed.yaml", SEED);
    let cfg = w.file(
        "with-resources.yaml",
        &format!(
            "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\nsecrets_dir: \"{}\"\nemissary_resources: [seed.yaml]\n",
            w.secrets_dir().display()
        ),
    );
    // A relative path is relative to the configuration file.
    let (config, _) = load(&ConfigSource {
        path: Some(cfg),
        emissary: vec![],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.mappings[0].name, "upstream-mapping");
    assert!(config.tls_contexts.contains_key("upstream-context"));
}

#[test]
fn an_unknown_field_names_the_object_the_field_and_the_file() {
    let w = HttpWorld::new();
    let yaml = SEED.replace("  prefix: /upstream/\n", "  prefix: /upstream/\n  retries: 3\n");
    let err = load_with(&w, "typo.yaml", &yaml).expect_err("an unknown field must be an error");
    let file = w.dir.path().join("typo.yaml").display().to_string();
    let p = err
        .problems
        .iter()
        .find(|p| p.path.starts_with("Mapping/upstream-mapping"))
        .unwrap_or_else(|| panic!("no problem names Mapping/upstream-mapping: {err}"));
    assert!(p.message.contains("retries"), "names the field: {p}");
    assert_eq!(p.origin.as_deref(), Some(file.as_str()), "names the file: {p}");
    let text = err.to_string();
    for needle in ["Mapping/upstream-mapping", "retries", file.as_str()] {
        assert!(text.contains(needle), "the message should contain {needle:?}: {text}");
    }
    // The same for a TLSContext.
    let yaml = SEED.replace("  hosts: []\n", "  hosts: []\n  client_cert: nope\n");
    let err = load_with(&w, "typo2.yaml", &yaml).expect_err("an unknown field must be an error");
    let text = err.to_string();
    assert!(
        text.contains("TLSContext/upstream-context") && text.contains("client_cert"),
        "{text}"
    );
}

#[test]
fn v2_api_version_is_accepted() {
    let w = HttpWorld::new();
    let yaml = SEED.replace("getambassador.io/v3alpha1", "getambassador.io/v2");
    let (config, _) = load_with(&w, "v2.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.mappings[0].name, "upstream-mapping");
    assert!(config.tls_contexts.contains_key("upstream-context"));

    let yaml = SEED.replace("getambassador.io/v3alpha1", "getambassador.io/v1");
    let err = load_with(&w, "v1.yaml", &yaml).expect_err("v1 is not supported");
    assert!(err.to_string().contains("getambassador.io/v1"), "{err}");
}

#[test]
fn other_kinds_are_skipped_without_error() {
    let w = HttpWorld::new();
    let yaml = format!(
        "{SEED}---
apiVersion: getambassador.io/v3alpha1
kind: Host
metadata:
  name: edge
spec:
  hostname: shop.example.com
  tlsSecret: {{ name: edge-cert }}
  anything: [goes, here]
---
apiVersion: v1
kind: Service
metadata:
  name: upstream-service
spec:
  ports: [{{ port: 443 }}]
"
    );
    let (config, _) = load_with(&w, "mixed.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.mappings.len(), 1);
    assert_eq!(config.tls_contexts.len(), 1);
}

#[test]
fn termination_only_fields_warn_instead_of_failing() {
    let w = HttpWorld::new();
    let yaml = SEED
        .replace(
            "  hosts: []\n",
            "  hosts: [shop.example.com]\n  redirect_cleartext_from: 8080\n",
        )
        .replace(
            "  prefix: /upstream/\n",
            "  prefix: /upstream/\n  ambassador_id: [default]\n",
        );
    let (config, warnings) = load_with(&w, "edge.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.mappings.len(), 1);
    let all = warnings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    for needle in ["redirect_cleartext_from", "ambassador_id", "hosts"] {
        assert!(all.contains(needle), "expected a warning about {needle}: {all}");
    }
}
