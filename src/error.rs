//! Errors of the request path and the one place that turns them into HTTP responses:
//! `application/problem+json` (RFC 9457) with `type`, `title`, `status`, `detail`.
//!
//! Each error knows its side — the client, the upstream API, the identity server, or tollgate
//! itself — which decides the status. Messages never contain a secret: token errors are built
//! from [`TokenError`], which holds only descriptions and fingerprints.

use crate::inbound_keys::Denied;
use crate::quota::{self, QuotaError, Reason};
use crate::response::ProxyBody;
use crate::store::StoreError;
use crate::token::TokenError;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use std::time::Duration;

/// `e`, then its cause, and that one's cause, to the first.
pub fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// An error and its causes, `: `-separated.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    causes(e)
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Something that stopped a request before or while it was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request itself is not acceptable (client side).
    #[error("{0}")]
    BadRequest(&'static str),
    /// The client sent its body too slowly (`limits.body_timeout`, `limits.min_body_rate`).
    #[error(transparent)]
    BodyTooSlow(crate::body::TooSlow),
    /// CONNECT, TRACE and other methods that are not forwarded.
    #[error("method {0} is not forwarded; tollgate forwards {methods}", methods = crate::forward::FORWARDED_METHODS)]
    MethodNotAllowed(http::Method),
    /// No token could be had (identity-server side or configuration).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The upstream could not be reached or broke the connection.
    #[error("the upstream API could not be reached: {0}")]
    UpstreamUnreachable(String),
    /// The upstream did not answer within `timeout`.
    #[error("the upstream API did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// Every connection tollgate may hold to the upstream stayed busy for `timeout`.
    #[error("{0}")]
    UpstreamBusy(String),
    /// A quota refused the request, or its count could not be kept (tollgate side).
    #[error(transparent)]
    Quota(#[from] QuotaError),
    /// The listener requires an inbound key and the request had none, or a wrong one.
    #[error("{}", match .0 {
        Denied::Missing => "this listener requires a key: send Authorization: Bearer KEY with one of the keys in [upstream.inbound]",
        Denied::Wrong => "the key sent is not one of this listener's keys",
    })]
    Unauthorized(Denied),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Token(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Quota(QuotaError::Refused(_)) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Quota(QuotaError::Store(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ProxyError::BadRequest(_) => ("bad-request", "Request refused by tollgate"),
            ProxyError::MethodNotAllowed(_) => ("method-not-allowed", "Method not allowed"),
            ProxyError::BodyTooSlow(_) => ("body-too-slow", "Request body too slow"),
            ProxyError::Token(TokenError::Unavailable { .. }) => {
                ("identity-unavailable", "Identity server unavailable")
            }
            ProxyError::Token(TokenError::NeedsLogin(_)) => ("login-required", "Login required"),
            ProxyError::Token(TokenError::Refused(_)) => {
                ("client-refused", "Identity server refused the client")
            }
            ProxyError::Token(TokenError::Store(_)) => ("state-store", "State store failure"),
            ProxyError::Token(TokenError::Sealed(_)) => (
                "record-sealed",
                "Token record sealed with a key not configured",
            ),
            ProxyError::UpstreamUnreachable(_) => ("upstream-unreachable", "Upstream unreachable"),
            ProxyError::UpstreamTimeout(_) => ("upstream-timeout", "Upstream timeout"),
            ProxyError::UpstreamBusy(_) => ("upstream-busy", "Every upstream connection busy"),
            ProxyError::Quota(QuotaError::Refused(r)) => match r.reason {
                Reason::UpstreamThrottled => ("upstream-throttled", "Upstream asked to slow down"),
                Reason::QueueFull | Reason::QueueTimeout => {
                    ("concurrency-limit", "Too many requests in flight")
                }
                Reason::KeyBudget => ("key-budget-exceeded", "The key's daily budget is spent"),
                _ => ("quota-exceeded", "Quota exceeded"),
            },
            ProxyError::Quota(QuotaError::Store(_)) => ("quota-store", "Quota state unavailable"),
            ProxyError::Unauthorized(_) => ("unauthorized", "Inbound key required"),
        }
    }

    /// The problem+json response for this error.
    pub fn into_response(self, upstream: &str) -> Response<ProxyBody> {
        let status = self.status();
        let (slug, title) = self.kind();
        let mut extra = serde_json::Map::new();
        if let ProxyError::Quota(QuotaError::Refused(refusal)) = &self {
            // Which limit, and when to come back, for clients that read the body.
            extra.insert("limit".into(), refusal.reason.as_str().into());
            extra.insert("retry_after".into(), refusal.retry_after.into());
        }
        let mut response = problem_with(status, slug, title, &self.to_string(), upstream, extra);
        match &self {
            ProxyError::Token(TokenError::Unavailable { retry_after, .. }) => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
            }
            ProxyError::Quota(QuotaError::Refused(refusal)) => {
                let headers = response.headers_mut();
                headers.insert(header::RETRY_AFTER, HeaderValue::from(refusal.retry_after));
                if let Some(window) = &refusal.window {
                    quota::add_headers(headers, window);
                }
            }
            ProxyError::Quota(QuotaError::Store(StoreError::Recovering { left, .. })) => {
                let seconds = left.as_secs_f64().ceil().max(1.0) as u64;
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            ProxyError::Quota(QuotaError::Store(_))
            | ProxyError::Token(TokenError::Store(_))
            | ProxyError::Token(TokenError::Sealed(_))
            | ProxyError::UpstreamBusy(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            ProxyError::Unauthorized(denied) => {
                // RFC 6750 §3: a wrong key is an invalid_token; a missing one has no error code.
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(match denied {
                        Denied::Missing => "Bearer realm=\"tollgate\"",
                        Denied::Wrong => "Bearer realm=\"tollgate\", error=\"invalid_token\"",
                    }),
                );
            }
            ProxyError::BodyTooSlow(_) => {
                // The rest of the body may still be on its way: the connection cannot serve
                // another request (HTTP/2 drops the header, and resets the stream alone).
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ProxyError::MethodNotAllowed(_) => {
                response.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static(crate::forward::FORWARDED_METHODS),
                );
            }
            _ => {}
        }
        response
    }
}

/// Build an RFC 9457 problem response.
pub fn problem(
    status: StatusCode,
    slug: &str,
    title: &str,
    detail: &str,
    upstream: &str,
) -> Response<ProxyBody> {
    problem_with(
        status,
        slug,
        title,
        detail,
        upstream,
        serde_json::Map::new(),
    )
}

/// [`problem`] with extension members (RFC 9457 §3.2).
fn problem_with(
    status: StatusCode,
    slug: &str,
    title: &str,
    detail: &str,
    upstream: &str,
    extra: serde_json::Map<String, serde_json::Value>,
) -> Response<ProxyBody> {
    let mut body = serde_json::json!({
        "type": format!("urn:tollgate:problem:{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "upstream": upstream,
    });
    body.as_object_mut().expect("a JSON object").extend(extra);
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn unavailable_is_503_problem_json_with_retry_after() {
        let e = ProxyError::Token(TokenError::Unavailable {
            reason: "token endpoint answered HTTP 503".into(),
            retry_after: Duration::from_secs(4),
        });
        let r = e.into_response("api");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "4");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 503);
        assert_eq!(v["type"], "urn:tollgate:problem:identity-unavailable");
        assert!(v["detail"].as_str().unwrap().contains("HTTP 503"));
    }
}
