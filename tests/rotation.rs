//! Certificate hot reload (issue 4, SPEC §4): kubelet-style swaps, torn writes, CA overlap,
//! pooled connections across generations, expiry, start-up without credentials, deleted
//! Secrets, permissions and poll-only mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use mtls_sidecar::app::{self, Sidecar};
use mtls_sidecar::testkit::client::{self, Conn};
use mtls_sidecar::testkit::http_upstream;
use mtls_sidecar::testkit::pki::{Leaf, LeafSpec, TestCa};
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{self, Behavior, Upstream};
use support::{STEP, assert_eventually, config, metric, report, saw_serial};

const NAME: &str = "upstream.test.svc";

/// A client CA, a Secret, and upstreams that trust that CA.
struct Rig {
    dir: tempfile::TempDir,
    ca: TestCa,
    secret: SecretDir,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = SecretDir::create(dir.path().join("certs")).unwrap();
        Rig {
            dir,
            ca: TestCa::new("rotation CA"),
            secret,
        }
    }

    fn files<'a>(leaf: &'a Leaf, ca: &'a str) -> [(&'static str, &'a [u8]); 3] {
        [
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", ca.as_bytes()),
        ]
    }

    /// Publishes a fresh client certificate, kubelet-style; returns it.
    fn rotate(&self) -> Leaf {
        let leaf = self.ca.client("rotating-app");
        self.secret.publish(&Self::files(&leaf, &self.ca.cert_pem)).unwrap();
        leaf
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        upstream::server_config(&self.ca.server(NAME), &[], &[&self.ca])
    }

    async fn tcp_upstream(&self) -> Upstream {
        upstream::start_tcp(self.server_config(), Behavior::ReportAndEcho).await
    }

    async fn https_upstream(&self) -> Upstream {
        http_upstream::start_https(self.server_config()).await
    }

    /// A sidecar with HTTP mapping `web` (host NAME) and TCP mapping `db`.
    async fn sidecar(&self, https: Option<&Upstream>, tcp: Option<&Upstream>, extra: &str) -> Sidecar {
        let mut yaml = format!(
            "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\nsecrets_dir: {}\n{extra}\ntls_contexts:\n  ctx: {{ secret: certs, sni: {NAME} }}\n",
            self.dir.path().display()
        );
        if let Some(u) = https {
            yaml.push_str(&format!(
                "mappings:\n  - {{ name: web, prefix: /, host: {NAME}, service: \"{}\", tls: ctx }}\n",
                u.addr
            ));
        }
        if let Some(u) = tcp {
            yaml.push_str(&format!(
                "tcp_mappings:\n  - {{ name: db, port: 0, service: \"{}\", tls: ctx }}\n",
                u.addr
            ));
        }
        app::start(config(&yaml)).await.unwrap()
    }
}

fn generation(s: &Sidecar) -> u64 {
    s.store.get("ctx").unwrap().current().map_or(0, |g| g.number)
}

