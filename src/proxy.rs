//! The data path: routing, upstream connections, and the plaintext front ends.

pub mod accept;
pub mod connect;
pub mod error;
pub mod http;
pub mod pool;
pub mod relay;
pub mod route;
pub mod tcp;
pub mod transparent;

pub use error::UpstreamError;
