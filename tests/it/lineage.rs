//! A refresh belongs to no request: a client that gives up, a store that will not save, a
//! reload or a `kill -9` in the middle of a refresh never lose the token lineage, nor make
//! tollgate redeem a refresh token twice at a strictly rotating identity server.

use crate::common;

use async_trait::async_trait;
use common::{until, Harness, Setup};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::store::{
    FileStore, Period, RefreshLock, Reservation, Seen, StateStore, StoreError, TokenRecord, Used,
};
use tollgate::token::TokenCache;

/// GET `path` on a connection of its own and close it after `patience` without an answer: a
/// client that gives up (`curl -m 1`, a legacy tool's timeout).
async fn give_up(addr: SocketAddr, path: &str, patience: Duration) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut byte = [0u8; 1];
    let answered = tokio::time::timeout(patience, stream.read(&mut byte)).await;
    assert!(answered.is_err(), "answered before the client gave up");
}

fn stored_generation(h: &Harness) -> u64 {
    h.stored()["generation"].as_u64().unwrap()
}

/// The API refuses the token; the identity server rotates the refresh token at once but holds
/// its answer back, and the client gives up meanwhile. The refresh still lands and is saved:
/// the next request is served, nothing is redeemed twice. Ten times over.
#[tokio::test]
async fn a_client_that_gives_up_during_a_refresh_after_a_401_loses_nothing() {
    let h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let addr = h.proxy().addr("api").unwrap();
    for round in 0..10 {
        let generation = stored_generation(&h);
        h.identity.answer_late(1, Duration::from_millis(600));
        h.identity.expire_access_tokens();
        give_up(
            addr,
            &format!("/gives-up/{round}"),
            Duration::from_millis(200),
        )
        .await;
        let next = h.get(&format!("/next/{round}")).await;
        assert_eq!(next.status, 200, "round {round}: {}", next.text());
        assert_eq!(stored_generation(&h), generation + 1, "round {round}");
    }
    h.assert_lineage_intact();
}

/// The same at start-up: the first request waits for the first token and gives up before
/// the identity server's late answer; the token still arrives and is saved.
#[tokio::test]
async fn a_client_that_gives_up_waiting_for_the_first_token_loses_nothing() {
    let mut h = Harness::start(Setup::default()).await;
    h.stop_proxy().await;
    // A new login: a seed nothing has redeemed yet, and a state store of its own.
    let seed = h.identity.issue_refresh_token();
    let state = tempfile::tempdir().unwrap();
    let text = h.config_text.replace(&h.seed, &seed).replace(
        &h.state_dir().display().to_string(),
        &state.path().display().to_string(),
    );
    h.identity.answer_late(1, Duration::from_millis(600));
    let proxy = common::replica(&text).await;
    let addr = proxy.addr("api").unwrap();
    give_up(addr, "/first", Duration::from_millis(200)).await;
    let next = common::get(format!("http://{addr}/next")).await;
    assert_eq!(next.status, 200, "{}", next.text());
    h.assert_lineage_intact();
    proxy.shutdown().await;
}

/// The binary, `kill -9`ed after a client gave up on a refresh with a late answer. Killed once
/// the answer has arrived: the record was saved although nobody waited for it, and the next
/// process adopts it without redeeming. Killed while the answer is still held back: the store
/// holds the record before it, whole — the documented rule — and since the strict identity
/// server has already rotated that refresh token, the next process says to log in again.
#[tokio::test]
async fn kill_9_during_a_late_answer_leaves_the_old_record_or_the_new() {
    let mut h = Harness::start(Setup::default()).await;
    h.stop_proxy().await;
    let path = h.write_config("tollgate.toml", &h.config_text);

    // Killed after the answer arrived.
    let spawned = common::spawn_serve(&path);
    let addr: SocketAddr = spawned.addr.parse().unwrap();
    assert_eq!(common::get(format!("http://{addr}/warm")).await.status, 200);
    let generation = stored_generation(&h);
    h.identity.answer_late(1, Duration::from_millis(500));
    h.identity.expire_access_tokens();
    give_up(addr, "/gives-up", Duration::from_millis(200)).await;
    until(|| stored_generation(&h) == generation + 1).await;
    drop(spawned); // SIGKILL
    let refreshes = h.identity.counters().refreshes;
    h.start_proxy().await;
    assert_eq!(h.get("/after-kill").await.status, 200);
    assert_eq!(
        h.identity.counters().refreshes,
        refreshes,
        "adopted, not redeemed"
    );
    h.stop_proxy().await;

    // Killed while the answer is held back.
    let spawned = common::spawn_serve(&path);
    let addr: SocketAddr = spawned.addr.parse().unwrap();
    let before = h.stored();
    let refreshes = h.identity.counters().refreshes;
    h.identity.answer_late(1, Duration::from_secs(5));
    h.identity.expire_access_tokens();
    give_up(addr, "/gives-up", Duration::from_millis(200)).await;
    until(|| h.identity.counters().refreshes == refreshes + 1).await;
    drop(spawned); // SIGKILL
    assert_eq!(h.stored(), before, "the record before the refresh, whole");
    h.start_proxy().await;
    let a = h.get("/after-kill").await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.json()["type"], "urn:tollgate:problem:login-required");
    assert!(a.text().contains("tollgate login api"), "{}", a.text());
}

