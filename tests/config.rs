//! Configuration validation: one test per rule, each asserting the problem names its key path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{config, problem_at, problems, try_config};

/// A valid base: one context with trust anchors, nothing listening on fixed ports but http.
const BASE: &str = r#"
admin: null
listeners: { http: 127.0.0.1:15001 }
tls_contexts:
  upstream-context: { secret: upstream-certs }
"#;

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn the_base_configuration_is_valid() {
    let c = config(&with(""));
    assert!(c.tls_contexts.contains_key("upstream-context"));
}

#[test]
fn unknown_tls_reference_names_the_mapping_and_the_known_contexts() {
    let p = problems(&with(
        r#"
mappings:
  - { name: orders, prefix: /orders/, service: orders.shop.svc, tls: upstream-contxt }
tcp_mappings:
  - { name: db, port: 25432, service: "db.shop.svc:5432", tls: nope }
"#,
    ));
    let m = problem_at(&p, "mappings[0].tls");
    assert!(m.message.contains("`upstream-contxt` is not a TLSContext"), "{m}");
    assert!(m.message.contains("upstream-context"), "lists the defined ones: {m}");
    let t = problem_at(&p, "tcp_mappings[0].tls");
    assert!(t.message.contains("`nope`"), "{t}");
}

#[test]
fn duplicate_mapping_names_are_refused() {
    let p = problems(&with(
        r#"
mappings:
  - { name: orders, prefix: /a/, service: a.svc, tls: upstream-context }
  - { name: orders, prefix: /b/, service: b.svc, tls: upstream-context }
tcp_mappings:
  - { name: db, port: 25432, service: "db.svc:5432", tls: upstream-context }
  - { name: db, port: 25433, service: "db.svc:5433", tls: upstream-context }
"#,
    ));
    let m = problem_at(&p, "mappings[1].name");
    assert!(m.message.contains("`orders` is also the name of mappings[0]"), "{m}");
    let t = problem_at(&p, "tcp_mappings[1].name");
    assert!(t.message.contains("`db` is also the name of tcp_mappings[0]"), "{t}");
}

#[test]
fn duplicate_tcp_ports_are_refused() {
    let p = problems(&with(
        r#"
tcp_mappings:
  - { name: db1, port: 25432, service: "db1.svc:5432", tls: upstream-context }
  - { name: db2, port: 25432, service: "db2.svc:5432", tls: upstream-context }
"#,
    ));
    let t = problem_at(&p, "tcp_mappings[1].port");
    assert!(
        t.message.contains("port 25432 is already used by tcp_mappings[0].port"),
        "{t}"
    );
}

#[test]
fn tcp_port_equal_to_the_http_listener_port_is_refused() {
    let p = problems(&with(
        r#"
tcp_mappings:
  - { name: db, port: 15001, service: "db.svc:5432", tls: upstream-context }
"#,
    ));
    let t = problem_at(&p, "tcp_mappings[0].port");
    assert!(t.message.contains("already used by listeners.http"), "{t}");
}

#[test]
fn non_loopback_http_listener_needs_allow_non_loopback() {
    let p = problems(
        r#"
admin: null
listeners: { http: 0.0.0.0:15001 }
"#,
    );
    let l = problem_at(&p, "listeners.http");
    assert!(l.message.contains("`0.0.0.0:15001` is not a loopback address"), "{l}");
    assert!(l.message.contains("allow_non_loopback"), "says how to fix it: {l}");

    let (c, warnings) = try_config(
        r#"
admin: null
listeners:
  http: { address: 0.0.0.0:15001, allow_non_loopback: true }
"#,
    )
    .expect("explicitly allowed");
    let http = c.listeners.http.expect("http listener");
    assert_eq!(http.address, "0.0.0.0:15001".parse().unwrap());
    assert!(
        warnings.iter().any(|w| w.path == "listeners.http"),
        "an allowed non-loopback listener still warns: {warnings:?}"
    );
}

#[test]
fn tls_1_0_and_1_1_are_not_supported_by_rustls() {
    for v in ["v1.0", "v1.1"] {
        let p = problems(&format!(
            "admin: null\ntls_contexts:\n  old: {{ secret: s, min_tls_version: {v} }}\n"
        ));
        let e = problem_at(&p, "tls_contexts.old.min_tls_version");
        assert!(e.message.contains("not supported by rustls"), "{v}: {e}");
        assert!(e.message.contains(v), "quotes the bad value: {e}");
    }
}

#[test]
fn unknown_cipher_suite_is_refused_by_name() {
    let p = problems(
        "admin: null\ntls_contexts:\n  c: { secret: s, cipher_suites: [ECDHE-ECDSA-AES128-GCM-SHA256, DES-CBC3-SHA] }\n",
    );
    let e = problem_at(&p, "tls_contexts.c.cipher_suites");
    assert!(e.message.contains("`DES-CBC3-SHA`"), "{e}");
    assert_eq!(p.len(), 1, "the OpenSSL name before it is fine: {p:#?}");
}

#[test]
fn unknown_curve_is_refused_by_name() {
    let p = problems("admin: null\ntls_contexts:\n  c: { secret: s, ecdh_curves: [X25519, brainpoolP256r1] }\n");
    let e = problem_at(&p, "tls_contexts.c.ecdh_curves");
    assert!(e.message.contains("`brainpoolP256r1`"), "{e}");
}

