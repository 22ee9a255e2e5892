//! `redis://` / `rediss://` — the state store several replicas share: one token lineage and
//! one set of day counts per upstream, in a Redis (or Valkey) server.
//!
//! Keys live under `{prefix}:{upstream}:` (`[state] prefix`, default `tollgate`):
//!
//! - `token` — a hash: the record (JSON, as the file store writes it), its `generation`,
//!   `seed_hash`, and the `fence` of the lock it was saved under;
//! - `lock` — the refresh lock, `SET NX PX` with its holder's `id:fence`, living longer than a
//!   token request (`auth.timeout`), so a holder that dies cannot hold it forever;
//! - `fence` — a counter, never expiring, bumped each time the lock is taken;
//! - `days` — a hash of day counts by span (`start-end` in Unix ms), expiring a day after the
//!   last day it counts.
//!
//! Every write that decides something is a Lua script (`redis/*.lua`, loaded with EVALSHA):
//! the lock is taken only when free, a record is saved only by a fence at least as new as the
//! stored one and only forward in its lineage, and a day never grants past its limit. Every
//! operation is bounded by `[state] timeout`; the connection reconnects by itself.
//!
//! Must not: print the URL whole (it may hold a password), or decide anything the token cache
//! or the quota decides.

use super::REPLICA_WINDOW;
use super::{Period, RefreshLock, Reservation, StateStore, StoreError, StoreHealth, TokenRecord};
use crate::config::{RedisUrl, StateConfig};
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// A Redis server shared by several replicas.
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
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

fn lock_map<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Releasing {
    running: AtomicUsize,
    done: Notify,
}

struct Scripts {
    lock: Script,
    unlock: Script,
    save: Script,
    days: Script,
    heartbeat: Script,
    hold: Script,
    extend: Script,
}

