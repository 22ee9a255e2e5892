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
pub mod inbound;
pub mod pipeline;
pub mod provider;
pub mod quota;
pub mod secret;
pub mod server;
pub mod sim;
pub mod stats;
pub mod store;
pub mod tls;
pub mod token;

use config::{Config, StoreLocation};
use pipeline::Pipeline;
use quota::{Clock, Quota};
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
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    workers: Vec<std::thread::JoinHandle<()>>,
    quotas: Vec<Arc<Quota>>,
    certs: Vec<(String, Arc<tls::CertStore>)>,
}

/// One upstream's listener(s) and what each needs to build its pipeline.
struct Bound {
    config: config::UpstreamConfig,
    certs: Option<Arc<tls::CertStore>>,
    tokens: Arc<TokenCache>,
    quota: Arc<Quota>,
    roots: Option<Vec<u8>>,
    local: SocketAddr,
    listeners: Vec<std::net::TcpListener>,
}

impl Proxy {
    /// Bind the listeners of `config` and serve on the caller's runtime (tests, embedding).
    pub async fn start(config: &Config) -> Result<Proxy, StartError> {
        Proxy::start_with_workers(config, 1).await
    }

    /// Bind the listeners of `config` and serve them on `workers` threads.
    ///
    /// With more than one worker, each is an OS thread with its own single-threaded runtime,
    /// its own `SO_REUSEPORT` listener per upstream and its own upstream connection pool, so a
    /// request is accepted, forwarded and answered on one thread without cross-thread wakeups
    /// (the event-loop-per-core model nginx uses). The token caches are shared and lock-free.
    pub async fn start_with_workers(config: &Config, workers: usize) -> Result<Proxy, StartError> {
        Proxy::start_inner(config, workers, Clock::system()).await
    }

    /// [`Proxy::start`] with quotas that read `clock`: tests move it to pass a day or a minute.
    pub async fn start_with_clock(config: &Config, clock: Clock) -> Result<Proxy, StartError> {
        Proxy::start_inner(config, 1, clock).await
    }

    async fn start_inner(
        config: &Config,
        workers: usize,
        clock: Clock,
    ) -> Result<Proxy, StartError> {
        let workers = workers.max(1);
        let location =
            StoreLocation::parse(&config.state.store).map_err(StartError::StoreLocation)?;
        let store = store::open(&location)?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut bound = Vec::new();
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
            let quota = Arc::new(Quota::new(
                &up.name,
                up.quota.as_ref(),
                Arc::clone(&store),
                clock.clone(),
            ));
            quota.load().await?;
            // Fail on a bad upstream URL or CA, or a bad certificate, before binding anything.
            forward::Upstream::new(up, roots.as_deref()).map_err(&fail)?;
            let certs = match &up.tls {
                Some(t) => Some(tls::CertStore::open(&t.cert, &t.key).map_err(&fail)?),
                None => None,
            };
            let bind_error = |source| StartError::Bind {
                upstream: up.name.clone(),
                addr: up.listen,
                source,
            };
            let listeners = server::bind(up.listen, workers).map_err(bind_error)?;
            let local = listeners[0].local_addr().map_err(bind_error)?;
            let mut stop_refresh = stopped.clone();
            tasks.spawn(Arc::clone(&tokens).refresh_ahead(async move {
                server::stopped(&mut stop_refresh).await;
            }));
            tracing::info!(upstream = %up.name, listen = %local, url = %up.url, workers, "listening");
            bound.push(Bound {
                config: up.clone(),
                certs,
                tokens,
                quota,
                roots,
                local,
                listeners,
            });
        }

