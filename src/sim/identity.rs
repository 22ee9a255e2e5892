//! A simulated OAuth2 identity server: a token endpoint strict per RFC 6749 §§2.3, 3.2, 4.1,
//! 4.3, 4.4, 5 and 6, and an authorization endpoint for the authorization-code grant with
//! PKCE S256 only (RFC 6749 §4.1, RFC 7636), with switches for the dialects of the providers
//! in `PROVIDERS.md`.
//!
//! Owns: the grants, authorization codes, refresh, access and exchange tokens it issued; the
//! token endpoint's request checks (method, content type, repeated parameters, client
//! authentication); the authorization endpoint's checks, where a simulated user consents at
//! once unless told to deny; fault injection (failures, delays, garbage answers) on the
//! token endpoint; and counters for tests.
//!
//! Must not: accept anything a strict identity server would refuse. A proxy that passes
//! against this simulator should pass against real servers, so when in doubt it says no.
//! Its `Mutex` is never held across an `.await`.
//!
//! Two choices worth knowing:
//! - Access tokens stay valid until they expire, even after their grant is revoked, the way
//!   self-contained JWTs from real identity servers do. Use
//!   [`IdentitySim::expire_access_tokens`] to force the proxy back to the token endpoint.
//! - Injected faults answer *instead of* processing the request, so a failed or garbled
//!   refresh never rotates the refresh token; only [`IdentitySim::answer_late`] processes it
//!   and then holds the answer back.
//! - `redirect_uri` must be sent to the authorization endpoint and match a registered one
//!   exactly (no RFC 8252 §7.3 port wildcard for loopback). An authorization code is used up
//!   by the first token request that gets as far as checking it, even if that request fails.
//!
//! Dialects (all off by default, which is plain RFC 6749):
//! - `spring_errors`: an expired refresh token is 401 `invalid_token` with a Bearer
//!   challenge, as Spring Security OAuth2 answers; like Spring, the description and the
//!   challenge echo the token, so a proxy that logs token-endpoint errors leaks it.
//! - `winbooks`: client authentication is `Basic base64(EMAIL)` with no colon,
//!   `Accept: application/json` is required, and only the `exchange_token` and
//!   `refresh_token` grants exist, both taking their token in the `code` field.
//! - `all_errors_400`: every error answer is 400, `invalid_client` included (ERP.net).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::header::{
    ACCEPT, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LOCATION, PRAGMA, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use super::{bind_loopback, empty_body, full_body, SimBody, SimServer};

/// Largest token request body accepted; more gets 413 so a client cannot exhaust memory.
const BODY_LIMIT: usize = 64 * 1024;

/// How long an authorization code can be redeemed (RFC 6749 §4.1.2 recommends 10 minutes
/// at most; real servers use 30 to 60 seconds).
const CODE_LIFETIME: Duration = Duration::from_secs(60);

/// Which client authentication methods (RFC 6749 §2.3.1) the endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthRule {
    /// `client_id` and `client_secret` in the form body only (client_secret_post).
    Post,
    /// HTTP Basic only (client_secret_basic).
    Basic,
    /// Either one, but never both in the same request.
    Either,
}

/// What a refresh does to the refresh token that was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Every refresh returns a new refresh token and retires the old one. Presenting a
    /// retired token is treated as theft: the whole grant is revoked.
    Strict,
    /// The same refresh token comes back every time.
    Reuse,
}

/// How the simulated identity server behaves.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub client_id: String,
    pub client_secret: String,
    pub client_auth: ClientAuthRule,
    /// Path of the token endpoint, e.g. `/token`.
    pub token_path: String,
    pub access_lifetime: Duration,
    pub rotation: Rotation,
    /// Send `expires_in` as a JSON string (`"3600"`), as WinBooks does.
    pub expires_in_as_string: bool,
    pub token_type: String,
    /// `(username, password)` pairs; a non-empty list enables the password grant (§4.3).
    pub users: Vec<(String, String)>,
    /// Age at which a refresh token expires; None means never.
    pub refresh_lifetime: Option<Duration>,
    /// Answer an expired refresh token as Spring Security OAuth2 does: 401 `invalid_token`
    /// with `WWW-Authenticate: Bearer ...`. Off: 400 `invalid_grant`.
    pub spring_errors: bool,
    /// The WinBooks on Web dialect (see the module docs). Overrides `client_auth`,
    /// `token_type` (`bearer`) and `expires_in_as_string` (always a string).
    pub winbooks: bool,
    /// Every error answer is HTTP 400, `invalid_client` included (ERP.net).
    pub all_errors_400: bool,
    /// Path of the authorization endpoint, e.g. `/authorize`.
    pub authorize_path: String,
    /// The client's registered redirect URIs; `redirect_uri` must equal one of them exactly.
    pub redirect_uris: Vec<String>,
    /// The `authorization_code` grant also accepts a public client: `client_id` in the body
    /// and no client authentication at all (RFC 6749 §4.1.3). Other grants still require it.
    pub public_client_ok: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            client_id: "tollgate-test".to_owned(),
            client_secret: "s3cret".to_owned(),
            client_auth: ClientAuthRule::Either,
            token_path: "/token".to_owned(),
            access_lifetime: Duration::from_secs(3600),
            rotation: Rotation::Strict,
            expires_in_as_string: false,
            token_type: "Bearer".to_owned(),
            users: Vec::new(),
            refresh_lifetime: None,
            spring_errors: false,
            winbooks: false,
            all_errors_400: false,
            authorize_path: "/authorize".to_owned(),
            redirect_uris: vec!["http://127.0.0.1:8765/callback".into()],
            public_client_ok: true,
        }
    }
}

/// What the token endpoint has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityCounters {
    /// Every request to the token path, whatever its outcome.
    pub token_requests: u64,
    /// Successful token responses.
    pub issued: u64,
    /// Successful `refresh_token` grants.
    pub refreshes: u64,
    /// Successful `client_credentials` grants.
    pub client_credentials: u64,
    /// Successful `password` grants.
    pub password_grants: u64,
    /// Successful WinBooks `exchange_token` grants.
    pub exchanges: u64,
    /// Successful `authorization_code` grants.
    pub authorization_codes: u64,
    /// Answers replaced by `fail_next` or `garbage_next`.
    pub failures_injected: u64,
    /// Times a refresh token that had been rotated away, or an authorization code that had
    /// been used, was presented.
    pub reuse_detected: u64,
    /// Grants revoked, by reuse detection (of a refresh token or a code) or `revoke_all`.
    pub grants_revoked: u64,
}

/// The simulated identity server. Cloning is cheap and shares state.
#[derive(Debug, Clone)]
pub struct IdentitySim {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: IdentityConfig,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    addr: Option<SocketAddr>,
    /// Indexed by grant id.
    grants: Vec<Grant>,
    refresh_tokens: HashMap<String, RefreshToken>,
    access_tokens: HashMap<String, Instant>,
    /// WinBooks exchange tokens; the value says whether the token was revoked.
    exchange_tokens: HashMap<String, bool>,
    /// Authorization codes, kept after use so that a second use can be detected.
    codes: HashMap<String, AuthCode>,
    /// The next authorization that gets as far as consent is denied.
    deny_next_authorization: bool,
    /// Query parameters of the last request to the authorization endpoint, in order.
    last_authorize_params: Vec<(String, String)>,
    faults: Faults,
    counters: IdentityCounters,
}

#[derive(Debug)]
struct Grant {
    revoked: bool,
}

#[derive(Debug, Clone, Copy)]
struct RefreshToken {
    grant: usize,
    rotated_away: bool,
    /// None: never expires.
    expires_at: Option<Instant>,
}

/// What an authorization code was bound to at the authorization endpoint.
#[derive(Debug, Clone)]
struct AuthCode {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    scope: Option<String>,
    expires_at: Instant,
    /// Set by the first token request that presents the code.
    used: bool,
    /// The grant the code started, once it was redeemed.
    grant: Option<usize>,
}

#[derive(Debug, Default)]
struct Faults {
    fail_left: u32,
    fail_status: u16,
    delay_left: u32,
    delay: Duration,
    late_left: u32,
    late: Duration,
    garbage_left: u32,
}

enum Fault {
    Fail(u16),
    Garbage,
}

