//! A simulated protected API that accepts only access tokens from an [`IdentitySim`].
//!
//! Owns: the bearer check (RFC 6750 §3.1 challenges), an echo that describes the request it
//! received, a streaming download of a known byte pattern (made by [`super::pattern`]), and the query switches tests use
//! (`sim_download`, `sim_delay_ms`, `sim_status`, `sim_retry_after`) plus the `x-sim-location`
//! header.
//!
//! Must not: hold a request or response body in memory. Uploads are hashed as they stream in
//! (only the first 64 KiB is kept, for the echo's `body` field) and downloads are generated
//! 64 KiB at a time, so multi-megabyte transfers cost almost nothing.
//!
//! Echo answer (200, `application/json`):
//! `{"method","path","query","headers":[[name,value],...],"trailers":[[name,value],...],"body_len","body_sha256","body"}`
//! where `query` is null without a query string and `body` is null unless the body is UTF-8
//! and at most 64 KiB.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use super::identity::IdentitySim;
use super::pattern::download;
pub use super::pattern::pattern_sha256;
use super::{empty_body, full_body, hex, SimBody, SimServer};

/// How much of an upload the echo keeps as text.
const CHUNK: usize = 64 * 1024;

/// Request header whose value is copied into the answer's `Location`, for redirect tests.
const LOCATION_SWITCH: &str = "x-sim-location";

/// Request header whose value comes back as the `ContinuePath` response header (WinBooks'
/// paging of truncated answers).
const CONTINUE_SWITCH: &str = "x-sim-continue-path";

/// Request limits of a provider's API, per session (ERP.net: 600 a minute, one in flight,
/// five waiting, for each user's login); past them the API answers 429 without
/// `Retry-After`, as ERP.net does. A session is the grant the access token was issued under.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    pub per_minute: u32,
    pub concurrency: usize,
    pub queue: usize,
}

impl ApiLimits {
    /// ERP.net's defaults per session (docs/providers.md).
    pub const ERPNET: ApiLimits = ApiLimits {
        per_minute: 600,
        concurrency: 1,
        queue: 5,
    };
}

/// The limits of one session.
#[derive(Debug)]
struct Limiter {
    limits: ApiLimits,
    slots: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    /// Start of the current minute and requests counted in it.
    window: Mutex<(std::time::Instant, u32)>,
    /// The session's requests arrived and not yet answered.
    arrived: AtomicU64,
}

impl Limiter {
    fn new(limits: ApiLimits) -> Limiter {
        Limiter {
            limits,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.concurrency)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            window: Mutex::new((std::time::Instant::now(), 0)),
            arrived: AtomicU64::new(0),
        }
    }
}

/// What the API has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiCounters {
    pub requests: u64,
    pub authorized: u64,
    pub rejected: u64,
    /// Most requests that were being handled at the same moment.
    pub in_flight_max: u64,
    /// Requests refused with 429 by the limits.
    pub throttled: u64,
    /// Most requests of one session (one grant) that had arrived and were not yet answered
    /// at the same moment, on an API with limits.
    pub session_in_flight_max: u64,
}

/// The simulated API. Cloning is cheap and shares state.
#[derive(Debug, Clone)]
pub struct ApiSim {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    identity: IdentitySim,
    reject_left: AtomicU32,
    /// The `sim_refuse_once` ids already refused: a request with one is refused the first
    /// time only, so the replay after a refresh goes through.
    refused_once: Mutex<std::collections::HashSet<String>>,
    requests: AtomicU64,
    authorized: AtomicU64,
    rejected: AtomicU64,
    in_flight: AtomicU64,
    in_flight_max: AtomicU64,
    throttled: AtomicU64,
    limits: Option<ApiLimits>,
    /// Each session's limiter, by the grant of its access tokens.
    sessions: Mutex<std::collections::HashMap<Option<usize>, Arc<Limiter>>>,
    session_in_flight_max: AtomicU64,
    /// The `jti`s of DPoP proofs already used here.
    dpop_jtis: Mutex<std::collections::HashMap<String, u64>>,
    last_authorization: Mutex<Option<String>>,
}

/// Why a request was refused, which decides the RFC 6750 challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// No bearer credentials at all: the challenge carries no error code (RFC 6750 §3.1).
    NoCredentials,
    InvalidToken,
    /// A DPoP proof without the API's nonce: `use_dpop_nonce`, with the nonce to use.
    DpopNonce(String),
}

