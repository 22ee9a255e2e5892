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
pub mod pipeline;
pub mod secret;
pub mod server;
pub mod sim;
pub mod store;
pub mod token;

use config::{Config, StoreLocation};
use pipeline::Pipeline;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use token::TokenCache;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long in-flight requests may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("upstream `{upstream}`: cannot listen on {addr}: {source}")]
    Bind {
        upstream: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream `{upstream}`: {reason}")]
    Upstream { upstream: String, reason: String },
    #[error("state store: {0}")]
    Store(#[from] store::StoreError),
    #[error("state.store: {0}")]
    StoreLocation(String),
}

/// A running proxy: every listener bound, every refresh-ahead task started.
pub struct Proxy {
    addrs: BTreeMap<String, SocketAddr>,
    admin_addr: Option<SocketAddr>,
    tokens: BTreeMap<String, Arc<TokenCache>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Bind the listeners of `config` and start serving.
    pub async fn start(config: &Config) -> Result<Proxy, StartError> {
        let location =
            StoreLocation::parse(&config.state.store).map_err(StartError::StoreLocation)?;
        let store = store::open(&location)?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut addrs = BTreeMap::new();
        let mut caches = BTreeMap::new();
        for up in &config.upstreams {
            let fail = |reason: String| StartError::Upstream {
                upstream: up.name.clone(),
                reason,
            };
            let roots =
                match &up.ca_file {
                    Some(path) => Some(std::fs::read(path).map_err(|e| {
                        fail(format!("cannot read ca_file {}: {e}", path.display()))
                    })?),
                    None => None,
                };
            let tokens =
                Arc::new(TokenCache::new(up, Arc::clone(&store), roots.as_deref()).map_err(&fail)?);
            let upstream = forward::Upstream::new(up, roots.as_deref()).map_err(&fail)?;
            let listener = tokio::net::TcpListener::bind(up.listen)
                .await
                .map_err(|source| StartError::Bind {
                    upstream: up.name.clone(),
                    addr: up.listen,
                    source,
                })?;
            let local = listener.local_addr().map_err(|source| StartError::Bind {
                upstream: up.name.clone(),
                addr: up.listen,
                source,
            })?;
            let pipeline = Arc::new(Pipeline::new(up, local, upstream, Arc::clone(&tokens)));
            tasks.spawn(server::serve(
                listener,
                pipeline,
                stopped.clone(),
                SHUTDOWN_GRACE,
            ));
            let mut stop_refresh = stopped.clone();
            tasks.spawn(Arc::clone(&tokens).refresh_ahead(async move {
                server::stopped(&mut stop_refresh).await;
            }));
            tracing::info!(upstream = %up.name, listen = %local, url = %up.url, "listening");
            addrs.insert(up.name.clone(), local);
            caches.insert(up.name.clone(), tokens);
        }
        let admin_addr = match &config.admin {
            Some(admin) => {
                let listener =
                    tokio::net::TcpListener::bind(admin.listen)
                        .await
                        .map_err(|source| StartError::Bind {
                            upstream: "admin".into(),
                            addr: admin.listen,
                            source,
                        })?;
                let local = listener.local_addr().ok();
                let handler = Arc::new(admin::Admin::new(caches.values().cloned().collect()));
                tasks.spawn(server::serve(
                    listener,
                    handler,
                    stopped.clone(),
                    SHUTDOWN_GRACE,
                ));
                tracing::info!(listen = ?local, "admin listening");
                local
            }
            None => None,
        };
        Ok(Proxy {
            addrs,
            admin_addr,
            tokens: caches,
            stop,
            tasks,
        })
    }

    /// The address the listener of upstream `name` is bound to.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.get(name).copied()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The token cache of upstream `name` (status and tests).
    pub fn tokens(&self, name: &str) -> Option<&Arc<TokenCache>> {
        self.tokens.get(name)
    }

    /// Stop accepting, let in-flight requests finish (up to [`SHUTDOWN_GRACE`]), stop refreshing.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Run the proxy until `shutdown` resolves, then shut down gracefully.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let proxy = Proxy::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down: finishing in-flight requests");
    proxy.shutdown().await;
    Ok(())
}
