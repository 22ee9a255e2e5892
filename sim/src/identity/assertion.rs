//! Client assertions (RFC 7523 §3, RFC 7521 §4.2), checked as a strict identity server does:
//! `private_key_jwt` against the registered public keys, `client_secret_jwt` (HS256) against
//! the client secret.
//!
//! Owns: the JWS signature (ES256, RS256, EdDSA, HS256; never `none`), the key it names
//! (`kid`, or `x5t#S256` when the key was registered with a certificate), and the claims:
//! `iss` = `sub` = the client, `aud` this token endpoint (or the configured audience), `exp`
//! in the future and at most ten minutes on, `iat` not in the future, a `jti` never seen
//! before. Each refusal is `invalid_client` (RFC 7521 §4.2.1) saying which check failed.
//!
//! Must not: touch anything but the `jti`s it is given to remember.

use ring::signature::{self, UnparsedPublicKey};
use std::collections::HashMap;

use super::wire::{unauthorized_client, OAuthError, Params};
use super::IdentityConfig;

/// `client_assertion_type` for a JWT (RFC 7523 §2.2).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The longest an assertion may be valid (`exp` - now).
const MAX_LIFETIME_S: u64 = 600;

/// Seconds of clock difference tolerated on `iat`.
const SKEW_S: u64 = 5;

/// A public key the client registered for `private_key_jwt`.
#[derive(Debug, Clone)]
pub struct JwtKey {
    pub kid: Option<String>,
    /// `ES256` (an uncompressed P-256 point), `RS256` or `PS256` (an RSAPublicKey, DER) or
    /// `EdDSA` (the 32 bytes).
    pub alg: &'static str,
    pub public_key: Vec<u8>,
    /// When the key was registered with a certificate: its SHA-256 thumbprint (base64url),
    /// which the assertion's header must carry as `x5t#S256` (as Entra ID requires).
    pub x5t_s256: Option<String>,
    /// The certificate's SHA-1 thumbprint (base64url): when set, a header's `x5t` must equal
    /// it (Entra ID's older form).
    pub x5t: Option<String>,
}

