//! One refresh at a time per token cache, run by a task the cache owns: the *flight*.
//!
//! ```text
//! Idle ──(a request, or the refresh-ahead task, needs a token)──► Busy: a task is spawned
//! Busy:  no token at all, and a usable one in the store? adopt it (read only) ─► Idle
//!        else lock the store ─► read it ─► adopt a newer record, or redeem ─► save ─► unlock
//!        ─► publish ─► Idle, and every waiter gets the result
//! Busy, the save failed: publish, answer the waiters at once (Unsaved), keep the lock and
//!        retry the save with backoff ─► Idle once saved
//! ```
//!
//! Requests wait for a flight's [`Progress`], never for its task, and for `auth.refresh_wait`
//! at most: one that goes away drops its receiver and nothing else. A redemption, once sent,
//! is awaited until its answer or its connection's end (`auth.answer_timeout` at most),
//! under the lock; one never answered is sent once more, still under the lock. A request that arrives while a flight is in the air joins it;
//! one that needs more than the flight brought (a newer generation than it adopted) starts the
//! next. A failing flight retries with backoff until `auth.refresh_wait` is over, holding no
//! lock between attempts; a reload that retires the cache ends those waits at once.
//!
//! Must not: redeem without the store's refresh lock, hold a `std` mutex across an `.await`, or
//! release the lock of a record the store has not taken.

use super::backoff::Backoff;
use super::cache::{lock, AccessToken, Counted, TokenCache};
use super::grant::{GrantError, Issued};
use super::{new_record, whole_seconds, Purpose, TokenError, LOCK_MARGIN};
use crate::config::Grant;
use crate::secret::Secret;
use crate::store::{RefreshLock, StoreError, TokenRecord};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a refresh waits for another process holding the store's refresh lock.
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(30);
/// After writing back a record the store had lost, how long a refresh waits before it may
/// redeem, so that a replica that knows a newer record can write that back first.
const WRITE_BACK_WAIT: Duration = Duration::from_millis(500);

/// The state of a cache's refresh.
pub(super) enum Flight {
    /// No refresh is in the air.
    Idle,
    /// A task is refreshing, and reports on the channel.
    Busy(watch::Receiver<Progress>),
}

/// What the requests waiting for a flight see of it.
#[derive(Clone)]
pub(super) enum Progress {
    Running,
    /// The identity server issued a token whose record the store has not taken yet: the token
    /// (if it is usable) serves, and nothing more can be redeemed until the record is saved.
    Unsaved(Option<Arc<AccessToken>>),
    Done(Result<Arc<AccessToken>, TokenError>),
}

/// What one flight leaves the next; held by the flight in the air only.
#[derive(Default)]
pub(super) struct Lineage {
    /// A final failure, with the store generation it happened on; cleared when the store holds
    /// a newer record of this lineage (a login) or the process restarts with a new seed.
    final_failure: Option<(TokenError, (u64, u64))>,
}

/// The outcome of one redemption attempt that did not produce a token.
pub(super) enum Attempt {
    Final(TokenError),
    Retry {
        reason: String,
        hint: Option<Duration>,
    },
    /// A shared store that lost its data grants no lock for a while: waited out, whatever
    /// the deadline (client requests stop waiting at theirs).
    Recovering(String),
    /// A reload retired the cache: the successor refreshes with the new settings.
    Replaced,
    /// Try again after `pause` at least, for a reason of the store's (not the identity
    /// server's: its Retry-After is remembered, this is not).
    Pause {
        reason: String,
        pause: Duration,
    },
}

impl Attempt {
    pub(super) fn store(e: StoreError) -> Attempt {
        match e {
            StoreError::LockTimeout { .. } => Attempt::Retry {
                reason: e.to_string(),
                hint: None,
            },
            // The store is writing back what it lost: the lock comes back by itself.
            StoreError::Recovering { .. } => Attempt::Recovering(e.to_string()),
            other => Attempt::Final(TokenError::Store(other.to_string())),
        }
    }
}

/// What the store holds, for one attempt.
enum Consulted {
    /// A token another process saved, newer than the one to replace: nothing to redeem.
    Adopted(Arc<AccessToken>),
    /// Redeem `refresh_token` (none for the grants that log in by themselves); the store is
    /// at `generation` of this lineage, which a login started at `login_at_ms` (or 0).
    Redeem {
        generation: u64,
        login_at_ms: u64,
        refresh_token: Option<Secret<String>>,
    },
}

