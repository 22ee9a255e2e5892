//! The access token of each upstream: who fetches it, who may redeem a refresh token, and when
//! a request gets one.
//!
//! - [`cache`]: [`TokenCache`], what requests see; its token in use is [`current`], read
//!   lock-free by every request.
//! - [`refresher`]: the refresh side, which publishes into it: [`flight`], one refresh at a
//!   time, run by a task the refresher owns (below); [`redeem`]: one attempt of it (adopt, or
//!   redeem under the lock and save); [`save`]: a redeemed record the store will not take
//!   yet; [`recover`]: writing back what a store lost; [`ahead`]: the refresh-ahead task.
//! - [`pacing`]: when the upstream's refusal (401) may be answered with a new token.
//! - [`grant`]: the token endpoint calls; [`scrub`]: the request's secrets cut out of what the
//!   identity server answers; [`login`]: the authorization-code login.
//!
//! # Who owns a refresh
//!
//! A refresh belongs to no request. The first request that finds no usable token, or the
//! refresh-ahead task, starts a *flight*: a task spawned on the runtime the cache was built on.
//! It takes the store's refresh lock, reads the store again, adopts a newer record another
//! process saved or else redeems, saves the new record, and only then lands. Requests wait for
//! its result and nothing more: a client that gives up drops its own wait, never the refresh,
//! so a rotated refresh token cannot be lost between the identity server's answer and the
//! store.
//!
//! # When locks are released
//!
//! - The store's refresh lock is taken before the store is read (with no token at all, a
//!   usable one another process saved is adopted without it: that only reads), and released
//!   only once the new record is durably saved. A store that finishes a write in the background keeps a share of the lock
//!   until the write has landed ([`crate::store::RefreshLock::share`]).
//! - A redemption that was sent keeps the lock until its answer or its connection's end
//!   (`auth.answer_timeout` at most): the identity server may have rotated already, so the
//!   same refresh token is never sent again meanwhile, here or by another process. One never
//!   answered is sent once more under the same lock.
//! - A failed save keeps the lock: the flight retries the save with backoff until the store
//!   takes the record, so nothing of this lineage is redeemed meanwhile, in this process or in
//!   another on the same store. The new access token serves in the meantime, and `/readyz`
//!   says `degraded` and why.
//! - Between attempts (a failed redemption waiting for its retry) no lock is held.
//! - A process killed during a flight (`kill -9`) leaves the store holding either the old
//!   record, whose refresh token it did not get to redeem or whose answer it never received,
//!   or the new one.
//!
//! # After a reload
//!
//! Changed auth settings get a new cache ([`TokenCache::successor`]) with a refresher of its own:
//! it keeps the running token, inherits no failure, and waits for a refresh under the old
//! settings only while that one holds the store lock. The old cache, retired
//! ([`TokenCache::retire`]), lets a flight in the air land and save, hands what it obtained to
//! its successor, and sends its own waiting requests there.

mod ahead;
pub mod answer;
pub mod assertion;
mod backoff;
mod cache;
mod client_auth;
mod current;
pub mod dpop;
mod exchange;
mod flight;
pub mod grant;
pub mod login;
mod pacing;
mod recover;
mod redeem;
mod refresher;
mod save;
mod scrub;

pub use backoff::Backoff;
pub use cache::TokenCache;
pub use current::{AccessToken, DpopBinding};
pub use refresher::REFRESH_RESULTS;

use crate::config::Grant;
use crate::secret::{sha256_hex, Secret};
use crate::store::TokenRecord;
use answer::Issued;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// A `std` mutex, through a panic elsewhere (the data it guards stays consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    /// The stored record is sealed with a key not configured: it is neither redeemed nor
    /// overwritten until `[state] key` opens it.
    #[error("{0}")]
    Sealed(String),
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

/// How much longer than one token request (`auth.timeout`) a shared store's refresh lock
/// lives: the store's reads and the save fit in it too.
pub(crate) const LOCK_MARGIN: Duration = Duration::from_secs(10);

// Wall-clock milliseconds: stored deadlines must survive a restart, which `Instant` does not.
use crate::store::unix_ms;

/// A duration as a `Retry-After` value: whole seconds, at least 1.
fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64)
}

/// The record to store after the identity server issued `issued` in exchange for `redeemed`,
/// continuing a lineage at `previous_generation` that a login started at `login_at_ms`.
pub(crate) fn new_record(
    seed_hash: &str,
    issued: Issued,
    redeemed: Option<Secret<String>>,
    previous_generation: u64,
    login_at_ms: u64,
    dpop_key: Option<Secret<String>>,
) -> TokenRecord {
    let now = unix_ms();
    TokenRecord {
        seed_hash: seed_hash.to_owned(),
        dpop_key,
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
        login_at_ms,
    }
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
