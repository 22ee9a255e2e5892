//! Token lifecycle through the proxy: refresh ahead, replay after 401, single flight under
//! load with strict rotation, and identity-server failures.

use crate::common;

use common::{Harness, Setup};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_sim::identity::IdentityConfig;

fn lifetime(d: Duration) -> IdentityConfig {
    IdentityConfig {
        access_lifetime: d,
        ..IdentityConfig::default()
    }
}

/// With 2 s tokens, requests over 4.5 s never meet an expired token: the proxy refreshes
/// ahead of expiry, so the API never answers 401.
#[tokio::test]
async fn refreshes_ahead_of_expiry() {
    let h = Harness::start(Setup {
        identity: lifetime(Duration::from_secs(2)),
        ..Setup::default()
    })
    .await;
    let start = Instant::now();
    let mut generations = std::collections::BTreeSet::new();
    while start.elapsed() < Duration::from_millis(4500) {
        let a = h.get("/poll").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        generations.insert(a.echoed_header("authorization")[0].clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        h.api.counters().rejected,
        0,
        "no request met an expired token"
    );
    assert!(
        generations.len() >= 3,
        "two refreshes ahead of expiry: {}",
        generations.len()
    );
    assert!(h.identity.counters().refreshes >= 3);
}

/// A forced 401 on a POST: one refresh, and the body arrives intact on the replay.
#[tokio::test]
async fn replays_a_post_once_after_401() {
    let h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let refreshes = h.identity.counters().refreshes;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    h.api.reject_next(1);
    let a = h.post("/upload?x=1", body.clone()).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["body_len"], body.len());
    assert_eq!(a.json()["body_sha256"], sha256(&body));
    assert_eq!(a.json()["method"], "POST");
    assert_eq!(
        h.identity.counters().refreshes,
        refreshes + 1,
        "exactly one refresh"
    );
    assert_eq!(h.api.counters().rejected, 1);
}

/// Trailer fields of a chunked upload reach the API: with a body small enough to buffer, on
/// the replay after a 401 too; with a larger one, as it streams.
#[tokio::test]
async fn request_trailers_are_forwarded_on_the_replay_too() {
    use http_body_util::{BodyExt, Full};
    let h = Harness::start(Setup {
        extra_upstream: "retry_body_limit = \"1KiB\"".into(),
        ..Setup::default()
    })
    .await;
    assert_eq!(h.get("/warm").await.status, 200);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let send = |len: usize| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "sha256=abc123".parse().unwrap());
        let trailers = std::future::ready(Some(Ok::<_, std::convert::Infallible>(trailers)));
        let body = Full::new(bytes::Bytes::from(vec![7u8; len])).with_trailers(trailers);
        let request = http::Request::post(h.url("/signed"))
            .header("transfer-encoding", "chunked")
            .header("trailer", "x-checksum")
            .body(body)
            .unwrap();
        client.request(request)
    };
    let expected = serde_json::json!([["x-checksum", "sha256=abc123"]]);

    h.api.reject_next(1);
    let a = common::collect(send(512).await.unwrap()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(h.api.counters().rejected, 1, "sent twice");
    assert_eq!(a.json()["trailers"], expected, "on the replay");
    assert_eq!(a.json()["body_len"], 512);

    let a = common::collect(send(4096).await.unwrap()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["trailers"], expected, "streamed");
    assert_eq!(a.json()["body_len"], 4096);
}

