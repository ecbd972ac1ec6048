//! Helpers shared by the HTTP front-end tests: a PKI + Secret volume + HTTPS upstream
//! "world", sidecars built from YAML mapping lists, bounded waits, raw HTTP/1.1 exchanges and
//! metric lookups. (Kept apart from `tests/support/`, which the TCP tests own.)
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use figment::Figment;
use figment::providers::{Format, Yaml};
use http::Request;
use http_body_util::Full;
use mtls_sidecar::app::Sidecar;
use mtls_sidecar::config::{Config, from_figment, validate};
use mtls_sidecar::testkit::client::{Collected, Conn};
use mtls_sidecar::testkit::http_upstream;
use mtls_sidecar::testkit::pki::{Leaf, TestCa};
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{Upstream, server_config};
use rustls::ServerConfig;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The name on the upstream's certificate; contexts send it as SNI.
pub const UPSTREAM_NAME: &str = "upstream.test.svc";
/// The TLS context every `HttpWorld::sidecar` config defines.
pub const CTX: &str = "ctx";
/// The Secret holding the client certificate of `CTX`.
pub const SECRET: &str = "client-certs";
/// How long any single network step may take before the test counts it as hung.
pub const STEP: Duration = Duration::from_secs(15);

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `deadline`.
pub async fn assert_eventually(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        assert!(Instant::now() < until, "not true within {deadline:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `f` for at most `STEP`, naming `what` if it hangs.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("hung for {STEP:?}: {what}"))
}

/// Parses and validates a YAML configuration (figment + validate, as the binary does).
pub fn config(yaml: &str) -> Config {
    let config = from_figment(&Figment::from(Yaml::string(yaml)))
        .unwrap_or_else(|e| panic!("invalid configuration: {e}\n--- yaml ---\n{yaml}"));
    if let Err(e) = validate(&config) {
        panic!("invalid configuration: {e}\n--- yaml ---\n{yaml}");
    }
    config
}

/// The sum of the samples `name{labels...}` in a Prometheus exposition (labels may be a subset).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (n == name).then_some((rest, value))
        })
        .filter(|(rest, _)| {
            labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap_or(0.0))
        .sum()
}

/// A test CA, an upstream server certificate, a client certificate published as Secret
/// `SECRET`, all under one tempdir.
pub struct HttpWorld {
    /// Holds the Secret volumes and files.
    pub dir: TempDir,
    /// Issues every certificate of this world.
    pub ca: TestCa,
    /// The upstream's certificate for `UPSTREAM_NAME`.
    pub server: Leaf,
    /// The sidecar's client certificate (in Secret `SECRET`).
    pub client: Leaf,
}

impl Default for HttpWorld {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpWorld {
    /// A fresh PKI with the client Secret already published.
    pub fn new() -> Self {
        let ca = TestCa::new("http test CA");
        let server = ca.server(UPSTREAM_NAME);
        let client = ca.client("app.shop");
        let w = HttpWorld {
            dir: tempfile::tempdir().expect("tempdir"),
            ca,
            server,
            client,
        };
        w.secret(
            SECRET,
            &[
                ("tls.crt", w.client.cert_pem.as_bytes()),
                ("tls.key", w.client.key_pem.as_bytes()),
                ("ca.crt", w.ca.cert_pem.as_bytes()),
            ],
        );
        w
    }

    /// The `secrets_dir` of this world's sidecars.
    pub fn secrets_dir(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }

    /// Publishes `files` kubelet-style as Secret `name`.
    pub fn secret(&self, name: &str, files: &[(&str, &[u8])]) -> SecretDir {
        let s = SecretDir::create(self.secrets_dir().join(name)).expect("secret dir");
        s.publish(files).expect("publishing the secret");
        s
    }

    /// A file under the tempdir.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).expect("writing a test file");
        p
    }

