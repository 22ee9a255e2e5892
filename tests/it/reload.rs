//! Config reload (SIGHUP): a new config takes effect on open connections without losing the
//! token or the day's count; upstreams come and go; a config that cannot be put in force
//! changes nothing.

use crate::common;

use bytes::Bytes;
use common::{collect, parse, until, Answer, Harness, Setup};
use http::Request;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tollgate::Reloaded;

const FIRST_KEY: &str = "first-key-0123456789";
const SECOND_KEY: &str = "second-key-0123456789";

fn keys_table(key: &str) -> String {
    format!("[upstream.inbound]\nkeys = [\"{key}\"]\n")
}

/// One kept-alive HTTP/1.1 connection to `addr`.
async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// GET `path` on `connection` with `key`; panics if the connection is gone.
async fn get_on(
    connection: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    key: &str,
) -> Answer {
    connection
        .ready()
        .await
        .expect("the connection is still open");
    let request = Request::get(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {key}"))
        .body(Full::default())
        .unwrap();
    collect(connection.send_request(request).await.unwrap()).await
}

/// The harness with `FIRST_KEY` as its inbound key.
async fn with_keys() -> Harness {
    Harness::start(Setup {
        extra_tables: keys_table(FIRST_KEY),
        ..Setup::default()
    })
    .await
}

/// The harness with an admin listener and `quota` as its `[upstream.quota]` lines.
async fn with_admin(quota: &str) -> Harness {
    Harness::start(Setup {
        quota: quota.into(),
        admin: true,
        ..Setup::default()
    })
    .await
}

/// The quota line of the first upstream in `/status`: (in flight, waiting).
async fn line(h: &Harness) -> (u64, u64) {
    let status = common::get(h.admin_url("/status")).await.json();
    let quota = &status["upstreams"][0]["quota"];
    (
        quota["in_flight"].as_u64().unwrap_or(0),
        quota["waiting"].as_u64().unwrap_or(0),
    )
}

async fn until_line(h: &Harness, want: (u64, u64)) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while line(h).await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "line never reached {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `[[upstream]]` of the harness again, as `other` on `listen`, with a refresh token of its
/// own.
fn second_upstream(h: &Harness, listen: &str) -> String {
    let upstream = h.config_text.split("[[upstream]]").nth(1).unwrap();
    format!("[[upstream]]{upstream}")
        .replace("name = \"api\"", "name = \"other\"")
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}\""),
        )
        .replace(&h.seed, &h.identity.issue_refresh_token())
}

/// The statuses of a GET with `FIRST_KEY`, then with `SECOND_KEY`, on `connection`.
async fn key_statuses(connection: &mut SendRequest<Full<Bytes>>, addr: SocketAddr) -> (u16, u16) {
    let first = get_on(connection, addr, "/api/v1/x", FIRST_KEY)
        .await
        .status;
    let second = get_on(connection, addr, "/api/v1/x", SECOND_KEY)
        .await
        .status;
    (first, second)
}

/// Keys and the daily limit change on a connection that stays open; the token is not
/// redeemed again and the day's count carries over.
#[tokio::test]
async fn keys_and_quota_change_on_an_open_connection_keeping_token_and_count() {
    let mut h = Harness::start(Setup {
        quota: "per_day = 1000\n".into(),
        extra_tables: keys_table(FIRST_KEY),
        admin: true,
        ..Setup::default()
    })
    .await;
    let addr = h.proxy().addr("api").unwrap();
    let mut conn = connect(addr).await;
    for remaining in ["999", "998"] {
        let answer = get_on(&mut conn, addr, "/api/v1/items", FIRST_KEY).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-ratelimit-remaining"), remaining);
    }
    let issued = h.identity.counters().issued;
    let generation = h.stored()["generation"].clone();

    let text = h
        .config_text
        .replace(FIRST_KEY, SECOND_KEY)
        .replace("per_day = 1000", "per_day = 2000");
    let changes = h.reload(&text).await;
    assert_eq!(
        changes.unwrap(),
        Reloaded {
            changed: vec!["api".into()],
            ..Reloaded::default()
        }
    );

    let refused = get_on(&mut conn, addr, "/api/v1/items", FIRST_KEY).await;
    assert_eq!(refused.status, 401, "the old key no longer opens");
    let answer = get_on(&mut conn, addr, "/api/v1/items", SECOND_KEY).await;
    assert_eq!(answer.status, 200);
    // Two spent before the reload, one now, of the new 2000; the counts the old limit had
    // leased ahead went back to the store.
    assert_eq!(answer.header("x-ratelimit-limit"), "2000");
    assert_eq!(answer.header("x-ratelimit-remaining"), "1997");
    assert_eq!(h.identity.counters().issued, issued, "no new token");
    assert_eq!(h.stored()["generation"], generation);

    let status = common::get(h.admin_url("/status")).await.json();
    let day = &status["upstreams"][0]["quota"]["windows"][0];
    assert_eq!(
        (day["limit"].as_u64(), day["used"].as_u64()),
        (Some(2000), Some(3))
    );
    h.stop_proxy().await;
}

