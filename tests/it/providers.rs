//! Presets and the provider-specific grants against simulators that follow docs/providers.md:
//! Spring (password grant, Basic client auth, refresh reuse, 401 for an expired refresh token),
//! WinBooks (Basic(e-mail), exchange token, `code` fields, string expires_in), and client
//! credentials that need RFC 6749 §2.3.1 encoding.

use crate::common;

use common::{Harness, Setup};
use tollgate_sim::identity::{ClientAuthRule, IdentityConfig, Rotation};

/// Replace the `[upstream.auth]` section of a harness config and start a proxy on it.
///
/// The harness's own proxy is stopped first: it shares the identity server, and the state
/// store's refresh lock of `api`, with this one. Its refresh-ahead task redeems its seed
/// whenever it gets that lock, on a loaded machine only after this proxy's first flights, so
/// its token request would be counted with this proxy's. Once it is shut down (its refresh
/// task ended, its flight settled) it sends none.
async fn proxy_with_auth(h: &mut Harness, preset: &str, auth: &str) -> tollgate::Proxy {
    if h.proxy.is_some() {
        h.stop_proxy().await;
    }
    let head = h.config_text.split("[upstream.auth]").next().unwrap();
    let head = head.replace(
        "name = \"api\"",
        &format!("name = \"api\"\npreset = \"{preset}\""),
    );
    let text = format!(
        "{head}[upstream.auth]\ntoken_url = \"{}\"\n{auth}\n",
        h.identity.token_url()
    );
    common::replica(&text).await
}

async fn get(h: &Harness, proxy: &tollgate::Proxy, path: &str) -> common::Answer {
    let url = format!("http://{}{path}", proxy.addr("api").unwrap());
    let req = http::Request::get(url)
        .header("continuepath", "/app/Customer/x?page=2")
        .body(http_body_util::Full::default())
        .unwrap();
    common::collect(h.client.request(req).await.unwrap()).await
}

/// Spring: the password grant logs in, refreshes reuse the refresh token, and when the token
/// endpoint answers 401 invalid_token for an expired refresh token the proxy logs in again
/// once — without looping — and keeps serving.
#[tokio::test]
async fn spring_password_grant_falls_back_once_when_refresh_expires() {
    let mut h = Harness::start(Setup {
        identity: IdentityConfig {
            client_auth: ClientAuthRule::Basic,
            rotation: Rotation::Reuse,
            spring_errors: true,
            token_type: "bearer".into(),
            users: vec![("ann@example.com".into(), "correct horse".into())],
            ..IdentityConfig::default()
        },
        ..Setup::default()
    })
    .await;
    let auth = "client_id = \"tollgate-test\"\nclient_secret = \"s3cret\"\nusername = \"ann@example.com\"\npassword = \"correct horse\"";
    let proxy = proxy_with_auth(&mut h, "spring", auth).await;
    assert_eq!(get(&h, &proxy, "/a").await.status, 200);
    assert_eq!(h.identity.counters().password_grants, 1);

    h.identity.expire_access_tokens();
    assert_eq!(get(&h, &proxy, "/b").await.status, 200);
    assert_eq!(
        h.identity.counters().refreshes,
        1,
        "refreshed with the (reused) refresh token"
    );
    assert_eq!(h.identity.counters().password_grants, 1);

    h.identity.expire_refresh_tokens();
    h.identity.expire_access_tokens();
    let asked = h.identity.counters().token_requests;
    assert_eq!(get(&h, &proxy, "/c").await.status, 200);
    assert_eq!(h.identity.counters().password_grants, 2, "logged in again");
    assert_eq!(
        h.identity.counters().token_requests,
        asked + 2,
        "one refresh, one login: no loop"
    );
    proxy.shutdown().await;
}

/// Spring with a wrong password: 503 that names the keys to fix, and no retry storm.
#[tokio::test]
async fn wrong_password_is_final_and_says_what_to_fix() {
    let mut h = Harness::start(Setup {
        identity: IdentityConfig {
            client_auth: ClientAuthRule::Basic,
            users: vec![("ann@example.com".into(), "right".into())],
            ..IdentityConfig::default()
        },
        ..Setup::default()
    })
    .await;
    let auth = "client_id = \"tollgate-test\"\nclient_secret = \"s3cret\"\nusername = \"ann@example.com\"\npassword = \"wrong\"";
    let proxy = proxy_with_auth(&mut h, "spring", auth).await;
    let a = get(&h, &proxy, "/a").await;
    assert_eq!(a.status, 503);
    assert!(
        a.json()["detail"]
            .as_str()
            .unwrap()
            .contains("auth.password"),
        "{:?}",
        a.json()
    );
    let asked = h.identity.counters().token_requests;
    assert_eq!(get(&h, &proxy, "/b").await.status, 503);
    assert_eq!(h.identity.counters().token_requests, asked);
    proxy.shutdown().await;
}

