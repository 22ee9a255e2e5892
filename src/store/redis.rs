//! `redis://` / `rediss://` — the state store several replicas share: one token lineage and
//! one set of quota counts per upstream, in a Redis (or Valkey) server.
//!
//! Keys live under `{prefix}:{upstream}:` (`[state] prefix`, default `tollgate`):
//!
//! - `token` — a hash: the record (JSON, as the file store writes it), its `generation`,
//!   `seed_hash`, and the `fence` of the lock it was saved under;
//! - `lock` — the refresh lock, set with its holder's id and a nonce, living longer than a
//!   token request (`auth.timeout`), so a holder that dies cannot hold it forever;
//! - `fence` — a counter, never expiring, bumped each time the lock is taken;
//! - `days` — a hash of day counts by span (`start-end` in Unix ms), and its version (`v`),
//!   expiring two days after its last reservation;
//! - `use:{day start ms}` — a hash of the day's requests by 15-minute slot and inbound key
//!   (`slot/key`), for attribution and the forecast, expiring two days after its last write;
//! - `per:{seconds}` — the same for the fixed windows of `per_second`, `per_minute` and
//!   `per_hour` (`per:1`, `per:60`, `per:3600`), expiring two windows (at least a minute)
//!   after its last reservation.
//!
//! Every write that decides something is a Lua script (`redis/*.lua`, loaded with EVALSHA):
//! the lock is taken only when free, a record is saved only by a fence at least as new as the
//! stored one and only forward in its lineage, and a day never grants past its limit. Every
//! operation is bounded by `[state] timeout`; the connection reconnects by itself.
//!
//! Must not: print the URL whole (it may hold a password), or decide anything the token cache
//! or the quota decides.

use super::REPLICA_WINDOW;
mod listener;
mod lock;

use super::TokenRecord;
use super::{Period, RefreshLock, Reservation, Seen, StateStore, StoreError, StoreHealth, Used};
use crate::config::{RedisUrl, StateConfig};
use async_trait::async_trait;
use listener::Listener;
use lock::Releasing;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

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

pub(super) fn lock_map<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
                usage: Script::new(include_str!("redis/usage.lua")),
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
        // Windows of different lengths never share a count.
        let length_s = (period.end_ms - period.start_ms) / 1000;
        let counts = match length_s {
            86_400 => self.key(upstream, "days"),
            _ => self.key(upstream, &format!("per:{length_s}")),
        };
        let mut invocation = self.scripts.days.key(counts);
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
        let (granted, used, version): (u64, u64, u64) = self
            .days(
                upstream,
                "reserve",
                period,
                &[limit, want, seen.count, seen.version],
            )
            .await?;
        Ok(Reservation {
            granted,
            used,
            version,
        })
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

    async fn add_usage(
        &self,
        upstream: &str,
        day: &Period,
        added: &[Used],
    ) -> Result<Vec<Used>, StoreError> {
        let key = self.key(upstream, &format!("use:{}", day.start_ms));
        let mut invocation = self.scripts.usage.key(key);
        invocation.arg(2 * (day.end_ms - day.start_ms));
        for used in added {
            invocation.arg(used.field()).arg(used.count);
        }
        let mut conn = self.conn.clone();
        let fields: std::collections::BTreeMap<String, u64> =
            self.run(invocation.invoke_async(&mut conn)).await?;
        Ok(fields
            .iter()
            .filter_map(|(f, n)| Used::parse(f, *n))
            .collect())
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
