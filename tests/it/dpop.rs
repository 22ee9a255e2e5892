//! DPoP (RFC 9449) against a simulator that binds tokens strictly: a proof with every token
//! request and every API request, each fresh; the nonce challenges of the token endpoint and
//! the API answered without a refresh; the key kept in the token record (sealed with the
//! rest), so a restart refreshes with the key the lineage is bound to.

use crate::common;

use common::{Harness, Setup};
use http_body_util::Full;
use tollgate_sim::identity::IdentityConfig;

fn dpop_setup(identity: IdentityConfig) -> Setup {
    Setup {
        identity: IdentityConfig {
            dpop: true,
            ..identity
        },
        extra_auth: "dpop = true".into(),
        ..Setup::default()
    }
}

/// Every API request carries `Authorization: DPoP` and a proof the API checks (method, URL,
/// token hash, key, a jti never seen); across refreshes and a 401 replay, each send has a new
/// proof, and no refresh token is spent twice.
#[tokio::test]
async fn tokens_are_bound_and_every_request_proves_the_key() {
    let logs = common::logs();
    let h = Harness::start(dpop_setup(IdentityConfig::default())).await;
    for round in 0..3 {
        let answer = h.get(&format!("/items/{round}?top=5")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let sent = h.api.last_authorization().unwrap();
        assert!(sent.starts_with("DPoP "), "{sent}");
        h.identity.expire_access_tokens();
    }
    // The API refuses the token once: a refresh, and the replay with a new proof.
    h.api.reject_next(1);
    let post = http::Request::post(h.url("/orders"))
        .body(Full::from("{\"n\":1}"))
        .unwrap();
    let answer = h.send(post).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.text().contains("{\\\"n\\\":1}"), "{}", answer.text());
    h.assert_lineage_intact();
    let stored = h.stored();
    assert!(
        stored["dpop_key"].is_string(),
        "the key is in the record: {stored}"
    );
    let key = stored["dpop_key"].as_str().unwrap();
    assert!(!logs.text().contains(key), "the DPoP key in the logs");
}

/// The token endpoint and the API each want a nonce: their `use_dpop_nonce` answers are met
/// by sending once more with it — the API's with the same token, no refresh — and a nonce
/// that changes later is learnt the same way.
#[tokio::test]
async fn nonce_challenges_are_answered_without_a_refresh() {
    let h = Harness::start(dpop_setup(IdentityConfig {
        dpop_nonce: true,
        api_dpop_nonce: true,
        ..IdentityConfig::default()
    }))
    .await;
    let post = |path: &str| {
        http::Request::post(h.url(path))
            .body(Full::from("body-kept"))
            .unwrap()
    };
    let answer = h.send(post("/first")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.text().contains("body-kept"), "{}", answer.text());
    let counters = h.identity.counters();
    assert_eq!(
        counters.dpop_challenges, 2,
        "one at the token endpoint, one at the API"
    );
    let issued = counters.issued;

    h.identity.rotate_dpop_nonce();
    let answer = h.send(post("/after-rotation")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let counters = h.identity.counters();
    assert_eq!(counters.dpop_challenges, 3);
    assert_eq!(
        counters.issued, issued,
        "the API's challenge is no reason to refresh"
    );
    h.assert_lineage_intact();
}

/// The key lives in the token record: after a restart, the refresh token (bound to the key)
/// is redeemed with proofs by the same key; with `[state] key` the key is sealed with the
/// record's other secrets.
#[tokio::test]
async fn the_key_is_kept_in_the_sealed_record_across_a_restart() {
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let mut h = Harness::start(Setup {
        extra_state: format!("key = \"{key}\""),
        ..dpop_setup(IdentityConfig::default())
    })
    .await;
    assert_eq!(h.get("/before").await.status, 200);
    let stored = h.stored();
    assert!(
        stored.get("dpop_key").is_none(),
        "sealed, not plain: {stored}"
    );
    assert!(
        stored["sealed"].is_object() || stored["sealed"].is_string(),
        "{stored}"
    );
    h.stop_proxy().await;
    h.identity.expire_access_tokens();
    h.start_proxy().await;
    let answer = h.get("/after").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(h.identity.counters().refreshes >= 2);
    h.assert_lineage_intact();
}

/// An identity server that does not bind tokens answers `token_type: Bearer`: refused, with
/// words that say what to change.
#[tokio::test]
async fn a_server_without_dpop_is_named() {
    let h = Harness::start(Setup {
        extra_auth: "dpop = true".into(),
        ..Setup::default()
    })
    .await;
    let answer = h.get("/x").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(
        answer.text().contains("auth.dpop = false"),
        "{}",
        answer.text()
    );
}

/// A client that signs its login (`private_key_jwt`) and a token endpoint that wants a DPoP
/// nonce: the request sent again with the nonce carries a new assertion too (its `jti` is
/// single-use, and the strict server refuses one seen before).
#[tokio::test]
async fn a_nonce_challenge_gets_a_fresh_client_assertion_too() {
    use tollgate_sim::identity::ClientAuthRule;
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = crate::client_proof::ec_key();
    let key_file = dir.path().join("key.pem");
    std::fs::write(&key_file, &pem).unwrap();
    let h = Harness::start(Setup {
        extra_auth: format!(
            "dpop = true\nclient_auth = \"private_key_jwt\"\nprivate_key_file = \"{}\"",
            key_file.display()
        ),
        ..dpop_setup(IdentityConfig {
            client_auth: ClientAuthRule::PrivateKeyJwt,
            jwt_keys: vec![crate::client_proof::es256(None, public)],
            dpop_nonce: true,
            ..IdentityConfig::default()
        })
    })
    .await;
    for round in 0..2 {
        let answer = h.get(&format!("/signed/{round}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        h.identity.rotate_dpop_nonce();
        h.identity.expire_access_tokens();
    }
    assert_eq!(h.identity.counters().dpop_challenges, 2);
    assert_eq!(h.identity.last_assertion_key(), Some(Some(0)));
    h.assert_lineage_intact();
}