/// The query switches a test can put on any request.
#[derive(Debug, Default)]
struct Switches {
    download: Option<u64>,
    delay: Option<Duration>,
    status: Option<StatusCode>,
    /// Sent as the `Retry-After` header, as given (seconds or an HTTP date).
    retry_after: Option<http::HeaderValue>,
}

impl ApiSim {
    pub fn new(identity: IdentitySim) -> ApiSim {
        ApiSim::build(identity, None)
    }

    /// An API that enforces `limits` on authorized requests.
    pub fn with_limits(identity: IdentitySim, limits: ApiLimits) -> ApiSim {
        ApiSim::build(identity, Some(limits))
    }

    fn build(identity: IdentitySim, limits: Option<ApiLimits>) -> ApiSim {
        ApiSim {
            inner: Arc::new(Inner {
                identity,
                reject_left: AtomicU32::new(0),
                refused_once: Mutex::default(),
                requests: AtomicU64::new(0),
                authorized: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                in_flight_max: AtomicU64::new(0),
                throttled: AtomicU64::new(0),
                limits,
                sessions: Mutex::default(),
                session_in_flight_max: AtomicU64::new(0),
                dpop_jtis: Mutex::default(),
                last_authorization: Mutex::new(None),
            }),
        }
    }

    /// Serves the API on `listener`; every path is the echo.
    pub async fn serve(&self, listener: TcpListener) -> SimServer {
        let sim = self.clone();
        let service = service_fn(move |request| {
            let sim = sim.clone();
            async move { Ok::<_, Infallible>(sim.handle(request).await) }
        });
        SimServer::start(listener, service).await
    }

    pub fn identity(&self) -> &IdentitySim {
        &self.inner.identity
    }

    /// The next `n` requests get a 401 `invalid_token`, whatever token they carry.
    pub fn reject_next(&self, n: u32) {
        self.inner.reject_left.store(n, Ordering::SeqCst);
    }

    pub fn counters(&self) -> ApiCounters {
        let inner = &self.inner;
        ApiCounters {
            requests: inner.requests.load(Ordering::SeqCst),
            authorized: inner.authorized.load(Ordering::SeqCst),
            rejected: inner.rejected.load(Ordering::SeqCst),
            in_flight_max: inner.in_flight_max.load(Ordering::SeqCst),
            throttled: inner.throttled.load(Ordering::SeqCst),
            session_in_flight_max: inner.session_in_flight_max.load(Ordering::SeqCst),
        }
    }

