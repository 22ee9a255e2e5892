//! The limits of each identity's own requests (`per_minute`, `concurrency`, `queue` of an
//! `[[upstream.identity]]`, or `[upstream.quota.per_identity]`): a small [`Quota`] per identity
//! label, entered and spent before the upstream's, whose refusals name the identity. Its
//! rejections count with the upstream's; a short window on a shared store is counted under
//! `upstream@identity`, as the identity's record is named.
//!
//! Must not: count an identity's request in the upstream's windows (that is [`Quota::spend`]).

use super::{Hold, Limits, Quota, QuotaError};
use crate::config::QuotaConfig;
use crate::store::{record_name, OWN_IDENTITY};
use std::collections::BTreeMap;
use std::sync::Arc;

impl Quota {
    /// The limits of each identity in `limits` (label, config): this quota's own where the
    /// numbers did not change, else a successor of it, or a new one.
    pub(super) fn identity_successors(
        &self,
        limits: &[(String, QuotaConfig)],
    ) -> BTreeMap<Arc<str>, Arc<Quota>> {
        let none = Limits::default();
        let each = limits.iter().map(|(name, config)| {
            let quota = match self.identities.get(name.as_str()) {
                Some(q) if q.config.as_ref() == Some(config) => Arc::clone(q),
                Some(q) => Arc::new(q.successor(Some(config), none)),
                None => {
                    let identity = (name != OWN_IDENTITY).then_some(name.as_str());
                    let label = match identity {
                        Some(_) => record_name(&self.upstream, identity),
                        // Apart from the upstream's own windows, which count every identity.
                        None => format!("{}@{OWN_IDENTITY}", self.upstream),
                    };
                    let store = Arc::clone(&self.store);
                    let (hold, rejected) = (Arc::new(Hold::default()), Arc::clone(&self.rejected));
                    let empty = Quota::empty(&label, store, self.clock.clone(), hold, rejected);
                    Arc::new(empty.successor(Some(config), none))
                }
            };
            (Arc::from(name.as_str()), quota)
        });
        each.collect()
    }

    /// Whether the identities' limits are exactly `limits`.
    pub(super) fn enforces_identities(&self, limits: &[(String, QuotaConfig)]) -> bool {
        self.identities.len() == limits.len()
            && limits.iter().all(|(name, config)| {
                let quota = self.identities.get(name.as_str());
                quota.is_some_and(|q| q.config.as_ref() == Some(config))
            })
    }

    /// Hand each identity's limits over to `next`'s: the line resized, the windows counted
    /// on; an identity that no longer has limits hands over to none.
    pub(super) async fn hand_over_identities(
        &self,
        next: &Quota,
    ) -> Result<(), crate::store::StoreError> {
        let mut outcome = Ok(());
        for (name, old) in &self.identities {
            let new = match next.identities.get(name) {
                Some(new) if Arc::ptr_eq(old, new) => continue,
                Some(new) => Arc::clone(new),
                None => Arc::new(old.successor(None, Limits::default())),
            };
            outcome = outcome.and(Box::pin(old.hand_over(&new)).await);
        }
        outcome
    }
}

