//! TLSContext options by name: protocol versions, cipher suites, key-exchange groups, identities.
//!
//! Shared by config validation (to report bad names) and the config builder (to use them),
//! so the two can never disagree.

use std::net::IpAddr;

use rustls::crypto::{SupportedKxGroup, aws_lc_rs};
use rustls::pki_types::DnsName;
use rustls::{SupportedCipherSuite, SupportedProtocolVersion};

use crate::config::TlsContextConfig;

/// Parses `v1.2` / `v1.3` (also `1.2`, `TLSv1.2`).
pub fn parse_version(s: &str) -> Result<&'static SupportedProtocolVersion, String> {
    let norm = s.trim().to_ascii_lowercase();
    let norm = norm
        .strip_prefix("tlsv")
        .or_else(|| norm.strip_prefix('v'))
        .unwrap_or(&norm);
    match norm {
        "1.2" => Ok(&rustls::version::TLS12),
        "1.3" => Ok(&rustls::version::TLS13),
        "1.0" | "1.1" => Err(format!(
            "`{s}` is not supported by rustls (TLS 1.0 and 1.1 are obsolete); use v1.2 or v1.3"
        )),
        _ => Err(format!("`{s}` is not a TLS version; use v1.2 or v1.3")),
    }
}

/// The protocol versions a context allows, from its min/max settings.
pub fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static SupportedProtocolVersion>, Vec<(&'static str, String)>> {
    let mut errs = Vec::new();
    let min_v = match min.map(parse_version).transpose() {
        Ok(v) => v.unwrap_or(&rustls::version::TLS12),
        Err(e) => {
            errs.push(("min_tls_version", e));
            &rustls::version::TLS12
        }
    };
    let max_v = match max.map(parse_version).transpose() {
        Ok(v) => v.unwrap_or(&rustls::version::TLS13),
        Err(e) => {
            errs.push(("max_tls_version", e));
            &rustls::version::TLS13
        }
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let rank = |v: &SupportedProtocolVersion| {
        if v.version == rustls::ProtocolVersion::TLSv1_2 {
            2
        } else {
            3
        }
    };
    if rank(min_v) > rank(max_v) {
        return Err(vec![(
            "min_tls_version",
            format!(
                "`{}` is above max_tls_version `{}`",
                min.unwrap_or_default(),
                max.unwrap_or_default()
            ),
        )]);
    }
    Ok([&rustls::version::TLS13, &rustls::version::TLS12]
        .into_iter()
        .filter(|v| rank(v) >= rank(min_v) && rank(v) <= rank(max_v))
        .collect())
}

/// (OpenSSL name, IANA name, suite).
fn suite_table() -> [(&'static str, &'static str, SupportedCipherSuite); 9] {
    use aws_lc_rs::cipher_suite as cs;
    [
        (
            "TLS_AES_256_GCM_SHA384",
            "TLS_AES_256_GCM_SHA384",
            cs::TLS13_AES_256_GCM_SHA384,
        ),
        (
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_128_GCM_SHA256",
            cs::TLS13_AES_128_GCM_SHA256,
        ),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
        (
            "ECDHE-RSA-AES256-GCM-SHA384",
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "ECDHE-RSA-AES128-GCM-SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "ECDHE-RSA-CHACHA20-POLY1305",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ]
}

/// Default preference: TLS 1.3 before 1.2, then AES-128-GCM, AES-256-GCM, ChaCha20.
fn suite_rank(s: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as C;
    match s {
        C::TLS13_AES_128_GCM_SHA256 => 0,
        C::TLS13_AES_256_GCM_SHA384 => 1,
        C::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 3,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 4,
        _ => 5,
    }
}

/// Looks up a cipher suite by its OpenSSL or IANA name.
pub fn cipher_suite(name: &str) -> Result<SupportedCipherSuite, String> {
    let n = name.trim();
    suite_table()
        .into_iter()
        .find(|(o, i, _)| o.eq_ignore_ascii_case(n) || i.eq_ignore_ascii_case(n))
        .map(|(_, _, s)| s)
        .ok_or_else(|| {
            let names: Vec<_> = suite_table().iter().map(|(o, _, _)| *o).collect();
            format!(
                "unknown or unsupported cipher suite `{name}` (rustls offers only AEAD suites with forward secrecy: {})",
                names.join(", ")
            )
        })
}

/// Looks up a key-exchange group by name (`X25519`, `P-256`, `P-384`, `X25519MLKEM768`, …).
pub fn kx_group(name: &str) -> Result<&'static dyn SupportedKxGroup, String> {
    use aws_lc_rs::kx_group as kx;
    let n = name.trim().to_ascii_lowercase().replace(['_', '-'], "");
    match n.as_str() {
        "x25519" => Ok(kx::X25519),
        "p256" | "prime256v1" | "secp256r1" => Ok(kx::SECP256R1),
        "p384" | "secp384r1" => Ok(kx::SECP384R1),
        "x25519mlkem768" => Ok(kx::X25519MLKEM768),
        "secp256r1mlkem768" | "p256mlkem768" => Ok(kx::SECP256R1MLKEM768),
        "mlkem768" => Ok(kx::MLKEM768),
        "mlkem1024" => Ok(kx::MLKEM1024),
        _ => Err(format!(
            "unknown or unsupported curve `{name}` (use X25519, P-256, P-384, X25519MLKEM768, SecP256r1MLKEM768, MLKEM768 or MLKEM1024)"
        )),
    }
}

/// An expected upstream identity from `subject_alt_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A DNS SAN (wildcards in the certificate follow webpki rules).
    Dns(DnsName<'static>),
    /// An IP SAN.
    Ip(IpAddr),
    /// A URI SAN such as a SPIFFE ID, compared exactly.
    Uri(String),
}

/// Parses one `subject_alt_names` entry.
pub fn identity(s: &str) -> Result<Identity, String> {
    let s = s.trim();
    if s.contains(':') && !s.contains("://") && s.parse::<IpAddr>().is_err() && !s.starts_with("spiffe:") {
        return Err(format!(
            "`{s}` is neither a DNS name, an IP address nor a URI such as spiffe://trust.domain/ns/app"
        ));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Identity::Ip(ip));
    }
    if let Some((scheme, rest)) = s.split_once(':') {
        if scheme.is_empty()
            || rest.is_empty()
            || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return Err(format!("`{s}` is not a valid URI"));
        }
        return Ok(Identity::Uri(s.to_owned()));
    }
    DnsName::try_from(s.to_owned())
        .map(Identity::Dns)
        .map_err(|_| format!("`{s}` is not a valid DNS name"))
}

