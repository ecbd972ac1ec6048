//! Protocol handling through the HTTP listener: h2c in → h2 out with trailers (gRPC), the
//! pooled upstream connection (one handshake for many requests, one HTTP/2 connection for
//! many concurrent streams), WebSocket pass-through, and hop-by-hop header hygiene.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "http_support/mod.rs"]
mod http_support;

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use http_support::{
    CTX, HttpWorld, STEP, get_req, mapping, metric, raw_exchange, raw_header, seen_header, send, within,
};
use mtls_sidecar::testkit::client::Conn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: &str = "orders.shop.svc";

fn orders(upstream: std::net::SocketAddr, extra: &str) -> String {
    let extra = if extra.is_empty() {
        format!("host: {HOST}")
    } else {
        format!("host: {HOST}, {extra}")
    };
    mapping("orders", upstream, &extra)
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_in_h2_out_keeps_grpc_trailers() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w.sidecar(&orders(up.addr, "prefix: /")).await;

    // A gRPC-shaped unary call: POST, application/grpc, TE: trailers, one length-prefixed message.
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    let req = Request::post(format!("http://{HOST}/trailers"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message.clone()))
        .unwrap();
    let r = send(addr, true, req).await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    assert_eq!(r.head.version, http::Version::HTTP_2);
    assert_eq!(r.head.headers["content-type"], "application/grpc");
    let trailers = r
        .trailers
        .as_ref()
        .expect("the grpc-status trailers must reach the app");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");

    let j = r.json();
    assert_eq!(j["version"], "HTTP/2.0", "the upstream leg is HTTP/2: {j}");
    assert_eq!(j["alpn"], "h2", "{j}");
    assert_eq!(j["method"], "POST", "{j}");
    assert_eq!(j["body_len"], message.len(), "{j}");
    assert_eq!(
        seen_header(&j, "te").as_deref(),
        Some("trailers"),
        "TE: trailers survives: {j}"
    );
    assert_eq!(j["client_serial"], w.client.serial.as_str(), "{j}");
}

