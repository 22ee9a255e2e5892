//! The running proxy: what [`Proxy::start`] binds and starts, and the order
//! [`Proxy::shutdown`] stops it in. Starting is a reload from nothing ([`reload`]: what a
//! reload prepares, what it keeps and what carries over).
//!
//! Owns the per-upstream state that outlives a reload ([`Running`]): the token cache and its
//! refresh-ahead task, the quota, the TLS certificate, the request counters; and the
//! background work a reload leaves behind (listeners draining, retired token caches
//! landing their refresh), which shutdown waits for.

mod caches;
mod reload;

pub use reload::Reloaded;

use crate::admin::Admin;
use crate::config::{Config, UpstreamConfig, UpstreamFiles};
use crate::counters::RequestStats;
use crate::pipeline::Pipeline;
use crate::quota::{Clock, Quota};
use crate::server::{self, Listener, Workers};
use crate::store::{self, StateStore};
use crate::tls::CertStore;
use crate::token::TokenCache;
use crate::usage::{self, Usage};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long in-flight requests may take to finish after a shutdown signal, or after a reload
/// removed their listener.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the proxy could not start, or why a reload was refused.
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
    config: Config,
    store: Arc<dyn StateStore>,
    clock: Clock,
    workers: Workers,
    upstreams: BTreeMap<String, Running>,
    listeners: BTreeMap<String, Listener<Pipeline>>,
    admin: Option<Listener<Admin>>,
    /// Listeners a reload removed, draining, and what is given back after them.
    retiring: JoinSet<()>,
    /// Shows this replica to the others on a shared store.
    heartbeat: Option<Task>,
}

/// The state of one upstream that outlives a reload.
struct Running {
    config: UpstreamConfig,
    files: UpstreamFiles,
    tokens: Arc<TokenCache>,
    refresh: Task,
    /// Each `[[upstream.identity]]`'s cache, and its refresh-ahead task, by name.
    identities: BTreeMap<String, (Arc<TokenCache>, Task)>,
    quota: Arc<Quota>,
    certs: Option<Arc<CertStore>>,
    /// One per worker.
    stats: Vec<Arc<RequestStats>>,
    usage: Arc<Usage>,
    /// Adds the workers' counts to the day's use every [`usage::FLUSH_EVERY`].
    flushing: Task,
}

/// A background task and the switch that stops it.
struct Task {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl Proxy {
    /// Bind the listeners of `config` and serve on the caller's runtime (tests, embedding).
    pub async fn start(config: &Config) -> Result<Proxy, StartError> {
        Proxy::start_inner(config, None, Clock::system()).await
    }

    /// Bind the listeners of `config` and serve them on `workers` threads.
    ///
    /// Each worker is an OS thread with its own single-threaded runtime,
    /// its own `SO_REUSEPORT` socket per listener and its own upstream connection pool, so a
    /// request is accepted, forwarded and answered on one thread without cross-thread wakeups
    /// (the event-loop-per-core model nginx uses). The token caches are shared and lock-free.
    pub async fn start_with_workers(config: &Config, workers: usize) -> Result<Proxy, StartError> {
        Proxy::start_inner(config, Some(workers), Clock::system()).await
    }

    /// [`Proxy::start`] with quotas that read `clock`: tests move it to pass a day or a minute.
    pub async fn start_with_clock(config: &Config, clock: Clock) -> Result<Proxy, StartError> {
        Proxy::start_inner(config, None, clock).await
    }

    /// `workers`: threads of their own, or `None` for the caller's runtime.
    async fn start_inner(
        config: &Config,
        workers: Option<usize>,
        clock: Clock,
    ) -> Result<Proxy, StartError> {
        let store = store::open(&config.state).map_err(|e| match e {
            store::StoreError::Location(message) => StartError::StoreLocation(message),
            other => StartError::Store(other),
        })?;
        let workers = match workers {
            None => Workers::current(),
            Some(count) => Workers::start(count).map_err(|e| StartError::Upstream {
                upstream: "*".into(),
                reason: format!("cannot start the worker threads: {e}"),
            })?,
        };
        let heartbeat = match store.health() {
            Some(health) => {
                tracing::info!(store = %health.store, replica = %health.replica, "sharing the state store with other replicas");
                for warning in store.startup_warnings().await {
                    tracing::warn!("{warning}");
                }
                Some(heartbeat_task(&store))
            }
            None => None,
        };
        let mut proxy = Proxy {
            config: config.clone(),
            store,
            clock,
            workers,
            upstreams: BTreeMap::new(),
            listeners: BTreeMap::new(),
            admin: None,
            retiring: JoinSet::new(),
            heartbeat,
        };
        proxy.apply(config, None).await?;
        Ok(proxy)
    }

