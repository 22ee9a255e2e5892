//! Inbound keys: a listener with `[upstream.inbound] keys` lets in only requests that carry
//! one, and the key never reaches the API.

use crate::common;

use bytes::Bytes;
use common::{Answer, Harness, Setup};
use http::Request;
use http_body_util::Full;

const KEY: &str = "tool-key-0123456789abcdef";

async fn harness() -> Harness {
    Harness::start(Setup {
        extra_tables: format!("[upstream.inbound]\nkeys = [\"another-key-0123456789\", \"{KEY}\"]"),
        ..Setup::default()
    })
    .await
}

async fn get_with(h: &Harness, header: &str, value: &str) -> Answer {
    let request = Request::get(h.url("/items"))
        .header(header, value)
        .body(Full::<Bytes>::default())
        .unwrap();
    h.send(request).await
}

#[tokio::test]
async fn keys_are_required_checked_and_never_forwarded() {
    let h = harness().await;

    let missing = h.get("/items").await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.header("www-authenticate"),
        "Bearer realm=\"tollgate\""
    );
    assert_eq!(missing.header("content-type"), "application/problem+json");
    assert_eq!(missing.json()["type"], "urn:tollgate:problem:unauthorized");

    let wrong = get_with(&h, "authorization", "Bearer tool-key-0123456789abcdeX").await;
    assert_eq!(wrong.status, 401);
    assert_eq!(
        wrong.header("www-authenticate"),
        "Bearer realm=\"tollgate\", error=\"invalid_token\""
    );
    assert!(!wrong.text().contains("tool-key"), "the key is not echoed");
    assert_eq!(h.api.counters().requests, 0, "refused before the API");

    let right = get_with(&h, "authorization", &format!("Bearer {KEY}")).await;
    assert_eq!(right.status, 200, "{}", right.text());
    let sent = right.echoed_header("authorization");
    assert_eq!(sent.len(), 1);
    assert_ne!(
        sent[0],
        format!("Bearer {KEY}"),
        "the token replaced the key"
    );
    assert!(h
        .identity
        .issued_tokens()
        .iter()
        .any(|t| sent[0] == format!("Bearer {t}")));

    let proxy_auth = get_with(&h, "proxy-authorization", &format!("Bearer {KEY}")).await;
    assert_eq!(proxy_auth.status, 200);
    assert!(proxy_auth.echoed_header("proxy-authorization").is_empty());
    assert!(!proxy_auth.text().contains(KEY));
}

#[tokio::test]
async fn a_listener_on_every_address_works_with_keys() {
    let mut h = harness().await;
    h.stop_proxy().await;
    h.config_text = h.config_text.replace("127.0.0.1:0", "0.0.0.0:0");
    h.start_proxy().await;
    assert!(h.proxy().addr("api").unwrap().ip().is_unspecified());
    assert_eq!(h.get("/items").await.status, 401);
    let right = get_with(&h, "authorization", &format!("Bearer {KEY}")).await;
    assert_eq!(right.status, 200);
}