async fn http_serial(s: &Sidecar) -> (u16, String) {
    let r = client::get(s.http_addr.unwrap(), NAME, "/who").await.unwrap();
    (
        r.head.status.as_u16(),
        r.json()["client_serial"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_reaches_the_next_connection_within_two_seconds() {
    let rig = Rig::new();
    let first = rig.rotate();
    let up = rig.tcp_upstream().await;
    let s = rig.sidecar(None, Some(&up), "").await;
    let db = s.tcp_addrs["db"];
    assert!(saw_serial(&report(db).await.0, &first.serial));
    let second = rig.rotate();
    let t = Instant::now();
    loop {
        if saw_serial(&report(db).await.0, &second.serial) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the new certificate was not used within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(generation(&s), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_rotations_under_load_lose_no_request() {
    let rig = Rig::new();
    let mut serials = vec![rig.rotate().serial];
    let https = rig.https_upstream().await;
    let tcp = rig.tcp_upstream().await;
    let s = Arc::new(rig.sidecar(Some(&https), Some(&tcp), "").await);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for i in 0..8 {
        let (s, stop, ok, failed) = (s.clone(), stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let good = if i % 2 == 0 {
                    // HTTP/1.1 keep-alive from the app: the sidecar's pool must switch generations.
                    if conn.is_none() {
                        conn = Conn::open(s.http_addr.unwrap(), i % 4 == 0).await.ok();
                    }
                    let req = http::Request::get(format!("http://{NAME}/load"))
                        .header("host", NAME)
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap();
                    match conn.as_mut().unwrap().send(req).await {
                        Ok(r) => r.head.status == 200,
                        Err(_) => false,
                    }
                } else {
                    let (line, _) = report(s.tcp_addrs["db"]).await;
                    line.contains("serial=")
                };
                if good {
                    ok.fetch_add(1, Ordering::SeqCst)
                } else {
                    failed.fetch_add(1, Ordering::SeqCst)
                };
            }
        }));
    }
    for n in 2..=11 {
        let before = ok.load(Ordering::SeqCst);
        serials.push(rig.rotate().serial);
        assert_eventually(STEP, "generation published", || generation(&s) == n).await;
        // Let traffic flow under each generation before the next rotation.
        assert_eventually(STEP, "traffic under the new generation", || {
            ok.load(Ordering::SeqCst) >= before + 40
        })
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed during rotations");
    assert!(ok.load(Ordering::SeqCst) >= 400);
    let seen: Vec<String> = https
        .observed
        .serials()
        .into_iter()
        .chain(tcp.observed.serials())
        .collect();
    for (i, serial) in serials.iter().enumerate() {
        assert!(
            seen.contains(serial),
            "generation {} (serial {serial}) was never presented",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn torn_writes_and_mismatched_pairs_are_never_published() {
    let rig = Rig::new();
    let first = rig.rotate();
    let up = rig.tcp_upstream().await;
    let s = rig.sidecar(None, Some(&up), "reload_poll_interval: 1h").await;
    let db = s.tcp_addrs["db"];
    let next = rig.ca.client("rotating-app");
    let ca = rig.ca.cert_pem.clone();

    // In-place writes one file at a time (`atomic_writer.py --torn`): between them the cert
    // and the key do not match. Force a reload at every step.
    let steps = [
        ("tls.crt", next.cert_pem.as_bytes()),
        ("tls.key", next.key_pem.as_bytes()),
    ];
    let reloader = s.reloader.clone();
    let rt = tokio::runtime::Handle::current();
    let mut checks = 0;
    tokio::task::block_in_place(|| {
        rig.secret
            .torn_write(&steps, || {
                let report = rt.block_on(reloader.reload_and_report());
                checks += 1;
                if checks == 1 {
                    assert!(report.iter().any(|(_, r)| r.starts_with("key_mismatch")), "{report:?}");
                }
            })
            .unwrap();
    });
    assert_eq!(generation(&s), 2, "the completed write is published");
    assert!(saw_serial(&report(db).await.0, &next.serial));

    // Each file written in two halves (`--torn-partial`): a reader sees truncated PEM.
    let third = rig.ca.client("rotating-app");
    let steps = [
        ("tls.crt", third.cert_pem.as_bytes()),
        ("tls.key", third.key_pem.as_bytes()),
    ];
    let mut reports = Vec::new();
    tokio::task::block_in_place(|| {
        rig.secret
            .torn_write_halves(&steps, || reports.push(rt.block_on(reloader.reload_and_report())))
            .unwrap();
    });
    let flat: Vec<String> = reports.iter().flatten().map(|(_, r)| r.clone()).collect();
    assert!(flat.iter().any(|r| r.starts_with("pem_error")), "{flat:?}");
    assert!(flat.iter().any(|r| r.starts_with("key_mismatch")), "{flat:?}");
    assert_eq!(
        generation(&s),
        3,
        "only complete, matching pairs were published (1 → 2 → 3)"
    );
    assert!(saw_serial(&report(db).await.0, &third.serial));

    let t = s.metrics.render();
    assert!(
        metric(
            &t,
            "mtls_sidecar_certificate_reloads_total",
            &[("result", "key_mismatch")]
        ) >= 2.0
    );
    assert!(metric(&t, "mtls_sidecar_certificate_reloads_total", &[("result", "pem_error")]) >= 1.0);
    // Every TCP connection the upstream accepted completed its handshake: no torn pair
    // was ever presented.
    assert_eq!(
        up.observed.accepted.load(Ordering::SeqCst),
        up.observed.handshakes.load(Ordering::SeqCst)
    );
    let serials = up.observed.serials();
    assert!(
        serials
            .iter()
            .all(|x| *x == first.serial || *x == next.serial || *x == third.serial)
    );
    let _ = ca;
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_rotation_with_an_overlap_bundle_has_no_failure() {
    let rig = Rig::new();
    let old_ca = TestCa::new("server CA 1");
    let new_ca = TestCa::new("server CA 2");
    let client = rig.ca.client("app");
    let publish_ca = |bundle: String| rig.secret.publish(&Rig::files(&client, &bundle)).unwrap();
    publish_ca(old_ca.cert_pem.clone());
    let old_srv = http_upstream::start_https(upstream::server_config(&old_ca.server(NAME), &[], &[&rig.ca])).await;
    let new_srv = http_upstream::start_https(upstream::server_config(&new_ca.server(NAME), &[], &[&rig.ca])).await;
    let yaml = format!(
        "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\nsecrets_dir: {}\ntls_contexts:\n  ctx: {{ secret: certs, sni: {NAME} }}\nmappings:\n  - {{ name: old, prefix: /, host: old.svc, service: \"{}\", tls: ctx }}\n  - {{ name: new, prefix: /, host: new.svc, service: \"{}\", tls: ctx }}\n",
        rig.dir.path().display(),
        old_srv.addr,
        new_srv.addr
    );
    let s = app::start(config(&yaml)).await.unwrap();
    let http = s.http_addr.unwrap();
    let status = |host: &'static str| async move { client::get(http, host, "/").await.unwrap().head.status.as_u16() };
    // Phase 1: the upstream still serves the old CA's certificate.
    assert_eq!(status("old.svc").await, 200);
    // Phase 2: overlap bundle; the upstream may present either.
    publish_ca(format!("{}{}", old_ca.cert_pem, new_ca.cert_pem));
    assert_eventually(STEP, "overlap bundle published", || generation(&s) == 2).await;
    assert_eq!(status("old.svc").await, 200);
    assert_eq!(status("new.svc").await, 200);
    // Phase 3: the upstream moved to the new CA; the old one is dropped.
    publish_ca(new_ca.cert_pem.clone());
    assert_eventually(STEP, "new-only bundle published", || generation(&s) == 3).await;
    assert_eq!(status("new.svc").await, 200);
    let r = client::get(http, "old.svc", "/").await.unwrap();
    assert_eq!(
        r.error_reason().as_deref(),
        Some("unknown_issuer"),
        "the retired CA is no longer trusted"
    );
}

/// An HTTPS upstream that only speaks HTTP/1.1.
async fn http1_only_upstream(rig: &Rig) -> Upstream {
    let mut cfg = (*rig.server_config()).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    http_upstream::start_https(Arc::new(cfg)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_connections_of_an_old_generation_carry_no_new_request() {
    let rig = Rig::new();
    let first = rig.rotate();
    for (proto, up) in [
        ("h2", rig.https_upstream().await),
        ("http/1.1", http1_only_upstream(&rig).await),
    ] {
        let s = rig.sidecar(Some(&up), None, "").await;
        let g0 = generation(&s);
        let (st, serial) = http_serial(&s).await;
        assert_eq!(
            (st, serial.as_str()),
            (200, up.observed.last().unwrap().serial.as_str())
        );
        let (_, again) = http_serial(&s).await;
        assert_eq!(
            up.observed.accepted.load(Ordering::SeqCst),
            1,
            "{proto}: the pooled connection is reused"
        );
        assert_eq!(again, serial);
        let next = rig.rotate();
        assert_eventually(STEP, "next generation", || generation(&s) == g0 + 1).await;
        let (st, serial) = http_serial(&s).await;
        assert_eq!(st, 200);
        assert_eq!(
            serial, next.serial,
            "{proto}: the request after the rotation used the new certificate"
        );
        assert_eq!(
            up.observed.accepted.load(Ordering::SeqCst),
            2,
            "{proto}: on a new connection"
        );
        assert_eq!(up.observed.last().unwrap().alpn.as_deref(), Some(proto));
        let _ = &first;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_connection_is_not_reused_after_its_certificate_expired() {
    let rig = Rig::new();
    let now = SystemTime::now();
    let expires = now + Duration::from_secs(3);
    let short = rig
        .ca
        .issue(&LeafSpec::client("short-lived").valid(now - Duration::from_secs(60), expires));
    rig.secret.publish(&Rig::files(&short, &rig.ca.cert_pem)).unwrap();
    let up = rig.https_upstream().await;
    let s = rig.sidecar(Some(&up), None, "reload_poll_interval: 1h").await;
    let (st, serial) = http_serial(&s).await;
    assert_eq!((st, serial.as_str()), (200, short.serial.as_str()));
    // Wait (bounded) for the certificate's notAfter to pass; the connection sits idle in the pool.
    assert_eventually(Duration::from_secs(10), "notAfter passed", || {
        SystemTime::now() > expires + Duration::from_secs(1)
    })
    .await;
    let r = client::get(s.http_addr.unwrap(), NAME, "/after-expiry").await.unwrap();
    assert_eq!(
        up.observed.accepted.load(Ordering::SeqCst),
        2,
        "the expired connection was not reused"
    );
    assert_eq!(
        r.head.status, 502,
        "a new handshake presents the expired certificate and is refused"
    );
    assert_eq!(r.error_reason().as_deref(), Some("peer_rejected_client_cert"));
}

#[tokio::test(flavor = "multi_thread")]
async fn starting_without_credentials_is_not_ready_until_they_appear() {
    let rig = Rig::new();
    let up = rig.https_upstream().await;
    let s = rig.sidecar(Some(&up), None, "").await;
    assert!(s.readiness.check().is_err());
    let r = client::get(s.http_addr.unwrap(), NAME, "/").await.unwrap();
    assert_eq!(r.head.status, 503);
    assert_eq!(r.error_reason().as_deref(), Some("no_client_identity"));
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 0);
    let leaf = rig.rotate();
    assert_eventually(STEP, "ready once the Secret appears", || s.readiness.check().is_ok()).await;
    assert_eq!(http_serial(&s).await, (200, leaf.serial));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_optional_secret_keeps_the_last_good_generation() {
    let rig = Rig::new();
    let leaf = rig.rotate();
    let up = rig.https_upstream().await;
    let s = rig.sidecar(Some(&up), None, "").await;
    rig.secret.delete_all_keys().unwrap();
    assert_eventually(STEP, "the disappearance is reported", || {
        metric(
            &s.metrics.render(),
            "mtls_sidecar_identity_material_present",
            &[("tls_context", "ctx")],
        ) == 0.0
    })
    .await;
    let slot = s.store.get("ctx").unwrap();
    assert_eq!(slot.last_error().unwrap().kind, "not_found");
    assert_eq!(generation(&s), 1);
    assert_eq!(
        http_serial(&s).await,
        (200, leaf.serial),
        "still serving the last good generation"
    );
    assert!(s.readiness.check().is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn poll_only_mode_picks_up_a_change_within_one_interval() {
    let rig = Rig::new();
    rig.rotate();
    let up = rig.tcp_upstream().await;
    let s = rig
        .sidecar(None, Some(&up), "reload_watch: poll\nreload_poll_interval: 1s")
        .await;
    let t = s.metrics.render();
    assert_eq!(
        metric(
            &t,
            "mtls_sidecar_certificate_watch_mode",
            &[("tls_context", "ctx"), ("mode", "poll")]
        ),
        1.0
    );
    let next = rig.rotate();
    let published = Instant::now();
    assert_eventually(Duration::from_secs(3), "picked up by polling", || generation(&s) == 2).await;
    assert!(
        published.elapsed() <= Duration::from_millis(1500),
        "within one interval (+ margin)"
    );
    assert!(saw_serial(&report(s.tcp_addrs["db"]).await.0, &next.serial));
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_files_name_the_path_mode_and_our_ids() {
    let rig = Rig::new();
    let leaf = rig.ca.client("app");
    rig.secret
        .publish_with_mode(&Rig::files(&leaf, &rig.ca.cert_pem), 0o400)
        .unwrap();
    let yaml = format!(
        "admin: null\nsecrets_dir: {}\ntls_contexts:\n  ctx: {{ secret: certs }}\n",
        rig.dir.path().display()
    );
    let cfg = rig.dir.path().join("config.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let root = mtls_sidecar::sys::euid() == 0;
    let bin = env!("CARGO_BIN_EXE_mtls-sidecar");
    let out = if root {
        // Root reads anything; run `check` as the sidecar's usual uid, like a pod without fsGroup.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(rig.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65532",
                "--regid=65532",
                "--clear-groups",
                bin,
                "check",
                "--config",
            ])
            .arg(&cfg)
            .output()
            .expect("setpriv (util-linux) is needed to test permissions as root")
    } else {
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            use std::os::unix::fs::PermissionsExt;
            let p = rig.secret.path().join(f);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
        }
        std::process::Command::new(bin)
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("permission_denied"), "{stdout}");
    assert!(stdout.contains("certs/tls.crt"), "names the path: {stdout}");
    assert!(
        stdout.contains(if root {
            "file mode 0400, owner uid 0"
        } else {
            "file mode 0000"
        }),
        "{stdout}"
    );
    assert!(
        stdout.contains(if root { "runs as uid 65532" } else { "runs as uid" }),
        "{stdout}"
    );
    assert!(stdout.contains("fsGroup and defaultMode"), "{stdout}");
}
