//! The token in use: [`AccessToken`], and [`Current`], the slot every request reads without a
//! lock. A refresh publishes into it; the upstream's refusal of a generation retires that
//! generation for good; after a reload, the slot of a retired cache hands what it is given on to
//! its successor's.

use super::unix_ms;
use super::Purpose;
use crate::secret::{fingerprint, Secret};
use crate::store::TokenRecord;
use arc_swap::ArcSwapOption;
use http::HeaderValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Identity servers round `exp` down to whole seconds and the request still has to reach the
/// API: a token is put on requests until this long before its expiry at most…
const MIN_MARGIN: Duration = Duration::from_secs(1);
/// …or a twentieth of its lifetime, up to this.
const MAX_MARGIN: Duration = Duration::from_secs(10);

/// An access token ready to be put on requests.
pub struct AccessToken {
    /// `Bearer <token>` (`DPoP <token>` when bound to a DPoP key), marked sensitive.
    pub header: HeaderValue,
    /// The key the token is bound to (RFC 9449), which signs a proof for every request.
    pub dpop: Option<Arc<DpopBinding>>,
    pub generation: u64,
    /// Short fingerprint for logs.
    pub fingerprint: String,
    /// Past this instant the token is not injected any more (a margin before its expiry).
    pub usable_until: Instant,
    /// The same deadline on the wall clock: the monotonic clock stops while a machine sleeps.
    usable_until_wall: SystemTime,
    /// When the refresh-ahead task replaces it.
    pub refresh_at: Instant,
    pub expires_at: SystemTime,
}

/// A DPoP-bound token's key, and the token's hash that every proof carries (`ath`).
#[derive(Debug)]
pub struct DpopBinding {
    pub key: super::dpop::DpopKey,
    pub ath: String,
}

