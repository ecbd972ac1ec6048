//! Upstream failures as data: one variant per thing an operator can act on, with a stable
//! `kind()` that is the metric label, the log field and the `x-mtls-sidecar-error` value.

use std::io;

use rustls::{AlertDescription, CertificateError};

/// Why an upstream connection or exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TLS context has no generation yet.
    #[error("TLS context `{context}` has no usable client certificate yet; check the Secret volume and /certs")]
    NoClientIdentity {
        /// The context.
        context: String,
    },
    /// Name resolution failed.
    #[error("DNS lookup of {host} failed: {message}")]
    Dns {
        /// The name.
        host: String,
        /// Resolver message.
        message: String,
    },
    /// Name resolution took too long.
    #[error("DNS lookup of {host} timed out")]
    DnsTimeout {
        /// The name.
        host: String,
    },
    /// The name resolved only to link-local (metadata) addresses.
    #[error("{host} resolves to {addr}, a link-local (cloud metadata) address; refused")]
    DestinationDenied {
        /// The name.
        host: String,
        /// What it resolved to.
        addr: String,
    },
    /// Connection refused (nothing listening).
    #[error("connection to {addr} refused: is the upstream listening on that port?")]
    ConnectRefused {
        /// Address tried.
        addr: String,
    },
    /// TCP connect did not finish in time.
    #[error("TCP connect to {addr} timed out")]
    ConnectTimeout {
        /// Address tried.
        addr: String,
    },
    /// Another connect error (unreachable, …).
    #[error("TCP connect to {addr} failed: {source}")]
    Connect {
        /// Address tried.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake with {addr} timed out: the upstream may not speak TLS on that port")]
    HandshakeTimeout {
        /// Address.
        addr: String,
    },
    /// TLS failed (verification, alert, protocol).
    #[error("TLS with {addr} failed ({kind}): {source}")]
    Tls {
        /// Address.
        addr: String,
        /// Classified reason.
        kind: &'static str,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The upstream did not agree to HTTP/2 for an h2c/gRPC request.
    #[error(
        "{addr} did not negotiate HTTP/2 (ALPN offered: h2; got: {got}); gRPC and h2c requests need an HTTP/2 upstream"
    )]
    AlpnMismatch {
        /// Address.
        addr: String,
        /// What was negotiated.
        got: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with {addr} failed ({kind}): {source}")]
    Http {
        /// Address.
        addr: String,
        /// Classified reason.
        kind: &'static str,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// No response headers in time.
    #[error("{addr} sent no response within {ms} ms (timeout_ms)")]
    ResponseTimeout {
        /// Address.
        addr: String,
        /// The timeout.
        ms: u128,
    },
    /// The connection broke.
    #[error("connection to {addr} failed: {source}")]
    Io {
        /// Address.
        addr: String,
        /// Classified reason.
        kind: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl UpstreamError {
    /// Stable snake_case reason.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoClientIdentity { .. } => "no_client_identity",
            Self::Dns { .. } => "dns_error",
            Self::DnsTimeout { .. } => "dns_timeout",
            Self::DestinationDenied { .. } => "destination_denied",
            Self::ConnectRefused { .. } => "connect_refused",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Connect { .. } => "connect_error",
            Self::HandshakeTimeout { .. } => "handshake_timeout",
            Self::AlpnMismatch { .. } => "alpn_mismatch",
            Self::ResponseTimeout { .. } => "upstream_timeout",
            Self::Tls { kind, .. } | Self::Io { kind, .. } | Self::Http { kind, .. } => kind,
        }
    }

    /// Classifies an I/O error from a TLS stream (handshake or data phase).
    pub fn from_io(addr: &str, e: io::Error) -> Self {
        match tls_error(&e) {
            Some(t) => UpstreamError::Tls {
                addr: addr.to_owned(),
                kind: classify_tls(t),
                source: t.clone(),
            },
            None => UpstreamError::Io {
                addr: addr.to_owned(),
                kind: classify_io(&e),
                source: e,
            },
        }
    }
}

/// Stable reason for a hyper error from an upstream exchange: the TLS alert or I/O error
/// inside it if there is one (a TLS 1.3 client-certificate rejection arrives on the first
/// read), else what hyper says.
pub fn classify_hyper(e: &hyper::Error) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io_kind(io);
        }
        if let Some(t) = s.downcast_ref::<rustls::Error>() {
            return classify_tls(t);
        }
        source = s.source();
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        "upstream_reset"
    } else if e.is_timeout() {
        "upstream_timeout"
    } else if e.is_parse() || e.is_parse_status() {
        "upstream_protocol_error"
    } else if e.is_user() {
        "request_error"
    } else {
        "upstream_reset"
    }
}

/// Stable reason for any error on an upstream stream (TLS alert or plain I/O).
pub fn io_kind(e: &io::Error) -> &'static str {
    tls_error(e).map_or_else(|| classify_io(e), classify_tls)
}

/// The rustls error inside a tokio-rustls `io::Error`, if any.
pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Stable reason for a rustls error.
pub fn classify_tls(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => "bad_san",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "cert_expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "cert_not_yet_valid",
            CertificateError::Revoked => "cert_revoked",
            _ => "bad_certificate",
        },
        E::AlertReceived(a) => match a {
            AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => "peer_rejected_client_cert",
            AlertDescription::NoApplicationProtocol => "alpn_mismatch",
            AlertDescription::ProtocolVersion => "tls_version_mismatch",
            AlertDescription::HandshakeFailure => "handshake_failure",
            _ => "tls_alert",
        },
        E::NoApplicationProtocol => "alpn_mismatch",
        E::PeerIncompatible(_) => "tls_incompatible",
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "tls_protocol_error"
        }
        _ => "tls_error",
    }
}

/// Stable reason for a plain I/O error on an upstream connection.
pub fn classify_io(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => "upstream_reset",
        io::ErrorKind::TimedOut => "upstream_timeout",
        _ => "io_error",
    }
}
