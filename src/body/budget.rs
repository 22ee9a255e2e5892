//! The bytes of one upstream's request bodies held for a replay at once: `[upstream.limits]
//! max_buffered`, per process, each worker holding its share (as with
//! `max_upstream_connections`). Past it a body streams without a replay, as one over
//! `retry_body_limit` does, so many large bodies at once cannot grow the process without
//! bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One worker's share of `max_buffered` for one upstream; clones share it.
#[derive(Debug, Clone)]
pub struct Budget {
    held: Arc<AtomicU64>,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Self {
        Budget {
            held: Arc::default(),
            limit,
        }
    }

    /// Take `n` bytes, if they fit.
    pub fn take(&self, n: u64) -> Option<Held> {
        let mut held = Held {
            budget: self.clone(),
            bytes: 0,
        };
        held.grow(n).then_some(held)
    }

    /// Bytes held for a replay now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Budget,
    bytes: u64,
}

impl Held {
    /// Take `n` more bytes, if they fit in the budget.
    pub fn grow(&mut self, n: u64) -> bool {
        let held = &self.budget.held;
        let limit = self.budget.limit;
        let taken = held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            now.checked_add(n).filter(|after| *after <= limit)
        });
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_taken_while_they_fit_and_given_back_when_dropped() {
        let budget = Budget::new(100);
        let a = budget.take(60).unwrap();
        assert!(budget.take(41).is_none(), "over the budget");
        let mut b = budget.take(30).unwrap();
        assert!(b.grow(10));
        assert!(!b.grow(1));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        assert!(b.grow(60));
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
