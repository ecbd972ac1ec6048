//! `mtls-sidecar inject`: adds the sidecar to workloads in Kubernetes YAML, like
//! `linkerd inject`. Idempotent: injecting an injected manifest changes nothing.
//!
//! The sidecar goes in as a native sidecar (an `initContainers` entry with
//! `restartPolicy: Always`, Kubernetes ≥ 1.29), so it starts before the app, is ready before
//! the app starts (startupProbe on /readyz) and stops after it. Secrets are mounted as whole
//! directories, never with `subPath`, or rotations would never arrive.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_yaml::{Mapping, Value};

/// The container name; also how an injected pod is recognised.
pub const CONTAINER: &str = "mtls-sidecar";
const CONFIG_VOLUME: &str = "mtls-sidecar-config";
const CONFIG_DIR: &str = "/etc/mtls-sidecar";
const SECRETS_DIR: &str = "/var/run/secrets/mtls-sidecar";
const UID: u64 = 65532;

/// What to inject.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sidecar image.
    pub image: String,
    /// ConfigMap holding `config.yaml`.
    pub config_map: String,
    /// Secrets to mount under the secrets directory.
    pub secrets: Vec<String>,
    /// HTTP listener port (for `HTTP_PROXY`).
    pub http_port: u16,
    /// Admin port (probes, scraping).
    pub admin_port: u16,
    /// Also add the iptables init container for transparent mode, redirecting to this port.
    pub transparent: Option<u16>,
    /// Image of that init container (the Dockerfile's `iptables` target).
    pub init_image: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: format!("mtls-sidecar:{}", env!("CARGO_PKG_VERSION")),
            config_map: "mtls-sidecar-config".into(),
            secrets: vec!["mtls-client-certs".into()],
            http_port: 15001,
            admin_port: 15090,
            transparent: None,
            init_image: format!("mtls-sidecar-init:{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Why input could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// Not YAML.
    #[error("document {doc}: not valid YAML: {message}")]
    Yaml {
        /// 1-based document number.
        doc: usize,
        /// Parser message.
        message: String,
    },
    /// A workload without the expected pod template.
    #[error("document {doc} ({kind} {name}): {message}")]
    Shape {
        /// 1-based document number.
        doc: usize,
        /// Kind.
        kind: String,
        /// metadata.name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
}

fn probe(path: &str, port: u16, period: u64, failures: u64) -> Value {
    map(vec![
        ("httpGet", map(vec![("path", s(path)), ("port", Value::from(port))])),
        ("periodSeconds", Value::from(period)),
        ("failureThreshold", Value::from(failures)),
    ])
}

fn secret_volume(name: &str) -> String {
    format!("mtls-sidecar-secret-{name}")
}

fn sidecar_container(o: &Options) -> Value {
    let mut mounts = vec![map(vec![
        ("name", s(CONFIG_VOLUME)),
        ("mountPath", s(CONFIG_DIR)),
        ("readOnly", Value::Bool(true)),
    ])];
    for secret in &o.secrets {
        mounts.push(map(vec![
            ("name", s(&secret_volume(secret))),
            ("mountPath", s(&format!("{SECRETS_DIR}/{secret}"))),
            ("readOnly", Value::Bool(true)),
        ]));
    }
    map(vec![
        ("name", s(CONTAINER)),
        ("image", s(&o.image)),
        (
            "args",
            Value::Sequence(vec![s("run"), s("--config"), s(&format!("{CONFIG_DIR}/config.yaml"))]),
        ),
        ("restartPolicy", s("Always")),
        (
            "ports",
            Value::Sequence(vec![map(vec![
                ("name", s("mtls-admin")),
                ("containerPort", Value::from(o.admin_port)),
                ("protocol", s("TCP")),
            ])]),
        ),
        ("startupProbe", probe("/readyz", o.admin_port, 1, 120)),
        ("readinessProbe", probe("/readyz", o.admin_port, 5, 2)),
        ("livenessProbe", probe("/healthz", o.admin_port, 10, 3)),
        (
            "resources",
            map(vec![
                ("requests", map(vec![("cpu", s("50m")), ("memory", s("32Mi"))])),
                ("limits", map(vec![("memory", s("128Mi"))])),
            ]),
        ),
        (
            "securityContext",
            map(vec![
                ("runAsUser", Value::from(UID)),
                ("runAsGroup", Value::from(UID)),
                ("runAsNonRoot", Value::Bool(true)),
                ("readOnlyRootFilesystem", Value::Bool(true)),
                ("allowPrivilegeEscalation", Value::Bool(false)),
                ("capabilities", map(vec![("drop", Value::Sequence(vec![s("ALL")]))])),
                ("seccompProfile", map(vec![("type", s("RuntimeDefault"))])),
            ]),
        ),
        ("volumeMounts", Value::Sequence(mounts)),
    ])
}

/// The init container that installs the transparent-mode redirect (needs NET_ADMIN).
fn iptables_container(o: &Options, port: u16) -> Value {
    map(vec![
        ("name", s("mtls-sidecar-iptables")),
        ("image", s(&o.init_image)),
        (
            "args",
            Value::Sequence(vec![
                s("iptables"),
                s("--apply"),
                s("--port"),
                s(&port.to_string()),
                s("--uid"),
                s(&UID.to_string()),
            ]),
        ),
        (
            "securityContext",
            map(vec![
                ("runAsUser", Value::from(0u64)),
                ("runAsNonRoot", Value::Bool(false)),
                ("readOnlyRootFilesystem", Value::Bool(true)),
                ("allowPrivilegeEscalation", Value::Bool(false)),
                (
                    "capabilities",
                    map(vec![
                        ("add", Value::Sequence(vec![s("NET_ADMIN"), s("NET_RAW")])),
                        ("drop", Value::Sequence(vec![s("ALL")])),
                    ]),
                ),
            ]),
        ),
    ])
}

/// Replaces the item named `name` in a list of named objects, or appends it.
fn upsert_named(list: &mut Vec<Value>, item: Value) {
    let name = item.get("name").cloned();
    match list.iter_mut().find(|v| v.get("name") == name.as_ref()) {
        Some(slot) => *slot = item,
        None => list.push(item),
    }
}

fn seq_at<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Vec<Value>, String> {
    let v = m.entry(s(key)).or_insert_with(|| Value::Sequence(Vec::new()));
    if v.is_null() {
        *v = Value::Sequence(Vec::new());
    }
    v.as_sequence_mut().ok_or_else(|| format!("`{key}` is not a list"))
}

fn map_at<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping, String> {
    let v = m.entry(s(key)).or_insert_with(|| Value::Mapping(Mapping::new()));
    if v.is_null() {
        *v = Value::Mapping(Mapping::new());
    }
    v.as_mapping_mut().ok_or_else(|| format!("`{key}` is not a mapping"))
}

fn inject_pod(meta: &mut Mapping, spec: &mut Mapping, o: &Options) -> Result<(), String> {
    let annotations = map_at(meta, "annotations")?;
    for (k, v) in [
        ("prometheus.io/scrape", "true".to_owned()),
        ("prometheus.io/port", o.admin_port.to_string()),
        ("prometheus.io/path", "/metrics".to_owned()),
        ("mtls-sidecar.io/injected", env!("CARGO_PKG_VERSION").to_owned()),
    ] {
        annotations.insert(s(k), Value::String(v));
    }
    let proxy = format!("http://127.0.0.1:{}", o.http_port);
    let containers = seq_at(spec, "containers")?;
    if containers.is_empty() {
        return Err("the pod template has no containers".into());
    }
    for c in containers.iter_mut() {
        let c = c.as_mapping_mut().ok_or("a container is not a mapping")?;
        let env = seq_at(c, "env")?;
        for (upper, lower, value) in [
            ("HTTP_PROXY", "http_proxy", proxy.as_str()),
            ("NO_PROXY", "no_proxy", "localhost,127.0.0.1,::1"),
        ] {
            // Never override what the app already chose, in either spelling.
            let set = env
                .iter()
                .any(|e| matches!(e.get("name").and_then(Value::as_str), Some(n) if n == upper || n == lower));
            if !set {
                env.push(map(vec![("name", s(upper)), ("value", s(value))]));
                env.push(map(vec![("name", s(lower)), ("value", s(value))]));
            }
        }
    }
    let init = seq_at(spec, "initContainers")?;
    if let Some(port) = o.transparent {
        upsert_named(init, iptables_container(o, port));
    }
    // The sidecar goes first so it is up before any other init container runs.
    let sidecar = sidecar_container(o);
    init.retain(|c| c.get("name").and_then(Value::as_str) != Some(CONTAINER));
    let at = usize::from(
        o.transparent.is_some() && init.first().and_then(|c| c.get("name")) == Some(&s("mtls-sidecar-iptables")),
    );
    init.insert(at.min(init.len()), sidecar);
    let volumes = seq_at(spec, "volumes")?;
    upsert_named(
        volumes,
        map(vec![
            ("name", s(CONFIG_VOLUME)),
            ("configMap", map(vec![("name", s(&o.config_map))])),
        ]),
    );
    for secret in &o.secrets {
        upsert_named(
            volumes,
            map(vec![
                ("name", s(&secret_volume(secret))),
                (
                    "secret",
                    // 0440: owner and group (fsGroup) may read the key; nobody else.
                    map(vec![("secretName", s(secret)), ("defaultMode", Value::from(0o440u64))]),
                ),
            ]),
        );
    }
    let sc = map_at(spec, "securityContext")?;
    if !sc.contains_key("fsGroup") {
        sc.insert(s("fsGroup"), Value::from(UID));
    }
    Ok(())
}

/// Where the pod template of `kind` lives: (metadata path, spec path).
fn template_path(kind: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    match kind {
        "Pod" => Some((&["metadata"], &["spec"])),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some((&["spec", "template", "metadata"], &["spec", "template", "spec"]))
        }
        "CronJob" => Some((
            &["spec", "jobTemplate", "spec", "template", "metadata"],
            &["spec", "jobTemplate", "spec", "template", "spec"],
        )),
        _ => None,
    }
}

