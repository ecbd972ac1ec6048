//! The HTTP listener's routing, end to end: forward-proxy (absolute-form) and Host-routed
//! requests through one table, Emissary prefix/rewrite/host_rewrite semantics, longest
//! prefix, wildcard hosts, and the refusals that happen before any upstream work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "http_support/mod.rs"]
mod http_support;

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use http_support::{HttpWorld, assert_sidecar_error, get, get_req, mapping, metric, send};

/// The upstream report says the request came with our client certificate, over mTLS.
fn assert_mtls(json: &serde_json::Value, w: &HttpWorld) {
    assert_eq!(json["client_serial"], w.client.serial.as_str(), "{json}");
    assert_eq!(json["client_subject"], "CN=app.shop", "{json}");
}

#[tokio::test(flavor = "multi_thread")]
async fn forward_proxy_absolute_form_is_routed_by_authority() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w
        .sidecar(&mapping("orders", up.addr, "host: orders.shop.svc, prefix: /upstream/"))
        .await;

    let r = send(
        addr,
        false,
        get_req("http://orders.shop.svc/upstream/x?q=1", Some("orders.shop.svc")),
    )
    .await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    let j = r.json();
    assert_mtls(&j, &w);
    assert_eq!(j["path"], "/x?q=1", "prefix rewritten to `/`, query kept: {j}");
    assert_eq!(j["host"], "orders.shop.svc", "{j}");
    assert_eq!(j["method"], "GET");
    assert_eq!(up.observed.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn origin_form_is_routed_by_the_host_header() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w
        .sidecar(&mapping("orders", up.addr, "host: orders.shop.svc, prefix: /upstream/"))
        .await;

    let r = get(addr, "orders.shop.svc:80", "/upstream/api/items").await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    let j = r.json();
    assert_mtls(&j, &w);
    assert_eq!(j["path"], "/api/items", "{j}");
    assert_eq!(j["host"], "orders.shop.svc:80", "the app's Host is forwarded: {j}");

    // A different Host with the same path is another destination: not routed.
    let r = get(addr, "payments.shop.svc", "/upstream/api/items").await;
    assert_sidecar_error(&r, 403, "no_route");
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrite_and_host_rewrite() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let mappings = [
        mapping("default-rewrite", up.addr, "host: a.shop.svc, prefix: /upstream/"),
        mapping("v2", up.addr, "host: b.shop.svc, prefix: /api/, rewrite: /v2/"),
        mapping("keep", up.addr, "host: c.shop.svc, prefix: /keep/, rewrite: \"\""),
        mapping(
            "host-rewrite",
            up.addr,
            "host: d.shop.svc, prefix: /, host_rewrite: internal.orders.svc",
        ),
    ]
    .concat();
    let (_sc, addr) = w.sidecar(&mappings).await;

    let j = get(addr, "a.shop.svc", "/upstream/x").await.json();
    assert_eq!(j["path"], "/x", "Emissary's default rewrite is `/`: {j}");
    let j = get(addr, "a.shop.svc", "/upstream/").await.json();
    assert_eq!(j["path"], "/", "{j}");

    let j = get(addr, "b.shop.svc", "/api/users/7").await.json();
    assert_eq!(j["path"], "/v2/users/7", "{j}");
    assert_eq!(j["host"], "b.shop.svc", "{j}");

    let j = get(addr, "c.shop.svc", "/keep/this").await.json();
    assert_eq!(j["path"], "/keep/this", "an empty rewrite keeps the path: {j}");

    let j = get(addr, "d.shop.svc", "/p").await.json();
    assert_eq!(j["host"], "internal.orders.svc", "host_rewrite replaces Host: {j}");
    assert_eq!(j["path"], "/p", "{j}");
    assert_mtls(&j, &w);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_longest_prefix_wins() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    // The shorter prefix comes first in the file: order must not matter.
    let mappings = [
        mapping(
            "short",
            up.addr,
            "host: orders.shop.svc, prefix: /api/, rewrite: /short/",
        ),
        mapping(
            "long",
            up.addr,
            "host: orders.shop.svc, prefix: /api/v2/, rewrite: /long/",
        ),
        mapping("root", up.addr, "host: orders.shop.svc, prefix: /, rewrite: /root/"),
    ]
    .concat();
    let (sc, addr) = w.sidecar(&mappings).await;

    let j = get(addr, "orders.shop.svc", "/api/v2/x").await.json();
    assert_eq!(j["path"], "/long/x", "{j}");
    let j = get(addr, "orders.shop.svc", "/api/v1/x").await.json();
    assert_eq!(j["path"], "/short/v1/x", "{j}");
    let j = get(addr, "orders.shop.svc", "/other").await.json();
    assert_eq!(j["path"], "/root/other", "{j}");

    let text = sc.metrics.render();
    for name in ["long", "short", "root"] {
        assert_eq!(
            metric(
                &text,
                "mtls_sidecar_requests_total",
                &[("mapping", name), ("code", "200")]
            ),
            1.0,
            "requests_total for mapping {name}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wildcard_host_matches_subdomains_only() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w
        .sidecar(&mapping("shop", up.addr, "host: \"*.shop.svc\", prefix: /"))
        .await;

    for host in ["cart.shop.svc", "CART.Shop.Svc", "a.b.shop.svc:8080"] {
        let r = get(addr, host, "/x").await;
        assert_eq!(r.head.status, 200, "{host}: {}", r.text());
        assert_eq!(r.json()["host"], host, "{host}");
    }
    for host in ["shop.svc", "evilshop.svc", "cart.shop.svc.evil"] {
        let r = get(addr, host, "/x").await;
        assert_sidecar_error(&r, 403, "no_route");
    }
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 1, "one pooled connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn unmapped_destination_is_refused_before_any_connect() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (sc, addr) = w
        .sidecar(&mapping("orders", up.addr, "host: orders.shop.svc, prefix: /upstream/"))
        .await;

    // Absolute-form to a host no mapping names: the sidecar is not an open proxy, even
    // when the "destination" is the upstream's own address.
    let target = format!("http://{}/upstream/x", up.addr);
    let r = send(addr, false, get_req(&target, Some(&up.addr.to_string()))).await;
    assert_sidecar_error(&r, 403, "no_route");
    assert!(r.text().contains("Mapping"), "the body says what to add: {}", r.text());
    // The right host, a path outside the prefix.
    let r = get(addr, "orders.shop.svc", "/other").await;
    assert_sidecar_error(&r, 403, "no_route");

    assert_eq!(
        up.observed.accepted.load(Ordering::SeqCst),
        0,
        "no TCP connection may reach the upstream for an unmapped destination"
    );
    let text = sc.metrics.render();
    assert_eq!(
        metric(
            &text,
            "mtls_sidecar_denied_total",
            &[("listener", "http"), ("reason", "no_route")]
        ),
        2.0,
        "{text}"
    );
    assert!(
        text.contains("mtls_sidecar_denied_total{listener=\"http\",reason=\"no_route\"} 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_route_is_counted_once_per_request() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (sc, addr) = w.sidecar(&mapping("orders", up.addr, "host: orders.shop.svc")).await;
    let r = get(addr, "unknown.shop.svc", "/").await;
    assert_sidecar_error(&r, 403, "no_route");
    let text = sc.metrics.render();
    assert!(
        text.contains("mtls_sidecar_denied_total{listener=\"http\",reason=\"no_route\"} 1"),
        "{text}"
    );
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_is_refused_with_a_reason() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (sc, addr) = w.sidecar(&mapping("orders", up.addr, "host: orders.shop.svc")).await;

    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("orders.shop.svc:443")
        .header("host", "orders.shop.svc:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(addr, false, req).await;
    assert_sidecar_error(&r, 403, "connect_method");
    assert!(r.text().contains("CONNECT"), "{}", r.text());
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 0);
    let text = sc.metrics.render();
    assert_eq!(
        metric(
            &text,
            "mtls_sidecar_denied_total",
            &[("listener", "http"), ("reason", "connect_method")]
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_uri_and_host_header_must_agree() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w.sidecar(&mapping("orders", up.addr, "host: orders.shop.svc")).await;

    // Routing must not be tricked into one mapping while the upstream sees another Host.
    let r = send(addr, false, get_req("http://orders.shop.svc/x", Some("evil.example"))).await;
    assert_sidecar_error(&r, 400, "host_mismatch");
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 0);

    // Same host, different port spelling: agreed.
    let r = send(
        addr,
        false,
        get_req("http://orders.shop.svc/x", Some("orders.shop.svc:80")),
    )
    .await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    assert_eq!(r.json()["client_serial"], w.client.serial.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_requests_use_the_same_route_table() {
    let w = HttpWorld::new();
    let up = w.upstream().await;
    let (_sc, addr) = w
        .sidecar(&mapping("orders", up.addr, "host: orders.shop.svc, prefix: /upstream/"))
        .await;

    let r = send(addr, true, get_req("http://orders.shop.svc/upstream/h2", None)).await;
    assert_eq!(r.head.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["path"], "/h2", "{j}");
    assert_eq!(j["version"], "HTTP/2.0", "{j}");
    assert_eq!(j["host"], "orders.shop.svc", "{j}");
    assert_mtls(&j, &w);

    let r = send(addr, true, get_req("http://elsewhere.svc/upstream/h2", None)).await;
    assert_sidecar_error(&r, 403, "no_route");
    assert_eq!(up.observed.accepted.load(Ordering::SeqCst), 1);
}