/// A reload adds an upstream and removes one: the removed one finishes its request in flight,
/// then stops listening; the admin endpoints show the new set.
#[tokio::test]
async fn upstreams_come_and_go_and_a_removed_one_drains() {
    let mut h = with_admin("").await;
    let old_addr = h.proxy().addr("api").unwrap();
    let second = second_upstream(&h, "127.0.0.1:0");
    let both = format!("{}\n{second}", h.config_text);
    let changes = h.reload(&both).await;
    assert_eq!(changes.unwrap().added, vec!["other".to_owned()]);
    let other = h.proxy().addr("other").expect("other listens");
    assert_eq!(
        h.proxy().addr("api"),
        Some(old_addr),
        "api keeps its socket"
    );
    let answer = common::get(format!("http://{other}/api/v1/x")).await;
    assert_eq!(answer.status, 200);
    let status = common::get(h.admin_url("/status")).await.json();
    assert_eq!(status["upstreams"].as_array().unwrap().len(), 2);

    // Remove `api` while a slow request is in flight on it.
    let before = h.api.counters().requests;
    let slow = tokio::spawn(common::get(format!(
        "http://{old_addr}/api/v1/slow?sim_delay_ms=800"
    )));
    until(|| h.api.counters().requests > before).await;
    let only_other = format!(
        "{}\n{second}",
        h.config_text.split("[[upstream]]").next().unwrap()
    );
    let changes = h.reload(&only_other).await;
    assert_eq!(changes.unwrap().removed, vec!["api".to_owned()]);
    assert_eq!(h.proxy().addr("api"), None);
    assert_eq!(
        slow.await.unwrap().status,
        200,
        "the request in flight finished"
    );
    // The drain has ended: nothing listens on api's address any more.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(old_addr).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "api still listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = common::get(format!("http://{other}/api/v1/x")).await;
    assert_eq!(answer.status, 200);
    let status = common::get(h.admin_url("/status")).await.json();
    assert_eq!(status["upstreams"][0]["name"], "other");
    assert_eq!(status["upstreams"].as_array().unwrap().len(), 1);
    h.proxy.take().unwrap().shutdown().await;
}

/// A renamed upstream on the same fixed port takes over the listener and its open
/// connections.
#[tokio::test]
async fn a_renamed_upstream_takes_over_the_listener_and_its_connections() {
    let port = common::free_port();
    let mut h = Harness::start(Setup::default()).await;
    h.stop_proxy().await;
    h.config_text = h.config_text.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    h.start_proxy().await;
    let addr = h.proxy().addr("api").unwrap();
    let mut conn = connect(addr).await;
    assert_eq!(get_on(&mut conn, addr, "/api/v1/a", "-").await.status, 200);

    // State is kept by name: the renamed upstream starts its own token lineage.
    let renamed = h
        .config_text
        .replace("name = \"api\"", "name = \"renamed\"")
        .replace(&h.seed, &h.identity.issue_refresh_token());
    let changes = h.reload(&renamed).await;
    let changes = changes.unwrap();
    assert_eq!(
        (changes.added, changes.removed),
        (vec!["renamed".to_owned()], vec!["api".to_owned()])
    );
    assert_eq!(h.proxy().addr("renamed"), Some(addr));
    assert_eq!(get_on(&mut conn, addr, "/api/v1/b", "-").await.status, 200);
    h.stop_proxy().await;
}

