//! Calls to the token endpoint: one function per grant; how the client proves itself is
//! [`super::client_auth`], what the answers mean is [`super::answer`].
//!
//! It knows nothing of caches, stores or retries: it sends one request and says what came back,
//! sorted into "final" answers (the grant or client is refused) and transient failures.

use super::answer::{parse_answer, GrantError, Issued};
use super::assertion;
use super::client_auth::ClientProof;
use super::dpop::DpopKey;
use super::lock;
use super::scrub::Scrubber;
use crate::config::{AuthConfig, Grant, UpstreamConfig, UpstreamFiles};
use crate::secret::Secret;
use std::time::Duration;
use url::Url;

/// Largest token response we read; real ones are a few KiB.
const MAX_RESPONSE: usize = 256 * 1024;

/// After `auth.answer_timeout` passed, how much longer an answer may take to be read: a
/// process paused past the ceiling (SIGSTOP, a VM migrated) finds its timer and the answer
/// that arrived meanwhile due at once, and the answer must win.
const LAST_LOOK: Duration = Duration::from_secs(1);

/// How a connection to the token endpoint that went silent is noticed while an answer is
/// awaited: TCP keepalive probes after this much silence, every [`KEEPALIVE_EVERY`], given up
/// after [`KEEPALIVE_PROBES`] unanswered (about 30 s in all).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// What came back from the token endpoint.
struct Answer {
    status: u16,
    body: Vec<u8>,
    retry_after: Option<Duration>,
    /// `DPoP-Nonce`: the nonce the server wants in the next proof.
    nonce: Option<String>,
}

impl Answer {
    /// A 400 `use_dpop_nonce` with a nonce to use (RFC 9449 §8).
    fn asks_for_nonce(&self) -> bool {
        #[derive(serde::Deserialize)]
        struct Error {
            error: String,
        }
        let error = serde_json::from_slice::<Error>(&self.body).map(|e| e.error);
        self.status == 400 && self.nonce.is_some() && error.is_ok_and(|e| e == "use_dpop_nonce")
    }
}

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
        // No overall timeout here: a request that spends a refresh token waits for its answer
        // longer than one that does not (see `post`).
        let builder = reqwest::Client::builder()
            .connect_timeout(auth.timeout)
            .tcp_keepalive(KEEPALIVE_IDLE)
            .tcp_keepalive_interval(KEEPALIVE_EVERY)
            .tcp_keepalive_retries(KEEPALIVE_PROBES)
            // A redirect would carry client credentials to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .use_preconfigured_tls(upstream.tls_client(files, files.token_cert.as_ref())?);
        let http = builder
            .build()
            .map_err(|e| format!("cannot build the token client: {e}"))?;
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
        self.timeout + self.answer_timeout + LAST_LOOK
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
        Ok((self.answer(request, spends).await?, scrubber))
    }

    /// Send `request` and read the answer, within `auth.timeout` or, for a request that
    /// `spends` a refresh token or a code, as long as its answer may still come.
    async fn answer(
        &self,
        request: reqwest::RequestBuilder,
        spends: bool,
    ) -> Result<Answer, GrantError> {
        let exchange = self.exchange(request, spends);
        let answer = if spends {
            answer_within(self.longest_request() - LAST_LOOK, exchange).await
        } else {
            tokio::time::timeout(self.timeout, exchange).await.ok()
        };
        match answer {
            Some(answer) => answer,
            None if spends => Err(GrantError::Unanswered {
                reason: format!(
                    "the token endpoint {} did not answer within auth.timeout + auth.answer_timeout ({})",
                    shown(&self.url),
                    humantime::format_duration(self.longest_request() - LAST_LOOK)
                ),
            }),
            None => Err(GrantError::transient(format!(
                "the token endpoint {} did not answer within auth.timeout ({}); check that {} is reachable from this machine",
                shown(&self.url),
                humantime::format_duration(self.timeout),
                self.url.host_str().unwrap_or("its host")
            ))),
        }
    }

    /// Send `request` and read its answer: status, body, `Retry-After`. A failure after the
    /// connection was made is [`GrantError::Unanswered`] when the request `spends` something.
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        spends: bool,
    ) -> Result<Answer, GrantError> {
        let lost = |reason: String| match spends {
            true => GrantError::Unanswered { reason },
            false => GrantError::transient(reason),
        };
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                GrantError::transient(unreachable(&self.url, e))
            } else {
                lost(unreachable(&self.url, e))
            }
        })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let nonce = response
            .headers()
            .get("dpop-nonce")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(response).await.map_err(|e| match e {
            Capped::CutOff(reason) => lost(reason),
            Capped::TooLarge => GrantError::transient("token response is larger than 256 KiB"),
        })?;
        Ok(Answer {
            status,
            body,
            retry_after,
            nonce,
        })
    }
}

