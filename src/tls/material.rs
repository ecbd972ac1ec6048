//! Reading a context's files as one transaction, and turning the bytes into validated material.
//!
//! The kubelet publishes a Secret by writing a new `..YYYY_…` directory, renaming a
//! `..data_tmp` symlink over `..data`, then deleting the old directory. A reader that opens
//! `tls.crt` before the swap and `tls.key` after it would pair an old cert with a new key, and
//! one that opens a file just as the old directory is removed sees ENOENT. So we note where
//! `..data` points, read every file, look again, and retry if it moved or a file vanished.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::info::{CertInfo, key_type};
use crate::config::TlsContextConfig;

/// Secret key-name schemes: kubernetes.io/tls (cert-manager), Istio generic, istio-certs.
const SCHEMES: [[&str; 3]; 3] = [
    ["tls.crt", "tls.key", "ca.crt"],
    ["cert", "key", "cacert"],
    ["cert-chain.pem", "key.pem", "root-cert.pem"],
];
const CRL_NAMES: [&str; 2] = ["ca.crl", "crl.pem"];
const DATA_LINK: &str = "..data";
const READ_ATTEMPTS: usize = 5;

/// Why material could not be loaded; `kind()` is the metric label.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MaterialError {
    /// A file or key is missing.
    #[error("{what} not found: {detail}")]
    NotFound {
        /// Which piece.
        what: &'static str,
        /// Where we looked.
        detail: String,
    },
    /// EACCES on a file.
    #[error(
        "permission denied reading {path}: {detail}; set fsGroup and defaultMode 0440 on the Secret volume so this uid can read it"
    )]
    Permission {
        /// The file.
        path: PathBuf,
        /// Owner, mode and our ids.
        detail: String,
    },
    /// Another I/O error.
    #[error("cannot read {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// The files kept changing while we read them.
    #[error("the Secret volume changed {READ_ATTEMPTS} times while it was being read; will retry")]
    Unstable,
    /// PEM syntax.
    #[error("{path}: not valid PEM: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// No CERTIFICATE section.
    #[error("{path}: no CERTIFICATE section{found}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// Sections that were there instead.
        found: String,
    },
    /// No private key section.
    #[error("{path}: no private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section){found}")]
    NoKey {
        /// The file.
        path: PathBuf,
        /// Sections that were there instead.
        found: String,
    },
    /// More than one key.
    #[error("{path}: {count} private keys; the file must hold exactly one")]
    SeveralKeys {
        /// The file.
        path: PathBuf,
        /// How many.
        count: usize,
    },
    /// Encrypted PEM.
    #[error(
        "{path}: encrypted private keys are not supported; store the key unencrypted in the Secret (e.g. `openssl pkey -in key.pem -out plain.pem`)"
    )]
    EncryptedKey {
        /// The file.
        path: PathBuf,
    },
    /// A key rustls cannot use.
    #[error("{path}: unsupported private key: {message}")]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The key is not the leaf's key.
    #[error(
        "{key} does not match the certificate in {cert}; refusing a mismatched pair (a torn write or the wrong key)"
    )]
    KeyMismatch {
        /// Cert file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
    },
    /// Leaf expired.
    #[error("{path}: the client certificate expired at {at}")]
    CertExpired {
        /// The file.
        path: PathBuf,
        /// notAfter.
        at: String,
    },
    /// Leaf not yet valid.
    #[error("{path}: the client certificate is not valid before {at}")]
    CertNotYetValid {
        /// The file.
        path: PathBuf,
        /// notBefore.
        at: String,
    },
    /// Leaf does not parse as X.509.
    #[error("{path}: the certificate is not valid X.509: {message}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// CA bundle unusable.
    #[error("{path}: no usable CA certificate ({ignored} could not be parsed)")]
    NoCa {
        /// The file.
        path: PathBuf,
        /// Entries ignored.
        ignored: usize,
    },
    /// The options and material could not be combined into a client config.
    #[error("{0}")]
    Build(String),
    /// CRL unusable.
    #[error("{path}: CRL rejected: {message}")]
    Crl {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

impl MaterialError {
    /// Stable snake_case reason: metric label and log field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::Permission { .. } => "permission_denied",
            Self::Io { .. } => "io_error",
            Self::Unstable => "unstable",
            Self::Pem { .. } | Self::NoCertificate { .. } | Self::NoKey { .. } | Self::SeveralKeys { .. } => {
                "pem_error"
            }
            Self::EncryptedKey { .. } => "encrypted_key",
            Self::UnsupportedKey { .. } => "unsupported_key",
            Self::KeyMismatch { .. } => "key_mismatch",
            Self::CertExpired { .. } => "cert_expired",
            Self::CertNotYetValid { .. } => "cert_not_yet_valid",
            Self::BadCertificate { .. } => "bad_certificate",
            Self::NoCa { .. } => "no_ca",
            Self::Crl { .. } => "crl_error",
            Self::Build(_) => "build_error",
        }
    }
}

