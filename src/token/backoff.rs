//! Capped exponential backoff with jitter, for retrying the identity server and the store.

use std::time::Duration;

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
}
