//! tollgate: an authenticating reverse proxy for OAuth2-protected APIs.
//!
//! Local tools talk plain HTTP to tollgate; tollgate forwards each request to the configured
//! API with `Authorization: Bearer <token>`, keeps that token fresh (refresh ahead of expiry,
//! one refresh at a time, one replay after a 401), and keeps rotated refresh tokens durable in
//! the state store. See `DESIGN.md` in the shared docs for the full request path.
//!
//! [`Proxy::start`] binds every listener and returns a handle, so tests run the whole program
//! in-process; [`run`] is the same until a shutdown signal.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod config;
pub mod demo;
pub mod error;
pub mod forward;
pub mod gate;
pub mod inbound;
pub mod pipeline;
pub mod provider;
pub mod proxy;
pub mod quota;
pub mod secret;
pub mod server;
pub mod sim;
pub mod stats;
pub mod store;
pub mod tls;
pub mod token;
pub mod trust;
pub mod usage;

pub use proxy::{Proxy, Reloaded, StartError, SHUTDOWN_GRACE};

use config::Config;
use std::future::Future;
use token::TokenCache;

/// How long `tollgate token` keeps retrying to save a rotated refresh token before it gives up.
const TOKEN_SAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A valid access token for upstream `name`: the stored one while it is fresh, else a new one,
/// redeemed under the store's refresh lock — safe beside a running `serve`.
pub async fn access_token(config: &Config, name: &str) -> Result<secret::Secret<String>, String> {
    let up = config.upstream_named(name)?;
    let store = store::open(&config.state).map_err(|e| e.to_string())?;
    let roots = up.read_ca()?;
    let cache = std::sync::Arc::new(TokenCache::new(up, store.clone(), roots.as_deref())?);
    // As long as a token request can take: an answer that comes late is still one to save.
    let token = cache.get_within(cache.longest_request()).await;
    // A refresh token rotated on the way, even by a refresh that failed after, must be saved
    // before the process ends, and the refresh lock let go.
    let settled = cache.settle(TOKEN_SAVE_WAIT).await;
    store.flush().await;
    if !settled {
        return Err(format!(
            "a new refresh token of upstream `{name}` could not be saved to the state store; it is lost when this command ends, so the next refresh redeems the one before it, which an identity server that rotates refuses: fix the store, then run `tollgate login {name}`"
        ));
    }
    Ok(token.map_err(|e| e.to_string())?.bearer())
}

/// Run the proxy on `workers` threads (default: one per CPU) until `shutdown` resolves, then
/// shut down gracefully. On SIGHUP, `reload` reads the config again and it is put in force
/// (see [`Proxy::reload`]), and every TLS certificate is read again; a config that cannot be
/// read or put in force is logged and the running one stays.
pub async fn run(
    config: &Config,
    reload: impl Fn() -> Result<Config, String>,
    workers: Option<usize>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let workers =
        workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Before starting, so that a SIGHUP during the start does not end the process.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| StartError::Upstream {
            upstream: "*".into(),
            reason: format!("cannot listen for SIGHUP: {e}"),
        })?;
    let mut proxy = Proxy::start_with_workers(config, workers).await?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangups.recv() => {
                tracing::info!("SIGHUP: reading the config and the TLS certificates again");
                reload_config(&mut proxy, &reload).await;
                proxy.reload_tls();
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    proxy.shutdown().await;
    Ok(())
}

async fn reload_config(proxy: &mut Proxy, reload: impl Fn() -> Result<Config, String>) {
    let refused = |error: &dyn std::fmt::Display| {
        tracing::error!(%error, "config not reloaded; the running config stays in force");
    };
    let config = match reload() {
        Ok(config) => config,
        Err(e) => return refused(&e),
    };
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    match proxy.reload(&config).await {
        Ok(changes) => tracing::info!(
            added = ?changes.added,
            removed = ?changes.removed,
            changed = ?changes.changed,
            "config reloaded"
        ),
        Err(e) => refused(&e),
    }
}
