//! The faults a token lineage and a day must survive on a shared store, against a strictly
//! rotating identity server (a reused refresh token revokes the grant) and a real
//! `redis-server`: an identity server that answers late, a lock holder paused within its
//! lock's life, Redis losing its data during a refresh or while the replica that knows the day
//! is idle, a store address that answered garbage for a while, a refused password.

use crate::common;

use common::redis_server::RedisServer;
use common::{
    on_redis, redis_harness, replica, replicas, shut_down, until, url_of as url, warm_replicas,
    Answer, Setup, THROUGH_A_LOSS,
};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::store::StateStore;
use tollgate::Proxy;

/// GET `path` on `proxy` in a task of its own.
fn get_later(proxy: &Proxy, path: &str) -> tokio::task::JoinHandle<Answer> {
    tokio::spawn(common::get(url(proxy, path)))
}

/// The identity server answers a refresh 3 s late, past `auth.timeout` (1 s), on two
/// replicas whose tokens both expired: one redeems and waits for the answer, keeping the lock;
/// the other waits for the lock and adopts. One redemption, no reuse, both served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_on_replicas_is_redeemed_once() {
    one_redemption_for_two(Duration::from_secs(3), |_| {}).await;
}

/// A replica (the binary) sends a refresh and is stopped (SIGSTOP) for 5 s, within its lock's
/// life (12 s); the identity server processes the refresh at once and answers while it is
/// stopped. Meanwhile another replica needs a token and waits for the lock. Resumed, the
/// holder reads the answer that arrived — its timer does not win — saves it and lets go; the
/// other adopts. No refresh token is redeemed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_paused_within_its_lock_keeps_its_redemption() {
    let (_redis, h, text) = redis_harness(Setup {
        extra_auth: "timeout = \"2s\"\nrefresh_wait = \"20s\"".into(),
        ..Setup::default()
    })
    .await;
    let paused = common::spawn_serve(&h.write_config("paused.toml", &text));
    let other = replica(&text).await;
    let paused_url = format!("http://{}", paused.addr);
    assert_eq!(common::get(format!("{paused_url}/warm")).await.status, 200);
    assert_eq!(common::get(url(&other, "/warm")).await.status, 200);

    let before = h.identity.counters();
    h.identity.answer_late(1, Duration::from_millis(500));
    h.identity.expire_access_tokens();
    let held = tokio::spawn(common::get(format!("{paused_url}/held")));
    until(|| h.identity.counters().refreshes > before.refreshes).await;
    paused.signal("STOP");
    let waiting = get_later(&other, "/waits");
    tokio::time::sleep(Duration::from_secs(5)).await;
    paused.signal("CONT");
    for answer in [held.await.unwrap(), waiting.await.unwrap()] {
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let after = h.identity.counters();
    assert_eq!(after.refreshes - before.refreshes, 1, "one redemption");
    h.assert_lineage_intact();
    other.shutdown().await;
}

/// Two replicas whose tokens expired; the identity server answers the first one's refresh
/// `late`, and while it is in the air `meanwhile` happens to Redis, then the second needs a
/// token. The holder keeps (or sets again) its lock and saves what it got; the second waits
/// for the lock and adopts it: one redemption, no reuse, both served, the record in Redis.
async fn one_redemption_for_two(late: Duration, meanwhile: impl FnOnce(&mut RedisServer)) {
    two_replicas_one_redemption(RedisServer::start(), late, |_| {}, meanwhile).await;
}

