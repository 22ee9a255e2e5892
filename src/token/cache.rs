//! [`TokenCache`]: the access token of one upstream, as requests see it. Reads are lock-free
//! ([`Current`]); what it lacks comes from its [`Refresher`], which never runs on a request's
//! behalf alone (see [`super::flight`]). It also decides when the upstream's refusal (401) is
//! answered with a new token, says whether the upstream is ready, and after a reload points
//! requests still holding it at its successor.

use super::current::Current;
use super::pacing::Pacing;
use super::refresher::{Refresher, REFRESH_RESULTS};
use super::{AccessToken, Purpose, TokenError};
use crate::config::{IdentityConfig, UpstreamConfig, UpstreamFiles};
use crate::store::{StateStore, OWN_IDENTITY};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The token cache of one upstream.
pub struct TokenCache {
    name: String,
    /// The token in use, shared with the refresher, which publishes into it.
    current: Arc<Current>,
    refresher: Arc<Refresher>,
    /// Shared with the cache this one continues after a reload.
    pacing: Arc<Pacing>,
    /// Set by [`TokenCache::retire`]. The chain only points forward, so it holds no cycle.
    next: OnceLock<Arc<TokenCache>>,
    /// An identity's cache: nothing is fetched until a request needs it.
    lazy: bool,
    /// The identity's name, or [`crate::store::OWN_IDENTITY`] for the upstream's own.
    identity: String,
    /// When a request last took a token from it (Unix seconds; 0: never), for an identity's.
    last_used: AtomicU64,
}

impl TokenCache {
    /// The cache of `upstream`'s own lineage.
    pub fn new(
        upstream: &UpstreamConfig,
        store: Arc<dyn StateStore>,
        files: &UpstreamFiles,
    ) -> Result<Self, String> {
        TokenCache::of(upstream, None, store, files, None)
    }

    /// The cache of `identity`'s lineage (`None`: the upstream's own), its token requests
    /// sent over the client of `sharing` (the upstream's own cache) when given: identities
    /// share the upstream's connections and TLS settings, a few KiB each instead of a client.
    pub fn of(
        upstream: &UpstreamConfig,
        identity: Option<&IdentityConfig>,
        store: Arc<dyn StateStore>,
        files: &UpstreamFiles,
        sharing: Option<&TokenCache>,
    ) -> Result<Self, String> {
        let (current, refresher) = parts(upstream, identity, store, files, sharing)?;
        Ok(TokenCache::assemble(current, refresher, identity))
    }

