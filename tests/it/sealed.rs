//! Sealed token records (`[state] key`): no token bytes at rest in files or in Redis, restarts
//! that go on without redeeming, a wrong key refused in words with nothing overwritten or
//! redeemed, rotation with `previous_keys`, `tollgate rekey`, plain stores sealed at their
//! next save, and records that do not open elsewhere.

use crate::common;

use base64::Engine;
use common::binary::Tollgate;
use common::redis_server::RedisServer;
use common::{Harness, Setup};
use tollgate::store::{FileStore, StateStore, StoreError};

/// A key for `[state] key`: 32 bytes of `byte`, base64.
fn key(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

fn key_line(byte: u8) -> String {
    format!("key = \"{}\"", key(byte))
}

fn sealed_setup(byte: u8) -> Setup {
    Setup {
        extra_state: key_line(byte),
        ..Setup::default()
    }
}

/// Every file of the state directory, as text.
fn state_files(h: &Harness) -> Vec<(String, String)> {
    std::fs::read_dir(h.state_dir())
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            (path.display().to_string(), text)
        })
        .collect()
}

/// No token the identity server issued, nor the seed, in `texts`.
fn assert_no_token_in(h: &Harness, texts: &[(String, String)]) {
    let mut tokens = h.identity.issued_tokens();
    tokens.push(h.seed.clone());
    assert!(tokens.len() > 2);
    for (name, text) in texts {
        for token in &tokens {
            assert!(!text.contains(token.as_str()), "a token in {name}: {text}");
        }
    }
}

/// The key id a record was sealed with.
fn sealed_with(h: &Harness) -> String {
    h.stored()["sealed"]["key"]
        .as_str()
        .expect("a sealed record")
        .to_owned()
}

/// `path` is served from the stored record: nothing is redeemed for it.
async fn serves_without_redeeming(h: &Harness, path: &str) {
    let asked = h.identity.counters().token_requests;
    let served = h.get(path).await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(
        h.identity.counters().token_requests,
        asked,
        "redeemed for {path}"
    );
}

/// With a key, the state directory holds no token the identity server issued, across
/// refreshes; a restart with the key goes on from the sealed record without redeeming.
#[tokio::test]
async fn a_sealed_file_store_holds_no_token_and_restarts_without_redeeming() {
    let mut h = Harness::start(sealed_setup(1)).await;
    for _ in 0..3 {
        h.identity.expire_access_tokens();
        assert_eq!(h.get("/rotate").await.status, 200);
    }
    let stored = h.stored();
    assert!(stored.get("refresh_token").is_none(), "{stored}");
    assert_eq!(stored["sealed"]["alg"], "A256GCM");
    assert!(
        stored["generation"].as_u64().unwrap() >= 3,
        "plain: {stored}"
    );
    assert_no_token_in(&h, &state_files(&h));

    h.stop_proxy().await;
    h.start_proxy().await;
    serves_without_redeeming(&h, "/after-restart").await;
    h.identity.expire_access_tokens();
    assert_eq!(h.get("/refresh-after-restart").await.status, 200);
    h.assert_lineage_intact();
}

/// A key that does not open the record: 503 naming `[state] key`, `/readyz` says so, nothing
/// redeemed or overwritten; the right key (as a previous key) then goes on, and the record is
/// sealed with the new key at its next save, after which the new key alone opens it.
#[tokio::test]
async fn a_wrong_key_is_refused_in_words_and_rotation_goes_on_with_previous_keys() {
    let mut h = Harness::start(Setup {
        admin: true,
        ..sealed_setup(1)
    })
    .await;
    assert_eq!(h.get("/warm").await.status, 200);
    let first_key = sealed_with(&h);
    h.stop_proxy().await;
    let record = std::fs::read(h.state_dir().join("api.token.json")).unwrap();

    let sealed_with_1 = h.config_text.clone();
    h.config_text = sealed_with_1.replace(&key_line(1), &key_line(2));
    h.start_proxy().await;
    let asked = h.identity.counters().token_requests;
    let refused = h.get("/wrong-key").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let text = refused.text();
    assert!(
        text.contains("[state] key") && text.contains(&first_key),
        "{text}"
    );
    assert!(text.contains("previous_keys"), "{text}");
    let ready = common::get(h.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("[state] key"), "{}", ready.text());
    h.identity.expire_access_tokens();
    assert_eq!(h.get("/still-wrong").await.status, 503);
    assert_eq!(
        h.identity.counters().token_requests,
        asked,
        "nothing redeemed"
    );
    let now = std::fs::read(h.state_dir().join("api.token.json")).unwrap();
    assert_eq!(now, record, "nothing overwritten");
    let out = h.check_config("wrong-key.toml", &h.config_text).await;
    assert!(
        out.stderr.contains("does not open") && out.stderr.contains("[state] key"),
        "{out:?}"
    );

    // Rotation, step 2: the new key seals, the old one still opens. A reload puts it in force.
    let rotated = sealed_with_1.replace(
        &key_line(1),
        &format!("{}\nprevious_keys = [\"{}\"]", key_line(2), key(1)),
    );
    h.reload(&rotated).await.expect("reloaded");
    let served = h.get("/rotated").await;
    assert_eq!(served.status, 200, "{}", served.text());
    let second_key = sealed_with(&h);
    assert_ne!(
        second_key, first_key,
        "sealed again with the new key at its save"
    );

    // The new key alone.
    h.stop_proxy().await;
    h.config_text = sealed_with_1.replace(&key_line(1), &key_line(2));
    h.start_proxy().await;
    serves_without_redeeming(&h, "/new-key-alone").await;
    h.assert_lineage_intact();
}

