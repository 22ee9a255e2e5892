//! Opening one connection to the upstream: resolve its host (at most every few seconds),
//! connect over TCP to one of its addresses (IPv6 and IPv4 raced, Nagle off),
//! for `https` shake hands in TLS offering h2 and http/1.1 by ALPN, then start HTTP/1.1 or
//! HTTP/2 as agreed. The connection's own task is spawned on the runtime of the worker that
//! opened it, which is the worker that uses it.
//!
//! Every failure is a [`ConnectError`] that says in words what went wrong and what to check:
//! a user reads it in the 502 and in the log.

use crate::body::RequestBody;
use http::uri::Authority;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A connection ready for requests, in the protocol the upstream agreed to.
pub enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

/// How to reach one upstream: its host and port, and TLS when the URL is `https`.
pub struct Connector {
    /// The host as written in the URL (for messages), and without brackets (for DNS).
    authority: Authority,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    /// What DNS last said of `host`, and when.
    resolved: tokio::sync::Mutex<Option<(Arc<[SocketAddr]>, Instant)>>,
}

/// How long the addresses DNS gave for the upstream's host are used: connections opened
/// together (a burst of clients) share one lookup, instead of a blocking thread each.
const DNS_REUSE: Duration = Duration::from_secs(5);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the host name {host} could not be resolved (DNS: {source}); check the host in the upstream's url, and this machine's DNS")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: the connection was refused; check the port in the upstream's url and that the API runs on {host}")]
    Refused { addr: SocketAddr, host: String },
    #[error(
        "cannot connect to {addr}: {source}; check that {host} is reachable from this machine"
    )]
    Io {
        addr: SocketAddr,
        host: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {authority} within {} (limits.connect_timeout); check that it is reachable from this machine (a firewall on the way?)", humantime::format_duration(*.timeout))]
    Timeout {
        authority: Authority,
        timeout: Duration,
    },
    #[error("TLS with {authority} failed: {reason}")]
    Tls {
        authority: Authority,
        reason: String,
    },
    #[error("the HTTP handshake with {authority} failed: {source}")]
    Handshake {
        authority: Authority,
        source: hyper::Error,
    },
}

