//! The refresh lock on Redis: taken with a fence (`lock.lua`), kept alive while it is held
//! (`extend.lua`), let go by its holder only (`unlock.lua`), and taken back at once when this
//! process left it set although none of its flights holds it (an answer lost as Redis
//! restarted, a release that failed).

use super::{lock_map, RedisStore};
use crate::store::{RefreshLock, StoreError};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// How often a waiter asks again for a lock another replica holds.
const LOCK_POLL: Duration = Duration::from_millis(50);

#[derive(Default)]
pub(super) struct Releasing {
    pub(super) running: AtomicUsize,
    pub(super) done: Notify,
}

/// A lock value in `live` while the request that may set it is on its way; taken out again
/// unless the lock was taken ([`Attempting::keep`]: then its [`Held`] takes it out).
struct Attempting<'a> {
    live: &'a Mutex<HashSet<String>>,
    value: Option<String>,
}

impl<'a> Attempting<'a> {
    fn new(live: &'a Mutex<HashSet<String>>, value: &str) -> Self {
        lock_map(live).insert(value.to_owned());
        Attempting {
            live,
            value: Some(value.to_owned()),
        }
    }

    fn keep(&mut self) {
        self.value = None;
    }
}

impl Drop for Attempting<'_> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            lock_map(self.live).remove(&value);
        }
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
        lock_map(&self.live).remove(&self.value);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut conn = self.conn.clone();
        let (unlock, key, value) = (
            self.unlock.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.value),
        );
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

impl RedisStore {
    /// Wait (up to `wait`) for the refresh lock of `upstream`, set to live `hold`, kept alive
    /// while it is held, and taken back when this process left it over.
    pub(super) async fn take_lock(
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
            // Counted as held from before the request: another flight of this process that
            // finds it set meanwhile must not take it back.
            let mut attempt = Attempting::new(&self.live, &value);
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
                attempt.keep();
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
            drop(attempt);
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
}