/// A request that arrived before a reload removed its upstream (renamed on the same port) is
/// still counted by that upstream's day when it replays after a 401: the day's counts go back
/// only once no request holds them, not while one does (which refused the replay with 429).
#[tokio::test]
async fn a_removed_upstream_counts_its_requests_to_the_end() {
    let port = common::free_port();
    let mut h = Harness::start(Setup::with_quota("per_day = 100")).await;
    h.stop_proxy().await;
    h.config_text = h.config_text.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    h.start_proxy().await;
    assert_eq!(h.get("/api/v1/warm").await.status, 200);

    // Refused by the API, the request waits for a slow refresh, then replays.
    h.api.reject_next(1);
    h.identity.delay_next(1, Duration::from_millis(500));
    let asked = h.identity.counters().token_requests;
    let replaying = tokio::spawn(common::get(h.url("/api/v1/replayed")));
    until(|| h.identity.counters().token_requests > asked).await;
    let renamed = h
        .config_text
        .replace("name = \"api\"", "name = \"renamed\"")
        .replace(&h.seed, &h.identity.issue_refresh_token());
    let changes = h.reload(&renamed).await;
    assert_eq!(changes.unwrap().removed, vec!["api".to_owned()]);
    let answer = replaying.await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    h.stop_proxy().await;
}

/// Nothing changes when any part of the new config cannot be put in force.
#[tokio::test]
async fn a_config_that_cannot_be_put_in_force_changes_nothing() {
    let mut h = with_keys().await;
    let addr = h.proxy().addr("api").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let second = second_upstream(&h, &taken.local_addr().unwrap().to_string());
    let text = format!("{}\n{second}", h.config_text.replace(FIRST_KEY, SECOND_KEY));
    let error = h.reload(&text).await;
    let error = error.unwrap_err().to_string();
    assert!(
        error.contains("upstream `other`: cannot listen on"),
        "{error}"
    );

    let moved = h
        .config_text
        .replace("store = \"file:", "store = \"file:/elsewhere");
    let error = h.reload(&moved).await;
    let error = error.unwrap_err().to_string();
    assert!(error.contains("takes a restart"), "{error}");

    assert_eq!(h.proxy().addr("other"), None);
    let mut conn = connect(addr).await;
    assert_eq!(key_statuses(&mut conn, addr).await, (200, 401));
    h.stop_proxy().await;
}

/// The binary: SIGHUP with an invalid config logs why and keeps serving the old one; with a
/// valid one the new keys are in force.
#[tokio::test]
async fn sighup_puts_a_valid_config_in_force_and_keeps_the_old_on_an_invalid_one() {
    let mut h = with_keys().await;
    h.stop_proxy().await;
    let path = h.write_config("tollgate.toml", &h.config_text);
    let spawned = common::spawn_serve(&path);
    let addr: SocketAddr = spawned.addr.parse().unwrap();
    let mut conn = connect(addr).await;
    assert_eq!(
        get_on(&mut conn, addr, "/api/v1/x", FIRST_KEY).await.status,
        200
    );

    std::fs::write(
        &path,
        h.config_text
            .replace(FIRST_KEY, SECOND_KEY)
            .replace("grant = \"refresh_token\"", "grant = \"refresh-token\""),
    )
    .unwrap();
    spawned.signal("HUP");
    let refused = spawned.wait_for_log("config not reloaded; the running config stays in force");
    let error = refused["fields"]["error"].as_str().unwrap();
    assert!(error.contains("tollgate.toml:"), "names the file: {error}");
    assert!(error.contains("grant"), "names the key: {error}");
    assert_eq!(
        get_on(&mut conn, addr, "/api/v1/x", FIRST_KEY).await.status,
        200
    );

    std::fs::write(&path, h.config_text.replace(FIRST_KEY, SECOND_KEY)).unwrap();
    spawned.signal("HUP");
    let reloaded = spawned.wait_for_log("config reloaded");
    assert_eq!(reloaded["fields"]["changed"], "[\"api\"]");
    assert_eq!(key_statuses(&mut conn, addr).await, (401, 200));
}

