//! The admin listener seen from outside: the HTML status page at `/`.

mod common;

use common::{Clock, Harness, Setup};

/// 2026-11-24T12:00:00Z: far from midnight, so the day does not turn during a test.
const NOON: u64 = 1_795_521_600_000;

/// A proxy with an admin listener and a quota of 10 a day, 100 a minute, 2 at a time.
async fn harness() -> Harness {
    Harness::start(Setup {
        admin: true,
        quota: "per_day = 10\nper_minute = 100\nconcurrency = 2\nqueue = 2".into(),
        clock: Clock::manual(NOON),
        ..Setup::default()
    })
    .await
}

/// `GET /` is an HTML page with each upstream's name, token state, the day's usage as a bar,
/// and the wait line; it is never cached and holds no token.
#[tokio::test]
async fn the_status_page_shows_tokens_and_quotas_but_no_token() {
    let h = harness().await;
    for _ in 0..3 {
        assert_eq!(h.get("/x").await.status, 200);
    }
    let page = common::get(h.admin_url("/")).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(page.header("cache-control"), "no-store");
    let html = page.text();
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(html.contains("<h2>api</h2>"), "{html}");
    assert!(
        html.contains("<span class=\"ready\">ready</span>"),
        "{html}"
    );
    assert!(
        html.contains("max=\"10\" low=\"8\" high=\"9\" optimum=\"0\" value=\"3\""),
        "the day's bar: {html}"
    );
    assert!(html.contains("3 of 10 used today"), "{html}");
    // The last response's slot may still be held for an instant after its body arrived.
    assert!(html.contains("<p>In flight: "), "{html}");
    assert!(html.contains(", waiting: 0</p>"), "{html}");
    assert!(!html.contains("<script"), "no script: {html}");
    let tokens = h.identity.issued_tokens();
    assert!(!tokens.is_empty());
    for token in tokens {
        assert!(
            !html.contains(&token),
            "a token leaked into the status page"
        );
    }
}

/// `/` and `/status` tell the same story: they are drawn from one gathered status.
#[tokio::test]
async fn the_page_and_the_json_agree() {
    let h = harness().await;
    assert_eq!(h.get("/x").await.status, 200);
    let status = common::get(h.admin_url("/status")).await.json();
    let api = &status["upstreams"][0];
    let generation = api["token"]["generation"].as_u64().unwrap();
    let html = common::get(h.admin_url("/")).await.text();
    assert!(
        html.contains(&format!("generation {generation},")),
        "{html}"
    );
    for w in api["quota"]["windows"].as_array().unwrap() {
        let row = format!(
            "<tr><td>{}</td><td>{} / {}</td>",
            w["window"].as_str().unwrap(),
            w["used"],
            w["limit"]
        );
        assert!(html.contains(&row), "{row} in {html}");
    }
}

/// An unknown admin path lists the endpoints, the page included.
#[tokio::test]
async fn not_found_lists_the_status_page() {
    let h = harness().await;
    let answer = common::get(h.admin_url("/nope")).await;
    assert_eq!(answer.status, 404);
    assert_eq!(
        answer.json()["detail"],
        "admin endpoints: / (status page), /healthz, /readyz, /status, /metrics"
    );
}
