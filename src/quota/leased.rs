//! A fixed window counted in the state store — the calendar day (`per_day`, `day_starts`),
//! and on a shared store the short windows too — that never over-admits, across restarts,
//! `kill -9` and several processes sharing one store.
//!
//! Counts are reserved in the store ahead of use, a lease at a time, and spent from memory with
//! one atomic operation. The store only ever holds counts that were reserved, so a crash loses
//! the counts in hand (under-admission, at most one lease) and never grants one twice. A clean
//! shutdown gives the counts in hand back. When half the lease is spent, a background task
//! tops it up, so a request waits for the store only when the hand is empty (at the start of
//! each window, for a short one).

use super::{Policy, Window, DAY};
use crate::store::{Period, Seen, StateStore, StoreError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub struct Leased {
    upstream: String,
    limit: u64,
    policy: &'static Policy,
    /// Windows are `length_ms` long and start `offset_ms` after the epoch (`day_starts`).
    length_ms: u64,
    offset_ms: u64,
    /// How many counts are reserved at a time (see [`lease_size`]), as last sized.
    lease: AtomicU64,
    /// The most a lease may be, however few replicas share the store.
    cap: u64,
    store: Arc<dyn StateStore>,
    /// The window the counts in hand belong to (high 32 bits) and how many are left (low 32).
    hand: AtomicU64,
    /// What every process had reserved of the window at our last reservation.
    used: AtomicU64,
    /// The store's version of the window's counts at our last reservation (see [`Seen`]).
    version: AtomicU64,
    /// Until when (Unix ms) the store is known to have nothing left: refusals skip it till then.
    spent_until_ms: AtomicU64,
    topping_up: AtomicBool,
    /// Until when (Unix ms) the store is taken to be failing, and how it failed: requests that
    /// waited for a refill behind one that failed fail at once, not one timeout each.
    failing: std::sync::Mutex<Option<(u64, String)>>,
    /// Set by `give_back`: the process is shutting down, or a reload replaced this window by
    /// `successor`; nothing more is reserved here.
    closed: AtomicBool,
    successor: OnceLock<Next>,
    refill: tokio::sync::Mutex<()>,
}

/// Why a request may not be sent in this window.
pub enum Refused {
    Spent,
    Store(StoreError),
    /// This window counts no more (see [`Leased::retire`]): go on with what replaced it, or,
    /// when nothing did, the process is shutting down.
    Retired(Option<Next>),
}

/// What counts the requests of a window a reload replaced.
#[derive(Clone)]
pub enum Next {
    Window(Arc<Leased>),
    /// The new config has no such limit.
    Unlimited,
}

fn pack(day: u64, left: u64) -> u64 {
    (day << 32) | left
}

fn unpack(hand: u64) -> (u64, u64) {
    (hand >> 32, hand & 0xffff_ffff)
}

impl Leased {
    /// The calendar day, starting `day_starts_s` after midnight UTC; leases of at most 1% of it.
    pub fn day(upstream: &str, limit: u64, day_starts_s: u32, store: Arc<dyn StateStore>) -> Self {
        let offset_ms = u64::from(day_starts_s) * 1000;
        Leased::new(upstream, "day", limit, DAY, offset_ms, limit / 100, store)
    }

    /// A short window (`name` is how headers call it) counted by the group on a shared store,
    /// as a fixed window aligned on the epoch.
    pub fn fixed(
        upstream: &str,
        name: &'static str,
        limit: u64,
        length: Duration,
        store: Arc<dyn StateStore>,
    ) -> Self {
        Leased::new(upstream, name, limit, length, 0, limit, store)
    }

    fn new(
        upstream: &str,
        name: &'static str,
        limit: u64,
        length: Duration,
        offset_ms: u64,
        cap: u64,
        store: Arc<dyn StateStore>,
    ) -> Self {
        Leased {
            upstream: upstream.to_owned(),
            limit,
            policy: Policy::leak(name, limit, length.as_secs()),
            length_ms: length.as_millis() as u64,
            offset_ms,
            lease: AtomicU64::new(lease_size(limit, cap, 1)),
            cap,
            store,
            hand: AtomicU64::new(0),
            used: AtomicU64::new(0),
            version: AtomicU64::new(0),
            spent_until_ms: AtomicU64::new(0),
            topping_up: AtomicBool::new(false),
            failing: std::sync::Mutex::new(None),
            closed: AtomicBool::new(false),
            successor: OnceLock::new(),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn day_starts(&self) -> u32 {
        (self.offset_ms / 1000) as u32
    }

    pub fn policy(&self) -> &'static Policy {
        self.policy
    }

    /// Which window `unix_ms` falls in, counting from the first start after the epoch.
    fn day_of(&self, unix_ms: u64) -> u64 {
        Period::number(unix_ms, self.length_ms, self.offset_ms)
    }

    /// The span of window number `day`, as the store counts it.
    fn period(&self, day: u64) -> Period {
        Period::nth(day, self.length_ms, self.offset_ms)
    }

    /// How long until the window that holds `unix_ms` ends.
    pub fn reset_in(&self, unix_ms: u64) -> Duration {
        let next = self.period(self.day_of(unix_ms)).end_ms;
        Duration::from_millis(next.saturating_sub(unix_ms))
    }

    /// The state of the window at `unix_ms`, for headers, `/status` and refusals.
    pub fn window(&self, unix_ms: u64) -> Window {
        let (day, left) = unpack(self.hand.load(Ordering::Acquire));
        let remaining = if day == self.day_of(unix_ms) {
            self.limit
                .saturating_sub(self.used.load(Ordering::Relaxed))
                .saturating_add(left)
                .min(self.limit)
        } else {
            // Nothing reserved by this process today yet: the store knows, the hand does not.
            self.limit
        };
        Window {
            policy: self.policy,
            remaining,
            reset: self.reset_in(unix_ms),
        }
    }

    /// Spend one request of the window that holds `unix_ms`.
    pub async fn spend(self: &Arc<Self>, unix_ms: u64) -> Result<Window, Refused> {
        let day = self.day_of(unix_ms);
        loop {
            if let Some(left) = self.take(day) {
                let lease = self.lease.load(Ordering::Relaxed);
                if left < lease / 2 + 1 && !self.topping_up.swap(true, Ordering::AcqRel) {
                    let this = Arc::clone(self);
                    tokio::spawn(async move {
                        if let Err(e) = this.refill(day, unix_ms).await {
                            tracing::warn!(upstream = %this.upstream, error = %e, "could not reserve daily quota ahead");
                        }
                        this.topping_up.store(false, Ordering::Release);
                    });
                }
                return Ok(self.window(unix_ms));
            }
            if self.closed.load(Ordering::Acquire) {
                return Err(Refused::Retired(self.successor.get().cloned()));
            }
            if self.spent_until_ms.load(Ordering::Relaxed) > unix_ms {
                return Err(Refused::Spent);
            }
            // In a task of its own: a client that goes away must not drop a reservation the
            // store has made but the hand has not received yet.
            let this = Arc::clone(self);
            let refill = tokio::spawn(async move { this.refill(day, unix_ms).await });
            match refill.await.expect("a refill does not panic") {
                Ok(0) if self.closed.load(Ordering::Acquire) => {
                    return Err(Refused::Retired(self.successor.get().cloned()));
                }
                Ok(0) => {
                    // Look at the store again in a second, not on every refused request:
                    // counts come back only when another process shuts down. Never past the
                    // end of the window, whose successor starts afresh.
                    let day_ends = unix_ms + self.reset_in(unix_ms).as_millis() as u64;
                    self.spent_until_ms
                        .store((unix_ms + 1000).min(day_ends), Ordering::Relaxed);
                    return Err(Refused::Spent);
                }
                Ok(_) => continue,
                Err(e) => return Err(Refused::Store(e)),
            }
        }
    }

    /// Whether counts of the window at `unix_ms` are in hand: requests are admitted without
    /// the store.
    pub fn in_hand(&self, unix_ms: u64) -> bool {
        let (day, left) = unpack(self.hand.load(Ordering::Acquire));
        day == self.day_of(unix_ms) && left > 0
    }

    /// Whether the window at `unix_ms` was found spent a moment ago: a request it would refuse
    /// is refused before any other window counts it.
    pub fn known_spent(&self, unix_ms: u64) -> bool {
        self.spent_until_ms.load(Ordering::Relaxed) > unix_ms
    }

    /// Give back one count [`Leased::spend`] took at `unix_ms`, when another window refused
    /// the request (and the hand is still on that window).
    pub fn put_back(&self, unix_ms: u64) {
        let day = self.day_of(unix_ms);
        let _ = self
            .hand
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                let (d, left) = unpack(current);
                (d == day).then(|| pack(day, left + 1))
            });
    }

    /// Take one count of `day` from the hand; returns what is left, or `None` if it is empty.
    fn take(&self, day: u64) -> Option<u64> {
        let mut current = self.hand.load(Ordering::Acquire);
        loop {
            let (d, left) = unpack(current);
            if d != day || left == 0 {
                return None;
            }
            match self.hand.compare_exchange_weak(
                current,
                pack(day, left - 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(left - 1),
                Err(now) => current = now,
            }
        }
    }

    /// Top the hand up to a full lease of `day` from the store. Returns how many counts are in
    /// hand afterwards (0: the day is spent, over, or the process is shutting down).
    async fn refill(&self, day: u64, unix_ms: u64) -> Result<u64, StoreError> {
        let _one_at_a_time = self.refill.lock().await;
        let (hand_day, left) = unpack(self.hand.load(Ordering::Acquire));
        if self.closed.load(Ordering::Acquire) || day < hand_day {
            // After give_back nothing more is reserved; and a day the hand has moved past (a
            // request that read the clock just before midnight, or a clock set back) is over.
            return Ok(0);
        }
        let mut lease = self.lease.load(Ordering::Relaxed);
        if hand_day == day && left > lease / 2 {
            return Ok(left);
        }
        if left == 0 && self.spent_until_ms.load(Ordering::Relaxed) > unix_ms {
            // Found spent while this request waited for the lock.
            return Ok(0);
        }
        if let Some((until, error)) = &*self.failing.lock().expect("failing lock") {
            if *until > unix_ms {
                return Err(StoreError::Recently(error.clone()));
            }
        }
        if hand_day != day {
            // Yesterday's counts are of no use today; they were reserved, so they stay spent.
            self.hand.store(pack(day, 0), Ordering::Release);
            self.used.store(0, Ordering::Relaxed);
            self.version.store(0, Ordering::Relaxed);
        }
        if self.store.is_shared() {
            let replicas = self.store.health().map_or(1, |h| h.replicas.len());
            lease = lease_size(self.limit, self.cap, replicas);
            self.lease.store(lease, Ordering::Relaxed);
        }
        let have = unpack(self.hand.load(Ordering::Acquire)).1;
        let reservation = self
            .store
            .reserve_quota(
                &self.upstream,
                &self.period(day),
                self.limit,
                lease.saturating_sub(have),
                Seen {
                    count: self.used.load(Ordering::Relaxed),
                    version: self.version.load(Ordering::Relaxed),
                },
            )
            .await
            .inspect_err(|e| {
                *self.failing.lock().expect("failing lock") = Some((unix_ms + 1000, e.to_string()));
            })?;
        self.used.store(reservation.used, Ordering::Relaxed);
        self.version.store(reservation.version, Ordering::Relaxed);
        // Only this function adds to the hand and it runs one at a time, so the day is unchanged.
        let after = self.hand.fetch_add(reservation.granted, Ordering::AcqRel);
        Ok(unpack(after).1 + reservation.granted)
    }

    /// Learn what every process has spent of the day at `unix_ms` so far, so that the first
    /// headers and `/status` after a start are right. Reserves nothing.
    pub async fn load(&self, unix_ms: u64) -> Result<(), StoreError> {
        self.read_used(unix_ms, false).await
    }

    /// Read again what every process has reserved of the day at `unix_ms` (after a reload's
    /// predecessor gave its lease back), so the headers and `/status` count without it.
    pub async fn relearn(&self, unix_ms: u64) -> Result<(), StoreError> {
        self.read_used(unix_ms, true).await
    }

    /// Read the day's count from the store: when the hand is not yet on the day (`load`), or
    /// when it is (`relearn`).
    async fn read_used(&self, unix_ms: u64, again: bool) -> Result<(), StoreError> {
        let _one_at_a_time = self.refill.lock().await;
        let day = self.day_of(unix_ms);
        if (unpack(self.hand.load(Ordering::Acquire)).0 == day) != again {
            return Ok(());
        }
        let used = self
            .store
            .quota_used(&self.upstream, &self.period(day))
            .await?;
        self.used.store(used, Ordering::Relaxed);
        if !again {
            self.hand.store(pack(day, 0), Ordering::Release);
            self.version.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A reload replaced this day's limit or start, or removed the limit: from now on `next`
    /// counts, and the counts in hand go back to the store.
    pub async fn retire(&self, next: Next) -> Result<(), StoreError> {
        let _ = self.successor.set(next);
        self.give_back().await
    }

    /// Give the counts in hand back to the store and reserve no more (clean shutdown).
    pub async fn give_back(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.refill.lock().await;
        self.closed.store(true, Ordering::Release);
        let (day, left) = unpack(self.hand.swap(0, Ordering::AcqRel));
        if left > 0 {
            self.store
                .release_quota(&self.upstream, &self.period(day), left)
                .await?;
        }
        Ok(())
    }
}

/// How many counts one process reserves of a window at a time: a quarter of its share among
/// the `replicas` that count it, at most `cap` (1% of a day), at least 1 — so the leases in
/// hands hold at most a quarter of the window, and a crashed replica strands little of it.
/// (The hand holds 32 bits; no real limit comes near.)
pub fn lease_size(limit: u64, cap: u64, replicas: usize) -> u64 {
    let share = limit / (4 * replicas.max(1) as u64);
    share.min(cap).clamp(1, u64::from(u32::MAX / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    #[test]
    fn leases_are_a_hundredth_of_the_day_or_less_among_many_replicas() {
        let day = |limit, replicas| lease_size(limit, limit / 100, replicas);
        assert_eq!(day(20, 1), 1);
        assert_eq!(day(2000, 1), 20);
        assert_eq!(day(25_000, 1), 250);
        assert_eq!(day(10_000_000, 1), 100_000);
        assert_eq!(
            day(25_000, 100),
            62,
            "a quarter of the day in hands at most"
        );
        // A short window: a quarter of each replica's share.
        assert_eq!(lease_size(600, 600, 1), 150);
        assert_eq!(lease_size(600, 600, 3), 50);
        assert_eq!(lease_size(10, 10, 4), 1);
    }

    #[tokio::test]
    async fn never_grants_more_than_the_limit_and_gives_back_on_shutdown() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(tmp.path()).unwrap());
        // 06:30 UTC on 2025-11-24.
        let start = (20_416 * 86_400 + 6 * 3600 + 30 * 60) * 1000;
        let daily = Arc::new(Leased::day("api", 300, 7 * 3600, Arc::clone(&store)));
        assert_eq!(daily.lease.load(Ordering::Relaxed), 3);
        let mut admitted = 0;
        for _ in 0..400 {
            if daily.spend(start).await.is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 300);
        assert!(matches!(daily.spend(start).await, Err(Refused::Spent)));
        assert_eq!(daily.window(start).remaining, 0);
        assert_eq!(daily.reset_in(start), Duration::from_secs(30 * 60));

        // A second process on the same store finds the day spent, and says so from the start.
        let other = Arc::new(Leased::day("api", 300, 7 * 3600, Arc::clone(&store)));
        assert_eq!(other.window(start).remaining, 300, "nothing known yet");
        other.load(start).await.unwrap();
        assert_eq!(other.window(start).remaining, 0);
        assert!(matches!(other.spend(start).await, Err(Refused::Spent)));

        // At 07:00 a new day starts, even right after a refusal in the last second of the old.
        let next = start + 30 * 60 * 1000;
        assert!(matches!(daily.spend(next - 200).await, Err(Refused::Spent)));
        assert!(daily.spend(next).await.is_ok());
        assert_eq!(daily.window(next).remaining, 299);
        // A request that read the clock before 07:00 but reaches the store after: that day is
        // over and stays spent.
        assert!(matches!(daily.spend(next - 1).await, Err(Refused::Spent)));
        let today = daily.period(20_416);
        let reserved = store.quota_used("api", &today).await.unwrap();
        assert!((1..=3).contains(&reserved), "{reserved}");
        daily.give_back().await.unwrap();
        assert_eq!(store.quota_used("api", &today).await.unwrap(), 1);
        // After giving back, nothing more is reserved.
        assert!(matches!(
            daily.spend(next).await,
            Err(Refused::Retired(None))
        ));
        assert_eq!(store.quota_used("api", &today).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_retired_day_hands_its_counts_back_and_points_at_its_successor() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(tmp.path()).unwrap());
        let now = 20_416 * 86_400 * 1000;
        let old = Arc::new(Leased::day("api", 1000, 0, Arc::clone(&store)));
        for _ in 0..4 {
            assert!(old.spend(now).await.is_ok());
        }
        let day = old.period(20_416);
        // 4 spent from a lease of 10, topped up to a full one when half was gone.
        let reserved = store.quota_used("api", &day).await.unwrap();
        assert!(reserved >= 10, "{reserved}");

        // per_day raised to 2000 by a reload: the new day picks up what was spent.
        let new = Arc::new(Leased::day("api", 2000, 0, Arc::clone(&store)));
        old.retire(Next::Window(Arc::clone(&new))).await.unwrap();
        assert_eq!(store.quota_used("api", &day).await.unwrap(), 4);
        new.load(now).await.unwrap();
        assert_eq!(new.window(now).remaining, 1996);
        match old.spend(now).await {
            Err(Refused::Retired(Some(Next::Window(next)))) => assert!(Arc::ptr_eq(&next, &new)),
            _ => panic!("a retired day points at its successor"),
        }
        assert!(new.spend(now).await.is_ok());
        new.give_back().await.unwrap();
        assert_eq!(store.quota_used("api", &day).await.unwrap(), 5);
    }
}
