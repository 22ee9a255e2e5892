//! `tollgate login`: authorization code + PKCE against the simulated identity server, driven
//! by a test client in place of the browser; then `serve` uses the stored token.

use crate::common;

use common::{Harness, Setup, Tollgate};
use std::time::Duration;
use tollgate::config::Config;
use tollgate::token::login::{Login, LoginError};
use tollgate_sim::identity::IdentityConfig;

async fn setup() -> (Harness, String) {
    // Registered with the identity server up front, bound by the login later.
    let redirect = format!("http://127.0.0.1:{}/callback", common::free_port());
    let h = Harness::start(Setup {
        identity: IdentityConfig {
            redirect_uris: vec![redirect.clone()],
            ..IdentityConfig::default()
        },
        ..Setup::default()
    })
    .await;
    (h, redirect)
}

/// The harness config without a seed, with an [upstream.login] section.
fn login_config(h: &Harness, redirect: &str) -> Config {
    common::parse(&login_text(h, redirect))
}

fn login_text(h: &Harness, redirect: &str) -> String {
    let authorize = h.identity.token_url().replace("/token", "/authorize");
    let text: String = h
        .config_text
        .lines()
        .filter(|l| !l.starts_with("refresh_token"))
        .map(|l| format!("{l}\n"))
        .collect();
    format!(
        "{text}scope = \"openid offline_access\"\n\n[upstream.login]\nauthorize_url = \"{authorize}\"\nredirect_uri = \"{redirect}\"\nparams = {{ prompt = \"consent\" }}\n"
    )
}

/// A whole login for `api`: the browser follows the authorize URL, the login lands.
async fn log_in(config: &Config) {
    let login = Login::prepare(config, "api", None).await.unwrap();
    let url = login.authorize_url.to_string();
    let finished = tokio::spawn(login.finish(Duration::from_secs(10)));
    assert_eq!(browse(&url, |l| l).await, 200);
    finished.await.unwrap().unwrap();
}

/// Play the browser: GET the authorize URL, then follow its redirect to the callback,
/// optionally tampering with the redirect first.
async fn browse(url: &str, tamper: impl Fn(String) -> String) -> u16 {
    let client = common::client();
    let req = http::Request::get(url)
        .body(http_body_util::Full::default())
        .unwrap();
    let a = common::collect(client.request(req).await.unwrap()).await;
    assert_eq!(a.status, 302, "{}", String::from_utf8_lossy(&a.body));
    let location = tamper(a.headers["location"].to_str().unwrap().to_owned());
    let req = http::Request::get(location)
        .body(http_body_util::Full::default())
        .unwrap();
    common::collect(client.request(req).await.unwrap())
        .await
        .status
}

/// Login stores a refresh token that `serve` then uses, although the config has no seed; the
/// authorize URL carries PKCE S256, state, scope and the extra params.
#[tokio::test]
async fn login_then_serve_uses_the_stored_token() {
    let (mut h, redirect) = setup().await;
    h.stop_proxy().await;
    let config = login_config(&h, &redirect);
    log_in(&config).await;

    let params = h.identity.last_authorize_params();
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(get("prompt").as_deref(), Some("consent"));
    assert_eq!(get("scope").as_deref(), Some("openid offline_access"));
    assert_eq!(get("redirect_uri").as_deref(), Some(redirect.as_str()));
    assert_eq!(h.identity.counters().authorization_codes, 1);

    let proxy = tollgate::Proxy::start(&config).await.unwrap();
    let url = format!("http://{}/after-login", proxy.addr("api").unwrap());
    assert_eq!(common::get(url).await.status, 200);
    // And a refresh works from the stored refresh token.
    h.identity.expire_access_tokens();
    let url = format!("http://{}/refresh", proxy.addr("api").unwrap());
    assert_eq!(common::get(url).await.status, 200);
    assert_eq!(h.identity.counters().reuse_detected, 0);
    proxy.shutdown().await;
}

/// A redirect whose `state` was tampered with ends the login with a clear error, and nothing
/// is stored.
#[tokio::test]
async fn wrong_state_is_refused() {
    let (h, redirect) = setup().await;
    let config = login_config(&h, &redirect);
    let login = Login::prepare(&config, "api", None).await.unwrap();
    let url = login.authorize_url.to_string();
    let finished = tokio::spawn(login.finish(Duration::from_secs(10)));
    let status = browse(&url, |l| {
        let at = l.find("state=").unwrap();
        format!("{}state=forged", &l[..at])
    })
    .await;
    assert_eq!(status, 400);
    let err = finished.await.unwrap().unwrap_err();
    assert!(matches!(err, LoginError::StateMismatch), "{err}");
    assert_eq!(h.identity.counters().authorization_codes, 0);
}

