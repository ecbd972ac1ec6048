//! Helpers shared by the integration tests: bounded polling, configs from YAML strings, a
//! PKI + Secret volume + upstream "world", a sidecar with one TCP mapping, and metric lookups.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod openssl;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use figment::Figment;
use figment::providers::{Format, Yaml};
use mtls_sidecar::app::Sidecar;
use mtls_sidecar::config::{Config, ConfigError, Problem, Warning, finish, from_figment};
use mtls_sidecar::testkit::pki::{Leaf, TestCa};
use mtls_sidecar::testkit::secret_dir::SecretDir;
use mtls_sidecar::testkit::upstream::{self, Behavior, Upstream};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;

/// The name the upstream's certificate is issued for and the sidecar sends as SNI.
pub const UPSTREAM_NAME: &str = "upstream.test.svc";
/// Name of the TLS context in `World::sidecar` configs.
pub const CTX: &str = "ctx";
/// Name of the TCP mapping in `World::sidecar` configs (the `listener` metric label).
pub const MAPPING: &str = "db";
/// How long any single network step of a test may take before it counts as hung.
pub const STEP: Duration = Duration::from_secs(10);

/// Polls `cond` every 10 ms until it holds; panics naming `what` once `deadline` has passed.
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

/// Parses and validates a YAML configuration as the binary does (minus env and file).
pub fn try_config(yaml: &str) -> Result<(Config, Vec<Warning>), ConfigError> {
    let config = from_figment(&Figment::from(Yaml::string(yaml)))?;
    finish(config, &[])
}

/// A configuration that must be valid.
pub fn config(yaml: &str) -> Config {
    match try_config(yaml) {
        Ok((c, _)) => c,
        Err(e) => panic!("expected a valid configuration, got {e}\n--- yaml ---\n{yaml}"),
    }
}

/// The problems of a configuration that must be invalid.
pub fn problems(yaml: &str) -> Vec<Problem> {
    match try_config(yaml) {
        Ok(_) => panic!("expected configuration problems\n--- yaml ---\n{yaml}"),
        Err(e) => e.problems,
    }
}

/// The problem reported at exactly `path`; panics listing every problem if there is none.
pub fn problem_at<'a>(problems: &'a [Problem], path: &str) -> &'a Problem {
    problems
        .iter()
        .find(|p| p.path == path)
        .unwrap_or_else(|| panic!("no problem at `{path}`; got: {problems:#?}"))
}

/// The value of the sample `name{labels...}` in a Prometheus text exposition (labels may be
/// a subset of the sample's), or 0 when absent.
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

/// `mtls_sidecar_tcp_connections_total{listener="db", result}`.
pub fn tcp_result(sidecar: &Sidecar, result: &str) -> f64 {
    metric(
        &sidecar.metrics.render(),
        "mtls_sidecar_tcp_connections_total",
        &[("listener", MAPPING), ("result", result)],
    )
}

/// Waits until `tcp_connections_total{listener="db", result}` reaches `n`.
pub async fn wait_tcp_result(sidecar: &Sidecar, result: &str, n: f64) {
    assert_eventually(
        STEP,
        &format!("tcp_connections_total{{result=\"{result}\"}} >= {n}"),
        || tcp_result(sidecar, result) >= n,
    )
    .await;
}

/// Connects to a TCP mapping and returns the upstream's report line (without newline),
/// keeping the stream for further exchange.
pub async fn report(addr: SocketAddr) -> (String, BufReader<TcpStream>) {
    let stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connecting to the TCP mapping timed out")
        .expect("connecting to the TCP mapping");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let n = tokio::time::timeout(STEP, reader.read_line(&mut line))
        .await
        .expect("no report line from the upstream in time")
        .expect("reading the report line");
    assert!(
        n > 0 && line.ends_with('\n'),
        "the sidecar closed the connection instead of relaying the upstream's report (got {line:?})"
    );
    (line.trim_end().to_owned(), reader)
}

