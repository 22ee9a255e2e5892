//! `[[upstream.identity]]`: each inbound key reaches the API as its own user, with a lineage of
//! its own in the store, under the upstream's one day.

use crate::common;

use common::{Answer, Harness, Setup, Tollgate};
use http_body_util::Full;

const KEYS: [(&str, &str); 3] = [
    ("etl", "etl-key-0123456789abcdef"),
    ("reports", "reports-key-0123456789abcdef"),
    ("tool", "tool-key-0123456789abcdef"),
];

/// A harness whose upstream has identities `alice` (key `etl`) and `bob` (key `reports`), each
/// seeded with a login of its own, beside the upstream's own user (key `tool`). Returns the
/// grants (users) of the upstream's own, alice and bob.
async fn three_users(quota: &str) -> (Harness, [usize; 3]) {
    let mut h = Harness::start(Setup {
        admin: true,
        ..Setup::with_quota(quota)
    })
    .await;
    h.stop_proxy().await;
    let own = h.seed.clone();
    let (text, users) = with_users(&h, &h.config_text, &own);
    h.config_text = text;
    h.start_proxy().await;
    (h, users)
}

/// `text` (whose own seed is `own`) with the keys and identities of [`three_users`], the
/// identities seeded with new logins; and the three users' grants.
fn with_users(h: &Harness, text: &str, own: &str) -> (String, [usize; 3]) {
    let (alice, bob) = (
        h.identity.issue_refresh_token(),
        h.identity.issue_refresh_token(),
    );
    let text = format!("{text}\n{}", users_toml(&alice, &bob));
    let grant = |seed: &str| h.identity.grant_of_refresh_token(seed).unwrap();
    (text, [grant(own), grant(&alice), grant(&bob)])
}

/// The keys of [`KEYS`] and identities `alice` and `bob` seeded with `alice` and `bob`: `etl`
/// reaches the API as alice, `reports` as bob, `tool` as the upstream's own user.
fn users_toml(alice: &str, bob: &str) -> String {
    format!(
        r#"[upstream.inbound]
keys = [
  {{ name = "etl", key = "{}", identity = "alice" }},
  {{ name = "reports", key = "{}", identity = "bob" }},
  {{ name = "tool", key = "{}" }},
]

[[upstream.identity]]
name = "alice"
refresh_token = "{alice}"

[[upstream.identity]]
name = "bob"
refresh_token = "{bob}"
"#,
        KEYS[0].1, KEYS[1].1, KEYS[2].1
    )
}

async fn get_as(h: &Harness, key: &str, path: &str) -> Answer {
    let request = http::Request::get(h.url(path))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::default())
        .unwrap();
    h.send(request).await
}

/// Who the API saw the last request as.
fn caller(h: &Harness) -> usize {
    let authorization = h
        .api
        .last_authorization()
        .expect("a request reached the API");
    let token = authorization.strip_prefix("Bearer ").unwrap();
    h.identity
        .grant_of_access_token(token)
        .expect("a token the identity server issued to a user")
}

/// Each key reaches the API as its own user, over several expiries, with no refresh token
/// redeemed twice in any of the three lineages; an identity fetches nothing until used.
#[tokio::test]
async fn each_key_reaches_the_api_as_its_user_across_expiries() {
    let (h, users) = three_users("").await;
    assert_eq!(get_as(&h, KEYS[2].1, "/own-first").await.status, 200);
    assert_eq!(caller(&h), users[0]);
    let dir = h.state_dir();
    assert!(
        !dir.join("api@alice.token.json").exists(),
        "alice was not used yet"
    );
    assert_eq!(
        h.identity.counters().refreshes,
        1,
        "one token request: the upstream's own"
    );

    for round in 0..3 {
        for (i, (name, key)) in KEYS.iter().enumerate() {
            let answer = get_as(&h, key, &format!("/{name}/{round}")).await;
            assert_eq!(answer.status, 200, "{name}: {}", answer.text());
            let expected = [users[1], users[2], users[0]][i];
            assert_eq!(caller(&h), expected, "{name} reached the API as its user");
        }
        h.identity.expire_access_tokens();
    }
    h.assert_lineage_intact();
    for file in [
        "api.token.json",
        "api@alice.token.json",
        "api@bob.token.json",
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.contains("\"generation\""), "{file}: {text}");
    }
}