impl IdentitySim {
    pub fn new(config: IdentityConfig) -> IdentitySim {
        IdentitySim {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Creates a simulator and serves it on a fresh loopback port.
    pub async fn start(config: IdentityConfig) -> (IdentitySim, SimServer) {
        let sim = IdentitySim::new(config);
        let server = sim.serve(bind_loopback().await).await;
        (sim, server)
    }

    /// Serves the token and authorization endpoints on `listener`; any other path answers 404.
    pub async fn serve(&self, listener: TcpListener) -> SimServer {
        let sim = self.clone();
        let service = service_fn(move |request| {
            let sim = sim.clone();
            async move { Ok::<_, Infallible>(sim.handle(request).await) }
        });
        let server = SimServer::start(listener, service).await;
        self.state().addr = Some(server.addr);
        server
    }

    pub fn config(&self) -> &IdentityConfig {
        &self.inner.config
    }

    /// Full URL of the token endpoint.
    ///
    /// # Panics
    /// If [`serve`](Self::serve) has not been called yet.
    pub fn token_url(&self) -> String {
        let addr = self
            .state()
            .addr
            .expect("IdentitySim::token_url called before serve");
        format!("http://{addr}{}", self.inner.config.token_path)
    }

    /// Full URL of the authorization endpoint, without a query.
    ///
    /// # Panics
    /// If [`serve`](Self::serve) has not been called yet.
    pub fn authorize_url(&self) -> String {
        let addr = self
            .state()
            .addr
            .expect("IdentitySim::authorize_url called before serve");
        format!("http://{addr}{}", self.inner.config.authorize_path)
    }

    /// The next authorization request that passes every check is denied by the simulated
    /// user: it redirects with `error=access_denied` (and `state`) instead of a code.
    pub fn deny_next_authorization(&self) {
        self.state().deny_next_authorization = true;
    }

    /// The decoded query parameters of the last request to the authorization endpoint, in
    /// the order sent, valid or not (empty before the first one).
    pub fn last_authorize_params(&self) -> Vec<(String, String)> {
        self.state().last_authorize_params.clone()
    }

    /// Expires every authorization code issued so far (tests use this instead of waiting
    /// out the 60 seconds).
    pub fn expire_authorization_codes(&self) {
        let now = Instant::now();
        for code in self.state().codes.values_mut() {
            code.expires_at = now;
        }
    }

    /// Creates a new grant and returns its first refresh token: what a user gets from a login.
    pub fn issue_refresh_token(&self) -> String {
        let mut state = self.state();
        let grant = state.new_grant();
        state.new_refresh_token(grant, self.inner.config.refresh_lifetime)
    }

    /// A new, valid WinBooks exchange token (`ex_...`), as a user copies it from the WinBooks
    /// web site. It stays valid until [`revoke_exchange_tokens`](Self::revoke_exchange_tokens).
    pub fn issue_exchange_token(&self) -> String {
        let token = random_token("ex_");
        self.state().exchange_tokens.insert(token.clone(), false);
        token
    }

    /// Revokes every exchange token issued so far. Grants already obtained with them stay.
    pub fn revoke_exchange_tokens(&self) {
        for revoked in self.state().exchange_tokens.values_mut() {
            *revoked = true;
        }
    }

    /// Ok if this simulator issued `token` and it has not expired.
    pub fn validate_access(&self, token: &str) -> Result<(), &'static str> {
        match self.state().access_tokens.get(token) {
            None => Err("unknown access token"),
            Some(expires_at) if Instant::now() >= *expires_at => Err("access token expired"),
            Some(_) => Ok(()),
        }
    }

    /// Expires every access token issued so far (tests use this instead of sleeping).
    pub fn expire_access_tokens(&self) {
        let now = Instant::now();
        for expires_at in self.state().access_tokens.values_mut() {
            *expires_at = now;
        }
    }

    /// Expires every refresh token issued so far, whatever `refresh_lifetime` says (tests use
    /// this instead of sleeping). Tokens issued afterwards are not affected.
    pub fn expire_refresh_tokens(&self) {
        let now = Instant::now();
        for entry in self.state().refresh_tokens.values_mut() {
            entry.expires_at = Some(now);
        }
    }

    /// Revokes every grant: the next refresh with any existing token gets `invalid_grant`.
    pub fn revoke_all(&self) {
        let mut state = self.state();
        for grant in 0..state.grants.len() {
            state.revoke(grant);
        }
    }

    /// The next `n` token requests answer `status` (JSON `temporarily_unavailable` for 4xx,
    /// plain text for anything else) without being processed. Replaces an earlier call.
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut state = self.state();
        state.faults.fail_left = n;
        state.faults.fail_status = status;
    }

    /// The next `n` token requests wait `delay` before being handled.
    pub fn delay_next(&self, n: u32, delay: Duration) {
        let mut state = self.state();
        state.faults.delay_left = n;
        state.faults.delay = delay;
    }

    /// The next `n` token requests are processed at once (a refresh token is rotated, a code
    /// used up) and their answer is held back for `delay`: the client that gives up meanwhile
    /// never learns what it was issued. Counters move when the request is processed.
    pub fn answer_late(&self, n: u32, delay: Duration) {
        let mut state = self.state();
        state.faults.late_left = n;
        state.faults.late = delay;
    }

    /// The next `n` token requests get 200 with an HTML body instead of JSON. A pending
    /// `fail_next` goes first.
    pub fn garbage_next(&self, n: u32) {
        self.state().faults.garbage_left = n;
    }

    pub fn counters(&self) -> IdentityCounters {
        self.state().counters
    }

    /// Every access, refresh and exchange token and every authorization code this server
    /// ever issued (for leak tests).
    pub fn issued_tokens(&self) -> Vec<String> {
        let state = self.state();
        state
            .access_tokens
            .keys()
            .chain(state.refresh_tokens.keys())
            .chain(state.exchange_tokens.keys())
            .chain(state.codes.keys())
            .cloned()
            .collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not take every other test down.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `path` is one of this server's endpoints (for sharing an origin with an API).
    pub(crate) fn serves(&self, path: &str) -> bool {
        path == self.inner.config.token_path || path == self.inner.config.authorize_path
    }

    /// Record the address it is reachable at when served by someone else's listener.
    pub(crate) fn set_addr(&self, addr: SocketAddr) {
        self.state().addr = Some(addr);
    }

    pub(crate) async fn handle(self, request: Request<Incoming>) -> Response<SimBody> {
        if request.uri().path() == self.inner.config.authorize_path {
            return self.authorize(&request);
        }
        if request.uri().path() != self.inner.config.token_path {
            return status_only(StatusCode::NOT_FOUND);
        }
        let (delay, fault, late) = self.take_faults();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(fault) = fault {
            return fault_response(fault);
        }
        let response = match self.token_endpoint(request).await {
            Ok(response) => response,
            Err(error) if self.inner.config.all_errors_400 => error.into_400().into_response(),
            Err(error) => error.into_response(),
        };
        if let Some(late) = late {
            tokio::time::sleep(late).await;
        }
        response
    }

    /// Counts the request and decides, under one lock, which injected faults apply to it: a
    /// delay before it is handled, an answer instead of handling it, a delay after.
    fn take_faults(&self) -> (Option<Duration>, Option<Fault>, Option<Duration>) {
        let mut state = self.state();
        state.counters.token_requests += 1;
        let faults = &mut state.faults;
        let delay = take_one(&mut faults.delay_left).then_some(faults.delay);
        let late = take_one(&mut faults.late_left).then_some(faults.late);
        let fault = if take_one(&mut faults.fail_left) {
            Some(Fault::Fail(faults.fail_status))
        } else if take_one(&mut faults.garbage_left) {
            Some(Fault::Garbage)
        } else {
            None
        };
        if fault.is_some() {
            state.counters.failures_injected += 1;
        }
        (delay, fault, late)
    }

    async fn token_endpoint(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<SimBody>, OAuthError> {
        if request.method() != Method::POST {
            return Err(OAuthError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "the token endpoint accepts POST only",
            ));
        }
        check_content_type(request.headers())?;
        let config = &self.inner.config;
        if config.winbooks {
            check_accepts_json(request.headers())?;
        }
        let (parts, body) = request.into_parts();
        let body = read_body(body).await?;
        let params = parse_form(&body)?;
        if config.winbooks {
            authenticate_winbooks(config, &parts.headers, &params)?;
            return match params.get("grant_type").map(String::as_str) {
                None => Err(invalid_request("grant_type is required")),
                Some("exchange_token") => self.exchange(&params),
                Some("refresh_token") => {
                    if params.contains_key("refresh_token") {
                        return Err(invalid_request(
                            "WinBooks takes the refresh token in the code field",
                        ));
                    }
                    let presented = required(&params, "code")?;
                    self.refresh(presented, None)
                }
                Some(other) => Err(unsupported_grant_type(other)),
            };
        }
        let grant_type = params.get("grant_type").map(String::as_str);
        if grant_type == Some("authorization_code")
            && config.public_client_ok
            && is_public_client(&parts.headers, &params)?
        {
            if params.get("client_id") != Some(&config.client_id) {
                return Err(OAuthError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_client",
                    "unknown client_id",
                ));
            }
        } else {
            authenticate_client(config, &parts.headers, &params)?;
        }
        match grant_type {
            None => Err(invalid_request("grant_type is required")),
            // The only client there is; authenticate_client checked that it is this one.
            Some("authorization_code") => self.authorization_code(&config.client_id, &params),
            Some("refresh_token") => {
                let presented = required(&params, "refresh_token")?;
                self.refresh(presented, params.get("scope"))
            }
            Some("client_credentials") => Ok(self.client_credentials(&params)),
            Some("password") if !config.users.is_empty() => self.password(&params),
            Some(other) => Err(unsupported_grant_type(other)),
        }
    }

