//! The real `curl` as the application: `-x` (forward proxy, like `HTTP_PROXY`) and
//! `--http2-prior-knowledge` (h2c). Skipped with a note when curl is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "http_support/mod.rs"]
mod http_support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;

use http_support::{HttpWorld, STEP, mapping, seen_header};
use tokio::process::Command;

const HOST: &str = "orders.shop.svc";

/// Whether curl can run here; panics when it cannot and `CI=true` (CI must run these tests).
async fn curl_available() -> bool {
    let found = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "curl is required when CI=true (.ci/run installs it)"
        );
        eprintln!("SKIPPED: curl is not installed; these tests drive the sidecar with the real curl");
    }
    found
}

/// Runs curl with `args`; returns (status code, response headers, body). Proxy variables
/// from the environment are removed so only the arguments decide the route.
async fn curl(args: &[&str]) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .kill_on_drop(true);
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(STEP, cmd.output())
        .await
        .expect("curl hung")
        .expect("running curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (rest, code) = stdout.trim_end().rsplit_once('\n').expect("status code line");
    let (head, body) = rest.split_once("\r\n\r\n").expect("headers, then body");
    (code.parse().expect("status code"), head.to_owned(), body.to_owned())
}

async fn sidecar(w: &HttpWorld, up: SocketAddr) -> (mtls_sidecar::app::Sidecar, SocketAddr) {
    w.sidecar(&mapping("orders", up, &format!("host: {HOST}, prefix: /upstream/")))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_through_the_forward_proxy() {
    if !curl_available().await {
        return;
    }
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = sidecar(&w, up.addr).await;

    let proxy = format!("http://{addr}");
    let (code, _, body) = curl(&["-x", &proxy, &format!("http://{HOST}/upstream/x?y=1")]).await;
    assert_eq!(code, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["path"], "/x?y=1", "{j}");
    assert_eq!(j["host"], HOST, "{j}");
    assert_eq!(j["client_serial"], w.client.serial.as_str(), "{j}");
    assert_eq!(
        seen_header(&j, "proxy-connection"),
        None,
        "curl's Proxy-Connection is hop-by-hop: {j}"
    );

    // An unmapped destination through the proxy: 403 with the reason header, nothing upstream.
    let accepted = up.observed.accepted.load(Ordering::SeqCst);
    let (code, head, body) = curl(&["-x", &proxy, "http://example.com/"]).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("x-mtls-sidecar-error: no_route"),
        "{head}"
    );
    assert!(body.starts_with("mtls-sidecar: "), "{body}");
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), accepted);
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_with_http2_prior_knowledge() {
    if !curl_available().await {
        return;
    }
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = sidecar(&w, up.addr).await;

    let (code, head, body) = curl(&[
        "--http2-prior-knowledge",
        &format!("http://{addr}/upstream/x"),
        "-H",
        &format!("Host: {HOST}"),
    ])
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(head.starts_with("HTTP/2 200"), "curl spoke h2c to the sidecar: {head}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["path"], "/x", "{j}");
    assert_eq!(j["version"], "HTTP/2.0", "h2c in, h2 out: {j}");
    assert_eq!(j["host"], HOST, "{j}");
    assert_eq!(j["client_serial"], w.client.serial.as_str(), "{j}");
}
