//! Client proof beyond a shared secret at the token endpoint: `private_key_jwt` (ES256 with a
//! `kid`, RS256 with a certificate's thumbprints, as Entra ID wants) and `client_secret_jwt`,
//! against a simulator that checks every assertion strictly; the key re-read on reload; the
//! refusals said in words; no key and no assertion in logs or in `check`.

use crate::common;

use common::{Harness, Setup};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tollgate_sim::identity::assertion::JwtKey;
use tollgate_sim::identity::{ClientAuthRule, IdentityConfig};

const RSA_KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/rsa-client-key.pem"
);
const RSA_CERT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/rsa-client-cert.pem"
);
/// SHA-256 of the certificate's DER, base64url, as openssl computed it (tests/fixtures).
const RSA_CERT_S256: &str = "eY2lWBQetw590tTWrsHepUELvZKubJ_VoThdC9xM_eU";
/// Its SHA-1, the same way.
const RSA_CERT_SHA1: &str = "wqltuFe2xm_bcry1Hets3KB9td4";

/// A new EC P-256 key: its PKCS#8 PEM, and the public key as the server registers it.
pub(crate) fn ec_key() -> (String, Vec<u8>) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let body = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let lines: Vec<String> = body
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    );
    (pem, pair.public_key().as_ref().to_vec())
}

use base64::Engine;

pub(crate) fn es256(kid: Option<&str>, public_key: Vec<u8>) -> JwtKey {
    JwtKey {
        kid: kid.map(str::to_owned),
        alg: "ES256",
        public_key,
        x5t_s256: None,
        x5t: None,
    }
}

/// A harness whose identity server takes `private_key_jwt` with `keys`, tollgate signing with
/// the key file `extra_auth` names.
async fn with_keys(keys: Vec<JwtKey>, extra_auth: String) -> Harness {
    Harness::start(Setup {
        identity: IdentityConfig {
            client_auth: ClientAuthRule::PrivateKeyJwt,
            jwt_keys: keys,
            ..IdentityConfig::default()
        },
        extra_auth,
        ..Setup::default()
    })
    .await
}

/// ES256 with a `kid`: every token request carries a fresh assertion the strict server accepts
/// (a reused `jti` would be refused), over several rotations; nothing of the key or of an
/// assertion reaches the logs.
#[tokio::test]
async fn private_key_jwt_signs_every_token_request() {
    let logs = common::logs();
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = ec_key();
    let key_file = dir.path().join("client-key.pem");
    std::fs::write(&key_file, &pem).unwrap();
    let h = with_keys(
        vec![es256(Some("k1"), public)],
        format!(
            "client_auth = \"private_key_jwt\"\nprivate_key_file = \"{}\"\nkey_id = \"k1\"",
            key_file.display()
        ),
    )
    .await;
    for round in 0..3 {
        let answer = h.get(&format!("/round/{round}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        h.identity.expire_access_tokens();
    }
    assert_eq!(h.identity.last_assertion_key(), Some(Some(0)));
    assert!(h.identity.counters().refreshes >= 3);
    h.assert_lineage_intact();
    let logs = logs.text();
    let pem_body = pem.lines().nth(1).unwrap();
    assert!(!logs.contains(pem_body), "the key in the logs");
    // Every assertion starts with the base64url of `{"alg":`.
    assert!(!logs.contains("eyJhbGciOi"), "an assertion in the logs");

    let out = h.check_config("tollgate.toml", &h.config_text).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("private_key_jwt"), "{}", out.stdout);
    assert!(out.stdout.contains("auth.key_id"), "{}", out.stdout);
    assert!(!out.stdout.contains(pem_body), "{}", out.stdout);
    let gone = h.config_text.replace("client-key.pem", "no-such-key.pem");
    let out = h.check_config("gone.toml", &gone).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("auth.private_key_file") && out.stderr.contains("cannot be read"),
        "{}",
        out.stderr
    );
}

/// RS256 with the key's certificate: the header carries its thumbprints, by which the server
/// (as Entra ID does) finds the key; no `kid`.
#[tokio::test]
async fn private_key_jwt_with_a_certificate_sends_its_thumbprints() {
    let pem = std::fs::read(RSA_KEY).unwrap();
    let signer = tollgate::token::assertion::Signer::private_key(&pem).unwrap();
    assert_eq!(signer.alg(), "RS256");
    let registered = JwtKey {
        kid: None,
        alg: "RS256",
        public_key: signer.public_key().unwrap(),
        x5t_s256: Some(RSA_CERT_S256.to_owned()),
        x5t: Some(RSA_CERT_SHA1.to_owned()),
    };
    let auth = format!(
        "client_auth = \"private_key_jwt\"\nprivate_key_file = \"{RSA_KEY}\"\ncertificate_file = \"{RSA_CERT}\""
    );
    let h = with_keys(vec![registered.clone()], auth.clone()).await;
    let answer = h.get("/entra").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(h.identity.last_assertion_key(), Some(Some(0)));

    // PS256 with the same key, as Entra ID's current docs show it.
    let pss = JwtKey {
        alg: "PS256",
        ..registered.clone()
    };
    let h = with_keys(vec![pss], format!("{auth}\nassertion_alg = \"PS256\"")).await;
    let answer = h.get("/entra-pss").await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    // Without the certificate the server cannot tell which key signed: refused, and said so.
    let without = with_keys(
        vec![registered],
        auth.replace(&format!("\ncertificate_file = \"{RSA_CERT}\""), ""),
    )
    .await;
    let answer = without.get("/no-thumbprint").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(
        answer.text().contains("invalid_client"),
        "{}",
        answer.text()
    );
    assert!(answer.text().contains("x5t#S256"), "{}", answer.text());
}

