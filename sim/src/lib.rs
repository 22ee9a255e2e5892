//! Simulated upstreams for tollgate's integration tests and `tollgate demo`: a crate of its own,
//! which imports nothing of tollgate (a build without the `demo` feature carries none of it).
//!
//! Owns: a small in-process HTTP server ([`SimServer`]) and two simulators built on it, an
//! OAuth2 token endpoint ([`identity::IdentitySim`]) and a protected API
//! ([`api::ApiSim`]) that accepts only the tokens the identity simulator issued.
//!
//! Must not: be used as a real server. The simulators keep everything in memory, trust
//! loopback clients and stop hard (no graceful drain) when their [`SimServer`] goes away.
//!
//! ```no_run
//! # async fn demo() {
//! use tollgate_sim::{api::ApiSim, bind_loopback, identity::{IdentityConfig, IdentitySim}};
//!
//! let identity = IdentitySim::new(IdentityConfig::default());
//! let identity_server = identity.serve(bind_loopback().await).await;
//! let api = ApiSim::new(identity.clone());
//! let api_server = api.serve(bind_loopback().await).await;
//! let seed = identity.issue_refresh_token();
//! println!("token: {} api: {} seed: {seed}", identity.token_url(), api_server.url());
//! # drop(identity_server);
//! # }
//! ```

pub mod api;
pub mod dpop;
pub mod identity;
mod jws;
mod pattern;
pub mod provider;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Response body used by both simulators.
pub type SimBody = BoxBody<Bytes, Infallible>;

/// A server running in a background task. Dropping it (or calling
/// [`shutdown`](SimServer::shutdown)) stops accepting and closes every open connection.
#[derive(Debug)]
pub struct SimServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SimServer {
    /// Serves `service` on `listener` (HTTP/1.1, and HTTP/2 with prior knowledge, i.e. h2c).
    pub async fn start<S, B>(listener: TcpListener, service: S) -> SimServer
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let addr = listener
            .local_addr()
            .expect("a bound TcpListener has a local address");
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, service, stop_rx));
        SimServer {
            addr,
            stop,
            task: Some(task),
        }
    }

    /// `http://{addr}`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits until the listener is closed, so a test can rely on the
    /// next connection attempt being refused.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        // Aborting drops the listener and the JoinSet, which aborts every connection task.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serve the identity endpoints and the API on one origin, as ERP.net, WinBooks and Spring
/// backends do: the token and authorize paths go to `identity`, every other path to `api`.
pub async fn serve_together(
    identity: &identity::IdentitySim,
    api: &api::ApiSim,
    listener: TcpListener,
) -> SimServer {
    let routes = (identity.clone(), api.clone());
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (identity, api) = routes.clone();
        async move {
            if identity.serves(request.uri().path()) {
                identity.handle(request).await
            } else {
                Ok(api.handle(request).await)
            }
        }
    });
    let server = SimServer::start(listener, service).await;
    identity.set_addr(server.addr);
    server
}

/// Binds `127.0.0.1:0`, so tests never fight over fixed ports.
pub async fn bind_loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding 127.0.0.1:0 should always succeed")
}

async fn accept_loop<S, B>(listener: TcpListener, service: S, mut stop: watch::Receiver<bool>)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    // Connections live in a JoinSet owned by this task, so they die with it.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // Err means the SimServer was dropped: stop as well.
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let service = service.clone();
                    connections.spawn(async move {
                        let builder = Builder::new(TokioExecutor::new());
                        let served = builder.serve_connection(TokioIo::new(stream), service).await;
                        if let Err(error) = served {
                            tracing::debug!(%error, "sim connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Usually out of file descriptors; back off instead of spinning.
                    tracing::warn!(%error, "sim accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so the set does not grow for the server's lifetime.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn full_body(bytes: impl Into<Bytes>) -> SimBody {
    Full::new(bytes.into()).boxed()
}

fn empty_body() -> SimBody {
    Empty::new().boxed()
}

/// Lower-case hex, for SHA-256 digests in JSON.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// HTTP client helpers shared by the simulators' tests.
#[cfg(test)]
mod testing {
    use super::*;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};

    pub type TestClient = Client<HttpConnector, Full<Bytes>>;

    pub fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    pub fn h2c_client() -> TestClient {
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http()
    }

    /// Sends `request` and collects the whole answer.
    pub async fn send(
        client: &TestClient,
        request: Request<Full<Bytes>>,
    ) -> (http::response::Parts, Bytes) {
        let response = client.request(request).await.expect("request failed");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body failed").to_bytes();
        (parts, body)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use hyper::service::service_fn;

    async fn start_hello() -> SimServer {
        let service = service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(full_body("hello")))
        });
        SimServer::start(bind_loopback().await, service).await
    }

    /// A SimServer answers over HTTP/1.1 and h2c on its loopback URL.
    #[tokio::test]
    async fn serves_http1_and_h2c() {
        let server = start_hello().await;
        assert!(server.url().starts_with("http://127.0.0.1:"));
        for client in [client(), h2c_client()] {
            let request = Request::get(server.url()).body(Full::default()).unwrap();
            let (parts, body) = send(&client, request).await;
            assert_eq!(parts.status, 200);
            assert_eq!(&body[..], b"hello");
        }
    }

    /// After shutdown() returns, the port refuses connections.
    #[tokio::test]
    async fn shutdown_closes_the_listener() {
        let server = start_hello().await;
        let addr = server.addr;
        server.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    /// hex() matches the usual lower-case rendering.
    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