/// Check the assertion in `params`, signed with one of the `allowed` algorithms; `jtis` holds
/// the ids already used, by their `exp`. Returns the index in `jwt_keys` of the key that
/// verified it (`None`: the client secret).
pub(super) fn verify(
    config: &IdentityConfig,
    allowed: &[&str],
    audience: &str,
    params: &Params,
    jtis: &mut HashMap<String, u64>,
    now: u64,
) -> Result<Option<usize>, OAuthError> {
    let refuse = |why: &str| unauthorized_client(&format!("client assertion refused: {why}"));
    if params.get("client_assertion_type").map(String::as_str) != Some(JWT_BEARER) {
        return Err(refuse("client_assertion_type is not the JWT bearer type"));
    }
    if params.contains_key("client_secret") {
        return Err(refuse(
            "a client_secret beside the assertion: one method only",
        ));
    }
    let jwt = params
        .get("client_assertion")
        .map(String::as_str)
        .unwrap_or_default();
    let jws = crate::jws::parse(jwt).map_err(refuse)?;
    let (header, claims, sig, signed) = (&jws.header, &jws.claims, &jws.signature, jws.signed);
    let alg = header["alg"].as_str().unwrap_or_default();
    if !allowed.contains(&alg) {
        return Err(refuse(&format!(
            "alg `{alg}` is not accepted for this client"
        )));
    }
    let verified = match alg {
        "HS256" => {
            let key =
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, config.client_secret.as_bytes());
            ring::hmac::verify(&key, signed, sig).map(|()| None).ok()
        }
        "ES256" | "RS256" | "PS256" | "EdDSA" => {
            let keys = registered_keys(config, header, alg).map_err(|why| refuse(&why))?;
            let algorithm: &dyn signature::VerificationAlgorithm = match alg {
                "ES256" => &signature::ECDSA_P256_SHA256_FIXED,
                "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                _ => &signature::ED25519,
            };
            keys.into_iter()
                .find(|i| {
                    let key = &config.jwt_keys[*i].public_key;
                    UnparsedPublicKey::new(algorithm, key)
                        .verify(signed, sig)
                        .is_ok()
                })
                .map(Some)
        }
        other => return Err(refuse(&format!("alg `{other}` is not accepted"))),
    };
    let Some(key) = verified else {
        return Err(refuse("the signature does not verify"));
    };
    let client = &config.client_id;
    for claim in ["iss", "sub"] {
        if claims[claim].as_str() != Some(client) {
            return Err(refuse(&format!("{claim} is not the client id")));
        }
    }
    if params.get("client_id").is_some_and(|id| id != client) {
        return Err(refuse("client_id differs from the assertion's"));
    }
    let aud_ok = match &claims["aud"] {
        serde_json::Value::String(a) => a == audience,
        serde_json::Value::Array(all) => all.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !aud_ok {
        return Err(refuse(&format!("aud is not {audience}")));
    }
    let exp = claims["exp"].as_u64().ok_or_else(|| refuse("no exp"))?;
    if exp <= now {
        return Err(refuse("expired"));
    }
    if exp > now + MAX_LIFETIME_S {
        return Err(refuse("valid for too long"));
    }
    let iat = claims["iat"].as_u64().ok_or_else(|| refuse("no iat"))?;
    if iat > now + SKEW_S {
        return Err(refuse("issued in the future"));
    }
    if claims["nbf"].as_u64().is_some_and(|nbf| nbf > now + SKEW_S) {
        return Err(refuse("not valid yet (nbf)"));
    }
    let jti = claims["jti"].as_str().ok_or_else(|| refuse("no jti"))?;
    jtis.retain(|_, until| *until > now);
    if jtis.insert(jti.to_owned(), exp).is_some() {
        return Err(refuse("jti already used (a replayed assertion)"));
    }
    Ok(key)
}

