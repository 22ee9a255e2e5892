//! Request counters for `/metrics`: answers by status and the upstream's response time, per
//! upstream. Each worker's pipeline has its own [`RequestStats`], touched by that thread only
//! (no shared cache line, no lock on the request path); `/metrics` adds them up when read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the response-time histogram, in seconds (Prometheus `le`).
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

pub struct RequestStats {
    /// Answers by status code, 100..=599 at index `status - 100`.
    by_status: Box<[AtomicU64]>,
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
            by_status: (100..600).map(|_| AtomicU64::new(0)).collect(),
            buckets: Default::default(),
            sum_us: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
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

    /// One answer to a client.
    pub fn answered(&self, status: u16) {
        if let Some(n) = self.by_status.get(usize::from(status).wrapping_sub(100)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
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
    /// (status, count) for every status seen.
    pub by_status: Vec<(u16, u64)>,
    /// Cumulative counts per bucket of [`BUCKETS`].
    pub cumulative: Vec<u64>,
    pub sum: Duration,
    pub count: u64,
}

pub fn totals<'a>(stats: impl IntoIterator<Item = &'a RequestStats>) -> Totals {
    let mut by_status = vec![0u64; 500];
    let mut buckets = [0u64; BUCKETS.len() + 1];
    let mut sum_us = 0;
    for s in stats {
        for (i, n) in s.by_status.iter().enumerate() {
            by_status[i] += n.load(Ordering::Relaxed);
        }
        for (i, n) in s.buckets.iter().enumerate() {
            buckets[i] += n.load(Ordering::Relaxed);
        }
        sum_us += s.sum_us.load(Ordering::Relaxed);
    }
    let count = buckets.iter().sum();
    let mut running = 0;
    Totals {
        by_status: (100u16..).zip(by_status).filter(|(_, n)| *n > 0).collect(),
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
        a.answered(200);
        a.answered(200);
        b.answered(429);
        b.answered(99); // not a status: ignored
        a.upstream(Duration::from_millis(3));
        b.upstream(Duration::from_millis(40));
        b.upstream(Duration::from_secs(20)); // past the last bucket: only in +Inf
        let t = totals([&a, &b]);
        assert_eq!(t.by_status, [(200, 2), (429, 1)]);
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
