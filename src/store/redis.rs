//! `redis://` / `rediss://` — the state store several replicas share: one token lineage and
//! one set of quota counts per upstream, in a Redis (or Valkey) server.
//!
//! Keys live under `{prefix}:{upstream}:` (`[state] prefix`, default `tollgate`):
//!
//! - `token` — a hash: the record (JSON, as the file store writes it, sealed with `[state] key`
//!   when one is set: [`records`]), its `generation`,
//!   `seed_hash`, `login_at`, and the `fence` of the lock it was saved under;
//! - `lock` — the refresh lock, set with its holder's id and a nonce, living `auth.timeout`
//!   and a margin and kept alive while its holder works (a token request's answer awaited, a
//!   save retried), so a holder that dies cannot hold it for long;
//! - `fence` — a counter, never expiring, bumped each time the lock is taken;
//! - `days` — a hash of day counts by span (`start-end` in Unix ms), and its version (`v`),
//!   expiring two days after its last reservation;
//! - `use:{day start ms}` — a hash of the day's requests by 15-minute slot and inbound key
//!   (`slot/key`), for attribution and the forecast, expiring two days after its last write;
//! - `per:{seconds}` — the same for the fixed windows of `per_second`, `per_minute` and
//!   `per_hour` (`per:1`, `per:60`, `per:3600`), expiring two windows (at least a minute)
//!   after its last reservation.
//!
//! And for the whole store, under `{prefix}:`: `replicas` (the heartbeats), `epoch` (written
//! once; a store without it lost its data), `clock` (bumped by every look and every lock; a
//! store whose clock went back lost data too) and, for a moment after a loss,
//! `recovery:locks` and `recovery:counts` ([`recovery`]).
//!
//! Every write that decides something is a Lua script (`redis/*.lua`, loaded with EVALSHA):
//! the lock is taken only when free ([`lock`]), a record is saved only by a fence at least as
//! new as the stored one and only forward in its lineage, and a day never grants past its
//! limit ([`counts`]). Every operation is bounded by `[state] timeout`; a connection that
//! failed is replaced ([`link`]); announcements arrive on pub/sub ([`listener`]).
//!
//! Must not: print the URL whole (it may hold a password), or decide anything the token cache
//! or the quota decides.

mod counts;
mod link;
mod listener;
mod lock;
mod records;
mod recovery;
mod settings;

use super::{unix_ms, TokenRecord};
use super::{Period, RefreshLock, Reservation, Seen, StateStore, StoreError, StoreHealth, Used};
use crate::config::{RedisUrl, StateConfig};
use crate::seal::Keys;
use crate::secret::Secret;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use link::Link;
use listener::Listener;
use lock::Releasing;
use recovery::Recovery;
use redis::aio::MultiplexedConnection;
use redis::Script;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// A Redis server shared by several replicas.
pub struct RedisStore {
    client: redis::Client,
    link: Arc<Link>,
    prefix: String,
    timeout: Duration,
    /// How often the proxy calls [`StateStore::heartbeat`] (`[state] heartbeat`).
    heartbeat: Duration,
    /// The longest life of a refresh lock this replica takes, in ms (see
    /// [`StateStore::lock_life`]).
    lock_life_ms: AtomicU64,
    /// The store's epoch as this replica knows it, and what it would write back.
    recovery: Recovery,
    /// What token records are sealed and opened with (`[state] key`).
    keys: ArcSwap<Keys>,
    /// The URL as messages show it.
    shown: String,
    /// This replica, as its locks name it.
    id: String,
    scripts: Scripts,
    /// Lock releases still running in tasks of their own (see [`Held`]).
    releasing: Arc<Releasing>,
    /// Failed operations, and why the last one failed while the store fails.
    errors: AtomicU64,
    problem: Mutex<Option<String>>,
    /// The replicas the last heartbeat saw.
    replicas: Mutex<Vec<String>>,
    /// What is announced on `{prefix}:{upstream}:generation` and `…:hold`, by channel; the
    /// listener task starts with the first subscriber.
    announced: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
    /// Dropped with the store: ends its listener.
    open: watch::Sender<()>,
    /// The values of the refresh locks this process holds now. A lock set with this
    /// process's id but none of these values was left over (an attempt whose answer was lost,
    /// a release that failed): it is taken back rather than waited out.
    live: Arc<Mutex<HashSet<String>>>,
}