/// `?error=access_denied` ends the login with the identity server's word.
#[tokio::test]
async fn access_denied_is_reported() {
    let (h, redirect) = setup().await;
    let config = login_config(&h, &redirect);
    h.identity.deny_next_authorization();
    let login = Login::prepare(&config, "api", None).await.unwrap();
    let url = login.authorize_url.to_string();
    let finished = tokio::spawn(login.finish(Duration::from_secs(10)));
    browse(&url, |l| l).await;
    let err = finished.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("access_denied"), "{err}");
}

/// Nobody comes back: the login gives up after its timeout with a message saying so.
#[tokio::test]
async fn timeout_is_reported() {
    let (h, redirect) = setup().await;
    let config = login_config(&h, &redirect);
    let login = Login::prepare(&config, "api", None).await.unwrap();
    let err = login.finish(Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(err, LoginError::Timeout(_)), "{err}");
    assert!(err.to_string().contains("run the login again"));
}

/// A running proxy stuck on invalid_grant (503) serves again once `login` stores a new refresh
/// token — no restart.
#[tokio::test]
async fn a_running_proxy_picks_up_a_login() {
    let (h, redirect) = setup().await;
    assert_eq!(h.get("/warm").await.status, 200);
    h.identity.revoke_all();
    h.identity.expire_access_tokens();
    assert_eq!(h.get("/dead").await.status, 503);

    // Same config as the running proxy (seed included), plus the login section.
    let authorize = h.identity.token_url().replace("/token", "/authorize");
    let text = format!(
        "{}\n[upstream.login]\nauthorize_url = \"{authorize}\"\nredirect_uri = \"{redirect}\"\n",
        h.config_text
    );
    let config = common::parse(&text);
    log_in(&config).await;

    let a = h.get("/alive-again").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
}

