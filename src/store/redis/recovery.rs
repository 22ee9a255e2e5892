//! When Redis loses its data (FLUSHALL, a restart without persistence or from an older
//! snapshot, a failover to a stale replica): noticing it, and what every live replica does
//! then.
//!
//! The store holds an *epoch*, written once, and a *clock* every look bumps (`epoch.lua`).
//! Every lock and every reservation names the epoch its replica knows, and the heartbeat
//! looks at both: a store without the epoch, or with another, or whose clock went back to or
//! below what the replica saw (an older snapshot, a stale replica) lost its data — every lock
//! and count written since may be gone, whoever held them. The replica that finds it so
//! writes a new epoch and opens two recovery windows:
//!
//! - **counts** (two heartbeats and a store timeout): no reservation is granted, so that every
//!   live replica notices (its heartbeat) and writes back the latest count it saw of each
//!   window before anyone counts on from a lower one; requests meanwhile spend only the leases
//!   in hand, then get 503;
//! - **locks** (the longest refresh lock's life, from when the loss was first noticed): no
//!   refresh lock is granted, so that a holder this replica knows nothing of (paused, cut off,
//!   its token request in the air) is not overtaken. Live holders set their locks again at
//!   once (`extend.lua`), and keep them.
//!
//! Each replica writes back the newest token record it saved or read (`save.lua restore`: only
//! over nothing, or over an older record of the same lineage, with the fence it was saved
//! under, so that fences only grow) and the latest count of each window it saw (`days.lua
//! restore`: the store keeps the highest of these). A replica started after the loss, which
//! knew no epoch, cannot tell a loss from a first start: it opens the short window for both,
//! which a replica that knew the old epoch lengthens to a lock's life when it notices.
//!
//! Must not: write back anything older than the store holds, or grant anything itself.

use super::RedisStore;
use crate::store::{Period, StoreError, TokenRecord};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What this replica knows of the store, to write back should it lose its data.
#[derive(Default)]
pub(super) struct Recovery {
    /// The store's epoch as last seen; empty before the first look.
    epoch: Mutex<String>,
    /// The highest clock seen (see `epoch.lua`): one at or below it means the store went
    /// back in time.
    clock: AtomicU64,
    /// Until when no reservation is granted after a loss this replica noticed, as far as it
    /// knows: `/readyz` says so.
    counts_until: Mutex<Option<Instant>>,
    /// The newest token record saved or read, and the fence it was saved under, by upstream.
    records: Mutex<HashMap<String, (TokenRecord, u64)>>,
    /// The latest count (by its version) seen of the current window, by counts hash: a count
    /// given back since is not counted again.
    counts: Mutex<HashMap<String, Seen>>,
    /// Bumped each time this replica notices a loss: the locks it holds are set again at once.
    losses: watch::Sender<u64>,
    /// A write-back failed: the next look at the epoch tries again.
    unwritten: AtomicBool,
    /// One look at the epoch at a time (a heartbeat and a lock may notice together): a loss
    /// is noticed, and written back, once.
    looking: tokio::sync::Mutex<()>,
}

/// A window's count as a reservation last returned it.
#[derive(Clone, Copy)]
struct Seen {
    period: Period,
    count: u64,
    version: u64,
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recovery {
    pub(super) fn epoch(&self) -> String {
        guard(&self.epoch).clone()
    }

    /// A receiver that changes each time a loss is noticed.
    pub(super) fn losses(&self) -> watch::Receiver<u64> {
        self.losses.subscribe()
    }

    /// The store's clock as an operation of this replica moved it.
    pub(super) fn saw_clock(&self, clock: u64) {
        self.clock.fetch_max(clock, Ordering::AcqRel);
    }

    /// How long, as far as this replica knows, no reservation is granted after a loss.
    pub(super) fn recovering(&self) -> Option<Duration> {
        let until = (*guard(&self.counts_until))?;
        until.checked_duration_since(Instant::now())
    }

    /// No reservation is granted for `left`.
    pub(super) fn recovering_for(&self, left: Duration) {
        *guard(&self.counts_until) = Some(Instant::now() + left);
    }

    /// How many losses this replica noticed.
    pub(super) fn losses_noticed(&self) -> u64 {
        *self.losses.borrow()
    }

    /// Remember `record` of `upstream`, saved under `fence`, unless a later one of its lineage
    /// is known.
    pub(super) fn saw_record(&self, upstream: &str, record: &TokenRecord, fence: u64) {
        let mut records = guard(&self.records);
        let newer = records
            .get(upstream)
            .is_none_or(|(k, _)| k.seed_hash != record.seed_hash || record.is_after(k));
        if newer {
            records.insert(upstream.to_owned(), (record.clone(), fence));
        }
    }

    /// Remember what a reservation of `period` in the counts hash `key` returned.
    pub(super) fn saw_count(&self, key: &str, period: &Period, count: u64, version: u64) {
        let mut counts = guard(&self.counts);
        let seen = counts.entry(key.to_owned()).or_insert(Seen {
            period: *period,
            count,
            version,
        });
        let later = period.start_ms > seen.period.start_ms
            || (period == &seen.period && version > seen.version);
        if later {
            *seen = Seen {
                period: *period,
                count,
                version,
            };
        } else if period == &seen.period && version == seen.version {
            // Two replicas that wrote back can leave one version for two counts: the higher.
            seen.count = seen.count.max(count);
        }
    }
}

/// What `epoch.lua` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// The epoch this replica knew, or a first look at one.
    Known,
    /// Another: the store lost its data and another replica noticed first.
    Changed,
    /// None: this replica wrote one (a loss, or a first start).
    Gone,
}

