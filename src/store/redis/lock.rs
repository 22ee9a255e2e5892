//! The refresh lock on Redis: taken with a fence (`lock.lua`), kept alive while it is held
//! and set again when the store lost it (`extend.lua`), let go by its holder only
//! (`unlock.lua`), and taken back at once when this process left it set although none of its
//! flights holds it (an answer lost as Redis restarted, a release that failed).

use super::link::Link;
use super::RedisStore;
use crate::store::{RefreshLock, StoreError};
use redis::{AsyncCommands, Script};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// How often a waiter asks again for a lock another replica holds.
const LOCK_POLL: Duration = Duration::from_millis(50);
/// How often a held lock is kept alive at least: a lock the store lost is set again within it.
const KEEP_ALIVE_MAX: Duration = Duration::from_secs(1);
/// No lock is asked for on a connection younger than this. A Redis that restarted from an
/// older snapshot, or a stale replica failed over to, has lost the locks set since without
/// anything to show for it at once; the holders, reconnecting too, set theirs again within a
/// keep-alive (and a failed connect's retry), before anyone else may take one.
const FRESH_CONNECTION: Duration = Duration::from_secs(3);

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
    link: Arc<Link>,
    unlock: Script,
    key: String,
    value: String,
    releasing: Arc<Releasing>,
    live: Arc<Mutex<HashSet<String>>>,
    /// Dropped with the lock: ends the task that keeps it alive.
    _alive: watch::Sender<()>,
    /// That task: the release waits for it, so that a keep-alive still on its way cannot set
    /// the lock again after it was let go.
    keeping: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        lock_map(&self.live).remove(&self.value);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let link = Arc::clone(&self.link);
        let (unlock, key, value) = (
            self.unlock.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.value),
        );
        let releasing = Arc::clone(&self.releasing);
        let keeping = self.keeping.take();
        releasing.running.fetch_add(1, Ordering::AcqRel);
        runtime.spawn(async move {
            if let Some(keeping) = keeping {
                // It ends as `_alive` is dropped, right after this; at most one keep-alive
                // (bounded by the timeout) is still on its way.
                let _ = keeping.await;
            }
            let mut invocation = unlock.key(&key);
            invocation.arg(&value);
            let release = |mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async::<i64>(&mut c).await }
            };
            let _ = link.run(release, true).await;
            releasing.running.fetch_sub(1, Ordering::AcqRel);
            releasing.done.notify_waiters();
        });
    }
}