/// A plain store (written before sealing) is read as before and sealed at its next save.
#[tokio::test]
async fn a_plain_store_is_sealed_at_its_next_save() {
    let mut h = Harness::start(Setup::default()).await;
    h.identity.expire_access_tokens();
    assert_eq!(h.get("/plain").await.status, 200);
    let plain = h.stored();
    assert!(plain["refresh_token"].is_string(), "{plain}");
    h.stop_proxy().await;

    h.config_text = h.config_text.replace(
        "\n[[upstream]]",
        &format!("{}\n\n[[upstream]]", key_line(3)),
    );
    let out = h.check_config("sealing.toml", &h.config_text).await;
    assert!(out.stderr.contains("is not sealed yet"), "{out:?}");
    h.start_proxy().await;
    serves_without_redeeming(&h, "/adopted").await;
    h.identity.expire_access_tokens();
    assert_eq!(h.get("/saved").await.status, 200);
    assert!(h.stored()["sealed"].is_object(), "{}", h.stored());
    // The temp files of the atomic write are gone: nothing plain is left beside it.
    assert_no_token_in(&h, &state_files(&h));
    h.assert_lineage_intact();
}

/// The operator starting over: a new seed in the config replaces a record no configured key
/// opens (it is another lineage), and the log says so.
#[tokio::test]
async fn a_new_seed_replaces_a_record_no_key_opens() {
    let logs = common::logs();
    let mut h = Harness::start(sealed_setup(8)).await;
    assert_eq!(h.get("/warm").await.status, 200);
    h.stop_proxy().await;
    h.identity.revoke_all();
    let new_seed = h.identity.issue_refresh_token();
    h.config_text = h
        .config_text
        .replace(&h.seed, &new_seed)
        .replace(&key_line(8), &key_line(9));
    h.seed = new_seed;
    h.start_proxy().await;
    let served = h.get("/with-new-seed").await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(h.stored()["generation"], 1, "a new lineage starts");
    let logs = logs.text();
    assert!(
        logs.contains("the stored token record is of another lineage and does not open"),
        "{logs}"
    );
}

/// A record copied under another upstream's name does not open there, and says why.
#[tokio::test]
async fn a_record_moved_to_another_upstream_does_not_open() {
    let h = Harness::start(sealed_setup(4)).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let dir = h.state_dir();
    std::fs::copy(dir.join("api.token.json"), dir.join("other.token.json")).unwrap();
    let store = FileStore::open(&dir).unwrap();
    store.set_keys(common::parse(&h.config_text).state.keys().unwrap());
    assert!(store.load_token("api").await.unwrap().is_some());
    match store.load_token("other").await {
        Err(StoreError::Sealed { why, .. }) => assert!(why.contains("copied"), "{why}"),
        other => panic!("opened elsewhere: {other:?}"),
    }
}

/// `tollgate rekey` seals every record with `[state] key` now, beside a running serve; then
/// the new key alone serves without redeeming.
#[tokio::test]
async fn rekey_seals_every_record_with_the_new_key() {
    let mut h = Harness::start(sealed_setup(5)).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let first_key = sealed_with(&h);
    let original = h.config_text.clone();
    let rotated = original.replace(
        &key_line(5),
        &format!("{}\nprevious_keys = [\"{}\"]", key_line(6), key(5)),
    );
    let path = h.write_config("rotated.toml", &rotated);
    let out = Tollgate::new(&["rekey"])
        .config_file(&path)
        .run_async()
        .await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    let second_key = sealed_with(&h);
    assert_ne!(second_key, first_key);
    assert_eq!(
        out.stdout.trim(),
        format!("api: sealed with key {second_key}")
    );
    assert_no_token_in(&h, &state_files(&h));

    h.stop_proxy().await;
    h.config_text = original.replace(&key_line(5), &key_line(6));
    h.start_proxy().await;
    serves_without_redeeming(&h, "/after-rekey").await;

    // Without a key there is nothing to seal with: the config is wrong, and says how to fix it.
    let path = h.write_config("keyless.toml", &original.replace(&key_line(5), ""));
    let out = Tollgate::new(&["rekey"])
        .config_file(&path)
        .run_async()
        .await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("openssl rand -base64 32"), "{out:?}");
}