/// [`one_redemption_for_two`] on `redis`, with `first` done to it once both replicas are
/// warm, before the refresh.
async fn two_replicas_one_redemption(
    mut redis: RedisServer,
    late: Duration,
    first: impl FnOnce(&mut RedisServer),
    meanwhile: impl FnOnce(&mut RedisServer),
) {
    let setup = Setup {
        extra_auth: THROUGH_A_LOSS.into(),
        ..Setup::default()
    };
    let (h, text) = on_redis(setup, &redis).await;
    let group = warm_replicas(&text, 2).await;
    // A few heartbeats, so that each replica has seen the store's clock move on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    first(&mut redis);
    let before = h.identity.counters();
    h.identity.answer_late(1, late);
    h.identity.expire_access_tokens();
    let holder = get_later(&group[0], "/holder");
    until(|| h.identity.counters().refreshes > before.refreshes).await;
    meanwhile(&mut redis);
    let other = get_later(&group[1], "/other");
    for answer in [holder.await.unwrap(), other.await.unwrap()] {
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let after = h.identity.counters();
    assert_eq!(
        after.token_requests - before.token_requests,
        1,
        "one redemption"
    );
    h.assert_lineage_intact();
    for proxy in &group {
        let a = common::get(url(proxy, "/after")).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let stored = redis.command(&["HGET", "tollgate:api:token", "generation"]);
    assert!(stored != redis::Value::Nil, "the record is back in Redis");
    shut_down(group).await;
}

/// Redis loses its data (FLUSHALL) while a refresh is in the air: the second replica notices
/// and waits out the lock's life; the holder sets its lock again and saves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_during_a_refresh_redeems_nothing_twice() {
    one_redemption_for_two(Duration::from_secs(2), |redis| {
        redis.command(&["FLUSHALL"]);
    })
    .await;
}

/// The same with a restart without persistence: the holder's save waits for Redis to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_persistence_during_a_refresh_redeems_nothing_twice() {
    one_redemption_for_two(Duration::from_secs(2), RedisServer::restart_empty).await;
}

/// The same with a restart from a snapshot taken before the refresh: the epoch comes back,
/// the lock does not. The holder sets it again before anyone may ask for one on a new
/// connection, and the store's clock, gone back, tells the replicas it lost data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_an_older_snapshot_during_a_refresh_redeems_nothing_twice() {
    two_replicas_one_redemption(
        RedisServer::start_with_snapshots(),
        Duration::from_secs(2),
        |redis| redis.snapshot(),
        RedisServer::restart_from_snapshot,
    )
    .await;
}

/// Send GETs to `proxy` until `n` were admitted or refused by the quota; a 503 (the store
/// recovering) is asked again. Returns how many were served.
async fn spend_until_refused(proxy: &Proxy, n: usize) -> usize {
    let (mut served, mut answered) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered < n {
        let a = common::get(url(proxy, &format!("/day/{answered}"))).await;
        assert!(
            Instant::now() < deadline,
            "still not answered after 20 s: {}",
            a.text()
        );
        match a.status {
            200 => served += 1,
            429 => {}
            503 => {
                assert!(a.text().contains("state store"), "{}", a.text());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            other => panic!("unexpected {other}: {}", a.text()),
        }
        answered += 1;
    }
    served
}

/// `per_day = 30` on two replicas. The first spends all 30; Redis restarts empty while it
/// sits idle; then only the second is asked. The first notices the loss at its next heartbeat
/// and writes its count back; the second reserves nothing meanwhile (503), then finds the day
/// spent. The API sees 30, not 60.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_while_the_replica_that_knows_the_day_is_idle_does_not_double_it() {
    let (mut redis, h, text) = redis_harness(Setup::with_quota("per_day = 30")).await;
    let group = replicas(&text, 2).await;
    assert_eq!(spend_until_refused(&group[0], 40).await, 30);
    let spent = h.api.counters().requests;
    assert_eq!(spent, 30);

    redis.restart_empty();
    assert_eq!(spend_until_refused(&group[1], 30).await, 0);
    assert_eq!(
        h.api.counters().requests,
        30,
        "the day is not counted again"
    );
    h.assert_lineage_intact();
    shut_down(group).await;
}

/// What a fake store address answers, by phase.
const SILENT: u8 = 0;
const RESP_ERRORS: u8 = 1;
const RANDOM_BYTES: u8 = 2;
const HTTP: u8 = 3;

/// A server on `port` that answers whatever `phase` says, until the task is aborted.
async fn garbage_server(port: u16, phase: Arc<AtomicU8>) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let phase = Arc::clone(&phase);
            connections.spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let answer: Vec<u8> = match phase.load(Ordering::Relaxed) {
                        SILENT => continue,
                        RESP_ERRORS => {
                            b"-ERR this is not the server you are looking for\r\n".to_vec()
                        }
                        RANDOM_BYTES => (0..64).map(|_| rand::random::<u8>()).collect(),
                        _ => b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_vec(),
                    };
                    if stream.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

