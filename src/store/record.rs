//! A token record as a store keeps it: the plain fields the stores compare (lineage,
//! generation, login time) and the lifetime, and the secrets (refresh and access token)
//! either plain or, with `[state] key`, sealed ([`crate::seal`]) and bound to the record's
//! [`Place`] and plain fields. Both stores write and read records through here, as JSON.

use crate::seal::{Keys, Sealed};
use crate::secret::Secret;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// How the upstream's own identity is named where an identity is: the store, the sealing's
/// associated data (no identity name can be `-`).
pub const OWN_IDENTITY: &str = "-";

/// What joins an upstream and one of its identities in a record's name (`api@alice`): no
/// upstream or identity name can contain it.
pub const IDENTITY_SEPARATOR: char = '@';

/// The name a store keeps a lineage's record under: the upstream's own is the upstream's name
/// (`api`, as before identities), an identity's is `api@alice`.
pub fn record_name(upstream: &str, identity: Option<&str>) -> String {
    match identity {
        None => upstream.to_owned(),
        Some(identity) => format!("{upstream}{IDENTITY_SEPARATOR}{identity}"),
    }
}

/// The persisted token state of one upstream.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// SHA-256 of the seed this lineage grew from; a different seed in the config wins.
    pub seed_hash: String,
    /// The newest refresh token of the lineage, if the grant has one.
    pub refresh_token: Option<Secret<String>>,
    pub access_token: Option<Secret<String>>,
    /// When the access token was issued and when it expires, in Unix milliseconds.
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// Counts refreshes of this lineage; the cache uses it to tell tokens apart.
    pub generation: u64,
    /// When `tollgate login` started this lineage (Unix ms); 0 when it grew from the seed in
    /// the config. A newer login wins over any generation of an older one.
    pub login_at_ms: u64,
    /// The lineage's DPoP key (PKCS#8, base64url), with `auth.dpop`: its tokens are bound to it.
    pub dpop_key: Option<Secret<String>>,
}

impl TokenRecord {
    /// Whether this record comes after `other` in their lineage: a later login, or a later
    /// generation of the same login.
    pub fn is_after(&self, other: &TokenRecord) -> bool {
        (self.login_at_ms, self.generation) > (other.login_at_ms, other.generation)
    }
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("seed_hash", &self.seed_hash)
            .field("refresh_token", &self.refresh_token)
            .field("access_token", &self.access_token)
            .field("dpop_key", &self.dpop_key)
            .field("issued_at_ms", &self.issued_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("generation", &self.generation)
            .field("login_at_ms", &self.login_at_ms)
            .finish()
    }
}

/// The command that logs the lineage kept under `name` ([`record_name`]) in anew.
pub fn login_command(name: &str) -> String {
    match name.split_once(IDENTITY_SEPARATOR) {
        Some((upstream, identity)) => format!("tollgate login {upstream} --identity {identity}"),
        None => format!("tollgate login {name}"),
    }
}

/// Where a record lives; its seal is bound to it, so a record copied elsewhere does not open.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The store's namespace: `[state] prefix` on Redis, empty for a state directory.
    pub namespace: &'a str,
    pub upstream: &'a str,
    pub identity: &'a str,
}

impl<'a> Place<'a> {
    /// The place of the record a store keeps under `name` ([`record_name`]).
    pub fn of(namespace: &'a str, name: &'a str) -> Place<'a> {
        let (upstream, identity) = name
            .split_once(IDENTITY_SEPARATOR)
            .unwrap_or((name, OWN_IDENTITY));
        Place {
            namespace,
            upstream,
            identity,
        }
    }
}

/// Why a stored record could not be read.
#[derive(Debug)]
pub enum Unread {
    /// Not a record: damaged, or written by something else.
    Damaged(String),
    /// Sealed, and no configured key opens it: its plain fields, and why.
    Sealed {
        seed_hash: String,
        generation: u64,
        why: String,
    },
}

/// The form a store writes.
#[derive(Serialize, Deserialize)]
struct Stored {
    seed_hash: String,
    #[serde(flatten)]
    secrets: Secrets,
    #[serde(default)]
    issued_at_ms: u64,
    #[serde(default)]
    expires_at_ms: u64,
    generation: u64,
    #[serde(default)]
    login_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<Sealed>,
}

/// A record's secrets: written plain in the record, or sealed in `sealed`.
#[derive(Default, Serialize, Deserialize)]
struct Secrets {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_secret",
        deserialize_with = "de_opt_secret"
    )]
    refresh_token: Option<Secret<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_secret",
        deserialize_with = "de_opt_secret"
    )]
    access_token: Option<Secret<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_secret",
        deserialize_with = "de_opt_secret"
    )]
    dpop_key: Option<Secret<String>>,
}

impl TokenRecord {
    /// What the seal binds besides the secrets: the place and every plain field.
    fn bound(&self, place: &Place) -> Vec<u8> {
        format!(
            "tollgate sealed record v1\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}",
            place.namespace,
            place.upstream,
            place.identity,
            self.seed_hash,
            self.generation,
            self.login_at_ms,
            self.issued_at_ms,
            self.expires_at_ms
        )
        .into_bytes()
    }

