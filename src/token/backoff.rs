//! Capped exponential backoff with jitter, for retrying the identity server and the store;
//! and [`Retry`], when a cache may call its identity server next.

use std::time::{Duration, Instant};

/// The first pause after a failed token request, and the longest.
pub const RETRY_FIRST: Duration = Duration::from_millis(200);
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// When a token cache may call its identity server next: after the server's own
/// `Retry-After`, and after a backoff that grows while token requests fail, whatever the
/// number of requests waiting and across flights (up to [`RETRY_MAX`], jittered), and starts
/// over at a success.
#[derive(Debug, Clone)]
pub struct Retry {
    /// The identity server asked (`Retry-After`) not to be called before this instant.
    pub asked: Option<Instant>,
    backoff_until: Option<Instant>,
    failures: Backoff,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            asked: None,
            backoff_until: None,
            failures: Backoff::new(RETRY_FIRST, RETRY_MAX),
        }
    }
}

impl Retry {
    /// The instant before which no token request is sent, if it is still ahead.
    pub fn not_before(&self, now: Instant) -> Option<Instant> {
        self.asked.max(self.backoff_until).filter(|t| *t > now)
    }

    /// A token request failed; the server may have said when to come back.
    pub fn failed(&mut self, now: Instant, retry_after: Option<Duration>) {
        self.backoff_until = Some(now + self.failures.next_delay());
        if let Some(wait) = retry_after {
            self.asked = Some(now + wait);
        }
    }

    /// A token request succeeded: the next failure starts the backoff over.
    pub fn succeeded(&mut self) {
        *self = Retry::default();
    }
}

/// Capped exponential backoff with jitter ("equal jitter": half fixed, half random).
#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The nominal (un-jittered) next delay.
    pub fn peek(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.peek();
        self.attempt = self.attempt.saturating_add(1);
        let half = nominal / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_below_the_nominal_delay() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        for nominal in [100, 200, 350, 350] {
            assert_eq!(b.peek(), Duration::from_millis(nominal));
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(nominal / 2) && d <= Duration::from_millis(nominal));
        }
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }

    #[test]
    fn retry_grows_across_failures_to_a_minute_and_starts_over_at_a_success() {
        let now = Instant::now();
        let mut retry = Retry::default();
        assert_eq!(retry.not_before(now), None);
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            retry.failed(now, None);
            last = retry.not_before(now).unwrap() - now;
        }
        assert!(last >= RETRY_MAX / 2 && last <= RETRY_MAX, "{last:?}");
        // The server's Retry-After wins when it is longer.
        retry.failed(now, Some(Duration::from_secs(120)));
        assert_eq!(retry.not_before(now), Some(now + Duration::from_secs(120)));
        retry.succeeded();
        assert_eq!(retry.not_before(now), None);
        retry.failed(now, None);
        assert!(retry.not_before(now).unwrap() - now <= RETRY_FIRST);
    }
}
