//! Hop-by-hop headers (RFC 9110 §7.6.1) and headers the app must not be able to spoof.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The sidecar's own error header; stripped from what the app sends and the upstream returns
/// so nobody can fake a sidecar verdict.
pub const ERROR_HEADER: &str = "x-mtls-sidecar-error";

const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether the request asks for a protocol upgrade to `websocket`.
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    let upgrade = headers.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
    });
    upgrade && connection_lists(headers, "upgrade")
}

fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Removes hop-by-hop headers in place. `keep_upgrade` keeps `Connection: upgrade` and
/// `Upgrade` for a permitted WebSocket handshake. `TE: trailers` survives (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named by Connection are hop-by-hop too (RFC 9110 §7.6.1).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .collect();
    for name in listed {
        if name != header::TE {
            headers.remove(&name);
        }
    }
    headers.remove(header::CONNECTION);
    headers.remove(PROXY_CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::TRANSFER_ENCODING);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Strips headers the app could use to impersonate routing or sidecar verdicts.
pub fn strip_spoofable(headers: &mut HeaderMap) {
    headers.remove(X_FORWARDED_HOST);
    headers.remove(ERROR_HEADER);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn removes_connection_listed_and_proxy_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip, trailers"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn keeps_websocket_upgrade_when_allowed() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_websocket(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }
}