impl Connector {
    /// `tls`: the client config for an `https` upstream (its ALPN is set here).
    pub fn new(
        authority: &Authority,
        https: bool,
        tls: Option<&rustls::ClientConfig>,
        connect_timeout: Duration,
    ) -> Result<Connector, String> {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match (https, tls) {
            (false, _) => None,
            (true, None) => return Err("an https upstream needs a TLS configuration".into()),
            (true, Some(config)) => {
                let mut config = config.clone();
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let name = ServerName::try_from(host.clone()).map_err(|e| {
                    format!("the upstream's host {host} is not a TLS server name: {e}")
                })?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Connector {
            authority: authority.clone(),
            host,
            port,
            tls,
            connect_timeout,
            resolved: tokio::sync::Mutex::new(None),
        })
    }

    /// Open a connection, within the connect timeout (resolving and TLS included).
    pub async fn connect(&self) -> Result<Sender, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Ok(opened) => opened,
            Err(_) => Err(ConnectError::Timeout {
                authority: self.authority.clone(),
                timeout: self.connect_timeout,
            }),
        }
    }

    async fn open(&self) -> Result<Sender, ConnectError> {
        let tcp = self.tcp().await?;
        let Some((tls, name)) = &self.tls else {
            let io = TokioIo::new(tcp);
            return Ok(Sender::Http1(self.handshake_http1(io).await?));
        };
        let stream = tls
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| ConnectError::Tls {
                authority: self.authority.clone(),
                reason: describe_tls(&e),
            })?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        if h2 {
            let handshake = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await;
            Ok(Sender::Http2(self.driven(handshake)?))
        } else {
            Ok(Sender::Http1(self.handshake_http1(io).await?))
        }
    }

    /// The host's addresses: an IP address as it is; a name as DNS said less than
    /// [`DNS_REUSE`] ago, or asked now (once, for every connection opened meanwhile).
    async fn addresses(&self) -> Result<Arc<[SocketAddr]>, ConnectError> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok(Arc::new([SocketAddr::new(ip, self.port)]));
        }
        let mut resolved = self.resolved.lock().await;
        if let Some((addrs, at)) = &*resolved {
            if at.elapsed() < DNS_REUSE {
                return Ok(Arc::clone(addrs));
            }
        }
        let addrs: Arc<[SocketAddr]> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| ConnectError::Resolve {
                host: self.host.clone(),
                source,
            })?
            .collect();
        *resolved = Some((Arc::clone(&addrs), Instant::now()));
        Ok(addrs)
    }

    /// Start HTTP/1.1 on `io` and spawn the connection's task.
    async fn handshake_http1<IO>(
        &self,
        io: IO,
    ) -> Result<http1::SendRequest<RequestBody>, ConnectError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let mut builder = http1::Builder::new();
        builder.max_buf_size(MAX_RESPONSE_HEAD);
        self.driven(builder.handshake(io).await)
    }

    /// The sender of a `handshake` (HTTP/1.1 or HTTP/2) that succeeded, its connection
    /// driven by a task of its own.
    fn driven<S, C>(&self, handshake: Result<(S, C), hyper::Error>) -> Result<S, ConnectError>
    where
        C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let (send, connection) = handshake.map_err(|source| ConnectError::Handshake {
            authority: self.authority.clone(),
            source,
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(send)
    }

    /// A TCP connection to the host. Its addresses are tried in turn, each within its share
    /// of the connect timeout; when it has both IPv6 and IPv4 ones, the other family starts
    /// [`FALLBACK_AFTER`] after the first, or as soon as the first fails (happy eyeballs,
    /// RFC 8305), so a family that does
    /// not answer costs that, not the timeout. The first to connect wins.
    async fn tcp(&self) -> Result<TcpStream, ConnectError> {
        let addrs = self.addresses().await?;
        let each = self.connect_timeout / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
        let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
        let (first, other): (Vec<SocketAddr>, Vec<SocketAddr>) =
            addrs.iter().partition(|a| a.is_ipv6() == first_v6);
        let connected = if other.is_empty() {
            in_turn(&first, each).await
        } else {
            let started = Instant::now();
            let first_turn = std::pin::pin!(in_turn(&first, each));
            let other_turn = std::pin::pin!(async {
                tokio::time::sleep(FALLBACK_AFTER).await;
                in_turn(&other, each).await
            });
            // The first success, else the last failure of the two.
            match futures_util::future::select(first_turn, other_turn).await {
                futures_util::future::Either::Left((Ok(stream), _))
                | futures_util::future::Either::Right((Ok(stream), _)) => Ok(stream),
                // The first family failed before the other's turn: no reason to wait for it.
                futures_util::future::Either::Left((Err(_), _))
                    if started.elapsed() < FALLBACK_AFTER =>
                {
                    in_turn(&other, each).await
                }
                futures_util::future::Either::Left((Err(_), rest)) => rest.await,
                futures_util::future::Either::Right((Err(_), rest)) => rest.await,
            }
        };
        let (addr, e) = match connected {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(failed) => failed,
        };
        Err(match addr {
            Some(addr) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                ConnectError::Refused {
                    addr,
                    host: self.host.clone(),
                }
            }
            Some(addr) => ConnectError::Io {
                addr,
                host: self.host.clone(),
                source: e,
            },
            None => ConnectError::Resolve {
                host: self.host.clone(),
                source: e,
            },
        })
    }
}

/// The buffer of an upstream HTTP/1.1 connection (what one read fills; also what is written
/// before a flush), and so the largest response head tollgate takes (nginx's
/// `proxy_buffer_size` is 4 or 8 KiB, HAProxy's buffer 16 KiB). At hyper's default of about
/// 400 KiB, 50 downloads of 10 MiB at once held 27 to 45 MiB more than at 32 KiB; the
/// default streamed them faster (1,006 against 830 MB/s, both about twice nginx's), with
/// a quarter of the reads (benches/compare.sh, sizes scenario; BENCHMARKS.md).
pub const MAX_RESPONSE_HEAD: usize = 32 * 1024;

/// How long the other address family waits for the first one (RFC 8305 suggests 250 ms;
/// hyper's connector waits 300).
const FALLBACK_AFTER: Duration = Duration::from_millis(300);

/// Connect to `addrs` one after the other, each within `each`; the first that accepts, or
/// the last failure (with its address).
async fn in_turn(
    addrs: &[SocketAddr],
    each: Duration,
) -> Result<TcpStream, (Option<SocketAddr>, std::io::Error)> {
    let mut last = (None, std::io::Error::other("no address found"));
    for &addr in addrs {
        match tokio::time::timeout(each, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = (Some(addr), e),
            Err(_) => {
                let waited = humantime::format_duration(each);
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {waited}"),
                );
                last = (Some(addr), e);
            }
        }
    }
    Err(last)
}

/// A TLS failure in words: rustls's reason, which [`crate::tls::upstream`] explains for a
/// certificate it refused.
fn describe_tls(e: &std::io::Error) -> String {
    crate::tls::upstream::describe(e).unwrap_or_else(|| e.to_string())
}
