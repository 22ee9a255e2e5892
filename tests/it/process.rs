//! The real binary under signals: SIGTERM drains in-flight requests, and SIGKILL in the
//! middle of a refresh loses no refresh token.

use crate::common;

use common::{Harness, Setup, Tollgate};
use std::time::{Duration, Instant};

/// SIGTERM while a slow request is in flight: the request still gets its 200, then the
/// process exits 0.
#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    drains_in_flight_requests(&[]).await;
}

/// The same with one worker, which serves on a thread of its own as more do.
#[tokio::test]
async fn one_worker_serves_and_drains_too() {
    drains_in_flight_requests(&["--workers", "1"]).await;
}

async fn drains_in_flight_requests(serve_args: &[&str]) {
    let h = Harness::start(Setup::default()).await;
    let config = h.write_config("tollgate.toml", &h.config_text);
    let mut spawned = common::spawn_serve_with(&config, serve_args);
    let base = format!("http://{}", spawned.addr);
    assert_eq!(common::get(format!("{base}/warm")).await.status, 200);
    let seen = h.api.counters().requests;
    let slow = tokio::spawn(common::get(format!("{base}/slow?sim_delay_ms=800")));
    while h.api.counters().requests == seen {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    spawned.signal("TERM");
    assert_eq!(
        slow.await.unwrap().status,
        200,
        "in-flight request finished"
    );
    let status = spawned.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}

/// SIGKILL while a refresh is waiting on the identity server: a new process on the same state
/// directory redeems the stored refresh token, which the strict identity server still accepts.
#[tokio::test]
async fn sigkill_during_a_refresh_loses_no_refresh_token() {
    let h = Harness::start(Setup::default()).await;
    let path = h.write_config("tollgate.toml", &h.config_text);
    // Let the in-process proxy rotate a few times first, then stop it.
    for _ in 0..3 {
        h.identity.expire_access_tokens();
        assert_eq!(h.get("/rotate").await.status, 200);
    }
    let mut h = h;
    h.stop_proxy().await;

    let spawned = common::spawn_serve(&path);
    let base = format!("http://{}", spawned.addr);
    assert_eq!(common::get(format!("{base}/warm")).await.status, 200);
    let asked = h.identity.counters().token_requests;
    h.identity.delay_next(1, Duration::from_secs(5));
    h.identity.expire_access_tokens();
    let pending = tokio::spawn(async move {
        let req = http::Request::get(format!("{base}/needs-refresh"))
            .body(http_body_util::Full::default())
            .unwrap();
        common::client().request(req).await
    });
    while h.identity.counters().token_requests == asked {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(spawned); // SIGKILL, mid-refresh
    assert!(
        pending.await.unwrap().is_err(),
        "the client saw the connection die"
    );

    h.start_proxy().await;
    let a = h.get("/after-crash").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(h.identity.counters().reuse_detected, 0);
    assert_eq!(h.identity.counters().grants_revoked, 0);
}

/// `tollgate token NAME` beside a running proxy on a strictly rotating identity server: it
/// prints only a token the API accepts (and, without RUST_LOG, nothing on stderr), and no
/// refresh token is ever redeemed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_beside_serve_never_double_redeems() {
    let h = Harness::start(Setup::default()).await;
    let path = h.write_config("tollgate.toml", &h.config_text);
    assert_eq!(h.get("/warm").await.status, 200);
    for round in 0..4 {
        h.identity.expire_access_tokens();
        // The proxy and the command race to refresh.
        let proxy = h.get("/race");
        let command = Tollgate::new(&["token", "api"])
            .config_file(&path)
            .env_remove("RUST_LOG");
        let command = tokio::spawn(command.run_async());
        assert_eq!(proxy.await.status, 200, "round {round}");
        let out = command.await.unwrap();
        assert!(out.status.success(), "{}", out.stderr);
        // Scripts read it: without RUST_LOG, nothing but errors on stderr.
        assert!(out.stderr.is_empty(), "{}", out.stderr);
        let stdout = out.stdout;
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "only the token on stdout: {stdout:?}");
        // The printed token may be one the API already expired in this round; it must at
        // least be one the identity server issued.
        assert!(h.identity.issued_tokens().contains(&lines[0].to_owned()));
    }
    assert_eq!(h.identity.counters().reuse_detected, 0);
    assert_eq!(h.identity.counters().grants_revoked, 0);

    // Quiet now: the printed token is one the API accepts.
    let token = Tollgate::new(&["token", "api"])
        .config_file(&path)
        .env_remove("RUST_LOG")
        .run()
        .stdout;
    assert!(
        h.identity.validate_access(token.trim_end()).is_ok(),
        "{token:?}"
    );

    // Unknown name: a clear error, non-zero.
    let out = Tollgate::new(&["token", "nope"])
        .config_file(&path)
        .env_remove("RUST_LOG")
        .run();
    assert!(!out.status.success());
    assert!(out.stderr.contains("no upstream named `nope`"));
    assert!(out.stdout.is_empty());
}

/// SIGTERM with nothing in flight exits at once, even while the identity server is
/// unreachable and the token cache waits seconds before trying it again: a backoff or a retry
/// not yet sent is nothing to wait for.
#[tokio::test]
async fn sigterm_with_nothing_in_flight_exits_at_once_while_the_identity_server_is_down() {
    let h = Harness::start(Setup::default()).await;
    // The discard port: nothing listens there, and no test binds it.
    let closed = "http://127.0.0.1:9/token".to_owned();
    let state = tempfile::tempdir().unwrap();
    let text = h
        .config_text
        .replace(&h.identity.token_url(), &closed)
        .replace(
            &h.state_dir().display().to_string(),
            &state.path().display().to_string(),
        );
    let mut spawned = common::spawn_serve(&h.write_config("tollgate.toml", &text));
    // The first token is fetched at the start, and fails; the pauses between tries grow
    // (200 ms, 400 ms, ...): after five failures the next try is seconds away.
    for _ in 0..5 {
        spawned.wait_for_log("token refresh failed; retrying");
    }
    let asked = Instant::now();
    spawned.signal("TERM");
    let status = spawned.exit_within(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    println!("SIGTERM to exit with the identity server down: {took:?}");
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}
