//! Holding an upstream back after it answered 429: until its `Retry-After` (seconds or an HTTP
//! date), or without one for a backoff that starts at 1 s and doubles up to 60 s. Meanwhile
//! tollgate answers 429 itself and the API is not contacted. A response other than 429 ends the
//! backoff sequence. On a shared store the hold is shared: one replica's 429 holds every
//! replica back.

use super::Clock;
use http::{header, HeaderMap, StatusCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A Retry-After further out than this is taken as this: an API may mean it, but a day is the
/// longest any quota here lasts.
const MAX_HOLD: Duration = Duration::from_secs(86_400);

#[derive(Default)]
pub struct Hold {
    /// Monotonic ns until which the upstream is held back; 0 when it is not.
    until_ns: AtomicU64,
    /// The next backoff without Retry-After, in ms; 0 means the first.
    backoff_ms: AtomicU64,
}

impl Hold {
    /// How much longer the upstream is held back, if it is.
    pub fn remaining(&self, clock: &Clock) -> Option<Duration> {
        let until = self.until_ns.load(Ordering::Acquire);
        if until == 0 {
            return None;
        }
        let now = clock.mono().as_u64();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Learn from one upstream response. Returns the hold it started, if any.
    pub fn observe(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        clock: &Clock,
    ) -> Option<Duration> {
        if status != StatusCode::TOO_MANY_REQUESTS {
            if self.backoff_ms.load(Ordering::Relaxed) != 0 {
                self.backoff_ms.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let hold = match headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, clock.unix_ms()))
        {
            Some(d) => d,
            None => {
                if let Some(left) = self.remaining(clock) {
                    // Sent before the hold began (requests already in flight): the same
                    // episode, so the backoff does not grow once per request.
                    return Some(left);
                }
                let ms = self.backoff_ms.load(Ordering::Relaxed);
                let this = if ms == 0 {
                    FIRST_BACKOFF
                } else {
                    Duration::from_millis(ms)
                };
                self.backoff_ms.store(
                    (this * 2).min(MAX_BACKOFF).as_millis() as u64,
                    Ordering::Relaxed,
                );
                this
            }
        }
        .min(MAX_HOLD);
        let until = clock.mono().as_u64() + hold.as_nanos() as u64;
        self.until_ns.fetch_max(until, Ordering::AcqRel);
        Some(hold)
    }
}

impl Hold {
    /// Another replica was answered 429: hold back until `until_ms` (Unix ms) too.
    pub fn hold_until(&self, until_ms: u64, clock: &Clock) {
        let left = until_ms.saturating_sub(clock.unix_ms());
        if left > 0 {
            let until = clock.mono().as_u64() + Duration::from_millis(left).as_nanos() as u64;
            self.until_ns.fetch_max(until, Ordering::AcqRel);
        }
    }
}

/// Apply the holds other replicas announce to `hold`, while it is in use.
pub async fn follow(
    hold: std::sync::Weak<Hold>,
    mut announced: tokio::sync::watch::Receiver<u64>,
    clock: Clock,
) {
    while announced.changed().await.is_ok() {
        let until_ms = *announced.borrow_and_update();
        let Some(hold) = hold.upgrade() else {
            return;
        };
        hold.hold_until(until_ms, &clock);
    }
}

/// `Retry-After` as a delay from `now_ms`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
fn retry_after(value: &str, now_ms: u64) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let now = UNIX_EPOCH + Duration::from_millis(now_ms);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An HTTP date `after` from `now_ms`, as an API would write it in `Retry-After`.
pub fn http_date(now_ms: u64, after: Duration) -> String {
    httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_millis(now_ms) + after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn said(hold: &Hold, clock: &Clock, retry_after: Option<&str>) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        }
        hold.observe(StatusCode::TOO_MANY_REQUESTS, &headers, clock)
    }

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let clock = Clock::manual(1_700_000_000_000);
        let hold = Hold::default();
        assert_eq!(hold.remaining(&clock), None);
        assert_eq!(said(&hold, &clock, Some("7")), Some(Duration::from_secs(7)));
        clock.advance(Duration::from_secs(2));
        assert_eq!(hold.remaining(&clock), Some(Duration::from_secs(5)));
        clock.advance(Duration::from_secs(5));
        assert_eq!(hold.remaining(&clock), None);

        let date = http_date(clock.unix_ms(), Duration::from_secs(90));
        assert_eq!(
            said(&hold, &clock, Some(&date)),
            Some(Duration::from_secs(90))
        );
        assert_eq!(hold.remaining(&clock), Some(Duration::from_secs(90)));
        // A date in the past holds nothing back.
        clock.advance(Duration::from_secs(90));
        assert_eq!(said(&hold, &clock, Some(&date)), Some(Duration::ZERO));
        assert_eq!(hold.remaining(&clock), None);
    }

    #[test]
    fn without_retry_after_the_backoff_doubles_to_a_minute_and_resets() {
        let clock = Clock::manual(0);
        let hold = Hold::default();
        let seen: Vec<u64> = (0..8)
            .map(|_| {
                let held = said(&hold, &clock, None).unwrap();
                // A 429 to a request sent before the hold began is the same episode.
                assert_eq!(said(&hold, &clock, None), Some(held));
                clock.advance(held);
                held.as_secs()
            })
            .collect();
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 60, 60]);
        // Garbage in Retry-After counts as none.
        assert_eq!(
            said(&hold, &clock, Some("soon")),
            Some(Duration::from_secs(60))
        );
        clock.advance(Duration::from_secs(60));
        hold.observe(StatusCode::OK, &HeaderMap::new(), &clock);
        assert_eq!(said(&hold, &clock, None), Some(Duration::from_secs(1)));
    }
}
