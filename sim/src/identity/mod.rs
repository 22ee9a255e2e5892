//! A simulated OAuth2 identity server: a token endpoint strict per RFC 6749 §§2.3, 3.2, 4.1,
//! 4.3, 4.4, 5 and 6, and an authorization endpoint for the authorization-code grant with
//! PKCE S256 only (RFC 6749 §4.1, RFC 7636), with switches for the dialects of the providers
//! in `docs/providers.md`.
//!
//! Owns: the configuration; the state every part shares (the grants, authorization codes,
//! refresh, access and exchange tokens it issued); serving, and sending each request to its
//! endpoint; the control API on tokens and grants; and counters for tests. The rest lives
//! beside it, one seam a file:
//! - `token`: the token endpoint and its grants (refresh, client credentials, password,
//!   WinBooks exchange).
//! - `authorize`: the authorization-code grant: the authorization endpoint, its codes, PKCE,
//!   redeeming a code, and the switches tests use on it.
//! - `client_auth`: client authentication at the token endpoint.
//! - `faults`: fault injection (failures, delays, garbage answers) on the token endpoint,
//!   and its switches.
//! - `wire`: the token endpoint's form parsing, request checks and (error) answers.
//!
//! Must not: accept anything a strict identity server would refuse. A proxy that passes
//! against this simulator should pass against real servers, so when in doubt it says no.
//! Its `Mutex` is never held across an `.await`.
//!
//! A choice worth knowing: access tokens stay valid until they expire, even after their grant
//! is revoked, the way self-contained JWTs from real identity servers do. Use
//! [`IdentitySim::expire_access_tokens`] to force the proxy back to the token endpoint.
//!
//! Dialects (all off by default, which is plain RFC 6749):
//! - `spring_errors`: an expired refresh token is 401 `invalid_token` with a Bearer
//!   challenge, as Spring Security OAuth2 answers; like Spring, the description and the
//!   challenge echo the token, so a proxy that logs token-endpoint errors leaks it.
//! - `winbooks`: client authentication is `Basic base64(EMAIL)` with no colon,
//!   `Accept: application/json` is required, and only the `exchange_token` and
//!   `refresh_token` grants exist, both taking their token in the `code` field.
//! - `all_errors_400`: every error answer is 400, `invalid_client` included (ERP.net).

pub mod assertion;
mod authorize;
mod client_auth;
mod faults;
mod token;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use rand::RngCore;
use tokio::net::TcpListener;

use super::{bind_loopback, SimBody, SimServer};
use authorize::AuthCode;
pub use faults::HangUp;
use faults::{echo_response, fault_response, Fault, Faults};
use http_body_util::BodyExt;
use wire::status_only;

/// Which client authentication methods (RFC 6749 §2.3.1) the endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthRule {
    /// `client_id` and `client_secret` in the form body only (client_secret_post).
    Post,
    /// HTTP Basic only (client_secret_basic).
    Basic,
    /// Either one, but never both in the same request.
    Either,
    /// A JWT signed with a key of `jwt_keys` (private_key_jwt, RFC 7523).
    PrivateKeyJwt,
    /// A JWT signed with HS256 and the client secret (client_secret_jwt).
    ClientSecretJwt,
    /// The client certificate `tls_client_s256` names, `client_id` in the form (RFC 8705
    /// tls_client_auth); the tokens issued are bound to it, and the API checks that they come
    /// with it (RFC 8705 §3).
    Tls,
}

/// The header a TLS terminator in front of the simulators sets to the SHA-256 (base64url) of
/// the client certificate it verified, as nginx passes `$ssl_client_fingerprint` on: how the
/// simulators, which speak plain HTTP, learn which certificate a request came with.
pub const CLIENT_CERT_HEADER: &str = "x-client-cert-sha256";

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
    /// The public keys the client registered, for `private_key_jwt`.
    pub jwt_keys: Vec<assertion::JwtKey>,
    /// The `aud` client assertions must name; the token endpoint's URL when `None`.
    pub assertion_audience: Option<String>,
    /// With [`ClientAuthRule::Tls`]: the SHA-256 (base64url) of the client's certificate.
    pub tls_client_s256: Option<String>,
    /// RFC 9449: every token request must carry a DPoP proof; the tokens issued are bound to
    /// its key (token_type `DPoP`; a grant's refresh tokens to the key of its first proof),
    /// and the API takes them only with a proof by that key.
    pub dpop: bool,
    /// The token endpoint wants its nonce in proofs (400 `use_dpop_nonce` without it).
    pub dpop_nonce: bool,
    /// The API wants the nonce in proofs (401 `use_dpop_nonce` without it).
    pub api_dpop_nonce: bool,
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
            jwt_keys: Vec::new(),
            assertion_audience: None,
            tls_client_s256: None,
            dpop: false,
            dpop_nonce: false,
            api_dpop_nonce: false,
        }
    }
}

