//! An upstream's request limits (`[upstream.quota]`), enforced before a request is sent:
//!
//! ```text
//! enter: the identity's own line, then a slot among the requests in flight (queue.rs), or
//!        wait in line, or 429
//! spend: for every send, the replay after a 401 included:
//!        upstream held back after its own 429 (hold.rs), or a window found spent? ─►
//!        the identity's own windows (identity.rs) ─► the inbound key's budget
//!        (leased.rs) ─► short windows (rate.rs) ─► windows counted in the store
//!        (leased.rs) ─► admit, with the tightest window
//! ```
//!
//! A reload's successor, and the hand-over to it, are reload.rs.
//!
//! The calendar day is always counted in the state store. The short windows are GCRA in
//! memory on a store of this machine alone, and fixed windows counted in the store, by the
//! whole group, on a shared one (Redis).
//!
//! A refusal is a [`Refusal`] (refusal.rs): which limit, how long until a request would be
//! admitted, and the words.
//! Each window's state, and the rate-limit headers that tell it, are a [`Window`] (window.rs).
//! Token requests never pass through here.

mod clock;
mod hold;
mod identity;
mod leased;
mod queue;
mod rate;
mod refusal;
mod reload;
mod window;

pub use clock::Clock;
pub use hold::http_date;
pub use refusal::{QuotaError, Reason, Refusal};
pub use window::{add_headers, has_headers, Policy, Window};

use identity::named;
use window::tighter;

use crate::config::QuotaConfig;
use crate::semaphore::Permit;
use crate::store::{StateStore, StoreError};
use hold::Hold;
use http::{HeaderMap, StatusCode};
use leased::{Leased, Next};
use queue::Queue;
use rate::Rate;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const DAY: Duration = Duration::from_secs(86_400);

/// The limits of one upstream, shared by every worker thread that serves it.
///
/// A reload builds a [`Quota::successor`] that shares every part whose numbers did not change
/// (and the queue, the 429 hold and the refusal counts always), so the state carries over.
pub struct Quota {
    upstream: String,
    config: Option<QuotaConfig>,
    clock: Clock,
    store: Arc<dyn StateStore>,
    /// The windows counted in the store: the short ones on a shared store, then the day.
    leased: Vec<Arc<Leased>>,
    /// The short windows counted in memory (a store of this machine alone).
    rates: Vec<Arc<Rate>>,
    /// The daily budgets of named inbound keys: (key name, its day), counted in the store.
    budgets: Vec<(Arc<str>, Arc<Leased>)>,
    queue: Option<Arc<Queue>>,
    /// The limits of each identity's own requests, by label (identity.rs).
    identities: BTreeMap<Arc<str>, Arc<Quota>>,
    hold: Arc<Hold>,
    rejected: Arc<[AtomicU64; Reason::ALL.len()]>,
    /// Set by [`Quota::hand_over`]: requests still holding this quota are counted there.
    successor: OnceLock<Arc<Quota>>,
}

/// A request's places in flight — its identity's and the upstream's, where they are limited —
/// held until its response has been passed on; freed on drop.
#[derive(Debug)]
pub struct Slot {
    _identity: Option<Permit>,
    _upstream: Option<Permit>,
}

/// What a quota counts beside `[upstream.quota]`: the daily budget of each named key, and the
/// limits of each identity's own requests, by label.
#[derive(Clone, Copy, Default)]
pub struct Limits<'a> {
    pub budgets: &'a [(String, u64)],
    pub identities: &'a [(String, QuotaConfig)],
}

impl Quota {
    /// The limits of `config` (none when absent) and `limits`, counting the day in `store`.
    pub fn new(
        upstream: &str,
        config: Option<&QuotaConfig>,
        limits: Limits<'_>,
        store: Arc<dyn StateStore>,
        clock: Clock,
    ) -> Quota {
        let hold = Arc::new(Hold::default());
        if let (Some(announced), Ok(runtime)) =
            (store.holds(upstream), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(hold::follow(
                Arc::downgrade(&hold),
                announced,
                clock.clone(),
            ));
        }
        let empty = Quota::empty(upstream, store, clock, hold, Arc::default());
        empty.successor(config, limits)
    }

