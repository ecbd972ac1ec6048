//! Material + options → rustls `ClientConfig`s, once per generation and never per connection.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue, WebPkiServerVerifier,
};
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, NamedGroup, SignatureScheme};

use super::material::Material;
use super::options;
use super::verify::{InsecureVerifier, UpstreamVerifier};
use crate::config::TlsContextConfig;

/// Session tickets kept per generation.
const SESSION_CACHE_SIZE: usize = 256;

/// The client configurations of one generation. All share one session cache, which belongs
/// to the generation and is dropped with it.
#[derive(Debug)]
pub struct ClientConfigs {
    /// The context's own ALPN setting (none unless configured): TCP mappings.
    pub tcp: Arc<ClientConfig>,
    /// `h2, http/1.1` (or the configured list): HTTP/1.1 downstreams.
    pub http: Arc<ClientConfig>,
    /// `h2` only (or the configured list): h2c/gRPC downstreams.
    pub h2: Arc<ClientConfig>,
    /// `http/1.1` only: WebSocket upgrades.
    pub http1: Arc<ClientConfig>,
}

/// Always presents the same client certificate.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _root_hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The generation's session cache, which stops offering tickets once the client certificate
/// has expired: a resumed TLS 1.3 session re-uses the identity of its first handshake, and the
/// upstream does not check that certificate again, so resuming would stretch an expired
/// identity past its notAfter.
#[derive(Debug)]
struct ExpiringSessions {
    inner: ClientSessionMemoryCache,
    not_after: Option<SystemTime>,
}

impl ExpiringSessions {
    fn expired(&self) -> bool {
        self.not_after.is_some_and(|t| SystemTime::now() >= t)
    }
}

impl ClientSessionStore for ExpiringSessions {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(name, group);
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(name)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(name, value);
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        if self.expired() {
            return None;
        }
        self.inner.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.inner.remove_tls12_session(name);
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.inner.insert_tls13_ticket(name, value);
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        if self.expired() {
            return None;
        }
        self.inner.take_tls13_ticket(name)
    }
}

/// Why a configuration could not be built (material was already validated, so this is rare).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the TLS client configuration: {0}")]
pub struct BuildError(pub String);

/// Builds the generation's configs.
pub fn build(ctx: &TlsContextConfig, material: &Material) -> Result<ClientConfigs, BuildError> {
    let provider = Arc::new(options::provider_for(ctx).map_err(|errs| {
        BuildError(
            errs.into_iter()
                .map(|(f, e)| format!("{f}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?);
    let versions = options::versions(ctx.min_tls_version.as_deref(), ctx.max_tls_version.as_deref())
        .map_err(|errs| BuildError(errs.into_iter().map(|(_, e)| e).collect::<Vec<_>>().join("; ")))?;
    let algs = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = if ctx.insecure_skip_verify {
        Arc::new(InsecureVerifier::new(algs))
    } else {
        let roots = material
            .roots
            .clone()
            .ok_or_else(|| BuildError("no CA bundle to verify the upstream with".to_owned()))?;
        let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(material.crls.iter().cloned())
            .build()
            .map_err(|e| BuildError(e.to_string()))?;
        let identities = ctx
            .subject_alt_names
            .iter()
            .map(|s| options::identity(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BuildError)?;
        Arc::new(UpstreamVerifier::new(webpki, roots, identities, algs))
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| BuildError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut base = match &material.certified {
        Some(ck) => builder.with_client_cert_resolver(Arc::new(FixedClientCert(ck.clone()))),
        None => builder.with_no_client_auth(),
    };
    let not_after = material.chain.first().map(|c| c.not_after_time());
    let store: Arc<dyn ClientSessionStore> = Arc::new(ExpiringSessions {
        inner: ClientSessionMemoryCache::new(SESSION_CACHE_SIZE),
        not_after,
    });
    base.resumption = Resumption::store(store);
    let configured: Option<Vec<Vec<u8>>> = ctx
        .alpn_protocols
        .as_ref()
        .map(|l| l.0.iter().map(|p| p.as_bytes().to_vec()).collect());
    let with_alpn = |default: &[&[u8]]| {
        let mut c = base.clone();
        c.alpn_protocols = configured
            .clone()
            .unwrap_or_else(|| default.iter().map(|p| p.to_vec()).collect());
        Arc::new(c)
    };
    Ok(ClientConfigs {
        tcp: with_alpn(&[]),
        http: with_alpn(&[b"h2", b"http/1.1"]),
        h2: with_alpn(&[b"h2"]),
        http1: with_alpn(&[b"http/1.1"]),
    })
}
