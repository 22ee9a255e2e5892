//! Several tollgates on one Redis (`redis://` state store): one token lineage and one day for
//! the group, against a real `redis-server` each test starts, stops and flushes itself.

use crate::common;

use common::redis_server::RedisServer;
use common::{
    on_redis, parse, redis_harness, redis_store, replica, replicas, shut_down, url_of as url,
    warm_replicas, Setup, Tollgate, THROUGH_A_LOSS,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate::config::StateConfig;
use tollgate::secret::Secret;
use tollgate::store::{Period, RedisStore, Reservation, Seen, StateStore, StoreError, TokenRecord};
use tollgate::token::TokenCache;
use tollgate::Proxy;
use tollgate_sim::identity::IdentityConfig;

/// Three replicas under concurrent load over several token lifetimes and forced 401s: every
/// request is served, no refresh token is redeemed twice, and the group refreshes about once
/// per lifetime, not once per replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_lineage() {
    let (_redis, h, text) = redis_harness(Setup {
        identity: IdentityConfig {
            access_lifetime: Duration::from_secs(3),
            ..IdentityConfig::default()
        },
        ..Setup::default()
    })
    .await;
    let group = warm_replicas(&text, 3).await;
    let before = h.identity.counters().refreshes;
    let addrs: Vec<SocketAddr> = group.iter().map(|p| p.addr("api").unwrap()).collect();
    let started = std::time::Instant::now();
    let run_for = Duration::from_millis(5500);
    let mut clients = Vec::new();
    for i in 0..12 {
        let addr = addrs[i % addrs.len()];
        clients.push(tokio::spawn(async move {
            let mut served = 0u32;
            while started.elapsed() < run_for {
                let a = common::get(format!("http://{addr}/load/{i}")).await;
                assert_eq!(a.status, 200, "client {i}: {}", a.text());
                served += 1;
            }
            served
        }));
    }
    // Forced 401s away from the refreshes ahead (1.6 s after each token is issued): a token
    // issued a moment before the identity server revokes every token would be refused on
    // its replay, and then the 401 is passed on (see docs/security.md, "Tokens and backups").
    for at in [1000, 3500] {
        tokio::time::sleep_until((started + Duration::from_millis(at)).into()).await;
        h.identity.expire_access_tokens();
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    assert!(total > 100, "load ran: {total}");
    h.assert_lineage_intact();
    assert!(h.api.counters().rejected >= 2, "the forced 401s were seen");
    // A 3 s token is refreshed ahead after 1.6 s: over 5.5 s, 2 forced + about 3 ahead for
    // the group. Each replica on its own would make three times as many.
    let refreshes = h.identity.counters().refreshes - before;
    assert!((3..=8).contains(&refreshes), "refreshes: {refreshes}");
    shut_down(group).await;
}

fn state(redis: &RedisServer) -> StateConfig {
    StateConfig {
        store: Secret::from(redis.url()),
        heartbeat: Duration::from_millis(200),
        ..StateConfig::default()
    }
}

fn store(redis: &RedisServer) -> RedisStore {
    redis_store(&state(redis))
}

/// Mark `redis` as a store replicas already use (its epoch written), as it is after the first
/// start: a store without one makes its first users wait the recovery window (see
/// `tests/it/store_faults.rs`).
fn in_use(redis: &RedisServer) {
    redis.command(&["SET", "tollgate:epoch", "1-in-use"]);
}

/// Let `stores` connect and their connections age past the moment after a (re)connection in
/// which no lock is asked for (a Redis restarted from a snapshot may have lost locks, which
/// their holders set again first).
async fn connected(stores: &[&RedisStore]) {
    for store in stores {
        store.heartbeat().await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// Two stores on `redis`, marked [`in_use`] and [`connected`].
async fn two_connected(redis: &RedisServer) -> (RedisStore, RedisStore) {
    in_use(redis);
    let (a, b) = (store(redis), store(redis));
    connected(&[&a, &b]).await;
    (a, b)
}

fn record(generation: u64, refresh: &str) -> TokenRecord {
    TokenRecord {
        seed_hash: "lineage".into(),
        dpop_key: None,
        refresh_token: Some(Secret::from(refresh)),
        access_token: Some(Secret::from("at")),
        issued_at_ms: 1,
        expires_at_ms: 2,
        generation,
        login_at_ms: 0,
    }
}

/// A replica paused past its lock (the lock expired and another replica took it, with a newer
/// fence, and saved) can never write its stale record over the newer one; nor can anyone save
/// a generation that is not newer than the stored one of the same lineage.
#[tokio::test]
async fn a_paused_replica_cannot_save_over_a_newer_lineage() {
    let redis = RedisServer::start();
    let (paused, other) = two_connected(&redis).await;
    let hold = Duration::from_secs(30);
    let stale = paused
        .lock_refresh("api", Duration::ZERO, hold)
        .await
        .unwrap();
    let busy = other
        .lock_refresh("api", Duration::from_millis(100), hold)
        .await;
    assert!(matches!(busy, Err(StoreError::LockTimeout { .. })), "held");

    // The paused replica's lock expires while it is stopped.
    redis.command(&["DEL", "tollgate:api:lock"]);
    let current = other
        .lock_refresh("api", Duration::ZERO, hold)
        .await
        .unwrap();
    assert!(current.fence > stale.fence);
    other
        .save_token("api", &record(6, "rt-6"), &current)
        .await
        .unwrap();

    for (store, saved, lock) in [
        (&paused, record(6, "rt-stale"), &stale),
        (&paused, record(7, "rt-stale"), &stale),
        (&other, record(5, "rt-older"), &current),
    ] {
        let refused = store.save_token("api", &saved, lock).await;
        assert!(
            matches!(refused, Err(StoreError::Superseded { .. })),
            "{refused:?}"
        );
    }
    let stored = other.load_token("api").await.unwrap().unwrap();
    assert_eq!(stored.refresh_token.unwrap().expose(), "rt-6");

    // Released by its holder only: the stale holder's release leaves the lock alone.
    drop(stale);
    let still = paused
        .lock_refresh("api", Duration::from_millis(100), hold)
        .await;
    assert!(matches!(still, Err(StoreError::LockTimeout { .. })));
    drop(current);
    paused
        .lock_refresh("api", Duration::from_secs(2), hold)
        .await
        .expect("released by its holder");
}

/// A lock this process left set although none of its flights holds it — the answer to the
/// lock request was lost (Redis restarted under it), or its release failed — is taken back
/// by this process at once, not waited out for its TTL; another process still waits.
#[tokio::test]
async fn a_lock_left_over_by_this_process_is_taken_back() {
    let redis = RedisServer::start();
    let (ours, theirs) = two_connected(&redis).await;
    let left = format!("{}:0123456789abcdef", ours.replica());
    redis.command(&["SET", "tollgate:api:lock", &left, "PX", "60000"]);
    let hold = Duration::from_secs(30);
    let busy = theirs
        .lock_refresh("api", Duration::from_millis(100), hold)
        .await;
    assert!(
        matches!(busy, Err(StoreError::LockTimeout { .. })),
        "another process waits"
    );
    let taken = ours.lock_refresh("api", Duration::ZERO, hold).await;
    assert!(taken.is_ok(), "taken back at once: {:?}", taken.err());
    // One this process holds is not taken back by it.
    let again = ours
        .lock_refresh("api", Duration::from_millis(100), hold)
        .await;
    assert!(matches!(again, Err(StoreError::LockTimeout { .. })), "held");
}

/// Send GETs round-robin over `proxies` until `n` were sent; returns how many were served.
async fn spend(proxies: &[&Proxy], n: usize) -> usize {
    let mut served = 0;
    for i in 0..n {
        let a = common::get(url(proxies[i % proxies.len()], &format!("/day/{i}"))).await;
        served += usize::from(a.served());
    }
    served
}

/// `per_day = 50` shared by three replicas: the API sees exactly 50, whichever replica
/// admits them; a replica restarted later finds the day spent.
#[tokio::test]
async fn three_replicas_share_one_day() {
    let (_redis, h, text) = redis_harness(Setup::with_quota("per_day = 50")).await;
    let group = replicas(&text, 3).await;
    let all: Vec<&Proxy> = group.iter().collect();
    assert_eq!(spend(&all, 70).await, 50);
    assert_eq!(h.api.counters().requests, 50);
    shut_down(group).await;
    let late = replica(&text).await;
    assert_eq!(spend(&[&late], 5).await, 0, "the day holds");
    late.shutdown().await;
    assert_eq!(h.api.counters().requests, 50);
}

/// A replica killed with `kill -9` (the binary) loses at most its lease of the day; the
/// replicas left go on, and the day never passes its limit.
#[tokio::test]
async fn a_replica_killed_loses_at_most_its_lease() {
    let (_redis, h, text) = redis_harness(Setup::with_quota("per_day = 50")).await;
    let spawned = common::spawn_serve(&h.write_config("replica.toml", &text));
    let other = replica(&text).await;
    for i in 0..20 {
        let a = common::get(format!("http://{}/spawned/{i}", spawned.addr)).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    drop(spawned); // SIGKILL, holding what is left of its lease
    let served = spend(&[&other], 40).await;
    let lease = 1; // 1% of 50, at least 1
    assert!((30 - lease..=30).contains(&served), "served {served}");
    assert!(h.api.counters().requests <= 50);
    other.shutdown().await;
}

/// Redis stops: a valid token keeps serving and the day spends what is left of its lease,
/// then 503 for the day, never more. `/readyz` stays 200 while the replica can serve, saying
/// `degraded` and naming the store, and is 503 once the lease is spent. Redis comes back: the
/// replica recovers without a restart.
#[tokio::test]
async fn redis_down_then_back() {
    let (mut redis, h, text) = redis_harness(Setup {
        quota: "per_day = 1000".into(),
        admin: true,
        ..Setup::default()
    })
    .await;
    let proxy = replica(&text).await;
    assert_eq!(common::get(url(&proxy, "/warm")).await.status, 200);
    let admin = |path: &str| format!("http://{}{path}", proxy.admin_addr().unwrap());
    let status = common::get(admin("/status")).await.json();
    assert_eq!(status["store"]["store"], redis.url());
    let replicas = status["store"]["replicas"].as_array().unwrap().len();
    assert_eq!(replicas, 1, "{status}");

    redis.stop();
    // The heartbeat (every 200 ms) finds the store gone; the lease in hand still serves.
    let deadline = Instant::now() + Duration::from_secs(5);
    let degraded = loop {
        let ready = common::get(admin("/readyz")).await;
        if ready.text().starts_with("degraded") {
            break ready;
        }
        assert!(Instant::now() < deadline, "{}", ready.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(degraded.status, 200);
    assert!(
        degraded.text().contains("state store"),
        "{}",
        degraded.text()
    );
    // The lease in hand (10, topped up at half) keeps serving; then 503, never more.
    let mut served = 0;
    let mut refused = None;
    for i in 0..30 {
        let a = common::get(url(&proxy, &format!("/down/{i}"))).await;
        match a.status {
            200 => served += 1,
            503 => {
                refused = Some(a);
                break;
            }
            other => panic!("unexpected {other}: {}", a.text()),
        }
    }
    let refused = refused.expect("refused once the lease is spent");
    assert!((1..=20).contains(&served), "served {served} from the lease");
    assert_eq!(refused.json()["type"], "urn:tollgate:problem:quota-store");
    let ready = common::get(admin("/readyz")).await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("counts in hand are spent") && ready.text().contains("state store"),
        "{}",
        ready.text()
    );
    let metrics = common::get(admin("/metrics")).await.text();
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_state_store_errors_total "))
        .expect("exported");
    assert!(errors.parse::<u64>().unwrap() > 0, "{metrics}");

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::get(url(&proxy, "/back")).await.status != 200 {
        assert!(Instant::now() < deadline, "no recovery without a restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = common::get(admin("/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    h.assert_lineage_intact();
    proxy.shutdown().await;
}

/// Redis stops and the API refuses the token: it is not replaced without the store's lock —
/// 503 naming the state store, within a few `[state] timeout`s — and nothing is sent without
/// a token. Redis comes back: one refresh, and requests are served again.
#[tokio::test]
async fn a_refused_token_is_not_replaced_while_redis_is_down() {
    let (mut redis, h, text) = redis_harness(Setup::default()).await;
    let proxy = replica(&text).await;
    assert_eq!(common::get(url(&proxy, "/warm")).await.status, 200);

    redis.stop();
    h.identity.expire_access_tokens();
    let sent = h.api.counters().requests;
    let started = Instant::now();
    let a = common::get(url(&proxy, "/refused")).await;
    let took = started.elapsed();
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.json()["type"], "urn:tollgate:problem:state-store");
    assert!(a.text().contains(&redis.url()), "{}", a.text());
    assert!(took < Duration::from_secs(3), "quick: {took:?}");
    assert_eq!(
        h.api.counters().requests,
        sent + 1,
        "the refused send, no more"
    );
    let again = common::get(url(&proxy, "/again")).await;
    assert_eq!(again.json()["type"], "urn:tollgate:problem:state-store");
    assert_eq!(
        h.api.counters().requests,
        sent + 1,
        "nothing sent without a token"
    );
    let refreshes = h.identity.counters().refreshes;

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = common::get(url(&proxy, "/back")).await;
        if a.status == 200 {
            break;
        }
        if Instant::now() >= deadline {
            let lock = redis.command(&["GET", "tollgate:api:lock"]);
            let ttl = redis.command(&["PTTL", "tollgate:api:lock"]);
            panic!("no recovery: {} lock {lock:?} ttl {ttl:?}", a.text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let once = h.identity.counters().refreshes;
    assert_eq!(once, refreshes + 1, "one refresh once back");
    h.assert_lineage_intact();
    proxy.shutdown().await;
}

/// `tollgate token` on the Redis store joins the group's lineage: it prints the token the
/// replicas use (adopted, not redeemed again), and lets the refresh lock go before it exits
/// rather than leave the replicas waiting for it to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_joins_the_lineage() {
    let (redis, h, text) = redis_harness(Setup::default()).await;
    let replica = replica(&text).await;
    assert_eq!(common::get(url(&replica, "/warm")).await.status, 200);
    let refreshes = h.identity.counters().refreshes;
    let out = Tollgate::new(&["token", "api"])
        .config(&text)
        .run_async()
        .await;
    assert!(out.status.success(), "{}", out.stderr);
    let token = out.stdout;
    let used = h.api.last_authorization().unwrap();
    assert_eq!(format!("Bearer {}", token.trim_end()), used);
    assert_eq!(h.identity.counters().refreshes, refreshes, "adopted");
    let lock = redis.command(&["EXISTS", "tollgate:api:lock"]);
    assert_eq!(lock, redis::Value::Int(0), "the lock was let go");
    replica.shutdown().await;
}

/// Redis loses its data (FLUSHALL: a restart without persistence, a failover to a stale
/// replica) in the middle of the day: the replicas write back the newest token record they
/// hold, so the lineage goes on from it (the strict identity server sees no reuse of a rotated
/// refresh token), and the highest day count they have seen, so the day does not start over.
/// What another replica reserved after that count was seen is not known to anyone: at most
/// one lease per replica can be admitted again.
#[tokio::test]
async fn redis_losing_its_data_loses_neither_the_lineage_nor_the_day() {
    let (redis, h, text) = redis_harness(Setup {
        quota: "per_day = 60".into(),
        extra_auth: THROUGH_A_LOSS.into(),
        ..Setup::default()
    })
    .await;
    let group = replicas(&text, 2).await;
    let both: Vec<&Proxy> = group.iter().collect();
    // A few rotations first, so the seed in the config is long spent.
    for _ in 0..3 {
        h.identity.expire_access_tokens();
        assert_eq!(spend(&both, 2).await, 2);
    }
    assert_eq!(spend(&both, 24).await, 24);
    // Every send counts, the API's 401s and their replays included.
    let spent = h.api.counters().requests;
    assert!(spent >= 30, "{spent}");

    redis.command(&["FLUSHALL"]);
    h.identity.expire_access_tokens();
    spend(&both, 70).await;
    let total = h.api.counters().requests;
    let leases = 2; // one lease (1% of 60, at least 1) per replica
    assert!(
        (60..=60 + leases).contains(&total),
        "the day went on from {spent}, not from 0: {total}"
    );
    h.assert_lineage_intact();
    let stored = redis.command(&["HGET", "tollgate:api:token", "generation"]);
    assert!(stored != redis::Value::Nil, "the record is back in Redis");
    shut_down(group).await;
}

/// Each replica shows itself on the store; each sees the others. A Redis that does not
/// persist, or that evicts keys when full, is named at start (tollgate cannot keep what Redis
/// forgets), with the line to set.
#[tokio::test]
async fn replicas_see_each_other_and_a_redis_that_forgets_is_named() {
    let redis = RedisServer::start();
    let (a, b) = (store(&redis), store(&redis));
    a.heartbeat().await;
    b.heartbeat().await;
    a.heartbeat().await;
    let seen = a.health().unwrap();
    assert_eq!(seen.replicas.len(), 2, "{seen:?}");
    assert!(seen.replicas.contains(&b.replica().to_owned()));
    assert_eq!((seen.problem, seen.errors), (None, 0));

    assert_eq!(
        a.startup_warnings().await,
        Vec::<String>::new(),
        "the test Redis persists and never evicts"
    );
    redis.command(&["CONFIG", "SET", "appendonly", "no"]);
    let warnings = a.startup_warnings().await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("`appendonly yes`"), "{warnings:?}");
    redis.command(&["CONFIG", "SET", "appendonly", "yes"]);
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let warnings = a.startup_warnings().await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("allkeys-lru")
            && warnings[0].contains("`maxmemory-policy noeviction`"),
        "{warnings:?}"
    );
}

/// The generation of `proxy`'s token, from its admin listener.
async fn generation(proxy: &Proxy) -> u64 {
    let status = common::get(format!("http://{}/status", proxy.admin_addr().unwrap()))
        .await
        .json();
    status["upstreams"][0]["token"]["generation"]
        .as_u64()
        .unwrap_or(0)
}

/// One replica refreshes after the API refused its token: the other hears of the new
/// generation on the store's pub/sub and switches to it at once, without a refresh of its own
/// and without waiting for its token to come due.
#[tokio::test]
async fn a_new_generation_is_announced_to_the_other_replicas() {
    let (_redis, h, text) = redis_harness(Setup {
        admin: true,
        ..Setup::default()
    })
    .await;
    let group = warm_replicas(&text, 2).await;
    let (a, b) = (&group[0], &group[1]);
    let before = generation(b).await;
    assert_eq!(generation(a).await, before, "one token for the group");
    let refreshes = h.identity.counters().refreshes;

    h.api.reject_next(1);
    assert_eq!(common::get(url(a, "/refused")).await.status, 200);
    let now = generation(a).await;
    assert_eq!(now, before + 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while generation(b).await != now {
        assert!(
            Instant::now() < deadline,
            "the other replica never switched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h.identity.counters().refreshes,
        refreshes + 1,
        "one refresh"
    );
    assert_eq!(common::get(url(b, "/after")).await.status, 200);
    h.assert_lineage_intact();
    shut_down(group).await;
}

/// The API answers one replica 429 with `Retry-After: 30`: every replica holds back — the
/// other answers 429 itself, without contacting the API — not only the one that was told.
#[tokio::test]
async fn an_upstream_429_to_one_replica_holds_every_replica_back() {
    let (_redis, h, text) = redis_harness(Setup::default()).await;
    let group = warm_replicas(&text, 2).await;
    let (a, b) = (&group[0], &group[1]);

    let throttled = common::get(url(a, "/x?sim_status=429&sim_retry_after=30")).await;
    assert_eq!(throttled.status, 429, "the API's own 429");
    let sent = h.api.counters().requests;
    let deadline = Instant::now() + Duration::from_secs(5);
    let held = loop {
        let answer = common::get(url(b, "/other")).await;
        if answer.status == 429 {
            break answer;
        }
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(
            Instant::now() < deadline,
            "the other replica was never held back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        held.json()["type"],
        "urn:tollgate:problem:upstream-throttled"
    );
    let retry: u64 = held.header("retry-after").parse().unwrap();
    assert!((25..=30).contains(&retry), "{retry}");
    let before = h.api.counters().requests;
    assert_eq!(common::get(url(b, "/held")).await.status, 429);
    assert_eq!(
        h.api.counters().requests,
        before,
        "not contacted while held"
    );
    assert!(before <= sent + 5);
    shut_down(group).await;
}

/// A lock is kept alive while its holder holds it, past the time it was taken for (a slow
/// token request, a save the store keeps refusing): another replica cannot take it meanwhile.
#[tokio::test]
async fn a_held_lock_is_kept_alive() {
    let redis = RedisServer::start();
    let (holder, other) = two_connected(&redis).await;
    let short = Duration::from_secs(1);
    let held = holder
        .lock_refresh("api", Duration::ZERO, short)
        .await
        .unwrap();
    let busy = other
        .lock_refresh("api", Duration::from_secs(3), short)
        .await;
    assert!(
        matches!(busy, Err(StoreError::LockTimeout { .. })),
        "kept alive for three times the 1 s it was taken for"
    );
    drop(held);
    other
        .lock_refresh("api", Duration::from_secs(2), short)
        .await
        .expect("free once let go");
}

/// Redis loses its data while one replica is behind (it missed the newest generation): it
/// writes back what it knows, but before it redeems, the replica that knows the newer record
/// hears of the older one and writes the newer back, which the first then uses. No refresh
/// token rotated away is redeemed: the strict identity server sees no reuse.
#[tokio::test]
async fn after_a_data_loss_the_newest_record_wins_over_a_stale_replica() {
    let (redis, h, text) = redis_harness(Setup {
        extra_auth: THROUGH_A_LOSS.into(),
        ..Setup::default()
    })
    .await;
    let config = parse(&text);
    let upstream = &config.upstreams[0];
    let cache = |s: RedisStore| {
        Arc::new(TokenCache::new(upstream, Arc::new(s), &Default::default()).unwrap())
    };
    // `behind` follows no announcements (no refresh-ahead task); `ahead` does.
    let (behind, ahead) = (cache(store_of(&text)), cache(store_of(&text)));
    let first = behind.get().await.unwrap();
    assert_eq!(ahead.get().await.unwrap().generation, first.generation);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(Arc::clone(&ahead).refresh_ahead(async move {
        let _ = stopped.await;
    }));
    let newer = ahead.replace_rejected(first.generation).await.unwrap();
    assert_eq!(newer.generation, first.generation + 1);
    assert_eq!(
        behind.cached().unwrap().generation,
        first.generation,
        "behind"
    );

    redis.command(&["FLUSHALL"]);
    let token = behind.replace_rejected(first.generation).await.unwrap();
    assert!(token.generation > first.generation, "{}", token.generation);
    h.assert_lineage_intact();
    let _ = stop.send(());
    task.await.unwrap();
}

/// A RedisStore for the `[state]` of config `text`.
fn store_of(text: &str) -> RedisStore {
    redis_store(&parse(text).state)
}

/// After Redis lost its data, a new login (`tollgate login`, here its record saved directly)
/// wins over what the replicas know of the older lineage: they use its refresh token rather
/// than write theirs back over it.
#[tokio::test]
async fn a_login_after_a_data_loss_is_not_overwritten() {
    let (redis, h, text) = redis_harness(Setup {
        extra_auth: THROUGH_A_LOSS.into(),
        ..Setup::default()
    })
    .await;
    let config = parse(&text);
    let upstream = &config.upstreams[0];
    let replica = Arc::new(
        TokenCache::new(upstream, Arc::new(store_of(&text)), &Default::default()).unwrap(),
    );
    let first = replica.get().await.unwrap();
    let first = replica.replace_rejected(first.generation).await.unwrap();

    redis.command(&["FLUSHALL"]);
    let login_store = store_of(&text);
    let login = TokenRecord {
        seed_hash: tollgate::token::lineage_hash(&upstream.auth),
        dpop_key: None,
        refresh_token: Some(Secret::from(h.identity.issue_refresh_token())),
        access_token: None,
        issued_at_ms: 0,
        expires_at_ms: 0,
        generation: 1,
        login_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    };
    let held = login_store
        .lock_refresh("api", Duration::from_secs(20), Duration::from_secs(11))
        .await
        .unwrap();
    login_store.save_token("api", &login, &held).await.unwrap();
    drop(held);
    login_store.flush().await;

    let refreshes = h.identity.counters().refreshes;
    let token = replica.replace_rejected(first.generation).await.unwrap();
    assert!(
        token.generation > first.generation,
        "{} then {}",
        first.generation,
        token.generation
    );
    assert_eq!(
        h.identity.counters().refreshes,
        refreshes + 1,
        "the login's token, redeemed"
    );
    let stored = login_store.load_token("api").await.unwrap().unwrap();
    assert_eq!(
        stored.login_at_ms, login.login_at_ms,
        "the login's lineage goes on"
    );
    h.assert_lineage_intact();
}

/// Counts given back by one replica can be reserved by another: a count below what a replica
/// saw is a loss only when the store's version went back too (a flush), not after a release.
#[tokio::test]
async fn a_count_given_back_is_not_taken_for_a_loss() {
    let redis = RedisServer::start();
    in_use(&redis);
    let (a, b) = (store(&redis), store(&redis));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let day = Period::new(now - now % 86_400_000, now - now % 86_400_000 + 86_400_000);
    let seen = |r: &Reservation| Seen {
        count: r.used,
        version: r.version,
    };
    let first = a
        .reserve_quota("api", &day, 100, 60, Seen::default())
        .await
        .unwrap();
    assert_eq!((first.granted, first.used), (60, 60));
    let second = b
        .reserve_quota("api", &day, 100, 40, Seen::default())
        .await
        .unwrap();
    assert_eq!((second.granted, second.used), (40, 100));
    a.release_quota("api", &day, 30).await.unwrap();
    // B saw 100; the store counts 70 because A gave 30 back, not because it lost anything.
    let again = b
        .reserve_quota("api", &day, 100, 10, seen(&second))
        .await
        .unwrap();
    assert_eq!(
        (again.granted, again.used),
        (10, 80),
        "released counts are reserved again"
    );

    // A flush is a loss: nothing is granted while the replicas write back, and the highest
    // count seen comes back before anything is granted again.
    redis.command(&["FLUSHALL"]);
    let refused = b.reserve_quota("api", &day, 100, 10, seen(&again)).await;
    assert!(
        matches!(refused, Err(StoreError::Recovering { .. })),
        "{refused:?}"
    );
    let after = loop {
        match b.reserve_quota("api", &day, 100, 10, seen(&again)).await {
            Err(StoreError::Recovering { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => break other.unwrap(),
        }
    };
    assert_eq!(
        (after.granted, after.used),
        (10, 90),
        "the day goes on from 80"
    );
}

/// Tasks of one process contend for the lock on one store: never two hold it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_at_a_time_within_a_process() {
    let redis = RedisServer::start();
    in_use(&redis);
    let shared = Arc::new(store(&redis));
    connected(&[&shared]).await;
    let holders = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (shared, holders) = (Arc::clone(&shared), Arc::clone(&holders));
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let lock = shared
                    .lock_refresh("api", Duration::from_secs(10), Duration::from_secs(30))
                    .await
                    .unwrap();
                let before = holders.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                assert_eq!(before, 0, "two holders at once");
                tokio::time::sleep(Duration::from_millis(2)).await;
                holders.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                drop(lock);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// `per_hour` shared by three replicas is a fixed window the group counts in Redis: the API
/// sees exactly the limit, and a refusal says which window and when the next one starts.
#[tokio::test]
async fn three_replicas_share_one_short_window() {
    let (_redis, h, text) = redis_harness(Setup::with_quota("per_hour = 30")).await;
    // Not within seconds of the hour's end, where the window would turn during the test.
    let into_hour = || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        now.as_secs() % 3600
    };
    if into_hour() > 3590 {
        tokio::time::sleep(Duration::from_secs(3601 - into_hour())).await;
    }
    let group = replicas(&text, 3).await;
    let all: Vec<&Proxy> = group.iter().collect();
    assert_eq!(spend(&all, 45).await, 30);
    assert_eq!(h.api.counters().requests, 30);
    let refused = common::get(url(all[1], "/more")).await;
    assert_eq!(refused.status, 429);
    let body = refused.text();
    assert!(body.contains("30 requests per hour"), "{body}");
    let retry: u64 = refused.header("retry-after").parse().unwrap();
    let left = 3600 - into_hour();
    assert!(
        retry <= left + 1 && retry + 5 >= left,
        "retry {retry}, hour ends in {left}"
    );
    shut_down(group).await;
    // What the replicas held and did not spend went back; the hour is still spent.
    let late = replica(&text).await;
    assert_eq!(
        spend(&[&late], 5).await,
        0,
        "the hour holds across a restart"
    );
    late.shutdown().await;
}

/// `rediss://` with a password and a private CA (`[state] ca_file`): two replicas share the
/// lineage and the day over TLS, and the password shows nowhere.
#[tokio::test]
async fn replicas_share_over_tls_with_a_password() {
    let redis = RedisServer::start_tls();
    let (h, text) = on_redis(Setup::with_quota("per_day = 20"), &redis).await;
    let ca = redis.ca_file();
    let text = text.replace(
        "timeout = \"500ms\"",
        &format!(
            "timeout = \"500ms\"\nca_file = {:?}",
            ca.display().to_string()
        ),
    );
    let config = parse(&text);
    let described = config.describe();
    assert!(described.contains("rediss://"), "{described}");
    assert!(
        !described.contains(common::redis_server::PASSWORD),
        "{described}"
    );
    assert!(!format!("{config:?}").contains(common::redis_server::PASSWORD));

    let group = replicas(&text, 2).await;
    let both: Vec<&Proxy> = group.iter().collect();
    h.identity.expire_access_tokens();
    // One day for both, over TLS, never past it (a 401 on the expired token and its replay
    // count as two).
    let served = spend(&both, 30).await;
    assert!((18..=20).contains(&served), "served {served}");
    assert_eq!(h.api.counters().requests, 20);
    h.assert_lineage_intact();
    let stored = redis.command(&["HGET", "tollgate:api:token", "generation"]);
    assert!(stored != redis::Value::Nil, "the record is in Redis");
    shut_down(group).await;
}

/// A spent day refuses before the short windows count the request: refusals keep naming the
/// day (not a minute drained by refused requests), and say when it resets.
#[tokio::test]
async fn a_spent_day_does_not_drain_the_short_windows() {
    let (_redis, h, text) = redis_harness(Setup::with_quota("per_day = 5\nper_minute = 12")).await;
    let proxy = replica(&text).await;
    assert_eq!(spend(&[&proxy], 5).await, 5);
    for i in 0..20 {
        let refused = common::get(url(&proxy, &format!("/over/{i}"))).await;
        assert_eq!(refused.status, 429);
        let body = refused.text();
        assert!(body.contains("daily quota of 5"), "refusal {i}: {body}");
    }
    assert_eq!(h.api.counters().requests, 5);
    proxy.shutdown().await;
}

/// A key's budget is the group's on Redis: two replicas admit the key exactly its budget
/// between them, and both report the group's day by key.
#[tokio::test]
async fn a_key_budget_holds_across_replicas() {
    const KEY: &str = "etl-key-0123456789abcdef";
    let (_redis, h, text) = redis_harness(Setup {
        quota: "per_day = 100".into(),
        extra_tables: format!(
            "[upstream.inbound]\nkeys = [{{ name = \"etl\", key = \"{KEY}\", per_day = 10 }}]"
        ),
        admin: true,
        ..Setup::default()
    })
    .await;
    let group = replicas(&text, 2).await;
    let mut served = 0;
    for i in 0..30 {
        let request = http::Request::get(url(&group[i % 2], &format!("/k/{i}")))
            .header("authorization", format!("Bearer {KEY}"))
            .body(http_body_util::Full::<bytes::Bytes>::default())
            .unwrap();
        let a = common::collect(common::client().request(request).await.unwrap()).await;
        match a.status {
            200 => served += 1,
            429 => assert!(a.text().contains("`etl` has spent its budget of 10")),
            other => panic!("unexpected {other}: {}", a.text()),
        }
    }
    assert!((9..=10).contains(&served), "served {served}");
    assert_eq!(h.api.counters().requests, served as u64);
    // Each replica adds its counts when its /status is read (and every 5 s): after both
    // were read, each shows the group's.
    let status = |proxy: &Proxy| {
        let admin = proxy.admin_addr().unwrap();
        async move { common::get(format!("http://{admin}/status")).await.json() }
    };
    for proxy in &group {
        status(proxy).await;
    }
    for proxy in &group {
        let keys = &status(proxy).await["upstreams"][0]["day"]["keys"][0];
        assert_eq!(keys["name"], "etl");
        assert_eq!(keys["used_today"], served, "the group's, on each replica");
    }
    shut_down(group).await;
}

/// A loss is noticed once: after FLUSHALL the store's clock starts again from nothing, which
/// is not taken for another loss at the next heartbeats.
#[tokio::test]
async fn a_loss_is_noticed_once() {
    let redis = RedisServer::start();
    let (a, b) = (store(&redis), store(&redis));
    for _ in 0..5 {
        a.heartbeat().await;
        b.heartbeat().await;
    }
    assert_eq!(a.health().unwrap().losses, 0, "a first start is no loss");
    redis.command(&["FLUSHALL"]);
    for _ in 0..5 {
        a.heartbeat().await;
        b.heartbeat().await;
    }
    assert_eq!(a.health().unwrap().losses, 1);
    assert_eq!(b.health().unwrap().losses, 1);
}
