//! The rows of shared/BAD_INPUTS.md that no other test file covers, one named test per row:
//! malformed and smuggling-shaped requests, oversized and slow headers, the connection cap,
//! metadata destinations, upstream black holes and not-yet-valid certificates, DSA keys,
//! subPath mounts and the inotify fallback. Each asserts the status or close, the reason, the
//! metric, and that no upstream connection was opened where none was asked for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mtls_sidecar::app::{self, Sidecar};
use mtls_sidecar::testkit::client::Conn;
use mtls_sidecar::testkit::http_upstream;
use mtls_sidecar::testkit::pki::{LeafSpec, TestCa};
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{Upstream, server_config};
use support::{STEP, assert_eventually, config, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NAME: &str = "up.svc";

struct Fixture {
    _dir: tempfile::TempDir,
    up: Upstream,
    sidecar: Sidecar,
}

async fn fixture(limits: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("bad inputs CA");
    let client = ca.client("app");
    SecretDir::create(dir.path().join("certs"))
        .unwrap()
        .publish(&[
            ("tls.crt", client.cert_pem.as_bytes()),
            ("tls.key", client.key_pem.as_bytes()),
            ("ca.crt", ca.cert_pem.as_bytes()),
        ])
        .unwrap();
    let up = http_upstream::start_https(server_config(&ca.server(NAME), &[], &[&ca])).await;
    let yaml = format!(
        "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\nsecrets_dir: {}\nlimits: {{ {limits} }}\ntls_contexts:\n  ctx: {{ secret: certs, sni: {NAME} }}\nmappings:\n  - {{ name: m, host: {NAME}, prefix: /, service: \"{}\", tls: ctx }}\n",
        dir.path().display(),
        up.addr
    );
    let sidecar = app::start(config(&yaml)).await.unwrap();
    Fixture { _dir: dir, up, sidecar }
}

impl Fixture {
    fn http(&self) -> SocketAddr {
        self.sidecar.http_addr.unwrap()
    }

    fn denied(&self, reason: &str) -> f64 {
        metric(
            &self.sidecar.metrics.render(),
            "mtls_sidecar_denied_total",
            &[("listener", "http"), ("reason", reason)],
        )
    }

    fn accepts(&self) -> usize {
        self.up.observed.accepted.load(Ordering::SeqCst)
    }
}

/// Sends raw bytes and returns what came back until the sidecar closed (bounded).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .expect("the sidecar closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

fn status(response: &str) -> &str {
    response.split("\r\n").next().unwrap_or_default()
}

async fn refused_400(cases: &[(&str, &[u8])], reason_header: bool) {
    let f = fixture("").await;
    for (name, bytes) in cases {
        let r = raw(f.http(), bytes).await;
        assert!(status(&r).starts_with("HTTP/1.1 400"), "{name}: {r:?}");
        if reason_header {
            assert!(r.contains("x-mtls-sidecar-error: malformed_request"), "{name}: {r}");
        }
    }
    assert_eq!(f.accepts(), 0, "no malformed request opened an upstream connection");
    assert_eq!(f.denied("malformed_request"), cases.len() as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a1_malformed_requests_get_400_and_no_upstream_connect() {
    refused_400(
        &[
            ("bare LF", b"GET / HTTP/1.1\nHost: up.svc\n\n"),
            ("NUL in a value", b"GET / HTTP/1.1\r\nHost: up.svc\r\nX: a\x00b\r\n\r\n"),
            ("obs-fold", b"GET / HTTP/1.1\r\nHost: up.svc\r\nX: a\r\n b\r\n\r\n"),
            (
                "bad token in a name",
                b"GET / HTTP/1.1\r\nHost: up.svc\r\nX(y): z\r\n\r\n",
            ),
            ("invalid method", b"G@T / HTTP/1.1\r\nHost: up.svc\r\n\r\n"),
            (
                "two Host headers",
                b"GET / HTTP/1.1\r\nHost: up.svc\r\nHost: evil.svc\r\n\r\n",
            ),
        ],
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a2_smuggling_shapes_are_refused_never_forwarded() {
    refused_400(
        &[
            (
                "CL then TE",
                b"POST / HTTP/1.1\r\nHost: up.svc\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "TE then CL",
                b"POST / HTTP/1.1\r\nHost: up.svc\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            ),
            (
                "duplicate CL",
                b"POST / HTTP/1.1\r\nHost: up.svc\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            ),
            (
                "TE chunked, gzip",
                b"POST / HTTP/1.1\r\nHost: up.svc\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            ),
            (
                "space before colon",
                b"POST / HTTP/1.1\r\nHost: up.svc\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            ),
        ],
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a3_oversized_headers_get_431() {
    let f = fixture("max_header_bytes: 8192, max_headers: 20").await;
    let big = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert!(status(&raw(f.http(), big.as_bytes()).await).starts_with("HTTP/1.1 431"));
    let mut many = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert!(status(&raw(f.http(), many.as_bytes()).await).starts_with("HTTP/1.1 431"));
    assert_eq!(f.accepts(), 0);
    assert_eq!(f.denied("header_too_large"), 2.0);
}

/// A streamed body of `left` chunks of `size` bytes, with no declared length (h2c: no
/// content-length).
struct Unsized {
    left: usize,
    size: usize,
}

impl http_body::Body for Unsized {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        let chunk = Bytes::from(vec![b'x'; self.size]);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
    }
}

fn unsized_body(left: usize, size: usize) -> Unsized {
    Unsized { left, size }
}

#[tokio::test(flavor = "multi_thread")]
async fn a4_bodies_over_max_request_body_get_413() {
    let f = fixture("max_request_body: 1024").await;
    // Declared too large: refused before any upstream connection.
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    s.write_all(format!("POST /x HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 2048\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (text, _) = read_until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("x-mtls-sidecar-error: body_too_large"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert_eq!(
        f.accepts(),
        0,
        "no upstream connection for a body that is refused anyway"
    );
    // At the limit: forwarded whole.
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    let body = "y".repeat(1024);
    s.write_all(format!("POST /x HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 1024\r\n\r\n{body}").as_bytes())
        .await
        .unwrap();
    let text = read_response(&mut s).await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("\"body_len\":1024"),
        "{text}"
    );
    // Chunked, no declared length: counted while streaming, then 413 (the upstream waits for
    // the whole body before answering, so no response had started).
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    let chunk = format!("400\r\n{}\r\n", "z".repeat(1024));
    s.write_all(
        format!("POST /x HTTP/1.1\r\nHost: {NAME}\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}").as_bytes(),
    )
    .await
    .unwrap();
    let (text, _) = read_until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    // h2c without content-length: the same.
    let tcp = TcpStream::connect(f.http()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut post = async |chunks| {
        let req = Request::post(format!("http://{NAME}/x"))
            .body(unsized_body(chunks, 512))
            .unwrap();
        tokio::time::timeout(STEP, sender.send_request(req))
            .await
            .unwrap()
            .unwrap()
    };
    let resp = post(4).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["x-mtls-sidecar-error"], "body_too_large");
    let resp = post(2).await;
    assert_eq!(resp.status(), 200, "a body at the limit passes on the same connection");
    assert_eq!(f.denied("body_too_large"), 3.0);
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns its text.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let within = tokio::time::timeout(STEP, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    return;
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a whole response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    });
    within.await.expect("a response in time");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Reads until the sidecar closes the connection; returns what came and when it closed.
async fn read_until_closed(s: &mut TcpStream) -> (String, Instant) {
    let mut out = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .expect("the sidecar closes the connection")
        .ok();
    (String::from_utf8_lossy(&out).into_owned(), Instant::now())
}

#[tokio::test(flavor = "multi_thread")]
async fn a5_slow_headers_and_idle_keep_alive_are_closed_at_the_deadline() {
    let f = fixture("header_read_timeout: 1s, keepalive_timeout: 2s").await;
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: up").await.unwrap();
    let t = Instant::now();
    let (text, closed) = read_until_closed(&mut s).await;
    let took = closed - t;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("x-mtls-sidecar-error: header_timeout"), "{text}");
    assert_eventually(STEP, "header_timeout counted", || f.denied("header_timeout") == 1.0).await;
    // An idle keep-alive connection after a complete request is closed at keepalive_timeout,
    // quietly: nothing is written, and no refusal is counted.
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    let (text, closed) = read_until_closed(&mut s).await;
    let took = closed - t;
    assert!(text.is_empty(), "{text}");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(6),
        "idle keep-alive closed after keepalive_timeout, not {took:?}"
    );
    assert_eq!(f.denied("header_timeout"), 1.0);
    assert_eq!(f.accepts(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a5_keep_alive_idle_time_and_head_deadline_are_separate() {
    let f = fixture("header_read_timeout: 1s, keepalive_timeout: 30s").await;
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    let get = format!("GET /x HTTP/1.1\r\nHost: {NAME}\r\n\r\n");
    s.write_all(get.as_bytes()).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // Idle for longer than header_read_timeout (a single timer would have closed it by now).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(get.as_bytes()).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // A response slower than keepalive_timeout is not idleness: HTTP/1.1 and h2c alike.
    let f2 = fixture("header_read_timeout: 1s, keepalive_timeout: 1s").await;
    let mut s2 = TcpStream::connect(f2.http()).await.unwrap();
    s2.write_all(format!("GET /slow/1500 HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_response(&mut s2).await.starts_with("HTTP/1.1 200"));
    let mut h2 = Conn::open(f2.http(), true).await.unwrap();
    let req = Request::get(format!("http://{NAME}/slow/1500"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send(req).await.unwrap().head.status, 200);
    // The next head started: from its first byte it has header_read_timeout, then 408.
    s.write_all(b"GET /x HTTP/1.1\r\nHo").await.unwrap();
    let t = Instant::now();
    let (text, closed) = read_until_closed(&mut s).await;
    let took = closed - t;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eventually(STEP, "header_timeout counted", || f.denied("header_timeout") == 1.0).await;
    assert_eq!(f.accepts(), 1, "one upstream connection for both requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn a5_an_idle_h2c_connection_gets_a_goaway() {
    let f = fixture("keepalive_timeout: 1s").await;
    let mut c = Conn::open(f.http(), true).await.unwrap();
    let req = Request::get(format!("http://{NAME}/x"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().head.status, 200);
    let t = Instant::now();
    let Conn::H2(sender) = &c else { unreachable!() };
    assert!(!sender.is_closed(), "open right after a response");
    assert_eventually(STEP, "the idle h2c connection closed", || sender.is_closed()).await;
    assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
    assert_eq!(f.denied("header_timeout"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a5_a_connection_that_sends_nothing_is_closed_at_the_deadline() {
    let f = fixture("header_read_timeout: 1s").await;
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .expect("a silent connection is closed, not held forever")
        .ok();
    assert!(out.is_empty(), "nothing was asked, nothing is answered");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "closed at the deadline, not before"
    );
    assert_eventually(STEP, "header_timeout counted", || f.denied("header_timeout") == 1.0).await;
    assert_eq!(f.accepts(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a1_a_request_or_preface_whose_first_byte_arrives_alone_is_still_served() {
    let f = fixture("header_read_timeout: 5s").await;
    // The pause only paces the bytes so that the sidecar likely reads `P` on its own; the
    // assertions hold either way.
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(
        format!("OST /x HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // h2c: `P`, `R`, then the rest of the preface and a SETTINGS frame; the sidecar answers
    // with its own SETTINGS frame (type 4), i.e. it took the connection as HTTP/2.
    let mut s = TcpStream::connect(f.http()).await.unwrap();
    s.set_nodelay(true).unwrap();
    for part in [
        &b"P"[..],
        b"R",
        b"I * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ] {
        s.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut frame = [0u8; 9];
    tokio::time::timeout(STEP, s.read_exact(&mut frame))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame[3], 4, "first frame from the sidecar is SETTINGS: {frame:?}");
    assert_eq!(f.denied("malformed_request"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn d1_the_connection_cap_answers_503_overloaded() {
    let f = fixture("max_connections: 2").await;
    let _a = TcpStream::connect(f.http()).await.unwrap();
    let _b = TcpStream::connect(f.http()).await.unwrap();
    assert_eventually(STEP, "both connections are being served", || {
        f.sidecar.active_connections() == 2
    })
    .await;
    let r = raw(f.http(), format!("GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes()).await;
    assert!(status(&r).starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("x-mtls-sidecar-error: overloaded"));
    assert_eq!(f.denied("overloaded"), 1.0);
    assert_eq!(f.accepts(), 0);
}

#[test]
fn a7_metadata_and_link_local_services_are_refused_by_validation() {
    for service in ["169.254.169.254:80", "http://169.254.169.254", "[fe80::1]:443"] {
        let yaml = format!("mappings:\n  - {{ name: m, prefix: /, service: \"{service}\" }}\n");
        let p = support::problems(&yaml);
        let p = support::problem_at(&p, "mappings[0].service");
        assert!(p.message.contains("link-local"), "{service}: {}", p.message);
    }
    assert!(mtls_sidecar::proxy::connect::is_link_local(
        "169.254.169.254".parse().unwrap()
    ));
    assert!(mtls_sidecar::proxy::connect::is_link_local("fe80::1".parse().unwrap()));
    assert!(mtls_sidecar::proxy::connect::is_link_local(
        "::ffff:169.254.1.1".parse().unwrap()
    ));
    assert!(!mtls_sidecar::proxy::connect::is_link_local(
        "10.0.0.1".parse().unwrap()
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn b_black_holed_upstream_is_a_504_connect_timeout() {
    // A listener whose accept queue is full drops further SYNs: the connect hangs, as with a
    // black-holed address, but everything stays on loopback.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = socket.listen(1).unwrap();
    let addr = hole.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            fillers.push(s);
        }
    }
    let yaml = format!(
        "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\nmappings:\n  - {{ name: hole, prefix: /, service: \"http://{addr}\", connect_timeout_ms: 500 }}\n"
    );
    let s = app::start(config(&yaml)).await.unwrap();
    let t = Instant::now();
    let r = mtls_sidecar::testkit::client::get(s.http_addr.unwrap(), "any", "/")
        .await
        .unwrap();
    assert_eq!(r.head.status, 504);
    assert_eq!(r.error_reason().as_deref(), Some("connect_timeout"));
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(hole);
}

#[tokio::test(flavor = "multi_thread")]
async fn b_upstream_certificate_not_yet_valid_is_a_502() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("future CA");
    let now = std::time::SystemTime::now();
    let future = ca
        .issue(&LeafSpec::server(NAME).valid(now + Duration::from_secs(86_400), now + Duration::from_secs(2 * 86_400)));
    let up = http_upstream::start_https(server_config(&future, &[], &[])).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let yaml = format!(
        "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\ntls_contexts:\n  ctx: {{ cacert_chain_file: {}, sni: {NAME} }}\nmappings:\n  - {{ name: m, prefix: /, service: \"{}\", tls: ctx }}\n",
        ca_file.display(),
        up.addr
    );
    let s = app::start(config(&yaml)).await.unwrap();
    let r = mtls_sidecar::testkit::client::get(s.http_addr.unwrap(), NAME, "/")
        .await
        .unwrap();
    assert_eq!(r.head.status, 502);
    assert_eq!(r.error_reason().as_deref(), Some("cert_not_yet_valid"));
}

#[tokio::test(flavor = "multi_thread")]
async fn c_a_dsa_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dsa CA");
    let leaf = ca.client("app");
    let dsa = "-----BEGIN DSA PRIVATE KEY-----\nMIIBuwIBAAKBgQC1\n-----END DSA PRIVATE KEY-----\n";
    SecretDir::create(dir.path().join("certs"))
        .unwrap()
        .publish(&[
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", dsa.as_bytes()),
            ("ca.crt", ca.cert_pem.as_bytes()),
        ])
        .unwrap();
    let c = config(&format!(
        "admin: null\nsecrets_dir: {}\ntls_contexts:\n  ctx: {{ secret: certs }}\n",
        dir.path().display()
    ));
    let store = mtls_sidecar::tls::TlsStore::new(&c, mtls_sidecar::metrics::Metrics::new());
    match store.get("ctx").unwrap().reload() {
        mtls_sidecar::tls::ReloadOutcome::Failed(e) => {
            assert_eq!(e.kind(), "pem_error");
            assert!(e.to_string().contains("DSA is not supported"), "{e}");
        }
        other => panic!("a DSA key loaded: {other:?}"),
    }
}

#[test]
fn c_a_subpath_mount_is_detected_and_warned() {
    if mtls_sidecar::sys::euid() != 0 {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI runs as root");
        eprintln!("SKIPPED: bind-mounting a file (a subPath mount) needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("subpath CA");
    let leaf = ca.client("app");
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    // What the kubelet does for `subPath: tls.crt`: a bind mount of one file from the volume.
    let volume = tempfile::tempdir_in("/dev/shm").unwrap();
    for (name, body) in [
        ("tls.crt", &leaf.cert_pem),
        ("tls.key", &leaf.key_pem),
        ("ca.crt", &ca.cert_pem),
    ] {
        std::fs::write(volume.path().join(name), body).unwrap();
        std::fs::write(certs.join(name), "").unwrap();
    }
    let target = certs.join("tls.crt");
    let ok = std::process::Command::new("mount")
        .args(["--bind"])
        .arg(volume.path().join("tls.crt"))
        .arg(&target)
        .status()
        .unwrap();
    if !ok.success() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "mount --bind failed in CI"
        );
        eprintln!("SKIPPED: mount --bind is not permitted here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(target.clone());
    for (name, _) in [("tls.key", ()), ("ca.crt", ())] {
        let _ = std::fs::copy(volume.path().join(name), certs.join(name));
    }
    assert!(mtls_sidecar::tls::material::looks_like_subpath(&target));
    assert!(!mtls_sidecar::tls::material::looks_like_subpath(&certs.join("tls.key")));
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "admin: null\nsecrets_dir: {}\ntls_contexts:\n  ctx: {{ secret: certs }}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtls-sidecar"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("looks like a subPath mount and will never rotate"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn d4_without_a_watchable_directory_the_sidecar_polls_then_watches() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listeners: {{ http: null }}\nadmin: null\nsecrets_dir: {}\nreload_poll_interval: 1s\ntls_contexts:\n  ctx: {{ secret: late }}\n",
        dir.path().display()
    );
    let s = app::start(config(&yaml)).await.unwrap();
    let mode = |m: &str| {
        metric(
            &s.metrics.render(),
            "mtls_sidecar_certificate_watch_mode",
            &[("tls_context", "ctx"), ("mode", m)],
        )
    };
    assert_eq!(mode("poll"), 1.0, "the directory does not exist: polling");
    let ca = TestCa::new("late CA");
    let leaf = ca.client("app");
    SecretDir::create(dir.path().join("late"))
        .unwrap()
        .publish(&[
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", ca.cert_pem.as_bytes()),
        ])
        .unwrap();
    assert_eventually(STEP, "loaded by polling", || s.readiness.check().is_ok()).await;
    assert_eventually(STEP, "watched once it exists", || mode("inotify") == 1.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn d1_thousands_of_concurrent_connections_are_all_served() {
    // Each proxied connection holds two descriptors; make room the way the binary does.
    mtls_sidecar::sys::raise_nofile_limit().unwrap();
    let f = fixture("max_connections: 5000").await;
    let http = f.http();
    let mut tasks = Vec::new();
    for i in 0..2000 {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(http).await?;
            s.write_all(format!("GET /c/{i} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n").as_bytes())
                .await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            Ok::<bool, std::io::Error>(out.starts_with(b"HTTP/1.1 200"))
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            ok += 1;
        }
    }
    assert_eq!(ok, 2000, "every one of 2000 concurrent connections got its 200");
    assert_eq!(f.denied("overloaded"), 0.0);
    // HTTP/2 upstream: all of them shared a handful of upstream connections.
    assert!(f.accepts() <= 2, "{} upstream connections", f.accepts());
}

#[test]
fn b_slow_dns_is_a_504_dns_timeout() {
    if mtls_sidecar::sys::euid() != 0 {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI runs as root");
        eprintln!("SKIPPED: a private resolv.conf needs a network namespace (root)");
        return;
    }
    // `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf: point it
    // at an address inside the namespace where nothing ever answers.
    let ns = format!("mtls-dns-{}", std::process::id() % 100_000);
    let etc = std::path::PathBuf::from("/etc/netns").join(&ns);
    struct Cleanup(String, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _cleanup = Cleanup(ns.clone(), etc.clone());
    let sh = |args: &[&str]| {
        assert!(
            std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap()
                .success(),
            "{args:?}"
        )
    };
    sh(&["ip", "netns", "add", &ns]);
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    // A veth pair inside the namespace: the peer has no address, so nothing ever answers ARP
    // for the nameserver and the query is never even sent.
    sh(&[
        "ip", "-n", &ns, "link", "add", "dns0", "type", "veth", "peer", "name", "dns1",
    ]);
    sh(&["ip", "-n", &ns, "addr", "add", "10.203.0.1/24", "dev", "dns0"]);
    sh(&["ip", "-n", &ns, "link", "set", "dns0", "up"]);
    sh(&["ip", "-n", &ns, "link", "set", "dns1", "up"]);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("resolv.conf"),
        "nameserver 10.203.0.2\noptions timeout:5 attempts:1\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "listeners: { http: 127.0.0.1:25401 }\nadmin: null\nlog: { level: warn }\nmappings:\n  - { name: slow, prefix: /, service: \"http://slow.example.test\", connect_timeout_ms: 700 }\n",
    )
    .unwrap();
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            env!("CARGO_BIN_EXE_mtls-sidecar"),
            "run",
            "--config",
        ])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let o = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "curl",
                "-sS",
                "-m",
                "10",
                "-D",
                "-",
                "-H",
                "Host: any",
                "http://127.0.0.1:25401/",
            ])
            .output()
            .unwrap();
        if o.status.success() || Instant::now() > deadline {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(out.contains("x-mtls-sidecar-error: dns_timeout"), "{out}");
}