/// Where one context's files live. Built once from config; file names inside a Secret
/// directory are resolved at every read, since a Secret may be empty at start.
#[derive(Debug, Clone)]
pub struct Source {
    secret_dir: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
    crl_dir: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    crl_file: Option<PathBuf>,
    /// With insecure_skip_verify a missing CA bundle is not an error.
    ca_optional: bool,
}

/// The raw bytes of one consistent read.
pub struct Raw {
    /// Client chain file and bytes.
    pub cert: Option<(PathBuf, Vec<u8>)>,
    /// Key file and bytes.
    pub key: Option<(PathBuf, Vec<u8>)>,
    /// CA bundle file and bytes.
    pub ca: Option<(PathBuf, Vec<u8>)>,
    /// CRL file and bytes.
    pub crl: Option<(PathBuf, Vec<u8>)>,
    /// SHA-256 over all of the above: equal digests mean nothing changed.
    pub digest: [u8; 32],
}

impl Drop for Raw {
    fn drop(&mut self) {
        // Key bytes should not linger in freed memory.
        if let Some((_, k)) = &mut self.key {
            k.iter_mut().for_each(|b| *b = 0);
            std::hint::black_box(&k);
        }
    }
}

impl Source {
    /// Resolves a context's config against `secrets_dir`.
    pub fn new(cfg: &TlsContextConfig, secrets_dir: &Path) -> Self {
        Source {
            secret_dir: cfg.secret.as_ref().map(|s| secrets_dir.join(s)),
            ca_dir: cfg.ca_secret.as_ref().map(|s| secrets_dir.join(s)),
            crl_dir: cfg.crl_secret.as_ref().map(|s| secrets_dir.join(s)),
            cert_file: cfg.cert_chain_file.clone(),
            key_file: cfg.private_key_file.clone(),
            ca_file: cfg.cacert_chain_file.clone(),
            crl_file: cfg.crl_file.clone(),
            ca_optional: cfg.insecure_skip_verify,
        }
    }

    /// Whether this context presents a client certificate.
    pub fn has_client_identity(&self) -> bool {
        self.secret_dir.is_some() || self.cert_file.is_some()
    }

    /// Whether this context has any source of trust anchors.
    pub fn has_ca_source(&self) -> bool {
        self.secret_dir.is_some() || self.ca_dir.is_some() || self.ca_file.is_some()
    }

    /// Directories to watch: the Secret directories and the parents of explicit files.
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = [&self.secret_dir, &self.ca_dir, &self.crl_dir]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for f in [&self.cert_file, &self.key_file, &self.ca_file, &self.crl_file]
            .into_iter()
            .flatten()
        {
            if let Some(parent) = f.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Every file path the current layout points at (for the subPath check and reports).
    pub fn files(&self) -> Vec<PathBuf> {
        let (c, k, a, r) = self.resolve();
        [c, k, a, r].into_iter().flatten().collect()
    }

    fn resolve(&self) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
        let mut cert = self.cert_file.clone();
        let mut key = self.key_file.clone();
        let mut ca = self.ca_file.clone();
        if let Some(dir) = &self.secret_dir {
            let scheme = SCHEMES
                .iter()
                .find(|s| dir.join(s[0]).exists())
                .or_else(|| SCHEMES.iter().find(|s| dir.join(s[1]).exists()))
                .unwrap_or(&SCHEMES[0]);
            cert = Some(dir.join(scheme[0]));
            key = Some(dir.join(scheme[1]));
            if ca.is_none() && self.ca_dir.is_none() {
                let ca_name = SCHEMES
                    .iter()
                    .map(|s| s[2])
                    .find(|n| dir.join(n).exists())
                    .unwrap_or(scheme[2]);
                ca = Some(dir.join(ca_name));
            }
        }
        if let Some(dir) = &self.ca_dir {
            let name = SCHEMES
                .iter()
                .map(|s| s[2])
                .find(|n| dir.join(n).exists())
                .unwrap_or(SCHEMES[0][2]);
            ca = Some(dir.join(name));
        }
        if self.ca_optional && ca.as_ref().is_some_and(|p| !p.exists()) {
            ca = None;
        }
        let crl = match (&self.crl_file, &self.crl_dir) {
            (Some(f), _) => Some(f.clone()),
            (None, Some(dir)) => {
                Some(dir.join(CRL_NAMES.iter().find(|n| dir.join(n).exists()).unwrap_or(&CRL_NAMES[0])))
            }
            (None, None) => None,
        };
        (cert, key, ca, crl)
    }

