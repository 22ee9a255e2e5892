//! One refresh at a time per token cache, run by a task the cache owns: the *flight*.
//!
//! ```text
//! Idle ──(a request, or the refresh-ahead task, needs a token)──► Busy: a task is spawned
//! Busy:  lock the store ─► read it ─► adopt a newer record, or redeem ─► save ─► unlock
//!        ─► publish ─► Idle, and every waiter gets the result
//! Busy, the save failed: publish and answer the waiters at once, keep the lock, retry the
//!        save with backoff ─► Idle once saved
//! ```
//!
//! Requests wait for a flight's [`Progress`], never for its task: one that goes away drops its
//! receiver and nothing else. A request that arrives while a flight is in the air joins it;
//! one that needs more than the flight brought (a newer generation than it adopted) starts the
//! next. A failing flight retries with backoff until `auth.refresh_wait` is over, holding no
//! lock between attempts.
//!
//! Must not: redeem without the store's refresh lock, hold a `std` mutex across an `.await`, or
//! release the lock of a record the store has not taken.

use super::backoff::Backoff;
use super::cache::{AccessToken, Counted, TokenCache};
use super::grant::GrantError;
use super::{new_record, whole_seconds, Purpose, TokenError};
use crate::config::Grant;
use crate::store::{RefreshLock, StoreError, TokenRecord};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a refresh waits for another process holding the store's refresh lock.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// The longest pause between retries of a save the store refused.
const SAVE_RETRY_MAX: Duration = Duration::from_secs(10);

/// The state of a cache's refresh.
pub(super) enum Flight {
    /// No refresh is in the air.
    Idle,
    /// A task is refreshing; it reports on the channel. With a result already sent, the task is
    /// still saving the record it obtained (see [`TokenCache::unready_reason`]).
    Busy(watch::Receiver<Progress>),
}

/// What the requests waiting for a flight see of it.
#[derive(Clone)]
pub(super) enum Progress {
    Running,
    Done(Result<Arc<AccessToken>, TokenError>),
}

/// What one flight leaves the next; held by the flight in the air only.
#[derive(Default)]
pub(super) struct Lineage {
    /// A final failure, with the store generation it happened on; cleared when the store holds
    /// a newer record (a login) or the process restarts with a new seed.
    final_failure: Option<(TokenError, u64)>,
    /// The identity server asked (Retry-After) not to be called before this instant.
    not_before: Option<Instant>,
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

/// Makes the flight idle when its task ends, however it ends (a panic, a runtime shutting
/// down): otherwise the cache would wait for a flight that never lands.
struct Landing<'a> {
    cache: &'a TokenCache,
    /// Identifies this flight's channel, so a later flight is never landed by mistake.
    mine: watch::Receiver<Progress>,
    landed: bool,
}

impl Landing<'_> {
    /// Idle, and the result to every waiter, in one step: a request never finds the flight
    /// busy with a result unless it is still saving.
    fn land(
        mut self,
        progress: &watch::Sender<Progress>,
        result: Result<Arc<AccessToken>, TokenError>,
    ) {
        let mut flight = self.cache.flight();
        self.make_idle(&mut flight);
        progress.send_replace(Progress::Done(result));
        self.landed = true;
    }

    fn make_idle(&self, flight: &mut Flight) {
        if matches!(flight, Flight::Busy(p) if p.same_channel(&self.mine)) {
            *flight = Flight::Idle;
        }
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        if !self.landed {
            let mut flight = self.cache.flight();
            self.make_idle(&mut flight);
        }
    }
}

