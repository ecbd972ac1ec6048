//! Command line (SPEC §7): `run` (default), `check`, `demo`; exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, ConfigError, ConfigSource, DEFAULT_CONFIG_PATH};

/// EX_CONFIG from sysexits.h: the configuration is wrong.
pub const EXIT_CONFIG: u8 = 78;

/// mtls-sidecar: plaintext in on loopback, mutual TLS out, certificates hot-reloaded.
#[derive(Debug, Parser)]
#[command(name = "mtls-sidecar", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: ConfigArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar (the default when no subcommand is given).
    Run(ConfigArgs),
    /// Validate the configuration and load every TLS context, like `nginx -t`. No network.
    Check(ConfigArgs),
    /// Run the whole mission on an embedded example: throwaway CA, upstream, sidecar, rotation.
    Demo,
    /// Add the sidecar to Kubernetes workloads (YAML on stdin or -f), like `linkerd inject`.
    Inject(InjectArgs),
    /// Exit 0 once the local sidecar is ready (for clusters without native sidecars).
    Wait(WaitArgs),
    /// Print (default) or apply the transparent-mode iptables rules for a pod.
    Iptables(IptablesArgs),
}

/// `iptables` options.
#[derive(Debug, Args)]
struct IptablesArgs {
    /// Apply the rules (needs NET_ADMIN) instead of printing them.
    #[arg(long)]
    apply: bool,
    /// IPv6 (ip6tables) rules.
    #[arg(long)]
    ipv6: bool,
    /// The transparent listener's port.
    #[arg(long, default_value_t = 15006)]
    port: u16,
    /// The sidecar's uid: its own connections are never redirected.
    #[arg(long, default_value_t = 65532)]
    uid: u32,
    /// A destination CIDR never redirected (repeatable).
    #[arg(long = "exclude-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    exclude_cidrs: Vec<crate::config::Cidr>,
    /// A destination port never redirected (repeatable).
    #[arg(long = "exclude-port", value_name = "PORT")]
    exclude_ports: Vec<u16>,
}

fn parse_cidr(s: &str) -> Result<crate::config::Cidr, String> {
    crate::config::Cidr::parse(s)
}

/// `inject` options.
#[derive(Debug, Args)]
struct InjectArgs {
    /// Input file, or `-` for stdin [default: stdin].
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Sidecar image.
    #[arg(long, default_value = concat!("mtls-sidecar:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// ConfigMap that holds the sidecar's config.yaml.
    #[arg(long, default_value = "mtls-sidecar-config")]
    config_map: String,
    /// Secret(s) to mount under /var/run/secrets/mtls-sidecar/<name> (repeatable).
    #[arg(long = "secret", value_name = "NAME", default_values_t = vec!["mtls-client-certs".to_owned()])]
    secrets: Vec<String>,
    /// The sidecar's HTTP listener port (for HTTP_PROXY).
    #[arg(long, default_value_t = 15001)]
    http_port: u16,
    /// The sidecar's admin port (probes, Prometheus).
    #[arg(long, default_value_t = 15090)]
    admin_port: u16,
    /// Also add the iptables init container redirecting outbound TCP to this transparent port.
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "15006")]
    transparent: Option<u16>,
    /// Image of the iptables init container (the Dockerfile's `iptables` target).
    #[arg(long, default_value = concat!("mtls-sidecar-init:", env!("CARGO_PKG_VERSION")))]
    init_image: String,
}

/// `wait` options.
#[derive(Debug, Args)]
struct WaitArgs {
    /// Give up after this long.
    #[arg(long, default_value = "60s", value_parser = parse_dur)]
    timeout: std::time::Duration,
    /// The sidecar's admin address.
    #[arg(long, default_value = "127.0.0.1:15090")]
    admin: std::net::SocketAddr,
}

fn parse_dur(s: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(s)
}

/// Where the configuration comes from.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// Configuration file [default: /etc/mtls-sidecar/config.yaml].
    #[arg(long, short = 'c', env = "MTLS_SIDECAR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Emissary TLSContext/Mapping/TCPMapping YAML to import (repeatable).
    #[arg(long, value_name = "FILE")]
    pub emissary: Vec<PathBuf>,
}

impl ConfigArgs {
    /// The configuration source these arguments name.
    pub fn source(&self) -> ConfigSource {
        ConfigSource {
            path: Some(
                self.config
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
            ),
            emissary: self.emissary.clone(),
        }
    }
}

/// Parses arguments and runs the chosen command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(&cli.run),
        Some(Command::Run(a)) => run(&a),
        Some(Command::Check(a)) => crate::check::main(&a),
        Some(Command::Demo) => crate::demo::main(),
        Some(Command::Wait(w)) => crate::wait::main(w.admin, w.timeout),
        Some(Command::Iptables(a)) => {
            let rules = crate::iptables::Rules {
                port: a.port,
                uid: a.uid,
                exclude_cidrs: a.exclude_cidrs,
                exclude_ports: a.exclude_ports,
                ipv6: a.ipv6,
            };
            crate::iptables::main(&rules, a.apply)
        }
        Some(Command::Inject(a)) => {
            let o = crate::inject::Options {
                image: a.image,
                config_map: a.config_map,
                secrets: a.secrets,
                http_port: a.http_port,
                admin_port: a.admin_port,
                transparent: a.transparent,
                init_image: a.init_image,
            };
            crate::inject::main(a.file, &o)
        }
    }
}

/// Prints configuration problems the way every command does.
pub fn report_config_error(e: &ConfigError) -> ExitCode {
    eprintln!("mtls-sidecar: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(args: &ConfigArgs) -> ExitCode {
    let (config, warnings) = match config::load(&args.source()) {
        Ok(v) => v,
        Err(e) => return report_config_error(&e),
    };
    crate::logging::init(&config.log);
    for w in &warnings {
        tracing::warn!("configuration: {w}");
    }
    match crate::sys::raise_nofile_limit() {
        Ok((old, new)) if new > old => tracing::info!(old, new, "raised the open-file limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let rt = match runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mtls-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(crate::app::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("mtls-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime: `workers` threads (default: the CPUs this process may use, which honours CPU
/// affinity and the cgroup quota). With one worker, a current-thread runtime: no work
/// stealing and no cross-thread wake-ups, which measurably lowers CPU per request.
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().thread_name("mtls-sidecar").build()
}