fn walk<'a>(mut v: &'a mut Mapping, path: &[&str], create: bool) -> Result<&'a mut Mapping, String> {
    for key in path {
        if !create && !v.contains_key(*key) {
            return Err(format!("missing `{}`", path.join(".")));
        }
        v = map_at(v, key)?;
    }
    Ok(v)
}

/// Splits a YAML stream at its `---` document markers, keeping each document's text as is.
fn documents(input: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in input.split_inclusive('\n') {
        let marker = line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if marker {
            docs.push(String::new());
            // `--- {inline: doc}` keeps its content after the marker.
            let rest = line[3..].trim_start_matches([' ', '\t']);
            if !rest.trim().is_empty()
                && let Some(d) = docs.last_mut()
            {
                d.push_str(rest);
            }
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
        }
    }
    docs
}

/// Injects into every workload document of `input`; other documents pass through unchanged,
/// byte for byte.
pub fn inject(input: &str, o: &Options) -> Result<String, InjectError> {
    let mut out = Vec::new();
    for (i, text) in documents(input).into_iter().enumerate() {
        let n = i + 1;
        let mut v: Value = serde_yaml::from_str(&text).map_err(|e| InjectError::Yaml {
            doc: n,
            message: e.to_string(),
        })?;
        if v.is_null() {
            continue;
        }
        if !v.is_mapping() {
            return Err(InjectError::Yaml {
                doc: n,
                message: "a Kubernetes object must be a mapping".into(),
            });
        }
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        let name = v
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>")
            .to_owned();
        if kind == "List" {
            return Err(InjectError::Shape {
                doc: n,
                kind,
                name,
                message: "`kind: List` is not supported; pass the items as separate YAML documents".into(),
            });
        }
        let Some((meta_path, spec_path)) = template_path(&kind) else {
            let mut text = text;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            out.push(text);
            continue;
        };
        let shape = |message: String| InjectError::Shape {
            doc: n,
            kind: kind.clone(),
            name: name.clone(),
            message,
        };
        let root = v.as_mapping_mut().ok_or_else(|| shape("not a mapping".into()))?;
        // Two disjoint borrows of the same tree: take the spec out, edit, put it back.
        let mut spec = walk(root, spec_path, false).map_err(shape)?.clone();
        let meta = walk(root, meta_path, true).map_err(shape)?;
        inject_pod(meta, &mut spec, o).map_err(shape)?;
        *walk(root, spec_path, false).map_err(shape)? = spec;
        out.push(serde_yaml::to_string(&v).map_err(|e| InjectError::Yaml {
            doc: n,
            message: e.to_string(),
        })?);
    }
    Ok(out.join("---\n"))
}

/// CLI entry: `-f FILE` or `-` (stdin) → stdout.
pub fn main(file: Option<PathBuf>, o: &Options) -> ExitCode {
    let input = match file.as_deref() {
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        }
        Some(p) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        }
        Some(p) => std::fs::read_to_string(p),
    };
    let input = match input {
        Ok(i) => i,
        Err(e) => {
            eprintln!("mtls-sidecar inject: cannot read input: {e}");
            return ExitCode::from(66);
        }
    };
    match inject(&input, o) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mtls-sidecar inject: {e}; nothing was written");
            ExitCode::from(65)
        }
    }
}
