//! Soak: mixed HTTP/1.1, h2c and TCP traffic with certificate rotations every 2 s, bounded
//! in time; memory (RSS) and open descriptors must stay flat. Ignored by default:
//! `SOAK_SECS=180 cargo test --release --test soak -- --ignored --nocapture` (CI runs a short pass).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mtls_sidecar::app;
use mtls_sidecar::testkit::client::Conn;
use mtls_sidecar::testkit::http_upstream;
use mtls_sidecar::testkit::pki::TestCa;
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{self, Behavior};
use support::{config, report};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long-running; run with --ignored (CI runs it with a short SOAK_SECS)"]
async fn mixed_traffic_with_rotations_keeps_memory_and_fds_flat() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("soak CA");
    let secret = SecretDir::create(dir.path().join("certs")).unwrap();
    let rotate = || {
        let leaf = ca.client("soak");
        secret
            .publish(&[
                ("tls.crt", leaf.cert_pem.as_bytes()),
                ("tls.key", leaf.key_pem.as_bytes()),
                ("ca.crt", ca.cert_pem.as_bytes()),
            ])
            .unwrap();
    };
    rotate();
    let server_cfg = upstream::server_config(&ca.server("soak.svc"), &[], &[&ca]);
    let https = http_upstream::start_https(server_cfg.clone()).await;
    let tcp = upstream::start_tcp(server_cfg, Behavior::ReportAndEcho).await;
    let yaml = format!(
        "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\nsecrets_dir: {}\nrotation_drain_timeout: 2s\ntls_contexts:\n  ctx: {{ secret: certs, sni: soak.svc }}\nmappings:\n  - {{ name: web, host: soak.svc, prefix: /, service: \"{}\", tls: ctx }}\ntcp_mappings:\n  - {{ name: db, port: 0, service: \"{}\", tls: ctx }}\n",
        dir.path().display(),
        https.addr,
        tcp.addr
    );
    let s = Arc::new(app::start(config(&yaml)).await.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for i in 0..6 {
        let (s, stop, ok, failed) = (s.clone(), stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut conn: Option<Conn> = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let good = match i % 3 {
                    0 | 1 => {
                        // Reconnect now and then, so connections churn as well.
                        if conn.is_none() || n % 50 == 0 {
                            conn = Conn::open(s.http_addr.unwrap(), i % 3 == 1).await.ok();
                        }
                        let path = if n % 10 == 0 { "/big/200000" } else { "/soak" };
                        let req = http::Request::get(format!("http://soak.svc{path}"))
                            .header("host", "soak.svc")
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                            .unwrap();
                        match conn.as_mut() {
                            Some(c) => c.send(req).await.is_ok_and(|r| r.head.status == 200),
                            None => false,
                        }
                    }
                    _ => report(s.tcp_addrs["db"]).await.0.contains("serial="),
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
        }));
    }
    let started = Instant::now();
    let total = Duration::from_secs(secs);
    let warm = total / 5;
    let mut baseline = None;
    let mut rotations = 0;
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(2)).await;
        rotate();
        rotations += 1;
        if baseline.is_none() && started.elapsed() >= warm {
            baseline = Some((rss_kib(), fds()));
        }
    }
    let end = (rss_kib(), fds());
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (base_rss, base_fds) = baseline.unwrap_or(end);
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "soak {secs}s: {ok} ok, {failed} failed, {rotations} rotations; RSS {base_rss} → {} KiB; fds {base_fds} → {}",
        end.0, end.1
    );
    assert!(ok > 100, "traffic flowed");
    assert_eq!(failed, 0, "no request failed across rotations");
    assert!(
        end.0 < base_rss + 16 * 1024,
        "RSS grew from {base_rss} to {} KiB",
        end.0
    );
    assert!(end.1 <= base_fds + 16, "descriptors grew from {base_fds} to {}", end.1);
    let generation = s.store.get("ctx").unwrap().current().unwrap().number;
    assert!(
        generation as usize > rotations / 2,
        "rotations were published ({generation})"
    );
}
