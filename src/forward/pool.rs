//! One worker's kept-alive connections to one upstream.
//!
//! Each worker thread builds its own [`Pool`] (see `proxy/reload.rs`), so the connections a
//! request uses were opened by, and are driven on, the thread that serves it: the lock
//! around the idle list is never contended and no wakeup crosses threads. An HTTP/1.1
//! connection serves one request at a time: it is taken from the idle list (newest first,
//! the one most likely still open), and put back when its response body has been read to
//! the end ([`UpstreamBody`]); a body given up half-way takes its connection with it. An
//! upstream that agrees to HTTP/2 by ALPN gets one shared connection, which multiplexes.
//!
//! At most so many requests are in flight at once (the worker's share of
//! `limits.max_upstream_connections`): over HTTP/1.1, the connections open. A request past
//! that waits for one to finish. A connection idle for [`IDLE_TIMEOUT`] is closed (by a
//! sweep every third of it, so after 90 to 120 s), and so is every connection of a pool no
//! pipeline uses any more. A request that finds its connection closed before anything was
//! written to it goes on the next one, or a new one.
//!
//! Must not: send a request twice once any of it was written, or put a connection back
//! before both its request and its response are done.

use super::connect::{ConnectError, Connector, Sender, MAX_RESPONSE_HEAD};
use crate::body::RequestBody;
use crate::error::chain;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long an unused connection is kept open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The connections of one worker to one upstream; a clone shares them.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    /// One per request in flight, held until its connection is back (or gone).
    permits: Arc<Semaphore>,
}

#[derive(Default)]
struct Idle {
    /// Newest last, each with the sweep it was put back after.
    http1: Vec<(http1::SendRequest<RequestBody>, u32)>,
    http2: Option<http2::SendRequest<RequestBody>>,
    /// Sweeps so far: the pool's clock, in thirds of the idle timeout, so that no request
    /// reads the time.
    sweeps: u32,
    sweeping: bool,
}

/// Sweeps a connection may sit idle through.
const SWEEPS: u32 = 3;

/// Whether a connection put back after sweep `put_back` may still be used at sweep `now`.
fn fresh(now: u32, put_back: u32) -> bool {
    now.wrapping_sub(put_back) <= SWEEPS
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the connection to the upstream broke: {}", chain(.0))]
    Broken(hyper::Error),
    #[error("the upstream answered with a response head (status line and headers) larger than the {} KiB tollgate reads, or with more than 100 header fields; the upstream sends too many or too large headers", MAX_RESPONSE_HEAD / 1024)]
    HeadTooLarge,
}

/// A request's place among those in flight to the upstream, given back when dropped.
pub struct Permit {
    _held: OwnedSemaphorePermit,
}

impl Pool {
    /// At most `connections` requests in flight at once (so, over HTTP/1.1, connections
    /// open); connections unused for `idle_timeout` are closed ([`IDLE_TIMEOUT`] but in tests).
    pub fn new(connector: Connector, connections: usize, idle_timeout: Duration) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                connector,
                idle: Mutex::new(Idle::default()),
                idle_timeout,
                permits: Arc::new(Semaphore::new(connections.max(1))),
            }),
        }
    }

    /// A place among the requests in flight, at once if one is free.
    pub fn try_permit(&self) -> Option<Permit> {
        Arc::clone(&self.shared.permits)
            .try_acquire_owned()
            .ok()
            .map(|held| Permit { _held: held })
    }

    /// A place among the requests in flight, once one is free.
    pub async fn permit(&self) -> Permit {
        let permit = Arc::clone(&self.shared.permits).acquire_owned().await;
        Permit {
            _held: permit.expect("the pool's semaphore is never closed"),
        }
    }

    /// Send `request` on a kept-alive connection, or a new one, and wait for the response
    /// head. `absolute` makes the URI HTTP/2 needs (scheme and authority) from the
    /// origin-form one HTTP/1.1 sends.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
        permit: Permit,
        absolute: impl Fn(&http::Uri) -> http::Uri,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        loop {
            let (sender, reused) = match self.shared.checkout() {
                Some(sender) => (sender, true),
                // Boxed: connecting (TLS above all) is a large future, and a rare one; inline,
                // it would take room in (and be moved with) every request's future.
                None => (Box::pin(self.shared.connect()).await?, false),
            };
            let sent = match sender {
                // Boxed, as connecting: HTTP/1.1 is the common case.
                Sender::Http2(send) => Box::pin(send_http2(send, request, &absolute)).await,
                Sender::Http1(mut send) => match send.try_send_request(request).await {
                    Ok(response) => Ok((response, Some(send))),
                    Err(e) => Err(e),
                },
            };
            match sent {
                Ok((response, send)) => {
                    let lent = Lent {
                        send,
                        pool: Arc::downgrade(&self.shared),
                        _permit: permit,
                    };
                    return Ok(response.map(|body| UpstreamBody::new(body, lent)));
                }
                Err(mut e) => match e.take_message() {
                    // Not written: the connection had closed meanwhile. Another try, on the
                    // next one, unless it was new.
                    Some(unsent) if reused => request = unsent,
                    _ if e.error().is_parse_too_large() => return Err(PoolError::HeadTooLarge),
                    _ => return Err(PoolError::Broken(e.into_error())),
                },
            }
        }
    }

    /// Connections kept open, not in use (HTTP/2 counts once).
    pub fn idle(&self) -> usize {
        let idle = self.shared.lock();
        idle.http1.len() + usize::from(idle.http2.is_some())
    }
}

