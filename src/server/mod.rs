//! Listeners: accept TCP connections, serve HTTP/1.1 and h2c (prior knowledge) on each through
//! hyper-util's auto builder, and shut down gracefully — stop accepting, let in-flight requests
//! finish, close idle keep-alive connections, give up after a grace period.
//!
//! A [`Listener`] is one address served by every worker ([`Workers`]), each on its own socket
//! with its own [`Site`] — the handler and connection settings — behind an `ArcSwap`, so a
//! reload replaces what is served without closing a connection. The worker threads, and the
//! socket each has on a listener's address, are [`workers`]. A connection is closed once
//! it has had no request in flight for one to two times `header_timeout`, in either protocol.

use crate::config::LimitsConfig;
use crate::response::ProxyBody;
use crate::semaphore::Gate;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

mod workers;

pub use workers::{bind, Bound, Workers};

/// What a listener serves at the moment: a handler and the settings its connections get. A
/// reload swaps it whole; a connection keeps the settings it was accepted with, and each
/// request goes to the handler in force when it arrives.
pub struct Site<H> {
    pub handler: H,
    settings: Arc<Settings>,
}

/// How a connection is served: kept by the connection, apart from the handler, so an open
/// connection does not keep an old handler (and its pool, quota and token cache) alive.
struct Settings {
    builder: auto::Builder<TokioExecutor>,
    /// To send a request head, and to keep a connection with no request in flight.
    header_timeout: Duration,
    tls: Option<TlsAcceptor>,
}

impl<H> Site<H> {
    pub fn new(handler: H, limits: &LimitsConfig, tls: Option<TlsAcceptor>) -> Site<H> {
        Site {
            handler,
            settings: Arc::new(Settings {
                builder: builder(limits),
                header_timeout: limits.header_timeout,
                tls,
            }),
        }
    }
}

/// A listener's current [`Site`], one per worker socket.
pub type Live<H> = ArcSwap<Site<H>>;

/// Something that answers requests: a proxy pipeline or the admin endpoints.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, request: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> + Send;
}

/// What an HTTP/2 client may send on one stream before it is read (hyper's default).
const H2_STREAM_WINDOW: u32 = 1024 * 1024;

fn builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A head that does not fit gets 431; hyper's read buffer is at least 8 KiB.
        .max_buf_size((limits.max_header_size as usize).max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Ping quiet HTTP/2 connections; one whose peer is gone closes.
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(Duration::from_secs(20))
        // A stream whose body waits (in the quota's queue, behind a slow upstream) holds up
        // to its window of the connection's: with equal windows one such stream would stall
        // the bodies of the others, and their wait would count against their pace.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(4 * H2_STREAM_WINDOW)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX));
    builder
}

/// Accept connections on `listener` until `shutdown` flips to true, then drain for up to `grace`.
/// At most `cap` connections are open at once (shared by every worker's socket of a listener).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    live: Arc<Live<H>>,
    cap: Option<Arc<Gate>>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    // What connections are told; each holds a receiver, so all of them gone means every
    // connection has ended.
    let (ending, told) = watch::channel(Ending::Serving);
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
        let permit = match &cap {
            Some(cap) => tokio::select! {
                permit = cap.acquire() => permit.ok(),
                _ = stopped(&mut shutdown) => break,
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let settings = Arc::clone(&live.load().settings);
        let live = Arc::clone(&live);
        let stop = told.clone();
        let started = tokio::time::Instant::now();
        // A task of its own shape for each: a plain connection's task does not carry the
        // room of a TLS stream and handshake.
        match settings.tls.clone() {
            None => tokio::spawn(async move {
                connection(stream, live, &settings, started, stop).await;
                drop(permit);
            }),
            Some(acceptor) => tokio::spawn(async move {
                secure(stream, acceptor, live, &settings, started, stop).await;
                drop(permit);
            }),
        };
    }
    drop((listener, told));
    let _ = ending.send(Ending::Graceful);
    tokio::select! {
        _ = ending.closed() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "connections still open after the grace period; closing them");
            let _ = ending.send(Ending::Forced);
        }
    }
}

/// A TLS connection: refuse plain HTTP in words, shake hands, then serve it. The handshake
/// counts against the same deadline as the first request, and is given up when the listener
/// stops: no request is in flight yet.
async fn secure<H: Handler>(
    mut stream: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    live: Arc<Live<H>>,
    settings: &Settings,
    started: tokio::time::Instant,
    mut stop: watch::Receiver<Ending>,
) {
    let deadline = started + settings.header_timeout;
    // Done with the connection when it spoke plain HTTP, sent nothing in time, or the
    // listener stopped meanwhile.
    let done = tokio::select! {
        peeked = tokio::time::timeout_at(deadline, crate::tls::answer_plain_http(&mut stream)) => {
            peeked.unwrap_or(true)
        }
        _ = stop.changed() => true,
    };
    if done {
        return;
    }
    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
    tokio::select! {
        shaken = handshake => match shaken {
            Ok(Ok(stream)) => connection(stream, live, settings, started, stop).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        },
        _ = stop.changed() => {}
    }
}

/// What a listener tells its connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    Serving,
    /// Finish the requests in flight, take no more.
    Graceful,
    /// Close now: the grace period is over.
    Forced,
}

