//! What a token endpoint's answer means (RFC 6749 §5.1, §5.2): a token, a final refusal (the
//! grant or the client is refused: no retry until the config changes), or a transient
//! failure (a gateway's page, a 5xx, an unknown error code).

use super::scrub::Scrubber;
use crate::secret::Secret;
use serde::Deserialize;
use std::time::Duration;

/// A successful token response.
pub struct Issued {
    pub access_token: Secret<String>,
    pub expires_in: Duration,
    /// Present when the server issued (or rotated) a refresh token.
    pub refresh_token: Option<Secret<String>>,
    /// Obtained by logging in again (password, exchange) after the refresh token was refused:
    /// the refused refresh token must not be kept.
    pub logged_in: bool,
}

/// Why a token request did not produce a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GrantError {
    /// `invalid_grant` (or a 401 `invalid_token` from the token endpoint): the refresh token is
    /// dead. Only a new login or a new seed helps.
    #[error("{code}{}", describe(.description))]
    InvalidGrant {
        code: String,
        description: Option<String>,
    },
    /// The client itself is refused (`invalid_client`, `unauthorized_client`, ...): the config
    /// needs fixing.
    #[error("{code}{}", describe(.description))]
    Refused {
        code: String,
        description: Option<String>,
    },
    /// Network trouble before the request was sent, 5xx, 429, or an answer that could not be
    /// read: worth retrying.
    #[error("{reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// A request that spends a refresh token (or a login code) was sent and no answer came:
    /// its connection ended, or `auth.answer_timeout` passed. The identity server may have
    /// processed it, and rotated.
    #[error("{reason}")]
    Unanswered { reason: String },
}

fn describe(description: &Option<String>) -> String {
    match description {
        Some(d) => format!(": {d}"),
        None => String::new(),
    }
}