/// How often a waiter asks again for a lock another replica holds.
const LOCK_POLL: Duration = Duration::from_millis(50);
/// How long the announcement listener waits to connect, or for an answer to its ping.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(5);

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
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(state.timeout))
            .set_response_timeout(Some(state.timeout))
            .set_max_delay(Duration::from_secs(5));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| fail(e.to_string()))?;
        Ok(RedisStore {
            client,
            conn,
            prefix: state.prefix.clone(),
            timeout: state.timeout,
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

    /// Run one operation, bounded by `[state] timeout`; remember whether the store answers.
    async fn run<T>(
        &self,
        operation: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let failed = match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => {
                *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return Ok(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "no answer within {} ([state] timeout)",
                humantime::format_duration(self.timeout)
            ),
        };
        self.errors.fetch_add(1, Ordering::Relaxed);
        let error = self.unreachable(failed);
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        Err(error)
    }

    fn unreachable(&self, reason: String) -> StoreError {
        StoreError::Unreachable {
            store: self.shown.clone(),
            reason,
        }
    }

    /// Keep the lock `key` (set to `value`) alive, a third of its life at a time, while it is
    /// held — a slow token request, a save the store refuses for a while — until `ended`
    /// closes, or the lock turns out lost.
    fn keep_alive(
        &self,
        key: String,
        value: String,
        hold_ms: u64,
        mut ended: watch::Receiver<()>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (mut conn, extend, timeout) =
            (self.conn.clone(), self.scripts.extend.clone(), self.timeout);
        async move {
            let every = Duration::from_millis(hold_ms / 3).max(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = ended.changed() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let mut invocation = extend.key(&key);
                invocation.arg(&value).arg(hold_ms);
                let extended = invocation.invoke_async::<i64>(&mut conn);
                if let Ok(Ok(0)) = tokio::time::timeout(timeout, extended).await {
                    return;
                }
            }
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

    /// One operation of `days.lua` on `upstream`'s day counts.
    async fn days<T: redis::FromRedisValue>(
        &self,
        upstream: &str,
        operation: &str,
        period: &Period,
        args: &[u64],
    ) -> Result<T, StoreError> {
        let mut invocation = self.scripts.days.key(self.key(upstream, "days"));
        invocation
            .arg(operation)
            .arg(period.start_ms)
            .arg(period.end_ms);
        for a in args {
            invocation.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.run(invocation.invoke_async(&mut conn)).await
    }
}

/// Releases a Redis refresh lock when the last share of it is dropped — if its holder still
/// has it. The release runs in a task of its own; if it fails, the lock stays set until it
/// expires, or until this process's next attempt takes it back (it holds it no more).
struct Held {
    conn: ConnectionManager,
    unlock: Script,
    key: String,
    value: String,
    timeout: Duration,
    releasing: Arc<Releasing>,
    live: Arc<Mutex<HashSet<String>>>,
    /// Dropped with the lock: ends the task that keeps it alive.
    _alive: watch::Sender<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut conn = self.conn.clone();
        let (unlock, key, value) = (
            self.unlock.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.value),
        );
        lock_map(&self.live).remove(&value);
        let (timeout, releasing) = (self.timeout, Arc::clone(&self.releasing));
        releasing.running.fetch_add(1, Ordering::AcqRel);
        runtime.spawn(async move {
            let mut invocation = unlock.key(&key);
            invocation.arg(&value);
            let release = invocation.invoke_async::<i64>(&mut conn);
            let _ = tokio::time::timeout(timeout, release).await;
            releasing.running.fetch_sub(1, Ordering::AcqRel);
            releasing.done.notify_waiters();
        });
    }
}

#[async_trait]
impl StateStore for RedisStore {
    async fn load_token(&self, upstream: &str) -> Result<Option<TokenRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.key(upstream, "token");
        let json: Option<String> = self.run(conn.hget(&key, "record")).await?;
        json.map(|json| {
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                path: format!("{} key {key}", self.shown),
                reason: e.to_string(),
            })
        })
        .transpose()
    }

    async fn save_token(
        &self,
        upstream: &str,
        record: &TokenRecord,
        lock: &RefreshLock,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).expect("a token record always serialises");
        let mut invocation = self.scripts.save.key(self.key(upstream, "token"));
        invocation
            .arg(lock.fence)
            .arg(record.generation)
            .arg(&record.seed_hash)
            .arg(json)
            .arg(self.key(upstream, "generation"))
            .arg(record.login_at_ms);
        let mut conn = self.conn.clone();
        let outcome: String = self.run(invocation.invoke_async(&mut conn)).await?;
        match outcome.as_str() {
            "ok" => Ok(()),
            _ => Err(StoreError::Superseded {
                upstream: upstream.to_owned(),
            }),
        }
    }

    async fn lock_refresh(
        &self,
        upstream: &str,
        wait: Duration,
        hold: Duration,
    ) -> Result<RefreshLock, StoreError> {
        let key = self.key(upstream, "lock");
        let started = Instant::now();
        let hold_ms = hold.as_millis().clamp(1, u128::from(u32::MAX)) as u64;
        let mut left_over = String::new();
        loop {
            let taken_at = Instant::now();
            let value = format!("{}:{:016x}", self.id, rand::random::<u64>());
            let mut invocation = self.scripts.lock.key(&key);
            invocation
                .key(self.key(upstream, "fence"))
                .key(self.key(upstream, "token"))
                .arg(&value)
                .arg(hold_ms)
                .arg(&left_over);
            let mut conn = self.conn.clone();
            let fence: u64 = self.run(invocation.invoke_async(&mut conn)).await?;
            if fence > 0 {
                lock_map(&self.live).insert(value.clone());
                let (alive, ended) = watch::channel(());
                tokio::spawn(self.keep_alive(key.clone(), value.clone(), hold_ms, ended));
                let held = Held {
                    conn: self.conn.clone(),
                    unlock: self.scripts.unlock.clone(),
                    key,
                    value,
                    timeout: self.timeout,
                    releasing: Arc::clone(&self.releasing),
                    live: Arc::clone(&self.live),
                    _alive: alive,
                };
                // Counted from before the request: the lock cannot have been set earlier.
                let expires = taken_at + Duration::from_millis(hold_ms);
                return Ok(RefreshLock::new(fence, Some(expires), Box::new(held)));
            }
            // Held: by another process, or left over by this one.
            let mut conn = self.conn.clone();
            let holder: Option<String> = self.run(conn.get(&key)).await?;
            if let Some(holder) = holder {
                let ours = holder.starts_with(&format!("{}:", self.id));
                if ours && holder != left_over && !lock_map(&self.live).contains(&holder) {
                    left_over = holder;
                    continue;
                }
            }
            if started.elapsed() >= wait {
                return Err(StoreError::LockTimeout {
                    what: "refresh",
                    upstream: upstream.to_owned(),
                    waited: wait,
                });
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    async fn reserve_quota(
        &self,
        upstream: &str,
        period: &Period,
        limit: u64,
        want: u64,
        seen: u64,
    ) -> Result<Reservation, StoreError> {
        let (granted, used): (u64, u64) = self
            .days(upstream, "reserve", period, &[limit, want, seen])
            .await?;
        Ok(Reservation { granted, used })
    }

    async fn release_quota(
        &self,
        upstream: &str,
        period: &Period,
        count: u64,
    ) -> Result<(), StoreError> {
        let _: u64 = self.days(upstream, "release", period, &[count]).await?;
        Ok(())
    }

    async fn quota_used(&self, upstream: &str, period: &Period) -> Result<u64, StoreError> {
        self.days(upstream, "used", period, &[]).await
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
        })
    }

    async fn heartbeat(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut invocation = self
            .scripts
            .heartbeat
            .key(format!("{}:replicas", self.prefix));
        invocation
            .arg(&self.id)
            .arg(now)
            .arg(REPLICA_WINDOW.as_millis() as u64);
        let mut conn = self.conn.clone();
        if let Ok(seen) = self
            .run(invocation.invoke_async::<Vec<String>>(&mut conn))
            .await
        {
            *self.replicas.lock().unwrap_or_else(|p| p.into_inner()) = seen;
        }
    }

    fn announcements(&self, upstream: &str) -> Option<watch::Receiver<u64>> {
        self.listen(self.key(upstream, "generation"))
    }

    async fn share_hold(&self, upstream: &str, until_ms: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut invocation = self.scripts.hold.key(self.key(upstream, "hold"));
        invocation
            .arg(until_ms)
            .arg(now)
            .arg(self.key(upstream, "hold"));
        let mut conn = self.conn.clone();
        if let Err(e) = self.run(invocation.invoke_async::<u64>(&mut conn)).await {
            tracing::warn!(%upstream, error = %e, "could not share the hold after a 429 with the other replicas");
        }
    }

    fn holds(&self, upstream: &str) -> Option<watch::Receiver<u64>> {
        self.listen(self.key(upstream, "hold"))
    }

    async fn durability_warning(&self) -> Option<String> {
        let mut conn = self.conn.clone();
        let mut query = redis::cmd("CONFIG");
        query.arg("GET").arg("appendonly");
        // Managed Redis services often refuse CONFIG: then nothing can be said, and nothing
        // failed (it is not counted as an error of the store).
        let answer = tokio::time::timeout(self.timeout, query.query_async(&mut conn));
        let answer: Vec<String> = answer.await.ok()?.ok()?;
        (answer.get(1).map(String::as_str) == Some("no")).then(|| {
            format!(
                "the state store {} runs without appendonly: a restart of Redis loses what tollgate wrote since its last snapshot; the replicas then write back the newest token record and day count they know, but set `appendonly yes` (see the README, \"Several replicas\")",
                self.shown
            )
        })
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
        let _ = tokio::time::timeout(self.timeout, wait).await;
    }
}

