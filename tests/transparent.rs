//! Transparent mode end to end, in network namespaces this test creates and always deletes:
//! a "pod" (app + sidecar, with the generated iptables rules applied) and a "service" host,
//! joined by a veth pair with addresses the test assigns. Traffic goes only to those
//! addresses. Needs root: skips with a reason otherwise, and fails instead when CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mtls_sidecar::testkit::http_upstream;
use mtls_sidecar::testkit::pki::{LeafSpec, TestCa};
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{self, Behavior, Upstream};

const SIDECAR_UID: &str = "65532";

fn can_run() -> bool {
    if mtls_sidecar::sys::euid() == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "transparent-mode tests need root (network namespaces, iptables) and CI runs as root"
    );
    eprintln!("SKIPPED: transparent-mode tests need root for network namespaces and iptables");
    false
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by a veth pair; deleted on drop.
struct Net {
    pod: String,
    svc: String,
    pod_ip: String,
    svc_ip: String,
    svc_ip6: Option<String>,
}

impl Net {
    fn new(tag: &str, n: u8) -> Self {
        let id = format!("{}{tag}", std::process::id() % 10000);
        let (pod, svc) = (format!("mtls-pod-{id}"), format!("mtls-svc-{id}"));
        let (vp, vs) = (format!("mp{id}"), format!("ms{id}"));
        let _ = Command::new("ip").args(["netns", "del", &pod]).output();
        let _ = Command::new("ip").args(["netns", "del", &svc]).output();
        run(&["ip", "netns", "add", &pod]);
        let mut net = Net {
            pod: pod.clone(),
            svc: svc.clone(),
            pod_ip: format!("10.201.{n}.1"),
            svc_ip: format!("10.201.{n}.2"),
            svc_ip6: None,
        };
        run(&["ip", "netns", "add", &svc]);
        run(&[
            "ip", "link", "add", &vp, "netns", &pod, "type", "veth", "peer", "name", &vs, "netns", &svc,
        ]);
        for (ns, dev, ip) in [(&pod, &vp, &net.pod_ip), (&svc, &vs, &net.svc_ip)] {
            run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // IPv6 is optional: some kernels or sandboxes refuse it inside a namespace.
        let v6 = [
            (&pod, &vp, format!("fd00:201:{n}::1")),
            (&svc, &vs, format!("fd00:201:{n}::2")),
        ];
        let v6_ok = v6.iter().all(|(ns, dev, ip)| {
            Command::new("ip")
                .args(["-n", ns, "addr", "add", &format!("{ip}/64"), "dev", dev, "nodad"])
                .status()
                .is_ok_and(|s| s.success())
        });
        net.svc_ip6 = v6_ok.then(|| v6[1].2.clone());
        net
    }

    fn path(&self, ns: &str) -> PathBuf {
        Path::new("/var/run/netns").join(ns)
    }

    /// A std listener inside the service namespace, usable from this process.
    fn svc_listener(&self, ip: &str, port: u16) -> tokio::net::TcpListener {
        let addr = SocketAddr::new(ip.parse().unwrap(), port);
        let l = mtls_sidecar::sys::bind_in_netns(&self.path(&self.svc), addr).unwrap();
        l.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(l).unwrap()
    }

    fn in_pod(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.pod]).args(args);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.pod]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.svc]).output();
    }
}