/// A sealed Redis store holds no token in any value, across refreshes on two replicas; `check`
/// warns about a Redis store without a key.
#[tokio::test]
async fn a_sealed_redis_store_holds_no_token() {
    let redis = RedisServer::start();
    let (h, text) = common::on_redis(Setup::default(), &redis).await;
    // `tollgate rekey` below is a process of its own, started while the replicas and the
    // other tests keep both cores busy: its store operations get more than half a second.
    let text = text
        .replace("timeout = \"500ms\"", "timeout = \"5s\"")
        .replace(
            "heartbeat = \"200ms\"",
            &format!("heartbeat = \"200ms\"\n{}", key_line(7)),
        );
    let group = common::warm_replicas(&text, 2).await;
    for _ in 0..2 {
        h.identity.expire_access_tokens();
        for proxy in &group {
            assert_eq!(
                common::get(common::url_of(proxy, "/rotate")).await.status,
                200
            );
        }
    }
    let mut values = Vec::new();
    let redis::Value::Array(keys) = redis.command(&["KEYS", "*"]) else {
        panic!("KEYS answers an array")
    };
    for key in keys {
        let redis::Value::BulkString(key) = key else {
            continue;
        };
        let key = String::from_utf8(key).unwrap();
        let value = match redis.command(&["TYPE", &key]) {
            redis::Value::SimpleString(t) if t == "hash" => redis.command(&["HGETALL", &key]),
            redis::Value::SimpleString(t) if t == "string" => redis.command(&["GET", &key]),
            _ => continue,
        };
        values.push((key, format!("{value:?}")));
    }
    assert!(
        values
            .iter()
            .any(|(k, v)| k.ends_with(":token") && v.contains("A256GCM")),
        "{values:?}"
    );
    assert_no_token_in(&h, &values);

    // Rotation across the group, in two steps: every replica first gets the new key to open
    // with (the old one still seals), then every replica swaps them; then `tollgate rekey`
    // seals the record with the new key beside them.
    let step_1 = text.replace(
        &key_line(7),
        &format!("{}\nprevious_keys = [\"{}\"]", key_line(7), key(10)),
    );
    let rotated = text.replace(
        &key_line(7),
        &format!("{}\nprevious_keys = [\"{}\"]", key_line(10), key(7)),
    );
    let mut group = group;
    for (config, step) in [(&step_1, "/step-1"), (&rotated, "/step-2")] {
        for proxy in &mut group {
            proxy
                .reload(&common::parse(config))
                .await
                .expect("reloaded");
        }
        if step == "/step-1" {
            // A refresh in step 1 still seals with the old key, which every replica opens.
            h.identity.expire_access_tokens();
        }
        for proxy in &group {
            assert_eq!(common::get(common::url_of(proxy, step)).await.status, 200);
        }
    }
    let record = || {
        format!(
            "{:?}",
            redis.command(&["HGET", "tollgate:api:token", "record"])
        )
    };
    let before = record();
    let path = h.write_config("rotated.toml", &rotated);
    let out = Tollgate::new(&["rekey"])
        .config_file(&path)
        .run_async()
        .await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    let after = record();
    assert!(out.stdout.starts_with("api: sealed with key "), "{out:?}");
    let id = out.stdout.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(
        after.contains(&id) && !before.contains(&id),
        "{before}\n{after}"
    );
    h.identity.expire_access_tokens();
    for proxy in &group {
        assert_eq!(
            common::get(common::url_of(proxy, "/after-rekey"))
                .await
                .status,
            200
        );
    }
    common::shut_down(group).await;
    h.assert_lineage_intact();

    let unsealed = text.replace(&key_line(7), "");
    let out = h.check_config("unsealed.toml", &unsealed).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.contains("holds the refresh tokens unsealed"),
        "{out:?}"
    );
    let out = h.check_config("sealed.toml", &text).await;
    assert!(
        out.stdout.contains("state.key = sealed with key "),
        "{out:?}"
    );
    assert!(
        !out.stdout.contains(&key(7)) && !out.stderr.contains(&key(7)),
        "{out:?}"
    );
    assert!(!out.stderr.contains("unsealed"), "{out:?}");
}
