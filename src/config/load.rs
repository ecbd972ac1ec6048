//! figment → `Config`, collecting every problem instead of stopping at the first.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Yaml};
use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;

use super::{Config, ENV_PREFIX, validate};

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `tls_contexts.upstream.min_tls_version` or `mappings[2].tls`.
    pub path: String,
    /// What is wrong, quoting the bad value.
    pub message: String,
    /// Where the value came from (file or environment variable), when known.
    pub origin: Option<String>,
}

impl Problem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
            origin: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "{}: {}", self.path, self.message)?;
        }
        if let Some(o) = &self.origin {
            write!(f, " (from {o})")?;
        }
        Ok(())
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in the order they were found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "{n} configuration problem{}:", if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The YAML file; `None` means defaults and environment only.
    pub path: Option<PathBuf>,
    /// Extra Emissary resource files (`--emissary`).
    pub emissary: Vec<PathBuf>,
}

/// Loads the file, applies `MTLS_SIDECAR__*` overrides, imports Emissary resources and validates.
pub fn load(source: &ConfigSource) -> Result<(Config, Vec<super::Warning>), ConfigError> {
    let mut figment = Figment::new();
    let file_name = source.path.as_ref().map(|p| p.display().to_string());
    if let Some(path) = &source.path {
        if let Err(e) = std::fs::read(path) {
            return Err(ConfigError {
                problems: vec![Problem::new(
                    "",
                    format!("cannot read configuration file {}: {e}", path.display()),
                )],
            });
        }
        figment = figment.merge(Yaml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
    let mut config = from_figment_with_origin(&figment, file_name.as_deref())?;
    let base = source.path.as_deref().and_then(Path::parent).unwrap_or(Path::new("."));
    for p in &mut config.emissary_resources {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    let mut files = config.emissary_resources.clone();
    files.extend(source.emissary.iter().cloned());
    finish(config, &files)
}

/// Imports Emissary files into `config` and validates the result.
pub fn finish(mut config: Config, emissary_files: &[PathBuf]) -> Result<(Config, Vec<super::Warning>), ConfigError> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for file in emissary_files {
        crate::config::emissary_import(&mut config, file, &mut problems, &mut warnings);
    }
    match validate(&config) {
        Ok(w) if problems.is_empty() => {
            warnings.extend(w);
            Ok((config, warnings))
        }
        Ok(_) => Err(ConfigError { problems }),
        Err(e) => {
            problems.extend(e.problems);
            Err(ConfigError { problems })
        }
    }
}

/// Deserializes a figment into a `Config`, reporting every section's problems at once.
pub fn from_figment(figment: &Figment) -> Result<Config, ConfigError> {
    from_figment_with_origin(figment, None)
}

fn from_figment_with_origin(figment: &Figment, file: Option<&str>) -> Result<Config, ConfigError> {
    let root = match figment.find_value("") {
        Ok(v) => v,
        // An empty figment has no root at all: that is the all-defaults configuration.
        Err(e) if e.missing() => return Ok(Config::default()),
        Err(e) => {
            return Err(ConfigError {
                problems: e.into_iter().map(|e| problem(e, "", file)).collect(),
            });
        }
    };
    let Some(mut dict) = root.into_dict() else {
        return Err(ConfigError {
            problems: vec![Problem::new(
                "",
                "the configuration must be a YAML mapping of keys such as listeners, tls_contexts, mappings",
            )],
        });
    };
    let mut problems = Vec::new();
    // Sections that hold many independent items are checked item by item, so a typo in
    // one TLSContext does not hide a typo in the next mapping.
    let contexts = dict.remove("tls_contexts");
    let mappings = dict.remove("mappings");
    let tcp = dict.remove("tcp_mappings");
    let rules = dict.remove("transparent_rules");
    for (key, value) in &dict {
        let single: Dict = [(key.clone(), value.clone())].into_iter().collect();
        check::<Config>(&Value::from(single), "", file, &mut problems);
    }
    if let Some(v) = &contexts {
        match v.as_dict() {
            Some(d) => {
                for (name, item) in d {
                    let path = format!("tls_contexts.{name}");
                    check::<super::TlsContextConfig>(item, &path, file, &mut problems);
                }
            }
            None => problems.push(Problem::new(
                "tls_contexts",
                "must be a mapping of context name to TLSContext fields",
            )),
        }
    }
    type Check = fn(&Value, &str, Option<&str>, &mut Vec<Problem>);
    let lists: [(&str, &Option<Value>, Check); 3] = [
        ("mappings", &mappings, check::<super::MappingConfig>),
        ("tcp_mappings", &tcp, check::<super::TcpMappingConfig>),
        ("transparent_rules", &rules, check::<super::TransparentRule>),
    ];
    for (section, value, check_item) in lists {
        let Some(v) = value else { continue };
        match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_item(item, &format!("{section}[{i}]"), file, &mut problems);
                }
            }
            None => problems.push(Problem::new(section, "must be a list")),
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    for (k, v) in [
        ("tls_contexts", contexts),
        ("mappings", mappings),
        ("tcp_mappings", tcp),
        ("transparent_rules", rules),
    ] {
        if let Some(v) = v {
            dict.insert(k.to_owned(), v);
        }
    }
    Value::from(dict).deserialize::<Config>().map_err(|e| ConfigError {
        problems: e.into_iter().map(|e| problem(e, "", file)).collect(),
    })
}

fn check<T: DeserializeOwned>(value: &Value, prefix: &str, file: Option<&str>, out: &mut Vec<Problem>) {
    if let Err(e) = value.deserialize::<T>() {
        out.extend(e.into_iter().map(|e| problem(e, prefix, file)));
    }
}

fn problem(e: figment::Error, prefix: &str, file: Option<&str>) -> Problem {
    let mut parts: Vec<String> = Vec::new();
    if !prefix.is_empty() {
        parts.push(prefix.to_owned());
    }
    parts.extend(e.path.iter().cloned());
    let message = match &e.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            // figment's own path usually ends with the unknown key already; a custom
            // visitor's (e.g. `ListenAddr`) does not.
            if parts.last() != Some(field) {
                parts.push(field.clone());
            }
            format!("unknown field `{field}`; expected one of: {}", expected.join(", "))
        }
        other => other.to_string(),
    };
    let path = parts.join(".").replace(".[", "[");
    let origin = env_origin(&path).or_else(|| file.map(str::to_owned));
    Problem { path, message, origin }
}

/// Names the environment variable that set `path`, if one did.
fn env_origin(path: &str) -> Option<String> {
    let var = format!(
        "{ENV_PREFIX}{}",
        path.split('.').map(str::to_uppercase).collect::<Vec<_>>().join("__")
    );
    std::env::var_os(&var).map(|_| format!("environment variable {var}"))
}
