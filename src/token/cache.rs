//! [`TokenCache`]: the access token of one upstream, read lock-free by every request; the
//! refresh-ahead task that replaces it before it is due; invalidation of a generation the
//! upstream refused; and readiness.
//!
//! It never redeems anything itself: every refresh is a flight ([`super::flight`]).

use super::backoff::Retry;
use super::flight::{Flight, Lineage};
use super::grant::TokenEndpoint;
use super::pacing::Pacing;
use super::{lineage_hash, unix_ms, Purpose, TokenError};
use crate::config::{Grant, UpstreamConfig};
use crate::secret::{fingerprint, Secret};
use crate::store::{StateStore, TokenRecord};
use arc_swap::ArcSwapOption;
use http::HeaderValue;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;
use tokio::sync::watch;

/// The `result` label values of `tollgate_token_refreshes_total`, by index.
pub const REFRESH_RESULTS: [&str; 3] = ["ok", "error", "refused"];

/// A `std` mutex, through a panic elsewhere (the data it guards stays consistent).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one refresh attempt came to, by its index in [`REFRESH_RESULTS`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Counted {
    Ok = 0,
    /// Will be retried.
    Error = 1,
    /// The identity server refused the grant or the client.
    Refused = 2,
}

/// Identity servers round `exp` down to whole seconds and the request still has to reach the
/// API: a token is put on requests until this long before its expiry at most…
const MIN_MARGIN: Duration = Duration::from_secs(1);
/// …or a twentieth of its lifetime, up to this.
const MAX_MARGIN: Duration = Duration::from_secs(10);

/// An access token ready to be put on requests.
pub struct AccessToken {
    /// `Bearer <token>`, marked sensitive.
    pub header: HeaderValue,
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

impl AccessToken {
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until && SystemTime::now() < self.usable_until_wall
    }

    /// The token itself, without the `Bearer ` prefix (for `tollgate token`).
    pub fn bearer(&self) -> Secret<String> {
        let value = self.header.to_str().unwrap_or_default();
        Secret::new(value.strip_prefix("Bearer ").unwrap_or(value).to_owned())
    }

