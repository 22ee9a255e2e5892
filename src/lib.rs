//! tollgate: an authenticating reverse proxy for OAuth2-protected APIs.
//!
//! Local tools talk plain HTTP to tollgate; tollgate forwards each request to the configured
//! API with `Authorization: Bearer <token>`, keeps that token fresh (refresh ahead of expiry,
//! one refresh at a time, one replay after a 401), and keeps rotated refresh tokens durable in
//! the state store.
//!
//! Where to start: [`proxy`] is the lifecycle (start, reload, shutdown), [`pipeline`] the path
//! of one request, [`token`] the token and its refresh, [`commands`] what each command does.
//! [`Proxy::start`] binds every listener and returns a handle, so tests run the whole program
//! in-process; [`run`] is the same until a shutdown signal.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod commands;
pub mod config;
pub mod counters;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod forward;
pub mod inbound_keys;
pub mod pipeline;
pub mod proxy;
pub mod quota;
pub mod response;
pub mod seal;
pub mod secret;
pub mod semaphore;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
pub mod usage;

pub use proxy::{Proxy, Reloaded, StartError, SHUTDOWN_GRACE};

pub use commands::{access_token, run};
