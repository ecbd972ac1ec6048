//! Typed configuration (SPEC §3): the YAML file, environment overrides, validation.
//!
//! Loading goes in three steps: figment merges the file and `MTLS_SIDECAR__*` variables into
//! one tree; every section is deserialized on its own so that one typo does not hide the
//! next one; `validate()` then checks the relations between sections. All problems come back
//! together, each with its key path, its bad value and where it came from.

mod cidr;
mod duration;
mod emissary;
mod listen;
mod load;
mod service;
mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use cidr::Cidr;
pub use duration::{Dur, Millis, format_duration, parse_duration};
pub use emissary::{emissary_import, import_str};
pub use listen::ListenAddr;
pub use load::{ConfigError, ConfigSource, Problem, finish, from_figment, load};
pub use service::{Scheme, ServiceTarget, is_dns_name, split_host_port};
pub use validate::{Warning, validate};

/// Default path of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mtls-sidecar/config.yaml";
/// Prefix of environment overrides; `__` separates nested keys.
pub const ENV_PREFIX: &str = "MTLS_SIDECAR__";

/// The whole configuration of one sidecar.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Plaintext listeners the application talks to.
    #[serde(default)]
    pub listeners: Listeners,
    /// Admin listener (metrics, health); `null` disables it.
    #[serde(default = "default_admin")]
    pub admin: Option<ListenAddr>,
    /// Directory holding one sub-directory per mounted Secret.
    #[serde(default = "default_secrets_dir")]
    pub secrets_dir: PathBuf,
    /// Runtime worker threads; default: the CPUs this process may use.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Log level and format.
    #[serde(default)]
    pub log: LogConfig,
    /// How long to keep serving after SIGTERM.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// Periodic re-read of every Secret, the safety net for missed events.
    #[serde(default = "default_poll_interval")]
    pub reload_poll_interval: Dur,
    /// `inotify` (events plus the periodic re-read) or `poll` (periodic re-read only, for
    /// file systems without inotify).
    #[serde(default)]
    pub reload_watch: WatchMode,
    /// How long pooled upstream connections of an old generation may finish their work.
    #[serde(default = "default_rotation_drain")]
    pub rotation_drain_timeout: Dur,
    /// Resource limits of the plaintext side.
    #[serde(default)]
    pub limits: Limits,
    /// Emissary `TLSContext`s by name.
    #[serde(default)]
    pub tls_contexts: BTreeMap<String, TlsContextConfig>,
    /// Emissary `Mapping`s served by the HTTP listener.
    #[serde(default)]
    pub mappings: Vec<MappingConfig>,
    /// Emissary `TCPMapping`s, each with its own loopback port.
    #[serde(default)]
    pub tcp_mappings: Vec<TcpMappingConfig>,
    /// Rules for connections redirected to the transparent listener, first match wins.
    #[serde(default)]
    pub transparent_rules: Vec<TransparentRule>,
    /// How long the transparent listener waits for the app's first bytes to tell HTTP from
    /// other protocols before relaying as TCP (server-speaks-first protocols send nothing).
    #[serde(default = "default_detect_timeout")]
    pub protocol_detect_timeout: Dur,
    /// Files of Emissary Kubernetes YAML to import.
    #[serde(default)]
    pub emissary_resources: Vec<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: Listeners::default(),
            admin: default_admin(),
            secrets_dir: default_secrets_dir(),
            worker_threads: None,
            log: LogConfig::default(),
            drain_timeout: default_drain_timeout(),
            reload_poll_interval: default_poll_interval(),
            reload_watch: WatchMode::default(),
            rotation_drain_timeout: default_rotation_drain(),
            limits: Limits::default(),
            tls_contexts: BTreeMap::new(),
            mappings: Vec::new(),
            tcp_mappings: Vec::new(),
            transparent_rules: Vec::new(),
            protocol_detect_timeout: default_detect_timeout(),
            emissary_resources: Vec::new(),
        }
    }
}

/// The plaintext listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// HTTP/1.1 + h2c listener; `null` disables it.
    #[serde(default = "default_http")]
    pub http: Option<ListenAddr>,
    /// Transparent (iptables-redirected) listener.
    #[serde(default)]
    pub transparent: Option<ListenAddr>,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            http: default_http(),
            transparent: None,
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `info,mtls_sidecar=debug`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

