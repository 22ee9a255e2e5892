//! The token endpoint's wire format.
//!
//! Owns: reading a request body (with a size limit) and parsing its form (RFC 6749 §3.2);
//! the Content-Type and WinBooks `Accept` checks; the error answer of RFC 6749 §5.2
//! ([`OAuthError`]); and the JSON answers, with the headers every token endpoint answer
//! carries.
//!
//! Must not: know about grants, clients or the simulator's state: it turns bytes into
//! parameters and errors into answers, nothing more. The authorization endpoint's answers
//! (an error page or a redirect) live in `authorize`.

use std::collections::HashMap;

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::{empty_body, full_body, SimBody};

/// Largest token request body accepted; more gets 413 so a client cannot exhaust memory.
const BODY_LIMIT: usize = 64 * 1024;

pub(super) type Params = HashMap<String, String>;

/// A parameter the request must carry (RFC 6749 §5.2: `invalid_request` when it does not).
pub(super) fn required<'a>(params: &'a Params, name: &str) -> Result<&'a String, OAuthError> {
    params
        .get(name)
        .ok_or_else(|| invalid_request(format!("{name} is required")))
}

/// An error answer per RFC 6749 §5.2.
#[derive(Debug)]
pub(super) struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
    /// A `WWW-Authenticate` value replacing the default one [`json_response`] adds on 401.
    challenge: Option<String>,
    /// A `DPoP-Nonce` to send (with `use_dpop_nonce`).
    nonce: Option<String>,
}

impl OAuthError {
    pub(super) fn new(
        status: StatusCode,
        code: &'static str,
        description: impl Into<String>,
    ) -> Self {
        OAuthError {
            status,
            code,
            description: description.into(),
            challenge: None,
            nonce: None,
        }
    }

    pub(super) fn with_nonce(mut self, nonce: String) -> Self {
        self.nonce = Some(nonce);
        self
    }

    pub(super) fn with_challenge(mut self, challenge: String) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// The same error answered with 400 and no challenge, as ERP.net does.
    pub(super) fn into_400(mut self) -> Self {
        self.status = StatusCode::BAD_REQUEST;
        self.challenge = None;
        self
    }

    pub(super) fn into_response(self) -> Response<SimBody> {
        let body = json!({"error": self.code, "error_description": self.description});
        let mut response = json_response(self.status, &body);
        if let Some(challenge) = self.challenge {
            let value = HeaderValue::try_from(challenge).expect("challenges are visible ASCII");
            response.headers_mut().insert(WWW_AUTHENTICATE, value);
        }
        if let Some(nonce) = self.nonce {
            let value = HeaderValue::try_from(nonce).expect("nonces are visible ASCII");
            response.headers_mut().insert("dpop-nonce", value);
        }
        response
    }
}

pub(super) fn invalid_request(description: impl Into<String>) -> OAuthError {
    OAuthError::new(StatusCode::BAD_REQUEST, "invalid_request", description)
}

pub(super) fn invalid_grant(description: &str) -> OAuthError {
    OAuthError::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

pub(super) fn unsupported_grant_type(grant_type: &str) -> OAuthError {
    OAuthError::new(
        StatusCode::BAD_REQUEST,
        "unsupported_grant_type",
        format!("grant_type {grant_type:?} is not supported"),
    )
}

/// 401 `invalid_client`; the challenge is added by [`json_response`].
pub(super) fn unauthorized_client(description: &str) -> OAuthError {
    OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
}

/// JSON with the headers every token endpoint answer carries. Headers that HTTP requires for
/// a status (a challenge on 401, `Allow` on 405) are added here so no path can forget them.
pub(super) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<SimBody> {
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

pub(super) fn status_only(status: StatusCode) -> Response<SimBody> {
    let mut response = Response::new(empty_body());
    *response.status_mut() = status;
    response
}

/// RFC 6749 §3.2 requires `application/x-www-form-urlencoded`; parameters such as
/// `charset` are allowed after it.
pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), OAuthError> {
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
pub(super) fn check_accepts_json(headers: &HeaderMap) -> Result<(), OAuthError> {
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

pub(super) async fn read_body(body: Incoming) -> Result<Bytes, OAuthError> {
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
pub(super) fn parse_form(body: &[u8]) -> Result<Params, OAuthError> {
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

#[cfg(test)]
mod tests {
    use http::Request;
    use http_body_util::Full;

    use super::*;
    use crate::identity::test_support::*;
    use crate::identity::IdentityConfig;

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
}
