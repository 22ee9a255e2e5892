//! The access token of each upstream: a lock-free cache on the hot path, one refresh in flight
//! at a time (single flight), refresh ahead of expiry, and invalidation of one generation after
//! the upstream refuses it.
//!
//! Durability rule: a refresh token that came back from the identity server is written to the
//! state store *before* the access token that came with it is published, and every redemption
//! happens under the store's refresh lock after re-reading the store, so no two processes (or
//! two refreshes) ever redeem the same refresh token.
//!
//! Token endpoint calls live in [`grant`]; this module decides when to make them.

pub mod grant;
pub mod login;

use crate::config::{Grant, UpstreamConfig};
use crate::secret::{fingerprint, sha256_hex, Secret};
use crate::store::{StateStore, StoreError, TokenRecord};
use arc_swap::ArcSwapOption;
use grant::{GrantError, Issued, TokenEndpoint};
use http::HeaderValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// The `result` label values of `tollgate_token_refreshes_total`, by index.
pub const REFRESH_RESULTS: [&str; 3] = ["ok", "error", "refused"];
const REFRESH_OK: usize = 0;
const REFRESH_ERROR: usize = 1;
const REFRESH_REFUSED: usize = 2;

/// How long a refresh waits for another process holding the store's refresh lock.
const LOCK_WAIT: Duration = Duration::from_secs(30);

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
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("generation", &self.generation)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why no token could be had. Cloned to every request that waited on the same refresh.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The identity server is failing; try again after `retry_after`.
    #[error("the identity server is unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
    /// The refresh token is dead, or there is none: a new login is needed.
    #[error("{0}")]
    NeedsLogin(String),
    /// The identity server refuses the client: the config needs fixing.
    #[error("{0}")]
    Refused(String),
    /// The state store failed; refreshing without it could lose a rotated refresh token.
    #[error("the state store failed: {0}")]
    Store(String),
}

/// What a refresh is for; decides whether a still-usable token may be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// No usable token: a request is waiting.
    Missing,
    /// The upstream refused this generation.
    Rejected(u64),
    /// The refresh-ahead task: the token is still usable but due.
    Ahead,
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

/// The result of the last refresh, shared with the requests that waited for it.
struct Flight {
    /// Bumped when a refresh ends, so waiters can tell that one ended while they waited.
    epoch: u64,
    last_error: Option<TokenError>,
    /// A final failure, with the store generation it happened on; cleared when the store holds
    /// a newer record or the process restarts with a new seed.
    final_failure: Option<(TokenError, u64)>,
    /// A record the identity server issued but the store did not accept yet. It is saved before
    /// anything else is redeemed, so a rotated refresh token is never lost to a disk hiccup.
    unsaved: Option<TokenRecord>,
    /// The identity server asked (Retry-After) not to be called before this instant.
    not_before: Option<Instant>,
    /// This process has used a record of its own lineage; a different lineage appearing in the
    /// store later means another process logged in anew, and this one must not redeem.
    lineage_used: bool,
}

/// The token cache of one upstream.
pub struct TokenCache {
    name: String,
    current: ArcSwapOption<AccessToken>,
    /// Shared with the cache this one continues after a reload (see [`TokenCache::successor`]).
    flight: Arc<tokio::sync::Mutex<Flight>>,
    /// Mirrors `Flight::epoch` for reading before the flight lock is taken.
    epoch: AtomicU64,
    /// The newest generation the upstream refused; it and older ones are never used again.
    refused: AtomicU64,
    endpoint: TokenEndpoint,
    store: Arc<dyn StateStore>,
    seed: Option<Secret<String>>,
    seed_hash: String,
    refresh_before: Option<Duration>,
    refresh_wait: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    published: watch::Sender<u64>,
    /// The last refresh failure, for readiness and status; cleared by a success.
    last_failure: Mutex<Option<String>>,
    /// Refresh attempts by result, for `/metrics`: see [`REFRESH_RESULTS`].
    refreshes: [AtomicU64; 3],
    /// Pacing of the refreshes the upstream's refusals ask for; shared with the cache this one
    /// continues after a reload.
    rejections: Arc<Mutex<Rejections>>,
}

