//! TLS credentials: reading Secret volumes, validating, building rustls configs, publishing
//! generations, and watching for rotations.

pub mod client_config;
pub mod info;
pub mod material;
pub mod options;
pub mod reload;
pub mod store;
pub mod verify;

pub use material::MaterialError;
pub use store::{ContextSlot, Generation, ReloadOutcome, TlsStore};