    /// RFC 6749 §6.
    fn refresh(
        &self,
        presented: &str,
        scope: Option<&String>,
    ) -> Result<Response<SimBody>, OAuthError> {
        let config = &self.inner.config;
        let mut state = self.state();
        let Some(entry) = state.refresh_tokens.get(presented).copied() else {
            return Err(invalid_grant("unknown refresh token"));
        };
        if entry.rotated_away {
            // A retired token coming back means two parties hold the grant: revoke it all.
            state.counters.reuse_detected += 1;
            state.revoke(entry.grant);
            return Err(invalid_grant(
                "refresh token was already used; grant revoked",
            ));
        }
        if state.grants[entry.grant].revoked {
            return Err(invalid_grant("grant revoked"));
        }
        if entry
            .expires_at
            .is_some_and(|expires_at| Instant::now() >= expires_at)
        {
            return Err(if config.spring_errors {
                // Spring's DefaultTokenServices puts the token itself in the message, and its
                // exception translator copies the message into the challenge.
                let description = format!("Invalid refresh token (expired): {presented}");
                let challenge =
                    format!(r#"Bearer error="invalid_token", error_description="{description}""#);
                OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_token", description)
                    .with_challenge(challenge)
            } else {
                invalid_grant("refresh token expired")
            });
        }
        let refresh_token = match config.rotation {
            Rotation::Reuse => presented.to_owned(),
            Rotation::Strict => {
                if let Some(old) = state.refresh_tokens.get_mut(presented) {
                    old.rotated_away = true;
                }
                state.new_refresh_token(entry.grant, config.refresh_lifetime)
            }
        };
        let access_token = state.new_access_token(config.access_lifetime);
        state.counters.refreshes += 1;
        state.counters.issued += 1;
        drop(state);
        Ok(self.token_response(access_token, Some(refresh_token), scope))
    }

    /// RFC 6749 §4.1.1-4.1.2 and RFC 7636 §4.4: checks the request, then the simulated user
    /// consents at once (or denies, after [`deny_next_authorization`](Self::deny_next_authorization)).
    /// Without a trustworthy client and redirect URI the answer is an error page; after that,
    /// errors go back to the client by redirect.
    fn authorize(&self, request: &Request<Incoming>) -> Response<SimBody> {
        let config = &self.inner.config;
        let query = request.uri().query().unwrap_or_default();
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        self.state().last_authorize_params = pairs.clone();
        if request.method() != Method::GET {
            let mut response = error_page(
                StatusCode::METHOD_NOT_ALLOWED,
                "the authorization endpoint accepts GET only",
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            return response;
        }
        // RFC 6749 §3.1: no parameter twice, and one without a value counts as omitted.
        let mut params = Params::new();
        let mut repeated = Vec::new();
        for (name, value) in pairs {
            match params.entry(name) {
                Entry::Occupied(entry) => repeated.push(entry.key().clone()),
                Entry::Vacant(entry) => {
                    entry.insert(value);
                }
            }
        }
        params.retain(|_, value| !value.is_empty());

        // §4.1.2.1: never redirect to a URI that is not known to belong to the client.
        if repeated
            .iter()
            .any(|name| name == "client_id" || name == "redirect_uri")
        {
            return error_page(
                StatusCode::BAD_REQUEST,
                "client_id and redirect_uri may each be sent only once",
            );
        }
        match params.get("client_id") {
            None => return error_page(StatusCode::BAD_REQUEST, "client_id is required"),
            Some(id) if *id != config.client_id => {
                return error_page(StatusCode::BAD_REQUEST, "unknown client_id")
            }
            Some(_) => {}
        }
        let Some(redirect_uri) = params.get("redirect_uri") else {
            return error_page(StatusCode::BAD_REQUEST, "redirect_uri is required");
        };
        if !config.redirect_uris.contains(redirect_uri) || redirect_uri.contains('#') {
            return error_page(
                StatusCode::BAD_REQUEST,
                "redirect_uri is not registered for this client",
            );
        }

        let state = params.get("state").map(String::as_str);
        let fail = |error: &str| {
            let mut answer = vec![("error", error)];
            answer.extend(state.map(|state| ("state", state)));
            redirect(redirect_uri, &answer)
        };
        if !repeated.is_empty() {
            return fail("invalid_request");
        }
        match params.get("response_type").map(String::as_str) {
            None => return fail("invalid_request"),
            Some("code") => {}
            Some(_) => return fail("unsupported_response_type"),
        }
        // RFC 7636 §4.4.1: PKCE is required here, and only S256 (a missing method means
        // `plain`, §4.3).
        let Some(challenge) = params.get("code_challenge") else {
            return fail("invalid_request");
        };
        if params.get("code_challenge_method").map(String::as_str) != Some("S256")
            || !is_s256_challenge(challenge)
        {
            return fail("invalid_request");
        }

        let code = random_token("code_");
        {
            let mut sim_state = self.state();
            if std::mem::take(&mut sim_state.deny_next_authorization) {
                drop(sim_state);
                return fail("access_denied");
            }
            let entry = AuthCode {
                client_id: config.client_id.clone(),
                redirect_uri: redirect_uri.clone(),
                code_challenge: challenge.clone(),
                scope: params.get("scope").cloned(),
                expires_at: Instant::now() + CODE_LIFETIME,
                used: false,
                grant: None,
            };
            sim_state.codes.insert(code.clone(), entry);
        }
        let mut answer = vec![("code", code.as_str())];
        answer.extend(state.map(|state| ("state", state)));
        redirect(redirect_uri, &answer)
    }

    /// RFC 6749 §4.1.3 with the PKCE check of RFC 7636 §4.6. A code is used up by the first
    /// request that presents it; presenting it again revokes the grant it started (§4.1.2).
    fn authorization_code(
        &self,
        client_id: &str,
        params: &Params,
    ) -> Result<Response<SimBody>, OAuthError> {
        let config = &self.inner.config;
        let presented = required(params, "code")?;
        let redirect_uri = required(params, "redirect_uri")?;
        let verifier = required(params, "code_verifier")?;
        let mut state = self.state();
        let Some(entry) = state.codes.get_mut(presented) else {
            return Err(invalid_grant("unknown authorization code"));
        };
        if entry.used {
            let grant = entry.grant;
            state.counters.reuse_detected += 1;
            return Err(match grant {
                Some(grant) => {
                    state.revoke(grant);
                    invalid_grant("authorization code was already used; grant revoked")
                }
                None => invalid_grant("authorization code was already used"),
            });
        }
        entry.used = true;
        let code = entry.clone();
        if Instant::now() >= code.expires_at {
            return Err(invalid_grant("authorization code expired"));
        }
        if code.client_id != client_id {
            return Err(invalid_grant(
                "authorization code was issued to another client",
            ));
        }
        if code.redirect_uri != *redirect_uri {
            return Err(invalid_grant(
                "redirect_uri differs from the authorization request",
            ));
        }
        if !is_code_verifier(verifier) {
            return Err(invalid_grant(
                "code_verifier must be 43 to 128 characters of [A-Za-z0-9-._~]",
            ));
        }
        if s256(verifier) != code.code_challenge {
            return Err(invalid_grant("code_verifier does not match code_challenge"));
        }
        let grant = state.new_grant();
        if let Some(entry) = state.codes.get_mut(presented) {
            entry.grant = Some(grant);
        }
        let refresh_token = state.new_refresh_token(grant, config.refresh_lifetime);
        let access_token = state.new_access_token(config.access_lifetime);
        state.counters.authorization_codes += 1;
        state.counters.issued += 1;
        drop(state);
        Ok(self.token_response(access_token, Some(refresh_token), code.scope.as_ref()))
    }

    /// RFC 6749 §4.3: right credentials start a new grant.
    fn password(&self, params: &Params) -> Result<Response<SimBody>, OAuthError> {
        let config = &self.inner.config;
        let username = required(params, "username")?;
        let password = required(params, "password")?;
        if !config
            .users
            .iter()
            .any(|(user, secret)| user == username && secret == password)
        {
            return Err(invalid_grant("Bad credentials"));
        }
        let mut state = self.state();
        let grant = state.new_grant();
        let refresh_token = state.new_refresh_token(grant, config.refresh_lifetime);
        let access_token = state.new_access_token(config.access_lifetime);
        state.counters.password_grants += 1;
        state.counters.issued += 1;
        drop(state);
        Ok(self.token_response(access_token, Some(refresh_token), params.get("scope")))
    }

    /// WinBooks: a valid exchange token in `code` starts a new grant. The exchange token
    /// stays valid.
    fn exchange(&self, params: &Params) -> Result<Response<SimBody>, OAuthError> {
        let config = &self.inner.config;
        let presented = required(params, "code")?;
        let mut state = self.state();
        match state.exchange_tokens.get(presented) {
            None => return Err(invalid_grant("unknown exchange token")),
            Some(true) => return Err(invalid_grant("exchange token revoked")),
            Some(false) => {}
        }
        let grant = state.new_grant();
        let refresh_token = state.new_refresh_token(grant, config.refresh_lifetime);
        let access_token = state.new_access_token(config.access_lifetime);
        state.counters.exchanges += 1;
        state.counters.issued += 1;
        drop(state);
        Ok(self.token_response(access_token, Some(refresh_token), None))
    }

    /// RFC 6749 §4.4: no refresh token in the answer.
    fn client_credentials(&self, params: &Params) -> Response<SimBody> {
        let mut state = self.state();
        let access_token = state.new_access_token(self.inner.config.access_lifetime);
        state.counters.client_credentials += 1;
        state.counters.issued += 1;
        drop(state);
        self.token_response(access_token, None, params.get("scope"))
    }

    /// RFC 6749 §5.1.
    fn token_response(
        &self,
        access_token: String,
        refresh_token: Option<String>,
        scope: Option<&String>,
    ) -> Response<SimBody> {
        let config = &self.inner.config;
        let seconds = config.access_lifetime.as_secs();
        let expires_in = if config.expires_in_as_string || config.winbooks {
            json!(seconds.to_string())
        } else {
            json!(seconds)
        };
        let token_type = if config.winbooks {
            "bearer"
        } else {
            &config.token_type
        };
        let mut body = json!({
            "access_token": access_token,
            "token_type": token_type,
            "expires_in": expires_in,
        });
        if let Some(refresh_token) = refresh_token {
            body["refresh_token"] = json!(refresh_token);
        }
        if config.winbooks {
            body["scope"] = serde_json::Value::Null;
        } else if let Some(scope) = scope {
            body["scope"] = json!(scope);
        }
        json_response(StatusCode::OK, &body)
    }
}

impl State {
    fn new_grant(&mut self) -> usize {
        self.grants.push(Grant { revoked: false });
        self.grants.len() - 1
    }

    fn new_refresh_token(&mut self, grant: usize, lifetime: Option<Duration>) -> String {
        let token = random_token("rt_");
        let entry = RefreshToken {
            grant,
            rotated_away: false,
            expires_at: lifetime.map(|lifetime| Instant::now() + lifetime),
        };
        self.refresh_tokens.insert(token.clone(), entry);
        token
    }

    fn new_access_token(&mut self, lifetime: Duration) -> String {
        let token = random_token("at_");
        self.access_tokens
            .insert(token.clone(), Instant::now() + lifetime);
        token
    }

    fn revoke(&mut self, grant: usize) {
        if !self.grants[grant].revoked {
            self.grants[grant].revoked = true;
            self.counters.grants_revoked += 1;
        }
    }
}

/// Decrements `left` and says whether there was one to take.
fn take_one(left: &mut u32) -> bool {
    let had_one = *left > 0;
    *left = left.saturating_sub(1);
    had_one
}

/// `prefix` followed by 256 random bits, base64url without padding (43 characters).
fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

type Params = HashMap<String, String>;

/// A parameter the request must carry (RFC 6749 §5.2: `invalid_request` when it does not).
fn required<'a>(params: &'a Params, name: &str) -> Result<&'a String, OAuthError> {
    params
        .get(name)
        .ok_or_else(|| invalid_request(format!("{name} is required")))
}

/// `BASE64URL-NOPAD(SHA256(verifier))`, RFC 7636 §4.2.
fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// RFC 7636 §4.1: 43 to 128 characters of the unreserved set.
fn is_code_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// An S256 challenge is a SHA-256 digest in unpadded base64url: 43 characters, 32 bytes.
fn is_s256_challenge(challenge: &str) -> bool {
    challenge.len() == 43
        && URL_SAFE_NO_PAD
            .decode(challenge)
            .is_ok_and(|digest| digest.len() == 32)
}

