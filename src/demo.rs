//! `mtls-sidecar demo`: the whole mission in one process, from nothing.
//!
//! A throwaway CA, an upstream that requires client certificates, a Secret directory written
//! the way the kubelet writes it, the real sidecar started from a real config file, traffic
//! through it, a live certificate rotation, and the metrics that prove what happened.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::app::{self, Sidecar};
use crate::config::{self, ConfigSource};
use crate::testkit::client;
use crate::testkit::http_upstream;
use crate::testkit::pki::{Leaf, TestCa};
use crate::testkit::secret_dir::SecretDir;
use crate::testkit::upstream::{self, Behavior};

const UPSTREAM_NAME: &str = "orders.demo.svc";

/// Runs the demo; exit 0 on success.
pub fn main() -> ExitCode {
    crate::logging::init(&crate::config::LogConfig {
        level: "warn".to_owned(),
        format: crate::config::LogFormat::Text,
    });
    let rt = match crate::cli::runtime(None) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn publish(secret: &SecretDir, leaf: &Leaf, ca: &TestCa) -> anyhow::Result<()> {
    secret
        .publish(&[
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", ca.cert_pem.as_bytes()),
        ])
        .context("writing the Secret volume")
}

/// The seed example from Emissary's documentation, verbatim but for the service address
/// (there is no cluster DNS here) and the SNI that goes with it.
fn write_config(
    dir: &Path,
    https: std::net::SocketAddr,
    tcp: std::net::SocketAddr,
) -> anyhow::Result<std::path::PathBuf> {
    let emissary = format!(
        r#"---
apiVersion: getambassador.io/v3alpha1
kind: TLSContext
metadata:
  name: upstream-context
spec:
  hosts: []
  secret: upstream-certs
  sni: {UPSTREAM_NAME}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata:
  name: upstream-mapping
spec:
  prefix: /upstream/
  service: {https}
  tls: upstream-context
"#
    );
    std::fs::write(dir.join("emissary.yaml"), emissary).context("writing emissary.yaml")?;
    let yaml = format!(
        r#"# Written by `mtls-sidecar demo`.
listeners:
  http: 127.0.0.1:0
admin: 127.0.0.1:0
secrets_dir: {secrets}
log: {{ level: warn }}
emissary_resources: [emissary.yaml]
tcp_mappings:
  - name: orders-db
    port: 0
    service: {tcp}
    tls: upstream-context
"#,
        secrets = dir.join("secrets").display(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).context("writing config.yaml")?;
    Ok(path)
}

async fn http_exchange(sidecar: &Sidecar, expect_serial: &str) -> anyhow::Result<()> {
    let addr = sidecar.http_addr.context("the HTTP listener is not running")?;
    let url = format!("http://{UPSTREAM_NAME}/upstream/hello?from=demo");
    let r = client::get_via_proxy(addr, &url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let j = r.json();
    println!(
        "     HTTP/1.1 GET {url} (as with HTTP_PROXY) -> {} ; upstream saw {} {} over {} (ALPN {}), client serial {}",
        r.head.status,
        j["method"].as_str().unwrap_or("?"),
        j["path"].as_str().unwrap_or("?"),
        j["version"].as_str().unwrap_or("?"),
        j["alpn"].as_str().unwrap_or("-"),
        j["client_serial"].as_str().unwrap_or("?"),
    );
    if j["client_serial"] != expect_serial {
        bail!(
            "the HTTP upstream saw serial {} instead of {expect_serial}",
            j["client_serial"]
        );
    }
    let r = client::get_h2c(addr, &format!("http://{UPSTREAM_NAME}/upstream/grpc-like"))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let j = r.json();
    println!(
        "     h2c GET /upstream/grpc-like (prior knowledge) -> {} ; upstream saw {} over {}, client serial {}",
        r.head.status,
        j["path"].as_str().unwrap_or("?"),
        j["version"].as_str().unwrap_or("?"),
        j["client_serial"].as_str().unwrap_or("?"),
    );
    if j["client_serial"] != expect_serial || j["version"] != "HTTP/2.0" {
        bail!("the h2 exchange did not reach the upstream as HTTP/2 with serial {expect_serial}");
    }
    Ok(())
}

async fn tcp_exchange(sidecar: &Sidecar) -> anyhow::Result<String> {
    let addr = sidecar
        .tcp_addrs
        .get("orders-db")
        .context("the orders-db mapping is not listening")?;
    let stream = TcpStream::connect(addr).await.context("connecting to the sidecar")?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .context("the upstream did not answer within 5 s")??;
    let mut stream = reader.into_inner();
    stream.write_all(b"ping\n").await?;
    let mut reader = BufReader::new(stream);
    let mut echo = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut echo)).await??;
    if echo != "ping\n" {
        bail!("the relay did not echo our bytes back (got {echo:?})");
    }
    Ok(line.trim_end().to_owned())
}

async fn run() -> anyhow::Result<()> {
    println!("mtls-sidecar demo: plaintext in, mutual TLS out, certificates rotated live\n");
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let ca = TestCa::new("mtls-sidecar demo CA");
    let server = ca.server(UPSTREAM_NAME);
    let first = ca.client("demo-app");
    println!(
        "1. minted a throwaway CA and a client certificate CN=demo-app (serial {})",
        first.serial
    );

    let secret = SecretDir::create(dir.path().join("secrets/upstream-certs"))?;
    publish(&secret, &first, &ca)?;
    let data = std::fs::read_link(secret.path().join("..data"))?;
    println!(
        "2. wrote it as a Secret volume in kubelet layout: {}/..data -> {}",
        secret.path().display(),
        data.display()
    );

    let server_cfg = upstream::server_config(&server, &[], &[&ca]);
    let up = upstream::start_tcp(server_cfg.clone(), Behavior::ReportAndEcho).await;
    let https = http_upstream::start_https(server_cfg).await;
    println!(
        "3. started two upstreams that require client certificates from that CA: HTTPS (h2 + http/1.1) on {}, TCP on {}",
        https.addr, up.addr
    );

    let path = write_config(dir.path(), https.addr, up.addr)?;
    let (cfg, _) = config::load(&ConfigSource {
        path: Some(path.clone()),
        emissary: Vec::new(),
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sidecar = app::start(cfg).await?;
    let tcp = sidecar.tcp_addrs["orders-db"];
    println!(
        "4. started the sidecar from {} with the Emissary seed objects (HTTP on {}, TCP mapping orders-db on {tcp})",
        path.display(),
        sidecar.http_addr.map(|a| a.to_string()).unwrap_or_default()
    );

    println!("5. app --plaintext--> sidecar --mTLS--> upstreams:");
    http_exchange(&sidecar, &first.serial).await?;
    let seen = tcp_exchange(&sidecar).await?;
    println!("     TCP mapping orders-db -> {seen}");
    if !seen.contains(&first.serial) {
        bail!(
            "the upstream did not see the first certificate's serial {}",
            first.serial
        );
    }

    let second = ca.client("demo-app");
    publish(&secret, &second, &ca)?;
    println!(
        "6. rotated the Secret (kubelet-style ..data swap) to a new certificate, serial {}",
        second.serial
    );
    let slot = sidecar.store.get("upstream-context").context("context missing")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while slot.current().is_none_or(|g| g.number < 2) {
        if Instant::now() > deadline {
            bail!("the sidecar did not pick up the rotation within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("7. the next requests, without any restart:");
    http_exchange(&sidecar, &second.serial).await?;
    let seen = tcp_exchange(&sidecar).await?;
    println!("     TCP mapping orders-db -> {seen}");
    if !seen.contains(&second.serial) {
        bail!(
            "the upstream did not see the rotated certificate's serial {}",
            second.serial
        );
    }

    // A TCP connection is counted when its relay ends, just after the app hung up.
    let counted = |t: &str| t.contains(r#"mtls_sidecar_tcp_connections_total{listener="orders-db",result="ok"} 2"#);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = sidecar.metrics.render();
    while !counted(&text) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        text = sidecar.metrics.render();
    }
    println!("8. metrics that prove it:");
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("mtls_sidecar_certificate_generation")
                || l.starts_with("mtls_sidecar_certificate_reloads_total")
                || l.starts_with("mtls_sidecar_tls_handshakes_total")
                || l.starts_with("mtls_sidecar_tcp_connections_total")
                || l.starts_with("mtls_sidecar_requests_total")
                || l.starts_with("mtls_sidecar_ready"))
    }) {
        println!("     {line}");
    }
    sidecar.close().await;
    println!("\ndemo OK: HTTP/1.1, h2 and TCP over mTLS, 1 live rotation, 0 restarts");
    Ok(())
}
