//! `mtls-sidecar check`: validate the configuration, load every context, print a report and
//! exit non-zero on any problem (like `nginx -t`). No network.

use std::process::ExitCode;
use std::time::SystemTime;

use crate::cli::{ConfigArgs, report_config_error};
use crate::config;
use crate::metrics::Metrics;
use crate::tls::info::{CertInfo, unix};
use crate::tls::{ReloadOutcome, TlsStore};

fn expires_in(c: &CertInfo) -> String {
    let secs = c.not_after_unix - unix(SystemTime::now());
    if secs < 0 {
        "EXPIRED".to_owned()
    } else if secs < 86_400 {
        format!("in {}h", secs / 3600)
    } else {
        format!("in {} days", secs / 86_400)
    }
}

/// Runs the check and returns the exit code.
pub fn main(args: &ConfigArgs) -> ExitCode {
    let source = args.source();
    let (config, warnings) = match config::load(&source) {
        Ok(v) => v,
        Err(e) => return report_config_error(&e),
    };
    let origin = source
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "environment".to_owned());
    println!(
        "configuration OK ({origin}): {} TLS context(s), {} mapping(s), {} TCP mapping(s)",
        config.tls_contexts.len(),
        config.mappings.len(),
        config.tcp_mappings.len()
    );
    for w in &warnings {
        println!("warning: {w}");
    }
    let store = TlsStore::new(&config, Metrics::new());
    let mut failed = 0;
    for slot in store.slots() {
        match slot.reload() {
            ReloadOutcome::Published(g) => {
                println!("context {}: OK", slot.name);
                match g.chain.first() {
                    Some(leaf) => println!(
                        "  client certificate: subject=\"{}\" SANs=[{}] serial={} key={} not_after={} ({})",
                        leaf.subject,
                        leaf.sans.join(", "),
                        leaf.serial,
                        g.key_type.as_deref().unwrap_or("?"),
                        leaf.not_after,
                        expires_in(leaf)
                    ),
                    None => println!(
                        "  no client certificate (origination only: the upstream is verified, we present none)"
                    ),
                }
                if slot.config().insecure_skip_verify {
                    println!("  WARNING: insecure_skip_verify: upstream certificates are not verified");
                } else {
                    let earliest = g.ca.iter().min_by_key(|c| c.not_after_unix);
                    println!(
                        "  CA bundle: {} certificate(s), {} ignored{}",
                        g.ca.len(),
                        g.ca_ignored,
                        earliest
                            .map(|c| format!("; earliest not_after={} ({})", c.not_after, expires_in(c)))
                            .unwrap_or_default()
                    );
                }
                for f in slot.source().files() {
                    if crate::tls::material::looks_like_subpath(&f) {
                        println!(
                            "  WARNING: {} looks like a subPath mount and will never rotate",
                            f.display()
                        );
                    }
                }
            }
            ReloadOutcome::Failed(e) => {
                failed += 1;
                println!("context {}: FAILED ({}): {e}", slot.name, e.kind());
            }
            ReloadOutcome::Unchanged => println!("context {}: OK (unchanged)", slot.name),
        }
    }
    if failed > 0 {
        println!("{failed} TLS context(s) failed to load");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
