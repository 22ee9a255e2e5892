//! The other end of `/status`: `tollgate status` asks a running `serve`'s admin listener.
//!
//! One plain HTTP/1.1 GET with a short timeout, no proxy from the environment, the `[admin]
//! key` of the config as `Bearer` when it has one, and errors that say what to check: nothing
//! listening, no answer in time, a key missing or different, or an answer that is not
//! tollgate's.

use super::Status;
use crate::error::chain;
use crate::secret::Secret;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How long `tollgate status` waits for the admin listener.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "nothing answers on {addr}: tollgate serve does not seem to be running on that address \
         (start it, or check [admin] listen)"
    )]
    NotRunning { addr: SocketAddr },
    #[error("{addr} did not answer within {}s", .timeout.as_secs())]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error(
        "the admin listener on {addr} asks for a key: set [admin] key in this config to the key \
         tollgate serve uses"
    )]
    KeyRequired { addr: SocketAddr },
    #[error(
        "the admin listener on {addr} refused the key of [admin] key in this config: it differs \
         from the key tollgate serve uses; set the same key in both"
    )]
    KeyRefused { addr: SocketAddr },
    #[error("{url} answered {status}; is something other than tollgate serve listening there?")]
    Status { url: String, status: u16 },
    #[error("{url} did not answer with tollgate's status JSON ({reason}); is something other than tollgate serve listening there?")]
    NotStatus { url: String, reason: String },
}

impl FetchError {
    /// Whether the answer was about the key, so that the message is about the config read.
    pub fn is_about_the_key(&self) -> bool {
        matches!(
            self,
            FetchError::KeyRequired { .. } | FetchError::KeyRefused { .. }
        )
    }
}

/// GET `/status` from the admin listener configured as `listen`, with `key` as `Bearer`.
pub async fn fetch_status(
    listen: SocketAddr,
    key: Option<&Secret<String>>,
    timeout: Duration,
) -> Result<Status, FetchError> {
    let addr = reachable(listen);
    let url = format!("http://{addr}/status");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .map_err(|e| FetchError::Unreachable {
            addr,
            reason: chain(&e),
        })?;
    let sent = |e: reqwest::Error| {
        if e.is_timeout() {
            FetchError::Timeout { addr, timeout }
        } else if refused(&e) {
            FetchError::NotRunning { addr }
        } else {
            FetchError::Unreachable {
                addr,
                reason: chain(&e),
            }
        }
    };
    let mut request = client.get(&url);
    if let Some(key) = key {
        request = request.bearer_auth(key.expose());
    }
    let response = request.send().await.map_err(sent)?;
    if response.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(match key {
            None => FetchError::KeyRequired { addr },
            Some(_) => FetchError::KeyRefused { addr },
        });
    }
    if response.status() != reqwest::StatusCode::OK {
        return Err(FetchError::Status {
            url,
            status: response.status().as_u16(),
        });
    }
    let body = response.bytes().await.map_err(sent)?;
    serde_json::from_slice(&body).map_err(|e| FetchError::NotStatus {
        url,
        reason: e.to_string(),
    })
}

/// A listener bound to every address (`0.0.0.0`, `::`) is reached on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

fn refused(e: &reqwest::Error) -> bool {
    crate::error::causes(e).any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_reached_on_loopback() {
        let r = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(r("0.0.0.0:9901"), "127.0.0.1:9901");
        assert_eq!(r("[::]:9901"), "[::1]:9901");
        assert_eq!(r("10.0.0.5:9901"), "10.0.0.5:9901");
    }

    /// A port nobody listens on reads as "serve is not running", not as a bare socket error.
    #[tokio::test]
    async fn a_refused_connection_says_serve_is_not_running() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = fetch_status(port, None, TIMEOUT).await.unwrap_err();
        assert!(matches!(err, FetchError::NotRunning { .. }), "{err:?}");
        assert!(err.to_string().contains("does not seem to be running"));
    }
}