/// The registered keys the header may name, for `alg`, by index.
fn registered_keys(
    config: &IdentityConfig,
    header: &serde_json::Value,
    alg: &str,
) -> Result<Vec<usize>, String> {
    let kid = header["kid"].as_str();
    let thumb = header["x5t#S256"].as_str();
    let sha1 = header["x5t"].as_str();
    let found: Vec<usize> = (0..config.jwt_keys.len())
        .filter(|i| {
            let k = &config.jwt_keys[*i];
            k.alg == alg
                && kid.is_none_or(|kid| k.kid.as_deref() == Some(kid))
                && k.x5t_s256.as_deref().is_none_or(|t| thumb == Some(t))
                && sha1.is_none_or(|s| k.x5t.as_deref().is_none_or(|t| s == t))
        })
        .collect();
    if !found.is_empty() {
        return Ok(found);
    }
    Err(match (kid, thumb) {
        (Some(kid), _) => format!("no registered {alg} key with kid `{kid}`"),
        (None, Some(_)) => format!("no registered {alg} key with that certificate"),
        (None, None) => {
            format!("no registered {alg} key (or its certificate's x5t#S256 is missing)")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{call, form_request, start};
    use super::super::{ClientAuthRule, IdentityConfig, IdentitySim};
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    use http::StatusCode;
    use http_body_util::Full;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair};

    struct Client {
        key: EcdsaKeyPair,
    }

    impl Client {
        fn new() -> Client {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
            Client { key }
        }

        fn registered(&self, kid: &str) -> JwtKey {
            JwtKey {
                kid: Some(kid.to_owned()),
                alg: "ES256",
                public_key: self.key.public_key().as_ref().to_vec(),
                x5t_s256: None,
                x5t: None,
            }
        }

        fn jwt(&self, header: serde_json::Value, claims: serde_json::Value) -> String {
            let signed = format!(
                "{}.{}",
                B64.encode(header.to_string()),
                B64.encode(claims.to_string())
            );
            let sig = self
                .key
                .sign(&SystemRandom::new(), signed.as_bytes())
                .unwrap();
            format!("{signed}.{}", B64.encode(sig))
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(sim: &IdentitySim, jti: &str) -> serde_json::Value {
        serde_json::json!({
            "iss": "tollgate-test", "sub": "tollgate-test", "aud": sim.token_url(),
            "jti": jti, "iat": now(), "exp": now() + 60,
        })
    }

    async fn present(sim: &IdentitySim, jwt: &str) -> (StatusCode, String) {
        let form = format!(
            "grant_type=client_credentials&client_id=tollgate-test&client_assertion_type={}&client_assertion={jwt}",
            form_urlencoded::byte_serialize(JWT_BEARER.as_bytes()).collect::<String>()
        );
        let answer = call(form_request(sim).body(Full::from(form)).unwrap()).await;
        let description = answer.json["error_description"]
            .as_str()
            .unwrap_or_default();
        (answer.status, description.to_owned())
    }

    /// Each check refuses on its own, with `invalid_client` saying which; a good assertion
    /// passes once and its replay is refused.
    #[tokio::test]
    async fn every_check_refuses_and_a_replay_is_caught() {
        let client = Client::new();
        let stranger = Client::new();
        let config = IdentityConfig {
            client_auth: ClientAuthRule::PrivateKeyJwt,
            jwt_keys: vec![client.registered("k1")],
            ..IdentityConfig::default()
        };
        let (sim, _server) = start(config).await;
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": "k1"});
        let good = client.jwt(header.clone(), claims(&sim, "one"));
        assert_eq!(present(&sim, &good).await.0, StatusCode::OK);
        assert_eq!(sim.last_assertion_key(), Some(Some(0)));

        let with = |change: &dyn Fn(&mut serde_json::Value), jti: &str| {
            let mut c = claims(&sim, jti);
            change(&mut c);
            client.jwt(header.clone(), c)
        };
        let cases: Vec<(String, &str)> = vec![
            (good.clone(), "jti already used"),
            (
                with(&|c| c["aud"] = "https://elsewhere/token".into(), "a"),
                "aud is not",
            ),
            (with(&|c| c["exp"] = (now() - 1).into(), "b"), "expired"),
            (
                with(&|c| c["exp"] = (now() + 3600).into(), "c"),
                "valid for too long",
            ),
            (
                with(&|c| c["iat"] = (now() + 600).into(), "d"),
                "issued in the future",
            ),
            (
                with(&|c| c["iss"] = "someone-else".into(), "e"),
                "iss is not the client id",
            ),
            (
                with(&|c| drop(c.as_object_mut().unwrap().remove("jti")), "f"),
                "no jti",
            ),
            (
                client.jwt(
                    serde_json::json!({"alg": "ES256", "kid": "k9"}),
                    claims(&sim, "g"),
                ),
                "no registered ES256 key with kid `k9`",
            ),
            (
                stranger.jwt(header.clone(), claims(&sim, "h")),
                "the signature does not verify",
            ),
            (
                format!(
                    "{}.{}.",
                    B64.encode(r#"{"alg":"none"}"#),
                    B64.encode(claims(&sim, "i").to_string())
                ),
                "alg `none` is not accepted",
            ),
            ("not-a-jwt".to_owned(), "not a JWS"),
        ];
        for (jwt, expected) in cases {
            let (status, description) = present(&sim, &jwt).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{expected}: {description}"
            );
            assert!(description.contains(expected), "{expected}: {description}");
        }
        // A client secret is no longer enough, nor one beside the assertion.
        let secret = "grant_type=client_credentials&client_id=tollgate-test&client_secret=s3cret";
        let answer = call(form_request(&sim).body(Full::from(secret)).unwrap()).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
}
