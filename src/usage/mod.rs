//! Who spends an upstream's day, and when it will run out: the day's requests per inbound key
//! and 15-minute slot, for the group (every process on the state store), and the forecast.
//!
//! The request path only bumps its worker's counter of the key ([`crate::counters`]). Every few
//! seconds, and whenever `/status` or `/metrics` is read, [`Usage::flush`] adds what the
//! workers sent since the last flush to the store's tally of the day and reads the whole tally
//! back: a [`Day`]. The counts are attribution only; the quota admits and refuses on its own.
//! A crash loses at most the counts of one flush interval.

pub mod forecast;

use crate::counters::{self, RequestStats};
use crate::quota::{Clock, Quota};
use crate::store::{Period, StateStore, StoreError, Used};
pub use forecast::describe;
use forecast::{Forecast, SLOT_MS};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the workers' counts are added to the store's tally.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

const DAY_MS: u64 = 86_400_000;

/// The share of the daily limit at which a warning is logged, once a day each.
const WARN_AT: [u64; 2] = [80, 95];

/// One upstream's use of the day.
pub struct Usage {
    upstream: String,
    store: Arc<dyn StateStore>,
    clock: Clock,
    /// What each key had sent when last added to the store; one flush at a time.
    flushed: tokio::sync::Mutex<BTreeMap<Arc<str>, u64>>,
    /// The day as last read from the store.
    day: Mutex<Option<Day>>,
    /// The day (its start) and how many of [`WARN_AT`] were logged for it.
    warned: Mutex<(u64, usize)>,
    /// What is counted now: set when the upstream starts and at each reload.
    source: Mutex<Option<Source>>,
}

/// The workers' counters, the quota (for the daily limit and its start), and the labels of
/// the keys the config lists.
#[derive(Clone)]
struct Source {
    stats: Vec<Arc<RequestStats>>,
    quota: Arc<Quota>,
    keys: Vec<Arc<str>>,
}

/// The day's use by every process, as last read.
#[derive(Debug, Clone, PartialEq)]
pub struct Day {
    pub period: Period,
    /// Requests per 15-minute slot since the day started.
    pub slots: Vec<u64>,
    /// Requests per key label.
    pub keys: BTreeMap<String, u64>,
    /// The daily limit, when the upstream has one.
    pub limit: Option<u64>,
    /// What the quota counts as spent today (by every process, less the counts other
    /// processes hold unspent), when it counts a day: the forecast starts from the higher of
    /// this and the tally, so it never says "not reached" of a day the quota refuses.
    pub counted: Option<u64>,
    /// When it was read (Unix ms).
    pub read_at_ms: u64,
}

impl Day {
    pub fn used(&self) -> u64 {
        self.slots.iter().sum()
    }

    /// Seconds from the reading until the limit is reached at this pace (0: reached); `None`
    /// when not today, or without a limit.
    pub fn exhausted_in_s(&self) -> Option<u64> {
        match self.forecast()? {
            Forecast::At(ms) => Some(ms.saturating_sub(self.read_at_ms).div_ceil(1000)),
            Forecast::Reached => Some(0),
            Forecast::NotToday => None,
        }
    }

    /// When the limit is reached at the current pace; `None` without a limit.
    pub fn forecast(&self) -> Option<Forecast> {
        let limit = self.limit?;
        let used = self.used().max(self.counted.unwrap_or(0));
        Some(forecast::forecast(
            &self.slots,
            &self.period,
            used,
            limit,
            self.read_at_ms,
        ))
    }
}

impl Usage {
    pub fn new(upstream: &str, store: Arc<dyn StateStore>, clock: Clock) -> Usage {
        Usage {
            upstream: upstream.to_owned(),
            store,
            clock,
            flushed: tokio::sync::Mutex::default(),
            day: Mutex::default(),
            warned: Mutex::default(),
            source: Mutex::default(),
        }
    }