impl TokenCache {
    fn flight(&self) -> MutexGuard<'_, Flight> {
        self.flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A token good enough for `purpose`: the one in use, or what a flight brings.
    pub(super) async fn refresh(
        self: &Arc<Self>,
        purpose: Purpose,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let mut joined = false;
        loop {
            if let Some(t) = self.good_enough(purpose) {
                return Ok(t);
            }
            if let Some(next) = self.replaced_by() {
                return Box::pin(next.refresh(purpose)).await;
            }
            let (mut progress, own) = {
                let mut flight = self.flight();
                match &*flight {
                    Flight::Busy(p) if matches!(*p.borrow(), Progress::Running) => {
                        (p.clone(), false)
                    }
                    // Landed with a token that is not enough, and still saving it: nothing
                    // may be redeemed until the store has the record.
                    Flight::Busy(_) => return Err(self.unsaved_error()),
                    Flight::Idle => {
                        let p = self.launch(purpose);
                        *flight = Flight::Busy(p.clone());
                        (p, true)
                    }
                }
            };
            let result = match progress.wait_for(|p| matches!(p, Progress::Done(_))).await {
                Ok(done) => match &*done {
                    Progress::Done(result) => result.clone(),
                    Progress::Running => unreachable!("waited for Done"),
                },
                Err(_) => Err(TokenError::Unavailable {
                    reason: "the refresh was stopped: tollgate is shutting down".into(),
                    retry_after: Duration::from_secs(1),
                }),
            };
            match result {
                Ok(t) if own || joined => return Ok(t),
                // Another request's flight, which may have brought less than this one needs.
                Ok(_) => joined = true,
                // Retired meanwhile: the successor answers with the new settings.
                Err(_) if self.replaced_by().is_some() => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn unsaved_error(&self) -> TokenError {
        let reason = self
            .unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        TokenError::Store(reason.unwrap_or_else(|| "a new token record is being saved".into()))
    }

    /// Start a flight for `purpose`; the caller makes the cache busy with the receiver.
    fn launch(self: &Arc<Self>, purpose: Purpose) -> watch::Receiver<Progress> {
        let (progress, receiver) = watch::channel(Progress::Running);
        let cache = Arc::clone(self);
        self.spawn(async move { cache.fly(purpose, progress).await });
        receiver
    }

    /// The flight's task.
    async fn fly(self: Arc<Self>, purpose: Purpose, progress: watch::Sender<Progress>) {
        let landing = Landing {
            cache: &self,
            mine: progress.subscribe(),
            landed: false,
        };
        let result = {
            let mut lineage = self.lineage.lock().await;
            self.attempts(&mut lineage, purpose, &progress).await
        };
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) =
            result.as_ref().err().map(|e| e.to_string());
        landing.land(&progress, result);
    }

    /// Redeem, retrying transient failures with backoff until `refresh_wait` is over.
    async fn attempts(
        &self,
        lineage: &mut Lineage,
        purpose: Purpose,
        progress: &watch::Sender<Progress>,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let deadline = Instant::now() + self.refresh_wait;
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        loop {
            if self.replaced_by().is_some() {
                return Err(TokenError::Unavailable {
                    reason: "the auth settings were replaced by a reload".into(),
                    retry_after: Duration::from_secs(1),
                });
            }
            if let Some(not_before) = lineage.not_before.filter(|t| *t > Instant::now()) {
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
            let (reason, hint) = match self.redeem(lineage, purpose, lock_wait, progress).await {
                Ok(t) => {
                    self.count_refresh(Counted::Ok);
                    return Ok(t);
                }
                Err(Attempt::Final(e)) => {
                    self.count_refresh(match &e {
                        TokenError::NeedsLogin(_) | TokenError::Refused(_) => Counted::Refused,
                        _ => Counted::Error,
                    });
                    return Err(e);
                }
                Err(Attempt::Retry { reason, hint }) => {
                    self.count_refresh(Counted::Error);
                    (reason, hint)
                }
            };
            if let Some(wait) = hint {
                lineage.not_before = Some(Instant::now() + wait);
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
        lineage: &mut Lineage,
        purpose: Purpose,
        lock_wait: Duration,
        progress: &watch::Sender<Progress>,
    ) -> Result<Arc<AccessToken>, Attempt> {
        let lock = self
            .store
            .lock_refresh(&self.name, lock_wait)
            .await
            .map_err(Attempt::store)?;
        let stored = self
            .store
            .load_token(&self.name)
            .await
            .map_err(Attempt::store)?;
        if let Some(foreign) = stored.as_ref().filter(|r| r.seed_hash != self.seed_hash) {
            if self.lineage_used.load(Ordering::Acquire) {
                let e = TokenError::NeedsLogin(format!(
                    "the state store now holds a newer login for upstream `{}` (a new seed in another process's config); restart this tollgate to use it",
                    self.name
                ));
                tracing::error!(upstream = %self.name, generation = foreign.generation, "{e}");
                lineage.final_failure = Some((e.clone(), 0));
                return Err(Attempt::Final(e));
            }
        }
        let stored = stored.filter(|r| r.seed_hash == self.seed_hash);
        let stored_generation = stored.as_ref().map_or(0, |r| r.generation);

        if let Some((error, generation)) = &lineage.final_failure {
            if stored_generation <= *generation {
                return Err(Attempt::Final(error.clone()));
            }
            lineage.final_failure = None;
        }
        if let Some(record) = &stored {
            if let Some(token) = self.adoptable(record, purpose) {
                tracing::info!(upstream = %self.name, generation = token.generation, token = %token.fingerprint, "using the token another process refreshed");
                self.lineage_used.store(true, Ordering::Release);
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
            lineage.final_failure = Some((e.clone(), stored_generation));
            return Err(Attempt::Final(e));
        }

        let issued = match self.endpoint.obtain(refresh_token.as_ref()).await {
            Ok(issued) => issued,
            Err(e) => return Err(self.classify(e, lineage, stored_generation)),
        };
        let record = new_record(
            &self.seed_hash,
            issued,
            refresh_token,
            stored_generation.max(self.generation()),
        );
        self.lineage_used.store(true, Ordering::Release);
        let saved = self.store.save_token(&self.name, &record, &lock).await;
        let token = self.token_from(&record).map(|t| self.publish(t));
        match saved {
            Ok(()) => drop(lock),
            Err(e) => {
                self.save_later(&record, lock, e, token.as_ref(), progress)
                    .await
            }
        }
        let token = token.ok_or_else(|| Attempt::Retry {
            reason: "the identity server issued a token that expires at once".into(),
            hint: None,
        })?;
        tracing::info!(upstream = %self.name, generation = token.generation, token = %token.fingerprint, "token refreshed");
        Ok(token)
    }

    /// The store refused `record`, the only copy of a refresh token the identity server has
    /// just rotated. Keep the lock, so nothing redeems meanwhile, here or in another process
    /// on the store; let the waiting requests have the new access token at once; retry the
    /// save with backoff until the store takes it.
    async fn save_later(
        &self,
        record: &TokenRecord,
        lock: RefreshLock,
        error: StoreError,
        token: Option<&Arc<AccessToken>>,
        progress: &watch::Sender<Progress>,
    ) {
        let unsaved = |e: &StoreError| {
            format!(
                "the new refresh token is not saved yet ({e}); tollgate holds the refresh lock and retries, the new access token serves meanwhile, and nothing is redeemed until the store takes it"
            )
        };
        tracing::error!(upstream = %self.name, %error, "the state store did not take the new refresh token; holding the refresh lock and retrying the save");
        *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()) = Some(unsaved(&error));
        let answer = token
            .cloned()
            .ok_or_else(|| TokenError::Store(unsaved(&error)));
        progress.send_replace(Progress::Done(answer));
        let mut backoff = Backoff::new(self.backoff_initial, SAVE_RETRY_MAX);
        let mut failures = 1u32;
        loop {
            tokio::time::sleep(backoff.next_delay()).await;
            match self.store.save_token(&self.name, record, &lock).await {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    tracing::debug!(upstream = %self.name, error = %e, "the new refresh token is still not saved");
                    *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()) = Some(unsaved(&e));
                }
            }
        }
        *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::info!(upstream = %self.name, failures, "the state store took the new refresh token");
    }

    /// Wait, up to `wait`, until no flight is in the air, so that what one redeemed is saved
    /// (at shutdown, and before `tollgate token` exits). Returns whether none is.
    pub async fn settle(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut progress = match &*self.flight() {
                Flight::Idle => return true,
                Flight::Busy(p) => p.clone(),
            };
            // The task drops its sender when it ends.
            let ended = async { while progress.changed().await.is_ok() {} };
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                if let Some(reason) = self
                    .unsaved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                {
                    tracing::error!(upstream = %self.name, "{reason}; stopping now loses it: the next start redeems the refresh token before it, which an identity server that rotates refuses (then run `tollgate login {}`)", self.name);
                }
                return false;
            }
        }
    }

    fn classify(&self, e: GrantError, lineage: &mut Lineage, generation: u64) -> Attempt {
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
                lineage.final_failure = Some((error.clone(), generation));
                Attempt::Final(error)
            }
            GrantError::Refused { .. } => {
                let error = TokenError::Refused(format!(
                    "the identity server refused the client of upstream `{}` ({e}); check client_id, client_secret, client_auth and scope",
                    self.name
                ));
                tracing::error!(upstream = %self.name, "{error}");
                lineage.final_failure = Some((error.clone(), generation));
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
}