    /// The record as a store writes it at `place`: its secrets sealed with `keys`' key, or
    /// plain when none is set.
    pub fn encode(&self, place: &Place, keys: &Keys) -> String {
        let secrets = Secrets {
            refresh_token: self.refresh_token.clone(),
            access_token: self.access_token.clone(),
            dpop_key: self.dpop_key.clone(),
        };
        let plain = secrets_json(&secrets);
        let (secrets, sealed) = match keys.seal(&self.bound(place), plain.expose().as_bytes()) {
            Some(sealed) => (Secrets::default(), Some(sealed)),
            None => (secrets, None),
        };
        let stored = Stored {
            seed_hash: self.seed_hash.clone(),
            secrets,
            issued_at_ms: self.issued_at_ms,
            expires_at_ms: self.expires_at_ms,
            generation: self.generation,
            login_at_ms: self.login_at_ms,
            sealed,
        };
        serde_json::to_string_pretty(&stored).expect("a token record always serialises")
    }

    /// A record a store read at `place`, opened with `keys` when sealed.
    pub fn decode(text: &[u8], place: &Place, keys: &Keys) -> Result<TokenRecord, Unread> {
        let stored: Stored =
            serde_json::from_slice(text).map_err(|e| Unread::Damaged(e.to_string()))?;
        let mut record = TokenRecord {
            seed_hash: stored.seed_hash,
            dpop_key: stored.secrets.dpop_key,
            refresh_token: stored.secrets.refresh_token,
            access_token: stored.secrets.access_token,
            issued_at_ms: stored.issued_at_ms,
            expires_at_ms: stored.expires_at_ms,
            generation: stored.generation,
            login_at_ms: stored.login_at_ms,
        };
        let Some(sealed) = stored.sealed else {
            return Ok(record);
        };
        let opened = keys
            .open(&record.bound(place), &sealed)
            .map_err(|why| Unread::Sealed {
                seed_hash: record.seed_hash.clone(),
                generation: record.generation,
                why,
            })?;
        let secrets: Secrets = serde_json::from_slice(&opened)
            .map_err(|e| Unread::Damaged(format!("its sealed part: {e}")))?;
        record.refresh_token = secrets.refresh_token;
        record.access_token = secrets.access_token;
        record.dpop_key = secrets.dpop_key;
        Ok(record)
    }

    /// A record of which only the lineage and generation are known: one that does not open.
    pub fn unopened(seed_hash: String, generation: u64) -> TokenRecord {
        TokenRecord {
            seed_hash,
            dpop_key: None,
            refresh_token: None,
            access_token: None,
            issued_at_ms: 0,
            expires_at_ms: 0,
            generation,
            login_at_ms: 0,
        }
    }

    /// Whether a record a store read was sealed (for `check`), without opening it.
    pub fn is_sealed(text: &[u8]) -> bool {
        serde_json::from_slice::<Stored>(text).is_ok_and(|s| s.sealed.is_some())
    }
}

/// The secrets as JSON, held in zeroed-on-drop memory.
fn secrets_json(secrets: &Secrets) -> Secret<String> {
    Secret::new(serde_json::to_string(secrets).expect("secrets always serialise"))
}

fn ser_opt_secret<S: Serializer>(v: &Option<Secret<String>>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().map(|secret| secret.expose()).serialize(s)
}

fn de_opt_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret<String>>, D::Error> {
    Option::<String>::deserialize(d).map(|o| o.map(Secret::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TokenRecord {
        TokenRecord {
            seed_hash: "h".into(),
            dpop_key: None,
            refresh_token: Some(Secret::from("rt-secret")),
            access_token: Some(Secret::from("at-secret")),
            issued_at_ms: 1,
            expires_at_ms: 2,
            generation: 3,
            login_at_ms: 0,
        }
    }

    /// A record sealed for one identity opens only there: not as the upstream's own, nor as
    /// another identity's, nor under another namespace.
    #[test]
    fn a_sealed_record_opens_only_at_its_place() {
        let key = Secret::new("c2VhbGluZyBrZXkgb2YgdGhpcnR5LXR3byBieXRlcyE=".to_owned());
        let keys = Keys::new(Some(&key), &[]).unwrap();
        let alice = record_name("api", Some("alice"));
        assert_eq!(alice, "api@alice");
        let text = record().encode(&Place::of("tollgate", &alice), &keys);
        assert!(
            !text.contains("rt-secret") && !text.contains("at-secret"),
            "{text}"
        );
        let opened = TokenRecord::decode(text.as_bytes(), &Place::of("tollgate", &alice), &keys);
        assert!(opened.unwrap() == record());
        for (namespace, name) in [
            ("tollgate", "api"),
            ("tollgate", "api@bob"),
            ("other", "api@alice"),
        ] {
            let moved = TokenRecord::decode(text.as_bytes(), &Place::of(namespace, name), &keys);
            assert!(
                matches!(moved, Err(Unread::Sealed { .. })),
                "{namespace} {name}"
            );
        }
        // Without a key a record is written plain, as before sealing.
        let plain = record().encode(&Place::of("", "api"), &Keys::default());
        assert!(plain.contains("rt-secret"));
        let read = TokenRecord::decode(plain.as_bytes(), &Place::of("", "api"), &keys).unwrap();
        assert!(read == record());
    }
}