/// Whether a token request comes from a public client: `client_id` in the body and no
/// client authentication at all.
fn is_public_client(headers: &HeaderMap, params: &Params) -> Result<bool, OAuthError> {
    Ok(basic_header(headers)?.is_none()
        && params.contains_key("client_id")
        && !params.contains_key("client_secret"))
}

/// An error answer per RFC 6749 §5.2.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
    /// A `WWW-Authenticate` value replacing the default one [`json_response`] adds on 401.
    challenge: Option<String>,
}

impl OAuthError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status,
            code,
            description: description.into(),
            challenge: None,
        }
    }

    fn with_challenge(mut self, challenge: String) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// The same error answered with 400 and no challenge, as ERP.net does.
    fn into_400(mut self) -> Self {
        self.status = StatusCode::BAD_REQUEST;
        self.challenge = None;
        self
    }

    fn into_response(self) -> Response<SimBody> {
        let body = json!({"error": self.code, "error_description": self.description});
        let mut response = json_response(self.status, &body);
        if let Some(challenge) = self.challenge {
            let value = HeaderValue::try_from(challenge).expect("challenges are visible ASCII");
            response.headers_mut().insert(WWW_AUTHENTICATE, value);
        }
        response
    }
}

fn invalid_request(description: impl Into<String>) -> OAuthError {
    OAuthError::new(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn invalid_grant(description: &str) -> OAuthError {
    OAuthError::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn unsupported_grant_type(grant_type: &str) -> OAuthError {
    OAuthError::new(
        StatusCode::BAD_REQUEST,
        "unsupported_grant_type",
        format!("grant_type {grant_type:?} is not supported"),
    )
}

/// 401 `invalid_client`; the challenge is added by [`json_response`].
fn unauthorized_client(description: &str) -> OAuthError {
    OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
}

/// JSON with the headers every token endpoint answer carries. Headers that HTTP requires for
/// a status (a challenge on 401, `Allow` on 405) are added here so no path can forget them.
fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<SimBody> {
    let mut response = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CACHE_CONTROL, "no-store")
        .header(PRAGMA, "no-cache");
    if status == StatusCode::UNAUTHORIZED {
        response = response.header(WWW_AUTHENTICATE, r#"Basic realm="sim""#);
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response = response.header(ALLOW, "POST");
    }
    response
        .body(full_body(body.to_string()))
        .expect("static headers are valid")
}

/// The authorization endpoint's answer when it cannot redirect: a page for the user.
fn error_page(status: StatusCode, message: &str) -> Response<SimBody> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(CACHE_CONTROL, "no-store")
        .body(full_body(format!("Authorization failed: {message}\n")))
        .expect("static headers are valid")
}

/// 302 to `redirect_uri` with `params` added to its query (RFC 6749 §4.1.2).
fn redirect(redirect_uri: &str, params: &[(&str, &str)]) -> Response<SimBody> {
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    let separator = match redirect_uri.find('?') {
        None => "?",
        Some(_) if redirect_uri.ends_with(['?', '&']) => "",
        Some(_) => "&",
    };
    let Ok(location) = HeaderValue::try_from(format!("{redirect_uri}{separator}{query}")) else {
        return error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the registered redirect_uri cannot be sent in a header",
        );
    };
    Response::builder()
        .status(StatusCode::FOUND)
        .header(LOCATION, location)
        .header(CACHE_CONTROL, "no-store")
        .body(empty_body())
        .expect("static headers are valid")
}

fn status_only(status: StatusCode) -> Response<SimBody> {
    let mut response = Response::new(empty_body());
    *response.status_mut() = status;
    response
}

fn fault_response(fault: Fault) -> Response<SimBody> {
    match fault {
        Fault::Garbage => Response::builder()
            .header(CONTENT_TYPE, "text/html")
            .body(full_body(
                "<html><body>Service temporarily unavailable</body></html>",
            ))
            .expect("static headers are valid"),
        Fault::Fail(status) => {
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(|s| !s.is_informational())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status.is_client_error() {
                let error = OAuthError::new(status, "temporarily_unavailable", "injected failure");
                return error.into_response();
            }
            // Gateways in front of identity servers answer 5xx with text or HTML, not JSON.
            Response::builder()
                .status(status)
                .header(CONTENT_TYPE, "text/plain")
                .body(full_body("injected failure\n"))
                .expect("static headers are valid")
        }
    }
}

/// RFC 6749 §3.2 requires `application/x-www-form-urlencoded`; parameters such as
/// `charset` are allowed after it.
fn check_content_type(headers: &HeaderMap) -> Result<(), OAuthError> {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(invalid_request(
            "exactly one Content-Type header is required",
        ));
    };
    let media_type = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    if media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(invalid_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ))
    }
}

/// WinBooks answers JSON only to a request that asks for it: some `Accept` header must list
/// `application/json` (wildcards do not count).
fn check_accepts_json(headers: &HeaderMap) -> Result<(), OAuthError> {
    let accepts_json = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|range| range.split(';').next())
        .any(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"));
    if accepts_json {
        Ok(())
    } else {
        Err(invalid_request("Accept: application/json is required"))
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, OAuthError> {
    match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(OAuthError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            format!("request body exceeds {BODY_LIMIT} bytes"),
        )),
        Err(_) => Err(invalid_request("could not read the request body")),
    }
}

/// Parses the form body. RFC 6749 §3.2: a parameter may not appear twice, and one sent
/// without a value counts as omitted.
fn parse_form(body: &[u8]) -> Result<Params, OAuthError> {
    let mut params = Params::new();
    for (name, value) in form_urlencoded::parse(body) {
        if params
            .insert(name.to_string(), value.into_owned())
            .is_some()
        {
            return Err(invalid_request(format!("parameter {name:?} is repeated")));
        }
    }
    params.retain(|_, value| !value.is_empty());
    Ok(params)
}

/// RFC 6749 §2.3: exactly one authentication method, and the one the config allows.
fn authenticate_client(
    config: &IdentityConfig,
    headers: &HeaderMap,
    params: &Params,
) -> Result<(), OAuthError> {
    let basic = basic_header(headers)?;
    let body_secret = params.get("client_secret");
    if basic.is_some() && body_secret.is_some() {
        return Err(invalid_request(
            "the client authenticated with both HTTP Basic and the request body",
        ));
    }
    if let Some(encoded) = basic {
        if config.client_auth == ClientAuthRule::Post {
            return Err(unauthorized_client(
                "HTTP Basic client authentication is not allowed",
            ));
        }
        let (id, secret) = decode_basic(encoded)?;
        if params
            .get("client_id")
            .is_some_and(|body_id| *body_id != id)
        {
            return Err(invalid_request(
                "client_id in the body differs from HTTP Basic",
            ));
        }
        if id != config.client_id || secret != config.client_secret {
            return Err(unauthorized_client("client authentication failed"));
        }
        return Ok(());
    }
    let Some(secret) = body_secret else {
        // RFC 6749 §5.2: 401 only when the client could have used the Authorization header.
        return Err(match config.client_auth {
            ClientAuthRule::Post => OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                "no client authentication",
            ),
            _ => unauthorized_client("no client authentication"),
        });
    };
    if config.client_auth == ClientAuthRule::Basic {
        return Err(unauthorized_client(
            "client credentials in the request body are not allowed",
        ));
    }
    let id = params
        .get("client_id")
        .ok_or_else(|| invalid_request("client_secret without client_id"))?;
    if *id != config.client_id || *secret != config.client_secret {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "client authentication failed",
        ));
    }
    Ok(())
}

/// WinBooks: `Authorization: Basic base64(EMAIL)`, the e-mail alone and not form-encoded,
/// equal to `client_id`. A `user:password` pair (what a standard Basic helper sends, even
/// with an empty password) is refused, and so are credentials in the body.
fn authenticate_winbooks(
    config: &IdentityConfig,
    headers: &HeaderMap,
    params: &Params,
) -> Result<(), OAuthError> {
    if params.contains_key("client_secret") {
        return Err(invalid_request(
            "WinBooks clients authenticate with HTTP Basic only",
        ));
    }
    let Some(encoded) = basic_header(headers)? else {
        return Err(unauthorized_client("no client authentication"));
    };
    let malformed = || unauthorized_client("malformed HTTP Basic credentials");
    let decoded = STANDARD.decode(encoded).map_err(|_| malformed())?;
    let email = String::from_utf8(decoded).map_err(|_| malformed())?;
    if email.contains(':') {
        return Err(unauthorized_client(
            "HTTP Basic must carry the e-mail alone, without a colon",
        ));
    }
    if params
        .get("client_id")
        .is_some_and(|body_id| *body_id != email)
    {
        return Err(invalid_request(
            "client_id in the body differs from HTTP Basic",
        ));
    }
    if email != config.client_id {
        return Err(unauthorized_client("client authentication failed"));
    }
    Ok(())
}

/// The base64 part of an `Authorization: Basic ...` header, if there is one. Other schemes
/// are not client authentication and are ignored.
fn basic_header(headers: &HeaderMap) -> Result<Option<&str>, OAuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(invalid_request("more than one Authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| invalid_request("Authorization header is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, encoded)) if scheme.eq_ignore_ascii_case("basic") => Ok(Some(encoded.trim())),
        _ => Ok(None),
    }
}