/// `answer` within `ceiling`, or `None`. When the timer fires, an answer that arrived
/// meanwhile still wins: it gets a [`LAST_LOOK`] to be read.
async fn answer_within<T>(
    ceiling: Duration,
    answer: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(answer);
    tokio::select! {
        biased;
        out = &mut answer => return Some(out),
        _ = tokio::time::sleep(ceiling) => {}
    }
    tokio::time::timeout(LAST_LOOK, answer).await.ok()
}

/// The token endpoint as messages show it: without its query.
fn shown(url: &Url) -> Url {
    let mut shown = url.clone();
    shown.set_query(None);
    shown
}

/// Why the token endpoint at `url` could not be reached, in words: which URL, which cause
/// (DNS, refused, TLS, timeout), and what to check.
fn unreachable(url: &Url, e: reqwest::Error) -> String {
    let chain: Vec<String> = crate::error::causes(&e)
        .skip(1)
        .map(|c| c.to_string())
        .collect();
    let text = chain.join(": ").to_lowercase();
    let host = url.host_str().unwrap_or("its host");
    let shown = shown(url);
    let (what, check) = if e.is_timeout() {
        ("it could not be reached within auth.timeout".to_owned(), format!("check that {host} is reachable from this machine (a proxy or a firewall on the way?)"))
    } else if text.contains("dns error")
        || text.contains("lookup address")
        || text.contains("name or service not known")
    {
        (
            format!("the host name {host} could not be resolved (DNS)"),
            "check the host in auth.token_url, and this machine's DNS".to_owned(),
        )
    } else if text.contains("connection refused") {
        (
            "the connection was refused".to_owned(),
            format!("check the port in auth.token_url and that the identity server runs on {host}"),
        )
    } else if let Some(tls) = crate::tls::upstream::describe(&e) {
        (
            format!("TLS failed ({tls})"),
            "the upstream's ca_file applies to the token endpoint too, and so does pin_sha256 when the endpoint is on the url's host".to_owned(),
        )
    } else if text.contains("certificate") || text.contains("tls") || text.contains("handshake") {
        (
            format!("TLS failed ({})", chain.last().map_or("", String::as_str)),
            "for a server whose certificate a private CA signed, set the upstream's ca_file"
                .to_owned(),
        )
    } else {
        let detail = if chain.is_empty() {
            e.without_url().to_string()
        } else {
            chain.join(": ")
        };
        (
            format!("the request failed ({detail})"),
            format!("check that {host} is reachable from this machine"),
        )
    };
    format!("cannot reach the token endpoint {shown}: {what}; {check}")
}

/// `application/x-www-form-urlencoded` encoding of `fields`.
pub fn encode_form(fields: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        form.append_pair(k, v);
    }
    form.finish()
}

/// Why a token response's body was not read whole.
enum Capped {
    CutOff(String),
    TooLarge,
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, Capped> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Capped::CutOff(format!("token response cut off: {}", e.without_url())))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(Capped::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
