//! Client assertions (RFC 7523 §2.2 with RFC 7521 §4.2): instead of a client secret, a short
//! JWT the client signs, sent as `client_assertion` with `client_assertion_type`.
//!
//! - `private_key_jwt`: signed with the client's private key, PKCS#8 PEM (or PKCS#1 for RSA):
//!   EC P-256 → ES256, RSA → RS256 (or PS256 with `assertion_alg`), Ed25519 → EdDSA. `key_id` goes in the header as `kid`; a
//!   `certificate_file` puts its SHA-1 and SHA-256 thumbprints there as `x5t` and `x5t#S256`
//!   (Entra ID identifies a certificate credential by them).
//! - `client_secret_jwt`: HS256 with the client secret as the key (RFC 7518 §3.2: at least 32
//!   bytes).
//!
//! Each assertion: `iss` = `sub` = the client id, `aud` = the token endpoint (or
//! `assertion_audience`), a random `jti`, `iat` now, `nbf` 30 seconds back (a clock a little
//! ahead of the server's), and `exp` one minute on.
//!
//! Must not: show a key, a secret or an assertion anywhere (an assertion is a credential for
//! its minute): [`Signer`]'s `Debug` names the algorithm alone.

use crate::secret::Secret;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::sync::Arc;

/// `client_assertion_type` for a JWT (RFC 7523 §2.2).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid: long enough for a slow network, short enough that one
/// caught in flight is of little use (and the server's replay cache small).
const LIFETIME_S: u64 = 60;

/// How far back `nbf` is set, for a clock ahead of the server's.
const CLOCK_SLACK_S: u64 = 30;

/// The smallest HS256 key RFC 7518 §3.2 allows.
const MIN_SECRET: usize = 32;

/// A key that signs assertions.
pub enum Signer {
    Es256(EcdsaKeyPair),
    /// RS256, or PS256 (RSASSA-PSS) when `pss`.
    Rsa {
        key: RsaKeyPair,
        pss: bool,
    },
    EdDsa(Ed25519KeyPair),
    Hs256(ring::hmac::Key),
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({})", self.alg())
    }
}