/// How Secret directories are watched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// inotify on each directory, with the periodic re-read as a safety net.
    #[default]
    Inotify,
    /// Only the periodic re-read.
    Poll,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits that protect the sidecar from its own application.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections accepted at once over all plaintext listeners.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request header section in bytes.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most request headers.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Deadline for a complete request head, from its first byte (and for a new connection's
    /// first bytes, from the accept).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// How long an app connection may stay idle between requests (HTTP/1.1 keep-alive; h2c
    /// with no request in flight) before the sidecar closes it.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: Dur,
    /// Per-connection, per-direction buffer for streamed bodies and TCP relays.
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: usize,
    /// Largest request body in bytes (413 above); `null`: no limit (bodies are streamed).
    #[serde(default)]
    pub max_request_body: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            header_read_timeout: default_header_read_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            buffer_bytes: default_buffer_bytes(),
            max_request_body: None,
        }
    }
}

/// Emissary `TLSContext`: the credentials and TLS options used toward an upstream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsContextConfig {
    /// Accepted for Emissary compatibility; only meaningful for termination (warns when set).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Secret directory under `secrets_dir` holding cert, key and CA.
    #[serde(default)]
    pub secret: Option<String>,
    /// Secret directory holding only the CA bundle.
    #[serde(default)]
    pub ca_secret: Option<String>,
    /// Explicit client certificate chain (leaf first).
    #[serde(default)]
    pub cert_chain_file: Option<PathBuf>,
    /// Explicit client private key.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// Explicit CA bundle that verifies the upstream.
    #[serde(default)]
    pub cacert_chain_file: Option<PathBuf>,
    /// Secret directory holding a CRL (`ca.crl` or `crl.pem`).
    #[serde(default)]
    pub crl_secret: Option<String>,
    /// Explicit CRL file (PEM).
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
    /// Server name sent and verified; default: the mapping service's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// ALPN protocols, as `h2,http/1.1` or a list; default: chosen per front end.
    #[serde(default)]
    pub alpn_protocols: Option<StringList>,
    /// Lowest TLS version (`v1.2` or `v1.3`).
    #[serde(default)]
    pub min_tls_version: Option<String>,
    /// Highest TLS version (`v1.2` or `v1.3`).
    #[serde(default)]
    pub max_tls_version: Option<String>,
    /// Cipher suites by OpenSSL or IANA name; empty: rustls' defaults.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    /// Key-exchange groups; empty: rustls' defaults.
    #[serde(default)]
    pub ecdh_curves: Vec<String>,
    /// Expected upstream identities (DNS names, IPs or URIs); default: the SNI name.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Skip upstream verification entirely (loudly).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A list given either as a YAML sequence or as one comma-separated string (Emissary style).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let items = match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a comma-separated string or a list of strings"))?
        {
            Raw::One(s) => s.split(',').map(str::to_owned).collect(),
            Raw::Many(v) => v,
        };
        Ok(StringList(
            items
                .into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        ))
    }
}

/// Emissary `Mapping`: an HTTP route to an upstream service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// Unique name; also the `mapping` metric label.
    pub name: String,
    /// Path prefix to match (longest wins).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Match `prefix` as the exact path instead of a prefix.
    #[serde(default)]
    pub prefix_exact: bool,
    /// Authority to match: exact, or `*.suffix`; port-insensitive unless it names one.
    #[serde(default)]
    pub host: Option<String>,
    /// Emissary v3 spelling of `host`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Upstream as `[scheme://]host[:port]`.
    pub service: String,
    /// TLSContext used to originate TLS.
    #[serde(default)]
    pub tls: Option<String>,
    /// Replacement for the matched prefix (Emissary default `/`).
    #[serde(default)]
    pub rewrite: Option<String>,
    /// Host header sent upstream.
    #[serde(default)]
    pub host_rewrite: Option<String>,
    /// Whole-request timeout.
    #[serde(default)]
    pub timeout_ms: Option<Millis>,
    /// TCP connect + TLS handshake timeout.
    #[serde(default)]
    pub connect_timeout_ms: Option<Millis>,
    /// Idle timeout of pooled upstream connections.
    #[serde(default)]
    pub idle_timeout_ms: Option<Millis>,
    /// Retries of idempotent requests that got no response byte.
    #[serde(default)]
    pub retry_policy: Option<RetryPolicy>,
    /// Upgrades passed through (only `websocket`).
    #[serde(default)]
    pub allow_upgrade: Vec<String>,
}