    /// Count the sends of `stats` from now on, against the day of `quota`; `keys` are the
    /// labels of the keys the config lists (shown even before they send anything).
    pub fn serve(&self, stats: Vec<Arc<RequestStats>>, quota: Arc<Quota>, keys: Vec<Arc<str>>) {
        *self.source.lock().expect("usage lock") = Some(Source { stats, quota, keys });
    }

    /// The labels of the keys the config lists.
    pub fn keys(&self) -> Vec<Arc<str>> {
        let source = self.source.lock().expect("usage lock");
        source.as_ref().map(|s| s.keys.clone()).unwrap_or_default()
    }

    /// Every key the config lists, then every other key that sent today (one removed from
    /// the config, or `-`), with what it sent today: for a key with a budget, never less than
    /// its budget counts (the tally lags a flush behind, and a process killed before its
    /// flush took its last counts with it; the budget's were reserved in the store first).
    pub fn by_key(&self, day: &Day) -> Vec<(String, u64)> {
        let listed = self.keys();
        let counted: Vec<(Arc<str>, u64)> = {
            let source = self.source.lock().expect("usage lock");
            source.as_ref().map_or_else(Vec::new, |s| {
                s.quota
                    .budgets()
                    .map(|(name, w)| (Arc::clone(name), w.policy.limit - w.remaining))
                    .collect()
            })
        };
        let budget = |key: &str| {
            counted
                .iter()
                .find(|(name, _)| **name == *key)
                .map_or(0, |(_, n)| *n)
        };
        let mut out: Vec<(String, u64)> = listed
            .iter()
            .map(|k| {
                let tally = day.keys.get(&**k).copied().unwrap_or(0);
                (k.to_string(), tally.max(budget(k)))
            })
            .collect();
        for (key, n) in &day.keys {
            if !listed.iter().any(|l| **l == **key) {
                out.push((key.clone(), *n));
            }
        }
        out
    }

    /// [`Usage::flush_from`] what [`Usage::serve`] set.
    pub async fn flush(&self) -> Result<Option<Day>, StoreError> {
        let Some(source) = self.source.lock().expect("usage lock").clone() else {
            return Ok(None);
        };
        let config = source.quota.config();
        let limit = config.and_then(|c| c.daily_limit());
        let day_starts = config.map_or(0, |c| c.day_starts);
        let counted = source
            .quota
            .windows()
            .into_iter()
            .find(|w| w.policy.name == "day");
        let counted = counted.map(|w| w.policy.limit - w.remaining);
        let day = self
            .flush_from(&source.stats, limit, day_starts, counted)
            .await?;
        Ok(Some(day))
    }

    /// The day as last read, if it is still today's.
    pub fn day(&self) -> Option<Day> {
        let day = self.day.lock().expect("usage lock").clone()?;
        (day.period.end_ms > self.clock.unix_ms()).then_some(day)
    }

    /// Add what the workers in `stats` sent since the last flush to the day that starts at
    /// `day_starts_s` after midnight UTC, read the group's day back, and warn as it crosses
    /// 80% and 95% of `limit`.
    pub async fn flush_from(
        &self,
        stats: &[Arc<RequestStats>],
        limit: Option<u64>,
        day_starts_s: u32,
        counted: Option<u64>,
    ) -> Result<Day, StoreError> {
        let mut flushed = self.flushed.lock().await;
        let sent = counters::totals(stats.iter().map(|s| &**s)).sent;
        let now = self.clock.unix_ms();
        let offset = u64::from(day_starts_s) * 1000;
        let period = Period::nth(Period::number(now, DAY_MS, offset), DAY_MS, offset);
        let start = period.start_ms;
        let slot = ((now - start) / SLOT_MS) as u32;
        let added: Vec<Used> = sent
            .iter()
            .filter_map(|(key, n)| {
                let count = n.saturating_sub(*flushed.get(key).unwrap_or(&0));
                (count > 0).then(|| Used {
                    key: key.to_string(),
                    slot,
                    count,
                })
            })
            .collect();
        let tally = self
            .store
            .add_usage(&self.upstream, &period, &added)
            .await?;
        flushed.extend(sent);
        let mut day = Day {
            period,
            slots: vec![0; slot as usize + 1],
            keys: BTreeMap::new(),
            limit,
            counted,
            read_at_ms: now,
        };
        for used in tally {
            // A slot past this one (a replica whose clock runs ahead) counts as this one.
            day.slots[(used.slot as usize).min(slot as usize)] += used.count;
            *day.keys.entry(used.key).or_insert(0) += used.count;
        }
        self.warn(&day);
        *self.day.lock().expect("usage lock") = Some(day.clone());
        Ok(day)
    }