/// A refusal by `identity`'s own limits, in words that say whose they are.
pub(super) fn named(error: QuotaError, identity: &str) -> QuotaError {
    match error {
        QuotaError::Refused(mut refusal) => {
            let whose = match identity {
                OWN_IDENTITY => "the upstream's own identity".to_owned(),
                name => format!("identity `{name}`"),
            };
            refusal.detail = format!("{whose} (its own limits): {}", refusal.detail);
            QuotaError::Refused(refusal)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Clock, Reason};
    use super::*;
    use crate::store::{FileStore, StateStore};

    fn limits(per_minute: Option<u32>, concurrency: Option<u32>) -> QuotaConfig {
        QuotaConfig::limits(per_minute, concurrency, Some(0))
    }

    fn refused(error: QuotaError) -> super::super::Refusal {
        match error {
            QuotaError::Refused(r) => r,
            other => panic!("expected a refusal, got {other}"),
        }
    }

    #[tokio::test]
    async fn each_identity_has_its_own_line_and_minute_inside_the_upstreams() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(tmp.path()).unwrap());
        let clock = Clock::manual(1_700_000_000_000);
        let upstream = QuotaConfig::limits(None, Some(3), Some(0));
        let each = [
            (OWN_IDENTITY.to_owned(), limits(None, Some(1))),
            ("alice".to_owned(), limits(Some(2), Some(1))),
        ];
        let with = Limits {
            budgets: &[],
            identities: &each,
        };
        let q = Quota::new("api", Some(&upstream), with, store, clock);

        // One in flight per identity; an identity without limits of its own is only held by
        // the upstream's line.
        let own = q.enter(OWN_IDENTITY).await.unwrap().unwrap();
        let r = refused(q.enter(OWN_IDENTITY).await.unwrap_err());
        assert_eq!(r.reason, Reason::QueueFull);
        assert!(
            r.detail.starts_with(
                "the upstream's own identity (its own limits): the limit of 1 in flight"
            ),
            "{}",
            r.detail
        );
        let alice = q.enter("alice").await.unwrap().unwrap();
        let bob = q.enter("bob").await.unwrap().unwrap();
        assert_eq!(
            q.line(),
            Some((3, 0)),
            "each holds a place in the upstream's line"
        );
        let r = refused(q.enter("carol").await.unwrap_err());
        assert!(
            r.detail.starts_with("the limit of 3 in flight"),
            "{}",
            r.detail
        );
        drop((own, bob));
        // Alice is refused by her own line before she could take the upstream's free place.
        let r = refused(q.enter("alice").await.unwrap_err());
        assert!(
            r.detail.starts_with("identity `alice` (its own limits)"),
            "{}",
            r.detail
        );
        assert_eq!(q.line(), Some((1, 0)));
        drop(alice);

        // Alice's own minute is the tightest window, and refuses on its own.
        let w = q.spend(None, "alice").await.unwrap().unwrap();
        assert_eq!((w.policy.name, w.remaining), ("minute", 1));
        q.spend(None, "alice").await.unwrap();
        let r = refused(q.spend(None, "alice").await.unwrap_err());
        assert_eq!(r.reason, Reason::PerMinute);
        assert!(r.detail.contains("identity `alice`"), "{}", r.detail);
        assert!(q.spend(None, OWN_IDENTITY).await.is_ok(), "others go on");
        let counted = q.rejected().find(|(r, _)| *r == Reason::PerMinute);
        assert_eq!(
            counted,
            Some((Reason::PerMinute, 1)),
            "counted with the upstream's"
        );
    }

    /// While the upstream holds back after its 429, a request is refused before it spends
    /// anything of its identity's minute.
    #[tokio::test]
    async fn a_hold_spends_nothing_of_an_identitys_minute() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(tmp.path()).unwrap());
        let clock = Clock::manual(1_700_000_000_000);
        let each = [("alice".to_owned(), limits(Some(2), None))];
        let with = Limits {
            budgets: &[],
            identities: &each,
        };
        let q = Quota::new("api", None, with, store, clock);
        q.upstream_answered(http::StatusCode::TOO_MANY_REQUESTS, &http::HeaderMap::new());
        for _ in 0..3 {
            let r = refused(q.spend(None, "alice").await.unwrap_err());
            assert_eq!(r.reason, Reason::UpstreamThrottled);
        }
        let minute = q.identities["alice"].windows()[0];
        assert_eq!(minute.remaining, 2, "nothing of alice's minute spent");
    }

    #[tokio::test]
    async fn a_reload_keeps_an_identitys_line_and_drops_a_removed_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(tmp.path()).unwrap());
        let clock = Clock::manual(1_700_000_000_000);
        let one = [("alice".to_owned(), limits(None, Some(1)))];
        let with = |identities| Limits {
            budgets: &[],
            identities,
        };
        let old = Arc::new(Quota::new("api", None, with(&one), store, clock));
        let held = old.enter("alice").await.unwrap();
        assert!(old.enforces(None, with(&one)));

        let two = [("alice".to_owned(), limits(None, Some(2)))];
        assert!(!old.enforces(None, with(&two)));
        let new = Arc::new(old.successor(None, with(&two)));
        old.hand_over(&new).await.unwrap();
        let second = new.enter("alice").await.unwrap();
        assert!(
            new.enter("alice").await.is_err(),
            "the held place still counts"
        );
        drop((held, second));

        // A request still holding the old quota follows the hand-over; an identity whose
        // limits are gone is limited no more.
        let gone = Arc::new(new.successor(None, with(&[])));
        new.hand_over(&gone).await.unwrap();
        let places: Vec<_> = places_of_alice(&old, 3).await;
        assert!(
            places.iter().all(Option::is_none),
            "no line is left to hold"
        );
    }

    async fn places_of_alice(q: &Quota, n: usize) -> Vec<Option<super::super::Slot>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(q.enter("alice").await.unwrap());
        }
        out
    }
}