/// Redis stops and its address answers garbage for a while — nothing at all, RESP errors,
/// random bytes, HTTP — then Redis starts there again. Requests get 503 meanwhile, and the
/// replica serves again within seconds of Redis answering, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_address_that_answered_garbage_is_used_again_when_redis_answers() {
    let port = common::free_port();
    let phase = Arc::new(AtomicU8::new(SILENT));
    let mut redis = RedisServer::start_at(port);
    let (h, text) = on_redis(Setup::with_quota("per_day = 100"), &redis).await;
    let proxy = replica(&text).await;
    assert_eq!(common::get(url(&proxy, "/before")).await.status, 200);
    redis.stop();
    let fake = garbage_server(port, Arc::clone(&phase)).await;
    // The lease in hand (1% of the day: 1) may still serve one; then 503. The last phase
    // lasts longer than a connection pool's retries with backoff (a Redis client that retries
    // a failed handshake for 20 s and then keeps its parse error was stuck for good).
    let mut served = 0;
    for (p, lasts) in [(SILENT, 1), (RESP_ERRORS, 1), (RANDOM_BYTES, 1), (HTTP, 25)] {
        phase.store(p, Ordering::Relaxed);
        let ends = Instant::now() + Duration::from_secs(lasts);
        let mut i = 0;
        while Instant::now() < ends {
            let a = common::get(url(&proxy, &format!("/garbage/{p}/{i}"))).await;
            match a.status {
                200 => served += 1,
                503 => assert!(a.text().contains("state store"), "{}", a.text()),
                other => panic!("phase {p}: {other} {}", a.text()),
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(served <= 1, "only the lease in hand: {served}");
    fake.abort();
    let _ = fake.await;
    redis.restart();
    let started = Instant::now();
    loop {
        let a = common::get(url(&proxy, "/after")).await;
        if a.status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not served 10 s after Redis answered: {} {}",
            a.status,
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("served again {:?} after Redis answered", started.elapsed());
    h.assert_lineage_intact();
    proxy.shutdown().await;
}

/// A password Redis refuses is named as such — at start and in every failure — not as a store
/// that does not answer in time.
#[tokio::test]
async fn a_refused_password_is_named_as_an_authentication_failure() {
    let redis = RedisServer::start_tls();
    let state = tollgate::config::StateConfig {
        store: tollgate::secret::Secret::from(redis.url_with_wrong_password()),
        ca_file: Some(redis.ca_file()),
        ..tollgate::config::StateConfig::default()
    };
    let store = common::redis_store(&state);
    let warnings = store.startup_warnings().await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("refused to authenticate") && !warnings[0].contains("no answer"),
        "{warnings:?}"
    );
    assert!(!warnings[0].contains("not-the-password"), "{warnings:?}");
    let failed = store.load_token("api").await.unwrap_err().to_string();
    assert!(failed.contains("refused to authenticate"), "{failed}");
}

/// The same, but the replica that spent the day is killed (`kill -9`) before Redis restarts
/// empty: the other read the day's count at its heartbeats, writes that back, and the day is
/// not counted again. What a dead replica reserved after the others' last heartbeat is the
/// most that can be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_after_the_replica_that_knew_the_day_died_keeps_what_the_others_read() {
    let (mut redis, h, text) = redis_harness(Setup::with_quota("per_day = 30")).await;
    let dies = common::spawn_serve(&h.write_config("dies.toml", &text));
    let survivor = replica(&text).await;
    let base = format!("http://{}", dies.addr);
    let mut served = 0;
    for i in 0..40 {
        if common::get(format!("{base}/day/{i}")).await.status == 200 {
            served += 1;
        }
    }
    assert_eq!(served, 30);
    // A few of the survivor's heartbeats (every 200 ms) read the count.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(dies); // SIGKILL
    redis.restart_empty();
    assert_eq!(spend_until_refused(&survivor, 30).await, 0);
    assert_eq!(
        h.api.counters().requests,
        30,
        "the day is not counted again"
    );
    survivor.shutdown().await;
}
