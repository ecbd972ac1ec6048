//! Import of Emissary-ingress Kubernetes objects (`TLSContext`, `Mapping`, `TCPMapping`).
//!
//! Emissary silently drops objects it cannot use; we never do. Fields we understand map onto
//! the native configuration, fields that only matter to Emissary's own features (termination,
//! its load balancer, its id selection) warn, and anything else is an error naming the file,
//! the object and the field.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::{Config, MappingConfig, Problem, TcpMappingConfig, TlsContextConfig, Warning};

/// Fields of an Emissary TLSContext that only make sense when Emissary terminates TLS.
const TLSCONTEXT_IGNORED: &[&str] = &[
    "ambassador_id",
    "redirect_cleartext_from",
    "cert_required",
    "secret_namespacing",
    "sni_required",
    "v3CertChainFile",
];

/// Mapping fields that belong to Emissary's own edge features.
const MAPPING_IGNORED: &[&str] = &[
    "ambassador_id",
    "weight",
    "labels",
    "precedence",
    "load_balancer",
    "circuit_breakers",
    "resolver",
    "cluster_tag",
    "stats_name",
    "docs",
    "add_linkerd_headers",
    "bypass_auth",
    "bypass_error_response_overrides",
];

/// TCPMapping fields that belong to Emissary's own features.
const TCPMAPPING_IGNORED: &[&str] = &[
    "ambassador_id",
    "weight",
    "cluster_tag",
    "resolver",
    "circuit_breakers",
    "stats_name",
    "enable_ipv4",
    "enable_ipv6",
];

/// Reads `file` and adds its objects to `config`.
pub fn emissary_import(config: &mut Config, file: &Path, problems: &mut Vec<Problem>, warnings: &mut Vec<Warning>) {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            problems.push(Problem::new(
                "emissary_resources",
                format!("cannot read {}: {e}", file.display()),
            ));
            return;
        }
    };
    import_str(config, &text, &file.display().to_string(), problems, warnings);
}

/// Adds the objects of Kubernetes YAML `text` (named `origin` in messages) to `config`.
pub fn import_str(
    config: &mut Config,
    text: &str,
    origin: &str,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Warning>,
) {
    let mut ctx = Import {
        config,
        problems,
        warnings,
        origin,
    };
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match <Value as serde::Deserialize>::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(Value::Mapping(m)) => ctx.object(i, m),
            Ok(_) => ctx.problem(
                &format!("document {}", i + 1),
                "is not a Kubernetes object (expected a mapping with apiVersion and kind)",
            ),
            Err(e) => {
                ctx.problem(&format!("document {}", i + 1), &format!("is not valid YAML: {e}"));
                // The parser cannot resynchronise after a syntax error.
                return;
            }
        }
    }
}

struct Import<'a> {
    config: &'a mut Config,
    problems: &'a mut Vec<Problem>,
    warnings: &'a mut Vec<Warning>,
    origin: &'a str,
}

impl Import<'_> {
    fn problem(&mut self, what: &str, message: &str) {
        self.problems.push(Problem {
            path: what.to_owned(),
            message: message.to_owned(),
            origin: Some(self.origin.to_owned()),
        });
    }

    fn warn(&mut self, what: &str, message: String) {
        self.warnings.push(Warning {
            path: format!("{} in {}", what, self.origin),
            message,
        });
    }

    fn object(&mut self, index: usize, mut obj: Mapping) {
        let api = str_field(&obj, "apiVersion");
        let kind = str_field(&obj, "kind").unwrap_or_default();
        let name = obj
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let label = match &name {
            Some(n) => format!("{kind}/{n}"),
            None => format!("document {} ({kind})", index + 1),
        };
        if !matches!(kind.as_str(), "TLSContext" | "Mapping" | "TCPMapping") {
            tracing::info!(file = self.origin, object = %label, "skipping a kind the sidecar does not use");
            return;
        }
        match api.as_deref() {
            Some("getambassador.io/v2" | "getambassador.io/v3alpha1") => {}
            other => {
                self.problem(
                    &label,
                    &format!(
                        "apiVersion {:?} is not supported (use getambassador.io/v2 or getambassador.io/v3alpha1)",
                        other.unwrap_or("<missing>")
                    ),
                );
                return;
            }
        }
        let Some(name) = name else {
            self.problem(&label, "has no metadata.name");
            return;
        };
        let Some(Value::Mapping(mut spec)) = obj.remove("spec") else {
            self.problem(&label, "has no spec mapping");
            return;
        };
        match kind.as_str() {
            "TLSContext" => {
                self.strip(&label, &mut spec, TLSCONTEXT_IGNORED);
                if let Some(ctx) = self.parse::<TlsContextConfig>(&label, spec) {
                    match self.config.tls_contexts.entry(name) {
                        std::collections::btree_map::Entry::Occupied(_) => {
                            self.problem(&label, "a TLSContext with this name is already defined")
                        }
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert(ctx);
                        }
                    }
                }
            }
            "Mapping" => {
                self.strip(&label, &mut spec, MAPPING_IGNORED);
                if spec.get("tls").is_some_and(Value::is_bool) {
                    self.problem(
                        &format!("{label}.tls"),
                        "must name a TLSContext: `tls: true` would originate TLS without a client certificate or trust anchors",
                    );
                    return;
                }
                spec.insert("name".into(), Value::String(name));
                if let Some(m) = self.parse::<MappingConfig>(&label, spec) {
                    self.config.mappings.push(m);
                }
            }
            _ => {
                self.strip(&label, &mut spec, TCPMAPPING_IGNORED);
                if spec.contains_key("host") {
                    spec.remove("host");
                    self.warn(
                        &label,
                        "`host` selects by SNI when Emissary terminates TLS; the sidecar listens on its own port and ignores it".into(),
                    );
                }
                spec.insert("name".into(), Value::String(name));
                if let Some(m) = self.parse::<TcpMappingConfig>(&label, spec) {
                    self.config.tcp_mappings.push(m);
                }
            }
        }
    }

    fn strip(&mut self, label: &str, spec: &mut Mapping, ignored: &[&str]) {
        for field in ignored {
            if spec.remove(*field).is_some() {
                self.warn(
                    label,
                    format!("`{field}` is an Emissary edge feature; the sidecar ignores it"),
                );
            }
        }
    }

    fn parse<T: DeserializeOwned>(&mut self, label: &str, spec: Mapping) -> Option<T> {
        match serde_yaml::from_value::<T>(Value::Mapping(spec)) {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(&format!("{label}.spec"), &e.to_string());
                None
            }
        }
    }
}

fn str_field(obj: &Mapping, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_owned)
}