/// What `lock.lua` answered.
enum Taken {
    Fence(u64),
    Held,
    /// The store's epoch is not the one this replica knows.
    Epoch,
    /// The store lost its data a moment ago: no lock for this long.
    Recovering(Duration),
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
        let mut looked = false;
        loop {
            if self.recovery.epoch().is_empty() {
                self.check_epoch().await?;
            }
            // A round trip, so that a connection Redis dropped (a restart) is found dead and
            // made again here: then how long the one in use has been up.
            self.run(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await })
                .await?;
            if let Some(age) = self.link.age().filter(|a| *a < FRESH_CONNECTION) {
                let gate = FRESH_CONNECTION - age;
                if started.elapsed() + gate > wait {
                    return Err(StoreError::Recovering {
                        why: "no refresh lock is asked for on a connection to the state store just made: a Redis that restarted or failed over may have lost locks, which their holders set again first",
                        left: gate,
                    });
                }
                tokio::time::sleep(gate).await;
                continue;
            }
            let taken_at = Instant::now();
            let value = format!("{}:{:016x}", self.id, rand::random::<u64>());
            // Counted as held from before the request: another flight of this process that
            // finds it set meanwhile must not take it back.
            let mut attempt = Attempting::new(&self.live, &value);
            let mut invocation = self.scripts.lock.key(&key);
            invocation
                .key(self.key(upstream, "fence"))
                .key(self.key(upstream, "token"))
                .key(self.store_key("epoch"))
                .key(self.store_key("recovery:locks"))
                .key(self.store_key("clock"))
                .arg(&value)
                .arg(hold_ms)
                .arg(&left_over)
                .arg(self.recovery.epoch());
            let (answer, n): (i64, i64) = self
                .run(|mut c| {
                    let invocation = &invocation;
                    async move { invocation.invoke_async(&mut c).await }
                })
                .await?;
            let taken = match answer {
                -1 => Taken::Epoch,
                -2 => Taken::Recovering(Duration::from_millis(n.max(0) as u64)),
                0 => Taken::Held,
                fence => {
                    // The store's clock as this lock moved it: should the store come back
                    // from before it, this replica knows.
                    self.recovery.saw_clock(n.max(0) as u64);
                    Taken::Fence(fence as u64)
                }
            };
            match taken {
                Taken::Fence(fence) => {
                    attempt.keep();
                    let (alive, ended) = watch::channel(());
                    let keeping = tokio::spawn(
                        self.keep_alive(&key, &value, upstream, fence, hold_ms, ended),
                    );
                    let held = Held {
                        link: Arc::clone(&self.link),
                        unlock: self.scripts.unlock.clone(),
                        key,
                        value,
                        releasing: Arc::clone(&self.releasing),
                        live: Arc::clone(&self.live),
                        _alive: alive,
                        keeping: Some(keeping),
                    };
                    // Counted from before the request: the lock cannot have been set earlier.
                    let expires = taken_at + Duration::from_millis(hold_ms);
                    return Ok(RefreshLock::new(fence, Some(expires), Box::new(held)));
                }
                Taken::Epoch if !looked => {
                    // The store may have lost its data: look (and write back), then ask again.
                    drop(attempt);
                    looked = true;
                    self.check_epoch().await?;
                    continue;
                }
                Taken::Epoch | Taken::Recovering(_) => {
                    if started.elapsed() >= wait {
                        let left = match taken {
                            Taken::Recovering(left) => left,
                            _ => self.lock_life(),
                        };
                        return Err(StoreError::Recovering {
                            why: "the state store lost its data a moment ago; no refresh lock is granted while a holder it cannot see may still wait for its answer",
                            left,
                        });
                    }
                    looked = false;
                    drop(attempt);
                    tokio::time::sleep(LOCK_POLL).await;
                    continue;
                }
                Taken::Held => {}
            }
            drop(attempt);
            // Held: by another process, or left over by this one.
            let get = self.key(upstream, "lock");
            let holder: Option<String> = self
                .run(|mut c| {
                    let get = &get;
                    async move { c.get(get).await }
                })
                .await?;
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

    /// Keep the lock `key` (set to `value`, under `fence`) alive while it is held — a token
    /// request whose answer is awaited, a save the store keeps refusing — until `ended`
    /// closes, or the lock turns out taken by another. A lock the store lost (flushed,
    /// restarted empty) is set again at the next beat, or at once when this replica notices
    /// the loss.
    fn keep_alive(
        &self,
        key: &str,
        value: &str,
        upstream: &str,
        fence: u64,
        hold_ms: u64,
        mut ended: watch::Receiver<()>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (link, extend) = (Arc::clone(&self.link), self.scripts.extend.clone());
        let (key, value, fence_key) = (
            key.to_owned(),
            value.to_owned(),
            self.key(upstream, "fence"),
        );
        let upstream = upstream.to_owned();
        let mut losses = self.recovery.losses();
        async move {
            let every = Duration::from_millis(hold_ms / 3)
                .clamp(Duration::from_millis(100), KEEP_ALIVE_MAX);
            // Closed once the store is gone: then only the beat wakes it.
            let mut noticing = true;
            loop {
                tokio::select! {
                    _ = ended.changed() => return,
                    _ = tokio::time::sleep(every) => {}
                    noticed = losses.changed(), if noticing => noticing = noticed.is_ok(),
                }
                let mut invocation = extend.key(&key);
                invocation
                    .key(&fence_key)
                    .arg(&value)
                    .arg(hold_ms)
                    .arg(fence);
                let extended = link
                    .run(
                        |mut c| {
                            let invocation = &invocation;
                            async move { invocation.invoke_async::<i64>(&mut c).await }
                        },
                        true,
                    )
                    .await;
                match extended {
                    Ok(0) => return,
                    Ok(2) => {
                        tracing::warn!(%upstream, "the state store had lost the refresh lock this replica holds; set it again")
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The set of live lock values, even after a panic elsewhere poisoned its mutex.
fn lock_map<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
