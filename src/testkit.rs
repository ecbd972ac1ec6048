//! Tools the `demo` command and the tests share: a throwaway PKI, Secret directories written
//! exactly as the kubelet writes them, and upstreams that require client certificates.

pub mod client;
pub mod http_upstream;
pub mod pki;
pub mod secret_dir;
pub mod upstream;