fn replaced() -> TokenError {
    TokenError::Unavailable {
        reason: "the auth settings were replaced by a reload".into(),
        retry_after: Duration::from_secs(1),
    }
}

/// Makes the flight idle when its task ends, however it ends — landed, panicked, or dropped
/// with its runtime before it ever ran: otherwise the cache would wait for a flight that
/// never lands.
struct Landing {
    cache: Arc<TokenCache>,
    /// Identifies this flight's channel, so a later flight is never landed by mistake.
    mine: watch::Receiver<Progress>,
}

impl Landing {
    /// Idle, and the result to every waiter, in one step: a request never finds the flight
    /// busy with a result of a flight that has ended.
    fn land(
        self,
        progress: &watch::Sender<Progress>,
        result: Result<Arc<AccessToken>, TokenError>,
    ) {
        let mut flight = self.cache.flight();
        self.make_idle(&mut flight);
        progress.send_replace(Progress::Done(result));
    }

    fn make_idle(&self, flight: &mut Flight) {
        if matches!(flight, Flight::Busy(p) if p.same_channel(&self.mine)) {
            *flight = Flight::Idle;
        }
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        let mut flight = self.cache.flight();
        self.make_idle(&mut flight);
    }
}

impl TokenCache {
    pub(super) fn flight(&self) -> MutexGuard<'_, Flight> {
        lock(&self.flight)
    }

    /// A token good enough for `purpose`: the one in use, or what a flight brings, waited for
    /// until `until` at most (a client request's `auth.refresh_wait`; the flight goes on).
    pub(super) async fn refresh(
        self: &Arc<Self>,
        purpose: Purpose,
        until: Option<Instant>,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let mut joined = false;
        loop {
            if let Some(t) = self.good_enough(purpose) {
                return Ok(t);
            }
            if let Some(next) = self.replaced_by() {
                return Box::pin(next.refresh(purpose, until)).await;
            }
            let (mut progress, task) = {
                let mut flight = self.flight();
                match &*flight {
                    Flight::Busy(p) => {
                        if let Progress::Unsaved(_) = &*p.borrow() {
                            // Nothing may be redeemed until the store has the record.
                            return Err(self.unsaved_error());
                        }
                        (p.clone(), None)
                    }
                    Flight::Idle => {
                        let (p, task) = self.flight_for(purpose);
                        *flight = Flight::Busy(p.clone());
                        (p, Some(task))
                    }
                }
            };
            // Spawned once the flight lock is let go: a task its runtime drops at once lands
            // (and takes that lock) as it is dropped.
            let own = task.is_some();
            if let Some(task) = task {
                self.spawn(task);
            }
            let answered = progress.wait_for(|p| !matches!(p, Progress::Running));
            let answer = match until {
                None => answered.await,
                Some(until) => match tokio::time::timeout_at(until.into(), answered).await {
                    Ok(answer) => answer,
                    Err(_) => return Err(self.still_refreshing()),
                },
            };
            let result = match answer.as_deref() {
                Ok(Progress::Done(result)) => result.clone(),
                Ok(Progress::Unsaved(Some(token))) => Ok(Arc::clone(token)),
                Ok(Progress::Unsaved(None)) => Err(self.unsaved_error()),
                Ok(Progress::Running) => unreachable!("waited for an answer"),
                Err(_) => Err(TokenError::Unavailable {
                    reason: "the refresh was stopped: tollgate is shutting down".into(),
                    retry_after: Duration::from_secs(1),
                }),
            };
            match result {
                // A second joined flight started after this request's own need arose (after a
                // refusal raised the floor it adopts above), so what it brings is enough.
                Ok(t) if own || joined => return Ok(t),
                // Another request's flight, which may have brought less than this one needs.
                Ok(_) => joined = true,
                // Retired meanwhile: the successor answers with the new settings.
                Err(_) if self.replaced_by().is_some() => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A client request waited `auth.refresh_wait` for a flight that has not landed (the
    /// identity server is slow to answer, or failing and retried).
    fn still_refreshing(&self) -> TokenError {
        let last = lock(&self.last_failure).clone();
        TokenError::Unavailable {
            reason: match last {
                Some(last) => format!("no token within auth.refresh_wait ({}): the refresh goes on in the background; the last one failed: {last}", humantime::format_duration(self.refresh_wait)),
                None => format!("no token within auth.refresh_wait ({}): the identity server has not answered yet, and the refresh goes on in the background", humantime::format_duration(self.refresh_wait)),
            },
            retry_after: Duration::from_secs(1),
        }
    }

    fn unsaved_error(&self) -> TokenError {
        let reason = lock(&self.unsaved).clone();
        TokenError::Store(reason.unwrap_or_else(|| "a new token record is being saved".into()))
    }

    /// A flight for `purpose`: the receiver the cache is busy with, and the task to spawn.
    fn flight_for(
        self: &Arc<Self>,
        purpose: Purpose,
    ) -> (
        watch::Receiver<Progress>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (progress, receiver) = watch::channel(Progress::Running);
        let landing = Landing {
            cache: Arc::clone(self),
            mine: receiver.clone(),
        };
        let task = async move {
            let cache = Arc::clone(&landing.cache);
            let result = {
                let mut lineage = cache.lineage.lock().await;
                cache.attempts(&mut lineage, purpose, &progress).await
            };
            *lock(&cache.last_failure) = result.as_ref().err().map(|e| e.to_string());
            landing.land(&progress, result);
        };
        (receiver, task)
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
            let not_before = lock(&self.not_before).filter(|t| *t > Instant::now());
            if let Some(not_before) = not_before {
                let keep_current = purpose == Purpose::Ahead && self.cached().is_some();
                if keep_current || not_before > deadline {
                    return Err(TokenError::Unavailable {
                        reason: "the identity server asked to wait (Retry-After)".into(),
                        retry_after: whole_seconds(not_before - Instant::now()),
                    });
                }
                if !self.pause_until(not_before).await {
                    return Err(replaced());
                }
            }
            let lock_wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_secs(1), LOCK_WAIT);
            let (reason, hint) = match self.redeem(lineage, purpose, lock_wait, progress).await {
                Ok(t) => {
                    self.count_refresh(Counted::Ok);
                    return Ok(t);
                }
                Err(Attempt::Replaced) => return Err(replaced()),
                Err(Attempt::Final(e)) => {
                    self.count_refresh(match &e {
                        TokenError::NeedsLogin(_) | TokenError::Refused(_) => Counted::Refused,
                        _ => Counted::Error,
                    });
                    return Err(e);
                }
                Err(Attempt::Retry { reason, hint }) => {
                    self.count_refresh(Counted::Error);
                    if let Some(wait) = hint {
                        *lock(&self.not_before) = Some(Instant::now() + wait);
                    }
                    (reason, hint)
                }
                Err(Attempt::Recovering(reason)) => {
                    tracing::debug!(upstream = %self.name, %reason, "waiting for the refresh lock");
                    if !self
                        .pause_until(Instant::now() + self.backoff_initial)
                        .await
                    {
                        return Err(replaced());
                    }
                    continue;
                }
                // Not the identity server's doing: nothing to remember of it.
                Err(Attempt::Pause { reason, pause }) => (reason, Some(pause)),
            };
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
            if !self.pause_until(Instant::now() + delay).await {
                return Err(replaced());
            }
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
        // With no token at all (a start), one another process saved is adopted without the
        // lock: it is only read, and a shared store may keep the lock from a process for a
        // moment after it connects. After a refusal the lock is taken first: another process
        // may be redeeming, and what it gets is better than what the store holds now.
        if purpose == Purpose::Missing && lineage.final_failure.is_none() {
            if let Some(token) = self.adopt_stored(purpose).await {
                return Ok(token);
            }
        }
        let mut retired = self.retired.subscribe();
        let store_lock = tokio::select! {
            taken = self.store.lock_refresh(&self.name, lock_wait, self.request_timeout + LOCK_MARGIN) => taken.map_err(Attempt::store)?,
            _ = retired.wait_for(|retired| *retired) => return Err(Attempt::Replaced),
        };
        // Retired while taking the lock: the successor redeems, with the new settings.
        if self.replaced_by().is_some() {
            return Err(Attempt::Replaced);
        }
        let consulted = self.consult(lineage, purpose, &store_lock).await?;
        let (stored_generation, login_at_ms, refresh_token) = match consulted {
            Consulted::Adopted(token) => return Ok(token),
            Consulted::Redeem {
                generation,
                login_at_ms,
                refresh_token,
            } => (generation, login_at_ms, refresh_token),
        };
        // A shared store's lock expires by itself: never start a token request it would not
        // outlive, or another replica could redeem the same refresh token meanwhile.
        if let Some(expires) = store_lock.expires {
            if Instant::now() + self.request_timeout >= expires {
                return Err(Attempt::Retry {
                    reason: "the refresh lock would expire before a token request could end".into(),
                    hint: None,
                });
            }
        }
        let issued = match self.obtain(refresh_token.as_ref()).await? {
            Ok(issued) => issued,
            Err(e) => {
                let position = (login_at_ms, stored_generation);
                return Err(self.classify(e, lineage, position));
            }
        };
        let record = new_record(
            &self.seed_hash,
            issued,
            refresh_token,
            // Generations only grow here, whatever the store holds (a login after data loss
            // starts again at 1): a refused generation must never come back.
            stored_generation
                .max(self.generation())
                .max(self.refused.load(Ordering::Acquire)),
            login_at_ms,
        );
        self.lineage_used.store(true, Ordering::Release);
        let saved = self
            .store
            .save_token(&self.name, &record, &store_lock)
            .await;
        if let Err(StoreError::Superseded { .. }) = saved {
            // This lock expired and a later holder saved: what it saved is the lineage now.
            return Err(Attempt::Retry {
                reason: "another replica saved a newer token record".into(),
                hint: None,
            });
        }
        let token = self.token_from(&record).map(|t| self.publish(t));
        match saved {
            Ok(()) => {
                self.remember(&record);
                drop(store_lock);
            }
            Err(e) => {
                self.save_later(&record, store_lock, e, token.clone(), progress)
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

    /// The stored token, published, when it is of this lineage and good enough for
    /// `purpose`; read without the lock, so any doubt (a store that fails, another lineage)
    /// is left to the locked path.
    async fn adopt_stored(&self, purpose: Purpose) -> Option<Arc<AccessToken>> {
        let record = self.store.load_token(&self.name).await.ok()??;
        let behind = lock(&self.known)
            .as_ref()
            .is_some_and(|k| k.seed_hash == record.seed_hash && k.is_after(&record));
        // Another lineage, or a store that went back (written back under the lock).
        if record.seed_hash != self.seed_hash || behind {
            return None;
        }
        let token = self.adoptable(&record, purpose)?;
        self.remember(&record);
        Some(self.adopt(token))
    }

    /// Put `token`, saved by another process (or an earlier run), on requests.
    fn adopt(&self, token: AccessToken) -> Arc<AccessToken> {
        // The first token this process uses was stored before it (by `tollgate login` or an
        // earlier run); a later one was refreshed by another process.
        if self.lineage_used.swap(true, Ordering::AcqRel) {
            tracing::info!(upstream = %self.name, generation = token.generation, token = %token.fingerprint, "using the token another process refreshed");
        } else {
            tracing::info!(upstream = %self.name, generation = token.generation, token = %token.fingerprint, "using the stored token");
        }
        self.publish(token)
    }

    /// Under the store lock: what the store holds decides whether to adopt a token another
    /// process saved, to redeem (which refresh token, at which generation), or neither.
    async fn consult(
        &self,
        lineage: &mut Lineage,
        purpose: Purpose,
        store_lock: &RefreshLock,
    ) -> Result<Consulted, Attempt> {
        let (stored, wrote_back) = self.recovered(store_lock).await?;
        if let Some(foreign) = stored.as_ref().filter(|r| r.seed_hash != self.seed_hash) {
            if self.lineage_used.load(Ordering::Acquire) {
                let e = TokenError::NeedsLogin(format!(
                    "the state store now holds a newer login for upstream `{}` (a new seed in another process's config); restart this tollgate to use it",
                    self.name
                ));
                tracing::error!(upstream = %self.name, generation = foreign.generation, "{e}");
                // Generation 0: final until the store holds a record of this lineage again.
                lineage.final_failure = Some((e.clone(), (0, 0)));
                return Err(Attempt::Final(e));
            }
        }
        let stored = stored.filter(|r| r.seed_hash == self.seed_hash);
        if let Some(record) = &stored {
            self.remember(record);
        }
        let generation = stored.as_ref().map_or(0, |r| r.generation);
        let position = stored
            .as_ref()
            .map_or((0, 0), |r| (r.login_at_ms, r.generation));

        if let Some((error, failed_at)) = &lineage.final_failure {
            if position <= *failed_at {
                return Err(Attempt::Final(error.clone()));
            }
            lineage.final_failure = None;
        }
        if let Some(record) = &stored {
            if let Some(token) = self.adoptable(record, purpose) {
                return Ok(Consulted::Adopted(self.adopt(token)));
            }
        }
        if wrote_back {
            // Another replica may know a newer record than the one written back: it writes
            // it back when it hears of this one, before anything is redeemed.
            return Err(Attempt::Pause {
                reason: "the state store had lost the newest token record; waiting a moment for the other replicas to write theirs back".into(),
                pause: WRITE_BACK_WAIT,
            });
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
            lineage.final_failure = Some((e.clone(), position));
            return Err(Attempt::Final(e));
        }
        Ok(Consulted::Redeem {
            generation,
            login_at_ms: stored.as_ref().map_or(0, |r| r.login_at_ms),
            refresh_token,
        })
    }

    /// Send the token request, under the store lock (kept alive meanwhile). A redemption that
    /// was sent and never answered is sent once more at once, still under the lock, and said
    /// so: if the server never processed the first, that recovers; if it did, the next refresh
    /// token was lost with the answer. Nothing new is sent once the process is stopping.
    async fn obtain(
        &self,
        refresh_token: Option<&Secret<String>>,
    ) -> Result<Result<Issued, GrantError>, Attempt> {
        let mut sent_again = false;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Err(Attempt::Final(TokenError::Unavailable {
                    reason: "tollgate is shutting down".into(),
                    retry_after: Duration::from_secs(1),
                }));
            }
            *lock(&self.in_the_air) = Some(Instant::now() + self.endpoint.longest_request());
            let obtained = self.endpoint.obtain(refresh_token).await;
            *lock(&self.in_the_air) = None;
            match obtained {
                Err(GrantError::Unanswered { reason }) if !sent_again => {
                    sent_again = true;
                    tracing::warn!(upstream = %self.name, %reason, "a refresh was sent and not answered: the identity server may have processed it. Sending the same refresh token once more: if the server never processed the first, this recovers; if it did, the next refresh token was lost with the answer, and a server that rotates strictly refuses this one (then run `tollgate login {}`)", self.name);
                    tokio::time::sleep(self.backoff_initial).await;
                }
                Err(GrantError::Unanswered { reason }) => {
                    tracing::error!(upstream = %self.name, %reason, "a refresh was sent and not answered again; retrying with backoff");
                    return Ok(Err(GrantError::Unanswered { reason }));
                }
                other => return Ok(other),
            }
        }
    }

    /// Sort a token endpoint's refusal; a final one holds until the store holds a record past
    /// `position` (login time, generation) of the record redeemed.
    fn classify(&self, e: GrantError, lineage: &mut Lineage, position: (u64, u64)) -> Attempt {
        match e {
            GrantError::Unanswered { reason } => Attempt::Retry { reason, hint: None },
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
                        "the identity server no longer accepts the refresh token of upstream `{0}` ({e}); run `tollgate login {0}`: a running tollgate picks the new token up by itself, no restart needed",
                        self.name
                    ),
                });
                tracing::error!(upstream = %self.name, "{error}");
                lineage.final_failure = Some((error.clone(), position));
                Attempt::Final(error)
            }
            GrantError::Refused { .. } => {
                let error = TokenError::Refused(format!(
                    "the identity server refused the client of upstream `{}` ({e}); check client_id, client_secret, client_auth and scope",
                    self.name
                ));
                tracing::error!(upstream = %self.name, "{error}");
                lineage.final_failure = Some((error.clone(), position));
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
