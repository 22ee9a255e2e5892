//! What a Redis's own settings mean for what tollgate keeps there, said at the start: no
//! `appendonly` (a restart loses the last writes), a `maxmemory-policy` that evicts (a lock or
//! a count can vanish). Managed services that refuse `CONFIG` are not an error.

use super::RedisStore;
use std::collections::HashMap;

impl RedisStore {
    /// What to say at the start about this Redis: that it does not answer, or that its
    /// settings can lose what tollgate keeps there (no appendonly, keys evicted when full).
    pub(super) async fn check_settings(&self) -> Vec<String> {
        let ping = self
            .link
            .run(
                |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await },
                true,
            )
            .await;
        if let Err(reason) = ping {
            return vec![format!(
                "the state store {} does not answer: {reason}; requests that need it get 503 until it does",
                self.shown
            )];
        }
        // Managed Redis services often refuse CONFIG: then nothing can be said, and nothing
        // failed (it is not counted as an error of the store).
        let answer = self
            .link
            .run(
                |mut c| async move {
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg("appendonly")
                        .arg("maxmemory-policy")
                        .query_async::<HashMap<String, String>>(&mut c)
                        .await
                },
                true,
            )
            .await;
        let Ok(settings) = answer else {
            return Vec::new();
        };
        let mut warnings = Vec::new();
        if settings.get("appendonly").map(String::as_str) == Some("no") {
            warnings.push(format!(
                "the state store {} runs without appendonly: a restart of Redis loses what tollgate wrote since its last snapshot; the replicas then write back the newest token record and counts they know, but set `appendonly yes` (see docs/replicas.md)",
                self.shown
            ));
        }
        if let Some(policy) = settings
            .get("maxmemory-policy")
            .filter(|p| p.as_str() != "noeviction")
        {
            warnings.push(format!(
                "the state store {} evicts keys when it is full (maxmemory-policy {policy}): a refresh lock or a count can vanish at any moment, and then a refresh token is redeemed twice or the day counted again; set `maxmemory-policy noeviction` (see docs/replicas.md)",
                self.shown
            ));
        }
        warnings
    }
}