/// `tollgate login` on a Redis store joins the group's lineage: after the identity server
/// revoked it, one login brings every replica back, and none of them redeems a revoked token.
#[tokio::test]
async fn a_login_on_redis_reaches_every_replica() {
    let redis = common::redis_server::RedisServer::start();
    let (mut h, redirect) = setup().await;
    h.stop_proxy().await;
    let authorize = h.identity.token_url().replace("/token", "/authorize");
    let store = format!("store = \"file:{}\"", h.state_dir().display());
    let text = format!(
        "{}\n[upstream.login]\nauthorize_url = \"{authorize}\"\nredirect_uri = \"{redirect}\"\n",
        h.config_text.replace(
            &store,
            &format!("store = \"{}\"\nheartbeat = \"200ms\"", redis.url()),
        )
    );
    let config = common::parse(&text);
    let (a, b) = (common::replica(&text).await, common::replica(&text).await);
    let get = |proxy: &tollgate::Proxy, path: &str| {
        common::get(format!("http://{}{path}", proxy.addr("api").unwrap()))
    };
    assert_eq!(get(&a, "/warm").await.status, 200);
    h.identity.revoke_all();
    h.identity.expire_access_tokens();
    assert_eq!(get(&a, "/dead").await.status, 503);
    assert_eq!(get(&b, "/dead").await.status, 503);

    log_in(&config).await;

    for (proxy, path) in [(&a, "/a-again"), (&b, "/b-again")] {
        let answer = get(proxy, path).await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert_eq!(h.identity.counters().reuse_detected, 0);
    a.shutdown().await;
    b.shutdown().await;
}

/// `tollgate token` right after `tollgate login` says it uses the stored token (not one
/// "another process refreshed"), and prints it.
#[tokio::test]
async fn token_after_login_uses_the_stored_token() {
    let (mut h, redirect) = setup().await;
    h.stop_proxy().await;
    let config = login_config(&h, &redirect);
    log_in(&config).await;

    let out = Tollgate::new(&["token", "api"])
        .config(&login_text(&h, &redirect))
        .env("RUST_LOG", "info")
        .run_async()
        .await;
    let (stdout, stderr) = (out.stdout, out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        h.identity
            .issued_tokens()
            .iter()
            .any(|t| stdout.trim() == t),
        "{stdout}"
    );
    assert!(stderr.contains("using the stored token"), "{stderr}");
    assert!(!stderr.contains("another process"), "{stderr}");
}

/// The operator starting over: a login replaces a record no configured key opens (the key was
/// lost), says that it does, and the new record is sealed with the key now set.
#[tokio::test]
async fn a_login_replaces_a_record_no_key_opens_and_says_so() {
    let logs = common::logs();
    let redirect = format!("http://127.0.0.1:{}/callback", common::free_port());
    let lost = "key = \"bG9zdCBrZXkgb2YgdGhpcnR5LXR3byBieXRlcyBsb24=\"";
    let mut h = Harness::start(Setup {
        identity: IdentityConfig {
            redirect_uris: vec![redirect.clone()],
            ..IdentityConfig::default()
        },
        extra_state: lost.into(),
        ..Setup::default()
    })
    .await;
    assert_eq!(h.get("/warm").await.status, 200);
    h.stop_proxy().await;
    let lost_id = h.stored()["sealed"]["key"].as_str().unwrap().to_owned();

    let text = login_text(&h, &redirect).replace(
        lost,
        "key = \"bmV3IGtleSBvZiB0aGlydHktdHdvIGJ5dGVzIGxvbmc=\"",
    );
    let config = common::parse(&text);
    log_in(&config).await;
    assert!(
        logs.text()
            .contains("the stored token record does not open; this login replaces it"),
        "the login says it replaced the record"
    );
    let stored = h.stored();
    assert_ne!(stored["sealed"]["key"].as_str().unwrap(), lost_id);
    let proxy = tollgate::Proxy::start(&config).await.unwrap();
    let url = format!("http://{}/after-login", proxy.addr("api").unwrap());
    assert_eq!(common::get(url).await.status, 200);
    proxy.shutdown().await;
}

/// `tollgate login api --identity alice` stores alice's lineage beside the upstream's own, and
/// a key of hers then reaches the API with it; the upstream's own record is untouched.
#[tokio::test]
async fn a_login_with_identity_stores_that_identitys_lineage() {
    let (mut h, redirect) = setup().await;
    assert_eq!(h.get("/own").await.status, 200);
    h.stop_proxy().await;
    let own_before = std::fs::read(h.state_dir().join("api.token.json")).unwrap();
    let text = format!(
        "{}\n[[upstream.identity]]\nname = \"alice\"\n\n[upstream.inbound]\nkeys = [{{ name = \"etl\", key = \"etl-key-0123456789abcdef\", identity = \"alice\" }}]\n",
        login_text(&h, &redirect)
    );
    let config = common::parse(&text);
    let login = Login::prepare(&config, "api", Some("alice")).await.unwrap();
    let url = login.authorize_url.to_string();
    let finished = tokio::spawn(login.finish(Duration::from_secs(10)));
    assert_eq!(browse(&url, |l| l).await, 200);
    finished.await.unwrap().unwrap();
    let alice = std::fs::read_to_string(h.state_dir().join("api@alice.token.json")).unwrap();
    assert!(alice.contains("\"login_at_ms\""), "{alice}");
    assert_eq!(
        std::fs::read(h.state_dir().join("api.token.json")).unwrap(),
        own_before,
        "the upstream's own lineage is untouched"
    );

    let proxy = tollgate::Proxy::start(&config).await.unwrap();
    let request = http::Request::get(format!("http://{}/as-alice", proxy.addr("api").unwrap()))
        .header("authorization", "Bearer etl-key-0123456789abcdef")
        .body(http_body_util::Full::default())
        .unwrap();
    let answer = common::collect(common::client().request(request).await.unwrap()).await;
    assert_eq!(answer.status, 200);
    let bearer = h.api.last_authorization().unwrap();
    let grant = h
        .identity
        .grant_of_access_token(bearer.trim_start_matches("Bearer "));
    let own_seed_grant = h.identity.grant_of_refresh_token(&h.seed);
    assert!(
        grant.is_some() && grant != own_seed_grant,
        "alice's own login, not the upstream's"
    );
    proxy.shutdown().await;

    let unknown = Login::prepare(&config, "api", Some("carol")).await;
    let err = unknown.err().expect("no identity carol").to_string();
    assert!(err.contains("has no identity `carol`"), "{err}");
}