/// What a request sent on one connection came to; an HTTP/1.1 connection comes back with
/// the response.
type Sent = Result<
    (Response<Incoming>, Option<http1::SendRequest<RequestBody>>),
    hyper::client::conn::TrySendError<Request<RequestBody>>,
>;

/// Send `request` on a multiplexed HTTP/2 connection.
async fn send_http2(
    mut send: http2::SendRequest<RequestBody>,
    mut request: Request<RequestBody>,
    absolute: impl Fn(&http::Uri) -> http::Uri,
) -> Sent {
    *request.uri_mut() = absolute(request.uri());
    let response = send.try_send_request(request).await?;
    Ok((response, None))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Idle> {
        // Nothing under the lock can panic half-way through a change.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The HTTP/2 connection, else the newest idle HTTP/1.1 one still open.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.lock();
        if let Some(h2) = &idle.http2 {
            if !h2.is_closed() {
                return Some(Sender::Http2(h2.clone()));
            }
            idle.http2 = None;
        }
        while let Some((send, put_back)) = idle.http1.pop() {
            if send.is_ready() && fresh(idle.sweeps, put_back) {
                return Some(Sender::Http1(send));
            }
        }
        None
    }

    /// A new connection. An HTTP/2 one is shared from then on, unless another request
    /// opened one meanwhile: that one stays the shared one, and this one serves only the
    /// request that opened it.
    async fn connect(self: &Arc<Self>) -> Result<Sender, ConnectError> {
        let sender = self.connector.connect().await?;
        if let Sender::Http2(h2) = &sender {
            let mut idle = self.lock();
            if idle.http2.as_ref().is_none_or(|shared| shared.is_closed()) {
                idle.http2 = Some(h2.clone());
                self.sweep_later(&mut idle);
            }
        }
        Ok(sender)
    }

    /// Keep `send` for the next request.
    fn put(self: &Arc<Self>, send: http1::SendRequest<RequestBody>) {
        let mut idle = self.lock();
        let now = idle.sweeps;
        idle.http1.push((send, now));
        self.sweep_later(&mut idle);
    }

    /// Start the sweep of idle connections, unless it runs (or there is no runtime to run
    /// it on: then the pool's end closes them).
    fn sweep_later(self: &Arc<Self>, idle: &mut Idle) {
        if idle.sweeping {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        idle.sweeping = true;
        let pool = Arc::downgrade(self);
        let every = self.idle_timeout / SWEEPS;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // Gone with the pool: its connections closed when it was dropped.
                let Some(pool) = pool.upgrade() else { return };
                let mut idle = pool.lock();
                idle.sweeps = idle.sweeps.wrapping_add(1);
                let sweeps = idle.sweeps;
                idle.http1
                    .retain(|(send, put_back)| !send.is_closed() && fresh(sweeps, *put_back));
                if idle.http2.as_ref().is_some_and(|h2| h2.is_closed()) {
                    idle.http2 = None;
                }
                if idle.http1.is_empty() && idle.http2.is_none() {
                    idle.sweeping = false;
                    return;
                }
            }
        });
    }
}

