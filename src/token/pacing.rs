//! When the upstream's refusal of a token (401) may be answered with a new token.
//!
//! As long as new tokens help — a replay with its new token accepted — every refusal is. Once a
//! replay was refused too, the API refuses for another reason (a scope it wants, an endpoint
//! closed to this client), and one refresh per wait is granted (1 s, doubling to 60 s with each
//! refused replay), so it cannot make tollgate redeem, and rotate the refresh token, once per
//! request; the refusals in between are passed on to the client. Requests refused with a
//! generation a refresh was already granted for share that refresh.
//!
//! Owns only that decision; the refresh itself is the flight's ([`super::flight`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The wait between refreshes for refusals once a replay was refused too, doubled with each
/// further refused replay up to the second.
const REFUSED_REPLAY_WAIT: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// The pacing state of one upstream; a reload's successor cache shares it.
#[derive(Default)]
pub(super) struct Pacing(Mutex<Rejections>);

#[derive(Default)]
struct Rejections {
    /// The newest generation a refresh was granted for: requests refused with it or an older
    /// one share that refresh.
    granted: u64,
    /// Replays in a row that the upstream refused with their new token too.
    strikes: u32,
    last_grant: Option<Instant>,
    /// The wait after `last_grant` while there are strikes.
    wait: Duration,
    /// Refusals passed on since the last refresh was granted.
    passed_on: u64,
}

impl Pacing {
    /// Whether the refusal of generation `refused` may be answered with a new token, while
    /// `current` is the cache's generation.
    pub(super) fn may_replace(&self, upstream: &str, refused: u64, current: u64) -> bool {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if refused <= r.granted || current > refused {
            return true;
        }
        let now = Instant::now();
        if let (true, Some(last)) = (r.strikes > 0, r.last_grant) {
            if now < last + r.wait {
                if r.passed_on == 0 {
                    tracing::warn!(%upstream, wait = ?(last + r.wait - now), "the upstream refused a replay with a new token; passing its refusals on until the wait is over");
                }
                r.passed_on += 1;
                return false;
            }
        }
        if r.passed_on > 0 {
            tracing::info!(%upstream, passed_on = r.passed_on, "refreshing for the upstream's refusal; that many refusals were passed on meanwhile");
        }
        r.granted = refused;
        r.last_grant = Some(now);
        r.passed_on = 0;
        true
    }

    /// What the upstream made of a replay with a new token.
    pub(super) fn replayed(&self, refused: bool) {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if refused {
            let (first, max) = REFUSED_REPLAY_WAIT;
            r.strikes += 1;
            r.wait = (r.wait * 2).clamp(first, max);
        } else if r.strikes > 0 {
            r.strikes = 0;
            r.wait = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_answered_until_a_replay_is_refused_too_then_paced() {
        let p = Pacing::default();
        assert!(p.may_replace("api", 1, 1));
        p.replayed(false);
        assert!(p.may_replace("api", 2, 2), "replays succeed: never paced");
        // A request refused with a generation a refresh was granted for shares it.
        assert!(p.may_replace("api", 2, 2));
        p.replayed(true);
        assert!(!p.may_replace("api", 3, 3), "the replay was refused: wait");
        assert!(
            p.may_replace("api", 3, 4),
            "a newer token exists: just use it"
        );
        p.replayed(false);
        assert!(
            p.may_replace("api", 3, 3),
            "a replay succeeded: the wait is over"
        );
    }
}