    /// The address the listener of upstream `name` is bound to.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).map(|l| l.local)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|l| l.local)
    }

    /// Stop the refresh-ahead task of a cache no upstream uses any more; shutdown waits for it
    /// and for a flight in the air, which saves what it redeemed.
    fn retire_tokens(&mut self, tokens: Arc<TokenCache>, task: Task) {
        let _ = task.stop.send(true);
        self.retiring.spawn(async move {
            let _ = task.handle.await;
            tokens.settle(SHUTDOWN_GRACE).await;
        });
    }

    /// Read every TLS listener's certificate and key again (SIGHUP). A listener whose files
    /// cannot be read keeps its certificate; the errors are returned, one per listener.
    pub fn reload_tls(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, up) in &self.upstreams {
            let Some(certs) = &up.certs else { continue };
            match certs.reload() {
                Ok(()) => tracing::info!(upstream = %name, "TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(upstream = %name, error = %e, "TLS certificate not reloaded; the old one stays in use");
                    errors.push(format!("upstream `{name}`: {e}"));
                }
            }
        }
        errors
    }

    /// Stop accepting, let in-flight requests finish (up to [`SHUTDOWN_GRACE`]), stop refreshing,
    /// give unspent daily quota back to the store.
    pub async fn shutdown(mut self) {
        let drained: Vec<_> = std::mem::take(&mut self.listeners)
            .into_values()
            .map(Listener::stop)
            .collect();
        let admin = self.admin.take().map(Listener::stop);
        for d in drained {
            d.await;
        }
        if let Some(admin) = admin {
            admin.await;
        }
        while self.retiring.join_next().await.is_some() {}
        // Every upstream at once: a refresh still saving must not hold the others back.
        let mut stopping = JoinSet::new();
        for up in std::mem::take(&mut self.upstreams).into_values() {
            let _ = up.flushing.stop.send(true);
            let caches: Vec<(Arc<TokenCache>, Task)> = std::iter::once((up.tokens, up.refresh))
                .chain(up.identities.into_values())
                .collect();
            for (_, task) in &caches {
                let _ = task.stop.send(true);
            }
            let (name, quota, flushing) = (up.config.name, up.quota, up.flushing);
            stopping.spawn(async move {
                let _ = flushing.handle.await;
                let settled = caches.into_iter().map(|(tokens, task)| async move {
                    let _ = task.handle.await;
                    tokens.settle(SHUTDOWN_GRACE).await;
                });
                futures_util::future::join_all(settled).await;
                give_back(&name, &quota).await;
            });
        }
        while stopping.join_next().await.is_some() {}
        if let Some(heartbeat) = self.heartbeat.take() {
            let _ = heartbeat.stop.send(true);
            let _ = heartbeat.handle.await;
        }
        self.store.flush().await;
        self.workers.stop().await;
    }
}

/// Give the unspent daily counts of `upstream` back to the store; a failure only costs them
/// for today.
async fn give_back(upstream: &str, quota: &Quota) {
    if let Err(e) = quota.give_back().await {
        tracing::warn!(%upstream, error = %e, "could not give unspent daily quota back; it stays spent for today");
    }
}

/// Show this replica on the shared store every `[state] heartbeat` until stopped.
fn heartbeat_task(store: &Arc<dyn StateStore>) -> Task {
    let (stop, mut stopped) = watch::channel(false);
    let store = Arc::clone(store);
    let handle = tokio::spawn(async move {
        loop {
            store.heartbeat().await;
            tokio::select! {
                _ = server::stopped(&mut stopped) => return,
                _ = tokio::time::sleep(store.heartbeat_every()) => {}
            }
        }
    });
    Task { stop, handle }
}

/// Add the workers' counts to the day's use every [`usage::FLUSH_EVERY`] until stopped, and
/// once more then.
fn flush_task(usage: &Arc<Usage>) -> Task {
    let (stop, mut stopped) = watch::channel(false);
    let usage = Arc::clone(usage);
    let handle = tokio::spawn(async move {
        loop {
            let stop = tokio::select! {
                _ = server::stopped(&mut stopped) => true,
                _ = tokio::time::sleep(usage::FLUSH_EVERY) => false,
            };
            if let Err(e) = usage.flush().await {
                tracing::debug!(error = %e, "could not add the day's use to the state store; trying again");
            }
            if stop {
                return;
            }
        }
    });
    Task { stop, handle }
}

/// Refresh `tokens` ahead of expiry until stopped.
fn refresh_task(tokens: &Arc<TokenCache>) -> Task {
    let (stop, mut stopped) = watch::channel(false);
    let handle = tokio::spawn(Arc::clone(tokens).refresh_ahead(async move {
        server::stopped(&mut stopped).await;
    }));
    Task { stop, handle }
}