impl RedisStore {
    /// How long after a loss no reservation is granted: two heartbeats and a store timeout, so
    /// that every live replica has looked and written back.
    fn counts_window(&self) -> Duration {
        2 * self.heartbeat + self.timeout
    }

    /// Look at the store's epoch: learn it, or notice that the store lost its data and write
    /// back what this replica knows.
    pub(super) async fn check_epoch(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.recovery.looking.lock().await;
        let known = self.recovery.epoch();
        let mut invocation = self.scripts.epoch.key(self.store_key("epoch"));
        invocation
            .key(self.store_key("recovery:locks"))
            .key(self.store_key("recovery:counts"))
            .key(self.store_key("clock"))
            .arg(&known)
            .arg(self.recovery.clock.load(Ordering::Acquire))
            .arg(format!("{:016x}", rand::random::<u64>()))
            .arg(self.counts_window().as_millis() as u64)
            .arg(self.lock_life().as_millis() as u64);
        let (epoch, status, clock): (String, u8, u64) = self
            .run(|mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        if epoch == known {
            self.recovery.saw_clock(clock);
        } else {
            // Another epoch counts its clock afresh (a flushed store starts it from nothing).
            self.recovery.clock.store(clock, Ordering::Release);
        }
        *guard(&self.recovery.epoch) = epoch;
        if status == 2 {
            self.recovery.recovering_for(self.counts_window());
        }
        let found = match status {
            0 => Found::Known,
            1 => Found::Changed,
            _ => Found::Gone,
        };
        match (found, known.is_empty()) {
            (Found::Known, _) => {}
            (Found::Gone, true) => {
                tracing::info!(store = %self.shown, window = ?self.counts_window(), "the state store holds no epoch: a first start on it, or it lost its data before this replica knew it; no refresh lock or reservation is granted for a moment, while replicas that knew it write back");
            }
            (_, _) => {
                tracing::warn!(store = %self.shown, noticed_first = (found == Found::Gone), "the state store lost its data (flushed, restarted without persistence or from an older snapshot, failed over to a stale replica): writing back the newest token records and the latest counts this replica knows; no reservation for {}, no refresh lock for {}", humantime::format_duration(self.counts_window()), humantime::format_duration(self.lock_life().max(self.counts_window())));
                self.recovery.losses.send_modify(|n| *n += 1);
                self.recovery.unwritten.store(true, Ordering::Release);
            }
        }
        if self.recovery.unwritten.swap(false, Ordering::AcqRel) && !self.write_back().await {
            self.recovery.unwritten.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Read again the count of the current window of every schedule this replica counts in
    /// (each heartbeat), so that what it would write back after a loss is at most a heartbeat
    /// old, even of a day or a minute it has not served a request in.
    pub(super) async fn look_at_counts(&self) {
        let now = super::unix_ms();
        let windows: Vec<(String, Period)> = guard(&self.recovery.counts)
            .iter()
            .map(|(k, s)| (k.clone(), s.period.holding(now)))
            .collect();
        for (key, period) in windows {
            if self.read_count(&key, &period).await.is_err() {
                return;
            }
        }
    }

    /// The count of `period` in the counts hash `key`, remembered unless the store's epoch is
    /// not the one this replica knows (a count read after a loss it has not noticed yet).
    pub(super) async fn read_count(&self, key: &str, period: &Period) -> Result<u64, StoreError> {
        // At a start, before the first heartbeat: the epoch first, or the count would not be
        // remembered, and this replica would know nothing to write back of a day it sits idle in.
        if self.recovery.epoch().is_empty() {
            self.check_epoch().await?;
        }
        let (count, version, epoch): (u64, u64, String) =
            self.days(key, "used", period, &[], "").await?;
        if !epoch.is_empty() && epoch == self.recovery.epoch() {
            self.recovery.saw_count(key, period, count, version);
        }
        Ok(count)
    }

    /// Write back every token record and every count this replica knows (after a loss);
    /// whether all of it was.
    async fn write_back(&self) -> bool {
        let mut written = true;
        let records: Vec<(String, (TokenRecord, u64))> = guard(&self.recovery.records)
            .iter()
            .map(|(u, r)| (u.clone(), r.clone()))
            .collect();
        for (upstream, (record, fence)) in records {
            match self.restore_token(&upstream, &record, fence).await {
                Ok(true) => {
                    tracing::warn!(%upstream, generation = record.generation, "wrote back the token record the state store lost")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%upstream, error = %e, "could not write back the token record the state store lost; trying again at the next heartbeat");
                    written = false;
                }
            }
        }
        let now = super::unix_ms();
        let counts: Vec<(String, Seen)> = guard(&self.recovery.counts)
            .iter()
            .filter(|(_, seen)| seen.period.end_ms > now)
            .map(|(k, s)| (k.clone(), *s))
            .collect();
        for (key, seen) in counts {
            let restored: Result<Vec<i64>, _> = self
                .days(
                    &key,
                    "restore",
                    &seen.period,
                    &[seen.count, seen.version],
                    "",
                )
                .await;
            if let Err(e) = restored {
                tracing::warn!(counts = %key, error = %e, "could not write back a count the state store lost; trying again at the next heartbeat");
                written = false;
            }
        }
        written
    }

    /// Write `record` (saved under `fence`) back unless the store holds it, or a later one;
    /// whether it wrote.
    async fn restore_token(
        &self,
        upstream: &str,
        record: &TokenRecord,
        fence: u64,
    ) -> Result<bool, StoreError> {
        let outcome = self
            .write_record(upstream, record, fence, "restore")
            .await?;
        Ok(outcome == "ok")
    }
}
