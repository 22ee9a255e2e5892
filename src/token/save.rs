//! A redeemed record the store will not take (a full disk, a permission changed): it holds the
//! only copy of a refresh token the identity server has just rotated. And waiting, before the
//! process ends, for what a flight redeemed to be saved ([`Refresher::settle`]). Until the store takes
//! it, its flight keeps the store's refresh lock — so nothing of the lineage is redeemed, in
//! this process or another on the store — lets the new access token serve, says why in
//! `/readyz`, and retries the save with backoff.

use super::backoff::{Backoff, RETRY_FIRST};
use super::current::AccessToken;
use super::lock;
use super::refresher::Refresher;

use super::flight::{Flight, Progress};
use crate::store::{RefreshLock, StoreError, TokenRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The longest pause between retries of a save the store refused.
const SAVE_RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a shutdown waits, after a redemption's answer could have come at the latest, for
/// the record to be saved.
const SAVE_AFTER_ANSWER: Duration = Duration::from_secs(5);

impl Refresher {
    /// The store refused `record`, the only copy of a refresh token the identity server has
    /// just rotated. Keep the lock, so nothing redeems meanwhile, here or in another process
    /// on the store; let the waiting requests have the new access token at once; retry the
    /// save with backoff until the store takes it.
    pub(super) async fn save_later(
        &self,
        record: &TokenRecord,
        store_lock: RefreshLock,
        error: StoreError,
        token: Option<Arc<AccessToken>>,
        progress: &watch::Sender<Progress>,
    ) {
        let unsaved = |e: &StoreError| {
            format!(
                "the new refresh token is not saved yet ({e}); tollgate holds the refresh lock and retries, the new access token serves meanwhile, and nothing is redeemed until the store takes it"
            )
        };
        tracing::error!(upstream = %self.name, %error, "the state store did not take the new refresh token; holding the refresh lock and retrying the save");
        *lock(&self.unsaved) = Some(unsaved(&error));
        progress.send_replace(Progress::Unsaved(token));
        let mut backoff = Backoff::new(RETRY_FIRST, SAVE_RETRY_MAX);
        let mut failures = 1u32;
        let saved = loop {
            tokio::time::sleep(backoff.next_delay()).await;
            match self.store.save_token(&self.name, record, &store_lock).await {
                Ok(()) => break true,
                Err(StoreError::Superseded { .. }) => break false,
                Err(e) => {
                    failures += 1;
                    tracing::debug!(upstream = %self.name, error = %e, "the new refresh token is still not saved");
                    *lock(&self.unsaved) = Some(unsaved(&e));
                }
            }
        };
        if saved {
            self.remember(record);
        }
        // Running again until the flight lands: requests join it rather than be told it saves.
        progress.send_replace(Progress::Running);
        *lock(&self.unsaved) = None;
        if !saved {
            tracing::warn!(upstream = %self.name, "another replica saved a newer token record meanwhile; this one is dropped");
            return;
        }
        tracing::info!(upstream = %self.name, failures, "the state store took the new refresh token");
    }

    /// Wait, up to `wait`, until no flight is in the air, so that what one redeemed is saved
    /// (at shutdown, and before `tollgate token` exits); longer while a redemption is sent
    /// and its answer may still come (up to `auth.answer_timeout`), and then for its save.
    /// No token request is sent after this is called. Returns whether none is in the air.
    pub async fn settle(&self, wait: Duration) -> bool {
        // A redemption in the air is waited for; none is started any more (the next start
        // redeems what the store holds), so the wait is bounded by the one in the air.
        self.stopping.send_replace(true);
        let started = Instant::now();
        loop {
            let mut progress = match &*self.flight() {
                Flight::Idle => return true,
                Flight::Busy(p) => p.clone(),
            };
            let answer_by = *lock(&self.in_the_air);
            let deadline = match answer_by {
                Some(by) => (by + SAVE_AFTER_ANSWER).max(started + wait),
                None => started + wait,
            };
            // The task drops its sender when it ends, after making the flight idle.
            let ended = async { while progress.changed().await.is_ok() {} };
            // Looked at again every second: a redemption may be sent meanwhile.
            let look_again = deadline.min(Instant::now() + Duration::from_secs(1));
            if tokio::time::timeout_at(look_again.into(), ended)
                .await
                .is_ok()
                || Instant::now() < deadline
            {
                continue;
            }
            if answer_by.is_some() {
                tracing::error!(upstream = %self.name, "stopping with a refresh sent and not answered: if the identity server processed it, the next refresh token is lost with its answer, and a server that rotates strictly then refuses the one in the store (run `{}`)", self.login);
            } else if let Some(reason) = lock(&self.unsaved).clone() {
                tracing::error!(upstream = %self.name, "{reason}; stopping now loses it: the next start redeems the refresh token before it, which an identity server that rotates refuses (then run `{}`)", self.login);
            }
            return false;
        }
    }
}