/// What a request holds while its response body is read: its place among the requests in
/// flight and, over HTTP/1.1, its connection, lent by the pool until the body ends.
struct Lent {
    send: Option<http1::SendRequest<RequestBody>>,
    pool: Weak<Shared>,
    /// Let go when the connection is back, for the request that waits for it.
    _permit: Permit,
}

impl Lent {
    /// The response was read to the end: the connection goes back to the pool (its place
    /// among those in flight with it).
    fn give_back(mut self) {
        let (Some(mut send), Some(pool)) = (self.send.take(), self.pool.upgrade()) else {
            return;
        };
        if send.is_ready() {
            pool.put(send);
            return;
        }
        if send.is_closed() {
            return;
        }
        // Still finishing (the request body, most often, when the upstream answered before
        // reading it all): back once it is done, unless it closes; it keeps its place among
        // those in flight until then, for the idle timeout at most (a client that stops
        // sending its body would hold it for ever): then the connection is closed.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let within = pool.idle_timeout;
        let pool = Arc::downgrade(&pool);
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(within, send.ready()).await {
                if let Some(pool) = pool.upgrade() {
                    pool.put(send);
                }
            }
            drop(self);
        });
    }
}

/// The upstream's response body. Over HTTP/1.1 it takes its connection back to the pool
/// when read to the end; its request counts as in flight until then.
pub struct UpstreamBody {
    inner: Incoming,
    lent: Option<Lent>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn new(inner: Incoming, lent: Lent) -> UpstreamBody {
        let mut body = UpstreamBody {
            inner,
            lent: Some(lent),
        };
        if body.inner.is_end_stream() {
            body.finished();
        }
        body
    }

