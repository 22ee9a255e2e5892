//! When the store lost records: the newest record this process knows of its lineage is
//! written back — by the flight that finds the store holding less, under the lock, and by the
//! refresh-ahead task when another replica announces less — so the lineage never goes back to
//! an old, long-rotated refresh token.
//!
//! Whatever the store: a file store restored from an old backup, or a shared store that went
//! back without anyone noticing yet. A Redis store also notices a loss by itself and writes
//! back what it saw, without a lock, as soon as it notices (`store/redis/recovery.rs`); this
//! is the net below that, at the moment a refresh would otherwise redeem an old token.

use super::lock;
use super::refresher::Refresher;

use super::flight::Attempt;
use super::LOCK_MARGIN;
use crate::store::{RefreshLock, StoreError, TokenRecord};

impl Refresher {
    /// The store's record, after writing back the newest this cache knows when the store holds
    /// less of its lineage: data lost (a Redis flushed, or failed over to a stale replica)
    /// must not send the lineage back to an old, long-rotated refresh token. Also says whether
    /// it wrote back.
    pub(super) async fn recovered(
        &self,
        store_lock: &RefreshLock,
    ) -> Result<(Option<TokenRecord>, bool), Attempt> {
        let stored = match self.store.load_token(&self.name).await {
            Ok(stored) => stored,
            // Another lineage's record, sealed with a key not configured: what decides is
            // that it is another lineage (a new seed wins over it), not its secrets.
            Err(StoreError::Sealed {
                seed_hash,
                generation,
                why,
                ..
            }) if seed_hash != self.seed_hash => {
                tracing::warn!(upstream = %self.name, generation, %why, "the stored token record is of another lineage and does not open; the config's new seed starts a new lineage, whose first save replaces it");
                Some(TokenRecord::unopened(seed_hash, generation))
            }
            Err(e) => {
                if let StoreError::Sealed { .. } = e {
                    tracing::error!(upstream = %self.name, "{e}");
                }
                return Err(Attempt::store(e));
            }
        };
        let Some(known) = lock(&self.known).clone() else {
            return Ok((stored, false));
        };
        let lost = match &stored {
            None => true,
            Some(s) => s.seed_hash == known.seed_hash && known.is_after(s),
        };
        if !lost {
            return Ok((stored, false));
        }
        match self.store.save_token(&self.name, &known, store_lock).await {
            Ok(()) => {
                tracing::warn!(upstream = %self.name, generation = known.generation, "the state store had lost the newest token record; wrote back the one this process holds");
                Ok((Some(known), true))
            }
            // Another replica wrote back a newer one first.
            Err(StoreError::Superseded { .. }) => {
                let stored = self.store.load_token(&self.name).await;
                Ok((stored.map_err(Attempt::store)?, false))
            }
            Err(e) => Err(Attempt::store(e)),
        }
    }

    /// The store lost records and announced an older generation than this cache knows: write
    /// the newest known back, so that no replica redeems a refresh token rotated before it.
    pub(super) async fn write_back(&self) {
        let hold = self.request_timeout + LOCK_MARGIN;
        let wait = self.refresh_wait;
        let Ok(store_lock) = self.store.lock_refresh(&self.name, wait, hold).await else {
            return;
        };
        let _ = self.recovered(&store_lock).await;
    }

    /// Keep `record` as the newest known, unless a newer one of the lineage is known.
    pub(super) fn remember(&self, record: &TokenRecord) {
        let mut known = lock(&self.known);
        let newer = known
            .as_ref()
            .is_none_or(|k| k.seed_hash != record.seed_hash || record.is_after(k));
        if newer {
            *known = Some(record.clone());
        }
    }
}