/// Requests that arrived before a reload are counted by the new quota: one waiting in line
/// while the daily limit is removed is sent, not refused.
#[tokio::test]
async fn a_request_in_line_across_a_quota_change_is_served() {
    let mut h = with_admin("per_day = 1000\nconcurrency = 1\nqueue = 5\n").await;
    let url = h.url("/api/v1/slow?sim_delay_ms=600");
    let first = tokio::spawn(common::get(url.clone()));
    until_line(&h, (1, 0)).await;
    let second = tokio::spawn(common::get(url));
    until_line(&h, (1, 1)).await;

    let text = h.config_text.replace("per_day = 1000\n", "");
    h.reload(&text).await.unwrap();
    assert_eq!(first.await.unwrap().status, 200);
    let second = second.await.unwrap();
    assert_eq!(second.status, 200, "{}", second.text());
    assert!(
        !second.headers.contains_key("x-ratelimit-limit"),
        "no daily window any more"
    );
    h.stop_proxy().await;
}

/// Lowering `concurrency` while requests wait in line: the cut applies before they get in.
#[tokio::test]
async fn a_lower_concurrency_holds_back_the_requests_already_waiting() {
    let mut h = with_admin("concurrency = 2\nqueue = 5\n").await;
    let url = h.url("/api/v1/slow?sim_delay_ms=500");
    let started = std::time::Instant::now();
    let mut requests = Vec::new();
    for want in [(1, 0), (2, 0), (2, 1), (2, 2)] {
        requests.push(tokio::spawn(common::get(url.clone())));
        until_line(&h, want).await;
    }
    let text = h.config_text.replace("concurrency = 2", "concurrency = 1");
    h.reload(&text).await.unwrap();
    for r in requests {
        assert_eq!(r.await.unwrap().status, 200);
    }
    // Two at once, then the two that waited one after the other: three rounds of 500 ms.
    // At the old concurrency they would have taken two.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1450), "{took:?}");
    h.stop_proxy().await;
}

/// A change in `[upstream.auth]` starts a new token cache, which continues the running one:
/// still ready, and the next token, fetched at once with the new settings, is redeemed once.
#[tokio::test]
async fn an_auth_change_keeps_the_token_and_readiness() {
    let mut h = with_admin("").await;
    assert_eq!(h.get("/api/v1/a").await.status, 200);
    let issued = h.identity.counters().issued;
    let text = h.config_text.replace(
        "[upstream.auth]\n",
        "[upstream.auth]\nrefresh_before = \"1s\"\n",
    );
    let changes = h.reload(&text).await;
    assert_eq!(changes.unwrap().changed, vec!["api".to_owned()]);
    let ready = common::get(h.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(h.get("/api/v1/b").await.status, 200);
    until(|| h.identity.counters().issued == issued + 1).await;
    assert_eq!(h.get("/api/v1/c").await.status, 200);
    let ids = h.identity.counters();
    assert_eq!((ids.issued, ids.reuse_detected), (issued + 1, 0));
    h.stop_proxy().await;
}

/// With worker threads: an upstream added by a reload is served by every worker, and the
/// new keys of the other are in force on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_every_worker() {
    let mut h = with_keys().await;
    h.stop_proxy().await;
    let mut proxy = tollgate::Proxy::start_with_workers(&h.config(), 2)
        .await
        .unwrap();
    let second = second_upstream(&h, "127.0.0.1:0");
    let text = format!("{}\n{second}", h.config_text.replace(FIRST_KEY, SECOND_KEY));
    let changes = proxy.reload(&parse(&text)).await.unwrap();
    assert_eq!(changes.added, vec!["other".to_owned()]);
    let (api, other) = (proxy.addr("api").unwrap(), proxy.addr("other").unwrap());
    // Separate connections, so the kernel spreads them over both workers' sockets.
    for _ in 0..8 {
        let mut conn = connect(api).await;
        assert_eq!(
            get_on(&mut conn, api, "/api/v1/x", FIRST_KEY).await.status,
            401
        );
        assert_eq!(
            get_on(&mut conn, api, "/api/v1/x", SECOND_KEY).await.status,
            200
        );
        // `other` was copied from `api` before its key changed.
        let mut conn = connect(other).await;
        assert_eq!(
            get_on(&mut conn, other, "/api/v1/x", FIRST_KEY)
                .await
                .status,
            200
        );
    }
    proxy.shutdown().await;
}
