//! Calls to the token endpoint: one function per grant; how the client proves itself is
//! [`super::client_auth`], how one request travels is [`super::exchange`], what the answers
//! mean is [`super::answer`].
//!
//! It knows nothing of caches, stores or retries: it sends one request and says what came back,
//! sorted into "final" answers (the grant or client is refused) and transient failures.

use super::answer::{parse_answer, GrantError, Issued};
use super::assertion;
use super::client_auth::ClientProof;
use super::dpop::DpopKey;
use super::exchange::{self, encode_form, Answer};
use super::lock;
use super::scrub::Scrubber;
use crate::config::{AuthConfig, Grant, UpstreamConfig, UpstreamFiles};
use crate::secret::Secret;
use std::time::Duration;
use url::Url;

/// The token endpoint of one upstream, with its client credentials.
pub struct TokenEndpoint {
    http: reqwest::Client,
    /// How the client proves who it is.
    client: ClientProof,
    url: Url,
    grant: Grant,
    /// `auth.dpop`: tokens bound to the lineage's DPoP key.
    dpop: bool,
    /// `htu` of the token endpoint, for DPoP proofs.
    htu: String,
    /// The nonce the token endpoint last gave for DPoP proofs.
    dpop_nonce: std::sync::Mutex<Option<String>>,
    scope: Option<String>,
    username: Option<String>,
    password: Option<Secret<String>>,
    exchange_token: Option<Secret<String>>,
    params: Vec<(String, String)>,
    default_expires_in: Duration,
    /// Connecting (`auth.timeout`), and the whole of a request that spends nothing.
    timeout: Duration,
    /// The ceiling on the answer to a request that spends a refresh token or a code.
    answer_timeout: Duration,
}

impl TokenEndpoint {
    /// The token endpoint of `upstream`, asked with `auth` (its own, or an identity's), over
    /// TLS that trusts what the upstream's connections trust: `files.ca` besides the public
    /// roots, and `pin_sha256` when the endpoint is on the upstream's host. Client assertions
    /// are signed with `files.private_key`.
    pub fn new(
        upstream: &UpstreamConfig,
        auth: &AuthConfig,
        files: &UpstreamFiles,
    ) -> Result<Self, String> {
        let http = exchange::client(upstream, auth, files)?;
        let client = ClientProof::new(auth, files)?;
        Ok(TokenEndpoint::over(http, auth, client))
    }

    /// The same endpoint asked with `auth` (an identity's), over this one's client: its TLS
    /// settings, its connections and its private key are the upstream's, shared by every
    /// identity.
    pub fn sharing(&self, auth: &AuthConfig) -> Result<TokenEndpoint, String> {
        let client = self.client.sharing(auth)?;
        Ok(TokenEndpoint::over(self.http.clone(), auth, client))
    }

    fn over(http: reqwest::Client, auth: &AuthConfig, client: ClientProof) -> TokenEndpoint {
        TokenEndpoint {
            http,
            client,
            dpop: auth.dpop,
            htu: super::dpop::htu(&auth.token_url),
            dpop_nonce: std::sync::Mutex::new(None),
            url: auth.token_url.clone(),
            grant: auth.grant,
            scope: auth.scope.clone(),
            username: auth.username.clone(),
            password: auth.password.clone(),
            exchange_token: auth.exchange_token.clone(),
            params: auth
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            default_expires_in: auth.default_expires_in,
            timeout: auth.timeout,
            answer_timeout: auth.answer_timeout,
        }
    }

    /// The longest a token request may take: connecting, then waiting for the answer to one
    /// that spends a refresh token, and a last look.
    pub fn longest_request(&self) -> Duration {
        self.timeout + self.answer_timeout + exchange::LAST_LOOK
    }

    pub fn grant(&self) -> Grant {
        self.grant
    }