    /// Log once a day when the day's use crosses each of [`WARN_AT`].
    fn warn(&self, day: &Day) {
        let Some(limit) = day.limit.filter(|l| *l > 0) else {
            return;
        };
        let mut warned = self.warned.lock().expect("usage lock");
        if warned.0 != day.period.start_ms {
            *warned = (day.period.start_ms, 0);
        }
        let used = day.used();
        let crossed = WARN_AT.iter().filter(|p| used * 100 >= *p * limit).count();
        for percent in &WARN_AT[warned.1.min(crossed)..crossed] {
            tracing::warn!(
                upstream = %self.upstream,
                used,
                limit,
                "the day has used {percent}% of its limit; {}",
                describe(day.forecast())
            );
        }
        warned.1 = warned.1.max(crossed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    const HOUR: u64 = 3_600_000;

    /// Two processes on one store: each adds its own sends, both read the group's day; the
    /// 80% and 95% warnings fire once each.
    #[tokio::test]
    async fn the_day_is_the_groups_and_warnings_fire_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(tmp.path()).unwrap());
        let midnight = 20_416 * DAY_MS;
        let clock = Clock::manual(midnight + 8 * HOUR);
        let (a, b) = (
            Usage::new("api", Arc::clone(&store), clock.clone()),
            Usage::new("api", Arc::clone(&store), clock.clone()),
        );
        let (sa, sb) = (
            Arc::new(RequestStats::default()),
            Arc::new(RequestStats::default()),
        );
        let etl: Arc<str> = Arc::from("etl");
        let none: Arc<str> = Arc::from("-");
        for _ in 0..30 {
            sa.key(&etl).sent();
        }
        for _ in 0..10 {
            sb.key(&none).sent();
        }
        a.flush_from(&[Arc::clone(&sa)], Some(100), 0, None)
            .await
            .unwrap();
        let day = b
            .flush_from(&[Arc::clone(&sb)], Some(100), 0, None)
            .await
            .unwrap();
        assert_eq!(day.used(), 40);
        assert_eq!(
            day.keys,
            BTreeMap::from([("-".into(), 10), ("etl".into(), 30)])
        );
        assert_eq!(day.slots[32], 40, "08:00–08:15");
        // Flushing again adds nothing twice.
        assert_eq!(
            a.flush_from(&[Arc::clone(&sa)], Some(100), 0, None)
                .await
                .unwrap()
                .used(),
            40
        );

        // 80% and 95% are logged once each, however often the day is flushed after.
        let logged = |usage: &Usage| usage.warned.lock().unwrap().1;
        for _ in 0..45 {
            sa.key(&etl).sent();
        }
        clock.advance(Duration::from_secs(60));
        a.flush_from(&[Arc::clone(&sa)], Some(100), 0, None)
            .await
            .unwrap();
        assert_eq!(logged(&a), 1, "85 of 100");
        a.flush_from(&[Arc::clone(&sa)], Some(100), 0, None)
            .await
            .unwrap();
        assert_eq!(logged(&a), 1, "still once");
        for _ in 0..10 {
            sa.key(&etl).sent();
        }
        let day = a
            .flush_from(&[Arc::clone(&sa)], Some(100), 0, None)
            .await
            .unwrap();
        assert_eq!((day.used(), logged(&a)), (95, 2));

        // The next day starts from nothing, and warns afresh.
        clock.advance(Duration::from_millis(16 * HOUR));
        let next = a
            .flush_from(&[Arc::clone(&sa)], Some(100), 0, None)
            .await
            .unwrap();
        assert_eq!((next.used(), logged(&a)), (0, 0));
    }
}
