//! Sealing token records at rest (`[state] key`, `previous_keys`): the secrets of a record
//! (refresh token, access token) are encrypted with AES-256-GCM from `ring`, under a random
//! 96-bit nonce, and bound by the associated data to where the record lives (the store's
//! namespace, the upstream, the identity) and to its plain fields (lineage, generation, login
//! time, lifetime), so a record copied to another upstream, or edited, does not open.
//!
//! `key` seals; `key` and `previous_keys` open, each record naming the key that sealed it by a
//! short id ([`Keys::fingerprint`]: the first 8 hex digits of a SHA-256 of the key, which says
//! nothing of it). A record sealed with a previous key is sealed again with `key` at its next
//! save. Key material is never shown: not in `Debug`, logs or errors (a key is known by its
//! id). The decoded key is zeroed once `ring` has it; `ring`'s own key schedule is not.

use crate::secret::Secret;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::Zeroizing;

/// The algorithm sealed records name (JOSE's name for AES-256-GCM).
const ALGORITHM: &str = "A256GCM";

/// How `check` and the docs say to make a key.
pub const HOW_TO_MAKE_A_KEY: &str =
    "32 random bytes in base64, as `openssl rand -base64 32` prints them";

/// One key of `[state] key` or `previous_keys`.
struct Key {
    id: String,
    key: LessSafeKey,
}

impl Key {
    /// A key from its base64 text (standard or URL-safe alphabet, padded or not).
    fn parse(text: &Secret<String>) -> Result<Key, String> {
        let text = text.expose().trim();
        let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .map(Zeroizing::new)
            .ok_or_else(|| format!("not base64; a key is {HOW_TO_MAKE_A_KEY}"))?;
        if bytes.len() != 32 {
            return Err(format!(
                "{} bytes long; a key is {HOW_TO_MAKE_A_KEY}",
                bytes.len()
            ));
        }
        let mut named = Sha256::new();
        named.update(b"tollgate state key\0");
        named.update(&bytes[..]);
        let id = named.finalize()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte AES-256 key");
        Ok(Key {
            id,
            key: LessSafeKey::new(key),
        })
    }
}

/// Check that `text` is a key, for the config's validation.
pub fn check_key(text: &Secret<String>) -> Result<(), String> {
    Key::parse(text).map(drop)
}

