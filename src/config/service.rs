//! Emissary's `service` field: `[scheme://]host[:port]`.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// The scheme written in a `service`, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scheme {
    /// `http://`
    Http,
    /// `https://`
    Https,
}

/// A parsed `service`: where an upstream lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceTarget {
    /// Explicit scheme, if written.
    pub scheme: Option<Scheme>,
    /// Host name (trailing dot kept: it saves the resolver the `ndots` search) or IP.
    pub host: String,
    /// Explicit port, if written.
    pub port: Option<u16>,
}

impl ServiceTarget {
    /// Parses `[scheme://]host[:port]`; IPv6 literals need brackets.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (scheme, rest) = match s.split_once("://") {
            Some(("http", rest)) => (Some(Scheme::Http), rest),
            Some(("https", rest)) => (Some(Scheme::Https), rest),
            Some((other, _)) => {
                return Err(format!(
                    "`{s}`: scheme `{other}` is not supported (use http:// or https://)"
                ));
            }
            None => (None, s),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return Err(format!(
                "`{s}`: a service is `[scheme://]host[:port]`, without path, query or user"
            ));
        }
        let (host, port) = split_host_port(rest).map_err(|e| format!("`{s}`: {e}"))?;
        if host.is_empty() {
            return Err(format!("`{s}`: the host is empty"));
        }
        if host.parse::<IpAddr>().is_err() && !is_dns_name(host.trim_end_matches('.')) {
            return Err(format!("`{s}`: `{host}` is not a valid host name or IP address"));
        }
        Ok(ServiceTarget {
            scheme,
            host: host.to_owned(),
            port,
        })
    }

    /// The port to connect to: explicit, else 443 with TLS and 80 without.
    pub fn port_or_default(&self, tls: bool) -> u16 {
        self.port.unwrap_or(if tls { 443 } else { 80 })
    }

    /// The host as an IP address, if it is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The host without a trailing dot: the name used for SNI and certificate checks.
    pub fn name_for_tls(&self) -> &str {
        self.host.strip_suffix('.').unwrap_or(&self.host)
    }
}

impl fmt::Display for ServiceTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Splits `host[:port]` and `[v6][:port]`.
pub fn split_host_port(s: &str) -> Result<(&str, Option<u16>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed `[` in IPv6 address".to_owned())?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`{host}` is not an IPv6 address"));
        }
        return match after {
            "" => Ok((host, None)),
            p => match p.strip_prefix(':') {
                Some(p) => parse_port(p).map(|p| (host, Some(p))),
                None => Err(format!("unexpected `{p}` after the IPv6 address")),
            },
        };
    }
    match s.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Err("an IPv6 address needs brackets, e.g. [fd00::1]:443".to_owned()),
        Some((host, port)) => parse_port(port).map(|p| (host, Some(p))),
        None => Ok((s, None)),
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{p}` is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

/// Whether `s` is a syntactically valid DNS name (labels of letters, digits, `-`, `_`).
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_emissary_accepts() {
        let t = ServiceTarget::parse("upstream-service").unwrap();
        assert_eq!((t.scheme, t.host.as_str(), t.port), (None, "upstream-service", None));
        assert_eq!(t.port_or_default(true), 443);
        assert_eq!(t.port_or_default(false), 80);
        let t = ServiceTarget::parse("https://orders.shop.svc:8443").unwrap();
        assert_eq!(
            (t.scheme, t.host.as_str(), t.port),
            (Some(Scheme::Https), "orders.shop.svc", Some(8443))
        );
        let t = ServiceTarget::parse("[fd00::1]:443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", Some(443)));
        let t = ServiceTarget::parse("orders.shop.svc.cluster.local.:443").unwrap();
        assert_eq!(t.name_for_tls(), "orders.shop.svc.cluster.local");
    }

    #[test]
    fn rejects_what_is_not_a_service() {
        for bad in [
            "ftp://x",
            "x/path",
            "x:0",
            "x:99999",
            "fd00::1:443",
            "[zz]:1",
            "",
            "bad host",
            "user@x",
        ] {
            assert!(ServiceTarget::parse(bad).is_err(), "{bad} should fail");
        }
    }
}
