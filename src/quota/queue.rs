//! `concurrency`, `queue`, `queue_timeout`: at most `concurrency` requests in flight upstream;
//! the next `queue` wait in line, first come first served (tokio's semaphore is fair); past the
//! line, or after waiting `queue_timeout`, a request is refused.
//!
//! A place ([`super::Slot`]) is held from admission until the upstream's response body has been passed on in
//! full (or the client went away), because that is when the API considers the request done.

use crate::semaphore::{Gate, Permit};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The line of one upstream. A reload changes its numbers in place, so the requests in flight
/// and in line stay counted.
pub struct Queue {
    slots: Gate,
    places: AtomicU32,
    waiting: Arc<AtomicU32>,
    timeout_ms: AtomicU64,
}

/// Why a request was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turned {
    /// Every slot and every place in line was taken.
    Full,
    /// It waited `queue_timeout` without a slot coming free.
    TimedOut,
}

impl Queue {
    pub fn new(concurrency: u32, places: u32, timeout: Duration) -> Queue {
        Queue {
            slots: Gate::new(concurrency as usize),
            places: AtomicU32::new(places),
            waiting: Arc::new(AtomicU32::new(0)),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
        }
    }

    /// New numbers (a reload). A lower concurrency lets nobody new in until enough of the
    /// requests in flight have finished.
    pub fn resize(&self, concurrency: u32, places: u32, timeout: Duration) {
        self.slots.resize(concurrency as usize);
        self.places.store(places, Ordering::Release);
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Release);
    }

    /// A slot now, or after waiting in line.
    pub async fn enter(&self) -> Result<Permit, Turned> {
        if let Ok(slot) = self.slots.try_acquire() {
            return Ok(slot);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.places() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Turned::Full);
        }
        // Leaves the line even when the client goes away while waiting.
        let _in_line = InLine(Arc::clone(&self.waiting));
        match tokio::time::timeout(self.timeout(), self.slots.acquire()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_closed)) => Err(Turned::Full),
            Err(_elapsed) => Err(Turned::TimedOut),
        }
    }

    pub fn concurrency(&self) -> u32 {
        self.slots.size() as u32
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Acquire))
    }

    pub fn places(&self) -> u32 {
        self.places.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> u32 {
        self.slots.in_use() as u32
    }

    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }
}

struct InLine(Arc<AtomicU32>);

impl Drop for InLine {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn first_come_first_served_then_full_then_timeout() {
        let queue = Arc::new(Queue::new(1, 2, Duration::from_secs(5)));
        let first = queue.enter().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..2 {
            let (queue, tx) = (Arc::clone(&queue), tx.clone());
            tokio::spawn(async move {
                let slot = queue.enter().await;
                tx.send((i, slot.is_ok())).unwrap();
                drop(slot);
            });
            tokio::task::yield_now().await;
        }
        assert_eq!(queue.waiting(), 2);
        assert_eq!(queue.enter().await.unwrap_err(), Turned::Full);
        drop(first);
        assert_eq!(rx.recv().await, Some((0, true)));
        assert_eq!(rx.recv().await, Some((1, true)));

        let held = queue.enter().await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(queue.enter().await.unwrap_err(), Turned::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(queue.waiting(), 0);
        assert_eq!(queue.in_flight(), 1);
        drop(held);
    }
}
