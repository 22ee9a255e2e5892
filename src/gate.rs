//! A semaphore whose size can change while its permits are out: a listener's connection cap
//! and a quota's `concurrency`, both of which a config reload may raise or lower.
//!
//! Growing adds permits at once. Shrinking takes free permits out at once and the rest as the
//! holders give them back, so the number out never exceeds the new size for longer than the
//! requests already in flight take.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};

pub struct Gate {
    permits: Arc<Semaphore>,
    size: AtomicUsize,
    /// Permits a shrink still has to take out of circulation, as holders give them back.
    owed: Arc<AtomicUsize>,
}

impl Gate {
    pub fn new(size: usize) -> Gate {
        Gate {
            permits: Arc::new(Semaphore::new(size)),
            size: AtomicUsize::new(size),
            owed: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        Arc::clone(&self.permits).acquire_owned().await
    }

    pub fn try_acquire(&self) -> Result<OwnedSemaphorePermit, TryAcquireError> {
        Arc::clone(&self.permits).try_acquire_owned()
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }

    /// Permits held now (while a shrink waits for holders, those it has already taken back
    /// count too).
    pub fn in_use(&self) -> usize {
        (self.size() + self.owed.load(Ordering::Acquire))
            .saturating_sub(self.permits.available_permits())
    }

    /// Let `size` permits out from now on. Shrinking waits for holders in a task of its own;
    /// it must be called inside a tokio runtime.
    pub fn resize(&self, size: usize) {
        let old = self.size.swap(size, Ordering::AcqRel);
        if size > old {
            self.permits.add_permits(size - old);
            return;
        }
        let cut = old - size;
        let remaining = cut - self.permits.forget_permits(cut);
        if remaining == 0 {
            return;
        }
        self.owed.fetch_add(remaining, Ordering::AcqRel);
        let (permits, owed) = (Arc::clone(&self.permits), Arc::clone(&self.owed));
        tokio::spawn(async move {
            // The semaphore is fair: nobody new gets in before this has taken its share.
            let n = u32::try_from(remaining).unwrap_or(u32::MAX);
            if let Ok(taken) = permits.acquire_many_owned(n).await {
                taken.forget();
            }
            owed.fetch_sub(remaining, Ordering::AcqRel);
        });
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
        tokio::task::yield_now().await;
        assert!(gate.try_acquire().is_err());
        drop(b);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
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
}