/// A body above retry_body_limit streams through and is not replayed: the client gets the
/// upstream's 401 and no refresh is spent on a replay that cannot happen.
#[tokio::test]
async fn large_body_is_not_replayed() {
    let h = Harness::start(Setup {
        extra_upstream: "retry_body_limit = \"1KiB\"".into(),
        ..Setup::default()
    })
    .await;
    assert_eq!(h.get("/warm").await.status, 200);
    h.api.reject_next(1);
    let a = h.post("/upload", vec![7u8; 4096]).await;
    assert_eq!(a.status, 401);
    assert!(a.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    // Small bodies still replay.
    h.api.reject_next(1);
    assert_eq!(h.post("/upload", vec![7u8; 512]).await.status, 200);
}

/// 200 concurrent clients across two natural expiries and two forced invalidations: every
/// request succeeds, refreshes stay one per event (not one per request), and no refresh token
/// is ever redeemed twice — the strict simulator would have revoked the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_refresh_per_generation() {
    let h = Arc::new(
        Harness::start(Setup {
            identity: lifetime(Duration::from_secs(2)),
            ..Setup::default()
        })
        .await,
    );
    assert_eq!(h.get("/warm").await.status, 200);
    let start = Instant::now();
    let run_for = Duration::from_millis(4500);
    let mut clients = Vec::new();
    for i in 0..200 {
        let h = Arc::clone(&h);
        clients.push(tokio::spawn(async move {
            let mut ok = 0u32;
            while start.elapsed() < run_for {
                let a = h.post(&format!("/c/{i}"), format!("client {i}")).await;
                assert_eq!(
                    a.status,
                    200,
                    "client {i}: {}",
                    String::from_utf8_lossy(&a.body)
                );
                assert_eq!(a.json()["body"], format!("client {i}"));
                ok += 1;
            }
            ok
        }));
    }
    for at in [1000, 3000] {
        tokio::time::sleep_until((start + Duration::from_millis(at)).into()).await;
        h.identity.expire_access_tokens();
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    let ids = h.identity.counters();
    assert!(total > 400, "load ran: {total} requests");
    assert_eq!(ids.reuse_detected, 0, "no refresh token redeemed twice");
    assert_eq!(ids.grants_revoked, 0);
    assert!(
        h.api.counters().rejected >= 2,
        "the forced invalidations were seen"
    );
    // A 2 s token serves for 1 s (the expiry margin) and is replaced ahead after 0.8 s: over
    // 4.5 s, 1 initial + 4 ahead + 2 invalidations; allow one either way for timing.
    assert!(
        (6..=8).contains(&ids.refreshes),
        "refreshes: {}",
        ids.refreshes
    );
    assert_eq!(
        h.stored()["generation"],
        ids.refreshes,
        "one generation per refresh"
    );
}

/// The identity server fails three times: the request waits through the backoff and succeeds.
#[tokio::test]
async fn recovers_after_identity_failures() {
    let h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    h.identity.fail_next(3, 503);
    h.identity.expire_access_tokens();
    let a = h.get("/after").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(h.identity.counters().failures_injected, 3);
}

/// Garbage from the identity server is a transient failure, not a lost refresh token.
#[tokio::test]
async fn garbage_token_response_is_retried_and_loses_nothing() {
    let h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let stored = h.stored()["refresh_token"].clone();
    h.identity.garbage_next(2);
    h.identity.expire_access_tokens();
    assert_eq!(h.get("/after").await.status, 200);
    assert_ne!(
        h.stored()["refresh_token"],
        stored,
        "rotated once the server answered properly"
    );
    assert_eq!(h.identity.counters().reuse_detected, 0);
}

/// With the identity server down, a still-valid token keeps serving; once it expires the
/// proxy answers 503 problem+json with Retry-After and sends nothing upstream.
#[tokio::test]
async fn identity_down_serves_valid_token_then_503_when_expired() {
    let mut h = Harness::start(Setup {
        identity: lifetime(Duration::from_secs(3)),
        extra_auth: "refresh_wait = \"500ms\"".into(),
        ..Setup::default()
    })
    .await;
    assert_eq!(h.get("/warm").await.status, 200);
    h.identity_server.take().unwrap().shutdown().await;
    assert_eq!(
        h.get("/still").await.status,
        200,
        "valid token still served"
    );

    tokio::time::sleep(Duration::from_millis(3100)).await;
    let before = h.api.counters().requests;
    let a = h.get("/expired").await;
    assert_eq!(a.status, 503, "{:?}", a.body);
    assert_eq!(a.headers["content-type"], "application/problem+json");
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(
        a.json()["type"],
        "urn:tollgate:problem:identity-unavailable"
    );
    assert_eq!(
        h.api.counters().requests,
        before,
        "an expired token is never injected"
    );
}

/// A failing identity server is not hammered: with its token endpoint answering 503 and a
/// client sending a request a second for 40 s, the backoff grows across flights (200 ms
/// doubling, jittered, to a minute) whatever the number of requests waiting, so the server
/// sees a handful of token requests, and the clients get 503 with a Retry-After meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_identity_server_is_asked_less_and_less_often() {
    let h = Arc::new(
        Harness::start(Setup {
            identity: IdentityConfig {
                access_lifetime: Duration::from_secs(1),
                ..IdentityConfig::default()
            },
            extra_auth: "refresh_wait = \"2s\"".into(),
            ..Setup::default()
        })
        .await,
    );
    h.identity.fail_next(u32::MAX, 503);
    // The token the proxy may have fetched at its start has expired.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let asked = h.identity.counters().token_requests;
    let mut answers = Vec::new();
    for i in 0..40 {
        let h2 = Arc::clone(&h);
        answers.push(tokio::spawn(
            async move { h2.get(&format!("/x/{i}")).await },
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for answer in answers {
        let answer = answer.await.unwrap();
        assert_eq!(answer.status, 503, "{}", answer.text());
        assert!(answer.header("retry-after").parse::<u64>().unwrap() >= 1);
        // The reason quotes the last failure once, not the words of every request before.
        assert!(answer.text().len() < 1000, "{}", answer.text());
    }
    let sent = h.identity.counters().token_requests - asked;
    println!("token requests in 40 s against a failing identity server: {sent}");
    // It keeps trying (attempts near 0 s, 6 s, 18 s, 35 s), never more than the doubling allows.
    assert!((3..=10).contains(&sent), "{sent} token requests in 40 s");
}

/// invalid_grant is final: 503 saying to run `tollgate login`, and the identity server is not
/// asked again on every request.
#[tokio::test]
async fn invalid_grant_is_final_and_says_what_to_do() {
    let h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    h.identity.revoke_all();
    h.identity.expire_access_tokens();
    let a = h.get("/x").await;
    assert_eq!(a.status, 503);
    let detail = a.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("tollgate login api"), "{detail}");
    assert!(
        detail.contains("picks the new token up by itself, no restart needed"),
        "{detail}"
    );
    assert!(!detail.contains("and restart"), "{detail}");
    assert_eq!(a.json()["type"], "urn:tollgate:problem:login-required");
    let asked = h.identity.counters().token_requests;
    for _ in 0..5 {
        assert_eq!(h.get("/x").await.status, 503);
    }
    assert_eq!(
        h.identity.counters().token_requests,
        asked,
        "no hammering after invalid_grant"
    );
}

/// A client_credentials upstream asks again when its token is refused.
#[tokio::test]
async fn client_credentials_grant() {
    let mut h = Harness::start(Setup::default()).await;
    // The harness's own proxy (refresh_token grant) must not share the state with this one.
    h.stop_proxy().await;
    let state = tempfile::tempdir().unwrap();
    let text = h
        .config_text
        .replace(
            "grant = \"refresh_token\"",
            "grant = \"client_credentials\"",
        )
        .replace(
            &h.state_dir().display().to_string(),
            &state.path().display().to_string(),
        );
    let text = text
        .lines()
        .filter(|l| !l.starts_with("refresh_token"))
        .collect::<Vec<_>>()
        .join("\n");
    let proxy = common::replica(&text).await;
    let url = format!("http://{}/cc", proxy.addr("api").unwrap());
    let get = || async {
        let req = http::Request::get(&url)
            .body(http_body_util::Full::default())
            .unwrap();
        common::collect(h.client.request(req).await.unwrap()).await
    };
    assert_eq!(get().await.status, 200);
    let before = h.identity.counters().client_credentials;
    h.identity.expire_access_tokens();
    let after = get().await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(h.identity.counters().client_credentials, before + 1);
    proxy.shutdown().await;
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An API that refuses every token (a wrong scope, say): one refresh, whose replay is refused
/// too; then its refusals are passed on instead of redeeming once per request, with one
/// refresh per wait (1 s, then 2 s).
#[tokio::test]
async fn an_api_refusing_every_token_does_not_get_a_refresh_per_request() {
    let h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let before = h.identity.counters().refreshes;
    h.api.reject_next(1000);
    let started = Instant::now();
    for i in 0..10 {
        let answer = h.get(&format!("/refused/{i}")).await;
        assert_eq!(answer.status, 401, "the API's refusal is passed on");
        assert!(
            answer.headers.contains_key("www-authenticate"),
            "the API's own answer"
        );
    }
    let refreshes = h.identity.counters().refreshes - before;
    if started.elapsed() < Duration::from_secs(1) {
        assert_eq!(refreshes, 1, "one refresh, then the wait");
    }
    // Past the first wait, one more refresh, and a longer wait.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let at = h.identity.counters().refreshes;
    let again = Instant::now();
    for i in 0..3 {
        assert_eq!(h.get(&format!("/again/{i}")).await.status, 401);
    }
    if again.elapsed() < Duration::from_secs(2) {
        assert_eq!(h.identity.counters().refreshes - at, 1);
    }
    h.api.reject_next(0);
    assert_eq!(h.get("/accepted-again").await.status, 200);
}

/// Tokens revoked one after another, each replaced and replayed with success: never paced.
#[tokio::test]
async fn revoked_tokens_are_always_replaced_while_replays_succeed() {
    let h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    for i in 0..6 {
        h.identity.expire_access_tokens();
        assert_eq!(h.get(&format!("/revoked/{i}")).await.status, 200);
    }
}

/// Requests refused together with the same new token share one refresh and are all
/// replayed: the pacing never turns them away.
#[tokio::test]
async fn requests_refused_together_share_one_refresh_and_all_succeed() {
    let h = Arc::new(Harness::start(Setup::default()).await);
    assert_eq!(h.get("/warm").await.status, 200);
    let before = h.identity.counters().refreshes;
    h.identity.expire_access_tokens();
    h.identity.delay_next(1, Duration::from_millis(300));
    let mut requests = Vec::new();
    for i in 0..10 {
        let h = Arc::clone(&h);
        requests.push(tokio::spawn(async move {
            h.get(&format!("/together/{i}")).await.status
        }));
    }
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(h.identity.counters().refreshes - before, 1);
}
