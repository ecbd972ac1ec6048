//! mtls-sidecar: a per-pod sidecar that takes the application's plaintext on loopback and
//! originates mutual TLS to upstream services, with certificates hot-reloaded from
//! Kubernetes Secret volumes. See ARCHITECTURE.md for the map of this crate.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod app;
pub mod check;
pub mod cli;
pub mod config;
pub mod demo;
pub mod inject;
pub mod iptables;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod shutdown;
pub mod sys;
pub mod testkit;
pub mod tls;
pub mod wait;