/// A store that refuses the first `failures` saves of a token record; otherwise the file store.
struct FlakyStore {
    inner: FileStore,
    failures: AtomicU32,
}

#[async_trait]
impl StateStore for FlakyStore {
    async fn load_token(&self, upstream: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.load_token(upstream).await
    }

    async fn save_token(
        &self,
        upstream: &str,
        record: &TokenRecord,
        lock: &RefreshLock,
    ) -> Result<(), StoreError> {
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if fail.is_ok() {
            return Err(StoreError::Io {
                path: "flaky".into(),
                source: std::io::Error::other("No space left on device (simulated)"),
            });
        }
        self.inner.save_token(upstream, record, lock).await
    }

    fn set_keys(&self, keys: tollgate::seal::Keys) {
        self.inner.set_keys(keys)
    }

    async fn lock_refresh(
        &self,
        upstream: &str,
        wait: Duration,
        hold: Duration,
    ) -> Result<RefreshLock, StoreError> {
        self.inner.lock_refresh(upstream, wait, hold).await
    }

    async fn reserve_quota(
        &self,
        upstream: &str,
        period: &Period,
        limit: u64,
        want: u64,
        seen: Seen,
    ) -> Result<Reservation, StoreError> {
        self.inner
            .reserve_quota(upstream, period, limit, want, seen)
            .await
    }

    async fn release_quota(
        &self,
        upstream: &str,
        period: &Period,
        count: u64,
    ) -> Result<(), StoreError> {
        self.inner.release_quota(upstream, period, count).await
    }

    async fn quota_used(&self, upstream: &str, period: &Period) -> Result<u64, StoreError> {
        self.inner.quota_used(upstream, period).await
    }

    async fn add_usage(
        &self,
        upstream: &str,
        day: &Period,
        added: &[Used],
    ) -> Result<Vec<Used>, StoreError> {
        self.inner.add_usage(upstream, day, added).await
    }
}

/// The store refuses the record of a redemption three times. The refresh keeps the store's
/// lock and retries; the new access token serves meanwhile and readiness says why. A second
/// cache on the same store, as another process would, waits for the lock and adopts the saved
/// record rather than redeem the spent refresh token; then both serve the same token.
#[tokio::test]
async fn a_failed_save_keeps_the_lock_until_the_record_is_saved() {
    let mut h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    h.stop_proxy().await;
    let config = h.config();
    let upstream = &config.upstreams[0];
    let flaky = Arc::new(FlakyStore {
        inner: FileStore::open(&h.state_dir()).unwrap(),
        failures: AtomicU32::new(3),
    });
    let other_store = Arc::new(FileStore::open(&h.state_dir()).unwrap());
    let a = Arc::new(TokenCache::new(upstream, flaky.clone(), &Default::default()).unwrap());
    let b = Arc::new(TokenCache::new(upstream, other_store, &Default::default()).unwrap());
    let first = a.get().await.unwrap();
    assert_eq!(b.get().await.unwrap().generation, first.generation);
    let refreshes = h.identity.counters().refreshes;

    // The API refused that token, to both.
    let new = a.replace_rejected(first.generation).await.unwrap();
    assert_eq!(new.generation, first.generation + 1);
    let reason = a
        .unready_reason()
        .expect("not ready while the record is unsaved");
    assert!(reason.contains("not saved yet"), "{reason}");
    assert!(reason.contains("No space left on device"), "{reason}");
    assert_eq!(
        a.cached().unwrap().generation,
        new.generation,
        "serves meanwhile"
    );
    assert_eq!(stored_generation(&h), first.generation, "not saved yet");

    let adopted = b.replace_rejected(first.generation).await.unwrap();
    assert_eq!(adopted.generation, new.generation);
    assert_eq!(adopted.header, new.header);
    assert_eq!(
        flaky.failures.load(Ordering::SeqCst),
        0,
        "saved at the fourth try"
    );
    assert!(a.settle(Duration::from_secs(5)).await);
    assert_eq!(a.unready_reason(), None);
    assert_eq!(stored_generation(&h), new.generation);
    let ids = h.identity.counters();
    assert_eq!(ids.refreshes, refreshes + 1, "one redemption for both");
    assert_eq!((ids.reuse_detected, ids.grants_revoked), (0, 0));
}