/// RFC 6749 §2.3.1: base64, split at the first ':', then form-url-decode each half.
fn decode_basic(encoded: &str) -> Result<(String, String), OAuthError> {
    let malformed = || unauthorized_client("malformed HTTP Basic credentials");
    let decoded = STANDARD.decode(encoded).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    Ok((
        form_decode(id).ok_or_else(malformed)?,
        form_decode(secret).ok_or_else(malformed)?,
    ))
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space, then
/// percent-decoding. None if the result is not UTF-8.
fn form_decode(value: &str) -> Option<String> {
    let spaced = value.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use http_body_util::Full;

    /// The form-encoding RFC 6749 §2.3.1 asks for before base64.
    fn form_encode(value: &str) -> String {
        form_urlencoded::byte_serialize(value.as_bytes()).collect()
    }

    fn basic(id: &str, secret: &str) -> String {
        let joined = format!("{}:{}", form_encode(id), form_encode(secret));
        format!("Basic {}", STANDARD.encode(joined))
    }

    fn post_credentials() -> &'static str {
        "client_id=tollgate-test&client_secret=s3cret"
    }

    fn form_request(sim: &IdentitySim) -> http::request::Builder {
        Request::post(sim.token_url()).header(CONTENT_TYPE, "application/x-www-form-urlencoded")
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        json: serde_json::Value,
        text: String,
    }

    async fn call(request: Request<Full<Bytes>>) -> Answer {
        let (parts, body) = send(&client(), request).await;
        Answer {
            status: parts.status,
            headers: parts.headers,
            json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            text: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// POSTs `form` with the default client's credentials in the body.
    async fn post(sim: &IdentitySim, form: &str) -> Answer {
        let body = format!("{form}&{}", post_credentials());
        call(form_request(sim).body(Full::from(body)).unwrap()).await
    }

    async fn refresh(sim: &IdentitySim, refresh_token: &str) -> Answer {
        post(
            sim,
            &format!("grant_type=refresh_token&refresh_token={refresh_token}"),
        )
        .await
    }

    async fn start(config: IdentityConfig) -> (IdentitySim, SimServer) {
        IdentitySim::start(config).await
    }

    /// Strict rotation: each refresh gives a new token, the old one is refused, and presenting
    /// it revokes the grant so even the newest token fails.
    #[tokio::test]
    async fn strict_rotation_revokes_grant_on_reuse() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let seed = sim.issue_refresh_token();
        assert!(seed.starts_with("rt_") && seed.len() >= 35);

        let first = refresh(&sim, &seed).await;
        assert_eq!(first.status, 200, "{}", first.text);
        let newer = first.json["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(newer, seed);
        let access = first.json["access_token"].as_str().unwrap();
        assert!(access.starts_with("at_"));
        assert_eq!(sim.validate_access(access), Ok(()));

        let reused = refresh(&sim, &seed).await;
        assert_eq!(reused.status, 400);
        assert_eq!(reused.json["error"], "invalid_grant");

        let newest = refresh(&sim, &newer).await;
        assert_eq!(newest.status, 400);
        assert_eq!(newest.json["error"], "invalid_grant");

        let counters = sim.counters();
        assert_eq!(counters.reuse_detected, 1);
        assert_eq!(counters.grants_revoked, 1);
        assert_eq!(counters.refreshes, 1);
        assert_eq!(counters.issued, 1);
        assert_eq!(counters.token_requests, 3);
    }

    /// Reuse mode hands back the same refresh token, which keeps working.
    #[tokio::test]
    async fn reuse_mode_returns_same_refresh_token() {
        let config = IdentityConfig {
            rotation: Rotation::Reuse,
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let seed = sim.issue_refresh_token();
        for _ in 0..3 {
            let answer = refresh(&sim, &seed).await;
            assert_eq!(answer.status, 200, "{}", answer.text);
            assert_eq!(answer.json["refresh_token"], seed.as_str());
        }
        assert_eq!(sim.counters().refreshes, 3);
        assert_eq!(sim.counters().reuse_detected, 0);
    }

    /// A success carries the RFC 6749 §5.1 fields and cache headers; expires_in is a number.
    #[tokio::test]
    async fn success_has_no_store_headers_and_numeric_expiry() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let answer = refresh(&sim, &sim.issue_refresh_token()).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
        assert_eq!(answer.headers[CACHE_CONTROL], "no-store");
        assert_eq!(answer.headers[PRAGMA], "no-cache");
        assert_eq!(answer.json["token_type"], "Bearer");
        assert_eq!(answer.json["expires_in"], 3600);
        assert!(answer.json.get("scope").is_none());
    }

    /// expires_in_as_string sends "900" instead of 900, as WinBooks does.
    #[tokio::test]
    async fn expires_in_as_string() {
        let config = IdentityConfig {
            expires_in_as_string: true,
            access_lifetime: Duration::from_secs(900),
            token_type: "bearer".to_owned(),
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let answer = refresh(&sim, &sim.issue_refresh_token()).await;
        assert_eq!(answer.json["expires_in"], "900");
        assert_eq!(answer.json["token_type"], "bearer");
    }

    /// client_credentials issues an access token and no refresh token; scope is echoed.
    #[tokio::test]
    async fn client_credentials_has_no_refresh_token() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let answer = post(&sim, "grant_type=client_credentials&scope=read+update").await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert!(answer.json.get("refresh_token").is_none());
        assert_eq!(answer.json["scope"], "read update");
        assert_eq!(sim.counters().client_credentials, 1);
    }

    /// Basic and body credentials in one request are refused as invalid_request.
    #[tokio::test]
    async fn both_auth_methods_is_invalid_request() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let body = format!("grant_type=client_credentials&{}", post_credentials());
        let request = form_request(&sim)
            .header(AUTHORIZATION, basic("tollgate-test", "s3cret"))
            .body(Full::from(body))
            .unwrap();
        let answer = call(request).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_request");
    }

    /// A parameter sent twice is invalid_request (RFC 6749 §3.2).
    #[tokio::test]
    async fn duplicate_parameter_is_invalid_request() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let answer = post(&sim, "grant_type=client_credentials&scope=a&scope=b").await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_request");
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
    }

    /// JSON or a missing Content-Type is refused; a charset parameter is fine.
    #[tokio::test]
    async fn wrong_content_type_is_invalid_request() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let body = format!("grant_type=client_credentials&{}", post_credentials());
        for content_type in [Some("application/json"), None] {
            let mut request = Request::post(sim.token_url());
            if let Some(content_type) = content_type {
                request = request.header(CONTENT_TYPE, content_type);
            }
            let answer = call(request.body(Full::from(body.clone())).unwrap()).await;
            assert_eq!(answer.status, 400, "{content_type:?}");
            assert_eq!(answer.json["error"], "invalid_request");
        }
        let request = Request::post(sim.token_url())
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=UTF-8",
            )
            .body(Full::from(body))
            .unwrap();
        assert_eq!(call(request).await.status, 200);
    }

    /// Basic credentials are form-decoded after base64 (RFC 6749 §2.3.1); sending them
    /// unencoded fails with 401 and a Basic challenge.
    #[tokio::test]
    async fn basic_auth_form_decodes_credentials() {
        let config = IdentityConfig {
            client_id: "my.app/first".to_owned(),
            client_secret: "a+b/c%d&e=f".to_owned(),
            client_auth: ClientAuthRule::Basic,
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let encoded = basic("my.app/first", "a+b/c%d&e=f");
        assert_eq!(
            encoded,
            format!(
                "Basic {}",
                STANDARD.encode("my.app%2Ffirst:a%2Bb%2Fc%25d%26e%3Df")
            )
        );
        let form = "grant_type=client_credentials";
        let request = form_request(&sim)
            .header(AUTHORIZATION, encoded)
            .body(Full::from(form))
            .unwrap();
        let answer = call(request).await;
        assert_eq!(answer.status, 200, "{}", answer.text);

        let naive = format!("Basic {}", STANDARD.encode("my.app/first:a+b/c%d&e=f"));
        let request = form_request(&sim)
            .header(AUTHORIZATION, naive)
            .body(Full::from(form))
            .unwrap();
        let answer = call(request).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json["error"], "invalid_client");
        assert_eq!(answer.headers[WWW_AUTHENTICATE], r#"Basic realm="sim""#);
    }

    /// Wrong body credentials give 400 invalid_client; a disallowed method gives 401.
    #[tokio::test]
    async fn client_auth_failures() {
        let (sim, _server) = start(IdentityConfig {
            client_auth: ClientAuthRule::Post,
            ..IdentityConfig::default()
        })
        .await;
        let form = "grant_type=client_credentials&client_id=tollgate-test&client_secret=nope";
        let answer = call(form_request(&sim).body(Full::from(form)).unwrap()).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_client");

        let form = "grant_type=client_credentials";
        let request = form_request(&sim)
            .header(AUTHORIZATION, basic("tollgate-test", "s3cret"))
            .body(Full::from(form))
            .unwrap();
        let answer = call(request).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json["error"], "invalid_client");
    }

    /// Unknown grant types, missing parameters and non-POST methods get the RFC's errors.
    #[tokio::test]
    async fn grant_and_method_errors() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let answer = post(&sim, "grant_type=password&username=a&password=b").await;
        assert_eq!(answer.json["error"], "unsupported_grant_type");
        let answer = post(&sim, "grant_type=refresh_token").await;
        assert_eq!(answer.json["error"], "invalid_request");
        let answer = post(&sim, "scope=x").await;
        assert_eq!(answer.json["error"], "invalid_request");
        let answer = refresh(&sim, "rt_unknown").await;
        assert_eq!(answer.json["error"], "invalid_grant");

        let answer = call(Request::get(sim.token_url()).body(Full::default()).unwrap()).await;
        assert_eq!(answer.status, 405);
        assert_eq!(answer.headers[ALLOW], "POST");
    }

    /// A body over the limit is refused with 413 before it is parsed.
    #[tokio::test]
    async fn oversized_body_is_413() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let form = format!(
            "grant_type=client_credentials&pad={}",
            "x".repeat(BODY_LIMIT)
        );
        let answer = post(&sim, &form).await;
        assert_eq!(answer.status, 413);
    }

    /// fail_next answers the given status n times without touching the grant, then recovers.
    #[tokio::test]
    async fn fail_next_then_recovers() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let seed = sim.issue_refresh_token();
        sim.fail_next(2, 503);
        for _ in 0..2 {
            let answer = refresh(&sim, &seed).await;
            assert_eq!(answer.status, 503);
            assert_eq!(answer.headers[CONTENT_TYPE], "text/plain");
        }
        sim.fail_next(1, 429);
        let answer = refresh(&sim, &seed).await;
        assert_eq!(answer.status, 429);
        assert_eq!(answer.json["error"], "temporarily_unavailable");
        // The seed was never consumed, so it still works.
        assert_eq!(refresh(&sim, &seed).await.status, 200);
        assert_eq!(sim.counters().failures_injected, 3);
    }

    /// garbage_next answers 200 with a body that is not JSON.
    #[tokio::test]
    async fn garbage_next_is_not_json() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        sim.garbage_next(1);
        let answer = post(&sim, "grant_type=client_credentials").await;
        assert_eq!(answer.status, 200);
        assert!(answer.json.is_null());
        assert!(answer.text.starts_with("<html>"));
        assert_eq!(
            post(&sim, "grant_type=client_credentials").await.status,
            200
        );
    }

    /// delay_next holds the answer back for the given time.
    #[tokio::test]
    async fn delay_next_delays() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        sim.delay_next(1, Duration::from_millis(150));
        let started = Instant::now();
        assert_eq!(
            post(&sim, "grant_type=client_credentials").await.status,
            200
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    /// answer_late rotates the refresh token at once and holds the answer back: a client
    /// that gave up has lost the new token, and the one it presented is spent.
    #[tokio::test]
    async fn answer_late_rotates_before_it_answers() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let seed = sim.issue_refresh_token();
        sim.answer_late(1, Duration::from_secs(5));
        let gave_up = tokio::time::timeout(Duration::from_millis(200), refresh(&sim, &seed)).await;
        assert!(gave_up.is_err(), "the answer is held back");
        assert_eq!(sim.counters().refreshes, 1, "processed before the answer");
        let again = refresh(&sim, &seed).await;
        assert_eq!(again.json["error"], "invalid_grant");
        assert_eq!(sim.counters().reuse_detected, 1);
    }

    /// expire_access_tokens and revoke_all do what tests rely on.
    #[tokio::test]
    async fn expire_and_revoke() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let seed = sim.issue_refresh_token();
        let answer = refresh(&sim, &seed).await;
        let access = answer.json["access_token"].as_str().unwrap();
        let newer = answer.json["refresh_token"].as_str().unwrap();
        assert_eq!(sim.validate_access(access), Ok(()));
        assert!(sim.validate_access("at_forged").is_err());
        sim.expire_access_tokens();
        assert_eq!(sim.validate_access(access), Err("access token expired"));

        sim.revoke_all();
        assert_eq!(refresh(&sim, newer).await.json["error"], "invalid_grant");
        assert_eq!(sim.counters().grants_revoked, 1);
        assert_eq!(sim.counters().reuse_detected, 0);
    }

    /// The password grant: right credentials start a new grant with a working refresh token;
    /// wrong ones are 400 invalid_grant "Bad credentials"; missing fields are invalid_request.
    #[tokio::test]
    async fn password_grant_right_and_wrong() {
        let config = IdentityConfig {
            users: vec![("ann@example.com".to_owned(), "p+ss w%rd".to_owned())],
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let right = format!(
            "grant_type=password&username={}&password={}&scope=read+write",
            form_encode("ann@example.com"),
            form_encode("p+ss w%rd")
        );
        let answer = post(&sim, &right).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.json["scope"], "read write");
        let access = answer.json["access_token"].as_str().unwrap();
        assert_eq!(sim.validate_access(access), Ok(()));
        let refresh_token = answer.json["refresh_token"].as_str().unwrap();
        assert!(refresh_token.starts_with("rt_"));
        assert_eq!(refresh(&sim, refresh_token).await.status, 200);

        let wrong = "grant_type=password&username=ann%40example.com&password=nope";
        let answer = post(&sim, wrong).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_grant");
        assert_eq!(answer.json["error_description"], "Bad credentials");
        let answer = post(&sim, "grant_type=password&username=nobody&password=p").await;
        assert_eq!(answer.json["error_description"], "Bad credentials");
        let answer = post(&sim, "grant_type=password&username=ann%40example.com").await;
        assert_eq!(answer.json["error"], "invalid_request");
        let answer = post(&sim, "grant_type=implicit").await;
        assert_eq!(answer.json["error"], "unsupported_grant_type");

        let counters = sim.counters();
        assert_eq!(counters.password_grants, 1);
        assert_eq!(counters.refreshes, 1);
        assert_eq!(counters.issued, 2);
    }

    /// The password grant needs client authentication like the other grants.
    #[tokio::test]
    async fn password_grant_authenticates_client() {
        let config = IdentityConfig {
            users: vec![("ann".to_owned(), "pw".to_owned())],
            client_auth: ClientAuthRule::Basic,
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let form = "grant_type=password&username=ann&password=pw";
        let answer = call(form_request(&sim).body(Full::from(form)).unwrap()).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json["error"], "invalid_client");
        let request = form_request(&sim)
            .header(AUTHORIZATION, basic("tollgate-test", "s3cret"))
            .body(Full::from(form))
            .unwrap();
        assert_eq!(call(request).await.status, 200);
        assert_eq!(sim.counters().password_grants, 1);
    }

    /// spring_errors: an expired refresh token is 401 invalid_token with a Bearer challenge,
    /// and the message echoes the token as Spring does.
    #[tokio::test]
    async fn spring_expired_refresh_is_401_invalid_token() {
        let config = IdentityConfig {
            spring_errors: true,
            rotation: Rotation::Reuse,
            refresh_lifetime: Some(Duration::from_secs(30 * 24 * 3600)),
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let seed = sim.issue_refresh_token();
        assert_eq!(refresh(&sim, &seed).await.status, 200);
        sim.expire_refresh_tokens();
        let answer = refresh(&sim, &seed).await;
        assert_eq!(answer.status, 401, "{}", answer.text);
        assert_eq!(answer.json["error"], "invalid_token");
        assert_eq!(
            answer.json["error_description"],
            format!("Invalid refresh token (expired): {seed}")
        );
        let challenge = answer.headers[WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            challenge.starts_with(r#"Bearer error="invalid_token""#),
            "{challenge}"
        );
        assert_eq!(answer.headers.get_all(WWW_AUTHENTICATE).iter().count(), 1);
        // An unknown token is still 400 invalid_grant in this mode.
        let answer = refresh(&sim, "rt_unknown").await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_grant");
        assert_eq!(sim.counters().refreshes, 1);
    }

    /// Without spring_errors an expired refresh token is 400 invalid_grant; refresh_lifetime
    /// expires tokens by age, and tokens issued later are fresh.
    #[tokio::test]
    async fn expired_refresh_is_400_invalid_grant() {
        let config = IdentityConfig {
            refresh_lifetime: Some(Duration::from_millis(100)),
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let old = sim.issue_refresh_token();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let answer = refresh(&sim, &old).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_grant");
        assert!(answer.headers.get(WWW_AUTHENTICATE).is_none());

        let (sim, _server) = start(IdentityConfig::default()).await;
        let seed = sim.issue_refresh_token();
        sim.expire_refresh_tokens();
        let answer = refresh(&sim, &seed).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_grant");
        assert_eq!(refresh(&sim, &sim.issue_refresh_token()).await.status, 200);
    }

    fn winbooks_config() -> IdentityConfig {
        IdentityConfig {
            client_id: "ann+books@example.com".to_owned(),
            winbooks: true,
            access_lifetime: Duration::from_secs(900),
            ..IdentityConfig::default()
        }
    }

    /// A WinBooks token request: Basic with the e-mail alone, Accept: application/json.
    fn winbooks_request(sim: &IdentityConfig, url: &str, form: &str) -> Request<Full<Bytes>> {
        Request::post(url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .header(
                AUTHORIZATION,
                format!("Basic {}", STANDARD.encode(&sim.client_id)),
            )
            .body(Full::from(form.to_owned()))
            .unwrap()
    }

    /// WinBooks: exchange token for access + refresh token, then refresh with `code`; answers
    /// have token_type bearer, scope null and expires_in as a string.
    #[tokio::test]
    async fn winbooks_exchange_then_refresh_with_code() {
        let (sim, _server) = start(winbooks_config()).await;
        let url = sim.token_url();
        let exchange_token = sim.issue_exchange_token();
        assert!(exchange_token.starts_with("ex_"));

        let form = format!("grant_type=exchange_token&code={exchange_token}");
        let answer = call(winbooks_request(sim.config(), &url, &form)).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.json["token_type"], "bearer");
        assert_eq!(answer.json["expires_in"], "900");
        assert!(answer.json["scope"].is_null());
        assert!(answer.json.as_object().unwrap().contains_key("scope"));
        let first = answer.json["refresh_token"].as_str().unwrap().to_owned();

        let form = format!("grant_type=refresh_token&code={first}");
        let answer = call(winbooks_request(sim.config(), &url, &form)).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.json["expires_in"], "900");
        assert!(answer.json["scope"].is_null());
        let second = answer.json["refresh_token"].as_str().unwrap();
        assert_ne!(second, first, "strict rotation by default");
        assert_eq!(
            sim.validate_access(answer.json["access_token"].as_str().unwrap()),
            Ok(())
        );

        // The exchange token is long-lived until revoked.
        let form = format!("grant_type=exchange_token&code={exchange_token}");
        assert_eq!(
            call(winbooks_request(sim.config(), &url, &form))
                .await
                .status,
            200
        );
        sim.revoke_exchange_tokens();
        let answer = call(winbooks_request(sim.config(), &url, &form)).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_grant");
        let form = "grant_type=exchange_token&code=ex_unknown";
        let answer = call(winbooks_request(sim.config(), &url, form)).await;
        assert_eq!(answer.json["error"], "invalid_grant");
        // Other grants do not exist in this dialect.
        let form = "grant_type=client_credentials";
        let answer = call(winbooks_request(sim.config(), &url, form)).await;
        assert_eq!(answer.json["error"], "unsupported_grant_type");

        let counters = sim.counters();
        assert_eq!(counters.exchanges, 2);
        assert_eq!(counters.refreshes, 1);
        assert_eq!(counters.issued, 3);
        assert!(sim.issued_tokens().contains(&exchange_token));
    }

    /// WinBooks: Basic(email) without a colon is accepted; `email:` (a standard Basic helper
    /// with an empty password), a different e-mail or no Basic at all are 401 invalid_client.
    #[tokio::test]
    async fn winbooks_basic_email_without_colon() {
        let (sim, _server) = start(winbooks_config()).await;
        let url = sim.token_url();
        let exchange_token = sim.issue_exchange_token();
        let form = format!("grant_type=exchange_token&code={exchange_token}");
        assert_eq!(
            call(winbooks_request(sim.config(), &url, &form))
                .await
                .status,
            200
        );

        for credentials in [
            "ann+books@example.com:",
            "ann+books@example.com:s3cret",
            "bob@example.com",
        ] {
            let mut request = winbooks_request(sim.config(), &url, &form);
            let header = format!("Basic {}", STANDARD.encode(credentials));
            request
                .headers_mut()
                .insert(AUTHORIZATION, header.parse().unwrap());
            let answer = call(request).await;
            assert_eq!(answer.status, 401, "{credentials}");
            assert_eq!(answer.json["error"], "invalid_client");
        }
        let mut request = winbooks_request(sim.config(), &url, &form);
        request.headers_mut().remove(AUTHORIZATION);
        let answer = call(request).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json["error"], "invalid_client");

        // Body credentials are not the WinBooks way.
        let with_secret = format!("{form}&{}", post_credentials());
        let answer = call(winbooks_request(sim.config(), &url, &with_secret)).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_request");
        assert_eq!(sim.counters().exchanges, 1);
    }

    /// WinBooks: a `refresh_token` field is refused (the token goes in `code`), and so is a
    /// request without `Accept: application/json`; neither consumes the refresh token.
    #[tokio::test]
    async fn winbooks_refuses_refresh_token_field_and_missing_accept() {
        let (sim, _server) = start(winbooks_config()).await;
        let url = sim.token_url();
        let seed = sim.issue_refresh_token();

        let form = format!("grant_type=refresh_token&refresh_token={seed}");
        let answer = call(winbooks_request(sim.config(), &url, &form)).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_request");
        let form = format!("grant_type=refresh_token&code={seed}&refresh_token={seed}");
        let answer = call(winbooks_request(sim.config(), &url, &form)).await;
        assert_eq!(answer.json["error"], "invalid_request");

        let form = format!("grant_type=refresh_token&code={seed}");
        for accept in [None, Some("*/*"), Some("text/xml")] {
            let mut request = winbooks_request(sim.config(), &url, &form);
            request.headers_mut().remove(ACCEPT);
            if let Some(accept) = accept {
                request
                    .headers_mut()
                    .insert(ACCEPT, HeaderValue::from_static(accept));
            }
            let answer = call(request).await;
            assert_eq!(answer.status, 400, "{accept:?}");
            assert_eq!(answer.json["error"], "invalid_request");
        }
        let mut request = winbooks_request(sim.config(), &url, &form);
        request.headers_mut().insert(
            ACCEPT,
            HeaderValue::from_static("text/plain, Application/JSON; q=0.9"),
        );
        let answer = call(request).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.json["expires_in"], "900");
        assert_eq!(sim.counters().refreshes, 1);
        assert_eq!(sim.counters().reuse_detected, 0);
    }

    /// all_errors_400: invalid_client (and the method check) answer 400, never 401 or 405.
    #[tokio::test]
    async fn all_errors_400_makes_invalid_client_400() {
        let config = IdentityConfig {
            client_id: "my.trusted.app/first".to_owned(),
            all_errors_400: true,
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let request = form_request(&sim)
            .header(AUTHORIZATION, basic("my.trusted.app/first", "wrong"))
            .body(Full::from("grant_type=client_credentials"))
            .unwrap();
        let answer = call(request).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_client");
        assert!(answer.headers.get(WWW_AUTHENTICATE).is_none());

        let form = "grant_type=client_credentials";
        let answer = call(form_request(&sim).body(Full::from(form)).unwrap()).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_client");

        let answer = call(Request::get(sim.token_url()).body(Full::default()).unwrap()).await;
        assert_eq!(answer.status, 400);

        let form =
            "grant_type=client_credentials&client_id=my.trusted.app%2Ffirst&client_secret=s3cret";
        let answer = call(form_request(&sim).body(Full::from(form)).unwrap()).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
    }

    /// Other paths are 404, and the endpoint also answers over h2c.
    #[tokio::test]
    async fn other_paths_404_and_h2c_works() {
        let (sim, server) = start(IdentityConfig::default()).await;
        let request = Request::get(format!("{}/other", server.url()))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&client(), request).await.0.status, 404);

        let body = format!("grant_type=client_credentials&{}", post_credentials());
        let request = Request::post(sim.token_url())
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .body(Full::from(body))
            .unwrap();
        let (parts, _) = send(&h2c_client(), request).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.version, http::Version::HTTP_2);
    }

    /// RFC 7636 Appendix B: the verifier and challenge of the specification's example.
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

    /// The challenge for `verifier`, computed here rather than with the code under test.
    fn challenge_of(verifier: &str) -> String {
        URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
    }

    const CALLBACK: &str = "http://127.0.0.1:8765/callback";

    /// A complete, valid authorization request for the default client.
    fn authorize_params(state: &str) -> Vec<(&'static str, String)> {
        vec![
            ("response_type", "code".to_owned()),
            ("client_id", "tollgate-test".to_owned()),
            ("redirect_uri", CALLBACK.to_owned()),
            ("scope", "read write".to_owned()),
            ("state", state.to_owned()),
            ("code_challenge", challenge_of(VERIFIER)),
            ("code_challenge_method", "S256".to_owned()),
        ]
    }

    /// GETs the authorization endpoint with `params` as the query.
    async fn authorize<V: AsRef<str>>(sim: &IdentitySim, params: &[(&str, V)]) -> Answer {
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_ref())))
            .finish();
        let url = format!("{}?{query}", sim.authorize_url());
        call(Request::get(url).body(Full::default()).unwrap()).await
    }

    /// Splits a redirect's `Location` into the part before the added query and the added
    /// parameters.
    fn location(answer: &Answer) -> (String, Vec<(String, String)>) {
        assert_eq!(answer.status, 302, "{}", answer.text);
        let location = answer.headers[LOCATION].to_str().unwrap();
        let (base, query) = location.rsplit_once('?').unwrap();
        let params = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        (base.to_owned(), params)
    }

    fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Authorizes with the default request and returns the code.
    async fn get_code(sim: &IdentitySim) -> String {
        let (_, params) = location(&authorize(sim, &authorize_params("st")).await);
        param(&params, "code").expect("a code").to_owned()
    }

    async fn redeem(sim: &IdentitySim, code: &str, redirect_uri: &str, verifier: &str) -> Answer {
        let form = format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={verifier}",
            form_encode(redirect_uri)
        );
        post(sim, &form).await
    }

    /// The happy path: consent redirects with a single-use code and the state; the code and
    /// the PKCE verifier buy an access token and a working refresh token of a new grant.
    #[tokio::test]
    async fn authorization_code_with_pkce_happy_path() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        assert_eq!(
            challenge_of(VERIFIER),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let mut request = authorize_params("xyz");
        request.push(("prompt", "consent".to_owned()));
        let answer = authorize(&sim, &request).await;
        assert_eq!(answer.headers[CACHE_CONTROL], "no-store");
        let (base, params) = location(&answer);
        assert_eq!(base, CALLBACK);
        assert_eq!(params.len(), 2, "{params:?}");
        let code = param(&params, "code").unwrap().to_owned();
        assert!(code.starts_with("code_") && code.len() >= 40, "{code}");
        assert_eq!(param(&params, "state"), Some("xyz"));
        let expected: Vec<(String, String)> = request
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        assert_eq!(sim.last_authorize_params(), expected);
        assert_eq!(sim.counters().token_requests, 0);

        let answer = redeem(&sim, &code, CALLBACK, VERIFIER).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.headers[CACHE_CONTROL], "no-store");
        assert_eq!(answer.json["scope"], "read write");
        let access = answer.json["access_token"].as_str().unwrap();
        assert_eq!(sim.validate_access(access), Ok(()));
        let refresh_token = answer.json["refresh_token"].as_str().unwrap();
        assert!(refresh_token.starts_with("rt_"));
        let refreshed = refresh(&sim, refresh_token).await;
        assert_eq!(refreshed.status, 200, "{}", refreshed.text);
        assert_ne!(
            refreshed.json["refresh_token"], refresh_token,
            "strict rotation"
        );

        let issued = sim.issued_tokens();
        for token in [access, refresh_token, code.as_str()] {
            assert!(issued.iter().any(|t| t == token), "{token}");
        }
        let counters = sim.counters();
        assert_eq!(counters.authorization_codes, 1);
        assert_eq!(counters.refreshes, 1);
        assert_eq!(counters.issued, 2);
    }

    /// A public client redeems with `client_id` alone while public_client_ok is set; without
    /// it, the request lacks client authentication. Wrong secrets are never "public".
    #[tokio::test]
    async fn authorization_code_public_client() {
        let form = |code: &str, client: &str| {
            format!(
                "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={VERIFIER}&{client}",
                form_encode(CALLBACK)
            )
        };
        let (sim, _server) = start(IdentityConfig {
            client_auth: ClientAuthRule::Basic,
            ..IdentityConfig::default()
        })
        .await;
        let code = get_code(&sim).await;
        let body = form(&code, "client_id=other");
        let answer = call(form_request(&sim).body(Full::from(body)).unwrap()).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_client");
        let body = form(&code, "client_id=tollgate-test&client_secret=wrong");
        let answer = call(form_request(&sim).body(Full::from(body)).unwrap()).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json["error"], "invalid_client");
        // Refused client authentication does not use up the code.
        let body = form(&code, "client_id=tollgate-test");
        let answer = call(form_request(&sim).body(Full::from(body)).unwrap()).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        // Other grants still need client authentication.
        let body = "grant_type=client_credentials&client_id=tollgate-test";
        let answer = call(form_request(&sim).body(Full::from(body)).unwrap()).await;
        assert_eq!(answer.status, 401);

        let (sim, _server) = start(IdentityConfig {
            public_client_ok: false,
            ..IdentityConfig::default()
        })
        .await;
        let code = get_code(&sim).await;
        let body = form(&code, "client_id=tollgate-test");
        let answer = call(form_request(&sim).body(Full::from(body)).unwrap()).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json["error"], "invalid_client");
        let request = form_request(&sim)
            .header(AUTHORIZATION, basic("tollgate-test", "s3cret"))
            .body(Full::from(form(&code, "client_id=tollgate-test")))
            .unwrap();
        let answer = call(request).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(sim.counters().authorization_codes, 1);
    }

    /// A wrong or malformed verifier is invalid_grant, and the failed attempt uses the code
    /// up; missing parameters are invalid_request and do not.
    #[tokio::test]
    async fn authorization_code_wrong_verifier() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let code = get_code(&sim).await;
        let answer = post(
            &sim,
            &format!(
                "grant_type=authorization_code&code={code}&redirect_uri={}",
                form_encode(CALLBACK)
            ),
        )
        .await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_request");
        let other = "x".repeat(43);
        let answer = redeem(&sim, &code, CALLBACK, &other).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_grant");
        let answer = redeem(&sim, &code, CALLBACK, VERIFIER).await;
        assert_eq!(answer.json["error"], "invalid_grant", "the code is used up");

        // Malformed verifiers, each on a fresh code whose challenge it would match.
        for verifier in [
            "short".to_owned(),
            format!("{}!", "a".repeat(43)),
            "a".repeat(129),
        ] {
            let mut request = authorize_params("st");
            request[5].1 = challenge_of(&verifier);
            let (_, params) = location(&authorize(&sim, &request).await);
            let code = param(&params, "code").unwrap();
            let answer = redeem(&sim, code, CALLBACK, &verifier).await;
            assert_eq!(answer.status, 400, "{verifier}");
            assert_eq!(answer.json["error"], "invalid_grant", "{verifier}");
        }
        let answer = redeem(&sim, "code_unknown", CALLBACK, VERIFIER).await;
        assert_eq!(answer.json["error"], "invalid_grant");
        assert_eq!(sim.counters().authorization_codes, 0);
        assert_eq!(sim.counters().reuse_detected, 1);
    }

    /// An unknown client or a redirect_uri that is not registered exactly gets an error page,
    /// never a redirect.
    #[tokio::test]
    async fn authorize_unregistered_redirect_uri_is_400_without_redirect() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let cases: [(usize, Option<&str>); 7] = [
            (2, Some("http://127.0.0.1:8765/callback/")),
            (2, Some("http://127.0.0.1:8766/callback")),
            (2, Some("http://localhost:8765/callback")),
            (2, Some("http://127.0.0.1:8765/callback?x=1")),
            (2, None),
            (1, Some("someone-else")),
            (1, None),
        ];
        for (index, value) in cases {
            let mut request = authorize_params("st");
            match value {
                Some(value) => request[index].1 = value.to_owned(),
                None => {
                    request.remove(index);
                }
            }
            let answer = authorize(&sim, &request).await;
            assert_eq!(answer.status, 400, "{value:?}");
            assert!(answer.headers.get(LOCATION).is_none(), "{value:?}");
            assert!(answer.headers[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain"));
            assert!(answer.text.contains("Authorization failed"));
        }
        // Even a registered redirect_uri sent twice is not trusted.
        let mut request = authorize_params("st");
        request.push(("redirect_uri", CALLBACK.to_owned()));
        let answer = authorize(&sim, &request).await;
        assert_eq!(answer.status, 400);
        assert!(answer.headers.get(LOCATION).is_none());
        assert!(!sim
            .issued_tokens()
            .iter()
            .any(|token| token.starts_with("code_")));
    }

    /// At the token endpoint, redirect_uri must be the one used at /authorize, even if the
    /// other one is registered too.
    #[tokio::test]
    async fn token_redirect_uri_mismatch_is_invalid_grant() {
        let other = "http://127.0.0.1:9000/cb";
        let (sim, _server) = start(IdentityConfig {
            redirect_uris: vec![CALLBACK.to_owned(), other.to_owned()],
            ..IdentityConfig::default()
        })
        .await;
        for presented in [other, "http://127.0.0.1:8765/callback/"] {
            let code = get_code(&sim).await;
            let answer = redeem(&sim, &code, presented, VERIFIER).await;
            assert_eq!(answer.status, 400, "{presented}");
            assert_eq!(answer.json["error"], "invalid_grant");
        }
        let code = get_code(&sim).await;
        let answer = post(
            &sim,
            &format!("grant_type=authorization_code&code={code}&code_verifier={VERIFIER}"),
        )
        .await;
        assert_eq!(answer.json["error"], "invalid_request");
        assert_eq!(
            redeem(&sim, &code, CALLBACK, VERIFIER).await.status,
            200,
            "a missing redirect_uri does not use the code up"
        );
    }

    /// A code presented a second time is invalid_grant and revokes the grant it started:
    /// its refresh token stops working (its access token lives on, like a JWT).
    #[tokio::test]
    async fn authorization_code_reuse_revokes_grant() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let code = get_code(&sim).await;
        let first = redeem(&sim, &code, CALLBACK, VERIFIER).await;
        assert_eq!(first.status, 200, "{}", first.text);
        let refresh_token = first.json["refresh_token"].as_str().unwrap();
        let access = first.json["access_token"].as_str().unwrap();

        let again = redeem(&sim, &code, CALLBACK, VERIFIER).await;
        assert_eq!(again.status, 400);
        assert_eq!(again.json["error"], "invalid_grant");
        let answer = refresh(&sim, refresh_token).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_grant");
        assert_eq!(sim.validate_access(access), Ok(()));

        // Other grants are not affected.
        assert_eq!(refresh(&sim, &sim.issue_refresh_token()).await.status, 200);
        let counters = sim.counters();
        assert_eq!(counters.authorization_codes, 1);
        assert_eq!(counters.reuse_detected, 1);
        assert_eq!(counters.grants_revoked, 1);
    }

    /// An expired code is invalid_grant.
    #[tokio::test]
    async fn expired_authorization_code_is_invalid_grant() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let code = get_code(&sim).await;
        sim.expire_authorization_codes();
        let answer = redeem(&sim, &code, CALLBACK, VERIFIER).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json["error"], "invalid_grant");
        let code = get_code(&sim).await;
        assert_eq!(redeem(&sim, &code, CALLBACK, VERIFIER).await.status, 200);
    }

    /// deny_next_authorization denies exactly one authorization, with the state.
    #[tokio::test]
    async fn deny_next_authorization_redirects_access_denied() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        sim.deny_next_authorization();
        // A request that fails its checks does not consume the switch.
        let mut request = authorize_params("s1");
        request.remove(5);
        let (_, params) = location(&authorize(&sim, &request).await);
        assert_eq!(param(&params, "error"), Some("invalid_request"));

        let answer = authorize(&sim, &authorize_params("s2")).await;
        assert_eq!(answer.status, 302);
        assert_eq!(
            answer.headers[LOCATION],
            format!("{CALLBACK}?error=access_denied&state=s2").as_str()
        );
        let (_, params) = location(&authorize(&sim, &authorize_params("s3")).await);
        assert!(param(&params, "code").is_some());
        assert_eq!(param(&params, "state"), Some("s3"));
    }

    /// The state comes back exactly, encoded; the code is appended with `&` to a redirect_uri
    /// that has a query; without a state there is none in the answer.
    #[tokio::test]
    async fn state_echoed_and_query_appended() {
        let with_query = "http://127.0.0.1:8765/cb?tenant=a%20b";
        let (sim, _server) = start(IdentityConfig {
            redirect_uris: vec![with_query.to_owned()],
            ..IdentityConfig::default()
        })
        .await;
        let state = "a b&c=d/é+%";
        let mut request = authorize_params(state);
        request[2].1 = with_query.to_owned();
        let answer = authorize(&sim, &request).await;
        let header = answer.headers[LOCATION].to_str().unwrap().to_owned();
        assert!(
            header.starts_with(&format!("{with_query}&code=code_")),
            "{header}"
        );
        let (_, params) = location(&answer);
        assert_eq!(param(&params, "tenant"), Some("a b"));
        assert_eq!(param(&params, "state"), Some(state));
        let code = param(&params, "code").unwrap();
        assert_eq!(redeem(&sim, code, with_query, VERIFIER).await.status, 200);

        let request: Vec<_> = request.into_iter().filter(|(k, _)| *k != "state").collect();
        let (_, params) = location(&authorize(&sim, &request).await);
        assert!(param(&params, "code").is_some());
        assert_eq!(param(&params, "state"), None);
    }

    /// With a trustworthy redirect_uri, bad requests go back by redirect with the state:
    /// invalid_request for a missing or non-S256 challenge or a repeated parameter,
    /// unsupported_response_type for anything but `code`. Only GET is accepted.
    #[tokio::test]
    async fn authorize_request_errors_redirect() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let cases: [(usize, Option<&str>, &str); 7] = [
            (5, None, "invalid_request"),
            (
                5,
                Some("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM="),
                "invalid_request",
            ),
            (5, Some("too-short"), "invalid_request"),
            (6, None, "invalid_request"),
            (6, Some("plain"), "invalid_request"),
            (0, Some("token"), "unsupported_response_type"),
            (0, None, "invalid_request"),
        ];
        for (index, value, error) in cases {
            let mut request = authorize_params("keep-me");
            match value {
                Some(value) => request[index].1 = value.to_owned(),
                None => {
                    request.remove(index);
                }
            }
            let (base, params) = location(&authorize(&sim, &request).await);
            assert_eq!(base, CALLBACK);
            assert_eq!(param(&params, "error"), Some(error), "{index} {value:?}");
            assert_eq!(param(&params, "state"), Some("keep-me"));
            assert!(param(&params, "code").is_none());
        }
        let mut request = authorize_params("keep-me");
        request.push(("scope", "admin".to_owned()));
        let (_, params) = location(&authorize(&sim, &request).await);
        assert_eq!(param(&params, "error"), Some("invalid_request"));
        assert_eq!(sim.last_authorize_params().len(), 8);

        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(authorize_params("st"))
            .finish();
        let request = Request::post(format!("{}?{query}", sim.authorize_url()))
            .body(Full::default())
            .unwrap();
        let answer = call(request).await;
        assert_eq!(answer.status, 405);
        assert_eq!(answer.headers[ALLOW], "GET");
        assert!(sim.issued_tokens().is_empty());
    }
}