/// `client_secret_jwt`: HS256 with the client secret, which itself is never sent.
#[tokio::test]
async fn client_secret_jwt_signs_with_the_secret() {
    let h = Harness::start(Setup {
        identity: IdentityConfig {
            client_auth: ClientAuthRule::ClientSecretJwt,
            client_secret: "a-client-secret-of-forty-characters-long".to_owned(),
            ..IdentityConfig::default()
        },
        extra_auth: "client_auth = \"client_secret_jwt\"".into(),
        ..Setup::default()
    })
    .await;
    for round in 0..2 {
        let answer = h.get(&format!("/hs/{round}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        h.identity.expire_access_tokens();
    }
    assert_eq!(h.identity.last_assertion_key(), Some(None));
    h.assert_lineage_intact();

    // A secret too short for HS256 is refused before anything is sent.
    let short = h
        .config_text
        .replace("a-client-secret-of-forty-characters-long", "short-secret");
    let out = h.check_config("short.toml", &short).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("at least 32 bytes"), "{}", out.stderr);
    assert!(!out.stderr.contains("short-secret"), "{}", out.stderr);
}

/// The server refuses an assertion for another audience, and one signed by a key it does not
/// know: the client gets a 503 that says why, and the lineage is not spent.
#[tokio::test]
async fn refused_assertions_are_said_in_words() {
    let logs = common::logs();
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = ec_key();
    let (stranger, _) = ec_key();
    let key_file = dir.path().join("key.pem");
    std::fs::write(&key_file, &pem).unwrap();
    let auth = format!(
        "client_auth = \"private_key_jwt\"\nprivate_key_file = \"{}\"\nassertion_audience = \"https://issuer.example\"",
        key_file.display()
    );
    let h = with_keys(vec![es256(None, public)], auth).await;
    let answer = h.get("/wrong-audience").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(answer.text().contains("aud is not"), "{}", answer.text());

    let mut h = h;
    std::fs::write(&key_file, &stranger).unwrap();
    let text = h
        .config_text
        .replace("\nassertion_audience = \"https://issuer.example\"", "");
    h.reload(&text).await.expect("reloaded");
    let answer = h.get("/unknown-key").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(
        answer.text().contains("signature does not verify"),
        "{}",
        answer.text()
    );
    assert_eq!(h.identity.counters().refreshes, 0, "no refresh token spent");
    let logs = logs.text();
    assert!(logs.contains("aud is not"), "the refusal is logged");
    assert!(!logs.contains("eyJhbGciOi"), "an assertion in the logs");
    assert!(
        !logs.contains(pem.lines().nth(1).unwrap()),
        "the key in the logs"
    );
    assert_eq!(h.identity.counters().grants_revoked, 0);
}

/// The key file is read again on reload: a rotated key (same path, same config) signs the
/// next token request, which the changed setting makes due at once.
#[tokio::test]
async fn a_key_rotated_on_disk_is_used_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (old, old_public) = ec_key();
    let (new, new_public) = ec_key();
    let key_file = dir.path().join("key.pem");
    std::fs::write(&key_file, &old).unwrap();
    let auth = format!(
        "client_auth = \"private_key_jwt\"\nprivate_key_file = \"{}\"",
        key_file.display()
    );
    let mut h = with_keys(vec![es256(None, old_public), es256(None, new_public)], auth).await;
    assert_eq!(h.get("/old").await.status, 200);
    assert_eq!(h.identity.last_assertion_key(), Some(Some(0)));

    std::fs::write(&key_file, &new).unwrap();
    let text = h.config_text.clone();
    let before = h.identity.counters().refreshes;
    h.reload(&text).await.expect("reloaded");
    // A changed setting makes the token in use due: the next one comes with the new key.
    assert_eq!(h.get("/new").await.status, 200);
    common::until(|| h.identity.counters().refreshes > before).await;
    assert_eq!(
        h.identity.last_assertion_key(),
        Some(Some(1)),
        "signed with the new key"
    );
    h.assert_lineage_intact();

    // A file that holds no key fails the config (`check` and a reload refuse it, and the
    // running key stays), and says why.
    std::fs::write(&key_file, "not a key").unwrap();
    let err = tollgate::config::Config::parse(&text, "t.toml", |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth.private_key_file"), "{err}");
    assert!(err.contains("PKCS#8"), "{err}");
}