/// The sidecar binary running in the pod namespace as the sidecar uid.
struct Sidecar {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sidecar {
    fn start(net: &Net, config: &Path) -> Self {
        let bin = env!("CARGO_BIN_EXE_mtls-sidecar");
        let mut child = net
            .in_pod(&[
                "setpriv",
                &format!("--reuid={SIDECAR_UID}"),
                &format!("--regid={SIDECAR_UID}"),
                "--clear-groups",
                bin,
                "run",
                "--config",
            ])
            .arg(config)
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
        while !lines.lock().unwrap().iter().any(|l| l.contains("mtls-sidecar started")) {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("sidecar exited ({s}):\n{}", lines.lock().unwrap().join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "sidecar did not start:\n{}",
                lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sidecar { child, lines }
    }

    fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects from the pod namespace as root (the app), optionally sends a line, and prints
/// the seconds until the first line came back and that line ("closed" on EOF).
const CLIENT: &str = r#"
import socket, sys, time
host, port, send = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=15)
t = time.time()
if send:
    s.sendall(send.encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    try:
        chunk = s.recv(4096)
    except ConnectionResetError:
        chunk = b""
    if not chunk:
        break
    buf += chunk
print("%.3f %s" % (time.time() - t, buf.decode().strip() or "closed"))
"#;

async fn app_tcp(net: &Net, host: &str, port: u16, send: &str) -> (f64, String) {
    let out = net
        .in_pod(&["python3", "-c", CLIENT, host, &port.to_string(), send])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "client failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (secs, line) = text.split_once(' ').unwrap();
    (secs.parse().unwrap(), line.to_owned())
}

struct Pki {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ca: TestCa,
    serial: String,
}

fn pki(net: &Net) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    // The sidecar runs as uid 65532: it must be able to traverse and read this tree.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = TestCa::new("transparent CA");
    let client = ca.client("pod-app");
    let secret = SecretDir::create(dir.path().join("certs")).unwrap();
    secret
        .publish(&[
            ("tls.crt", client.cert_pem.as_bytes()),
            ("tls.key", client.key_pem.as_bytes()),
            ("ca.crt", ca.cert_pem.as_bytes()),
        ])
        .unwrap();
    let _ = net;
    Pki {
        root: dir.path().to_owned(),
        _dir: dir,
        ca,
        serial: client.serial,
    }
}

fn server_leaf(ca: &TestCa, net: &Net) -> mtls_sidecar::testkit::pki::Leaf {
    let mut spec = LeafSpec::server("orders.svc")
        .dns("db.svc")
        .ip(net.svc_ip.parse::<IpAddr>().unwrap());
    if let Some(v6) = &net.svc_ip6 {
        spec = spec.ip(v6.parse().unwrap());
    }
    ca.issue(&spec)
}

fn iptables_counter_for_uid(net: &Net, v6: bool) -> u64 {
    let bin = if v6 { "ip6tables" } else { "iptables" };
    let out = run(&[
        "ip",
        "netns",
        "exec",
        &net.pod,
        bin,
        "-t",
        "nat",
        "-L",
        "MTLS_SIDECAR_OUTPUT",
        "-v",
        "-n",
        "-x",
    ]);
    out.lines()
        .find(|l| l.contains("owner UID match") && l.contains(SIDECAR_UID))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn redirected_http_and_tcp_reach_the_service_over_mtls_and_nothing_else_leaves() {
    if !can_run() {
        return;
    }
    let net = Net::new("a", 11);
    let pki = pki(&net);
    let leaf = server_leaf(&pki.ca, &net);
    let cfg = upstream::server_config(&leaf, &[], &[&pki.ca]);
    // The service host: an HTTPS upstream (reached through an HTTP mapping), a
    // server-speaks-first TCP upstream, and a port no rule allows.
    let https: Upstream = http_upstream::serve_https_on(net.svc_listener(&net.svc_ip, 8443), cfg.clone());
    let db: Upstream = upstream::serve_tcp_on(
        net.svc_listener(&net.svc_ip, 5432),
        cfg.clone(),
        Behavior::ReportAndEcho,
    );
    let forbidden: Upstream = upstream::serve_tcp_on(net.svc_listener(&net.svc_ip, 9999), cfg, Behavior::ReportAndEcho);
    let ip = &net.svc_ip;
    let config = pki.root.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
listeners: {{ http: null, transparent: 127.0.0.1:15006 }}
admin: 127.0.0.1:15090
secrets_dir: {root}
log: {{ level: info, format: json }}
protocol_detect_timeout: 3s
tls_contexts:
  ctx: {{ secret: certs }}
  web: {{ secret: certs, sni: orders.svc }}
mappings:
  - {{ name: orders, host: orders.svc, prefix: /, service: "{ip}:8443", tls: web }}
transparent_rules:
  - {{ name: web, destination: {ip}/32, ports: [8080], protocol: auto, tls: ctx }}
  - {{ name: db, destination: "{ip}", ports: [5432], protocol: tcp, tls: ctx, sni: db.svc }}
  - {{ name: db-auto, destination: "{ip}", ports: [5433], protocol: auto, tls: ctx, sni: db.svc }}
"#,
            root = pki.root.display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_mtls-sidecar");
    run(&[
        "ip",
        "netns",
        "exec",
        &net.pod,
        bin,
        "iptables",
        "--apply",
        "--port",
        "15006",
        "--uid",
        SIDECAR_UID,
    ]);
    // Applying twice (an init container re-run on pod restart) leaves one jump.
    run(&[
        "ip",
        "netns",
        "exec",
        &net.pod,
        bin,
        "iptables",
        "--apply",
        "--port",
        "15006",
        "--uid",
        SIDECAR_UID,
    ]);
    let rules = run(&["ip", "netns", "exec", &net.pod, "iptables", "-t", "nat", "-S", "OUTPUT"]);
    assert_eq!(rules.matches("MTLS_SIDECAR_OUTPUT").count(), 1, "{rules}");
    let sidecar = Sidecar::start(&net, &config);

    // 1. Plain HTTP to the service address → detected → routed by Host → mTLS.
    let out = net
        .in_pod(&[
            "curl",
            "-sS",
            "-m",
            "10",
            "-H",
            "Host: orders.svc",
            &format!("http://{ip}:8080/hello"),
        ])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {body}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sidecar.logs()
    );
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        j["client_serial"],
        pki.serial.as_str(),
        "the service saw the pod's client certificate"
    );
    assert_eq!(j["path"], "/hello");
    assert_eq!(https.observed.handshakes.load(Ordering::SeqCst), 1);

    // 2. Opaque, server-speaks-first TCP on a `protocol: tcp` port: the banner arrives
    //    without waiting for the 3 s detection timeout.
    let (secs, line) = app_tcp(&net, ip, 5432, "").await;
    assert!(
        line.contains(&format!("serial={}", pki.serial)),
        "{line}\n{}",
        sidecar.logs()
    );
    assert!(
        secs < 2.0,
        "a protocol: tcp port must not wait for detection ({secs} s)"
    );
    // The same on an `auto` port costs the detection timeout (and still works).
    let (secs, line) = app_tcp(&net, ip, 5433, "").await;
    let _ = line;
    assert!(secs >= 2.5, "auto detection waits for the app's first bytes ({secs} s)");
    // A client-speaks-first opaque protocol is relayed at once on an auto port.
    let db_accepts = db.observed.accepted.load(Ordering::SeqCst);
    let (_, line) = app_tcp(&net, ip, 5432, "ping").await;
    assert!(line.contains("serial="), "{line}");
    assert_eq!(db.observed.accepted.load(Ordering::SeqCst), db_accepts + 1);

    // 3. A destination no rule matches is refused and never reaches the service.
    let (_, line) = app_tcp(&net, ip, 9999, "hello").await;
    assert_eq!(line, "closed");
    assert_eq!(
        forbidden.observed.accepted.load(Ordering::SeqCst),
        0,
        "nothing reached the unmatched port"
    );
    assert!(
        sidecar.logs().contains("no transparent rule matches"),
        "{}",
        sidecar.logs()
    );

    // 4. No loop: the sidecar's own upstream connections went through the uid exclusion,
    //    not back into the sidecar.
    assert!(
        iptables_counter_for_uid(&net, false) >= 3,
        "sidecar connections were exempted by uid"
    );
    let metrics = net
        .in_pod(&["curl", "-sS", "-m", "5", "http://127.0.0.1:15090/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(r#"mtls_sidecar_denied_total{listener="transparent",reason="no_route"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"reason="loop"} 1"#));
    assert!(metrics.contains(r#"mtls_sidecar_tcp_connections_total{listener="db",result="ok"}"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_redirect_works_when_the_kernel_allows_it() {
    if !can_run() {
        return;
    }
    let net = Net::new("b", 12);
    let Some(ip6) = net.svc_ip6.clone() else {
        eprintln!("SKIPPED: IPv6 addresses cannot be assigned in this network namespace");
        return;
    };
    let nat6 = Command::new("ip")
        .args(["netns", "exec", &net.pod, "ip6tables", "-t", "nat", "-L", "-n"])
        .output()
        .unwrap();
    if !nat6.status.success() {
        eprintln!(
            "SKIPPED: ip6tables nat is not available here: {}",
            String::from_utf8_lossy(&nat6.stderr)
        );
        return;
    }
    let pki = pki(&net);
    let cfg = upstream::server_config(&server_leaf(&pki.ca, &net), &[], &[&pki.ca]);
    let db = upstream::serve_tcp_on(net.svc_listener(&ip6, 5432), cfg, Behavior::ReportAndEcho);
    let config = pki.root.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners: {{ http: null, transparent: \"[::1]:15006\" }}\nadmin: null\nsecrets_dir: {}\nlog: {{ level: info, format: json }}\ntls_contexts:\n  ctx: {{ secret: certs }}\ntransparent_rules:\n  - {{ name: db6, destination: \"fd00:201:12::/64\", ports: [5432], protocol: tcp, tls: ctx }}\n",
            pki.root.display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_mtls-sidecar");
    run(&[
        "ip",
        "netns",
        "exec",
        &net.pod,
        bin,
        "iptables",
        "--apply",
        "--ipv6",
        "--port",
        "15006",
        "--uid",
        SIDECAR_UID,
    ]);
    let sidecar = Sidecar::start(&net, &config);
    let (_, line) = app_tcp(&net, &ip6, 5432, "").await;
    assert!(
        line.contains(&format!("serial={}", pki.serial)),
        "{line}\n{}",
        sidecar.logs()
    );
    assert_eq!(db.observed.handshakes.load(Ordering::SeqCst), 1);
    assert!(iptables_counter_for_uid(&net, true) >= 1);
}
