//! A throwaway PKI on rcgen: a CA, server and client leaves of every key type the sidecar
//! supports, any validity window, SPIFFE URIs, key re-encodings (PKCS#1, SEC1) and CRLs.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
    SignatureAlgorithm,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::tls::info::CertInfo;

/// Key algorithms a test can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 (the default).
    P256,
    /// ECDSA P-384.
    P384,
    /// ECDSA P-521 (needs the aws-lc-rs provider).
    P521,
    /// Ed25519.
    Ed25519,
    /// RSA 2048.
    Rsa2048,
}

impl KeyKind {
    fn alg(self) -> &'static SignatureAlgorithm {
        match self {
            KeyKind::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::P521 => &rcgen::PKCS_ECDSA_P521_SHA512,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
            KeyKind::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    fn generate(self) -> KeyPair {
        let r = match self {
            KeyKind::Rsa2048 => KeyPair::generate_rsa_for(self.alg(), rcgen::RsaKeySize::_2048),
            _ => KeyPair::generate_for(self.alg()),
        };
        r.unwrap_or_else(|e| panic!("generating a {self:?} key: {e}"))
    }
}

/// How a private key is written to PEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// `PRIVATE KEY` (PKCS#8).
    Pkcs8,
    /// `RSA PRIVATE KEY` (PKCS#1); RSA keys only.
    Pkcs1,
    /// `EC PRIVATE KEY` (SEC1); ECDSA keys only.
    Sec1,
    /// SEC1 after an `EC PARAMETERS` block, as `openssl ecparam -genkey` writes it (P-256).
    Sec1WithParams,
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    cn: String,
    dns: Vec<String>,
    uris: Vec<String>,
    ips: Vec<IpAddr>,
    kind: KeyKind,
    not_before: SystemTime,
    not_after: SystemTime,
    server: bool,
    client: bool,
}

impl LeafSpec {
    /// A server certificate for `dns` (valid for a day, from an hour ago).
    pub fn server(dns: &str) -> Self {
        LeafSpec {
            cn: dns.to_owned(),
            dns: vec![dns.to_owned()],
            server: true,
            client: false,
            ..Self::base()
        }
    }

    /// A client certificate with common name `cn`.
    pub fn client(cn: &str) -> Self {
        LeafSpec {
            cn: cn.to_owned(),
            server: false,
            client: true,
            ..Self::base()
        }
    }

    fn base() -> Self {
        let now = SystemTime::now();
        LeafSpec {
            cn: String::new(),
            dns: Vec::new(),
            uris: Vec::new(),
            ips: Vec::new(),
            kind: KeyKind::P256,
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(86_400),
            server: false,
            client: false,
        }
    }

    /// Uses another key algorithm.
    pub fn key(mut self, kind: KeyKind) -> Self {
        self.kind = kind;
        self
    }

    /// Sets the validity window.
    pub fn valid(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Adds a DNS SAN.
    pub fn dns(mut self, name: &str) -> Self {
        self.dns.push(name.to_owned());
        self
    }

    /// Adds a URI SAN (e.g. a SPIFFE ID).
    pub fn uri(mut self, uri: &str) -> Self {
        self.uris.push(uri.to_owned());
        self
    }

    /// Adds an IP SAN.
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ips.push(ip);
        self
    }
}

/// An issued certificate and its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// PKCS#8 DER of the key.
    pub key_pkcs8: Vec<u8>,
    /// Serial as the sidecar prints it (colon-separated hex).
    pub serial: String,
    /// Subject DN as the sidecar prints it.
    pub subject: String,
    kind: KeyKind,
}

impl Leaf {
    /// The key in another PEM encoding.
    pub fn key_pem_as(&self, format: KeyFormat) -> String {
        let inner = pkcs8_inner_key(&self.key_pkcs8);
        match (format, self.kind) {
            (KeyFormat::Pkcs8, _) => self.key_pem.clone(),
            (KeyFormat::Pkcs1, KeyKind::Rsa2048) => pem("RSA PRIVATE KEY", inner),
            (KeyFormat::Sec1, KeyKind::P256 | KeyKind::P384 | KeyKind::P521) => pem("EC PRIVATE KEY", inner),
            (KeyFormat::Sec1WithParams, KeyKind::P256) => {
                // OID 1.2.840.10045.3.1.7 (prime256v1), DER-encoded.
                let params = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
                format!("{}{}", pem("EC PARAMETERS", &params), pem("EC PRIVATE KEY", inner))
            }
            (f, k) => panic!("{f:?} is not an encoding of a {k:?} key"),
        }
    }