        // Worker i serves the i-th listener of every upstream.
        let mut per_worker: Vec<Vec<server::Served<tokio::net::TcpListener, Pipeline>>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut std_per_worker: Vec<Vec<server::Served<std::net::TcpListener, Pipeline>>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut stats: BTreeMap<String, Vec<Arc<stats::RequestStats>>> = BTreeMap::new();
        for b in &mut bound {
            // One cap for the listener, however many workers accept on it.
            let limits = server::Limits::new(&b.config.limits);
            let tls = b.certs.as_ref().map(tls::CertStore::acceptor);
            for (i, listener) in b.listeners.drain(..).enumerate() {
                let worker_stats = Arc::new(stats::RequestStats::default());
                stats
                    .entry(b.config.name.clone())
                    .or_default()
                    .push(Arc::clone(&worker_stats));
                let upstream =
                    forward::Upstream::new(&b.config, b.roots.as_deref()).expect("checked above");
                let pipeline = Arc::new(Pipeline::new(
                    &b.config,
                    b.local,
                    upstream,
                    Arc::clone(&b.tokens),
                    Arc::clone(&b.quota),
                    worker_stats,
                ));
                if workers == 1 {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).map_err(|source| {
                            StartError::Bind {
                                upstream: b.config.name.clone(),
                                addr: b.local,
                                source,
                            }
                        })?;
                    per_worker[i].push((listener, pipeline, limits.clone(), tls.clone()));
                } else {
                    std_per_worker[i].push((listener, pipeline, limits.clone(), tls.clone()));
                }
            }
        }
        for (listener, pipeline, limits, tls) in per_worker.into_iter().flatten() {
            tasks.spawn(server::serve(
                listener,
                pipeline,
                limits,
                tls,
                stopped.clone(),
                SHUTDOWN_GRACE,
            ));
        }
        let mut threads = Vec::new();
        for (i, set) in std_per_worker.into_iter().enumerate() {
            if set.is_empty() {
                continue;
            }
            let stopped = stopped.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-worker-{i}"))
                .spawn(move || server::run_worker(set, stopped, SHUTDOWN_GRACE))
                .map_err(|e| StartError::Upstream {
                    upstream: "*".into(),
                    reason: format!("cannot start worker thread: {e}"),
                })?;
            threads.push(thread);
        }

        let upstreams: Vec<admin::Upstream> = bound
            .iter()
            .map(|b| admin::Upstream {
                name: b.config.name.clone(),
                tokens: Arc::clone(&b.tokens),
                quota: Arc::clone(&b.quota),
                stats: stats.remove(&b.config.name).unwrap_or_default(),
            })
            .collect();
        let quotas = bound.iter().map(|b| Arc::clone(&b.quota)).collect();
        let certs = bound
            .iter()
            .filter_map(|b| Some((b.config.name.clone(), Arc::clone(b.certs.as_ref()?))))
            .collect();
        let addrs = bound
            .iter()
            .map(|b| (b.config.name.clone(), b.local))
            .collect();
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
                let handler = Arc::new(admin::Admin::new(upstreams));
                tasks.spawn(server::serve(
                    listener,
                    handler,
                    server::Limits::default(),
                    None,
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
            stop,
            tasks,
            workers: threads,
            quotas,
            certs,
        })
    }

    /// The address the listener of upstream `name` is bound to.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.get(name).copied()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Read every TLS listener's certificate and key again (SIGHUP). A listener whose files
    /// cannot be read keeps its certificate; the errors are returned, one per listener.
    pub fn reload_tls(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, certs) in &self.certs {
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
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        for quota in &self.quotas {
            if let Err(e) = quota.give_back().await {
                tracing::warn!(error = %e, "could not give unspent daily quota back; it stays spent for today");
            }
        }
    }
}

/// A valid access token for upstream `name`: the stored one while it is fresh, else a new one,
/// redeemed under the store's refresh lock — safe beside a running `serve`.
pub async fn access_token(config: &Config, name: &str) -> Result<secret::Secret<String>, String> {
    let up = config.upstream(name).ok_or_else(|| {
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        format!(
            "no upstream named `{name}`; the config has: {}",
            names.join(", ")
        )
    })?;
    let location = StoreLocation::parse(&config.state.store)?;
    let store = store::open(&location).map_err(|e| e.to_string())?;
    let roots = match &up.ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let cache = TokenCache::new(up, store, roots.as_deref())?;
    let token = cache.get().await.map_err(|e| e.to_string())?;
    Ok(token.bearer())
}

/// Run the proxy on `workers` threads (default: one per CPU) until `shutdown` resolves, then
/// shut down gracefully.
pub async fn run(
    config: &Config,
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
    let proxy = Proxy::start_with_workers(config, workers).await?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangups.recv() => {
                tracing::info!("SIGHUP: reading TLS certificates again");
                proxy.reload_tls();
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    proxy.shutdown().await;
    Ok(())
}
