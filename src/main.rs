//! The `mtls-sidecar` binary: everything lives in the library; this only hands over.

// mimalloc: fewer cycles per allocation than glibc's malloc on the request path (measured
// with bench/run.sh), and no arena per thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mtls_sidecar::cli::main()
}
