//! The token caches of an upstream across a reload: its own and each identity's, kept while
//! their settings are unchanged, continued by a successor when they changed (the same lineage
//! keeps its token in use), started anew for a new identity, and retired when dropped.

use super::{refresh_task, Proxy, Running, Task};
use crate::config::{UpstreamConfig, UpstreamFiles};
use crate::token::TokenCache;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Each identity's token cache, by name.
pub(super) type Identities = BTreeMap<String, Arc<TokenCache>>;

impl Proxy {
    /// The token caches `up` needs — its own, and each identity's by name — given what `old`
    /// ran under its name (`files`: what its settings' files hold).
    pub(super) fn caches(
        &self,
        up: &UpstreamConfig,
        old: Option<&Running>,
        files: &UpstreamFiles,
    ) -> Result<(Arc<TokenCache>, Identities), String> {
        let store = Arc::clone(&self.store);
        let tokens = match old {
            Some(o)
                if o.config.auth == up.auth
                    && o.files.same_for_tokens(files)
                    && o.config.pin_sha256 == up.pin_sha256 =>
            {
                Arc::clone(&o.tokens)
            }
            Some(o) => Arc::new(TokenCache::successor(
                &o.tokens, up, None, store, files, None,
            )?),
            None => Arc::new(TokenCache::new(up, store, files)?),
        };
        let mut identities = BTreeMap::new();
        for identity in &up.identities {
            let running = old.and_then(|o| {
                let before = o.config.identity(&identity.name)?;
                let cache = &o.identities.get(&identity.name)?.0;
                Some((o, before, cache))
            });
            let store = Arc::clone(&self.store);
            let cache = match running {
                Some((o, before, cache))
                    if o.config.identity_auth(before) == up.identity_auth(identity)
                        && o.files.same_for_tokens(files)
                        && o.config.pin_sha256 == up.pin_sha256 =>
                {
                    Arc::clone(cache)
                }
                Some((_, _, cache)) => Arc::new(TokenCache::successor(
                    cache,
                    up,
                    Some(identity),
                    store,
                    files,
                    Some(&tokens),
                )?),
                None => {
                    let own = Some(&*tokens);
                    Arc::new(TokenCache::of(up, Some(identity), store, files, own)?)
                }
            };
            identities.insert(identity.name.clone(), cache);
        }
        Ok((tokens, identities))
    }

    /// The identities' caches of the new config, each with its refresh-ahead task: a running
    /// one kept, a replaced one retired in favour of its successor, one the config dropped
    /// retired (taken out of `old`).
    pub(super) fn keep_identities(
        &mut self,
        identities: &Identities,
        old: Option<&mut Running>,
    ) -> BTreeMap<String, (Arc<TokenCache>, Task)> {
        let mut before = old
            .map(|o| std::mem::take(&mut o.identities))
            .unwrap_or_default();
        let mut kept = BTreeMap::new();
        for (name, cache) in identities {
            let task = match before.remove(name) {
                Some((running, task)) if Arc::ptr_eq(&running, cache) => task,
                Some((running, task)) => {
                    running.retire(cache);
                    self.retire_tokens(running, task);
                    refresh_task(cache)
                }
                None => refresh_task(cache),
            };
            kept.insert(name.clone(), (Arc::clone(cache), task));
        }
        for (_, (gone, task)) in before {
            gone.close();
            self.retire_tokens(gone, task);
        }
        kept
    }
}