/// Connects to a TCP mapping and asserts the sidecar closes it without relaying a byte.
pub async fn expect_closed(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.expect("connecting");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(STEP, stream.read_to_end(&mut buf))
        .await
        .expect("the sidecar kept the connection open");
    // A reset is as good as an EOF here: what matters is that no byte came through.
    if read.is_ok() {
        assert!(
            buf.is_empty(),
            "expected the connection to be closed, got {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
}

/// Whether the report line names `leaf`'s serial.
pub fn saw_serial(line: &str, serial: &str) -> bool {
    line.contains(&format!(" serial={serial} "))
}

/// A PKI, a secrets directory and helpers to start upstreams and sidecars against them.
pub struct World {
    /// Holds everything on disk.
    pub dir: TempDir,
    /// Issues the upstream's certificate and the clients' certificates.
    pub ca: TestCa,
    /// The upstream's certificate for `UPSTREAM_NAME`.
    pub server: Leaf,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    /// A fresh CA with a server certificate for `UPSTREAM_NAME`.
    pub fn new() -> Self {
        let ca = TestCa::new("test CA");
        let server = ca.server(UPSTREAM_NAME);
        World {
            dir: tempfile::tempdir().expect("tempdir"),
            ca,
            server,
        }
    }

    /// `<tempdir>/secrets`: the `secrets_dir` of every sidecar of this world.
    pub fn secrets_dir(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }

    /// A file under the tempdir with `contents`.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).expect("writing a test file");
        p
    }

    /// Publishes `files` kubelet-style as Secret `name`.
    pub fn secret(&self, name: &str, files: &[(&str, &[u8])]) -> SecretDir {
        let s = SecretDir::create(self.secrets_dir().join(name)).expect("secret dir");
        s.publish(files).expect("publishing the secret");
        s
    }

    /// Publishes `leaf` with `key_pem` and this world's CA as `tls.crt`/`tls.key`/`ca.crt`.
    pub fn client_secret(&self, name: &str, leaf: &Leaf, key_pem: &str) -> SecretDir {
        self.secret(
            name,
            &[
                ("tls.crt", leaf.cert_pem.as_bytes()),
                ("tls.key", key_pem.as_bytes()),
                ("ca.crt", self.ca.cert_pem.as_bytes()),
            ],
        )
    }

    /// An upstream presenting `self.server` and requiring a client certificate from `self.ca`.
    pub async fn upstream(&self) -> Upstream {
        upstream::start_tcp(
            upstream::server_config(&self.server, &[], &[&self.ca]),
            Behavior::ReportAndEcho,
        )
        .await
    }

    /// A sidecar whose context `ctx` is `{context}` (a YAML flow-map body) and whose TCP
    /// mapping `db` relays to `service`; `mapping_extra` adds flow-map fields to the mapping.
    pub async fn sidecar(&self, context: &str, service: &str, mapping_extra: &str) -> (Sidecar, SocketAddr) {
        let yaml = sidecar_yaml(&self.secrets_dir(), context, service, mapping_extra);
        start_sidecar(&yaml).await
    }

    /// The usual case: context `secret: <secret>, sni: UPSTREAM_NAME` toward `upstream`.
    pub async fn sidecar_for_secret(&self, secret: &str, upstream: SocketAddr) -> (Sidecar, SocketAddr) {
        self.sidecar(
            &format!("secret: {secret}, sni: {UPSTREAM_NAME}"),
            &upstream.to_string(),
            "",
        )
        .await
    }
}

/// A configuration with one context `ctx` and one TCP mapping `db` on an ephemeral port.
pub fn sidecar_yaml(secrets_dir: &Path, context: &str, service: &str, mapping_extra: &str) -> String {
    let extra = if mapping_extra.is_empty() {
        String::new()
    } else {
        format!(", {mapping_extra}")
    };
    format!(
        r#"
listeners: {{ http: 127.0.0.1:0 }}
admin: null
secrets_dir: "{secrets}"
tls_contexts:
  {CTX}: {{ {context} }}
tcp_mappings:
  - {{ name: {MAPPING}, port: 0, service: "{service}", tls: {CTX}{extra} }}
"#,
        secrets = secrets_dir.display(),
    )
}

/// Validates `yaml`, starts the sidecar and returns it with the address of mapping `db`.
pub async fn start_sidecar(yaml: &str) -> (Sidecar, SocketAddr) {
    let sidecar = mtls_sidecar::app::start(config(yaml))
        .await
        .expect("starting the sidecar");
    let addr = *sidecar.tcp_addrs.get(MAPPING).expect("the TCP mapping is listening");
    (sidecar, addr)
}

/// A rustls server config presenting `leaf` and requiring client certificates issued by the
/// CA(s) in `client_ca_pem` (for CAs minted outside `TestCa`, e.g. by the openssl CLI).
pub fn server_config_with_client_ca_pem(leaf: &Leaf, client_ca_pem: &[u8]) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(client_ca_pem) {
        roots.add(der.expect("client CA PEM")).expect("client CA certificate");
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pkcs8.clone()));
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![leaf.der.clone()], key)
        .expect("server certificate");
    Arc::new(cfg)
}

/// A loopback port with nothing listening on it (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr")
}