/// The three users spend one day: the upstream's limit holds their sum.
#[tokio::test]
async fn the_day_holds_the_sum_of_every_identity() {
    let (h, _) = three_users("per_day = 4").await;
    let mut served = 0;
    for round in 0..3 {
        for (name, key) in KEYS {
            if get_as(&h, key, &format!("/{name}/{round}")).await.status == 200 {
                served += 1;
            }
        }
    }
    assert_eq!(served, 4, "the day's four requests, whoever sent them");
}

/// `tollgate token --identity` prints that identity's token; an unknown identity is an error
/// that says how to add it.
#[tokio::test]
async fn token_with_identity_prints_that_users_token() {
    let (h, users) = three_users("").await;
    let path = h.write_config("tollgate.toml", &h.config_text);
    let out = Tollgate::new(&["token", "api", "--identity", "bob"])
        .config_file(&path)
        .run_async()
        .await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    let token = out.stdout.trim();
    assert_eq!(h.identity.grant_of_access_token(token), Some(users[2]));

    let out = Tollgate::new(&["token", "api", "--identity", "carol"])
        .config_file(&path)
        .run_async()
        .await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("[[upstream.identity]]"), "{out:?}");
}

/// A reload adds an identity and removes another without touching the others' tokens.
#[tokio::test]
async fn reload_adds_and_removes_identities() {
    let (mut h, users) = three_users("").await;
    for (name, key) in KEYS {
        assert_eq!(get_as(&h, key, &format!("/{name}")).await.status, 200);
    }
    let asked = h.identity.counters().token_requests;
    // Bob goes; his key now reaches the API as the upstream's own user.
    let without_bob = h
        .config_text
        .replace(", identity = \"bob\"", "")
        .split("[[upstream.identity]]\nname = \"bob\"")
        .next()
        .unwrap()
        .to_owned();
    h.reload(&without_bob).await.expect("reloaded");
    assert_eq!(get_as(&h, KEYS[0].1, "/alice-kept").await.status, 200);
    assert_eq!(caller(&h), users[1]);
    assert_eq!(get_as(&h, KEYS[1].1, "/bob-gone").await.status, 200);
    assert_eq!(caller(&h), users[0]);
    assert_eq!(
        h.identity.counters().token_requests,
        asked,
        "no other token touched"
    );

    // Bob comes back: his lineage goes on from the store, not from his rotated-away seed.
    let with_bob = h.config_text.clone();
    h.reload(&with_bob).await.expect("reloaded");
    h.identity.expire_access_tokens();
    assert_eq!(get_as(&h, KEYS[1].1, "/bob-back").await.status, 200);
    assert_eq!(caller(&h), users[2]);
    h.assert_lineage_intact();
}

/// `check` lists each identity, which credentials it gives (never their values) and which
/// keys reach the API as it; a key naming an unknown identity is an error that says so.
#[tokio::test]
async fn check_lists_identities_and_refuses_an_unknown_one() {
    let (h, _) = three_users("").await;
    let out = h.check_config("tollgate.toml", &h.config_text).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("identity alice"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("refresh_token credentials of its own; keys etl"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("etl (no budget, as identity alice)"),
        "{}",
        out.stdout
    );
    for token in h.identity.issued_tokens() {
        assert!(!out.stdout.contains(&token), "a token in check");
    }
    // One seed for two users would spend one refresh token in two lineages.
    let seed_of = |name: &str| {
        let table = h
            .config_text
            .split(&format!("name = \"{name}\"\n"))
            .nth(1)
            .unwrap();
        table.split('"').nth(1).unwrap().to_owned()
    };
    let shared = h.config_text.replace(&seed_of("bob"), &seed_of("alice"));
    let out = h.check_config("shared.toml", &shared).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("identity `bob` has the same refresh_token"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(&seed_of("alice")), "{}", out.stderr);

    let wrong = h
        .config_text
        .replace("identity = \"bob\"", "identity = \"carol\"");
    let out = h.check_config("wrong.toml", &wrong).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("has no identity `carol`"),
        "{}",
        out.stderr
    );
}