/// The keys a store seals and opens records with.
#[derive(Default)]
pub struct Keys {
    /// `[state] key`: seals, and opens.
    sealing: Option<Key>,
    /// `previous_keys`: open only.
    previous: Vec<Key>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("key", &self.fingerprint())
            .field(
                "previous_keys",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A record's secrets, sealed: what a store writes in place of them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sealed {
    pub alg: String,
    /// The id of the key that sealed it ([`Keys::fingerprint`]).
    pub key: String,
    /// Base64 (standard, padded).
    pub nonce: String,
    /// The ciphertext and its tag, base64.
    pub data: String,
}

impl Keys {
    /// The keys of `[state] key` and `previous_keys` (checked when the config was loaded).
    pub fn new(key: Option<&Secret<String>>, previous: &[Secret<String>]) -> Result<Keys, String> {
        let sealing = key
            .map(Key::parse)
            .transpose()
            .map_err(|e| format!("state.key: {e}"))?;
        let previous = previous
            .iter()
            .enumerate()
            .map(|(i, k)| Key::parse(k).map_err(|e| format!("state.previous_keys[{i}]: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Keys { sealing, previous })
    }

    /// The id of the key records are sealed with, if any: safe to show.
    pub fn fingerprint(&self) -> Option<&str> {
        self.sealing.as_ref().map(|k| k.id.as_str())
    }

    /// The ids of `previous_keys`, in order.
    pub fn previous_fingerprints(&self) -> impl Iterator<Item = &str> {
        self.previous.iter().map(|k| k.id.as_str())
    }

    /// `plain` sealed with `[state] key` and bound to `bound`; `None` when no key is set (the
    /// record is written plain).
    pub fn seal(&self, bound: &[u8], plain: &[u8]) -> Option<Sealed> {
        let key = self.sealing.as_ref()?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source works");
        let mut data = plain.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound),
                &mut data,
            )
            .expect("AES-GCM seals any record");
        Some(Sealed {
            alg: ALGORITHM.to_owned(),
            key: key.id.clone(),
            nonce: STANDARD.encode(nonce),
            data: STANDARD.encode(data),
        })
    }

    /// What `sealed` holds, if a configured key opens it with `bound`; else why not, in words
    /// that say what to do.
    pub fn open(&self, bound: &[u8], sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, String> {
        if sealed.alg != ALGORITHM {
            return Err(format!(
                "it is sealed with {}, which this version does not know (it seals with {ALGORITHM})",
                sealed.alg
            ));
        }
        let Some(key) = self
            .sealing
            .iter()
            .chain(&self.previous)
            .find(|k| k.id == sealed.key)
        else {
            return Err(match self.sealing {
                None => format!("it is sealed with key {}, and no [state] key is set: set [state] key (or previous_keys) to that key", sealed.key),
                Some(_) => format!("it is sealed with key {}, which is neither [state] key nor one of previous_keys: add that key to previous_keys (or make it [state] key)", sealed.key),
            });
        };
        let damaged = || {
            format!(
                "key {} does not open it: it was changed, or copied from another upstream or store",
                key.id
            )
        };
        let nonce: [u8; NONCE_LEN] = STANDARD
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(damaged)?;
        let mut data = Zeroizing::new(STANDARD.decode(&sealed.data).map_err(|_| damaged())?);
        let plain_len = key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound),
                &mut data,
            )
            .map_err(|_| damaged())?
            .len();
        data.truncate(plain_len);
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Secret<String> {
        Secret::new(STANDARD.encode([byte; 32]))
    }

    #[test]
    fn a_sealed_value_opens_with_its_key_and_binding_only() {
        let keys = Keys::new(Some(&key(1)), &[]).unwrap();
        let sealed = keys.seal(b"api", b"the refresh token").unwrap();
        assert!(!sealed.data.contains("refresh"));
        assert_eq!(
            &keys.open(b"api", &sealed).unwrap()[..],
            b"the refresh token"
        );
        let err = keys.open(b"other", &sealed).unwrap_err();
        assert!(err.contains("copied from another upstream"), "{err}");
        // Two seals of the same value differ (a fresh nonce each time).
        assert_ne!(
            keys.seal(b"api", b"x").unwrap(),
            keys.seal(b"api", b"x").unwrap()
        );
    }

    #[test]
    fn previous_keys_open_and_never_seal() {
        let old = Keys::new(Some(&key(1)), &[]).unwrap();
        let sealed = old.seal(b"api", b"rt").unwrap();
        let rotated = Keys::new(Some(&key(2)), &[key(1)]).unwrap();
        assert_eq!(&rotated.open(b"api", &sealed).unwrap()[..], b"rt");
        let resealed = rotated.seal(b"api", b"rt").unwrap();
        assert_eq!(resealed.key, rotated.fingerprint().unwrap());
        assert_ne!(resealed.key, sealed.key);

        let new_only = Keys::new(Some(&key(2)), &[]).unwrap();
        let err = new_only.open(b"api", &sealed).unwrap_err();
        assert!(
            err.contains(&sealed.key) && err.contains("previous_keys"),
            "{err}"
        );
        let none = Keys::default();
        assert!(none.seal(b"api", b"rt").is_none());
        let err = none.open(b"api", &sealed).unwrap_err();
        assert!(err.contains("no [state] key is set"), "{err}");
    }

    #[test]
    fn keys_that_are_not_32_bytes_of_base64_say_how_to_make_one() {
        for bad in ["not base64 at all!", "c2hvcnQ="] {
            let err = check_key(&Secret::from(bad)).unwrap_err();
            assert!(err.contains("openssl rand -base64 32"), "{err}");
        }
        let url_safe = Secret::new(URL_SAFE_NO_PAD.encode([0xfb; 32]));
        assert!(check_key(&url_safe).is_ok());
    }

    #[test]
    fn no_key_material_in_debug() {
        let k = key(7);
        let keys = Keys::new(Some(&k), &[key(8)]).unwrap();
        let shown = format!("{keys:?}");
        assert!(!shown.contains(k.expose().as_str()), "{shown}");
        assert!(shown.contains(keys.fingerprint().unwrap()), "{shown}");
    }
}
