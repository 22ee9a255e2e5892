//! The short windows (`per_second`, `per_minute`, `per_hour`): GCRA through governor, with a
//! burst equal to the count, so a quiet client may spend a whole window at once and then one
//! request per interval.
//!
//! These windows live in memory: after a restart they start full, as the API's own would not.
//! Each costs one compare-and-swap per request.

use super::{Clock, Policy, Window};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

type Limiter = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

pub struct Rate {
    policy: &'static Policy,
    limiter: Limiter,
    clock: Clock,
    /// What was left after the last request, and when (monotonic ns), for `/status`.
    last_remaining: AtomicU64,
    last_at: AtomicU64,
}

impl Rate {
    /// `limit` requests per `period`; `name` is how headers and metrics call the window.
    pub fn new(name: &'static str, limit: NonZeroU32, period: Duration, clock: Clock) -> Rate {
        let quota = Quota::with_period(period / limit.get())
            .expect("a positive period")
            .allow_burst(limit);
        Rate {
            policy: Policy::leak(name, u64::from(limit.get()), period.as_secs()),
            limiter: RateLimiter::direct_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            clock,
            last_remaining: AtomicU64::new(u64::from(limit.get())),
            last_at: AtomicU64::new(0),
        }
    }

    /// The same window with a new count (a reload), starting with what this one has spent
    /// of its current burst, so that changing the count never admits a fresh burst.
    pub fn successor(&self, limit: NonZeroU32) -> Rate {
        let name = self.policy.name;
        let period = Duration::from_secs(self.policy.seconds);
        let next = Rate::new(name, limit, period, self.clock.clone());
        let spent = self.policy.limit - self.peek().remaining;
        let spent = u32::try_from(spent).unwrap_or(u32::MAX).min(limit.get());
        if let Some(n) = NonZeroU32::new(spent) {
            if let Ok(Ok(snapshot)) = next.limiter.check_n(n) {
                let remaining = u64::from(snapshot.remaining_burst_capacity());
                next.last_remaining.store(remaining, Ordering::Relaxed);
                next.last_at
                    .store(self.clock.mono().as_u64(), Ordering::Relaxed);
            }
        }
        next
    }

    /// Spend one request; on refusal, how long until one would be admitted.
    pub fn spend(&self) -> Result<Window, Duration> {
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = u64::from(snapshot.remaining_burst_capacity());
                self.last_remaining.store(remaining, Ordering::Relaxed);
                self.last_at
                    .store(self.clock.mono().as_u64(), Ordering::Relaxed);
                Ok(self.window(remaining))
            }
            Err(not_until) => {
                self.last_remaining.store(0, Ordering::Relaxed);
                self.last_at
                    .store(self.clock.mono().as_u64(), Ordering::Relaxed);
                Err(not_until.wait_time_from(self.clock.mono()))
            }
        }
    }

    /// The window with `remaining` requests left: it is whole again after one interval per
    /// request spent.
    fn window(&self, remaining: u64) -> Window {
        Window {
            policy: self.policy,
            remaining,
            reset: self.interval() * (self.policy.limit - remaining) as u32,
        }
    }

    /// How long one request takes to come back.
    fn interval(&self) -> Duration {
        Duration::from_secs(self.policy.seconds) / self.policy.limit as u32
    }

    pub fn policy(&self) -> &'static Policy {
        self.policy
    }

    /// The window now, without spending: what was left at the last request plus what has
    /// come back since.
    pub fn peek(&self) -> Window {
        let interval = self.interval().as_nanos().max(1) as u64;
        let since = self
            .clock
            .mono()
            .as_u64()
            .saturating_sub(self.last_at.load(Ordering::Relaxed));
        let remaining =
            (self.last_remaining.load(Ordering::Relaxed) + since / interval).min(self.policy.limit);
        self.window(remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_equals_the_count_then_one_per_interval() {
        let clock = Clock::manual(0);
        let rate = Rate::new(
            "minute",
            NonZeroU32::new(6).unwrap(),
            Duration::from_secs(60),
            clock.clone(),
        );
        for left in (0..6).rev() {
            let w = rate.spend().unwrap();
            assert_eq!(w.remaining, left);
            assert_eq!(w.reset, Duration::from_secs(10 * (6 - left)));
        }
        assert_eq!(rate.spend().unwrap_err(), Duration::from_secs(10));
        clock.advance(Duration::from_secs(4));
        assert_eq!(rate.spend().unwrap_err(), Duration::from_secs(6));
        clock.advance(Duration::from_secs(6));
        assert_eq!(rate.spend().unwrap().remaining, 0);
        clock.advance(Duration::from_secs(60));
        assert_eq!(rate.peek().remaining, 6);
        assert_eq!(rate.spend().unwrap().remaining, 5);
    }

    #[test]
    fn a_successor_starts_with_what_was_spent() {
        let clock = Clock::manual(0);
        let minute = Duration::from_secs(60);
        let old = Rate::new("minute", NonZeroU32::new(5).unwrap(), minute, clock.clone());
        for _ in 0..5 {
            old.spend().unwrap();
        }
        // Lowered to 4 after all 5 were spent: nothing more this interval.
        let lower = old.successor(NonZeroU32::new(4).unwrap());
        assert!(lower.spend().is_err());
        // Raised to 8 after 5 spent: 3 more.
        let higher = old.successor(NonZeroU32::new(8).unwrap());
        for _ in 0..3 {
            higher.spend().unwrap();
        }
        assert!(higher.spend().is_err());
    }
}