impl GrantError {
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            GrantError::InvalidGrant { .. } | GrantError::Refused { .. }
        )
    }

    pub(super) fn transient(reason: impl Into<String>) -> Self {
        GrantError::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

#[derive(Deserialize)]
struct Success {
    access_token: String,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct Failure {
    error: String,
    error_description: Option<String>,
}

/// Longest error code and description shown, in characters (after the scrub).
const MAX_CODE: usize = 100;
const MAX_DESCRIPTION: usize = 200;

/// Sort a token endpoint answer into a token, a final refusal, or a transient failure. The
/// texts of a refusal pass through `scrubber` (the request's secrets) before anything keeps
/// them; no other part of the body is ever shown.
pub fn parse_response(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    default_expires_in: Duration,
    scrubber: &Scrubber,
) -> Result<Issued, GrantError> {
    parse_answer(
        status,
        body,
        retry_after,
        default_expires_in,
        scrubber,
        false,
    )
}

/// [`parse_response`] of a token request that asked for a DPoP-bound token when `dpop`:
/// then the token type must be `DPoP` (RFC 9449 §5), never `Bearer`.
pub fn parse_answer(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    default_expires_in: Duration,
    scrubber: &Scrubber,
    dpop: bool,
) -> Result<Issued, GrantError> {
    match status {
        200 => parse_success(body, default_expires_in, dpop),
        400 | 401 => match serde_json::from_slice::<Failure>(body) {
            Ok(f) => {
                let description = f
                    .error_description
                    .map(|d| scrubber.clean(&d, MAX_DESCRIPTION));
                // Sorted by the code as sent; shown only scrubbed.
                let raw = f.error.as_str();
                let code = scrubber.clean(raw, MAX_CODE);
                // Spring answers an expired refresh token with 401 invalid_token.
                if raw == "invalid_grant" || (status == 401 && raw == "invalid_token") {
                    Err(GrantError::InvalidGrant { code, description })
                } else if matches!(
                    raw,
                    "temporarily_unavailable" | "server_error" | "slow_down"
                ) {
                    Err(GrantError::Transient {
                        reason: format!("token endpoint answered {code}"),
                        retry_after,
                    })
                } else if !matches!(
                    raw,
                    "invalid_client"
                        | "unauthorized_client"
                        | "unsupported_grant_type"
                        | "invalid_scope"
                        | "invalid_request"
                ) {
                    // An error code RFC 6749 does not define: not proof the client is wrong.
                    Err(GrantError::Transient {
                        reason: format!("token endpoint answered HTTP {status} {code}"),
                        retry_after,
                    })
                } else {
                    Err(GrantError::Refused { code, description })
                }
            }
            // A gateway's page, not the identity server's verdict.
            Err(_) => Err(GrantError::transient(format!(
                "token endpoint answered {status} without an OAuth2 error body"
            ))),
        },
        429 | 408 | 500..=599 => Err(GrantError::Transient {
            reason: format!("token endpoint answered HTTP {status}"),
            retry_after,
        }),
        _ => Err(GrantError::transient(format!(
            "token endpoint answered HTTP {status}"
        ))),
    }
}

fn parse_success(
    body: &[u8],
    default_expires_in: Duration,
    dpop: bool,
) -> Result<Issued, GrantError> {
    let ok: Success = serde_json::from_slice(body).map_err(|_| {
        GrantError::transient(
            "token endpoint answered 200 with a body that is not a token response",
        )
    })?;
    let expected = if dpop { "DPoP" } else { "Bearer" };
    if dpop && ok.token_type.is_none() {
        return Err(GrantError::Refused {
            code: "unsupported_token_type".into(),
            description: Some("a DPoP-bound token was asked for and the answer names no token_type: the server does not bind this client's tokens; set auth.dpop = false".into()),
        });
    }
    if let Some(kind) = &ok.token_type {
        if !kind.eq_ignore_ascii_case(expected) {
            // Shown only when it is a plain word: it is the server's text.
            let plain = kind.len() <= 32
                && kind
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            let mut description = match plain {
                true => format!("token_type `{kind}` is not {expected}"),
                false => format!("the token_type is not {expected}"),
            };
            if dpop {
                description.push_str(": the server does not bind this client's tokens to its DPoP key; set auth.dpop = false, or allow DPoP for the client");
            }
            return Err(GrantError::Refused {
                code: "unsupported_token_type".into(),
                description: Some(description),
            });
        }
    }
    if ok.access_token.is_empty() || http::HeaderValue::from_str(&ok.access_token).is_err() {
        return Err(GrantError::transient(
            "token endpoint answered an access token that cannot be sent in a header",
        ));
    }
    let expires_in = match ok.expires_in {
        None | Some(serde_json::Value::Null) => default_expires_in,
        Some(v) => parse_expires_in(&v).ok_or_else(|| {
            GrantError::transient(
                "token endpoint answered an expires_in that is not a positive number",
            )
        })?,
    };
    Ok(Issued {
        access_token: Secret::new(ok.access_token),
        expires_in,
        refresh_token: ok.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
        logged_in: false,
    })
}

/// `expires_in` as a JSON number or a numeric string (WinBooks sends `"900"`).
fn parse_expires_in(v: &serde_json::Value) -> Option<Duration> {
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (secs.is_finite() && secs >= 1.0).then(|| Duration::from_secs(secs as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn expires_in_as_number_or_string_and_token_type_in_any_case() {
        let a = parse_response(
            200,
            br#"{"access_token":"a","token_type":"bearer","expires_in":"900"}"#,
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .ok()
        .unwrap();
        assert_eq!(a.expires_in, Duration::from_secs(900));
        let b = parse_response(
            200,
            br#"{"access_token":"a","token_type":"BEARER","expires_in":43199,"refresh_token":"r"}"#,
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .ok()
        .unwrap();
        assert_eq!(b.expires_in, Duration::from_secs(43199));
        assert_eq!(b.refresh_token.unwrap().expose(), "r");
        let c = parse_response(
            200,
            br#"{"access_token":"a","token_type":"Bearer"}"#,
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .ok()
        .unwrap();
        assert_eq!(c.expires_in, HOUR);
        assert!(c.refresh_token.is_none());
    }

    #[test]
    fn classifies_errors() {
        let e = parse_response(
            400,
            br#"{"error":"invalid_grant"}"#,
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .err()
        .unwrap();
        assert!(matches!(e, GrantError::InvalidGrant { .. }) && e.is_final());
        let e = parse_response(
            401,
            br#"{"error":"invalid_token","error_description":"expired"}"#,
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .err()
        .unwrap();
        assert!(matches!(e, GrantError::InvalidGrant { .. }));
        let e = parse_response(
            400,
            br#"{"error":"invalid_client"}"#,
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .err()
        .unwrap();
        assert!(matches!(e, GrantError::Refused { .. }) && e.is_final());
        let e = parse_response(
            400,
            br#"{"error":"temporarily_unavailable"}"#,
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .err()
        .unwrap();
        assert!(!e.is_final());
        let e = parse_response(
            401,
            b"<html>gateway</html>",
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .err()
        .unwrap();
        assert!(!e.is_final());
        let e = parse_response(
            503,
            b"oops",
            Some(Duration::from_secs(7)),
            HOUR,
            &Scrubber::new([], None),
        )
        .err()
        .unwrap();
        assert!(
            matches!(e, GrantError::Transient { retry_after: Some(d), .. } if d.as_secs() == 7)
        );
        // (status, body, final?) — final means: do not retry until the config changes.
        let cases: [(u16, &[u8], bool); 4] = [
            (200, b"<html>proxy error</html>", false),
            (200, br#"{"access_token":"a","token_type":"mac"}"#, true),
            (
                200,
                br#"{"access_token":"a\nb","token_type":"bearer"}"#,
                false,
            ),
            (200, br#"{"access_token":"a","expires_in":"soon"}"#, false),
        ];
        for (status, body, fatal) in cases {
            let e = parse_response(status, body, None, HOUR, &Scrubber::new([], None))
                .err()
                .unwrap();
            assert_eq!(e.is_final(), fatal, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn the_code_as_sent_decides_even_when_a_secret_is_cut_from_it() {
        // A param value ("grant") that happens to be inside the code.
        let scrubber = Scrubber::new(["grant"], None);
        let e = parse_response(400, br#"{"error":"invalid_grant"}"#, None, HOUR, &scrubber)
            .err()
            .unwrap();
        assert!(matches!(e, GrantError::InvalidGrant { .. }), "{e}");
        assert!(!e.to_string().contains("grant"), "{e}");
    }

    #[test]
    fn error_text_never_contains_the_token() {
        let e = parse_response(
            200,
            br#"{"access_token":"SECRET\u0001TOKEN"}"#,
            None,
            HOUR,
            &Scrubber::new([], None),
        )
        .err()
        .unwrap();
        assert!(!e.to_string().contains("SECRET"));
    }
}