struct Scripts {
    lock: Script,
    unlock: Script,
    save: Script,
    days: Script,
    heartbeat: Script,
    hold: Script,
    extend: Script,
    usage: Script,
    epoch: Script,
}

impl RedisStore {
    /// A store for `url`; it connects on first use, and reconnects with backoff.
    pub fn open(url: &RedisUrl, state: &StateConfig) -> Result<RedisStore, StoreError> {
        let fail = |reason: String| StoreError::Unreachable {
            store: url.shown.clone(),
            reason,
        };
        // A peer that vanished without closing (a failover to another host) is noticed when
        // data sent to it stays unacknowledged, and the connection is made again.
        let tcp = redis::io::tcp::TcpSettings::default()
            .set_nodelay(true)
            .set_user_timeout((state.timeout * 3).max(Duration::from_secs(5)));
        let info = redis::IntoConnectionInfo::into_connection_info(url.url.expose().as_str())
            .map_err(|e| fail(e.to_string()))?
            .set_tcp_settings(tcp);
        // The password as Redis gets it, as the URL writes it, and percent-encoded.
        let mut password: Vec<Secret<String>> = Vec::new();
        if let Some(p) = info.redis_settings().password() {
            password.push(Secret::new(p.to_owned()));
            let encoded =
                percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC);
            password.push(Secret::new(encoded.collect()));
        }
        if let Some(p) = url::Url::parse(url.url.expose())
            .ok()
            .as_ref()
            .and_then(|u| u.password())
        {
            password.push(Secret::new(p.to_owned()));
        }
        password.retain(|p| p.expose().len() >= 4);
        let client = match &state.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    fail(format!("cannot read state.ca_file {}: {e}", path.display()))
                })?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(info, certs)
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| fail(e.to_string()))?;
        Ok(RedisStore {
            link: Arc::new(Link::new(client.clone(), state.timeout, password)),
            client,
            prefix: state.prefix.clone(),
            timeout: state.timeout,
            heartbeat: state.heartbeat,
            lock_life_ms: AtomicU64::new(0),
            recovery: Recovery::default(),
            keys: ArcSwap::default(),
            shown: url.shown.clone(),
            id: format!("{:016x}", rand::random::<u64>()),
            scripts: Scripts {
                lock: Script::new(include_str!("redis/lock.lua")),
                unlock: Script::new(include_str!("redis/unlock.lua")),
                save: Script::new(include_str!("redis/save.lua")),
                days: Script::new(include_str!("redis/days.lua")),
                heartbeat: Script::new(include_str!("redis/heartbeat.lua")),
                hold: Script::new(include_str!("redis/hold.lua")),
                extend: Script::new(include_str!("redis/extend.lua")),
                usage: Script::new(include_str!("redis/usage.lua")),
                epoch: Script::new(include_str!("redis/epoch.lua")),
            },
            releasing: Arc::default(),
            errors: AtomicU64::new(0),
            problem: Mutex::new(None),
            replicas: Mutex::new(Vec::new()),
            announced: Arc::default(),
            open: watch::channel(()).0,
            live: Arc::default(),
        })
    }

    /// This replica's id, as its locks name it.
    pub fn replica(&self) -> &str {
        &self.id
    }

    fn key(&self, upstream: &str, what: &str) -> String {
        format!("{}:{upstream}:{what}", self.prefix)
    }

    /// A key of the whole store (not of one upstream).
    fn store_key(&self, what: &str) -> String {
        format!("{}:{what}", self.prefix)
    }

    /// How long a replica not seen is still counted among the replicas: six heartbeats.
    fn replica_window(&self) -> Duration {
        6 * self.heartbeat
    }

    /// The longest life of a refresh lock this replica takes: after a loss, no lock is granted
    /// for that long.
    fn lock_life(&self) -> Duration {
        Duration::from_millis(self.lock_life_ms.load(Ordering::Relaxed))
    }

    /// Run one operation on the connection ([`Link::run`]), and remember whether the store
    /// answers. One found dead (Redis restarted, failed over) is replaced at once and the
    /// operation asked again on the new one, once: every operation but a give-back and the
    /// day's tally is safe to ask twice (see [`RedisStore::run_once`]).
    async fn run<T, F>(
        &self,
        operation: impl Fn(MultiplexedConnection) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.count(self.link.run(operation, true).await)
    }

    /// [`RedisStore::run`], never asked twice: an operation whose outcome may not be applied
    /// twice (a give-back would free counts twice; a tally would count requests twice).
    async fn run_once<T, F>(
        &self,
        operation: impl Fn(MultiplexedConnection) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.count(self.link.run(operation, false).await)
    }

    /// Remember whether the store answers.
    fn count<T>(&self, outcome: Result<T, String>) -> Result<T, StoreError> {
        match outcome {
            Ok(value) => {
                *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(value)
            }
            Err(failed) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let error = self.unreachable(failed);
                *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                Err(error)
            }
        }
    }

    fn unreachable(&self, reason: String) -> StoreError {
        StoreError::Unreachable {
            store: self.shown.clone(),
            reason,
        }
    }

    /// The values announced on `channel`, from the store's one listener (started here).
    fn listen(&self, channel: String) -> Option<watch::Receiver<u64>> {
        let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
        if announced.is_empty() {
            let listener = Listener {
                client: self.client.clone(),
                patterns: vec![
                    format!("{}:*:generation", self.prefix),
                    format!("{}:*:hold", self.prefix),
                ],
                announced: Arc::downgrade(&self.announced),
                open: self.open.subscribe(),
                ping_every: self.heartbeat,
            };
            tokio::runtime::Handle::try_current()
                .ok()?
                .spawn(listener.run());
        }
        let sender = announced
            .entry(channel)
            .or_insert_with(|| watch::channel(0).0);
        Some(sender.subscribe())
    }
}

