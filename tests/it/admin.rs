//! The admin listener seen from outside: the HTML status page at `/`, and `tollgate status`
//! run as a child process against it.

use crate::common;

use common::{status_command, Clock, Harness, Output, Setup, Tollgate};
use std::time::{Duration, Instant};

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
    common::readable_page_text(&html);
    let tokens = h.identity.issued_tokens();
    assert!(!tokens.is_empty());
    for token in tokens {
        assert!(
            !html.contains(&token),
            "a token leaked into the status page"
        );
    }
}

/// Read in the day's last second, after a refusal: the day resets in "under 1s", not "0s",
/// and the refusal's reason is in words, not its label `per_day`.
#[tokio::test]
async fn the_page_in_the_last_second_of_the_day_is_in_words() {
    let h = harness().await;
    for i in 0..11 {
        let expected = if i < 10 { 200 } else { 429 };
        assert_eq!(h.get("/x").await.status, expected);
    }
    h.clock
        .advance(Duration::from_secs(12 * 3600) - Duration::from_millis(500));
    let html = common::get(h.admin_url("/")).await.text();
    let text = common::readable_page_text(&html);
    assert!(
        html.contains("<tr><td>day</td><td>10 / 10</td>")
            && html.contains("<td>0</td><td>under 1s</td></tr>"),
        "{html}"
    );
    assert!(
        text.contains("Refused by tollgate: 1 at the daily limit"),
        "{text}"
    );
    // The day's chart is read on a labelled scale, with its pace in words.
    assert!(text.contains("0 to 10"), "{text}");
    assert!(
        text.contains("Even pace: 0.1 requests per 15 minutes spend the day's quota of 10"),
        "{text}"
    );
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

/// `tollgate status` on the config `text`.
async fn status_of(text: &str) -> Output {
    Tollgate::new(&["status"]).config(text).run_async().await
}

/// `tollgate status` against a running proxy prints each upstream's token and quota as a
/// table and exits 0.
#[tokio::test]
async fn status_command_prints_the_table() {
    let h = harness().await;
    assert_eq!(h.get("/x").await.status, 200);
    let path = h.config_for_status();

    let out = status_command(&path).await;
    let (stdout, stderr) = (out.stdout, out.stderr);
    assert!(out.status.success(), "{stderr}");
    let mut lines = stdout.lines();
    assert!(lines.next().unwrap().starts_with("UPSTREAM"), "{stdout}");
    let row = lines.next().unwrap();
    assert!(row.starts_with("api "), "{stdout}");
    assert!(row.contains(" ready "), "{stdout}");
    assert!(row.contains("day 1/10 (resets in 12h)"), "{stdout}");
    assert!(row.contains(" in flight, 0 waiting"), "{stdout}");
    for token in h.identity.issued_tokens() {
        assert!(
            !stdout.contains(&token),
            "a token leaked into tollgate status"
        );
    }
}

/// Without `[admin]` there is nothing to ask: exit 2 with the section to add. The rest of the
/// config is not read, so its unset variables do not get in the way.
#[tokio::test]
async fn status_command_without_admin_says_what_to_add() {
    let out = status_of(
        "[[upstream]]\nname = \"api\"\nlisten = \"127.0.0.1:8080\"\n\
         url = \"https://api.example.com\"\n\n[upstream.auth]\n\
         client_secret = \"${TOLLGATE_TEST_UNSET_SECRET}\"\n",
    )
    .await;
    let stderr = &out.stderr;
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[admin]\nlisten = \"127.0.0.1:9901\""),
        "{stderr}"
    );
    assert!(stderr.contains("restart tollgate serve"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// An address nobody listens on: exit 1, saying serve does not seem to be running there.
#[tokio::test]
async fn status_command_with_nothing_listening_exits_1() {
    let free = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let out = status_of(&format!("[admin]\nlisten = \"{free}\"\n")).await;
    let stderr = &out.stderr;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "nothing answers on {free}: tollgate serve does not seem to be running on that address"
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// Something that answers, but not with tollgate's status: exit 1, saying so.
#[tokio::test]
async fn status_command_with_a_stranger_listening_exits_1() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stranger = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0; 1024];
        let _ = socket.read(&mut request).await.unwrap();
        let body = "<html>hello</html>";
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(response.as_bytes()).await.unwrap();
    });
    let out = status_of(&format!("[admin]\nlisten = \"{addr}\"\n")).await;
    let stderr = &out.stderr;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not answer with tollgate's status JSON"),
        "{stderr}"
    );
    stranger.await.unwrap();
}

