//! The request path of one upstream, in order:
//!
//! ```text
//! inbound key ─► target check ─► body ─► quota slot ─► token ─► quota spend ─► forward
//!   ─► on retry_on status: refresh that generation (paced once replays are refused too),
//!      quota spend, replay once
//!   ─► respond (hop-by-hop headers removed, rate-limit headers added, body streamed)
//! ```
//!
//! Each stage is one function below, called in that order by [`Pipeline::proxy`]. Every send
//! upstream is counted by the quota just before it happens, and every upstream answer is shown
//! to it (a 429 holds the upstream back).

mod dpop;

use crate::body::{self, BodyError, Budget, Buffered, Held, Pace, Paced, RequestBody, Verdict};
use crate::config::UpstreamConfig;
use crate::counters::{KeyCounts, RequestStats};
use crate::error::ProxyError;
use crate::forward::{self, SendError, TargetError, Upstream, UpstreamBody};
use crate::inbound_keys::{Keys, NO_KEY};
use crate::quota::{self, Quota, Slot, Window};
use crate::response::{ProxyBody, ResponseBody};
use crate::server::Handler;
use crate::token::{AccessToken, TokenCache};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The token caches a listener's requests take their tokens from: the upstream's own, and each
/// `[[upstream.identity]]`'s by name.
pub struct Caches<'a> {
    pub own: Arc<TokenCache>,
    pub identities: &'a BTreeMap<String, Arc<TokenCache>>,
}

/// Everything one listener needs to serve requests for its upstream.
pub struct Pipeline {
    name: String,
    local: SocketAddr,
    upstream: Upstream,
    /// The upstream's own token cache ([upstream.auth]).
    pub tokens: Arc<TokenCache>,
    /// The cache each inbound key reaches the API with, by the key's index: its identity's,
    /// or `None` for the upstream's own.
    by_key: Vec<Option<Arc<TokenCache>>>,
    quota: Arc<Quota>,
    keys: Keys,
    /// `http` or `https`: how clients reach this listener.
    scheme: &'static str,
    stats: Arc<RequestStats>,
    /// This worker's counters of each inbound key, by index, then of requests without one.
    counts: Vec<Arc<KeyCounts>>,
    retry_on: Vec<u16>,
    retry_body_limit: u64,
    /// How slowly a client may send its body.
    pace: Pace,
    /// This worker's share of `limits.max_buffered`.
    budget: Budget,
    /// The nonce the API last gave for DPoP proofs (dpop.rs).
    dpop_nonce: std::sync::Mutex<Option<String>>,
}

impl Handler for Pipeline {
    fn call(&self, request: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> + Send {
        self.handle(request)
    }
}

/// `d` in milliseconds, to the hundredth: `0.45`, not `0.45012799999999998`.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// What the access log reports of a request beyond its head and status.
#[derive(Default)]
struct Trace {
    /// Time spent waiting for the upstream's response heads (both sends after a replay).
    upstream: Duration,
    /// Fingerprint of the token generation last sent.
    token: Option<String>,
}

/// The parts of a request kept for a possible replay.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Buffered,
    /// The body's bytes in the budget, given back with the replay.
    _held: Option<Held>,
}

