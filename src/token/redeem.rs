//! One attempt of a flight ([`super::flight`]): adopt what the store holds, or redeem under
//! the store's refresh lock and save.
//!
//! ```text
//! no token at all, and a usable one in the store? adopt it, read only
//! else lock ─► write back what the store lost (recover.rs) ─► read ─► adopt a newer record,
//!      or redeem: send, await the answer (sent once more if never answered) ─► save ─► unlock
//! ```
//!
//! Must not: redeem without the lock, send the same refresh token again once its answer may
//! still come, or let the lock go before the store took what was redeemed.

use super::answer::{GrantError, Issued};
use super::backoff::RETRY_FIRST;
use super::current::AccessToken;
use super::dpop::DpopKey;
use super::lock;
use super::refresher::Refresher;

use super::flight::{Attempt, Lineage, Progress};
use super::{new_record, Purpose, TokenError, LOCK_MARGIN};
use crate::config::Grant;
use crate::secret::Secret;
use crate::store::{RefreshLock, StoreError, TokenRecord};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// After writing back a record the store had lost, how long a refresh waits before it may
/// redeem, so that a replica that knows a newer record can write that back first.
const WRITE_BACK_WAIT: Duration = Duration::from_millis(500);

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
        /// The lineage's DPoP key as stored, if any.
        dpop_key: Option<Secret<String>>,
    },
}