    fn data_links(&self) -> Vec<Option<PathBuf>> {
        self.watch_dirs()
            .iter()
            .map(|d| std::fs::read_link(d.join(DATA_LINK)).ok())
            .collect()
    }

    /// Reads every file as one consistent snapshot (see the module comment).
    pub fn read(&self) -> Result<Raw, MaterialError> {
        let mut last = MaterialError::Unstable;
        for _ in 0..READ_ATTEMPTS {
            let before = self.data_links();
            let result = self.read_once();
            let after = self.data_links();
            if before != after {
                continue;
            }
            match result {
                // The old timestamped directory was removed under us; the next read sees the new one.
                Err(e @ MaterialError::NotFound { .. }) if before.iter().any(Option::is_some) => last = e,
                other => return other,
            }
        }
        Err(last)
    }

    fn read_once(&self) -> Result<Raw, MaterialError> {
        let (cert, key, ca, crl) = self.resolve();
        let cert = cert
            .map(|p| read_file(&p, "client certificate").map(|b| (p, b)))
            .transpose()?;
        let key = key.map(|p| read_file(&p, "private key").map(|b| (p, b))).transpose()?;
        let ca = ca.map(|p| read_file(&p, "CA bundle").map(|b| (p, b))).transpose()?;
        let crl = crl.map(|p| read_file(&p, "CRL").map(|b| (p, b))).transpose()?;
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in [&cert, &key, &ca, &crl] {
            match part {
                Some((_, b)) => {
                    ctx.update(&(b.len() as u64).to_be_bytes());
                    ctx.update(b);
                }
                None => ctx.update(&u64::MAX.to_be_bytes()),
            }
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ctx.finish().as_ref());
        Ok(Raw {
            cert,
            key,
            ca,
            crl,
            digest,
        })
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, MaterialError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => MaterialError::NotFound {
            what,
            detail: format!("{} does not exist", path.display()),
        },
        io::ErrorKind::PermissionDenied => MaterialError::Permission {
            path: path.to_owned(),
            detail: permission_detail(path),
        },
        _ => MaterialError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        },
    })
}

fn permission_detail(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let ours = format!(
        "this process runs as uid {} gid {}",
        crate::sys::euid(),
        crate::sys::egid()
    );
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "file mode {:04o}, owner uid {} gid {}; {ours}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        ),
        Err(_) => ours,
    }
}

/// Validated, parsed material: what one generation is built from.
pub struct Material {
    /// Client chain and signing key, if the context presents one.
    pub certified: Option<Arc<CertifiedKey>>,
    /// Trust anchors (absent only with insecure_skip_verify).
    pub roots: Option<Arc<RootCertStore>>,
    /// Revocation lists.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// The client chain, described.
    pub chain: Vec<CertInfo>,
    /// The CA bundle, described.
    pub ca: Vec<CertInfo>,
    /// CA entries that could not be used.
    pub ca_ignored: usize,
    /// Key algorithm and size, e.g. `ECDSA P-256`.
    pub key_type: Option<String>,
    /// Digest of the raw bytes.
    pub digest: [u8; 32],
}

/// Lists the PEM section labels present, for error messages.
fn labels(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let found: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .filter_map(|l| l.strip_suffix("-----"))
        .map(|l| match l {
            "DSA PRIVATE KEY" => "DSA PRIVATE KEY (DSA is not supported)".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    if found.is_empty() {
        " (the file holds no PEM sections)".to_owned()
    } else {
        format!(" (found: {})", found.join(", "))
    }
}

fn pem_err(path: &Path, e: rustls::pki_types::pem::Error) -> MaterialError {
    use rustls::pki_types::pem::Error as E;
    let message = match e {
        E::MissingSectionEnd { end_marker } => {
            format!("truncated: no END line for {}", String::from_utf8_lossy(&end_marker))
        }
        E::IllegalSectionStart { line } => {
            format!("malformed BEGIN line `{}`", String::from_utf8_lossy(&line))
        }
        E::Base64Decode(m) => format!("bad base64: {m}"),
        other => other.to_string(),
    };
    MaterialError::Pem {
        path: path.to_owned(),
        message,
    }
}

/// Parses the certificate chain (leaf first).
pub fn parse_chain(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(MaterialError::NoCertificate {
            path: path.to_owned(),
            found: labels(bytes),
        });
    }
    Ok(certs)
}

/// Parses exactly one private key in PKCS#8, PKCS#1 or SEC1 form.
pub fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, MaterialError> {
    let text = String::from_utf8_lossy(bytes);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(MaterialError::EncryptedKey { path: path.to_owned() });
    }
    let mut keys = Vec::new();
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        let (kind, der) = item.map_err(|e| pem_err(path, e))?;
        let key = match kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(der.into()),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
            _ => continue,
        };
        keys.push(key);
    }
    match keys.len() {
        0 => Err(MaterialError::NoKey {
            path: path.to_owned(),
            found: labels(bytes),
        }),
        1 => Ok(keys.remove(0)),
        count => Err(MaterialError::SeveralKeys {
            path: path.to_owned(),
            count,
        }),
    }
}

