//! The real binary as a process: JSON access logs, SIGTERM drain (SPEC §8), second signal,
//! SIGHUP reload, and surviving file-descriptor exhaustion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mtls_sidecar::testkit::client;
use mtls_sidecar::testkit::http_upstream;
use mtls_sidecar::testkit::pki::TestCa;
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{Upstream, server_config};

const NAME: &str = "orders.test.svc";

struct World {
    dir: tempfile::TempDir,
    ca: TestCa,
    secret: SecretDir,
    upstream: Upstream,
}

impl World {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("lifecycle CA");
        let secret = SecretDir::create(dir.path().join("certs")).unwrap();
        let w = World {
            upstream: http_upstream::start_https(server_config(&ca.server(NAME), &[], &[&ca])).await,
            dir,
            ca,
            secret,
        };
        w.rotate();
        w
    }

    fn rotate(&self) -> String {
        let leaf = self.ca.client("lifecycle-app");
        self.secret
            .publish(&[
                ("tls.crt", leaf.cert_pem.as_bytes()),
                ("tls.key", leaf.key_pem.as_bytes()),
                ("ca.crt", self.ca.cert_pem.as_bytes()),
            ])
            .unwrap();
        leaf.serial
    }

    fn config(&self, drain_timeout: &str) -> std::path::PathBuf {
        let yaml = format!(
            r#"
listeners: {{ http: 127.0.0.1:0 }}
admin: 127.0.0.1:0
secrets_dir: {}
drain_timeout: {drain_timeout}
log: {{ level: info, format: json }}
tls_contexts:
  ctx: {{ secret: certs, sni: {NAME} }}
mappings:
  - {{ name: orders, prefix: /, host: {NAME}, service: "{}", tls: ctx, timeout_ms: 20000 }}
"#,
            self.dir.path().display(),
            self.upstream.addr
        );
        let path = self.dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    http: SocketAddr,
    admin: SocketAddr,
}

fn json_lines(lines: &Arc<Mutex<Vec<String>>>) -> Vec<serde_json::Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn addr_of(lines: &Arc<Mutex<Vec<String>>>, message_prefix: &str) -> Option<SocketAddr> {
    json_lines(lines)
        .iter()
        .find(|j| j["message"].as_str().is_some_and(|m| m.starts_with(message_prefix)))
        .and_then(|j| j["addr"].as_str()?.parse().ok())
}