#[async_trait]
impl StateStore for RedisStore {
    async fn load_token(&self, upstream: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read_record(upstream).await
    }

    async fn save_token(
        &self,
        upstream: &str,
        record: &TokenRecord,
        lock: &RefreshLock,
    ) -> Result<(), StoreError> {
        self.write_under_lock(upstream, record, lock, "save")
            .await?;
        self.recovery.saw_record(upstream, record, lock.fence);
        Ok(())
    }

    async fn reseal_token(
        &self,
        upstream: &str,
        record: &TokenRecord,
        lock: &RefreshLock,
    ) -> Result<(), StoreError> {
        self.write_under_lock(upstream, record, lock, "reseal")
            .await
    }

    fn set_keys(&self, keys: Keys) {
        self.keys.store(Arc::new(keys));
    }

    async fn lock_refresh(
        &self,
        upstream: &str,
        wait: Duration,
        hold: Duration,
    ) -> Result<RefreshLock, StoreError> {
        self.take_lock(upstream, wait, hold).await
    }

    async fn reserve_quota(
        &self,
        upstream: &str,
        period: &Period,
        limit: u64,
        want: u64,
        seen: Seen,
    ) -> Result<Reservation, StoreError> {
        self.reserve(upstream, period, limit, want, seen).await
    }

    async fn release_quota(
        &self,
        upstream: &str,
        period: &Period,
        count: u64,
    ) -> Result<(), StoreError> {
        self.release(upstream, period, count).await
    }

    async fn add_usage(
        &self,
        upstream: &str,
        day: &Period,
        added: &[Used],
    ) -> Result<Vec<Used>, StoreError> {
        self.tally(upstream, day, added).await
    }