/// `/metrics` counts answers by status, times the upstream, counts refreshes by result, and
/// shows no token.
#[tokio::test]
async fn metrics_count_requests_refreshes_and_upstream_time() {
    let h = harness().await;
    for _ in 0..3 {
        assert_eq!(h.get("/ok").await.status, 200);
    }
    assert_eq!(h.get("/x?sim_status=404").await.status, 404);
    h.api.reject_next(1);
    assert_eq!(h.get("/replayed").await.status, 200);
    let metrics = common::get(h.admin_url("/metrics")).await;
    assert!(metrics
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let text = metrics.text();
    let has = |line: &str| assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    has("tollgate_requests_total{upstream=\"api\",key=\"-\",status=\"200\"} 4");
    has("tollgate_requests_total{upstream=\"api\",key=\"-\",status=\"404\"} 1");
    // Six sends: five requests and the replay after the 401.
    has("tollgate_upstream_duration_seconds_count{upstream=\"api\"} 6");
    has("tollgate_upstream_duration_seconds_bucket{upstream=\"api\",le=\"+Inf\"} 6");
    has("tollgate_token_refreshes_total{upstream=\"api\",identity=\"-\",result=\"ok\"} 2");
    has("tollgate_token_refreshes_total{upstream=\"api\",identity=\"-\",result=\"refused\"} 0");
    assert!(text.contains("# TYPE tollgate_upstream_duration_seconds histogram"));
    for token in h.identity.issued_tokens() {
        assert!(!text.contains(&token));
    }
}

/// `/readyz` flips to 503 with the reason once the token is refused and the identity server is
/// down, and back to 200 when the identity server returns.
#[tokio::test]
async fn readiness_follows_the_identity_server() {
    let mut h = Harness::start(Setup {
        admin: true,
        extra_auth: "refresh_wait = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    assert_eq!(h.get("/warm").await.status, 200);
    assert_eq!(common::get(h.admin_url("/readyz")).await.status, 200);

    let server = h.identity_server.take().unwrap();
    let addr = server.addr;
    server.shutdown().await;
    // Still ready: the token in hand is valid.
    assert_eq!(common::get(h.admin_url("/readyz")).await.status, 200);
    // The API refuses it; no new one can be had.
    h.api.reject_next(2);
    assert_eq!(h.get("/refused").await.status, 503);
    let unready = common::get(h.admin_url("/readyz")).await;
    assert_eq!(unready.status, 503);
    assert!(unready.text().starts_with("api: "), "{}", unready.text());

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    h.identity_server = Some(h.identity.serve(listener).await);
    // The next try comes at the end of the backoff, short after a brief failure; until then
    // requests get 503 with the time left as Retry-After.
    let back = Instant::now();
    loop {
        let answer = h.get("/back").await;
        if answer.status == 200 {
            break;
        }
        assert_eq!(answer.status, 503);
        assert!(answer.header("retry-after").parse::<u64>().unwrap() <= 2);
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "not back after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(common::get(h.admin_url("/readyz")).await.status, 200);
}

/// The admin key of the tests.
const ADMIN_KEY: &str = "admin-key-of-the-tests-0123";

/// [`harness`], its admin listener asking for [`ADMIN_KEY`].
async fn keyed() -> Harness {
    let mut h = harness().await;
    h.stop_proxy().await;
    h.config_text = h.config_text.replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\nkey = \"{ADMIN_KEY}\""),
    );
    assert!(h.config_text.contains(ADMIN_KEY));
    h.start_proxy().await;
    h
}

/// GET `path` on the admin listener with `authorization`, if any.
async fn admin_get(h: &Harness, path: &str, authorization: Option<&str>) -> common::Answer {
    let mut request = http::Request::get(h.admin_url(path));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    h.send(request.body(Default::default()).unwrap()).await
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// With `[admin] key`, `/`, `/status` and `/metrics` answer 401 with a Basic challenge
/// (problem+json, never echoing what was sent) until the key comes as Bearer or as the Basic
/// password of any user; `/healthz` and `/readyz` stay open.
#[tokio::test]
async fn the_admin_key_is_asked_for_everywhere_but_the_probes() {
    let h = keyed().await;
    assert_eq!(h.get("/warm").await.status, 200);
    let bearer = format!("Bearer {ADMIN_KEY}");
    for path in ["/", "/status", "/metrics"] {
        for wrong in [
            None,
            Some("Bearer not-the-admin-key-at-all".to_owned()),
            Some(basic("admin", "not-the-admin-key-at-all")),
            Some(basic(ADMIN_KEY, "")),
        ] {
            let answer = admin_get(&h, path, wrong.as_deref()).await;
            assert_eq!(answer.status, 401, "{path} with {wrong:?}");
            assert_eq!(
                answer.header("www-authenticate"),
                "Basic realm=\"tollgate admin\", charset=\"UTF-8\""
            );
            assert_eq!(answer.header("content-type"), "application/problem+json");
            let problem = answer.json();
            assert_eq!(problem["status"], 401);
            assert_eq!(problem["title"], "Admin key required");
            assert!(
                !answer.text().contains("not-the-admin-key"),
                "{}",
                answer.text()
            );
            assert!(!answer.text().contains(ADMIN_KEY), "{}", answer.text());
        }
        for right in [
            bearer.clone(),
            basic("anyone", ADMIN_KEY),
            basic("", ADMIN_KEY),
        ] {
            let answer = admin_get(&h, path, Some(&right)).await;
            assert_eq!(answer.status, 200, "{path} with {right}: {}", answer.text());
        }
    }
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(admin_get(&h, probe, None).await.status, 200, "{probe}");
    }
    let unknown = admin_get(&h, "/nope", None).await;
    assert_eq!(unknown.status, 401, "no path is listed to a stranger");
}

/// `tollgate status` sends the key of its config as Bearer and prints the table.
#[tokio::test]
async fn status_command_sends_the_admin_key_of_its_config() {
    let h = keyed().await;
    assert_eq!(h.get("/x").await.status, 200);
    let out = status_command(&h.config_for_status()).await;
    let (stdout, stderr) = (out.stdout, out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("UPSTREAM"), "{stdout}");
    assert!(
        stdout.lines().nth(1).unwrap().starts_with("api "),
        "{stdout}"
    );
}

/// `tollgate status` whose config lacks the key, or has another: exit 1, saying to set
/// `[admin] key` in the config it read, without quoting a key.
#[tokio::test]
async fn status_command_refused_by_the_admin_key_says_to_set_it() {
    let h = keyed().await;
    let path = h.config_for_status();
    let keyed_text = std::fs::read_to_string(&path).unwrap();
    for (config, expected) in [
        (
            keyed_text.replace(&format!("key = \"{ADMIN_KEY}\""), ""),
            "asks for a key: set [admin] key in this config",
        ),
        (
            keyed_text.replace(ADMIN_KEY, "another-admin-key-0123456"),
            "it differs from the key tollgate serve uses",
        ),
    ] {
        std::fs::write(&path, config).unwrap();
        let out = status_command(&path).await;
        let stderr = &out.stderr;
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("error: {}: ", path.display())),
            "{stderr}"
        );
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("admin-key-"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}