    fn finished(&mut self) {
        if let Some(lent) = self.lent.take() {
            lent.give_back();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => self.finished(),
            // Trailers come last, after the chunked body's end: the response is read.
            Poll::Ready(Some(Ok(f))) if f.is_trailers() || self.inner.is_end_stream() => {
                self.finished()
            }
            // The connection cannot be trusted with another request.
            Poll::Ready(Some(Err(_))) => self.lent = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Read to the end, though nobody asked for the end: the connection is reusable.
        if self.lent.is_some() && self.inner.is_end_stream() {
            self.finished();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Connections an upstream accepted, and how many of them are still open.
    #[derive(Default)]
    struct Seen {
        accepted: AtomicUsize,
        open: AtomicUsize,
    }

    struct Open(Arc<Seen>);

    impl Drop for Open {
        fn drop(&mut self) {
            self.0.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// An HTTP/1.1 upstream on loopback: `/` says ok, `/empty` is a 204, `/big` streams
    /// 4 MiB in 64 KiB chunks, `/big-head` has a header of 64 KiB, `/close` answers with
    /// `Connection: close`.
    async fn upstream() -> (Pool, Arc<Seen>) {
        upstream_with(64).await
    }

    /// [`upstream`] with at most `connections` requests in flight.
    async fn upstream_with(connections: usize) -> (Pool, Arc<Seen>) {
        use http_body_util::{Full, StreamBody};
        type Out = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
        let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
            let response = match request.uri().path() {
                "/empty" => Response::builder().status(204).body(Out::default()),
                "/big" => {
                    let chunks = (0..64).map(|_| {
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![
                            b'x';
                            64 * 1024
                        ])))
                    });
                    let stream = futures_util::stream::iter(chunks);
                    Response::builder().body(BodyExt::boxed(StreamBody::new(stream)))
                }
                "/big-head" => Response::builder()
                    .header("x-big", "x".repeat(2 * MAX_RESPONSE_HEAD))
                    .body(Out::default()),
                "/close" => Response::builder()
                    .header("connection", "close")
                    .body(BodyExt::boxed(Full::new(Bytes::from_static(b"bye")))),
                _ => Response::builder().body(BodyExt::boxed(Full::new(Bytes::from_static(b"ok")))),
            };
            Ok::<_, std::convert::Infallible>(response.unwrap())
        });
        let (addr, seen) = raw_upstream(move |stream| async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        })
        .await;
        (pool_to(addr, connections), seen)
    }

    /// A pool of at most `connections` to `addr`, which closes idle ones after 300 ms.
    fn pool_to(addr: std::net::SocketAddr, connections: usize) -> Pool {
        let authority: http::uri::Authority = addr.to_string().parse().unwrap();
        let connector = Connector::new(&authority, false, None, Duration::from_secs(5)).unwrap();
        Pool::new(connector, connections, Duration::from_millis(300))
    }

    /// An upstream on loopback that `serve`s each connection it accepts, counted in [`Seen`].
    async fn raw_upstream<F, R>(serve: F) -> (std::net::SocketAddr, Arc<Seen>)
    where
        F: Fn(tokio::net::TcpStream) -> R + Send + Sync + 'static,
        R: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counted = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.accepted.fetch_add(1, Ordering::SeqCst);
                counted.open.fetch_add(1, Ordering::SeqCst);
                let open = Open(Arc::clone(&counted));
                let served = serve(stream);
                tokio::spawn(async move {
                    served.await;
                    drop(open);
                });
            }
        });
        (addr, seen)
    }

    /// Read one request head from `stream`: what came after it.
    async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut read = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            read.extend_from_slice(&buf[..n]);
            if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(read.split_off(end + 4));
            }
        }
    }

    /// A GET of `path` once a place is free: its response head.
    async fn send(pool: &Pool, path: &str) -> Result<Response<UpstreamBody>, PoolError> {
        let request = Request::get(path)
            .header("host", "upstream")
            .body(RequestBody::full(Default::default()))
            .unwrap();
        let permit = pool.permit().await;
        pool.send(request, permit, |uri| uri.clone()).await
    }

    async fn get(pool: &Pool, path: &str) -> (u16, Bytes) {
        let response = send(pool, path).await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    /// Wait (up to 5 s) until `done` holds.
    async fn until(done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting");
    }

    /// Requests one after the other use one connection, put back once each body is read,
    /// with a body or without one.
    #[tokio::test]
    async fn requests_in_turn_share_one_connection() {
        let (pool, seen) = upstream().await;
        for path in ["/", "/empty", "/", "/big", "/"] {
            let (status, body) = get(&pool, path).await;
            assert!(status == 200 || status == 204, "{status}");
            if path == "/big" {
                assert_eq!(body.len(), 4 * 1024 * 1024);
            }
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    /// Requests at once get a connection each; afterwards those connections serve the
    /// next requests, and no new one is opened.
    #[tokio::test]
    async fn requests_at_once_open_connections_that_are_then_reused() {
        let (pool, seen) = upstream().await;
        let at_once = (0..8).map(|_| get(&pool, "/big"));
        for (status, body) in futures_util::future::join_all(at_once).await {
            assert_eq!((status, body.len()), (200, 4 * 1024 * 1024));
        }
        let opened = seen.accepted.load(Ordering::SeqCst);
        assert!((1..=8).contains(&opened), "{opened}");
        assert_eq!(pool.idle(), opened);
        for _ in 0..20 {
            assert_eq!(get(&pool, "/").await.0, 200);
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), opened);
    }

    /// Past `connections` requests at once, the others wait for a response to end and go
    /// on its connection: no more connections are opened.
    #[tokio::test]
    async fn requests_past_the_limit_wait_for_a_connection() {
        let (pool, seen) = upstream_with(2).await;
        let at_once = (0..6).map(|_| get(&pool, "/big"));
        for (status, body) in futures_util::future::join_all(at_once).await {
            assert_eq!((status, body.len()), (200, 4 * 1024 * 1024));
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle(), 2);
    }

    /// A response body not read yet holds its place among those in flight: with one place,
    /// the next request waits until that body is read, then goes on its connection.
    #[tokio::test]
    async fn a_body_not_read_yet_holds_its_place() {
        let (pool, seen) = upstream_with(1).await;
        let response = send(&pool, "/big").await.unwrap();
        assert!(pool.try_permit().is_none());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 4 * 1024 * 1024);
        assert!(pool.try_permit().is_some());
        assert_eq!(get(&pool, "/").await.0, 200);
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    /// A body dropped half-way takes its connection with it (what is left of it can never
    /// be told from the next response); the next request gets a new one.
    #[tokio::test]
    async fn a_body_given_up_half_way_is_not_put_back() {
        let (pool, seen) = upstream().await;
        let mut response = send(&pool, "/big").await.unwrap();
        let first = response.body_mut().frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(response);
        assert_eq!(pool.idle(), 0);
        until(|| seen.open.load(Ordering::SeqCst) == 0).await;
        assert_eq!(get(&pool, "/").await, (200, Bytes::from_static(b"ok")));
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    /// A response head past [`MAX_RESPONSE_HEAD`] is refused in words, and the next request
    /// is served.
    #[tokio::test]
    async fn a_response_head_too_large_is_refused_in_words() {
        let (pool, _) = upstream().await;
        let refused = send(&pool, "/big-head").await;
        let message = match refused {
            Ok(response) => panic!("taken: {}", response.status()),
            Err(e) => e.to_string(),
        };
        assert!(message.contains("larger than the 32 KiB"), "{message}");
        assert_eq!(get(&pool, "/").await, (200, Bytes::from_static(b"ok")));
    }

    /// An upstream that closes its side after answering (`Connection: close`) is not
    /// asked again on that connection.
    #[tokio::test]
    async fn a_connection_the_upstream_closes_is_not_reused() {
        let (pool, seen) = upstream().await;
        for _ in 0..3 {
            assert_eq!(
                get(&pool, "/close").await,
                (200, Bytes::from_static(b"bye"))
            );
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(get(&pool, "/").await.0, 200);
        assert_eq!(get(&pool, "/").await.0, 200);
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 4);
    }

    /// An upstream that closes each connection soon after its answer, without saying so in
    /// it: the closed connection is not used again, and the next request goes on a new one,
    /// unharmed.
    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_used() {
        use tokio::io::AsyncWriteExt;
        let (addr, seen) = raw_upstream(|mut stream| async move {
            if read_head(&mut stream).await.is_some() {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let _ = stream.write_all(answer).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let pool = pool_to(addr, 64);
        for _ in 0..3 {
            assert_eq!(get(&pool, "/").await, (200, Bytes::from_static(b"ok")));
            assert_eq!(pool.idle(), 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
    }

    /// An upstream that answers before it reads the request's body: the response ends while
    /// the body is still being written, and the connection goes back once it is all written.
    #[tokio::test]
    async fn a_connection_still_writing_its_body_goes_back_once_written() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const BODY: usize = 4 * 1024 * 1024;
        let (addr, seen) = raw_upstream(|mut stream| async move {
            while let Some(after) = read_head(&mut stream).await {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                stream.write_all(answer).await.unwrap();
                let mut rest = vec![0u8; BODY - after.len()];
                stream.read_exact(&mut rest).await.unwrap();
            }
        })
        .await;
        let pool = pool_to(addr, 1);
        for _ in 0..3 {
            let request = Request::post("/upload")
                .header("host", "upstream")
                .header("content-length", BODY)
                .body(RequestBody::full(crate::body::Buffered {
                    data: Bytes::from(vec![b'x'; BODY]),
                    trailers: None,
                }))
                .unwrap();
            let permit = pool.permit().await;
            let response = pool.send(request, permit, |uri| uri.clone()).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, Bytes::from_static(b"ok"));
        }
        until(|| pool.idle() == 1).await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    /// Connections unused for the idle timeout are closed; a pool dropped closes its own.
    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (pool, seen) = upstream().await;
        get(&pool, "/").await;
        assert_eq!(seen.open.load(Ordering::SeqCst), 1);
        until(|| pool.idle() == 0).await;
        until(|| seen.open.load(Ordering::SeqCst) == 0).await;

        get(&pool, "/").await;
        assert_eq!(pool.idle(), 1);
        drop(pool);
        until(|| seen.open.load(Ordering::SeqCst) == 0).await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }
}