impl Proc {
    /// Starts `mtls-sidecar run`; `shell_prefix` wraps it (e.g. `ulimit -n 64;`).
    fn start(config: &std::path::Path, shell_prefix: &str) -> Self {
        let bin = env!("CARGO_BIN_EXE_mtls-sidecar");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{shell_prefix} exec '{bin}' run --config '{}'",
                config.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let (Some(http), Some(admin)) = (
                addr_of(&lines, "HTTP listener ready"),
                addr_of(&lines, "admin listener ready"),
            ) {
                return Proc {
                    child,
                    lines,
                    http,
                    admin,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the sidecar exited at start ({status}):\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no listener lines:\n{}",
                lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_access_log_has_one_parseable_line_per_request() {
    let w = World::new().await;
    let mut p = Proc::start(&w.config("2s"), "");
    for path in ["/a", "/b?secret=1"] {
        let r = client::get(p.http, NAME, path).await.unwrap();
        assert_eq!(r.head.status, 200);
    }
    let r = client::get(p.http, "unknown.test.svc", "/").await.unwrap();
    assert_eq!(r.head.status, 403);
    let deadline = Instant::now() + Duration::from_secs(10);
    let access = loop {
        let access: Vec<_> = json_lines(&p.lines)
            .into_iter()
            .filter(|j| j["target"] == "access")
            .collect();
        if access.len() >= 2 || Instant::now() > deadline {
            break access;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(access.len(), 2, "one access event per proxied request: {access:#?}");
    for (j, path) in access.iter().zip(["/a", "/b"]) {
        assert_eq!(j["listener"], "http");
        assert_eq!(j["mapping"], "orders");
        assert_eq!(j["tls_context"], "ctx");
        assert_eq!(j["upstream"], w.upstream.addr.to_string());
        assert_eq!(j["status"], 200);
        assert_eq!(j["path"], path, "paths are logged without their query string");
        assert!(j["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(j["bytes_from_upstream"].as_u64().unwrap() > 0);
        assert_eq!(j["bytes_to_upstream"], 0);
        assert_eq!(j["tls.version"], "TLSv1.3");
        assert_eq!(j["tls.alpn"], "h2");
        assert!(j["tls.resumed"].is_boolean());
        assert_eq!(j["upstream.subject"], format!("CN={NAME}"));
        assert!(j["upstream.serial"].as_str().unwrap().contains(':'));
    }
    let all = p.lines.lock().unwrap().join("\n");
    assert!(
        !all.contains("PRIVATE KEY") && !all.contains("secret=1"),
        "no key material and no query strings in logs"
    );
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(15)).await.is_some_and(|s| s.success()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_serves_late_requests_and_exits_zero() {
    let w = World::new().await;
    let mut p = Proc::start(&w.config("10s"), "");
    let http = p.http;
    let in_flight = tokio::spawn(async move { client::get(http, NAME, "/slow/1500").await });
    // Wait until the slow request reached the upstream before signalling.
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.upstream.observed.accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = client::get(p.admin, "admin", "/readyz").await.unwrap();
    assert_eq!(ready.head.status, 503, "not ready while draining");
    let late = client::get(p.http, NAME, "/late").await.unwrap();
    assert_eq!(late.head.status, 200, "a request 0.5 s after SIGTERM is still served");
    assert_eq!(
        late.head.headers.get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!(r.head.status, 200, "the in-flight request completed");
    let status = p.wait_exit(Duration::from_secs(8)).await.expect("exits once idle");
    assert!(status.success(), "exit code 0, got {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "exited soon after the last connection, not at the deadline"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_deadline_closes_long_connections_and_second_signal_exits_at_once() {
    let w = World::new().await;
    let mut p = Proc::start(&w.config("2s"), "");
    let http = p.http;
    let stuck = tokio::spawn(async move { client::get(http, NAME, "/slow/15000").await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.upstream.observed.accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    p.signal("TERM");
    let status = p
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits at the drain deadline");
    assert!(status.success());
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "kept serving for drain_timeout"
    );
    assert!(
        stuck.await.unwrap().is_err(),
        "the connection outliving drain_timeout was closed"
    );

    let mut p = Proc::start(&w.config("30s"), "");
    let http = p.http;
    let _held = tokio::spawn(async move { client::get(http, NAME, "/slow/15000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    p.signal("INT");
    assert!(
        p.wait_exit(Duration::from_secs(3)).await.is_some(),
        "second signal exits at once"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads() {
    let w = World::new().await;
    let p = Proc::start(&w.config("1s"), "");
    let serial = w.rotate();
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = client::get(p.http, NAME, "/who").await.unwrap().json();
        if j["client_serial"] == serial.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "the rotated certificate was never used");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fd_exhaustion_is_survived() {
    let w = World::new().await;
    // Soft and hard limit both 64, so the sidecar cannot raise it.
    let mut p = Proc::start(&w.config("1s"), "ulimit -n 64 &&");
    let mut flood = Vec::new();
    for _ in 0..150 {
        if let Ok(s) = tokio::net::TcpStream::connect(p.http).await {
            flood.push(s);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.lines.lock().unwrap().iter().any(|l| l.contains("accept failed")) {
        assert!(
            Instant::now() < deadline,
            "no accept error logged with 150 connections and 64 fds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        p.child.try_wait().is_ok_and(|s| s.is_none()),
        "still running under fd exhaustion"
    );
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), client::get(p.http, NAME, "/after")).await
            && r.head.status == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "never served again after the flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accept_errors = p
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        accept_errors < 40,
        "accept errors are paced, not spun on: {accept_errors} lines"
    );
}