/// Serve HTTP/1.1 or HTTP/2 on one connection, until the client closes it, `stop` says so,
/// or it has been idle — no request in flight — for its `header_timeout` (counted from
/// `started` for the first request; closed within twice that). hyper's own timeout covers an
/// HTTP/1 head that is slow to come; this covers a connection silent before its protocol is
/// known, which would otherwise hold its place forever, and an HTTP/2 connection without
/// streams, whose pings a live client answers.
async fn connection<H: Handler, IO>(
    io: IO,
    live: Arc<Live<H>>,
    settings: &Settings,
    started: tokio::time::Instant,
    mut stop: watch::Receiver<Ending>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let seen = Arc::clone(&activity);
    let service = service_fn(move |request| {
        let busy = Busy::begin(&seen);
        let site = live.load_full();
        async move {
            let response = site.handler.call(request).await;
            Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: busy }))
        }
    });
    let served = settings.builder.serve_connection(TokioIo::new(io), service);
    let mut served = std::pin::pin!(served);
    let idle = settings.header_timeout;
    let check = tokio::time::sleep_until(started + idle);
    let mut check = std::pin::pin!(check);
    let mut last_seen = 0;
    let mut closing = false;
    let result = loop {
        tokio::select! {
            biased;
            result = served.as_mut() => break result,
            told = stop.changed() => match told.map(|()| *stop.borrow_and_update()) {
                Ok(Ending::Graceful) if !closing => {
                    served.as_mut().graceful_shutdown();
                    closing = true;
                }
                Ok(Ending::Forced) | Err(_) => return,
                Ok(_) => {}
            },
            _ = check.as_mut(), if !closing => {
                // Idle when nothing began or ended since the last look and nothing is in
                // flight: closed between one and two idle times after the last request.
                let now = activity.0.load(Ordering::Acquire);
                if now == last_seen && now & IN_FLIGHT == 0 {
                    tracing::debug!(?idle, "connection idle for the header timeout; closing it");
                    served.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    last_seen = now;
                    check.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The requests of one connection: in flight (low 32 bits), and how many times one began or
/// ended (the rest), one atomic operation at each.
#[derive(Default)]
struct Activity(AtomicU64);

const IN_FLIGHT: u64 = 0xffff_ffff;
const EVENT: u64 = 1 << 32;

/// One request in flight, from its head until its response body is done (or dropped).
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(activity: &Arc<Activity>) -> Busy {
        activity.0.fetch_add(EVENT + 1, Ordering::AcqRel);
        Busy(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // One more event, one fewer in flight (never below zero: this one was counted).
        self.0 .0.fetch_add(EVENT - 1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is done.
struct Tracked {
    body: ProxyBody,
    _busy: Busy,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Resolves once `shutdown` says stop (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A listener being served: one socket per worker, each with its [`Live`] site.
pub struct Listener<H> {
    pub local: SocketAddr,
    sites: Vec<Arc<Live<H>>>,
    cap: Option<Arc<Gate>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl<H: Handler> Listener<H> {
    /// Serve `bound`, socket `i` on worker `i` with `sites[i]`, at most `cap` connections.
    pub fn serve(
        bound: Bound,
        sites: Vec<Site<H>>,
        cap: Option<usize>,
        workers: &Workers,
        grace: Duration,
    ) -> Listener<H> {
        let (stop, _) = watch::channel(false);
        let cap = cap.map(|n| Arc::new(Gate::new(n)));
        let sites: Vec<Arc<Live<H>>> = sites
            .into_iter()
            .map(|s| Arc::new(ArcSwap::from_pointee(s)))
            .collect();
        let tasks = bound
            .sockets
            .into_iter()
            .zip(&sites)
            .zip(workers.handles())
            .map(|((socket, live), handle)| {
                let (live, cap, stopped) = (Arc::clone(live), cap.clone(), stop.subscribe());
                handle.spawn(async move {
                    // Registered with the reactor of the worker that serves it.
                    match TcpListener::from_std(socket) {
                        Ok(listener) => serve(listener, live, cap, stopped, grace).await,
                        Err(e) => tracing::error!(error = %e, "cannot register a listener"),
                    }
                })
            })
            .collect();
        Listener {
            local: bound.local,
            sites,
            cap,
            stop,
            tasks,
        }
    }

    /// Serve `sites` from the next request on (one per worker, as at the start).
    pub fn swap(&self, sites: Vec<Site<H>>) {
        for (live, site) in self.sites.iter().zip(sites) {
            live.store(Arc::new(site));
        }
    }

    /// The sites in force, one per worker.
    pub fn sites(&self) -> impl Iterator<Item = Arc<Site<H>>> + '_ {
        self.sites.iter().map(|live| live.load_full())
    }

    /// A new connection cap (a listener started without one keeps none).
    pub fn resize_cap(&self, cap: usize) {
        if let Some(gate) = &self.cap {
            gate.resize(cap);
        }
    }

    /// Stop accepting; resolves once the connections have drained (or the grace ran out).
    pub fn stop(self) -> impl Future<Output = ()> + Send {
        let _ = self.stop.send(true);
        async move {
            for task in self.tasks {
                let _ = task.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Says it was called, then answers nothing, ever.
    struct Stuck(Arc<tokio::sync::Notify>);

    impl Handler for Stuck {
        fn call(&self, _: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> + Send {
            self.0.notify_one();
            std::future::pending()
        }
    }

    /// A request still in flight when the grace period ends is cut off, and its connection
    /// closed, so nothing outlives the shutdown.
    #[tokio::test]
    async fn connections_still_open_after_the_grace_period_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let called = Arc::new(tokio::sync::Notify::new());
        let site = Site::new(Stuck(Arc::clone(&called)), &LimitsConfig::default(), None);
        let live = Arc::new(ArcSwap::from_pointee(site));
        let (stop, stopped) = watch::channel(false);
        let grace = Duration::from_millis(200);
        let served = tokio::spawn(serve(listener, live, None, stopped, grace));

        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        called.notified().await;
        let _ = stop.send(true);
        served.await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
        assert_eq!(read.expect("closed").unwrap_or(0), 0);
    }
}
