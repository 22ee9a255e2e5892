//! Sending a request to the upstream API: where it goes ([`target`]), how its headers change
//! ([`headers`]), and the client that sends it: each worker's own kept-alive connections
//! ([`pool`]), opened over TCP or TLS ([`connect`]).

mod connect;
mod headers;
mod pool;
mod target;

pub use headers::{remove_hop_by_hop, rewrite_request_headers};
pub use target::{check_path, Target, TargetError, FORWARDED_METHODS};

use crate::body::RequestBody;
use crate::config::{UpstreamConfig, UpstreamFiles};
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
    /// Requests in flight at most: this worker's share.
    connections: usize,
}

/// What went wrong sending upstream.
#[derive(Debug)]
pub enum SendError {
    Unreachable(String),
    Timeout(Duration),
    /// Every connection this worker may hold stayed busy for the timeout: the words say so.
    Busy(String),
}

/// Worker `worker`'s share of `total` places among `workers`: shares that add up to
/// `total`, but never 0 (a worker with none could never send; so with fewer places than
/// workers, each worker has one).
pub fn share(total: usize, workers: usize, worker: usize) -> usize {
    let workers = workers.max(1);
    (total / workers + usize::from(worker < total % workers)).max(1)
}

impl Upstream {
    /// A worker's client to the upstream of `config`, with `connections` requests in flight
    /// at most: its [`share`] of `limits.max_upstream_connections`.
    pub fn new(
        config: &UpstreamConfig,
        files: &UpstreamFiles,
        connections: usize,
    ) -> Result<Upstream, String> {
        let target = Target::new(&config.url)?;
        let https = target.is_https();
        let tls = if https {
            Some(config.tls_client(files, files.api_cert.as_ref())?)
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
            pool: Pool::new(connector, connections, pool::IDLE_TIMEOUT),
            timeout: config.timeout,
            connections: connections.max(1),
        })
    }

    /// Send one request (its URI in origin-form, as [`Target::rewrite`] makes it) and wait
    /// for the response head, within the upstream's `timeout` — a wait for a free connection
    /// included.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        // The connection's protocol applies, not the client's.
        *request.version_mut() = Version::HTTP_11;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let permit = match self.pool.try_permit() {
            Some(permit) => permit,
            None => match tokio::time::timeout_at(deadline, self.pool.permit()).await {
                Ok(permit) => permit,
                Err(_) => return Err(SendError::Busy(self.busy())),
            },
        };
        let absolute = |uri: &http::Uri| self.target.absolute(uri);
        let sent = self.pool.send(request, permit, absolute);
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(SendError::Unreachable(e.to_string())),
            Err(_) => Err(SendError::Timeout(self.timeout)),
        }
    }

    /// Why a request found no free place, in words.
    fn busy(&self) -> String {
        format!(
            "all {} requests this worker may have in flight to {} (its share of limits.max_upstream_connections) stayed busy for {}: raise the limit, or the upstream is slow",
            self.connections,
            self.target.authority(),
            humantime::format_duration(self.timeout)
        )
    }

    /// Connections to the upstream kept open for the next requests.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shares_add_up_and_are_never_zero() {
        let shares = |total, workers| {
            (0..workers)
                .map(|w| super::share(total, workers, w))
                .collect::<Vec<_>>()
        };
        assert_eq!(shares(256, 2), [128, 128]);
        assert_eq!(shares(5, 2), [3, 2]);
        assert_eq!(shares(7, 3), [3, 2, 2]);
        assert_eq!(shares(1, 2), [1, 1]);
        assert_eq!(shares(3, 1), [3]);
    }
}