impl Signer {
    /// The private key in `pem` (the contents of `private_key_file`).
    pub fn private_key(pem: &[u8]) -> Result<Signer, String> {
        let rng = SystemRandom::new();
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
            "holds no PEM private key: write it as PKCS#8 (-----BEGIN PRIVATE KEY-----)".to_owned()
        })?;
        match der {
            PrivateKeyDer::Pkcs8(der) => {
                let der = der.secret_pkcs8_der();
                let p256 = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
                if let Ok(key) = EcdsaKeyPair::from_pkcs8(p256, der, &rng) {
                    return Ok(Signer::Es256(key));
                }
                if let Ok(key) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                    return Ok(Signer::EdDsa(key));
                }
                RsaKeyPair::from_pkcs8(der).map(Signer::rsa).map_err(|e| {
                    format!("is not an EC P-256, RSA (2048 bits or more) or Ed25519 key ({e})")
                })
            }
            PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der())
                .map(Signer::rsa)
                .map_err(|e| format!("is not a usable RSA key ({e})")),
            PrivateKeyDer::Sec1(_) => Err("is an EC key in SEC1 form (-----BEGIN EC PRIVATE KEY-----): convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`".into()),
            _ => Err("is a private key of a kind tollgate cannot sign with".into()),
        }
    }

    fn rsa(key: RsaKeyPair) -> Signer {
        Signer::Rsa { key, pss: false }
    }

    /// The same key signing with `alg` (`assertion_alg`), when it can: an RSA key signs RS256
    /// or PS256, any key its own algorithm.
    pub fn with_alg(self, alg: Option<&str>) -> Result<Signer, String> {
        match (self, alg) {
            (signer, None) => Ok(signer),
            (Signer::Rsa { key, .. }, Some("RS256")) => Ok(Signer::Rsa { key, pss: false }),
            (Signer::Rsa { key, .. }, Some("PS256")) => Ok(Signer::Rsa { key, pss: true }),
            (signer, Some(alg)) if signer.alg() == alg => Ok(signer),
            (signer, Some(alg)) => Err(format!(
                "assertion_alg = \"{alg}\" cannot be signed with this key, which signs {} (RS256 and PS256 need an RSA key)",
                signer.alg()
            )),
        }
    }

    /// HS256 with the client secret (`client_secret_jwt`).
    pub fn secret(secret: &str) -> Result<Signer, String> {
        if secret.len() < MIN_SECRET {
            return Err(format!("client_secret_jwt signs with HS256, whose key must be at least {MIN_SECRET} bytes (RFC 7518 §3.2); this client secret is shorter: ask the identity server for a longer one, or use post or basic"));
        }
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        Ok(Signer::Hs256(key))
    }

    /// The JWS `alg`.
    pub fn alg(&self) -> &'static str {
        match self {
            Signer::Es256(_) => "ES256",
            Signer::Rsa { pss: false, .. } => "RS256",
            Signer::Rsa { pss: true, .. } => "PS256",
            Signer::EdDsa(_) => "EdDSA",
            Signer::Hs256(_) => "HS256",
        }
    }

    /// The public key, as the identity server registers it (for the simulator and tests):
    /// an uncompressed P-256 point, an RSAPublicKey (DER), or the 32 Ed25519 bytes.
    pub fn public_key(&self) -> Option<Vec<u8>> {
        match self {
            Signer::Es256(k) => Some(k.public_key().as_ref().to_vec()),
            Signer::Rsa { key, .. } => Some(key.public_key().as_ref().to_vec()),
            Signer::EdDsa(k) => Some(k.public_key().as_ref().to_vec()),
            Signer::Hs256(_) => None,
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let rng = SystemRandom::new();
        let failed = |_| "the assertion could not be signed".to_owned();
        Ok(match self {
            Signer::Es256(k) => k.sign(&rng, message).map_err(failed)?.as_ref().to_vec(),
            Signer::Rsa { key, pss } => {
                let encoding: &dyn signature::RsaEncoding = match pss {
                    true => &signature::RSA_PSS_SHA256,
                    false => &signature::RSA_PKCS1_SHA256,
                };
                let mut out = vec![0; key.public().modulus_len()];
                key.sign(encoding, &rng, message, &mut out)
                    .map_err(failed)?;
                out
            }
            Signer::EdDsa(k) => k.sign(message).as_ref().to_vec(),
            Signer::Hs256(k) => ring::hmac::sign(k, message).as_ref().to_vec(),
        })
    }
}

/// The thumbprints of the first certificate in `pem` (`certificate_file`): (`x5t`,
/// `x5t#S256`), base64url.
pub fn thumbprints(pem: &[u8]) -> Result<(String, String), String> {
    let der = CertificateDer::from_pem_slice(pem)
        .map_err(|_| "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned())?;
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
    let sha256 = ring::digest::digest(&ring::digest::SHA256, &der);
    Ok((B64.encode(sha1), B64.encode(sha256)))
}

/// What makes the assertions of one client: its signer and the JWS header, made once.
#[derive(Debug, Clone)]
pub struct Assertions {
    signer: Arc<Signer>,
    /// The encoded header, with the `.` that follows it.
    header: String,
    audience: String,
}

impl Assertions {
    /// Assertions signed by `signer`, for `audience`; the header names `key_id` and the
    /// certificate's `thumbprints` when given.
    pub fn new(
        signer: Arc<Signer>,
        key_id: Option<&str>,
        thumbprints: Option<&(String, String)>,
        audience: &str,
    ) -> Assertions {
        let mut header = serde_json::Map::new();
        header.insert("alg".into(), signer.alg().into());
        header.insert("typ".into(), "JWT".into());
        if let Some(kid) = key_id {
            header.insert("kid".into(), kid.into());
        }
        if let Some((sha1, sha256)) = thumbprints {
            header.insert("x5t".into(), sha1.as_str().into());
            header.insert("x5t#S256".into(), sha256.as_str().into());
        }
        let json = serde_json::Value::Object(header).to_string();
        Assertions {
            signer,
            header: format!("{}.", B64.encode(json)),
            audience: audience.to_owned(),
        }
    }

    /// A fresh assertion for `client_id`, issued at `now` (Unix seconds).
    pub fn make(&self, client_id: &str, now: u64) -> Result<Secret<String>, String> {
        let mut jti = [0u8; 16];
        SystemRandom::new()
            .fill(&mut jti)
            .map_err(|_| "no randomness for the assertion's jti".to_owned())?;
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": self.audience,
            "jti": B64.encode(jti),
            "iat": now,
            // A clock a little ahead of the server's does not make it "not yet valid".
            "nbf": now.saturating_sub(CLOCK_SLACK_S),
            "exp": now + LIFETIME_S,
        });
        let mut jwt = self.header.clone();
        jwt.push_str(&B64.encode(claims.to_string()));
        let signature = self.signer.sign(jwt.as_bytes())?;
        jwt.push('.');
        jwt.push_str(&B64.encode(signature));
        Ok(Secret::from(jwt))
    }
}