    /// Certificate followed by `chain` (leaf first, as `tls.crt` carries it).
    pub fn chain_pem(&self, chain: &[&str]) -> String {
        let mut s = self.cert_pem.clone();
        for c in chain {
            s.push_str(c);
        }
        s
    }
}

/// A certificate authority that lives for one test or demo.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, DER.
    pub der: CertificateDer<'static>,
    next_crl: std::sync::atomic::AtomicU64,
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).unwrap_or_else(|_| panic!("system RNG failed"));
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x10; // and without a leading zero byte, so the printed form is stable
    SerialNumber::from_slice(&bytes)
}

impl TestCa {
    /// A P-256 CA named `cn`, valid from an hour ago for ten years.
    pub fn new(cn: &str) -> Self {
        Self::with_key(cn, KeyKind::P256)
    }

    /// A CA with the given key algorithm.
    pub fn with_key(cn: &str, kind: KeyKind) -> Self {
        let key = kind.generate();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "mtls-sidecar test PKI");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_offset(SystemTime::now() - Duration::from_secs(3600));
        params.not_after = to_offset(SystemTime::now() + Duration::from_secs(10 * 365 * 86_400));
        params.serial_number = Some(random_serial());
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("self-signing the test CA: {e}"));
        TestCa {
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            next_crl: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Issues a leaf.
    pub fn issue(&self, spec: &LeafSpec) -> Leaf {
        let key = spec.kind.generate();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, spec.cn.as_str());
        params.subject_alt_names = spec
            .dns
            .iter()
            .filter_map(|d| d.clone().try_into().ok().map(SanType::DnsName))
            .chain(
                spec.uris
                    .iter()
                    .filter_map(|u| u.clone().try_into().ok().map(SanType::URI)),
            )
            .chain(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        params.not_before = to_offset(spec.not_before);
        params.not_after = to_offset(spec.not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.kind == KeyKind::Rsa2048 {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        if spec.server {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("issuing {}: {e}", spec.cn));
        let der = cert.der().clone();
        let info =
            CertInfo::parse(&der, std::path::Path::new("-")).unwrap_or_else(|e| panic!("parsing a fresh cert: {e}"));
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_pkcs8: key.serialize_der(),
            der,
            serial: info.serial,
            subject: info.subject,
            kind: spec.kind,
        }
    }

    /// A server certificate for `dns`.
    pub fn server(&self, dns: &str) -> Leaf {
        self.issue(&LeafSpec::server(dns))
    }

    /// A client certificate for `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.issue(&LeafSpec::client(cn))
    }

    /// A client certificate that expired an hour ago.
    pub fn expired_client(&self, cn: &str) -> Leaf {
        let now = SystemTime::now();
        self.issue(&LeafSpec::client(cn).valid(now - Duration::from_secs(86_400), now - Duration::from_secs(3600)))
    }

    /// A PEM CRL revoking the given leaves.
    pub fn crl(&self, revoked: &[&Leaf]) -> String {
        let now = SystemTime::now();
        let number = self.next_crl.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let params = CertificateRevocationListParams {
            this_update: to_offset(now - Duration::from_secs(60)),
            next_update: to_offset(now + Duration::from_secs(86_400)),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|l| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial_bytes(&l.serial)),
                    revocation_time: to_offset(now - Duration::from_secs(60)),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .unwrap_or_else(|e| panic!("signing a CRL: {e}"))
            .pem()
            .unwrap_or_else(|e| panic!("encoding a CRL: {e}"))
    }
}

fn serial_bytes(s: &str) -> Vec<u8> {
    s.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect()
}

/// The private key inside a PKCS#8 `PrivateKeyInfo` (its `privateKey` OCTET STRING), which
/// is the PKCS#1 or SEC1 encoding of the same key.
fn pkcs8_inner_key(der: &[u8]) -> &[u8] {
    fn read(b: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = b[0];
        let (len, hdr) = if b[1] & 0x80 == 0 {
            (b[1] as usize, 2)
        } else {
            let n = (b[1] & 0x7f) as usize;
            (b[2..2 + n].iter().fold(0usize, |a, x| (a << 8) | *x as usize), 2 + n)
        };
        (tag, &b[hdr..hdr + len], &b[hdr + len..])
    }
    let (_, seq, _) = read(der);
    let (_, _version, rest) = read(seq);
    let (_, _alg, rest) = read(rest);
    let (tag, key, _) = read(rest);
    assert_eq!(tag, 0x04, "PKCS#8 privateKey is an OCTET STRING");
    key
}

/// PEM-encodes `der` under `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, b)| a | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
