//! Upstream certificate verification: webpki for the chain, then the expected identities.
//!
//! Without `subject_alt_names` this is plain webpki against the SNI name. With DNS or IP
//! identities, webpki runs once per identity as the expected name. URI identities (SPIFFE)
//! are invisible to webpki's name check, so the chain is verified with rustls' public
//! `verify_server_cert_signed_by_trust_anchor` and the URI SANs are compared exactly.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use super::info::uri_sans;
use super::options::Identity;

/// Verifies the upstream chain and identity.
#[derive(Debug)]
pub struct UpstreamVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
    identities: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
}

impl UpstreamVerifier {
    /// A verifier over `webpki` (built from `roots`, with any CRLs) expecting `identities`.
    pub fn new(
        webpki: Arc<WebPkiServerVerifier>,
        roots: Arc<RootCertStore>,
        identities: Vec<Identity>,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        UpstreamVerifier {
            webpki,
            roots,
            identities,
            algs,
        }
    }
}

fn name_of(id: &Identity) -> Option<ServerName<'static>> {
    match id {
        Identity::Dns(d) => Some(ServerName::DnsName(d.clone())),
        Identity::Ip(ip) => Some(ServerName::IpAddress((*ip).into())),
        Identity::Uri(_) => None,
    }
}

fn is_name_error(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })
    )
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if self.identities.is_empty() {
            return self
                .webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        let has_uri = self.identities.iter().any(|i| matches!(i, Identity::Uri(_)));
        if !has_uri {
            for id in &self.identities {
                let Some(name) = name_of(id) else { continue };
                match self
                    .webpki
                    .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
                {
                    Ok(v) => return Ok(v),
                    Err(e) if is_name_error(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, self.algs.all)?;
        let uris = uri_sans(end_entity.as_ref());
        for id in &self.identities {
            let ok = match id {
                Identity::Uri(u) => uris.iter().any(|have| have == u),
                other => name_of(other).is_some_and(|n| verify_server_name(&cert, &n).is_ok()),
            };
            if ok {
                return Ok(ServerCertVerified::assertion());
            }
        }
        Err(Error::InvalidCertificate(CertificateError::NotValidForName))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `insecure_skip_verify: true`: any certificate is accepted, but the handshake signatures
/// are still checked so the session keys at least belong to whoever sent that certificate.
#[derive(Debug)]
pub struct InsecureVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl InsecureVerifier {
    /// A verifier that trusts every certificate.
    pub fn new(algs: WebPkiSupportedAlgorithms) -> Self {
        InsecureVerifier { algs }
    }
}

impl ServerCertVerifier for InsecureVerifier {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
