//! `Secret<T>`: a value that must never be printed. Debug and Display show `[redacted]`, there is
//! no `Serialize`, and the only way to read it is `expose()`, which makes every use easy to find.
//! Its memory is zeroed when it is dropped.
//! Tokens that must appear in logs appear as a [`fingerprint`] at most.

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::Zeroize;

/// A secret value (client secret, refresh token, password, inbound key), zeroed on drop.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself. Call it only where the value leaves the process on purpose
    /// (a token request, a header) or is written to the state store.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T: Zeroize> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de, T: Deserialize<'de> + Zeroize> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret<String> {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

/// A short, stable, non-reversible name for a token: the first 8 hex digits of its SHA-256.
/// Enough to tell two tokens apart in a log, useless to an attacker.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(8);
    for byte in &digest[..4] {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The full SHA-256 of a secret, hex encoded: stored beside a refresh token's descendants so
/// that a new seed in the config can be recognised without storing the seed itself.
pub fn sha256_hex(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::from("hunter2-very-secret");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            password: Secret<String>,
        }
        let holder = Holder {
            password: secret.clone(),
        };
        assert!(!format!("{holder:?}").contains("hunter2"));
        assert!(!format!("{holder:#?}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2-very-secret");
    }

    #[test]
    fn fingerprint_is_short_stable_and_distinct() {
        let a = fingerprint("token-a");
        assert_eq!(a.len(), 8);
        assert_eq!(a, fingerprint("token-a"));
        assert_ne!(a, fingerprint("token-b"));
        assert!(!a.contains("token"));
    }

    /// Dropping a secret wipes its value first.
    #[test]
    fn a_dropped_secret_is_zeroed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        #[derive(Default)]
        struct Watched(Arc<AtomicBool>);
        impl Zeroize for Watched {
            fn zeroize(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let wiped = Arc::new(AtomicBool::new(false));
        let secret = Secret::new(Watched(Arc::clone(&wiped)));
        assert!(!wiped.load(Ordering::SeqCst));
        drop(secret);
        assert!(wiped.load(Ordering::SeqCst));
    }
}
