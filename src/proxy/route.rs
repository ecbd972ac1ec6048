//! Route matching with Emissary `Mapping` semantics: authority (exact or `*.suffix`,
//! port-insensitive unless a port is given) and path prefix, the longest prefix winning.

use crate::config::{is_dns_name, split_host_port};

/// A mapping's `host`/`hostname`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// No host given, or `*`: any authority.
    Any,
    /// `orders.shop.svc` (optionally with `:port`).
    Exact {
        /// Lower-case host without a trailing dot.
        host: String,
        /// Port that must match, if written.
        port: Option<u16>,
    },
    /// `*.shop.svc`: any name ending in `.shop.svc` (not `shop.svc` itself).
    Suffix {
        /// Lower-case `.shop.svc`.
        suffix: String,
        /// Port that must match, if written.
        port: Option<u16>,
    },
}

/// Lower-cases a host and drops a trailing dot.
fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl HostPattern {
    /// Parses `*`, `name`, `name:port`, `*.suffix`, `*.suffix:port`, `[v6]:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s == "*" {
            return Ok(HostPattern::Any);
        }
        let (host, port) = split_host_port(s).map_err(|e| format!("`{s}`: {e}"))?;
        if let Some(rest) = host.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') || !is_dns_name(rest.trim_end_matches('.')) {
                return Err(format!("`{s}` is not a valid wildcard (use *.example.svc)"));
            }
            return Ok(HostPattern::Suffix {
                suffix: format!(".{}", normalize(rest)),
                port,
            });
        }
        if host.contains('*') {
            return Err(format!("`{s}`: only a leading `*.` wildcard is supported"));
        }
        if host.parse::<std::net::IpAddr>().is_err() && !is_dns_name(host.trim_end_matches('.')) {
            return Err(format!("`{s}` is not a valid host name"));
        }
        Ok(HostPattern::Exact {
            host: normalize(host),
            port,
        })
    }

    /// Whether a normalized request host (and its port, if any) matches.
    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        let port_ok = |want: &Option<u16>| want.is_none() || *want == port;
        match self {
            HostPattern::Any => true,
            HostPattern::Exact { host: h, port: p } => h == host && port_ok(p),
            HostPattern::Suffix { suffix, port: p } => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str()) && port_ok(p)
            }
        }
    }

    /// Exact beats suffix beats any; a longer suffix beats a shorter one.
    fn specificity(&self) -> usize {
        match self {
            HostPattern::Any => 0,
            HostPattern::Suffix { suffix, .. } => 1 + suffix.len(),
            HostPattern::Exact { .. } => usize::MAX,
        }
    }
}

/// Splits an authority into a normalized host and its port.
pub fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = split_host_port(authority).ok()?;
    if host.is_empty() {
        return None;
    }
    Some((normalize(host), port))
}

/// One route of a table.
#[derive(Debug, Clone)]
pub struct Route<T> {
    /// Authority pattern.
    pub host: HostPattern,
    /// Path prefix (or exact path).
    pub prefix: String,
    /// Match `prefix` as the whole path.
    pub exact: bool,
    /// What the route leads to.
    pub value: T,
}

/// Routes ordered so the first match is the best one.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    routes: Vec<Route<T>>,
}

impl<T> RouteTable<T> {
    /// Orders routes: longer prefix first, then more specific host, then exact over prefix.
    pub fn new(mut routes: Vec<Route<T>>) -> Self {
        routes.sort_by(|a, b| {
            (b.prefix.len(), b.host.specificity(), b.exact).cmp(&(a.prefix.len(), a.host.specificity(), a.exact))
        });
        RouteTable { routes }
    }

    /// The best route for a request: `authority` as sent (Host or absolute-form), `path`
    /// without the query string. `None` means refuse with `no_route`.
    pub fn lookup(&self, authority: &str, path: &str) -> Option<&Route<T>> {
        let (host, port) = split_authority(authority)?;
        self.routes.iter().find(|r| {
            let path_ok = if r.exact {
                path == r.prefix
            } else {
                path.starts_with(r.prefix.as_str())
            };
            path_ok && r.host.matches(&host, port)
        })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// Emissary's rewrite: the matched prefix is replaced by `rewrite` (default `/`); an empty
/// rewrite keeps the path. The query string is kept.
pub fn rewrite_path(path_and_query: &str, prefix: &str, rewrite: Option<&str>) -> String {
    let rewrite = rewrite.unwrap_or("/");
    if rewrite.is_empty() {
        return path_and_query.to_owned();
    }
    match path_and_query.strip_prefix(prefix) {
        Some(rest) => {
            let mut out = String::with_capacity(rewrite.len() + rest.len() + 1);
            out.push_str(rewrite);
            // `/upstream/` + rewrite `/` + rest `x` → `/x`; `/api` + `/v2` + `/x` → `/v2/x`.
            if out.ends_with('/') && rest.starts_with('/') {
                out.push_str(&rest[1..]);
            } else {
                out.push_str(rest);
            }
            if !out.starts_with('/') {
                out.insert(0, '/');
            }
            out
        }
        None => path_and_query.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable<&'static str> {
        let r = |host: &str, prefix: &str, value| Route {
            host: HostPattern::parse(host).unwrap(),
            prefix: prefix.to_owned(),
            exact: false,
            value,
        };
        RouteTable::new(vec![
            r("", "/", "catch-all"),
            r("orders.shop.svc", "/", "orders"),
            r("orders.shop.svc", "/api/v2/", "orders-v2"),
            r("*.shop.svc", "/", "shop-wildcard"),
            r("pay.shop.svc:8443", "/", "pay-8443"),
        ])
    }

    #[test]
    fn longest_prefix_then_most_specific_host() {
        let t = table();
        assert_eq!(t.lookup("orders.shop.svc", "/api/v2/x").unwrap().value, "orders-v2");
        assert_eq!(t.lookup("orders.shop.svc:80", "/api/v1").unwrap().value, "orders");
        assert_eq!(t.lookup("ORDERS.shop.svc.", "/").unwrap().value, "orders");
        assert_eq!(t.lookup("cart.shop.svc", "/").unwrap().value, "shop-wildcard");
        assert_eq!(t.lookup("pay.shop.svc:8443", "/").unwrap().value, "pay-8443");
        assert_eq!(t.lookup("pay.shop.svc:9000", "/").unwrap().value, "shop-wildcard");
        assert_eq!(t.lookup("elsewhere", "/").unwrap().value, "catch-all");
    }

    #[test]
    fn wildcard_does_not_match_the_bare_suffix() {
        let p = HostPattern::parse("*.shop.svc").unwrap();
        assert!(p.matches("a.shop.svc", None));
        assert!(!p.matches("shop.svc", None));
        assert!(!p.matches("evilshop.svc", None));
    }

    #[test]
    fn no_route_without_a_match() {
        let t = RouteTable::new(vec![Route {
            host: HostPattern::parse("orders").unwrap(),
            prefix: "/upstream/".to_owned(),
            exact: false,
            value: (),
        }]);
        assert!(t.lookup("orders", "/upstream").is_none());
        assert!(t.lookup("other", "/upstream/x").is_none());
        assert!(t.lookup("", "/upstream/x").is_none());
    }

    #[test]
    fn rewrites_like_emissary() {
        assert_eq!(rewrite_path("/upstream/x?a=1", "/upstream/", None), "/x?a=1");
        assert_eq!(rewrite_path("/upstream/", "/upstream/", None), "/");
        assert_eq!(rewrite_path("/api/x", "/api", Some("/v2")), "/v2/x");
        assert_eq!(rewrite_path("/api/x", "/api/", Some("")), "/api/x");
    }
}