/// Parses a CA bundle into a root store, counting entries that could not be used.
pub fn parse_roots(path: &Path, bytes: &[u8]) -> Result<(RootCertStore, Vec<CertInfo>, usize), MaterialError> {
    let mut ders = Vec::new();
    let mut bad_pem = 0;
    for item in CertificateDer::pem_slice_iter(bytes) {
        match item {
            Ok(der) => ders.push(der),
            Err(_) => bad_pem += 1,
        }
    }
    let infos: Vec<CertInfo> = ders.iter().filter_map(|d| CertInfo::parse(d, path).ok()).collect();
    let mut store = RootCertStore::empty();
    let (_, ignored) = store.add_parsable_certificates(ders);
    let ignored = ignored + bad_pem;
    if store.is_empty() {
        return Err(MaterialError::NoCa {
            path: path.to_owned(),
            ignored,
        });
    }
    Ok((store, infos, ignored))
}

fn parse_crls(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, MaterialError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if crls.is_empty() {
        return Err(MaterialError::Crl {
            path: path.to_owned(),
            message: format!("no X509 CRL section{}", labels(bytes)),
        });
    }
    Ok(crls)
}

/// Validates raw bytes into material; nothing here touches the file system.
pub fn parse(raw: &Raw, provider: &CryptoProvider, now: SystemTime) -> Result<Material, MaterialError> {
    let mut material = Material {
        certified: None,
        roots: None,
        crls: Vec::new(),
        chain: Vec::new(),
        ca: Vec::new(),
        ca_ignored: 0,
        key_type: None,
        digest: raw.digest,
    };
    if let (Some((cert_path, cert_bytes)), Some((key_path, key_bytes))) = (&raw.cert, &raw.key) {
        let chain = parse_chain(cert_path, cert_bytes)?;
        let key = parse_key(key_path, key_bytes)?;
        let infos = chain
            .iter()
            .map(|c| CertInfo::parse(c, cert_path))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| MaterialError::BadCertificate {
                path: cert_path.clone(),
                message,
            })?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| MaterialError::UnsupportedKey {
                path: key_path.clone(),
                message: e.to_string(),
            })?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(MaterialError::KeyMismatch {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                });
            }
        }
        let leaf = &infos[0];
        if now > leaf.not_after_time() {
            return Err(MaterialError::CertExpired {
                path: cert_path.clone(),
                at: leaf.not_after.clone(),
            });
        }
        if now < leaf.not_before_time() {
            return Err(MaterialError::CertNotYetValid {
                path: cert_path.clone(),
                at: leaf.not_before.clone(),
            });
        }
        material.key_type = certified.cert.first().and_then(|c| key_type(c));
        material.certified = Some(Arc::new(certified));
        material.chain = infos;
    }
    if let Some((ca_path, ca_bytes)) = &raw.ca {
        let (store, infos, ignored) = parse_roots(ca_path, ca_bytes)?;
        material.roots = Some(Arc::new(store));
        material.ca = infos;
        material.ca_ignored = ignored;
    }
    if let Some((crl_path, crl_bytes)) = &raw.crl {
        material.crls = parse_crls(crl_path, crl_bytes)?;
    }
    Ok(material)
}

/// A `subPath` mount is a single file bind-mounted over a path: it never sees the kubelet's
/// `..data` swap, so it works once and never rotates (kubernetes/kubernetes#50345). The tell:
/// the file is not a symlink, no `..data` sits beside it, and it lives on another device than
/// its directory.
pub fn looks_like_subpath(file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = file.parent() else {
        return false;
    };
    let (Ok(f), Ok(d)) = (std::fs::symlink_metadata(file), std::fs::metadata(dir)) else {
        return false;
    };
    !f.file_type().is_symlink() && !dir.join(DATA_LINK).exists() && f.dev() != d.dev()
}
