//! Request counters for `/metrics`, `/status` and the day's use: answers by inbound key and
//! status, requests sent upstream by key, and the upstream's response time, per upstream.
//! Each worker's pipeline has its own [`RequestStats`], touched by that thread only (no shared
//! cache line, no lock on the request path: a pipeline looks its keys' counters up once, when
//! it is built); `/metrics` adds them up when read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the response-time histogram, in seconds (Prometheus `le`).
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

pub struct RequestStats {
    /// The counters of every key label this worker has served, kept across reloads.
    keys: Mutex<Vec<Arc<KeyCounts>>>,
    /// Upstream response times per bucket (not cumulative), the last one past every bound;
    /// the count is their sum, so a scrape never sees more in a bucket than in all.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
    /// Requests between arrival and their answer's head: those that may still spend quota.
    in_flight: AtomicU64,
}

impl Default for RequestStats {
    fn default() -> Self {
        RequestStats {
            keys: Mutex::default(),
            buckets: Default::default(),
            sum_us: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }
}

/// One inbound key's counters on one worker (`-` for requests without a key).
pub struct KeyCounts {
    pub label: Arc<str>,
    /// Answers by status code, 100..=599 at index `status - 100`.
    by_status: Box<[AtomicU64]>,
    /// Requests sent upstream, replays included: what the key spent of the day.
    sent: AtomicU64,
}

impl KeyCounts {
    /// One answer to a client.
    pub fn answered(&self, status: u16) {
        if let Some(n) = self.by_status.get(usize::from(status).wrapping_sub(100)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One request sent upstream.
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// One request being answered; counted in [`RequestStats`] until dropped.
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl RequestStats {
    /// A request arrived; it is in flight until the guard is dropped (also when the client
    /// goes away first).
    pub fn arrived(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Requests of this worker between arrival and their answer's head.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The counters of key `label` on this worker (made the first time it is asked for).
    pub fn key(&self, label: &Arc<str>) -> Arc<KeyCounts> {
        let mut keys = self.keys.lock().expect("stats lock");
        if let Some(k) = keys.iter().find(|k| k.label == *label) {
            return Arc::clone(k);
        }
        let counts = Arc::new(KeyCounts {
            label: Arc::clone(label),
            by_status: (100..600).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
        });
        keys.push(Arc::clone(&counts));
        counts
    }

    /// One upstream response head, `took` after the request was sent.
    pub fn upstream(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

/// The sum of several workers' stats.
#[derive(Debug, Default, PartialEq)]
pub struct Totals {
    /// (key label, status, count) for every key and status seen, by label then status.
    pub by_status: Vec<(Arc<str>, u16, u64)>,
    /// (key label, requests sent upstream) for every key seen, by label.
    pub sent: Vec<(Arc<str>, u64)>,
    /// Cumulative counts per bucket of [`BUCKETS`].
    pub cumulative: Vec<u64>,
    pub sum: Duration,
    pub count: u64,
}

pub fn totals<'a>(stats: impl IntoIterator<Item = &'a RequestStats>) -> Totals {
    let mut by_key: std::collections::BTreeMap<Arc<str>, (Vec<u64>, u64)> = Default::default();
    let mut buckets = [0u64; BUCKETS.len() + 1];
    let mut sum_us = 0;
    for s in stats {
        for key in s.keys.lock().expect("stats lock").iter() {
            let (by_status, sent) = by_key
                .entry(Arc::clone(&key.label))
                .or_insert_with(|| (vec![0; 500], 0));
            for (i, n) in key.by_status.iter().enumerate() {
                by_status[i] += n.load(Ordering::Relaxed);
            }
            *sent += key.sent.load(Ordering::Relaxed);
        }
        for (i, n) in s.buckets.iter().enumerate() {
            buckets[i] += n.load(Ordering::Relaxed);
        }
        sum_us += s.sum_us.load(Ordering::Relaxed);
    }
    let count = buckets.iter().sum();
    let mut running = 0;
    Totals {
        by_status: by_key
            .iter()
            .flat_map(|(label, (by_status, _))| {
                let counted = (100u16..).zip(by_status).filter(|(_, n)| **n > 0);
                counted.map(move |(status, n)| (Arc::clone(label), status, *n))
            })
            .collect(),
        sent: by_key
            .iter()
            .map(|(label, (_, sent))| (Arc::clone(label), *sent))
            .collect(),
        cumulative: buckets[..BUCKETS.len()]
            .iter()
            .map(|n| {
                running += n;
                running
            })
            .collect(),
        sum: Duration::from_micros(sum_us),
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_add_up() {
        let (a, b) = (RequestStats::default(), RequestStats::default());
        let (etl, none): (Arc<str>, Arc<str>) = (Arc::from("etl"), Arc::from("-"));
        a.key(&etl).answered(200);
        a.key(&etl).answered(200);
        a.key(&etl).sent();
        b.key(&etl).sent();
        b.key(&none).answered(429);
        b.key(&none).answered(99); // not a status: ignored
        a.upstream(Duration::from_millis(3));
        b.upstream(Duration::from_millis(40));
        b.upstream(Duration::from_secs(20)); // past the last bucket: only in +Inf
        let t = totals([&a, &b]);
        assert_eq!(t.by_status, [(none.clone(), 429, 1), (etl.clone(), 200, 2)]);
        assert_eq!(t.sent, [(none, 0), (etl, 2)]);
        assert_eq!(t.count, 3);
        assert_eq!(
            t.cumulative[BUCKETS.iter().position(|b| *b == 0.005).unwrap()],
            1
        );
        assert_eq!(
            t.cumulative[BUCKETS.iter().position(|b| *b == 0.05).unwrap()],
            2
        );
        assert_eq!(*t.cumulative.last().unwrap(), 2);
        assert_eq!(t.sum, Duration::from_micros(20_043_000));
    }
}
