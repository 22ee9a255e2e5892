//! The token endpoint (RFC 6749 §3.2) and the grants it serves.
//!
//! Owns: the method check, reading the request, authenticating the client (through
//! `client_auth`) and picking the grant; the grants `refresh_token` (§6),
//! `client_credentials` (§4.4), `password` (§4.3) and WinBooks' `exchange_token`, with the
//! `spring_errors` and `winbooks` dialects described in the `identity` module docs; and the
//! success answer (§5.1) that every grant gives.
//!
//! Must not: parse the wire format or check client credentials itself (`wire` and
//! `client_auth` do), or issue anything to a request that failed a check. The
//! `authorization_code` grant is redeemed in `authorize`, beside the codes it checks.

use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::client_auth::{authenticate_client, authenticate_winbooks, is_public_client};
use super::wire::{
    check_accepts_json, check_content_type, invalid_grant, invalid_request, json_response,
    parse_form, read_body, required, unsupported_grant_type, OAuthError, Params,
};
use super::{assertion, ClientAuthRule, IdentitySim, Rotation};
use crate::SimBody;

impl IdentitySim {
    /// Client authentication by an assertion (RFC 7523): only for a client registered for
    /// it, and never beside another method.
    fn check_assertion(
        &self,
        headers: &http::HeaderMap,
        params: &Params,
    ) -> Result<(), OAuthError> {
        let config = &self.inner.config;
        let allowed: &[&str] = match config.client_auth {
            ClientAuthRule::PrivateKeyJwt => &["ES256", "RS256", "PS256", "EdDSA"],
            ClientAuthRule::ClientSecretJwt => &["HS256"],
            _ => {
                return Err(super::wire::unauthorized_client(
                    "this client does not authenticate with assertions",
                ))
            }
        };
        if headers.contains_key(http::header::AUTHORIZATION) {
            return Err(invalid_request(
                "the client authenticated with both HTTP Basic and an assertion",
            ));
        }
        let audience = match &config.assertion_audience {
            Some(audience) => audience.clone(),
            None => self.token_url(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut state = self.state();
        let key = assertion::verify(
            config,
            allowed,
            &audience,
            params,
            &mut state.assertion_ids,
            now,
        )?;
        state.last_assertion_key = Some(key);
        Ok(())
    }

    pub(super) async fn token_endpoint(
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
        } else if config.client_auth == ClientAuthRule::Tls {
            check_certificate(config, &parts.headers, &params)?;
        } else if params.contains_key("client_assertion")
            || params.contains_key("client_assertion_type")
            || matches!(
                config.client_auth,
                ClientAuthRule::PrivateKeyJwt | ClientAuthRule::ClientSecretJwt
            )
        {
            self.check_assertion(&parts.headers, &params)?;
        } else {
            authenticate_client(config, &parts.headers, &params)?;
        }
        let jkt = match config.dpop {
            true => Some(self.check_dpop(&parts.headers)?),
            false => None,
        };
        if let (Some(jkt), Some("refresh_token")) = (&jkt, grant_type) {
            self.check_bound_grant(required(&params, "refresh_token")?, jkt)?;
        }
        let response = match grant_type {
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
        }?;
        Ok(match jkt {
            Some(jkt) => self.bind(response, &jkt).await,
            None => response,
        })
    }

    /// RFC 9449 §5: a valid proof for this token request, with the nonce when one is wanted.
    /// Returns its key's thumbprint.
    fn check_dpop(&self, headers: &http::HeaderMap) -> Result<String, OAuthError> {
        let invalid =
            |why: String| OAuthError::new(StatusCode::BAD_REQUEST, "invalid_dpop_proof", why);
        let mut proofs = headers.get_all("dpop").iter();
        let (Some(proof), None) = (proofs.next(), proofs.next()) else {
            return Err(invalid("exactly one DPoP proof is required".into()));
        };
        let proof = proof
            .to_str()
            .map_err(|_| invalid("the proof is not text".into()))?;
        let nonce = self.inner.config.dpop_nonce.then(|| self.dpop_nonce());
        let url = self.token_url();
        let expected = crate::dpop::Expected {
            htm: "POST",
            htu: &url,
            ath: None,
            nonce: nonce.as_deref(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let verified = crate::dpop::verify(proof, &expected, &mut self.state().dpop_jtis, now);
        match verified {
            Ok(jkt) => Ok(jkt),
            Err(crate::dpop::ProofError::Nonce) => {
                self.count_dpop_challenge();
                let nonce = nonce.unwrap_or_default();
                Err(OAuthError::new(
                    StatusCode::BAD_REQUEST,
                    "use_dpop_nonce",
                    "a DPoP nonce is required",
                )
                .with_nonce(nonce))
            }
            Err(crate::dpop::ProofError::Invalid(why)) => Err(invalid(why)),
        }
    }

    /// A refresh token bound to one key is refused with a proof by another.
    fn check_bound_grant(&self, presented: &str, jkt: &str) -> Result<(), OAuthError> {
        let state = self.state();
        let grant = state.refresh_tokens.get(presented).map(|t| t.grant);
        match grant.and_then(|g| state.grants[g].jkt.as_deref()) {
            Some(bound) if bound != jkt => Err(invalid_grant(
                "the refresh token is bound to another DPoP key",
            )),
            _ => Ok(()),
        }
    }

    /// A token response made DPoP-bound to `jkt`: its token type, its access token's binding,
    /// and its grant's (for the refresh tokens).
    async fn bind(&self, response: Response<SimBody>, jkt: &str) -> Response<SimBody> {
        use http_body_util::BodyExt;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return json_response(status, &serde_json::Value::Null);
        };
        let mut state = self.state();
        if let Some(access) = body["access_token"].as_str() {
            state.access_jkt.insert(access.to_owned(), jkt.to_owned());
            body["token_type"] = "DPoP".into();
        }
        let grant = body["refresh_token"]
            .as_str()
            .and_then(|rt| state.refresh_tokens.get(rt))
            .map(|t| t.grant);
        if let Some(grant) = grant {
            state.grants[grant]
                .jkt
                .get_or_insert_with(|| jkt.to_owned());
        }
        json_response(status, &body)
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
        let access_token = state.new_access_token(config.access_lifetime, Some(entry.grant));
        state.counters.refreshes += 1;
        state.counters.issued += 1;
        drop(state);
        Ok(self.token_response(access_token, Some(refresh_token), scope))
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
        let access_token = state.new_access_token(config.access_lifetime, Some(grant));
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
        let access_token = state.new_access_token(config.access_lifetime, Some(grant));
        state.counters.exchanges += 1;
        state.counters.issued += 1;
        drop(state);
        Ok(self.token_response(access_token, Some(refresh_token), None))
    }

    /// RFC 6749 §4.4: no refresh token in the answer.
    fn client_credentials(&self, params: &Params) -> Response<SimBody> {
        let mut state = self.state();
        let access_token = state.new_access_token(self.inner.config.access_lifetime, None);
        state.counters.client_credentials += 1;
        state.counters.issued += 1;
        drop(state);
        self.token_response(access_token, None, params.get("scope"))
    }

    /// RFC 6749 §5.1.
    pub(super) fn token_response(
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

/// RFC 8705 §2 (tls_client_auth): the registered certificate, `client_id` in the form, and no
/// other client authentication.
fn check_certificate(
    config: &super::IdentityConfig,
    headers: &http::HeaderMap,
    params: &Params,
) -> Result<(), OAuthError> {
    use super::wire::unauthorized_client;
    if headers.contains_key(http::header::AUTHORIZATION)
        || params.contains_key("client_secret")
        || params.contains_key("client_assertion")
    {
        return Err(invalid_request(
            "a certificate-authenticated client sends no other client authentication",
        ));
    }
    if params.get("client_id") != Some(&config.client_id) {
        return Err(unauthorized_client("client_id is missing or unknown"));
    }
    let presented = headers
        .get(super::CLIENT_CERT_HEADER)
        .and_then(|v| v.to_str().ok());
    match (presented, config.tls_client_s256.as_deref()) {
        (None, _) => Err(unauthorized_client(
            "no client certificate was presented (tls_client_auth)",
        )),
        (Some(presented), Some(registered)) if presented == registered => Ok(()),
        _ => Err(unauthorized_client(
            "the client certificate is not the one registered for this client",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::header::ALLOW;
    use http::header::{
        ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE,
    };
    use http::HeaderValue;
    use http_body_util::Full;

    use super::*;
    use crate::identity::test_support::*;
    use crate::identity::{ClientAuthRule, IdentityConfig};

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

    /// tls_client_auth: the registered certificate and client_id, nothing else; a missing or
    /// another certificate, or a secret beside it, is refused.
    #[tokio::test]
    async fn a_certificate_client_is_known_by_its_certificate_alone() {
        let config = IdentityConfig {
            client_auth: ClientAuthRule::Tls,
            tls_client_s256: Some("registered".into()),
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let form = "grant_type=client_credentials&client_id=tollgate-test";
        let send = |cert: Option<&str>, body: &str| {
            let mut request = form_request(&sim);
            if let Some(cert) = cert {
                request = request.header(crate::identity::CLIENT_CERT_HEADER, cert);
            }
            call(request.body(Full::from(body.to_owned())).unwrap())
        };
        assert_eq!(send(Some("registered"), form).await.status, StatusCode::OK);
        let missing = send(None, form).await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert!(
            missing.text.contains("no client certificate"),
            "{}",
            missing.text
        );
        let other = send(Some("another"), form).await;
        assert_eq!(other.status, StatusCode::UNAUTHORIZED);
        let with_secret = format!("{form}&client_secret=s3cret");
        let both = send(Some("registered"), &with_secret).await;
        assert_eq!(both.status, StatusCode::BAD_REQUEST);
    }
}