#[test]
fn a_mapping_that_loops_to_the_sidecar_is_refused() {
    let p = problems(&with(
        r#"
mappings:
  - { name: loop-http, prefix: /, service: "127.0.0.1:15001" }
tcp_mappings:
  - { name: db, port: 25432, service: "db.svc:5432", tls: upstream-context }
  - { name: loop-tcp, port: 25433, service: "localhost:25432", tls: upstream-context }
"#,
    ));
    let m = problem_at(&p, "mappings[0].service");
    assert!(m.message.contains("loop back"), "{m}");
    assert!(m.message.contains("listeners.http"), "{m}");
    let t = problem_at(&p, "tcp_mappings[1].service");
    assert!(t.message.contains("tcp_mappings[0].port"), "{t}");
}

#[test]
fn a_context_without_trust_anchors_is_refused() {
    let p = problems("admin: null\ntls_contexts:\n  bare: { sni: orders.shop.svc }\n");
    let e = problem_at(&p, "tls_contexts.bare");
    assert!(e.message.contains("has no trust anchors"), "{e}");
    // Each source of anchors is enough on its own.
    for anchors in ["secret: s", "ca_secret: s", "cacert_chain_file: /ca.pem"] {
        config(&format!("admin: null\ntls_contexts:\n  c: {{ {anchors} }}\n"));
    }
}

#[test]
fn unknown_fields_everywhere_are_reported_together() {
    let e = try_config(
        r#"
admin: null
listners: { http: 127.0.0.1:15001 }
tls_contexts:
  upstream-context: { secret: upstream-certs, secrte: typo }
mappings:
  - { name: orders, prefx: /orders/, service: orders.svc, tls: upstream-context }
"#,
    )
    .expect_err("three typos");
    let text = e.to_string();
    for (path, field) in [
        ("listners", "listners"),
        ("tls_contexts.upstream-context.secrte", "secrte"),
        ("mappings[0].prefx", "prefx"),
    ] {
        let p = problem_at(&e.problems, path);
        assert!(p.message.contains(&format!("unknown field `{field}`")), "{p}");
        assert!(text.contains(path), "the one error lists {path}: {text}");
    }
    assert!(text.starts_with("3 configuration problems"), "{text}");
}

#[test]
fn validation_problems_of_different_sections_are_reported_together() {
    let p = problems(
        r#"
admin: null
listeners: { http: 0.0.0.0:15001 }
tls_contexts:
  c: { secret: s, min_tls_version: v1.0 }
tcp_mappings:
  - { name: db, port: 25432, service: "db.svc:5432", tls: missing }
"#,
    );
    for path in [
        "listeners.http",
        "tls_contexts.c.min_tls_version",
        "tcp_mappings[0].tls",
    ] {
        problem_at(&p, path);
    }
}

#[test]
fn durations_accept_units_and_ms_integers() {
    let c = config(&with(
        r#"
drain_timeout: 250ms
reload_poll_interval: 3s
rotation_drain_timeout: 1m
tcp_mappings:
  - { name: db, port: 0, service: "db.svc:5432", tls: upstream-context, connect_timeout_ms: 1500, idle_timeout_ms: 2s }
"#,
    ));
    assert_eq!(c.drain_timeout.0, Duration::from_millis(250));
    assert_eq!(c.reload_poll_interval.0, Duration::from_secs(3));
    assert_eq!(c.rotation_drain_timeout.0, Duration::from_secs(60));
    let m = &c.tcp_mappings[0];
    assert_eq!(m.connect_timeout_ms.unwrap().0, Duration::from_millis(1500));
    assert_eq!(m.idle_timeout_ms.unwrap().0, Duration::from_secs(2));
}

#[test]
fn a_bare_integer_drain_timeout_is_refused_with_a_hint() {
    let p = problems("admin: null\ndrain_timeout: 30\n");
    let e = problem_at(&p, "drain_timeout");
    assert!(e.message.contains("needs a unit: write 30s or 30ms"), "{e}");
}

#[test]
fn unknown_fields_in_nested_sections_name_their_full_path() {
    let p = problems(
        r#"
admin: null
listeners:
  http: { address: 127.0.0.1:15001, allow_non_loopbak: true }
log: { level: info, fromat: json }
"#,
    );
    for (path, field) in [
        ("listeners.http.allow_non_loopbak", "allow_non_loopbak"),
        ("log.fromat", "fromat"),
    ] {
        let e = problem_at(&p, path);
        assert!(e.message.contains(&format!("unknown field `{field}`")), "{e}");
    }
}

#[test]
fn limits_that_would_refuse_everything_are_refused() {
    let p = problems(&with(
        "limits: { max_request_body: 0, keepalive_timeout: 0s, header_read_timeout: 0s }\n",
    ));
    for path in [
        "limits.max_request_body",
        "limits.keepalive_timeout",
        "limits.header_read_timeout",
    ] {
        problem_at(&p, path);
    }
    let c = config(&with("limits: { max_request_body: 1048576, keepalive_timeout: 90s }\n"));
    assert_eq!(c.limits.max_request_body, Some(1 << 20));
    assert_eq!(c.limits.keepalive_timeout.0, Duration::from_secs(90));
}