    fn assemble(
        current: Arc<Current>,
        refresher: Refresher,
        identity: Option<&IdentityConfig>,
    ) -> Self {
        TokenCache {
            lazy: identity.is_some(),
            identity: identity
                .map_or(OWN_IDENTITY, |i| i.name.as_str())
                .to_owned(),
            last_used: AtomicU64::new(0),
            name: refresher.name.clone(),
            current,
            refresher: Arc::new(refresher),
            pacing: Arc::default(),
            next: OnceLock::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The identity whose lineage this is: its name, or `-` for the upstream's own.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether this is an identity's cache, not the upstream's own.
    #[inline]
    pub fn is_identity(&self) -> bool {
        self.lazy
    }

    /// A request took a token from this cache now (kept to the second: a store only when the
    /// second changed, so requests at once do not contend for the line).
    pub fn mark_used(&self) {
        let now = crate::store::unix_ms() / 1000;
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// How long ago a request last took a token from it ([`TokenCache::mark_used`]), if ever.
    pub fn last_used(&self) -> Option<Duration> {
        let at = self.last_used.load(Ordering::Relaxed);
        (at > 0).then(|| Duration::from_secs((crate::store::unix_ms() / 1000).saturating_sub(at)))
    }

    /// Why its last refresh failed, or a record is unsaved or sealed away; `None` for one
    /// that never failed (an identity never used yet, say).
    pub fn failure(&self) -> Option<String> {
        self.refresher
            .unsaved_reason()
            .or_else(|| self.refresher.last_failure())
    }

    /// The cache for `upstream` after a reload changed its auth settings or CA, continuing
    /// `old`, whose refresh counters it carries on. For the same lineage (grant, `client_id`,
    /// seed) the running token stays in use (no readiness flicker) and is due at once, so the
    /// next one is fetched with the new settings, and the 401 pacing carries over. Its flight
    /// is its own: no failure of the old settings is inherited. A new lineage starts afresh.
    pub fn successor(
        old: &TokenCache,
        upstream: &UpstreamConfig,
        identity: Option<&IdentityConfig>,
        store: Arc<dyn StateStore>,
        files: &UpstreamFiles,
        sharing: Option<&TokenCache>,
    ) -> Result<Self, String> {
        let (current, mut refresher) = parts(upstream, identity, store, files, sharing)?;
        refresher.continue_from(&old.refresher);
        let same_lineage = refresher.seed_hash == old.refresher.seed_hash;
        let mut next = TokenCache::assemble(current, refresher, identity);
        next.last_used = AtomicU64::new(old.last_used.load(Ordering::Relaxed));
        if same_lineage {
            next.pacing = Arc::clone(&old.pacing);
            next.current.continue_from(&old.current);
        }
        Ok(next)
    }

    /// A reload put `next` in this cache's place: requests still holding this cache get their
    /// new tokens from `next`; no refresh starts here any more, and one waiting to retry gives
    /// up at once; one holding the store lock lands and saves, and hands its token to `next`
    /// when both serve the same lineage.
    pub fn retire(&self, next: &Arc<TokenCache>) {
        let _ = self.next.set(Arc::clone(next));
        if next.refresher.seed_hash == self.refresher.seed_hash {
            self.current.hand_over(&next.current);
        }
        self.refresher.retire(&next.refresher);
    }

    /// A reload dropped this cache's identity (or its upstream), with no successor: a
    /// refresh in the air lands and saves, and none starts any more; requests still holding
    /// it get 503.
    pub fn close(&self) {
        self.refresher.retired.send_replace(true);
    }

    /// The cache that replaced this one.
    fn replaced_by(&self) -> Option<&Arc<TokenCache>> {
        self.next.get()
    }

    /// Refresh attempts so far, by result: `ok`, `error` (will be retried), `refused` (the
    /// identity server refused the grant or the client).
    pub fn refreshes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REFRESH_RESULTS
            .iter()
            .zip(self.refresher.refreshes.iter())
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
    }

    /// Why the upstream is not ready, or `None` when it is: a usable token, and every record
    /// the identity server issued saved.
    pub fn unready_reason(&self) -> Option<String> {
        if let Some(reason) = self.refresher.unsaved_reason() {
            return Some(reason);
        }
        if self.cached().is_some() {
            return None;
        }
        let failure = self.refresher.last_failure();
        Some(failure.unwrap_or_else(|| "no token yet".to_owned()))
    }

    /// The current token, if it may still be injected. Lock-free; the hot path.
    #[inline]
    pub fn cached(&self) -> Option<Arc<AccessToken>> {
        self.current.cached()
    }

    /// A usable token for a client request: the cached one, or the result of a refresh,
    /// waited for `auth.refresh_wait` at most.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<AccessToken>, TokenError> {
        self.get_within(self.refresher.refresh_wait).await
    }

    /// A usable token: the cached one, or the result of a refresh, waited for `patience` at
    /// most (`tollgate token` waits as long as a token request can take).
    pub async fn get_within(
        self: &Arc<Self>,
        patience: Duration,
    ) -> Result<Arc<AccessToken>, TokenError> {
        match self.cached() {
            Some(t) => Ok(t),
            None => {
                let until = Instant::now() + patience;
                self.refresh(Purpose::Missing, until).await
            }
        }
    }

    /// The longest one token request may take (connecting, the answer's ceiling).
    pub fn longest_request(&self) -> Duration {
        self.refresher.endpoint.longest_request()
    }

    /// Whether the upstream's refusal of `token` may be answered with a new token (see
    /// [`super::pacing`]).
    pub fn may_replace(&self, token: &AccessToken) -> bool {
        self.pacing
            .may_replace(&self.name, token.generation, self.current.generation())
    }

    /// What the upstream made of a replay with a new token (see [`TokenCache::may_replace`]).
    pub fn replayed(&self, refused: bool) {
        self.pacing.replayed(refused);
    }

    /// The upstream refused `generation`: drop it and get a newer one. A request that carried an
    /// older generation than the current one simply gets the current one.
    pub async fn replace_rejected(
        self: &Arc<Self>,
        generation: u64,
    ) -> Result<Arc<AccessToken>, TokenError> {
        self.current.refuse(generation);
        if let Some(next) = self.replaced_by() {
            return Box::pin(next.replace_rejected(generation)).await;
        }
        let until = Instant::now() + self.refresher.refresh_wait;
        self.refresh(Purpose::Rejected(generation), until).await
    }

    /// A token good enough for `purpose`, from this cache's refresher or, once a reload retired
    /// it, from its successor's; waited for until `until` at most.
    async fn refresh(
        self: &Arc<Self>,
        purpose: Purpose,
        until: Instant,
    ) -> Result<Arc<AccessToken>, TokenError> {
        loop {
            if let Some(next) = self.replaced_by() {
                return Box::pin(next.refresh(purpose, until)).await;
            }
            match self.refresher.refresh(purpose, Some(until)).await {
                // Retired meanwhile: the successor answers with the new settings.
                Err(_) if self.replaced_by().is_some() => {}
                result => return result,
            }
        }
    }

    /// Refresh ahead of expiry until `shutdown` resolves (see [`super::ahead`]); an
    /// identity's cache only once a request brought its first token.
    pub async fn refresh_ahead(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let lazy = self.lazy;
        Arc::clone(&self.refresher)
            .refresh_ahead(lazy, shutdown)
            .await
    }

    /// Wait, up to `wait`, until no flight is in the air (see [`Refresher::settle`]). Returns
    /// whether none is.
    pub async fn settle(&self, wait: Duration) -> bool {
        self.refresher.settle(wait).await
    }
}

/// A new cache's token in use and its refresher, publishing into it (see [`TokenCache::of`]).
fn parts(
    upstream: &UpstreamConfig,
    identity: Option<&IdentityConfig>,
    store: Arc<dyn StateStore>,
    files: &UpstreamFiles,
    sharing: Option<&TokenCache>,
) -> Result<(Arc<Current>, Refresher), String> {
    let current = Arc::new(Current::new(upstream.auth.refresh_before));
    let own = sharing.map(|c| &*c.refresher);
    let refresher = Refresher::new(upstream, identity, Arc::clone(&current), store, files, own)?;
    Ok((current, refresher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::FileStore;

    fn cache() -> (TokenCache, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "[state]\nstore = \"file:{}\"\n[[upstream]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nurl = \"http://127.0.0.1:9/\"\n[upstream.auth]\ngrant = \"client_credentials\"\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
            tmp.path().display()
        );
        let config = Config::parse(&text, "t.toml", |_| None).unwrap();
        let store = Arc::new(FileStore::open(tmp.path()).unwrap());
        (
            TokenCache::new(&config.upstreams[0], store, &Default::default()).unwrap(),
            tmp,
        )
    }

    /// A flight whose task is dropped before it ever runs (its runtime is gone) still leaves
    /// the cache idle: requests get an error instead of waiting forever, and `settle` ends.
    #[test]
    fn a_flight_dropped_before_it_runs_leaves_the_cache_idle() {
        let built = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (cache, _tmp) = built.block_on(async { cache() });
        let cache = Arc::new(cache);
        drop(built);
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        other.block_on(async {
            for _ in 0..2 {
                let waited = tokio::time::timeout(Duration::from_secs(5), cache.get()).await;
                assert!(waited.expect("answered, not stuck").is_err());
            }
            let settled =
                tokio::time::timeout(Duration::from_secs(5), cache.settle(Duration::from_secs(1)));
            assert!(settled.await.expect("settle ends"));
        });
    }
}