/// `tollgate_token_refreshes_total{result="error"}` of upstream `api`.
async fn refresh_errors(h: &Harness) -> u64 {
    let metrics = common::get(h.admin_url("/metrics")).await.text();
    let sample =
        "tollgate_token_refreshes_total{upstream=\"api\",identity=\"-\",result=\"error\"} ";
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample))
        .expect("the sample is exported")
        .parse()
        .unwrap()
}

/// A reload breaks `token_url`, the API refuses the token, and the refresh for the refused
/// request fails and retries. A second reload fixes `token_url` while that refresh is in the
/// air: the request is served with a token fetched under the fixed settings, and the upstream
/// is ready again.
#[tokio::test]
async fn a_reload_that_fixes_the_token_url_serves_a_request_waiting_for_a_refresh() {
    let mut h = Harness::start(Setup {
        admin: true,
        ..Setup::default()
    })
    .await;
    assert_eq!(h.get("/warm").await.status, 200);
    let fixed = h.config_text.clone();
    let closed = format!("http://127.0.0.1:{}/token", common::free_port());
    let broken = h.config_text.replace(&h.identity.token_url(), &closed);
    h.reload(&broken).await.unwrap();

    h.identity.expire_access_tokens();
    let refused = h.api.counters().rejected;
    let waiting = tokio::spawn(common::get(h.url("/waits")));
    until(|| h.api.counters().rejected > refused).await;
    let errors = refresh_errors(&h).await;
    while refresh_errors(&h).await == errors {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!waiting.is_finished(), "the refresh is still being retried");

    h.reload(&fixed).await.unwrap();
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let ready = common::get(h.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    h.assert_lineage_intact();
    h.stop_proxy().await;
}

/// A reload that starts a new lineage (a new seed: another account) never serves the old
/// lineage's token, not even for a moment: the next request carries a token of the new one.
#[tokio::test]
async fn a_reload_to_a_new_lineage_never_serves_the_old_token() {
    let mut h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let old = h.api.last_authorization().unwrap();
    let refreshes = h.identity.counters().refreshes;
    let text = h
        .config_text
        .replace(&h.seed, &h.identity.issue_refresh_token());
    h.reload(&text).await.unwrap();
    assert_eq!(h.get("/after").await.status, 200);
    assert_ne!(h.api.last_authorization().unwrap(), old);
    assert_eq!(
        h.identity.counters().refreshes,
        refreshes + 1,
        "the new seed, redeemed"
    );
    h.stop_proxy().await;
}

/// A token endpoint that answers every request 503 with `Retry-After: {seconds}`; returns
/// its URL and how many requests it answered.
async fn asks_to_wait(seconds: u64) -> (String, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let asked = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&asked);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                counter.fetch_add(1, Ordering::SeqCst);
                let answer = format!("HTTP/1.1 503 Service Unavailable\r\nretry-after: {seconds}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, asked)
}

/// A refresh under the old settings waits out the identity server's Retry-After (8 s): a
/// reload that fixes `token_url` meanwhile serves the request waiting for it at once, with
/// the new settings, instead of after the wait.
#[tokio::test]
async fn a_reload_ends_a_retry_after_wait_of_the_old_settings() {
    let mut h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let fixed = h.config_text.clone();
    let (busy, asked) = asks_to_wait(8).await;
    let broken = h.config_text.replace(&h.identity.token_url(), &busy);
    h.reload(&broken).await.unwrap();

    h.identity.expire_access_tokens();
    let refused = h.api.counters().rejected;
    let waiting = tokio::spawn(common::get(h.url("/waits")));
    until(|| h.api.counters().rejected > refused && asked.load(Ordering::SeqCst) > 0).await;
    assert!(!waiting.is_finished(), "waiting out the Retry-After");

    h.reload(&fixed).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served without waiting out the Retry-After")
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    h.assert_lineage_intact();
    h.stop_proxy().await;
}

/// The harness with `extra_auth` lines in `[upstream.auth]`, warmed up (a first token).
async fn started_with_auth(extra_auth: &str) -> Harness {
    let h = Harness::start(Setup {
        extra_auth: extra_auth.into(),
        ..Setup::default()
    })
    .await;
    assert_eq!(h.get("/warm").await.status, 200);
    h
}

/// The identity server rotates at once but answers after `auth.timeout` (1 s): the refresh
/// stays in the air and its answer is saved and used; the same refresh token is never sent
/// again. A client that waits `auth.refresh_wait` (1 s) gets 503 meanwhile, and the next
/// request is served with the late answer's token.
#[tokio::test]
async fn an_answer_after_auth_timeout_is_awaited_not_redeemed_again() {
    let h = started_with_auth("timeout = \"1s\"\nrefresh_wait = \"1s\"").await;
    let generation = stored_generation(&h);
    let before = h.identity.counters();
    h.identity.answer_late(1, Duration::from_secs(3));
    h.identity.expire_access_tokens();
    let waited = std::time::Instant::now();
    let a = h.get("/during").await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert!(a.text().contains("auth.refresh_wait"), "{}", a.text());
    assert!(
        waited.elapsed() < Duration::from_millis(2500),
        "{:?}",
        waited.elapsed()
    );
    until(|| stored_generation(&h) == generation + 1).await;
    assert_eq!(h.get("/after").await.status, 200);
    let after = h.identity.counters();
    assert_eq!(
        after.token_requests - before.token_requests,
        1,
        "one redemption, never repeated"
    );
    h.assert_lineage_intact();
}

/// The identity server reads the refresh, does not process it, and closes the connection: the
/// outcome is unknown to tollgate, which sends the same refresh token once more — and since it
/// was never processed, that recovers. The client waiting is served.
#[tokio::test]
async fn an_unanswered_refresh_the_server_never_processed_is_sent_once_more() {
    let h = started_with_auth("").await;
    let before = h.identity.counters();
    h.identity.hang_up_next(1, false);
    h.identity.expire_access_tokens();
    let a = h.get("/after-hang-up").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let after = h.identity.counters();
    assert_eq!(after.token_requests - before.token_requests, 2);
    assert_eq!(after.refreshes - before.refreshes, 1);
    h.assert_lineage_intact();
}

/// The identity server processes the refresh (it rotates) and closes the connection without
/// an answer: the successor is lost with it. tollgate sends the same refresh token once more,
/// which the strict server refuses as a reuse: requests get 503 saying to log in — and
/// nothing more is sent, no loop of redemptions.
#[tokio::test]
async fn an_unanswered_refresh_the_server_processed_is_sent_once_more_then_login() {
    let h = started_with_auth("").await;
    let before = h.identity.counters();
    h.identity.hang_up_next(1, true);
    h.identity.expire_access_tokens();
    let a = h.get("/after-hang-up").await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert!(a.text().contains("tollgate login api"), "{}", a.text());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.get("/again").await.status, 503);
    let after = h.identity.counters();
    assert_eq!(
        after.token_requests - before.token_requests,
        2,
        "the first and one more"
    );
    assert_eq!(after.reuse_detected - before.reuse_detected, 1);
}

/// A shutdown while a refresh is in the air (its answer comes 3 s late, past `auth.timeout`):
/// the shutdown waits for the answer and saves it, so the next start uses the new refresh
/// token instead of sending the spent one again.
#[tokio::test]
async fn a_shutdown_waits_for_a_refresh_in_the_air() {
    let mut h = started_with_auth("timeout = \"1s\"\nrefresh_wait = \"1s\"").await;
    let generation = stored_generation(&h);
    h.identity.answer_late(1, Duration::from_secs(3));
    h.identity.expire_access_tokens();
    assert_eq!(h.get("/during").await.status, 503);
    h.stop_proxy().await;
    assert_eq!(
        stored_generation(&h),
        generation + 1,
        "saved before the exit"
    );
    h.start_proxy().await;
    assert_eq!(h.get("/after-restart").await.status, 200);
    h.assert_lineage_intact();
}
