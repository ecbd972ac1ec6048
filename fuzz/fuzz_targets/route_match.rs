//! Route matching on attacker-controlled authority and path: never panics, and the upstream
//! is always one of the table's mappings (or none).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::proxy::route::{HostPattern, Route, RouteTable, rewrite_path, split_authority};

fn table() -> RouteTable<u8> {
    let r = |host: &str, prefix: &str, exact: bool, v: u8| Route {
        host: HostPattern::parse(host).expect("valid pattern"),
        prefix: prefix.to_owned(),
        exact,
        value: v,
    };
    RouteTable::new(vec![
        r("orders.shop.svc", "/api/", false, 1),
        r("*.shop.svc", "/", false, 2),
        r("pay.shop.svc:8443", "/", false, 3),
        r("*", "/upstream/", false, 4),
        r("[fd00::1]", "/exact", true, 5),
    ])
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (authority, path) = text.split_once('\n').unwrap_or((text, "/"));
    let t = table();
    if let Some(route) = t.lookup(authority, path) {
        assert!((1..=5).contains(&route.value));
        let rewritten = rewrite_path(path, &route.prefix, Some("/"));
        assert!(rewritten.starts_with('/') || !path.starts_with('/'));
        // A match implies the authority parsed.
        assert!(split_authority(authority).is_some());
    }
    let _ = HostPattern::parse(authority);
    let _ = mtls_sidecar::config::ServiceTarget::parse(authority);
});