impl AccessToken {
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until && SystemTime::now() < self.usable_until_wall
    }

    /// The token itself, without the `Bearer ` (or `DPoP `) prefix (for `tollgate token`).
    pub fn bearer(&self) -> Secret<String> {
        let value = self.header.to_str().unwrap_or_default();
        let token = value.split_once(' ').map_or(value, |(_, token)| token);
        Secret::new(token.to_owned())
    }

    /// The same token, due for replacement now.
    fn due_now(&self) -> AccessToken {
        AccessToken {
            header: self.header.clone(),
            dpop: self.dpop.clone(),
            generation: self.generation,
            fingerprint: self.fingerprint.clone(),
            usable_until: self.usable_until,
            usable_until_wall: self.usable_until_wall,
            refresh_at: Instant::now(),
            expires_at: self.expires_at,
        }
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("generation", &self.generation)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The token of one upstream in use, read lock-free by every request.
pub(super) struct Current {
    token: ArcSwapOption<AccessToken>,
    /// The newest generation the upstream refused; it and older ones are never used again.
    refused: AtomicU64,
    /// The generation of every token published, for the refresh-ahead task.
    pub(super) published: watch::Sender<u64>,
    refresh_before: Option<Duration>,
    /// The successor's slot, after a reload that kept the lineage: what is published here
    /// later (a flight of the old settings landing) is offered there too.
    next: OnceLock<Arc<Current>>,
}

impl Current {
    pub(super) fn new(refresh_before: Option<Duration>) -> Current {
        Current {
            token: ArcSwapOption::empty(),
            refused: AtomicU64::new(0),
            published: watch::channel(0).0,
            refresh_before,
            next: OnceLock::new(),
        }
    }

    /// The slot of a successor of the same lineage: it starts from `old`'s refusals and its
    /// token, due at once, so the next one is fetched with the new settings.
    pub(super) fn continue_from(&self, old: &Current) {
        self.refused
            .fetch_max(old.refused.load(Ordering::Acquire), Ordering::AcqRel);
        if let Some(t) = old.token.load_full() {
            self.token.store(Some(Arc::new(t.due_now())));
        }
    }

    /// `next` took this slot's place for the same lineage: it learns what was refused here
    /// since it was built, takes the token in use, and is offered whatever is published here
    /// from now on.
    pub(super) fn hand_over(&self, next: &Arc<Current>) {
        let _ = self.next.set(Arc::clone(next));
        next.refused
            .fetch_max(self.refused.load(Ordering::Acquire), Ordering::AcqRel);
        if let Some(t) = self.token.load_full() {
            next.offer(&t);
        }
    }

    /// The current token, if it may still be injected. Lock-free; the hot path.
    #[inline]
    pub(super) fn cached(&self) -> Option<Arc<AccessToken>> {
        let guard = self.token.load();
        match &*guard {
            Some(t) if t.is_usable(Instant::now()) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// The upstream refused `generation`: never use it, or an older one, again.
    pub(super) fn refuse(&self, generation: u64) {
        self.refused.fetch_max(generation, Ordering::AcqRel);
        self.token.rcu(|cur| match cur {
            Some(t) if t.generation == generation => None,
            other => other.clone(),
        });
    }

    /// The newest generation the upstream refused.
    pub(super) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }

    /// The newest generation this slot must not go back to: the one in use, or a refused one.
    pub(super) fn floor(&self) -> u64 {
        self.generation().max(self.refused())
    }

    /// A token that a refresh for `purpose` may hand out instead of redeeming again.
    pub(super) fn good_enough(&self, purpose: Purpose) -> Option<Arc<AccessToken>> {
        let now = Instant::now();
        let t = self.token.load_full()?;
        let ok = t.is_usable(now)
            && match purpose {
                Purpose::Missing => true,
                Purpose::Rejected(g) => t.generation > g,
                Purpose::Ahead => now < t.refresh_at,
            };
        ok.then_some(t)
    }

    pub(super) fn generation(&self) -> u64 {
        self.token.load().as_ref().map_or(0, |t| t.generation)
    }

    /// Turn a stored record into a cache entry, placing its deadlines on the monotonic clock.
    ///
    /// It is put on requests until a margin before its expiry — a twentieth of its lifetime,
    /// at least [`MIN_MARGIN`] and at most [`MAX_MARGIN`], never more than half of it — and
    /// replaced ahead at 80% of that usable time, or `refresh_before` before expiry when that
    /// comes first (never before half the lifetime, or a long `refresh_before` would refresh
    /// short-lived tokens in a loop).
    pub(super) fn token_from(&self, record: &TokenRecord) -> Option<AccessToken> {
        let access = record.access_token.as_ref()?;
        let now_unix = unix_ms();
        let now = Instant::now();
        let lifetime =
            Duration::from_millis(record.expires_at_ms.saturating_sub(record.issued_at_ms));
        let left = Duration::from_millis(record.expires_at_ms.saturating_sub(now_unix));
        let margin = (lifetime / 20)
            .clamp(MIN_MARGIN, MAX_MARGIN)
            .min(lifetime / 2);
        let usable = left.checked_sub(margin).filter(|d| !d.is_zero())?;
        let usable_lifetime = lifetime - margin;
        let mut ahead = lifetime.mul_f64(0.8);
        if let Some(before) = self.refresh_before {
            ahead = ahead.min(lifetime.saturating_sub(before)).max(lifetime / 2);
        }
        let ahead = ahead.min(usable_lifetime.mul_f64(0.8));
        let elapsed = Duration::from_millis(now_unix.saturating_sub(record.issued_at_ms));
        let refresh_at = now + ahead.saturating_sub(elapsed);
        let dpop = match &record.dpop_key {
            Some(key) => Some(Arc::new(DpopBinding {
                key: super::dpop::DpopKey::from_stored(key).ok()?,
                ath: super::dpop::ath(access.expose()),
            })),
            None => None,
        };
        let scheme = if dpop.is_some() { "DPoP" } else { "Bearer" };
        let mut header = HeaderValue::from_str(&format!("{scheme} {}", access.expose())).ok()?;
        header.set_sensitive(true);
        Some(AccessToken {
            header,
            dpop,
            generation: record.generation,
            fingerprint: fingerprint(access.expose()),
            usable_until: now + usable,
            usable_until_wall: SystemTime::now() + usable,
            refresh_at,
            expires_at: UNIX_EPOCH + Duration::from_millis(record.expires_at_ms),
        })
    }

    /// Put `token` on requests from now on, here and in the successor of the same lineage.
    pub(super) fn publish(&self, token: AccessToken) -> Arc<AccessToken> {
        let token = Arc::new(token);
        self.token.store(Some(Arc::clone(&token)));
        self.published.send_replace(token.generation);
        if let Some(next) = self.next.get() {
            next.offer(&token);
        }
        token
    }

    /// Take over a token of the same lineage that the slot this one replaced obtained under
    /// its old settings, unless a newer one is in use; it is due at once, so the next one is
    /// fetched with the new settings.
    fn offer(&self, token: &AccessToken) {
        self.publish_if_newer(Arc::new(token.due_now()));
    }

    /// Put `token` on requests unless one of a newer (or the same) generation is in use.
    pub(super) fn publish_if_newer(&self, token: Arc<AccessToken>) {
        let mut taken = false;
        self.token.rcu(|cur| match cur {
            Some(c) if c.generation >= token.generation => cur.clone(),
            _ => {
                taken = true;
                Some(Arc::clone(&token))
            }
        });
        if taken {
            self.published.send_replace(token.generation);
        }
    }

    /// When the refresh-ahead task should look again: when the token in use is due, or now.
    pub(super) fn next_wake(&self) -> Instant {
        match self.token.load().as_ref() {
            Some(t) => t.refresh_at,
            None => Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lifetime: Duration) -> TokenRecord {
        let now = unix_ms();
        TokenRecord {
            seed_hash: "h".into(),
            dpop_key: None,
            refresh_token: None,
            access_token: Some(Secret::from("at")),
            issued_at_ms: now,
            expires_at_ms: now + lifetime.as_millis() as u64,
            generation: 1,
            login_at_ms: 0,
        }
    }

    fn within(d: Duration, from: Duration, to: Duration) -> bool {
        (from..=to).contains(&d)
    }

    /// Short tokens stop being put on requests a second before expiry (servers round `exp`
    /// down), and are replaced ahead well before that.
    #[test]
    fn a_token_stops_serving_a_margin_before_expiry_and_is_replaced_before_that() {
        let current = Current::new(None);
        let t = current.token_from(&record(Duration::from_secs(5))).unwrap();
        let now = Instant::now();
        let usable = t.usable_until - now;
        let ahead = t.refresh_at - now;
        assert!(
            within(usable, Duration::from_millis(3900), Duration::from_secs(4)),
            "{usable:?}"
        );
        assert!(
            within(
                ahead,
                Duration::from_millis(3100),
                Duration::from_millis(3200)
            ),
            "{ahead:?}"
        );

        let t = current
            .token_from(&record(Duration::from_secs(3600)))
            .unwrap();
        let usable = t.usable_until - Instant::now();
        assert!(
            within(usable, Duration::from_secs(3589), Duration::from_secs(3590)),
            "{usable:?}"
        );
        let ahead = t.refresh_at - Instant::now();
        assert!(
            within(ahead, Duration::from_secs(2871), Duration::from_secs(2872)),
            "{ahead:?}"
        );

        // Two seconds of life: half of it is usable; none at all is not a token.
        let t = current.token_from(&record(Duration::from_secs(2))).unwrap();
        assert!(t.usable_until - Instant::now() <= Duration::from_secs(1));
        assert!(current.token_from(&record(Duration::ZERO)).is_none());
    }

    /// `refresh_before` moves the refresh ahead, never before half the lifetime.
    #[test]
    fn refresh_before_comes_first_but_never_before_half_the_lifetime() {
        let current = Current::new(Some(Duration::from_secs(20 * 60)));
        let t = current
            .token_from(&record(Duration::from_secs(3600)))
            .unwrap();
        let ahead = t.refresh_at - Instant::now();
        assert!(
            within(ahead, Duration::from_secs(2399), Duration::from_secs(2400)),
            "{ahead:?}"
        );
        let t = current
            .token_from(&record(Duration::from_secs(600)))
            .unwrap();
        let ahead = t.refresh_at - Instant::now();
        assert!(
            within(ahead, Duration::from_secs(299), Duration::from_secs(300)),
            "{ahead:?}"
        );
    }
}