/// 100 sequential requests over one app keep-alive connection: one upstream handshake.
async fn sequential_requests(w: &HttpWorld, up: &mtls_sidecar::testkit::upstream::Upstream) {
    let (sc, addr) = w.sidecar(&orders(up.addr, "")).await;
    let mut conn = within("connecting", Conn::open(addr, false)).await.unwrap();
    for i in 0..100 {
        let r = within(
            "a keep-alive request",
            conn.send(get_req(&format!("/n/{i}"), Some(HOST))),
        )
        .await
        .unwrap();
        assert_eq!(r.head.status, 200, "request {i}: {}", r.text());
        let j = r.json();
        assert_eq!(j["path"], format!("/n/{i}"), "{j}");
        assert_eq!(j["client_serial"], w.client.serial.as_str(), "{j}");
    }
    assert_eq!(
        up.observed.handshakes.load(Ordering::SeqCst),
        1,
        "one TLS handshake per pooled connection, not per request"
    );
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 1);
    let text = sc.metrics.render();
    assert_eq!(
        metric(
            &text,
            "mtls_sidecar_tls_handshakes_total",
            &[("tls_context", CTX), ("result", "ok")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "mtls_sidecar_requests_total",
            &[("mapping", "orders"), ("code", "200")]
        ),
        100.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_handshake_for_100_sequential_requests_over_h2() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    sequential_requests(&w, &up).await;
    assert_eq!(up.observed.last().unwrap().alpn.as_deref(), Some("h2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_handshake_for_100_sequential_requests_over_http11() {
    let w = HttpWorld::new();
    let up = w.upstream_h1().await;
    sequential_requests(&w, &up).await;
    assert_eq!(up.observed.last().unwrap().alpn.as_deref(), Some("http/1.1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_h2c_requests_share_one_upstream_connection() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w.sidecar(&orders(up.addr, "timeout_ms: 10000")).await;

    // Half the streams on one app connection, half on their own: all in flight together
    // (each waits 200 ms upstream), all on one upstream HTTP/2 connection.
    let Conn::H2(shared) = Conn::open(addr, true).await.unwrap() else {
        unreachable!("asked for h2c")
    };
    let mut tasks = Vec::new();
    for i in 0..50 {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let req = get_req(&format!("http://{HOST}/slow/200?i={i}"), None);
            if i % 2 == 0 {
                let mut s = shared;
                s.ready().await.unwrap();
                let resp = s.send_request(req).await.unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (
                    status.as_u16(),
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
                )
            } else {
                let r = Conn::open(addr, true).await.unwrap().send(req).await.unwrap();
                (r.head.status.as_u16(), r.json())
            }
        }));
    }
    for t in tasks {
        let (status, j) = within("a concurrent h2c request", t).await.unwrap();
        assert_eq!(status, 200, "{j}");
        assert_eq!(j["version"], "HTTP/2.0", "{j}");
    }
    assert_eq!(
        up.observed.accepted.load(Ordering::SeqCst),
        1,
        "50 concurrent h2 requests must be multiplexed over one upstream connection"
    );
    assert_eq!(up.observed.handshakes.load(Ordering::SeqCst), 1);
}

const WS_UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_is_relayed_when_allowed() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w.sidecar(&orders(up.addr, "allow_upgrade: [websocket]")).await;

    let req = format!("GET /ws HTTP/1.1\r\nHost: {HOST}\r\n{WS_UPGRADE}\r\n");
    let (head, mut s, rest) = raw_exchange(addr, req.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        raw_header(&head, "upgrade").map(str::to_ascii_lowercase).as_deref(),
        Some("websocket")
    );
    // RFC 6455's example key: the upstream's answer arrives untouched.
    assert_eq!(
        raw_header(&head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert!(rest.is_empty());

    // Masked client frames are arbitrary bytes: a bare LF in them is no malformed HTTP head.
    for msg in [&b"\x81\x05hello"[..], &[0xAB; 20_000][..], b"\x82\x07a\nb\r\n\n"] {
        s.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        within("the websocket echo", s.read_exact(&mut echo)).await.unwrap();
        assert_eq!(echo, msg, "bytes relayed both ways after the 101");
    }
    // The upgraded connection went over TLS with our client certificate, via HTTP/1.1.
    let seen = up.observed.last().unwrap();
    assert_eq!(seen.serial, w.client.serial);
    assert_eq!(seen.alpn.as_deref(), Some("http/1.1"));
    drop(s);

    // An upgrade the upstream declines is an ordinary response, and ends the connection.
    let req = format!("GET /report HTTP/1.1\r\nHost: {HOST}\r\n{WS_UPGRADE}\r\n");
    let (head, mut s, mut rest) = raw_exchange(addr, req.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(raw_header(&head, "connection"), Some("close"), "{head}");
    within("the sidecar closing the connection", s.read_to_end(&mut rest))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_headers_are_stripped_without_allow_upgrade() {
    let w = HttpWorld::new();
    // HTTP/1.1 upstream: an h2 client would drop Upgrade by itself and hide a bug.
    let up = w.upstream_h1().await;
    let (_sc, addr) = w.sidecar(&orders(up.addr, "")).await;

    let req = format!("GET /report HTTP/1.1\r\nHost: {HOST}\r\n{WS_UPGRADE}Content-Length: 0\r\n\r\n");
    let (head, mut s, mut body) = raw_exchange(addr, req.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "no upgrade happens: {head}");
    let len: usize = raw_header(&head, "content-length").unwrap().parse().unwrap();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = within("the response body", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0);
        body.extend_from_slice(&chunk[..n]);
    }
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        seen_header(&j, "upgrade"),
        None,
        "Upgrade must not reach the upstream: {j}"
    );
    assert_eq!(seen_header(&j, "connection"), None, "{j}");
    assert_eq!(
        seen_header(&j, "sec-websocket-key").as_deref(),
        Some("dGhlIHNhbXBsZSBub25jZQ=="),
        "end-to-end headers still pass: {j}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_do_not_reach_the_upstream() {
    let w = HttpWorld::new();
    let up1 = w.upstream_h1().await;
    let up2 = w.upstream().await;
    for (up, what) in [(&up1, "http/1.1 upstream"), (&up2, "h2 upstream")] {
        let (_sc, addr) = w.sidecar(&orders(up.addr, "")).await;
        let req = Request::get("/h")
            .header("host", HOST)
            .header("connection", "x-foo, keep-alive")
            .header("x-foo", "hop")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic c2VjcmV0")
            .header("proxy-connection", "keep-alive")
            .header("te", "trailers")
            .header("x-end-to-end", "kept")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(addr, false, req).await;
        assert_eq!(r.head.status, 200, "{what}: {}", r.text());
        let j = r.json();
        for gone in [
            "x-foo",
            "keep-alive",
            "proxy-authorization",
            "proxy-connection",
            "connection",
        ] {
            assert_eq!(seen_header(&j, gone), None, "{what}: `{gone}` is hop-by-hop: {j}");
        }
        assert_eq!(seen_header(&j, "te").as_deref(), Some("trailers"), "{what}: {j}");
        assert_eq!(seen_header(&j, "x-end-to-end").as_deref(), Some("kept"), "{what}: {j}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofable_headers_from_the_app_are_stripped() {
    let w = HttpWorld::new();
    let up = w.upstream_h1().await;
    let (_sc, addr) = w.sidecar(&orders(up.addr, "")).await;
    let req = Request::get("/s")
        .header("host", HOST)
        .header("x-forwarded-host", "admin.internal")
        .header("x-mtls-sidecar-error", "no_route")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(addr, false, req).await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    assert_eq!(r.error_reason(), None);
    let j = r.json();
    assert_eq!(seen_header(&j, "x-forwarded-host"), None, "{j}");
    assert_eq!(seen_header(&j, "x-mtls-sidecar-error"), None, "{j}");
    assert_eq!(j["host"], HOST, "{j}");
}

#[tokio::test(flavor = "multi_thread")]
async fn big_response_bodies_stream_through() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w.sidecar(&orders(up.addr, "timeout_ms: 10000")).await;
    for h2 in [false, true] {
        let size = 8 * 1024 * 1024 + 123;
        let r = tokio::time::timeout(
            STEP * 4,
            send(addr, h2, get_req(&format!("http://{HOST}/big/{size}"), Some(HOST))),
        )
        .await
        .expect("an 8 MiB response in time");
        assert_eq!(r.head.status, 200);
        assert_eq!(r.body.len(), size, "h2c app: {h2}");
        assert!(r.body.iter().all(|b| *b == b'x'));
    }
}