/// Emissary `retry_policy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Comma-separated conditions: `connect-failure`, `reset`.
    pub retry_on: String,
    /// Retries after the first attempt.
    #[serde(default = "default_num_retries")]
    pub num_retries: u32,
}

/// Emissary `TCPMapping`: a loopback port relayed to one upstream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpMappingConfig {
    /// Unique name; also the `listener` metric label.
    pub name: String,
    /// Local port (0 picks a free one, for tests).
    pub port: u16,
    /// Local address (default 127.0.0.1).
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// Allow a non-loopback `address`.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Upstream as `host:port`.
    pub service: String,
    /// TLSContext used to originate TLS; without it bytes are relayed in plaintext.
    #[serde(default)]
    pub tls: Option<String>,
    /// TCP connect + TLS handshake timeout.
    #[serde(default)]
    pub connect_timeout_ms: Option<Millis>,
    /// Close the relay after this long without a byte either way.
    #[serde(default)]
    pub idle_timeout_ms: Option<Millis>,
}

/// How a transparent rule treats a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Detect HTTP/1.1 and h2 from the first bytes, else relay as TCP.
    #[default]
    Auto,
    /// Always HTTP: route by Host through the HTTP mappings.
    Http,
    /// Always opaque TCP (server-speaks-first protocols such as MySQL, SMTP).
    Tcp,
}

/// A transparent-mode rule: which redirected destinations the sidecar takes, and how.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentRule {
    /// Unique name; the `listener` label of its TCP relays.
    pub name: String,
    /// Original destinations, as CIDR blocks or addresses (a string or a list).
    pub destination: StringList,
    /// Original destination ports; empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// TLSContext for TCP relays to the original destination.
    #[serde(default)]
    pub tls: Option<String>,
    /// Server name to send and verify; default: the destination IP (its IP SAN is verified).
    #[serde(default)]
    pub sni: Option<String>,
    /// `auto`, `http` or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Relay in plaintext, without TLS: must be asked for explicitly.
    #[serde(default)]
    pub passthrough: bool,
    /// TCP connect + TLS handshake timeout.
    #[serde(default)]
    pub connect_timeout_ms: Option<Millis>,
    /// Idle timeout of TCP relays.
    #[serde(default)]
    pub idle_timeout_ms: Option<Millis>,
}

/// Default connect + handshake timeout.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;
/// Default TCP relay / pooled connection idle timeout.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 300_000;
/// Default whole-request timeout of HTTP mappings.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 3_000;

impl TcpMappingConfig {
    /// The address this mapping listens on.
    pub fn listen_addr(&self) -> std::net::SocketAddr {
        let ip = self
            .address
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        std::net::SocketAddr::new(ip, self.port)
    }
}

fn default_admin() -> Option<ListenAddr> {
    Some(ListenAddr::new(([0, 0, 0, 0], 15090).into(), true))
}
fn default_http() -> Option<ListenAddr> {
    Some(ListenAddr::new(([127, 0, 0, 1], 15001).into(), false))
}
fn default_secrets_dir() -> PathBuf {
    PathBuf::from("/var/run/secrets/mtls-sidecar")
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_drain_timeout() -> Dur {
    Dur::from_secs(30)
}
fn default_poll_interval() -> Dur {
    Dur::from_secs(60)
}
fn default_rotation_drain() -> Dur {
    Dur::from_secs(30)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_header_bytes() -> usize {
    60 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_header_read_timeout() -> Dur {
    Dur::from_secs(10)
}
fn default_keepalive_timeout() -> Dur {
    Dur::from_secs(60)
}
fn default_buffer_bytes() -> usize {
    32 * 1024
}
fn default_detect_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(500))
}
fn default_prefix() -> String {
    "/".to_owned()
}
fn default_num_retries() -> u32 {
    1
}
