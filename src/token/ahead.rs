//! The refresh-ahead task of a token cache: it fetches the first token at once, replaces the
//! token before it is due, retries with backoff while the identity server fails, and on a
//! shared store follows the generations other replicas announce.

use super::backoff::{Backoff, RETRY_FIRST, RETRY_MAX};
use super::lock;
use super::refresher::Refresher;

use super::{Purpose, TokenError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

impl Refresher {
    /// Refresh ahead of expiry until `shutdown` resolves. Fetches the first token at once, so
    /// the first request does not wait for it.
    ///
    /// On a shared store it also follows the generations other replicas announce, taking a
    /// newer token over as soon as it is saved.
    /// When `lazy` (an identity's lineage), it waits for the first token a request brought
    /// before it does anything: an identity never used costs no token request.
    pub async fn refresh_ahead(
        self: Arc<Self>,
        lazy: bool,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut shutdown = Box::pin(shutdown);
        let mut published = self.current.published.subscribe();
        if lazy && self.current.generation() == 0 {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = published.changed() => {}
            }
        }
        // The loop's state (a refresh in it) takes a few KiB: held in a box, made only once the
        // task starts working, so an identity never used costs a small future.
        Box::pin(self.follow(published, shutdown)).await
    }

    /// The refresh-ahead loop proper (see [`Refresher::refresh_ahead`]).
    async fn follow(
        self: Arc<Self>,
        mut published: watch::Receiver<u64>,
        mut shutdown: std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
    ) {
        let mut announced = self.store.announcements(&self.name);
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        let mut wake_at = Instant::now();
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep_until(wake_at.into()) => {}
                _ = published.changed() => {
                    wake_at = self.current.next_wake();
                    continue;
                }
                Some(_) = next_announcement(&mut announced) => {
                    // A write-back may wait for the lock: never past a shutdown.
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = self.take_announced() => {}
                    }
                    continue;
                }
            }
            let purpose = if self.current.cached().is_some() {
                Purpose::Ahead
            } else {
                Purpose::Missing
            };
            // The flight runs on without this wait: a shutdown does not wait for its pauses.
            let refreshed = tokio::select! {
                _ = &mut shutdown => return,
                refreshed = self.refresh(purpose, None) => refreshed,
            };
            match refreshed {
                Ok(_) => {
                    backoff.reset();
                    wake_at = self.current.next_wake();
                }
                Err(TokenError::NeedsLogin(_) | TokenError::Refused(_)) => {
                    // Final until the store changes; look again now and then for a login.
                    wake_at = Instant::now() + Duration::from_secs(30);
                }
                Err(TokenError::Unavailable { retry_after, .. }) => {
                    wake_at = Instant::now() + backoff.next_delay().max(retry_after);
                }
                Err(TokenError::Store(_) | TokenError::Sealed(_)) => {
                    wake_at = Instant::now() + backoff.next_delay();
                }
            }
        }
    }

    /// A generation another replica saved and announced: take its token over, without the
    /// lock (it only reads), when it is of this lineage, newer and usable; write back what
    /// this process knows when the store holds less (it lost data).
    async fn take_announced(&self) {
        let Ok(Some(record)) = self.store.load_token(&self.name).await else {
            return;
        };
        let behind = lock(&self.known)
            .as_ref()
            .is_some_and(|k| k.seed_hash == record.seed_hash && k.is_after(&record));
        if behind {
            // The store lost data and another replica wrote back less than this one knows.
            self.write_back().await;
            return;
        }
        if record.seed_hash != self.seed_hash || record.generation <= self.current.floor() {
            return;
        }
        self.remember(&record);
        if let Some(token) = self
            .current
            .token_from(&record)
            .filter(|t| t.is_usable(Instant::now()))
        {
            tracing::debug!(upstream = %self.name, generation = token.generation, "using the token another replica announced");
            // Unless a flight published a newer one meanwhile.
            self.current.publish_if_newer(Arc::new(token));
        }
    }
}

/// The next generation announced on `announced`; never, when nothing is announced.
async fn next_announcement(announced: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    match announced {
        Some(receiver) => match receiver.changed().await {
            Ok(()) => Some(*receiver.borrow_and_update()),
            // The store is gone: nothing more will come.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