/// WinBooks: Basic(e-mail) without a colon, the exchange token traded for tokens, refreshes
/// with `code`, a new exchange when the refresh token is refused; ContinuePath passes through.
#[tokio::test]
async fn winbooks_exchange_and_refresh_with_code() {
    let mut h = Harness::start(Setup {
        identity: IdentityConfig {
            winbooks: true,
            client_id: "ann@example.com".into(),
            token_path: "/OAuth20/Token".into(),
            ..IdentityConfig::default()
        },
        ..Setup::default()
    })
    .await;
    let exchange = h.identity.issue_exchange_token();
    let auth = format!("username = \"ann@example.com\"\nexchange_token = \"{exchange}\"");
    let proxy = proxy_with_auth(&mut h, "winbooks", &auth).await;
    let a = get(&h, &proxy, "/app/Customer/x").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        a.echoed_header("continuepath"),
        vec!["/app/Customer/x?page=2".to_owned()]
    );
    assert_eq!(h.identity.counters().exchanges, 1);

    h.identity.expire_access_tokens();
    assert_eq!(get(&h, &proxy, "/b").await.status, 200);
    assert_eq!(h.identity.counters().refreshes, 1);

    h.identity.expire_refresh_tokens();
    h.identity.expire_access_tokens();
    assert_eq!(get(&h, &proxy, "/c").await.status, 200);
    assert_eq!(h.identity.counters().exchanges, 2, "exchanged again");
    assert_eq!(h.identity.counters().reuse_detected, 0);
    proxy.shutdown().await;
}

/// A client id with '/' and a secret with `+ / % & =` survive both `post` and `basic`
/// (RFC 6749 §2.3.1: form-encode, then base64), against a strict ERP.net-style server.
#[tokio::test]
async fn awkward_client_credentials_survive_post_and_basic() {
    let mut h = Harness::start(Setup {
        identity: IdentityConfig {
            client_id: "my.trusted.app/first".into(),
            client_secret: "a+b/c%d&e=f g".into(),
            all_errors_400: true,
            ..IdentityConfig::default()
        },
        ..Setup::default()
    })
    .await;
    for client_auth in ["post", "basic"] {
        // A fresh start each time, so the second run cannot adopt the first one's token.
        let _ = std::fs::remove_file(h.state_dir().join("api.token.json"));
        let auth = format!("grant = \"client_credentials\"\nclient_id = \"my.trusted.app/first\"\nclient_secret = \"a+b/c%d&e=f g\"\nclient_auth = \"{client_auth}\"");
        let proxy = proxy_with_auth(&mut h, "erpnet", &auth).await;
        let a = get(&h, &proxy, "/odata/Items").await;
        assert_eq!(
            a.status,
            200,
            "{client_auth}: {}",
            String::from_utf8_lossy(&a.body)
        );
        proxy.shutdown().await;
    }
    assert_eq!(h.identity.counters().client_credentials, 2);
}

/// WinBooks' `ContinuePath` paging header passes through both ways untouched.
#[tokio::test]
async fn continue_path_passes_both_ways() {
    let h = Harness::start(Setup::default()).await;
    let req = http::Request::get(h.url("/app/Customer/x"))
        .header("continuepath", "/app/Customer/x?skip=500&token=a%2Fb")
        .header(
            "x-sim-continue-path",
            "/app/Customer/x?skip=1000&token=c%2Fd",
        )
        .body(http_body_util::Full::default())
        .unwrap();
    let a = h.send(req).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.echoed_header("continuepath"),
        vec!["/app/Customer/x?skip=500&token=a%2Fb".to_owned()]
    );
    assert_eq!(
        a.headers["continuepath"],
        "/app/Customer/x?skip=1000&token=c%2Fd"
    );
}

/// ERP.net allows one request in flight with five waiting. The preset puts the same limits in
/// tollgate: of ten concurrent slow requests, six are served one at a time and four get
/// tollgate's own 429 — the API never sees more than one, nor has to refuse any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erpnet_preset_keeps_one_request_in_flight_with_a_queue_of_five() {
    use tollgate_sim::provider::SimProvider;
    let sim = SimProvider::start(
        "erpnet",
        std::time::Duration::from_secs(3600),
        tollgate_sim::bind_loopback().await,
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let text = format!(
        "[state]\nstore = \"file:{}\"\n\n{}",
        state.path().display(),
        sim.upstream_toml("p", "127.0.0.1:0")
    );
    let proxy = common::replica(&text).await;
    let url = format!("http://{}/Items?sim_delay_ms=600", proxy.addr("p").unwrap());
    let mut calls = Vec::new();
    for _ in 0..10 {
        let url = url.clone();
        calls.push(tokio::spawn(async move {
            let req = http::Request::get(url)
                .body(http_body_util::Full::default())
                .unwrap();
            let reply = common::collect(common::client().request(req).await.unwrap()).await;
            if reply.status == 429 {
                assert_eq!(reply.headers["content-type"], "application/problem+json");
                assert!(reply.text().contains("in flight"), "{}", reply.text());
            }
            reply.status
        }));
    }
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        4,
        "{statuses:?}"
    );
    let api = sim.api.counters();
    assert_eq!(api.authorized, 6, "only the admitted reached the API");
    assert_eq!(api.in_flight_max, 1);
    assert_eq!(api.session_in_flight_max, 1);
    assert_eq!(api.throttled, 0);
    proxy.shutdown().await;
}