    /// The `Authorization` header of the latest request (None if it had none).
    pub fn last_authorization(&self) -> Option<String> {
        self.inner
            .last_authorization
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(crate) async fn handle(self, request: Request<Incoming>) -> Response<SimBody> {
        self.inner.requests.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight::enter(self.inner.clone());
        self.remember_authorization(request.headers());
        if self.refuse_once(request.uri().query()) {
            self.inner.rejected.fetch_add(1, Ordering::SeqCst);
            return unauthorized(Refusal::InvalidToken);
        }
        if let Err(refusal) = self.authorize(request.method(), request.uri(), request.headers()) {
            self.inner.rejected.fetch_add(1, Ordering::SeqCst);
            return unauthorized(refusal);
        }
        self.inner.authorized.fetch_add(1, Ordering::SeqCst);
        let session = self.session_of(request.headers());
        let _slot = match self.admit(session).await {
            Ok(slot) => slot,
            Err(response) => return response,
        };

        let switches = match Switches::from_query(request.uri().query()) {
            Ok(switches) => switches,
            Err(message) => return bad_request(&message),
        };
        if let Some(delay) = switches.delay {
            tokio::time::sleep(delay).await;
        }
        let location = request.headers().get(LOCATION_SWITCH).cloned();
        let continue_path = request.headers().get(CONTINUE_SWITCH).cloned();
        let mut response = match switches.download {
            Some(size) => download(size),
            None => match echo(request).await {
                Ok(response) => response,
                Err(error) => return bad_request(&format!("could not read the body: {error}")),
            },
        };
        if let Some(status) = switches.status {
            *response.status_mut() = status;
        }
        if let Some(value) = switches.retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, value);
        }
        if let Some(location) = location {
            response.headers_mut().insert(LOCATION, location);
        }
        if let Some(path) = continue_path {
            response.headers_mut().insert("continuepath", path);
        }
        response
    }

    /// The session a request's (valid) bearer token belongs to, on an API with limits.
    fn session_of(&self, headers: &HeaderMap) -> Option<Arc<Limiter>> {
        let limits = self.inner.limits?;
        let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
        let token = value.split_once(' ').map(|(_, t)| t.trim())?;
        let grant = self.inner.identity.grant_of_access_token(token);
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let limiter = sessions
            .entry(grant)
            .or_insert_with(|| Arc::new(Limiter::new(limits)));
        Some(Arc::clone(limiter))
    }

    /// Apply the session's limits: a slot to run in (waiting in line if there is room), or a
    /// 429.
    async fn admit(
        &self,
        session: Option<Arc<Limiter>>,
    ) -> Result<Option<Admitted>, Response<SimBody>> {
        let Some(limiter) = session else {
            return Ok(None);
        };
        let arrived = Arrived::enter(&limiter, &self.inner.session_in_flight_max);
        let too_many = || {
            self.inner.throttled.fetch_add(1, Ordering::SeqCst);
            let mut response = Response::new(super::full_body("Too many requests"));
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response
        };
        {
            let mut window = limiter.window.lock().unwrap_or_else(|p| p.into_inner());
            if window.0.elapsed() >= Duration::from_secs(60) {
                *window = (std::time::Instant::now(), 0);
            }
            if window.1 >= limiter.limits.per_minute {
                return Err(too_many());
            }
            window.1 += 1;
        }
        if let Ok(permit) = Arc::clone(&limiter.slots).try_acquire_owned() {
            return Ok(Some((permit, arrived)));
        }
        if limiter.waiting.fetch_add(1, Ordering::SeqCst) >= limiter.limits.queue {
            limiter.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(too_many());
        }
        let permit = Arc::clone(&limiter.slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        limiter.waiting.fetch_sub(1, Ordering::SeqCst);
        Ok(Some((permit, arrived)))
    }

    fn remember_authorization(&self, headers: &HeaderMap) {
        let value = headers
            .get(AUTHORIZATION)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        *self
            .inner
            .last_authorization
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = value;
    }

    /// `sim_refuse_once=ID`: refuse the token the first time ID is seen (as an API does
    /// with a token revoked before it expired), accept it after.
    fn refuse_once(&self, query: Option<&str>) -> bool {
        let query = form_urlencoded::parse(query.unwrap_or_default().as_bytes());
        let Some((_, id)) = query
            .into_iter()
            .find(|(name, _)| name == "sim_refuse_once")
        else {
            return false;
        };
        let mut seen = self
            .inner
            .refused_once
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        seen.insert(id.into_owned())
    }

    fn authorize(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<(), Refusal> {
        let forced = self
            .inner
            .reject_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if forced.is_ok() {
            return Err(Refusal::InvalidToken);
        }
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(Refusal::NoCredentials);
        };
        if values.next().is_some() {
            return Err(Refusal::InvalidToken);
        }
        let value = value.to_str().map_err(|_| Refusal::InvalidToken)?;
        match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("dpop") => {
                self.check_dpop(method, uri, headers, token.trim())
            }
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                let identity = &self.inner.identity;
                identity
                    .validate_access(token.trim())
                    .map_err(|_| Refusal::InvalidToken)?;
                // A DPoP-bound token is no bearer token (RFC 9449 §7.1).
                if identity.access_jkt(token.trim()).is_some() {
                    return Err(Refusal::InvalidToken);
                }
                // A certificate-bound token (RFC 8705 §3) is good only with its certificate.
                match identity.binding() {
                    Some(bound) => {
                        let presented = headers.get(crate::identity::CLIENT_CERT_HEADER);
                        match presented.and_then(|v| v.to_str().ok()) {
                            Some(presented) if presented == bound => Ok(()),
                            _ => Err(Refusal::InvalidToken),
                        }
                    }
                    None => Ok(()),
                }
            }
            // Another scheme is no bearer credential at all.
            _ => Err(Refusal::NoCredentials),
        }
    }
}

