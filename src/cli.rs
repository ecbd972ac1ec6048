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

/// A multi-threaded runtime with `workers` threads (default: the CPUs this process may use,
/// which honours CPU affinity and the cgroup quota).
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all().thread_name("mtls-sidecar").build()
}