/// Seconds since the Unix epoch, as the claims count them.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::UnparsedPublicKey;

    fn pem(label: &str, der: &[u8]) -> Vec<u8> {
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
        .into_bytes()
    }

    fn parts(jwt: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>, String) {
        let mut it = jwt.split('.');
        let (h, c, s) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let json = |p: &str| serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
        (json(h), json(c), B64.decode(s).unwrap(), format!("{h}.{c}"))
    }

    #[test]
    fn an_es256_assertion_verifies_with_the_public_key_and_says_who_and_for_whom() {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let signer = Arc::new(Signer::private_key(&pem("PRIVATE KEY", pkcs8.as_ref())).unwrap());
        assert_eq!(format!("{signer:?}"), "Signer(ES256)");
        let public = signer.public_key().unwrap();
        let thumbs = ("sha1".to_owned(), "sha256".to_owned());
        let assertions = Assertions::new(signer, Some("k1"), Some(&thumbs), "https://id/token");
        let jwt = assertions.make("my-client", 1_700_000_000).unwrap();
        let (header, claims, sig, signed) = parts(jwt.expose());
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "k1");
        assert_eq!(header["x5t#S256"], "sha256");
        assert_eq!(claims["iss"], "my-client");
        assert_eq!(claims["sub"], "my-client");
        assert_eq!(claims["aud"], "https://id/token");
        assert_eq!(claims["exp"].as_u64(), Some(1_700_000_060));
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
            .verify(signed.as_bytes(), &sig)
            .expect("a valid signature");
        let again = assertions.make("my-client", 1_700_000_000).unwrap();
        assert_ne!(
            parts(again.expose()).1["jti"],
            claims["jti"],
            "a fresh jti each time"
        );
    }

    #[test]
    fn ed25519_and_hs256_sign_and_bad_keys_are_explained() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let signer = Signer::private_key(&pem("PRIVATE KEY", pkcs8.as_ref())).unwrap();
        assert_eq!(signer.alg(), "EdDSA");
        let public = signer.public_key().unwrap();
        let jwt = Assertions::new(Arc::new(signer), None, None, "aud")
            .make("c", 1)
            .unwrap();
        let (header, _, sig, signed) = parts(jwt.expose());
        assert!(header.get("kid").is_none());
        UnparsedPublicKey::new(&signature::ED25519, &public)
            .verify(signed.as_bytes(), &sig)
            .unwrap();

        let secret = "0123456789abcdef0123456789abcdef";
        let jwt = Assertions::new(Arc::new(Signer::secret(secret).unwrap()), None, None, "aud")
            .make("c", 1)
            .unwrap();
        let (_, _, sig, signed) = parts(jwt.expose());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        ring::hmac::verify(&key, signed.as_bytes(), &sig).unwrap();
        assert!(Signer::secret("short")
            .unwrap_err()
            .contains("at least 32 bytes"));

        assert!(Signer::private_key(b"not a key")
            .unwrap_err()
            .contains("PKCS#8"));
        let ec = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng);
        let ec = Signer::private_key(&pem("PRIVATE KEY", ec.unwrap().as_ref())).unwrap();
        let refused = ec.with_alg(Some("PS256")).unwrap_err();
        assert!(refused.contains("which signs ES256"), "{refused}");
        let sec1 = pem("EC PRIVATE KEY", &[0x30, 0x00]);
        assert!(Signer::private_key(&sec1)
            .unwrap_err()
            .contains("openssl pkcs8"));
    }
}