    /// Whether tokens are asked for bound to a DPoP key (`auth.dpop`).
    pub fn dpop(&self) -> bool {
        self.dpop
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Get a new access token. `refresh_token` is the newest one the store holds, if any.
    ///
    /// `refresh_token` and `client_credentials` make one request. `password` and
    /// `winbooks_exchange` refresh while the refresh token works; when the identity server
    /// refuses it, they log in again with their own credentials — once, never in a loop.
    pub async fn obtain(
        &self,
        refresh_token: Option<&Secret<String>>,
        dpop: Option<&DpopKey>,
    ) -> Result<Issued, GrantError> {
        match (self.grant, refresh_token) {
            (Grant::ClientCredentials, _) => self.send(self.login_fields(), dpop).await,
            (Grant::RefreshToken, Some(rt)) => self.send(self.refresh_fields(rt), dpop).await,
            (Grant::RefreshToken, None) => Err(GrantError::InvalidGrant {
                code: "no_refresh_token".into(),
                description: Some("there is no refresh token to redeem".into()),
            }),
            (Grant::Password | Grant::WinbooksExchange, Some(rt)) => {
                match self.send(self.refresh_fields(rt), dpop).await {
                    Err(GrantError::InvalidGrant { code, .. }) => {
                        tracing::info!(grant = self.grant.as_str(), %code, "refresh token refused; logging in again");
                        self.login_again(dpop).await
                    }
                    other => other,
                }
            }
            (Grant::Password | Grant::WinbooksExchange, None) => self.login_again(dpop).await,
        }
    }

    /// Whether [`TokenEndpoint::obtain`] with `refresh_token` sends one: a request the
    /// identity server may act on (rotate) whether or not its answer arrives.
    pub fn spends(&self, refresh_token: Option<&Secret<String>>) -> bool {
        refresh_token.is_some() && self.grant != Grant::ClientCredentials
    }

    /// Redeem an authorization code (RFC 6749 §4.1.3, with the PKCE verifier of RFC 7636).
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        verifier: &Secret<String>,
        dpop: Option<&DpopKey>,
    ) -> Result<Issued, GrantError> {
        let fields = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier.expose().as_str()),
        ];
        self.send(fields, dpop).await
    }

    async fn login_again(&self, dpop: Option<&DpopKey>) -> Result<Issued, GrantError> {
        let mut issued = self.send(self.login_fields(), dpop).await?;
        issued.logged_in = true;
        Ok(issued)
    }

    /// The form of a refresh. WinBooks puts the refresh token in `code`.
    fn refresh_fields<'a>(&'a self, rt: &'a Secret<String>) -> Vec<(&'a str, &'a str)> {
        let field = match self.grant {
            Grant::WinbooksExchange => "code",
            _ => "refresh_token",
        };
        vec![("grant_type", "refresh_token"), (field, rt.expose())]
    }

    /// The form of a request made with the grant's own credentials.
    fn login_fields(&self) -> Vec<(&str, &str)> {
        let mut fields = Vec::with_capacity(4);
        match self.grant {
            Grant::ClientCredentials => fields.push(("grant_type", "client_credentials")),
            Grant::Password => {
                fields.push(("grant_type", "password"));
                fields.push(("username", self.username.as_deref().unwrap_or_default()));
                let password = self.password.as_ref().map(|p| p.expose().as_str());
                fields.push(("password", password.unwrap_or_default()));
            }
            Grant::WinbooksExchange => {
                fields.push(("grant_type", "exchange_token"));
                let token = self.exchange_token.as_ref().map(|t| t.expose().as_str());
                fields.push(("code", token.unwrap_or_default()));
            }
            Grant::RefreshToken => {}
        }
        if let (Grant::ClientCredentials | Grant::Password, Some(scope)) = (self.grant, &self.scope)
        {
            fields.push(("scope", scope));
        }
        fields
    }

    /// Add the extra `params`, then client authentication, and send.
    async fn send(
        &self,
        mut fields: Vec<(&str, &str)>,
        dpop: Option<&DpopKey>,
    ) -> Result<Issued, GrantError> {
        for (k, v) in &self.params {
            fields.push((k, v));
        }
        self.post(fields, dpop).await
    }

    /// Add client authentication (exactly one method) and send the form.
    async fn post(
        &self,
        fields: Vec<(&str, &str)>,
        dpop: Option<&DpopKey>,
    ) -> Result<Issued, GrantError> {
        let mut nonce_asked = false;
        loop {
            let (answer, scrubber) = self.post_once(fields.clone(), dpop).await?;
            if let Some(nonce) = &answer.nonce {
                *lock(&self.dpop_nonce) = Some(nonce.clone());
            }
            // RFC 9449 §8: the server wants its nonce in the proof, and processed nothing. The
            // request is made anew (a fresh assertion and proof: their ids are single-use).
            if dpop.is_some() && !nonce_asked && answer.asks_for_nonce() {
                nonce_asked = true;
                continue;
            }
            return parse_answer(
                answer.status,
                &answer.body,
                answer.retry_after,
                self.default_expires_in,
                &scrubber,
                dpop.is_some(),
            );
        }
    }

    /// Send the form once, with client authentication and a DPoP proof (when `dpop`); the
    /// answer, and the scrubber of this request's secrets.
    async fn post_once(
        &self,
        mut fields: Vec<(&str, &str)>,
        dpop: Option<&DpopKey>,
    ) -> Result<(Answer, Scrubber), GrantError> {
        let assertion = self.client.assertion()?;
        let request = self
            .http
            .post(self.url.clone())
            .header(http::header::ACCEPT, "application/json");
        let request = self
            .client
            .apply(request, &mut fields, assertion.as_ref())?;
        // Identity servers echo what they were sent: every secret of this request, in every
        // form, is cut from the texts of their answer (the code and the verifier of a login
        // too; `redirect_uri` is no secret, but is harmless to cut).
        let scrubber = Scrubber::new(
            fields
                .iter()
                .filter(|(k, _)| {
                    !matches!(
                        *k,
                        "grant_type" | "scope" | "username" | "client_id" | "client_assertion_type"
                    )
                })
                .map(|(_, v)| *v)
                .chain(self.client.secret()),
            self.client.basic(),
        );
        // A refresh token or a code is spent once the server has the request, whether or not
        // its answer arrives: such a request is never given up on while its answer may come.
        let spends = fields.iter().any(|(k, v)| {
            *k == "grant_type" && matches!(*v, "refresh_token" | "authorization_code")
        });
        let mut request = request
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(encode_form(&fields));
        if let Some(key) = dpop {
            let nonce = lock(&self.dpop_nonce).clone();
            let now = assertion::unix_now();
            let proof = key
                .proof("POST", &self.htu, None, nonce.as_deref(), now)
                .map_err(GrantError::transient)?;
            request = request.header("dpop", proof);
        }
        let ceiling = self.timeout + self.answer_timeout;
        let answer = exchange::answer(&self.url, request, spends, self.timeout, ceiling).await?;
        Ok((answer, scrubber))
    }
}