impl Refresher {
    /// One attempt: take the store lock, adopt a newer record if another process made one,
    /// else redeem, save durably, then publish.
    pub(super) async fn redeem(
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
        if self.is_retired() {
            return Err(Attempt::Replaced);
        }
        let consulted = self.consult(lineage, purpose, &store_lock).await?;
        let (stored_generation, login_at_ms, refresh_token, stored_key) = match consulted {
            Consulted::Adopted(token) => return Ok(token),
            Consulted::Redeem {
                generation,
                login_at_ms,
                refresh_token,
                dpop_key,
            } => (generation, login_at_ms, refresh_token, dpop_key),
        };
        let dpop = self.dpop_key(stored_key)?;
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
        let issued = match self.obtain(refresh_token.as_ref(), dpop.as_ref()).await? {
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
            stored_generation.max(self.current.floor()),
            login_at_ms,
            dpop.map(|key| key.stored().clone()),
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
        let token = self
            .current
            .token_from(&record)
            .map(|t| self.current.publish(t));
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
        self.current.publish(token)
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
                "upstream `{}` has no refresh token: run `{}` (with [upstream.login] configured), or set the seed (auth.refresh_token, or the identity's refresh_token) and restart",
                self.name, self.login
            ));
            lineage.final_failure = Some((e.clone(), position));
            return Err(Attempt::Final(e));
        }
        Ok(Consulted::Redeem {
            generation,
            login_at_ms: stored.as_ref().map_or(0, |r| r.login_at_ms),
            refresh_token,
            dpop_key: stored.and_then(|r| r.dpop_key),
        })
    }

    /// With `auth.dpop`, the lineage's key: the one its record keeps (its tokens are bound to
    /// it), else a new one, which the record then keeps.
    fn dpop_key(&self, stored: Option<Secret<String>>) -> Result<Option<DpopKey>, Attempt> {
        if !self.endpoint.dpop() {
            return Ok(None);
        }
        let key = match stored.map(|k| DpopKey::from_stored(&k)) {
            Some(Ok(key)) => Ok(key),
            Some(Err(why)) => {
                tracing::warn!(upstream = %self.name, %why, "the stored DPoP key cannot be used; a new one signs from now on (tokens bound to the old one are refused)");
                self.new_dpop_key()
            }
            None => self.new_dpop_key(),
        };
        key.map(Some)
            .map_err(|reason| Attempt::Retry { reason, hint: None })
    }

    /// A key for a lineage whose record holds none yet: the same one on every attempt until a
    /// record keeps it (a server that processed an unanswered attempt bound the grant to it).
    fn new_dpop_key(&self) -> Result<DpopKey, String> {
        let mut pending = lock(&self.pending_dpop);
        if let Some(key) = pending.as_ref() {
            return DpopKey::from_stored(key);
        }
        let key = DpopKey::generate()?;
        *pending = Some(key.stored().clone());
        Ok(key)
    }

    /// Send the token request, under the store lock (kept alive meanwhile). A redemption that
    /// was sent and never answered is sent once more at once, still under the lock, and said
    /// so: if the server never processed the first, that recovers; if it did, the next refresh
    /// token was lost with the answer. Nothing new is sent once the process is stopping.
    async fn obtain(
        &self,
        refresh_token: Option<&Secret<String>>,
        dpop: Option<&DpopKey>,
    ) -> Result<Result<Issued, GrantError>, Attempt> {
        let stopped = || {
            Attempt::Final(TokenError::Unavailable {
                reason: "tollgate is shutting down".into(),
                retry_after: Duration::from_secs(1),
            })
        };
        let mut sent_again = false;
        loop {
            if *self.stopping.borrow() {
                return Err(stopped());
            }
            let obtained = if self.endpoint.spends(refresh_token) {
                // A shutdown waits for its answer: the server may rotate on receiving it.
                // With DPoP, a nonce challenge may take a second request.
                let requests = if self.endpoint.dpop() { 2 } else { 1 };
                let longest = self.endpoint.longest_request() * requests;
                *lock(&self.in_the_air) = Some(Instant::now() + longest);
                let obtained = self.endpoint.obtain(refresh_token, dpop).await;
                *lock(&self.in_the_air) = None;
                obtained
            } else {
                // Spends nothing: a shutdown drops it.
                let mut stopping = self.stopping.subscribe();
                tokio::select! {
                    obtained = self.endpoint.obtain(refresh_token, dpop) => obtained,
                    _ = stopping.wait_for(|stopping| *stopping) => return Err(stopped()),
                }
            };
            match obtained {
                Err(GrantError::Unanswered { reason }) if !sent_again => {
                    sent_again = true;
                    tracing::warn!(upstream = %self.name, %reason, "a refresh was sent and not answered: the identity server may have processed it. Sending the same refresh token once more: if the server never processed the first, this recovers; if it did, the next refresh token was lost with the answer, and a server that rotates strictly refuses this one (then run `{}`)", self.login);
                    tokio::time::sleep(RETRY_FIRST).await;
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
        let name = &self.name;
        let error = match (&e, self.endpoint.grant()) {
            (GrantError::Unanswered { reason }, _) => {
                return Attempt::Retry {
                    reason: reason.clone(),
                    hint: None,
                }
            }
            (GrantError::Transient { reason, retry_after }, _) => {
                return Attempt::Retry {
                    reason: reason.clone(),
                    hint: *retry_after,
                }
            }
            // No login helps a client that logs in with its own credentials.
            (GrantError::InvalidGrant { .. }, Grant::ClientCredentials) => TokenError::Refused(format!(
                "the identity server refused the client_credentials grant of upstream `{name}` ({e}); check auth.client_id, auth.client_secret, auth.scope and auth.params, and that the client may use the client_credentials grant, then restart"
            )),
            (GrantError::InvalidGrant { .. }, Grant::Password) => TokenError::NeedsLogin(format!(
                "the identity server refused the username and password of upstream `{name}` ({e}); fix auth.username and auth.password, then restart"
            )),
            (GrantError::InvalidGrant { .. }, Grant::WinbooksExchange) => TokenError::NeedsLogin(format!(
                "the identity server refused the exchange token of upstream `{name}` ({e}); create a new exchange token in WinBooks on Web, set auth.exchange_token, then restart"
            )),
            (GrantError::InvalidGrant { .. }, Grant::RefreshToken) => TokenError::NeedsLogin(format!(
                "the identity server no longer accepts the refresh token of upstream `{name}` ({e}); run `{}`: a running tollgate picks the new token up by itself, no restart needed", self.login
            )),
            (GrantError::Refused { .. }, _) => TokenError::Refused(format!(
                "the identity server refused the client of upstream `{name}` ({e}); check client_id, client_secret, client_auth and scope"
            )),
        };
        tracing::error!(upstream = %name, "{error}");
        lineage.final_failure = Some((error.clone(), position));
        Attempt::Final(error)
    }

    /// The stored record's token, if another process made it after the one this refresh must
    /// replace (so redeeming again would waste, or with strict rotation break, the lineage).
    fn adoptable(&self, record: &TokenRecord, purpose: Purpose) -> Option<AccessToken> {
        let floor = match purpose {
            Purpose::Missing => 0,
            Purpose::Rejected(g) => g,
            Purpose::Ahead => self.current.generation(),
        };
        if record.generation <= floor.max(self.current.refused()) {
            return None;
        }
        let token = self.current.token_from(record)?;
        let now = Instant::now();
        (token.is_usable(now) && now < token.refresh_at).then_some(token)
    }
}
