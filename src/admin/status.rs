//! What the admin listener reports about each upstream, gathered in one place.
//!
//! [`gather`] reads the token caches and quotas once into a [`Status`]; `/status` serialises it
//! as JSON, `/` draws it as HTML, and `tollgate status` reads the JSON back into the same type
//! to print a table. A `Status` holds token *states* (ready, generation, expiry), never a token.

use super::Upstream;
use crate::store::StateStore;
use crate::token::TokenCache;
use crate::usage::describe;
use crate::usage::forecast::SLOT_MS;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Every upstream's token state and quota usage: the `/status` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub upstreams: Vec<UpstreamStatus>,
    /// A state store shared by several replicas; absent for a store of this machine alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStatus>,
}

/// A shared state store, as this replica sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreStatus {
    /// The store (no password).
    pub store: String,
    /// This replica's id, as it printed it at start.
    pub replica: String,
    /// The replicas seen in the last 30 s.
    pub replicas: Vec<String>,
    /// Why the store is failing, while it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub token: TokenState,
    pub quota: QuotaStatus,
    /// The day's use by the group, once it was read from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<DayStatus>,
    /// Each `[[upstream.identity]]`'s token (never the token itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityStatus>,
}

/// One identity's token, and when a request last used it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub name: String,
    pub token: TokenState,
    /// Seconds since a request last took its token; absent when none ever did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_s: Option<u64>,
}

/// Who spent the day, per 15 minutes and per key, and when it will run out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DayStatus {
    /// When the day started (RFC 3339, UTC).
    pub started: String,
    /// Seconds since the day started, when it was read.
    pub elapsed_s: u64,
    /// The length of one slot, in seconds (900).
    pub slot_s: u64,
    /// Requests sent upstream per slot since the day started, by every replica.
    pub slots: Vec<u64>,
    pub used: u64,
    /// The daily limit, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The forecast in words ("at this pace the limit is reached at 16:40 UTC").
    pub forecast: String,
    /// Seconds until the limit is reached at this pace; absent when not today.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted_in_s: Option<u64>,
    /// Every key the config lists and every key that sent today, by name.
    pub keys: Vec<KeyStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The key's name (`#N` for the Nth plain key; `-` for requests without a key).
    pub name: String,
    pub used_today: u64,
    /// The key's daily budget, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<u64>,
}

/// Whether the upstream has a token that may be injected now.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum TokenState {
    Ready {
        generation: u64,
        expires_in_s: u64,
    },
    Unready {
        reason: Option<String>,
    },
    /// An identity no request has used yet: it fetches nothing until one does.
    Unused,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QuotaStatus {
    /// The counted windows: `second`, `minute`, `hour`, `day`, those that are configured.
    pub windows: Vec<WindowStatus>,
    /// Requests sent upstream now, with a `concurrency` limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u32>,
    /// Requests in the wait line, with a `concurrency` limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u32>,
    /// Seconds left of a hold-back after the API answered 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_back_s: Option<u64>,
    /// Requests tollgate refused itself, by reason; reasons with none are left out.
    #[serde(default)]
    pub rejected: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowStatus {
    pub window: String,
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    pub resets_in_s: u64,
}

/// Read each upstream's token cache and quota, and the shared store, now.
pub fn gather(upstreams: &[Upstream], store: &dyn StateStore) -> Status {
    Status {
        upstreams: upstreams.iter().map(upstream).collect(),
        store: store.health().map(|h| StoreStatus {
            store: h.store,
            replica: h.replica,
            replicas: h.replicas,
            problem: h.problem,
        }),
    }
}

/// What a token cache has to show: a usable token, or why not.
fn token_state(tokens: &TokenCache) -> TokenState {
    match tokens.cached() {
        Some(t) => TokenState::Ready {
            generation: t.generation,
            expires_in_s: t
                .expires_at
                .duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs()),
        },
        None => TokenState::Unready {
            reason: tokens.unready_reason(),
        },
    }
}