/// One identity's `invalid_grant` leaves the others serving; `/readyz` names it, an identity
/// never used does not fail it; `/status` and `/metrics` show each identity, never a token.
#[tokio::test]
async fn a_refused_identity_leaves_the_others_serving_and_is_named() {
    let (h, users) = three_users("").await;
    assert_eq!(get_as(&h, KEYS[2].1, "/own").await.status, 200);
    let ready = common::get(h.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "bob and alice unused: {}", ready.text());
    let status = common::get(h.admin_url("/status")).await.json();
    let identities = &status["upstreams"][0]["identities"];
    assert_eq!(identities[0]["name"], "alice");
    assert_eq!(identities[0]["token"]["state"], "unused");

    assert_eq!(get_as(&h, KEYS[0].1, "/alice").await.status, 200);
    h.identity.revoke_grant(users[1]);
    h.identity.expire_access_tokens();
    let refused = get_as(&h, KEYS[0].1, "/alice-revoked").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused
            .text()
            .contains("tollgate login api --identity alice"),
        "{}",
        refused.text()
    );
    for (name, key) in [KEYS[1], KEYS[2]] {
        assert_eq!(
            get_as(&h, key, &format!("/{name}")).await.status,
            200,
            "{name} serves"
        );
    }
    let ready = common::get(h.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("api (identity alice)"),
        "{}",
        ready.text()
    );
    assert!(!ready.text().contains("identity bob"), "{}", ready.text());

    let status = common::get(h.admin_url("/status")).await;
    let json = status.json();
    let identities = &json["upstreams"][0]["identities"];
    assert_eq!(identities[0]["token"]["state"], "unready");
    assert_eq!(identities[1]["token"]["state"], "ready");
    assert!(identities[1]["last_used_s"].as_u64().is_some());
    let metrics = common::get(h.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("tollgate_token_refreshes_total{upstream=\"api\",identity=\"alice\",result=\"refused\"} 1"),
        "{metrics}"
    );
    let page = common::get(h.admin_url("/")).await.text();
    assert!(page.contains("Identities: alice"), "{page}");
    for token in h.identity.issued_tokens() {
        for (what, text) in [
            ("status", status.text()),
            ("metrics", metrics.clone()),
            ("page", page.clone()),
        ] {
            assert!(!text.contains(&token), "a token in {what}");
        }
    }
    assert_eq!(
        h.identity.counters().reuse_detected,
        0,
        "no refresh token redeemed twice"
    );
}

/// A restart goes on with each identity's stored lineage, redeeming nothing for a token still
/// valid.
#[tokio::test]
async fn a_restart_keeps_each_lineage() {
    let (mut h, users) = three_users("").await;
    for (name, key) in KEYS {
        assert_eq!(get_as(&h, key, &format!("/{name}")).await.status, 200);
    }
    h.identity.expire_access_tokens();
    for (name, key) in KEYS {
        assert_eq!(
            get_as(&h, key, &format!("/{name}/refreshed")).await.status,
            200
        );
    }
    h.stop_proxy().await;
    h.start_proxy().await;
    let asked = h.identity.counters().token_requests;
    for (i, (name, key)) in KEYS.iter().enumerate() {
        assert_eq!(
            get_as(&h, key, &format!("/{name}/restarted")).await.status,
            200
        );
        assert_eq!(caller(&h), [users[1], users[2], users[0]][i]);
    }
    assert_eq!(
        h.identity.counters().token_requests,
        asked,
        "nothing redeemed after a restart"
    );
    h.assert_lineage_intact();
}

