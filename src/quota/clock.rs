//! The time the quota code reads: the system clocks in production, a hand-driven clock in tests
//! so that a day or a minute can pass without waiting for it.
//!
//! Two readings: monotonic nanoseconds (for the short windows and the upstream hold, immune to
//! the wall clock being set) and Unix milliseconds (for the calendar day).

use governor::nanos::Nanos;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

struct Manual {
    unix_ms: AtomicU64,
    mono_ns: AtomicU64,
}

impl Clock {
    /// The system clocks.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that stands at `unix_ms` until [`Clock::advance`] moves it.
    pub fn manual(unix_ms: u64) -> Clock {
        Clock {
            manual: Some(Arc::new(Manual {
                unix_ms: AtomicU64::new(unix_ms),
                // Far from zero, so that "now minus a window" never saturates.
                mono_ns: AtomicU64::new(1 << 40),
            })),
        }
    }

    /// Move a manual clock forward (both readings). No effect on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            m.unix_ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
            m.mono_ns.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> u64 {
        match &self.manual {
            Some(m) => m.unix_ms.load(Ordering::SeqCst),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Monotonic nanoseconds since an arbitrary start.
    pub fn mono(&self) -> Nanos {
        match &self.manual {
            Some(m) => Nanos::from(m.mono_ns.load(Ordering::SeqCst)),
            None => {
                static START: OnceLock<Instant> = OnceLock::new();
                Nanos::from(START.get_or_init(Instant::now).elapsed())
            }
        }
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        self.mono()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = Clock::manual(1_000);
        let (wall, mono) = (clock.unix_ms(), clock.mono());
        assert_eq!(clock.unix_ms(), wall);
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.unix_ms(), wall + 2_000);
        assert_eq!(
            Duration::from(clock.mono().saturating_sub(mono)),
            Duration::from_secs(2)
        );
        let system = Clock::system();
        let a = system.mono();
        assert!(system.mono() >= a);
    }
}
