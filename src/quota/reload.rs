//! A quota's succession across a reload: the successor takes over what the old quota counted
//! wherever the numbers did not change (the day, each short window, the key budgets, the
//! queue, each identity's limits), and the hand-over puts it in force for the requests that
//! still hold the old one.
//!
//! Must not: admit or refuse a request (that is [`Quota::enter`] and [`Quota::spend`]).

use super::leased::{Leased, Next};
use super::queue::Queue;
use super::rate::Rate;
use super::{Limits, Quota};
use crate::config::QuotaConfig;
use crate::store::StoreError;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

impl Quota {
    /// The limits of `config` for the same upstream, taking over what this one counted: the
    /// day when its limit and start are unchanged (else the new day reads the store), each
    /// short window (a changed count starts with what was spent), and the queue. Nothing
    /// changes for requests until [`Quota::hand_over`].
    pub fn successor(&self, config: Option<&QuotaConfig>, limits: Limits<'_>) -> Quota {
        let mut leased = Vec::new();
        let mut rates = Vec::new();
        let shared = self.store.is_shared();
        let short = |c: &QuotaConfig| {
            [
                ("second", c.per_second, Duration::from_secs(1)),
                ("minute", c.per_minute, Duration::from_secs(60)),
                ("hour", c.per_hour, Duration::from_secs(3600)),
            ]
        };
        for (name, limit, length) in config.map(short).into_iter().flatten() {
            let Some(limit) = limit.and_then(NonZeroU32::new) else {
                continue;
            };
            if shared {
                leased.push(match self.leased_named(name) {
                    Some(w) if w.limit() == u64::from(limit.get()) => Arc::clone(w),
                    _ => Arc::new(Leased::fixed(
                        &self.upstream,
                        name,
                        u64::from(limit.get()),
                        length,
                        Arc::clone(&self.store),
                    )),
                });
                continue;
            }
            let old = self.rates.iter().find(|r| r.policy().name == name);
            rates.push(match old {
                Some(rate) if rate.policy().limit == u64::from(limit.get()) => Arc::clone(rate),
                Some(rate) => Arc::new(rate.successor(limit)),
                None => Arc::new(Rate::new(name, limit, length, self.clock.clone())),
            });
        }
        if let Some((limit, c)) = config.and_then(|c| Some((c.daily_limit()?, c))) {
            leased.push(match self.leased_named("day") {
                Some(d) if d.limit() == limit && d.day_starts() == c.day_starts => Arc::clone(d),
                _ => Arc::new(Leased::day(
                    &self.upstream,
                    limit,
                    c.day_starts,
                    Arc::clone(&self.store),
                )),
            });
        }
        let day_starts = config.map_or(0, |c| c.day_starts);
        let budgets = limits
            .budgets
            .iter()
            .map(|(name, per_day)| {
                let old = self.budgets.iter().find(|(n, _)| **n == **name);
                let day = match old {
                    Some((_, d)) if d.limit() == *per_day && d.day_starts() == day_starts => {
                        Arc::clone(d)
                    }
                    // Counted in the store apart from the upstream's own day.
                    _ => Arc::new(Leased::day(
                        &format!("{}.key.{name}", self.upstream),
                        *per_day,
                        day_starts,
                        Arc::clone(&self.store),
                    )),
                };
                (Arc::from(name.as_str()), day)
            })
            .collect();
        let queue = config.and_then(|c| {
            let n = c.concurrency.filter(|n| *n > 0)?;
            Some(match &self.queue {
                // Resized by hand_over, so the requests in flight stay counted.
                Some(q) => Arc::clone(q),
                None => Arc::new(Queue::new(n, c.queue.unwrap_or(0), c.queue_timeout)),
            })
        });
        Quota {
            upstream: self.upstream.clone(),
            config: config.cloned(),
            clock: self.clock.clone(),
            store: Arc::clone(&self.store),
            leased,
            rates,
            budgets,
            queue,
            identities: self.identity_successors(limits.identities),
            hold: Arc::clone(&self.hold),
            rejected: Arc::clone(&self.rejected),
            successor: OnceLock::new(),
        }
    }

    /// Whether this quota enforces exactly `config` and `limits`.
    pub fn enforces(&self, config: Option<&QuotaConfig>, limits: Limits<'_>) -> bool {
        let budgets = limits.budgets;
        self.config.as_ref() == config
            && self.budgets.len() == budgets.len()
            && self
                .budgets
                .iter()
                .zip(budgets)
                .all(|((name, day), (n, per_day))| **name == **n && day.limit() == *per_day)
            && self.enforces_identities(limits.identities)
    }

    /// Make `next` (this quota's [`Quota::successor`]) the one in force: requests that still
    /// hold this quota (in line, say, or replaying after a 401) are admitted and counted by
    /// `next` from now on; the shared queue is resized, and the counts in hand of a day `next`
    /// no longer counts with go back to the store.
    pub async fn hand_over(&self, next: &Arc<Quota>) -> Result<(), StoreError> {
        let _ = self.successor.set(Arc::clone(next));
        let mut outcome = self.hand_over_identities(next).await;
        if let (Some(queue), Some(c)) = (&next.queue, &next.config) {
            if let Some(n) = c.concurrency {
                queue.resize(n, c.queue.unwrap_or(0), c.queue_timeout);
            }
        }
        let windows = self
            .leased
            .iter()
            .map(|w| (w, next.leased_named(w.policy().name)));
        let budgets = self.budgets.iter().map(|(name, day)| {
            let new = next.budgets.iter().find(|(n, _)| n == name);
            (day, new.map(|(_, d)| d))
        });
        for (old, new) in windows.chain(budgets) {
            let handed = match new {
                Some(new) if Arc::ptr_eq(old, new) => Ok(()),
                Some(new) => {
                    let retired = old.retire(Next::Window(Arc::clone(new))).await;
                    // What the new window saw when it was prepared included the lease just
                    // given back.
                    retired.and(new.relearn(self.clock.unix_ms()).await)
                }
                None => old.retire(Next::Unlimited).await,
            };
            outcome = outcome.and(handed);
        }
        outcome
    }

    fn leased_named(&self, name: &str) -> Option<&Arc<Leased>> {
        self.leased.iter().find(|w| w.policy().name == name)
    }
}
