//! The `mtls-sidecar` binary: everything lives in the library; this only hands over.

fn main() -> std::process::ExitCode {
    mtls_sidecar::cli::main()
}
