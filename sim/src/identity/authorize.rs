//! The authorization-code grant (RFC 6749 §4.1 with PKCE, RFC 7636), from the authorization
//! endpoint to the token request that redeems the code.
//!
//! Owns: the authorization endpoint's checks, where a simulated user consents at once unless
//! told to deny, and its answers (an error page, or a redirect); the codes it issues and what
//! each is bound to; PKCE, S256 only; redeeming a code; and the switches tests use on it.
//!
//! Must not: redirect to a URI that is not known to belong to the client, accept PKCE
//! `plain`, or authenticate the client (the token endpoint does that before it hands a code
//! over). `redirect_uri` must be sent to the authorization endpoint and match a registered
//! one exactly (no RFC 8252 §7.3 port wildcard for loopback). An authorization code is used
//! up by the first token request that gets as far as checking it, even if that request
//! fails.

use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use super::wire::{invalid_grant, required, OAuthError, Params};
use super::{random_token, IdentitySim};
use crate::{empty_body, full_body, SimBody};

/// How long an authorization code can be redeemed (RFC 6749 §4.1.2 recommends 10 minutes
/// at most; real servers use 30 to 60 seconds).
const CODE_LIFETIME: Duration = Duration::from_secs(60);

/// What an authorization code was bound to at the authorization endpoint.
#[derive(Debug, Clone)]
pub(super) struct AuthCode {
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

impl IdentitySim {
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

    // Longer than 80 lines on purpose: the checks run in the order RFC 6749 §4.1.2.1 sets
    // (first those that can only be answered with a page, then those answered by redirect),
    // and one function read top to bottom shows that order.
    /// RFC 6749 §4.1.1-4.1.2 and RFC 7636 §4.4: checks the request, then the simulated user
    /// consents at once (or denies, after [`deny_next_authorization`](Self::deny_next_authorization)).
    /// Without a trustworthy client and redirect URI the answer is an error page; after that,
    /// errors go back to the client by redirect.
    pub(super) fn authorize(&self, request: &Request<Incoming>) -> Response<SimBody> {
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
    pub(super) fn authorization_code(
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
        let access_token = state.new_access_token(config.access_lifetime, Some(grant));
        state.counters.authorization_codes += 1;
        state.counters.issued += 1;
        drop(state);
        Ok(self.token_response(access_token, Some(refresh_token), code.scope.as_ref()))
    }
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

#[cfg(test)]
mod tests {
    use http::header::AUTHORIZATION;
    use http_body_util::Full;

    use super::*;
    use crate::identity::test_support::*;
    use crate::identity::{ClientAuthRule, IdentityConfig};

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