    /// Server config: presents `self.server`, requires a client cert from `self.ca`,
    /// ALPN `h2, http/1.1`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        server_config(&self.server, &[], &[&self.ca])
    }

    /// Like `server_config`, but the upstream only speaks `http/1.1`.
    pub fn server_config_h1(&self) -> Arc<ServerConfig> {
        only_http11(self.server_config())
    }

    /// An HTTPS upstream (h2 + http/1.1) requiring this world's client certificates.
    pub async fn upstream(&self) -> Upstream {
        http_upstream::start_https(self.server_config()).await
    }

    /// An HTTPS upstream that only negotiates HTTP/1.1 (so headers reach it exactly as sent).
    pub async fn upstream_h1(&self) -> Upstream {
        http_upstream::start_https(self.server_config_h1()).await
    }

    /// A sidecar with context `CTX` (`secret: SECRET, sni: UPSTREAM_NAME`) and `mappings`, a
    /// YAML block of list items (each line already indented by two spaces).
    pub async fn sidecar(&self, mappings: &str) -> (Sidecar, SocketAddr) {
        let contexts = format!("  {CTX}: {{ secret: {SECRET}, sni: {UPSTREAM_NAME} }}\n");
        self.sidecar_with(&contexts, mappings).await
    }

    /// A sidecar with the given `tls_contexts` and `mappings` blocks.
    pub async fn sidecar_with(&self, contexts: &str, mappings: &str) -> (Sidecar, SocketAddr) {
        let yaml = format!(
            "listeners: {{ http: 127.0.0.1:0 }}\nadmin: null\nsecrets_dir: \"{}\"\ntls_contexts:\n{contexts}mappings:\n{mappings}",
            self.secrets_dir().display()
        );
        start(config(&yaml)).await
    }
}

/// Starts a sidecar from a validated config; returns it with its HTTP listener address.
pub async fn start(config: Config) -> (Sidecar, SocketAddr) {
    let sidecar = within("starting the sidecar", mtls_sidecar::app::start(config))
        .await
        .expect("starting the sidecar");
    let addr = sidecar.http_addr.expect("the HTTP listener is bound");
    (sidecar, addr)
}

/// A copy of `cfg` whose ALPN offer is `http/1.1` only.
pub fn only_http11(cfg: Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut c = (*cfg).clone();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// One mapping line for `HttpWorld::sidecar`: `{ name, service: <upstream>, tls: CTX, extra }`.
pub fn mapping(name: &str, upstream: SocketAddr, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!("  - {{ name: {name}, service: \"{upstream}\", tls: {CTX}{extra} }}\n")
}

/// Sends `req` on a fresh connection (`h2`: prior-knowledge h2c) and collects the response.
pub async fn send(addr: SocketAddr, h2: bool, req: Request<Full<Bytes>>) -> Collected {
    within("a request through the sidecar", async {
        let mut conn = Conn::open(addr, h2).await.expect("connecting to the sidecar");
        conn.send(req).await.expect("the request through the sidecar")
    })
    .await
}

/// A GET with no body.
pub fn get_req(uri: &str, host: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(uri);
    if let Some(h) = host {
        b = b.header("host", h);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

/// Origin-form GET `path` with `Host: host` over a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Collected {
    send(addr, false, get_req(path, Some(host))).await
}

/// Asserts the sidecar refused or failed with `status` and `reason`, in plain text.
pub fn assert_sidecar_error(r: &Collected, status: u16, reason: &str) {
    assert_eq!(
        (r.head.status.as_u16(), r.error_reason().as_deref()),
        (status, Some(reason)),
        "expected {status} {reason}; body: {}",
        r.text()
    );
    let ct = r
        .head
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("text/plain"), "error bodies are plain text, got {ct:?}");
    assert!(
        r.text().starts_with("mtls-sidecar: ") && r.text().len() > 20,
        "the body should say what failed: {:?}",
        r.text()
    );
}

/// Writes `request` raw on a new connection and reads up to the end of the response head.
/// Returns the head as text, the stream, and any bytes read past the head.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (String, TcpStream, Vec<u8>) {
    within("a raw HTTP/1.1 exchange", async {
        let mut s = TcpStream::connect(addr).await.expect("connecting to the sidecar");
        s.write_all(request).await.expect("writing the request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = buf.split_off(end + 4);
                return (String::from_utf8_lossy(&buf).into_owned(), s, rest);
            }
            let n = s.read(&mut chunk).await.expect("reading the response head");
            assert!(n > 0, "connection closed before the response head: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
}

/// The value of header `name` in a raw response head (case-insensitive).
pub fn raw_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A header the upstream reported in its JSON (`headers.<name>`).
pub fn seen_header(json: &serde_json::Value, name: &str) -> Option<String> {
    json["headers"][name].as_str().map(str::to_owned)
}