/// What the token endpoint has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityCounters {
    /// DPoP nonce challenges answered (`use_dpop_nonce`), at the token endpoint and the API.
    pub dpop_challenges: u64,
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
    /// The grant each access token was issued under: whose it is.
    access_grants: HashMap<String, usize>,
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
    /// The `jti`s of client assertions already used, with their `exp`.
    assertion_ids: HashMap<String, u64>,
    /// Which key verified the last accepted assertion: an index in `jwt_keys`, or `None`
    /// for the client secret (HS256).
    last_assertion_key: Option<Option<usize>>,
    /// DPoP: the proofs' `jti`s already used at the token endpoint, the key each access
    /// token is bound to, and the nonce proofs must carry where one is wanted.
    dpop_jtis: HashMap<String, u64>,
    access_jkt: HashMap<String, String>,
    dpop_nonce: String,
    api_dpop_nonce: String,
}

#[derive(Debug)]
struct Grant {
    revoked: bool,
    /// The DPoP key (its thumbprint) the grant's refresh tokens are bound to.
    jkt: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct RefreshToken {
    grant: usize,
    rotated_away: bool,
    /// None: never expires.
    expires_at: Option<Instant>,
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
            async move { sim.handle(request).await }
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

    /// The nonce the token endpoint wants in DPoP proofs.
    pub fn dpop_nonce(&self) -> String {
        let mut state = self.state();
        if state.dpop_nonce.is_empty() {
            state.dpop_nonce = random_token("n_");
        }
        state.dpop_nonce.clone()
    }

    /// The nonce the API wants in DPoP proofs (another than the token endpoint's).
    pub fn api_dpop_nonce(&self) -> String {
        let mut state = self.state();
        if state.api_dpop_nonce.is_empty() {
            state.api_dpop_nonce = random_token("an_");
        }
        state.api_dpop_nonce.clone()
    }

    /// New nonces, the token endpoint's and the API's: proofs with the old ones are answered
    /// `use_dpop_nonce`.
    pub fn rotate_dpop_nonce(&self) {
        let mut state = self.state();
        state.dpop_nonce = random_token("n_");
        state.api_dpop_nonce = random_token("an_");
    }

    /// The DPoP key (thumbprint) `access_token` is bound to, if it is.
    pub fn access_jkt(&self, access_token: &str) -> Option<String> {
        self.state().access_jkt.get(access_token).cloned()
    }

    /// Count a nonce challenge (the token endpoint's or the API's).
    pub fn count_dpop_challenge(&self) {
        self.state().counters.dpop_challenges += 1;
    }

    /// The certificate every access token is bound to (RFC 8705 §3), when the client
    /// authenticates with one: its SHA-256, base64url.
    pub fn binding(&self) -> Option<&str> {
        let config = &self.inner.config;
        match config.client_auth {
            ClientAuthRule::Tls => config.tls_client_s256.as_deref(),
            _ => None,
        }
    }

    /// Which key verified the last accepted client assertion: `Some(Some(i))` for
    /// `jwt_keys[i]`, `Some(None)` for the client secret; `None` if none was accepted yet.
    pub fn last_assertion_key(&self) -> Option<Option<usize>> {
        self.state().last_assertion_key
    }

    /// The grant (the user's login) a refresh token belongs to.
    pub fn grant_of_refresh_token(&self, token: &str) -> Option<usize> {
        self.state().refresh_tokens.get(token).map(|t| t.grant)
    }

    /// The grant an access token was issued under: who a request that carried it acts as.
    pub fn grant_of_access_token(&self, token: &str) -> Option<usize> {
        self.state().access_grants.get(token).copied()
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

    /// Revokes one grant (one user's login): its refresh tokens are refused from now on.
    pub fn revoke_grant(&self, grant: usize) {
        self.state().revoke(grant);
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

    /// Answer `request`; a [`HangUp`] closes its connection without an answer.
    pub(crate) async fn handle(
        self,
        request: Request<Incoming>,
    ) -> Result<Response<SimBody>, HangUp> {
        if request.uri().path() == self.inner.config.authorize_path {
            return Ok(self.authorize(&request));
        }
        if request.uri().path() != self.inner.config.token_path {
            return Ok(status_only(StatusCode::NOT_FOUND));
        }
        let (delay, fault, late) = self.take_faults();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let hang_up = match fault {
            Some(Fault::HangUp { processed }) => Some(processed),
            Some(Fault::Echo(code)) => {
                let authorization = request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let form = match request.into_body().collect().await {
                    Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                    Err(_) => return Err(HangUp),
                };
                return Ok(echo_response(code, authorization.as_deref(), &form));
            }
            Some(fault) => return Ok(fault_response(fault)),
            None => None,
        };
        if hang_up == Some(false) {
            // Read whole, never processed.
            let _ = request.into_body().collect().await;
            return Err(HangUp);
        }
        let response = match self.token_endpoint(request).await {
            Ok(response) => response,
            Err(error) if self.inner.config.all_errors_400 => error.into_400().into_response(),
            Err(error) => error.into_response(),
        };
        if hang_up.is_some() {
            return Err(HangUp);
        }
        if let Some(late) = late {
            tokio::time::sleep(late).await;
        }
        Ok(response)
    }
}

impl State {
    fn new_grant(&mut self) -> usize {
        self.grants.push(Grant {
            revoked: false,
            jkt: None,
        });
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

    /// A new access token, of `grant` when it has one (not `client_credentials`).
    fn new_access_token(&mut self, lifetime: Duration, grant: Option<usize>) -> String {
        let token = random_token("at_");
        self.access_tokens
            .insert(token.clone(), Instant::now() + lifetime);
        if let Some(grant) = grant {
            self.access_grants.insert(token.clone(), grant);
        }
        token
    }

    fn revoke(&mut self, grant: usize) {
        if !self.grants[grant].revoked {
            self.grants[grant].revoked = true;
            self.counters.grants_revoked += 1;
        }
    }
}

/// `prefix` followed by 256 random bits, base64url without padding (43 characters).
fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Test helpers shared by the tests of every part of the simulator.
#[cfg(test)]
mod test_support {
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
    use http::HeaderMap;
    use http_body_util::Full;

    use super::*;
    use crate::testing::*;

    /// The form-encoding RFC 6749 §2.3.1 asks for before base64.
    pub(super) fn form_encode(value: &str) -> String {
        form_urlencoded::byte_serialize(value.as_bytes()).collect()
    }

    pub(super) fn basic(id: &str, secret: &str) -> String {
        let joined = format!("{}:{}", form_encode(id), form_encode(secret));
        format!("Basic {}", STANDARD.encode(joined))
    }

    pub(super) fn post_credentials() -> &'static str {
        "client_id=tollgate-test&client_secret=s3cret"
    }

    pub(super) fn form_request(sim: &IdentitySim) -> http::request::Builder {
        Request::post(sim.token_url()).header(CONTENT_TYPE, "application/x-www-form-urlencoded")
    }

    pub(super) struct Answer {
        pub(super) status: StatusCode,
        pub(super) headers: HeaderMap,
        pub(super) json: serde_json::Value,
        pub(super) text: String,
    }

    pub(super) async fn call(request: Request<Full<Bytes>>) -> Answer {
        let (parts, body) = send(&client(), request).await;
        Answer {
            status: parts.status,
            headers: parts.headers,
            json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            text: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// POSTs `form` with the default client's credentials in the body.
    pub(super) async fn post(sim: &IdentitySim, form: &str) -> Answer {
        let body = format!("{form}&{}", post_credentials());
        call(form_request(sim).body(Full::from(body)).unwrap()).await
    }

    pub(super) async fn refresh(sim: &IdentitySim, refresh_token: &str) -> Answer {
        post(
            sim,
            &format!("grant_type=refresh_token&refresh_token={refresh_token}"),
        )
        .await
    }

    pub(super) async fn start(config: IdentityConfig) -> (IdentitySim, SimServer) {
        IdentitySim::start(config).await
    }

    pub(super) fn winbooks_config() -> IdentityConfig {
        IdentityConfig {
            client_id: "ann+books@example.com".to_owned(),
            winbooks: true,
            access_lifetime: Duration::from_secs(900),
            ..IdentityConfig::default()
        }
    }

    /// A WinBooks token request: Basic with the e-mail alone, Accept: application/json.
    pub(super) fn winbooks_request(
        sim: &IdentityConfig,
        url: &str,
        form: &str,
    ) -> Request<Full<Bytes>> {
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
}

#[cfg(test)]
mod tests {
    use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
    use http::HeaderValue;
    use http_body_util::Full;

    use super::test_support::*;
    use super::*;
    use crate::testing::*;

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
}
