//! One HTTP exchange with the token endpoint: the client (TLS, keepalive, no redirects), the
//! form it posts, the answer read within its timeouts and capped in size, and a failure named
//! in words (which URL, which cause, what to check). [`super::grant`] decides what to send.

use super::answer::GrantError;
use crate::config::{AuthConfig, UpstreamConfig, UpstreamFiles};
use std::time::Duration;
use url::Url;

/// Largest token response we read; real ones are a few KiB.
const MAX_RESPONSE: usize = 256 * 1024;

/// After `auth.answer_timeout` passed, how much longer an answer may take to be read: a
/// process paused past the ceiling (SIGSTOP, a VM migrated) finds its timer and the answer
/// that arrived meanwhile due at once, and the answer must win.
pub(super) const LAST_LOOK: Duration = Duration::from_secs(1);

/// How a connection to the token endpoint that went silent is noticed while an answer is
/// awaited: TCP keepalive probes after this much silence, every [`KEEPALIVE_EVERY`], given up
/// after [`KEEPALIVE_PROBES`] unanswered (about 30 s in all).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// What came back from the token endpoint.
pub(super) struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: Option<Duration>,
    /// `DPoP-Nonce`: the nonce the server wants in the next proof.
    pub nonce: Option<String>,
}

impl Answer {
    /// A 400 `use_dpop_nonce` with a nonce to use (RFC 9449 §8).
    pub fn asks_for_nonce(&self) -> bool {
        #[derive(serde::Deserialize)]
        struct Error {
            error: String,
        }
        let error = serde_json::from_slice::<Error>(&self.body).map(|e| e.error);
        self.status == 400 && self.nonce.is_some() && error.is_ok_and(|e| e == "use_dpop_nonce")
    }
}

/// The HTTP client for `upstream`'s token endpoint, asked with `auth`: TLS that trusts what
/// the upstream's connections trust, keepalive probes, and no redirects.
pub(super) fn client(
    upstream: &UpstreamConfig,
    auth: &AuthConfig,
    files: &UpstreamFiles,
) -> Result<reqwest::Client, String> {
    // No overall timeout here: a request that spends a refresh token waits for its answer
    // longer than one that does not (see [`answer`]).
    let builder = reqwest::Client::builder()
        .connect_timeout(auth.timeout)
        .tcp_keepalive(KEEPALIVE_IDLE)
        .tcp_keepalive_interval(KEEPALIVE_EVERY)
        .tcp_keepalive_retries(KEEPALIVE_PROBES)
        // A redirect would carry client credentials to another host.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .use_preconfigured_tls(upstream.tls_client(files, files.token_cert.as_ref())?);
    builder
        .build()
        .map_err(|e| format!("cannot build the token client: {e}"))
}

/// Send `request` to `url` and read the answer, within `timeout` (`auth.timeout`) or, for a
/// request that `spends` a refresh token or a code, within `ceiling` (`auth.timeout` +
/// `auth.answer_timeout`) and a [`LAST_LOOK`], as long as its answer may still come.
pub(super) async fn answer(
    url: &Url,
    request: reqwest::RequestBuilder,
    spends: bool,
    timeout: Duration,
    ceiling: Duration,
) -> Result<Answer, GrantError> {
    let exchange = exchange(url, request, spends);
    let answer = if spends {
        answer_within(ceiling, exchange).await
    } else {
        tokio::time::timeout(timeout, exchange).await.ok()
    };
    match answer {
        Some(answer) => answer,
        None if spends => Err(GrantError::Unanswered {
            reason: format!(
                "the token endpoint {} did not answer within auth.timeout + auth.answer_timeout ({})",
                shown(url),
                humantime::format_duration(ceiling)
            ),
        }),
        None => Err(GrantError::transient(format!(
            "the token endpoint {} did not answer within auth.timeout ({}); check that {} is reachable from this machine",
            shown(url),
            humantime::format_duration(timeout),
            url.host_str().unwrap_or("its host")
        ))),
    }
}

/// Send `request` and read its answer: status, body, `Retry-After`. A failure after the
/// connection was made is [`GrantError::Unanswered`] when the request `spends` something.
async fn exchange(
    url: &Url,
    request: reqwest::RequestBuilder,
    spends: bool,
) -> Result<Answer, GrantError> {
    let lost = |reason: String| match spends {
        true => GrantError::Unanswered { reason },
        false => GrantError::transient(reason),
    };
    let response = request.send().await.map_err(|e| {
        if e.is_connect() {
            GrantError::transient(unreachable(url, e))
        } else {
            lost(unreachable(url, e))
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
