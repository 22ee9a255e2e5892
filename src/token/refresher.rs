//! [`Refresher`]: the refresh side of one upstream's token cache — the token endpoint, the
//! store, the seed, the flight in the air, what one flight leaves the next, the backoff, and
//! what a flight could not save yet. It publishes into the cache's [`Current`] and never reads
//! anything a request needs.
//!
//! Its work is in the files beside it: [`super::flight`] (one refresh at a time),
//! [`super::redeem`] (one attempt), [`super::save`] (a record the store will not take yet, and
//! waiting for it at shutdown), [`super::recover`] (writing back what a store lost),
//! [`super::ahead`] (the refresh-ahead task).

use super::backoff::Retry;
use super::current::Current;
use super::flight::{Flight, Lineage};
use super::grant::TokenEndpoint;
use super::{lineage_hash, lock, TokenError};
use crate::config::{Grant, IdentityConfig, UpstreamConfig, UpstreamFiles};
use crate::secret::Secret;
use crate::store::{login_command, record_name, StateStore, TokenRecord};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::watch;

/// The `result` label values of `tollgate_token_refreshes_total`, by index.
pub const REFRESH_RESULTS: [&str; 3] = ["ok", "error", "refused"];

/// What one refresh attempt came to, by its index in [`REFRESH_RESULTS`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Counted {
    Ok = 0,
    /// Will be retried.
    Error = 1,
    /// The identity server refused the grant or the client.
    Refused = 2,
}

/// The refresh side of one upstream's token cache.
pub(super) struct Refresher {
    /// The lineage's name: the upstream's, or `api@alice` for an identity's.
    pub(super) name: String,
    /// The command that logs this lineage in anew, for messages.
    pub(super) login: String,
    /// Where what is obtained goes: the cache's token in use.
    pub(super) current: Arc<Current>,
    pub(super) endpoint: TokenEndpoint,
    pub(super) store: Arc<dyn StateStore>,
    pub(super) seed: Option<Secret<String>>,
    pub(super) seed_hash: String,
    pub(super) refresh_wait: Duration,
    /// How long one token request may take (`auth.timeout`).
    pub(super) request_timeout: Duration,
    /// The last refresh failure, for readiness and status; cleared by a success.
    pub(super) last_failure: Mutex<Option<String>>,
    /// Why a record the identity server issued is not saved yet (see [`super::save`]).
    pub(super) unsaved: Mutex<Option<String>>,
    /// Why the stored record cannot be refreshed until the config changes (it does not open
    /// with the configured keys), while a token may still serve; cleared by a success.
    pub(super) blocked: Mutex<Option<String>>,
    /// The newest record of this lineage saved or read: written back when the store turns out
    /// to have lost it (a Redis flushed or failed over to a stale replica).
    pub(super) known: Mutex<Option<TokenRecord>>,
    /// Refresh attempts by result, for `/metrics`: see [`REFRESH_RESULTS`]. Shared with the
    /// refresher this one continues after a reload, so the counters never go back.
    pub(super) refreshes: Arc<[AtomicU64; 3]>,
    /// The refresh in the air, if any.
    pub(super) flight: Mutex<Flight>,
    /// What one flight leaves the next; only the flight in the air holds it.
    pub(super) lineage: tokio::sync::Mutex<Lineage>,
    /// When the identity server may be called next. Its own `Retry-After` is carried over a
    /// reload that keeps `token_url`; the backoff is not (new settings are tried at once).
    pub(super) retry: Mutex<Retry>,
    /// Until when the redemption in the air, if any, may still be answered: a shutdown waits
    /// for it (see [`Refresher::settle`]).
    pub(super) in_the_air: Mutex<Option<Instant>>,
    /// Set by [`Refresher::settle`]: the process is stopping, nothing new is sent.
    pub(super) stopping: watch::Sender<bool>,
    /// This lineage's records have served here; a different lineage appearing in the store
    /// later means another process logged in anew, and this one must not redeem.
    pub(super) lineage_used: AtomicBool,
    /// Where flights run: the runtime the cache was built on, which outlives every request.
    runtime: Option<Handle>,
    /// Turns true when a reload retires the cache; wakes a flight waiting to retry, so the
    /// successor's settings take over at once.
    pub(super) retired: watch::Sender<bool>,
    /// A DPoP key made for this lineage and not yet kept by a saved record (redeem.rs).
    pub(super) pending_dpop: Mutex<Option<Secret<String>>>,
}

