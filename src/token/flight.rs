//! One refresh at a time per token cache, run by a task its [`Refresher`] owns: the *flight*.
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
//! under the lock; one never answered is sent once more, still under the lock (see
//! [`super::redeem`]: one attempt). A request that arrives while a flight is in the air joins
//! it; one that needs more than the flight brought (a newer generation than it adopted)
//! starts the next. A failing flight retries with backoff until `auth.refresh_wait` is over, holding no
//! lock between attempts; a reload that retires the cache ends those waits at once.
//!
//! Must not: redeem without the store's refresh lock, hold a `std` mutex across an `.await`, or
//! release the lock of a record the store has not taken.

use super::backoff::{Backoff, RETRY_FIRST, RETRY_MAX};
use super::current::AccessToken;
use super::lock;
use super::refresher::Counted;
use super::refresher::Refresher;

use super::{whole_seconds, Purpose, TokenError};
use crate::store::StoreError;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a refresh waits for another process holding the store's refresh lock.
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(30);
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
    pub(super) final_failure: Option<(TokenError, (u64, u64))>,
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
            StoreError::Sealed { .. } => Attempt::Final(TokenError::Sealed(e.to_string())),
            other => Attempt::Final(TokenError::Store(other.to_string())),
        }
    }
}

/// Why a flight ended before its time: the process stops, or a reload replaced the cache.
fn interrupted(refresher: &Refresher) -> TokenError {
    let reason = match *refresher.stopping.borrow() {
        true => "tollgate is shutting down",
        false => "the auth settings were replaced by a reload",
    };
    TokenError::Unavailable {
        reason: reason.into(),
        retry_after: Duration::from_secs(1),
    }
}

/// Makes the flight idle when its task ends, however it ends — landed, panicked, or dropped
/// with its runtime before it ever ran: otherwise the cache would wait for a flight that
/// never lands.
struct Landing {
    refresher: Arc<Refresher>,
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
        let mut flight = self.refresher.flight();
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
        let mut flight = self.refresher.flight();
        self.make_idle(&mut flight);
    }
}

impl Refresher {
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
            if let Some(t) = self.current.good_enough(purpose) {
                return Ok(t);
            }
            if self.is_retired() {
                return Err(interrupted(self));
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
                Err(e) => return Err(e),
            }
        }
    }

    /// A client request waited `auth.refresh_wait` for a flight that has not landed (the
    /// identity server is slow to answer, or failing and retried).
    fn still_refreshing(&self) -> TokenError {
        let last = self.last_failure();
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
            refresher: Arc::clone(self),
            mine: receiver.clone(),
        };
        let task = async move {
            let refresher = Arc::clone(&landing.refresher);
            let result = {
                let mut lineage = refresher.lineage.lock().await;
                refresher.attempts(&mut lineage, purpose, &progress).await
            };
            if result.is_ok() {
                *lock(&refresher.last_failure) = None;
                *lock(&refresher.blocked) = None;
            }
            landing.land(&progress, result);
        };
        (receiver, task)
    }

    /// Redeem, retrying transient failures until `refresh_wait` is over, never before the
    /// cache's [`super::backoff::Retry`] allows: a request that finds the next try past its
    /// wait is answered at once, with the time left as its `Retry-After`.
    async fn attempts(
        &self,
        lineage: &mut Lineage,
        purpose: Purpose,
        progress: &watch::Sender<Progress>,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let deadline = Instant::now() + self.refresh_wait;
        // A pause of this flight's own (the store is in trouble): not the identity server's.
        let mut store_backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        let mut paused_until: Option<Instant> = None;
        // This flight's last failure.
        let mut failed: Option<String> = None;
        loop {
            let now = Instant::now();
            let retry_at = lock(&self.retry).not_before(now);
            if let Some(until) = retry_at.max(paused_until.take()).filter(|t| *t > now) {
                // A still-usable token keeps serving; the refresh-ahead task tries again later.
                let keep_current = purpose == Purpose::Ahead && self.current.cached().is_some();
                if keep_current || until > deadline {
                    let reason = match failed {
                        Some(reason) => {
                            tracing::warn!(upstream = %self.name, %reason, "token refresh failed");
                            reason
                        }
                        None => self.waiting_reason(),
                    };
                    return Err(TokenError::Unavailable {
                        reason,
                        retry_after: whole_seconds(until - now),
                    });
                }
                if let Some(reason) = &failed {
                    tracing::info!(upstream = %self.name, %reason, retry_in = ?(until - now), "token refresh failed; retrying");
                }
                if !self.pause_until(until).await {
                    return Err(interrupted(self));
                }
            }
            let lock_wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_secs(1), LOCK_WAIT);
            match self.redeem(lineage, purpose, lock_wait, progress).await {
                Ok(t) => {
                    self.count_refresh(Counted::Ok);
                    lock(&self.retry).succeeded();
                    return Ok(t);
                }
                Err(Attempt::Replaced) => return Err(interrupted(self)),
                Err(Attempt::Final(e)) => {
                    self.count_refresh(match &e {
                        TokenError::NeedsLogin(_) | TokenError::Refused(_) => Counted::Refused,
                        _ => Counted::Error,
                    });
                    self.failed(&e);
                    return Err(e);
                }
                Err(Attempt::Retry { reason, hint }) => {
                    self.count_refresh(Counted::Error);
                    lock(&self.retry).failed(Instant::now(), hint);
                    self.failed(&TokenError::Unavailable {
                        reason: reason.clone(),
                        retry_after: Duration::ZERO,
                    });
                    failed = Some(reason);
                }
                Err(Attempt::Recovering(reason)) => {
                    tracing::debug!(upstream = %self.name, %reason, "waiting for the refresh lock");
                    if !self.pause_until(Instant::now() + RETRY_FIRST).await {
                        return Err(interrupted(self));
                    }
                }
                // Not the identity server's doing: nothing to remember of it.
                Err(Attempt::Pause { reason, pause }) => {
                    paused_until = Some(Instant::now() + store_backoff.next_delay().max(pause));
                    failed = Some(reason);
                }
            }
        }
    }

    /// Why a flight does not call the identity server yet, before it failed itself.
    fn waiting_reason(&self) -> String {
        match lock(&self.last_failure).clone() {
            Some(last) => format!(
                "the identity server is not called again yet after a failed token request: {last}"
            ),
            None => "the identity server asked to wait (Retry-After)".to_owned(),
        }
    }
}
