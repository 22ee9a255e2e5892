//! DPoP proofs (RFC 9449 §4.3) as a strict server checks them, at the token endpoint and at
//! the API: a compact JWS with `typ` `dpop+jwt`, `alg` ES256 and the public key in `jwk`
//! (never a private one); signed by that key; `htm` and `htu` those of the request; `iat`
//! within a minute; a `jti` never seen before; `ath` the access token's hash at the API; and
//! the server's nonce when it asks for one. The key's RFC 7638 thumbprint (`jkt`) is what
//! tokens are bound to.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// How far `iat` may be from now, either way.
const WINDOW_S: u64 = 60;

/// Why a proof was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ProofError {
    /// Not a valid proof for this request (`invalid_dpop_proof`).
    Invalid(String),
    /// Valid, but without the server's current nonce (`use_dpop_nonce`).
    Nonce,
}

/// What a proof must say.
pub struct Expected<'a> {
    pub htm: &'a str,
    pub htu: &'a str,
    /// The access token's hash (`ath`), at the API.
    pub ath: Option<String>,
    /// The nonce the server wants, when it wants one.
    pub nonce: Option<&'a str>,
}

/// The base64url SHA-256 of an access token (`ath`).
pub fn ath(access_token: &str) -> String {
    B64.encode(Sha256::digest(access_token.as_bytes()))
}

/// Check `proof` against `expected`; `jtis` holds the ids already used (kept a while). Returns
/// the key's thumbprint.
pub fn verify(
    proof: &str,
    expected: &Expected<'_>,
    jtis: &mut HashMap<String, u64>,
    now: u64,
) -> Result<String, ProofError> {
    let bad = |why: &str| ProofError::Invalid(why.to_owned());
    let jws = crate::jws::parse(proof).map_err(bad)?;
    let (header, claims, sig, signed) = (&jws.header, &jws.claims, &jws.signature, jws.signed);
    if header["typ"] != "dpop+jwt" {
        return Err(bad("typ is not dpop+jwt"));
    }
    if header["alg"] != "ES256" {
        return Err(bad("alg is not ES256"));
    }
    let jwk = &header["jwk"];
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" || jwk.get("d").is_some() {
        return Err(bad("jwk is not a public P-256 key"));
    }
    let coordinate = |name: &str| jwk[name].as_str().and_then(|v| B64.decode(v).ok());
    let (Some(x), Some(y)) = (coordinate("x"), coordinate("y")) else {
        return Err(bad("jwk has no x and y"));
    };
    let point = [&[4u8][..], &x, &y].concat();
    if UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(signed, sig)
        .is_err()
    {
        return Err(bad("the signature does not verify with its jwk"));
    }
    if claims["htm"] != expected.htm {
        return Err(bad("htm is not the request's method"));
    }
    if claims["htu"] != expected.htu {
        return Err(bad(&format!("htu is not {}", expected.htu)));
    }
    let iat = claims["iat"].as_u64().ok_or_else(|| bad("no iat"))?;
    if iat + WINDOW_S < now || iat > now + WINDOW_S {
        return Err(bad("iat is not within a minute of now"));
    }
    if let Some(ath) = &expected.ath {
        if claims["ath"].as_str() != Some(ath) {
            return Err(bad("ath is not the access token's hash"));
        }
    }
    if let Some(nonce) = expected.nonce {
        if claims["nonce"].as_str() != Some(nonce) {
            return Err(ProofError::Nonce);
        }
    }
    let jti = claims["jti"].as_str().ok_or_else(|| bad("no jti"))?;
    jtis.retain(|_, seen| *seen + 2 * WINDOW_S > now);
    if jtis.insert(jti.to_owned(), now).is_some() {
        return Err(bad("jti already used (a replayed proof)"));
    }
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        B64.encode(&x),
        B64.encode(&y)
    );
    Ok(B64.encode(Sha256::digest(canonical.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    fn proof(key: &EcdsaKeyPair, claims: serde_json::Value, typ: &str) -> String {
        let point = key.public_key().as_ref();
        let header = serde_json::json!({
            "typ": typ, "alg": "ES256",
            "jwk": {"kty": "EC", "crv": "P-256", "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..])},
        });
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = key.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
        format!("{signed}.{}", B64.encode(sig))
    }

    #[test]
    fn each_check_refuses_on_its_own() {
        let rng = SystemRandom::new();
        let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let now = 1_700_000_000;
        let claims = |jti: &str| {
            serde_json::json!({"jti": jti, "htm": "GET", "htu": "http://h/p", "iat": now,
                "ath": ath("at"), "nonce": "n1"})
        };
        let expected = Expected {
            htm: "GET",
            htu: "http://h/p",
            ath: Some(ath("at")),
            nonce: Some("n1"),
        };
        let mut jtis = HashMap::new();
        let good = proof(&key, claims("a"), "dpop+jwt");
        let jkt = verify(&good, &expected, &mut jtis, now).unwrap();
        assert_eq!(jkt.len(), 43);
        let invalid =
            |p: &str, jtis: &mut HashMap<String, u64>| match verify(p, &expected, jtis, now) {
                Err(ProofError::Invalid(why)) => why,
                other => panic!("{other:?}"),
            };
        assert!(invalid(&good, &mut jtis).contains("jti already used"));
        assert!(invalid(&proof(&key, claims("b"), "JWT"), &mut jtis).contains("typ"));
        let mut wrong = claims("c");
        wrong["htu"] = "http://h/other".into();
        assert!(invalid(&proof(&key, wrong, "dpop+jwt"), &mut jtis).contains("htu"));
        let mut wrong = claims("d");
        wrong["ath"] = ath("another").into();
        assert!(invalid(&proof(&key, wrong, "dpop+jwt"), &mut jtis).contains("ath"));
        let mut wrong = claims("e");
        wrong["iat"] = (now - 600).into();
        assert!(invalid(&proof(&key, wrong, "dpop+jwt"), &mut jtis).contains("iat"));
        // Another valid signature: the one of a different proof, on this one's header and claims.
        let other = proof(&key, claims("x"), "dpop+jwt");
        let mine = proof(&key, claims("f"), "dpop+jwt");
        let tampered = format!(
            "{}.{}",
            mine.rsplit_once('.').unwrap().0,
            other.rsplit_once('.').unwrap().1
        );
        assert!(invalid(&tampered, &mut jtis).contains("signature"));
        let mut stale = claims("g");
        stale["nonce"] = "n0".into();
        let refused = verify(&proof(&key, stale, "dpop+jwt"), &expected, &mut jtis, now);
        assert_eq!(refused, Err(ProofError::Nonce));
    }
}
