//! The admin listener over real HTTP: /metrics after real traffic (checked by promtool),
//! /certs, /readyz, /healthz, /config, and the loopback-only mutating endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use mtls_sidecar::app::{self, Sidecar};
use mtls_sidecar::testkit::client;
use mtls_sidecar::testkit::http_upstream;
use mtls_sidecar::testkit::pki::TestCa;
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{Upstream, server_config};
use support::{STEP, assert_eventually, config, metric};

const NAME: &str = "orders.test.svc";

struct Fixture {
    _dir: tempfile::TempDir,
    ca: TestCa,
    secret: SecretDir,
    _good: Upstream,
    _bad: Upstream,
    sidecar: Sidecar,
    serial: String,
}

fn publish(secret: &SecretDir, ca: &TestCa) -> mtls_sidecar::testkit::pki::Leaf {
    let leaf = ca.client("admin-test");
    secret
        .publish(&[
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", ca.cert_pem.as_bytes()),
        ])
        .unwrap();
    leaf
}

/// A sidecar with a good mapping, a mapping whose context trusts the wrong CA, and an admin
/// listener on `admin`.
async fn fixture(admin: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("admin test CA");
    let other = TestCa::new("some other CA");
    let secret = SecretDir::create(dir.path().join("good")).unwrap();
    let leaf = publish(&secret, &ca);
    let wrong = SecretDir::create(dir.path().join("wrong")).unwrap();
    wrong
        .publish(&[
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", other.cert_pem.as_bytes()),
        ])
        .unwrap();
    let server = ca.server(NAME);
    let good = http_upstream::start_https(server_config(&server, &[], &[&ca])).await;
    let bad = http_upstream::start_https(server_config(&server, &[], &[&ca])).await;
    let yaml = format!(
        r#"
listeners: {{ http: 127.0.0.1:0 }}
admin: "{admin}"
secrets_dir: {secrets}
tls_contexts:
  good: {{ secret: good, sni: {NAME} }}
  wrong-ca: {{ secret: wrong, sni: {NAME} }}
mappings:
  - {{ name: ok, prefix: /, host: {NAME}, service: "{good}", tls: good }}
  - {{ name: bad, prefix: /, host: bad.test.svc, service: "{bad}", tls: wrong-ca }}
"#,
        secrets = dir.path().display(),
        good = good.addr,
        bad = bad.addr,
    );
    let sidecar = app::start(config(&yaml)).await.unwrap();
    Fixture {
        _dir: dir,
        ca,
        secret,
        _good: good,
        _bad: bad,
        sidecar,
        serial: leaf.serial,
    }
}

fn admin(f: &Fixture) -> SocketAddr {
    let a = f.sidecar.admin_addr.unwrap();
    if a.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], a.port()))
    } else {
        a
    }
}

async fn admin_get(addr: SocketAddr, path: &str) -> client::Collected {
    client::get(addr, "admin", path).await.unwrap()
}

async fn admin_post(addr: SocketAddr, path: &str) -> client::Collected {
    let req = http::Request::post(path)
        .header("host", "admin")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    client::Conn::open(addr, false).await.unwrap().send(req).await.unwrap()
}