    /// The same token, due for replacement now.
    fn due_now(&self) -> AccessToken {
        AccessToken {
            header: self.header.clone(),
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

/// The token cache of one upstream.
pub struct TokenCache {
    pub(super) name: String,
    pub(super) current: ArcSwapOption<AccessToken>,
    /// The newest generation the upstream refused; it and older ones are never used again.
    pub(super) refused: AtomicU64,
    pub(super) endpoint: TokenEndpoint,
    pub(super) store: Arc<dyn StateStore>,
    pub(super) seed: Option<Secret<String>>,
    pub(super) seed_hash: String,
    refresh_before: Option<Duration>,
    pub(super) refresh_wait: Duration,
    /// How long one token request may take (`auth.timeout`).
    pub(super) request_timeout: Duration,
    pub(super) published: watch::Sender<u64>,
    /// The last refresh failure, for readiness and status; cleared by a success.
    pub(super) last_failure: Mutex<Option<String>>,
    /// Why a record the identity server issued is not saved yet (see [`super::flight`]).
    pub(super) unsaved: Mutex<Option<String>>,
    /// The newest record of this lineage the cache has saved or read: written back when the
    /// store turns out to have lost it (a Redis flushed or failed over to a stale replica).
    pub(super) known: Mutex<Option<TokenRecord>>,
    /// Refresh attempts by result, for `/metrics`: see [`REFRESH_RESULTS`]. Shared with the
    /// cache this one continues after a reload, so the counters never go back.
    refreshes: Arc<[AtomicU64; 3]>,
    /// Shared with the cache this one continues after a reload.
    pacing: Arc<Pacing>,
    /// The refresh in the air, if any.
    pub(super) flight: Mutex<Flight>,
    /// What one flight leaves the next; only the flight in the air holds it.
    pub(super) lineage: tokio::sync::Mutex<Lineage>,
    /// When the identity server may be called next. Its own `Retry-After` is carried over a
    /// reload that keeps `token_url`; the backoff is not (new settings are tried at once).
    pub(super) retry: Mutex<Retry>,
    /// Until when the redemption in the air, if any, may still be answered: a shutdown waits
    /// for it (see [`TokenCache::settle`]).
    pub(super) in_the_air: Mutex<Option<Instant>>,
    /// Set by [`TokenCache::settle`]: the process is stopping, nothing new is sent.
    pub(super) stopping: watch::Sender<bool>,
    /// This cache has served a record of its own lineage; a different lineage appearing in the
    /// store later means another process logged in anew, and this one must not redeem.
    pub(super) lineage_used: AtomicBool,
    /// Where flights run: the runtime the cache was built on, which outlives every request.
    runtime: Option<Handle>,
    /// Set by [`TokenCache::retire`]. The chain only points forward, so it holds no cycle.
    next: OnceLock<Arc<TokenCache>>,
    /// Turns true at [`TokenCache::retire`]; wakes a flight waiting to retry, so the successor's
    /// settings take over at once.
    pub(super) retired: watch::Sender<bool>,
}

impl TokenCache {
    pub fn new(
        upstream: &UpstreamConfig,
        store: Arc<dyn StateStore>,
        extra_roots: Option<&[u8]>,
    ) -> Result<Self, String> {
        let auth = &upstream.auth;
        let endpoint = TokenEndpoint::new(upstream, extra_roots)?;
        store.lock_life(auth.timeout + super::LOCK_MARGIN);
        // Only a refresh_token grant redeems the config's seed; the others log in with their
        // own credentials, which also name their lineage.
        let seed = match auth.grant {
            Grant::RefreshToken => auth.refresh_token.clone(),
            _ => None,
        };

        Ok(TokenCache {
            name: upstream.name.clone(),
            current: ArcSwapOption::empty(),
            refused: AtomicU64::new(0),
            seed_hash: lineage_hash(auth),
            seed,
            endpoint,
            store,
            refresh_before: auth.refresh_before,
            refresh_wait: auth.refresh_wait,
            request_timeout: auth.timeout,
            published: watch::channel(0).0,
            last_failure: Mutex::new(None),
            unsaved: Mutex::new(None),
            known: Mutex::new(None),
            refreshes: Default::default(),
            pacing: Arc::default(),
            flight: Mutex::new(Flight::Idle),
            lineage: tokio::sync::Mutex::new(Lineage::default()),
            retry: Mutex::default(),
            in_the_air: Mutex::new(None),
            stopping: watch::channel(false).0,
            lineage_used: AtomicBool::new(false),
            runtime: Handle::try_current().ok(),
            next: OnceLock::new(),
            retired: watch::channel(false).0,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cache for `upstream` after a reload changed its auth settings or CA, continuing
    /// `old`, whose refresh counters it carries on. For the same lineage (grant, `client_id`,
    /// seed) the running token stays in use (no readiness flicker) and is due at once, so the
    /// next one is fetched with the new settings, and the 401 pacing carries over. Its flight
    /// is its own: no failure of the old settings is inherited. A new lineage starts afresh.
    pub fn successor(
        old: &TokenCache,
        upstream: &UpstreamConfig,
        store: Arc<dyn StateStore>,
        extra_roots: Option<&[u8]>,
    ) -> Result<Self, String> {
        let mut next = TokenCache::new(upstream, store, extra_roots)?;
        next.refreshes = Arc::clone(&old.refreshes);
        if next.endpoint.url() == old.endpoint.url() {
            // The same identity server: it asked to wait, whatever else changed.
            lock(&next.retry).asked = lock(&old.retry).asked;
        }
        if next.seed_hash != old.seed_hash {
            return Ok(next);
        }
        next.pacing = Arc::clone(&old.pacing);
        next.refused = AtomicU64::new(old.refused.load(Ordering::Acquire));
        next.lineage_used = AtomicBool::new(old.lineage_used.load(Ordering::Acquire));
        if let Some(t) = old.current.load_full() {
            next.current.store(Some(Arc::new(t.due_now())));
        }
        Ok(next)
    }

    /// A reload put `next` in this cache's place: requests still holding this cache get their
    /// new tokens from `next`; no refresh starts here any more, and one waiting to retry gives
    /// up at once; one holding the store lock lands and saves, and hands its token to `next`
    /// when both serve the same lineage.
    pub fn retire(&self, next: &Arc<TokenCache>) {
        let _ = self.next.set(Arc::clone(next));
        self.retired.send_replace(true);
        if next.seed_hash != self.seed_hash {
            return;
        }
        // What happened since `next` was built from this cache.
        next.refused
            .fetch_max(self.refused.load(Ordering::Acquire), Ordering::AcqRel);
        if self.lineage_used.load(Ordering::Acquire) {
            next.lineage_used.store(true, Ordering::Release);
        }
        if let Some(t) = self.current.load_full() {
            next.offer(&t);
        }
    }

    /// The cache that replaced this one.
    pub(super) fn replaced_by(&self) -> Option<&Arc<TokenCache>> {
        self.next.get()
    }

    /// Refresh attempts so far, by result: `ok`, `error` (will be retried), `refused` (the
    /// identity server refused the grant or the client).
    pub fn refreshes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REFRESH_RESULTS
            .iter()
            .zip(self.refreshes.iter())
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
    }

    pub(super) fn count_refresh(&self, counted: Counted) {
        self.refreshes[counted as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Why the upstream is not ready, or `None` when it is: a usable token, and every record
    /// the identity server issued saved.
    pub fn unready_reason(&self) -> Option<String> {
        let unsaved = lock(&self.unsaved);
        if let Some(reason) = unsaved.as_ref() {
            return Some(reason.clone());
        }
        drop(unsaved);
        if self.cached().is_some() {
            return None;
        }
        let failure = lock(&self.last_failure).clone();
        Some(failure.unwrap_or_else(|| "no token yet".to_owned()))
    }

    /// The current token, if it may still be injected. Lock-free; the hot path.
    #[inline]
    pub fn cached(&self) -> Option<Arc<AccessToken>> {
        let guard = self.current.load();
        match &*guard {
            Some(t) if t.is_usable(Instant::now()) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// A usable token for a client request: the cached one, or the result of a refresh,
    /// waited for `auth.refresh_wait` at most.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<AccessToken>, TokenError> {
        self.get_within(self.refresh_wait).await
    }

    /// A usable token: the cached one, or the result of a refresh, waited for `patience` at
    /// most (`tollgate token` waits as long as a token request can take).
    pub async fn get_within(
        self: &Arc<Self>,
        patience: Duration,
    ) -> Result<Arc<AccessToken>, TokenError> {
        match self.cached() {
            Some(t) => Ok(t),
            None => {
                let until = Instant::now() + patience;
                self.refresh(Purpose::Missing, Some(until)).await
            }
        }
    }

    /// The longest one token request may take (connecting, the answer's ceiling).
    pub fn longest_request(&self) -> Duration {
        self.endpoint.longest_request()
    }

    /// Whether the upstream's refusal of `token` may be answered with a new token (see
    /// [`super::pacing`]).
    pub fn may_replace(&self, token: &AccessToken) -> bool {
        self.pacing
            .may_replace(&self.name, token.generation, self.generation())
    }

    /// What the upstream made of a replay with a new token (see [`TokenCache::may_replace`]).
    pub fn replayed(&self, refused: bool) {
        self.pacing.replayed(refused);
    }

    /// The upstream refused `generation`: drop it and get a newer one. A request that carried an
    /// older generation than the current one simply gets the current one.
    pub async fn replace_rejected(
        self: &Arc<Self>,
        generation: u64,
    ) -> Result<Arc<AccessToken>, TokenError> {
        self.refused.fetch_max(generation, Ordering::AcqRel);
        self.current.rcu(|cur| match cur {
            Some(t) if t.generation == generation => None,
            other => other.clone(),
        });
        if let Some(next) = self.replaced_by() {
            return Box::pin(next.replace_rejected(generation)).await;
        }
        let until = Instant::now() + self.refresh_wait;
        self.refresh(Purpose::Rejected(generation), Some(until))
            .await
    }

    /// A token that a refresh for `purpose` may hand out instead of redeeming again.
    pub(super) fn good_enough(&self, purpose: Purpose) -> Option<Arc<AccessToken>> {
        let now = Instant::now();
        let t = self.current.load_full()?;
        let ok = t.is_usable(now)
            && match purpose {
                Purpose::Missing => true,
                Purpose::Rejected(g) => t.generation > g,
                Purpose::Ahead => now < t.refresh_at,
            };
        ok.then_some(t)
    }

    pub(super) fn generation(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |t| t.generation)
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
        let mut header = HeaderValue::from_str(&format!("Bearer {}", access.expose())).ok()?;
        header.set_sensitive(true);
        Some(AccessToken {
            header,
            generation: record.generation,
            fingerprint: fingerprint(access.expose()),
            usable_until: now + usable,
            usable_until_wall: SystemTime::now() + usable,
            refresh_at,
            expires_at: UNIX_EPOCH + Duration::from_millis(record.expires_at_ms),
        })
    }

    /// Put `token` on requests from now on, here and, for the same lineage, in the cache that
    /// replaced this one.
    pub(super) fn publish(&self, token: AccessToken) -> Arc<AccessToken> {
        let token = Arc::new(token);
        self.current.store(Some(Arc::clone(&token)));
        self.published.send_replace(token.generation);
        if let Some(next) = self.replaced_by().filter(|n| n.seed_hash == self.seed_hash) {
            next.offer(&token);
        }
        token
    }

    /// Take over a token of the same lineage that the cache this one replaced obtained under
    /// its old settings, unless a newer one is in use; it is due at once, so the next one is
    /// fetched with the new settings.
    fn offer(&self, token: &AccessToken) {
        self.publish_if_newer(Arc::new(token.due_now()));
    }

    /// Put `token` on requests unless one of a newer (or the same) generation is in use.
    pub(super) fn publish_if_newer(&self, token: Arc<AccessToken>) {
        let mut taken = false;
        self.current.rcu(|cur| match cur {
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

    /// Wait until `until`; false when the cache was retired first (see [`TokenCache::retire`])
    /// or the process began to stop ([`TokenCache::settle`]).
    pub(super) async fn pause_until(&self, until: Instant) -> bool {
        let mut retired = self.retired.subscribe();
        let mut stopping = self.stopping.subscribe();
        if *retired.borrow_and_update() || *stopping.borrow_and_update() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => true,
            _ = retired.changed() => false,
            _ = stopping.changed() => false,
        }
    }

    /// Spawn a flight on the cache's runtime (the caller's when it was built outside one).
    pub(super) fn spawn(&self, flight: impl std::future::Future<Output = ()> + Send + 'static) {
        match &self.runtime {
            Some(runtime) => drop(runtime.spawn(flight)),
            None => drop(tokio::spawn(flight)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::FileStore;

    fn cache(extra_auth: &str) -> (TokenCache, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "[state]\nstore = \"file:{}\"\n[[upstream]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nurl = \"http://127.0.0.1:9/\"\n[upstream.auth]\ngrant = \"client_credentials\"\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{extra_auth}\n",
            tmp.path().display()
        );
        let config = Config::parse(&text, "t.toml", |_| None).unwrap();
        let store = Arc::new(FileStore::open(tmp.path()).unwrap());
        (
            TokenCache::new(&config.upstreams[0], store, None).unwrap(),
            tmp,
        )
    }

    fn record(lifetime: Duration) -> TokenRecord {
        let now = unix_ms();
        TokenRecord {
            seed_hash: "h".into(),
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
        let (cache, _tmp) = cache("");
        let t = cache.token_from(&record(Duration::from_secs(5))).unwrap();
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

        let t = cache
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
        let t = cache.token_from(&record(Duration::from_secs(2))).unwrap();
        assert!(t.usable_until - Instant::now() <= Duration::from_secs(1));
        assert!(cache.token_from(&record(Duration::ZERO)).is_none());
    }

    /// `refresh_before` moves the refresh ahead, never before half the lifetime.
    #[test]
    fn refresh_before_comes_first_but_never_before_half_the_lifetime() {
        let (cache, _tmp) = cache("refresh_before = \"20m\"");
        let t = cache
            .token_from(&record(Duration::from_secs(3600)))
            .unwrap();
        let ahead = t.refresh_at - Instant::now();
        assert!(
            within(ahead, Duration::from_secs(2399), Duration::from_secs(2400)),
            "{ahead:?}"
        );
        let t = cache.token_from(&record(Duration::from_secs(600))).unwrap();
        let ahead = t.refresh_at - Instant::now();
        assert!(
            within(ahead, Duration::from_secs(299), Duration::from_secs(300)),
            "{ahead:?}"
        );
    }

    /// A flight whose task is dropped before it ever runs (its runtime is gone) still leaves
    /// the cache idle: requests get an error instead of waiting forever, and `settle` ends.
    #[test]
    fn a_flight_dropped_before_it_runs_leaves_the_cache_idle() {
        let built = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (cache, _tmp) = built.block_on(async { cache("") });
        let cache = Arc::new(cache);
        drop(built);
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        other.block_on(async {
            for _ in 0..2 {
                let waited = tokio::time::timeout(Duration::from_secs(5), cache.get()).await;
                assert!(waited.expect("answered, not stuck").is_err());
            }
            let settled =
                tokio::time::timeout(Duration::from_secs(5), cache.settle(Duration::from_secs(1)));
            assert!(settled.await.expect("settle ends"));
        });
    }
}