/// Listens for what other replicas announce (new generations, holds after a 429), and hands
/// each value to the subscribers of its channel; reconnects with backoff, and ends with the
/// store.
struct Listener {
    client: redis::Client,
    patterns: Vec<String>,
    announced: std::sync::Weak<Mutex<HashMap<String, watch::Sender<u64>>>>,
    /// Closed when the store is dropped.
    open: watch::Receiver<()>,
}

impl Listener {
    async fn run(mut self) {
        let mut closed = self.open.clone();
        tokio::select! {
            _ = closed.changed() => {}
            _ = self.listen() => {}
        }
    }

    async fn listen(&mut self) {
        let mut pause = Duration::from_millis(100);
        loop {
            let connect = tokio::time::timeout(LISTENER_TIMEOUT, self.client.get_async_pubsub());
            if let Ok(Ok(mut pubsub)) = connect.await {
                if pubsub.psubscribe(&self.patterns).await.is_ok() {
                    pause = Duration::from_millis(100);
                    if !self.receive(pubsub).await {
                        return;
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Deliver what comes on `pubsub` until the connection fails or stops answering a ping
    /// (a subscriber sends nothing otherwise, so a vanished server would go unnoticed); false
    /// once the store is gone.
    async fn receive(&self, pubsub: redis::aio::PubSub) -> bool {
        use futures_util::StreamExt;
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(super::HEARTBEAT);
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => {
                        if !self.deliver(message.get_channel_name(), message.get_payload()) {
                            return false;
                        }
                    }
                    None => return true,
                },
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(LISTENER_TIMEOUT, sink.ping::<redis::Value>());
                    if !matches!(pong.await, Ok(Ok(_))) {
                        return true;
                    }
                }
            }
        }
    }

    /// Hand `value` to the subscribers of `channel`, when it differs from the last (a lower
    /// generation is news too: the store lost data); false once the store is gone.
    fn deliver(&self, channel: &str, value: redis::RedisResult<u64>) -> bool {
        let Some(announced) = self.announced.upgrade() else {
            return false;
        };
        let Ok(value) = value else {
            return true;
        };
        if let Some(sender) = announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(channel)
        {
            sender.send_if_modified(|seen| std::mem::replace(seen, value) != value);
        }
        true
    }
}
