//! Cross-field validation: everything serde cannot see, reported all at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::{Config, ConfigError, ListenAddr, Problem, Scheme, ServiceTarget, TlsContextConfig, is_dns_name};
use crate::tls::options;

/// Something legal but probably not what the operator meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Key path.
    pub path: String,
    /// What to look at.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Default)]
struct Report {
    problems: Vec<Problem>,
    warnings: Vec<Warning>,
}

impl Report {
    fn err(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.problems.push(Problem::new(path, msg));
    }
    fn warn(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.warnings.push(Warning {
            path: path.into(),
            message: msg.into(),
        });
    }
}

/// Checks a deserialized configuration; returns its warnings, or every problem.
pub fn validate(c: &Config) -> Result<Vec<Warning>, ConfigError> {
    let mut r = Report::default();
    let own = own_listeners(c, &mut r);
    global(c, &mut r);
    for (name, ctx) in &c.tls_contexts {
        context(name, ctx, &mut r);
    }
    mappings(c, &own, &mut r);
    tcp_mappings(c, &own, &mut r);
    transparent(c, &mut r);
    let used: HashSet<&str> = c
        .mappings
        .iter()
        .filter_map(|m| m.tls.as_deref())
        .chain(c.tcp_mappings.iter().filter_map(|m| m.tls.as_deref()))
        .chain(c.transparent_rules.iter().filter_map(|m| m.tls.as_deref()))
        .collect();
    for name in c.tls_contexts.keys() {
        if !used.contains(name.as_str()) {
            r.warn(
                format!("tls_contexts.{name}"),
                "is not used by any mapping (it is still loaded and reported)",
            );
        }
    }
    if r.problems.is_empty() {
        Ok(r.warnings)
    } else {
        Err(ConfigError { problems: r.problems })
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Every socket the sidecar listens on, by key path.
fn own_listeners(c: &Config, r: &mut Report) -> Vec<(String, SocketAddr)> {
    let mut own = Vec::new();
    let plain = [
        ("listeners.http", c.listeners.http),
        ("listeners.transparent", c.listeners.transparent),
    ];
    for (path, l) in plain {
        let Some(ListenAddr {
            address,
            allow_non_loopback,
        }) = l
        else {
            continue;
        };
        if !is_loopback(address.ip()) && !allow_non_loopback {
            r.err(
                path,
                format!(
                    "`{address}` is not a loopback address: a plaintext listener off loopback lets other hosts use this pod's identity; bind 127.0.0.1 or set allow_non_loopback: true"
                ),
            );
        }
        if !is_loopback(address.ip()) && allow_non_loopback {
            r.warn(path, format!("plaintext listener on non-loopback `{address}`"));
        }
        own.push((path.to_owned(), address));
    }
    if let Some(a) = c.admin {
        own.push(("admin".to_owned(), a.address));
    }
    for (i, m) in c.tcp_mappings.iter().enumerate() {
        let addr = m.listen_addr();
        let path = format!("tcp_mappings[{i}]");
        if !is_loopback(addr.ip()) && !m.allow_non_loopback {
            r.err(
                format!("{path}.address"),
                format!(
                    "`{}` is not a loopback address; bind 127.0.0.1 or set allow_non_loopback: true",
                    addr.ip()
                ),
            );
        }
        own.push((format!("{path}.port"), addr));
    }
    let mut seen: Vec<(&str, SocketAddr)> = Vec::new();
    for (path, addr) in &own {
        if addr.port() == 0 {
            continue;
        }
        let clash = seen.iter().find(|(_, other)| {
            other.port() == addr.port()
                && (other.ip() == addr.ip() || other.ip().is_unspecified() || addr.ip().is_unspecified())
        });
        match clash {
            Some((first, _)) => r.err(path.clone(), format!("port {} is already used by {first}", addr.port())),
            None => seen.push((path, *addr)),
        }
    }
    own
}

fn global(c: &Config, r: &mut Report) {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.log.level) {
        r.err("log.level", format!("`{}` is not a log filter: {e}", c.log.level));
    }
    if c.worker_threads == Some(0) {
        r.err("worker_threads", "must be at least 1 (or null for one per CPU)");
    }
    if c.reload_poll_interval.0 < std::time::Duration::from_secs(1) {
        r.err(
            "reload_poll_interval",
            format!("`{}` is too short; use at least 1s", c.reload_poll_interval),
        );
    }
    let l = &c.limits;
    if l.max_connections == 0 {
        r.err("limits.max_connections", "must be at least 1");
    }
    if l.max_header_bytes < 8192 {
        r.err(
            "limits.max_header_bytes",
            format!("`{}` is below the HTTP parser's minimum of 8192", l.max_header_bytes),
        );
    }
    if l.max_headers == 0 {
        r.err("limits.max_headers", "must be at least 1");
    }
    if l.buffer_bytes < 1024 {
        r.err("limits.buffer_bytes", format!("`{}` is below 1024", l.buffer_bytes));
    }
    if l.header_read_timeout.0.is_zero() {
        r.err("limits.header_read_timeout", "must be above 0");
    }
    if l.max_request_body == Some(0) {
        r.err(
            "limits.max_request_body",
            "`0` would refuse every body; use null for no limit",
        );
    }
    if l.keepalive_timeout.0.is_zero() {
        r.err("limits.keepalive_timeout", "must be above 0");
    }
}

fn secret_name_ok(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

fn context(name: &str, ctx: &TlsContextConfig, r: &mut Report) {
    let p = |field: &str| format!("tls_contexts.{name}.{field}");
    if !is_dns_name(name) {
        r.err(
            format!("tls_contexts.{name}"),
            "context names are Kubernetes-style names: letters, digits, `-` and `.`",
        );
    }
    for (field, v) in [
        ("secret", &ctx.secret),
        ("ca_secret", &ctx.ca_secret),
        ("crl_secret", &ctx.crl_secret),
    ] {
        if let Some(s) = v
            && !secret_name_ok(s)
        {
            r.err(
                p(field),
                format!("`{s}` must be a directory name under secrets_dir, not a path"),
            );
        }
    }
    if ctx.secret.is_some() && (ctx.cert_chain_file.is_some() || ctx.private_key_file.is_some()) {
        r.err(
            p("secret"),
            "give either `secret` or cert_chain_file/private_key_file, not both",
        );
    }
    if ctx.cert_chain_file.is_some() != ctx.private_key_file.is_some() {
        let (have, missing) = if ctx.cert_chain_file.is_some() {
            ("cert_chain_file", "private_key_file")
        } else {
            ("private_key_file", "cert_chain_file")
        };
        r.err(p(missing), format!("is required together with {have}"));
    }
    if ctx.crl_secret.is_some() && ctx.crl_file.is_some() {
        r.err(p("crl_file"), "give either crl_secret or crl_file, not both");
    }
    let anchors = ctx.secret.is_some() || ctx.ca_secret.is_some() || ctx.cacert_chain_file.is_some();
    if !anchors && !ctx.insecure_skip_verify {
        r.err(
            format!("tls_contexts.{name}"),
            "has no trust anchors: set `secret` (with ca.crt), `ca_secret` or `cacert_chain_file` to verify the upstream (or, for tests only, insecure_skip_verify: true)",
        );
    }
    if ctx.insecure_skip_verify {
        r.warn(
            p("insecure_skip_verify"),
            "upstream certificates are NOT verified for this context; anyone on the path can impersonate the upstream",
        );
        if !ctx.subject_alt_names.is_empty() {
            r.err(
                p("subject_alt_names"),
                "cannot be checked with insecure_skip_verify: true; drop one of them",
            );
        }
    }
    if !ctx.hosts.is_empty() {
        r.warn(
            p("hosts"),
            "only matters when terminating TLS; the sidecar originates TLS and ignores it",
        );
    }
    if let Err(errs) = options::provider_for(ctx) {
        for (field, e) in errs {
            r.err(p(field), e);
        }
    }
    let mut uri = false;
    for (i, s) in ctx.subject_alt_names.iter().enumerate() {
        match options::identity(s) {
            Ok(options::Identity::Uri(_)) => uri = true,
            Ok(_) => {}
            Err(e) => r.err(format!("{}[{i}]", p("subject_alt_names")), e),
        }
    }
    if uri && (ctx.crl_secret.is_some() || ctx.crl_file.is_some()) {
        r.err(
            p("subject_alt_names"),
            "URI identities cannot be combined with a CRL yet (revocation is checked only on the DNS/IP path)",
        );
    }
    if let Some(sni) = &ctx.sni
        && sni.parse::<IpAddr>().is_err()
        && !is_dns_name(sni)
    {
        r.err(p("sni"), format!("`{sni}` is not a DNS name or IP address"));
    }
    if let Some(alpn) = &ctx.alpn_protocols {
        if alpn.0.is_empty() {
            r.err(p("alpn_protocols"), "is empty; omit it for automatic ALPN");
        }
        for proto in &alpn.0 {
            if proto.len() > 255 {
                r.err(p("alpn_protocols"), format!("`{proto}` is longer than 255 bytes"));
            }
        }
    }
}

/// Whether `target:port` is one of the sidecar's own listeners.
fn loops_to_self(target: &ServiceTarget, port: u16, own: &[(String, SocketAddr)]) -> Option<String> {
    let host = target.host.trim_end_matches('.').to_ascii_lowercase();
    let local = match target.ip() {
        Some(ip) => is_loopback(ip) || ip.is_unspecified(),
        None => host == "localhost" || host.ends_with(".localhost"),
    };
    if !local {
        return None;
    }
    own.iter()
        .find(|(_, a)| a.port() == port && port != 0)
        .map(|(path, a)| format!("would loop back into the sidecar's own listener {path} ({a})"))
}

fn timeouts(path: &str, fields: &[(&str, Option<super::Millis>)], r: &mut Report) {
    for &(field, v) in fields {
        if let Some(v) = v
            && v.0.is_zero()
        {
            r.err(format!("{path}.{field}"), "must be above 0");
        }
    }
}

fn mappings(c: &Config, own: &[(String, SocketAddr)], r: &mut Report) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut routes: BTreeMap<(String, String, bool), usize> = BTreeMap::new();
    for (i, m) in c.mappings.iter().enumerate() {
        let path = format!("mappings[{i}]");
        if m.name.is_empty() {
            r.err(format!("{path}.name"), "is empty");
        } else if let Some(first) = names.insert(&m.name, i) {
            r.err(
                format!("{path}.name"),
                format!("`{}` is also the name of mappings[{first}]", m.name),
            );
        }
        if !m.prefix.starts_with('/') {
            r.err(format!("{path}.prefix"), format!("`{}` must start with `/`", m.prefix));
        }
        if let Some(rw) = &m.rewrite
            && !rw.is_empty()
            && !rw.starts_with('/')
        {
            r.err(
                format!("{path}.rewrite"),
                format!("`{rw}` must start with `/` (or be empty to keep the path)"),
            );
        }
        let host = match (&m.host, &m.hostname) {
            (Some(a), Some(b)) if a != b => {
                r.err(
                    format!("{path}.hostname"),
                    "give host or hostname, not two different values",
                );
                None
            }
            (a, b) => a.as_ref().or(b.as_ref()),
        };
        if let Some(h) = host
            && let Err(e) = crate::proxy::route::HostPattern::parse(h)
        {
            r.err(format!("{path}.host"), e);
        }
        let key = (
            host.map(|h| h.to_ascii_lowercase()).unwrap_or_default(),
            m.prefix.clone(),
            m.prefix_exact,
        );
        if let Some(first) = routes.insert(key, i) {
            r.err(
                format!("{path}.prefix"),
                format!(
                    "mappings[{first}] already routes the same host and prefix `{}`",
                    m.prefix
                ),
            );
        }
        service_ref(&path, &m.service, m.tls.as_deref(), true, c, own, r);
        timeouts(
            &path,
            &[
                ("timeout_ms", m.timeout_ms),
                ("connect_timeout_ms", m.connect_timeout_ms),
                ("idle_timeout_ms", m.idle_timeout_ms),
            ],
            r,
        );
        if let Some(rp) = &m.retry_policy {
            for cond in rp.retry_on.split(',').map(str::trim) {
                if !matches!(cond, "connect-failure" | "reset") {
                    r.err(
                        format!("{path}.retry_policy.retry_on"),
                        format!("`{cond}` is not supported: the sidecar retries only idempotent requests that got no response byte (connect-failure, reset)"),
                    );
                }
            }
            if rp.num_retries > 5 {
                r.err(
                    format!("{path}.retry_policy.num_retries"),
                    format!("`{}` is above 5", rp.num_retries),
                );
            }
        }
        for (j, u) in m.allow_upgrade.iter().enumerate() {
            if !u.eq_ignore_ascii_case("websocket") {
                r.err(
                    format!("{path}.allow_upgrade[{j}]"),
                    format!("`{u}` is not supported (only websocket)"),
                );
            }
        }
    }
}

fn service_ref(
    path: &str,
    service: &str,
    tls: Option<&str>,
    http: bool,
    c: &Config,
    own: &[(String, SocketAddr)],
    r: &mut Report,
) {
    if let Some(t) = tls
        && !c.tls_contexts.contains_key(t)
    {
        let known: Vec<&str> = c.tls_contexts.keys().map(String::as_str).collect();
        r.err(
            format!("{path}.tls"),
            format!(
                "`{t}` is not a TLSContext (defined: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        );
    }
    let target = match ServiceTarget::parse(service) {
        Ok(t) => t,
        Err(e) => {
            r.err(format!("{path}.service"), e);
            return;
        }
    };
    let tls_on = tls.is_some();
    match (target.scheme, http) {
        (Some(_), false) => r.err(
            format!("{path}.service"),
            format!("`{service}`: a TCP mapping's service is host:port, without a scheme"),
        ),
        (Some(Scheme::Https), true) if !tls_on => r.err(
            format!("{path}.tls"),
            format!("`{service}` is https:// but no `tls:` context says how to verify it and which client certificate to send"),
        ),
        (Some(Scheme::Http), true) if tls_on => r.err(
            format!("{path}.service"),
            format!("`{service}` says http:// but `tls:` is set; write https:// or drop the scheme"),
        ),
        _ => {}
    }
    if target.ip().is_some_and(crate::proxy::connect::is_link_local) {
        r.err(
            format!("{path}.service"),
            format!(
                "`{service}` is a link-local address (169.254.0.0/16, fe80::/10: cloud metadata endpoints); refused"
            ),
        );
    }
    if !http && target.port.is_none() && !tls_on {
        r.err(format!("{path}.service"), format!("`{service}` needs a port"));
    }
    let port = target.port_or_default(tls_on || target.scheme == Some(Scheme::Https));
    if let Some(msg) = loops_to_self(&target, port, own) {
        r.err(format!("{path}.service"), format!("`{service}` {msg}"));
    }
}

fn tcp_mappings(c: &Config, own: &[(String, SocketAddr)], r: &mut Report) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, m) in c.tcp_mappings.iter().enumerate() {
        let path = format!("tcp_mappings[{i}]");
        if m.name.is_empty() {
            r.err(format!("{path}.name"), "is empty");
        } else if let Some(first) = names.insert(&m.name, i) {
            r.err(
                format!("{path}.name"),
                format!("`{}` is also the name of tcp_mappings[{first}]", m.name),
            );
        }
        service_ref(&path, &m.service, m.tls.as_deref(), false, c, own, r);
        timeouts(
            &path,
            &[
                ("connect_timeout_ms", m.connect_timeout_ms),
                ("idle_timeout_ms", m.idle_timeout_ms),
            ],
            r,
        );
        if m.tls.is_none() {
            r.warn(path, "has no `tls:`: bytes are relayed to the upstream in plaintext");
        }
    }
}

fn transparent(c: &Config, r: &mut Report) {
    if c.listeners.transparent.is_none() {
        if !c.transparent_rules.is_empty() {
            r.warn(
                "transparent_rules",
                "listeners.transparent is not set, so these rules are never used",
            );
        }
        return;
    }
    if c.transparent_rules.is_empty() {
        r.warn(
            "transparent_rules",
            "is empty: every redirected connection will be refused (add rules for the destinations the app calls)",
        );
    }
    if c.protocol_detect_timeout.0.is_zero() || c.protocol_detect_timeout.0 > std::time::Duration::from_secs(10) {
        r.err(
            "protocol_detect_timeout",
            format!("`{}` must be above 0 and at most 10s", c.protocol_detect_timeout),
        );
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, rule) in c.transparent_rules.iter().enumerate() {
        let path = format!("transparent_rules[{i}]");
        if rule.name.is_empty() {
            r.err(format!("{path}.name"), "is empty");
        } else if let Some(first) = names.insert(&rule.name, i) {
            r.err(
                format!("{path}.name"),
                format!("`{}` is also the name of transparent_rules[{first}]", rule.name),
            );
        }
        if rule.destination.0.is_empty() {
            r.err(
                format!("{path}.destination"),
                "is empty (use 0.0.0.0/0 to match everything)",
            );
        }
        for d in &rule.destination.0 {
            if let Err(e) = super::Cidr::parse(d) {
                r.err(format!("{path}.destination"), e);
            }
        }
        if rule.ports.contains(&0) {
            r.err(format!("{path}.ports"), "0 is not a port");
        }
        match (&rule.tls, rule.passthrough) {
            (Some(_), true) => r.err(
                format!("{path}.passthrough"),
                "passthrough relays plaintext; it cannot be combined with `tls:`",
            ),
            (None, false) if rule.protocol != super::Protocol::Http => r.err(
                format!("{path}.tls"),
                "is required: name the TLSContext for TCP relays, or set `passthrough: true` to relay plaintext on purpose",
            ),
            (Some(t), false) if !c.tls_contexts.contains_key(t) => {
                r.err(format!("{path}.tls"), format!("`{t}` is not a TLSContext"))
            }
            _ => {}
        }
        if rule.passthrough {
            r.warn(
                format!("{path}.passthrough"),
                "matching connections leave the pod in plaintext",
            );
        }
        if let Some(sni) = &rule.sni
            && sni.parse::<IpAddr>().is_err()
            && !is_dns_name(sni)
        {
            r.err(
                format!("{path}.sni"),
                format!("`{sni}` is not a DNS name or IP address"),
            );
        }
        if rule.protocol != super::Protocol::Tcp && c.mappings.is_empty() && !rule.passthrough {
            r.warn(
                format!("{path}.protocol"),
                "HTTP detected on these destinations is routed by the HTTP mappings, and there are none",
            );
        }
        timeouts(
            &path,
            &[
                ("connect_timeout_ms", rule.connect_timeout_ms),
                ("idle_timeout_ms", rule.idle_timeout_ms),
            ],
            r,
        );
    }
}