    /// A quota that limits nothing yet.
    fn empty(
        upstream: &str,
        store: Arc<dyn StateStore>,
        clock: Clock,
        hold: Arc<Hold>,
        rejected: Arc<[AtomicU64; Reason::ALL.len()]>,
    ) -> Quota {
        Quota {
            upstream: upstream.to_owned(),
            config: None,
            clock,
            store,
            leased: Vec::new(),
            rates: Vec::new(),
            budgets: Vec::new(),
            queue: None,
            identities: BTreeMap::new(),
            hold,
            rejected,
            successor: OnceLock::new(),
        }
    }

    /// The config this quota enforces.
    pub fn config(&self) -> Option<&QuotaConfig> {
        self.config.as_ref()
    }

    /// Each named key's budget: (name, requests a day, the state of its day), for `/status`.
    pub fn budgets(&self) -> impl Iterator<Item = (&Arc<str>, Window)> + '_ {
        let now = self.clock.unix_ms();
        self.budgets
            .iter()
            .map(move |(name, day)| (name, day.window(now)))
    }

    /// A place among the requests in flight of `identity` (its label), when it has a
    /// `concurrency` of its own, then among the upstream's, when `concurrency` is set.
    pub async fn enter(&self, identity: &str) -> Result<Option<Slot>, QuotaError> {
        if let Some(next) = self.successor.get() {
            return Box::pin(next.enter(identity)).await;
        }
        let own = match self.identities.get(identity) {
            Some(limits) => limits.line_place().await.map_err(|e| named(e, identity))?,
            None => None,
        };
        let upstream = self.line_place().await?;
        Ok((own.is_some() || upstream.is_some()).then_some(Slot {
            _identity: own,
            _upstream: upstream,
        }))
    }

    /// A place in this quota's line, when it has one.
    async fn line_place(&self) -> Result<Option<Permit>, QuotaError> {
        let Some(queue) = &self.queue else {
            return Ok(None);
        };
        match queue.enter().await {
            Ok(place) => Ok(Some(place)),
            Err(turned) => Err(self.refuse(refusal::turned(turned, queue))),
        }
    }

    /// Count one request about to be sent upstream for inbound key `key` (its name), reaching
    /// the API as `identity` (its label): the identity's own limits first. Returns the
    /// tightest window, for headers.
    pub async fn spend(
        &self,
        key: Option<&str>,
        identity: &str,
    ) -> Result<Option<Window>, QuotaError> {
        if let Some(next) = self.successor.get() {
            return Box::pin(next.spend(key, identity)).await;
        }
        let limits = self.identities.get(identity);
        let own = match limits {
            Some(limits) => {
                // What the upstream refuses at once spends nothing of the identity's.
                self.refused_at_once()?;
                let spent = limits.spend_here(None).await;
                spent.map_err(|e| named(e, identity))?
            }
            None => None,
        };
        let upstream = self.spend_here(key).await;
        if let (Err(_), Some(limits)) = (&upstream, limits) {
            // Not sent: the identity's windows counted in the store take it back (one counted
            // in memory cannot, and stays spent).
            let now = self.clock.unix_ms();
            limits.leased.iter().for_each(|w| w.put_back(now));
        }
        let upstream = upstream?;
        Ok(match (own, upstream) {
            (Some(own), Some(upstream)) => Some(tighter(Some(own), upstream)),
            (own, upstream) => own.or(upstream),
        })
    }

    /// What refuses a request before anything counts it: the hold after the upstream's 429,
    /// or a window found spent a moment ago.
    fn refused_at_once(&self) -> Result<(), QuotaError> {
        if let Some(left) = self.hold.remaining(&self.clock) {
            return Err(self.refuse(refusal::held(left)));
        }
        let now = self.clock.unix_ms();
        if let Some(spent) = self.leased.iter().find(|w| w.known_spent(now)) {
            return Err(self.refuse(refusal::spent(spent, now)));
        }
        Ok(())
    }

    /// [`Quota::spend`] of this quota's own windows.
    async fn spend_here(&self, key: Option<&str>) -> Result<Option<Window>, QuotaError> {
        self.refused_at_once()?;
        let now = self.clock.unix_ms();
        let mut tightest: Option<Window> = None;
        // The key's own budget first: a key past it spends nothing of the upstream's day.
        let budget = key.and_then(|k| self.budgets.iter().find(|(name, _)| **name == *k));
        if let Some((name, day)) = budget {
            tightest = Some(self.spend_budget(name, day, now).await?);
        }
        let mut counted = self.spend_rates(&mut tightest);
        if counted.is_ok() {
            counted = self.spend_leased(now, &mut tightest).await;
        }
        if let (Err(_), Some((_, day))) = (&counted, budget) {
            // Refused by a window after the budget counted it: the budget takes it back.
            day.put_back(now);
        }
        counted.map(|()| tightest)
    }

    /// Spend one request of each short window counted in memory.
    fn spend_rates(&self, tightest: &mut Option<Window>) -> Result<(), QuotaError> {
        for rate in &self.rates {
            match rate.spend() {
                Ok(w) => *tightest = Some(tighter(*tightest, w)),
                Err(wait) => return Err(self.refuse(refusal::rate(rate.peek(), wait))),
            }
        }
        Ok(())
    }

    /// Spend one request of each window counted in the store; when one refuses, the windows
    /// before it take theirs back.
    async fn spend_leased(
        &self,
        now: u64,
        tightest: &mut Option<Window>,
    ) -> Result<(), QuotaError> {
        for (i, first) in self.leased.iter().enumerate() {
            let mut spent = first.spend(now).await;
            // A reload replaced this window while the request was on its way.
            let mut replaced = None;
            while let Err(leased::Refused::Retired(Some(Next::Window(next)))) = spent {
                spent = next.spend(now).await;
                replaced = Some(next);
            }
            let counted = replaced.as_ref().unwrap_or(first);
            let refused = match spent {
                Ok(w) => {
                    *tightest = Some(tighter(*tightest, w));
                    continue;
                }
                Err(leased::Refused::Retired(Some(Next::Unlimited))) => continue,
                Err(leased::Refused::Retired(_)) => self.refuse(refusal::closing(counted)),
                Err(leased::Refused::Spent) => self.refuse(refusal::spent(counted, now)),
                Err(leased::Refused::Store(e)) => QuotaError::Store(e),
            };
            self.leased[..i].iter().for_each(|w| w.put_back(now));
            return Err(refused);
        }
        Ok(())
    }

    /// Learn from an upstream response: a 429 holds the upstream back.
    pub fn upstream_answered(&self, status: StatusCode, headers: &HeaderMap) {
        if let Some(hold) = self.hold.observe(status, headers, &self.clock) {
            if self.store.is_shared() {
                let (store, upstream) = (Arc::clone(&self.store), self.upstream.clone());
                let until_ms = self.clock.unix_ms() + hold.as_millis() as u64;
                // No request waits for it: the other replicas learn of it in the background.
                tokio::spawn(async move { store.share_hold(&upstream, until_ms).await });
            }
            tracing::warn!(
                upstream = %self.upstream,
                hold_s = ceil_secs(hold),
                "upstream answered 429; holding requests back"
            );
        }
    }

    /// Spend one request of key `name`'s budget `day`; the refusal names the key's budget.
    async fn spend_budget(
        &self,
        name: &str,
        day: &Arc<Leased>,
        now: u64,
    ) -> Result<Window, QuotaError> {
        let mut spent = day.spend(now).await;
        let mut counted = Arc::clone(day);
        // A reload changed the budget while the request was on its way.
        while let Err(leased::Refused::Retired(Some(Next::Window(next)))) = spent {
            spent = next.spend(now).await;
            counted = next;
        }
        match spent {
            Ok(w) => Ok(w),
            // The budget was removed, or the process is shutting down: the day decides.
            Err(leased::Refused::Retired(_)) => Ok(counted.window(now)),
            Err(leased::Refused::Store(e)) => Err(QuotaError::Store(e)),
            Err(leased::Refused::Spent) => Err(self.refuse(refusal::budget(name, &counted, now))),
        }
    }

    /// Count a refusal by its reason, and make it the error.
    fn refuse(&self, refusal: Refusal) -> QuotaError {
        self.rejected[refusal.reason as usize].fetch_add(1, Ordering::Relaxed);
        QuotaError::Refused(refusal)
    }

    /// Every window now, without spending, for `/status` and `/metrics`.
    pub fn windows(&self) -> Vec<Window> {
        let now = self.clock.unix_ms();
        let rates = self.rates.iter().map(|r| r.peek());
        rates
            .chain(self.leased.iter().map(|w| w.window(now)))
            .collect()
    }

    /// Whether a request can be admitted without asking the store: every window counted in
    /// the store has counts in hand (true when none is).
    pub fn counts_in_hand(&self) -> bool {
        let now = self.clock.unix_ms();
        self.leased.iter().all(|w| w.in_hand(now))
    }

    /// Requests in flight and waiting in line, when `concurrency` is set.
    pub fn line(&self) -> Option<(u32, u32)> {
        self.queue.as_ref().map(|q| (q.in_flight(), q.waiting()))
    }

    /// How much longer the upstream is held back after its 429.
    pub fn held_for(&self) -> Option<Duration> {
        self.hold.remaining(&self.clock)
    }

    /// Refusals so far, per reason.
    pub fn rejected(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL
            .iter()
            .map(|r| (*r, self.rejected[*r as usize].load(Ordering::Relaxed)))
    }

    /// Read what the windows counted in the store have spent so far (at start).
    pub async fn load(&self) -> Result<(), StoreError> {
        let identities = self.identities.values().flat_map(|q| &q.leased);
        for window in self
            .leased
            .iter()
            .chain(self.budgets.iter().map(|(_, d)| d))
            .chain(identities)
        {
            window.load(self.clock.unix_ms()).await?;
        }
        Ok(())
    }

    /// Give the counts in hand back to the store (clean shutdown).
    pub async fn give_back(&self) -> Result<(), StoreError> {
        let mut outcome = Ok(());
        let identities = self.identities.values().flat_map(|q| &q.leased);
        for window in self
            .leased
            .iter()
            .chain(self.budgets.iter().map(|(_, d)| d))
            .chain(identities)
        {
            // Every window gives back what it can, whichever failed first.
            outcome = outcome.and(window.give_back().await);
        }
        outcome
    }
}

pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;
    use crate::store::OWN_IDENTITY;

    fn quota(config: &str, clock: &Clock, dir: &std::path::Path) -> Quota {
        let config: QuotaConfig = toml::from_str(config).unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(dir).unwrap());
        Quota::new(
            "api",
            Some(&config),
            Limits::default(),
            store,
            clock.clone(),
        )
    }

    #[tokio::test]
    async fn a_key_past_its_budget_is_refused_while_others_go_on() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_700_000_000_000);
        let config: QuotaConfig = toml::from_str("per_day = 10").unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(tmp.path()).unwrap());
        let budgets = [("etl".to_owned(), 3)];
        let limits = Limits {
            budgets: &budgets,
            identities: &[],
        };
        let q = Quota::new("api", Some(&config), limits, store, clock.clone());
        for left in [2, 1, 0] {
            let w = q.spend(Some("etl"), OWN_IDENTITY).await.unwrap().unwrap();
            assert_eq!(w.remaining, left, "the key's budget is the tightest window");
        }
        let QuotaError::Refused(r) = q.spend(Some("etl"), OWN_IDENTITY).await.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert_eq!(r.reason, Reason::KeyBudget);
        assert!(
            r.detail.contains("`etl` has spent its budget of 3"),
            "{}",
            r.detail
        );
        assert!(r.retry_after > 0);
        // Other keys, and requests without one, go on; the day holds the sum.
        for _ in 0..7 {
            q.spend(Some("reports"), OWN_IDENTITY).await.unwrap();
        }
        let QuotaError::Refused(r) = q.spend(None, OWN_IDENTITY).await.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert_eq!(r.reason, Reason::PerDay, "3 + 7 = the day");
        // A reload that raises the budget: the key goes on from what it spent.
        let raised = [("etl".to_owned(), 5)];
        assert!(!q.enforces(
            Some(&config),
            Limits {
                budgets: &raised,
                identities: &[]
            }
        ));
        let next = Arc::new(q.successor(
            Some(&config),
            Limits {
                budgets: &raised,
                identities: &[],
            },
        ));
        next.load().await.unwrap();
        q.hand_over(&next).await.unwrap();
        let (_, w) = next.budgets().next().unwrap();
        assert_eq!((w.policy.limit, w.remaining), (5, 2));
    }

    #[tokio::test]
    async fn the_tightest_window_is_reported_and_refusals_say_which() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_700_000_000_000);
        let q = quota("per_day = 100\nper_minute = 3", &clock, tmp.path());
        let w = q.spend(None, OWN_IDENTITY).await.unwrap().unwrap();
        assert_eq!(
            (w.policy.name, w.remaining, w.policy.limit),
            ("minute", 2, 3)
        );
        q.spend(None, OWN_IDENTITY).await.unwrap();
        q.spend(None, OWN_IDENTITY).await.unwrap();
        let QuotaError::Refused(r) = q.spend(None, OWN_IDENTITY).await.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert_eq!(r.reason, Reason::PerMinute);
        assert_eq!(r.retry_after, 20);
        assert_eq!(r.window.unwrap().remaining, 0);
        assert_eq!(
            q.rejected().find(|(r, _)| *r == Reason::PerMinute),
            Some((Reason::PerMinute, 1))
        );
        // The day counted only what was sent.
        let day = q
            .windows()
            .into_iter()
            .find(|w| w.policy.name == "day")
            .unwrap();
        assert_eq!(day.remaining, 97);
    }

    #[tokio::test]
    async fn an_upstream_429_holds_everything_back() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_700_000_000_000);
        let q = quota("per_minute = 600", &clock, tmp.path());
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("3"),
        );
        q.upstream_answered(StatusCode::TOO_MANY_REQUESTS, &headers);
        let QuotaError::Refused(r) = q.spend(None, OWN_IDENTITY).await.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert_eq!((r.reason, r.retry_after), (Reason::UpstreamThrottled, 3));
        clock.advance(Duration::from_millis(2500));
        let QuotaError::Refused(r) = q.spend(None, OWN_IDENTITY).await.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert_eq!(r.retry_after, 1);
        clock.advance(Duration::from_millis(500));
        assert!(q.spend(None, OWN_IDENTITY).await.is_ok());
    }

    /// A reload's successor keeps what did not change and takes over what did: a request that
    /// still spends against the old quota is counted by the new day, the minute window with
    /// an unchanged count keeps its state, and the lowered concurrency holds new requests
    /// back until enough in flight have finished.
    #[tokio::test]
    async fn a_successor_carries_the_counts_over() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_700_000_000_000);
        let old = quota(
            "per_day = 1000\nper_minute = 3\nconcurrency = 2",
            &clock,
            tmp.path(),
        );
        let held = [
            old.enter(OWN_IDENTITY).await.unwrap(),
            old.enter(OWN_IDENTITY).await.unwrap(),
        ];
        old.spend(None, OWN_IDENTITY).await.unwrap();
        old.spend(None, OWN_IDENTITY).await.unwrap();

        let config: QuotaConfig =
            toml::from_str("per_day = 2000\nper_minute = 3\nconcurrency = 1").unwrap();
        let new = Arc::new(old.successor(Some(&config), Limits::default()));
        new.load().await.unwrap();
        old.hand_over(&new).await.unwrap();

        // The request that was on its way spends against the old quota: the new day counts it.
        old.spend(None, OWN_IDENTITY).await.unwrap();
        let windows = new.windows();
        let day = windows.iter().find(|w| w.policy.name == "day").unwrap();
        assert_eq!((day.policy.limit, day.remaining), (2000, 1997));
        // The minute keeps its state: all three spent.
        let QuotaError::Refused(r) = new.spend(None, OWN_IDENTITY).await.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert_eq!(r.reason, Reason::PerMinute);

        assert_eq!(new.line(), Some((2, 0)));
        let QuotaError::Refused(r) = new.enter(OWN_IDENTITY).await.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert_eq!(r.reason, Reason::QueueFull, "two in flight, one allowed");
        let [first, second] = held;
        drop(first);
        tokio::task::yield_now().await;
        assert!(
            new.enter(OWN_IDENTITY).await.is_err(),
            "still one in flight of one"
        );
        drop(second);
        let slot = new.enter(OWN_IDENTITY).await.unwrap();
        assert_eq!(new.line(), Some((1, 0)));
        drop(slot);
    }

    /// After a hand-over, a request still holding the old quota spends from the new windows.
    #[tokio::test]
    async fn the_old_quota_forwards_to_its_successor() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_700_000_000_000);
        let old = quota("per_minute = 5", &clock, tmp.path());
        old.spend(None, OWN_IDENTITY).await.unwrap();
        old.spend(None, OWN_IDENTITY).await.unwrap();
        let config: QuotaConfig = toml::from_str("per_minute = 4").unwrap();
        let new = Arc::new(old.successor(Some(&config), Limits::default()));
        old.hand_over(&new).await.unwrap();
        old.spend(None, OWN_IDENTITY).await.unwrap();
        new.spend(None, OWN_IDENTITY).await.unwrap();
        let QuotaError::Refused(r) = new.spend(None, OWN_IDENTITY).await.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert_eq!(r.reason, Reason::PerMinute, "2 + 1 + 1 of 4 spent");
        assert!(
            old.spend(None, OWN_IDENTITY).await.is_err(),
            "the old quota refuses as the new one does"
        );
    }
}