    async fn quota_used(&self, upstream: &str, period: &Period) -> Result<u64, StoreError> {
        self.read_count(&self.counts_key(upstream, period), period)
            .await
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn health(&self) -> Option<StoreHealth> {
        Some(StoreHealth {
            store: self.shown.clone(),
            replica: self.id.clone(),
            replicas: self
                .replicas
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            problem: self
                .problem
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            errors: self.errors.load(Ordering::Relaxed),
            losses: self.recovery.losses_noticed(),
            recovering: self.recovery.recovering(),
        })
    }

    async fn heartbeat(&self) {
        // Whether the store lost its data while nothing else asked it.
        if self.check_epoch().await.is_err() {
            return;
        }
        // What the others reserved since: should the store lose its data, this replica
        // writes back counts at most a heartbeat old, even of windows it sits idle in.
        self.look_at_counts().await;
        let mut invocation = self.scripts.heartbeat.key(self.store_key("replicas"));
        invocation
            .arg(&self.id)
            .arg(unix_ms())
            .arg(self.replica_window().as_millis() as u64);
        let seen = self
            .run(|mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async::<Vec<String>>(&mut c).await }
            })
            .await;
        if let Ok(seen) = seen {
            *self.replicas.lock().unwrap_or_else(|p| p.into_inner()) = seen;
        }
    }

    fn heartbeat_every(&self) -> Duration {
        self.heartbeat
    }

    fn lock_life(&self, hold: Duration) {
        self.lock_life_ms
            .fetch_max(hold.as_millis() as u64, Ordering::Relaxed);
    }

    fn announcements(&self, upstream: &str) -> Option<watch::Receiver<u64>> {
        self.listen(self.key(upstream, "generation"))
    }

    async fn share_hold(&self, upstream: &str, until_ms: u64) {
        let mut invocation = self.scripts.hold.key(self.key(upstream, "hold"));
        invocation
            .arg(until_ms)
            .arg(unix_ms())
            .arg(self.key(upstream, "hold"));
        let shared = self
            .run(|mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async::<u64>(&mut c).await }
            })
            .await;
        if let Err(e) = shared {
            tracing::warn!(%upstream, error = %e, "could not share the hold after a 429 with the other replicas");
        }
    }

    fn holds(&self, upstream: &str) -> Option<watch::Receiver<u64>> {
        self.listen(self.key(upstream, "hold"))
    }

    async fn startup_warnings(&self) -> Vec<String> {
        self.check_settings().await
    }

    async fn flush(&self) {
        let wait = async {
            loop {
                let done = self.releasing.done.notified();
                if self.releasing.running.load(Ordering::Acquire) == 0 {
                    return;
                }
                done.await;
            }
        };
        // A release waits for its keep-alive, then unlocks: two operations at most.
        let _ = tokio::time::timeout(2 * self.timeout, wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ErrorKind, RedisError};

    /// A peer that echoes what it was sent (the AUTH command) never gets the password into a
    /// message, raw or percent-encoded, and a long answer is cut.
    #[test]
    fn what_a_server_says_is_cut_and_never_holds_the_password() {
        let state = StateConfig {
            store: Secret::from("redis://:pa%2Bss-word@127.0.0.1:1/0"),
            ..StateConfig::default()
        };
        let Ok(crate::config::StoreLocation::Redis(url)) = state.location() else {
            panic!("a redis:// location")
        };
        let store = RedisStore::open(&url, &state).unwrap();
        let echoed = RedisError::from((
            ErrorKind::Parse,
            "unexpected answer",
            format!("AUTH pa+ss-word / pa%2Bss-word {}", "x".repeat(1000)),
        ));
        let said = store.link.said(&echoed);
        assert!(
            !said.contains("pa+ss-word") && !said.contains("pa%2Bss-word"),
            "{said}"
        );
        assert!(said.contains("[redacted]"), "{said}");
        assert!(said.contains("check the host and port"), "{said}");
        assert!(said.len() < 600, "{}", said.len());
    }
}
