//! Listeners: accept TCP connections, serve HTTP/1.1 and h2c (prior knowledge) on each through
//! hyper-util's auto builder, and shut down gracefully — stop accepting, let in-flight requests
//! finish, close idle keep-alive connections, give up after a grace period.

use crate::error::ProxyBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// What one listener lets a client connection cost (`[upstream.limits]`).
#[derive(Clone)]
pub struct Limits {
    /// To send a request head, and to keep an idle keep-alive connection (slowloris).
    pub header_timeout: Duration,
    pub max_header_size: usize,
    /// Shared by every worker's socket of the listener; `None` for no cap.
    pub connections: Option<Arc<tokio::sync::Semaphore>>,
}

impl Limits {
    pub fn new(config: &crate::config::LimitsConfig) -> Limits {
        Limits {
            header_timeout: config.header_timeout,
            max_header_size: config.max_header_size as usize,
            connections: Some(Arc::new(tokio::sync::Semaphore::new(
                config.max_connections,
            ))),
        }
    }
}

impl Default for Limits {
    /// The admin listener's: the upstream defaults, without a connection cap.
    fn default() -> Limits {
        Limits {
            connections: None,
            ..Limits::new(&crate::config::LimitsConfig::default())
        }
    }
}

/// Something that answers requests: a proxy pipeline or the admin endpoints.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, request: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> + Send;
}

impl Handler for crate::pipeline::Pipeline {
    fn call(&self, request: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> + Send {
        self.handle(request)
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A head that does not fit gets 431; hyper's read buffer is at least 8 KiB.
        .max_buf_size(limits.max_header_size.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Ping quiet HTTP/2 connections; one whose peer is gone closes.
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX));
    builder
}

/// Accept connections on `listener` until `shutdown` flips to true, then drain for up to `grace`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let builder = builder(&limits);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        // At the connection cap, wait here: this worker accepts nothing more meanwhile, and
        // other connections wait in the kernel's queue. (Accepting first means no worker sits
        // on a permit while connections queue at another worker's socket.)
        let permit = match &limits.connections {
            Some(cap) => tokio::select! {
                permit = Arc::clone(cap).acquire_owned() => permit.ok(),
                _ = stopped(&mut shutdown) => break,
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let (handler, tls, first_by) = (Arc::clone(&handler), tls.clone(), limits.header_timeout);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + first_by;
            match tls {
                None => connection(stream, handler, &builder, watcher, deadline).await,
                Some(acceptor) => {
                    // The handshake counts against the same deadline as the first request.
                    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            connection(stream, handler, &builder, watcher, deadline).await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "connections still open after the grace period; closing them");
        }
    }
}

/// Serve HTTP/1.1 or HTTP/2 on one connection. A client that has not started a request by
/// `deadline` is disconnected: hyper's header timeout only starts once it knows the protocol,
/// so a silent connection would otherwise hold its place forever.
async fn connection<H: Handler, IO>(
    io: IO,
    handler: Arc<H>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    deadline: tokio::time::Instant,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let started = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&started);
    let service = service_fn(move |request| {
        seen.store(true, Ordering::Relaxed);
        let handler = Arc::clone(&handler);
        async move { Ok::<_, Infallible>(handler.call(request).await) }
    });
    let served = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
    let mut served = std::pin::pin!(served);
    let result = tokio::select! {
        result = &mut served => result,
        _ = tokio::time::sleep_until(deadline) => {
            if !started.load(Ordering::Relaxed) {
                tracing::debug!("no request before the header timeout; closing the connection");
                return;
            }
            served.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Resolves once `shutdown` says stop (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Bind `count` listeners on `addr` with `SO_REUSEPORT`, so each worker accepts on its own
/// socket and the kernel spreads connections between them. Port 0 binds once, then the rest
/// join the port the first one got.
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    if count > 1 && addr.port() != 0 {
        // SO_REUSEPORT would let a second tollgate share the port and take half the
        // connections; a plain bind first proves the port is free.
        drop(std::net::TcpListener::bind(addr)?);
    }
    for _ in 0..count {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if count > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(1024)?.into_std()?;
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// One listener as a worker serves it: the socket, what answers, its limits, its TLS.
pub type Served<L, H> = (L, Arc<H>, Limits, Option<TlsAcceptor>);

/// Body of a worker thread: a single-threaded runtime serving its share of the listeners.
pub fn run_worker<H: Handler>(
    listeners: Vec<Served<std::net::TcpListener, H>>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a worker runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let mut served = tokio::task::JoinSet::new();
        for (listener, handler, limits, tls) in listeners {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    served.spawn(serve(listener, handler, limits, tls, stop.clone(), grace));
                }
                Err(e) => tracing::error!(error = %e, "cannot register a listener"),
            }
        }
        while served.join_next().await.is_some() {}
    });
}