/// Two replicas on Redis share each identity's lineage.
#[tokio::test]
async fn replicas_on_redis_share_each_lineage() {
    let redis = common::redis_server::RedisServer::start();
    let (h, text) = common::on_redis(Setup::default(), &redis).await;
    let own = text
        .split("refresh_token = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let (text, _) = with_users(&h, &text, &own);
    let group = common::replicas(&text, 2).await;
    for round in 0..3 {
        h.identity.expire_access_tokens();
        for proxy in &group {
            for (name, key) in KEYS {
                let request =
                    http::Request::get(common::url_of(proxy, &format!("/{name}/{round}")))
                        .header("authorization", format!("Bearer {key}"))
                        .body(Full::default())
                        .unwrap();
                let answer = common::collect(h.client.request(request).await.unwrap()).await;
                assert_eq!(answer.status, 200, "{name}: {}", answer.text());
            }
        }
    }
    assert_eq!(
        h.identity.counters().reuse_detected,
        0,
        "no refresh token redeemed twice"
    );
    let records = redis.command(&["KEYS", "tollgate:api@*:token"]);
    assert!(
        format!("{records:?}").contains("api@alice") && format!("{records:?}").contains("api@bob"),
        "{records:?}"
    );
    common::shut_down(group).await;
    h.assert_lineage_intact();
}

/// `tollgate rekey` seals every identity's record too.
#[tokio::test]
async fn rekey_seals_every_identitys_record() {
    let (h, _) = three_users("").await;
    for (name, key) in KEYS {
        assert_eq!(get_as(&h, key, &format!("/{name}")).await.status, 200);
    }
    let key = "key = \"c2VhbGluZyBrZXkgb2YgdGhpcnR5LXR3byBieXRlcyE=\"";
    let store_line = format!("store = \"file:{}\"", h.state_dir().display());
    let sealing = h
        .config_text
        .replace(&store_line, &format!("{store_line}\n{key}"));
    let path = h.write_config("sealing.toml", &sealing);
    let out = Tollgate::new(&["rekey"])
        .config_file(&path)
        .run_async()
        .await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    for name in ["api", "api@alice", "api@bob"] {
        assert!(
            out.stdout.contains(&format!("{name}: sealed with key ")),
            "{}",
            out.stdout
        );
        let text =
            std::fs::read_to_string(h.state_dir().join(format!("{name}.token.json"))).unwrap();
        assert!(
            text.contains("A256GCM") && !text.contains("refresh_token"),
            "{name}: {text}"
        );
    }
}

/// ERP.net limits each user's session (one request in flight, five waiting). With identities,
/// the preset sets those limits for each identity instead of the upstream: three users'
/// slow requests run side by side, one per user, and the API never sees two of one user at
/// once nor has to refuse any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erpnet_preset_limits_each_identity_as_a_session() {
    use tollgate_sim::provider::SimProvider;
    let sim = SimProvider::start(
        "erpnet",
        std::time::Duration::from_secs(3600),
        tollgate_sim::bind_loopback().await,
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let (alice, bob) = (
        sim.identity.issue_refresh_token(),
        sim.identity.issue_refresh_token(),
    );
    let text = format!(
        "[state]\nstore = \"file:{}\"\n\n{}\n{}",
        state.path().display(),
        sim.upstream_toml("p", "127.0.0.1:0"),
        users_toml(&alice, &bob)
    );
    let config = tollgate::config::Config::parse(&text, "t.toml", |_| None).unwrap();
    let filled = &config.upstreams[0].preset_filled;
    assert!(
        filled.contains(&"quota.per_identity.concurrency".to_owned()),
        "{filled:?}"
    );
    assert!(
        !filled.contains(&"quota.concurrency".to_owned()),
        "{filled:?}"
    );

    let proxy = common::replica(&text).await;
    let url = format!("http://{}/Items?sim_delay_ms=500", proxy.addr("p").unwrap());
    let mut calls = Vec::new();
    for round in 0..2 {
        for (_, key) in KEYS {
            let (url, key) = (url.clone(), key.to_owned());
            calls.push(tokio::spawn(async move {
                let req = http::Request::get(url)
                    .header("authorization", format!("Bearer {key}"))
                    .body(Full::default())
                    .unwrap();
                let reply = common::collect(common::client().request(req).await.unwrap()).await;
                (round, reply.status)
            }));
        }
    }
    for call in calls {
        let (round, status) = call.await.unwrap();
        assert_eq!(status, 200, "round {round}");
    }
    let api = sim.api.counters();
    assert_eq!(api.authorized, 6);
    assert_eq!(api.session_in_flight_max, 1, "one at a time per user");
    assert_eq!(api.in_flight_max, 3, "the three users side by side");
    assert_eq!(api.throttled, 0);
    proxy.shutdown().await;
}

/// `kill -9` of the real binary while an identity's refresh waits on the identity server:
/// every lineage — that identity's, the other's, the upstream's own — goes on after a
/// restart, with no refresh token redeemed twice.
#[tokio::test]
async fn kill_9_during_an_identitys_refresh_keeps_every_lineage() {
    let (mut h, users) = three_users("").await;
    h.stop_proxy().await;
    let path = h.write_config("tollgate.toml", &h.config_text);
    let spawned = common::spawn_serve(&path);
    let base = format!("http://{}", spawned.addr);
    let as_key = |key: &str, path: &str| {
        http::Request::get(format!("{base}{path}"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::default())
            .unwrap()
    };
    for round in 0..2 {
        for (name, key) in KEYS {
            let answer = common::collect(
                common::client()
                    .request(as_key(key, &format!("/{name}/{round}")))
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(answer.status, 200, "{name}: {}", answer.text());
        }
        h.identity.expire_access_tokens();
    }
    let asked = h.identity.counters().token_requests;
    h.identity.delay_next(1, std::time::Duration::from_secs(5));
    let pending = tokio::spawn(common::client().request(as_key(KEYS[0].1, "/alice/refreshing")));
    while h.identity.counters().token_requests == asked {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(spawned); // SIGKILL, while alice's refresh is on its way
    assert!(
        pending.await.unwrap().is_err(),
        "the client saw the process die"
    );

    h.start_proxy().await;
    for (i, (name, key)) in KEYS.iter().enumerate() {
        let answer = get_as(&h, key, &format!("/{name}/after")).await;
        assert_eq!(answer.status, 200, "{name}: {}", answer.text());
        assert_eq!(caller(&h), [users[1], users[2], users[0]][i]);
    }
    let counters = h.identity.counters();
    assert_eq!(
        counters.reuse_detected, 0,
        "no refresh token redeemed twice"
    );
    assert_eq!(counters.grants_revoked, 0);
    h.assert_lineage_intact();
}

/// A reload that gives an identity a new login, and moves a key to another identity, touches
/// nothing else: the others' tokens stay in use, no token request is made for them.
#[tokio::test]
async fn reload_changes_an_identity_and_moves_a_key() {
    let (mut h, users) = three_users("").await;
    for (name, key) in KEYS {
        assert_eq!(get_as(&h, key, &format!("/{name}")).await.status, 200);
    }
    // Alice logs in anew (another grant); bob's key `reports` now acts as alice too.
    let (old_seed, new_seed) = {
        let table = h.config_text.split("name = \"alice\"\n").nth(1).unwrap();
        let seed = table.split('"').nth(1).unwrap().to_owned();
        (seed, h.identity.issue_refresh_token())
    };
    let alice_again = h.identity.grant_of_refresh_token(&new_seed).unwrap();
    let text = h
        .config_text
        .replace(&old_seed, &new_seed)
        .replace("identity = \"bob\"", "identity = \"alice\"");
    let asked = h.identity.counters().token_requests;
    h.reload(&text).await.expect("reloaded");

    assert_eq!(get_as(&h, KEYS[2].1, "/own").await.status, 200);
    assert_eq!(caller(&h), users[0]);
    assert_eq!(
        h.identity.counters().token_requests,
        asked,
        "the upstream's own token stays in use"
    );
    assert_eq!(get_as(&h, KEYS[0].1, "/alice-new").await.status, 200);
    assert_eq!(caller(&h), alice_again, "alice's new login");
    assert_eq!(get_as(&h, KEYS[1].1, "/moved").await.status, 200);
    assert_eq!(caller(&h), alice_again, "the moved key acts as alice");
    assert_eq!(
        h.identity.counters().token_requests,
        asked + 1,
        "one token request: alice's new login"
    );
    let stored = std::fs::read_to_string(h.state_dir().join("api@bob.token.json")).unwrap();
    assert!(
        stored.contains("\"generation\""),
        "bob's record kept: {stored}"
    );
    h.assert_lineage_intact();
}

/// GET `path` on `proxy` with `key`, in a task of its own.
fn get_on(proxy: &tollgate::Proxy, key: &str, path: &str) -> tokio::task::JoinHandle<Answer> {
    let request = http::Request::get(common::url_of(proxy, path))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::default())
        .unwrap();
    tokio::spawn(
        async move { common::collect(common::client().request(request).await.unwrap()).await },
    )
}

/// Redis loses its data (FLUSHALL) while an identity's refresh is in the air on one replica,
/// and the other replica needs that identity's token: one redemption, no reuse, both served,
/// the identity's record back in Redis, and the other lineages untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_during_an_identitys_refresh_redeems_nothing_twice() {
    let redis = common::redis_server::RedisServer::start();
    let setup = Setup {
        extra_auth: common::THROUGH_A_LOSS.into(),
        ..Setup::default()
    };
    let (h, text) = common::on_redis(setup, &redis).await;
    let own = text.split("refresh_token = \"").nth(1).unwrap();
    let own = own.split('"').next().unwrap().to_owned();
    let (text, users) = with_users(&h, &text, &own);
    let group = common::replicas(&text, 2).await;
    for proxy in &group {
        for (name, key) in KEYS {
            let answer = get_on(proxy, key, &format!("/{name}/warm")).await.unwrap();
            assert_eq!(answer.status, 200, "{name}: {}", answer.text());
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let before = h.identity.counters();
    h.identity.answer_late(1, std::time::Duration::from_secs(2));
    h.identity.expire_access_tokens();
    let holder = get_on(&group[0], KEYS[0].1, "/alice/holder");
    common::until(|| h.identity.counters().refreshes > before.refreshes).await;
    redis.command(&["FLUSHALL"]);
    let other = get_on(&group[1], KEYS[0].1, "/alice/other");
    for answer in [holder.await.unwrap(), other.await.unwrap()] {
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let after = h.identity.counters();
    assert_eq!(
        after.token_requests - before.token_requests,
        1,
        "one redemption"
    );
    let stored = redis.command(&["HGET", "tollgate:api@alice:token", "generation"]);
    assert!(
        stored != redis::Value::Nil,
        "alice's record is back in Redis"
    );

    for proxy in &group {
        for (i, (name, key)) in KEYS.iter().enumerate() {
            let answer = get_on(proxy, key, &format!("/{name}/after")).await.unwrap();
            assert_eq!(answer.status, 200, "{name}: {}", answer.text());
            let authorization = h.api.last_authorization().unwrap();
            let token = authorization.strip_prefix("Bearer ").unwrap();
            let grant = h.identity.grant_of_access_token(token);
            assert_eq!(grant, Some([users[1], users[2], users[0]][i]), "{name}");
        }
    }
    assert_eq!(h.identity.counters().reuse_detected, 0);
    h.assert_lineage_intact();
    common::shut_down(group).await;
}