impl Pipeline {
    pub fn new(
        config: &UpstreamConfig,
        local: SocketAddr,
        upstream: Upstream,
        caches: Caches<'_>,
        quota: Arc<Quota>,
        stats: Arc<RequestStats>,
        budget: Budget,
    ) -> Pipeline {
        let Caches {
            own: tokens,
            identities,
        } = caches;
        let configured = config.inbound.as_ref().map_or(&[][..], |i| &i.keys[..]);
        let keys = Keys::new(configured);
        let by_key = configured
            .iter()
            .map(|k| k.identity.as_ref().and_then(|i| identities.get(i)).cloned())
            .collect();
        let labels = (0..keys.len()).map(|i| Arc::clone(keys.label(i)));
        let counts = labels
            .chain([Arc::from(NO_KEY)])
            .map(|label| stats.key(&label))
            .collect();
        Pipeline {
            name: config.name.clone(),
            local,
            upstream,
            tokens,
            by_key,
            quota,
            keys,
            counts,
            scheme: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            stats,
            retry_on: config.retry_on.clone(),
            retry_body_limit: config.retry_body_limit,
            pace: Pace {
                between_reads: config.limits.body_timeout,
                min_rate: config.limits.min_body_rate,
            },
            budget,
            dpop_nonce: std::sync::Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pooled client this pipeline sends with.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Serve one request; errors become problem+json responses here and nowhere else. With
    /// the `tollgate::access` log target at info, one line per request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        // Until the answer's head: what a reload that removes the upstream waits for.
        let _in_flight = self.stats.arrived();
        // The path only: a query string may carry what does not belong in a log.
        let logged =
            tracing::enabled!(target: "tollgate::access", tracing::Level::INFO).then(|| {
                (
                    Instant::now(),
                    request.method().clone(),
                    request.uri().path().to_owned(),
                )
            });
        let mut trace = logged.as_ref().map(|_| Trace::default());
        let mut key = None;
        // One await of the request path (a future of a few KiB), whether logged or not.
        let response = self.answer(request, &mut trace, &mut key).await;
        let counts = self.counts(key);
        counts.answered(response.status().as_u16());
        if let Some((started, method, path)) = logged {
            let trace = trace.unwrap_or_default();
            tracing::info!(
                target: "tollgate::access",
                upstream = %self.name,
                key = %counts.label,
                identity = %self.tokens_for(key).identity(),
                %method,
                %path,
                status = response.status().as_u16(),
                upstream_ms = millis(trace.upstream),
                total_ms = millis(started.elapsed()),
                token = %trace.token.as_deref().unwrap_or("-"),
                "request"
            );
        }
        response
    }

    /// The counters of the key at `index` (`None`: no key).
    fn counts(&self, index: Option<usize>) -> &KeyCounts {
        let last = self.counts.len() - 1;
        &self.counts[index.unwrap_or(last)]
    }

    /// The token cache the key at `index` reaches the API with.
    #[inline]
    fn tokens_for(&self, index: Option<usize>) -> &Arc<TokenCache> {
        match index.and_then(|i| self.by_key[i].as_ref()) {
            Some(identity) => identity,
            None => &self.tokens,
        }
    }

    /// The name of the key at `index`, for its budget.
    fn key_name(&self, index: Option<usize>) -> Option<&str> {
        index.map(|i| &**self.keys.label(i))
    }

    async fn answer(
        &self,
        request: Request<Incoming>,
        trace: &mut Option<Trace>,
        key: &mut Option<usize>,
    ) -> Response<ProxyBody> {
        match self.proxy(request, trace, key).await {
            Ok(response) => response,
            Err(e) => {
                tracing::debug!(upstream = %self.name, error = %e, "request refused");
                e.into_response(&self.name)
            }
        }
    }

    async fn proxy(
        &self,
        request: Request<Incoming>,
        trace: &mut Option<Trace>,
        key: &mut Option<usize>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        *key = self
            .keys
            .check(&parts.headers)
            .map_err(ProxyError::Unauthorized)?;
        let key = *key;
        let uri = self.target(&parts.method, &parts.uri, parts.version)?;
        // Where the client reached us, for a Location to come back to.
        let reached = parts.headers.get(http::header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        let (mut body, replay) = self.body(body).await?;
        let verdict = body.verdict();
        let tokens = self.tokens_for(key);
        let slot = self.quota.enter(tokens.identity()).await?;
        // The token is taken after the body was read, so it cannot expire while a slow client
        // uploads (the body read is capped at retry_body_limit).
        // From the cache on the hot path; a refresh is a large future and a rare one, boxed so
        // that every request's future does not carry (and move) its room.
        if tokens.is_identity() {
            tokens.mark_used();
        }
        let token = match tokens.cached() {
            Some(token) => token,
            None => Box::pin(tokens.get()).await?,
        };
        forward::rewrite_request_headers(
            &mut parts.headers,
            parts.version,
            &self.upstream.target,
            &token.header,
        );
        let replay = replay.map(|kept| Replay {
            method: parts.method.clone(),
            uri: uri.clone(),
            headers: parts.headers.clone(),
            body: kept.body,
            _held: kept.held,
        });
        if let Some(binding) = &token.dpop {
            // After the copy for a replay: each send gets a proof of its own.
            self.prove(&mut parts.headers, &parts.method, &uri, binding)?;
        }

        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = parts.headers;
        let identity = tokens.identity();
        let mut window = self.quota.spend(self.key_name(key), identity).await?;
        self.counts(key).sent();
        if let Some(t) = trace {
            t.token = Some(token.fingerprint.clone());
        }
        let mut response = self.send(request, verdict.as_ref(), trace).await?;
        // A nonce challenge (DPoP) is answered once, and is no refused token.
        let mut challenged = false;
        if let Some(binding) = &token.dpop {
            challenged = self.learn_nonce(&response);
            if let (true, Some(kept)) = (challenged, replay.as_ref()) {
                // Boxed, as the refresh above: rare, and large.
                let resent = self.resend_with_nonce(kept, binding, key, &mut window, trace);
                response = Box::pin(resent).await?;
                challenged = self.learn_nonce(&response);
            }
        }

        let response = match replay {
            Some(replay) if !challenged && self.retry_on.contains(&response.status().as_u16()) => {
                // Boxed, as the refresh above: rare, and large.
                let replayed = self.replay(response, replay, &token, key, &mut window, trace);
                Box::pin(replayed).await?
            }
            _ => response,
        };
        Ok(self.respond(response, slot, window, reached))
    }

    /// Stage 1: is this a request for our upstream, and where does it go?
    fn target(&self, method: &Method, uri: &Uri, version: Version) -> Result<Uri, ProxyError> {
        self.upstream
            .target
            .rewrite(method, uri, version, self.local)
            .map_err(|e| match e {
                TargetError::Method => ProxyError::MethodNotAllowed(method.clone()),
                other => ProxyError::BadRequest(other.message()),
            })
    }

    /// Stage 2: the request body, read within its pace, kept for a replay when it is small
    /// enough and fits in the budget.
    async fn body(&self, body: Incoming) -> Result<(RequestBody, Option<body::Kept>), ProxyError> {
        let body = Paced::new(body, self.pace);
        if self.retry_on.is_empty() {
            let stream = RequestBody::Stream {
                prefix: None,
                rest: body,
                held: None,
            };
            return Ok((stream, None));
        }
        let prepared = body::prepare(body, self.retry_body_limit, &self.budget)
            .await
            .map_err(|e| match e {
                BodyError::TooSlow(slow) => ProxyError::BodyTooSlow(slow),
                BodyError::Client(_) => {
                    ProxyError::BadRequest("the request body could not be read")
                }
            })?;
        Ok((prepared.body, prepared.replay))
    }

    /// Stage 3: send upstream, and let the quota see the answer. A streamed body's `verdict`
    /// tells a client that sent too slowly from an upstream that broke the connection.
    async fn send(
        &self,
        request: Request<RequestBody>,
        verdict: Option<&Verdict>,
        trace: &mut Option<Trace>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let started = Instant::now();
        let sent = self.upstream.send(request).await;
        let took = started.elapsed();
        if sent.is_ok() {
            self.stats.upstream(took);
        }
        if let Some(t) = trace {
            t.upstream += took;
        }
        let response = sent.map_err(|e| match (e, verdict.and_then(|v| v.get())) {
            (SendError::Unreachable(_), Some(slow)) => ProxyError::BodyTooSlow(slow.clone()),
            (SendError::Unreachable(reason), None) => {
                tracing::warn!(upstream = %self.name, %reason, "upstream unreachable");
                ProxyError::UpstreamUnreachable(reason)
            }
            (SendError::Timeout(d), _) => ProxyError::UpstreamTimeout(d),
            (SendError::Busy(why), _) => ProxyError::UpstreamBusy(why),
        })?;
        self.quota
            .upstream_answered(response.status(), response.headers());
        Ok(response)
    }

    /// Stage 4: the upstream refused the token; get a newer one and send the request again, once.
    async fn replay(
        &self,
        refused: Response<UpstreamBody>,
        replay: Replay,
        token: &AccessToken,
        key: Option<usize>,
        window: &mut Option<Window>,
        trace: &mut Option<Trace>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let tokens = self.tokens_for(key);
        if !tokens.may_replace(token) {
            return Ok(refused);
        }
        tracing::info!(upstream = %self.name, status = refused.status().as_u16(), generation = token.generation, token = %token.fingerprint, "upstream refused the token; refreshing and replaying once");
        drop(refused);
        let fresh = tokens.replace_rejected(token.generation).await?;
        let mut headers = replay.headers;
        headers.insert(http::header::AUTHORIZATION, fresh.header.clone());
        if let Some(binding) = &fresh.dpop {
            self.prove(&mut headers, &replay.method, &replay.uri, binding)?;
        }
        let mut request = Request::new(RequestBody::full(replay.body));
        *request.method_mut() = replay.method;
        *request.uri_mut() = replay.uri;
        *request.headers_mut() = headers;
        // The replay is a request like any other for the API's quota.
        *window = self
            .quota
            .spend(self.key_name(key), tokens.identity())
            .await?;
        self.counts(key).sent();
        if let Some(t) = trace {
            t.token = Some(fresh.fingerprint.clone());
        }
        let response = self.send(request, None, trace).await?;
        if fresh.dpop.is_some() {
            self.learn_nonce(&response);
        }
        tokens.replayed(self.retry_on.contains(&response.status().as_u16()));
        Ok(response)
    }

    /// Stage 5: hand the upstream's response to the client, without its hop-by-hop headers,
    /// with a `Location` on the upstream pointing back at the proxy, with the tightest quota
    /// window's headers, holding the concurrency slot until the body ends.
    fn respond(
        &self,
        response: Response<UpstreamBody>,
        slot: Option<Slot>,
        window: Option<Window>,
        reached: Option<HeaderValue>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        forward::remove_hop_by_hop(&mut parts.headers);
        if let Some(location) = parts.headers.get(http::header::LOCATION) {
            let proxy = self.origin(reached.as_ref());
            if let Some(rewritten) = self.upstream.target.rewrite_location(location, &proxy) {
                parts.headers.insert(http::header::LOCATION, rewritten);
            }
        }
        if let Some(window) = &window {
            // An upstream 429, or an upstream that states its own limits, speaks for itself.
            if parts.status != http::StatusCode::TOO_MANY_REQUESTS
                && !quota::has_headers(&parts.headers)
            {
                quota::add_headers(&mut parts.headers, window);
            }
        }
        Response::from_parts(parts, Either::Left(ResponseBody::new(body, slot)))
    }

    /// `scheme://host[:port]` as the client addressed the proxy (its Host), else the listener.
    fn origin(&self, reached: Option<&HeaderValue>) -> String {
        let host = reached
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .filter(|a| !a.as_str().contains('@'));
        match host {
            Some(authority) => format!("{}://{authority}", self.scheme),
            None => format!("{}://{}", self.scheme, self.local),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::quota::Clock;

    /// A request's future stays small: hyper moves it whole into place for every request,
    /// and each stage's future is moved into the one that awaits it, so room taken by a
    /// rare path (a refresh, a replay, a new connection) would cost every request. Those
    /// paths are boxed; this holds the line.
    #[tokio::test]
    async fn the_request_future_stays_small() {
        let state = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
[state]
store = "file:{}"

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "http://127.0.0.1:9"

[upstream.auth]
grant = "client_credentials"
token_url = "http://127.0.0.1:9/token"
client_id = "id"
client_secret = "secret"
"#,
            state.path().display()
        );
        let config = Config::parse(&text, "t", |_| None).unwrap();
        let up = &config.upstreams[0];
        let store = crate::store::open(&config.state).unwrap();
        let tokens =
            Arc::new(TokenCache::new(up, Arc::clone(&store), &Default::default()).unwrap());
        let quota = Arc::new(Quota::new(
            &up.name,
            None,
            Default::default(),
            store,
            Clock::system(),
        ));
        let upstream = Upstream::new(up, &Default::default(), 1).unwrap();
        let local = "127.0.0.1:8080".parse().unwrap();
        let stats = Arc::new(RequestStats::default());
        let pipeline = Pipeline::new(
            up,
            local,
            upstream,
            Caches {
                own: tokens,
                identities: &Default::default(),
            },
            quota,
            stats,
            Budget::new(1),
        );

        let size = size_of_return(|request| pipeline.handle(request));
        // 9,304 bytes before the refresh and the replay were boxed; 5,088 after.
        assert!(size <= 6 * 1024, "the request's future is {size} bytes");
    }

    #[test]
    fn access_log_times_are_in_hundredths_of_a_millisecond() {
        assert_eq!(
            millis(Duration::from_nanos(127_978_999)).to_string(),
            "127.98"
        );
        assert_eq!(millis(Duration::from_nanos(450_128)).to_string(), "0.45");
        assert_eq!(millis(Duration::from_micros(300)).to_string(), "0.3");
    }

    /// The size of the future `f` returns, without calling it.
    fn size_of_return<A, Fut>(_: impl Fn(A) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }
}
