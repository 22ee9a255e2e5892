//! No secret or token ever appears in logs, error responses, `check` output or Debug output.
//! The log is the test binary's own ([`common::logs`]).

use crate::common;

use common::{Harness, Setup};
use std::time::Duration;
use tollgate_sim::identity::IdentityConfig;

/// A full run at trace level for every crate — refreshes, a replay after 401, rotations,
/// identity failures, invalid_grant, a restart — then every token the identity server ever
/// issued, the client secret and the seed are searched for in everything the proxy printed
/// or answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_in_logs_errors_or_debug() {
    let logs = common::logs();

    let mut h = Harness::start(Setup {
        identity: IdentityConfig {
            client_secret: "very-secret-client-credential".into(),
            access_lifetime: Duration::from_secs(2),
            ..IdentityConfig::default()
        },
        extra_auth: "refresh_wait = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    let mut answers = Vec::new();
    for i in 0..5 {
        answers.push(h.get(&format!("/a/{i}")).await);
    }
    h.api.reject_next(1);
    answers.push(h.post("/secrets-replay", "payload").await);
    tokio::time::sleep(Duration::from_millis(1800)).await; // one refresh ahead
    answers.push(h.get("/after-ahead").await);
    h.identity.fail_next(2, 500);
    h.identity.garbage_next(1);
    h.identity.expire_access_tokens();
    answers.push(h.get("/after-failures").await);
    h.stop_proxy().await;
    h.start_proxy().await;
    answers.push(h.get("/after-restart").await);
    h.identity.revoke_all();
    h.identity.expire_access_tokens();
    let refused = h.get("/secrets-after-revoke").await;
    assert_eq!(refused.status, 503);
    answers.push(refused);

    let config = h.config();
    let printed = format!("{}\n{:?}\n{:#?}", config.describe(), config, config);
    let log_text = logs.text();
    assert!(log_text.contains("token refreshed"), "logs were captured");
    assert!(log_text.contains("TRACE") || log_text.contains("DEBUG"));
    // One access line per request: the replayed POST, with its upstream time and the
    // fingerprint of the token that was finally sent; a refused one with its status.
    let replayed = log_text
        .lines()
        .find(|l| l.contains("tollgate::access") && l.contains("path=/secrets-replay"))
        .expect("an access line for /secrets-replay");
    assert!(
        replayed.contains("method=POST") && replayed.contains("status=200"),
        "{replayed}"
    );
    assert!(
        replayed.contains("upstream_ms=")
            && replayed.contains("token=")
            && !replayed.contains("token=-"),
        "{replayed}"
    );
    assert!(log_text
        .lines()
        .any(|l| l.contains("path=/secrets-after-revoke") && l.contains("status=503")));

    let mut secrets = h.identity.issued_tokens();
    // Guaranteed: the seed, then access + refresh token from the first refresh, the replay's
    // refresh and the refresh after the failures. The refresh ahead is timing-dependent.
    assert!(secrets.len() >= 7, "tokens issued: {}", secrets.len());
    secrets.push("very-secret-client-credential".into());
    secrets.push(h.seed.clone());
    // Error responses are tollgate's own words; echoed API answers legitimately hold the
    // token the API received, so only tollgate-made answers are searched.
    let own_answers: String = answers
        .iter()
        .filter(|a| {
            a.headers
                .get("content-type")
                .is_some_and(|c| c == "application/problem+json")
        })
        .map(|a| String::from_utf8_lossy(&a.body).into_owned())
        .collect();
    assert!(!own_answers.is_empty());
    for secret in &secrets {
        assert!(
            !log_text.contains(secret.as_str()),
            "a secret leaked into the logs"
        );
        assert!(
            !printed.contains(secret.as_str()),
            "a secret leaked into check/Debug output"
        );
        assert!(
            !own_answers.contains(secret.as_str()),
            "a secret leaked into an error response"
        );
    }
}
