//! A semaphore whose size can change while its permits are out: a listener's connection cap
//! and a quota's `concurrency`, both of which a config reload may raise or lower.
//!
//! Growing adds permits at once. Shrinking takes free permits out at once; for the rest, the
//! next permits given back are retired instead of released, so nobody waiting gets in until
//! the number out is below the new size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};

pub struct Gate {
    permits: Arc<Semaphore>,
    size: AtomicUsize,
    /// Permits still out that a shrink retires when they are given back.
    owed: Arc<AtomicUsize>,
}

/// One place through the gate; given back (or retired by a shrink) on drop.
#[derive(Debug)]
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    owed: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let repaid = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if let (true, Some(permit)) = (repaid, self.permit.take()) {
            permit.forget();
        }
    }
}

impl Gate {
    pub fn new(size: usize) -> Gate {
        Gate {
            permits: Arc::new(Semaphore::new(size)),
            size: AtomicUsize::new(size),
            owed: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn permit(&self, permit: OwnedSemaphorePermit) -> Permit {
        Permit {
            permit: Some(permit),
            owed: Arc::clone(&self.owed),
        }
    }

    pub async fn acquire(&self) -> Result<Permit, AcquireError> {
        let permit = Arc::clone(&self.permits).acquire_owned().await?;
        Ok(self.permit(permit))
    }

    pub fn try_acquire(&self) -> Result<Permit, TryAcquireError> {
        let permit = Arc::clone(&self.permits).try_acquire_owned()?;
        Ok(self.permit(permit))
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }

    /// Permits out now (while a shrink is being repaid, more than the size).
    pub fn in_use(&self) -> usize {
        (self.size() + self.owed.load(Ordering::Acquire))
            .saturating_sub(self.permits.available_permits())
    }

    /// Let `size` permits out from now on. Resizes are expected one at a time (a reload).
    pub fn resize(&self, size: usize) {
        let old = self.size.swap(size, Ordering::AcqRel);
        if size >= old {
            // Cancel what an earlier shrink still owes before adding permits.
            let mut more = size - old;
            let _ = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                    more = (size - old).saturating_sub(owed);
                    Some(owed.saturating_sub(size - old))
                });
            self.permits.add_permits(more);
            return;
        }
        let cut = old - size;
        let remaining = cut - self.permits.forget_permits(cut);
        self.owed.fetch_add(remaining, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_at_once_and_shrinks_as_holders_leave() {
        let gate = Gate::new(2);
        let a = gate.try_acquire().unwrap();
        let b = gate.try_acquire().unwrap();
        assert!(gate.try_acquire().is_err());

        gate.resize(3);
        let c = gate.try_acquire().unwrap();
        assert_eq!((gate.size(), gate.in_use()), (3, 3));

        // Down to one while three are out: nobody gets in until two have left.
        gate.resize(1);
        assert_eq!(gate.in_use(), 3);
        drop(a);
        assert!(gate.try_acquire().is_err());
        drop(b);
        assert!(gate.try_acquire().is_err(), "c is still out");
        assert_eq!(gate.in_use(), 1);
        drop(c);
        let d = gate.try_acquire().unwrap();
        assert!(gate.try_acquire().is_err());
        assert_eq!((gate.size(), gate.in_use()), (1, 1));
        drop(d);
    }

    #[tokio::test]
    async fn a_free_gate_shrinks_at_once() {
        let gate = Gate::new(5);
        gate.resize(2);
        let _a = gate.try_acquire().unwrap();
        let _b = gate.try_acquire().unwrap();
        assert!(gate.try_acquire().is_err());
        assert_eq!(gate.in_use(), 2);
    }

    /// Those already waiting do not get in ahead of the cut.
    #[tokio::test]
    async fn a_shrink_holds_back_those_already_waiting() {
        let gate = Arc::new(Gate::new(3));
        let held: Vec<Permit> = (0..3).map(|_| gate.try_acquire().unwrap()).collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let (gate, tx) = (Arc::clone(&gate), tx.clone());
            tokio::spawn(async move {
                let permit = gate.acquire().await.unwrap();
                tx.send((i, permit)).unwrap();
            });
        }
        tokio::task::yield_now().await;
        gate.resize(1);
        drop(held);
        // Two of the three given back were retired; one waiter got in, the others wait.
        let (first, permit) = rx.recv().await.unwrap();
        assert_eq!(first, 0);
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        assert_eq!(gate.in_use(), 1);
        drop(permit);
        let (second, _permit) = rx.recv().await.unwrap();
        assert_eq!(second, 1);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn growing_again_cancels_what_a_shrink_still_owes() {
        let gate = Gate::new(3);
        let held: Vec<Permit> = (0..3).map(|_| gate.try_acquire().unwrap()).collect();
        gate.resize(1);
        gate.resize(4);
        assert_eq!((gate.size(), gate.in_use()), (4, 3));
        let extra = gate.try_acquire().unwrap();
        assert!(gate.try_acquire().is_err());
        drop(held);
        drop(extra);
        let all: Vec<Permit> = (0..4).map(|_| gate.try_acquire().unwrap()).collect();
        assert!(gate.try_acquire().is_err());
        drop(all);
    }
}