fn promtool() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join("promtool"))
        .find(|p| p.exists())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_real_traffic_are_exact_and_promtool_clean() {
    let f = fixture("127.0.0.1:0").await;
    let http = f.sidecar.http_addr.unwrap();
    for _ in 0..2 {
        let r = client::get(http, NAME, "/x").await.unwrap();
        assert_eq!(r.head.status, 200, "{}", r.text());
    }
    let r = client::get(http, "nowhere.test.svc", "/").await.unwrap();
    assert_eq!(r.error_reason().as_deref(), Some("no_route"));
    let r = client::get(http, "bad.test.svc", "/").await.unwrap();
    assert_eq!(r.head.status, 502);
    assert_eq!(r.error_reason().as_deref(), Some("unknown_issuer"));

    let second = publish(&f.secret, &f.ca);
    let slot = f.sidecar.store.get("good").unwrap().clone();
    assert_eventually(STEP, "generation 2 of `good`", || {
        slot.current().is_some_and(|g| g.number == 2)
    })
    .await;
    let not_after = slot.current().unwrap().chain[0].not_after_unix as f64;

    let scrape = admin_get(admin(&f), "/metrics").await;
    assert_eq!(scrape.head.status, 200);
    assert!(
        scrape.head.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "Prometheus text format content type"
    );
    let t = scrape.text();
    let ok = [("mapping", "ok"), ("tls_context", "good"), ("code", "200")];
    assert_eq!(metric(&t, "mtls_sidecar_requests_total", &ok), 2.0, "{t}");
    assert_eq!(
        metric(
            &t,
            "mtls_sidecar_denied_total",
            &[("listener", "http"), ("reason", "no_route")]
        ),
        1.0
    );
    let bad = [("mapping", "bad"), ("tls_context", "wrong-ca"), ("code", "502")];
    assert_eq!(metric(&t, "mtls_sidecar_requests_total", &bad), 1.0);
    let ui = [("tls_context", "wrong-ca"), ("result", "unknown_issuer")];
    assert_eq!(metric(&t, "mtls_sidecar_upstream_connections_total", &ui), 1.0);
    assert_eq!(metric(&t, "mtls_sidecar_tls_handshakes_total", &ui), 1.0);
    let good_hs = [("tls_context", "good"), ("result", "ok"), ("resumed", "false")];
    assert_eq!(
        metric(&t, "mtls_sidecar_tls_handshakes_total", &good_hs),
        1.0,
        "one pooled connection"
    );
    let reloads = [("tls_context", "good"), ("result", "ok")];
    assert_eq!(metric(&t, "mtls_sidecar_certificate_reloads_total", &reloads), 2.0);
    assert_eq!(
        metric(&t, "mtls_sidecar_certificate_generation", &[("tls_context", "good")]),
        2.0
    );
    let role = [("tls_context", "good"), ("role", "client")];
    assert_eq!(
        metric(&t, "mtls_sidecar_certificate_not_after_timestamp_seconds", &role),
        not_after
    );
    assert!(metric(&t, "mtls_sidecar_certificate_not_before_timestamp_seconds", &role) > 0.0);
    assert!(
        metric(
            &t,
            "mtls_sidecar_certificate_last_reload_success_timestamp_seconds",
            &[("tls_context", "good")]
        ) > 0.0
    );
    assert_eq!(metric(&t, "mtls_sidecar_ready", &[]), 1.0);
    assert_eq!(
        metric(&t, "mtls_sidecar_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    assert!(
        t.contains("mtls_sidecar_request_duration_seconds_bucket{") && !t.contains("quantile="),
        "histograms have real buckets, not summaries"
    );
    assert!(t.contains("mtls_sidecar_tls_handshake_duration_seconds_bucket{"));
    for name in [
        "mtls_sidecar_requests_total",
        "mtls_sidecar_request_duration_seconds",
        "mtls_sidecar_denied_total",
        "mtls_sidecar_upstream_connections_total",
        "mtls_sidecar_upstream_connections_active",
        "mtls_sidecar_tls_handshake_duration_seconds",
        "mtls_sidecar_tls_handshakes_total",
        "mtls_sidecar_certificate_not_after_timestamp_seconds",
        "mtls_sidecar_certificate_not_before_timestamp_seconds",
        "mtls_sidecar_certificate_reloads_total",
        "mtls_sidecar_certificate_generation",
        "mtls_sidecar_certificate_last_reload_success_timestamp_seconds",
        "mtls_sidecar_ready",
        "mtls_sidecar_build_info",
    ] {
        assert!(t.contains(&format!("# HELP {name} ")), "help text for {name}");
    }
    // Labels are bounded: never an address, a path or a serial.
    for line in t.lines().filter(|l| !l.starts_with('#')) {
        let labels = line.split_once('{').map_or("", |(_, r)| r);
        assert!(
            !labels.contains("127.0.0.1") && !labels.contains("\"/"),
            "unbounded label in {line}"
        );
        assert!(!labels.contains(&second.serial), "serial as a label in {line}");
    }

    match promtool() {
        Some(p) => {
            let mut child = std::process::Command::new(p)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(t.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None if std::env::var("CI").as_deref() == Ok("true") => panic!("promtool is required in CI"),
        None => eprintln!("SKIPPED promtool check: promtool is not installed (Debian package `prometheus`)"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certs_describes_every_certificate_and_no_key_material() {
    let f = fixture("127.0.0.1:0").await;
    let r = admin_get(admin(&f), "/certs").await;
    assert_eq!(r.head.status, 200);
    let body = r.text();
    assert!(
        !body.contains("PRIVATE KEY") && !body.contains("BEGIN"),
        "no PEM or key material"
    );
    let j = r.json();
    let ctx = j["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "good")
        .unwrap();
    assert_eq!(ctx["generation"], 1);
    assert_eq!(ctx["ready"], true);
    assert_eq!(ctx["key_type"], "ECDSA P-256");
    let g = f.sidecar.store.get("good").unwrap().current().unwrap();
    let client = ctx["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["role"] == "client")
        .unwrap();
    assert_eq!(client["serial"], f.serial.as_str());
    assert_eq!(client["subject"], "CN=admin-test");
    assert_eq!(client["not_after"], g.chain[0].not_after.as_str());
    assert_eq!(client["sha256"], g.chain[0].sha256.as_str());
    assert_eq!(client["sha256"].as_str().unwrap().len(), 64);
    assert!(client["source"].as_str().unwrap().ends_with("good/tls.crt"));
    assert!(client["seconds_to_expiry"].as_i64().unwrap() > 3600);
    let ca = ctx["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["role"] == "ca")
        .unwrap();
    assert_eq!(ca["subject"], g.ca[0].subject.as_str());
    assert!(ctx["last_error"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_context_state_and_drain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ready CA");
    let secret = SecretDir::create(dir.path().join("late")).unwrap();
    let yaml = format!(
        r#"
listeners: {{ http: null }}
admin: 127.0.0.1:0
secrets_dir: {}
tls_contexts:
  late: {{ secret: late }}
"#,
        dir.path().display()
    );
    let sidecar = app::start(config(&yaml)).await.unwrap();
    let addr = sidecar.admin_addr.unwrap();
    let r = admin_get(addr, "/readyz").await;
    assert_eq!(r.head.status, 503);
    assert!(r.text().contains("TLS context `late`"), "{}", r.text());
    assert_eq!(
        admin_get(addr, "/healthz").await.head.status,
        200,
        "alive while not ready"
    );
    publish(&secret, &ca);
    let deadline = std::time::Instant::now() + STEP;
    loop {
        if admin_get(addr, "/readyz").await.head.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never became ready after the Secret appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sidecar.metrics.render().contains("mtls_sidecar_ready 1"));
    sidecar.shutdown.start_draining();
    sidecar.readiness.refresh();
    let r = admin_get(addr, "/readyz").await;
    assert_eq!(r.head.status, 503);
    assert!(r.text().contains("draining"));
    assert!(sidecar.metrics.render().contains("mtls_sidecar_ready 0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn config_endpoint_and_loopback_reload() {
    let f = fixture("127.0.0.1:0").await;
    let addr = admin(&f);
    let c = admin_get(addr, "/config").await.json();
    assert_eq!(c["tls_contexts"]["good"]["secret"], "good");
    assert_eq!(c["mappings"][0]["name"], "ok");
    let r = admin_post(addr, "/reload").await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    assert_eq!(r.json()["good"], "unchanged");
    assert_eq!(admin_get(addr, "/reload").await.head.status, 405);
    assert_eq!(admin_get(addr, "/nope").await.head.status, 404);
}

/// A non-loopback address of this host, if it has one.
fn global_ipv4() -> Option<std::net::IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|ip| ip.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn mutating_endpoints_refuse_non_loopback_peers() {
    let Some(ip) = global_ipv4() else {
        eprintln!(
            "SKIPPED: this host has no non-loopback IPv4 address to connect from (the peer rule itself is unit-tested in admin.rs)"
        );
        return;
    };
    let f = fixture("0.0.0.0:0").await;
    let external = SocketAddr::new(ip, f.sidecar.admin_addr.unwrap().port());
    for path in ["/reload", "/drain"] {
        let r = admin_post(external, path).await;
        assert_eq!(r.head.status, 403, "{path} from {ip}");
        assert!(r.text().contains("only accepted from loopback"));
    }
    assert!(!f.sidecar.shutdown.is_draining(), "the refused /drain did nothing");
    assert_eq!(
        admin_get(external, "/healthz").await.head.status,
        200,
        "read-only endpoints stay open"
    );
    assert_eq!(admin_post(admin(&f), "/reload").await.head.status, 200);
}
