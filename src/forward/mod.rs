//! Sending a request to the upstream API: where it goes ([`target`]), how its headers change
//! ([`headers`]), and the client that sends it: each worker's own kept-alive connections
//! ([`pool`]), opened over TCP or TLS ([`connect`]).

mod connect;
mod headers;
mod pool;
mod target;

pub use headers::{remove_hop_by_hop, rewrite_request_headers};
pub use target::{check_path, Target, TargetError};

use crate::body::RequestBody;
use crate::config::UpstreamConfig;
use connect::Connector;
use http::{Request, Response, Version};
use pool::Pool;
use std::time::Duration;

pub use pool::UpstreamBody;

/// One worker's client to one upstream; a clone shares its connections.
#[derive(Clone)]
pub struct Upstream {
    pub target: Target,
    pool: Pool,
    timeout: Duration,
}

/// What went wrong sending upstream.
#[derive(Debug)]
pub enum SendError {
    Unreachable(String),
    Timeout(Duration),
}

impl Upstream {
    /// One of `workers` clients to the upstream of `config`, each with its share of
    /// `limits.max_upstream_connections`.
    pub fn new(
        config: &UpstreamConfig,
        extra_roots: Option<&[u8]>,
        workers: usize,
    ) -> Result<Upstream, String> {
        let target = Target::new(&config.url)?;
        let https = target.is_https();
        let tls = if https {
            Some(config.tls_client(extra_roots)?)
        } else {
            None
        };
        let connector = Connector::new(
            target.authority(),
            https,
            tls.as_ref(),
            config.limits.connect_timeout,
        )?;
        Ok(Upstream {
            target,
            pool: Pool::new(
                connector,
                config
                    .limits
                    .max_upstream_connections
                    .div_ceil(workers.max(1)),
                pool::IDLE_TIMEOUT,
            ),
            timeout: config.timeout,
        })
    }

    /// Send one request (its URI in origin-form, as [`Target::rewrite`] makes it) and wait
    /// for the response head.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        // The connection's protocol applies, not the client's.
        *request.version_mut() = Version::HTTP_11;
        let sent = self.pool.send(request, |uri| self.target.absolute(uri));
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(SendError::Unreachable(e.to_string())),
            Err(_) => Err(SendError::Timeout(self.timeout)),
        }
    }

    /// Connections to the upstream kept open for the next requests.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle()
    }
}
