//! The integration tests, one binary: a module per area, the harness in [`common`]. Every
//! server a test needs (identity server, API, TLS front, Redis, the proxy itself) it starts on
//! loopback; nothing depends on the order the tests run in.
//!
//! One binary links the crate once (25 binaries each linked it whole); `cargo test` runs them
//! all, `cargo test --test it replicas::` one area.

mod common;

mod admin;
mod budgets;
mod client_proof;
mod config_files;
#[cfg(feature = "demo")]
mod demo;
mod dpop;
mod echo;
mod hostile;
mod identities;
mod inbound;
mod limits;
mod lineage;
mod login;
mod messages;
mod mtls;
mod presets;
mod process;
mod providers;
mod proxy;
mod quotas;
mod reload;
mod replicas;
mod restart;
mod sealed;
mod secrets;
mod shutdown;
mod status_page;
mod store_faults;
mod streaming;
mod tls;
mod tls_listener;
mod tokens;