impl ApiSim {
    /// RFC 9449 §7: a DPoP-bound token with a valid proof by its key for this request.
    fn check_dpop(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        token: &str,
    ) -> Result<(), Refusal> {
        let identity = &self.inner.identity;
        identity
            .validate_access(token)
            .map_err(|_| Refusal::InvalidToken)?;
        let bound = identity.access_jkt(token).ok_or(Refusal::InvalidToken)?;
        let mut proofs = headers.get_all("dpop").iter();
        let (Some(proof), None) = (proofs.next(), proofs.next()) else {
            return Err(Refusal::InvalidToken);
        };
        let proof = proof.to_str().map_err(|_| Refusal::InvalidToken)?;
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let htu = format!("http://{host}{}", uri.path());
        let nonce = identity
            .config()
            .api_dpop_nonce
            .then(|| identity.api_dpop_nonce());
        let expected = crate::dpop::Expected {
            htm: method.as_str(),
            htu: &htu,
            ath: Some(crate::dpop::ath(token)),
            nonce: nonce.as_deref(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut jtis = self
            .inner
            .dpop_jtis
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match crate::dpop::verify(proof, &expected, &mut jtis, now) {
            Ok(jkt) if jkt == bound => Ok(()),
            Ok(_) => Err(Refusal::InvalidToken),
            Err(crate::dpop::ProofError::Nonce) => {
                identity.count_dpop_challenge();
                Err(Refusal::DpopNonce(nonce.unwrap_or_default()))
            }
            Err(crate::dpop::ProofError::Invalid(_)) => Err(Refusal::InvalidToken),
        }
    }
}

/// A request admitted by its session's limits: its slot, and its count among the session's
/// arrived requests.
type Admitted = (tokio::sync::OwnedSemaphorePermit, Arrived);

/// Counts a request among its session's arrived ones for as long as it lives.
struct Arrived(Arc<Limiter>);

impl Arrived {
    fn enter(limiter: &Arc<Limiter>, max: &AtomicU64) -> Arrived {
        let now = limiter.arrived.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        Arrived(Arc::clone(limiter))
    }
}

impl Drop for Arrived {
    fn drop(&mut self) {
        self.0.arrived.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a request as in flight for as long as it lives.
struct InFlight(Arc<Inner>);

impl InFlight {
    fn enter(inner: Arc<Inner>) -> InFlight {
        let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        inner.in_flight_max.fetch_max(now, Ordering::SeqCst);
        InFlight(inner)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Switches {
    fn from_query(query: Option<&str>) -> Result<Switches, String> {
        let mut switches = Switches::default();
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{name} must be a whole number, got {value:?}"))
            };
            match &*name {
                "sim_download" => switches.download = Some(number()?),
                "sim_delay_ms" => switches.delay = Some(Duration::from_millis(number()?)),
                "sim_status" => {
                    let status = u16::try_from(number()?)
                        .ok()
                        .and_then(|n| StatusCode::from_u16(n).ok())
                        .filter(|s| (200..=599).contains(&s.as_u16()))
                        .ok_or_else(|| format!("sim_status must be 200..=599, got {value:?}"))?;
                    switches.status = Some(status);
                }
                "sim_retry_after" => {
                    let value = http::HeaderValue::from_str(&value)
                        .map_err(|_| format!("sim_retry_after is not a header value: {value:?}"))?;
                    switches.retry_after = Some(value);
                }
                _ => {}
            }
        }
        Ok(switches)
    }
}

fn unauthorized(refusal: Refusal) -> Response<SimBody> {
    let (challenge, nonce) = match refusal {
        Refusal::NoCredentials => ("Bearer", None),
        Refusal::InvalidToken => (r#"Bearer error="invalid_token""#, None),
        Refusal::DpopNonce(nonce) => (r#"DPoP error="use_dpop_nonce""#, Some(nonce)),
    };
    let mut response = Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(WWW_AUTHENTICATE, challenge);
    if let Some(nonce) = nonce {
        response = response.header("dpop-nonce", nonce);
    }
    response
        .body(empty_body())
        .expect("static headers are valid")
}

fn bad_request(message: &str) -> Response<SimBody> {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header(CONTENT_TYPE, "text/plain")
        .body(full_body(format!("{message}\n")))
        .expect("static headers are valid")
}

/// Header fields as `[name, value]` pairs, in order.
fn pairs(fields: &http::HeaderMap) -> impl Iterator<Item = [String; 2]> + '_ {
    fields.iter().map(|(name, value)| {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        [name.as_str().to_owned(), value]
    })
}

/// Describes the request, hashing the body as it arrives instead of collecting it.
async fn echo(request: Request<Incoming>) -> Result<Response<SimBody>, hyper::Error> {
    let (parts, mut body) = request.into_parts();
    let mut hasher = Sha256::new();
    let mut body_len = 0u64;
    let mut kept = Vec::new();
    let mut trailers: Vec<[String; 2]> = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = match frame?.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(fields) = frame.into_trailers() {
                    trailers.extend(pairs(&fields));
                }
                continue;
            }
        };
        body_len += data.len() as u64;
        hasher.update(&data);
        let room = CHUNK - kept.len();
        kept.extend_from_slice(&data[..data.len().min(room)]);
    }
    let text = if body_len <= CHUNK as u64 {
        String::from_utf8(kept).ok()
    } else {
        None
    };
    let answer = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": pairs(&parts.headers).collect::<Vec<_>>(),
        "trailers": trailers,
        "body_len": body_len,
        "body_sha256": hex(&hasher.finalize()),
        "body": text,
    });
    Ok(Response::builder()
        .header(CONTENT_TYPE, "application/json")
        .body(full_body(answer.to_string()))
        .expect("static headers are valid"))
}