/// When the upstream's next refusal may be answered with a new token.
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

/// The wait between refreshes for refusals once a replay was refused too, doubled with each
/// further refused replay up to the second.
const REFUSED_REPLAY_WAIT: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// Wall-clock milliseconds: stored deadlines must survive a restart, which `Instant` does not.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl TokenCache {
    pub fn new(
        upstream: &UpstreamConfig,
        store: Arc<dyn StateStore>,
        extra_roots: Option<&[u8]>,
    ) -> Result<Self, String> {
        let auth = &upstream.auth;
        let endpoint = TokenEndpoint::new(auth, extra_roots)?;
        // Only a refresh_token grant redeems the config's seed; the others log in with their
        // own credentials, which also name their lineage.
        let seed = match auth.grant {
            Grant::RefreshToken => auth.refresh_token.clone(),
            _ => None,
        };

        Ok(TokenCache {
            name: upstream.name.clone(),
            current: ArcSwapOption::empty(),
            flight: Arc::new(tokio::sync::Mutex::new(Flight {
                epoch: 0,
                last_error: None,
                final_failure: None,
                unsaved: None,
                not_before: None,
                lineage_used: false,
            })),
            epoch: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            seed_hash: lineage_hash(auth),
            seed,
            endpoint,
            store,
            refresh_before: auth.refresh_before,
            refresh_wait: auth.refresh_wait,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            published: watch::channel(0).0,
            last_failure: Mutex::new(None),
            refreshes: Default::default(),
            rejections: Arc::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cache for `upstream` after a reload changed its auth settings or CA, continuing
    /// `old`. When both serve the same lineage (grant, `client_id`, seed) they share one
    /// refresh in flight and the record the store has not accepted yet, so the two never
    /// redeem the same refresh token; the running token stays in use (no readiness flicker)
    /// and is due at once, so the next one is fetched with the new settings. A new lineage
    /// starts afresh, as at a start.
    pub fn successor(
        old: &TokenCache,
        upstream: &UpstreamConfig,
        store: Arc<dyn StateStore>,
        extra_roots: Option<&[u8]>,
    ) -> Result<Self, String> {
        let mut next = TokenCache::new(upstream, store, extra_roots)?;
        if next.seed_hash != old.seed_hash {
            return Ok(next);
        }
        next.flight = Arc::clone(&old.flight);
        next.rejections = Arc::clone(&old.rejections);
        if let Ok(mut flight) = next.flight.try_lock() {
            // A failure under the old settings (a wrong client secret, say) is tried again.
            flight.final_failure = None;
            flight.last_error = None;
        }
        next.epoch = AtomicU64::new(old.epoch.load(Ordering::Acquire));
        next.refused = AtomicU64::new(old.refused.load(Ordering::Acquire));
        if let Some(t) = old.current.load_full() {
            next.current.store(Some(Arc::new(AccessToken {
                header: t.header.clone(),
                generation: t.generation,
                fingerprint: t.fingerprint.clone(),
                usable_until: t.usable_until,
                usable_until_wall: t.usable_until_wall,
                refresh_at: Instant::now(),
                expires_at: t.expires_at,
            })));
        }
        Ok(next)
    }

    /// Refresh attempts so far, by result: `ok`, `error` (will be retried), `refused` (the
    /// identity server refused the grant or the client).
    pub fn refreshes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REFRESH_RESULTS
            .iter()
            .zip(&self.refreshes)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
    }

    fn count_refresh(&self, result: usize) {
        self.refreshes[result].fetch_add(1, Ordering::Relaxed);
    }

    /// Why there is no usable token, or `None` when there is one.
    pub fn unready_reason(&self) -> Option<String> {
        if self.cached().is_some() {
            return None;
        }
        let failure = self
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
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

    /// A usable token: the cached one, or the result of a refresh.
    pub async fn get(&self) -> Result<Arc<AccessToken>, TokenError> {
        match self.cached() {
            Some(t) => Ok(t),
            None => self.refresh(Purpose::Missing).await,
        }
    }

    /// Whether the upstream's refusal of `token` may be answered with a new token. Yes, as
    /// long as new tokens help: a replay with its new token accepted. Once a replay was
    /// refused too, the API refuses for another reason (a scope it wants, an endpoint closed
    /// to this client), and one refresh per wait (1 s, doubling to 60 s with each refused
    /// replay) is granted, so it cannot make tollgate redeem, and rotate the refresh token,
    /// once per request; the refusals in between are passed on to the client. Requests
    /// refused with a generation a refresh was already granted for share that refresh.
    pub fn may_replace(&self, token: &AccessToken) -> bool {
        let mut r = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        if token.generation <= r.granted || self.generation() > token.generation {
            return true;
        }
        let now = Instant::now();
        if let (true, Some(last)) = (r.strikes > 0, r.last_grant) {
            if now < last + r.wait {
                if r.passed_on == 0 {
                    tracing::warn!(upstream = %self.name, wait = ?(last + r.wait - now), "the upstream refused a replay with a new token; passing its refusals on until the wait is over");
                }
                r.passed_on += 1;
                return false;
            }
        }
        if r.passed_on > 0 {
            tracing::info!(upstream = %self.name, passed_on = r.passed_on, "refreshing for the upstream's refusal; that many refusals were passed on meanwhile");
        }
        r.granted = token.generation;
        r.last_grant = Some(now);
        r.passed_on = 0;
        true
    }

    /// What the upstream made of a replay with a new token (see [`TokenCache::may_replace`]).
    pub fn replayed(&self, refused: bool) {
        let mut r = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        if refused {
            let (first, max) = REFUSED_REPLAY_WAIT;
            r.strikes += 1;
            r.wait = (r.wait * 2).clamp(first, max);
        } else if r.strikes > 0 {
            r.strikes = 0;
            r.wait = Duration::ZERO;
        }
    }

    /// The upstream refused `generation`: drop it and get a newer one. A request that carried an
    /// older generation than the current one simply gets the current one.
    pub async fn replace_rejected(&self, generation: u64) -> Result<Arc<AccessToken>, TokenError> {
        self.refused.fetch_max(generation, Ordering::AcqRel);
        self.current.rcu(|cur| match cur {
            Some(t) if t.generation == generation => None,
            other => other.clone(),
        });
        self.refresh(Purpose::Rejected(generation)).await
    }

    /// A token that this refresh may hand out instead of redeeming again.
    fn good_enough(&self, purpose: Purpose) -> Option<Arc<AccessToken>> {
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

    async fn refresh(&self, purpose: Purpose) -> Result<Arc<AccessToken>, TokenError> {
        let seen_epoch = self.epoch.load(Ordering::Acquire);
        let mut flight = self.flight.lock().await;
        if let Some(t) = self.good_enough(purpose) {
            return Ok(t);
        }
        // A refresh ended while this one waited for the lock: share its failure instead of
        // hammering a failing identity server once per waiting request.
        if flight.epoch != seen_epoch {
            if let Some(e) = &flight.last_error {
                return Err(e.clone());
            }
        }
        let result = self.refresh_locked(&mut flight, purpose).await;
        flight.epoch += 1;
        self.epoch.store(flight.epoch, Ordering::Release);
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) =
            result.as_ref().err().map(|e| e.to_string());
        flight.last_error = result.as_ref().err().cloned();
        result
    }

    /// Redeem with retries, under the flight lock.
    async fn refresh_locked(
        &self,
        flight: &mut Flight,
        purpose: Purpose,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let deadline = Instant::now() + self.refresh_wait;
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        loop {
            if let Some(not_before) = flight.not_before.filter(|t| *t > Instant::now()) {
                let keep_current = purpose == Purpose::Ahead && self.cached().is_some();
                if keep_current || not_before > deadline {
                    return Err(TokenError::Unavailable {
                        reason: "the identity server asked to wait (Retry-After)".into(),
                        retry_after: whole_seconds(not_before - Instant::now()),
                    });
                }
                tokio::time::sleep_until(not_before.into()).await;
            }
            let lock_wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_secs(1), LOCK_WAIT);
            let error = match self.redeem(flight, purpose, lock_wait).await {
                Ok(t) => {
                    self.count_refresh(REFRESH_OK);
                    return Ok(t);
                }
                Err(e) => e,
            };
            self.count_refresh(match &error {
                Attempt::Final(TokenError::NeedsLogin(_) | TokenError::Refused(_)) => {
                    REFRESH_REFUSED
                }
                _ => REFRESH_ERROR,
            });
            let (reason, hint) = match &error {
                Attempt::Final(e) => return Err(e.clone()),
                Attempt::Retry { reason, hint } => (reason.clone(), *hint),
            };
            if let Some(wait) = hint {
                flight.not_before = Some(Instant::now() + wait);
            }
            let delay = backoff.next_delay().max(hint.unwrap_or_default());
            let retry_after = whole_seconds(delay);
            // A still-usable token keeps serving; the refresh-ahead task tries again later.
            let keep_current = purpose == Purpose::Ahead && self.cached().is_some();
            if keep_current || Instant::now() + delay > deadline {
                tracing::warn!(upstream = %self.name, %reason, "token refresh failed");
                return Err(TokenError::Unavailable {
                    reason,
                    retry_after,
                });
            }
            tracing::info!(upstream = %self.name, %reason, retry_in = ?delay, "token refresh failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt: take the store lock, adopt a newer record if another process made one,
    /// else redeem, save durably, then publish.
    async fn redeem(
        &self,
        flight: &mut Flight,
        purpose: Purpose,
        lock_wait: Duration,
    ) -> Result<Arc<AccessToken>, Attempt> {
        let lock = self
            .store
            .lock_refresh(&self.name, lock_wait)
            .await
            .map_err(Attempt::store)?;
        let mut stored = self
            .store
            .load_token(&self.name)
            .await
            .map_err(Attempt::store)?;
        if let Some(record) = flight.unsaved.take() {
            // Save it only if the store has not moved past it meanwhile (another process could
            // have redeemed it and saved a newer one, which must not be overwritten).
            let newer_exists = stored.as_ref().is_some_and(|s| {
                s.seed_hash == record.seed_hash && s.generation >= record.generation
            });
            if !newer_exists {
                if let Err(e) = self.store.save_token(&self.name, &record, &lock).await {
                    flight.unsaved = Some(record);
                    return Err(Attempt::store(e));
                }
                tracing::info!(upstream = %self.name, "saved the token record that an earlier store failure held back");
                stored = Some(record);
            }
        }
        if let Some(foreign) = stored.as_ref().filter(|r| r.seed_hash != self.seed_hash) {
            if flight.lineage_used {
                let e = TokenError::NeedsLogin(format!(
                    "the state store now holds a newer login for upstream `{}` (a new seed in another process's config); restart this tollgate to use it",
                    self.name
                ));
                tracing::error!(upstream = %self.name, generation = foreign.generation, "{e}");
                flight.final_failure = Some((e.clone(), 0));
                return Err(Attempt::Final(e));
            }
        }
        let stored = stored.filter(|r| r.seed_hash == self.seed_hash);
        let stored_generation = stored.as_ref().map_or(0, |r| r.generation);

        if let Some((error, generation)) = &flight.final_failure {
            if stored_generation <= *generation {
                return Err(Attempt::Final(error.clone()));
            }
            flight.final_failure = None;
        }
        if let Some(record) = &stored {
            if let Some(token) = self.adoptable(record, purpose) {
                tracing::info!(upstream = %self.name, generation = token.generation, token = %token.fingerprint, "using the token another process refreshed");
                flight.lineage_used = true;
                return Ok(self.publish(token));
            }
        }

        let refresh_token = stored
            .as_ref()
            .and_then(|r| r.refresh_token.clone())
            .or_else(|| self.seed.clone());
        if self.endpoint.grant() == Grant::RefreshToken && refresh_token.is_none() {
            let e = TokenError::NeedsLogin(format!(
                "upstream `{0}` has no refresh token: run `tollgate login {0}` (with [upstream.login] configured), or set auth.refresh_token and restart",
                self.name
            ));
            flight.final_failure = Some((e.clone(), stored_generation));
            return Err(Attempt::Final(e));
        }

        let issued = match self.endpoint.obtain(refresh_token.as_ref()).await {
            Ok(issued) => issued,
            Err(e) => return Err(self.classify(e, flight, stored_generation)),
        };
        let record = new_record(
            &self.seed_hash,
            issued,
            refresh_token,
            stored_generation.max(self.generation()),
        );
        if let Err(e) = self.store.save_token(&self.name, &record, &lock).await {
            // The identity server may have rotated the refresh token: keep the new one in
            // memory and save it before any further redemption.
            flight.unsaved = Some(record);
            return Err(Attempt::store(e));
        }
        drop(lock);
        flight.lineage_used = true;
        let token = self.token_from(&record).ok_or_else(|| Attempt::Retry {
            reason: "the identity server issued a token that expires at once".into(),
            hint: None,
        })?;
        tracing::info!(upstream = %self.name, generation = token.generation, token = %token.fingerprint, "token refreshed");
        Ok(self.publish(token))
    }

    fn classify(&self, e: GrantError, flight: &mut Flight, generation: u64) -> Attempt {
        match e {
            GrantError::InvalidGrant { .. } => {
                let error = TokenError::NeedsLogin(match self.endpoint.grant() {
                    Grant::Password => format!(
                        "the identity server refused the username and password of upstream `{}` ({e}); fix auth.username and auth.password, then restart",
                        self.name
                    ),
                    Grant::WinbooksExchange => format!(
                        "the identity server refused the exchange token of upstream `{}` ({e}); create a new exchange token in WinBooks on Web, set auth.exchange_token, then restart",
                        self.name
                    ),
                    _ => format!(
                        "the identity server no longer accepts the refresh token of upstream `{0}` ({e}); run `tollgate login {0}` (a running tollgate picks the new token up), or set a new auth.refresh_token and restart",
                        self.name
                    ),
                });
                tracing::error!(upstream = %self.name, "{error}");
                flight.final_failure = Some((error.clone(), generation));
                Attempt::Final(error)
            }
            GrantError::Refused { .. } => {
                let error = TokenError::Refused(format!(
                    "the identity server refused the client of upstream `{}` ({e}); check client_id, client_secret, client_auth and scope",
                    self.name
                ));
                tracing::error!(upstream = %self.name, "{error}");
                flight.final_failure = Some((error.clone(), generation));
                Attempt::Final(error)
            }
            GrantError::Transient {
                reason,
                retry_after,
            } => Attempt::Retry {
                reason,
                hint: retry_after,
            },
        }
    }

    /// The stored record's token, if another process made it after the one this refresh must
    /// replace (so redeeming again would waste, or with strict rotation break, the lineage).
    fn adoptable(&self, record: &TokenRecord, purpose: Purpose) -> Option<AccessToken> {
        let floor = match purpose {
            Purpose::Missing => 0,
            Purpose::Rejected(g) => g,
            Purpose::Ahead => self.generation(),
        };
        if record.generation <= floor.max(self.refused.load(Ordering::Acquire)) {
            return None;
        }
        let token = self.token_from(record)?;
        let now = Instant::now();
        (token.is_usable(now) && now < token.refresh_at).then_some(token)
    }

    fn generation(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |t| t.generation)
    }

    /// Turn a stored record into a cache entry, placing its deadlines on the monotonic clock.
    fn token_from(&self, record: &TokenRecord) -> Option<AccessToken> {
        let access = record.access_token.as_ref()?;
        let now_unix = unix_ms();
        let now = Instant::now();
        let lifetime =
            Duration::from_millis(record.expires_at_ms.saturating_sub(record.issued_at_ms));
        let left = Duration::from_millis(record.expires_at_ms.saturating_sub(now_unix));
        // Stop injecting a little before expiry: the request still has to reach the API.
        let margin = (lifetime / 20).min(Duration::from_secs(10));
        let usable = left.checked_sub(margin)?;
        let usable_until = now + usable;
        let elapsed = Duration::from_millis(now_unix.saturating_sub(record.issued_at_ms));
        let mut ahead = lifetime.mul_f64(0.8);
        if let Some(before) = self.refresh_before {
            // Never earlier than half the lifetime, or a long refresh_before would refresh
            // short-lived tokens in a loop.
            ahead = ahead.min(lifetime.saturating_sub(before)).max(lifetime / 2);
        }
        let refresh_at = now + ahead.saturating_sub(elapsed);
        let mut header = HeaderValue::from_str(&format!("Bearer {}", access.expose())).ok()?;
        header.set_sensitive(true);
        Some(AccessToken {
            header,
            generation: record.generation,
            fingerprint: fingerprint(access.expose()),
            usable_until,
            usable_until_wall: SystemTime::now() + usable,
            refresh_at,
            expires_at: UNIX_EPOCH + Duration::from_millis(record.expires_at_ms),
        })
    }

    fn publish(&self, token: AccessToken) -> Arc<AccessToken> {
        let token = Arc::new(token);
        self.current.store(Some(Arc::clone(&token)));
        self.published.send_replace(token.generation);
        token
    }

    /// Refresh ahead of expiry until `shutdown` resolves. Fetches the first token at once, so
    /// the first request does not wait for it.
    pub async fn refresh_ahead(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut published = self.published.subscribe();
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        let mut wake_at = Instant::now();
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep_until(wake_at.into()) => {}
                _ = published.changed() => {
                    wake_at = self.next_wake();
                    continue;
                }
            }
            let purpose = if self.cached().is_some() {
                Purpose::Ahead
            } else {
                Purpose::Missing
            };
            match self.refresh(purpose).await {
                Ok(_) => {
                    backoff.reset();
                    wake_at = self.next_wake();
                }
                Err(TokenError::NeedsLogin(_) | TokenError::Refused(_)) => {
                    // Final until the store changes; look again now and then for a login.
                    wake_at = Instant::now() + Duration::from_secs(30);
                }
                Err(TokenError::Unavailable { .. } | TokenError::Store(_)) => {
                    wake_at = Instant::now() + backoff.next_delay();
                }
            }
        }
    }

    fn next_wake(&self) -> Instant {
        match self.current.load().as_ref() {
            Some(t) => t.refresh_at,
            None => Instant::now(),
        }
    }
}

/// The outcome of one redemption attempt that did not produce a token.
enum Attempt {
    Final(TokenError),
    Retry {
        reason: String,
        hint: Option<Duration>,
    },
}

impl Attempt {
    fn store(e: StoreError) -> Attempt {
        match e {
            StoreError::LockTimeout { .. } => Attempt::Retry {
                reason: e.to_string(),
                hint: None,
            },
            other => Attempt::Final(TokenError::Store(other.to_string())),
        }
    }
}

/// The record to store after the identity server issued `issued` in exchange for `redeemed`.
pub(crate) fn new_record(
    seed_hash: &str,
    issued: Issued,
    redeemed: Option<Secret<String>>,
    previous_generation: u64,
) -> TokenRecord {
    let now = unix_ms();
    TokenRecord {
        seed_hash: seed_hash.to_owned(),
        // Keep whatever came back; a server that does not rotate sends none. After a new
        // login the redeemed token was refused, so it is not kept.
        refresh_token: if issued.logged_in {
            issued.refresh_token
        } else {
            issued.refresh_token.or(redeemed)
        },
        access_token: Some(issued.access_token),
        issued_at_ms: now,
        expires_at_ms: now + issued.expires_in.as_millis() as u64,
        generation: previous_generation + 1,
    }
}

/// A duration as a `Retry-After` value: whole seconds, at least 1.
fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64)
}

/// Identifies a token lineage's origin: a new seed in the config (or new credentials for the
/// grants that log in by themselves) starts a new lineage, which wins over the stored one.
pub fn lineage_hash(auth: &crate::config::AuthConfig) -> String {
    let origin = match auth.grant {
        Grant::RefreshToken => auth.refresh_token.as_ref().map(|s| s.expose().as_str()),
        Grant::WinbooksExchange => auth.exchange_token.as_ref().map(|s| s.expose().as_str()),
        Grant::Password => auth.username.as_deref(),
        Grant::ClientCredentials => None,
    };
    let origin = origin.unwrap_or("");
    sha256_hex(&format!(
        "{}\n{}\n{origin}",
        auth.grant.as_str(),
        auth.client_id
    ))
}