impl Refresher {
    /// The refresher of `upstream`'s own lineage, or of `identity`'s: over the token endpoint
    /// client of `sharing` (the upstream's own refresher) when given.
    pub(super) fn new(
        upstream: &UpstreamConfig,
        identity: Option<&IdentityConfig>,
        current: Arc<Current>,
        store: Arc<dyn StateStore>,
        files: &UpstreamFiles,
        sharing: Option<&Refresher>,
    ) -> Result<Refresher, String> {
        let auth = &match identity {
            Some(identity) => upstream.identity_auth(identity),
            None => upstream.auth.clone(),
        };
        let name = record_name(&upstream.name, identity.map(|i| i.name.as_str()));
        let endpoint = match sharing {
            Some(own) => own.endpoint.sharing(auth)?,
            None => TokenEndpoint::new(upstream, auth, files)?,
        };
        store.lock_life(auth.timeout + super::LOCK_MARGIN);
        // Only a refresh_token grant redeems the config's seed; the others log in with their
        // own credentials, which also name their lineage.
        let seed = match auth.grant {
            Grant::RefreshToken => auth.refresh_token.clone(),
            _ => None,
        };
        Ok(Refresher {
            login: login_command(&name),
            name,
            current,
            seed_hash: lineage_hash(auth),
            seed,
            endpoint,
            store,
            refresh_wait: auth.refresh_wait,
            request_timeout: auth.timeout,
            last_failure: Mutex::new(None),
            unsaved: Mutex::new(None),
            blocked: Mutex::new(None),
            known: Mutex::new(None),
            refreshes: Default::default(),
            flight: Mutex::new(Flight::Idle),
            lineage: tokio::sync::Mutex::new(Lineage::default()),
            retry: Mutex::default(),
            in_the_air: Mutex::new(None),
            stopping: watch::channel(false).0,
            lineage_used: AtomicBool::new(false),
            runtime: Handle::try_current().ok(),
            retired: watch::channel(false).0,
            pending_dpop: Mutex::new(None),
        })
    }

    /// The refresher after a reload, continuing `old`: the refresh counters go on, and the
    /// identity server's own `Retry-After` holds when the token endpoint is the same. For the
    /// same lineage, what was used here counts as used there.
    pub(super) fn continue_from(&mut self, old: &Refresher) {
        self.refreshes = Arc::clone(&old.refreshes);
        if self.endpoint.url() == old.endpoint.url() {
            // The same identity server: it asked to wait, whatever else changed.
            lock(&self.retry).asked = lock(&old.retry).asked;
        }
        if self.seed_hash == old.seed_hash {
            self.lineage_used = AtomicBool::new(old.lineage_used.load(Ordering::Acquire));
        }
    }

    /// A reload retired the cache: no refresh starts here any more, and one waiting to retry
    /// gives up at once. For the same lineage, `next` learns that it was used here.
    pub(super) fn retire(&self, next: &Refresher) {
        self.retired.send_replace(true);
        if next.seed_hash == self.seed_hash && self.lineage_used.load(Ordering::Acquire) {
            next.lineage_used.store(true, Ordering::Release);
        }
    }

    pub(super) fn is_retired(&self) -> bool {
        *self.retired.borrow()
    }

    pub(super) fn count_refresh(&self, counted: Counted) {
        self.refreshes[counted as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Why the refresh side keeps the upstream from being ready whatever token serves, if it
    /// does: a record the identity server issued and the store has not taken, or a stored
    /// record the configured keys do not open.
    pub(super) fn unsaved_reason(&self) -> Option<String> {
        let unsaved = lock(&self.unsaved).clone();
        unsaved.or_else(|| lock(&self.blocked).clone())
    }

    pub(super) fn last_failure(&self) -> Option<String> {
        lock(&self.last_failure).clone()
    }

    /// Remember `e` as the last failure, for readiness and status: only what an attempt met,
    /// never the words of a flight that did not try (they quote this one).
    pub(super) fn failed(&self, e: &TokenError) {
        *lock(&self.last_failure) = Some(e.to_string());
        if let TokenError::Sealed(reason) = e {
            *lock(&self.blocked) = Some(reason.clone());
        }
    }

    /// Wait until `until`; false when the cache was retired first or the process began to
    /// stop ([`Refresher::settle`]).
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

    /// Spawn a flight on the refresher's runtime (the caller's when it was built outside one).
    pub(super) fn spawn(&self, flight: impl std::future::Future<Output = ()> + Send + 'static) {
        match &self.runtime {
            Some(runtime) => drop(runtime.spawn(flight)),
            None => drop(tokio::spawn(flight)),
        }
    }
}
