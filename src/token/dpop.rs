//! DPoP (RFC 9449): a P-256 key per token lineage, and the proofs it signs — one with every
//! token request and one with every API request — that bind the tokens to the key, so a token
//! that leaks is of no use without it.
//!
//! The key lives in the lineage's token record (sealed with the record's other secrets when
//! `[state] key` is set), so a restart, another replica or a restore after data loss signs
//! with the key the tokens are bound to.
//!
//! Must not: show the private key (its `Debug` is the public key's thumbprint).

use crate::secret::Secret;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as P256};
use std::fmt;

/// A lineage's DPoP key.
pub struct DpopKey {
    pair: EcdsaKeyPair,
    /// PKCS#8, base64url: what the token record keeps.
    stored: Secret<String>,
    /// The encoded JWS header (`typ`, `alg`, `jwk`) and the `.` after it.
    header: String,
    /// RFC 7638 thumbprint of the public key (`jkt`).
    thumbprint: String,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DpopKey(jkt {})", self.thumbprint)
    }
}

impl DpopKey {
    /// A new key.
    pub fn generate() -> Result<DpopKey, String> {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&P256, &SystemRandom::new())
            .map_err(|_| "no randomness for a DPoP key".to_owned())?;
        DpopKey::from_pkcs8(pkcs8.as_ref())
    }

    /// The key a token record kept.
    pub fn from_stored(stored: &Secret<String>) -> Result<DpopKey, String> {
        let der = Secret::new(
            B64.decode(stored.expose())
                .map_err(|_| "the record's DPoP key is not base64url".to_owned())?,
        );
        DpopKey::from_pkcs8(der.expose())
    }

    fn from_pkcs8(der: &[u8]) -> Result<DpopKey, String> {
        let pair = EcdsaKeyPair::from_pkcs8(&P256, der, &SystemRandom::new())
            .map_err(|_| "the DPoP key is not a P-256 key".to_owned())?;
        // An uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
        // RFC 7638: the required members, in lexicographic order, no spaces.
        let jwk = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let digest = ring::digest::digest(&ring::digest::SHA256, jwk.as_bytes());
        let header = format!(r#"{{"typ":"dpop+jwt","alg":"ES256","jwk":{jwk}}}"#);
        Ok(DpopKey {
            pair,
            stored: Secret::new(B64.encode(der)),
            header: format!("{}.", B64.encode(header)),
            thumbprint: B64.encode(digest),
        })
    }

    /// The key as a token record keeps it.
    pub fn stored(&self) -> &Secret<String> {
        &self.stored
    }

    /// The public key's thumbprint (`jkt`, RFC 7638), base64url.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A proof for a request with method `htm` to `htu` (scheme, authority and path, no query),
    /// at `now` (Unix seconds): `ath` (of the access token) on API requests, and the server's
    /// `nonce` when it asked for one.
    pub fn proof(
        &self,
        htm: &str,
        htu: &str,
        ath: Option<&str>,
        nonce: Option<&str>,
        now: u64,
    ) -> Result<String, String> {
        let mut jti = [0u8; 16];
        let rng = SystemRandom::new();
        rng.fill(&mut jti)
            .map_err(|_| "no randomness for a DPoP proof".to_owned())?;
        // Written out rather than built as a JSON value: this runs for every API request.
        // `ath` and `jti` are base64url; the strings that could hold a quote are escaped.
        let text = |s: &str| serde_json::to_string(s).expect("a string serialises");
        let mut claims = format!(
            r#"{{"jti":"{}","htm":{},"htu":{},"iat":{now}"#,
            B64.encode(jti),
            text(htm),
            text(htu)
        );
        if let Some(ath) = ath {
            claims.push_str(&format!(r#","ath":"{ath}""#));
        }
        if let Some(nonce) = nonce {
            claims.push_str(&format!(r#","nonce":{}"#, text(nonce)));
        }
        claims.push('}');
        let mut jwt = String::with_capacity(self.header.len() + claims.len() * 4 / 3 + 100);
        jwt.push_str(&self.header);
        jwt.push_str(&B64.encode(claims));
        let signature = self
            .pair
            .sign(&rng, jwt.as_bytes())
            .map_err(|_| "the DPoP proof could not be signed".to_owned())?;
        jwt.push('.');
        jwt.push_str(&B64.encode(signature));
        Ok(jwt)
    }
}

/// `ath`: the base64url SHA-256 of an access token.
pub fn ath(access_token: &str) -> String {
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        access_token.as_bytes(),
    ))
}

/// `htu` of `url`: scheme, authority and path, without query and fragment (RFC 9449 §4.2).
pub fn htu(url: &url::Url) -> String {
    let mut htu = url.clone();
    htu.set_query(None);
    htu.set_fragment(None);
    htu.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn a_proof_verifies_with_the_key_in_its_header_and_the_key_survives_the_record() {
        let key = DpopKey::generate().unwrap();
        let again = DpopKey::from_stored(key.stored()).unwrap();
        assert_eq!(again.thumbprint(), key.thumbprint(), "the same key back");
        assert!(format!("{key:?}").starts_with("DpopKey(jkt "));
        assert!(!format!("{key:?}").contains(key.stored().expose()));

        let proof = again
            .proof(
                "GET",
                "https://api.example/v1/x",
                Some(&ath("at")),
                Some("n1"),
                1_700_000_000,
            )
            .unwrap();
        let parts: Vec<&str> = proof.split('.').collect();
        let json = |p: &str| -> serde_json::Value {
            serde_json::from_slice(&B64.decode(p).unwrap()).unwrap()
        };
        let (header, claims) = (json(parts[0]), json(parts[1]));
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://api.example/v1/x");
        assert_eq!(claims["nonce"], "n1");
        assert_eq!(claims["ath"], ath("at"));
        let jwk = &header["jwk"];
        let point: Vec<u8> = [
            vec![4u8],
            B64.decode(jwk["x"].as_str().unwrap()).unwrap(),
            B64.decode(jwk["y"].as_str().unwrap()).unwrap(),
        ]
        .concat();
        let signed = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(signed.as_bytes(), &B64.decode(parts[2]).unwrap())
            .expect("a valid signature");
        let other = again
            .proof("GET", "https://api.example/v1/x", None, None, 1)
            .unwrap();
        assert_ne!(json(other.split('.').nth(1).unwrap())["jti"], claims["jti"]);
    }

    #[test]
    fn htu_leaves_out_query_and_fragment() {
        let url = url::Url::parse("https://api.example:8443/v1/items?top=5#x").unwrap();
        assert_eq!(htu(&url), "https://api.example:8443/v1/items");
    }
}