/// The crypto provider a context asks for: aws-lc-rs, narrowed to its suites and groups.
pub fn provider_for(ctx: &TlsContextConfig) -> Result<rustls::crypto::CryptoProvider, Vec<(&'static str, String)>> {
    let mut provider = aws_lc_rs::default_provider();
    // AES-128-GCM first (as BoringSSL and browsers order it): with TLS 1.3 it also selects
    // SHA-256 for the key schedule, which costs less per handshake than SHA-384, and AES-128
    // encrypts faster than AES-256, at a security margin nobody disputes. Servers that honour
    // the client's order (OpenSSL's default) pick it.
    provider.cipher_suites.sort_by_key(|s| suite_rank(s.suite()));
    let mut errs = Vec::new();
    if !ctx.cipher_suites.is_empty() {
        let mut suites = Vec::new();
        for name in &ctx.cipher_suites {
            match cipher_suite(name) {
                Ok(s) => suites.push(s),
                Err(e) => errs.push(("cipher_suites", e)),
            }
        }
        provider.cipher_suites = suites;
    }
    if !ctx.ecdh_curves.is_empty() {
        let mut groups = Vec::new();
        for name in &ctx.ecdh_curves {
            match kx_group(name) {
                Ok(g) => groups.push(g),
                Err(e) => errs.push(("ecdh_curves", e)),
            }
        }
        provider.kx_groups = groups;
    }
    match versions(ctx.min_tls_version.as_deref(), ctx.max_tls_version.as_deref()) {
        Ok(vs) if errs.is_empty() && !ctx.cipher_suites.is_empty() => {
            let usable = provider
                .cipher_suites
                .iter()
                .any(|s| vs.iter().any(|v| s.version() == *v));
            if !usable {
                errs.push((
                    "cipher_suites",
                    "none of the listed suites belongs to an allowed TLS version".to_owned(),
                ));
            }
        }
        Ok(_) => {}
        Err(e) => errs.extend(e),
    }
    if errs.is_empty() { Ok(provider) } else { Err(errs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_refuse_obsolete_and_inverted_ranges() {
        assert!(parse_version("v1.0").unwrap_err().contains("not supported by rustls"));
        assert!(parse_version("v1.1").unwrap_err().contains("not supported by rustls"));
        assert_eq!(versions(Some("v1.3"), None).unwrap().len(), 1);
        assert_eq!(versions(None, None).unwrap().len(), 2);
        assert!(versions(Some("v1.3"), Some("v1.2")).is_err());
    }

    #[test]
    fn suites_by_openssl_or_iana_name() {
        assert_eq!(
            cipher_suite("ECDHE-ECDSA-AES128-GCM-SHA256").unwrap().suite(),
            cipher_suite("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256").unwrap().suite()
        );
        assert!(cipher_suite("DES-CBC3-SHA").unwrap_err().contains("DES-CBC3-SHA"));
    }

    #[test]
    fn default_order_prefers_aes_128_gcm() {
        let p = provider_for(&TlsContextConfig::default()).unwrap();
        assert_eq!(
            p.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(
            p.cipher_suites[1].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let configured = TlsContextConfig {
            cipher_suites: vec!["TLS_AES_256_GCM_SHA384".into(), "TLS_AES_128_GCM_SHA256".into()],
            ..Default::default()
        };
        let p = provider_for(&configured).unwrap();
        assert_eq!(
            p.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "an explicit list keeps its order"
        );
    }

    #[test]
    fn identities() {
        assert!(matches!(
            identity("spiffe://cluster.local/ns/a/sa/b"),
            Ok(Identity::Uri(_))
        ));
        assert!(matches!(identity("orders.shop.svc"), Ok(Identity::Dns(_))));
        assert!(matches!(identity("10.0.0.1"), Ok(Identity::Ip(_))));
        assert!(identity("not a name").is_err());
    }
}
