//! Client authentication at the token endpoint (RFC 6749 §2.3).
//!
//! Owns: client_secret_post, client_secret_basic or either, as [`ClientAuthRule`] says; the
//! WinBooks dialect, `Basic base64(EMAIL)` with no colon; and telling a public client
//! (`client_id` alone, no credentials) from one that authenticates.
//!
//! Must not: touch the simulator's state or answer a request itself: it says yes, or gives
//! the [`OAuthError`] to answer with. Which grants a public client may use is the token
//! endpoint's call, not this file's.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, StatusCode};

use super::wire::{invalid_request, unauthorized_client, OAuthError, Params};
use super::{ClientAuthRule, IdentityConfig};

/// Whether a token request comes from a public client: `client_id` in the body and no
/// client authentication at all.
pub(super) fn is_public_client(headers: &HeaderMap, params: &Params) -> Result<bool, OAuthError> {
    Ok(basic_header(headers)?.is_none()
        && params.contains_key("client_id")
        && !params.contains_key("client_secret"))
}

/// RFC 6749 §2.3: exactly one authentication method, and the one the config allows.
pub(super) fn authenticate_client(
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
pub(super) fn authenticate_winbooks(
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
    use http::header::WWW_AUTHENTICATE;
    use http_body_util::Full;

    use super::*;
    use crate::identity::test_support::*;

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
}