#[cfg(test)]
mod tests {
    use super::super::identity::IdentityConfig;
    use super::super::testing::*;
    use super::super::{bind_loopback, hex};
    use super::*;
    use http_body_util::Full;
    use serde_json::Value;

    struct Sims {
        identity: IdentitySim,
        api: ApiSim,
        _identity_server: SimServer,
        api_server: SimServer,
    }

    async fn start() -> Sims {
        let (identity, identity_server) = IdentitySim::start(IdentityConfig::default()).await;
        let api = ApiSim::new(identity.clone());
        let api_server = api.serve(bind_loopback().await).await;
        Sims {
            identity,
            api,
            _identity_server: identity_server,
            api_server,
        }
    }

    /// Gets an access token the way a client would: from the token endpoint.
    async fn access_token(identity: &IdentitySim) -> String {
        let request = Request::post(identity.token_url())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::from(
                "grant_type=client_credentials&client_id=tollgate-test&client_secret=s3cret",
            ))
            .unwrap();
        let (_, body) = send(&client(), request).await;
        let answer: Value = serde_json::from_slice(&body).unwrap();
        answer["access_token"].as_str().unwrap().to_owned()
    }

    fn api_request(
        sims: &Sims,
        path_and_query: &str,
        token: Option<&str>,
    ) -> http::request::Builder {
        let mut request = Request::post(format!("{}{path_and_query}", sims.api_server.url()));
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        request
    }

    /// A valid token gets the echo, with the switches and x-sim-location applied.
    #[tokio::test]
    async fn valid_token_gets_echo() {
        let sims = start().await;
        let token = access_token(&sims.identity).await;
        let request = api_request(&sims, "/items/7?a=1&sim_status=201", Some(&token))
            .header("x-custom", "yes")
            .header(LOCATION_SWITCH, "/elsewhere")
            .body(Full::from("hello"))
            .unwrap();
        let (parts, body) = send(&client(), request).await;
        assert_eq!(parts.status, 201);
        assert_eq!(parts.headers[CONTENT_TYPE], "application/json");
        assert_eq!(parts.headers[LOCATION], "/elsewhere");
        let echo: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["path"], "/items/7");
        assert_eq!(echo["query"], "a=1&sim_status=201");
        assert_eq!(echo["body"], "hello");
        assert_eq!(echo["body_len"], 5);
        assert_eq!(echo["body_sha256"], hex(&Sha256::digest(b"hello")));
        let headers = echo["headers"].as_array().unwrap();
        assert!(headers.contains(&json!(["x-custom", "yes"])));
        assert_eq!(
            sims.api.last_authorization(),
            Some(format!("Bearer {token}"))
        );
        assert_eq!(sims.api.counters().authorized, 1);
    }

    /// Without a query string the echo's query is null.
    #[tokio::test]
    async fn echo_query_is_null_without_query() {
        let sims = start().await;
        let token = access_token(&sims.identity).await;
        let request = api_request(&sims, "/", Some(&token))
            .body(Full::default())
            .unwrap();
        let (_, body) = send(&client(), request).await;
        let echo: Value = serde_json::from_slice(&body).unwrap();
        assert!(echo["query"].is_null());
        assert_eq!(echo["body"], "");
    }

    /// No Authorization header: 401 with a bare `Bearer` challenge and an empty body.
    #[tokio::test]
    async fn missing_token_gets_bare_challenge() {
        let sims = start().await;
        let request = api_request(&sims, "/", None).body(Full::default()).unwrap();
        let (parts, body) = send(&client(), request).await;
        assert_eq!(parts.status, 401);
        assert_eq!(parts.headers[WWW_AUTHENTICATE], "Bearer");
        assert!(body.is_empty());
        assert_eq!(sims.api.last_authorization(), None);
    }

    /// After expire_access_tokens the same token gets 401 invalid_token.
    #[tokio::test]
    async fn expired_token_gets_invalid_token() {
        let sims = start().await;
        let token = access_token(&sims.identity).await;
        let ok = api_request(&sims, "/", Some(&token))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&client(), ok).await.0.status, 200);

        sims.identity.expire_access_tokens();
        let request = api_request(&sims, "/", Some(&token))
            .body(Full::default())
            .unwrap();
        let (parts, body) = send(&client(), request).await;
        assert_eq!(parts.status, 401);
        assert_eq!(
            parts.headers[WWW_AUTHENTICATE],
            r#"Bearer error="invalid_token""#
        );
        assert!(body.is_empty());
        let counters = sims.api.counters();
        assert_eq!(
            (counters.requests, counters.authorized, counters.rejected),
            (2, 1, 1)
        );
    }

    /// reject_next refuses the next n requests even with a valid token.
    #[tokio::test]
    async fn reject_next_refuses_valid_tokens() {
        let sims = start().await;
        let token = access_token(&sims.identity).await;
        sims.api.reject_next(2);
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let request = api_request(&sims, "/", Some(&token))
                .body(Full::default())
                .unwrap();
            statuses.push(send(&client(), request).await.0.status.as_u16());
        }
        assert_eq!(statuses, [401, 401, 200]);
    }

    /// sim_download streams the pattern: right length, right hash, over HTTP/1.1 and h2c.
    #[tokio::test]
    async fn download_has_pattern_size_and_hash() {
        let sims = start().await;
        let token = access_token(&sims.identity).await;
        let size = 5 * 1024 * 1024 + 7;
        for client in [client(), h2c_client()] {
            let request = api_request(&sims, &format!("/file?sim_download={size}"), Some(&token))
                .body(Full::default())
                .unwrap();
            let (parts, body) = send(&client, request).await;
            assert_eq!(parts.status, 200);
            assert_eq!(parts.headers[CONTENT_TYPE], "application/octet-stream");
            assert_eq!(body.len() as u64, size);
            assert_eq!(hex(&Sha256::digest(&body)), pattern_sha256(size));
        }
        assert_eq!(pattern_sha256(0), hex(&Sha256::digest(b"")));
    }

    /// A 3 MB upload is hashed correctly and not echoed as text.
    #[tokio::test]
    async fn upload_hash_of_3mb_body() {
        let sims = start().await;
        let token = access_token(&sims.identity).await;
        let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let expected = hex(&Sha256::digest(&upload));
        let request = api_request(&sims, "/upload", Some(&token))
            .body(Full::from(upload))
            .unwrap();
        let (parts, body) = send(&client(), request).await;
        assert_eq!(parts.status, 200);
        let echo: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["body_len"], 3_000_000);
        assert_eq!(echo["body_sha256"], expected);
        assert!(echo["body"].is_null());
    }

    /// Concurrent slow requests are counted in in_flight_max.
    #[tokio::test]
    async fn in_flight_max_counts_concurrent_requests() {
        let sims = start().await;
        let token = access_token(&sims.identity).await;
        let client = client();
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let client = client.clone();
                let request = api_request(&sims, "/?sim_delay_ms=300", Some(&token))
                    .body(Full::default())
                    .unwrap();
                tokio::spawn(async move { send(&client, request).await.0.status })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.await.unwrap(), 200);
        }
        assert_eq!(sims.api.counters().in_flight_max, 3);
    }

    /// A malformed switch is a 400, not a silent default.
    #[tokio::test]
    async fn bad_switch_is_400() {
        let sims = start().await;
        let token = access_token(&sims.identity).await;
        let request = api_request(&sims, "/?sim_status=42", Some(&token))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&client(), request).await.0.status, 400);
    }
}