fn identity(tokens: &TokenCache) -> IdentityStatus {
    let last_used = tokens.last_used();
    let token = match (last_used, tokens.failure()) {
        // Nothing fetched yet, and nothing failed: not a problem.
        (None, None) if tokens.cached().is_none() => TokenState::Unused,
        _ => token_state(tokens),
    };
    IdentityStatus {
        name: tokens.identity().to_owned(),
        token,
        last_used_s: last_used.map(|d| d.as_secs()),
    }
}

fn upstream(u: &Upstream) -> UpstreamStatus {
    let token = token_state(&u.tokens);
    let windows = u
        .quota
        .windows()
        .iter()
        .map(|w| WindowStatus {
            window: w.policy.name.to_owned(),
            limit: w.policy.limit,
            used: w.policy.limit - w.remaining,
            remaining: w.remaining,
            resets_in_s: w.reset.as_secs(),
        })
        .collect();
    let line = u.quota.line();
    UpstreamStatus {
        name: u.name.clone(),
        day: day(u),
        token,
        identities: u.identities.iter().map(|t| identity(t)).collect(),
        quota: QuotaStatus {
            windows,
            in_flight: line.map(|(in_flight, _)| in_flight),
            waiting: line.map(|(_, waiting)| waiting),
            held_back_s: u.quota.held_for().map(|d| d.as_secs()),
            rejected: u
                .quota
                .rejected()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| (r.as_str().to_owned(), n))
                .collect(),
        },
    }
}

/// The day's use as last read, with the keys the config lists and their budgets.
fn day(u: &Upstream) -> Option<DayStatus> {
    let day = u.usage.day()?;
    let budgets: Vec<_> = u.quota.budgets().collect();
    let keys = u
        .usage
        .by_key(&day)
        .into_iter()
        .map(|(name, used_today)| KeyStatus {
            budget: budgets
                .iter()
                .find(|(n, _)| ***n == *name)
                .map(|(_, w)| w.policy.limit),
            name,
            used_today,
        })
        .collect();
    let forecast = day.forecast();
    let exhausted_in_s = day.exhausted_in_s();
    let started = UNIX_EPOCH + Duration::from_millis(day.period.start_ms);
    Some(DayStatus {
        started: humantime::format_rfc3339_seconds(started).to_string(),
        elapsed_s: (day.read_at_ms - day.period.start_ms) / 1000,
        slot_s: SLOT_MS / 1000,
        used: day.used(),
        limit: day.limit,
        forecast: describe(forecast),
        exhausted_in_s,
        keys,
        slots: day.slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON keeps the shape `/status` has always had, and reads back into the same type.
    #[test]
    fn json_shape_and_round_trip() {
        let status = Status {
            upstreams: vec![
                UpstreamStatus {
                    identities: Vec::new(),
                    name: "api".into(),
                    token: TokenState::Ready {
                        generation: 3,
                        expires_in_s: 120,
                    },
                    quota: QuotaStatus {
                        windows: vec![WindowStatus {
                            window: "day".into(),
                            limit: 10,
                            used: 4,
                            remaining: 6,
                            resets_in_s: 60,
                        }],
                        in_flight: Some(1),
                        waiting: Some(0),
                        held_back_s: None,
                        rejected: BTreeMap::from([("per_day".to_owned(), 2)]),
                    },
                    day: None,
                },
                UpstreamStatus {
                    identities: Vec::new(),
                    name: "other".into(),
                    token: TokenState::Unready {
                        reason: Some("no token yet".into()),
                    },
                    quota: QuotaStatus::default(),
                    day: None,
                },
            ],
            store: None,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"upstreams": [
                {"name": "api",
                 "token": {"state": "ready", "generation": 3, "expires_in_s": 120},
                 "quota": {"windows": [{"window": "day", "limit": 10, "used": 4,
                                        "remaining": 6, "resets_in_s": 60}],
                           "in_flight": 1, "waiting": 0, "rejected": {"per_day": 2}}},
                {"name": "other",
                 "token": {"state": "unready", "reason": "no token yet"},
                 "quota": {"windows": [], "rejected": {}}}
            ]})
        );
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back.upstreams[1].name, "other");
        assert_eq!(back.upstreams[0].quota.in_flight, Some(1));
    }
}
